"""On-the-fly augmentation with albumentations, one recipe per paper."""
from __future__ import annotations

import albumentations as A
import cv2

from domgen.training import dg_augment


def _enshaei() -> list:
    # zoom, shift, shear and flip (Enshaei et al., section II); also used when retraining on pseudo-labels
    return [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.1, 0.1), shear=(-10, 10),
                 interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7),
        A.HorizontalFlip(p=0.5),
    ]


def _bizopoulos() -> list:
    # flips p=0.5, rotation U[-180, 180], scale 0.5..1.5 with zero padding (Bizopoulos et al., section 2.3)
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(rotate=(-180, 180), scale=(0.5, 1.5), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0),
    ]


AUGMENTATIONS = {"none": list, "enshaei": _enshaei, "bizopoulos": _bizopoulos,
                 # domain generalisation (domgen compare): BigAug (Zhang et al. 2020) and GIN (Ouyang et al. 2022)
                 "bigaug": dg_augment.bigaug, "gin": dg_augment.gin}


def build_augmentation(name: str, seed: int) -> A.Compose | None:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}")
    transforms = AUGMENTATIONS[name]()
    return A.Compose(transforms, seed=seed) if transforms else None
