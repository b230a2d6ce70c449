"""The benchmark's report rebuilt from MLflow alone (Bizopoulos et al., Table II and Figures 2-5).

Metrics are printed in % as the paper prints them. Tables: Table II (architecture x encoder x weights, per
experiment Sens/Spec/Dice, parameters, training seconds per epoch, validation seconds); per-architecture
mean ± std over the ImageNet-pretrained encoders (the paper's rows) and, apart, over the randomly initialised
ones; per-encoder and per-experiment means; the paper's "upper bounds" (lesion-b minus lesion-a: what the lung
masks add; ImageNet minus random: what pretraining adds), pair by pair and summarised; the best model per
experiment and the failed configurations with their reasons. Figures: Dice against parameters with a KDE,
Dice box plots per architecture and per weight initialisation, train/validation loss curves per architecture
(mean ± std band over its configurations), and the predicted masks of the best and worst encoder, overall and
per architecture. Written to a folder and logged to the sweep's parent run. ``against_paper`` sets each
finished configuration beside the published Table II (a CSV the user supplies; none is shipped).
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
from domgen.tracking.tables import write_tables  # noqa: E402

EXPERIMENT = "domgen-benchmark"
PAPER_METRICS = (("sens", "Sens"), ("spec", "Spec"), ("dice", "Dice"))
SAMPLES = "predictions/samples.npz"
WEIGHTS_ORDER = ("imagenet", "random")
# the published Table II as data; not shipped: its numbers could not be read from a source we can cite (README)
PAPER_TABLE = Path(__file__).resolve().parents[1] / "data" / "bizopoulos_table2.csv"
PAPER_COLUMNS = ("experiment", "architecture", "encoder", "sensitivity", "specificity", "dice", "source")
PAPER_EXPERIMENTS = {"lung": "lung", "lung segmentation": "lung", "lesion-a": "lesion-a", "lesion segmentation a": "lesion-a",
                     "lesion-b": "lesion-b", "lesion segmentation b": "lesion-b"}


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
                     # how many configurations trained together (--stack); their seconds per epoch are shares
                     "stacked_with": int(t.get("domgen.stacked_with", 1)), "run_id": run.info.run_id, **run.data.metrics})
    columns = ["experiment", "arch", "encoder", "weights", "status", "error", "stacked_with", "run_id"]
    return pd.DataFrame(rows, columns=columns if not rows else None)


def _cell(value: float, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    """A 0..1 metric as the paper prints it: a percentage with two decimals."""
    return _cell(None if value is None else 100 * float(value), 2)


def _mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
    """"mean ± std" (population std, as before) of the finite values times ``scale``; "-" when there are none."""
    arr = np.asarray(values, dtype=float) * scale
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return "-"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=0):.{digits}f}"


def finished(rec: pd.DataFrame, weights: str | None = None) -> pd.DataFrame:
    """The finished configurations, of one weight initialisation when ``weights`` is given."""
    ok = rec[rec.status == "FINISHED"] if len(rec) else rec
    return ok[ok.weights == weights] if weights is not None and len(ok) else ok


def _weights_sorted(values) -> list[str]:
    return sorted(set(values), key=lambda w: (WEIGHTS_ORDER.index(w) if w in WEIGHTS_ORDER else len(WEIGHTS_ORDER), w))


def table2(rec: pd.DataFrame) -> pd.DataFrame:
    """Table II: one row per architecture x encoder x weights; per experiment Sens/Spec/Dice in % ("failed" where it failed).
    Where some configurations trained stacked (``--stack``), a column "stacked" gives how many trained together: their
    seconds per epoch are each one's share of the group's, not a model's time alone."""
    experiments = [e for e in ("lung", "lesion-a", "lesion-b") if e in set(rec.experiment)]
    stacked = "stacked_with" in rec and len(rec) and bool((rec[rec.status == "FINISHED"].stacked_with > 1).any())
    rows = []
    for (arch, encoder, weights), group in rec.groupby(["arch", "encoder", "weights"], sort=True):
        ok = group[group.status == "FINISHED"]
        row = {"architecture": arch, "encoder": encoder, "weights": weights,
               "params (M)": _cell(ok.params_m.mean(), 2) if "params_m" in ok and len(ok) else "-",
               "train s/epoch": _cell(ok.train_seconds_per_epoch.mean(), 2) if "train_seconds_per_epoch" in ok and len(ok) else "-",
               "val s": _cell(ok.val_seconds_per_epoch.mean(), 2) if "val_seconds_per_epoch" in ok and len(ok) else "-"}
        if stacked:
            row["stacked"] = "/".join(str(k) for k in sorted(set(ok.stacked_with))) if len(ok) else "-"
        for experiment in experiments:
            run = group[group.experiment == experiment]
            for key, label in PAPER_METRICS:
                if run.empty:
                    row[f"{experiment} {label}"] = "-"
                elif run.status.iloc[0] != "FINISHED":
                    row[f"{experiment} {label}"] = "failed"
                else:
                    row[f"{experiment} {label}"] = _percent(run[key].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def per_architecture(rec: pd.DataFrame, weights: str = "imagenet") -> pd.DataFrame:
    """Mean ± std over the encoders of each architecture, per experiment, for one weight initialisation.

    The paper's per-architecture results are over its ImageNet-pretrained models; the randomly initialised
    ones get their own table (``weights="random"``), never pooled with them. Sens/Spec/Dice in %.
    """
    ok = finished(rec, weights)
    extra = (("params_m", "params (M)"), ("train_seconds_per_epoch", "train s/epoch"))
    columns = ["experiment", "architecture", "weights", "models"] + [f"{label} (%)" for _, label in PAPER_METRICS] + [l for _, l in extra]
    rows = []
    for (experiment, arch), group in ok.groupby(["experiment", "arch"], sort=True):
        row = {"experiment": experiment, "architecture": arch, "weights": weights, "models": len(group)}
        for key, label in PAPER_METRICS:
            row[f"{label} (%)"] = _mean_std(group[key], 100)
        for key, label in extra:
            row[label] = _mean_std(group[key], 1, 3) if key in group else "-"
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def per_encoder(rec: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std Dice (%) of each encoder over the architectures, per experiment; one row per weights x encoder."""
    ok = finished(rec)
    experiments = [e for e in ("lung", "lesion-a", "lesion-b") if len(ok) and e in set(ok.experiment)]
    rows = []
    for weights in _weights_sorted(ok.weights) if len(ok) else []:
        part = ok[ok.weights == weights]
        for encoder, group in part.groupby("encoder", sort=True):
            row = {"weights": weights, "encoder": encoder, "models": len(group)}
            for experiment in experiments:
                row[f"{experiment} Dice (%)"] = _mean_std(group[group.experiment == experiment].dice, 100)
            rows.append(row)
    return pd.DataFrame(rows, columns=["weights", "encoder", "models"] + [f"{e} Dice (%)" for e in experiments])


def per_experiment(rec: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std Sens/Spec/Dice (%) of each experiment over its models, one row per weight initialisation, with its best model."""
    ok = finished(rec)
    columns = ["experiment", "weights", "models"] + [f"{label} (%)" for _, label in PAPER_METRICS] + ["best Dice (%)", "best model"]
    rows = []
    for experiment in [e for e in ("lung", "lesion-a", "lesion-b") if len(ok) and e in set(ok.experiment)]:
        part = ok[ok.experiment == experiment]
        for weights in _weights_sorted(part.weights):
            group = part[part.weights == weights]
            top = group.loc[group.dice.astype(float).idxmax()]
            rows.append({"experiment": experiment, "weights": weights, "models": len(group),
                         **{f"{label} (%)": _mean_std(group[key], 100) for key, label in PAPER_METRICS},
                         "best Dice (%)": _percent(top.dice), "best model": f"{top.arch}/{top.encoder}"})
    return pd.DataFrame(rows, columns=columns)


UPPER_BOUND_COLUMNS = ["comparison", "group", "architecture", "encoder", "Dice (%)", "baseline Dice (%)", "difference (pp)"]
LUNG_MASKS = "lesion-b - lesion-a (lung masks as preprocessing)"
PRETRAINING = "imagenet - random (pretrained encoder)"


def upper_bound_pairs(rec: pd.DataFrame) -> pd.DataFrame:
    """Every pair behind the paper's upper bounds, Dice in % and the difference in percentage points.

    Lung masks: lesion-b minus lesion-a of the same architecture x encoder x weights (group: the weights).
    Pretraining: ImageNet minus random of the same experiment x architecture x encoder (group: the experiment).
    Only pairs whose two configurations both finished.
    """
    ok = finished(rec)
    if ok.empty:
        return pd.DataFrame(columns=UPPER_BOUND_COLUMNS)
    dice = {(r.experiment, r.arch, r.encoder, r.weights): 100 * float(r.dice) for r in ok.itertuples()}
    rows = []
    for (experiment, arch, encoder, weights), value in sorted(dice.items()):
        if experiment == "lesion-b" and ("lesion-a", arch, encoder, weights) in dice:
            base = dice[("lesion-a", arch, encoder, weights)]
            rows.append((LUNG_MASKS, weights, arch, encoder, value, base, value - base))
        if weights == "imagenet" and (experiment, arch, encoder, "random") in dice:
            base = dice[(experiment, arch, encoder, "random")]
            rows.append((PRETRAINING, experiment, arch, encoder, value, base, value - base))
    return pd.DataFrame(rows, columns=UPPER_BOUND_COLUMNS).sort_values(["comparison", "group", "architecture", "encoder"],
                                                                        ignore_index=True)


def upper_bounds(pairs: pd.DataFrame) -> pd.DataFrame:
    """The upper bounds: mean, std and max of the Dice differences (pp) of ``upper_bound_pairs``, per group and over all."""
    rows = []
    for comparison in (LUNG_MASKS, PRETRAINING):
        part = pairs[pairs.comparison == comparison]
        for group, sel in [(g, part[part.group == g]) for g in sorted(set(part.group))] + ([("all", part)] if len(part) else []):
            top = sel.loc[sel["difference (pp)"].idxmax()]
            diff = sel["difference (pp)"].to_numpy(float)
            rows.append({"comparison": comparison, "group": group, "pairs": len(sel), "mean difference (pp)": round(float(diff.mean()), 2),
                         "std (pp)": round(float(diff.std(ddof=0)), 2), "max difference (pp)": round(float(diff.max()), 2),
                         "max at": f"{top.architecture}/{top.encoder}" + (f" ({top.group})" if group == "all" else "")})
    return pd.DataFrame(rows, columns=["comparison", "group", "pairs", "mean difference (pp)", "std (pp)", "max difference (pp)", "max at"])


def best_models(rec: pd.DataFrame) -> pd.DataFrame:
    """The configuration with the highest test Dice in each experiment."""
    ok = rec[rec.status == "FINISHED"]
    rows = []
    for experiment, group in ok.groupby("experiment", sort=True):
        top = group.loc[group.dice.astype(float).idxmax()]
        rows.append({"experiment": experiment, "architecture": top.arch, "encoder": top.encoder, "weights": top.weights,
                     **{f"{label} (%)": _percent(top[key]) for key, label in PAPER_METRICS},
                     "Dice without the empty rule (%)": _percent(top["dice_pooled"]) if "dice_pooled" in top else "-",
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


def _panels(frame: pd.DataFrame, width: float, height: float, xlabel: str = "", ylabel: str = "test Dice (%)"):
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
        x, y = part.params_m.to_numpy(float), 100 * part.dice.to_numpy(float)
        if len(part) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            try:
                kde = gaussian_kde(np.vstack([x, y]))
                gx, gy = np.meshgrid(np.linspace(x.min(), x.max(), 80), np.linspace(y.min(), y.max(), 80))
                ax.contourf(gx, gy, kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape), levels=8, cmap="Blues", alpha=0.6)
            except np.linalg.LinAlgError:  # collinear points: no 2D density
                pass
        for arch, marker in zip(sorted(part.arch.unique()), "osD^v<>"):
            sel = part[part.arch == arch]
            ax.scatter(sel.params_m, 100 * sel.dice.astype(float), s=18, marker=marker, label=arch, edgecolor="k", linewidth=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def figure_box(ok: pd.DataFrame, by: str, path: Path) -> Path:
    """Box plots of test Dice grouped by ``by`` (arch or weights), one panel per experiment."""
    fig, panels = _panels(ok, 4.0, 3.4)
    for ax, part in panels:
        groups = sorted(part[by].unique())
        ax.boxplot([100 * part[part[by] == g].dice.to_numpy(float) for g in groups], tick_labels=groups)
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


def loss_bands(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean and (population) std of each loss per experiment x architecture x epoch over its configurations (Fig. 4's line and patch)."""
    grouped = curves.groupby(["experiment", "arch", "metric", "epoch"]).value
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=0), "configurations": grouped.size()}).reset_index()


def figure_loss_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Train (solid) and validation (dashed) loss per architecture, mean over its configurations with a ± std band, per experiment."""
    bands = loss_bands(curves)
    fig, panels = _panels(bands, 4.2, 3.4, "epoch", "soft Dice loss")
    for ax, part in panels:
        for i, arch in enumerate(sorted(part.arch.unique())):
            for metric, style in (("train_loss", "-"), ("val_loss", "--")):
                line = part[(part.arch == arch) & (part.metric == metric)].sort_values("epoch")
                if line.empty:
                    continue
                ax.plot(line.epoch, line["mean"], style, color=f"C{i}", label=f"{arch} {metric.split('_')[0]}")
                ax.fill_between(line.epoch, line["mean"] - line["std"], line["mean"] + line["std"], color=f"C{i}", alpha=0.15, linewidth=0)
        ax.legend(fontsize=6)
    return _save(fig, path)


def _samples(run_id: str, tmp: Path, cache: dict) -> dict:
    """The run's logged sample slices (image, truth, prediction), downloaded once per report."""
    if run_id not in cache:
        with np.load(store.download_artifact(run_id, SAMPLES, tmp / run_id)) as npz:
            cache[run_id] = {key: npz[key] for key in npz.files}
    return cache[run_id]


def _best_worst(group: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    ranked = group.sort_values(["dice", "encoder", "weights"], ascending=[False, True, True], kind="stable")
    return [("best", ranked.iloc[0]), ("worst", ranked.iloc[-1])]


def figure_masks(ok: pd.DataFrame, path: Path, tmp: Path, cache: dict | None = None) -> Path:
    """Per experiment, the sample test slices with the truth and the predictions of the best and worst encoder (by Dice)."""
    cache = {} if cache is None else cache
    panels = []
    for experiment, group in sorted(ok.groupby("experiment")):
        for label, row in _best_worst(group):
            panels.append((f"{experiment} {label}: {row.arch}/{row.encoder}/{row.weights} (Dice {100 * row.dice:.2f}%)",
                           _samples(row.run_id, tmp, cache)))
    return _mask_grid(panels, path)


def figures_masks_per_architecture(ok: pd.DataFrame, folder: Path, tmp: Path, cache: dict | None = None) -> list[Path]:
    """Fig. 2 of the paper: one figure per architecture, per experiment the predicted masks of its best and worst
    encoder (by test Dice, over the architecture's finished configurations; the title names the weights)."""
    cache = {} if cache is None else cache
    paths = []
    for arch, by_arch in sorted(ok.groupby("arch")):
        panels = []
        for experiment, group in sorted(by_arch.groupby("experiment")):
            for label, row in _best_worst(group):
                panels.append((f"{experiment} {label} encoder: {row.encoder}/{row.weights} (Dice {100 * row.dice:.2f}%)",
                               _samples(row.run_id, tmp, cache)))
        paths.append(_mask_grid(panels, folder / f"masks_{arch}.png", f"{arch}, best and worst encoder per experiment; "))
    return paths


def _mask_grid(panels: list[tuple[str, dict]], path: Path, heading: str = "") -> Path:
    """One row per (title, sample): the sample slices with the truth (green) and prediction (red) contours."""
    n_cols = max((len(s["image"]) for _, s in panels), default=1)
    fig, axes = plt.subplots(len(panels), n_cols, figsize=(max(2.1 * n_cols, 4.8), 2.3 * len(panels)), squeeze=False)
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
    fig.suptitle(f"{heading}green: ground truth, red: prediction", fontsize=8)
    return _save(fig, path)


def report_tables(rec: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every table of the report, by file name; metrics in % (differences in percentage points)."""
    pairs = upper_bound_pairs(rec)
    return {"table2": table2(rec), "per_architecture": per_architecture(rec, "imagenet"),
            "per_architecture_random": per_architecture(rec, "random"), "per_encoder": per_encoder(rec),
            "per_experiment": per_experiment(rec), "upper_bounds": upper_bounds(pairs),
            "upper_bound_pairs": pairs.round(2), "best_models": best_models(rec), "failed": failures(rec)}


def _sweep_records(run_id: str | None):
    """(the sweep's parent run, its records); one sentence when the experiment or a finished configuration is missing."""
    exp = store.get_experiment(EXPERIMENT)
    if exp is None:
        raise DomgenError(f"MLflow experiment {EXPERIMENT} does not exist at {store.tracking_uri()}; run `domgen benchmark` first or pass --tracking-uri")
    parent = sweep_parent(exp.experiment_id, run_id)
    rec = benchmark_records(exp.experiment_id, parent.data.tags["domgen.sweep_hash"])
    if finished(rec).empty:
        raise DomgenError(f"sweep {parent.info.run_id} has no finished configuration; run `domgen benchmark` (or --retry-failed) first")
    return parent, rec


def build_benchmark_report(out: Path, run_id: str | None = None, log: bool = True) -> dict:
    """Tables and figures of one sweep (its parent ``run_id``, default the newest) from MLflow alone.

    Every finished configuration sharing the sweep's settings counts, including those finished by an
    earlier, partial sweep. Returns ``{"folder", "parent_id", "tables", "figures"}``.
    """
    parent, rec = _sweep_records(run_id)
    ok = finished(rec)
    folder = Path(out) / EXPERIMENT / parent.info.run_id
    folder.mkdir(parents=True, exist_ok=True)
    tables = report_tables(rec)
    paths = write_tables(tables, folder)
    curves = loss_curves(ok)
    cache: dict = {}
    with store.artifact_dir() as tmp:
        figures = [figure_dice_vs_parameters(ok, folder / "dice_vs_parameters.png"),
                   figure_box(ok, "arch", folder / "dice_by_architecture.png"),
                   figure_box(ok, "weights", folder / "dice_by_weights.png"),
                   figure_loss_curves(curves, folder / "loss_curves.png"),
                   figure_masks(ok, folder / "masks_best_worst.png", tmp, cache),
                   *figures_masks_per_architecture(ok, folder, tmp, cache)]
    if log:
        store.log_artifact_folder(parent.info.run_id, folder, "report")
    return {"folder": folder, "parent_id": parent.info.run_id, "tables": tables, "figures": figures, "files": paths + figures}


def benchmark_tables(parent_id: str) -> dict:
    """The report's tables of the sweep ``parent_id``."""
    exp = store.get_experiment(EXPERIMENT)
    rec = benchmark_records(exp.experiment_id, sweep_parent(exp.experiment_id, parent_id).data.tags["domgen.sweep_hash"])
    return report_tables(rec)


# ---------------------------------------------------------------- against the published Table II
def _paper_error(path: Path, what: str) -> DomgenError:
    return DomgenError(f"--paper-table {path} {what}; it must be a CSV with the columns {', '.join(PAPER_COLUMNS)} "
                       "(optional: weights, default imagenet), one row per published configuration, Sens/Spec/Dice in % as the paper prints them")


def load_paper_table(path: Path | None = None) -> pd.DataFrame:
    """The published Table II: ``path``, or the copy shipped with domgen (none is shipped: then one sentence saying so).

    Lines starting with ``#`` are comments (say where the numbers were read). Names are matched case-insensitively;
    experiments may be spelled as the paper does ("lesion segmentation A"). Empty cells are values not published.
    Returns one row per (experiment, arch, encoder, weights) with sensitivity/specificity/dice in %.
    """
    if path is None:
        if not PAPER_TABLE.is_file():
            raise DomgenError("the published Table II of Bizopoulos et al. is not shipped with domgen (no source we could cite "
                              "gave its numbers); pass --paper-table PATH, a CSV with the columns " + ", ".join(PAPER_COLUMNS)
                              + " (optional: weights, default imagenet) and Sens/Spec/Dice in % as the paper prints them")
        path = PAPER_TABLE
    path = Path(path)
    if not path.is_file():
        raise _paper_error(path, "does not exist or is not a file")
    try:
        df = pd.read_csv(path, comment="#", dtype=str, skipinitialspace=True, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _paper_error(path, f"is not a readable CSV ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in PAPER_COLUMNS if c not in df.columns]
    if missing:
        raise _paper_error(path, f"has no column {', '.join(missing)}")
    if df.empty:
        raise _paper_error(path, "has no rows")
    df = df.fillna("").apply(lambda col: col.str.strip())  # a short row's missing cells are empty, not NaN
    out = pd.DataFrame({"experiment": df.experiment.str.lower().map(PAPER_EXPERIMENTS), "arch": df.architecture.str.lower(),
                        "encoder": df.encoder.str.lower(),
                        "weights": (df.weights.str.lower().replace({"none": "random", "": "imagenet"}) if "weights" in df
                                    else "imagenet"), "source": df.source})
    for i, name in enumerate(df.experiment):
        if pd.isna(out.experiment.iloc[i]):
            raise _paper_error(path, f"row {i + 1}: experiment '{name}' is not one of lung, lesion-a, lesion-b (or the paper's "
                                     "'lung segmentation', 'lesion segmentation A', 'lesion segmentation B')")
    for column in ("sensitivity", "specificity", "dice"):
        text = df[column]
        values = pd.to_numeric(text.str.rstrip("%").replace("", np.nan), errors="coerce")
        bad = (text != "") & (values.isna() | ~values.between(0, 100))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _paper_error(path, f"row {i + 1}: {column} '{text.iloc[i]}' is not a percentage between 0 and 100")
        out[column] = values.astype(float)
    key = ["experiment", "arch", "encoder", "weights"]
    duplicated = out.duplicated(key)
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise _paper_error(path, f"row {i + 1}: {'/'.join(out.loc[i, key])} appears twice")
    return out


AGAINST_PAPER = (("sens", "Sens", "sensitivity"), ("spec", "Spec", "specificity"), ("dice", "Dice", "dice"))


def against_paper(rec: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Each finished configuration's Sens/Spec/Dice (%) beside the published value and the difference (ours minus
    paper, percentage points); NaN where the paper table has no such configuration or value."""
    published = {(r.experiment, r.arch, r.encoder, r.weights): r for r in paper.itertuples()}
    rows = []
    for run in finished(rec).sort_values(["experiment", "arch", "encoder", "weights"]).itertuples():
        match = published.get((run.experiment, run.arch, run.encoder, run.weights))
        row = {"experiment": run.experiment, "architecture": run.arch, "encoder": run.encoder, "weights": run.weights}
        for key, label, column in AGAINST_PAPER:
            ours = 100 * float(getattr(run, key))
            theirs = float(getattr(match, column)) if match is not None else float("nan")
            row[f"{label} (%)"] = ours
            row[f"paper {label} (%)"] = theirs
            row[f"difference {label} (pp)"] = ours - theirs
        row["source"] = match.source if match is not None else "-"
        rows.append(row)
    columns = ["experiment", "architecture", "encoder", "weights"] + [
        c for _, label, _ in AGAINST_PAPER for c in (f"{label} (%)", f"paper {label} (%)", f"difference {label} (pp)")] + ["source"]
    return pd.DataFrame(rows, columns=columns)


def against_paper_summary(table: pd.DataFrame) -> str:
    """One line: how many finished configurations have a published Dice, and the mean and largest |difference|."""
    diff = table["difference Dice (pp)"].dropna().abs() if len(table) else pd.Series(dtype=float)
    if diff.empty:
        return f"none of the {len(table)} finished configurations has a published Dice in the paper table"
    return (f"{len(diff)} of {len(table)} finished configurations have a published Dice; mean |difference| "
            f"{diff.mean():.2f} pp, largest {diff.max():.2f} pp")


def against_paper_report(out: Path, run_id: str | None, paper: pd.DataFrame, log: bool = True) -> dict:
    """``domgen report --against-paper``: the comparison table of one sweep, written (against_paper.md/.csv/.tex)
    beside the report and logged to the sweep run; the printed table shows "-" where nothing was published."""
    parent, rec = _sweep_records(run_id)
    table = against_paper(rec, paper)
    shown = table.round(2).astype(object).where(table.notna(), "-")
    folder = Path(out) / EXPERIMENT / parent.info.run_id
    paths = write_tables({"against_paper": shown}, folder)
    if log:
        for path in paths:
            store.log_artifact_file(parent.info.run_id, path, "report")
    return {"folder": folder, "parent_id": parent.info.run_id, "table": table, "shown": shown, "summary": against_paper_summary(table),
            "files": paths}


def family_report(family, out: Path, run_id: str | None = None) -> dict:
    """``FAMILIES['benchmark'].build_report``: tables and figures, also logged to the sweep run."""
    return build_benchmark_report(out, run_id)
