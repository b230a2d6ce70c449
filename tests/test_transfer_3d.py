"""`domgen transfer --dims 3`: Wang et al.'s strategies on the 3D U-Net, a tiny round through the CLI read back from MLflow."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.models import count_parameters
from domgen.models.checkpoint import load_checkpoint
from domgen.models.unet3d import MultiEncoderUNet3d
from domgen.tracking import mlflow_store as store
from stores import sqlite_store

torch.set_num_threads(1)

STRATEGIES = ("scratch", "continual", "body", "frozen", "multi-encoder")
TINY = ["--set", "volume.model.features=[4, 8]", "--set", "volume.train.patch_size=[16, 16, 8]", "--set", "volume.train.epochs=1",
        "--set", "volume.train.iterations_per_epoch=2", "--set", "volume.preprocessing.spacing=[12.0, 12.0, 12.0]",
        "--set", "volume.train.augment=false", "--set", "keep_checkpoints=[frozen, multi-encoder]", "--quiet"]


def _runs(uri: str) -> list:
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name("domgen-transfer")
    return [] if exp is None else store.runs_of(exp.experiment_id, status=None)


@pytest.fixture(scope="module")
def round_3d(tiny_suite, tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer3d")
    uri = store.configure(sqlite_store(root / "mlflow.db"))
    args = ["transfer", "--dims", "3", "--target", "A", "--pretrain", "msd", "--strategy", ",".join(STRATEGIES), "--folds", "2",
            "--suite", str(tiny_suite), "--tracking-uri", uri, *TINY]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"root": root, "uri": uri, "args": args, "output": result.output}


def _checkpoint(run, root):
    return load_checkpoint(store.download_artifact(run.info.run_id, "model/checkpoint.pt", root / run.info.run_id), dims=3)[0]


def test_3d_round_has_runs_with_per_case_metrics_and_tables(round_3d):
    runs = _runs(round_3d["uri"])
    assert all(r.info.status == "FINISHED" for r in runs)
    roles = sorted(r.data.tags["domgen.role"] for r in runs)
    assert roles == ["pretrain", "round", *["strategy"] * 10]
    for r in runs:
        if r.data.tags["domgen.role"] != "strategy":
            continue
        assert r.data.tags["domgen.dims"] == "3" and r.data.params["dims"] == "3"
        cases = pd.read_csv(store.download_artifact(r.info.run_id, "per_case.csv", round_3d["root"] / r.info.run_id))
        assert len(cases) == 2 and set(cases.nsd_mode) == {"3d"}  # inverse 2-fold: 2 of A's 4 patients tested per fold
        for metric in ("dsc", "nsd", "sen", "f1", "acc"):
            assert metric in cases and (f"{metric}_std" in r.data.metrics or cases[metric].isna().all()), metric
        assert cases.acc.between(0, 1).all()
        patients = json.loads(store.download_artifact(r.info.run_id, "train_patients.json", round_3d["root"] / "tp").read_text())
        assert set(patients["datasets"]["A"]).isdisjoint(cases.patient_id)
        # Wang et al.'s optimiser for 3D, every strategy: SGD with Nesterov momentum 0.99, lr 0.01, poly schedule
        assert r.data.params["volume_train.optimizer"] == "sgd" and r.data.params["volume_train.nesterov"] == "True"
        assert float(r.data.params["volume_train.momentum"]) == 0.99 and float(r.data.params["volume_train.lr"]) == 0.01
        assert r.data.params["volume_train.schedule"] == "poly"
    for caption in ("Table I", "Table II", "Table III"):
        assert caption in round_3d["output"]
    assert "multi-encoder" in round_3d["output"]


def test_3d_frozen_and_multi_encoder_keep_the_pretrained_encoder(round_3d):
    runs, root = _runs(round_3d["uri"]), round_3d["root"]
    pretrained = _checkpoint(next(r for r in runs if r.data.tags["domgen.role"] == "pretrain"), root)
    encoder = pretrained.encoder.state_dict()
    frozen = [r for r in runs if r.data.tags.get("domgen.strategy") == "frozen"]
    multi = [r for r in runs if r.data.tags.get("domgen.strategy") == "multi-encoder"]
    assert len(frozen) == len(multi) == 2
    for r in frozen:
        model = _checkpoint(r, root)
        assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in encoder.items())  # BatchNorm statistics included
        assert any(not torch.equal(model.decoder.state_dict()[k], v) for k, v in pretrained.decoder.state_dict().items())
        assert r.data.metrics["trainable_params"] == count_parameters(pretrained.decoder)[1]
    for r in multi:
        model = _checkpoint(r, root)
        assert isinstance(model, MultiEncoderUNet3d)
        assert all(torch.equal(model.adapted_encoder.state_dict()[k], v) for k, v in encoder.items())
        assert not any(p.requires_grad for p in model.adapted_encoder.parameters())
        assert any(not torch.equal(model.encoder.state_dict()[k], v) for k, v in encoder.items())  # its own encoder trains
        assert r.data.metrics["trainable_params"] == r.data.metrics["total_params"] - count_parameters(model.adapted_encoder)[1]


def test_3d_rerun_resumes_without_new_runs(round_3d):
    before = {r.info.run_id for r in _runs(round_3d["uri"])}
    result = CliRunner().invoke(main, round_3d["args"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {r.info.run_id for r in _runs(round_3d["uri"])} == before


def test_3d_with_a_slices_dataset_is_one_sentence_and_no_run(tiny_suite, tmp_path):
    uri = store.configure(f"sqlite:///{tmp_path}/mlflow.db")
    result = CliRunner().invoke(main, ["transfer", "--dims", "3", "--target", "D", "--strategy", "scratch", "--suite", str(tiny_suite),
                                       "--tracking-uri", uri, *TINY])
    assert result.exit_code == 2, result.output
    assert "format slices" in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.strip().splitlines() if line.strip()]) == 1
    assert _runs(uri) == []


def test_3d_refuses_the_2d_model_flags_and_2d_families_refuse_a_3d_checkpoint(round_3d, tiny_suite, tmp_path):
    from domgen.errors import DomgenError
    from domgen.models.checkpoint import load_checkpoint

    uri = store.configure(f"sqlite:///{tmp_path}/mlflow.db")
    result = CliRunner().invoke(main, ["transfer", "--dims", "3", "--target", "A", "--strategy", "scratch", "--arch", "unet",
                                       "--suite", str(tiny_suite), "--tracking-uri", uri, *TINY])
    assert result.exit_code == 2 and "--arch" in result.output and "volume" in result.output, result.output
    assert _runs(uri) == []
    multi = next(r for r in _runs(round_3d["uri"]) if r.data.tags.get("domgen.strategy") == "multi-encoder")
    path = store.download_artifact(multi.info.run_id, "model/checkpoint.pt", round_3d["root"] / "ckpt")
    with pytest.raises(DomgenError, match="3D U-Net"):
        load_checkpoint(path)
