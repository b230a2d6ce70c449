"""Transfer strategies (which weights train, which stay), the poly schedule, and a tiny end-to-end round."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.errors import DomgenError
from domgen.evaluation.evaluate import EvaluationSettings, evaluate, per_case_metrics
from domgen.preprocessing.slices import SliceSet
from domgen.reports.transfer_report import volume_note
from domgen.methods.transfer import STRATEGIES, prepare_strategy
from domgen.models import build_model
from domgen.models.multi_encoder import MultiEncoderModel
from domgen.tracking import mlflow_store as store
from domgen.models.checkpoint import load_checkpoint
from domgen.training.trainer import LOSSES, TrainSettings, poly_lr, set_train_mode, train, train_step
from domgen.typed_config import typed
from test_multi_encoder import tiny_slices
from stores import sqlite_store

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
    # initial weights: the pretrained ones, except scratch (fresh), body's fresh decoder and the Multi-encoder's new decoder
    state = model.state_dict()
    if name in ("continual", "frozen"):
        assert all(torch.equal(state[k], v) for k, v in before_pretrained.items())
    elif name == "body":
        assert all(torch.equal(state[k], v) for k, v in before_pretrained.items() if k.startswith("encoder."))
        assert not torch.equal(state["segmentation_head.0.weight"], before_pretrained["segmentation_head.0.weight"])
    elif name == "multi-encoder":
        for prefix in ("encoder.", "adapted_encoder."):
            assert all(torch.equal(state[prefix + k.removeprefix("encoder.")], v)
                       for k, v in before_pretrained.items() if k.startswith("encoder."))
    else:
        assert not torch.equal(state["encoder.conv1.weight"], before_pretrained["encoder.conv1.weight"])
    assert overrides == {"continual": {"lr": 0.01, "schedule": "poly"}, "body": {"lr": 0.01, "schedule": "poly"}}.get(name, {})

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


# ---------------------------------------------------------------- continual vs body (Wang et al., Table I's two strategies)
def _paper_profile() -> dict:
    from domgen import settings
    from domgen.config import load_profile

    return settings.validate(load_profile("transfer", "paper"))


def _as_if_pretrained(model: torch.nn.Module) -> torch.nn.Module:
    """Every float tensor (BatchNorm statistics included) moved off its initial value, as pretraining would."""
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.25)
    return model


def _pretrained_and_config(dims: int):
    from domgen.families.transfer import volume_model_config
    from domgen.models.unet3d import build_model_3d

    cfg = _paper_profile()
    torch.manual_seed(7)
    if dims == 3:  # the paper profile's 3D model at 4 -> 8 filters (the same modules, a fraction of the time)
        model_cfg = volume_model_config(typed(cfg, "transfer").replace(**{"volume.model.features": [4, 8]}))
        return cfg, _as_if_pretrained(build_model_3d(model_cfg)), model_cfg, torch.randn(1, 1, 8, 8, 8)
    model_cfg = {**cfg["model"], "encoder": "resnet18"}  # the profile's Linknet with a smaller ResNet
    return cfg, _as_if_pretrained(build_model(model_cfg["arch"], "resnet18", "none", 1)), model_cfg, torch.randn(1, 1, 32, 32)


def _split(state: dict) -> tuple[dict, dict]:
    """(encoder tensors, every other tensor) of a state dict."""
    return ({k: v for k, v in state.items() if k.startswith("encoder.")}, {k: v for k, v in state.items() if not k.startswith("encoder.")})


@pytest.mark.parametrize("dims", [2, 3])
def test_continual_and_body_of_the_paper_profile_are_different_computations(dims):
    cfg, pretrained, model_cfg, x = _pretrained_and_config(dims)
    pre_encoder, pre_rest = _split(pretrained.state_dict())
    assert pre_rest  # a decoder and head to tell the strategies apart
    continual, continual_train = prepare_strategy("continual", pretrained, model_cfg, cfg["strategy_train"], seed=3)
    rng = torch.get_rng_state()
    body, body_train = prepare_strategy("body", pretrained, model_cfg, cfg["strategy_train"], seed=3)
    # the same training settings (the paper's lr 0.01, poly) and the same global random stream afterwards
    assert continual_train == body_train == {"lr": 0.01, "schedule": "poly"}
    assert torch.equal(torch.get_rng_state(), rng)
    c_encoder, c_rest = _split(continual.state_dict())
    b_encoder, b_rest = _split(body.state_dict())
    # both start from the pretrained encoder (the body), bit for bit
    assert all(torch.equal(c_encoder[k], v) and torch.equal(b_encoder[k], v) for k, v in pre_encoder.items())
    # continual keeps the pretrained decoder and head; body holds none of their float tensors
    assert c_rest.keys() == b_rest.keys() == pre_rest.keys()
    assert all(torch.equal(c_rest[k], v) for k, v in pre_rest.items())
    floats = [k for k, v in pre_rest.items() if v.is_floating_point()]
    assert floats and not any(torch.equal(b_rest[k], pre_rest[k]) for k in floats)
    # so the two compute different functions from the first step on
    continual.eval()
    body.eval()
    with torch.no_grad():
        assert not torch.allclose(continual(x), body(x))
    # every parameter of both trains (what freezes the encoder is the frozen strategy)
    assert all(p.requires_grad for p in body.parameters()) and all(p.requires_grad for p in continual.parameters())


@pytest.mark.parametrize("dims", [2, 3])
def test_body_fresh_decoder_is_seeded(dims):
    _, pretrained, model_cfg, _ = _pretrained_and_config(dims)
    torch.manual_seed(100)  # the global state must not matter: the seed alone picks the fresh head
    first = _split(prepare_strategy("body", pretrained, model_cfg, seed=5)[0].state_dict())[1]
    torch.manual_seed(200)
    again = _split(prepare_strategy("body", pretrained, model_cfg, seed=5)[0].state_dict())[1]
    other = _split(prepare_strategy("body", pretrained, model_cfg, seed=6)[0].state_dict())[1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    weights = [k for k, v in first.items() if k.endswith("weight") and v.dim() > 1]  # convolution kernels: drawn at random
    assert weights and not any(torch.equal(first[k], other[k]) for k in weights)


def test_paper_profile_trains_every_strategy_with_the_papers_optimiser():
    """Wang et al. (nnU-Net's set-up, values as experiments/transfer/paper.yaml states them): SGD, lr 0.01, Nesterov
    momentum 0.99, poly schedule with power 0.9, in 2D and in 3D, for every strategy; the quick profile's departures too."""
    from domgen.config import load_profile
    from domgen.families.transfer import strategy_train_settings, volume_train_settings

    cfg = typed(_paper_profile(), "transfer")
    assert cfg.strategies == ("scratch", "continual", "body", "frozen", "multi-encoder")
    pretrained = pretrained_model()
    for name in cfg.strategies:
        _, overrides = prepare_strategy(name, None if name == "scratch" else pretrained, MODEL_CFG, cfg.strategy_train)
        for run in (strategy_train_settings(cfg, 0, overrides), volume_train_settings(cfg, 0, overrides)):
            assert (run.optimizer, run.lr, run.momentum, run.nesterov, run.schedule, run.poly_power) == ("sgd", 0.01, 0.99, True, "poly", 0.9), name
    quick = typed(load_profile("transfer", "quick"), "transfer")
    for name in quick.strategies:
        _, overrides = prepare_strategy(name, None if name == "scratch" else pretrained, MODEL_CFG, quick.strategy_train)
        run = strategy_train_settings(quick, 0, overrides)
        expected = ("adam", 0.01, "poly") if name in ("continual", "body") else ("adam", 0.001, "constant")
        assert (run.optimizer, run.lr, run.schedule) == expected, name
        volume = volume_train_settings(quick, 0, overrides)  # 3D keeps the paper's SGD; lr and schedule follow strategy_train
        assert (volume.optimizer, volume.momentum, volume.nesterov) == ("sgd", 0.99, True)
        assert (volume.lr, volume.schedule) == (0.01, "poly"), name


# ---------------------------------------------------------------- per-case metrics (Wang et al. report per scan)
def _case_slices():
    """Case p: three 8x8 slices at indices 3, 4, 6 (5 dropped), 0.7 mm pixels, 2.5 mm apart; case q: slices of two
    sizes; case r: no slice spacing. Truth a 3x3 block, prediction the block one column to the right."""
    def block(n, col):
        m = np.zeros((n, n), np.uint8)
        m[2:5, col:col + 3] = 1
        return m
    truths = [block(8, 2)] * 3 + [block(8, 2), block(6, 2)] + [block(8, 2)]
    probs = [block(8, 3).astype(np.float32)] * 3 + [block(8, 3).astype(np.float32), block(6, 2).astype(np.float32),
                                                     block(8, 3).astype(np.float32)]
    ids = ["X/p/0003", "X/p/0004", "X/p/0006", "X/q/0000", "X/q/0001", "X/r/0000"]
    n = len(ids)
    slices = SliceSet(np.zeros((n, 1, 8, 8), np.float32), np.zeros((n, 8, 8), np.uint8), ids, [i.split("/")[1] for i in ids], ["X"] * n,
                      truths, truths, [(0.7, 0.7)] * n, slice_spacings=[2.5] * 5 + [None])
    return probs, slices


def test_per_case_nsd_is_monais_3d_nsd_of_the_stacked_case_and_dsc_is_pooled():
    from monai.metrics import compute_surface_dice

    probs, slices = _case_slices()
    settings = EvaluationSettings(nsd_tolerance_mm=3.0)
    _, per_slice = evaluate(probs, slices, 0.5, settings)
    cases = per_case_metrics(probs, slices, 0.5, settings, per_slice).set_index("patient_id")
    # case p by hand: 6 of 9 pixels overlap on each of 3 slices -> TP 18, FP 9, FN 9, TN 3 * 64 - 36
    p = cases.loc["p"]
    assert (p.tp, p.fp, p.fn, p.tn) == (18, 9, 9, 156)
    assert p.dsc == pytest.approx(2 / 3) and p.f1 == pytest.approx(2 / 3) and p.sen == pytest.approx(2 / 3)
    assert p.acc == pytest.approx(174 / 192)
    # MONAI on the hand-built volume: slices at z = 0, 1, 3 (index 5 left empty), spacing (2.5, 0.7, 0.7)
    truth, pred = np.zeros((4, 8, 8), bool), np.zeros((4, 8, 8), bool)
    for z, i in zip((0, 1, 3), range(3)):
        truth[z], pred[z] = slices.truths[i] > 0, probs[i] > 0.5
    onehot = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
    expected = float(compute_surface_dice(onehot(pred), onehot(truth), class_thresholds=[3.0], spacing=[2.5, 0.7, 0.7]))
    assert p.nsd == pytest.approx(expected) and p.nsd_mode == "3d" and np.isfinite(p.hd95)
    assert p.nsd_slice == pytest.approx(per_slice[per_slice.patient_id == "p"].nsd.mean())
    # cases whose slices make no volume take their mean per-slice NSD, and say why
    assert cases.loc["q", "nsd_mode"] == "per-slice: slice sizes differ"
    assert cases.loc["q", "nsd"] == pytest.approx(per_slice[per_slice.patient_id == "q"].nsd.mean())
    assert cases.loc["r", "nsd_mode"] == "per-slice: slice spacing unknown"
    note = volume_note(cases.reset_index())
    assert "q (slice sizes differ)" in note and "r (slice spacing unknown)" in note and "p (" not in note


def test_a_case_with_no_lesion_in_truth_or_prediction_has_no_dsc_and_leaves_the_mean():
    # the 0/0 convention of the per-case tables: case e is empty in truth and prediction; case f by hand: truth 4 pixels,
    # prediction 2 of them and 2 others -> TP 2, FP 2, FN 2, TN 58: DSC = 4 / 8 = 0.5, accuracy (2 + 58) / 64
    from domgen.evaluation.evaluate import case_summary

    empty, truth, pred = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32)
    truth[0, 0:4] = 1
    pred[0, 2:6] = 1.0
    slices = SliceSet(np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 8, 8), np.uint8), ["X/e/0000", "X/f/0000"], ["e", "f"],
                      ["X", "X"], [empty, truth], [empty, truth], [(1.0, 1.0)] * 2, slice_spacings=[2.0, 2.0])
    cases = per_case_metrics([np.zeros((8, 8), np.float32), pred], slices, 0.5, EvaluationSettings(surface=False)).set_index("patient_id")
    assert np.isnan(cases.loc["e", "dsc"]) and np.isnan(cases.loc["e", "f1"]) and cases.loc["e", "acc"] == 1.0
    assert cases.loc["f", "dsc"] == pytest.approx(0.5) and cases.loc["f", "acc"] == pytest.approx(60 / 64)
    summary = case_summary(cases.reset_index())
    assert summary["dsc"] == pytest.approx(0.5) and summary["dsc_std"] == pytest.approx(0.0) and summary["n_cases"] == 2
    assert summary["acc"] == pytest.approx((1.0 + 60 / 64) / 2)


# ---------------------------------------------------------------- end to end, read back from MLflow
TINY = ["--set", "preprocessing.image_size=32", "--set", "train.epochs=1", "--set", "train.batch_size=4", "--quiet"]


@pytest.fixture(scope="module")
def tiny_round(tmp_path_factory, tiny_suite):
    """One tiny round (2 folds from a splits file, 1 epoch, 32 px, resnet18) on conftest's suite: A has 4 patients."""
    root, suite = tmp_path_factory.mktemp("transfer"), tiny_suite
    uri = sqlite_store(root / "mlflow.db")
    splits = root / "splits.json"
    splits.write_text(json.dumps({"folds": [{"fold": 0, "train": ["A_p000", "A_p001"], "val": [], "test": ["A_p002", "A_p003"]},
                                            {"fold": 1, "train": ["A_p002", "A_p003"], "val": [], "test": ["A_p000", "A_p001"]}]}))
    args = ["transfer", "--target", "A", "--pretrain", "msd,multi", "--strategy", "scratch,frozen,multi-encoder", "--splits-file",
            str(splits), "--encoder", "resnet18", "--suite", str(suite), "--tracking-uri", uri, "--set", "pretraining.train.epochs=1", *TINY]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    store.configure(uri)
    return {"root": root, "suite": suite, "uri": uri, "args": args, "output": result.output, "splits": splits}


def _runs(uri: str, experiment: str) -> list:
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(experiment)
    return store.runs_of(exp.experiment_id, status=None)


def test_transfer_round_is_read_back_from_mlflow(tiny_round):
    from domgen.families import common

    folds_file = json.loads(tiny_round["splits"].read_text())["folds"]
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
        for key in ("dsc", "nsd", "slice_nsd", "sen", "f1", "acc", "pooled_f1", "trainable_params", "total_params", "seconds_per_epoch"):
            assert key in m, key
        assert 0.0 <= m["acc"] <= 1.0 and m["seconds_per_epoch"] > 0
        if t["domgen.strategy"] == "scratch":
            assert m["trainable_params"] == m["total_params"]
        else:
            assert m["trainable_params"] < m["total_params"]
    assert len(seen) == len(strategies)
    # pooled F1 is the DSC of the confusion pooled over the test slices: recompute it from the logged per-slice table
    run = next(r for r in strategies if r.data.tags["domgen.strategy"] == "frozen")
    path = store.download_artifact(run.info.run_id, "per_slice_metrics.csv", tiny_round["root"] / "dl")
    counts = pd.read_csv(path)[["tp", "fp", "fn", "tn"]].sum()
    assert run.data.metrics["pooled_f1"] == pytest.approx(2 * counts.tp / (2 * counts.tp + counts.fp + counts.fn))
    assert run.data.metrics["pooled_acc"] == pytest.approx((counts.tp + counts.tn) / counts.sum())
    # the run's DSC, NSD, F1, ACC: mean ± std over its test cases, one row each in per_case.csv, NSD in 3D
    cases = pd.read_csv(store.download_artifact(run.info.run_id, "per_case.csv", tiny_round["root"] / "dl"))
    assert sorted(cases.patient_id) == sorted(json.loads(tiny_round["splits"].read_text())["folds"][int(run.data.tags["domgen.fold"])]["test"])
    assert set(cases.nsd_mode) == {"3d"} and run.data.metrics["n_cases_nsd_per_slice"] == 0
    for key in ("dsc", "nsd", "f1", "acc"):
        values = cases[key].dropna()
        assert run.data.metrics[key] == pytest.approx(values.mean()) and run.data.metrics[f"{key}_std"] == pytest.approx(values.std(ddof=0))
    # each training run records the patients its model saw: the fold's train part, or each pretraining dataset's train + val
    seen = json.loads(store.download_artifact(run.info.run_id, "train_patients.json", tiny_round["root"] / "dl").read_text())
    assert seen == {"datasets": {"A": folds_file[int(run.data.tags["domgen.fold"])]["train"]}, "init_run": run.data.tags["domgen.init_run"]}
    # the paper's split: each fold trains on one part and tests on all the others; each patient trains in one fold
    folds = json.loads(store.download_artifact(by_role["round"][0].info.run_id, "splits.json", tiny_round["root"] / "dl").read_text())["folds"]
    assert folds == folds_file  # the splits file's folds, and its contents (not its path) in the round's identity
    params = by_role["round"][0].data.params
    assert params["content_digest.splits_file"] == common.file_digest(tiny_round["splits"])
    everyone = set(folds[0]["train"]) | set(folds[0]["test"])
    assert len(everyone) == 4
    for fold in folds:
        assert set(fold["train"]) | set(fold["test"]) == everyone and not set(fold["train"]) & set(fold["test"])
    assert sorted(p for fold in folds for p in fold["train"]) == sorted(everyone)


@pytest.mark.parametrize("folds, message", [
    ([{"fold": 0, "train": ["A_p000"], "val": [], "test": ["A_p009"]}], "names patients not in A (A_p009)"),
    ([{"fold": 0, "train": ["A_p000"], "val": [], "test": ["A_p001"]}, {"fold": 1, "train": ["A_p000"], "val": [], "test": ["A_p002"]}],
     "trains on patient A_p000 in folds 0 and 1"),
    ([{"fold": 0, "train": [], "val": [], "test": ["A_p001"]}], "fold 0 has no train patients"),
    ([{"fold": 0, "train": ["A_p000"], "val": [], "test": ["A_p000"]}], "is in both train and test of fold 0"),
])
def test_a_wrong_transfer_splits_file_is_one_sentence_and_no_run(tiny_suite, tmp_path, folds, message):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"folds": folds}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = CliRunner().invoke(main, ["transfer", "--target", "A", "--strategy", "scratch", "--splits-file", str(path), "--suite",
                                       str(tiny_suite), "--tracking-uri", uri, *TINY])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    exp = store.get_experiment("domgen-transfer")
    assert exp is None or not store.runs_of(exp.experiment_id, status=None)


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
    from domgen.reports.transfer_report import transfer_tables

    parent = next(r for r in _runs(tiny_round["uri"], "domgen-transfer") if r.data.tags["domgen.role"] == "round")
    tables = transfer_tables(parent.info.run_id)
    t1 = tables["table1"]
    assert list(zip(t1.strategy, t1["pretrained model"])) == [
        ("scratch", "none"), ("frozen", "msd"), ("frozen", "multi"), ("multi-encoder", "msd"), ("multi-encoder", "multi")]
    assert {"DSC fold 0", "DSC fold 1", "DSC overall", "NSD fold 0", "NSD overall", "NSD per slice overall"} <= set(t1.columns)
    assert "note" not in tables  # every synthetic case is a volume: no per-slice fallback to name
    assert list(tables["table2"].columns) == ["strategy", "pretrained model", "SEN", "F1", "ACC"]
    assert list(tables["table3"]["pretrained model"]) == ["none", "multi", "multi"]
    assert (tmp_path / "domgen-transfer" / parent.info.run_id / "table1.tex").is_file()


def test_trained_patients_of_a_run_logged_before_train_patients_json(tiny_round):
    # an older fold run has no train_patients.json: its fold's train part comes from the round's splits.json
    from domgen.families.common import trained_patients

    runs = _runs(tiny_round["uri"], "domgen-transfer")
    parent = next(r for r in runs if r.data.tags["domgen.role"] == "round")
    pre = next(r for r in runs if r.data.tags.get("domgen.pretrain") == "msd" and r.data.tags["domgen.role"] == "pretrain")
    old = MlflowClient().create_run(parent.info.experiment_id, tags={
        "mlflow.parentRunId": parent.info.run_id, "domgen.family": "transfer", "domgen.phase": "transfer", "domgen.fold": "1",
        "domgen.target": "A", "domgen.init_run": pre.info.run_id})
    try:
        seen = trained_patients(old.info.run_id)
    finally:
        MlflowClient().delete_run(old.info.run_id)  # out of the runs the other tests count
    assert seen["A"] == set(json.loads(tiny_round["splits"].read_text())["folds"][1]["train"])
    assert seen["tumour"] == trained_patients(pre.info.run_id)["tumour"] and "effusion" not in seen


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
    # the transfer fold model trained on A patients that the leave-one-out split tests in-domain: refused, no run made
    from domgen.families.common import trained_patients

    seen = trained_patients(multi.info.run_id)
    fold_train = json.loads(tiny_round["splits"].read_text())["folds"][int(multi.data.tags["domgen.fold"])]["train"]
    assert seen["A"] == set(fold_train) and {"tumour", "effusion"} <= set(seen)  # the fold, then its pretrained model
    loo = store.get_experiment("domgen-leave-one-out")
    before = len(store.runs_of(loo.experiment_id, status=None)) if loo else 0
    bad = runner.invoke(main, [*base, "--set", "split.protocol=kfold", "--folds", "2", "--init-run", multi.info.run_id])
    assert bad.exit_code == 2 and f"was trained on A patients {', '.join(sorted(fold_train))}" in bad.output, bad.output
    assert "splits_file" in bad.output
    loo = store.get_experiment("domgen-leave-one-out")
    assert (len(store.runs_of(loo.experiment_id, status=None)) if loo else 0) == before
    # the fix: a leave-one-out splits file that trains on the transfer fold's train patients and tests the others
    rest = sorted({"A_p000", "A_p001", "A_p002", "A_p003"} - set(fold_train))
    split = tmp_path / "loo_splits.json"
    split.write_text(json.dumps({"folds": [{"fold": 0, "train": sorted(fold_train), "val": rest[:1], "test": rest[1:]}]}))
    base = [*base, "--set", f"splits_file={split}"]
    for extra in ([], ["--init-run", multi.info.run_id]):
        result = runner.invoke(main, [*base, *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        # the transfer profile feeds whole slices, leave-one-out lung-masked ones: said for the transferred start only
        note = "Note: the start model was trained on other input than this round's (mask_to_lung false -> true)."
        assert (note in result.output) == bool(extra), result.output
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
