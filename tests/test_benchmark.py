"""The benchmark family (Bizopoulos et al.): grid, metric conventions, failures, resume after kill -9, report."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from domgen.config import apply_overrides, load_profile
from domgen.data.synthetic import ensure_synthetic_suite
from domgen.families import benchmark as bm
from domgen.preprocessing.slices import SliceSet
from domgen.tracking import mlflow_store as store
from domgen.typed_config import typed
from stores import sqlite_store

torch.set_num_threads(1)
SITES = {"A": 0, "B": 0, "tumour": 0, "effusion": 0, "D": 5, "C": 2}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # no network here: ImageNet weights fail at once instead of after Hugging Face's retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return ensure_synthetic_suite(tmp_path_factory.mktemp("suite") / "synthetic", patients=SITES, slices_per_patient=4)


def tiny(suite, **grid):
    cfg = apply_overrides(load_profile("benchmark", "quick"),
                          [f"suite={suite}", "train.epochs=1", "threads=1", "evaluation.sample_slices=2"])
    return bm.resolve(cfg, **grid)


def test_full_grid_is_600_configurations_with_unique_hashes():
    for profile in ("quick", "paper"):
        cfg = typed(load_profile("benchmark", profile), bm.FAMILY)
        configurations = bm.expand_grid(cfg)
        assert len(configurations) == 3 * 4 * 25 * 2 == 600
        assert len({bm.configuration_hash(cfg, c) for c in configurations}) == 600
    cfg = typed(load_profile("benchmark", "quick"), bm.FAMILY)
    one = bm.Configuration("lesion-b", "fpn", "dpn68", "imagenet")
    # a configuration is the same run whichever grid subset or thread count found it ...
    subset = bm.resolve(cfg, experiments="lesion-b", archs="fpn", encoders="dpn68", weights="imagenet")
    assert bm.expand_grid(subset) == [one]
    assert bm.configuration_hash(subset, one) == bm.configuration_hash(cfg.replace(threads=4), one) == bm.configuration_hash(cfg, one)
    # ... and another run when what it computes changes
    assert bm.configuration_hash(cfg.replace(**{"train.epochs": 3}), one) != bm.configuration_hash(cfg, one)


class FixedLogits(torch.nn.Module):
    """Returns stored logits; the input's first pixel says which slice it is."""

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("logits", torch.from_numpy(logits))

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()][:, None]


def test_paper_metrics_match_hand_computed_values():
    s = 8
    truth = np.zeros((3, s, s), np.uint8)
    logits = np.full((3, s, s), -5.0, np.float32)
    truth[0, 0, :4] = 1  # 4 lesion pixels; predicted: 2 of them and 1 false positive
    logits[0, 0, :2] = 5.0
    logits[0, 5, 5] = 5.0
    logits[0, 6, 6] = 0.0  # probability exactly 0.5 is not above the 0.5 threshold
    truth[1, 2, :3] = 1  # missed entirely: TP + FP = 0, so every metric is 1 (the paper's rule)
    inputs = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, s, s), np.float32)
    test = SliceSet(inputs, truth, ["p/0", "p/1", "p/2"], ["p"] * 3, ["T"] * 3, list(truth), list(truth), [(1.0, 1.0)] * 3)
    cfg = typed(load_profile("benchmark", "quick"), bm.FAMILY)
    metrics, probs = bm.score(FixedLogits(logits), test, cfg)
    eps = 1e-5  # Eq. 4: 2TP / (2TP + FP + FN + eps), eps in the denominator only
    dice0 = 2 * 2 / (2 * 2 + 1 + 2 + eps)
    assert metrics["dice"] == pytest.approx((dice0 + 1 + 1) / 3, abs=1e-12)
    assert metrics["sens"] == pytest.approx((2 / 4 + 1 + 1) / 3, abs=1e-12)
    assert metrics["spec"] == pytest.approx((59 / 60 + 1 + 1) / 3, abs=1e-12)
    # without the rule, one patient pooled over its slices: TP 2, FP 1, FN 2 + 3 (the missed slice)
    assert metrics["dice_pooled"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 5 + eps), abs=1e-12)
    assert probs.shape == (3, s, s)


def _runs(db_uri: str, status: str | None = None) -> list:
    store.configure(db_uri)
    exp = MlflowClient().get_experiment_by_name(bm.EXPERIMENT)
    return store.runs_of(exp.experiment_id, "tags.`domgen.role` = 'configuration'", status=status) if exp else []


@pytest.fixture(scope="module")
def finished_sweep(suite, tmp_path_factory):
    """lung and lesion-b x unet, pspnet x resnet18 x random, imagenet: 4 trainings, 4 offline ImageNet failures."""
    uri = sqlite_store(tmp_path_factory.mktemp("sweep") / "mlflow.db")
    cfg = tiny(suite, experiments="lung,lesion-b", archs="unet,pspnet", encoders="resnet18", weights="random,imagenet")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        store.configure(uri)
        result = bm.run_benchmark(cfg, progress=False)
    return uri, cfg, result


def test_failures_are_recorded_with_their_reason_and_do_not_stop_the_sweep(finished_sweep):
    uri, cfg, result = finished_sweep
    assert result.finished == 4 and len(result.failed) == 4
    assert all("imagenet" in reason and "DomgenError" in reason for reason in result.failed.values())
    failed = _runs(uri, "FAILED")
    assert sorted(r.data.tags["domgen.weights"] for r in failed) == ["imagenet"] * 4
    assert all("could not get the imagenet weights" in r.data.tags["domgen.error"] for r in failed)
    parent = MlflowClient().get_run(result.parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_failed"] == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in _runs(uri)} == {result.parent_id}


def test_rerun_skips_done_and_failed_and_retry_failed_runs_them_again(finished_sweep):
    uri, cfg, _ = finished_sweep
    store.configure(uri)
    again = bm.run_benchmark(cfg, progress=False)
    assert (again.finished, again.skipped, len(again.failed)) == (0, 4, 4)
    assert len(_runs(uri)) == 8  # nothing new
    retried = bm.run_benchmark(cfg, retry_failed=True, progress=False)
    assert (retried.finished, retried.skipped, len(retried.failed)) == (0, 4, 4)
    assert len(_runs(uri, "FAILED")) == 8 and len(_runs(uri, "FINISHED")) == 4
    store.configure(uri)
    states = [state for _, _, state in bm.dry_run(cfg)]
    assert sorted(states) == ["done"] * 4 + ["failed"] * 4


def test_report_is_rebuilt_from_mlflow_alone(finished_sweep, tmp_path):
    uri, cfg, result = finished_sweep
    out = tmp_path / "reports"
    # a fresh process: nothing but the MLflow store
    proc = subprocess.run([sys.executable, "-m", "domgen.cli", "report", "--experiment", "domgen-benchmark", "--tracking-uri", uri,
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = out / "domgen-benchmark" / result.parent_id
    table = pd.read_csv(folder / "table2.csv")
    assert len(table) == 4  # unet/pspnet x random/imagenet
    finished = {(r.data.tags["domgen.experiment"], r.data.tags["domgen.arch"]): r.data.metrics for r in _runs(uri, "FINISHED")}
    for (experiment, arch), metrics in finished.items():
        row = table[(table.architecture == arch) & (table.weights == "random")].iloc[0]
        # printed in % as the paper prints them
        assert float(row[f"{experiment} Dice"]) == pytest.approx(100 * metrics["dice"], abs=5e-3)
        assert float(row[f"{experiment} Sens"]) == pytest.approx(100 * metrics["sens"], abs=5e-3)
    assert set(table[table.weights == "imagenet"]["lung Dice"]) == {"failed"}
    # the paper's per-architecture rows are ImageNet only (all failed offline here); random init has its own table
    assert pd.read_csv(folder / "per_architecture.csv").empty
    per_arch = pd.read_csv(folder / "per_architecture_random.csv")
    unet_lung = per_arch[(per_arch.architecture == "unet") & (per_arch.experiment == "lung")].iloc[0]
    assert float(unet_lung["Dice (%)"].split(" ± ")[0]) == pytest.approx(100 * finished[("lung", "unet")]["dice"], abs=5e-3)
    best = pd.read_csv(folder / "best_models.csv")
    for experiment in ("lung", "lesion-b"):
        top = max((m["dice"], arch) for (e, arch), m in finished.items() if e == experiment)
        assert best[best.experiment == experiment].architecture.iloc[0] == top[1]
    assert len(pd.read_csv(folder / "failed.csv")) == 4
    for name in ("dice_vs_parameters", "dice_by_architecture", "dice_by_weights", "loss_curves", "masks_best_worst", "masks_unet",
                 "masks_pspnet"):
        assert (folder / f"{name}.png").stat().st_size > 5000
    store.configure(uri)
    logged = {a.path for a in MlflowClient().list_artifacts(result.parent_id, "report")}
    assert "report/table2.csv" in logged and "report/masks_best_worst.png" in logged


def _finished_count(db: str) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                               "where t.key = 'domgen.role' and t.value = 'configuration' and r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_killed_sweep_resumes_without_duplicate_runs(suite, tmp_path):
    db = tmp_path / "mlflow.db"
    uri = sqlite_store(db)
    grid = {"experiments": "lung", "archs": "pspnet,linknet", "encoders": "resnet18,mobilenet_v2", "weights": "random"}
    cmd = [sys.executable, "-m", "domgen.cli", "benchmark", "--quiet", "--tracking-uri", uri, "--set", f"suite={suite}",
           "--set", "train.epochs=1", "--set", "threads=1", "--set", "evaluation.sample_slices=2",
           *[x for k, v in grid.items() for x in (f"--{k}", v)]]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _finished_count(str(db)) < 1:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no configuration finished in time"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _finished_count(str(db))
    assert 1 <= done_before < 4
    cfg = tiny(suite, **grid)
    store.configure(uri)
    result = bm.run_benchmark(cfg, progress=False)
    assert result.skipped == done_before and result.finished == 4 - done_before and not result.failed
    finished = _runs(uri, "FINISHED")
    hashes = [r.data.tags["domgen.config_hash"] for r in finished]
    assert len(hashes) == len(set(hashes)) == 4
    assert not _runs(uri, "RUNNING")  # the run the kill interrupted is marked KILLED, not left looking alive
    exp = MlflowClient().get_experiment_by_name(bm.EXPERIMENT)
    sweeps = store.runs_of(exp.experiment_id, "tags.`domgen.role` = 'sweep'", status=None)
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"  # the killed sweep's parent was resumed


def test_retry_overrides_apply_to_the_failed_configurations_of_the_same_sweep(finished_sweep):
    """--retry-failed --set train.batch_size=1 (the out-of-memory recipe): same sweep, same hashes, only the failed redone."""
    uri, cfg, first = finished_sweep
    store.configure(uri)
    before = {r.info.run_id for r in _runs(uri)}
    retried = bm.run_benchmark(cfg, retry_failed=True, progress=False, retry_with={"train.batch_size": 1})
    assert (retried.finished, retried.skipped, len(retried.failed)) == (0, 4, 4)  # offline ImageNet fails again
    new = [r for r in _runs(uri) if r.info.run_id not in before]
    assert len(new) == 4 and all(r.data.tags["domgen.weights"] == "imagenet" for r in new)
    assert all(r.data.tags["domgen.retry_overrides"] == "train.batch_size=1" and r.data.params["train.batch_size"] == "1" for r in new)
    old_hashes = {r.data.tags["domgen.config_hash"] for r in _runs(uri, "FAILED") if r.info.run_id in before}
    assert {r.data.tags["domgen.config_hash"] for r in new} == old_hashes
    with pytest.raises(bm.DomgenError, match="train.lr"):
        bm.retry_overrides(cfg, {"train.lr": 0.1})


def test_per_epoch_times_are_one_value_per_epoch_and_their_mean_has_its_own_key(finished_sweep):
    uri, cfg, _ = finished_sweep
    store.configure(uri)
    run = _runs(uri, "FINISHED")[0]
    history = MlflowClient().get_metric_history(run.info.run_id, "val_seconds")
    assert [m.step for m in history] == list(range(1, len(history) + 1)) or [m.step for m in history] == list(range(len(history)))
    assert run.data.metrics["val_seconds_per_epoch"] == pytest.approx(np.mean([m.value for m in history]))
    # what the quick profile's fp32 run actually used, as tags (not metrics)
    assert (run.data.tags["domgen.precision"], run.data.tags["domgen.memory_format"]) == ("fp32", "contiguous")


def test_report_defaults_to_the_newest_finished_sweep(finished_sweep):
    from domgen.reports.benchmark_report import sweep_parent

    uri, cfg, result = finished_sweep
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(bm.EXPERIMENT)
    unfinished = MlflowClient().create_run(exp.experiment_id, tags=store.tags(role="sweep", sweep_hash="other"))
    assert sweep_parent(exp.experiment_id).info.run_id != unfinished.info.run_id
    assert sweep_parent(exp.experiment_id).info.status == "FINISHED"
    MlflowClient().set_terminated(unfinished.info.run_id, "KILLED")


def test_grid_names_are_case_insensitive_and_counted_once():
    cfg = bm.resolve(load_profile("benchmark", "quick"), experiments="lung", archs="Unet,Linknet,unet", encoders="resnet18,resnet18",
                     weights="random")
    assert [c.name for c in bm.expand_grid(cfg)] == ["lung | unet | resnet18 | random", "lung | linknet | resnet18 | random"]


@pytest.fixture(scope="module")
def stacked_sweeps(suite, tmp_path_factory):
    """lung and lesion-a x linknet x resnet18, 2 epochs, train.device_data: once one configuration at a time, once
    with --stack 4 and the ImageNet weights too (the two random ones train stacked; the two ImageNet ones fail
    offline, each alone)."""
    out = {}
    for name, stack, weights in (("alone", 1, "random"), ("stacked", 4, "random,imagenet")):
        uri = sqlite_store(tmp_path_factory.mktemp(name) / "mlflow.db")
        cfg = tiny(suite, experiments="lung,lesion-a", archs="linknet", encoders="resnet18", weights=weights)
        cfg = cfg.replace(**{"train.device_data": True, "train.epochs": 2, "stack": stack})
        store.configure(uri)
        out[name] = (uri, cfg, bm.run_benchmark(cfg, progress=False))
    return out


def _by_name(uri: str) -> dict:
    return {r.info.run_name: r for r in _runs(uri, "FINISHED")}


def _val_losses(uri: str, run_id: str) -> list[float]:
    store.configure(uri)
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "val_loss"), key=lambda m: m.step)]


def test_stacked_configurations_are_each_their_own_run_with_their_alone_identity_and_numbers(stacked_sweeps):
    (alone_uri, _, alone), (uri, cfg, stacked) = stacked_sweeps["alone"], stacked_sweeps["stacked"]
    assert (alone.finished, stacked.finished, len(stacked.failed)) == (2, 2, 2)
    assert all("imagenet" in name and "could not get the imagenet weights" in reason for name, reason in stacked.failed.items())
    one_by_one, together = _by_name(alone_uri), _by_name(uri)
    assert sorted(together) == sorted(one_by_one) == ["lesion-a | linknet | resnet18 | random", "lung | linknet | resnet18 | random"]
    # `stack` says how the sweep ran, not what a configuration is: the same hashes and params as one at a time
    for name, run in together.items():
        assert run.data.tags["domgen.stacked_with"] == "2" and "domgen.stacked_with" not in one_by_one[name].data.tags
        assert run.data.tags["domgen.config_hash"] == one_by_one[name].data.tags["domgen.config_hash"]
        assert run.data.params == one_by_one[name].data.params and "stack" not in run.data.params
        assert run.data.tags["domgen.precision"] == "fp32" and run.data.metrics["epochs_run"] == 2
    # each stacked model learnt from its own experiment's data: its validation losses follow its one-at-a-time run's
    # to within the noise of reordered float sums (one vs two threads move them as much), while the two experiments'
    # losses lie far apart (the lung is large, the lesion small)
    lung = [_val_losses(u, runs["lung | linknet | resnet18 | random"].info.run_id) for u, runs in ((uri, together), (alone_uri, one_by_one))]
    lesion = [_val_losses(u, runs["lesion-a | linknet | resnet18 | random"].info.run_id) for u, runs in ((uri, together), (alone_uri, one_by_one))]
    assert len(lung[0]) == len(lesion[0]) == 2
    np.testing.assert_allclose(lung[0], lung[1], atol=0.02)
    np.testing.assert_allclose(lesion[0], lesion[1], atol=0.02)
    assert abs(lung[1][-1] - lesion[1][-1]) > 0.1
    # the per-epoch seconds are the group's shared out: the same for both
    times = {name: run.data.metrics["train_seconds_per_epoch"] for name, run in together.items()}
    assert len(set(times.values())) == 1 and min(times.values()) > 0
    # and Table II says so: a "stacked" column beside the seconds, only where some configuration trained stacked
    from domgen.reports.benchmark_report import benchmark_records, table2

    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(bm.EXPERIMENT)
    rows = table2(benchmark_records(exp.experiment_id, run.data.tags["domgen.sweep_hash"])).set_index("weights")
    assert rows.loc["random", "stacked"] == "2" and rows.loc["imagenet", "stacked"] == "-"
    store.configure(alone_uri)
    exp = MlflowClient().get_experiment_by_name(bm.EXPERIMENT)
    assert "stacked" not in table2(benchmark_records(exp.experiment_id, run.data.tags["domgen.sweep_hash"]))


def test_stacked_sweep_resumes_alone_and_retries_one_by_one(stacked_sweeps):
    """A re-run with one more experiment trains only it (alone: nothing to stack it with); --retry-failed --set stack=1
    retries the failed ones one at a time, in the same sweep."""
    uri, cfg, first = stacked_sweeps["stacked"]
    store.configure(uri)
    more = bm.resolve(cfg, experiments="lung,lesion-a,lesion-b", weights="random")
    again = bm.run_benchmark(more, progress=False)
    assert (again.finished, again.skipped, len(again.failed)) == (1, 2, 0)
    added = _by_name(uri)["lesion-b | linknet | resnet18 | random"]
    assert added.data.tags["domgen.stacked_with"] == "1"
    before = {r.info.run_id for r in _runs(uri)}
    retried = bm.run_benchmark(cfg, retry_failed=True, progress=False, retry_with={"stack": 1})
    assert (retried.finished, len(retried.failed)) == (0, 2)
    new = [r for r in _runs(uri) if r.info.run_id not in before]
    assert len(new) == 2 and all(r.data.tags["domgen.retry_overrides"] == "stack=1" for r in new)
    with pytest.raises(bm.DomgenError, match="train.device_data=true"):
        bm.run_benchmark(cfg.replace(**{"train.device_data": False}), progress=False)
