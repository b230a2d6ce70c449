"""A family added the way the README's "Adding a family" says, without editing domgen: a run function, settings rows,
a profile and one ``Family`` entry; validated, run, logged to a real SQLite MLflow store and reported by
`domgen report`, whose run address opens the run in the UI's training-runs view."""
from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from domgen import config, settings
from domgen.cli import main
from domgen.errors import DomgenError
from domgen.families import FAMILIES, Family, log_round_tables
from domgen.settings import S
from domgen.tracking import mlflow_store as store
from domgen.typed_config import typed

TOY, EXPERIMENT = "toy", "domgen-toy"
PROFILE = "family: toy\nseed: 0\ntoy:\n  scale: 0.8\n"


def run_toy(cfg, progress: bool = True) -> str:
    """The toy's run: one parent run whose ``dsc`` is half its scale; re-running finds it by its config hash."""
    cfg = typed(cfg, TOY)  # its typed config, made from its rows (a dict is checked first)
    exp_id, h, finished = store.round_lookup(EXPERIMENT, cfg.as_dict())
    if finished:
        return finished
    parent_id, _ = store.start_or_resume_run(exp_id, "toy round", cfg.as_dict(), store.tags(family=TOY, config_hash=h, role="round"))
    with store.finishing(parent_id):
        store.log_metrics(parent_id, {"dsc": cfg.toy.scale / 2})
        log_round_tables(TOY, parent_id)
    return parent_id


def toy_tables(parent_id: str) -> dict[str, pd.DataFrame]:
    return {"toy": pd.DataFrame([{"run": parent_id, "dsc": store.get_run(parent_id).data.metrics["dsc"]}])}


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Family:
    rows = [S("family", "str", None, (TOY,), "the family"), S("profile", "str", None, (TOY,), "the profile's name"),
            S("seed", "int", 0, (TOY,), "seed", low=0, flag="--seed"),
            S("toy.scale", "float", 1.0, (TOY,), "what the toy's dsc is half of", low=0.0, high=1.0, low_open=True)]
    monkeypatch.setattr(settings, "SETTINGS", settings.SETTINGS + rows)
    monkeypatch.setattr(settings, "TABLE", {**settings.TABLE, **{(TOY, s.key): s for s in rows}})
    monkeypatch.setattr(settings, "FAMILIES_WITH_SETTINGS", sorted({*settings.FAMILIES_WITH_SETTINGS, TOY}))
    (tmp_path / "experiments" / "toy").mkdir(parents=True)
    (tmp_path / "experiments" / "toy" / "quick.yaml").write_text(PROFILE)
    monkeypatch.setattr(config, "EXPERIMENTS_DIR", tmp_path / "experiments")
    family = Family(TOY, EXPERIMENT, "toy", "round", f"{__name__}:run_toy", f"{__name__}:toy_tables")
    monkeypatch.setitem(FAMILIES, TOY, family)
    return family


def test_a_toy_family_is_checked_run_logged_and_reported(toy, tracking_uri, tmp_path):
    assert [s.key for s in toy.settings()] == ["family", "profile", "seed", "toy.scale"]
    with pytest.raises(DomgenError) as bad:
        toy.config("quick", ["toy.scale=1.5"])
    assert str(bad.value) == "toy.scale = 1.5 is too large; give a number > 0 and <= 1 (--set toy.scale=...)"
    (tmp_path / "typo.yaml").write_text(PROFILE + "typo: 1\n")
    with pytest.raises(DomgenError, match="setting typo is not a toy setting"):  # strict: a key without a row is refused
        toy.config(str(tmp_path / "typo.yaml"))

    cfg = toy.config("quick", ["toy.scale=0.6"])
    assert (cfg.seed, cfg.toy.scale) == (0, 0.6) and cfg.as_dict() == {"family": TOY, "profile": "quick", "seed": 0, "toy": {"scale": 0.6}}
    parent = toy.run_config(cfg, progress=False)
    run = store.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["dsc"] == pytest.approx(0.3)
    assert "tables/toy.csv" in store.artifact_names(parent, "tables")
    assert store.get_experiment(EXPERIMENT).tags["mlflow.experimentKind"] == "custom_model_development"
    assert toy.run_config(toy.config("quick", ["toy.scale=0.6"]), progress=False) == parent  # found again by its hash

    result = CliRunner().invoke(main, ["report", "--experiment", EXPERIMENT, "--tracking-uri", tracking_uri,
                                       "--out", str(tmp_path / "reports")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = pd.read_csv(tmp_path / "reports" / EXPERIMENT / parent / "toy.csv")
    assert written.to_dict("records") == [{"run": parent, "dsc": pytest.approx(0.3)}]
    exp_id = run.info.experiment_id
    address = f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{parent}?workflowType=machine_learning"
    assert result.output.strip().splitlines()[-1] == (f"run {parent}: open it with `domgen ui --tracking-uri {tracking_uri}`, "
                                                      f"then {address}")


def test_a_run_on_a_tracking_server_prints_its_own_address(tracking_uri, monkeypatch):
    exp_id = store.experiment_id("domgen-address")
    with store.tracked_run(exp_id, "one", {"seed": 0}, store.tags(role="round", config_hash="x")) as run:
        pass
    monkeypatch.setattr(store, "tracking_uri", lambda: "https://mlflow.example.org/")  # where `mlflow server` serves the UI
    assert store.run_address(run.info.run_id) == (f"open it at https://mlflow.example.org/#/experiments/{exp_id}/runs/"
                                                  f"{run.info.run_id}?workflowType=machine_learning")


def test_every_family_names_functions_that_exist():
    for family in FAMILIES.values():
        assert callable(family.run_function()) and callable(family.table_builder()), family.name
        assert family.settings(), family.name
