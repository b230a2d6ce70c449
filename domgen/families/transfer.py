"""Transfer from non-COVID lung lesions (Wang et al., "Does Non-COVID19 Lung Lesion Help?").

Pretrain one model per non-COVID lesion dataset (MSD lung tumour, StructSeg lung GTV, NSCLC pleural
effusion) and a multi-lesion model on all of them jointly; then, on the COVID target, compare training
from scratch with four ways of reusing a pretrained model (``domgen.methods.transfer.STRATEGIES``) under
Wang et al.'s inverse 5-fold protocol: each fold trains on 20 % of the patients and tests on the other 80 %
(drawn, or read from ``splits_file``). Every test case (patient) is scored as one volume
(``domgen.evaluation.evaluate.per_case_metrics``); the tables give mean ± std over cases.

MLflow (experiment ``domgen-transfer``): pretraining runs stand alone (phase ``pretrain``), found again by
the hash of what they depend on, so every round and ``domgen leave-one-out --init-run`` can reference
them by run id; a parent run per round holds one child per fold x strategy x pretrained model. Every
training run logs ``train_patients.json`` (the patients whose slices trained or early-stopped its model, per
dataset, and the run it started from), which ``domgen leave-one-out --init-run`` checks against its test sets.

``dims: 3`` (``--dims 3``) runs the same protocol on whole volumes with the 3D U-Net, the patch trainer, the
sliding-window inference and the per-volume metrics of ``domgen cross-validate`` (the profile's ``volume`` section);
Wang et al. used a 3D nnU-Net. Its runs live in the same experiment and tables; ``dims`` is part of their hash.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from domgen import settings
from domgen.tracking.identity import config_hash
from domgen.data.registry import load_suite
from domgen.errors import DomgenError
from domgen.evaluation.evaluate import EvaluationSettings, case_summary, evaluate, per_case_metrics
from domgen.evaluation.metrics import overlap_metrics
from domgen.evaluation.volume_metrics import volume_metrics
from domgen.families import log_round_tables, units
from domgen.families.common import (TRAIN_PATIENTS, check_split_patients, checkpoint_of_run, child_hash, hashed_view, load_volumes, prepare_dataset,
                                    require_volume_dataset, with_content_digests)
from domgen.methods.transfer import STRATEGIES, prepare_strategy
from domgen.models import build_model, count_parameters
from domgen.preprocessing.slices import SlicePreprocessing, SliceSet
from domgen.preprocessing.splits import inverse_kfold_splits, read_splits, train_val_test_split, write_splits
from domgen.tracking import mlflow_store as store
from domgen.models.checkpoint import load_checkpoint, save_checkpoint
from domgen.models.unet3d import build_model_3d
from domgen.preprocessing.volume import LESION, Volume, VolumePreprocessing, case_affine, to_case_grid
from domgen.evaluation.artifacts import log_evaluation_artifacts
from domgen.training.trainer import TrainSettings, predict_model_size, seed_everything, to_original_size, train
from domgen.training.volume_trainer import VolumeTrainSettings, predict_volume, train_volumes
from domgen.typed_config import FamilyConfig, typed

FAMILY = "transfer"
EXPERIMENT = "domgen-transfer"
MULTI = "multi"  # the multi-lesion model: every pretraining dataset jointly
NO_PRETRAIN = "none"  # the pretrain tag of the scratch baseline


def names_of(value) -> list[str]:
    """A comma-separated string or a list, as a list of stripped names."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(v).strip() for v in items if str(v).strip()]


def round_view(cfg: FamilyConfig) -> dict:
    """What a round's hash sees: with dims 2 neither ``dims`` nor the ``volume`` section (2D rounds keep their hashes)."""
    view = hashed_view(cfg.as_dict())
    return {k: v for k, v in view.items() if k not in ("dims", "volume")} if cfg.dims == 2 else view


def volume_model_config(cfg: FamilyConfig) -> dict:
    # binary lesion target (background / lesion, 2 classes): the non-COVID lesions have no lung class to share, and
    # effusion lies outside the lung mask; Wang et al. segment the lesion alone too. The rest is the validated section,
    # which settings.validate filled from the volume.model rows
    return {**cfg.volume.model.as_dict(), "classes": 2, "dims": 3}


def pretrain_names(cfg: FamilyConfig) -> list[str]:
    names = names_of(cfg.pretrain)
    known = [*cfg.pretrain_datasets, MULTI]
    for name in names:
        if name not in known:
            raise DomgenError(f"--pretrain {name}: unknown pretrained model; choose from {', '.join(known)} "
                              "(or add it to pretrain_datasets in the transfer profile)")
    return names


def strategy_names(cfg: FamilyConfig) -> list[str]:
    names = names_of(cfg.strategies)
    for name in names:
        if name not in STRATEGIES:
            raise DomgenError(f"--strategy {name}: unknown transfer strategy; choose from {', '.join(STRATEGIES)}")
    if not names:
        raise DomgenError(f"--strategy is empty; choose from {', '.join(STRATEGIES)}")
    return names


def pretrain_datasets(suite, cfg: FamilyConfig, name: str) -> list[str]:
    """The suite datasets a pretrained model learns from: a dataset named like the model, else the
    profile's ``pretrain_datasets`` entry; ``multi`` takes all of them (each once)."""
    if name == MULTI:
        out = [d for other in cfg.pretrain_datasets for d in pretrain_datasets(suite, cfg, other)]
        return list(dict.fromkeys(out))
    dataset = name if name in suite.datasets else cfg.pretrain_datasets[name]
    suite.get(dataset)
    return [dataset]


def pretraining_identity(cfg: FamilyConfig, datasets: list[str]) -> dict:
    """Everything a pretrained model depends on; not the target, the folds or the strategies, so rounds share it.
    The suite enters by the contents of the datasets it is trained on, not by its path."""
    digest = cfg.attached("content_digest")
    suite = digest["datasets"] if digest is not None else cfg.suite
    if isinstance(suite, dict):
        suite = {d: suite[d] for d in datasets if d in suite}
    if cfg.dims == 3:
        return {"family": FAMILY, "phase": "pretrain", "dims": 3, "datasets": datasets, "suite": suite, "seed": cfg.seed,
                "device": cfg.device, "model": volume_model_config(cfg), "preprocessing": cfg.volume.preprocessing.as_dict(),
                "train": cfg.volume.train.as_dict()}
    trained = hashed_view(cfg.as_dict())  # the train sections as they train: precision auto resolved, loader keys out
    return {"family": FAMILY, "phase": "pretrain", "datasets": datasets, "suite": suite, "seed": cfg.seed,
            "device": cfg.device, "model": cfg.model.as_dict(), "preprocessing": cfg.preprocessing.as_dict(),
            "pretraining": trained["pretraining"], "train": trained["train"]}


def pretrain(exp_id: str, suite, cfg: FamilyConfig, name: str, progress: bool = True) -> str:
    """Run id of the pretrained model ``name`` (trained now unless a finished run has the same identity)."""
    datasets = pretrain_datasets(suite, cfg, name)
    identity = pretraining_identity(cfg, datasets)
    h = config_hash(identity)
    done = store.find_run(exp_id, h)
    if done is not None:
        return done.info.run_id
    if cfg.dims == 3:
        return pretrain_volumes(exp_id, suite, cfg, name, datasets, identity, h, progress)
    pre = settings.build(SlicePreprocessing, cfg.preprocessing.as_dict())
    fraction = cfg.pretraining.val_fraction
    train_parts, val_parts, splits = [], [], []
    for dataset in datasets:  # split each dataset by patient on its own: patient ids may repeat across datasets
        slices = prepare_dataset(suite, dataset, pre, progress)
        split = train_val_test_split(slices.patients(), (1.0 - fraction, fraction, 0.0), seed=cfg.seed)
        train_parts.append(slices.of_patients(split["train"]))
        val_parts.append(slices.of_patients(split["val"]))
        splits.append({"fold": len(splits), **split})
    train_set, val_set = SliceSet.concat(train_parts), SliceSet.concat(val_parts) if any(len(v) for v in val_parts) else None
    train_settings = settings.build(TrainSettings, {**cfg.train.as_dict(), **(cfg.pretraining.train or {})}, seed=cfg.seed,
                                    device=cfg.device)
    tags = store.tags(family=FAMILY, phase="pretrain", pretrain=name, datasets="+".join(datasets), config_hash=h, role="pretrain")
    run = store.claim_run(exp_id, f"pretrain {name} ({'+'.join(datasets)})", identity, tags)
    if run is None:
        raise DomgenError(f"pretraining {name} is running in another domgen process; wait for it to finish, then re-run")
    with store.finishing(run.info.run_id), store.artifact_dir() as tmp:
        seed_everything(cfg.seed)
        model = build_model(cfg.model.arch, cfg.model.encoder, cfg.model.encoder_weights, cfg.model.in_channels)
        trainable, total = count_parameters(model)
        result = train(model, train_set, val_set or train_set, train_settings, on_epoch=store.epoch_logger(run.info.run_id),
                       progress=progress, desc=f"pretrain {name}")
        store.log_metrics(run.info.run_id, {"best_val_dsc": result.history[result.best_epoch]["val_dsc"], "best_epoch": result.best_epoch,
                                            "epochs_run": result.epochs_run, "seconds_per_epoch": result.seconds_per_epoch,
                                            "trainable_params": trainable, "total_params": total, "n_train_slices": len(train_set)})
        # one "fold" per dataset: its train/val patients (test empty: the whole dataset serves pretraining)
        write_splits(tmp / "splits.json", splits, {"datasets": datasets, "suite": str(suite.path), "seed": cfg.seed,
                                                   "protocol": "patient-wise train/val per pretraining dataset"})
        store.log_artifact_file(run.info.run_id, tmp / "splits.json")
        log_train_patients(run.info.run_id, {d: [*s["train"], *s["val"]] for d, s in zip(datasets, splits)}, None, tmp)
        store.log_artifact_file(run.info.run_id, save_checkpoint(tmp / "checkpoint.pt", result.model, cfg.model.as_dict(),
                                                                 pretrain=name, datasets=datasets), "model")
    return run.info.run_id


def pretrain_unit(job: dict, shared: dict) -> None:
    pretrain(shared["exp_id"], shared["suite"], shared["cfg"], job["pretrain"], shared["progress"])


def log_train_patients(run_id: str, datasets: dict[str, list[str]], init_run: str | None, tmp: Path) -> None:
    """What the run's model has seen: its train and validation patients per dataset, and the model it started from."""
    path = tmp / TRAIN_PATIENTS
    path.write_text(json.dumps({"datasets": {d: sorted(p) for d, p in datasets.items()}, "init_run": init_run}, indent=2) + "\n")
    store.log_artifact_file(run_id, path)


def pooled_metrics(per_slice: pd.DataFrame) -> dict[str, float]:
    """F1 and accuracy from the confusion counts pooled over all test slices (pixel-wise F1 = pooled DSC); the
    tables use the per-case ones, these stay as ``pooled_f1`` / ``pooled_acc``."""
    counts = per_slice[["tp", "fp", "fn", "tn"]].sum().to_numpy()
    return {"pooled_f1": overlap_metrics(counts, "nan")["dsc"],
            "pooled_acc": float(counts[0] + counts[3]) / max(float(counts.sum()), 1.0)}


def case_metrics(probs: list, test: SliceSet, cutoff: float, eval_settings: EvaluationSettings,
                 summary: dict[str, float], per_slice: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
    """(run metrics, per-case table): ``dsc nsd hd95 sen f1 acc`` are mean ± std over the test cases (Wang et al.
    report per scan); ``slice_nsd`` / ``slice_hd95`` keep the mean over slices of the 2D per-slice values."""
    cases = per_case_metrics(probs, test, cutoff, eval_settings, per_slice)
    renamed = {f"slice_{k}": summary.pop(k) for k in ("nsd", "nsd_std", "hd95", "hd95_std") if k in summary}
    return {**summary, **renamed, **case_summary(cases), **pooled_metrics(per_slice)}, cases


@dataclass
class TransferRound:
    """Everything one round needs, resolved from the config once."""

    cfg: FamilyConfig
    exp_id: str
    parent_id: str
    target: SliceSet  # a VolumeSet with dims 3
    eval_settings: EvaluationSettings
    pretrain_runs: dict[str, str]
    progress: bool
    pretrained: dict[str, nn.Module] = field(default_factory=dict)

    def pretrained_model(self, name: str) -> nn.Module | None:
        if name == NO_PRETRAIN:
            return None
        if name not in self.pretrained:
            with store.artifact_dir() as tmp:
                path = checkpoint_of_run(self.pretrain_runs[name], tmp)
                self.pretrained[name] = load_checkpoint(path, dims=self.cfg.dims)[0]
        return self.pretrained[name]


def run_strategy(r: TransferRound, fold: dict, strategy: str, pretrain_name: str) -> None:
    """Train one strategy from one pretrained model on the fold's 20 %, evaluate on its 80 %."""
    k, cfg = fold["fold"], r.cfg
    h = child_hash(round_view(cfg), fold=k, strategy=strategy, pretrain=pretrain_name)
    if store.find_run(r.exp_id, h) is not None:
        return
    tags = store.tags(family=FAMILY, source=cfg.target, target=cfg.target, fold=k, phase="transfer", strategy=strategy,
                      pretrain=pretrain_name, init_run=r.pretrain_runs.get(pretrain_name), config_hash=h, role="strategy",
                      dims=3 if cfg.dims == 3 else None)
    run = store.claim_run(r.exp_id, f"fold {k} | {strategy} | {pretrain_name}", cfg.as_dict(), tags, r.parent_id)
    if run is None:  # finished meanwhile, or live in another domgen process
        return
    if cfg.dims == 3:
        return run_strategy_volumes(r, fold, strategy, pretrain_name, run.info.run_id)
    with store.finishing(run.info.run_id), store.artifact_dir() as tmp:
        seed_everything(cfg.seed + k)
        model, overrides = prepare_strategy(strategy, r.pretrained_model(pretrain_name), cfg.model.as_dict(), cfg.strategy_train,
                                            seed=cfg.seed + k)
        train_settings = strategy_train_settings(cfg, cfg.seed + k, overrides)
        store.log_config(run.info.run_id, {"strategy_train": overrides})
        trainable, total = count_parameters(model)
        train_set = r.target.of_patients(fold["train"])
        # val_fraction 0: early stopping and best-epoch choice on the train part itself (no patient to spare)
        val_set = r.target.of_patients(fold["val"]) if fold["val"] else train_set
        result = train(model, train_set, val_set, train_settings, on_epoch=store.epoch_logger(run.info.run_id), progress=r.progress,
                       desc=f"fold {k} {strategy} {pretrain_name}")
        test = r.target.of_patients(fold["test"])
        probs = to_original_size(predict_model_size(result.model, test, device=train_settings.device), test)
        cutoff = cfg.evaluation.cutoff
        summary, per_slice = evaluate(probs, test, cutoff, r.eval_settings)
        metrics, cases = case_metrics(probs, test, cutoff, r.eval_settings, summary, per_slice)
        train_seconds = [e["train_seconds"] for e in result.history if "train_seconds" in e]
        store.log_metrics(run.info.run_id, {
            **metrics, "cutoff": cutoff, "trainable_params": trainable, "total_params": total,
            "seconds_per_epoch": result.seconds_per_epoch, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "train_seconds_per_epoch": sum(train_seconds) / len(train_seconds) if train_seconds else None})
        log_evaluation_artifacts(run.info.run_id, probs, test, cutoff, per_slice, None, tmp)
        cases.to_csv(tmp / "per_case.csv", index=False)
        store.log_artifact_file(run.info.run_id, tmp / "per_case.csv")
        log_train_patients(run.info.run_id, {cfg.target: [*fold["train"], *fold["val"]]}, r.pretrain_runs.get(pretrain_name), tmp)
        if strategy in (cfg.keep_checkpoints or ()):
            store.log_artifact_file(run.info.run_id, save_checkpoint(
                tmp / "checkpoint.pt", result.model, cfg.model.as_dict(), cutoff=cutoff, strategy=strategy, pretrain=pretrain_name,
                fold=fold, preprocessing=cfg.preprocessing.as_dict()), "model")


def strategy_unit(job: dict, r: TransferRound) -> None:
    run_strategy(r, job["fold"], job["strategy"], job["pretrain"])


# ---------------------------------------------------------------- dims 3: whole volumes, the 3D U-Net of cross-validate
@dataclass
class VolumeSet:
    """A dataset's preprocessed volumes with the patient look-ups the folds need (the 3D counterpart of SliceSet)."""

    volumes: list[Volume]
    report: dict = field(default_factory=dict)

    def patients(self) -> list[str]:
        return [v.patient_id for v in self.volumes]

    def of_patients(self, ids) -> list[Volume]:
        keep = set(ids)
        return [v for v in self.volumes if v.patient_id in keep]


def lesion_volumes(suite, name: str, cfg: FamilyConfig, progress: bool) -> list[Volume]:
    """The volumes of dataset ``name`` with training labels background 0 / lesion 1 (``truth`` keeps lesion = 2)."""
    pre = VolumePreprocessing.from_config(cfg.volume.preprocessing.as_dict())
    return [replace(v, labels=(v.labels == LESION).astype(np.uint8)) for v in load_volumes(suite, name, pre, progress, lung=False)]


def strategy_train_settings(cfg: FamilyConfig, seed: int, overrides: dict | None = None) -> TrainSettings:
    """The 2D ``train`` section with a strategy's changes (``prepare_strategy``'s overrides): what a fold run trains with."""
    return settings.build(TrainSettings, cfg.train.as_dict(), seed=seed, device=cfg.device, **(overrides or {}))


def volume_train_settings(cfg: FamilyConfig, seed: int, overrides: dict | None = None) -> VolumeTrainSettings:
    """``volume.train`` with a strategy's changes; strategy_train keys the patch trainer has not (patience, ...) are 2D-only.
    Every field comes from the validated section (filled from transfer's volume.train rows: Wang et al.'s SGD and poly),
    none from VolumeTrainSettings' defaults, which are cross-validate's (Müller et al.'s Adam on a plateau)."""
    known = {f.name for f in fields(VolumeTrainSettings)}
    section = {**cfg.volume.train.as_dict(), **{k: v for k, v in (overrides or {}).items() if k in known}}
    return VolumeTrainSettings.from_config(section, seed=seed, device=cfg.device)


def score_volumes(model, volumes: list[Volume], cfg: FamilyConfig, train_settings: VolumeTrainSettings) -> pd.DataFrame:
    """One row per test volume: DSC, NSD (``evaluation.nsd_tolerance_mm``), HD95, SEN, F1, ACC of the lesion on the case's
    own grid (``domgen.evaluation.volume_metrics``); the lesion is where its softmax probability exceeds ``evaluation.cutoff``.
    A volume with no lesion in truth and prediction has no DSC or NSD (NaN, left out of means), as in 2D."""
    # the typed config, filled from the table's rows: no fallback written here
    inference, evaluation = cfg.volume.inference, cfg.evaluation
    rows = []
    for volume in volumes:
        probs = to_case_grid(predict_volume(model, volume, train_settings.patch_size, inference.overlap, inference.sw_batch_size,
                                            train_settings.device), volume)
        pred = (probs[1] > evaluation.cutoff).astype(np.uint8) * LESION
        spacing = tuple(float(v) for v in np.diag(case_affine(volume.case))[:3])
        m = volume_metrics(pred, volume.truth, spacing, evaluation.nsd_tolerance_mm, "nan", evaluation.surface)
        # pixel-wise F1 = 2TP / (2TP + FP + FN) is the volume's DSC (Wang et al. report both)
        rows.append({"patient_id": volume.patient_id, "dataset": volume.case.dataset, "dsc": m["lesion_dsc"],
                     "nsd": m.get("lesion_nsd", np.nan), "hd95": m.get("lesion_hd95", np.nan), "sen": m["lesion_sen"],
                     "f1": m["lesion_dsc"], "acc": m["lesion_acc"], "nsd_mode": "3d"})
    return pd.DataFrame(rows)


def pretrain_volumes(exp_id: str, suite, cfg: FamilyConfig, name: str, datasets: list[str], identity: dict, h: str, progress: bool) -> str:
    """The 3D pretrained model ``name``: every patient of its datasets trains (the patch trainer monitors its training loss)."""
    parts = {d: lesion_volumes(suite, d, cfg, progress) for d in datasets}
    train_set = [v for volumes in parts.values() for v in volumes]
    train_settings = volume_train_settings(cfg, cfg.seed)
    tags = store.tags(family=FAMILY, phase="pretrain", pretrain=name, datasets="+".join(datasets), config_hash=h, role="pretrain", dims=3)
    run = store.claim_run(exp_id, f"pretrain {name} ({'+'.join(datasets)}, 3D)", identity, tags)
    if run is None:
        raise DomgenError(f"pretraining {name} is running in another domgen process; wait for it to finish, then re-run")
    with store.finishing(run.info.run_id), store.artifact_dir() as tmp:
        seed_everything(cfg.seed)
        model = build_model_3d(volume_model_config(cfg))
        trainable, total = count_parameters(model)
        store.log_config(run.info.run_id, {"volume_train": asdict(train_settings)})
        result = train_volumes(model, train_set, train_settings, on_epoch=store.epoch_logger(run.info.run_id), progress=progress,
                               desc=f"pretrain {name}")
        store.log_metrics(run.info.run_id, {"final_loss": result.history[-1]["loss"], "epochs_run": result.epochs_run,
                                            "seconds_per_iteration": result.seconds_per_iteration, "trainable_params": trainable,
                                            "total_params": total, "n_train_volumes": len(train_set)})
        splits = [{"fold": i, "train": [v.patient_id for v in parts[d]], "val": [], "test": []} for i, d in enumerate(datasets)]
        write_splits(tmp / "splits.json", splits, {"datasets": datasets, "suite": str(suite.path), "seed": cfg.seed,
                                                   "protocol": "every patient of each pretraining dataset trains (3D)"})
        store.log_artifact_file(run.info.run_id, tmp / "splits.json")
        log_train_patients(run.info.run_id, {d: [v.patient_id for v in parts[d]] for d in datasets}, None, tmp)
        store.log_artifact_file(run.info.run_id, save_checkpoint(tmp / "checkpoint.pt", result.model, pretrain=name,
                                                                    datasets=datasets), "model")
    return run.info.run_id


def run_strategy_volumes(r: TransferRound, fold: dict, strategy: str, pretrain_name: str, run_id: str) -> None:
    """``run_strategy`` on volumes: the claimed run ``run_id`` trains the fold's train (and val) patients, scores its test ones."""
    k, cfg = fold["fold"], r.cfg
    with store.finishing(run_id), store.artifact_dir() as tmp:
        seed_everything(cfg.seed + k)
        model, overrides = prepare_strategy(strategy, r.pretrained_model(pretrain_name), volume_model_config(cfg), cfg.strategy_train,
                                            seed=cfg.seed + k)
        train_settings = volume_train_settings(cfg, cfg.seed + k, overrides)
        store.log_config(run_id, {"strategy_train": overrides, "volume_train": asdict(train_settings)})
        trainable, total = count_parameters(model)
        # the patch trainer monitors its training loss (no validation set), so a fold's val patients train too
        train_set = r.target.of_patients([*fold["train"], *fold["val"]])
        result = train_volumes(model, train_set, train_settings, on_epoch=store.epoch_logger(run_id), progress=r.progress,
                               desc=f"fold {k} {strategy} {pretrain_name}")
        cases = score_volumes(result.model, r.target.of_patients(fold["test"]), cfg, train_settings)
        cutoff = cfg.evaluation.cutoff
        store.log_metrics(run_id, {
            **case_summary(cases), "cutoff": cutoff, "trainable_params": trainable, "total_params": total,
            "seconds_per_epoch": result.seconds_per_iteration * train_settings.iterations_per_epoch, "epochs_run": result.epochs_run,
            "seconds_per_iteration": result.seconds_per_iteration, "final_loss": result.history[-1]["loss"]})
        cases.to_csv(tmp / "per_case.csv", index=False)
        store.log_artifact_file(run_id, tmp / "per_case.csv")
        log_train_patients(run_id, {cfg.target: [*fold["train"], *fold["val"]]}, r.pretrain_runs.get(pretrain_name), tmp)
        if strategy in (cfg.keep_checkpoints or ()):
            store.log_artifact_file(run_id, save_checkpoint(tmp / "checkpoint.pt", result.model, cutoff=cutoff, strategy=strategy,
                                                               pretrain=pretrain_name, fold=fold), "model")


def split_file_folds(cfg: FamilyConfig, target: SliceSet) -> list[dict]:
    """The folds of ``splits_file``, checked as an inverse k-fold of the target: one sentence per fault."""
    path = cfg.splits_file
    folds = read_splits(Path(path))["folds"]  # layout, fold numbers, a patient in two parts of one fold
    if not folds:
        raise DomgenError(f"splits file {path} has no folds; give at least one fold with train and test patients")
    check_split_patients(path, cfg.target, folds, target)
    trained_in: dict[str, int] = {}
    for fold in folds:
        k = fold["fold"]
        if not fold["train"]:
            raise DomgenError(f"splits file {path}: fold {k} has no train patients; give every fold at least one train patient")
        if not fold["test"]:
            raise DomgenError(f"splits file {path}: fold {k} has no test patients; give every fold at least one test patient")
        for p in [*fold["train"], *fold["val"]]:
            if p in trained_in:
                raise DomgenError(f"splits file {path} trains on patient {p} in folds {trained_in[p]} and {k}; in the inverse "
                                  "k-fold the folds' train parts do not overlap - put each patient in one fold's train or val")
            trained_in[p] = k
    return folds


def check_inputs(cfg: FamilyConfig) -> tuple[object, list[str], list[str]]:
    """(suite, strategies, pretrained model names) with every name checked; touches no MLflow store."""
    suite = load_suite(cfg.suite)
    suite.get(cfg.target)
    strategies = strategy_names(cfg)
    pretrains = pretrain_names(cfg) if any(STRATEGIES[s].needs_pretrained for s in strategies) else []
    if not pretrains and any(STRATEGIES[s].needs_pretrained for s in strategies):
        raise DomgenError("the strategies other than scratch start from a pretrained model; pass --pretrain, e.g. --pretrain multi")
    for name in pretrains:
        if cfg.target in pretrain_datasets(suite, cfg, name):
            raise DomgenError(f"the target {cfg.target} is also a pretraining dataset of {name!r} (pretrain_datasets); the "
                              "transferred model would have seen the test patients - pick another --target or --pretrain")
    if cfg.dims == 3:
        for dataset in [cfg.target, *(d for name in pretrains for d in pretrain_datasets(suite, cfg, name))]:
            require_volume_dataset(suite.get(dataset))
        VolumeTrainSettings.from_config(cfg.volume.train.as_dict())
        VolumePreprocessing.from_config(cfg.volume.preprocessing.as_dict())
    return suite, strategies, pretrains


def run_transfer(cfg: dict | FamilyConfig, progress: bool = True, runner=None) -> str:
    """Run (or resume) one round; returns the parent run id. Tables come from ``domgen.reports.transfer_report``.

    ``cfg``: the typed config, or a dict (checked and completed as on the command line, so it finds the same runs).
    ``runner`` (``domgen.executors.get_executor``): where the pretraining runs and the fold x strategy runs go
    (``domgen.families.units``): first every pretrained model, then every strategy run."""
    cfg = typed(cfg, FAMILY)
    # every input is read and checked before any run exists, so a bad flag leaves nothing behind
    suite, strategies, pretrains = check_inputs(cfg)
    datasets = [cfg.target, *(d for name in pretrains for d in pretrain_datasets(suite, cfg, name))]
    cfg = with_content_digests(cfg, datasets)
    h = config_hash(round_view(cfg))
    exp = store.get_experiment(EXPERIMENT)
    finished = store.find_run(exp.experiment_id, h) if exp is not None else None
    if finished is not None:
        return finished.info.run_id
    # the target's files are read before any run exists: an unreadable file is one sentence and leaves nothing behind
    if cfg.dims == 3:
        target = VolumeSet(lesion_volumes(suite, cfg.target, cfg, progress))
    else:
        target = prepare_dataset(suite, cfg.target, settings.build(SlicePreprocessing, cfg.preprocessing.as_dict()), progress)
    exp_id = store.experiment_id(EXPERIMENT)
    if cfg.splits_file:
        folds = split_file_folds(cfg, target)
    else:
        folds = inverse_kfold_splits(target.patients(), k=cfg.folds, seed=cfg.seed, val_fraction=cfg.val_fraction)
    with units.shared_store(runner, EXPERIMENT):
        return _run_round(cfg, h, exp_id, suite, target, folds, strategies, pretrains, progress, runner)


def _run_round(cfg: FamilyConfig, h: str, exp_id: str, suite, target, folds: list[dict], strategies: list[str], pretrains: list[str],
               progress: bool, runner) -> str:
    parent_id, _ = store.start_or_resume_run(exp_id, f"{FAMILY} {cfg.target}", cfg.as_dict(),
                                             store.tags(family=FAMILY, source=cfg.target, target=cfg.target, config_hash=h, role="round",
                                                        dims=3 if cfg.dims == 3 else None))
    with store.finishing(parent_id):
        remote = not units.in_process(runner)
        units.run_units(runner, pretrain_unit, [{"name": f"pretrain {name}", "pretrain": name} for name in pretrains],
                        shared={"exp_id": exp_id, "suite": suite, "cfg": cfg, "progress": progress and not remote},
                        what="pretraining run", progress=progress)
        runs = {name: pretrain(exp_id, suite, cfg, name, progress) for name in pretrains}  # found now: finished above
        for name, run_id in runs.items():
            store.set_tag(parent_id, f"domgen.pretrain_run.{name}", run_id)
        with store.artifact_dir() as tmp:
            protocol = (f"splits file {cfg.splits_file}" if cfg.splits_file else
                        "inverse k-fold by patient: train 1/k, test the rest (Wang et al.)")
            write_splits(tmp / "splits.json", folds, {"dataset": cfg.target, "suite": str(suite.path), "seed": cfg.seed,
                                                      "protocol": protocol})
            store.log_artifact_file(parent_id, tmp / "splits.json")
        r = TransferRound(cfg, exp_id, parent_id, target, settings.build(EvaluationSettings, cfg.evaluation.as_dict()), runs, progress)
        jobs = [{"name": f"fold {fold['fold']} | {strategy} | {name}", "fold": fold, "strategy": strategy, "pretrain": name}
                for fold in folds for strategy in strategies
                for name in (pretrains if STRATEGIES[strategy].needs_pretrained else [NO_PRETRAIN])]
        units.run_units(runner, strategy_unit, jobs, shared=units.for_units(runner, r), what="strategy run",
                        progress=progress)
        log_round_tables(FAMILY, parent_id)
    return parent_id
