"""Certainty-Index pseudo-labels (Enshaei et al.): rank unseen slices, retrain on the most certain.

The selected slices take their predicted masks (probability > cut-off) as labels and are mixed with the
source training slices (``mix = "source+pseudo"``) or used alone (``"pseudo-only"``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from domgen.evaluation.metrics import confusion, overlap_metrics
from domgen.evaluation.statistics import spearman_interval
from domgen.methods.certainty import Selection, certainty_index, rank_and_select
from domgen.preprocessing.slices import SliceSet
from domgen.training.trainer import TrainSettings, predict_model_size, to_original_size, train

MIXES = ("source+pseudo", "pseudo-only")
# how the CI limit is chosen without target labels: the fixed ci_min, or a quantile of the CI of the
# in-domain test slices (labelled source data the model did not train on)
CI_RULES = ("fixed", "indomain-quantile")


@dataclass(frozen=True)
class PseudoLabelSettings:
    ci_min: float = 0.8
    min_pixels: int = 50
    min_pixels_at: int | None = None  # min_pixels is defined for a min_pixels_at^2 slice and scaled by area
    top_k: int | None = None
    top_fraction: float | None = None
    mix: str = "source+pseudo"
    rounds: int = 1
    ci_rule: str = "fixed"
    ci_quantile: float = 0.5

    @classmethod
    def from_config(cls, cfg: dict) -> "PseudoLabelSettings":
        return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})

    @property
    def selection(self) -> Selection:
        return Selection(self.min_pixels, self.ci_min, self.top_k, self.top_fraction, self.min_pixels_at)

    def with_ci_limit(self, limit: float | None) -> "PseudoLabelSettings":
        """The settings with the CI limit of the ``ci_rule`` in force (``limit`` from the in-domain test set)."""
        if self.ci_rule == "fixed" or limit is None or not np.isfinite(limit):
            return self
        return replace(self, ci_min=float(limit))


def indomain_ci_limit(ranking: pd.DataFrame, quantile: float) -> float:
    """The ``quantile`` of the Certainty Index over the in-domain test slices that pass the N filter."""
    ok = ranking[ranking.eligible & ranking.ci.notna()]
    return float(np.quantile(ok.ci, quantile)) if len(ok) else float("nan")


def ci_ranking(probabilities: list[np.ndarray], slices: SliceSet, cutoff: float, selection: Selection) -> pd.DataFrame:
    """``ci_ranking.csv``: slice_id, patient_id, ci, n_pixels, min_pixels (the slice's N limit at its own size),
    eligible (passes the N filter), selected, dice (empty without ground truth), sorted from most to least
    certain (slices dropped by the N filter last)."""
    ci, n = zip(*(certainty_index(p, cutoff) for p in probabilities)) if probabilities else ((), ())
    ci, n = np.asarray(ci, dtype=float), np.asarray(n, dtype=int)
    limit_n = np.asarray([selection.min_pixels_for(p.shape) for p in probabilities], dtype=float)
    order, selected = rank_and_select(ci, n, selection, limit_n)
    dice = [overlap_metrics(confusion(p > cutoff, t))["dsc"] if t is not None else np.nan
            for p, t in zip(probabilities, slices.truths)]
    eligible = np.zeros(len(ci), dtype=bool)
    eligible[order] = True
    table = pd.DataFrame({"slice_id": slices.slice_ids, "patient_id": slices.patient_ids, "ci": ci,
                          "n_pixels": n, "min_pixels": limit_n, "eligible": eligible, "selected": selected, "dice": dice})
    ranked = set(order.tolist())
    rest = [i for i in range(len(table)) if i not in ranked]
    return table.iloc[list(order) + rest].reset_index(drop=True)


def ci_dice_spearman(ranking: pd.DataFrame) -> float:
    """Spearman correlation between CI and true slice DSC over the slices that pass the N filter."""
    ok = ranking[ranking.eligible & ranking.ci.notna() & ranking.dice.notna()]
    if len(ok) < 3 or ok.ci.nunique() < 2 or ok.dice.nunique() < 2:
        return float("nan")
    return float(spearmanr(ok.ci, ok.dice).statistic)


def ci_dice_spearman_metrics(ranking: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """``ci_dsc_spearman`` with its slice-bootstrap 95 % interval (``_low``, ``_high``) for MLflow."""
    ok = ranking[ranking.eligible & ranking.ci.notna() & ranking.dice.notna()]
    rho = ci_dice_spearman(ranking)
    if not np.isfinite(rho):
        return {"ci_dsc_spearman": rho}
    return {**spearman_interval(ok.ci.to_numpy(), ok.dice.to_numpy(), seed=seed).metrics(), "ci_dsc_spearman": rho}


def pseudo_labelled(slices: SliceSet, model_size_probabilities: np.ndarray, selected: np.ndarray, cutoff: float) -> SliceSet:
    """The selected slices with their predicted masks as training targets."""
    index = np.flatnonzero(selected)
    chosen = slices.subset(index)
    return chosen.with_targets((model_size_probabilities[index] > cutoff).astype(np.uint8))


def enhance(model, source_train: SliceSet, source_val: SliceSet, target: SliceSet, cutoff: float,
            settings: PseudoLabelSettings, train_settings: TrainSettings, progress: bool = True,
            on_epoch=None) -> tuple[object, list[pd.DataFrame]]:
    """Select-and-retrain ``settings.rounds`` times; returns the retrained model and each round's ranking."""
    if settings.mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}")
    if settings.ci_rule not in CI_RULES:
        raise ValueError(f"ci_rule must be one of {CI_RULES}")
    rankings = []
    for round_index in range(settings.rounds):
        small = predict_model_size(model, target, device=train_settings.device)
        ranking = ci_ranking(to_original_size(small, target), target, cutoff, settings.selection)
        rankings.append(ranking.assign(round=round_index))
        selected = np.zeros(len(target), dtype=bool)
        position = {sid: i for i, sid in enumerate(target.slice_ids)}
        selected[[position[s] for s in ranking.slice_id[ranking.selected]]] = True
        if not selected.any():
            break  # nothing certain enough: the model stays as it is
        pseudo = pseudo_labelled(target, small, selected, cutoff)
        train_set = pseudo if settings.mix == "pseudo-only" else SliceSet.concat([source_train, pseudo])
        model = train(model, train_set, source_val, train_settings, on_epoch=on_epoch, progress=progress,
                      desc=f"retrain round {round_index + 1}").model
    return model, rankings
