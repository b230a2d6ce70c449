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

    image: float32 (Z, H, W) in ``intensity`` space, or a list of Z (H_z, W_z) slices when the slices of
    one patient differ in size (2D collections cropped slice by slice: ``ragged``); lesion: uint8 (Z, H, W) with 0 background and
    class values from ``lesion_classes``; lung: uint8 (Z, H, W) binary or None; spacing: in-plane pixel
    spacing (row_mm, col_mm); slice_spacing: distance between slice centres in mm (None: unknown, e.g.
    unrelated 2D slices); slice_index: the original index of each of the Z slices.
    """

    patient_id: str
    dataset: str
    image: np.ndarray | list[np.ndarray]
    lesion: np.ndarray | list[np.ndarray]
    spacing: tuple[float, float] = (1.0, 1.0)
    slice_spacing: float | None = None
    intensity: IntensitySpace = HU
    lung: np.ndarray | list[np.ndarray] | None = None
    slice_index: np.ndarray | None = None
    lesion_classes: dict[int, str] = field(default_factory=lambda: {1: "lesion"})
    source_files: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict)  # what the reader did (e.g. raw mask values, a threshold applied), for `data check`

    def __post_init__(self) -> None:
        if self.slice_index is None:
            self.slice_index = np.arange(len(self.image))

    @property
    def n_slices(self) -> int:
        return len(self.image)

    @property
    def ragged(self) -> bool:
        """True when the slices are kept as a list because they differ in size."""
        return isinstance(self.image, list)

    def slice_shapes(self) -> list[tuple[int, int]]:
        return [tuple(int(n) for n in np.shape(s)) for s in self.image]

    def single_slice(self, z: int) -> "Case":
        """Slice ``z`` as a one-slice case (arrays of shape (1, H, W)); used to process ragged cases slice by slice."""
        one = lambda a: None if a is None else np.asarray(a[z])[None]  # noqa: E731
        return Case(self.patient_id, self.dataset, one(self.image), one(self.lesion), self.spacing, self.slice_spacing,
                    self.intensity, one(self.lung), np.asarray(self.slice_index)[z:z + 1], dict(self.lesion_classes),
                    self.source_files, dict(self.notes))

    def slice_ids(self) -> list[str]:
        """Stable, human-readable slice identifiers: ``<dataset>/<patient_id>/<slice index>``."""
        return [f"{self.dataset}/{self.patient_id}/{int(i):04d}" for i in self.slice_index]
