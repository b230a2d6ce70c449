"""Whole CT volumes for 3D models: Müller et al.'s preprocessing (the MIScnn COVID-19 pipeline).

Clip to -1250..250 HU (skipped for data already windowed to 0..255), min-max per volume to 0..255,
resample to 1.58 x 1.58 x 2.70 mm, z-score per volume. MONAI does the intensity maps and the resampling.

Arrays here are channel-first (C, X, Y, Z), MONAI's and NIfTI's order, with the affine diag(x mm, y mm,
z mm); a :class:`~domgen.data.case.Case` holds (Z, Y, X), so ``to_xyz`` / ``to_zyx`` transpose. Labels are
background 0 / lung 1 / lesion 2 (the lesion wins where both are set: domgen's lung masks are binary).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, ScaleIntensity, Spacing, SpatialResample

from domgen.data.case import Case
from domgen.errors import DomgenError
from domgen.preprocessing.lung_mask import get_lung_mask_provider
from domgen.settings import CV, default

BACKGROUND, LUNG, LESION = 0, 1, 2
CLASS_NAMES = ("background", "lung", "lesion")


def to_xyz(volume_zyx: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(volume_zyx, (2, 1, 0)))


def to_zyx(volume_xyz: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(volume_xyz, (2, 1, 0)))


def require_volume(case: Case, source_format: str | None = None) -> float:
    """The slice spacing of a case that can be used in 3D; one sentence when it cannot."""
    if source_format == "slices":
        raise DomgenError(f"dataset '{case.dataset}' is a folder of unrelated 2D slices (format slices), which cannot be "
                          "used as 3D volumes; choose a nifti or dicom dataset")
    if case.slice_spacing is None or not case.slice_spacing > 0:
        raise DomgenError(f"the slice spacing of {case.dataset}/{case.patient_id} is unknown, so it cannot be resampled "
                          "in 3D; give the volume a z voxel size (NIfTI pixdim[3]) or DICOM ImagePositionPatient tags")
    return float(case.slice_spacing)


def case_affine(case: Case) -> np.ndarray:
    """diag(x mm, y mm, z mm, 1) of a case in (X, Y, Z) order (origin at the first voxel's centre)."""
    row_mm, col_mm = case.spacing
    return np.diag([float(col_mm), float(row_mm), require_volume(case), 1.0])


def class_labels(lesion_zyx: np.ndarray, lung_zyx: np.ndarray | None) -> np.ndarray:
    """Background 0 / lung 1 / lesion 2 in (Z, Y, X)."""
    labels = np.zeros(lesion_zyx.shape, np.uint8)
    if lung_zyx is not None:
        labels[np.asarray(lung_zyx) > 0] = LUNG
    labels[np.asarray(lesion_zyx) > 0] = LESION
    return labels


@dataclass(frozen=True)
class VolumePreprocessing:
    """``enabled: false`` feeds the stored intensities at the stored spacing (the paper's 'no preprocessing'). Every
    default is the cross-validate ``preprocessing.*`` row of domgen/settings.py (Müller et al.'s values)."""

    enabled: bool = default(CV, "preprocessing.enabled")
    clip_hu: tuple[float, float] = default(CV, "preprocessing.clip_hu")
    # x, y, z mm; None keeps the stored grid
    spacing: tuple[float, float, float] | None = default(CV, "preprocessing.spacing")
    lung_mask: str = default(CV, "preprocessing.lung_mask")

    @classmethod
    def from_config(cls, cfg: dict) -> "VolumePreprocessing":
        unknown = sorted(set(cfg) - {"enabled", "clip_hu", "spacing", "lung_mask"})
        if unknown:
            raise DomgenError(f"unknown preprocessing key(s) {', '.join(unknown)}; known: enabled, clip_hu, spacing, lung_mask")
        clip = cfg.get("clip_hu", cls.clip_hu)
        spacing = cfg.get("spacing", cls.spacing)
        try:
            clip = tuple(float(v) for v in clip)
            spacing = None if spacing is None else tuple(float(v) for v in spacing)
        except (TypeError, ValueError):
            raise DomgenError("preprocessing.clip_hu must be [low, high] in HU and preprocessing.spacing [x, y, z] in mm (or null)") from None
        if len(clip) != 2 or clip[0] >= clip[1]:
            raise DomgenError(f"preprocessing.clip_hu {list(clip)} must be [low, high] with low < high, e.g. [-1250, 250]")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise DomgenError(f"preprocessing.spacing {list(spacing)} must be three positive millimetres [x, y, z], e.g. [1.58, 1.58, 2.7]")
        enabled = cfg.get("enabled", cls.enabled)
        if not isinstance(enabled, bool):
            raise DomgenError(f"preprocessing.enabled must be true or false, not {enabled!r}")
        return cls(enabled, clip, spacing, str(cfg.get("lung_mask", cls.lung_mask)))


@dataclass
class Volume:
    """One preprocessed volume: image (1, X, Y, Z) float32, labels (X, Y, Z) uint8 on the grid ``affine``;
    ``case`` is the original and ``truth`` its labels on the case's own grid (metrics and written predictions)."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    case: Case | None
    truth: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.truth is None:
            self.truth = self.labels

    @property
    def patient_id(self) -> str:
        return self.case.patient_id

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.diag(self.affine)[:3])  # type: ignore[return-value]


def normalise_intensity(image_xyz: np.ndarray, windowed: bool, clip_hu: tuple[float, float]) -> np.ndarray:
    """Clip to ``clip_hu`` unless already windowed, then min-max per volume to 0..255 (MIScnn 'grayscale')."""
    image = np.asarray(image_xyz, dtype=np.float32)
    if not windowed:
        image = np.clip(image, clip_hu[0], clip_hu[1])
    return ScaleIntensity(minv=0.0, maxv=255.0)(image[None]).numpy()[0].astype(np.float32)


def resample(image: np.ndarray, labels: np.ndarray, affine: np.ndarray,
             spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (1, X, Y, Z), labels (X, Y, Z), new affine) on a ``spacing`` grid through the same first voxel centre:
    trilinear for the image, nearest neighbour for the labels (MONAI Spacing)."""
    aff = torch.as_tensor(affine, dtype=torch.float64)
    img = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")(MetaTensor(torch.from_numpy(image), affine=aff))
    lab = Spacing(pixdim=spacing, mode="nearest", padding_mode="border")(
        MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), affine=aff))
    return (img.numpy().astype(np.float32), np.rint(lab.numpy()[0]).astype(np.uint8), img.affine.numpy())


def prepare_volume(case: Case, pre: VolumePreprocessing, provider=None) -> Volume:
    """Müller et al.'s preprocessing of one case (clip, min-max 0..255, resample, z-score)."""
    affine = case_affine(case)
    provider = provider or get_lung_mask_provider(pre.lung_mask)
    labels = to_xyz(class_labels(case.lesion, provider(case)))
    image = to_xyz(np.asarray(case.image, dtype=np.float32))
    if not pre.enabled:
        return Volume(image[None], labels, affine, case, labels)
    truth = labels
    image = normalise_intensity(image, case.intensity.kind == "windowed", pre.clip_hu)[None]
    if pre.spacing is not None:
        image, labels, affine = resample(image, labels, affine, pre.spacing)
    image = NormalizeIntensity()(image).numpy().astype(np.float32)  # z-score over the whole volume
    return Volume(image, labels, affine, case, truth)


def to_case_grid(probabilities: np.ndarray, volume: Volume) -> np.ndarray:
    """Class probabilities (C, X, Y, Z) on the preprocessed grid, resampled (trilinear) back to the case's own
    grid, as MIScnn's postprocessing does before evaluation."""
    target = case_affine(volume.case)
    shape = volume.case.image.shape[::-1]
    if np.allclose(volume.affine, target) and probabilities.shape[1:] == tuple(shape):
        return probabilities
    moved = SpatialResample(mode="bilinear", padding_mode="border")(
        MetaTensor(torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32)),
                   affine=torch.as_tensor(volume.affine, dtype=torch.float64)),
        dst_affine=torch.as_tensor(target, dtype=torch.float64), spatial_size=shape)
    return moved.numpy().astype(np.float32)
