"""The benchmark's report rebuilt from MLflow alone (Bizopoulos et al., Table II and Figures 2-5).

Tables: Table II (architecture x encoder x weights, per experiment Sens/Spec/Dice, parameters, training
seconds per epoch, validation seconds), per-architecture mean/std, the best model per experiment and the
failed configurations with their reasons. Figures: Dice against parameters with a KDE, Dice box plots per
architecture and per weight initialisation, mean train/validation loss curves per architecture, and the
predicted masks of the best and worst encoder. Written to a folder and logged to the sweep's parent run.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from domgen.errors import DomgenError  # noqa: E402
from domgen.tracking import mlflow_store as store  # noqa: E402
from domgen.tracking.report import write_tables  # noqa: E402

EXPERIMENT = "domgen-benchmark"
PAPER_METRICS = (("sens", "Sens"), ("spec", "Spec"), ("dice", "Dice"))
SAMPLES = "predictions/samples.npz"


def sweep_parent(exp_id: str, run_id: str | None = None):
    """The sweep's parent run: ``run_id`` or the newest finished sweep of the experiment (by end time)."""
    if run_id:
        run = store.get_run(run_id, "--run-id")
        if run.info.experiment_id != exp_id or run.data.tags.get("domgen.role") != "sweep":
            raise DomgenError(f"--run-id {run_id} is not a benchmark sweep; pass the sweep id `domgen benchmark` prints")
        return run
    parents = store.runs_of(exp_id, "tags.`domgen.role` = 'sweep'", status="FINISHED")
    if not parents:
        raise DomgenError(f"experiment {EXPERIMENT} has no finished benchmark sweep; run `domgen benchmark` to completion first "
                          "(or pass --run-id of an unfinished one)")
    return max(parents, key=lambda r: r.info.end_time or r.info.start_time or 0)


def benchmark_records(exp_id: str, sweep_hash: str) -> pd.DataFrame:
    """One row per configuration of the sweep (its newest finished run, else its newest attempt)."""
    runs = store.runs_of(exp_id, f"tags.`domgen.sweep_hash` = '{sweep_hash}' and tags.`domgen.role` = 'configuration'", status=None)
    best: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        h = run.data.tags["domgen.config_hash"]
        if h not in best or best[h].info.status != "FINISHED" or run.info.status == "FINISHED":
            best[h] = run
    rows = []
    for run in best.values():
        t = run.data.tags
        rows.append({"experiment": t.get("domgen.experiment"), "arch": t.get("domgen.arch"), "encoder": t.get("domgen.encoder"),
                     "weights": t.get("domgen.weights"), "status": run.info.status, "error": t.get("domgen.error", ""),
                     "run_id": run.info.run_id, **run.data.metrics})
    columns = ["experiment", "arch", "encoder", "weights", "status", "error", "run_id"]
    return pd.DataFrame(rows, columns=columns if not rows else None)


def _cell(value: float, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def table2(rec: pd.DataFrame) -> pd.DataFrame:
    """Table II: one row per architecture x encoder x weights; per experiment Sens/Spec/Dice ("failed" where it failed)."""
    experiments = [e for e in ("lung", "lesion-a", "lesion-b") if e in set(rec.experiment)]
    rows = []
    for (arch, encoder, weights), group in rec.groupby(["arch", "encoder", "weights"], sort=True):
        ok = group[group.status == "FINISHED"]
        row = {"architecture": arch, "encoder": encoder, "weights": weights,
               "params (M)": _cell(ok.params_m.mean(), 2) if "params_m" in ok and len(ok) else "-",
               "train s/epoch": _cell(ok.train_seconds_per_epoch.mean(), 2) if "train_seconds_per_epoch" in ok and len(ok) else "-",
               "val s": _cell(ok.val_seconds_per_epoch.mean(), 2) if "val_seconds_per_epoch" in ok and len(ok) else "-"}
        for experiment in experiments:
            run = group[group.experiment == experiment]
            for key, label in PAPER_METRICS:
                if run.empty:
                    row[f"{experiment} {label}"] = "-"
                elif run.status.iloc[0] != "FINISHED":
                    row[f"{experiment} {label}"] = "failed"
                else:
                    row[f"{experiment} {label}"] = _cell(run[key].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def per_architecture(rec: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over encoders (and weights) of each architecture, per experiment."""
    ok = rec[rec.status == "FINISHED"]
    rows = []
    for (experiment, arch), group in ok.groupby(["experiment", "arch"], sort=True):
        row = {"experiment": experiment, "architecture": arch, "models": len(group)}
        for key, label in PAPER_METRICS + (("params_m", "params (M)"), ("train_seconds_per_epoch", "train s/epoch")):
            values = group[key].astype(float)
            row[label] = f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def best_models(rec: pd.DataFrame) -> pd.DataFrame:
    """The configuration with the highest test Dice in each experiment."""
    ok = rec[rec.status == "FINISHED"]
    rows = []
    for experiment, group in ok.groupby("experiment", sort=True):
        top = group.loc[group.dice.astype(float).idxmax()]
        rows.append({"experiment": experiment, "architecture": top.arch, "encoder": top.encoder, "weights": top.weights,
                     **{label: _cell(top[key]) for key, label in PAPER_METRICS},
                     "Dice without the empty rule": _cell(top["dice_pooled"]) if "dice_pooled" in top else "-",
                     "params (M)": _cell(top.params_m, 2), "run": top.run_id})
    return pd.DataFrame(rows)


def failures(rec: pd.DataFrame) -> pd.DataFrame:
    bad = rec[rec.status != "FINISHED"]
    return bad[["experiment", "arch", "encoder", "weights", "status", "error"]].reset_index(drop=True)


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".part.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _panels(frame: pd.DataFrame, width: float, height: float, xlabel: str = "", ylabel: str = "test Dice"):
    """A figure with one titled, labelled panel per experiment: (fig, [(axis, that experiment's rows)])."""
    experiments = sorted(frame.experiment.unique())
    fig, axes = plt.subplots(1, max(len(experiments), 1), figsize=(width * max(len(experiments), 1), height), squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        ax.set(title=experiment, xlabel=xlabel, ylabel=ylabel)
    return fig, [(ax, frame[frame.experiment == e]) for ax, e in zip(axes[0], experiments)]


def figure_dice_vs_parameters(ok: pd.DataFrame, path: Path) -> Path:
    """Dice against parameters (M), per experiment, with a Gaussian KDE of the models' density (Fig. 3 of the paper)."""
    fig, panels = _panels(ok, 4.2, 3.6, "parameters (M)")
    for ax, part in panels:
        x, y = part.params_m.to_numpy(float), part.dice.to_numpy(float)
        if len(part) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            try:
                kde = gaussian_kde(np.vstack([x, y]))
                gx, gy = np.meshgrid(np.linspace(x.min(), x.max(), 80), np.linspace(y.min(), y.max(), 80))
                ax.contourf(gx, gy, kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape), levels=8, cmap="Blues", alpha=0.6)
            except np.linalg.LinAlgError:  # collinear points: no 2D density
                pass
        for arch, marker in zip(sorted(part.arch.unique()), "osD^v<>"):
            sel = part[part.arch == arch]
            ax.scatter(sel.params_m, sel.dice, s=18, marker=marker, label=arch, edgecolor="k", linewidth=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def figure_box(ok: pd.DataFrame, by: str, path: Path) -> Path:
    """Box plots of test Dice grouped by ``by`` (arch or weights), one panel per experiment."""
    fig, panels = _panels(ok, 4.0, 3.4)
    for ax, part in panels:
        groups = sorted(part[by].unique())
        ax.boxplot([part[part[by] == g].dice.to_numpy(float) for g in groups], tick_labels=groups)
    return _save(fig, path)


def loss_curves(ok: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch train/validation loss of every finished configuration (MLflow metric histories)."""
    rows = []
    for run in ok.itertuples():
        for key in ("train_loss", "val_loss"):
            for m in store.metric_history(run.run_id, key):
                rows.append({"experiment": run.experiment, "arch": run.arch, "run_id": run.run_id, "metric": key,
                             "epoch": m.step, "value": m.value})
    return pd.DataFrame(rows, columns=["experiment", "arch", "run_id", "metric", "epoch", "value"])


def figure_loss_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Mean train (solid) and validation (dashed) loss per architecture over its encoders, per experiment."""
    fig, panels = _panels(curves, 4.2, 3.4, "epoch", "soft Dice loss")
    for ax, part in panels:
        for i, arch in enumerate(sorted(part.arch.unique())):
            mean = part[part.arch == arch].groupby(["metric", "epoch"]).value.mean()
            for metric, style in (("train_loss", "-"), ("val_loss", "--")):
                if metric in mean.index.get_level_values(0):
                    ax.plot(mean[metric].index, mean[metric].values, style, color=f"C{i}", label=f"{arch} {metric.split('_')[0]}")
        ax.legend(fontsize=6)
    return _save(fig, path)


def figure_masks(ok: pd.DataFrame, path: Path, tmp: Path) -> Path:
    """Per experiment, the sample test slices with the truth and the predictions of the best and worst encoder (by Dice)."""
    panels = []
    for experiment, group in sorted(ok.groupby("experiment")):
        ranked = group.sort_values("dice", ascending=False)
        for label, row in (("best", ranked.iloc[0]), ("worst", ranked.iloc[-1])):
            sample = np.load(store.download_artifact(row.run_id, SAMPLES, tmp / row.run_id))
            panels.append((f"{experiment} {label}: {row.arch}/{row.encoder}/{row.weights} (Dice {row.dice:.3f})", sample))
    n_cols = max((len(s["image"]) for _, s in panels), default=1)
    fig, axes = plt.subplots(len(panels), n_cols, figsize=(2.1 * n_cols, 2.3 * len(panels)), squeeze=False)
    for (title, sample), row_axes in zip(panels, axes):
        for j, ax in enumerate(row_axes):
            ax.axis("off")
            if j >= len(sample["image"]):
                continue
            ax.imshow(sample["image"][j].astype(np.float32), cmap="gray")
            if sample["truth"][j].any():
                ax.contour(sample["truth"][j], levels=[0.5], colors="lime", linewidths=0.8)
            if sample["prediction"][j].any():
                ax.contour(sample["prediction"][j], levels=[0.5], colors="red", linewidths=0.8)
        row_axes[0].set_title(title, fontsize=7, loc="left")
    fig.suptitle("green: ground truth, red: prediction", fontsize=8)
    return _save(fig, path)


def build_benchmark_report(out: Path, run_id: str | None = None, log: bool = True) -> dict:
    """Tables and figures of one sweep (its parent ``run_id``, default the newest) from MLflow alone.

    Every finished configuration sharing the sweep's settings counts, including those finished by an
    earlier, partial sweep. Returns ``{"folder", "parent_id", "tables", "figures"}``.
    """
    exp = store.get_experiment(EXPERIMENT)
    if exp is None:
        raise DomgenError(f"MLflow experiment {EXPERIMENT} does not exist at {store.tracking_uri()}; run `domgen benchmark` first or pass --tracking-uri")
    parent = sweep_parent(exp.experiment_id, run_id)
    rec = benchmark_records(exp.experiment_id, parent.data.tags["domgen.sweep_hash"])
    ok = rec[rec.status == "FINISHED"] if len(rec) else rec
    if ok.empty:
        raise DomgenError(f"sweep {parent.info.run_id} has no finished configuration; run `domgen benchmark` (or --retry-failed) first")
    folder = Path(out) / EXPERIMENT / parent.info.run_id
    folder.mkdir(parents=True, exist_ok=True)
    tables = {"table2": table2(rec), "per_architecture": per_architecture(rec), "best_models": best_models(rec), "failed": failures(rec)}
    paths = write_tables(tables, folder)
    curves = loss_curves(ok)
    with store.artifact_dir() as tmp:
        figures = [figure_dice_vs_parameters(ok, folder / "dice_vs_parameters.png"),
                   figure_box(ok, "arch", folder / "dice_by_architecture.png"),
                   figure_box(ok, "weights", folder / "dice_by_weights.png"),
                   figure_loss_curves(curves, folder / "loss_curves.png"),
                   figure_masks(ok, folder / "masks_best_worst.png", tmp)]
    if log:
        store.log_artifact_folder(parent.info.run_id, folder, "report")
    return {"folder": folder, "parent_id": parent.info.run_id, "tables": tables, "figures": figures, "files": paths + figures}



def benchmark_tables(parent_id: str) -> dict:
    """The report's tables of the sweep ``parent_id``."""
    exp = store.get_experiment(EXPERIMENT)
    rec = benchmark_records(exp.experiment_id, sweep_parent(exp.experiment_id, parent_id).data.tags["domgen.sweep_hash"])
    return {"table2": table2(rec), "per_architecture": per_architecture(rec), "best_models": best_models(rec), "failed": failures(rec)}


def family_report(family, out: Path, run_id: str | None = None) -> dict:
    """``FAMILIES['benchmark'].build_report``: tables and figures, also logged to the sweep run."""
    return build_benchmark_report(out, run_id)
