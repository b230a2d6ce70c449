"""From cases to model-ready 2D slices: HU, lung mask, normalisation, resizing.

Each slice keeps its patient id, slice id, original-resolution masks and spacing, so predictions are
scored (and Certainty-Index pixels counted) at the original resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from domgen.data.case import Case
from domgen.preprocessing.intensity import NORMALISATIONS, resize_slice, to_hu
from domgen.preprocessing.lung_mask import get_lung_mask_provider

TARGETS = ("lesion", "lung")


@dataclass(frozen=True)
class SlicePreprocessing:
    """How slices are made; every field is part of the run's config."""

    image_size: int = 64
    lung_mask: str = "threshold"  # a LUNG_MASK_PROVIDERS name
    lungmask_weights: str | None = None
    normalisation: str = "zscore"  # a NORMALISATIONS name
    mask_to_lung: bool = True  # zero the input outside the lungs (Enshaei; Bizopoulos lesion-b)
    target: str = "lesion"  # "lesion" or "lung" (Bizopoulos' lung experiment)
    min_lung_pixels: int = 1  # keep slices with at least this many lung pixels

    @classmethod
    def from_config(cls, cfg: dict) -> "SlicePreprocessing":
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class SliceSet:
    """N slices: model inputs (N, 1, S, S), model-size targets (N, S, S) and per-slice records."""

    inputs: np.ndarray
    targets: np.ndarray
    slice_ids: list[str]
    patient_ids: list[str]
    datasets: list[str]
    truths: list[np.ndarray]  # original-resolution binary target
    lungs: list[np.ndarray]  # original-resolution lung masks
    spacings: list[tuple[float, float]]
    lesion_classes: list[np.ndarray] = field(default_factory=list)  # original labels (GGO/consolidation)

    def __len__(self) -> int:
        return len(self.slice_ids)

    def subset(self, index) -> "SliceSet":
        index = np.asarray(index, dtype=int)
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return SliceSet(
            self.inputs[index], self.targets[index], pick(self.slice_ids), pick(self.patient_ids),
            pick(self.datasets), pick(self.truths), pick(self.lungs), pick(self.spacings),
            pick(self.lesion_classes) if self.lesion_classes else [],
        )

    def of_patients(self, patient_ids) -> "SliceSet":
        wanted = set(patient_ids)
        return self.subset([i for i, p in enumerate(self.patient_ids) if p in wanted])

    def with_targets(self, targets: np.ndarray) -> "SliceSet":
        """The same slices with other model-size targets (pseudo-labels)."""
        out = self.subset(np.arange(len(self)))
        out.targets = np.asarray(targets, dtype=np.uint8)
        return out

    @staticmethod
    def concat(sets: list["SliceSet"]) -> "SliceSet":
        sets = [s for s in sets if len(s)]
        first = sets[0]
        return SliceSet(
            np.concatenate([s.inputs for s in sets]), np.concatenate([s.targets for s in sets]),
            *[sum((getattr(s, name) for s in sets), []) for name in
              ("slice_ids", "patient_ids", "datasets", "truths", "lungs", "spacings")],
            sum((s.lesion_classes for s in sets), []) if all(s.lesion_classes for s in sets) else [],
        ) if len(sets) > 1 else first

    def patients(self) -> list[str]:
        return sorted(set(self.patient_ids))


def prepare_case(case: Case, pre: SlicePreprocessing, provider) -> SliceSet:
    """All usable slices of one case."""
    hu = to_hu(case.image, case.intensity)
    lung = provider(case).astype(bool)
    target = lung if pre.target == "lung" else case.lesion > 0
    normalise = NORMALISATIONS[pre.normalisation]
    size = (pre.image_size, pre.image_size)
    keep = [z for z in range(case.n_slices) if lung[z].sum() >= pre.min_lung_pixels or pre.target == "lung"]
    inputs, targets = [], []
    for z in keep:
        mask = lung[z] if pre.mask_to_lung else None
        image = normalise(hu[z], mask=mask) if pre.normalisation == "zscore" else normalise(hu[z])
        if pre.mask_to_lung:
            image = np.where(lung[z], image, 0.0)
        inputs.append(resize_slice(image.astype(np.float32), size, kind="image"))
        targets.append(resize_slice(target[z].astype(np.uint8), size, kind="mask"))
    ids = case.slice_ids()
    n = len(keep)
    return SliceSet(
        np.asarray(inputs, dtype=np.float32).reshape(n, 1, *size),
        np.asarray(targets, dtype=np.uint8).reshape(n, *size),
        [ids[z] for z in keep], [case.patient_id] * n, [case.dataset] * n,
        [target[z].astype(np.uint8) for z in keep], [lung[z].astype(np.uint8) for z in keep],
        [tuple(case.spacing)] * n, [case.lesion[z] for z in keep],
    )


def prepare_slices(cases: list[Case], pre: SlicePreprocessing) -> SliceSet:
    provider = get_lung_mask_provider(pre.lung_mask, **({"weights": pre.lungmask_weights} if pre.lungmask_weights else {}))
    return SliceSet.concat([prepare_case(c, pre, provider) for c in cases])
