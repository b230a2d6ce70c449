"""How well does a ground-truth-free confidence score pick good pseudo-labels? (``domgen confidence``)

From a leave-one-out fold model and an unseen target with ground truth: score every slice with every registered
confidence score (no retraining), and report per score the Spearman correlation with the true slice DSC (with a
slice-bootstrap 95 % interval) and the mean true DSC of the top-K slices it would select, beside all ranked
slices and the best possible K. MLflow experiment ``domgen-confidence``, one run per (model, target, settings).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from domgen.config import config_hash
from domgen.errors import DomgenError
from domgen.evaluation.statistics import spearman_interval
from domgen.families.leave_one_out import _pseudolabel_round
from domgen.methods.confidence import CONFIDENCE_SCORES, ScoreContext, get_score
from domgen.methods.pseudolabel import ci_ranking
from domgen.tracking import mlflow_store as store
from domgen.training.trainer import predict_model_size, to_original_size

FAMILY = "confidence"
EXPERIMENT = "domgen-confidence"


def score_table(ranking: pd.DataFrame, scores: dict[str, np.ndarray | None], top_k: int, seed: int = 0) -> pd.DataFrame:
    """Per score: Spearman with the true slice DSC [95 % CI] over the slices passing the N filter, and the mean true
    DSC of the top-K slices by that score. ``None`` marks a score the model cannot give (e.g. no dropout)."""
    ok = ranking[ranking.eligible & ranking.dice.notna()]
    k = min(top_k, len(ok))
    rows = []
    for name, values in scores.items():
        if values is None:
            rows.append({"score": name, "slices": 0, "Spearman": "n/a (not available for this model)", "top-K DSC": "-"})
            continue
        v = ok[name].to_numpy(dtype=float)
        corr = spearman_interval(v, ok.dice.to_numpy(dtype=float), seed=seed)
        order = np.argsort(-np.nan_to_num(v, nan=-np.inf), kind="stable")[:k]
        rows.append({"score": name, "slices": int(np.isfinite(v).sum()),
                     "Spearman": "-" if not np.isfinite(corr.rho) else f"{corr.rho:.3f} [{corr.low:.3f}, {corr.high:.3f}]",
                     "top-K DSC": f"{ok.dice.to_numpy()[order].mean():.3f}" if k else "-",
                     "rho": corr.rho, "rho_low": corr.low, "rho_high": corr.high})
    dice = np.sort(ok.dice.to_numpy())[::-1]
    rows.append({"score": "(all ranked slices)", "slices": len(ok), "Spearman": "-", "top-K DSC": f"{dice.mean():.3f}" if len(dice) else "-"})
    rows.append({"score": "(best possible K)", "slices": len(ok), "Spearman": "-", "top-K DSC": f"{dice[:k].mean():.3f}" if k else "-"})
    return pd.DataFrame(rows)


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
    """Score ``target``'s slices with every registered score; returns (MLflow run id, table)."""
    if top_k < 1:
        raise DomgenError(f"--top-k must be at least 1, not {top_k}")
    r, fold, model, cutoff, _, start, _ = _pseudolabel_round(checkpoint, target, {}, suite, device, progress)
    slices = r.targets[target]
    if all(t is None or not np.asarray(t).any() for t in slices.truths):
        raise DomgenError(f"target {target} has no lesion in its ground truth, so no score can be compared with the true DSC; "
                          "pick a target with lesion masks")
    exp_id = store.experiment_id(EXPERIMENT)
    h = config_hash({"config": r.cfg, "start": start, "target": target, "top_k": top_k, "scores": sorted(CONFIDENCE_SCORES)})
    done = store.find_run(exp_id, h)
    if done is not None:
        with store.artifact_dir() as tmp:
            return done.info.run_id, pd.read_csv(store.download_artifact(done.info.run_id, "confidence_scores.csv", tmp))
    small = predict_model_size(model, slices, device=r.cfg["device"], progress=progress, desc=f"predict {target}")
    probs = to_original_size(small, slices)
    ctx = ScoreContext(model, slices, probs, small, cutoff, r.cfg["device"])
    scores: dict[str, np.ndarray | None] = {}
    for name in CONFIDENCE_SCORES:
        try:
            scores[name] = get_score(name)(ctx)
        except DomgenError:
            scores[name] = None  # e.g. mc-dropout on a model without dropout layers: reported as n/a
    ranking = ci_ranking(probs, slices, cutoff, r.pl_settings.selection, {k: v for k, v in scores.items() if v is not None})
    table = score_table(ranking, scores, top_k, seed=r.cfg["seed"])
    tags = store.tags(family=FAMILY, source=r.cfg["source"], target=target, fold=fold["fold"], config_hash=h, role="analysis")
    with store.tracked_run(exp_id, run_name or f"{r.cfg['source']} fold {fold['fold']} -> {target}", r.cfg, tags) as run, \
            store.artifact_dir() as tmp:
        metrics = {"cutoff": cutoff, "top_k": float(top_k)}
        for _, row in table.iterrows():
            if isinstance(row.get("rho"), float) and np.isfinite(row["rho"]):
                metrics.update({f"{row.score}_dsc_spearman": row.rho, f"{row.score}_dsc_spearman_low": row.rho_low,
                                f"{row.score}_dsc_spearman_high": row.rho_high})
            if row["top-K DSC"] != "-" and not row.score.startswith("("):
                metrics[f"{row.score}_topk_dsc"] = float(row["top-K DSC"])
        store.log_metrics(run.info.run_id, metrics)
        table.to_csv(tmp / "confidence_scores.csv", index=False)
        ranking.to_csv(tmp / "slice_scores.csv", index=False)
        store.log_artifact_file(run.info.run_id, tmp / "confidence_scores.csv")
        store.log_artifact_file(run.info.run_id, tmp / "slice_scores.csv")
        store.log_artifact_file(run.info.run_id, score_plot(tmp / "dsc_vs_score.png", ranking, [n for n, v in scores.items() if v is not None]),
                                "plots")
    return run.info.run_id, table


def confidence_tables(run_id: str) -> dict[str, pd.DataFrame]:
    """The table of a ``domgen confidence`` run, rebuilt from its artifact (for ``domgen report``)."""
    with store.artifact_dir() as tmp:
        table = pd.read_csv(store.download_artifact(run_id, "confidence_scores.csv", tmp))
    return {"confidence": table[[c for c in ("score", "slices", "Spearman", "top-K DSC") if c in table.columns]]}
