"""The benchmark report as the paper prints it, on fake finished runs in a real SQLite MLflow store (no training):
ImageNet-only per-architecture means, percentages, per-encoder/per-experiment means, the upper bounds, the
figures, and `domgen report --against-paper` with its table errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.errors import DomgenError
from domgen.reports import benchmark_report as br
from domgen.tracking import mlflow_store as store
from stores import sqlite_store

# (experiment, arch, encoder, weights, sens, spec, dice); every value chosen for hand arithmetic below
RUNS = [
    ("lesion-a", "unet", "resnet18", "imagenet", 0.50, 0.99, 0.60),
    ("lesion-a", "unet", "vgg11", "imagenet", 0.60, 0.98, 0.70),
    ("lesion-b", "unet", "resnet18", "imagenet", 0.55, 0.99, 0.65),
    ("lesion-b", "unet", "vgg11", "imagenet", 0.70, 0.97, 0.80),
    ("lesion-a", "fpn", "resnet18", "imagenet", 0.40, 0.99, 0.50),
    ("lesion-a", "unet", "resnet18", "random", 0.30, 0.99, 0.40),
    ("lesion-b", "unet", "resnet18", "random", 0.45, 0.99, 0.55),
    ("lesion-a", "fpn", "resnet18", "random", 0.42, 0.99, 0.52),
]
FAILED = ("lesion-b", "fpn", "resnet18", "imagenet")  # no pair with it: lesion-b - lesion-a of fpn/resnet18/imagenet is missing


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep of RUNS plus one FAILED configuration; each run has samples and two epochs of losses."""
    tmp = tmp_path_factory.mktemp("fake-sweep")
    uri = store.configure(sqlite_store(tmp / "mlflow.db"))
    client = MlflowClient()
    exp_id = store.experiment_id(br.EXPERIMENT)
    parent = client.create_run(exp_id, tags=store.tags(family="benchmark", role="sweep", sweep_hash="s1")).info.run_id
    rng = np.random.default_rng(0)
    for i, (experiment, arch, encoder, weights, *metrics) in enumerate(RUNS + [FAILED]):
        run_tags = {**store.tags(family="benchmark", role="configuration", sweep_hash="s1", config_hash=f"h{i}", experiment=experiment,
                                 arch=arch, encoder=encoder, weights=weights), "mlflow.parentRunId": parent}
        run_id = client.create_run(exp_id, tags=run_tags).info.run_id
        if not metrics:
            client.set_tag(run_id, "domgen.error", "OutOfMemoryError: fake")
            client.set_terminated(run_id, "FAILED")
            continue
        sens, spec, dice = metrics
        store.log_metrics(run_id, {"sens": sens, "spec": spec, "dice": dice, "params_m": 1.0 + i, "train_seconds_per_epoch": 2.0,
                                   "val_seconds_per_epoch": 1.0})
        for epoch in (1, 2):
            store.log_metrics(run_id, {"train_loss": 1.0 / epoch + 0.1 * i, "val_loss": 1.2 / epoch + 0.1 * i}, step=epoch)
        truth = np.zeros((2, 16, 16), np.uint8)
        truth[:, 4:10, 4:10] = 1
        sample = tmp / f"samples-{i}.npz"
        np.savez_compressed(sample, image=rng.normal(size=(2, 16, 16)).astype(np.float16), truth=truth,
                            prediction=np.roll(truth, i % 3, axis=2), slice_id=np.asarray(["p/0", "p/1"]))
        store.log_artifact_file(run_id, sample.rename(sample.with_name("samples.npz")), "predictions")
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri, parent, br.benchmark_records(exp_id, "s1")


def _row(df: pd.DataFrame, **where) -> pd.Series:
    sel = df
    for column, value in where.items():
        sel = sel[sel[column] == value]
    assert len(sel) == 1, (where, df)
    return sel.iloc[0]


def test_per_architecture_is_over_imagenet_runs_only_in_percent(sweep):
    _, _, rec = sweep
    imagenet, random = br.per_architecture(rec, "imagenet"), br.per_architecture(rec, "random")
    unet_a = _row(imagenet, experiment="lesion-a", architecture="unet")
    # ImageNet unet on lesion-a: Dice 60 and 70 -> 65 ± 5 (population std); pooled with random (40) it would be 56.67
    assert (unet_a["Dice (%)"], unet_a["Sens (%)"], unet_a["models"]) == ("65.00 ± 5.00", "55.00 ± 5.00", 2)
    assert unet_a["Spec (%)"] == "98.50 ± 0.50"
    assert _row(imagenet, experiment="lesion-a", architecture="fpn")["Dice (%)"] == "50.00 ± 0.00"
    assert set(imagenet.weights) == {"imagenet"} and set(random.weights) == {"random"}
    assert _row(random, experiment="lesion-a", architecture="unet")["Dice (%)"] == "40.00 ± 0.00"
    assert _row(random, experiment="lesion-b", architecture="unet")["Dice (%)"] == "55.00 ± 0.00"
    assert len(imagenet) == 3 and len(random) == 3  # the failed fpn lesion-b run counts nowhere
    # Table II and the best models print percentages too
    table = br.table2(rec)
    unet_r18 = _row(table, architecture="unet", encoder="resnet18", weights="imagenet")
    assert (unet_r18["lesion-a Dice"], unet_r18["lesion-a Sens"], unet_r18["lesion-b Dice"]) == ("60.00", "50.00", "65.00")
    assert _row(table, architecture="fpn", encoder="resnet18", weights="imagenet")["lesion-b Dice"] == "failed"
    best = br.best_models(rec)
    assert _row(best, experiment="lesion-b")["Dice (%)"] == "80.00"


def test_per_encoder_and_per_experiment_means(sweep):
    _, _, rec = sweep
    encoders = br.per_encoder(rec)
    assert list(encoders.weights) == ["imagenet", "imagenet", "random"]  # ImageNet rows first, never pooled
    r18 = _row(encoders, weights="imagenet", encoder="resnet18")
    assert (r18["lesion-a Dice (%)"], r18["lesion-b Dice (%)"]) == ("55.00 ± 5.00", "65.00 ± 0.00")  # unet 60, fpn 50 | unet 65
    assert _row(encoders, weights="random", encoder="resnet18")["lesion-a Dice (%)"] == "46.00 ± 6.00"  # 40, 52
    experiments = br.per_experiment(rec)
    a = _row(experiments, experiment="lesion-a", weights="imagenet")
    # 60, 70, 50: mean 60, population std sqrt(200 / 3) = 8.165
    assert (a["Dice (%)"], a["models"], a["best Dice (%)"], a["best model"]) == ("60.00 ± 8.16", 3, "70.00", "unet/vgg11")
    assert _row(experiments, experiment="lesion-b", weights="random")["Dice (%)"] == "55.00 ± 0.00"


def test_upper_bounds_match_hand_computed_differences(sweep):
    _, _, rec = sweep
    pairs = br.upper_bound_pairs(rec)
    masks = pairs[pairs.comparison == br.LUNG_MASKS]
    # lesion-b - lesion-a: imagenet unet/resnet18 65 - 60, unet/vgg11 80 - 70; random unet/resnet18 55 - 40; fpn has no lesion-b
    got = {(r.group, r.architecture, r.encoder): r["difference (pp)"] for _, r in masks.iterrows()}
    assert got == pytest.approx({("imagenet", "unet", "resnet18"): 5.0, ("imagenet", "unet", "vgg11"): 10.0,
                                 ("random", "unet", "resnet18"): 15.0})
    pretraining = pairs[pairs.comparison == br.PRETRAINING]
    # imagenet - random: lesion-a unet 60 - 40, fpn 50 - 52; lesion-b unet 65 - 55
    got = {(r.group, r.architecture, r.encoder): r["difference (pp)"] for _, r in pretraining.iterrows()}
    assert got == pytest.approx({("lesion-a", "fpn", "resnet18"): -2.0, ("lesion-a", "unet", "resnet18"): 20.0,
                                 ("lesion-b", "unet", "resnet18"): 10.0})
    bounds = br.upper_bounds(pairs)
    imagenet_masks = _row(bounds, comparison=br.LUNG_MASKS, group="imagenet")
    assert (imagenet_masks["pairs"], imagenet_masks["mean difference (pp)"], imagenet_masks["max difference (pp)"]) == (2, 7.5, 10.0)
    assert imagenet_masks["max at"] == "unet/vgg11" and imagenet_masks["std (pp)"] == 2.5
    all_masks = _row(bounds, comparison=br.LUNG_MASKS, group="all")
    assert (all_masks["pairs"], all_masks["mean difference (pp)"], all_masks["max at"]) == (3, 10.0, "unet/resnet18 (random)")
    lesion_a = _row(bounds, comparison=br.PRETRAINING, group="lesion-a")
    assert (lesion_a["mean difference (pp)"], lesion_a["max difference (pp)"], lesion_a["max at"]) == (9.0, 20.0, "unet/resnet18")
    all_pre = _row(bounds, comparison=br.PRETRAINING, group="all")
    assert (all_pre["pairs"], all_pre["mean difference (pp)"], all_pre["max difference (pp)"]) == (3, 9.33, 20.0)  # 28 / 3


def test_full_report_writes_the_new_tables_and_figures(sweep, tmp_path):
    uri, parent, _ = sweep
    store.configure(uri)
    built = br.build_benchmark_report(tmp_path / "reports", log=False)
    folder = built["folder"]
    for name in ("per_architecture", "per_architecture_random", "per_encoder", "per_experiment", "upper_bounds", "upper_bound_pairs"):
        assert (folder / f"{name}.csv").is_file() and name in built["tables"]
    assert pd.read_csv(folder / "per_architecture_random.csv").weights.unique().tolist() == ["random"]
    for name in ("loss_curves", "masks_best_worst", "masks_unet", "masks_fpn"):
        assert (folder / f"{name}.png").stat().st_size > 5000
    # the loss band: unet on lesion-a, epoch 1, over its three configurations (train_loss 1 + 0.1 i for i = 0, 1, 5)
    rec = br.benchmark_records(MlflowClient().get_experiment_by_name(br.EXPERIMENT).experiment_id, "s1")
    bands = br.loss_bands(br.loss_curves(br.finished(rec)))
    band = _row(bands, experiment="lesion-a", arch="unet", metric="train_loss", epoch=1)
    values = np.array([1.0, 1.1, 1.5])
    assert (band["mean"], band["std"], band["configurations"]) == (pytest.approx(values.mean()), pytest.approx(values.std()), 3)


PAPER = """# hand-made excerpt for this test (not the paper's numbers)
experiment,architecture,encoder,sensitivity,specificity,dice,source
lesion segmentation A,Unet,resnet18,55.0,99.5,62.5,test excerpt
lesion-b,unet,vgg11,,,85.25,test excerpt
"""


def test_against_paper_prints_published_values_and_differences(sweep, tmp_path):
    uri, parent, rec = sweep
    path = tmp_path / "table2.csv"
    path.write_text(PAPER)
    table = br.against_paper(rec, br.load_paper_table(path))
    assert len(table) == len(RUNS)  # every finished configuration, published or not
    r18 = _row(table, experiment="lesion-a", architecture="unet", encoder="resnet18", weights="imagenet")
    # ours 50 / 99 / 60 against 55 / 99.5 / 62.5
    assert r18["difference Sens (pp)"] == pytest.approx(-5.0) and r18["difference Spec (pp)"] == pytest.approx(-0.5)
    assert r18["difference Dice (pp)"] == pytest.approx(-2.5) and r18["paper Dice (%)"] == 62.5 and r18["Dice (%)"] == pytest.approx(60)
    vgg = _row(table, experiment="lesion-b", architecture="unet", encoder="vgg11", weights="imagenet")
    assert vgg["difference Dice (pp)"] == pytest.approx(-5.25) and np.isnan(vgg["paper Sens (%)"])
    # the paper's rows are ImageNet: the random-init twin has no published value
    assert np.isnan(_row(table, experiment="lesion-a", architecture="unet", encoder="resnet18", weights="random")["paper Dice (%)"])
    assert br.against_paper_summary(table) == "2 of 8 finished configurations have a published Dice; mean |difference| 3.88 pp, largest 5.25 pp"

    result = CliRunner().invoke(main, ["report", "--experiment", br.EXPERIMENT, "--tracking-uri", uri, "--out", str(tmp_path / "out"),
                                       "--against-paper", "--paper-table", str(path)])
    assert result.exit_code == 0, result.output
    assert "| lesion-a | unet | resnet18 | imagenet | 50.0 | 55.0 | -5.0 | 99.0 | 99.5 | -0.5 | 60.0 | 62.5 | -2.5 | test excerpt |" in result.output
    assert "2 of 8 finished configurations" in result.output
    written = pd.read_csv(tmp_path / "out" / br.EXPERIMENT / parent / "against_paper.csv")
    assert len(written) == len(RUNS)


def _clean_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in result.output


@pytest.mark.parametrize("text, needles", [
    ("experiment,architecture,encoder,sensitivity,dice,source\nlung,unet,vgg11,90,95,x\n", ("has no column specificity",)),
    ("experiment,architecture,encoder,sensitivity,specificity,dice,source\nlung,unet,vgg11,90,high,95,x\n",
     ("row 1: specificity 'high' is not a percentage",)),
    ("experiment,architecture,encoder,sensitivity,specificity,dice,source\nlung,unet,vgg11,90,99,0.95e3,x\n", ("dice '0.95e3'",)),
    ("experiment,architecture,encoder,sensitivity,specificity,dice,source\nlungs,unet,vgg11,90,99,95,x\n", ("experiment 'lungs'",)),
    ("", ("is not a readable CSV",)),
])
def test_bad_paper_table_is_one_sentence(sweep, tmp_path, text, needles):
    uri, _, _ = sweep
    path = tmp_path / "bad.csv"
    path.write_text(text)
    result = CliRunner().invoke(main, ["report", "--experiment", br.EXPERIMENT, "--tracking-uri", uri, "--against-paper",
                                       "--paper-table", str(path)])
    _clean_error(result, str(path), *needles)


def test_against_paper_without_a_table_says_none_is_shipped(sweep, tmp_path, monkeypatch):
    uri, _, _ = sweep
    command = ["report", "--experiment", br.EXPERIMENT, "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--against-paper"]
    monkeypatch.setattr(br, "PAPER_TABLE", tmp_path / "not-shipped.csv")
    _clean_error(CliRunner().invoke(main, command), "not shipped", "--paper-table PATH",
                 "experiment, architecture, encoder, sensitivity, specificity, dice, source")
    # a table shipped with domgen (numbers read from a cited source) is the default
    monkeypatch.setattr(br, "PAPER_TABLE", tmp_path / "shipped.csv")
    br.PAPER_TABLE.write_text(PAPER)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0 and "2 of 8 finished configurations" in result.output, result.output
    _clean_error(CliRunner().invoke(main, ["report", "--against-paper", "--paper-table", "x.csv"]), "--experiment domgen-benchmark")
    _clean_error(CliRunner().invoke(main, ["report", "--experiment", br.EXPERIMENT, "--paper-table", "x.csv"]), "--against-paper")
    with pytest.raises(DomgenError, match="does not exist or is not a file"):
        br.load_paper_table(tmp_path / "missing.csv")
