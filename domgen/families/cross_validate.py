"""Cross-validation on limited data with a 3D U-Net (Müller, Soto-Rey, Kramer: "Robust chest CT image
segmentation of COVID-19 lung infection based on limited data", the MIScnn pipeline).

k-fold by patient on the source dataset: each fold model trains on k-1 parts and is scored on its held-out
part (the validation fold) and on the external dataset, as the paper reports; the fold models' averaged
softmax is scored on the external set too (the ensemble: domgen's addition, the paper leaves ensembling to
future work). ``--ablation`` repeats this over the profile's grid (k x preprocessing on/off x augmentation
on/off, one round per combination), a superset of the paper's sensitivity analysis.

MLflow (experiment ``domgen-cross-validate``): a parent run per round (role ``round``), a child per fold
(role ``fold``, with model/checkpoint.pt) and one for the ensemble (role ``ensemble``); each child logs
per_volume.csv (one row per volume and evaluation set) and predicted label maps as NIfTI on the source grid.
Every run is found again by its config hash, so re-running the same command resumes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from domgen.tracking.identity import child_hash, config_hash
from domgen.data.registry import load_suite
from domgen.errors import DomgenError
from domgen.evaluation.volume_metrics import volume_metrics
from domgen.families import log_round_tables, units
from domgen.families.common import load_volumes
from domgen.models.checkpoint import load_checkpoint, save_checkpoint
from domgen.models.unet3d import build_model_3d
from domgen.preprocessing.splits import kfold_splits, write_splits
from domgen.preprocessing.volume import Volume, VolumePreprocessing, case_affine, to_case_grid, to_zyx
from domgen.tracking import mlflow_store as store
from domgen.training.volume_trainer import VolumeTrainSettings, check_patch_fits, predict_volume, train_volumes
from domgen.typed_config import FamilyConfig, typed

FAMILY = "cross-validate"
EXPERIMENT = "domgen-cross-validate"
CHECKPOINT = "model/checkpoint.pt"
VALIDATION, EXTERNAL = "validation", "external"


@dataclass
class Settings:
    """The resolved sections of a (typed, so checked and complete) cross-validate config."""

    pre: VolumePreprocessing
    train: VolumeTrainSettings
    overlap: float
    sw_batch_size: int
    tolerance_mm: float
    empty: str
    surface: bool

    @classmethod
    def from_config(cls, cfg: FamilyConfig) -> "Settings":
        inference, evaluation = cfg.inference, cfg.evaluation
        train = VolumeTrainSettings.from_config(cfg.train.as_dict(), seed=cfg.seed, device=cfg.device)
        return cls(VolumePreprocessing.from_config(cfg.preprocessing.as_dict()), train, inference.overlap, inference.sw_batch_size,
                   evaluation.nsd_tolerance_mm, evaluation.empty, evaluation.surface)


@dataclass
class Round:
    cfg: FamilyConfig
    settings: Settings
    exp_id: str
    parent_id: str
    source: list[Volume]
    external: list[Volume]
    progress: bool
    external_probs: dict[int, list[np.ndarray]] = field(default_factory=dict)  # fold -> case-grid probabilities


def check_datasets(suite, cfg: FamilyConfig) -> None:
    source, external = cfg.source, cfg.external
    suite.get(source)
    if external is not None:
        suite.get(external)
        if external == source:
            raise DomgenError(f"--external {external} is the source dataset; choose another dataset of the suite as the external test set")


def fold_of(cfg: FamilyConfig, patients: list[str]) -> list[dict]:
    # k-fold by patient; the held-out part ("test" in splits.json) is the fold's validation set (Müller et al.)
    return kfold_splits(patients, k=cfg.folds, seed=cfg.seed, val_fraction=0.0)


def score(probs_case_grid: np.ndarray, volume: Volume, s: Settings) -> dict[str, float]:
    case = volume.case
    pred = probs_case_grid.argmax(0)
    truth = volume.truth
    spacing = tuple(float(v) for v in np.diag(case_affine(case))[:3])
    return volume_metrics(pred, truth, spacing, s.tolerance_mm, s.empty, s.surface)


def source_affine(volume: Volume) -> np.ndarray:
    """The source file's affine when it is NIfTI (origin and orientation kept), else diag(spacing)."""
    first = volume.case.source_files[0] if volume.case.source_files else ""
    if first.endswith((".nii", ".nii.gz")):
        try:
            return nib.load(first).affine
        except (OSError, nib.filebasedimages.ImageFileError):
            pass
    return case_affine(volume.case)


def write_prediction(folder: Path, volume: Volume, probs_case_grid: np.ndarray) -> Path:
    """Label map 0/1/2 as NIfTI on the source grid, with the source geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(probs_case_grid.argmax(0).astype(np.uint8), source_affine(volume))
    img.header.set_xyzt_units("mm")
    path = folder / f"{volume.patient_id}.nii.gz"
    nib.save(img, path)
    return path


def evaluate_set(model, volumes: list[Volume], s: Settings, name: str, tmp: Path, save: bool) -> tuple[list[dict], list[np.ndarray]]:
    rows, probs = [], []
    for volume in volumes:
        p = to_case_grid(predict_volume(model, volume, s.train.patch_size, s.overlap, s.sw_batch_size, s.train.device), volume)
        rows.append({"set": name, "dataset": volume.case.dataset, "patient_id": volume.patient_id, **score(p, volume, s)})
        probs.append(p)
        if save:
            write_prediction(tmp / "predictions" / name, volume, p)
    return rows, probs


def medians(rows: list[dict], prefix: str) -> dict[str, float]:
    """Median per metric over volumes, the paper's summary (``<prefix>_<region>_<metric>``)."""
    df = pd.DataFrame(rows)
    out = {}
    for column in df.columns:
        if column.startswith(("lung_", "lesion_")):
            values = pd.to_numeric(df[column], errors="coerce").dropna()
            if len(values):
                out[f"{prefix}_{column}"] = float(values.median())
    return out


def log_set_results(run_id: str, rows: list[dict], tmp: Path) -> None:
    pd.DataFrame(rows).to_csv(tmp / "per_volume.csv", index=False)
    store.log_artifact_file(run_id, tmp / "per_volume.csv")
    if (tmp / "predictions").is_dir():
        MlflowClient().log_artifacts(run_id, str(tmp / "predictions"), "predictions")


def train_fold(r: Round, fold: dict) -> None:
    """Train fold ``k`` (unless finished), score it on its validation part and on the external set."""
    k, cfg, s = fold["fold"], r.cfg, r.settings
    h = child_hash(cfg.as_dict(), fold=k, role="fold")
    if store.find_run(r.exp_id, h) is not None:
        return
    tags = store.tags(family=FAMILY, source=cfg.source, external=cfg.external, fold=k, config_hash=h, role="fold")
    with store.tracked_run(r.exp_id, f"fold {k}", cfg.as_dict(), tags, r.parent_id) as run, store.artifact_dir() as tmp:
        torch.manual_seed(cfg.seed + k)
        model = build_model_3d(cfg.model.as_dict())
        train_set = [v for v in r.source if v.patient_id in set(fold["train"])]
        settings = replace(s.train, seed=cfg.seed + k)
        result = train_volumes(model, train_set, settings, on_epoch=store.epoch_logger(run.info.run_id), progress=r.progress,
                               desc=f"fold {k}")
        save = cfg.save_predictions
        validation = [v for v in r.source if v.patient_id in set(fold["test"])]
        rows, _ = evaluate_set(result.model, validation, s, VALIDATION, tmp, save)
        metrics = medians(rows, "val")
        if r.external:
            ext_rows, probs = evaluate_set(result.model, r.external, s, EXTERNAL, tmp, save)
            rows += ext_rows
            metrics.update(medians(ext_rows, "ext"))
            r.external_probs[k] = probs
        store.log_metrics(run.info.run_id, {**metrics, "epochs_run": result.epochs_run, "seconds_per_iteration": result.seconds_per_iteration,
                                            "n_train_volumes": len(train_set), "final_loss": result.history[-1]["loss"]})
        log_set_results(run.info.run_id, rows, tmp)
        store.log_artifact_file(run.info.run_id, save_checkpoint(tmp / "checkpoint.pt", result.model, fold=fold), "model")


def fold_unit(job: dict, r: Round) -> None:
    train_fold(r, job["fold"])


def fold_probabilities(r: Round, k: int) -> list[np.ndarray]:
    """The external-set probabilities of fold ``k``: from this session, or from its logged checkpoint on resume."""
    if k not in r.external_probs:
        run = store.find_run(r.exp_id, child_hash(r.cfg.as_dict(), fold=k, role="fold"))
        with store.artifact_dir() as tmp:
            model = load_checkpoint(store.download_artifact(run.info.run_id, CHECKPOINT, tmp), dims=3)[0]
        s = r.settings
        r.external_probs[k] = [to_case_grid(predict_volume(model, v, s.train.patch_size, s.overlap, s.sw_batch_size, s.train.device), v)
                               for v in r.external]
    return r.external_probs[k]


def evaluate_ensemble(r: Round, folds: list[dict]) -> None:
    """The fold models' softmax outputs averaged on the external set (domgen's addition, not Müller et al.'s protocol)."""
    cfg = r.cfg
    h = child_hash(cfg.as_dict(), role="ensemble")
    if not r.external or store.find_run(r.exp_id, h) is not None:
        return
    tags = store.tags(family=FAMILY, source=cfg.source, external=cfg.external, fold="ensemble", config_hash=h, role="ensemble")
    with store.tracked_run(r.exp_id, "ensemble", cfg.as_dict(), tags, r.parent_id) as run, store.artifact_dir() as tmp:
        per_fold = [fold_probabilities(r, fold["fold"]) for fold in folds]
        rows = []
        for i, volume in enumerate(r.external):
            mean = np.mean([probs[i] for probs in per_fold], axis=0)
            rows.append({"set": EXTERNAL, "dataset": volume.case.dataset, "patient_id": volume.patient_id, **score(mean, volume, r.settings)})
            if cfg.save_predictions:
                write_prediction(tmp / "predictions" / EXTERNAL, volume, mean)
        store.log_metrics(run.info.run_id, {**medians(rows, "ext"), "n_models": len(per_fold)})
        log_set_results(run.info.run_id, rows, tmp)


def run_cross_validate(cfg: dict | FamilyConfig, progress: bool = True, runner=None) -> str:
    """Run (or resume) one round; returns the parent run id. Tables: ``domgen.reports.cross_validate_report``.

    ``cfg``: the typed config, or a dict (checked and completed as on the command line, so it finds the same runs).
    ``runner`` (``domgen.executors.get_executor``): where the folds run (``domgen.families.units``)."""
    # the ablation grid does not define a round: a round of the grid is the same run as the plain command
    cfg = typed(cfg, FAMILY).without("ablation")
    exp_id, h, finished = store.round_lookup(EXPERIMENT, cfg.as_dict())
    if finished:
        return finished
    # every input is read and checked before any run exists, so a bad flag leaves nothing behind
    settings = Settings.from_config(cfg)
    model = build_model_3d(cfg.model.as_dict())
    check_patch_fits(settings.train.patch_size, model.divisor)
    suite = load_suite(cfg.suite)
    check_datasets(suite, cfg)
    source = load_volumes(suite, cfg.source, settings.pre, progress)
    external = load_volumes(suite, cfg.external, settings.pre, progress) if cfg.external else []
    folds = fold_of(cfg, [v.patient_id for v in source])
    with units.shared_store(runner, EXPERIMENT):
        return _run_round(cfg, exp_id, h, settings, suite, source, external, folds, progress, runner)


def _run_round(cfg: FamilyConfig, exp_id: str, h: str, settings: Settings, suite, source: list[Volume], external: list[Volume],
               folds: list[dict], progress: bool, runner) -> str:
    parent_id, _ = store.start_or_resume_run(exp_id, f"cross-validate {cfg.source} -> {cfg.external} (k={cfg.folds})", cfg.as_dict(),
                                             store.tags(family=FAMILY, source=cfg.source, external=cfg.external, folds=cfg.folds,
                                                        config_hash=h, role="round"))
    with store.finishing(parent_id):
        with store.artifact_dir() as tmp:
            write_splits(tmp / "splits.json", folds, {"dataset": cfg.source, "suite": str(suite.path), "seed": cfg.seed,
                                                      "protocol": "k-fold by patient; 'test' is each fold's validation part (Müller et al.)"})
            store.log_artifact_file(parent_id, tmp / "splits.json")
        r = Round(cfg, settings, exp_id, parent_id, source, external, progress)
        # the folds are independent: one unit each, in this process or in the executor's workers
        units.run_units(runner, fold_unit, [{"name": f"fold {fold['fold']}", "fold": fold} for fold in folds],
                        shared=units.for_units(runner, r), what="fold", progress=progress)
        evaluate_ensemble(r, folds)
        log_round_tables(FAMILY, parent_id)
    return parent_id


def ablation_configs(cfg: FamilyConfig) -> list[FamilyConfig]:
    """The full grid of the profile's ``ablation`` section (k x preprocessing x augmentation), one config each."""
    grid = cfg.ablation
    axes = (grid.folds or [cfg.folds], grid.preprocessing or [True], grid.augmentation or [True])
    return [cfg.replace(**{"folds": k, "preprocessing.enabled": pre, "train.augment": aug}) for k, pre, aug in itertools.product(*axes)]


def run_ablation(cfg: dict | FamilyConfig, progress: bool = True, runner=None) -> list[str]:
    """One round per combination of the ablation grid; returns their parent run ids (finished ones are reused)."""
    configs = ablation_configs(typed(cfg, FAMILY))
    for child in configs:  # check the whole grid before training anything
        Settings.from_config(child)
    return [run_cross_validate(child, progress, runner) for child in configs]
