"""From cases to model-ready 2D slices: lung mask, normalisation (in HU where a step needs HU), resizing.

Each slice keeps its patient id, slice id, original-resolution masks and spacing, so predictions are
scored (and Certainty-Index pixels counted) at each slice's own resolution; slices of one patient may
differ in size. Which slices are kept is the explicit rule ``keep_slices``, and every dropped slice is
counted (``SliceSet.report``), so no slice disappears silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from domgen.data.case import Case
from domgen.errors import DomgenError
from domgen.preprocessing.intensity import HU_FREE_NORMALISATIONS, NORMALISATIONS, hu_recoverable, require_hu, resize_slice, to_hu
from domgen.preprocessing.lung_mask import get_lung_mask_provider, lung_mask_of
from domgen.settings import LOO, default

TARGETS = ("lesion", "lung")
# which slices of a case become samples: every slice, slices with lung (>= min_lung_pixels), slices with lesion
KEEP_SLICES = ("all", "lung", "lesion")


@dataclass(frozen=True)
class SlicePreprocessing:
    """How slices are made; every field is part of the run's config, its default the leave-one-out row of domgen/settings.py."""

    image_size: int = default(LOO, "preprocessing.image_size")
    lung_mask: str = default(LOO, "preprocessing.lung_mask")  # a LUNG_MASK_PROVIDERS name
    lungmask_weights: str | None = default(LOO, "preprocessing.lungmask_weights")
    normalisation: str = default(LOO, "preprocessing.normalisation")  # a NORMALISATIONS name
    # zero the input outside the lungs (Enshaei; Bizopoulos lesion-b)
    mask_to_lung: bool = default(LOO, "preprocessing.mask_to_lung")
    target: str = default(LOO, "preprocessing.target")  # "lesion" or "lung" (Bizopoulos' lung experiment)
    # with keep_slices=lung: keep slices with at least this many lung pixels
    min_lung_pixels: int = default(LOO, "preprocessing.min_lung_pixels")
    keep_slices: str = default(LOO, "preprocessing.keep_slices")  # a KEEP_SLICES name

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
    # from prepare_slices: {"kept", "dropped", "per_patient": {pid: [kept, total]}, "rule"}; empty for subsets
    report: dict = field(default_factory=dict)
    # distance between slice centres of each slice's case in mm (None: unknown); empty when not recorded
    slice_spacings: list[float | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slice_ids)

    def subset(self, index) -> "SliceSet":
        index = np.asarray(index, dtype=int)
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return SliceSet(
            self.inputs[index], self.targets[index], pick(self.slice_ids), pick(self.patient_ids),
            pick(self.datasets), pick(self.truths), pick(self.lungs), pick(self.spacings),
            pick(self.lesion_classes) if self.lesion_classes else [],
            slice_spacings=pick(self.slice_spacings) if self.slice_spacings else [],
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
            slice_spacings=sum((s.slice_spacings for s in sets), []) if all(s.slice_spacings for s in sets) else [],
        ) if len(sets) > 1 else first

    def patients(self) -> list[str]:
        return sorted(set(self.patient_ids))


def _normalised_slices(case: Case, pre: SlicePreprocessing, lung: list[np.ndarray]) -> list[np.ndarray]:
    """The normalised image of every slice. Only steps that need HU convert to HU (the per-slice z-score is
    unchanged by the linear map of a window, so 8-bit data with no recorded window z-scores as stored)."""
    normalise = NORMALISATIONS[pre.normalisation]
    if pre.normalisation not in HU_FREE_NORMALISATIONS:
        require_hu(case.intensity, case.dataset, f"normalisation {pre.normalisation!r} (preprocessing.normalisation)",
                   "use --set preprocessing.normalisation=zscore")
    out = []
    for z in range(case.n_slices):
        image = np.asarray(case.image[z], dtype=np.float32)
        if hu_recoverable(case.intensity):
            image = to_hu(image, case.intensity)
        mask = lung[z] if pre.mask_to_lung else None
        image = normalise(image, mask=mask) if pre.normalisation == "zscore" else normalise(image)
        if pre.mask_to_lung:
            image = np.where(lung[z], image, 0.0)
        out.append(image.astype(np.float32))
    return out


def kept_slices(case: Case, pre: SlicePreprocessing, lung: list[np.ndarray]) -> list[int]:
    """The slice indices the ``keep_slices`` rule keeps (Bizopoulos' lung experiment keeps every slice)."""
    if pre.keep_slices not in KEEP_SLICES:
        raise DomgenError(f"preprocessing.keep_slices {pre.keep_slices!r} is unknown; choose one of {', '.join(KEEP_SLICES)}")
    if pre.keep_slices == "all" or pre.target == "lung":
        return list(range(case.n_slices))
    if pre.keep_slices == "lesion":
        return [z for z in range(case.n_slices) if np.any(np.asarray(case.lesion[z]) > 0)]
    return [z for z in range(case.n_slices) if int(lung[z].sum()) >= pre.min_lung_pixels]


def prepare_case(case: Case, pre: SlicePreprocessing, provider) -> SliceSet:
    """The slices of one case that the ``keep_slices`` rule keeps, with the count of dropped ones in ``report``."""
    lung = [np.asarray(m, dtype=bool) for m in lung_mask_of(case, provider)]
    keep = kept_slices(case, pre, lung)
    images = _normalised_slices(case, pre, lung) if keep else []
    size = (pre.image_size, pre.image_size)
    inputs, targets, truths = [], [], []
    for z in keep:
        target = lung[z] if pre.target == "lung" else np.asarray(case.lesion[z]) > 0
        inputs.append(resize_slice(images[z], size, kind="image"))
        targets.append(resize_slice(target.astype(np.uint8), size, kind="mask"))
        truths.append(target.astype(np.uint8))
    ids = case.slice_ids()
    n = len(keep)
    return SliceSet(
        np.asarray(inputs, dtype=np.float32).reshape(n, 1, *size),
        np.asarray(targets, dtype=np.uint8).reshape(n, *size),
        [ids[z] for z in keep], [case.patient_id] * n, [case.dataset] * n,
        truths, [lung[z].astype(np.uint8) for z in keep],
        [tuple(case.spacing)] * n, [np.asarray(case.lesion[z]) for z in keep],
        report={"per_patient": {case.patient_id: [n, case.n_slices]}},
        slice_spacings=[None if case.slice_spacing is None else float(case.slice_spacing)] * n,
    )


def prepare_slices(cases: list[Case], pre: SlicePreprocessing) -> SliceSet:
    """Every kept slice of ``cases``; ``report`` counts kept and dropped slices per patient and overall."""
    provider = get_lung_mask_provider(pre.lung_mask, **({"weights": pre.lungmask_weights} if pre.lungmask_weights else {}))
    parts = [prepare_case(c, pre, provider) for c in cases]
    per_patient = {pid: counts for part in parts for pid, counts in part.report["per_patient"].items()}
    kept = sum(k for k, _ in per_patient.values())
    total = sum(t for _, t in per_patient.values())
    out = SliceSet.concat(parts) if any(len(p) for p in parts) else parts[0] if parts else None
    if out is None:
        raise DomgenError("no cases to prepare; check that the dataset was read and is not empty")
    out.report = {"rule": pre.keep_slices, "kept": kept, "dropped": total - kept, "per_patient": per_patient}
    return out
