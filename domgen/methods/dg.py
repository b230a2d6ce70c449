"""Domain-generalisation and test-time methods behind one interface, the way DomainBed lists ``ALGORITHMS``.

A method acts at training time (``trains``: what the model sees, an ``augment`` name of
``domgen.training.augment.AUGMENTATIONS`` or a ``training_view`` of the fold's training slices), at test time
(``adapt(model, target, ctx) -> model`` on the unlabelled target, starting from a training method's model), or both.
``domgen compare`` runs them on the same folds and seeds; test-time methods reuse the training method's models.
Hyper-parameters are rows ``method.<name>.<param>`` of ``domgen.settings.SETTINGS`` (default and range there); a
method receives its own as ``ctx.params``.

A researcher's own method is one class registered with ``@register`` (see the README, "Your own method").
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from domgen.errors import DomgenError
from domgen.methods.pseudolabel import PseudoLabelSettings, enhance
from domgen.preprocessing.slices import SliceSet
from domgen.training.trainer import TrainSettings, predict_model_size
from domgen.typed_config import FamilyConfig


@dataclass
class AdaptContext:
    """What a test-time method may use: the fold's labelled source slices, the source model's cut-off and in-domain CI
    limit, its own hyper-parameters, and the settings of training and pseudo-labelling. Never the target's labels."""

    source_train: SliceSet
    source_val: SliceSet
    cutoff: float
    device: str
    seed: int
    train: TrainSettings
    pseudolabel: PseudoLabelSettings = field(default_factory=PseudoLabelSettings)
    ci_limit: float = float("nan")
    params: dict = field(default_factory=dict)
    progress: bool = False


class Method:
    """One method. Subclasses set ``name`` and ``paper`` and override what they change (DomainBed's ``Algorithm``)."""

    name = ""
    paper = ""
    trains = True  # trains its own model; False: adapts a training method's model at test time
    augment: str | None = None  # an AUGMENTATIONS name for training (None: the profile's train.augment)
    uses_init_run = False  # starts from the model of --init-run (Wang et al.'s pretrained start)

    def check(self, cfg: FamilyConfig, sources: list[str]) -> None:
        """Refuse a configuration the method cannot run, in one sentence, before any run exists."""

    def training_view(self, train: SliceSet, seed: int) -> SliceSet:
        """The fold's training slices as this method's model sees them (default: as they are)."""
        return train

    def adapt(self, model: nn.Module, target: SliceSet, ctx: AdaptContext) -> nn.Module:
        """The model adapted to the unlabelled ``target`` (default: unchanged)."""
        return model

    def predict(self, model: nn.Module, target: SliceSet, ctx: AdaptContext) -> np.ndarray:
        """Model-size lesion probabilities of ``target`` (N, S, S)."""
        return predict_model_size(model, target, device=ctx.device)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method to ``METHODS`` under ``cls.name`` (a class decorator)."""
    if not cls.name:
        raise ValueError(f"method class {cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise DomgenError(f"--methods names {name!r}, not a known method; use one of {', '.join(METHODS)} (or register your own, "
                          "see the README's 'Your own method')")
    return METHODS[name]()


def unlabelled(slices: SliceSet) -> SliceSet:
    """The slices with every label replaced by zeros (original shapes kept): what a test-time method is given."""
    out = slices.with_targets(np.zeros_like(slices.targets))
    out.truths = [np.zeros_like(t) for t in slices.truths]
    out.lesion_classes = []
    return out


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def even_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Index batches of at least ``batch_size`` (or all n): batch statistics never come from a lone slice."""
    return np.array_split(np.arange(n), max(1, n // batch_size)) if n else []


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Pixel-wise H(p) = -p log p - (1 - p) log(1 - p), p = sigmoid(logits), computed from the logits for stability:
    log p = -softplus(-z), log(1 - p) = -softplus(z)."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1.0 - p) * F.softplus(logits)


# ---------------------------------------------------------------- training-time methods
@register
class ERM(Method):
    """Empirical risk minimisation on the source (Vapnik 1998; DomainBed's ERM): leave-one-out's fold model, bit for bit."""

    name = "erm"
    paper = "Vapnik 1998; Gulrajani & Lopez-Paz 2021 (DomainBed)"


@register
class ERMMulti(Method):
    """ERM on several pooled source domains (leave-one-domain-out), each domain weighted equally: the smaller domains'
    training slices are repeated (seeded draw with replacement) up to the largest's count, as DomainBed's ERM takes the
    same number of examples from every training environment.

    Departure: DomainBed builds each minibatch from every domain; here the epoch holds equal counts and batches shuffle."""

    name = "erm-multi"
    paper = "Gulrajani & Lopez-Paz 2021 (DomainBed, ERM over training environments)"

    def check(self, cfg: FamilyConfig, sources: list[str]) -> None:
        if len(sources) < 2:
            raise DomgenError(f"method erm-multi pools several source domains but --sources gives only {sources[0]}; "
                              "give two or more, e.g. --sources A,B")

    def training_view(self, train: SliceSet, seed: int) -> SliceSet:
        domains = np.asarray(train.datasets)
        names = sorted(set(train.datasets))
        largest = max(int((domains == d).sum()) for d in names)
        rng = np.random.default_rng(seed)
        index = []
        for d in names:
            own = np.flatnonzero(domains == d)
            index += own.tolist() + rng.choice(own, largest - len(own), replace=True).tolist()
        return train.subset(index)


@register
class BigAug(Method):
    """Zhang et al. 2020 (IEEE TMI 39(7)), BigAug: deep stacked transformations (image quality, appearance, spatial),
    each p = 0.5; the recipe and its departures are in ``domgen.training.dg_augment.bigaug``."""

    name = "bigaug"
    paper = "Zhang et al. 2020, IEEE TMI"
    augment = "bigaug"


@register
class GIN(Method):
    """Ouyang et al. 2022 (IEEE TMI 42(4)), global intensity non-linear augmentation without IPA: a random shallow conv
    net per slice, blended with the input and rescaled to its Frobenius norm (``domgen.training.dg_augment``).

    Departure: GIN alone, no interventional pseudo-correlation augmentation and no consistency loss."""

    name = "gin"
    paper = "Ouyang et al. 2022, IEEE TMI"
    augment = "gin"


@register
class Transfer(Method):
    """Wang et al.'s pretrained start: ERM started from the model of ``--init-run`` (a pretraining or transfer run of
    ``domgen transfer``) instead of a fresh one. Any training method starts from it with ``NAME+transfer``."""

    name = "transfer"
    paper = "Wang et al. 2020, Med. Phys."
    uses_init_run = True

    def check(self, cfg: FamilyConfig, sources: list[str]) -> None:
        if not cfg.init_run:
            raise DomgenError("method transfer starts from a pretrained model; give --init-run RUN_ID (a `domgen transfer` "
                              "pretraining or fold run)")


# ---------------------------------------------------------------- test-time methods
@register
class AdaBN(Method):
    """Li et al. 2018 (Pattern Recognition 80), AdaBN: re-estimate every batch-norm layer's running mean and variance on
    the target (cumulative average over target batches, no gradient); nothing else changes.

    Departure: batches of ``method.adabn.batch_size`` or more slices (never one alone), not the whole target at once."""

    name = "adabn"
    paper = "Li et al. 2018, Pattern Recognition"
    trains = False

    @torch.no_grad()
    def adapt(self, model: nn.Module, target: SliceSet, ctx: AdaptContext) -> nn.Module:
        model.to(ctx.device).eval()
        layers = batch_norms(model)
        momenta = [bn.momentum for bn in layers]
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average: every target batch counts equally
            bn.train()
        for index in even_batches(len(target), int(ctx.params.get("batch_size", 32))):
            model(torch.from_numpy(target.inputs[index]).to(ctx.device))
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        return model.eval()


class EpisodicTent(nn.Module):
    """Tent's model: each forward resets to the source weights, takes ``steps`` gradient steps on the batch's mean
    pixel-wise binary entropy over the batch-norm affine parameters only (batch statistics, running ones untouched),
    and predicts the batch with the adapted model."""

    def __init__(self, model: nn.Module, steps: int, lr: float, optimizer: str) -> None:
        super().__init__()
        self.model = model
        self.steps, self.lr, self.optimizer = steps, lr, optimizer
        self.source_state = copy.deepcopy(model.state_dict())
        self.domgen_channels_last = getattr(model, "domgen_channels_last", False)

    def reset(self) -> None:
        """Back to the source weights, bit for bit (Wang et al.'s episodic mode)."""
        self.model.load_state_dict(self.source_state)

    def _configure(self) -> list[nn.Parameter]:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = []
        for bn in batch_norms(self.model):
            bn.train()
            bn.track_running_stats = False  # batch statistics, and the running ones are neither used nor updated
            for p in (bn.weight, bn.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
        return params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.reset()
        params = self._configure()
        opt = torch.optim.Adam(params, lr=self.lr) if self.optimizer == "adam" else torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = binary_entropy(self.model(x).float()).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            return self.model(x)


@register
class Tent(Method):
    """Wang et al. 2021 (ICLR), Tent: test-time entropy minimisation of the batch-norm affine parameters only, batch
    statistics in train mode, ``method.tent.steps`` steps of Adam or SGD at ``method.tent.lr`` per target batch,
    episodic: reset to the source weights before each batch.

    Departures: the entropy is the pixel-wise binary entropy of the sigmoid (a one-class segmentation model, not a
    softmax classifier); a batch is predicted after its steps (Tent's code returns the outputs of the last step's
    forward pass, before the update); batches hold ``method.tent.batch_size`` or more target slices."""

    name = "tent"
    paper = "Wang et al. 2021, ICLR"
    trains = False

    def adapt(self, model: nn.Module, target: SliceSet, ctx: AdaptContext) -> nn.Module:
        p = ctx.params
        return EpisodicTent(model.to(ctx.device), int(p.get("steps", 1)), float(p.get("lr", 1e-3)), str(p.get("optimizer", "adam")))

    def predict(self, model: nn.Module, target: SliceSet, ctx: AdaptContext) -> np.ndarray:
        out = np.empty(target.targets.shape, dtype=np.float32)
        for index in even_batches(len(target), int(ctx.params.get("batch_size", 16))):
            logits = model(torch.from_numpy(target.inputs[index]).to(ctx.device))
            out[index] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        return out


@register
class CIPseudoLabel(Method):
    """Enshaei et al.'s Certainty-Index self-training: rank the target's slices by the CI, retrain on the most certain
    with their predicted masks (``domgen.methods.pseudolabel.enhance``, the leave-one-out enhancement, with the
    profile's ``pseudolabel`` section)."""

    name = "ci-pseudolabel"
    paper = "Enshaei et al. 2022, Sci. Rep."
    trains = False

    def adapt(self, model: nn.Module, target: SliceSet, ctx: AdaptContext) -> nn.Module:
        pl = ctx.pseudolabel.with_ci_limit(ctx.ci_limit)
        settings = replace(ctx.train, **({"epochs": pl.retrain_epochs} if pl.retrain_epochs else {}))
        return enhance(model, ctx.source_train, ctx.source_val, target, ctx.cutoff, pl, settings, progress=ctx.progress)[0]
