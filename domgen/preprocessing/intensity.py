"""Intensity handling: recover HU, clip and window, normalise, resize.

Arrays are one slice (H, W) or a volume (Z, H, W); everything is pure numpy (and scikit-image for resizing).
"""
from __future__ import annotations

import numpy as np
from skimage.transform import resize

from domgen.data.case import IntensitySpace
from domgen.errors import DomgenError

# Lung window used when a config asks for "window" without level/width.
LUNG_WINDOW_LEVEL = -600.0
LUNG_WINDOW_WIDTH = 1500.0


def to_hu(image: np.ndarray, space: IntensitySpace, source: str | None = None) -> np.ndarray:
    """Return ``image`` in (approximate) Hounsfield units as float32.

    Windowed 8-bit data maps back linearly, v -> level - width/2 + v/255 * width; voxels that were clipped
    when the window was applied stay at the window edges. ``source`` (a dataset or file name) only makes
    the error message more precise.
    """
    image = np.asarray(image)
    where = f" of {source}" if source else ""
    if space.kind == "hu":
        return image.astype(np.float32, copy=False)
    if space.kind != "windowed":
        raise DomgenError(f"Unknown intensity kind {space.kind!r}{where}; use 'hu' or 'windowed' in the suite file.")
    if not space.window_known:
        raise DomgenError(
            f"The intensity window{where} is unknown, so Hounsfield units cannot be recovered; declare "
            "`intensity: {kind: windowed, level: L, width: W}` for it in the suite file."
        )
    low = space.level - space.width / 2.0
    return (low + image.astype(np.float32) / 255.0 * space.width).astype(np.float32)


def hu_recoverable(space: IntensitySpace) -> bool:
    """Whether stored values can be mapped back to HU (raw HU, or a windowed dataset with a recorded window)."""
    return space.kind == "hu" or space.window_known


def require_hu(space: IntensitySpace, dataset: str, step: str, alternatives: str) -> None:
    """One sentence naming the dataset, the step that needs HU and what to do instead, when HU are unknown."""
    if not hu_recoverable(space):
        raise DomgenError(
            f"{step} needs Hounsfield units, but dataset {dataset!r} is 8-bit windowed with no recorded window; "
            f"{alternatives}, or declare `intensity: {{kind: windowed, level: L, width: W}}` for it in the suite file"
        )


def clip_hu(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU values to [low, high] (float32)."""
    return np.clip(np.asarray(image, dtype=np.float32), low, high)


def hu_window(image: np.ndarray, level: float = LUNG_WINDOW_LEVEL, width: float = LUNG_WINDOW_WIDTH) -> np.ndarray:
    """Map the HU window [level - width/2, level + width/2] linearly to [0, 1] (float32), clipping outside."""
    low = level - width / 2.0
    return ((clip_hu(image, low, low + width) - low) / width).astype(np.float32)


def to_window_8bit(image_hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Store HU as 8-bit windowed values (the inverse of :func:`to_hu` up to quantisation)."""
    return np.rint(hu_window(image_hu, level, width) * 255.0).astype(np.uint8)


def zscore_per_slice(image: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Standardise each slice to zero mean and unit variance (Enshaei et al.).

    With ``mask`` (e.g. the lung mask) the mean and std are taken over the mask's pixels only and pixels
    outside it are set to 0. A constant slice (std < eps) or a slice with an empty mask becomes zeros.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"zscore_per_slice expects (H, W) or (Z, H, W), got shape {image.shape}")
    volume = image[None] if image.ndim == 2 else image
    if mask is None:
        inside = np.ones(volume.shape, dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        inside = (mask[None] if mask.ndim == 2 else mask) > 0
    out = np.zeros(volume.shape, dtype=np.float32)
    for z, (slice_, slice_inside) in enumerate(zip(volume, inside)):
        values = slice_[slice_inside].astype(np.float64)
        if values.size == 0:
            continue
        std = values.std()
        if std < eps:
            continue
        out[z][slice_inside] = ((values - values.mean()) / std).astype(np.float32)
    return out[0] if image.ndim == 2 else out


def zscore_whole_slice(image: np.ndarray) -> np.ndarray:
    """Per-slice z-score over every pixel of the slice, lung or not: Enshaei et al.'s z-score read literally
    (the text does not restrict the statistics to the lung); ``zscore`` is domgen's lung-only reading."""
    return zscore_per_slice(image, mask=None)


def fixed_normalise(image: np.ndarray, mu: float = -500.0, sigma: float = 500.0) -> np.ndarray:
    """(HU - mu) / sigma with dataset-independent constants (Bizopoulos et al.)."""
    return ((np.asarray(image, dtype=np.float32) - mu) / sigma).astype(np.float32)


def resize_slice(image: np.ndarray, size: tuple[int, int], kind: str = "image") -> np.ndarray:
    """Resize one (H, W) slice to ``size`` = (rows, cols).

    ``kind="image"``: bilinear with anti-aliasing, float32. ``kind="mask"``: nearest neighbour without
    anti-aliasing, so the integer labels come back exactly, in the input's dtype.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"resize_slice expects one (H, W) slice, got shape {image.shape}; use resize_volume")
    size = (int(size[0]), int(size[1]))
    if kind == "image":
        return resize(image.astype(np.float32), size, order=1, mode="edge", anti_aliasing=True,
                      preserve_range=True).astype(np.float32)
    if kind == "mask":
        resized = resize(image, size, order=0, mode="edge", anti_aliasing=False, preserve_range=True)
        return np.rint(resized).astype(image.dtype)
    raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")


def resize_volume(volume: np.ndarray, size: tuple[int, int], kind: str = "image") -> np.ndarray:
    """Resize every slice of a (Z, H, W) volume in-plane to ``size`` (slices are never mixed)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"resize_volume expects (Z, H, W), got shape {volume.shape}")
    if volume.shape[0] == 0:
        dtype = np.float32 if kind == "image" else volume.dtype
        return np.zeros((0, int(size[0]), int(size[1])), dtype=dtype)
    return np.stack([resize_slice(slice_, size, kind) for slice_ in volume])


# Normalisations chosen by name in configs; each takes an HU array (plus keyword options).
NORMALISATIONS = {
    "zscore": zscore_per_slice,  # statistics over the lung mask when the input is masked to the lung
    "zscore-slice": zscore_whole_slice,  # statistics over the whole slice (Enshaei et al. as written)
    "fixed": fixed_normalise,
    "window": hu_window,
}


# a z-score is unchanged by the linear map of a window, so these need no Hounsfield units
HU_FREE_NORMALISATIONS = ("zscore", "zscore-slice")


def get_normalisation(name: str):
    """Look up a normalisation by its config name."""
    if name not in NORMALISATIONS:
        raise DomgenError(f"Unknown normalisation {name!r}; choose one of {', '.join(sorted(NORMALISATIONS))}.")
    return NORMALISATIONS[name]
