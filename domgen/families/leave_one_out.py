"""Cross-dataset generalisation enhancement (Enshaei et al.): the leave-one-out round.

Train on one source dataset (per fold: a patient-wise 60/10/30 split with its own seed), choose the
cut-off on the in-domain test set, evaluate every unseen dataset, rank its slices by the Certainty
Index, retrain on the most certain ones with their predicted masks, evaluate again.

MLflow: a parent run per round; child runs per fold x (in-domain | target) x phase, each found again
by the hash of its config, so an interrupted round resumes where it stopped.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from domgen.config import config_hash
from domgen.data.registry import load_cases, load_suite
from domgen.errors import DomgenError
from domgen.evaluation.cutoff import DEFAULT_CANDIDATES, best_cutoff
from domgen.evaluation.evaluate import EvaluationSettings, evaluate
from domgen.methods.pseudolabel import PseudoLabelSettings, ci_dice_spearman, ci_ranking, enhance
from domgen.models import build_model
from domgen.preprocessing.slices import SlicePreprocessing, SliceSet, prepare_slices
from domgen.preprocessing.splits import read_splits, train_val_test_split, write_splits
from domgen.tracking import mlflow_store as store
from domgen.models.checkpoint import load_checkpoint, save_checkpoint
from domgen.tracking.artifacts import log_evaluation_artifacts
from domgen.tracking.report import leave_one_out_tables, log_tables
from domgen.training.trainer import TrainSettings, predict_model_size, seed_everything, to_original_size, train

FAMILY = "leave-one-out"
EXPERIMENT = "domgen-leave-one-out"
CHECKPOINT = "model/checkpoint.pt"


@dataclass
class Round:
    """Everything one round needs, resolved from the config once."""

    cfg: dict
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


def target_names(suite, cfg: dict) -> list[str]:
    if cfg.get("targets"):
        names = [t.strip() for t in (cfg["targets"].split(",") if isinstance(cfg["targets"], str) else cfg["targets"])]
        for name in names:
            suite.get(name)
        if cfg["source"] in names:
            raise DomgenError(f"--targets includes the source {cfg['source']}; the in-domain test set is evaluated anyway")
        return names
    return [n for n, spec in suite.datasets.items() if n != cfg["source"] and spec.lesion_kind == "covid"]


def prepare_dataset(suite, name: str, pre: SlicePreprocessing, progress: bool) -> SliceSet:
    cases = load_cases(suite.get(name), progress=progress)
    if not cases:
        raise DomgenError(f"dataset {name} of suite {suite.path} has no cases; run `domgen data check {name}`")
    return prepare_slices(cases, pre)


def fold_splits(cfg: dict, patients: list[str]) -> list[dict]:
    if cfg.get("splits_file"):
        folds = read_splits(Path(cfg["splits_file"]))["folds"]
        unknown = sorted({p for f in folds for part in ("train", "val", "test") for p in f[part]} - set(patients))
        if unknown:
            raise DomgenError(f"splits file {cfg['splits_file']} names patients not in {cfg['source']} (e.g. {unknown[0]}); fix the file")
        return folds
    fractions = tuple(cfg["split"][k] for k in ("train", "val", "test"))
    # one patient-wise 60/10/30 split per fold, each with its own seed (Enshaei et al.)
    return [{"fold": k, **train_val_test_split(patients, fractions, seed=cfg["seed"] + k)} for k in range(cfg["folds"])]


def child_hash(cfg: dict, **identity) -> str:
    return config_hash({"config": cfg, **identity})


def _model_of(run_id: str, tmp: Path):
    model, ckpt = load_checkpoint(store.download_artifact(run_id, CHECKPOINT, tmp))
    return model, ckpt


def initial_model(cfg: dict):
    """A fresh model, or the weights of ``init_run`` / ``init_checkpoint`` (a pretrained or transferred domgen model)."""
    if cfg.get("init_run"):
        # the config holds only the run id (a stable hash); its checkpoint is fetched when needed
        with store.artifact_dir() as tmp:
            return load_checkpoint(checkpoint_of_run(cfg["init_run"], tmp))[0]
    if cfg.get("init_checkpoint"):
        model, _ = load_checkpoint(Path(cfg["init_checkpoint"]))
        return model
    m = cfg["model"]
    return build_model(m["arch"], m["encoder"], m["encoder_weights"], m.get("in_channels", 1))


def train_fold(r: Round, fold: dict):
    """Train (or find) the fold's source model; returns (model, cutoff)."""
    k = fold["fold"]
    h = child_hash(r.cfg, fold=k, phase="baseline", target=r.cfg["source"])
    done = store.find_run(r.exp_id, h)
    with store.artifact_dir() as tmp:
        if done is not None:
            model, ckpt = _model_of(done.info.run_id, tmp)
            return model, float(ckpt["cutoff"])
        tags = store.tags(family=FAMILY, source=r.cfg["source"], target=r.cfg["source"], fold=k, phase="baseline",
                          config_hash=h, role="in-domain")
        with store.tracked_run(r.exp_id, f"fold {k} | {r.cfg['source']} in-domain", r.cfg, tags, r.parent_id) as run:
            seed_everything(r.train_settings.seed + k)
            model = copy.deepcopy(r.pretrained) if r.pretrained is not None else initial_model(r.cfg)
            settings = TrainSettings.from_config(r.cfg["train"], seed=r.cfg["seed"] + k, device=r.cfg["device"])
            result = train(model, r.source.of_patients(fold["train"]), r.source.of_patients(fold["val"]), settings,
                           on_epoch=store.epoch_logger(run.info.run_id), progress=r.progress, desc=f"fold {k} train {r.cfg['source']}")
            test = r.source.of_patients(fold["test"])
            probs = to_original_size(predict_model_size(result.model, test, device=settings.device), test)
            cutoff = best_cutoff(probs, test.truths, r.cfg["evaluation"].get("cutoff_candidates") or DEFAULT_CANDIDATES)
            summary, per_slice = evaluate(probs, test, cutoff, r.eval_settings)
            store.log_metrics(run.info.run_id, {**summary, "cutoff": cutoff, "best_epoch": result.best_epoch,
                                                "epochs_run": result.epochs_run, "seconds_per_epoch": result.seconds_per_epoch})
            ranking = ci_ranking(probs, test, cutoff, r.pl_settings.selection)
            store.log_metrics(run.info.run_id, {"ci_dsc_spearman": ci_dice_spearman(ranking, r.pl_settings.min_pixels)})
            log_evaluation_artifacts(run.info.run_id, probs, test, cutoff, per_slice, ranking, tmp)
            store.log_artifact_file(run.info.run_id, save_checkpoint(tmp / "checkpoint.pt", result.model, r.cfg["model"], cutoff=cutoff,
                                                                     config=r.cfg, fold=fold), "model")
        return result.model, cutoff


def evaluate_target(r: Round, fold: dict, name: str, model, cutoff: float) -> None:
    """Baseline on one unseen target: metrics, CI ranking, CI-DSC Spearman."""
    k = fold["fold"]
    h = child_hash(r.cfg, fold=k, phase="baseline", target=name)
    if store.find_run(r.exp_id, h) is not None:
        return
    slices = r.targets[name]
    tags = store.tags(family=FAMILY, source=r.cfg["source"], target=name, fold=k, phase="baseline", config_hash=h, role="unseen")
    with store.tracked_run(r.exp_id, f"fold {k} | {name} baseline", r.cfg, tags, r.parent_id) as run, store.artifact_dir() as tmp:
        probs = to_original_size(predict_model_size(model, slices, device=r.cfg["device"], progress=r.progress,
                                                    desc=f"fold {k} predict {name}"), slices)
        summary, per_slice = evaluate(probs, slices, cutoff, r.eval_settings)
        ranking = ci_ranking(probs, slices, cutoff, r.pl_settings.selection)
        store.log_metrics(run.info.run_id, {**summary, "cutoff": cutoff, "ci_dsc_spearman": ci_dice_spearman(ranking, r.pl_settings.min_pixels),
                                            "n_selected": float(ranking.selected.sum())})
        log_evaluation_artifacts(run.info.run_id, probs, slices, cutoff, per_slice, ranking, tmp)


def enhance_target(r: Round, fold: dict, name: str, model, cutoff: float) -> None:
    """Retrain on the target's most certain slices, evaluate on the target (and the in-domain test)."""
    k = fold["fold"]
    h = child_hash(r.cfg, fold=k, phase="enhanced", target=name)
    if store.find_run(r.exp_id, h) is not None:
        return
    slices = r.targets[name]
    tags = store.tags(family=FAMILY, source=r.cfg["source"], target=name, fold=k, phase="enhanced", config_hash=h, role="unseen")
    settings = TrainSettings.from_config(r.cfg["train"], seed=r.cfg["seed"] + k, device=r.cfg["device"])
    with store.tracked_run(r.exp_id, f"fold {k} | {name} enhanced", r.cfg, tags, r.parent_id) as run, store.artifact_dir() as tmp:
        model, rankings = enhance(copy.deepcopy(model), r.source.of_patients(fold["train"]), r.source.of_patients(fold["val"]),
                                  slices, cutoff, r.pl_settings, settings, progress=r.progress, on_epoch=store.epoch_logger(run.info.run_id))
        probs = to_original_size(predict_model_size(model, slices, device=settings.device), slices)
        summary, per_slice = evaluate(probs, slices, cutoff, r.eval_settings)
        test = r.source.of_patients(fold["test"])
        indomain, _ = evaluate(to_original_size(predict_model_size(model, test, device=settings.device), test), test, cutoff,
                               EvaluationSettings(**{**r.eval_settings.__dict__, "surface": False}))
        store.log_metrics(run.info.run_id, {**summary, "cutoff": cutoff, "n_pseudo_labels": float(sum(x.selected.sum() for x in rankings)),
                                            **{f"indomain_{m}": indomain[m] for m in ("dsc", "sen", "spc")}})
        ranking = pd.concat(rankings) if rankings else None
        log_evaluation_artifacts(run.info.run_id, probs, slices, cutoff, per_slice, ranking, tmp)
        store.log_artifact_file(run.info.run_id, save_checkpoint(tmp / "checkpoint.pt", model, r.cfg["model"], cutoff=cutoff,
                                                                 config=r.cfg, fold=fold), "model")


def run_leave_one_out(cfg: dict, progress: bool = True) -> str:
    """Run (or resume) one round; returns the parent run id. Tables come from ``domgen.tracking.report``."""
    exp_id, h, finished = store.round_lookup(EXPERIMENT, cfg)
    if finished:
        return finished
    # every input is read and checked before any run exists, so a bad file leaves nothing behind
    suite = load_suite(cfg["suite"])
    suite.get(cfg["source"])
    names = target_names(suite, cfg)
    pre = SlicePreprocessing.from_config(cfg["preprocessing"])
    source = prepare_dataset(suite, cfg["source"], pre, progress)
    targets = {n: prepare_dataset(suite, n, pre, progress) for n in names}
    splits = fold_splits(cfg, source.patients())
    first = initial_model(cfg)  # fails early on missing weights / a bad init checkpoint
    pretrained = first if cfg.get("init_run") or cfg.get("init_checkpoint") else None
    parent_id, _ = store.start_or_resume_run(exp_id, f"{FAMILY} {cfg['source']}", cfg,
                                             store.tags(family=FAMILY, source=cfg["source"], config_hash=h, role="round"))
    with store.finishing(parent_id):
        r = Round(cfg, exp_id, parent_id, source, targets, splits, pre,
                  TrainSettings.from_config(cfg["train"], seed=cfg["seed"], device=cfg["device"]),
                  EvaluationSettings.from_config(cfg["evaluation"]), PseudoLabelSettings.from_config(cfg["pseudolabel"]), progress,
                  pretrained)
        with store.artifact_dir() as tmp:
            write_splits(tmp / "splits.json", splits, {"dataset": cfg["source"], "suite": str(suite.path), "seed": cfg["seed"],
                                                       "protocol": "patient-wise train/val/test per fold, seed + fold"})
            store.log_artifact_file(parent_id, tmp / "splits.json")
        for fold in splits:
            model, cutoff = train_fold(r, fold)
            for name in names:
                evaluate_target(r, fold, name, model, cutoff)
                enhance_target(r, fold, name, model, cutoff)
        log_tables(parent_id, leave_one_out_tables(parent_id))
    return parent_id


def checkpoint_of_run(run_id: str, dest: Path) -> Path:
    """The checkpoint artifact of a domgen run (a fold's source model or an enhanced model)."""
    try:
        return store.download_artifact(run_id, CHECKPOINT, dest)
    except Exception as exc:  # MLflow raises several types for unknown runs / missing artifacts
        raise DomgenError(f"run {run_id} has no {CHECKPOINT} artifact ({type(exc).__name__}); pass the run id of a finished "
                          "leave-one-out fold run (see the MLflow UI) or --checkpoint PATH") from None


def run_pseudolabel(checkpoint: Path, target: str, pseudolabel: dict, suite: str | None = None, device: str | None = None,
                    progress: bool = True) -> dict[str, dict[str, float]]:
    """The select-retrain-evaluate step on its own, from a fold checkpoint; returns before/after metrics."""
    _, ckpt = load_checkpoint(checkpoint)
    if "config" not in ckpt or "fold" not in ckpt:
        raise DomgenError(f"checkpoint {checkpoint} does not record its config and fold; use a checkpoint written by `domgen leave-one-out`")
    cfg = dict(ckpt["config"])
    cfg["pseudolabel"] = {**cfg["pseudolabel"], **{k: v for k, v in pseudolabel.items() if v is not None}}
    cfg["suite"] = suite or cfg["suite"]
    cfg["device"] = device or cfg["device"]
    fold = ckpt["fold"]
    exp_id = store.experiment_id(EXPERIMENT)
    loaded = load_suite(cfg["suite"])
    pre = SlicePreprocessing.from_config(cfg["preprocessing"])
    r = Round(cfg, exp_id, None, prepare_dataset(loaded, cfg["source"], pre, progress), {target: prepare_dataset(loaded, target, pre, progress)},
              [fold], pre, TrainSettings.from_config(cfg["train"], seed=cfg["seed"], device=cfg["device"]),
              EvaluationSettings.from_config(cfg["evaluation"]), PseudoLabelSettings.from_config(cfg["pseudolabel"]), progress)
    model, _ = load_checkpoint(checkpoint)
    cutoff = float(ckpt["cutoff"])
    evaluate_target(r, fold, target, model, cutoff)
    enhance_target(r, fold, target, model, cutoff)
    out = {}
    for phase in ("baseline", "enhanced"):
        run = store.find_run(exp_id, child_hash(cfg, fold=fold["fold"], phase=phase, target=target))
        out[phase] = dict(run.data.metrics, run_id=run.info.run_id)
    return out
