"""Ground-truth-free slice confidence scores: a registry beside the Certainty Index.

Each score is a small function of the model and the slices; higher means more confident, NaN where the model
predicts no lesion (nothing to be confident about). Enshaei et al. note that the CI "is not robust to possible
outliers" (confident-but-wrong slices); these scores let a researcher test that.

- ``ci``: the Certainty Index (Enshaei et al., eq. 1): mean probability over the N pixels above the cut-off.
- ``entropy``: 1 - mean binary predictive entropy (bits) over the predicted lesion.
- ``tta``: test-time-augmentation agreement: mean Dice between the binary predictions of the slice under
  flips and 90-degree rotations (mapped back), over all pairs; 1 for a model that is flip/rotation invariant.
- ``mc-dropout``: 1 - 4 x mean variance of the lesion probability over Monte-Carlo dropout passes, over the
  predicted lesion (a Bernoulli variance is at most 1/4); needs dropout layers in the model.
- ``ci-ts``: the CI of the temperature-scaled model (Guo et al. 2017): probabilities sigmoid(logit / T) with T fitted
  on the fold's labelled source validation slices (``fit_fold_temperature``), over the same predicted pixels.
- ``boundary`` / ``interior``: 1 - mean binary entropy over the predicted lesion's boundary band (pixels within
  ``BAND`` 4-connected steps of its edge, inside or outside) and over its interior (the lesion eroded by ``BAND``). Errors of a
  segmentation concentrate at the boundary (the failure-detection literature aggregates uncertainty over it
  separately); NaN where the lesion has no interior or no band.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from domgen.errors import DomgenError
from domgen.methods.certainty import certainty_index
from domgen.preprocessing.slices import SliceSet
from domgen.training.trainer import predict_model_size

MC_PASSES = 8


@dataclass
class ScoreContext:
    """What a score may use: the model, the slices, their probabilities at original and at model size."""

    model: nn.Module
    slices: SliceSet
    probabilities: list[np.ndarray]  # original size, one per slice
    model_size: np.ndarray  # (N, S, S) probabilities at the model's size
    cutoff: float
    device: str = "cpu"
    temperature: float | None = None  # fitted on the source validation slices; needed by ci-ts only


def ci_score(ctx: ScoreContext) -> np.ndarray:
    return np.asarray([certainty_index(p, ctx.cutoff)[0] for p in ctx.probabilities], dtype=float)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in bits, 0 at p = 0 or 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def entropy_score(ctx: ScoreContext) -> np.ndarray:
    out = []
    for p in ctx.probabilities:
        lesion = p > ctx.cutoff
        out.append(1.0 - float(binary_entropy(p[lesion]).mean()) if lesion.any() else np.nan)
    return np.asarray(out, dtype=float)


def ci_ts_score(ctx: ScoreContext) -> np.ndarray:
    from domgen.evaluation.calibration import scale_probabilities, scaled_cutoff

    if ctx.temperature is None:
        raise DomgenError("the ci-ts confidence needs a temperature fitted on the source validation slices, and none was "
                          "given; use it from `domgen confidence` or `domgen leave-one-out`/`pseudolabel`, which fit one")
    cut = scaled_cutoff(ctx.cutoff, ctx.temperature)
    return np.asarray([certainty_index(scale_probabilities(p, ctx.temperature), cut)[0] for p in ctx.probabilities], dtype=float)


BAND = 2  # pixels either side of the predicted lesion's edge, at the slice's own size


def _entropy_over(ctx: ScoreContext, region) -> np.ndarray:
    out = []
    for p in ctx.probabilities:
        where = region(p > ctx.cutoff)
        out.append(1.0 - float(binary_entropy(p[where]).mean()) if where.any() else np.nan)
    return np.asarray(out, dtype=float)


def boundary_score(ctx: ScoreContext) -> np.ndarray:
    from scipy.ndimage import binary_dilation, binary_erosion

    return _entropy_over(ctx, lambda m: binary_dilation(m, iterations=BAND) & ~binary_erosion(m, iterations=BAND) if m.any() else m)


def interior_score(ctx: ScoreContext) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return _entropy_over(ctx, lambda m: binary_erosion(m, iterations=BAND))


def fit_fold_temperature(model: nn.Module, val_slices: SliceSet, device: str = "cpu") -> float:
    """Temperature scaling's T for ``model``, fitted on its fold's labelled source validation slices (Guo et al.)."""
    from domgen.evaluation.calibration import fit_temperature_on
    from domgen.training.trainer import to_original_size

    if not len(val_slices):
        raise DomgenError("temperature scaling needs the fold's source validation slices, and the fold has none; "
                          "use a split with validation patients")
    probabilities = to_original_size(predict_model_size(model, val_slices, device=device), val_slices)
    return fit_temperature_on(probabilities, val_slices.truths)


# (forward, inverse) on the last two axes of a (N, 1, S, S) / (N, S, S) array
TTA_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda a: a, lambda a: a),
    "hflip": (lambda a: np.flip(a, -1), lambda a: np.flip(a, -1)),
    "vflip": (lambda a: np.flip(a, -2), lambda a: np.flip(a, -2)),
    "rot90": (lambda a: np.rot90(a, 1, (-2, -1)), lambda a: np.rot90(a, -1, (-2, -1))),
    "rot180": (lambda a: np.rot90(a, 2, (-2, -1)), lambda a: np.rot90(a, -2, (-2, -1))),
    "rot270": (lambda a: np.rot90(a, 3, (-2, -1)), lambda a: np.rot90(a, -3, (-2, -1))),
}


def mask_dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice of two stacks of binary masks (N, ...), per slice; 1 where both are empty."""
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    inter = (a & b).sum(1)
    total = a.sum(1) + b.sum(1)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def tta_score(ctx: ScoreContext) -> np.ndarray:
    masks = []
    for name, (forward, inverse) in TTA_TRANSFORMS.items():
        if name == "identity":
            prob = ctx.model_size
        else:
            shifted = replace(ctx.slices, inputs=np.ascontiguousarray(forward(ctx.slices.inputs)))
            prob = inverse(predict_model_size(ctx.model, shifted, device=ctx.device))
        masks.append(np.ascontiguousarray(prob) > ctx.cutoff)
    pairs = [mask_dice(masks[i], masks[j]) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    agreement = np.mean(pairs, axis=0)
    predicted = np.asarray([(p > ctx.cutoff).any() for p in ctx.probabilities])
    return np.where(predicted, agreement, np.nan)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def mc_dropout_score(ctx: ScoreContext, passes: int = MC_PASSES, seed: int = 0) -> np.ndarray:
    layers = dropout_modules(ctx.model)
    if not layers:
        name = getattr(ctx.model, "domgen_model_config", {}).get("arch", type(ctx.model).__name__)
        raise DomgenError(f"the mc-dropout confidence needs dropout layers, and this {name} model has none; "
                          "choose --confidence ci, entropy or tta")
    torch.manual_seed(seed)
    ctx.model.eval()
    for layer in layers:
        layer.train()  # dropout stays on at inference; batch norm keeps its running statistics
    try:
        with torch.no_grad():
            draws = np.stack([np.concatenate([
                torch.sigmoid(ctx.model(torch.from_numpy(ctx.slices.inputs[i:i + 32]).to(ctx.device)))[:, 0].float().cpu().numpy()
                for i in range(0, len(ctx.slices), 32)]) for _ in range(passes)])
    finally:
        ctx.model.eval()
    variance = draws.var(axis=0)
    lesion = draws.mean(axis=0) > ctx.cutoff
    out = [1.0 - 4.0 * float(v[m].mean()) if m.any() else np.nan for v, m in zip(variance, lesion)]
    return np.asarray(out, dtype=float)


CONFIDENCE_SCORES: dict[str, Callable[[ScoreContext], np.ndarray]] = {
    "ci": ci_score,
    "entropy": entropy_score,
    "tta": tta_score,
    "mc-dropout": mc_dropout_score,
    "ci-ts": ci_ts_score,
    "boundary": boundary_score,
    "interior": interior_score,
}
NEEDS_TEMPERATURE = ("ci-ts",)


def get_score(name: str) -> Callable[[ScoreContext], np.ndarray]:
    if name not in CONFIDENCE_SCORES:
        raise DomgenError(f"unknown confidence score {name!r} (--confidence); choose one of {', '.join(CONFIDENCE_SCORES)}")
    return CONFIDENCE_SCORES[name]


def score_slices(ctx: ScoreContext, names) -> dict[str, np.ndarray]:
    """The named scores of every slice (the CI is always among them: it is the paper's and the N filter's)."""
    return {name: get_score(name)(ctx) for name in dict.fromkeys(["ci", *names])}
