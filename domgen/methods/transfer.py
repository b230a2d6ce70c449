"""Wang et al.'s transfer strategies from a non-COVID lesion model to the COVID target.

Each strategy turns (the pretrained model or None, the model config, a seed) into a model ready to train and the
TrainSettings fields it changes; ``train`` optimises only the parameters that require grad. A model config with
``dims: 3`` gives the same strategies on the 3D U-Net (``domgen.models.unet3d``), whose encoder is also ``.encoder``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from domgen.errors import DomgenError
from domgen.models import build_model
from domgen.models.multi_encoder import MultiEncoderModel
from domgen.models.unet3d import MultiEncoderUNet3d, build_model_3d


@dataclass(frozen=True)
class Strategy:
    prepare: Callable[[nn.Module | None, dict, int], nn.Module]
    settings: dict = field(default_factory=dict)  # default TrainSettings changes; a profile's strategy_train replaces them
    needs_pretrained: bool = True
    description: str = ""


def _fresh(pretrained: nn.Module | None, model_cfg: dict, seed: int = 0) -> nn.Module:
    # scratch draws from the global generator that the family seeds before it (seed_everything)
    if model_cfg.get("dims") == 3:
        return build_model_3d(model_cfg)
    return build_model(model_cfg["arch"], model_cfg["encoder"], model_cfg["encoder_weights"], model_cfg.get("in_channels", 1))


def _copy(pretrained: nn.Module, model_cfg: dict, seed: int = 0) -> nn.Module:
    return copy.deepcopy(pretrained)


def _body(pretrained: nn.Module, model_cfg: dict, seed: int = 0) -> nn.Module:
    """The pretrained encoder (the "body") under a decoder and segmentation head initialised afresh from ``seed``.

    Every top-level module but ``encoder`` is re-initialised: smp's ``decoder`` and ``segmentation_head`` in 2D, the
    3D U-Net's ``decoder`` (its 1x1x1 head included). The fresh weights come from a generator of their own, so the same
    seed gives the same head and the global random stream (batch order, augmentation) stays that of ``continual``."""
    model = copy.deepcopy(pretrained)
    config = getattr(pretrained, "domgen_model_config", None) if model_cfg.get("dims") == 3 else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # encoder_weights none: the fresh encoder is discarded, so no ImageNet download or weights file is read for it
        fresh = _fresh(None, config or {**model_cfg, "encoder_weights": "none"})
    for name, module in fresh.named_children():
        if name != "encoder":
            getattr(model, name).load_state_dict(module.state_dict())
    return model


def _frozen_encoder(pretrained: nn.Module, model_cfg: dict, seed: int = 0) -> nn.Module:
    model = copy.deepcopy(pretrained)
    model.encoder.requires_grad_(False)
    return model


def _multi_encoder(pretrained: nn.Module, model_cfg: dict, seed: int = 0) -> nn.Module:
    if model_cfg.get("dims") == 3:
        return MultiEncoderUNet3d.from_pretrained(pretrained, int(model_cfg.get("classes", 2)))
    return MultiEncoderModel.from_pretrained(pretrained, model_cfg["arch"], model_cfg["encoder"], model_cfg.get("in_channels", 1))


STRATEGIES: dict[str, Strategy] = {
    "scratch": Strategy(_fresh, needs_pretrained=False, description="train from scratch (baseline)"),
    # lr 0.01 with lr * (1 - epoch/max_epochs)^0.9, nnU-Net's schedule (Wang et al., Continual Learning and Body Fine-tuning)
    "continual": Strategy(_copy, {"lr": 0.01, "schedule": "poly"}, description="continual learning: the whole pretrained network trains on"),
    # reading of Wang et al.'s Body Fine-tuning (full text not available offline): the body is the encoder, as in "body"
    # vs "head"; only it is transferred, so body differs from continual by its fresh decoder alone
    "body": Strategy(_body, {"lr": 0.01, "schedule": "poly"}, description="body fine-tuning: pretrained encoder, fresh decoder, all trained"),
    "frozen": Strategy(_frozen_encoder, description="pre-trained lesion representations: encoder frozen, decoder trained"),
    "multi-encoder": Strategy(_multi_encoder, description="trainable self-encoder + frozen adapted-encoder, shared decoder"),
}


def prepare_strategy(name: str, pretrained: nn.Module | None, model_cfg: dict,
                     strategy_train: dict | None = None, seed: int = 0) -> tuple[nn.Module, dict]:
    """(model ready to train, TrainSettings overrides) for strategy ``name``; ``strategy_train`` (the profile's
    ``strategy_train`` section) replaces the strategy's built-in changes, so they are visible and settable. ``seed``
    initialises what a strategy builds afresh from a generator of its own (body's decoder)."""
    if name not in STRATEGIES:
        raise DomgenError(f"unknown transfer strategy '{name}'; choose from {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[name]
    if strategy.needs_pretrained and pretrained is None:
        raise DomgenError(f"strategy '{name}' starts from a pretrained model; pass --pretrain with at least one model")
    changes = strategy.settings if strategy_train is None or name not in strategy_train else strategy_train[name]
    return strategy.prepare(pretrained, model_cfg, seed), dict(changes)
