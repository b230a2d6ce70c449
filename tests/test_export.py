"""The model zoo: every export format gives back the same model, trainable, and ONNX runs the same maths;
a benchmark sweep exports into a folder with a manifest, resumably."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.data.synthetic import ensure_synthetic_suite
from domgen.errors import DomgenError
from domgen.models import build_model
from domgen.families.common import export_run
from domgen.models.export import FORMATS, export_checkpoint, load_exported, load_from_manifest
from domgen.models.multi_encoder import MultiEncoderModel
from domgen.tracking import mlflow_store as store
from domgen.models.checkpoint import load_checkpoint, save_checkpoint
from stores import sqlite_store

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("linknet", "resnet18", "none", 1)
    # non-trivial BatchNorm statistics, so identical-tensor merging in ONNX cannot hide a wrong mapping
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 32, 32))
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    return save_checkpoint(path, model.eval(), {"arch": "linknet", "encoder": "resnet18", "encoder_weights": "none", "in_channels": 1},
                           preprocessing={"image_size": 32}, experiment="lesion-a", threshold=0.5), model


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_export_loads_back_as_the_same_trainable_model(checkpoint, fmt, tmp_path):
    path, original = checkpoint
    out = export_checkpoint(path, fmt, tmp_path / f"model{FORMATS[fmt]}")
    assert not list(tmp_path.glob("*.part"))
    model, cfg = load_exported(out)
    assert (cfg["arch"], cfg["encoder"], cfg["image_size"], cfg["experiment"]) == ("linknet", "resnet18", 32, "lesion-a")
    reference = original.state_dict()
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, reference[key]), key
    x = torch.randn(2, 1, 64, 64)  # another size than exported: the loaded model is a plain smp model
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-6)
    # fine-tuning: one optimiser step changes the weights
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    before = next(model.parameters()).detach().clone()
    model(x).mean().backward()
    optimizer.step()
    assert not torch.equal(before, next(model.parameters()))


def test_onnx_graph_computes_what_the_model_computes(checkpoint, tmp_path):
    from onnx.reference import ReferenceEvaluator

    path, original = checkpoint
    out = export_checkpoint(path, "onnx", tmp_path / "model.onnx")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = original(x).numpy()
    got = ReferenceEvaluator(str(out)).run(None, {"image": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_torchscript_export_runs_without_domgen_classes(checkpoint, tmp_path):
    path, original = checkpoint
    out = export_checkpoint(path, "torchscript", tmp_path / "model.torchscript.pt")
    scripted = torch.jit.load(str(out))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), original(x), atol=1e-6)


def test_export_errors_are_one_sentence(tmp_path, checkpoint):
    with pytest.raises(DomgenError, match="does not exist"):
        load_exported(tmp_path / "missing.onnx")
    with pytest.raises(DomgenError, match="--format"):
        export_checkpoint(checkpoint[0], "tflite", tmp_path / "x")
    store.configure(sqlite_store(tmp_path / "mlflow.db"))
    exp = store.experiment_id("domgen-benchmark")
    run = MlflowClient().create_run(exp)
    with pytest.raises(DomgenError, match="no model/checkpoint.pt"):
        export_run(run.info.run_id, "onnx", tmp_path / "x.onnx")


def test_export_command_writes_the_file_from_a_run(checkpoint, tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    store.configure(uri)
    run = MlflowClient().create_run(store.experiment_id("domgen-benchmark"))
    store.log_artifact_file(run.info.run_id, checkpoint[0], "model")
    out = tmp_path / "zoo" / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "domgen.cli", "export", run.info.run_id, "--format", "onnx", "--out", str(out),
                           "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, cfg = load_exported(out)
    assert cfg["arch"] == "linknet"


# ---------------------------------------------------------------- every architecture, the Multi-encoder
def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics (as after training), then eval mode."""
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 32, 32))
    return model.eval()


def _reload_matches(model: torch.nn.Module, model_cfg: dict, fmt: str, tmp_path, size: int = 32) -> torch.nn.Module:
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, model_cfg, preprocessing={"image_size": size}, experiment="lung")
    out = export_checkpoint(path, fmt, tmp_path / f"model{FORMATS[fmt]}")
    loaded, cfg = load_exported(out)
    assert type(loaded) is type(model) and cfg["arch"] == model_cfg["arch"]
    loaded.eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    return loaded


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("arch", ["unet", "linknet", "fpn", "pspnet"])
def test_every_architecture_reloads_with_identical_outputs(arch, fmt, tmp_path):
    torch.manual_seed(1)
    model = _trained_like(build_model(arch, "resnet18", "none", 1))
    model_cfg = {"arch": arch, "encoder": "resnet18", "encoder_weights": "none", "in_channels": 1}
    if arch == "pspnet" and fmt == "onnx":
        # ONNX pools adaptively only by whole factors: PSPNet's 1/2/3/6 bins need a feature map (input / 8) divisible by 6
        with pytest.raises(DomgenError, match="ONNX cannot express this pspnet model at input size 32"):
            _reload_matches(model, model_cfg, fmt, tmp_path)
        assert not list(tmp_path.glob("*.onnx*"))
        _reload_matches(model, model_cfg, fmt, tmp_path, size=48)
        return
    _reload_matches(model, model_cfg, fmt, tmp_path)


@pytest.mark.parametrize("arch", ["unet", "linknet", "fpn", "pspnet"])
def test_onnx_export_runs_in_onnxruntime(arch, tmp_path):
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed in this environment (pip install onnxruntime); the ONNX files "
                    "are still checked by reloading them (and Linknet's by onnx's reference evaluator)")
    import onnxruntime

    torch.manual_seed(1)
    model = _trained_like(build_model(arch, "resnet18", "none", 1))
    size = 48 if arch == "pspnet" else 32  # see test_every_architecture_reloads_with_identical_outputs
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, {"arch": arch, "encoder": "resnet18", "in_channels": 1},
                           preprocessing={"image_size": size})
    out = export_checkpoint(path, "onnx", tmp_path / "model.onnx")
    x = torch.randn(1, 1, size, size)
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_multi_encoder_round_trips_as_a_multi_encoder(fmt, tmp_path):
    torch.manual_seed(2)
    pretrained = build_model("linknet", "resnet18", "none", 1)
    model = MultiEncoderModel.from_pretrained(pretrained, "linknet", "resnet18")
    with torch.no_grad():  # the self-encoder has moved away from the adapted one, as after training
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model = _trained_like(model)
    loaded = _reload_matches(model, {"arch": "linknet", "encoder": "resnet18", "in_channels": 1}, fmt, tmp_path)
    assert loaded.domgen_model_config["multi_encoder"] is True
    assert not any(p.requires_grad for p in loaded.adapted_encoder.parameters())  # still frozen for fine-tuning
    # a fine-tuned reload saves and loads as a Multi-encoder again
    again, _ = load_checkpoint(save_checkpoint(tmp_path / "again.pt", loaded, {"arch": "unet", "encoder": "resnet18"}))
    assert isinstance(again, MultiEncoderModel)


# ---------------------------------------------------------------- a sweep's zoo
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`domgen benchmark` on lung x unet, linknet, pspnet x resnet18 x random, imagenet: 3 trained, 3 failed (offline ImageNet)."""
    root = tmp_path_factory.mktemp("zoo")
    suite = ensure_synthetic_suite(root / "synthetic", patients={"A": 0, "B": 0, "tumour": 0, "effusion": 0, "D": 5, "C": 2},
                                   slices_per_patient=4)
    uri = sqlite_store(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        result = CliRunner().invoke(main, ["benchmark", "--quiet", "--tracking-uri", uri, "--set", f"suite={suite}",
                                           "--set", "train.epochs=1", "--set", "threads=1", "--set", "evaluation.sample_slices=2",
                                           "--experiments", "lung", "--archs", "unet,linknet,pspnet", "--encoders", "resnet18",
                                           "--weights", "random,imagenet"])
    assert result.exit_code == 0, result.output
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name("domgen-benchmark")
    (parent,) = store.runs_of(exp.experiment_id, "tags.`domgen.role` = 'sweep'")
    return uri, parent.info.run_id


def _export(uri, *args):
    return CliRunner().invoke(main, ["export", "--tracking-uri", uri, "--quiet", *args])


def test_sweep_export_writes_every_finished_model_and_a_manifest(sweep, tmp_path):
    uri, sweep_id = sweep
    out = tmp_path / "zoo"
    result = _export(uri, "--sweep", sweep_id, "--out", str(out), "--format", "torchscript")
    assert result.exit_code == 0, result.output
    assert "exported 3 configurations" in result.output and "3 skipped" in result.output
    store.configure(uri)
    runs = {r.info.run_id: r for r in store.runs_of(MlflowClient().get_run(sweep_id).info.experiment_id,
                                                    f"tags.`mlflow.parentRunId` = '{sweep_id}'", status=None)}
    with open(out / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 == len(json.loads((out / "manifest.json").read_text())["entries"])
    exported = [r for r in rows if r["status"] == "exported"]
    assert sorted((r["arch"], r["weights"]) for r in exported) == [("linknet", "random"), ("pspnet", "random"), ("unet", "random")]
    for row in rows:
        run = runs[row["run_id"]]
        assert (row["experiment"], row["arch"], row["encoder"], row["weights"], row["config_hash"]) == tuple(
            run.data.tags[f"domgen.{k}"] for k in ("experiment", "arch", "encoder", "weights", "config_hash"))
        if row["status"] == "exported":
            assert run.info.status == "FINISHED"
            for key in ("dice", "sens", "spec"):
                assert float(row[f"test_{key}"]) == pytest.approx(run.data.metrics[key])
            assert (row["preprocessing.image_size"], row["preprocessing.normalisation"], row["preprocessing.mask_to_lung"],
                    row["preprocessing.in_channels"], row["preprocessing.lung_mask"]) == ("32", "fixed", "False", "1", "reference")
            assert (out / row["folder"] / "model.torchscript.pt").is_file()
        else:
            assert run.info.status == "FAILED" and row["folder"] == ""
            assert row["reason"].startswith("failed:") and "imagenet" in row["reason"]
    assert sorted(p.name for p in out.iterdir()) == sorted([r["folder"] for r in exported] + ["manifest.csv", "manifest.json"])

    # any entry loads for fine-tuning with the preprocessing it expects, computing what the run's checkpoint computes
    row = exported[0]
    model, pre = load_from_manifest(out, row["run_id"])
    assert pre["input_size"] == [32, 32] and pre["normalisation_constants"] == {"mu": -500.0, "sigma": 500.0}
    assert pre["mask_to_lung"] is False and pre["target"] == "lung" and pre["in_channels"] == 1
    same, cfg = load_exported(out / row["folder"])
    assert cfg["preprocessing"] == pre and type(same) is type(model)
    with store.artifact_dir() as tmp:
        original, _ = load_checkpoint(store.download_artifact(row["run_id"], "model/checkpoint.pt", tmp))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original.eval()(x))
    skipped = next(int(r["index"]) for r in rows if r["status"] == "skipped")
    with pytest.raises(DomgenError, match="was skipped"):
        load_from_manifest(out, skipped)


def test_sweep_export_resumes_and_skips_done_entries(sweep, tmp_path):
    uri, sweep_id = sweep
    out = tmp_path / "zoo"
    assert _export(uri, "--sweep", sweep_id, "--out", str(out)).exit_code == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    kept = (folders[0] / "model.pt").stat().st_mtime_ns
    # an interrupted export: one entry never renamed into place, a temporary folder left behind
    (folders[1] / "model.pt").rename(out / "stray.pt")
    folders[1].rename(out / f".{folders[1].name}.part")
    (out / "stray.pt").unlink()
    again = _export(uri, "--sweep", sweep_id, "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "exported 1 configurations" in again.output and "2 already there" in again.output
    assert (folders[0] / "model.pt").stat().st_mtime_ns == kept and (folders[1] / "model.pt").is_file()
    assert not list(out.glob(".*.part"))
    done = _export(uri, "--sweep", sweep_id, "--out", str(out))
    assert "exported 0 configurations" in done.output and "3 already there" in done.output
    other = _export(uri, "--sweep", sweep_id, "--out", str(out), "--format", "onnx")
    assert other.exit_code == 2 and "another --out" in other.output


def test_sweep_export_lists_a_model_its_format_cannot_express_as_skipped(sweep, tmp_path):
    uri, sweep_id = sweep
    out = tmp_path / "zoo"
    result = _export(uri, "--sweep", sweep_id, "--out", str(out), "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert "exported 2 configurations" in result.output and "4 skipped" in result.output
    entries = json.loads((out / "manifest.json").read_text())["entries"]
    (pspnet,) = [e for e in entries if e["arch"] == "pspnet" and e["weights"] == "random"]
    assert pspnet["status"] == "skipped" and pspnet["reason"].startswith("not exported as onnx: ONNX cannot express")
    assert len([p for p in out.iterdir() if p.is_dir()]) == 2 and not list(out.glob(".*"))
    model, pre = load_from_manifest(out, next(i for i, e in enumerate(entries) if e["status"] == "exported"))
    assert pre["in_channels"] == 1 and model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_sweep_export_bad_input_is_one_sentence_and_writes_nothing(sweep, tmp_path):
    uri, sweep_id = sweep
    store.configure(uri)
    client = MlflowClient()
    exp_id = client.get_run(sweep_id).info.experiment_id
    child = store.runs_of(exp_id, f"tags.`mlflow.parentRunId` = '{sweep_id}'")[0].info.run_id
    empty = client.create_run(exp_id, tags=store.tags(role="sweep", sweep_hash="none")).info.run_id
    client.set_terminated(empty, "FINISHED")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--sweep", "0123456789abcdef", "--out", str(tmp_path / "a")], "is not in the MLflow store"),
             (["--sweep", child, "--out", str(tmp_path / "b")], "is not a benchmark sweep"),
             (["--sweep", empty, "--out", str(tmp_path / "c")], "has no finished configuration"),
             (["--sweep", sweep_id, "--out", str(a_file)], "is a file"),
             (["--sweep", sweep_id], "--sweep needs --out"),
             ([child, "--sweep", sweep_id, "--out", str(tmp_path / "d")], "not both")]
    for args, message in cases:
        result = _export(uri, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    client.delete_run(empty)
