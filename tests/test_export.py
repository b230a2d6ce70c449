"""The model zoo: every export format gives back the same model, trainable, and ONNX runs the same maths."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from domgen.errors import DomgenError
from domgen.models import build_model
from domgen.families.common import export_run
from domgen.models.export import FORMATS, export_checkpoint, load_exported
from domgen.tracking import mlflow_store as store
from domgen.models.checkpoint import save_checkpoint

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
    store.configure(f"sqlite:///{tmp_path}/mlflow.db")
    exp = store.experiment_id("domgen-benchmark")
    run = MlflowClient().create_run(exp)
    with pytest.raises(DomgenError, match="no model/checkpoint.pt"):
        export_run(run.info.run_id, "onnx", tmp_path / "x.onnx")


def test_export_command_writes_the_file_from_a_run(checkpoint, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.configure(uri)
    run = MlflowClient().create_run(store.experiment_id("domgen-benchmark"))
    store.log_artifact_file(run.info.run_id, checkpoint[0], "model")
    out = tmp_path / "zoo" / "m.onnx"
    proc = subprocess.run([sys.executable, "-m", "domgen.cli", "export", run.info.run_id, "--format", "onnx", "--out", str(out),
                           "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model, cfg = load_exported(out)
    assert cfg["arch"] == "linknet"
