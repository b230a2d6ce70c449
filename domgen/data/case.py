"""The data model: a case is one patient's CT, its lesion mask and (optionally) its lung mask."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class IntensitySpace:
    """How the stored voxel values relate to Hounsfield units.

    ``kind == "hu"``: values are HU. ``kind == "windowed"``: values were mapped linearly from the HU
    window [level - width/2, level + width/2] to [0, 255] and clipped; ``level``/``width`` are None when
    the window is unknown (then HU cannot be recovered).
    """

    kind: str = "hu"
    level: float | None = None
    width: float | None = None

    @property
    def window_known(self) -> bool:
        return self.kind == "windowed" and self.level is not None and self.width is not None

    def describe(self) -> str:
        if self.kind == "hu":
            return "hu"
        if self.window_known:
            return f"windowed(level={self.level:g}, width={self.width:g})"
        return "windowed(unknown window)"


HU = IntensitySpace("hu")

# Lesion label values used throughout domgen (MedSeg convention): 0 background, 1 ground-glass,
# 2 consolidation. Binary datasets use 1 only. Pleural effusion (MedSeg value 3) is not a COVID lesion.
GROUND_GLASS = 1
CONSOLIDATION = 2


@dataclass
class Case:
    """One patient.

    image: float32 (Z, H, W) in ``intensity`` space; lesion: uint8 (Z, H, W) with 0 background and
    class values from ``lesion_classes``; lung: uint8 (Z, H, W) binary or None; spacing: in-plane pixel
    spacing (row_mm, col_mm); slice_spacing: distance between slice centres in mm (None: unknown, e.g.
    unrelated 2D slices); slice_index: the original index of each of the Z slices.
    """

    patient_id: str
    dataset: str
    image: np.ndarray
    lesion: np.ndarray
    spacing: tuple[float, float] = (1.0, 1.0)
    slice_spacing: float | None = None
    intensity: IntensitySpace = HU
    lung: np.ndarray | None = None
    slice_index: np.ndarray | None = None
    lesion_classes: dict[int, str] = field(default_factory=lambda: {1: "lesion"})
    source_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.slice_index is None:
            self.slice_index = np.arange(self.image.shape[0])

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[0])

    def slice_ids(self) -> list[str]:
        """Stable, human-readable slice identifiers: ``<dataset>/<patient_id>/<slice index>``."""
        return [f"{self.dataset}/{self.patient_id}/{int(i):04d}" for i in self.slice_index]
