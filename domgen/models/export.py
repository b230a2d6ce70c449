"""The model zoo: export a benchmark run's model (state dict, TorchScript, ONNX) and load any export back
as a trainable smp model for fine-tuning (Bizopoulos et al. ship their 600 models for use without a GPU).

Every export carries the domgen model config (architecture, encoder, channels, the Multi-encoder flag)
beside the weights: the checkpoint dict itself, a ``domgen.json`` extra file in TorchScript,
``metadata_props`` in ONNX.

A zoo folder (``domgen export --sweep``) holds one entry folder per configuration - the model file and
``entry.json`` (run, grid cell, config hash, test metrics, the preprocessing the model expects) - and a
manifest (``manifest.json``, ``manifest.csv``) listing every entry, exported or skipped with its reason.
Each entry folder is written under a temporary name and renamed, so a folder that exists is complete.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from domgen.config import flatten
from domgen.errors import DomgenError
from domgen.models import build_model
from domgen.models.checkpoint import load_checkpoint

FORMATS = {"state-dict": ".pt", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
METADATA_KEY = "domgen.model"
# ONNX merges identical tensors into one initializer; this records which initializer holds each state-dict entry
ALIASES_KEY = "domgen.state_dict_aliases"
# a zoo folder: one entry folder per configuration and the manifest of them all
ENTRY_FILE = "entry.json"
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"


def _model_config(ckpt: dict) -> dict:
    cfg = {k: ckpt["model"][k] for k in ("arch", "encoder", "in_channels", "multi_encoder") if k in ckpt["model"]}
    return {**cfg, "encoder_weights": "none", "image_size": int((ckpt.get("preprocessing") or {}).get("image_size", 512)),
            **{k: ckpt[k] for k in ("experiment", "threshold") if k in ckpt}}


def build_from_config(cfg: dict) -> nn.Module:
    """An untrained model of the exported config: the Multi-encoder where its flag is set, else the smp model."""
    if cfg.get("multi_encoder"):
        from domgen.models.multi_encoder import MultiEncoderModel

        model = MultiEncoderModel(cfg["arch"], cfg["encoder"], "none", int(cfg.get("in_channels", 1)))
    else:
        model = build_model(cfg["arch"], cfg["encoder"], "none", int(cfg.get("in_channels", 1)))
    # save_checkpoint records this, so a fine-tuned model is saved (and exported) as what it is
    model.domgen_model_config = {**getattr(model, "domgen_model_config", {}),
                                 **{k: cfg[k] for k in ("arch", "encoder", "in_channels", "multi_encoder") if k in cfg},
                                 "encoder_weights": "none"}
    return model


def _example(cfg: dict) -> torch.Tensor:
    return torch.zeros(1, int(cfg.get("in_channels", 1)), cfg["image_size"], cfg["image_size"])


def export_checkpoint(checkpoint: Path, fmt: str, out: Path) -> Path:
    """Export a domgen checkpoint (``model/checkpoint.pt`` of a run) to ``out`` in ``fmt``; atomic write."""
    return _export(checkpoint, fmt, out)[0]


def _export(checkpoint: Path, fmt: str, out: Path) -> tuple[Path, dict]:
    """(written file, its model config)."""
    if fmt not in FORMATS:
        raise DomgenError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    model, ckpt = load_checkpoint(checkpoint)
    model.eval()
    cfg = _model_config(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        if fmt == "state-dict":
            shutil.copyfile(checkpoint, tmp)
        elif fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(model, _example(cfg))
            torch.jit.save(traced, str(tmp), _extra_files={"domgen.json": json.dumps(cfg)})
        else:
            _export_onnx(model, cfg, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed export leaves no partial file
    return out, cfg


def _export_onnx(model: nn.Module, cfg: dict, path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    def export(axes: dict) -> None:
        # the TorchScript-based exporter: the dynamo one needs onnxscript, which is not always installed
        torch.onnx.export(model, (_example(cfg),), str(path), dynamo=False, do_constant_folding=False,
                          input_names=["image"], output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})

    try:
        try:
            export({0: "batch", 2: "height", 3: "width"})
        except torch.onnx.errors.OnnxExporterError:
            # PSPNet's adaptive pooling needs a known input size: the graph then takes image_size x image_size only
            export({0: "batch"})
    except ModuleNotFoundError as exc:
        raise DomgenError(f"ONNX export needs the Python package '{exc.name}' (pip install {exc.name}); "
                          "or export with --format torchscript or state-dict") from None
    except torch.onnx.errors.OnnxExporterError as exc:
        raise DomgenError(f"ONNX cannot express this {cfg.get('arch')} model at input size {cfg['image_size']} "
                          f"({str(exc).splitlines()[0][:160]}); export it with --format torchscript or state-dict") from None
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
        else:  # a weight the forward pass never uses (PSPNet's encoder layers below its depth): kept for fine-tuning
            proto.graph.initializer.append(numpy_helper.from_array(array, key))
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
    """(trainable model, model config) from any export of ``export_checkpoint``, chosen by the file; a zoo entry
    folder loads its model file, and its config carries the entry's ``preprocessing`` too."""
    path = Path(path)
    if path.is_dir():
        entry = read_entry(path)
        model, cfg = load_exported(path / entry["file"])
        return model, {**cfg, "preprocessing": entry["preprocessing"]}
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
        model = build_from_config(cfg)
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
        # rebuilt as a plain model: a traced module fixes its input size and is awkward to fine-tune
        model = build_from_config(cfg)
        return _load_state(model, scripted.state_dict(), path), cfg
    model, ckpt = load_checkpoint(path)
    return model, _model_config(ckpt)


# ---------------------------------------------------------------- zoo folders (``domgen export --sweep``)
def read_entry(folder: Path) -> dict:
    """The ``entry.json`` of a zoo entry folder."""
    folder = Path(folder)
    try:
        entry = json.loads((folder / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        raise DomgenError(f"{folder} is not a domgen zoo entry (no readable {ENTRY_FILE}); pass an entry folder that "
                          "`domgen export --sweep` wrote") from None
    if not isinstance(entry, dict) or not (folder / str(entry.get("file", ""))).is_file():
        raise DomgenError(f"{folder / ENTRY_FILE} names no model file in its folder; export the sweep again with `domgen export --sweep`")
    return entry


def entry_done(folder: Path, fmt: str, config_hash: str) -> bool:
    """Whether ``folder`` already holds this configuration exported in ``fmt`` (a folder that exists is complete)."""
    try:
        entry = read_entry(folder)
    except DomgenError:
        return False
    return entry.get("format") == fmt and entry.get("config_hash") == config_hash


def write_entry(folder: Path, checkpoint: Path, fmt: str, entry: dict) -> dict:
    """Export ``checkpoint`` in ``fmt`` into the entry folder ``folder`` with ``entry.json``; written under a
    temporary name and renamed, so an interrupted export leaves no half-written entry."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.part")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export
    tmp.mkdir(parents=True)
    try:
        name = f"model{FORMATS[fmt]}"
        _, cfg = _export(checkpoint, fmt, tmp / name)
        entry = {**entry, "format": fmt, "file": name, "model": cfg,
                 "preprocessing": {**entry.get("preprocessing", {}), "in_channels": int(cfg.get("in_channels", 1))}}
        (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=2, sort_keys=True, default=str))
        if folder.exists():  # an entry of another format or an older attempt of the same configuration
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


# manifest.csv columns in front; metrics and preprocessing follow, flattened
MANIFEST_COLUMNS = ("index", "status", "folder", "run_id", "experiment", "arch", "encoder", "weights", "config_hash", "params_m", "reason")


def write_manifest(directory: Path, header: dict, entries: list[dict]) -> tuple[Path, Path]:
    """``manifest.json`` (``header`` plus every entry) and ``manifest.csv`` (one row per entry), each written atomically."""
    directory = Path(directory)
    rows = []
    for i, entry in enumerate(entries):
        row = {k: "" if entry.get(k) is None else entry[k] for k in MANIFEST_COLUMNS if k != "index"}
        row.update({f"test_{k}": v for k, v in (entry.get("metrics") or {}).items()})
        row.update({f"preprocessing.{k}": v for k, v in flatten(entry.get("preprocessing") or {}).items()})
        rows.append({"index": i, **row})
    columns = list(MANIFEST_COLUMNS) + sorted({k for row in rows for k in row} - set(MANIFEST_COLUMNS))
    json_path, csv_path = directory / MANIFEST_JSON, directory / MANIFEST_CSV
    tmp = directory / f".{MANIFEST_CSV}.part"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    tmp = directory / f".{MANIFEST_JSON}.part"
    tmp.write_text(json.dumps({**header, "entries": entries}, indent=2, sort_keys=True, default=str))
    os.replace(tmp, json_path)
    return json_path, csv_path


def read_manifest(directory: Path) -> dict:
    """The ``manifest.json`` of a zoo folder."""
    path = Path(directory) / MANIFEST_JSON
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise DomgenError(f"{path} does not exist or is not readable; pass a folder written by `domgen export --sweep` "
                          "(run it again to finish an interrupted export)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), list):
        raise DomgenError(f"{path} has no list of entries; export the sweep again with `domgen export --sweep`")
    return manifest


def load_from_manifest(directory: Path, which: int | str) -> tuple[nn.Module, dict]:
    """(trainable model, the preprocessing it expects) of one manifest entry: ``which`` is its index in the
    manifest, its run id or its config hash."""
    directory = Path(directory)
    entries = read_manifest(directory)["entries"]
    if isinstance(which, int) or str(which).isdigit():
        index = int(which)
        if not 0 <= index < len(entries):
            raise DomgenError(f"{directory / MANIFEST_JSON} has entries 0..{len(entries) - 1}, not {index}")
        entry = entries[index]
    else:
        found = [e for e in entries if which in (e.get("run_id"), e.get("config_hash"))]
        if not found:
            raise DomgenError(f"no entry of {directory / MANIFEST_JSON} has run id or config hash {which}; see {MANIFEST_CSV}")
        entry = found[0]
    if entry.get("status") != "exported":
        raise DomgenError(f"entry {entry.get('run_id')} ({entry.get('experiment')} | {entry.get('arch')} | {entry.get('encoder')}) "
                          f"was skipped ({entry.get('reason')}); pick an exported entry of {MANIFEST_CSV}")
    model, cfg = load_exported(directory / entry["folder"])
    return model, cfg["preprocessing"]
