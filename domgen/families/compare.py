"""Domain-generalisation methods side by side, DomainBed-style (``domgen compare``).

Every method of ``--methods`` (``domgen.methods.dg.METHODS``) is trained or adapted on the same patient-wise folds and
seeds of the source(s) (several sources: pooled, leave-one-domain-out) and evaluated on every target. Training goes
through leave-one-out's ``train_fold`` (so ``erm`` is leave-one-out's fold model, bit for bit); test-time methods adapt
a training method's model (``erm`` unless ``TEST@TRAIN``), found again by its hash and never retrained. Model selection
(``--selection``) is declared on every run (tag ``domgen.selection``) and table; ``oracle`` (the targets' labels choose
the epoch) is labelled oracle wherever it appears and is never the default.

Tables per target and method: DSC, NSD and SEN as mean [95 % t interval] over seeds x folds; the paired patient-level
bootstrap difference in DSC against ``erm`` with its interval and Wilcoxon p (``domgen.evaluation.statistics``); the
average rank over targets (DomainBed's); a method x target plot. MLflow experiment ``domgen-compare``; the parent run
(role ``comparison``) lists its evaluation runs in ``comparison_runs.json``, so ``domgen report`` rebuilds the tables.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from domgen.data.registry import load_suite
from domgen.errors import DomgenError
from domgen.evaluation.evaluate import EvaluationSettings, evaluate, paired_patients, patient_dsc
from domgen.evaluation.statistics import paired_bootstrap_change
from domgen.families import leave_one_out as loo
from domgen.families import units
from domgen.families.common import hashed_view, prepare_dataset, with_content_digests
from domgen.methods.dg import AdaptContext, get_method, unlabelled
from domgen.methods.pseudolabel import PseudoLabelSettings
from domgen.preprocessing.slices import SlicePreprocessing, SliceSet
from domgen.tracking import mlflow_store as store
from domgen.tracking.tables import log_tables
from domgen.training.trainer import TrainSettings, predict_model_size, seed_everything, to_original_size
from domgen.typed_config import FamilyConfig, typed

FAMILY = "compare"
EXPERIMENT = "domgen-compare"
SELECTIONS = ("training-domain", "last", "oracle")
METRICS = ("dsc", "nsd", "sen")
RUNS_ARTIFACT = "comparison_runs.json"
SEED_STEP = 1000  # seed s of --seeds trains with seed + 1000 s (its folds drawn with the same seed)
# compare-only keys: not part of the leave-one-out round a fold model is trained in
_COMPARE_KEYS = ("sources", "methods", "seeds", "selection", "init_run", "method")


@dataclass(frozen=True)
class Spec:
    """One entry of ``--methods``: a training method (its model) and, optionally, a test-time method adapting it."""

    text: str
    train: str
    test: str | None = None
    transfer: bool = False

    @property
    def model(self) -> tuple[str, bool]:
        return self.train, self.transfer


def parse_methods(names: list[str], cfg: FamilyConfig, sources: list[str]) -> list[Spec]:
    """``erm``, ``bigaug``, ``tent`` (tent on erm's model), ``tent@bigaug``, ``gin+transfer``: checked before any run."""
    specs = []
    for text in names:
        test, _, trained = text.rpartition("@")
        base, _, init = trained.partition("+")
        if init and init != "transfer":
            raise DomgenError(f"--methods {text}: '+{init}' is not an initialisation; use NAME+transfer (with --init-run)")
        method = get_method(base)
        if not method.trains and (test or init):
            raise DomgenError(f"--methods {text}: {base} is a test-time method and trains no model; put a training method "
                              f"there (e.g. {test or base}@erm{'+transfer' if init else ''})")
        if test:
            adapter = get_method(test)
            if adapter.trains:
                raise DomgenError(f"--methods {text}: {test} is a training method; before the @ name a test-time method "
                                  f"(e.g. tent@{trained})")
            spec = Spec(text, base, test, bool(init) or method.uses_init_run)
        elif method.trains:
            spec = Spec(text, base, None, bool(init) or method.uses_init_run)
        else:
            spec = Spec(text, "erm", base, False)
        for name in filter(None, (spec.train, spec.test)):
            get_method(name).check(cfg, sources)
        if spec.transfer and not cfg.init_run:
            raise DomgenError(f"--methods {text} starts from a pretrained model; give --init-run RUN_ID")
        specs.append(spec)
    if len({s.text for s in specs}) != len(specs):
        raise DomgenError("--methods names a method twice; give each once")
    return specs


def dataset_lists(cfg: FamilyConfig, suite) -> tuple[list[str], list[str]]:
    sources = list(cfg.sources or ())
    if not sources:
        raise DomgenError("--sources is empty; give a dataset name or a comma list such as A,B")
    targets = list(cfg.targets or [n for n in loo.covid_names(suite) if n not in sources])
    for name in sources + targets:
        suite.get(name)
    overlap = sorted(set(sources) & set(targets))
    if overlap:
        raise DomgenError(f"--targets {','.join(overlap)} is also a source; a target must be unseen, so name it in one of the two")
    if not targets:
        raise DomgenError("no target is left: every dataset is a source; give --targets")
    return sources, targets


def has_labels(slices: SliceSet) -> bool:
    return any(t is not None and np.asarray(t).any() for t in slices.truths)


def pooled(parts: list[SliceSet], names: list[str]) -> SliceSet:
    """The sources as one set of slices (leave-one-domain-out); patient ids must not repeat across datasets."""
    if len(parts) == 1:
        return parts[0]
    seen: dict[str, str] = {}
    for name, part in zip(names, parts):
        for p in part.patients():
            if p in seen:
                raise DomgenError(f"patient id {p} is in both {seen[p]} and {name}; pooled sources need distinct patient ids "
                                  "(rename them in one suite dataset's patient_id pattern)")
            seen[p] = name
    return SliceSet.concat(parts)


def model_config(cfg: FamilyConfig, s: int, train: str, transfer: bool, sources: list[str], targets: list[str]) -> FamilyConfig:
    """The leave-one-out round config a (seed, training method) model is trained under; ``erm`` with seed 0 and one
    source is leave-one-out's own round (so its fold model is leave-one-out's).

    Made from the compare config's dict and taken as it is (``check=False``): it is hashed as it was before the typed
    configs, and ``--selection last`` trains with ``train.select_by: last``, which no profile may give."""
    rc = {k: v for k, v in cfg.as_dict().items() if k not in _COMPARE_KEYS}
    rc.update(family=loo.FAMILY, source=",".join(sources), targets=list(targets), seed=cfg.seed + SEED_STEP * s)
    method = get_method(train)
    if method.augment:
        rc["train"]["augment"] = method.augment
    if cfg.selection == "last":
        rc["train"].update(select_by="last", patience=None)
    if train != "erm" or transfer or cfg.selection != "training-domain" or len(sources) > 1:
        rc["dg"] = {"method": train, "selection": cfg.selection}  # erm alone keeps leave-one-out's identity
        params = method_params(cfg, train)
        if params:  # the training method's rows (method.gin.layers, ...) enter its models' identity
            rc["dg"]["params"] = params
    if transfer:
        rc["init_run"] = cfg.init_run
    return typed(rc, loo.FAMILY, check=False)


def method_params(cfg: FamilyConfig, name: str) -> dict:
    """A method's hyper-parameters: its ``method.<name>.*`` rows as the profile and ``--set`` give them."""
    section = getattr(cfg.method, name, None)
    return section.as_dict() if section is not None else {}


def train_settings(rc: FamilyConfig, seed: int) -> TrainSettings:
    """The training settings of a model config: its augmentation built with the training method's rows."""
    dg = rc.attached("dg") or {}
    params = dg.get("params") if get_method(dg.get("method", "erm")).augment else None
    return TrainSettings.from_config(rc.train.as_dict(), seed=seed, device=rc.device, augment_params=params)


@dataclass
class Comparison:
    cfg: FamilyConfig
    exp_id: str
    parent_id: str
    source: SliceSet
    targets: dict[str, SliceSet]
    sources: list[str]
    specs: list[Spec]
    pre: SlicePreprocessing
    progress: bool


def _fold_sets(c: Comparison, train: str, seed: int):
    method = get_method(train)
    oracle = SliceSet.concat(list(c.targets.values())) if c.cfg.selection == "oracle" else None

    def sets(fold):
        part = method.training_view(c.source.of_patients(fold["train"]), seed + fold["fold"])
        # oracle: the targets' labelled slices choose the epoch (and stop early); labelled oracle everywhere
        return part, oracle if oracle is not None else c.source.of_patients(fold["val"])

    return sets


def train_model(c: Comparison, rc: FamilyConfig, fold: dict, train: str):
    """(model, cut-off, in-domain CI limit) of a training method in a fold: leave-one-out's ``train_fold``, found again by
    its hash when it exists; the run is tagged with the method and the selection."""
    pretrained = loo.initial_model(rc) if rc.init_run else None
    r = loo.Round(rc, c.exp_id, c.parent_id, c.source, {}, [fold], c.pre,
                  train_settings(rc, rc.seed),
                  EvaluationSettings.from_config(rc.evaluation.as_dict()), PseudoLabelSettings.from_config(rc.pseudolabel.as_dict()),
                  c.progress, pretrained, fold_sets=_fold_sets(c, train, rc.seed))
    out = loo.train_fold(r, fold)
    run = store.find_run(c.exp_id, loo.child_hash(rc.as_dict(), fold=fold["fold"], phase="baseline", target=rc.source))
    for key, value in (("family", FAMILY), ("method", train), ("selection", c.cfg.selection), ("seed", rc.seed)):
        store.set_tag(run.info.run_id, f"domgen.{key}", value)
    return out


def evaluation_hash(rc: FamilyConfig, fold: dict, spec: Spec, name: str) -> str:
    return loo.child_hash(rc.as_dict(), fold=fold["fold"], phase="compare", target=name, method=spec.text)


def evaluate_spec(c: Comparison, rc: FamilyConfig, fold: dict, spec: Spec, name: str, trained: tuple) -> None:
    """One method on one target in one fold and seed, not yet run (``compare_unit`` looks): adapt (test-time methods,
    on the unlabelled target), predict, score; logged under its hash."""
    k = fold["fold"]
    h = evaluation_hash(rc, fold, spec, name)
    model, cutoff, limit = trained
    slices = c.targets[name]
    tags = store.tags(family=FAMILY, source=rc.source, target=name, fold=k, seed=rc.seed, method=spec.text,
                      selection=c.cfg.selection, config_hash=h, role="unseen", phase="compare")
    with store.tracked_run(c.exp_id, f"seed {rc.seed} fold {k} | {spec.text} -> {name}", rc.as_dict(), tags, c.parent_id) as run, \
            store.artifact_dir() as tmp:
        if spec.test:
            method = get_method(spec.test)
            ctx = AdaptContext(c.source.of_patients(fold["train"]), c.source.of_patients(fold["val"]), cutoff, rc.device,
                               rc.seed + k, train_settings(rc, rc.seed + k),
                               PseudoLabelSettings.from_config(rc.pseudolabel.as_dict()), limit,
                               method_params(c.cfg, spec.test), c.progress)
            seed_everything(rc.seed + k)
            hidden = unlabelled(slices)  # a test-time method never sees the target's labels
            small = method.predict(method.adapt(copy.deepcopy(model), hidden, ctx), hidden, ctx)
        else:
            small = predict_model_size(model, slices, device=rc.device)
        summary, per_slice = evaluate(to_original_size(small, slices), slices, cutoff, EvaluationSettings.from_config(rc.evaluation.as_dict()))
        store.log_metrics(run.info.run_id, {**summary, "cutoff": cutoff})
        per_slice.to_csv(tmp / "per_slice_metrics.csv", index=False)
        store.log_artifact_file(run.info.run_id, tmp / "per_slice_metrics.csv")


def compare_unit(job: dict, c: Comparison) -> None:
    """One seed x fold start to end: each training method's model (trained, or found by its hash), then every method
    on every target. Units are independent: in this process or in the executor's workers (``domgen.families.units``)."""
    s, fold = job["seed_index"], job["fold"]
    models = {}
    for spec in c.specs:
        rc = model_config(c.cfg, s, spec.train, spec.transfer, c.sources, list(c.targets))
        todo = [n for n in c.targets if store.find_run(c.exp_id, evaluation_hash(rc, fold, spec, n)) is None]
        if not todo:
            continue  # resumed: this method's evaluations are all done, its model is not even loaded
        if spec.model not in models:
            models[spec.model] = train_model(c, rc, fold, spec.train)
        for name in todo:
            evaluate_spec(c, rc, fold, spec, name, models[spec.model])


def records_of(c: Comparison, jobs: list[dict]) -> list[dict]:
    """The finished evaluation runs of every unit, found by their hashes, in the order of the units: what the tables read."""
    records = []
    for job in jobs:
        s, fold = job["seed_index"], job["fold"]
        for spec in c.specs:
            rc = model_config(c.cfg, s, spec.train, spec.transfer, c.sources, list(c.targets))
            for name in c.targets:
                run = store.find_run(c.exp_id, evaluation_hash(rc, fold, spec, name))
                records.append({"method": spec.text, "target": name, "seed": rc.seed, "fold": fold["fold"],
                                "run_id": run.info.run_id})
    return records


def run_compare(cfg: dict | FamilyConfig, progress: bool = True, runner=None) -> str:
    """Run (or resume) the comparison; returns the parent run id. Every input is checked before any run exists.
    ``cfg``: the typed config, or a dict (checked and completed as on the command line, so it finds the same runs).
    ``runner`` (``domgen.executors.get_executor``): where the seed x fold units run (``domgen.families.units``)."""
    cfg = typed(cfg, FAMILY)
    if cfg.selection not in SELECTIONS:
        raise DomgenError(f"--selection {cfg.selection} is unknown; use one of {', '.join(SELECTIONS)}")
    for text in cfg.methods or ["erm"]:  # unknown names before the suite is read (or generated)
        test, _, trained = text.rpartition("@")
        for name in filter(None, (test, trained.partition("+")[0])):
            get_method(name)
    suite = load_suite(cfg.suite)
    sources, targets = dataset_lists(cfg, suite)
    specs = parse_methods(list(cfg.methods or ["erm"]), cfg, sources)
    cfg = with_content_digests(cfg.replace(sources=sources, targets=targets), [*sources, *targets])
    exp_id, h, finished = store.round_lookup(EXPERIMENT, hashed_view(cfg.as_dict()))
    if finished:  # its tables, without preparing data or starting an executor's tracking server
        return finished
    with units.shared_store(runner, EXPERIMENT):
        return _run(cfg, suite, sources, targets, specs, progress, runner, exp_id, h)


def _run(cfg: FamilyConfig, suite, sources: list[str], targets: list[str], specs: list[Spec], progress: bool, runner, exp_id: str,
         h: str) -> str:
    pre = SlicePreprocessing.from_config(cfg.preprocessing.as_dict())
    prepared = {n: prepare_dataset(suite, n, pre, progress) for n in [*sources, *targets]}
    if cfg.selection == "oracle":
        unlabelled_targets = [n for n in targets if not has_labels(prepared[n])]
        if unlabelled_targets:
            raise DomgenError(f"--selection oracle chooses the epoch by the targets' labels, but {', '.join(unlabelled_targets)} has "
                              "none; use --selection training-domain or last")
    source = pooled([prepared[n] for n in sources], sources)
    for s in range(cfg.seeds):  # a bad split or an empty validation part stops here, before any run exists
        rc = model_config(cfg, s, "erm", False, sources, targets)
        folds = loo.fold_splits(rc, source)
        if cfg.selection != "oracle":  # oracle chooses the epoch on the targets' labels, not on a validation part
            loo.check_validation_parts(rc, folds)
    parent_id, _ = store.start_or_resume_run(exp_id, f"{FAMILY} {','.join(sources)} -> {','.join(targets)}", cfg.as_dict(),
                                             store.tags(family=FAMILY, source=",".join(sources), config_hash=h, role="comparison",
                                                        selection=cfg.selection, methods=",".join(s.text for s in specs)))
    with store.finishing(parent_id):
        c = Comparison(cfg, exp_id, parent_id, source, {n: prepared[n] for n in targets}, sources, specs, pre, progress)
        jobs = [{"name": f"seed {s} fold {fold['fold']}", "seed_index": s, "fold": fold} for s in range(cfg.seeds)
                for fold in loo.fold_splits(model_config(cfg, s, "erm", False, sources, targets), source)]
        units.run_units(runner, compare_unit, jobs, shared=units.for_units(runner, c), what="seed x fold unit", progress=progress)
        with store.artifact_dir() as tmp:
            (tmp / RUNS_ARTIFACT).write_text(json.dumps(records_of(c, jobs), indent=1))
            store.log_artifact_file(parent_id, tmp / RUNS_ARTIFACT)
        tables = compare_tables(parent_id)
        log_tables(parent_id, tables)
        with store.artifact_dir() as tmp:
            store.log_artifact_file(parent_id, dsc_plot(tmp / "method_target_dsc.png", tables["dsc_means"], cfg.selection), "plots")
    return parent_id


# ---------------------------------------------------------------- tables
def selection_label(selection: str) -> str:
    return {"training-domain": "training-domain validation (source)", "last": "last epoch",
            "oracle": "oracle (the targets' labels chose the epoch)"}[selection]


def method_label(method: str, selection: str) -> str:
    return f"{method} [oracle]" if selection == "oracle" else method


def mean_interval(values) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the 95 % t interval over runs; the mean alone (low = high = mean) for one run."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if arr.size == 1 or np.all(arr == arr[0]):
        return float(arr.mean()), float(arr.mean()), float(arr.mean()), int(arr.size)
    low, high = stats.t.interval(0.95, arr.size - 1, loc=arr.mean(), scale=stats.sem(arr))
    return float(arr.mean()), float(low), float(high), int(arr.size)


def _text(values) -> str:
    mean, low, high, n = mean_interval(values)
    if n < 2:  # one run has no interval
        return "-" if n == 0 else f"{mean:.3f} (n=1)"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def comparison_tables(records: pd.DataFrame, patients: dict[tuple[str, str], dict[str, float]], selection: str,
                      reference: str = "erm", seed: int = 0) -> dict[str, pd.DataFrame]:
    """``results`` (per target and method: DSC/NSD/SEN mean [95 % t interval] over seeds x folds, the paired patient
    bootstrap DSC difference against ``reference`` with Wilcoxon p), ``ranks`` (each target's rank by mean DSC, 1 best,
    ties averaged, and the average over targets), ``dsc_means`` (method x target). ``records``: one row per evaluation
    run (method, target, dsc, nsd, sen); ``patients[(method, target)]``: each patient's DSC averaged over the runs."""
    methods = list(dict.fromkeys(records.method))
    targets = list(dict.fromkeys(records.target))
    rows, means = [], {}
    for target in targets:
        for method in methods:
            part = records[(records.target == target) & (records.method == method)]
            row = {"target": target, "method": method_label(method, selection), "selection": selection_label(selection),
                   "runs": len(part)}
            for m in METRICS:
                row[f"{m.upper()} [95 % CI]"] = _text(part.get(m, pd.Series(dtype=float)).tolist())
            means[(method, target)] = mean_interval(part.get("dsc", pd.Series(dtype=float)).tolist())[0]
            if method != reference and (reference, target) in patients and (method, target) in patients:
                change = paired_bootstrap_change(*paired_patients(patients[(reference, target)], patients[(method, target)]), seed=seed)
                ok = np.isfinite(change.mean_change)
                row[f"DSC - {reference} [95 % CI]"] = f"{change.mean_change:+.3f} [{change.low:+.3f}, {change.high:+.3f}]" if ok else "-"
                row["Wilcoxon p"] = f"{change.p_wilcoxon:.3g}" if ok and np.isfinite(change.p_wilcoxon) else "-"
                row["patients"] = change.n_patients
            else:
                row[f"DSC - {reference} [95 % CI]"], row["Wilcoxon p"], row["patients"] = "(reference)" if method == reference else "-", "-", "-"
            rows.append(row)
    ranks = []
    per_target = {t: dict(zip(methods, stats.rankdata([-np.nan_to_num(means[(m, t)], nan=-np.inf) for m in methods]))) for t in targets}
    for method in methods:
        row = {"method": method_label(method, selection), "selection": selection_label(selection)}
        row.update({f"rank {t}": float(per_target[t][method]) for t in targets})
        row["average rank"] = round(float(np.mean([per_target[t][method] for t in targets])), 3)  # printed, not 1.6666666666666667
        ranks.append(row)
    dsc = pd.DataFrame([{"method": method_label(m, selection), **{t: round(means[(m, t)], 4) for t in targets}} for m in methods])
    return {"results": pd.DataFrame(rows), "ranks": pd.DataFrame(ranks).sort_values("average rank", kind="stable").reset_index(drop=True),
            "dsc_means": dsc}


def compare_tables(run_id: str) -> dict[str, pd.DataFrame]:
    """The tables of a comparison run, from MLflow alone (its ``comparison_runs.json`` and the runs it lists)."""
    parent = store.get_run(run_id)
    selection = parent.data.tags.get("domgen.selection", "training-domain")
    seed = int(parent.data.params.get("seed", 0))
    with store.artifact_dir() as tmp:
        listed = json.loads(store.download_artifact(run_id, RUNS_ARTIFACT, tmp).read_text())
        rows, per_run = [], {}
        for i, rec in enumerate(listed):
            run = store.get_run(rec["run_id"])
            rows.append({**rec, **{m: run.data.metrics.get(m, float("nan")) for m in METRICS}})
            (tmp / str(i)).mkdir()
            per_run.setdefault((rec["method"], rec["target"]), []).append(
                patient_dsc(pd.read_csv(store.download_artifact(rec["run_id"], "per_slice_metrics.csv", tmp / str(i)))))
    patients = {}
    for key, runs in per_run.items():  # each patient's DSC averaged over the seeds x folds that tested it
        ids = sorted(set().union(*runs))
        patients[key] = {p: float(np.nanmean([r[p] for r in runs if p in r and np.isfinite(r[p])] or [np.nan])) for p in ids}
    return comparison_tables(pd.DataFrame(rows), patients, selection, seed=seed)


def dsc_plot(path: Path, means: pd.DataFrame, selection: str) -> Path:
    """Method x target mean DSC as an annotated heat map; the title names the model selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [c for c in means.columns if c != "method"]
    values = means[targets].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(targets), 0.8 + 0.45 * len(means)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(targets)), targets)
    ax.set_yticks(range(len(means)), means.method)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "-" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_title(f"mean DSC; selection: {selection_label(selection)}", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def family_report(family, out: Path, run_id: str | None = None) -> dict:
    """``domgen report --experiment domgen-compare``: the tables (Markdown, CSV, LaTeX) and the method x target plot."""
    from domgen.families import round_report

    built = round_report(family, out, run_id)
    built["files"].append(dsc_plot(Path(built["folder"]) / "method_target_dsc.png", built["tables"]["dsc_means"],
                                   store.get_run(built["parent_id"]).data.tags.get("domgen.selection", "training-domain")))
    return built
