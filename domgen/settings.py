"""Every setting of every experiment family in one table: type, default, allowed values, which families.

Like DomainBed's ``hparams_registry``: a profile (``experiments/<family>/*.yaml``), its ``--set`` overrides
and the command-line flags are merged into one nested dict and checked here once, by ``validate``, before
any file is written or any MLflow run exists. A wrong value is one ``DomgenError`` sentence naming the
key (and its flag), the value and what is allowed. Adding a family's fields is adding rows to ``SETTINGS``.

Choices that come from a registry (losses, normalisations, lung-mask providers, architectures, encoders,
transfer strategies) are read from that registry when checked, so the table never goes stale.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from domgen.errors import DomgenError

LOO, TRANSFER, BENCHMARK, CV = "leave-one-out", "transfer", "benchmark", "cross-validate"
ALL = (LOO, TRANSFER, BENCHMARK)  # the 2D families
EVERY = (*ALL, CV)
TRAINING = (LOO, TRANSFER, BENCHMARK)
# commands whose flags have rows but no profile
CONFIDENCE, REPORT, EXPORT, GENERATE, UI = "confidence", "report", "export", "generate", "ui"


# ---------------------------------------------------------------- registries read when checked
def _registry(target: str):
    """``module:attribute`` of a registry above settings: the object, imported only when a value is checked.
    Named by string so settings (the floor every layer reads) never imports a layer above it."""
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def _names(target: str) -> Callable[[], list[str]]:
    """The names of the registry at ``target`` (a dict, or a function returning names), read when checked."""
    def names() -> list[str]:
        found = _registry(target)
        return list(found() if callable(found) else found)
    return names


_losses = _names("domgen.training.trainer:LOSSES")
_augmentations = _names("domgen.training.augment:AUGMENTATIONS")
_normalisations = _names("domgen.preprocessing.intensity:NORMALISATIONS")
_lung_masks = _names("domgen.preprocessing.lung_mask:LUNG_MASK_PROVIDERS")
_architectures = _names("domgen.models:ARCHITECTURES")
_encoders = _names("domgen.models:encoder_names")
_empty_conventions = _names("domgen.evaluation.metrics:EMPTY_CONVENTIONS")
_strategies = _names("domgen.methods.transfer:STRATEGIES")
_mixes = _names("domgen.methods.pseudolabel:MIXES")
_confidence_scores = _names("domgen.methods.confidence:CONFIDENCE_SCORES")

# the benchmark grid's experiments: what each segments and whether the input is multiplied by the lung mask
# (Bizopoulos et al.); here, below the family, because the settings check ``grid.experiments`` against them
BENCHMARK_EXPERIMENTS: dict[str, dict] = {
    "lung": {"target": "lung", "mask_to_lung": False},
    "lesion-a": {"target": "lesion", "mask_to_lung": False},
    "lesion-b": {"target": "lesion", "mask_to_lung": True},
}
# grid value -> build_model's encoder_weights
BENCHMARK_WEIGHTS = {"random": "none", "imagenet": "imagenet"}


def _experiments():
    return [f.experiment for f in _registry("domgen.families:FAMILIES").values()]


_export_formats = _names("domgen.models.export:FORMATS")


def _benchmark_experiments():
    return list(BENCHMARK_EXPERIMENTS)


def _benchmark_weights():
    return list(BENCHMARK_WEIGHTS)


@dataclass(frozen=True)
class Setting:
    """One profile field. ``kind``: int | float | bool | switch (true, false or auto) | choice | str | names | path |
    mapping | floats | ints | bools."""

    key: str
    kind: str
    default: Any
    families: tuple[str, ...]
    help: str
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    flag: str | None = None  # the command-line flag that sets it, named in errors
    ignore_case: bool = False  # choices compared case-insensitively, stored as the registry spells them

    def allowed(self) -> list[str]:
        return list(self.choices() if callable(self.choices) else self.choices or [])

    def describe(self) -> str:
        """What is allowed, in words (for errors and the README table)."""
        if self.kind in ("choice", "names"):
            allowed = self.allowed()
            text = ("one of " if self.kind == "choice" else "names (a list or comma-separated) from ") + (
                ", ".join(allowed) if len(allowed) <= 12 else ", ".join(allowed[:12]) + f", ... ({len(allowed)} in all)")
        elif self.kind in ("int", "float", "floats", "ints"):
            noun = {"int": "an integer", "float": "a number", "floats": "a list of numbers", "ints": "a list of integers"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "switch":
            text = "true, false or auto"
        elif self.kind == "bools":
            text = "a list of true/false"
        elif self.kind == "path":
            text = "a path to an existing file"
        elif self.kind == "mapping":
            text = "a mapping of names"
        else:
            text = "a text value"
        return text + (" (or null)" if self.nullable else "")


def S(key, kind, default, families, help, **kw) -> Setting:  # noqa: N802 - a table row
    return Setting(key, kind, default, tuple(families), help, **kw)


_PROB = {"low": 0.0, "high": 1.0}
# Müller et al.'s 3D set-up (cross-validate, and transfer --dims 3): tuples, so a dataclass field may take them as defaults
_MULLER_FEATURES = (32, 64, 128, 256, 512)
_MULLER_CLIP_HU = (-1250.0, 250.0)
_MULLER_SPACING = (1.58, 1.58, 2.70)
_MULLER_PATCH = (160, 160, 80)
SETTINGS: list[Setting] = [
    # ------------------------------------------------------------ every family
    S("family", "str", None, EVERY, "the family this profile belongs to"),
    S("profile", "str", None, EVERY, "the profile's name (set from the file name)"),
    S("suite", "str", "synthetic", EVERY, "'synthetic' or a path to a suite YAML", nullable=True, flag="--suite"),
    S("seed", "int", 0, EVERY, "base seed (fold k uses seed + k)", low=0, flag="--seed"),
    S("device", "choice", "cpu", EVERY, "where to train", choices=("cpu", "cuda"), flag="--device"),
    S("threads", "int", None, ALL, "torch threads per trial (null: the cores divided by the workers)", low=1, nullable=True),
    # preprocessing
    S("preprocessing.image_size", "int", 64, ALL, "slice side in pixels after resizing; a multiple of what the architecture needs",
      low=8),
    S("preprocessing.lung_mask", "choice", "threshold", ALL, "lung-mask provider", choices=_lung_masks, flag="--lung-mask"),
    S("preprocessing.lungmask_weights", "path", None, ALL, "weights file for the lungmask provider", nullable=True,
      flag="--lungmask-weights"),
    S("preprocessing.normalisation", "choice", "zscore", ALL, "intensity normalisation", choices=_normalisations),
    S("preprocessing.min_lung_pixels", "int", 1, ALL, "keep slices with at least this many lung pixels", low=0),
    S("preprocessing.mask_to_lung", "bool", True, (LOO, TRANSFER), "zero the input outside the lungs"),
    S("preprocessing.target", "choice", "lesion", (LOO, TRANSFER), "what is segmented", choices=("lesion", "lung")),
    S("preprocessing.keep_slices", "choice", "lung", (LOO,), "which slices enter the sets", choices=("all", "lung", "lesion"),
      flag="--keep-slices"),
    # train
    S("train.epochs", "int", 6, ALL, "maximum epochs", low=1),
    S("train.batch_size", "int", 16, ALL, "slices per batch", low=1),
    S("train.lr", "float", 1e-3, ALL, "Adam learning rate", low=0.0, low_open=True),
    S("train.patience", "int", 5, ALL, "epochs without improvement before stopping (null: never stop early)", low=1, nullable=True),
    S("train.loss", "choice", "dice+bce", ALL, "training loss", choices=_losses),
    S("train.select_by", "choice", "val_dsc", ALL, "which epoch is kept (last: the final epoch, nothing chosen on the "
      "validation set; with train.patience null it needs none)", choices=("val_dsc", "val_loss", "last")),
    S("train.augment", "choice", "enshaei", ALL, "augmentation recipe", choices=_augmentations),
    S("train.schedule", "choice", "constant", ALL, "learning-rate schedule", choices=("constant", "poly")),
    S("train.poly_power", "float", 0.9, ALL, "power of the poly schedule", low=0.0, low_open=True),
    S("train.optimizer", "choice", "adam", ALL, "optimiser", choices=("adam", "sgd")),
    S("train.momentum", "float", 0.99, ALL, "SGD momentum", low=0.0, high=1.0, high_open=True),
    S("train.nesterov", "bool", True, ALL, "SGD with Nesterov momentum"),
    S("train.precision", "choice", "fp32", ALL, "arithmetic precision of training (fp16: CUDA only, with a gradient scaler)",
      choices=("fp32", "bf16", "fp16", "auto")),
    S("train.channels_last", "bool", False, ALL, "channels-last memory format"),
    S("train.loader_workers", "int", 0, ALL, "DataLoader worker processes preparing batches (0: the training process; "
      "the numbers do not change)", low=0),
    S("train.pin_memory", "switch", "auto", ALL, "page-locked batches, copied to the GPU without blocking (auto: on with cuda)"),
    S("train.device_data", "bool", False, ALL, "slices kept on the device and augmented there in batches (same distribution, other numbers)"),
    S("train.compile", "bool", False, ALL, "the training forward and backward through torch.compile (eager where it cannot compile)"),
    # evaluation
    S("evaluation.empty", "choice", "both-empty-one", ALL, "per-slice ratio when its denominator is 0", choices=_empty_conventions),
    S("evaluation.dice_eps", "float", 0.0, ALL, "eps added to the Dice's denominator (Bizopoulos et al. Eq. 4)", low=0.0),
    S("evaluation.nsd_tolerance_mm", "float", 3.0, (LOO, TRANSFER), "NSD tolerance in mm", low=0.0, low_open=True),
    S("evaluation.surface", "bool", True, (LOO, TRANSFER), "compute NSD and HD95"),
    S("evaluation.cutoff_candidates", "floats", None, (LOO,), "cut-offs tried on the in-domain test set (null: 0.05..0.95)",
      low=0.0, high=1.0, low_open=True, high_open=True, nullable=True),
    S("evaluation.cutoff", "float", 0.5, (TRANSFER,), "probability cut-off", low=0.0, high=1.0, low_open=True, high_open=True),
    S("evaluation.threshold", "float", 0.5, (BENCHMARK,), "probability cut-off", low=0.0, high=1.0, low_open=True, high_open=True),
    S("evaluation.resolution", "choice", "model", (BENCHMARK,), "score at the model's size or the original", choices=("model", "original")),
    S("evaluation.sample_slices", "int", 4, (BENCHMARK,), "test slices kept for the report's mask grid", low=0),
    # model
    S("model.arch", "choice", "linknet", (LOO, TRANSFER), "smp architecture", choices=_architectures, ignore_case=True, flag="--arch"),
    S("model.encoder", "choice", "resnet34", (LOO, TRANSFER), "smp encoder", choices=_encoders, flag="--encoder"),
    S("model.encoder_weights", "str", "none", (LOO, TRANSFER), "none | imagenet | PATH to an encoder state dict",
      flag="--encoder-weights"),
    S("model.in_channels", "int", 1, (LOO, TRANSFER), "input channels", low=1),
    # ------------------------------------------------------------ leave-one-out (Enshaei et al.)
    S("source", "str", "A", (LOO,), "source dataset(s): a name, a comma list or 'all'", flag="--source"),
    S("targets", "names", None, (LOO,), "unseen datasets (null: every other COVID dataset)", nullable=True, flag="--targets"),
    S("folds", "int", 2, (LOO,), "number of folds (k-fold needs 2 or more; repeated-holdout 1 or more)", low=1, flag="--folds"),
    S("split.train", "float", 0.6, (LOO,), "train fraction of a fold", low=0.0, high=1.0, low_open=True),
    S("split.val", "float", 0.1, (LOO,), "validation fraction of a fold", **_PROB),
    S("split.test", "float", 0.3, (LOO,), "test fraction of a fold", low=0.0, high=1.0, low_open=True),
    S("split.protocol", "choice", "kfold", (LOO,), "how folds are drawn", choices=("kfold", "repeated-holdout")),
    S("splits_file", "path", None, (LOO,), "a splits.json to use instead of drawing folds", nullable=True),
    S("init_checkpoint", "path", None, (LOO,), "start from this domgen checkpoint", nullable=True, flag="--init-checkpoint"),
    S("init_run", "str", None, (LOO,), "start from the model of this MLflow run", nullable=True, flag="--init-run"),
    S("pseudolabel.ci_min", "float", 0.8, (LOO,), "CI limit under ci_rule fixed (0.8: domgen's choice; the paper gives no number)", **_PROB, flag="--ci-min"),
    S("pseudolabel.min_pixels", "int", 50, (LOO,), "drop slices with fewer pixels above the cut-off", low=0, flag="--min-pixels"),
    S("pseudolabel.min_pixels_at", "int", None, (LOO,), "image side min_pixels is counted at (null: original)", low=1, nullable=True,
      flag="--min-pixels-at"),
    S("pseudolabel.top_k", "int", None, (LOO,), "at most this many pseudo-labelled slices per target", low=1, nullable=True,
      flag="--top-k"),
    S("pseudolabel.top_fraction", "float", None, (LOO,), "at most this fraction of the ranked slices", low=0.0, high=1.0,
      low_open=True, nullable=True, flag="--top-fraction"),
    S("pseudolabel.mix", "choice", "source+pseudo", (LOO,), "what the retraining sees", choices=_mixes, flag="--mix"),
    S("pseudolabel.rounds", "int", 1, (LOO,), "select-and-retrain rounds", low=1, flag="--rounds"),
    S("pseudolabel.ci_rule", "choice", "fixed", (LOO,), "how the CI threshold is chosen", choices=("fixed", "indomain-quantile"),
      flag="--ci-rule"),
    S("pseudolabel.ci_quantile", "float", 0.5, (LOO,), "quantile of the in-domain CI for ci_rule indomain-quantile", **_PROB,
      flag="--ci-quantile"),
    S("pseudolabel.confidence", "choice", "ci", (LOO,), "the score that ranks the slices", choices=_confidence_scores,
      flag="--confidence"),
    S("pseudolabel.filters", "mapping", {}, (LOO,), "minimums of other confidence scores, e.g. {tta: 0.9} ({}: none)", nullable=True,
      flag="--filter"),
    S("pseudolabel.per_patient_max", "int", None, (LOO,), "at most this many pseudo-labelled slices per patient", low=1,
      nullable=True, flag="--per-patient-max"),
    S("pseudolabel.min_patients", "int", None, (LOO,), "select nothing unless the slices come from this many patients", low=1,
      nullable=True, flag="--min-patients"),
    S("pseudolabel.size_strata", "int", None, (LOO,), "lesion-size strata the selection is spread over", low=2, nullable=True,
      flag="--size-strata"),
    S("pseudolabel.select_by", "choice", "source-val", (LOO,), "how the retrained weights are chosen",
      choices=("last", "source-val", "pseudo-val"), flag="--select-by"),
    S("pseudolabel.pseudo_val_fraction", "float", 0.2, (LOO,), "pseudo-labelled patients held out with select_by pseudo-val",
      low=0.0, high=1.0, low_open=True, high_open=True),
    S("pseudolabel.seeds", "int", 1, (LOO,), "retraining repeats with other seeds", low=1, flag="--seeds"),
    S("pseudolabel.retrain_epochs", "int", None, (LOO,), "epochs of each retraining from the fold model (null: train.epochs)",
      low=1, nullable=True),
    S("pseudolabel.track_target_slices", "int", 64, (LOO,), "target slices whose DSC is logged per retraining epoch (0: none, "
      "null: all)", low=0, nullable=True),
    # ------------------------------------------------------------ transfer (Wang et al.)
    S("target", "str", "A", (TRANSFER,), "the COVID target dataset", flag="--target"),
    S("folds", "int", 5, (TRANSFER,), "inverse k-fold: train on 1/k of the patients, test on the rest", low=2, flag="--folds"),
    S("pretrain", "names", None, (TRANSFER,), "pretrained models (keys of pretrain_datasets, or multi)", flag="--pretrain"),
    S("strategies", "names", None, (TRANSFER,), "transfer strategies", choices=_strategies, flag="--strategy"),
    S("pretrain_datasets", "mapping", None, (TRANSFER,), "pretrained model -> suite dataset"),
    S("val_fraction", "float", 0.0, (TRANSFER,), "patients of a fold's train part held out for validation", low=0.0, high=1.0,
      high_open=True),
    S("strategy_train", "mapping", None, (TRANSFER,), "train.* settings a strategy changes, e.g. {continual: {lr: 0.01}}",
      nullable=True),
    S("splits_file", "path", None, (TRANSFER,), "a splits.json of the inverse k-fold (train part, test the rest) instead of "
      "drawing --folds folds", nullable=True, flag="--splits-file"),
    S("keep_checkpoints", "names", None, (TRANSFER,), "strategies whose fold models are logged", choices=_strategies, nullable=True),
    S("pretraining.val_fraction", "float", 0.2, (TRANSFER,), "patients of each pretraining dataset held out", low=0.0, high=1.0,
      high_open=True),
    S("pretraining.train", "mapping", None, (TRANSFER,), "overrides of the train section for pretraining (train.* keys)"),
    S("dims", "int", 2, (TRANSFER,), "2: slices and smp models; 3: whole volumes and the 3D U-Net (the volume section)", low=2,
      high=3, flag="--dims"),
    S("volume.model.arch", "choice", "unet3d", (TRANSFER,), "3D architecture (dims 3)", choices=("unet3d",)),
    S("volume.model.features", "ints", _MULLER_FEATURES, (TRANSFER,), "3D U-Net filters per level (dims 3)", low=1),
    S("volume.model.in_channels", "int", 1, (TRANSFER,), "input channels (dims 3)", low=1),
    S("volume.preprocessing.enabled", "bool", True, (TRANSFER,), "Müller et al.'s volume preprocessing (dims 3)"),
    S("volume.preprocessing.clip_hu", "floats", _MULLER_CLIP_HU, (TRANSFER,), "HU clip range [low, high] (dims 3)"),
    S("volume.preprocessing.spacing", "floats", _MULLER_SPACING, (TRANSFER,), "voxel size x, y, z in mm (dims 3)", low=0.0,
      low_open=True),
    S("volume.train.patch_size", "ints", _MULLER_PATCH, (TRANSFER,), "patch size x, y, z in voxels (dims 3)", low=1),
    S("volume.train.batch_size", "int", 2, (TRANSFER,), "patches per batch (dims 3)", low=1),
    S("volume.train.iterations_per_epoch", "int", 150, (TRANSFER,), "iterations per epoch (dims 3)", low=1),
    S("volume.train.epochs", "int", 30, (TRANSFER,), "maximum epochs (dims 3)", low=1),
    S("volume.train.optimizer", "choice", "sgd", (TRANSFER,), "optimiser (dims 3)", choices=("adam", "sgd")),
    S("volume.train.lr", "float", 0.01, (TRANSFER,), "learning rate (dims 3)", low=0.0, low_open=True),
    S("volume.train.momentum", "float", 0.99, (TRANSFER,), "SGD momentum (dims 3)", low=0.0, high=1.0, high_open=True),
    S("volume.train.nesterov", "bool", True, (TRANSFER,), "SGD with Nesterov momentum (dims 3)"),
    S("volume.train.schedule", "choice", "poly", (TRANSFER,), "learning-rate schedule (dims 3)", choices=("plateau", "poly", "constant")),
    S("volume.train.poly_power", "float", 0.9, (TRANSFER,), "power of the poly schedule (dims 3)", low=0.0, low_open=True),
    S("volume.train.plateau_factor", "float", 0.1, (TRANSFER,), "reduce-on-plateau factor (dims 3)", low=0.0, high=1.0,
      low_open=True, high_open=True),
    S("volume.train.plateau_patience", "int", 15, (TRANSFER,), "reduce-on-plateau patience in epochs (dims 3)", low=1),
    S("volume.train.min_lr", "float", 1e-5, (TRANSFER,), "smallest learning rate on plateau (dims 3)", low=0.0),
    S("volume.train.early_stopping_patience", "int", 100, (TRANSFER,), "epochs without a lower training loss before stopping "
      "(dims 3)", low=1),
    S("volume.train.sampler", "choice", "uniform", (TRANSFER,), "patch sampler (dims 3)", choices=("uniform", "foreground")),
    S("volume.train.augment", "bool", True, (TRANSFER,), "on-the-fly augmentation (dims 3)"),
    S("volume.train.augment_p", "float", 0.15, (TRANSFER,), "probability of each augmentation (dims 3)", **_PROB),
    S("volume.train.tversky_alpha", "float", 0.5, (TRANSFER,), "Tversky alpha (dims 3)", **_PROB),
    S("volume.train.tversky_beta", "float", 0.5, (TRANSFER,), "Tversky beta (dims 3)", **_PROB),
    S("volume.inference.overlap", "float", 0.5, (TRANSFER,), "sliding-window overlap (dims 3)", low=0.0, high=1.0, high_open=True),
    S("volume.inference.sw_batch_size", "int", 4, (TRANSFER,), "patches per sliding-window batch (dims 3)", low=1),
    # ------------------------------------------------------------ benchmark (Bizopoulos et al.)
    S("train_dataset", "str", "D", (BENCHMARK,), "training + validation dataset"),
    S("test_dataset", "str", "C", (BENCHMARK,), "test dataset"),
    S("split.method", "choice", "random", (BENCHMARK,), "patient-wise train/validation split", choices=("random", "ordered")),
    S("split.val_fraction", "float", 0.2, (BENCHMARK,), "validation fraction of the patients", low=0.0, high=1.0, low_open=True,
      high_open=True),
    S("grid.experiments", "names", None, (BENCHMARK,), "experiments of the grid", choices=_benchmark_experiments, flag="--experiments"),
    S("grid.archs", "names", None, (BENCHMARK,), "architectures of the grid", choices=_architectures, ignore_case=True, flag="--archs"),
    S("grid.encoders", "names", None, (BENCHMARK,), "encoders of the grid", choices=_encoders, flag="--encoders"),
    S("grid.weights", "names", None, (BENCHMARK,), "encoder weights of the grid", choices=_benchmark_weights, flag="--weights"),
    S("save_checkpoint", "bool", True, (BENCHMARK,), "log model/checkpoint.pt per configuration"),
    S("stack", "int", 1, (BENCHMARK,), "configurations of one architecture x encoder trained together in one process, "
      "stepped as one stacked model (needs train.device_data; 1: one at a time)", low=1, flag="--stack"),
    # ------------------------------------------------------------ cross-validate (Müller et al., 3D)
    S("source", "str", "A", (CV,), "the k-fold training dataset (volumes)", flag="--source"),
    S("external", "str", "B", (CV,), "the external test dataset (null: none)", nullable=True, flag="--external"),
    S("folds", "int", 3, (CV,), "k of the k-fold cross-validation", low=2, flag="--folds"),
    S("save_predictions", "bool", True, (CV,), "log label maps as NIfTI"),
    S("model.arch", "choice", "unet3d", (CV,), "3D architecture", choices=("unet3d",)),
    S("model.features", "ints", _MULLER_FEATURES, (CV,), "filters per level", low=1),
    S("model.in_channels", "int", 1, (CV,), "input channels", low=1),
    S("model.classes", "int", 3, (CV,), "classes (background, lung, lesion)", low=2),
    S("preprocessing.enabled", "bool", True, (CV,), "the paper's preprocessing (false: stored intensities and grid)"),
    S("preprocessing.clip_hu", "floats", _MULLER_CLIP_HU, (CV,), "HU clip range [low, high]"),
    S("preprocessing.spacing", "floats", _MULLER_SPACING, (CV,), "voxel size x, y, z in mm", low=0.0, low_open=True),
    S("preprocessing.lung_mask", "choice", "reference", (CV,), "where the lung class comes from", choices=_lung_masks,
      flag="--lung-mask"),
    S("train.patch_size", "ints", _MULLER_PATCH, (CV,), "patch size x, y, z in voxels", low=1),
    S("train.batch_size", "int", 2, (CV,), "patches per batch", low=1),
    S("train.iterations_per_epoch", "int", 150, (CV,), "iterations per epoch", low=1),
    S("train.epochs", "int", 30, (CV,), "maximum epochs", low=1),
    S("train.lr", "float", 1e-3, (CV,), "Adam learning rate", low=0.0, low_open=True),
    S("train.plateau_factor", "float", 0.1, (CV,), "reduce-on-plateau factor", low=0.0, high=1.0, low_open=True, high_open=True),
    S("train.plateau_patience", "int", 15, (CV,), "reduce-on-plateau patience (epochs)", low=1),
    S("train.min_lr", "float", 1e-5, (CV,), "smallest learning rate", low=0.0),
    S("train.early_stopping_patience", "int", 100, (CV,), "epochs without improvement before stopping", low=1),
    S("train.sampler", "choice", "uniform", (CV,), "patch sampler", choices=("uniform", "foreground"), flag="--sampler"),
    S("train.augment", "bool", True, (CV,), "on-the-fly augmentation"),
    S("train.augment_p", "float", 0.15, (CV,), "probability of each augmentation", **_PROB),
    S("train.tversky_alpha", "float", 0.5, (CV,), "Tversky alpha", **_PROB),
    S("train.tversky_beta", "float", 0.5, (CV,), "Tversky beta", **_PROB),
    S("inference.overlap", "float", 0.5, (CV,), "sliding-window overlap", low=0.0, high=1.0, high_open=True),
    S("inference.sw_batch_size", "int", 4, (CV,), "patches per sliding-window batch", low=1),
    S("evaluation.nsd_tolerance_mm", "float", 3.0, (CV,), "NSD tolerance in mm", low=0.0, low_open=True),
    S("evaluation.empty", "choice", "nan", (CV,), "ratio when its denominator is 0", choices=_empty_conventions),
    S("evaluation.surface", "bool", True, (CV,), "compute NSD and HD95"),
    S("ablation.folds", "ints", None, (CV,), "k values of the sensitivity analysis", low=2),
    S("ablation.preprocessing", "bools", None, (CV,), "preprocessing on/off of the sensitivity analysis"),
    S("ablation.augmentation", "bools", None, (CV,), "augmentation on/off of the sensitivity analysis"),
    # ------------------------------------------------------------ commands that read runs (flags only, no profile)
    S("top_k", "int", 50, (CONFIDENCE,), "K of the mean true DSC of the top-K slices per score", low=1, flag="--top-k"),
    S("experiment", "choice", "domgen-leave-one-out", (REPORT,), "the MLflow experiment whose tables are rebuilt",
      choices=_experiments, flag="--experiment"),
    S("paper_table", "path", None, (REPORT,), "CSV of Bizopoulos et al.'s published Table II", nullable=True,
      flag="--paper-table"),
    S("format", "choice", "state-dict", (EXPORT,), "export format", choices=_export_formats, flag="--format"),
    S("seed", "int", 0, (GENERATE,), "seed of the synthetic suite", low=0, flag="--seed"),
    S("scale", "float", None, (GENERATE,), "matrix scale: 512*scale and 630*scale pixels (null: the default)", low=0.0,
      low_open=True, nullable=True, flag="--scale"),
    S("port", "int", 5000, (UI,), "port of the MLflow UI on 127.0.0.1", low=1, high=65535, flag="--port"),
]
# ------------------------------------------------------------ compare (issue 20): leave-one-out's settings plus the method axis
COMPARE = "compare"
_NOT_IN_COMPARE = ("source", "splits_file", "init_checkpoint", "init_run")  # compare names its sources and start itself
_COMPARE_FLAGS = ("--targets", "--folds", "--seed", "--device", "--suite", "--lung-mask", "--lungmask-weights", "--encoder-weights")


_dg_methods = _names("domgen.methods.dg:METHODS")


def _compare_rows() -> list[Setting]:
    from dataclasses import replace as copy_row

    # leave-one-out's rows; a flag `domgen compare` does not take is left out, so its errors say --set KEY instead
    shared = [copy_row(s, families=(COMPARE,), flag=s.flag if s.flag in _COMPARE_FLAGS else None)
              for s in SETTINGS if LOO in s.families and s.key not in _NOT_IN_COMPARE]
    return shared + [
        S("sources", "names", None, (COMPARE,), "source dataset(s); several: pooled, leave-one-domain-out", flag="--sources"),
        S("methods", "names", None, (COMPARE,), "methods (domgen.methods.dg.METHODS); TEST@TRAIN adapts TRAIN's model, "
          "TRAIN+transfer starts from --init-run", flag="--methods"),
        S("seeds", "int", 1, (COMPARE,), "seeds (seed + 1000 s), each with its own patient-wise folds", low=1, flag="--seeds"),
        S("selection", "choice", "training-domain", (COMPARE,), "how the epoch is chosen: source validation, the last "
          "epoch, or oracle (the targets' labels; labelled oracle everywhere)", choices=("training-domain", "last", "oracle"),
          flag="--selection"),
        S("init_run", "str", None, (COMPARE,), "the pretrained model of transfer / NAME+transfer", nullable=True, flag="--init-run"),
        # Tent (Wang et al. 2021): their Adam lr 1e-3 with one step per batch
        S("method.tent.steps", "int", 1, (COMPARE,), "tent: entropy steps per target batch", low=1, high=100),
        S("method.tent.lr", "float", 1e-3, (COMPARE,), "tent: learning rate of the batch-norm affine parameters", low=0.0,
          high=1.0, low_open=True),
        S("method.tent.optimizer", "choice", "adam", (COMPARE,), "tent: optimiser", choices=("adam", "sgd")),
        S("method.tent.batch_size", "int", 16, (COMPARE,), "tent: target slices per episode", low=2, high=4096),
        S("method.adabn.batch_size", "int", 32, (COMPARE,), "adabn: target slices per batch of the statistics", low=2, high=4096),
        # GIN (Ouyang et al. 2022; GIN-IPA's defaults) and BigAug (Zhang et al. 2020): the augmentation's builder arguments
        S("method.gin.layers", "int", 4, (COMPARE,), "gin: random convolutions of the shallow network", low=1, high=16),
        S("method.gin.channels", "int", 2, (COMPARE,), "gin: intermediate channels of the shallow network", low=1, high=64),
        S("method.bigaug.p", "float", 0.5, (COMPARE,), "bigaug: probability of each of the nine stacked transformations", **_PROB),
    ]


SETTINGS += _compare_rows()
TABLE: dict[tuple[str, str], Setting] = {(fam, s.key): s for s in SETTINGS for fam in s.families}
FAMILIES_WITH_SETTINGS = sorted({fam for s in SETTINGS for fam in s.families})

# the families that have profiles: validate fills their omitted keys; the command-only families above have none
PROFILED = (*EVERY, COMPARE)
# partial sections: they only override the train section, so they are never filled
_OVERRIDE_SECTIONS = ("strategy_train", "pretraining.train")


def default(family: str, key: str):
    """The default of ``key`` for ``family``: the one home of every number a typed settings class starts from
    (``epochs: int = default(LOO, "train.epochs")``). A copy, so no caller can change the table's value."""
    try:
        return copy.deepcopy(TABLE[(family, key)].default)
    except KeyError:
        raise KeyError(f"{key} is not a {family} setting of domgen/settings.py; add its row to SETTINGS first") from None


def _filled(value):
    # the list a checked profile value would be (check_value gives lists), so hashes, params and YAML see one form
    return [*value] if isinstance(value, tuple) else copy.deepcopy(value)


def fill_defaults(cfg: dict, family: str) -> dict:
    """``cfg`` with every key of ``family``'s rows it omits set to the row's default (in place; returned). A None
    default means "not set" or "required" and stays absent; strategy_train and pretraining.train stay partial."""
    if family not in PROFILED:
        return cfg
    for (fam, _), s in TABLE.items():
        if fam != family or s.default is None or s.key.startswith(tuple(f"{o}." for o in _OVERRIDE_SECTIONS)):
            continue
        *parents, name = s.key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(name, _filled(s.default))
    return cfg


# Environment variables domgen reads, checked the same way.
ENVIRONMENT: dict[str, Setting] = {
    "DOMGEN_THREADS": S("DOMGEN_THREADS", "int", None, ALL, "torch threads of this process", low=1),
    "DOMGEN_HEARTBEAT_SECONDS": S("DOMGEN_HEARTBEAT_SECONDS", "float", 30.0, ALL,
                                  "how often a live run refreshes its lease tag", low=0.1),
}


# ---------------------------------------------------------------- checking
def _name(setting: Setting) -> str:
    return f"{setting.key} ({setting.flag})" if setting.flag else setting.key


def _fail(setting: Setting, value, what: str | None = None) -> DomgenError:
    shown = repr(value) if isinstance(value, str) else str(value)
    fix = f"--set {setting.key}=..." if not setting.flag else f"{setting.flag} or --set {setting.key}=..."
    return DomgenError(f"{_name(setting)} = {shown} {what or 'is not allowed'}; give {setting.describe()} ({fix})")


def _number(setting: Setting, value, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(setting, value, "is not " + ("an integer" if integer else "a number"))
    if integer and (isinstance(value, float) and not value.is_integer()):
        raise _fail(setting, value, "is not an integer")
    value = int(value) if integer else float(value)
    if not math.isfinite(value):
        raise _fail(setting, value, "is not finite")
    if setting.low is not None and (value <= setting.low if setting.low_open else value < setting.low):
        raise _fail(setting, value, "is too small")
    if setting.high is not None and (value >= setting.high if setting.high_open else value > setting.high):
        raise _fail(setting, value, "is too large")
    return value


def _choice(setting: Setting, value) -> str:
    allowed = setting.allowed()
    if not isinstance(value, str):
        raise _fail(setting, value, "is not a name")
    if value in allowed:
        return value
    if setting.ignore_case:
        lowered = {a.lower(): a for a in allowed}
        if value.strip().lower() in lowered:
            return lowered[value.strip().lower()]
    raise _fail(setting, value, "is not a known name")


def check_value(setting: Setting, value):
    """``value`` coerced to the setting's type, or one ``DomgenError`` sentence."""
    if value is None:
        if setting.nullable or setting.kind in ("str", "names", "mapping") and setting.default is None:
            return None
        raise _fail(setting, value, "may not be empty")
    kind = setting.kind
    if kind in ("int", "float"):
        return _number(setting, value, kind == "int")
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(setting, value, "is not true or false")
        return value
    if kind == "switch":
        if not isinstance(value, bool) and value != "auto":
            raise _fail(setting, value, "is not true, false or auto")
        return value
    if kind == "choice":
        return _choice(setting, value)
    if kind == "str":
        if isinstance(value, (dict, list, bool)):
            raise _fail(setting, value, "is not a text value")
        return str(value)
    if kind == "path":
        if not isinstance(value, str) or not Path(value).expanduser().is_file():
            raise _fail(setting, value, "is not an existing file")
        return value
    if kind == "names":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise _fail(setting, value, "is not a list of names")
        names = [str(v).strip() for v in items if str(v).strip()]
        if not names:
            raise _fail(setting, value, "is empty")
        if setting.choices is not None:
            names = [_choice(setting, n) for n in names]
        out = list(dict.fromkeys(names))  # a name given twice is one entry, not two runs
        return out if not isinstance(value, str) else out
    if kind in ("floats", "ints"):
        if not isinstance(value, (list, tuple)) or not value:
            raise _fail(setting, value, "is not a list of " + ("numbers" if kind == "floats" else "integers"))
        return [_number(setting, v, kind == "ints") for v in value]
    if kind == "bools":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, bool) for v in value):
            raise _fail(setting, value, "is not a list of true/false")
        return list(value)
    if kind == "mapping":
        if not isinstance(value, dict):
            raise _fail(setting, value, "is not a mapping")
        return value
    raise ValueError(f"setting {setting.key} has unknown kind {kind}")


def _walk(cfg: dict, prefix: str = ""):
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in ("pretrain_datasets", "pretraining.train", "pseudolabel.filters", "strategy_train"):
            yield from _walk(value, dotted + ".")
        else:
            yield dotted, value


def _set(cfg: dict, dotted: str, value) -> None:
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def required_multiple(arch: str) -> int:
    """The factor the image side must be a multiple of for ``arch``, as smp checks it: 2 ** encoder depth (the
    output stride) for models with ``requires_divisible_input_shape``, 1 for those that resize their skips (Unet)."""
    cls, params = _registry("domgen.models:ARCHITECTURES")[arch]
    if not getattr(cls, "requires_divisible_input_shape", True):
        return 1
    return 2 ** int(params.get("encoder_depth", 5))


def _check_image_size(cfg: dict, family: str) -> None:
    size = cfg.get("preprocessing", {}).get("image_size")
    if size is None:
        return
    archs = cfg.get("grid", {}).get("archs", []) if family == BENCHMARK else [cfg.get("model", {}).get("arch")]
    for arch in [a for a in archs if a]:
        multiple = required_multiple(arch)
        if multiple > 1 and size % multiple:
            lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
            raise DomgenError(f"preprocessing.image_size = {size} cannot be taken by {arch} (its encoder halves the image "
                              f"{int(math.log2(multiple))} times, so the side must be a multiple of {multiple}); "
                              f"use --set preprocessing.image_size={upper}" + (f" or {lower}" if lower else ""))


def _train_sections(cfg: dict):
    """(name, section) of every train.* mapping of a 2D profile: train, pretraining.train, strategy_train.<strategy>."""
    for name, section in [("train", cfg.get("train")), ("pretraining.train", (cfg.get("pretraining") or {}).get("train")),
                          *((f"strategy_train.{k}", v) for k, v in (cfg.get("strategy_train") or {}).items())]:
        if isinstance(section, dict):
            yield name, section


def _check_precision_device(cfg: dict) -> None:
    if cfg.get("device") == "cuda":
        return
    for name, section in _train_sections(cfg):
        if section.get("precision") == "fp16":
            raise DomgenError(f"{name}.precision fp16 needs --device cuda (the device is {cfg.get('device', 'cpu')}); on a CPU use "
                              f"--set {name}.precision=bf16")


def _check_cross_fields(cfg: dict, family: str) -> None:
    split = cfg.get("split") or {}
    if family == LOO and all(isinstance(split.get(k), (int, float)) for k in ("train", "val", "test")):
        total = split["train"] + split["val"] + split["test"]
        if abs(total - 1.0) > 1e-6:
            raise DomgenError(f"split.train + split.val + split.test = {total:g}, not 1; fix the fractions (e.g. --set split.val=...)")
    if cfg.get("init_checkpoint") and cfg.get("init_run"):
        raise DomgenError("give at most one of --init-run and --init-checkpoint")
    if family == LOO and split.get("protocol") == "kfold" and isinstance(cfg.get("folds"), int) and cfg["folds"] < 2:
        raise DomgenError(f"folds = {cfg['folds']} cannot make a k-fold split; use --folds 2 or more, or "
                          "--set split.protocol=repeated-holdout for independent train/val/test splits")
    _check_precision_device(cfg)
    filters = (cfg.get("pseudolabel") or {}).get("filters") or {}
    if family == LOO:
        known = _confidence_scores()
        for name, minimum in filters.items():
            if name not in known:
                raise DomgenError(f"pseudolabel.filters (--filter) names {name!r}, not a confidence score; use one of {', '.join(known)}")
            if isinstance(minimum, bool) or not isinstance(minimum, (int, float)) or not math.isfinite(minimum):
                raise DomgenError(f"pseudolabel.filters (--filter) {name}={minimum!r} is not a number; give e.g. --filter {name}=0.9")


def validate(cfg: dict, fill: bool = True, family: str | None = None) -> dict:
    """``cfg`` with every value checked against ``SETTINGS`` and coerced to its type (in place; returned), and every
    key of the family's rows it omits set to the row's default (``fill_defaults``), so the table is the one home of a
    default: the typed classes, the runs' hashes and their MLflow params all see the same value.

    Keys the table does not list for the profile's family are refused (a typo in a profile is not silently
    ignored); a family with no rows at all (one being added) only has its known keys checked. ``fill=False`` checks a
    partial section (a command's pseudo-label flags) as given. ``family``: that of a config which does not name it (one
    built in Python).
    """
    family = cfg.get("family") or family
    strict = family in FAMILIES_WITH_SETTINGS
    checks = []
    for dotted, value in list(_walk(cfg)):
        setting = TABLE.get((family, dotted)) or (None if strict else next((s for s in SETTINGS if s.key == dotted), None))
        if setting is None:
            if strict:
                raise DomgenError(f"setting {dotted} is not a {family} setting; remove it from the profile "
                                  f"(the settings of each family are listed in domgen/settings.py)")
            continue
        checks.append((setting, dotted, value))
    # plain values first: a wrong number is said before the registries (torch, smp, MONAI) are imported
    for setting, dotted, value in sorted(checks, key=lambda c: callable(c[0].choices)):
        _set(cfg, dotted, check_value(setting, value))
    if family == TRANSFER and isinstance(cfg.get("strategy_train"), dict):
        strategies = _strategies()
        for strategy, section in cfg["strategy_train"].items():
            if strategy not in strategies or not isinstance(section, dict):
                raise DomgenError(f"strategy_train.{strategy} must be a transfer strategy ({', '.join(strategies)}) mapped to train.* "
                                  "settings, e.g. {continual: {lr: 0.01, schedule: poly}}")
            for key, value in section.items():
                setting = TABLE.get((TRANSFER, f"train.{key}"))
                if setting is None:
                    raise DomgenError(f"setting strategy_train.{strategy}.{key} is not a train setting; use the keys of the train section")
                section[key] = check_value(setting, value)
    if family == TRANSFER and isinstance(cfg.get("pretraining", {}).get("train"), dict):
        for key, value in cfg["pretraining"]["train"].items():
            setting = TABLE.get((TRANSFER, f"train.{key}"))
            if setting is None:
                raise DomgenError(f"setting pretraining.train.{key} is not a train setting; use the keys of the train section")
            cfg["pretraining"]["train"][key] = check_value(setting, value)
    if fill:
        fill_defaults(cfg, family)
    _check_image_size(cfg, family)
    _check_cross_fields(cfg, family)
    return cfg


def environment(name: str):
    """The value of environment variable ``name`` checked against ``ENVIRONMENT`` (None when unset or empty)."""
    setting = ENVIRONMENT[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw) if setting.kind == "float" else int(raw)
    except ValueError:
        raise DomgenError(f"environment variable {name}={raw!r} is not {'a number' if setting.kind == 'float' else 'an integer'}; "
                          f"set it to {setting.describe()} or unset it") from None
    try:
        return check_value(setting, value)
    except DomgenError:
        raise DomgenError(f"environment variable {name}={raw} is out of range; set it to {setting.describe()} or unset it") from None


def build(cls, section: dict, **override):
    """A settings dataclass (TrainSettings, SlicePreprocessing, EvaluationSettings, ...) from a validated section:
    the section's keys that are fields of ``cls``, then ``override``."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in {**section, **override}.items() if k in names})


def markdown_table() -> str:
    """The settings as a Markdown table (key, families, type and allowed values, default, meaning)."""
    rows = ["| key | families | allowed | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.key}` | {', '.join(s.families)} | {s.describe()} | `{s.default}` | {s.help} |")
    return "\n".join(rows)
