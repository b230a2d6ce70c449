"""Domain-generalisation augmentations for the 2D trainer: BigAug (Zhang et al. 2020) and GIN (Ouyang et al. 2022).

Both are albumentations transforms drawing every random number from the transform's own seeded generator
(``self.random_generator``), so the trainer's per-slice seeds (``augmentation_seed``) fix each slice's draw.
domgen's inputs are z-scored (negative and above 1), while albumentations' pixel-level transforms clip float images
to [0, 1]; the intensity steps here are therefore written as small ``ImageOnlyTransform`` subclasses that never clip,
and the spatial steps are albumentations' own (Affine, ElasticTransform), which move image and mask together.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F


class _Intensity(A.ImageOnlyTransform):
    """An intensity-only step: the mask is never touched (ImageOnlyTransform); float32 in, float32 out, no clipping."""

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        squeeze = img.ndim == 3 and img.shape[-1] == 1
        out = self.change(np.asarray(img[..., 0] if squeeze else img, dtype=np.float32), **params)
        out = out.astype(np.float32)
        return out[..., None] if squeeze else out

    def change(self, img: np.ndarray, **params) -> np.ndarray:
        raise NotImplementedError


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)


class BigAugBlur(_Intensity):
    """Image quality, blurriness: Gaussian blur, sigma ~ U(0.25, 1.5) pixels (Zhang et al. 2020, Sec. II-B)."""

    def get_params(self) -> dict:
        return {"sigma": float(self.random_generator.uniform(0.25, 1.5))}

    def change(self, img, sigma, **_):
        return _blur(img, sigma)


class BigAugSharpen(_Intensity):
    """Image quality, sharpness: unsharp masking B1 + alpha (B1 - B2), B1 = blur(sigma ~ U(0.25, 1.5)), B2 = blur(B1,
    0.5), alpha ~ U(10, 30) (Zhang et al. 2020, Sec. II-B)."""

    def get_params(self) -> dict:
        return {"sigma": float(self.random_generator.uniform(0.25, 1.5)), "alpha": float(self.random_generator.uniform(10, 30))}

    def change(self, img, sigma, alpha, **_):
        b1 = _blur(img, sigma)
        return b1 + alpha * (b1 - _blur(b1, 0.5))


class BigAugNoise(_Intensity):
    """Image quality, noise: additive Gaussian noise, std ~ U(0.1, 1.0) in units of the (z-scored) intensity."""

    def get_params_dependent_on_data(self, params, data) -> dict:
        shape = np.asarray(data["image"]).shape[:2]
        std = self.random_generator.uniform(0.1, 1.0)
        return {"noise": (self.random_generator.standard_normal(shape) * std).astype(np.float32)}

    def change(self, img, noise, **_):
        return img + noise


class BigAugBrightness(_Intensity):
    """Appearance, brightness: a shift ~ U(-0.1, 0.1)."""

    def get_params(self) -> dict:
        return {"shift": float(self.random_generator.uniform(-0.1, 0.1))}

    def change(self, img, shift, **_):
        return img + shift


class BigAugContrast(_Intensity):
    """Appearance, contrast: a power law with gamma ~ U(0.5, 4.5) on the slice rescaled to [0, 1], mapped back to its
    own range (the paper's images are in [0, 1]; domgen's are z-scored)."""

    def get_params(self) -> dict:
        return {"gamma": float(self.random_generator.uniform(0.5, 4.5))}

    def change(self, img, gamma, **_):
        low, high = float(img.min()), float(img.max())
        if high <= low:
            return img
        return ((img - low) / (high - low)) ** gamma * (high - low) + low


class BigAugIntensity(_Intensity):
    """Appearance, intensity perturbation: x * (1 + s) + b, s, b ~ U(-0.1, 0.1)."""

    def get_params(self) -> dict:
        return {"scale": float(self.random_generator.uniform(-0.1, 0.1)), "shift": float(self.random_generator.uniform(-0.1, 0.1))}

    def change(self, img, scale, shift, **_):
        return img * (1.0 + scale) + shift


def bigaug(p: float = 0.5) -> list:
    """Zhang et al. 2020 (IEEE TMI 39(7)) deep stacked transformations: nine steps in three groups, each with
    probability ``p`` (the paper's 0.5, row ``method.bigaug.p``), in the paper's order (image quality, appearance, spatial).

    Departures: 2D slices, not 3D volumes; the deformation is albumentations' elastic field (alpha 30, sigma 5 px) for
    the paper's; contrast's power law acts on the slice rescaled to [0, 1] (domgen's slices are z-scored)."""
    return [
        # image quality
        BigAugSharpen(p=p), BigAugBlur(p=p), BigAugNoise(p=p),
        # appearance
        BigAugBrightness(p=p), BigAugContrast(p=p), BigAugIntensity(p=p),
        # spatial: rotation +-20 degrees, scaling 0.4..1.6, elastic deformation; the mask moves with the image
        A.Affine(rotate=(-20, 20), interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=p),
        A.Affine(scale=(0.4, 1.6), interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=p),
        A.ElasticTransform(alpha=30, sigma=5, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=p),
    ]


class GlobalIntensityNonlinear(_Intensity):
    """GIN (Ouyang et al. 2022, IEEE TMI 42(4), Sec. III-B, without IPA): a shallow conv net with random weights per
    call, ``layers`` convs of kernel 1 or 3 (random per layer), ``channels`` intermediate channels, weights and biases
    ~ N(0, 1), LeakyReLU between layers; the output is blended with the input, alpha ~ U(0, 1), and rescaled to the
    input's Frobenius norm (their Eq. 2-3). Intensity-only: the mask never changes.

    Departure: the zero background outside the lungs is transformed too (GIN acts on the whole image)."""

    def __init__(self, layers: int = 4, channels: int = 2, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.layers = layers
        self.channels = channels

    def get_params(self) -> dict:
        g = self.random_generator
        convs = []
        for i in range(self.layers):
            c_in = 1 if i == 0 else self.channels
            c_out = 1 if i == self.layers - 1 else self.channels
            k = int(g.choice([1, 3]))
            convs.append((g.standard_normal((c_out, c_in, k, k)).astype(np.float32), g.standard_normal(c_out).astype(np.float32)))
        return {"convs": convs, "alpha": float(g.uniform(0.0, 1.0))}

    def change(self, img, convs, alpha, **_):
        x = torch.from_numpy(np.ascontiguousarray(img))[None, None]
        y = x
        with torch.no_grad():
            for i, (w, b) in enumerate(convs):
                y = F.conv2d(y, torch.from_numpy(w), torch.from_numpy(b), padding=w.shape[-1] // 2)
                if i < len(convs) - 1:
                    y = F.leaky_relu(y)
            mixed = alpha * y + (1.0 - alpha) * x  # Eq. 3: blend with the input
            norm_in, norm_out = torch.linalg.norm(x), torch.linalg.norm(mixed)
            mixed = mixed * (norm_in / norm_out) if float(norm_out) > 0 else mixed  # keep the input's Frobenius norm
        return mixed[0, 0].numpy()

    def get_transform_init_args_names(self):
        return ("layers", "channels")


def gin(layers: int = 4, channels: int = 2) -> list:
    """GIN with ``layers`` convolutions and ``channels`` intermediate channels (rows ``method.gin.layers`` and
    ``method.gin.channels``; GIN-IPA's defaults: 4 layers, 2 intermediate channels, kernels from {1, 3})."""
    return [GlobalIntensityNonlinear(layers=int(layers), channels=int(channels), p=1.0)]
