"""What every experiment family does: check inputs before MLflow, prepare datasets, hash runs by content,
open (or resume) the round's parent run, and end it.

A run's identity is the hash of its resolved config with every path replaced by the contents it points
at: the suite by the listing of the dataset files it uses (relative names, sizes, SHA-256 of each file,
and how they are read - not where they lie), a splits file and an init checkpoint by their SHA-256. Moving
a dataset or renaming a checkpoint keeps the hash; changing one file changes it. ``train.precision: auto`` enters as
the precision it resolves to on the machine (``hashed_view``), so bf16 and fp32 runs of one command never mix.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from domgen.tracking.identity import child_hash, config_hash, file_digest  # noqa: F401 - the families' run identity
from domgen.data.registry import load_cases, load_suite
from domgen.errors import DomgenError
from domgen.preprocessing.slices import SlicePreprocessing, SliceSet, prepare_slices
from domgen.tracking import mlflow_store as store
from domgen.typed_config import FamilyConfig

CHECKPOINT = "model/checkpoint.pt"
# spec fields that say where a dataset lies, not what it is: left out of its digest
_LOCATION_FIELDS = ("name", "root", "suite_file", "description")


def dataset_digest(spec) -> str:
    """The contents of one dataset: every file under its root (relative name, SHA-256) and how it is read."""
    root = Path(spec.root)
    if not root.is_dir():
        raise DomgenError(f"dataset {spec.name}: folder {root} does not exist; fix `root` in the suite file or run `domgen data check {spec.name}`")
    listing = [(p.relative_to(root).as_posix(), file_digest(p)) for p in sorted(root.rglob("*")) if p.is_file()]
    how = {k: v for k, v in asdict(spec).items() if k not in _LOCATION_FIELDS}
    blob = json.dumps({"files": listing, "spec": how}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def suite_digest(suite_name: str, datasets: list[str]) -> dict[str, str]:
    """``{dataset: digest}`` of the suite datasets a run reads."""
    suite = load_suite(suite_name)
    return {name: dataset_digest(suite.get(name)) for name in sorted(set(datasets))}


# config keys that name a place; with ``content_digest`` attached, their contents stand in for them in hashes
PATH_KEYS = ("suite", "splits_file", "init_checkpoint")


def content_digest(cfg: dict, datasets: list[str]) -> dict:
    """What the path-valued settings point at: ``{"datasets": {name: digest}, "splits_file": sha, "init_checkpoint": sha}``."""
    out: dict = {}
    if cfg.get("suite") is not None and datasets:
        out["datasets"] = suite_digest(str(cfg["suite"]), datasets)
    for key in PATH_KEYS[1:]:
        if cfg.get(key):
            out[key] = file_digest(cfg[key])
    return out


def with_content_digests(cfg: FamilyConfig, datasets: list[str]) -> FamilyConfig:
    """``cfg`` with ``content_digest`` attached (logged with the params; ``hashed_view`` uses it)."""
    return cfg.attach(content_digest=content_digest(cfg.as_dict(), datasets))


# train.* keys that choose how batches reach the model, not what it computes (the numbers are the same either way)
LOADER_KEYS = ("loader_workers", "pin_memory")


def _as_trained(cfg: dict) -> dict:
    """``cfg`` (a copy where needed) with its train sections as they train: without ``LOADER_KEYS`` (so older runs keep
    their hashes) and with ``precision: auto`` replaced by what this machine resolves it to (bf16 on a CPU with native
    bf16, else fp32): two machines that would compute different numbers never share a run."""
    from domgen.training.trainer import resolve_precision  # torch: only once a run is hashed, never for a flag check

    device = str(cfg.get("device") or "cpu")

    def as_trained(section):
        if not isinstance(section, dict):
            return section
        out = {k: v for k, v in section.items() if k not in LOADER_KEYS}
        if out.get("precision") == "auto":
            out["precision"] = resolve_precision("auto", device)
        return out

    out = dict(cfg)
    if "train" in out:
        out["train"] = as_trained(out["train"])
    if isinstance(out.get("pretraining"), dict) and "train" in out["pretraining"]:
        out["pretraining"] = {**out["pretraining"], "train": as_trained(out["pretraining"]["train"])}
    if isinstance(out.get("strategy_train"), dict):
        out["strategy_train"] = {k: as_trained(v) for k, v in out["strategy_train"].items()}
    return out


def hashed_view(cfg: dict) -> dict:
    """What a hash should see: with ``content_digest`` attached, the paths are left out (their contents are in); the
    loader settings (``LOADER_KEYS``) never enter; ``train.precision: auto`` enters as the precision it resolves to.
    Every family hashes through here (or takes its train sections from here)."""
    cfg = _as_trained(cfg)
    if "content_digest" not in cfg:
        return cfg
    return {k: v for k, v in cfg.items() if k not in PATH_KEYS}


def identity(cfg: dict, datasets: list[str]) -> dict:
    """``cfg`` as hashed: ``suite`` -> the digests of ``datasets``; ``splits_file``, ``init_checkpoint`` -> their SHA-256."""
    out = copy.deepcopy(cfg)
    if cfg.get("suite") is not None and datasets:
        out["suite"] = suite_digest(str(cfg["suite"]), datasets)
    for key in ("splits_file", "init_checkpoint"):
        if cfg.get(key):
            out[key] = {"sha256": file_digest(cfg[key])}
    return out


# config keys naming suite datasets, per family ("source" may be a comma list or "all")
DATASET_KEYS = {"leave-one-out": ("source", "targets"), "transfer": ("target",), "benchmark": ("train_dataset", "test_dataset"),
                "cross-validate": ("source", "external")}


def dataset_names(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(v).strip() for v in items if str(v).strip() and str(v).strip() != "all"]


def check_datasets(cfg: FamilyConfig) -> None:
    """Every dataset the config names exists in its suite: one sentence before any MLflow run or file."""
    keys = DATASET_KEYS.get(cfg.family, ())
    if cfg.suite is None or not keys:
        return
    suite = load_suite(cfg.suite)
    for key in keys:
        for name in dataset_names(getattr(cfg, key)):
            suite.get(name)


def prepare_dataset(suite, name: str, pre: SlicePreprocessing, progress: bool) -> SliceSet:
    """Read one suite dataset and make its slices (the one place a family turns files into a SliceSet)."""
    cases = load_cases(suite.get(name), progress=progress)
    if not cases:
        raise DomgenError(f"dataset {name} of suite {suite.path} has no cases; run `domgen data check {name}`")
    slices = prepare_slices(cases, pre)
    if not len(slices):
        raise DomgenError(f"every slice of dataset {name} was dropped by preprocessing.keep_slices={pre.keep_slices} "
                          f"(lung-mask provider {pre.lung_mask} found no lung?); run `domgen data check {name}` and use "
                          "--set preprocessing.keep_slices=all or another --lung-mask")
    return slices


def checkpoint_of_run(run_id: str, dest: Path) -> Path:
    """The ``model/checkpoint.pt`` artifact of a domgen run."""
    store.get_run(run_id)
    try:
        return store.download_artifact(run_id, CHECKPOINT, dest)
    except Exception as exc:  # MLflow raises several types for a missing artifact
        raise DomgenError(f"run {run_id} has no {CHECKPOINT} artifact ({type(exc).__name__}); pass the id of a run that saved "
                          "its model (see the MLflow UI) or --checkpoint PATH") from None


def check_split_patients(path, dataset: str, folds: list[dict], slices: SliceSet) -> None:
    """A splits file may name only patients of ``dataset``, and none whose slices preprocessing dropped."""
    per_patient = slices.report.get("per_patient") or {p: [1, 1] for p in slices.patients()}
    named = sorted({p for f in folds for part in ("train", "val", "test") for p in f[part]})
    unknown = [p for p in named if p not in per_patient]
    if unknown:
        raise DomgenError(f"splits file {path} names patients not in {dataset} ({', '.join(unknown[:3])}); "
                          f"use the patient ids of {dataset} (see a round's splits.json) or fix the file")
    emptied = [p for p in named if per_patient[p][0] == 0]
    if emptied:
        raise DomgenError(f"splits file {path} names patient {emptied[0]} of {dataset}, but all its slices were dropped by "
                          f"preprocessing.keep_slices={slices.report.get('rule')}; use --set preprocessing.keep_slices=all, "
                          "another --lung-mask, or remove the patient from the file")


TRAIN_PATIENTS = "train_patients.json"  # per training run: {"datasets": {dataset: [patients]}, "init_run": run id or null}


def _own_train_patients(run, tmp: Path) -> dict[str, list[str]]:
    """The patients one run trained (or early-stopped) on: its ``train_patients.json``; for transfer runs logged before
    that record, their ``splits.json`` (pretraining) or the round's fold (strategy runs); {} for other runs."""
    tags = run.data.tags
    (tmp / run.info.run_id).mkdir(exist_ok=True)
    fetch = lambda run_id, name: json.loads(store.download_artifact(run_id, name, tmp / run.info.run_id).read_text())  # noqa: E731
    try:
        return fetch(run.info.run_id, TRAIN_PATIENTS)["datasets"]
    except Exception:  # no such artifact: MLflow raises several types
        pass
    try:
        if tags.get("domgen.family") == "transfer" and tags.get("domgen.phase") == "pretrain":
            splits = fetch(run.info.run_id, "splits.json")
            return {d: f["train"] + f["val"] for d, f in zip(splits["meta"]["datasets"], splits["folds"])}
        if tags.get("domgen.family") == "transfer" and tags.get("domgen.phase") == "transfer":
            folds = fetch(tags["mlflow.parentRunId"], "splits.json")["folds"]
            fold = next(f for f in folds if str(f["fold"]) == tags.get("domgen.fold"))
            return {tags["domgen.target"]: fold["train"] + fold["val"]}
    except Exception:
        pass
    return {}


def trained_patients(run_id: str) -> dict[str, set[str]]:
    """``{dataset: patients}`` a run's model has seen in training or early stopping, following the chain of runs it
    started from (a transfer fold model, then its pretrained model)."""
    seen: dict[str, set[str]] = {}
    visited = set()
    with store.artifact_dir() as tmp:
        while run_id and run_id not in visited:
            visited.add(run_id)
            run = store.get_run(run_id, "--init-run")
            for dataset, patients in _own_train_patients(run, tmp).items():
                seen.setdefault(dataset, set()).update(patients)
            run_id = run.data.tags.get("domgen.init_run")
    return seen


def open_round(experiment: str, name: str, cfg: dict, hashed: dict, round_tags: dict) -> tuple[str, str, str, bool]:
    """The common preamble: (experiment id, round hash, parent run id, finished already).

    A finished round with the same hash is returned as is; an interrupted one is reopened with its stale
    children closed, so only they are redone.
    """
    exp_id = store.experiment_id(experiment)
    h = config_hash(hashed)
    parent_id, finished = store.start_or_resume_run(exp_id, name, cfg, {**round_tags, **store.tags(config_hash=h, role="round")})
    return exp_id, h, parent_id, finished


def export_run(run_id: str, fmt: str, out: Path | None = None) -> Path:
    """Export a run's ``model/checkpoint.pt`` (default ``exports/<run>-<arch>-<encoder><ext>``); see ``domgen.models.export``."""
    from domgen.models.checkpoint import load_checkpoint
    from domgen.models.export import FORMATS, export_checkpoint

    if fmt not in FORMATS:
        raise DomgenError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    with store.artifact_dir() as tmp:
        checkpoint = checkpoint_of_run(run_id, tmp)
        if out is None:
            _, ckpt = load_checkpoint(checkpoint)
            out = Path("exports") / f"{run_id}-{ckpt['model']['arch']}-{ckpt['model']['encoder']}{FORMATS[fmt]}"
        return export_checkpoint(checkpoint, fmt, Path(out))


def require_volume_dataset(spec):
    """``spec`` when its cases can be read as 3D volumes; one sentence for a folder of unrelated 2D slices."""
    if spec.format == "slices":
        raise DomgenError(f"dataset '{spec.name}' is a folder of unrelated 2D slices (format slices), which cannot be used as 3D "
                          "volumes; choose a nifti or dicom dataset")
    return spec


def load_volumes(suite, name: str, pre, progress: bool, lung: bool = True) -> list:
    """Every case of dataset ``name`` preprocessed as a ``Volume`` (``pre``: a ``VolumePreprocessing``); unrelated
    slices and unknown spacing are refused. ``lung=False``: no lung class (labels background 0 / lesion 2), for
    models of the lesion alone, and no lung-mask provider runs."""
    from domgen.preprocessing.lung_mask import get_lung_mask_provider
    from domgen.preprocessing.volume import prepare_volume, require_volume

    spec = require_volume_dataset(suite.get(name))
    cases = load_cases(spec, progress=progress)
    for case in cases:
        require_volume(case)
    provider = get_lung_mask_provider(pre.lung_mask) if lung else (lambda case: None)
    return [prepare_volume(case, pre, provider) for case in cases]
