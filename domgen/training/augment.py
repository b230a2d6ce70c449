"""On-the-fly augmentation with albumentations, one recipe per paper."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

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


def build_augmentation(name: str, seed: int, params: dict | None = None) -> A.Compose | None:
    """The recipe ``name`` (its builder called with ``params``, e.g. GIN's layers), seeded."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}")
    transforms = AUGMENTATIONS[name](**(params or {}))
    if not transforms:
        return None
    pipeline = A.Compose(transforms)
    seed_augmentation(pipeline, seed)
    return pipeline


def seed_augmentation(pipeline: A.Compose, seed: int) -> None:
    """Seed ``pipeline`` for one slice: each transform from its own child of ``seed``, so their draws are independent.

    albumentations' ``Compose.set_random_seed`` gives every transform the same seed, so their "apply?" draws were
    equal: Bizopoulos et al.'s two flips (p = 0.5 each) always came together, a 180-degree turn and never a mirror
    image, and Enshaei et al.'s flip only came with the affine."""
    pipeline.set_random_seed(seed)
    children = np.random.SeedSequence(seed).spawn(len(pipeline.transforms))
    for transform, child in zip(pipeline.transforms, children):
        transform.set_random_seed(int(child.generate_state(1)[0]))
