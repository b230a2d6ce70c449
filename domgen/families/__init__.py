"""Experiment families: a config (``experiments/<family>/``) plus one function that expands it into runs.

A family is one ``Family`` object in ``FAMILIES``, the way DomainBed lists ``ALGORITHMS``: its name (the CLI command),
MLflow experiment, profiles folder, settings rows, run function and tables. The CLI runs a family and ``report``
rebuilds its tables through this entry alone; a new family is one more entry (README: "Adding a family").
Functions are named by "module:function" string, so this list never imports the families (or reports) it names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from domgen.errors import DomgenError


@dataclass(frozen=True)
class Family:
    name: str  # the CLI command, the profile's ``family`` and the ``families`` of its rows in domgen.settings.SETTINGS
    experiment: str  # the MLflow experiment
    profiles: str  # folder under experiments/
    parent_role: str  # ``domgen.role`` of its parent runs ("a|b": either)
    # "module:function(cfg, progress=..., **options)": expands a config (typed, or a dict it checks) into runs; returns the
    # parent run id (benchmark: a result holding it)
    run: str
    tables: str  # "module:function" returning {name: DataFrame} for a parent run id
    report: str = "domgen.families:round_report"  # "module:function(family, out, run_id)" writing the report

    def settings(self) -> list:
        """The family's rows of ``domgen.settings.SETTINGS`` (key, type, default, range, help)."""
        from domgen import settings

        return [s for s in settings.SETTINGS if self.name in s.families]

    def config(self, profile: str = "quick", overrides=(), **flat):
        """The family's typed config (``domgen.typed_config``): profile (a name under experiments/<profiles>/ or a YAML
        path) + ``--set`` overrides + dotted flags, every value checked against the family's settings: one DomgenError
        sentence for the first wrong one."""
        from domgen.config import apply_overrides, load_profile
        from domgen.typed_config import typed

        # a row the profile leaves to its table default can still be set (--set threads=1, --set train.compile=true)
        known = {s.key for s in self.settings()}
        return typed(apply_overrides(load_profile(self.profiles, profile), overrides, known, **flat), self.name)

    def run_function(self) -> Callable:
        return _load(self.run)

    def run_config(self, cfg, progress: bool = True, **options):
        """Run (or resume) the family on its typed config (or a dict, which the run function checks); what its run
        function returns (the parent run id)."""
        return self.run_function()(cfg, progress=progress, **options)

    def table_builder(self) -> Callable[[str], dict]:
        return _load(self.tables)

    def build_report(self, out: Path, run_id: str | None = None) -> dict:
        """{"folder", "parent_id", "tables", "files"}: the paper's tables (and figures) from MLflow alone."""
        return _load(self.report)(self, out, run_id)


def _load(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


FAMILIES: dict[str, Family] = {
    "leave-one-out": Family("leave-one-out", "domgen-leave-one-out", "leave_one_out", "round|experiment",
                            "domgen.families.leave_one_out:run_leave_one_out", "domgen.reports.report:leave_one_out_tables"),
    "transfer": Family("transfer", "domgen-transfer", "transfer", "round", "domgen.families.transfer:run_transfer",
                       "domgen.reports.transfer_report:transfer_tables"),
    "benchmark": Family("benchmark", "domgen-benchmark", "benchmark", "sweep", "domgen.families.benchmark:run_benchmark",
                        "domgen.reports.benchmark_report:benchmark_tables", "domgen.reports.benchmark_report:family_report"),
    "cross-validate": Family("cross-validate", "domgen-cross-validate", "cross_validate", "round",
                             "domgen.families.cross_validate:run_cross_validate",
                             "domgen.reports.cross_validate_report:cross_validate_tables"),
    # scores a checkpoint (no profile): its run takes (checkpoint, target, top_k, ...) and returns (run id, table)
    "confidence": Family("confidence", "domgen-confidence", "confidence", "analysis", "domgen.families.confidence:run_confidence",
                         "domgen.families.confidence:confidence_tables"),
    # issue 20: domain-generalisation methods side by side (DomainBed-style)
    "compare": Family("compare", "domgen-compare", "compare", "comparison", "domgen.families.compare:run_compare",
                      "domgen.families.compare:compare_tables", "domgen.families.compare:family_report"),
}


def log_round_tables(family: str, parent_id: str) -> None:
    """Log a finished round's tables to its parent run; the builder is named by string in ``FAMILIES``, so a family
    (below reports/) never imports the reports floor to reach it."""
    from domgen.tracking.tables import log_tables

    log_tables(parent_id, FAMILIES[family].table_builder()(parent_id))


def family_of_experiment(experiment: str) -> Family:
    for family in FAMILIES.values():
        if family.experiment == experiment:
            return family
    raise DomgenError(f"--experiment {experiment} is not a domgen experiment; use one of "
                      f"{', '.join(f.experiment for f in FAMILIES.values())}")


def profile_folder(family: str) -> Path:
    from domgen.config import EXPERIMENTS_DIR

    return EXPERIMENTS_DIR / FAMILIES[family].profiles


def round_report(family: Family, out: Path, run_id: str | None = None) -> dict:
    """Tables of one round (``run_id`` or the newest finished round) written as Markdown, CSV and LaTeX."""
    from domgen.tracking import mlflow_store as store
    from domgen.tracking.tables import write_tables

    exp = store.get_experiment(family.experiment)
    if exp is None:
        raise DomgenError(f"MLflow experiment '{family.experiment}' does not exist at {store.tracking_uri()}; run "
                          f"`domgen {family.name}` first or pass --tracking-uri")
    if run_id is None:
        roles = family.parent_role.split("|")
        parents = [r for role in roles for r in store.runs_of(exp.experiment_id, f"tags.`domgen.role` = '{role}'")]
        if not parents:
            raise DomgenError(f"experiment '{family.experiment}' has no finished {family.parent_role.replace('|', ' or ')}; run it to completion first")
        run_id = max(parents, key=lambda r: r.info.end_time or 0).info.run_id
    else:
        run = store.get_run(run_id, "--run-id")
        if run.info.experiment_id != exp.experiment_id or run.data.tags.get("domgen.role") not in family.parent_role.split("|"):
            raise DomgenError(f"--run-id {run_id} is not a {family.parent_role.replace('|', ' or ')} run of {family.experiment}; pass the parent run "
                              f"of a `domgen {family.name}` command (it prints it)")
    tables = family.table_builder()(run_id)
    folder = Path(out) / family.experiment / run_id
    paths = write_tables(tables, folder)
    return {"folder": folder, "parent_id": run_id, "tables": tables, "files": paths}
