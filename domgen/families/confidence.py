"""How well does a ground-truth-free confidence score pick good pseudo-labels, and are the probabilities it is built on
calibrated? (``domgen confidence``)

From a leave-one-out fold model and an unseen target with ground truth: score every slice with every registered
confidence score (no retraining), and report per score

- the Spearman correlation with the true slice DSC (slice-bootstrap 95 % interval) and the mean true DSC of the
  top-K slices it would select, beside all ranked slices and the best possible K;
- selective risk (risk = 1 - slice DSC): AURC and E-AURC (Geifman et al. 2019) with slice-bootstrap intervals, and
  the risk-coverage curves beside the oracle and random ones, marked at the coverage the profile's rule selects;

and per domain (the fold's in-domain test set and the target) the pixel calibration of the lesion probabilities
(ECE/ACE/MCE over whole slices and over the lesion region), before and after temperature scaling fitted on the fold's
source validation slices, with reliability diagrams; and what the scaled Certainty Index (``ci-ts``) changes in the
profile's selection. MLflow experiment ``domgen-confidence``, one run per (model, target, settings).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from domgen.tracking.identity import config_hash
from domgen.errors import DomgenError
from domgen.evaluation.calibration import (calibration_errors, reliability_bins, reliability_plot, scale_probabilities,
                                           scaled_cutoff)
from domgen.evaluation.selective_risk import optimal_aurc, risk_coverage_plot, selective_risk
from domgen.evaluation.statistics import spearman_interval
from domgen.families.leave_one_out import round_from_checkpoint
from domgen.methods.certainty import certainty_index, rank_and_select
from domgen.methods.confidence import CONFIDENCE_SCORES, NEEDS_TEMPERATURE, ScoreContext, fit_fold_temperature, get_score
from domgen.methods.pseudolabel import ci_ranking
from domgen.tracking import mlflow_store as store
from domgen.training.trainer import predict_model_size, to_original_size

# Bumped when the table gains measures, so an older run of the same model and settings is not found again.
MEASURES_VERSION = 2

FAMILY = "confidence"
EXPERIMENT = "domgen-confidence"


def score_table(ranking: pd.DataFrame, scores: dict[str, np.ndarray | None], top_k: int, seed: int = 0) -> pd.DataFrame:
    """Per score: Spearman with the true slice DSC [95 % CI], AURC and E-AURC [95 % CI] (risk 1 - DSC) over the slices
    passing the N filter, and the mean true DSC of the top-K slices by that score. ``None`` marks a score the model
    cannot give (e.g. no dropout)."""
    ok = ranking[ranking.eligible & ranking.dice.notna()]
    k = min(top_k, len(ok))
    rows = []
    for name, values in scores.items():
        if values is None:
            rows.append({"score": name, "slices": 0, "Spearman": "n/a (not available for this model)", "AURC": "-", "E-AURC": "-",
                         "top-K DSC": "-"})
            continue
        v = ok[name].to_numpy(dtype=float)
        corr = spearman_interval(v, ok.dice.to_numpy(dtype=float), seed=seed)
        risk = selective_risk(v, 1.0 - ok.dice.to_numpy(dtype=float), seed=seed)
        order = np.argsort(-np.nan_to_num(v, nan=-np.inf), kind="stable")[:k]
        rows.append({"score": name, "slices": int(np.isfinite(v).sum()),
                     "Spearman": "-" if not np.isfinite(corr.rho) else f"{corr.rho:.3f} [{corr.low:.3f}, {corr.high:.3f}]",
                     "AURC": _interval(risk.aurc, risk.aurc_low, risk.aurc_high),
                     "E-AURC": _interval(risk.e_aurc, risk.e_aurc_low, risk.e_aurc_high),
                     "top-K DSC": f"{ok.dice.to_numpy()[order].mean():.3f}" if k and np.isfinite(v).any() else "-",
                     "rho": corr.rho, "rho_low": corr.low, "rho_high": corr.high, **risk.metrics("m")})
    dice = np.sort(ok.dice.to_numpy())[::-1]
    best = optimal_aurc(1.0 - ok.dice.to_numpy(dtype=float))
    rows.append({"score": "(all ranked slices)", "slices": len(ok), "Spearman": "-", "AURC": f"{1 - dice.mean():.3f} (random)" if len(dice) else "-",
                 "E-AURC": "-", "top-K DSC": f"{dice.mean():.3f}" if len(dice) else "-"})
    rows.append({"score": "(best possible K)", "slices": len(ok), "Spearman": "-", "AURC": f"{best:.3f} (oracle)" if len(dice) else "-",
                 "E-AURC": "0", "top-K DSC": f"{dice[:k].mean():.3f}" if k else "-"})
    return pd.DataFrame(rows)


def _interval(value: float, low: float, high: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _limit(rule: str, ci_min: float, quantile: float, indomain: np.ndarray) -> float:
    """The CI limit of the profile's rule on a score's own scale: ``fixed`` keeps ci_min; ``indomain-quantile`` takes
    the quantile of the same score over the in-domain test slices (as domgen does for the CI)."""
    if rule == "fixed":
        return ci_min
    finite = indomain[np.isfinite(indomain)]
    return float(np.quantile(finite, quantile)) if finite.size else ci_min


def selection_table(ranking: pd.DataFrame, scored: dict[str, np.ndarray], indomain: dict[str, np.ndarray], settings) -> pd.DataFrame:
    """What the profile's selection rule keeps when it ranks and limits by the CI and by the scaled CI (ci-ts): the
    limit on that score's scale, slices selected, coverage of the ranked slices and their mean true DSC."""
    selection = settings.selection
    ranked = ranking.eligible.to_numpy()
    rows = []
    for name, values in scored.items():
        limit = _limit(settings.ci_rule, settings.ci_min, settings.ci_quantile, indomain[name])
        _, chosen = rank_and_select(values, ranking.n_pixels.to_numpy(), replace(selection, ci_min=float(limit)),
                                    ranking.min_pixels.to_numpy(), ranking.patient_id.to_numpy())
        dice = ranking.dice.to_numpy(dtype=float)[chosen]
        rows.append({"score": name, "rule": settings.ci_rule, "limit": round(limit, 4), "selected": int(chosen.sum()),
                     "coverage": round(chosen.sum() / max(ranked.sum(), 1), 4),
                     "selected DSC": round(float(np.nanmean(dice)), 4) if chosen.any() else float("nan")})
    return pd.DataFrame(rows)


def calibration_rows(domain: str, probabilities: list[np.ndarray], truths: list[np.ndarray], cutoff: float,
                     temperature: float | None) -> list[dict]:
    """ECE/ACE/MCE of one domain over whole slices and over the lesion region (predicted or true lesion), before and
    after temperature scaling (the region is the unscaled prediction's: scaling with the cut-off moved changes none)."""
    regions = [(p > cutoff) | (t > 0) for p, t in zip(probabilities, truths)]
    rows = []
    for model, maps in (("as trained", probabilities),
                        *((("temperature-scaled", [scale_probabilities(p, temperature) for p in probabilities]),) if temperature else ())):
        for where, reg in (("whole slice", None), ("lesion region", regions)):
            errors = calibration_errors(maps, truths, reg)
            rows.append({"domain": domain, "model": model, "pixels": where, **{k: round(v, 4) for k, v in errors.items()}})
    return rows


def score_plot(path: Path, ranking: pd.DataFrame, names: list[str]) -> Path:
    """True slice DSC against each score, one panel per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = ranking[ranking.eligible & ranking.dice.notna()]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.scatter(ok[name], ok.dice, s=8, alpha=0.6)
        ax.set_xlabel(name)
        ax.set_ylabel("true slice DSC")
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_confidence(checkpoint: Path, target: str, top_k: int = 50, suite: str | None = None, device: str | None = None,
                   progress: bool = True, run_name: str | None = None) -> tuple[str, pd.DataFrame]:
    """Score ``target``'s slices with every registered score, measure calibration; returns (MLflow run id, table)."""
    if top_k < 1:
        raise DomgenError(f"--top-k must be at least 1, not {top_k}")
    r, fold, model, cutoff, limit, start, _ = round_from_checkpoint(checkpoint, target, {}, suite, device, progress)
    slices = r.targets[target]
    if all(t is None or not np.asarray(t).any() for t in slices.truths):
        raise DomgenError(f"target {target} has no lesion in its ground truth, so no score can be compared with the true DSC; "
                          "pick a target with lesion masks")
    exp_id = store.experiment_id(EXPERIMENT)
    h = config_hash({"config": r.cfg.as_dict(), "start": start, "target": target, "top_k": top_k, "scores": sorted(CONFIDENCE_SCORES),
                     "measures": MEASURES_VERSION})
    done = store.find_run(exp_id, h)
    if done is not None:
        with store.artifact_dir() as tmp:
            return done.info.run_id, pd.read_csv(store.download_artifact(done.info.run_id, "confidence_scores.csv", tmp))
    device = r.cfg.device
    val = r.source.of_patients(fold["val"])
    try:  # temperature scaling is fitted on the source validation slices: never on the target's labels
        temperature = fit_fold_temperature(model, val, device)
    except DomgenError as exc:
        temperature, why = None, str(exc)
        print(f"note: no temperature scaling ({why}); ci-ts is reported as n/a")
    small = predict_model_size(model, slices, device=device, progress=progress, desc=f"predict {target}")
    probs = to_original_size(small, slices)
    ctx = ScoreContext(model, slices, probs, small, cutoff, device, temperature)
    scores: dict[str, np.ndarray | None] = {}
    for name in CONFIDENCE_SCORES:
        try:
            scores[name] = get_score(name)(ctx)
        except DomgenError:
            scores[name] = None  # mc-dropout without dropout layers, ci-ts without validation slices: reported as n/a
    ranking = ci_ranking(probs, slices, cutoff, r.pl_settings.with_ci_limit(limit).selection,
                         {k: v for k, v in scores.items() if v is not None})
    table = score_table(ranking, scores, top_k, seed=r.cfg.seed)

    # the fold's in-domain test set: calibration, and the in-domain limits of the selection rule on each CI's scale
    test = r.source.of_patients(fold["test"])
    test_probs = to_original_size(predict_model_size(model, test, device=device, progress=progress, desc="predict in-domain"), test)
    scaled = {"ci": None, **({"ci-ts": temperature} if temperature else {})}
    indomain = {}
    for name, t in scaled.items():
        values = np.asarray([certainty_index(p if t is None else scale_probabilities(p, t), cutoff if t is None else scaled_cutoff(cutoff, t))
                             for p in test_probs], dtype=float)
        eligible = values[:, 1] >= np.asarray([r.pl_settings.selection.min_pixels_for(p.shape) for p in test_probs])
        indomain[name] = np.where(eligible, values[:, 0], np.nan)
    selection = selection_table(ranking, {name: ranking[name].to_numpy(dtype=float) for name in scaled}, indomain, r.pl_settings)
    calibration = pd.DataFrame(calibration_rows(f"{r.cfg.source} (in-domain test)", test_probs, test.truths, cutoff, temperature)
                               + calibration_rows(f"{target} (unseen)", probs, slices.truths, cutoff, temperature))

    tags = store.tags(family=FAMILY, source=r.cfg.source, target=target, fold=fold["fold"], config_hash=h, role="analysis")
    with store.tracked_run(exp_id, run_name or f"{r.cfg.source} fold {fold['fold']} -> {target}", r.cfg.as_dict(), tags) as run, \
            store.artifact_dir() as tmp:
        metrics = {"cutoff": cutoff, "top_k": float(top_k), **({"temperature": temperature} if temperature else {})}
        for _, row in table.iterrows():
            if isinstance(row.get("rho"), float) and np.isfinite(row["rho"]):
                metrics.update({f"{row.score}_dsc_spearman": row.rho, f"{row.score}_dsc_spearman_low": row.rho_low,
                                f"{row.score}_dsc_spearman_high": row.rho_high})
                metrics.update({f"{row.score}{key[1:]}": row[key] for key in row.index if key.startswith("m_") and np.isfinite(row[key])})
            if row["top-K DSC"] != "-" and not row.score.startswith("("):
                metrics[f"{row.score}_topk_dsc"] = float(row["top-K DSC"])
        for _, row in selection.iterrows():
            metrics.update({f"{row.score}_rule_selected": row.selected, f"{row.score}_rule_coverage": row.coverage,
                            **({f"{row.score}_rule_selected_dsc": row["selected DSC"]} if np.isfinite(row["selected DSC"]) else {})})
        for _, row in calibration.iterrows():
            key = ("indomain" if "in-domain" in row.domain else "target") + ("_ts" if row.model != "as trained" else "") \
                + ("_lesion" if row.pixels == "lesion region" else "")
            metrics.update({f"{name}_{key}": row[name] for name in ("ece", "ace", "mce") if np.isfinite(row[name])})
        store.log_metrics(run.info.run_id, metrics)
        table.to_csv(tmp / "confidence_scores.csv", index=False)
        ranking.to_csv(tmp / "slice_scores.csv", index=False)
        selection.to_csv(tmp / "selection.csv", index=False)
        calibration.to_csv(tmp / "calibration.csv", index=False)
        for name in ("confidence_scores.csv", "slice_scores.csv", "selection.csv", "calibration.csv"):
            store.log_artifact_file(run.info.run_id, tmp / name)
        available = [n for n, v in scores.items() if v is not None]
        ok = ranking[ranking.eligible & ranking.dice.notna()]
        risk = 1.0 - ok.dice.to_numpy(dtype=float)
        marks = {f"rule ({row.score})": row.coverage for _, row in selection.iterrows() if row.selected}
        plots = [score_plot(tmp / "dsc_vs_score.png", ranking, available),
                 risk_coverage_plot(tmp / "risk_coverage.png", {n: (ok[n].to_numpy(dtype=float), risk) for n in available}, risk,
                                    marks, f"{r.cfg.source} fold {fold['fold']} -> {target}: risk = 1 - slice DSC"),
                 reliability_plot(tmp / "reliability.png", _reliability_panels(test_probs, test.truths, probs, slices.truths,
                                                                               r.cfg.source, target, temperature),
                                  f"lesion-pixel calibration (T = {temperature:.3f})" if temperature else "lesion-pixel calibration")]
        for plot in plots:
            store.log_artifact_file(run.info.run_id, plot, "plots")
    return run.info.run_id, table


def _reliability_panels(test_probs, test_truths, probs, truths, source: str, target: str, temperature: float | None) -> dict:
    panels = {f"{source} in-domain": reliability_bins(test_probs, test_truths), f"{target} unseen": reliability_bins(probs, truths)}
    if temperature:
        panels[f"{target} unseen, scaled"] = reliability_bins([scale_probabilities(p, temperature) for p in probs], truths)
    return panels


def confidence_tables(run_id: str) -> dict[str, pd.DataFrame]:
    """The tables of a ``domgen confidence`` run, rebuilt from its artifacts (for ``domgen report``)."""
    out = {}
    logged = store.artifact_names(run_id)
    with store.artifact_dir() as tmp:
        table = pd.read_csv(store.download_artifact(run_id, "confidence_scores.csv", tmp))
        out["confidence"] = table[[c for c in DISPLAY_COLUMNS if c in table.columns]]
        for name in ("selection", "calibration"):  # runs from before MEASURES_VERSION 2 have neither
            if f"{name}.csv" in logged:
                out[name] = pd.read_csv(store.download_artifact(run_id, f"{name}.csv", tmp))
    return out


DISPLAY_COLUMNS = ("score", "slices", "Spearman", "AURC", "E-AURC", "top-K DSC")
