"""The model zoo of a benchmark sweep (Bizopoulos et al. publish their 600 trained models): every finished
configuration of one sweep exported into a folder, with a manifest saying what each model is, how it
scored on the test set and which preprocessing its input needs.

The configurations are the sweep run's children in MLflow (tag ``mlflow.parentRunId``); of several attempts
of one configuration (``--retry-failed``, a resumed sweep) the finished one counts, else the newest. Failed,
interrupted and running configurations are listed in the manifest as skipped, with their reason. Each entry
is written atomically and found again by its config hash, so an interrupted export resumes where it stopped.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from domgen.errors import DomgenError
from domgen.families import benchmark as bm
from domgen.families.common import CHECKPOINT, checkpoint_of_run
from domgen.models import export as zoo
from domgen.preprocessing.intensity import NORMALISATIONS
from domgen.tracking import mlflow_store as store

# the test metrics of a configuration (benchmark.score), copied into the manifest
TEST_METRICS = ("dice", "sens", "spec", "dice_std", "sens_std", "spec_std", "dice_pooled")


@dataclass
class ZooExport:
    directory: Path
    exported: int = 0  # written by this call
    already: int = 0  # complete from an earlier (interrupted) call
    skipped: dict[str, str] = field(default_factory=dict)  # configuration name -> reason
    manifest: Path | None = None


def _param(value: str | None):
    """A logged param back to its value (params are ``str(value)``, lists JSON)."""
    if value is None or value == "None":
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _normalisation(name: str) -> dict:
    """The constants of a normalisation (its keyword defaults), and the HU clip a window implies."""
    if name not in NORMALISATIONS:
        return {}
    skip = ("image", "mask", "eps")
    constants = {k: p.default for k, p in inspect.signature(NORMALISATIONS[name]).parameters.items()
                 if k not in skip and p.default is not inspect.Parameter.empty}
    if name == "window":  # Hounsfield units outside [level - width/2, level + width/2] are clipped
        constants["clip_hu"] = [constants["level"] - constants["width"] / 2, constants["level"] + constants["width"] / 2]
    return constants


def preprocessing_of_run(params: dict[str, str], experiment: str) -> dict:
    """What a configuration's model expects as input, from the run's logged config (``preprocessing.*``) and its
    experiment (lung masking and target, ``benchmark.EXPERIMENTS``)."""
    section = {k[len("preprocessing."):]: _param(v) for k, v in params.items() if k.startswith("preprocessing.")}
    section.update(bm.EXPERIMENTS.get(experiment, {}))
    size = int(section.get("image_size") or 0)
    normalisation = section.get("normalisation")
    return {**section,
            "input_size": [size, size],
            # slices are read as Hounsfield units (8-bit windowed data mapped back through its recorded window)
            "intensity": "hu",
            "normalisation_constants": _normalisation(str(normalisation)),
            "threshold": _param(params.get("evaluation.threshold"))}


def sweep_run(sweep_id: str):
    """The sweep's parent run, or one sentence saying why ``sweep_id`` is not one."""
    run = store.get_run(sweep_id, "sweep run")
    exp = store.get_experiment(bm.EXPERIMENT)
    if exp is None or run.info.experiment_id != exp.experiment_id or run.data.tags.get("domgen.role") != "sweep":
        raise DomgenError(f"--sweep {sweep_id} is not a benchmark sweep run; pass the sweep id `domgen benchmark` prints "
                          f"(the parent run in experiment {bm.EXPERIMENT}), or export one run with `domgen export RUN_ID`")
    return run


def configurations_of(sweep) -> list:
    """One run per configuration of the sweep: its finished attempt, else its newest, in grid-name order."""
    children = store.runs_of(sweep.info.experiment_id, f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'", status=None)
    best: dict[str, object] = {}
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        h = run.data.tags.get("domgen.config_hash")
        if run.data.tags.get("domgen.role") != "configuration" or h is None:
            continue
        if h not in best or best[h].info.status != "FINISHED":
            best[h] = run
    key = lambda r: tuple(r.data.tags.get(f"domgen.{k}", "") for k in ("experiment", "arch", "encoder", "weights"))  # noqa: E731
    return sorted(best.values(), key=key)


def _skip_reason(run) -> str | None:
    status, t = run.info.status, run.data.tags
    if status == "FINISHED":
        return None
    if status == "RUNNING":
        return "still running" + (" (its driver stopped; re-run `domgen benchmark` to finish it)" if store.is_stale(run) else "")
    if store.is_interrupted(run):
        return "interrupted; re-run `domgen benchmark` to finish it"
    return f"failed: {t.get('domgen.error', status)}"[:500]


def _entry(run) -> dict:
    t = run.data.tags
    return {"run_id": run.info.run_id, "name": run.info.run_name, "experiment": t.get("domgen.experiment"), "arch": t.get("domgen.arch"),
            "encoder": t.get("domgen.encoder"), "weights": t.get("domgen.weights"), "config_hash": t.get("domgen.config_hash"),
            "metrics": {k: run.data.metrics[k] for k in TEST_METRICS if k in run.data.metrics},
            "params_m": run.data.metrics.get("params_m"),
            "preprocessing": preprocessing_of_run(run.data.params, t.get("domgen.experiment", ""))}


def folder_name(entry: dict) -> str:
    """``<experiment>-<arch>-<encoder>-<weights>-<hash prefix>``: readable, and unique across sweeps."""
    return "-".join(str(entry[k]) for k in ("experiment", "arch", "encoder", "weights")) + f"-{entry['config_hash'][:8]}"


def export_sweep(sweep_id: str, out: Path, fmt: str = "state-dict", progress: bool = True) -> ZooExport:
    """Export every finished configuration of benchmark sweep ``sweep_id`` into ``out`` (one entry folder each)
    and write the manifest; entries already complete in ``out`` are kept, so a re-run resumes."""
    if fmt not in zoo.FORMATS:
        raise DomgenError(f"--format {fmt} is not one of {', '.join(zoo.FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DomgenError(f"--out {out} is a file; pass a folder (new or from an earlier `domgen export --sweep`) for the zoo")
    sweep = sweep_run(sweep_id)
    runs = configurations_of(sweep)
    if not any(r.info.status == "FINISHED" for r in runs):
        raise DomgenError(f"sweep {sweep_id} has no finished configuration ({len(runs)} attempted); run `domgen benchmark` "
                          "until some finish, or pass another --sweep")
    if (out / zoo.MANIFEST_JSON).is_file():
        earlier = zoo.read_manifest(out)
        if (earlier.get("sweep_run_id"), earlier.get("format")) != (sweep_id, fmt):
            raise DomgenError(f"--out {out} holds the {earlier.get('format')} export of sweep {earlier.get('sweep_run_id')}; "
                              f"pass another --out for the {fmt} export of sweep {sweep_id}")
    out.mkdir(parents=True, exist_ok=True)
    result = ZooExport(out)
    entries = []
    for run in tqdm(runs, desc="exporting configurations", unit="model", disable=not progress):
        entry = _entry(run)
        entry["folder"] = folder_name(entry)
        reason = _skip_reason(run)
        folder = out / entry["folder"]
        if reason is None and zoo.entry_done(folder, fmt, entry["config_hash"]):
            result.already += 1
        elif reason is None:
            with store.artifact_dir() as tmp:
                try:
                    checkpoint = checkpoint_of_run(run.info.run_id, tmp)
                except DomgenError:
                    reason = f"no {CHECKPOINT} artifact (the sweep ran with save_checkpoint: false)"
                else:
                    try:
                        zoo.write_entry(folder, checkpoint, fmt, entry)
                        result.exported += 1
                    except DomgenError as exc:  # e.g. an architecture the format cannot express; the other entries go on
                        reason = f"not exported as {fmt}: {exc}"[:500]
        if reason is not None:
            entry.update(status="skipped", reason=reason, folder="")
            result.skipped[run.info.run_name or run.info.run_id] = reason
        else:
            entry.update(zoo.read_entry(folder), status="exported", reason="")
        entries.append(entry)
    header = {"sweep_run_id": sweep_id, "experiment": bm.EXPERIMENT, "format": fmt, "tracking_uri": store.tracking_uri(),
              "exported": sum(e["status"] == "exported" for e in entries), "skipped": len(result.skipped)}
    result.manifest = zoo.write_manifest(out, header, entries)[1]
    return result
