"""Checkpoints: a model's config beside its state dict, so any domgen checkpoint rebuilds its own model.

They belong with the models (tracking logs them as artifacts but the models layer never imports tracking).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from domgen.errors import DomgenError
from domgen.models import build_model
from domgen.models.unet3d import MultiEncoderUNet3d, build_model_3d


def save_checkpoint(path: Path, model, model_cfg: dict | None = None, **extra) -> Path:
    """A self-describing checkpoint, 2D or 3D: the model config beside the state dict (atomic write)."""
    path = Path(path)
    tmp = path.with_suffix(".part")
    # a model loaded from a checkpoint (a Multi-encoder, a 3D U-Net) knows its own config better than the caller's profile
    model_cfg = getattr(model, "domgen_model_config", None) or model_cfg
    torch.save({"model": dict(model_cfg), "state_dict": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)
    return path


# what to pass instead, per kind of checkpoint a family reads
_WHICH = {2: "a checkpoint.pt from a domgen run (MLflow artifact model/checkpoint.pt)", 3: "model/checkpoint.pt of a cross-validate fold run"}


def load_checkpoint(path: Path, dims: int = 2) -> tuple[torch.nn.Module, dict]:
    """(model, checkpoint dict) from a file written by ``save_checkpoint``: a 2D smp model or Multi-encoder
    (``dims=2``), or a 3D U-Net or 3D Multi-encoder in eval mode (``dims=3``)."""
    if not Path(path).is_file():
        raise DomgenError(f"checkpoint {path} does not exist; pass {_WHICH[dims]}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip / pickle
        raise DomgenError(f"cannot read checkpoint {path} ({type(exc).__name__}); it is corrupt or not a domgen checkpoint") from None
    if dims == 3:
        if not isinstance(ckpt, dict) or ckpt.get("model", {}).get("dims") != 3 or "state_dict" not in ckpt:
            raise DomgenError(f"{path} is not a domgen 3D checkpoint; use {_WHICH[3]}")
        model = _model_3d(ckpt["model"])
    else:
        if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
            raise DomgenError(f"{path} is not a domgen checkpoint (no 'model'/'state_dict'); use model/checkpoint.pt from a domgen run")
        model = _model_2d(ckpt, path)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise DomgenError(f"checkpoint {path} does not match its model config ({str(exc).splitlines()[0]})") from None
    if dims == 3:
        model.eval()  # a 3D checkpoint is only read to predict (cross-validate's ensemble, transfer's pretrained start)
        return model, ckpt
    # the input it learnt on: transfer and benchmark checkpoints keep the preprocessing section, leave-one-out the config
    model.domgen_preprocessing = ckpt.get("preprocessing") or (ckpt.get("config") or {}).get("preprocessing")
    return model, ckpt


def _model_2d(ckpt: dict, path: Path) -> torch.nn.Module:
    cfg = dict(ckpt["model"])
    if cfg.get("dims") == 3:
        raise DomgenError(f"{path} holds a 3D U-Net (domgen cross-validate or transfer --dims 3), which a 2D family cannot start "
                          "from; use model/checkpoint.pt of a 2D run")
    cfg["encoder_weights"] = "none"  # the state dict holds every weight
    build = build_model
    if cfg.get("multi_encoder"):
        from domgen.models.multi_encoder import MultiEncoderModel as build
    model = build(**{k: cfg[k] for k in ("arch", "encoder", "encoder_weights", "in_channels") if k in cfg})
    model.domgen_model_config = cfg
    return model


def _model_3d(cfg: dict) -> torch.nn.Module:
    if cfg.get("multi_encoder"):
        model = MultiEncoderUNet3d(int(cfg.get("in_channels", 1)), int(cfg.get("classes", 3)), tuple(cfg["features"]))
        model.domgen_model_config = dict(cfg)
        return model
    return build_model_3d(cfg)
