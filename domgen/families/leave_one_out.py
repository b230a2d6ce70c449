"""Cross-dataset generalisation enhancement (Enshaei et al.): the leave-one-out experiment.

A round trains on one source dataset (per fold of a patient-wise k-fold: every source patient is tested
exactly once), chooses the cut-off on the in-domain test set, evaluates every unseen dataset, ranks its
slices by the Certainty Index, retrains on the most certain ones with their predicted masks, and
evaluates again. The paper's experiment is three rounds, each dataset the source in turn
(``--source A,B,C``); its Table III averages them.

MLflow: with several sources, one experiment run whose tag ``domgen.rounds`` lists the round runs; a run
per round; child runs per fold x (in-domain | target) x phase, each found again by the hash of its
config (and of the contents of the files it reads), so an interrupted experiment resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import numpy as np
import pandas as pd

from domgen.families import common, log_round_tables, units
from domgen.families.common import CHECKPOINT, check_split_patients, checkpoint_of_run, trained_patients, file_digest, hashed_view, prepare_dataset, with_content_digests
from domgen.data.registry import load_cases, load_suite
from domgen.errors import DomgenError
from domgen.evaluation.cutoff import DEFAULT_CANDIDATES, best_cutoff
from domgen.evaluation.evaluate import EvaluationSettings, evaluate
from domgen.evaluation.evaluate import paired_patients, patient_dsc
from domgen.evaluation.statistics import paired_bootstrap_change
from domgen.methods.pseudolabel import (PseudoLabelSettings, ci_dice_spearman, ci_dice_spearman_metrics, ci_ranking, enhance,
                                        indomain_ci_limit, rank_target)
from domgen.models import build_model
from domgen.preprocessing.slices import SlicePreprocessing, SliceSet
from domgen.preprocessing.splits import kfold_splits, read_splits, train_val_test_split, write_splits
from domgen.settings import LOO
from domgen.tracking import mlflow_store as store
from domgen.typed_config import FamilyConfig, typed
from domgen.models.checkpoint import load_checkpoint, save_checkpoint
from domgen.evaluation.artifacts import log_evaluation_artifacts
from domgen.training.trainer import TrainSettings, predict_model_size, seed_everything, to_original_size, train

FAMILY = "leave-one-out"
EXPERIMENT = "domgen-leave-one-out"
SPLIT_PROTOCOLS = ("kfold", "repeated-holdout")


@dataclass
class Round:
    """Everything one round needs, resolved from the config once."""

    cfg: FamilyConfig
    exp_id: str
    parent_id: str
    source: SliceSet
    targets: dict[str, SliceSet]
    splits: list[dict]
    pre: SlicePreprocessing
    train_settings: TrainSettings
    eval_settings: EvaluationSettings
    pl_settings: PseudoLabelSettings
    progress: bool
    pretrained: object = None  # the init_run / init_checkpoint model, loaded once; None: a fresh model per fold
    predicted: dict = field(default_factory=dict)  # (fold, target) -> the fold model's model-size probabilities
    # (fold) -> (train, validation) slices the fold model learns and is chosen on; None: the source's own parts
    # (domgen compare: a method's view of the training slices, or the targets' labels for oracle selection)
    fold_sets: object = None


def child_hash(cfg: dict, **identity) -> str:
    """A child run's identity: the round's config (``as_dict()``) with its files replaced by their contents, plus what
    picks the child."""
    return common.child_hash(hashed_view(cfg), **identity)


def covid_names(suite) -> list[str]:
    return [n for n, spec in suite.datasets.items() if spec.lesion_kind == "covid"]


def source_names(suite, cfg: FamilyConfig) -> list[str]:
    """``source``: one dataset, a comma list (``A,B,C``) or ``all`` (every COVID dataset of the suite)."""
    if cfg.source.strip() == "all":
        return covid_names(suite)
    names = [t.strip() for t in cfg.source.split(",") if t.strip()]
    if not names:
        raise DomgenError("--source is empty; give a dataset name, a comma list such as A,B,C, or all")
    if len(set(names)) != len(names):
        raise DomgenError(f"--source {','.join(names)} names a dataset twice; give each source once")
    for name in names:
        suite.get(name)
    return names


def target_names(suite, cfg: FamilyConfig) -> list[str]:
    """The unseen datasets of a round whose ``source`` is one dataset."""
    if cfg.targets:
        for name in cfg.targets:
            suite.get(name)
        return [n for n in cfg.targets if n != cfg.source]
    return [n for n in covid_names(suite) if n != cfg.source]


def round_config(cfg: FamilyConfig, suite, source: str) -> FamilyConfig:
    """The config of the round with ``source``: the same whether it runs alone or as one of several rounds."""
    out = cfg.replace(source=source)
    targets = target_names(suite, out)
    if cfg.targets and not targets:
        raise DomgenError(f"--targets {list(cfg.targets)} leaves no unseen dataset for source {source}; name another target")
    # a suite without another COVID dataset: an in-domain round, whose config holds the empty list it is hashed with
    return out.replace(targets=targets) if targets else typed({**out.as_dict(), "targets": []}, FAMILY, check=False)


def fold_splits(cfg: FamilyConfig, source: SliceSet) -> list[dict]:
    """The folds of a round: a splits file, or those the profile draws (``profile_folds``)."""
    if cfg.splits_file:
        folds = read_splits(Path(cfg.splits_file))["folds"]
        check_split_patients(cfg.splits_file, cfg.source, folds, source)
        return folds
    return profile_folds(cfg, source.patients())


def profile_folds(cfg: FamilyConfig, patients: list[str]) -> list[dict]:
    """The folds the profile draws over ``patients``: k-fold (each patient tested once) or repeated hold-out."""
    split = cfg.split
    if split.protocol == "kfold":
        # every source patient in exactly one test fold (1/k); validation carved from the rest in the train:val proportion
        return kfold_splits(patients, cfg.folds, seed=cfg.seed, val_fraction=split.val / (split.train + split.val))
    if split.protocol == "repeated-holdout":
        fractions = (split.train, split.val, split.test)
        # independent patient-wise 60/10/30 splits, one per fold with seed + fold (domgen < 0.2's scheme)
        return [{"fold": k, **train_val_test_split(patients, fractions, seed=cfg.seed + k)} for k in range(cfg.folds)]
    raise DomgenError(f"split.protocol {split.protocol!r} is unknown; use one of {', '.join(SPLIT_PROTOCOLS)}")


def check_init_run_overlap(cfg: FamilyConfig, folds: list[dict]) -> None:
    """Refuse an ``init_run`` whose model (or the model it started from) trained on source patients this round tests
    in-domain: their in-domain scores, cut-off and CI limit would come from patients the model has seen."""
    if not cfg.init_run:
        return
    seen = trained_patients(cfg.init_run).get(cfg.source, set())
    tested = sorted({p for fold in folds for p in fold["test"]} & seen)
    if tested:
        names = ", ".join(tested[:5]) + (f" and {len(tested) - 5} more" if len(tested) > 5 else "")
        raise DomgenError(f"--init-run {cfg.init_run} was trained on {cfg.source} patients {names}, whom this split tests "
                          f"in-domain; pass --set splits_file=FILE keeping them out of every fold's test part (e.g. the init "
                          f"run's train patients as train), or start from a model not trained on {cfg.source}")


def check_validation_parts(cfg: FamilyConfig, folds: list[dict]) -> None:
    """Refuse folds without validation patients when the best epoch or early stopping is chosen on them (the
    trainer refuses too; here it is said before any run exists)."""
    train = cfg.train
    if train.select_by == "last" and train.patience is None:
        return
    empty = [str(fold["fold"]) for fold in folds if not fold["val"]]
    if empty:
        raise DomgenError(f"fold(s) {', '.join(empty)} of source {cfg.source} have no validation patient, but "
                          f"train.select_by {train.select_by} and train.patience {train.patience} "
                          "choose on it; give the split a validation part (split.val > 0, or val patients in the "
                          "splits file) or use --set train.select_by=last --set train.patience=null")


# preprocessing settings that change what a model sees; a start model trained otherwise is noted on the round
INPUT_SETTINGS = ("image_size", "lung_mask", "mask_to_lung", "normalisation", "target")


def input_differences(pretrained, cfg: FamilyConfig) -> str:
    """How the start model's input differed from this round's ('mask_to_lung false -> true; ...'); '' if it did not,
    if the checkpoint does not say, or if there is no start model (None). Not refused: fine-tuning across sizes or
    masking is legitimate, but a comparison with a fresh model should know."""
    theirs = getattr(pretrained, "domgen_preprocessing", None) or {}
    ours = cfg.preprocessing
    text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731  (YAML spelling of booleans)
    return "; ".join(f"{k} {text(theirs[k])} -> {text(getattr(ours, k))}" for k in INPUT_SETTINGS
                     if k in theirs and theirs[k] != getattr(ours, k))


def _model_of(run_id: str, tmp: Path):
    model, ckpt = load_checkpoint(store.download_artifact(run_id, CHECKPOINT, tmp))
    return model, ckpt


def initial_model(cfg: FamilyConfig):
    """A fresh model, or the weights of ``init_run`` / ``init_checkpoint`` (a pretrained or transferred domgen model)."""
    if cfg.init_run:
        # the config holds only the run id (a stable hash); its checkpoint is fetched when needed
        with store.artifact_dir() as tmp:
            return load_checkpoint(checkpoint_of_run(cfg.init_run, tmp))[0]
    if cfg.init_checkpoint:
        model, _ = load_checkpoint(Path(cfg.init_checkpoint))
        return model
    m = cfg.model
    return build_model(m.arch, m.encoder, m.encoder_weights, m.in_channels)


def train_fold(r: Round, fold: dict):
    """Train (or find) the fold's source model; returns (model, cutoff, in-domain CI limit)."""
    k = fold["fold"]
    h = child_hash(r.cfg.as_dict(), fold=k, phase="baseline", target=r.cfg.source)
    done = store.find_run(r.exp_id, h)
    with store.artifact_dir() as tmp:
        if done is not None:
            model, ckpt = _model_of(done.info.run_id, tmp)
            return model, float(ckpt["cutoff"]), float(ckpt.get("ci_limit_indomain", float("nan")))
        tags = store.tags(family=FAMILY, source=r.cfg.source, target=r.cfg.source, fold=k, phase="baseline",
                          config_hash=h, role="in-domain")
        with store.tracked_run(r.exp_id, f"fold {k} | {r.cfg.source} in-domain", r.cfg.as_dict(), tags, r.parent_id) as run:
            seed_everything(r.train_settings.seed + k)
            model = copy.deepcopy(r.pretrained) if r.pretrained is not None else initial_model(r.cfg)
            settings = replace(r.train_settings, seed=r.cfg.seed + k)  # the round's settings (compare: its method's augmentation)
            train_part, val_part = r.fold_sets(fold) if r.fold_sets else (r.source.of_patients(fold["train"]), r.source.of_patients(fold["val"]))
            result = train(model, train_part, val_part, settings,
                           on_epoch=store.epoch_logger(run.info.run_id), progress=r.progress, desc=f"fold {k} train {r.cfg.source}")
            test = r.source.of_patients(fold["test"])
            probs = to_original_size(predict_model_size(result.model, test, device=settings.device), test)
            cutoff = best_cutoff(probs, test.truths, r.cfg.evaluation.cutoff_candidates or DEFAULT_CANDIDATES)
            summary, per_slice = evaluate(probs, test, cutoff, r.eval_settings)
            ranking = ci_ranking(probs, test, cutoff, r.pl_settings.selection)
            limit = indomain_ci_limit(ranking, r.pl_settings.ci_quantile)
            store.log_metrics(run.info.run_id, {**summary, "cutoff": cutoff, "best_epoch": result.best_epoch,
                                                "epochs_run": result.epochs_run, "seconds_per_epoch": result.seconds_per_epoch,
                                                **ci_dice_spearman_metrics(ranking), "ci_limit_indomain": limit})
            log_evaluation_artifacts(run.info.run_id, probs, test, cutoff, per_slice, ranking, tmp)
            store.log_artifact_file(run.info.run_id, save_checkpoint(tmp / "checkpoint.pt", result.model, r.cfg.model.as_dict(), cutoff=cutoff,
                                                                     config=r.cfg.as_dict(), fold=fold, ci_limit_indomain=limit), "model")
        return result.model, cutoff, limit


def selection_counts(ranking: pd.DataFrame, settings: PseudoLabelSettings, limit: float) -> dict[str, float]:
    """How many slices each label-free rule would select (printed per target so a researcher can compare)."""
    ok = ranking[ranking.eligible]
    out = {"n_slices_ranked": float(len(ok)), "n_selected": float(ranking.selected.sum()),
           "n_selected_ci_fixed": float((ok.ci >= settings.ci_min).sum())}
    if np.isfinite(limit):
        out["n_selected_ci_indomain"] = float((ok.ci >= limit).sum())
        out["ci_limit_indomain"] = limit
    if settings.top_fraction is not None:
        out["n_selected_top_fraction"] = float(min(len(ok), int(np.ceil(settings.top_fraction * len(ok)))))
    return out


def evaluate_target(r: Round, fold: dict, name: str, model, cutoff: float, limit: float, start: str | None = None) -> None:
    """Baseline on one unseen target: metrics, ranking, CI-DSC Spearman, what each selection rule picks.

    ``start`` identifies the model when it is not the round's own fold model (``domgen pseudolabel``)."""
    k = fold["fold"]
    h = child_hash(r.cfg.as_dict(), fold=k, phase="baseline", target=name, **({"start": start} if start else {}))
    if store.find_run(r.exp_id, h) is not None:
        return
    slices = r.targets[name]
    settings = r.pl_settings.with_ci_limit(limit)
    tags = store.tags(family=FAMILY, source=r.cfg.source, target=name, fold=k, phase="baseline", config_hash=h, role="unseen")
    with store.tracked_run(r.exp_id, f"fold {k} | {name} baseline", r.cfg.as_dict(), tags, r.parent_id) as run, store.artifact_dir() as tmp:
        small = predict_model_size(model, slices, device=r.cfg.device, progress=r.progress, desc=f"fold {k} predict {name}")
        r.predicted[(k, name, start)] = small  # the enhancement of this fold starts from the same model
        probs = to_original_size(small, slices)
        summary, per_slice = evaluate(probs, slices, cutoff, r.eval_settings)
        ranking, _ = rank_target(model, slices, cutoff, settings, r.cfg.device, small=small, calibration=r.source.of_patients(fold["val"]))
        extra = {f"{s}_dsc_spearman": ci_dice_spearman(ranking, s) for s in settings.score_names if s != "ci"}
        store.log_metrics(run.info.run_id, {**summary, "cutoff": cutoff, "ci_min_used": settings.ci_min, **extra,
                                            **ci_dice_spearman_metrics(ranking), **selection_counts(ranking, r.pl_settings, limit)})
        log_evaluation_artifacts(run.info.run_id, probs, slices, cutoff, per_slice, ranking, tmp)


def target_monitor(slices: SliceSet, cutoff: float, device: str, n: int | None, seed: int):
    """Per-epoch target DSC (pooled at model size) on up to ``n`` fixed slices: for the retraining plot, never
    used to choose anything. None when ``n`` is 0."""
    if n == 0 or not len(slices):
        return None
    rng = np.random.default_rng(seed)
    part = slices if n is None or n >= len(slices) else slices.subset(np.sort(rng.choice(len(slices), n, replace=False)))

    def monitor(model) -> dict[str, float]:
        pred = predict_model_size(model, part, device=device) > cutoff
        truth = part.targets > 0
        denom = pred.sum() + truth.sum()
        return {"target_dsc": float(2 * (pred & truth).sum() / denom) if denom else 1.0}

    return monitor


def retraining_plot(path: Path, history: list[dict], title: str) -> Path:
    """Source validation DSC and the target's DSC per retraining epoch (the target's for analysis only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["val_dsc"] for h in history], "o-", label="validation DSC (chooses the weights)")
    if history and "target_dsc" in history[0]:
        ax.plot(epochs, [h["target_dsc"] for h in history], "s--", label="target DSC (ground truth, analysis only)")
    ax.set_xlabel("retraining epoch")
    ax.set_ylabel("DSC")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def enhance_target(r: Round, fold: dict, name: str, model, cutoff: float, limit: float, start: str | None = None,
                   review=None) -> None:
    """Retrain on the target's most confident slices, evaluate on the target (all slices, and the slices not used as
    pseudo-labels) and on the in-domain test set; once per retraining seed (``pseudolabel.seeds``).

    ``start`` identifies the starting model when it is not the round's own fold model (``domgen pseudolabel``);
    ``review`` replaces the predicted masks by a radiologist's corrections."""
    for repeat in range(r.pl_settings.seeds):
        _enhance_once(r, fold, name, model, cutoff, limit, start, review, repeat)


def _enhance_once(r: Round, fold: dict, name: str, model, cutoff: float, limit: float, start: str | None,
                  review, repeat: int) -> None:
    k = fold["fold"]
    identity = {**({"start": start} if start else {}), **({"review": review.digest} if review else {}), **({"repeat": repeat} if repeat else {})}
    h = child_hash(r.cfg.as_dict(), fold=k, phase="enhanced", target=name, **identity)
    if store.find_run(r.exp_id, h) is not None:
        return
    slices = r.targets[name]
    pl = r.pl_settings.with_ci_limit(limit)
    tags = store.tags(family=FAMILY, source=r.cfg.source, target=name, fold=k, phase="enhanced", config_hash=h, role="unseen",
                      repeat=repeat)
    settings = TrainSettings.from_config(r.cfg.train.as_dict(), seed=r.cfg.seed + k + 1000 * repeat, device=r.cfg.device,
                                         **({"epochs": pl.retrain_epochs} if pl.retrain_epochs else {}))
    with store.tracked_run(r.exp_id, f"fold {k} | {name} enhanced" + (f" | seed {repeat}" if repeat else ""), r.cfg.as_dict(), tags,
                           r.parent_id) as run, store.artifact_dir() as tmp:
        history: list[dict] = []
        log_epoch = store.epoch_logger(run.info.run_id)

        def on_epoch(record):
            history.append(record)
            log_epoch(record)

        # a checkpoint's config from before the row reads it at its default
        monitor = target_monitor(slices, cutoff, settings.device, r.cfg.pseudolabel.track_target_slices, r.cfg.seed)
        record: dict = {}
        model_out, rankings = enhance(copy.deepcopy(model), r.source.of_patients(fold["train"]), r.source.of_patients(fold["val"]),
                                      slices, cutoff, pl, settings, progress=r.progress, on_epoch=on_epoch, monitor=monitor,
                                      reviewed=None if review is None else review.slices, small=r.predicted.get((k, name, start)),
                                      record=record)
        if record["select_by_used"]:
            store.set_tag(run.info.run_id, "domgen.select_by_used", ",".join(record["select_by_used"]))
        if pl.select_by == "pseudo-val" and "source-val" in record["select_by_used"]:
            click.echo(f"note: fold {k}, {name}: too few pseudo-labels (< 2) to hold one out for --select-by pseudo-val; "
                       "the retrained weights were chosen on the source's validation slices (tag domgen.select_by_used)", err=True)
        small = predict_model_size(model_out, slices, device=settings.device)
        probs = to_original_size(small, slices)
        summary, per_slice = evaluate(probs, slices, cutoff, r.eval_settings)
        test = r.source.of_patients(fold["test"])
        quick = EvaluationSettings(**{**r.eval_settings.__dict__, "surface": False})
        indomain, _ = evaluate(to_original_size(predict_model_size(model_out, test, device=settings.device), test), test, cutoff, quick)
        # "used" = retrained on; pseudo-val slices held out to choose the weights were not, so they count as unused
        used = record["trained"]
        unused_index = [i for i, s in enumerate(slices.slice_ids) if s not in used]
        unused = {}
        if unused_index:
            part = slices.subset(unused_index)
            unused, _ = evaluate([probs[i] for i in unused_index], part, cutoff, quick)
        # this fold's paired change over the target's patients (the table pools folds per patient)
        before = baseline_per_slice(r, fold, name, start, tmp)
        change = paired_bootstrap_change(*paired_patients(patient_dsc(before), patient_dsc(per_slice)), seed=r.cfg.seed + k).metrics()
        store.log_metrics(run.info.run_id, {**summary, "cutoff": cutoff, "ci_min_used": pl.ci_min, "n_pseudo_labels": float(len(used)),
                                            "n_pseudo_val_held_out": float(len(record["held_out"] - used)),
                                            **{f"indomain_{m}": indomain[m] for m in ("dsc", "sen", "spc")},
                                            **{f"unused_{m}": unused[m] for m in ("dsc", "sen", "spc") if m in unused},
                                            "n_slices_unused": float(len(unused_index)), **change,
                                            **(review.metrics() if review else {})})
        if rankings:
            # which slices became pseudo-labels, ranked by the model that chose them, with their spread
            selection = pd.concat(rankings)
            selection.to_csv(tmp / "pseudo_label_selection.csv", index=False)
            store.log_artifact_file(run.info.run_id, tmp / "pseudo_label_selection.csv")
            store.log_metrics(run.info.run_id, selection_spread(selection[selection["round"] == 0]))
        if history:
            store.log_artifact_file(run.info.run_id, retraining_plot(tmp / "retraining_curves.png", history,
                                                                     f"fold {k}, {r.cfg.source} -> {name}"), "plots")
        # overlays and ci_ranking.csv show the retrained model's own certainty beside its own contours
        log_evaluation_artifacts(run.info.run_id, probs, slices, cutoff, per_slice,
                                 rank_target(model_out, slices, cutoff, replace(pl, confidence="ci", filters={}), settings.device, small)[0], tmp)
        store.log_artifact_file(run.info.run_id, save_checkpoint(tmp / "checkpoint.pt", model_out, r.cfg.model.as_dict(), cutoff=cutoff,
                                                                 config=r.cfg.as_dict(), fold=fold, ci_limit_indomain=limit), "model")


def selection_spread(ranking: pd.DataFrame) -> dict[str, float]:
    """How the selected slices spread over patients and lesion sizes (N at the slice's own size)."""
    chosen = ranking[ranking.selected]
    if chosen.empty:
        return {"selected_patients": 0.0}
    per_patient = chosen.patient_id.value_counts()
    return {"selected_patients": float(len(per_patient)), "selected_max_per_patient": float(per_patient.max()),
            "selected_n_pixels_median": float(chosen.n_pixels.median()), "selected_n_pixels_min": float(chosen.n_pixels.min()),
            "selected_n_pixels_max": float(chosen.n_pixels.max())}


def baseline_per_slice(r: Round, fold: dict, name: str, start: str | None, tmp: Path) -> pd.DataFrame:
    """The per-slice table of the baseline run this enhancement starts from."""
    h = child_hash(r.cfg.as_dict(), fold=fold["fold"], phase="baseline", target=name, **({"start": start} if start else {}))
    run = store.find_run(r.exp_id, h)
    (tmp / "baseline").mkdir(exist_ok=True)
    return pd.read_csv(store.download_artifact(run.info.run_id, "per_slice_metrics.csv", tmp / "baseline"))


def slice_counts(prepared: dict[str, SliceSet]) -> dict[str, float]:
    """MLflow metrics: slices kept and dropped by the keep_slices rule, per dataset."""
    out = {}
    for name, slices in prepared.items():
        out[f"slices_kept.{name}"] = float(slices.report.get("kept", len(slices)))
        out[f"slices_dropped.{name}"] = float(slices.report.get("dropped", 0))
    return out


def section_settings(cfg: FamilyConfig) -> tuple[TrainSettings, EvaluationSettings, PseudoLabelSettings]:
    """The settings objects a round hands to training, evaluation and pseudo-labelling."""
    return (TrainSettings.from_config(cfg.train.as_dict(), seed=cfg.seed, device=cfg.device),
            EvaluationSettings.from_config(cfg.evaluation.as_dict()), PseudoLabelSettings.from_config(cfg.pseudolabel.as_dict()))


def run_round(cfg: FamilyConfig, suite, prepared: dict[str, SliceSet], pre: SlicePreprocessing, progress: bool,
              experiment_id: str | None = None, runner=None) -> str:
    """Run (or resume) the round of ``cfg.source``; returns its run id."""
    exp_id, h, finished = store.round_lookup(EXPERIMENT, hashed_view(cfg.as_dict()))
    if finished:
        return finished
    source = prepared[cfg.source]
    splits = fold_splits(cfg, source)
    first = initial_model(cfg)  # fails early on missing weights / a bad init checkpoint
    pretrained = first if cfg.init_run or cfg.init_checkpoint else None
    names = cfg.targets
    tags = store.tags(family=FAMILY, source=cfg.source, config_hash=h, role="round",
                      init_input_differs=input_differences(pretrained, cfg) or None)
    if experiment_id:
        tags["mlflow.parentRunId"] = experiment_id
    parent_id, _ = store.start_or_resume_run(exp_id, f"{FAMILY} {cfg.source}", cfg.as_dict(), tags)
    with store.finishing(parent_id):
        store.log_metrics(parent_id, slice_counts({cfg.source: source, **{n: prepared[n] for n in names}}))
        r = Round(cfg, exp_id, parent_id, source, {n: prepared[n] for n in names}, splits, pre, *section_settings(cfg), progress,
                  pretrained)
        with store.artifact_dir() as tmp:
            write_splits(tmp / "splits.json", splits, {"dataset": cfg.source, "suite": str(suite.path), "seed": cfg.seed,
                                                       "protocol": "splits file" if cfg.splits_file else cfg.split.protocol})
            store.log_artifact_file(parent_id, tmp / "splits.json")
        # the folds are independent: one unit each, in this process or in the executor's workers
        units.run_units(runner, fold_unit, [{"name": f"fold {fold['fold']}", "fold": fold} for fold in splits],
                        shared=units.for_units(runner, r), what="fold", progress=progress)
        log_round_tables(FAMILY, parent_id)
    return parent_id


def fold_unit(job: dict, r: Round) -> None:
    """One fold start to end: its source model (trained or found), then every unseen target's baseline and enhancement."""
    fold = job["fold"]
    model, cutoff, limit = train_fold(r, fold)
    for name in r.targets:
        evaluate_target(r, fold, name, model, cutoff, limit)
        enhance_target(r, fold, name, model, cutoff, limit)


def run_leave_one_out(cfg: dict | FamilyConfig, progress: bool = True, runner=None) -> str:
    """Run (or resume) the experiment: one round per source. Returns the run whose tables to print: the round's
    run for one source, the experiment run (rounds listed in its tag ``domgen.rounds``) for several.

    ``cfg``: the typed config, or a dict (checked and completed as on the command line, so it finds the same runs).
    ``runner`` (``domgen.executors.get_executor``): where the folds of a round run (``domgen.families.units``)."""
    cfg = typed(cfg, FAMILY)
    # every input is read and checked before any run exists, so a bad file leaves nothing behind
    suite = load_suite(cfg.suite)
    sources = source_names(suite, cfg)
    if len(sources) > 1 and cfg.splits_file:
        raise DomgenError("a splits file describes the folds of one source; use --splits-file (or splits_file) with a single --source")
    # a round is identified by the contents of the datasets and files it reads, not their paths
    rounds = [with_content_digests(rc, [rc.source, *rc.targets]) for rc in (round_config(cfg, suite, s) for s in sources)]
    # a finished round (or experiment) prints its tables without preparing data or starting an executor's server
    finished = store.round_lookup(EXPERIMENT, hashed_view((rounds[0] if len(rounds) == 1 else experiment_config(cfg, rounds)).as_dict()))[2]
    if finished:
        return finished
    pre = SlicePreprocessing.from_config(cfg.preprocessing.as_dict())
    needed = list(dict.fromkeys(n for rc in rounds for n in [rc.source, *rc.targets]))
    prepared = {n: prepare_dataset(suite, n, pre, progress) for n in needed}
    for rc in rounds:  # a bad splits file, init run or empty validation part stops here, before any run exists
        folds = fold_splits(rc, prepared[rc.source])
        check_init_run_overlap(rc, folds)
        check_validation_parts(rc, folds)
    with units.shared_store(runner, EXPERIMENT):
        if len(rounds) == 1:
            return run_round(rounds[0], suite, prepared, pre, progress, runner=runner)
        return _run_rounds(cfg, rounds, sources, suite, prepared, pre, progress, runner)


def experiment_config(cfg: FamilyConfig, rounds: list[FamilyConfig]) -> FamilyConfig:
    """The config of the experiment run over several rounds: the command's, with the digests of every dataset read."""
    return with_content_digests(cfg, list(dict.fromkeys(n for rc in rounds for n in [rc.source, *rc.targets])))


def _run_rounds(cfg: FamilyConfig, rounds: list[FamilyConfig], sources: list[str], suite, prepared: dict[str, SliceSet],
                pre: SlicePreprocessing, progress: bool, runner) -> str:
    """The experiment run of several rounds (the paper's Table III averages them)."""
    cfg = experiment_config(cfg, rounds)
    exp_id, h, finished = store.round_lookup(EXPERIMENT, hashed_view(cfg.as_dict()))
    if finished:
        return finished
    parent_id, _ = store.start_or_resume_run(exp_id, f"{FAMILY} {','.join(sources)}", cfg.as_dict(),
                                             store.tags(family=FAMILY, source=",".join(sources), config_hash=h, role="experiment"))
    with store.finishing(parent_id):
        round_ids = []
        for rc in rounds:
            round_ids.append(run_round(rc, suite, prepared, pre, progress, experiment_id=parent_id, runner=runner))
            store.set_tag(parent_id, "domgen.rounds", json.dumps(round_ids))
        log_round_tables(FAMILY, parent_id)
    return parent_id


def round_from_checkpoint(checkpoint: Path, target: str, pseudolabel: dict, suite: str | None, device: str | None, progress: bool):
    """A leave-one-out fold rebuilt from its checkpoint, for the steps that start from a trained fold model
    (``run_pseudolabel`` here, ``domgen confidence``).

    Returns (round, fold, model, cutoff, in-domain CI limit, start digest, suite): the round holds the source and
    ``target`` slices prepared as the fold's config says, with ``pseudolabel`` settings (None values: the
    checkpoint's) and ``suite`` / ``device`` (None: the checkpoint's) laid over its config; the start digest is the
    checkpoint's SHA-256, which enters the identity of every run made from it. Raises ``DomgenError`` for a
    checkpoint that `domgen leave-one-out` did not write or a ``target`` not in the suite."""
    _, ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt or "fold" not in ckpt:
        raise DomgenError(f"checkpoint {checkpoint} does not record its config and fold; use a checkpoint written by `domgen leave-one-out`")
    from domgen.settings import validate

    given = {k: v for k, v in pseudolabel.items() if v is not None}
    # checked as a profile's pseudolabel section (the checkpoint's own values were checked when its round ran); merged as
    # given into the recorded config, taken as it is, so the runs keep the hashes they had
    validate({"family": LOO, "pseudolabel": copy.deepcopy(given)}, fill=False)
    record = ckpt["config"]
    cfg = typed({**record, "pseudolabel": {**record["pseudolabel"], **given}, "suite": suite or record["suite"],
                 "device": device or record["device"]}, FAMILY, check=False)
    fold = ckpt["fold"]
    exp_id = store.experiment_id(EXPERIMENT)
    loaded = load_suite(cfg.suite)
    loaded.get(target)
    pre = SlicePreprocessing.from_config(cfg.preprocessing.as_dict())
    r = Round(cfg, exp_id, None, prepare_dataset(loaded, cfg.source, pre, progress), {target: prepare_dataset(loaded, target, pre, progress)},
              [fold], pre, *section_settings(cfg), progress)
    model, _ = load_checkpoint(checkpoint)
    return r, fold, model, float(ckpt["cutoff"]), float(ckpt.get("ci_limit_indomain", float("nan"))), file_digest(checkpoint), loaded


def run_pseudolabel(checkpoint: Path, target: str, pseudolabel: dict, suite: str | None = None, device: str | None = None,
                    progress: bool = True, export_dir: Path | None = None, reviewed_dir: Path | None = None) -> dict:
    """The select-retrain-evaluate step on its own, from a fold checkpoint; returns before/after metrics.

    The runs are identified by the checkpoint's contents as well as the config, so another starting model
    with the same config is new work, not a cached result. ``export_dir``: write the selected slices for a
    radiologist's review and stop; ``reviewed_dir``: retrain on the reviewed masks instead of the predictions."""
    r, fold, model, cutoff, limit, start, loaded = round_from_checkpoint(checkpoint, target, pseudolabel, suite, device, progress)
    if export_dir is not None:
        from domgen.methods.review import export_for_review

        slices = r.targets[target]
        ranking, small = rank_target(model, slices, cutoff, r.pl_settings.with_ci_limit(limit), r.cfg.device,
                                     calibration=r.source.of_patients(fold["val"]))
        probs = dict(zip(slices.slice_ids, to_original_size(small, slices)))
        chosen = sorted(set(ranking.patient_id[ranking.selected]))
        cases = {c.patient_id: c for c in load_cases(loaded.get(target), chosen)} if chosen else {}
        n = export_for_review(Path(export_dir), ranking, probs, cases, slices, cutoff,
                              {"target": target, "checkpoint_sha256": start, "cutoff": cutoff, "confidence": r.pl_settings.confidence})
        return {"exported": n}
    review = None
    if reviewed_dir is not None:
        from domgen.methods.review import read_review

        review = read_review(Path(reviewed_dir), r.targets[target])
    evaluate_target(r, fold, target, model, cutoff, limit, start=start)
    enhance_target(r, fold, target, model, cutoff, limit, start=start, review=review)
    out = {}
    identity = {"start": start, **({"review": review.digest} if review else {})}
    for phase in ("baseline", "enhanced"):
        run = store.find_run(r.exp_id, child_hash(r.cfg.as_dict(), fold=fold["fold"], phase=phase, target=target,
                                                  **(identity if phase == "enhanced" else {"start": start})))
        out[phase] = dict(run.data.metrics, run_id=run.info.run_id)
    return out
