"""Lung masks: one registry of providers, each turning a case into a binary uint8 (Z, H, W) lung mask.

- ``threshold``: classical HU thresholding and morphology, no model, no weights (the offline default).
- ``otsu``: the same morphology on an intensity-relative threshold (Otsu's, per slice), for data whose HU
  cannot be recovered (8-bit slices with no recorded window).
- ``reference``: the dataset's own lung mask.
- ``lungmask``: the pretrained U-Nets of the ``lungmask`` package (Hofmanninger et al. 2020), run offline
  from a weights file.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from domgen.data.case import Case
from domgen.errors import DomgenError
from domgen.preprocessing.intensity import hu_recoverable, require_hu, to_hu


def threshold_lung_mask(
    hu: np.ndarray,
    spacing: tuple[float, float] = (1.0, 1.0),
    threshold_hu: float = -320.0,
    max_components: int = 2,
    min_component_fraction: float = 0.1,
    min_radius_mm: float = 12.0,
    closing_mm: float = 20.0,
    convex_hull: bool = False,
) -> np.ndarray:
    """Binary lung mask of a (Z, H, W) HU volume by thresholding and morphology.

    Air below ``threshold_hu`` inside the convex outline of the body is the candidate lung; the
    ``max_components`` largest 3D components at least ``min_component_fraction`` of the largest and with
    an inscribed circle of radius ``min_radius_mm`` in some slice are kept (the two lungs, or one if they
    are joined through the trachea); each lung is then closed with a disk of ``closing_mm`` and its
    holes filled slice by slice so that lesions denser than the threshold (consolidation, dense
    ground-glass) are inside the mask. ``convex_hull`` additionally replaces each lung by its convex hull
    per slice, to catch large subpleural lesions at the price of some mediastinum.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"threshold_lung_mask expects a (Z, H, W) volume, got shape {hu.shape}")
    return lungs_from_air(hu < threshold_hu, spacing, max_components, min_component_fraction, min_radius_mm,
                          closing_mm, convex_hull)


def otsu_air(volume: np.ndarray) -> np.ndarray:
    """Air (and aerated lung) of each slice: below the slice's Otsu threshold, which separates the dark
    air/lung mode of a chest CT histogram from the bright tissue mode whatever the intensity scale."""
    from skimage.filters import threshold_otsu

    air = np.zeros(volume.shape, dtype=bool)
    for z, slice_ in enumerate(np.asarray(volume, dtype=np.float32)):
        if slice_.max() > slice_.min():
            air[z] = slice_ < threshold_otsu(slice_)
    return air


def lungs_from_air(
    air: np.ndarray,
    spacing: tuple[float, float] = (1.0, 1.0),
    max_components: int = 2,
    min_component_fraction: float = 0.1,
    min_radius_mm: float = 12.0,
    closing_mm: float = 20.0,
    convex_hull: bool = False,
) -> np.ndarray:
    """The morphology of :func:`threshold_lung_mask` on a given (Z, H, W) air mask."""
    spacing = tuple(float(s) for s in spacing)
    inner_air = np.stack([_air_inside_body(slice_air) for slice_air in air]) if air.size else air
    labels, n_components = ndimage.label(inner_air)
    mask = np.zeros(air.shape, dtype=np.uint8)
    if n_components == 0:
        return mask
    # A lung is thick somewhere: drop thin air (a detached trachea, air trapped against the table) first.
    depth = np.stack([ndimage.distance_transform_edt(slice_air, sampling=spacing) for slice_air in inner_air])
    thickness = ndimage.maximum(depth, labels, np.arange(1, n_components + 1))
    sizes = np.where(thickness >= min_radius_mm, np.bincount(labels.ravel(), minlength=n_components + 1)[1:], 0)
    largest_first = [int(i) for i in np.argsort(sizes)[::-1][:max_components] if sizes[i] > 0]
    if not largest_first:
        return mask
    keep = [i + 1 for i in largest_first if sizes[i] >= min_component_fraction * sizes[largest_first[0]]]
    lungs = np.isin(labels, keep)

    # Pad so the closing does not erode lungs near the slice border.
    pad = int(np.ceil(closing_mm / min(spacing))) + 1
    for z in range(air.shape[0]):
        pieces, n_pieces = ndimage.label(lungs[z])
        if n_pieces == 0:
            continue
        pieces = np.pad(pieces, pad)
        filled_slice = np.zeros(pieces.shape, dtype=bool)
        for piece_label, (rows, cols) in enumerate(ndimage.find_objects(pieces), start=1):
            box = (slice(rows.start - pad, rows.stop + pad), slice(cols.start - pad, cols.stop + pad))
            # Each lung on its own so the closing cannot bridge the two lungs across the mediastinum.
            piece = pieces[box] == piece_label
            piece = ndimage.binary_fill_holes(_closing_mm(piece, closing_mm, spacing) | piece)
            if convex_hull:
                piece = convex_hull_image(piece)
            filled_slice[box] |= piece
        mask[z] = filled_slice[pad:-pad, pad:-pad]
    return mask


def _air_inside_body(air: np.ndarray) -> np.ndarray:
    """The air of one slice that lies inside the convex outline of the patient's body.

    The body is the largest non-air region; its convex hull rather than "air not touching the border"
    decides what is inside, so a lung reaching a gap in a thin chest wall, or the edge of a tight field of
    view, is kept. Outside air caught in the hull (e.g. between the back and a touching table) is thin
    and is dropped later by the thickness test.
    """
    regions, n_regions = ndimage.label(~air)
    if n_regions == 0:
        return np.zeros(air.shape, dtype=bool)
    body = regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1
    return air & convex_hull_image(body)


def _closing_mm(mask: np.ndarray, radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """Binary closing with a disk of ``radius_mm`` in physical units (distance transforms: cost independent
    of the radius, and exact for anisotropic pixels)."""
    if radius_mm <= 0:
        return mask
    dilated = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm
    return ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm


class ThresholdLungMask:
    """Classical lung mask from HU thresholds; works on HU data and on windowed data with a known window.
    ``mode="otsu"`` thresholds each slice at its Otsu value instead, for data whose HU are unknown."""

    name = "threshold"
    MODES = ("hu", "otsu")

    def __init__(self, threshold_hu: float = -320.0, max_components: int = 2,
                 min_component_fraction: float = 0.1, min_radius_mm: float = 12.0, closing_mm: float = 20.0,
                 convex_hull: bool = False, mode: str = "hu"):
        if mode not in self.MODES:
            raise DomgenError(f"Unknown threshold lung-mask mode {mode!r}; choose one of {', '.join(self.MODES)}.")
        self.mode = mode
        self.threshold_hu = float(threshold_hu)
        self.max_components = int(max_components)
        self.min_component_fraction = float(min_component_fraction)
        self.min_radius_mm = float(min_radius_mm)
        self.closing_mm = float(closing_mm)
        self.convex_hull = bool(convex_hull)

    def __call__(self, case: Case) -> np.ndarray:
        options = (case.spacing, self.max_components, self.min_component_fraction, self.min_radius_mm,
                   self.closing_mm, self.convex_hull)
        if self.mode == "otsu":
            return lungs_from_air(otsu_air(case.image), *options)
        require_hu(case.intensity, case.dataset, "the threshold lung mask (--lung-mask threshold)",
                   "use --lung-mask otsu (intensity-relative) or reference")
        hu = to_hu(case.image, case.intensity, source=f"dataset {case.dataset!r}")
        threshold = self.threshold_hu
        space = case.intensity
        if space.window_known and space.level - space.width / 2.0 >= threshold:
            # A narrow window (e.g. mediastinal) saturates air and lung at its lower edge: call that "air".
            threshold = space.level - space.width / 2.0 + 0.5 * space.width / 255.0
        return threshold_lung_mask(hu, case.spacing, threshold, self.max_components, self.min_component_fraction,
                                   self.min_radius_mm, self.closing_mm, self.convex_hull)


class ReferenceLungMask:
    """The lung mask shipped with the dataset (``lungs:`` in the suite file)."""

    name = "reference"

    def __call__(self, case: Case) -> np.ndarray:
        if case.lung is None:
            raise DomgenError(
                f"Dataset {case.dataset!r} has no reference lung masks (no `lungs:` folder in its suite entry); "
                "use --lung-mask threshold or --lung-mask lungmask."
            )
        if case.lung.shape != case.image.shape:
            raise DomgenError(
                f"The lung mask of {case.dataset}/{case.patient_id} has shape {case.lung.shape} but the image "
                f"has {case.image.shape}; fix the lung-mask file of this patient in the dataset."
            )
        return (np.asarray(case.lung) > 0).astype(np.uint8)


# lungmask's models; R231 and R231CovidWeb label right/left lung, LTRCLobes the five lobes (all -> binary).
LUNGMASK_MODELS = ("R231", "R231CovidWeb", "LTRCLobes")


def _lungmask_inferer_class():
    """lungmask's LMInferer, but built around a model we loaded (its own __init__ would download weights)."""
    from lungmask.mask import LMInferer

    class LoadedModelInferer(LMInferer):
        def __init__(self, model, device, model_name: str, batch_size: int):  # no super().__init__: it would load weights
            self.modelname = model_name
            self.fillmodel = None
            self.fillmodelm = None
            self.force_cpu = device.type == "cpu"
            self.batch_size = batch_size
            self.volume_postprocessing = True
            self.tqdm_disable = True
            self.device = device
            self.model = model.to(device)

    return LoadedModelInferer


class LungmaskLungMask:
    """Lung masks from the ``lungmask`` package's U-Net (R231, R231CovidWeb or LTRCLobes), strictly offline.

    Weights come from ``weights`` (``--lungmask-weights``) or from the torch hub cache where lungmask's own
    download would have put them; nothing is ever downloaded. Runs on the CPU unless ``device`` is given.
    """

    name = "lungmask"

    def __init__(self, model: str = "R231", weights: str | os.PathLike | None = None,
                 device: str | None = None, batch_size: int = 20):
        if model not in LUNGMASK_MODELS:
            raise DomgenError(f"Unknown lungmask model {model!r}; choose one of {', '.join(LUNGMASK_MODELS)}.")
        self.model_name = model
        self.weights = Path(weights) if weights is not None else None
        self.device = device or "cpu"
        self.batch_size = int(batch_size)
        self._inferer = None

    def weights_path(self) -> Path:
        """The weights file to load: the explicit one, else lungmask's file in the torch hub cache."""
        if self.weights is not None:
            if not self.weights.is_file():
                raise DomgenError(
                    f"The lungmask weights file {self.weights} does not exist; pass an existing .pth file to "
                    "--lungmask-weights or use --lung-mask threshold."
                )
            return self.weights
        import torch
        from lungmask.mask import MODEL_URLS

        url, _ = MODEL_URLS[self.model_name]
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        # torch.hub.load_state_dict_from_url (what lungmask calls) names the file after the URL's basename.
        path = cache_dir / os.path.basename(urlparse(url).path)
        if not path.is_file():
            raise DomgenError(
                f"lungmask weights for {self.model_name} are not in {cache_dir} and cannot be downloaded "
                "offline; pass --lungmask-weights PATH or use --lung-mask threshold."
            )
        return path

    def load_model(self):
        """lungmask's UNet with the weights from :meth:`weights_path`, in eval mode."""
        import torch
        from lungmask.resunet import UNet

        path = self.weights_path()
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, zip and EOF errors all mean "not a readable weights file"
            raise DomgenError(
                f"Cannot read the lungmask weights file {path} ({type(error).__name__}); pass lungmask's "
                f"{self.model_name} .pth state dict or use --lung-mask threshold."
            ) from error
        if not isinstance(state_dict, dict) or "last.bias" not in state_dict:
            raise DomgenError(
                f"The file {path} is not a lungmask U-Net state dict; pass lungmask's {self.model_name} .pth "
                "file or use --lung-mask threshold."
            )
        # The same architecture lungmask.mask.get_model builds; the class count comes from the file.
        model = UNet(n_classes=int(state_dict["last.bias"].shape[0]), padding=True, depth=5,
                     up_mode="upsample", batch_norm=True, residual=False)
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise DomgenError(
                f"The weights in {path} do not fit lungmask's U-Net (missing, unexpected or mis-shaped "
                f"tensors); pass lungmask's {self.model_name} .pth file or use --lung-mask threshold."
            ) from error
        return model.eval()

    def __call__(self, case: Case) -> np.ndarray:
        require_hu(case.intensity, case.dataset, "the lungmask U-Net (--lung-mask lungmask)",
                   "use --lung-mask otsu (intensity-relative) or reference")
        hu = to_hu(case.image, case.intensity, source=f"dataset {case.dataset!r}")
        if self._inferer is None:
            import torch

            self._inferer = _lungmask_inferer_class()(
                self.load_model(), torch.device(self.device), self.model_name, self.batch_size
            )
        labels = self._inferer.apply(np.ascontiguousarray(hu, dtype=np.float32))
        return (np.asarray(labels) > 0).astype(np.uint8)


class OtsuLungMask(ThresholdLungMask):
    """The threshold provider in its intensity-relative mode: no HU needed."""

    name = "otsu"

    def __init__(self, max_components: int = 2, min_component_fraction: float = 0.1, min_radius_mm: float = 12.0,
                 closing_mm: float = 20.0, convex_hull: bool = False):
        super().__init__(max_components=max_components, min_component_fraction=min_component_fraction,
                         min_radius_mm=min_radius_mm, closing_mm=closing_mm, convex_hull=convex_hull, mode="otsu")


LUNG_MASK_PROVIDERS = {
    "threshold": ThresholdLungMask,
    "otsu": OtsuLungMask,
    "reference": ReferenceLungMask,
    "lungmask": LungmaskLungMask,
}


def usable_providers(intensity, has_reference: bool) -> list[str]:
    """The providers that can run on a dataset (for `data check`): HU-based ones need a recoverable window."""
    out = [name for name in ("threshold", "otsu") if name == "otsu" or hu_recoverable(intensity)]
    if has_reference:
        out.append("reference")
    if hu_recoverable(intensity):
        out.append("lungmask (needs weights)")
    return out


def lung_mask_of(case: Case, provider) -> list[np.ndarray] | np.ndarray:
    """The provider's binary lung mask of ``case``; a ragged case (slices of different sizes) slice by slice."""
    if not case.ragged:
        return provider(case).astype(bool)
    return [provider(case.single_slice(z))[0].astype(bool) for z in range(case.n_slices)]


def get_lung_mask_provider(name: str, **options):
    """Build the provider called ``name`` (``--lung-mask``); options left at None are ignored."""
    if name not in LUNG_MASK_PROVIDERS:
        raise DomgenError(
            f"Unknown lung-mask provider {name!r} (--lung-mask); choose one of {', '.join(LUNG_MASK_PROVIDERS)}."
        )
    provider_class = LUNG_MASK_PROVIDERS[name]
    options = {key: value for key, value in options.items() if value is not None}
    try:
        inspect.signature(provider_class).bind(**options)
    except TypeError as error:
        raise DomgenError(
            f"The lung-mask provider {name!r} does not take the options {', '.join(sorted(options))}; "
            "drop them or choose another --lung-mask."
        ) from error
    return provider_class(**options)
