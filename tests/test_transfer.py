"""Transfer strategies (which weights train, which stay), the poly schedule, and a tiny end-to-end round."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.errors import DomgenError
from domgen.methods.transfer import STRATEGIES, prepare_strategy
from domgen.models import build_model
from domgen.models.multi_encoder import MultiEncoderModel
from domgen.tracking import mlflow_store as store
from domgen.models.checkpoint import load_checkpoint
from domgen.training.trainer import LOSSES, TrainSettings, poly_lr, set_train_mode, train, train_step
from test_multi_encoder import tiny_slices

torch.set_num_threads(1)

MODEL_CFG = {"arch": "linknet", "encoder": "resnet18", "encoder_weights": "none", "in_channels": 1}
# strategy -> name prefixes of the parameters that must stay frozen
FROZEN = {"scratch": (), "continual": (), "body": (), "frozen": ("encoder.",), "multi-encoder": ("adapted_encoder.",)}


def pretrained_model():
    torch.manual_seed(7)
    return build_model("linknet", "resnet18", "none", 1)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_trains_and_freezes_the_right_parameters(name):
    pretrained = pretrained_model()
    before_pretrained = {k: v.clone() for k, v in pretrained.state_dict().items()}
    torch.manual_seed(0)
    model, overrides = prepare_strategy(name, None if name == "scratch" else pretrained, MODEL_CFG)
    frozen = FROZEN[name]
    for key, p in model.named_parameters():
        assert p.requires_grad == (not key.startswith(frozen) if frozen else True), key
    # initial weights: the pretrained ones, except scratch (fresh) and the Multi-encoder's new decoder
    state = model.state_dict()
    if name in ("continual", "body", "frozen"):
        assert all(torch.equal(state[k], v) for k, v in before_pretrained.items())
    elif name == "multi-encoder":
        for prefix in ("encoder.", "adapted_encoder."):
            assert all(torch.equal(state[prefix + k.removeprefix("encoder.")], v)
                       for k, v in before_pretrained.items() if k.startswith("encoder."))
    else:
        assert not torch.equal(state["encoder.conv1.weight"], before_pretrained["encoder.conv1.weight"])
    assert overrides == {"continual": {"lr": 0.01, "schedule": "poly"}, "body": {"lr": 1e-3, "schedule": "constant"}}.get(name, {})

    # one optimisation step: frozen tensors (BatchNorm statistics included) stay, trainable ones move
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    slices = tiny_slices(4)
    set_train_mode(model)
    train_step(model, optimizer, LOSSES["dice+bce"](), torch.from_numpy(slices.inputs), torch.from_numpy(slices.targets)[:, None].float())
    after = model.state_dict()
    for key, value in snapshot.items():
        if frozen and key.startswith(frozen):
            assert torch.equal(after[key], value), f"{key} changed although frozen"
    moved = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(after[k], snapshot[k])]
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert len(moved) == len(trainable)
    # the pretrained model itself is never modified
    assert all(torch.equal(pretrained.state_dict()[k], v) for k, v in before_pretrained.items())
    assert all(p.requires_grad for p in pretrained.parameters())


def test_strategy_without_pretrained_model_is_a_user_error():
    with pytest.raises(DomgenError, match="pretrained"):
        prepare_strategy("frozen", None, MODEL_CFG)
    with pytest.raises(DomgenError, match="unknown transfer strategy"):
        prepare_strategy("distill", pretrained_model(), MODEL_CFG)


def test_poly_schedule_gives_the_expected_learning_rates():
    # 0.01 * (1 - e/3)^0.9 for e = 0, 1, 2, by hand: (2/3)^0.9 = 0.694253, (1/3)^0.9 = 0.372041
    expected = [0.01, 0.00694253, 0.00372041]
    assert [poly_lr(0.01, e, 3) for e in range(3)] == pytest.approx(expected, rel=1e-5)
    _, overrides = prepare_strategy("continual", pretrained_model(), MODEL_CFG)
    settings = TrainSettings.from_config({"epochs": 3, "batch_size": 4, "patience": None, "augment": "none"}, **overrides)
    slices = tiny_slices(4)
    result = train(build_model("linknet", "resnet18", "none", 1), slices, slices, settings, progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- end to end, read back from MLflow
TINY = ["--set", "preprocessing.image_size=32", "--set", "train.epochs=1", "--set", "train.batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def tiny_round(tmp_path_factory, tiny_suite):
    """One tiny round (2 folds, 1 epoch, 32 px, resnet18) on conftest's suite: A has 4 patients."""
    root, suite = tmp_path_factory.mktemp("transfer"), tiny_suite
    uri = f"sqlite:///{root}/mlflow.db"
    args = ["transfer", "--target", "A", "--pretrain", "msd,multi", "--strategy", "scratch,frozen,multi-encoder", "--folds", "2",
            "--encoder", "resnet18", "--suite", str(suite), "--tracking-uri", uri, "--set", "pretraining.train.epochs=1", *TINY]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    store.configure(uri)
    return {"root": root, "suite": suite, "uri": uri, "args": args, "output": result.output}


def _runs(uri: str, experiment: str) -> list:
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(experiment)
    return store.runs_of(exp.experiment_id, status=None)


def test_transfer_round_is_read_back_from_mlflow(tiny_round):
    runs = _runs(tiny_round["uri"], "domgen-transfer")
    assert all(r.info.status == "FINISHED" for r in runs)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags["domgen.role"], []).append(r)
    assert len(by_role["round"]) == 1
    pretrain = {r.data.tags["domgen.pretrain"]: r for r in by_role["pretrain"]}
    assert set(pretrain) == {"msd", "multi"}
    assert pretrain["msd"].data.tags["domgen.datasets"] == "tumour"  # msd -> the synthetic tumour site
    assert pretrain["multi"].data.tags["domgen.datasets"] == "tumour+effusion"
    strategies = by_role["strategy"]
    # 2 folds x (scratch once + 2 strategies x 2 pretrained models)
    assert len(strategies) == 2 * (1 + 2 * 2)
    seen = set()
    for r in strategies:
        t, m = r.data.tags, r.data.metrics
        seen.add((t["domgen.strategy"], t["domgen.pretrain"], t["domgen.fold"]))
        assert t["mlflow.parentRunId"] == by_role["round"][0].info.run_id
        if t["domgen.strategy"] == "scratch":
            assert t["domgen.pretrain"] == "none" and "domgen.init_run" not in t
        else:
            assert t["domgen.init_run"] == pretrain[t["domgen.pretrain"]].info.run_id
        for key in ("dsc", "nsd", "sen", "f1", "acc", "trainable_params", "total_params", "seconds_per_epoch"):
            assert key in m, key
        assert 0.0 <= m["acc"] <= 1.0 and m["seconds_per_epoch"] > 0
        if t["domgen.strategy"] == "scratch":
            assert m["trainable_params"] == m["total_params"]
        else:
            assert m["trainable_params"] < m["total_params"]
    assert len(seen) == len(strategies)
    # F1 is the DSC of the confusion pooled over the test slices: recompute it from the logged per-slice table
    run = next(r for r in strategies if r.data.tags["domgen.strategy"] == "frozen")
    path = store.download_artifact(run.info.run_id, "per_slice_metrics.csv", tiny_round["root"] / "dl")
    counts = pd.read_csv(path)[["tp", "fp", "fn", "tn"]].sum()
    assert run.data.metrics["f1"] == pytest.approx(2 * counts.tp / (2 * counts.tp + counts.fp + counts.fn))
    assert run.data.metrics["acc"] == pytest.approx((counts.tp + counts.tn) / counts.sum())
    # the paper's split: each fold trains on one part and tests on all the others; each patient trains in one fold
    folds = json.loads(store.download_artifact(by_role["round"][0].info.run_id, "splits.json", tiny_round["root"] / "dl").read_text())["folds"]
    everyone = set(folds[0]["train"]) | set(folds[0]["test"])
    assert len(everyone) == 4
    for fold in folds:
        assert set(fold["train"]) | set(fold["test"]) == everyone and not set(fold["train"]) & set(fold["test"])
    assert sorted(p for fold in folds for p in fold["train"]) == sorted(everyone)


def test_multi_encoder_fold_models_are_checkpointed_and_rerun_resumes(tiny_round):
    runs = _runs(tiny_round["uri"], "domgen-transfer")
    multi = [r for r in runs if r.data.tags.get("domgen.strategy") == "multi-encoder"]
    model, ckpt = load_checkpoint(store.download_artifact(multi[0].info.run_id, "model/checkpoint.pt", tiny_round["root"] / "ckpt"))
    assert isinstance(model, MultiEncoderModel) and ckpt["strategy"] == "multi-encoder"
    # the adapted-encoder still holds the pretrained model's encoder
    pretrained, _ = load_checkpoint(store.download_artifact(multi[0].data.tags["domgen.init_run"], "model/checkpoint.pt",
                                                            tiny_round["root"] / "pre"))
    assert all(torch.equal(model.adapted_encoder.state_dict()[k], v) for k, v in pretrained.encoder.state_dict().items())
    result = CliRunner().invoke(main, tiny_round["args"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(_runs(tiny_round["uri"], "domgen-transfer")) == len(runs)


def test_report_rebuilds_the_transfer_tables(tiny_round, tmp_path):
    result = CliRunner().invoke(main, ["report", "--experiment", "domgen-transfer", "--tracking-uri", tiny_round["uri"],
                                       "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from domgen.tracking.transfer_report import transfer_tables

    parent = next(r for r in _runs(tiny_round["uri"], "domgen-transfer") if r.data.tags["domgen.role"] == "round")
    tables = transfer_tables(parent.info.run_id)
    t1 = tables["table1"]
    assert list(zip(t1.strategy, t1["pretrained model"])) == [
        ("scratch", "none"), ("frozen", "msd"), ("frozen", "multi"), ("multi-encoder", "msd"), ("multi-encoder", "multi")]
    assert {"DSC fold 0", "DSC fold 1", "DSC overall", "NSD fold 0", "NSD overall"} <= set(t1.columns)
    assert list(tables["table2"].columns) == ["strategy", "pretrained model", "SEN", "F1", "ACC"]
    assert list(tables["table3"]["pretrained model"]) == ["none", "multi", "multi"]
    assert (tmp_path / "domgen-transfer" / parent.info.run_id / "table1.tex").is_file()


def test_leave_one_out_from_a_transfer_model_and_the_four_way_comparison(tiny_round, tmp_path):
    runner, uri = CliRunner(), tiny_round["uri"]
    multi = next(r for r in _runs(uri, "domgen-transfer") if r.data.tags.get("domgen.strategy") == "multi-encoder")
    base = ["leave-one-out", "--source", "A", "--targets", "B", "--folds", "1", "--set", "split.protocol=repeated-holdout", "--suite", str(tiny_round["suite"]),
            "--tracking-uri", uri, "--set", "model.encoder=resnet18", *TINY]
    bad = runner.invoke(main, [*base, "--init-run", "0123456789abcdef"])
    assert bad.exit_code == 2 and "is not in the MLflow store" in bad.output
    parent = next(r for r in _runs(uri, "domgen-transfer") if r.data.tags["domgen.role"] == "round")
    bad = runner.invoke(main, [*base, "--init-run", parent.info.run_id])  # a run that exists but saved no model
    assert bad.exit_code == 2 and "no model/checkpoint.pt" in bad.output
    for extra in ([], ["--init-run", multi.info.run_id]):
        result = runner.invoke(main, [*base, *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    rounds = [r for r in _runs(uri, "domgen-leave-one-out") if r.data.tags.get("domgen.role") == "round" and r.info.status == "FINISHED"]
    started = [r for r in rounds if r.data.params.get("init_run") == multi.info.run_id]
    assert len(started) == 1
    # the round's fold model is the Multi-encoder and is saved as one
    fold_run = next(r for r in _runs(uri, "domgen-leave-one-out") if r.data.tags.get("mlflow.parentRunId") == started[0].info.run_id
                    and r.data.tags.get("domgen.role") == "in-domain")
    model, _ = load_checkpoint(store.download_artifact(fold_run.info.run_id, "model/checkpoint.pt", tmp_path))
    assert isinstance(model, MultiEncoderModel)
    result = runner.invoke(main, ["report", "--compare", "--tracking-uri", uri, "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "comparison" / "comparison.csv", dtype=str)
    assert [s[:3] for s in table.setting] == ["(a)", "(b)", "(c)", "(d)"]
    fresh = next(r.info.run_id for r in rounds if r.info.run_id != started[0].info.run_id)
    assert list(table["round"]) == [fresh, fresh, started[0].info.run_id, started[0].info.run_id]
    assert set(table["unseen targets"]) == {"B"}
    assert all(0.0 <= float(v) <= 1.0 for v in table["unseen DSC"])  # one fold, one target: a single value each
