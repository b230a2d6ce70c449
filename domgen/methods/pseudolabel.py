"""Certainty-Index pseudo-labels (Enshaei et al.): rank unseen slices, retrain on the most certain.

The selected slices take their predicted masks (probability > cut-off) as labels and are mixed with the
source training slices (``mix = "source+pseudo"``) or used alone (``"pseudo-only"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from domgen.evaluation.metrics import confusion, overlap_metrics
from domgen.methods.certainty import Selection, certainty_index, rank_and_select
from domgen.preprocessing.slices import SliceSet
from domgen.training.trainer import TrainSettings, predict_model_size, to_original_size, train

MIXES = ("source+pseudo", "pseudo-only")


@dataclass(frozen=True)
class PseudoLabelSettings:
    ci_min: float = 0.8
    min_pixels: int = 50
    top_k: int | None = None
    top_fraction: float | None = None
    mix: str = "source+pseudo"
    rounds: int = 1

    @classmethod
    def from_config(cls, cfg: dict) -> "PseudoLabelSettings":
        return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})

    @property
    def selection(self) -> Selection:
        return Selection(self.min_pixels, self.ci_min, self.top_k, self.top_fraction)


def ci_ranking(probabilities: list[np.ndarray], slices: SliceSet, cutoff: float, selection: Selection) -> pd.DataFrame:
    """``ci_ranking.csv``: slice_id, patient_id, ci, n_pixels, selected, dice (empty without ground truth),
    sorted from most to least certain (slices dropped by the N filter last)."""
    ci, n = zip(*(certainty_index(p, cutoff) for p in probabilities)) if probabilities else ((), ())
    ci, n = np.asarray(ci, dtype=float), np.asarray(n, dtype=int)
    order, selected = rank_and_select(ci, n, selection)
    dice = [overlap_metrics(confusion(p > cutoff, t))["dsc"] if t is not None else np.nan
            for p, t in zip(probabilities, slices.truths)]
    table = pd.DataFrame({"slice_id": slices.slice_ids, "patient_id": slices.patient_ids, "ci": ci,
                          "n_pixels": n, "selected": selected, "dice": dice})
    ranked = set(order.tolist())
    rest = [i for i in range(len(table)) if i not in ranked]
    return table.iloc[list(order) + rest].reset_index(drop=True)


def ci_dice_spearman(ranking: pd.DataFrame, min_pixels: int) -> float:
    """Spearman correlation between CI and true slice DSC over the slices that pass the N filter."""
    ok = ranking[(ranking.n_pixels >= min_pixels) & ranking.ci.notna() & ranking.dice.notna()]
    if len(ok) < 3 or ok.ci.nunique() < 2 or ok.dice.nunique() < 2:
        return float("nan")
    return float(spearmanr(ok.ci, ok.dice).statistic)


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
