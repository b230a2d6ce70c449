"""The 600-model benchmark (Bizopoulos et al., "Comprehensive Comparison of Deep Learning Models for Lung
and COVID-19 Lesion Segmentation in CT scans") as one experiment family.

The grid is experiment (lung | lesion-a | lesion-b) x architecture x encoder x encoder weights. Every
configuration is one MLflow run, a child of the sweep's parent run, found again by the hash of its
resolved config: re-running the same command (after a crash or ``kill -9``) does only what is missing.
A configuration that fails (an encoder smp cannot build, ImageNet weights that cannot be downloaded,
out of memory) is recorded as FAILED with its reason and the sweep goes on; ``retry_failed`` reruns them.
The configurations are handed to an executor (``domgen.executors``): in-process, local worker
processes, or Ray tasks logging to a shared MLflow server. With ``stack`` K > 1 (``--stack K``, issue 22) a job is
up to K configurations of one architecture x encoder (the experiments and weights), trained together in one
process as one stacked model (``domgen.training.stacked``), still one MLflow run each.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from itertools import product

import numpy as np
import torch

from domgen import interrupts, settings
from domgen.tracking.identity import config_hash
from domgen.data.registry import load_cases, load_suite
from domgen.errors import DomgenError
from domgen.evaluation.evaluate import EvaluationSettings, evaluate
from domgen.families import common, units
from domgen.models import build_model, count_parameters
from domgen.preprocessing.slices import SlicePreprocessing, SliceSet, prepare_slices
from domgen.preprocessing.splits import train_val_test_split
from domgen.tracking import mlflow_store as store
from domgen.models.checkpoint import save_checkpoint
from domgen.training.stacked import check_stackable, train_stacked
from domgen.training.trainer import TrainSettings, predict_model_size, seed_everything, to_original_size, train
from domgen.typed_config import FamilyConfig, typed

FAMILY = "benchmark"
EXPERIMENT = "domgen-benchmark"
CHECKPOINT = "model/checkpoint.pt"
SAMPLES = "predictions/samples.npz"

# experiment -> what it segments and whether the input is multiplied by the lung mask; grid value -> encoder_weights.
# Listed in settings, which checks the grid against them and must not import this family.
EXPERIMENTS = settings.BENCHMARK_EXPERIMENTS
WEIGHTS = settings.BENCHMARK_WEIGHTS
# settings that choose how the sweep runs, not what a configuration computes: left out of every hash
# (stack too: a stacked configuration computes what it would alone, within rounding; its run records the group size)
RUN_ONLY_KEYS = ("grid", "threads", "profile", "stack")
# what a --retry-failed may change for the failed configurations without changing their identity
# (the documented out-of-memory recipe: --retry-failed --set train.batch_size=1)
RETRY_KEYS = ("train.batch_size", "device", "threads", "train.precision", "train.channels_last", "train.loader_workers",
              "train.pin_memory", "stack")


@dataclass(frozen=True)
class Configuration:
    """One cell of the grid."""

    experiment: str
    arch: str
    encoder: str
    weights: str

    @property
    def name(self) -> str:
        return f"{self.experiment} | {self.arch} | {self.encoder} | {self.weights}"

    def identity(self) -> dict:
        return {"experiment": self.experiment, "arch": self.arch, "encoder": self.encoder, "weights": self.weights}


def expand_grid(cfg: FamilyConfig) -> list[Configuration]:
    """Every configuration of ``cfg.grid``, in the paper's order (experiment, arch, encoder, weights); the names were
    checked against the settings table (architectures case-insensitively, a name given twice counts once)."""
    grid = cfg.grid
    return [Configuration(*cell) for cell in product(grid.experiments, grid.archs, grid.encoders, grid.weights)]


def base_config(cfg: FamilyConfig) -> dict:
    """What every configuration of the sweep shares: the config without the grid and run-only keys; with the
    datasets' content digest attached (``with_content``), the suite's path is left out too."""
    return common.hashed_view({k: v for k, v in cfg.as_dict().items() if k not in RUN_ONLY_KEYS})


def with_content(cfg: FamilyConfig) -> FamilyConfig:
    """``cfg`` with the content digest of its two datasets, so a configuration's hash follows the data, not its path."""
    return common.with_content_digests(cfg, [cfg.train_dataset, cfg.test_dataset])


def configuration_hash(cfg: FamilyConfig, configuration: Configuration) -> str:
    """The run's identity: the shared config plus its grid cell (not which sweep, executor or grid subset ran it)."""
    return config_hash({"config": base_config(cfg), **configuration.identity()})


def preprocessing_of(cfg: FamilyConfig, experiment: str) -> SlicePreprocessing:
    return settings.build(SlicePreprocessing, {**cfg.preprocessing.as_dict(), **EXPERIMENTS[experiment]})


def train_val_patients(patients: list[str], split, seed: int) -> tuple[list[str], list[str]]:
    """80/20 by patient (``split``: the config's split section): ``ordered`` keeps the sorted order (the paper's slices
    0-79 / 80-99), ``random`` draws with ``seed``."""
    fraction = split.val_fraction
    if split.method == "ordered":
        n_val = max(1, int(round(fraction * len(patients)))) if len(patients) > 1 else 0
        ordered = sorted(patients)
        return ordered[:len(ordered) - n_val], ordered[len(ordered) - n_val:]
    parts = train_val_test_split(patients, (1.0 - fraction, fraction, 0.0), seed=seed)
    return parts["train"], parts["val"]


@functools.lru_cache(maxsize=8)
def _prepared(suite_name: str, dataset: str, pre: SlicePreprocessing) -> SliceSet:
    # each worker process reads a dataset once per experiment, not once per configuration
    suite = load_suite(suite_name)
    cases = load_cases(suite.get(dataset))
    if not cases:
        raise DomgenError(f"dataset {dataset} of suite {suite.path} has no cases; run `domgen data check {dataset} --suite {suite.path}`")
    return prepare_slices(cases, pre)


def datasets_of(cfg: FamilyConfig, experiment: str) -> tuple[SliceSet, SliceSet, SliceSet]:
    """(train, validation, test) slices of one experiment."""
    pre = preprocessing_of(cfg, experiment)
    source = _prepared(str(cfg.suite), cfg.train_dataset, pre)
    test = _prepared(str(cfg.suite), cfg.test_dataset, pre)
    train_ids, val_ids = train_val_patients(source.patients(), cfg.split, cfg.seed)
    return source.of_patients(train_ids), source.of_patients(val_ids), test


def check_data(cfg: FamilyConfig) -> None:
    """Fail early, in the driver, on a missing suite or dataset (not as 600 failed configurations)."""
    if not cfg.suite:
        raise DomgenError(f"profile '{cfg.profile}' names no suite; pass --suite path/to/suite.yaml (see experiments/benchmark/paper.yaml)")
    suite = load_suite(cfg.suite)
    for name in (cfg.train_dataset, cfg.test_dataset):
        suite.get(name)


def sample_index(test: SliceSet, n: int) -> np.ndarray:
    """The ``n`` test slices with the largest targets: the same slices for every configuration of an experiment."""
    areas = test.targets.reshape(len(test), -1).sum(1)
    return np.sort(np.argsort(-areas, kind="stable")[:n])


def score(model, test: SliceSet, cfg: FamilyConfig) -> tuple[dict[str, float], np.ndarray]:
    """The paper's test metrics (per-slice Sens/Spec/Dice, averaged over slices) and the model-size probabilities."""
    ev = cfg.evaluation
    probs = predict_model_size(model, test, device=cfg.device)
    if ev.resolution == "model":
        # the paper scores the 512x512 resized masks
        scored, prob_list = replace(test, truths=list(test.targets)), list(probs)
    else:
        scored, prob_list = test, to_original_size(probs, test)
    settings = EvaluationSettings(empty=ev.empty, dice_eps=ev.dice_eps, surface=False)
    summary, _ = evaluate(prob_list, scored, ev.threshold, settings)
    paper = {"sens": summary["slice_sen"], "spec": summary["slice_spc"], "dice": summary["slice_dsc"],
             "sens_std": summary["slice_sen_std"], "spec_std": summary["slice_spc_std"], "dice_std": summary["slice_dsc_std"],
             # without the TP+FP=0 rule (counts pooled per patient): a model that predicts nothing scores 0 here, not 1
             "dice_pooled": summary["dsc"]}
    return paper, probs


def _log_samples(run_id: str, test: SliceSet, probs: np.ndarray, cfg: FamilyConfig, tmp) -> None:
    idx = sample_index(test, cfg.evaluation.sample_slices)
    path = tmp / "samples.npz"
    np.savez_compressed(path, image=test.inputs[idx, 0].astype(np.float16), truth=test.targets[idx],
                        prediction=(probs[idx] > cfg.evaluation.threshold).astype(np.uint8),
                        slice_id=np.asarray([test.slice_ids[i] for i in idx]))
    store.log_artifact_file(run_id, path, "predictions")


def train_settings_of(cfg: FamilyConfig) -> TrainSettings:
    return settings.build(TrainSettings, cfg.train.as_dict(), seed=cfg.seed, device=cfg.device)


def check_stack(cfg: FamilyConfig) -> None:
    """With ``stack`` > 1, one sentence now (before any run) for a training setting the stacked step cannot honour."""
    if cfg.stack == 1:
        return
    train_settings = train_settings_of(cfg)
    if not train_settings.device_data:
        raise DomgenError(f"--stack {cfg.stack} trains on the device's own augmentation, so it needs "
                          "--set train.device_data=true (a setting of the configurations' identity); or use --stack 1")
    check_stackable(train_settings)


def built(cfg: FamilyConfig, configuration: Configuration):
    """(model, (train, validation, test)) of one configuration, the model initialised from ``cfg.seed``."""
    data = datasets_of(cfg, configuration.experiment)
    seed_everything(cfg.seed)
    return build_model(configuration.arch, configuration.encoder, WEIGHTS[configuration.weights], 1), data


def train_alone(cfg: FamilyConfig, configuration: Configuration, run_id: str, model, data):
    """``train`` of one built configuration, each epoch logged to its run; its ``TrainResult``."""
    return train(model, data[0], data[1], train_settings_of(cfg), on_epoch=store.epoch_logger(run_id), progress=False,
                 desc=configuration.name)


def train_configuration(cfg: FamilyConfig, configuration: Configuration, run_id: str) -> dict[str, float]:
    """Build, train and test one configuration inside its MLflow run; returns the logged summary."""
    model, data = built(cfg, configuration)
    return log_configuration(cfg, configuration, run_id, train_alone(cfg, configuration, run_id, model, data), data)


def log_configuration(cfg: FamilyConfig, configuration: Configuration, run_id: str, result, data) -> dict[str, float]:
    """Test a trained configuration (``result``: its ``TrainResult``) and log its summary, sample predictions and
    checkpoint; returns the summary."""
    train_set, val_set, test = data
    metrics, probs = score(result.model, test, cfg)
    history = result.history
    summary = {**metrics,
               "params_m": count_parameters(result.model)[1] / 1e6,
               "train_seconds_per_epoch": float(np.mean([h["train_seconds"] for h in history])),
               # per-epoch times are the metrics train_seconds / val_seconds (one value per step); these are their means
               # (stacked: the group's seconds divided by the configurations trained together)
               "val_seconds_per_epoch": float(np.mean([h["val_seconds"] for h in history])),
               "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
               "best_val_loss": float(min(h["val_loss"] for h in history)),
               "n_train": len(train_set), "n_val": len(val_set), "n_test": len(test)}
    store.log_metrics(run_id, summary)
    with store.artifact_dir() as tmp:
        _log_samples(run_id, test, probs, cfg, tmp)
        if cfg.save_checkpoint:
            model_cfg = {"arch": configuration.arch, "encoder": configuration.encoder, "encoder_weights": WEIGHTS[configuration.weights],
                         "in_channels": 1}
            save_checkpoint(tmp / "checkpoint.pt", result.model, model_cfg, preprocessing=cfg.preprocessing.as_dict(),
                            experiment=configuration.experiment, threshold=cfg.evaluation.threshold)
            store.log_artifact_file(run_id, tmp / "checkpoint.pt", "model")
    return summary


def _run_tags(cfg: FamilyConfig, configuration: Configuration, h: str) -> dict[str, str]:
    return store.tags(family=FAMILY, role="configuration", config_hash=h, sweep_hash=config_hash(base_config(cfg)),
                      experiment=configuration.experiment, arch=configuration.arch, encoder=configuration.encoder,
                      weights=configuration.weights, profile=cfg.profile)


def _claim(job: dict):
    """(configuration, the config it runs with, hash, claimed run or None) of one configuration's job."""
    cfg, configuration = job["cfg"], Configuration(**job["configuration"])
    run_cfg = job.get("run_cfg") or cfg  # cfg with --retry-failed overrides: same identity, other resources
    h = configuration_hash(cfg, configuration)
    run_tags = _run_tags(cfg, configuration, h)
    if job.get("retry_overrides"):
        run_tags[f"{store.TAG}retry_overrides"] = ", ".join(f"{k}={v}" for k, v in job["retry_overrides"].items())
    run = store.claim_run(job["exp_id"], configuration.name, {**base_config(run_cfg), **configuration.identity()}, run_tags,
                          job["parent_id"])
    return configuration, run_cfg, h, run


def _unclaimed(job: dict, h: str) -> dict:
    interrupts.check()
    return {"status": "done" if store.find_run(job["exp_id"], h) is not None else "elsewhere", "hash": h}


def _finished(h: str, run_id: str, started: float, summary: dict) -> dict:
    return {"status": "finished", "hash": h, "run_id": run_id, "seconds": time.perf_counter() - started,
            **{k: summary[k] for k in ("dice", "sens", "spec", "params_m")}}


def _failed(h: str, exc: BaseException, started: float) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"status": "failed", "hash": h, "reason": f"{type(exc).__name__}: {exc}"[:500], "seconds": time.perf_counter() - started}


def _in_worker(job: dict) -> None:
    store.configure(job["tracking_uri"])
    interrupts.install()  # a worker process too: Ctrl-C never lands inside a write to the store
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))


def run_job(job: dict) -> dict:
    """One configuration, start to end, in whatever process the executor chose. Never raises for the
    configuration's own failure: it is recorded in MLflow and returned as ``{"status": "failed", "reason": ...}``.
    A configuration finished meanwhile, or live in another driver, is left alone (``done`` / ``elsewhere``)."""
    _in_worker(job)
    started = time.perf_counter()
    configuration, run_cfg, h, run = _claim(job)
    if run is None:
        return _unclaimed(job, h)
    try:
        with store.finishing(run.info.run_id):
            summary = train_configuration(run_cfg, configuration, run.info.run_id)
    except Exception as exc:  # one configuration's failure (build, weights, OOM) must not stop the sweep
        return _failed(h, exc, started)
    return _finished(h, run.info.run_id, started, summary)


def run_group(group: dict) -> list[dict]:
    """The configurations of ``group["members"]`` (jobs of one architecture x encoder, one config) trained together
    as one stacked model (``train_stacked``), each in its own MLflow run; one result per member, as ``run_job``'s.

    Each run is claimed as ``run_job`` claims it (one finished meanwhile, or live elsewhere, is left out). A member
    that cannot be built (ImageNet weights offline) fails alone; the others train together, in subgroups of equal
    training and validation sizes; a subgroup of one trains as ``run_job`` would. A failure of the stacked training
    fails its subgroup. Each run's tag ``domgen.stacked_with`` says how many configurations trained together."""
    members = group["members"]
    _in_worker(members[0])
    started = time.perf_counter()
    results: dict[int, dict] = {}
    info = {}  # member index -> (configuration, run config, hash, run id) of the runs claimed here
    # each claimed run's lease is held (and its end written) by its own ``store.finishing``, entered at once after the
    # claim (as run_job does) and left below, last first
    leases, entered = {}, []
    outcome: dict[int, BaseException | None] = {}
    try:
        for i, job in enumerate(members):
            configuration, run_cfg, h, run = _claim(job)
            if run is None:
                results[i] = _unclaimed(job, h)
                continue
            info[i] = (configuration, run_cfg, h, run.info.run_id)
            leases[i] = store.finishing(run.info.run_id)
            leases[i].__enter__()  # a held Ctrl-C raises here, and that run is already marked interrupted
            entered.append(i)
        ready = {}  # index -> (model, data)
        for i, (configuration, run_cfg, _, _) in info.items():
            try:
                ready[i] = built(run_cfg, configuration)
            except Exception as exc:
                outcome[i] = exc
        subgroups = defaultdict(list)
        for i in ready:
            subgroups[(len(ready[i][1][0]), len(ready[i][1][1]))].append(i)
        for indices in subgroups.values():
            run_cfg = info[indices[0]][1]
            try:
                for i in indices:
                    store.set_tag(info[i][3], f"{store.TAG}stacked_with", str(len(indices)))
                if len(indices) == 1:
                    (i,) = indices
                    trained = [train_alone(run_cfg, info[i][0], info[i][3], *ready[i])]
                else:
                    trained = train_stacked([ready[i][0] for i in indices], [ready[i][1][0] for i in indices],
                                            [ready[i][1][1] for i in indices], train_settings_of(run_cfg),
                                            on_epoch=[store.epoch_logger(info[i][3]) for i in indices])
            except Exception as exc:  # out of memory, a NaN: the subgroup fails, the sweep goes on
                outcome.update({i: exc for i in indices})
                continue
            for i, result in zip(indices, trained):
                configuration, run_cfg_i, h, run_id = info[i]
                try:
                    results[i] = _finished(h, run_id, started,
                                           log_configuration(run_cfg_i, configuration, run_id, result, ready[i][1]))
                    outcome[i] = None
                except Exception as exc:
                    outcome[i] = exc
    except BaseException as exc:  # Ctrl-C, SIGTERM (or the store failing): every open run ends as finishing ends it
        with interrupts.shielded(discard=True):  # a second Ctrl-C while they end is dropped, as finishing drops it
            for i in reversed(entered):
                leases[i].__exit__(type(exc), exc, exc.__traceback__)
        raise
    # every run is ended before a Ctrl-C that comes now is raised (after the block): one left RUNNING with its work
    # done would be trained again by the re-run
    with interrupts.shielded():
        for i in reversed(entered):
            exc = outcome.get(i)
            if exc is None:
                leases[i].__exit__(None, None, None)  # FINISHED
            else:
                leases[i].__exit__(type(exc), exc, exc.__traceback__)  # FAILED with the error as a tag
                results[i] = _failed(info[i][2], exc, started)
    return [results[i] for i in range(len(members))]


def stacked_units(jobs: list[dict], cfg: FamilyConfig) -> list[dict]:
    """The jobs as ``run_group`` units: those of one architecture x encoder and one run config, at most ``stack`` a
    unit (the run config's: a retry may change it), in the grid's order of their first member."""
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        c = job["configuration"]
        groups.setdefault((c["arch"], c["encoder"], "run_cfg" in job), []).append(job)
    units_ = []
    for members in groups.values():
        size = (members[0].get("run_cfg") or cfg).stack
        units_ += [{"members": members[start:start + size]} for start in range(0, len(members), size)]
    return units_


def record_failure(job: dict, reason: str) -> dict:
    """Record a configuration whose worker died (no chance to record itself) as FAILED with ``reason``."""
    store.configure(job["tracking_uri"])
    cfg, configuration = job["cfg"], Configuration(**job["configuration"])
    h = configuration_hash(cfg, configuration)
    live = store.runs_of(job["exp_id"], f"tags.`domgen.config_hash` = '{h}'", status="RUNNING")
    mine = [r for r in live if store.is_stale(r)]  # its worker died; a live run belongs to another driver
    if mine:
        run_id = mine[0].info.run_id
    elif live:
        return {"status": "elsewhere", "hash": h}
    else:
        run_id = store.claim_run(job["exp_id"], configuration.name, {**base_config(cfg), **configuration.identity()},
                                 _run_tags(cfg, configuration, h), job["parent_id"])
        if run_id is None:
            return {"status": "elsewhere", "hash": h}
        run_id = run_id.info.run_id
    store.set_tag(run_id, f"{store.TAG}error", reason[:5000])
    store.end_run(run_id, "FAILED")
    return {"status": "failed", "hash": h, "reason": reason}


def status_of(exp_id: str, cfg: FamilyConfig, configurations: list[Configuration]) -> dict[Configuration, str]:
    """done | running | failed | todo per configuration, from MLflow (one query, not one per configuration).

    done: a FINISHED run; running: a live run of another driver (its lease is fresh); failed: the newest
    attempt FAILED; todo: never run, or interrupted (Ctrl-C, SIGTERM, a stale run of a killed driver).
    """
    sweep = config_hash(base_config(cfg))
    state: dict[str, str] = {}
    runs = store.runs_of(exp_id, f"tags.`domgen.sweep_hash` = '{sweep}' and tags.`domgen.role` = 'configuration'", status=None)
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        h = run.data.tags.get("domgen.config_hash")
        if state.get(h) in ("done", "running"):
            continue
        if run.info.status == "FINISHED":
            state[h] = "done"
        elif run.info.status == "RUNNING" and not store.is_stale(run):
            state[h] = "running"
        elif run.info.status == "FAILED" and not store.is_interrupted(run):
            state[h] = "failed"
        else:
            state[h] = "todo"
    return {c: state.get(configuration_hash(cfg, c), "todo") for c in configurations}


@dataclass
class SweepResult:
    parent_id: str
    finished: int
    failed: dict[str, str]  # configuration name -> reason
    skipped: int  # already finished before this sweep
    seconds: float
    elsewhere: int = 0  # live in another driver on the same sweep


def retry_overrides(cfg: FamilyConfig, overrides: dict) -> dict:
    """``--retry-failed --set KEY=VALUE`` pairs checked against ``RETRY_KEYS`` and the settings table."""
    out = {}
    for key, value in overrides.items():
        if key not in RETRY_KEYS:
            raise DomgenError(f"--set {key} cannot change with --retry-failed (it would be another sweep); with --retry-failed "
                              f"--set may change only {', '.join(RETRY_KEYS)}; drop --retry-failed to start a new sweep")
        out[key] = settings.check_value(settings.TABLE[(FAMILY, key)], value)
    return out


def run_benchmark(cfg: dict | FamilyConfig, executor: str = "local", workers: int = 1, address: str | None = None,
                  retry_failed: bool = False, progress: bool = True, retry_with: dict | None = None,
                  gpus_per_trial: float | None = None) -> SweepResult:
    """Run (or resume) the sweep of ``cfg.grid``; returns the parent run id and what happened.

    ``cfg``: the typed config, or a dict (checked and completed as on the command line, so it finds the same runs).
    ``retry_with`` (with ``retry_failed``): settings from ``RETRY_KEYS`` that the failed configurations are
    retried with, inside the same sweep and under the same hashes. ``gpus_per_trial`` (Ray with CUDA): the share
    of a GPU each configuration gets (None: one GPU).
    """
    cfg = typed(cfg, FAMILY)
    from domgen.executors import get_executor

    started = time.perf_counter()
    check_stack(cfg)  # settings alone, before the suite is read
    retry_with = retry_overrides(cfg, retry_with or {})
    if retry_with:
        check_stack(cfg.replace(**retry_with))
    check_data(cfg)
    cfg = with_content(cfg)
    configurations = expand_grid(cfg)
    exp_id = store.experiment_id(EXPERIMENT)
    runner = get_executor(executor, workers=workers, address=address, device=cfg.device, threads=cfg.threads,
                          gpus_per_trial=gpus_per_trial)
    with units.shared_store(runner, EXPERIMENT) as shared_uri:
        return _sweep(cfg, configurations, exp_id, shared_uri, runner, retry_failed, progress, started, retry_with)


def _sweep(cfg, configurations, exp_id, shared_uri, runner, retry_failed, progress, started, retry_with) -> SweepResult:
    sweep_hash = config_hash(base_config(cfg))
    parent_tags = store.tags(family=FAMILY, role="sweep", config_hash=config_hash(common.hashed_view(cfg.as_dict())), sweep_hash=sweep_hash,
                             profile=cfg.profile, n_configurations=len(configurations))
    parent_id, _ = store.start_or_resume_run(exp_id, f"benchmark sweep ({len(configurations)} configurations)", cfg.as_dict(), parent_tags)
    with store.finishing(parent_id):
        state = status_of(exp_id, cfg, configurations)
        retry = [c for c in configurations if retry_failed and state[c] == "failed"]
        todo = [c for c in configurations if state[c] == "todo"] + retry
        skipped = sum(state[c] == "done" for c in configurations)
        elsewhere = sum(state[c] == "running" for c in configurations)
        failed = {c.name: "failed before; use --retry-failed" for c in configurations if state[c] == "failed" and not retry_failed}
        run_cfg = cfg.replace(**retry_with) if retry_with else None
        jobs = [{"cfg": cfg, "configuration": c.identity(), "exp_id": exp_id, "parent_id": parent_id, "tracking_uri": shared_uri,
                 "threads": runner.threads, **({"run_cfg": run_cfg, "retry_overrides": retry_with} if c in retry and retry_with else {})}
                for c in todo]
        finished = 0
        stacked = any((job.get("run_cfg") or cfg).stack > 1 for job in jobs)
        units_ = stacked_units(jobs, cfg) if stacked else jobs
        for unit, outcome, error in runner.map(run_group if stacked else run_job, units_, progress=progress,
                                               desc="configuration groups" if stacked else "configurations"):
            members = unit["members"] if stacked else [unit]
            if error is not None:
                outcome = [record_failure(job, error) for job in members]
            for job, result in zip(members, outcome if stacked else [outcome]):
                if result["status"] == "failed":
                    failed[Configuration(**job["configuration"]).name] = result["reason"]
                elif result["status"] == "elsewhere":
                    elsewhere += 1
                else:
                    finished += 1
        seconds = time.perf_counter() - started
        store.log_metrics(parent_id, {"n_finished": skipped + finished, "n_failed": len(failed), "sweep_seconds": seconds})
    return SweepResult(parent_id, finished, failed, skipped, seconds, elsewhere)


def dry_run(cfg: dict | FamilyConfig) -> list[tuple[Configuration, str, str]]:
    """(configuration, hash, done | running | failed | todo) for every configuration of the grid; trains nothing."""
    cfg = with_content(typed(cfg, FAMILY))
    configurations = expand_grid(cfg)
    exp = store.get_experiment(EXPERIMENT)
    state = status_of(exp.experiment_id, cfg, configurations) if exp else {c: "todo" for c in configurations}
    return [(c, configuration_hash(cfg, c), state[c]) for c in configurations]


def resolve(cfg: dict | FamilyConfig, **grid) -> FamilyConfig:
    """``cfg`` with the grid axes given on the command line (comma-separated) replacing the profile's, and ``threads``
    from DOMGEN_THREADS where the config leaves it unset."""
    cfg = typed(cfg, FAMILY)
    changes = {f"grid.{axis}": value for axis, value in grid.items() if value}
    if cfg.threads is None:
        changes["threads"] = settings.environment("DOMGEN_THREADS")
    return cfg.replace(**changes)
