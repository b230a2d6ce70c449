"""The model zoo: export a benchmark run's model (state dict, TorchScript, ONNX) and load any export back
as a trainable smp model for fine-tuning (Bizopoulos et al. ship their 600 models for use without a GPU).

Every export carries the domgen model config (architecture, encoder, channels) beside the weights:
the checkpoint dict itself, a ``domgen.json`` extra file in TorchScript, ``metadata_props`` in ONNX.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from domgen.errors import DomgenError
from domgen.models import build_model
from domgen.models.checkpoint import load_checkpoint

FORMATS = {"state-dict": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
METADATA_KEY = "domgen.model"
# ONNX merges identical tensors into one initializer; this records which initializer holds each state-dict entry
ALIASES_KEY = "domgen.state_dict_aliases"


def _model_config(ckpt: dict) -> dict:
    cfg = {k: ckpt["model"][k] for k in ("arch", "encoder", "in_channels") if k in ckpt["model"]}
    return {**cfg, "encoder_weights": "none", "image_size": int((ckpt.get("preprocessing") or {}).get("image_size", 512)),
            **{k: ckpt[k] for k in ("experiment", "threshold") if k in ckpt}}


def _example(cfg: dict) -> torch.Tensor:
    return torch.zeros(1, int(cfg.get("in_channels", 1)), cfg["image_size"], cfg["image_size"])


def export_checkpoint(checkpoint: Path, fmt: str, out: Path) -> Path:
    """Export a domgen checkpoint (``model/checkpoint.pt`` of a run) to ``out`` in ``fmt``; atomic write."""
    if fmt not in FORMATS:
        raise DomgenError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    model, ckpt = load_checkpoint(checkpoint)
    model.eval()
    cfg = _model_config(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if fmt == "state-dict":
        shutil.copyfile(checkpoint, tmp)
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, _example(cfg))
        torch.jit.save(traced, str(tmp), _extra_files={"domgen.json": json.dumps(cfg)})
    else:
        _export_onnx(model, cfg, tmp)
    os.replace(tmp, out)
    return out


def _export_onnx(model: nn.Module, cfg: dict, path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    try:
        # the TorchScript-based exporter: the dynamo one needs onnxscript, which is not always installed
        torch.onnx.export(model, (_example(cfg),), str(path), dynamo=False, do_constant_folding=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}})
    except ModuleNotFoundError as exc:
        raise DomgenError(f"ONNX export needs the Python package '{exc.name}' (pip install {exc.name}); "
                          "or export with --format torchscript or state-dict") from None
    proto = onnx.load(str(path))
    stored = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    aliases = {}
    for key, value in model.state_dict().items():
        if key in stored or value.ndim == 0:  # num_batches_tracked is not part of the graph
            continue
        array = value.detach().cpu().numpy()
        twin = next((name for name, other in stored.items() if other.shape == array.shape and np.array_equal(other, array)), None)
        if twin is not None:
            aliases[key] = twin
    for key, value in ((METADATA_KEY, json.dumps(cfg)), (ALIASES_KEY, json.dumps(aliases))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _load_state(model: nn.Module, state: dict, path: Path) -> nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise DomgenError(f"{path} does not match its model config ({len(missing)} missing, {len(unexpected)} unexpected weights, "
                          f"e.g. {(missing + list(unexpected))[0]}); re-export it with `domgen export`")
    return model


def load_exported(path: Path) -> tuple[nn.Module, dict]:
    """(trainable smp model, model config) from any export of ``export_checkpoint``, chosen by the file."""
    path = Path(path)
    if not path.is_file():
        raise DomgenError(f"exported model {path} does not exist; write one with `domgen export RUN_ID --format ...`")
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(path))
        meta = {p.key: p.value for p in proto.metadata_props}
        if METADATA_KEY not in meta:
            raise DomgenError(f"{path} has no domgen model config in its ONNX metadata; export it with `domgen export`")
        cfg = json.loads(meta[METADATA_KEY])
        stored = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        names = {**{k: k for k in stored}, **json.loads(meta.get(ALIASES_KEY, "{}"))}
        model = build_model(cfg["arch"], cfg["encoder"], "none", cfg.get("in_channels", 1))
        state = {k: torch.from_numpy(np.array(stored[names[k]])) for k in model.state_dict() if k in names}
        return _load_state(model, state, path), cfg
    if path.name.endswith(FORMATS["torchscript"]):
        extra = {"domgen.json": ""}
        try:
            scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError as exc:
            raise DomgenError(f"cannot read TorchScript file {path} ({str(exc).splitlines()[0]})") from None
        if not extra["domgen.json"]:
            raise DomgenError(f"{path} has no domgen.json inside; export it with `domgen export`")
        cfg = json.loads(extra["domgen.json"])
        # rebuilt as a plain smp model: a traced module fixes its input size and is awkward to fine-tune
        model = build_model(cfg["arch"], cfg["encoder"], "none", cfg.get("in_channels", 1))
        return _load_state(model, scripted.state_dict(), path), cfg
    model, ckpt = load_checkpoint(path)
    return model, _model_config(ckpt)
