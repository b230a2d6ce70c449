"""Certainty-Index pseudo-labels (Enshaei et al.): rank unseen slices, retrain on the most confident.

The selected slices take their predicted masks (probability > cut-off) as labels, or a radiologist's
corrections of them (``reviewed``), and are mixed with the source training slices (``mix = "source+pseudo"``)
or used alone (``"pseudo-only"``). The ranking score is the CI by default or any score of
``domgen.methods.confidence``; limits on several scores can be combined (``filters``), and constraints spread
the selection over patients and lesion sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from domgen.errors import DomgenError
from domgen.evaluation.metrics import confusion, overlap_metrics
from domgen.evaluation.statistics import spearman_interval
from domgen.methods.certainty import Selection, certainty_index, rank_and_select
from domgen.methods.confidence import CONFIDENCE_SCORES, NEEDS_TEMPERATURE, ScoreContext, fit_fold_temperature, score_slices
from domgen.preprocessing.slices import SliceSet
from domgen.settings import LOO, default
from domgen.training.trainer import TrainSettings, predict_model_size, to_original_size, train

MIXES = ("source+pseudo", "pseudo-only")
# how the CI limit is chosen without target labels: the fixed ci_min, or a quantile of the CI of the
# in-domain test slices (labelled source data the model did not train on)
CI_RULES = ("fixed", "indomain-quantile")
# how the retrained weights are chosen: the last epoch's, the best on the source's validation slices
# (Enshaei et al.), or the best on held-out pseudo-labelled target slices (no target ground truth needed)
SELECT_BY = ("last", "source-val", "pseudo-val")


@dataclass(frozen=True)
class PseudoLabelSettings:
    """The pseudolabel section; every default is its leave-one-out row of domgen/settings.py (track_target_slices, which
    chooses nothing, is read by the family)."""

    ci_min: float = default(LOO, "pseudolabel.ci_min")
    min_pixels: int = default(LOO, "pseudolabel.min_pixels")
    # min_pixels is defined for a min_pixels_at^2 slice and scaled by area
    min_pixels_at: int | None = default(LOO, "pseudolabel.min_pixels_at")
    top_k: int | None = default(LOO, "pseudolabel.top_k")
    top_fraction: float | None = default(LOO, "pseudolabel.top_fraction")
    mix: str = default(LOO, "pseudolabel.mix")
    rounds: int = default(LOO, "pseudolabel.rounds")
    ci_rule: str = default(LOO, "pseudolabel.ci_rule")
    ci_quantile: float = default(LOO, "pseudolabel.ci_quantile")
    confidence: str = default(LOO, "pseudolabel.confidence")  # the score that ranks (a CONFIDENCE_SCORES name)
    # {score name: minimum} beside CI >= ci_min
    filters: dict = field(default_factory=lambda: default(LOO, "pseudolabel.filters"))
    per_patient_max: int | None = default(LOO, "pseudolabel.per_patient_max")
    min_patients: int | None = default(LOO, "pseudolabel.min_patients")
    size_strata: int | None = default(LOO, "pseudolabel.size_strata")
    select_by: str = default(LOO, "pseudolabel.select_by")
    # with select_by pseudo-val: the share of pseudo-labelled patients held out
    pseudo_val_fraction: float = default(LOO, "pseudolabel.pseudo_val_fraction")
    seeds: int = default(LOO, "pseudolabel.seeds")  # retraining repeats with seeds seed + fold + 1000 * s
    # epochs of each retraining (None: train.epochs); it starts from the fold model
    retrain_epochs: int | None = default(LOO, "pseudolabel.retrain_epochs")

    @classmethod
    def from_config(cls, cfg: dict) -> "PseudoLabelSettings":
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        if "filters" in known:
            known["filters"] = dict(known["filters"] or {})
        return cls(**known)

    @property
    def selection(self) -> Selection:
        return Selection(self.min_pixels, self.ci_min, self.top_k, self.top_fraction, self.min_pixels_at,
                         self.per_patient_max, self.min_patients, self.size_strata)

    @property
    def score_names(self) -> list[str]:
        """The scores selection needs: the ranking score and every filtered one (the CI is always computed)."""
        return list(dict.fromkeys([self.confidence, *self.filters]))

    def with_ci_limit(self, limit: float | None) -> "PseudoLabelSettings":
        """The settings with the CI limit of the ``ci_rule`` in force (``limit`` from the in-domain test set)."""
        if self.ci_rule == "fixed" or limit is None or not np.isfinite(limit):
            return self
        return replace(self, ci_min=float(limit))


def indomain_ci_limit(ranking: pd.DataFrame, quantile: float) -> float:
    """The ``quantile`` of the Certainty Index over the in-domain test slices that pass the N filter."""
    ok = ranking[ranking.eligible & ranking.ci.notna()]
    return float(np.quantile(ok.ci, quantile)) if len(ok) else float("nan")


def ci_ranking(probabilities: list[np.ndarray], slices: SliceSet, cutoff: float, selection: Selection,
               scores: dict[str, np.ndarray] | None = None, confidence: str = "ci", filters: dict | None = None) -> pd.DataFrame:
    """``ci_ranking.csv``: slice_id, patient_id, ci, the other scores computed, n_pixels, min_pixels (the slice's N
    limit at its own size), eligible (passes the N filter), selected, dice (empty without ground truth), sorted
    from most to least confident by ``confidence`` (slices dropped by the N filter last). Candidates need
    CI >= ci_min and every ``filters`` score >= its minimum."""
    ci, n = zip(*(certainty_index(p, cutoff) for p in probabilities)) if probabilities else ((), ())
    ci, n = np.asarray(ci, dtype=float), np.asarray(n, dtype=int)
    scores = {k: np.asarray(v, dtype=float) for k, v in (scores or {}).items() if k != "ci"}
    limit_n = np.asarray([selection.min_pixels_for(p.shape) for p in probabilities], dtype=float)
    passes = ci >= selection.ci_min
    for name, minimum in (filters or {}).items():
        values = ci if name == "ci" else scores[name]
        passes &= np.nan_to_num(values, nan=-np.inf) >= float(minimum)
    rank_by = ci if confidence == "ci" else scores[confidence]
    order, selected = rank_and_select(rank_by, n, selection, limit_n, np.asarray(slices.patient_ids), passes)
    dice = [overlap_metrics(confusion(p > cutoff, t))["dsc"] if t is not None else np.nan
            for p, t in zip(probabilities, slices.truths)]
    eligible = np.zeros(len(ci), dtype=bool)
    eligible[order] = True
    table = pd.DataFrame({"slice_id": slices.slice_ids, "patient_id": slices.patient_ids, "ci": ci, **scores,
                          "n_pixels": n, "min_pixels": limit_n, "eligible": eligible, "selected": selected, "dice": dice})
    ranked = set(order.tolist())
    rest = [i for i in range(len(table)) if i not in ranked]
    return table.iloc[list(order) + rest].reset_index(drop=True)


def rank_target(model, slices: SliceSet, cutoff: float, settings: PseudoLabelSettings, device: str = "cpu",
                small: np.ndarray | None = None, calibration: SliceSet | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(ranking, model-size probabilities) of ``slices`` under the settings' confidence score and limits.

    ``calibration``: labelled source validation slices, on which a score of the temperature-scaled model (``ci-ts``)
    fits the model's temperature; never the target's labels."""
    small = predict_model_size(model, slices, device=device) if small is None else small
    probabilities = to_original_size(small, slices)
    names = settings.score_names
    temperature = None
    if set(names) & set(NEEDS_TEMPERATURE):
        if calibration is None:
            raise DomgenError(f"--confidence/--filter {', '.join(set(names) & set(NEEDS_TEMPERATURE))} needs the source "
                              "validation slices to fit a temperature on; none were given")
        temperature = fit_fold_temperature(model, calibration, device)
    scores = score_slices(ScoreContext(model, slices, probabilities, small, cutoff, device, temperature), names) if names != ["ci"] else None
    return ci_ranking(probabilities, slices, cutoff, settings.selection, scores, settings.confidence, settings.filters), small


def ci_dice_spearman(ranking: pd.DataFrame, score: str = "ci") -> float:
    """Spearman correlation between a score (the CI) and true slice DSC over the slices that pass the N filter."""
    ok = ranking[ranking.eligible & ranking[score].notna() & ranking.dice.notna()]
    if len(ok) < 3 or ok[score].nunique() < 2 or ok.dice.nunique() < 2:
        return float("nan")
    return float(spearmanr(ok[score], ok.dice).statistic)


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


def hold_out_patients(pseudo: SliceSet, fraction: float, seed: int) -> tuple[SliceSet, SliceSet]:
    """(train, validation) of the pseudo-labelled slices, split by patient (by slice when only one patient)."""
    rng = np.random.default_rng(seed)
    patients = pseudo.patients()
    if len(patients) >= 2:
        n_val = min(len(patients) - 1, max(1, int(round(fraction * len(patients)))))
        val = set(rng.choice(patients, n_val, replace=False).tolist())
        index = np.asarray([p in val for p in pseudo.patient_ids])
    else:
        index = np.zeros(len(pseudo), dtype=bool)
        index[rng.choice(len(pseudo), max(1, int(round(fraction * len(pseudo)))), replace=False)] = True
    return pseudo.subset(np.flatnonzero(~index)), pseudo.subset(np.flatnonzero(index))


def enhance(model, source_train: SliceSet, source_val: SliceSet, target: SliceSet, cutoff: float,
            settings: PseudoLabelSettings, train_settings: TrainSettings, progress: bool = True,
            on_epoch=None, monitor=None, reviewed: SliceSet | None = None,
            small: np.ndarray | None = None, record: dict | None = None) -> tuple[object, list[pd.DataFrame]]:
    """Select-and-retrain ``settings.rounds`` times; returns the retrained model and each round's ranking.

    ``reviewed``: the first round trains on these slices (a radiologist's corrected masks) instead of the
    raw predictions. ``monitor(model)`` adds per-epoch metrics (target DSC for plots), never used to choose.
    ``small``: the starting model's model-size probabilities of ``target``, when already predicted.
    ``record`` (a dict, filled in): ``trained`` (ids of the target slices retrained on), ``held_out`` (pseudo-labelled
    slices held out by select_by pseudo-val, not trained on) and ``select_by_used`` (per round; pseudo-val with fewer
    than 2 pseudo-labels cannot hold one out and chooses on the source's validation slices instead)."""
    if settings.mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}")
    if settings.ci_rule not in CI_RULES:
        raise ValueError(f"ci_rule must be one of {CI_RULES}")
    if settings.select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {SELECT_BY}")
    if settings.confidence not in CONFIDENCE_SCORES:
        raise ValueError(f"confidence must be one of {tuple(CONFIDENCE_SCORES)}")
    record = {} if record is None else record
    record.update(trained=set(), held_out=set(), select_by_used=[])
    rankings = []
    for round_index in range(settings.rounds):
        ranking, small = rank_target(model, target, cutoff, settings, train_settings.device, small=small if round_index == 0 else None,
                                     calibration=source_val)
        rankings.append(ranking.assign(round=round_index))
        if reviewed is not None and round_index == 0:
            pseudo = reviewed
        else:
            selected = np.zeros(len(target), dtype=bool)
            position = {sid: i for i, sid in enumerate(target.slice_ids)}
            selected[[position[s] for s in ranking.slice_id[ranking.selected]]] = True
            pseudo = pseudo_labelled(target, small, selected, cutoff) if selected.any() else None
        if pseudo is None or not len(pseudo):
            break  # nothing confident enough: the model stays as it is
        val_set, ts, used = source_val, train_settings, settings.select_by
        if settings.select_by == "pseudo-val" and len(pseudo) >= 2:
            pseudo, val_set = hold_out_patients(pseudo, settings.pseudo_val_fraction, train_settings.seed)
            record["held_out"] |= set(val_set.slice_ids)
        elif settings.select_by == "pseudo-val":
            used = "source-val"  # one pseudo-label cannot be split into train and held-out: the caller says so
        elif settings.select_by == "last":
            ts = replace(train_settings, select_by="last")
        record["select_by_used"].append(used)
        record["trained"] |= set(pseudo.slice_ids)
        train_set = pseudo if settings.mix == "pseudo-only" else SliceSet.concat([source_train, pseudo])
        model = train(model, train_set, val_set, ts, on_epoch=on_epoch, progress=progress,
                      desc=f"retrain round {round_index + 1}", monitor=monitor).model
    return model, rankings
