"""The settings table, content hashes and run leases, against independent truth (smp's own shape check,
hand-made files, a real SQLite MLflow store)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from domgen import settings
from domgen.config import EXPERIMENTS_DIR, apply_overrides, load_profile
from domgen.tracking.identity import config_hash
from domgen.errors import DomgenError
from domgen.families import FAMILIES, common
from domgen.models import ARCHITECTURES, build_model
from domgen.tracking import mlflow_store as store
from domgen.typed_config import typed


def test_every_shipped_profile_passes_its_own_table():
    for family in FAMILIES.values():
        for path in sorted((EXPERIMENTS_DIR / family.profiles).glob("*.yaml")):
            cfg = load_profile(family.profiles, str(path))
            assert cfg["family"] == family.name
            settings.validate(cfg)


def test_values_are_coerced_and_names_normalised():
    cfg = apply_overrides(load_profile("benchmark", "quick"), ["train.lr=1", "grid.archs=Unet,LINKNET,unet",
                                                               "grid.encoders=resnet18,resnet18"])
    out = settings.validate(cfg)
    assert out["train"]["lr"] == 1.0 and isinstance(out["train"]["lr"], float)
    assert out["grid"]["archs"] == ["unet", "linknet"]  # the paper writes Unet, smp's registry unet; twice is once
    assert out["grid"]["encoders"] == ["resnet18"]
    with pytest.raises(DomgenError, match=r"train.epochs = 2.5 is not an integer"):
        settings.validate(apply_overrides(load_profile("benchmark", "quick"), ["train.epochs=2.5"]))
    with pytest.raises(DomgenError, match="is not a benchmark setting"):
        settings.validate({**load_profile("benchmark", "quick"), "colour": "blue"})


def test_loader_settings_are_checked_and_stay_out_of_the_hashes():
    for family in ("benchmark", "leave_one_out", "transfer"):
        out = settings.validate(apply_overrides(load_profile(family, "quick"), ["train.loader_workers=2", "train.pin_memory=true"]))
        assert out["train"]["loader_workers"] == 2 and out["train"]["pin_memory"] is True
    for bad, words in (("train.loader_workers=-1", "train.loader_workers = -1 is too small"),
                       ("train.loader_workers=two", "train.loader_workers = 'two' is not an integer"),
                       ("train.pin_memory=sometimes", "train.pin_memory = 'sometimes' is not true, false or auto"),
                       ("train.precision=fp16", "train.precision fp16 needs --device cuda")):
        with pytest.raises(DomgenError, match=words):
            settings.validate(apply_overrides(load_profile("leave_one_out", "quick"), [bad]))
    gpu = settings.validate(apply_overrides(load_profile("leave_one_out", "quick"), ["train.precision=fp16", "device=cuda"]))
    assert gpu["train"]["precision"] == "fp16"
    # how batches reach the model is not part of a run's identity: runs made before these keys keep their hashes
    base = settings.validate(load_profile("transfer", "quick"))
    more = settings.validate(apply_overrides(load_profile("transfer", "quick"), ["train.loader_workers=4", "train.pin_memory=false"]))
    older = {**base, "train": {k: v for k, v in base["train"].items() if k not in common.LOADER_KEYS}}
    assert config_hash(common.hashed_view(base)) == config_hash(common.hashed_view(more)) == config_hash(older)


def test_the_volume_family_has_its_own_rows():
    cfg = {"family": "cross-validate", "train": {"epochs": 3}}
    assert settings.validate(cfg)["train"]["epochs"] == 3
    with pytest.raises(DomgenError, match="train.new_key is not a cross-validate setting"):
        settings.validate({"family": "cross-validate", "train": {"epochs": 3, "new_key": 1}})
    with pytest.raises(DomgenError, match="train.epochs"):
        settings.validate({"family": "cross-validate", "train": {"epochs": 0}})


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_image_size_rule_matches_what_smp_accepts(arch):
    model = build_model(arch, "resnet18", "none", 1).eval()
    for size in (40, 48, 64):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 1, size, size))
            smp_ok = True
        except RuntimeError:
            smp_ok = False
        cfg = apply_overrides(load_profile("leave_one_out", "quick"), [f"model.arch={arch}", f"preprocessing.image_size={size}"])
        try:
            settings.validate(cfg)
            ours = True
        except DomgenError as exc:
            assert "multiple of" in str(exc)
            ours = False
        assert ours == smp_ok, (arch, size)


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("DOMGEN_THREADS", "3")
    assert settings.environment("DOMGEN_THREADS") == 3
    monkeypatch.setenv("DOMGEN_THREADS", "")
    assert settings.environment("DOMGEN_THREADS") is None
    for bad in ("abc", "0", "1.5"):
        monkeypatch.setenv("DOMGEN_THREADS", bad)
        with pytest.raises(DomgenError, match="DOMGEN_THREADS"):
            settings.environment("DOMGEN_THREADS")


def test_markdown_table_lists_every_setting():
    table = settings.markdown_table()
    assert all(f"`{s.key}`" in table for s in settings.SETTINGS)


def test_hashes_follow_contents_not_paths(tiny_suite, tmp_path):
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tiny_suite.parent, moved)
    cfg = {"suite": str(tiny_suite), "seed": 0}
    here = common.content_digest(cfg, ["A", "B"])
    there = common.content_digest({**cfg, "suite": str(moved / tiny_suite.name)}, ["A", "B"])
    assert here == there  # same files, another folder
    one = sorted((moved / "A").rglob("*.nii.gz"))[0]
    blob = one.read_bytes()
    one.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    changed = common.content_digest({**cfg, "suite": str(moved / tiny_suite.name)}, ["A", "B"])
    assert changed["datasets"]["A"] != here["datasets"]["A"] and changed["datasets"]["B"] == here["datasets"]["B"]
    # a splits file and an init checkpoint count by their bytes
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"folds": []}')
    b.write_text('{"folds": []}')
    assert common.identity({"splits_file": str(a)}, []) == common.identity({"splits_file": str(b)}, [])
    b.write_text('{"folds": [1]}')
    assert common.identity({"splits_file": str(a)}, []) != common.identity({"splits_file": str(b)}, [])
    view = common.hashed_view(common.with_content_digests(typed({"suite": str(tiny_suite)}, settings.LOO), ["A"]).as_dict())
    assert "suite" not in view and view["content_digest"]["datasets"]["A"] == here["datasets"]["A"]


def test_runs_record_versions_and_a_resume_under_other_versions_says_so(tracking_uri, capsys):
    exp = store.experiment_id("domgen-test")
    assert MlflowClient().get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    tags = store.tags(config_hash="h1", role="round")
    run_id, done = store.start_or_resume_run(exp, "round", {"a": 1}, tags)
    run = MlflowClient().get_run(run_id)
    import segmentation_models_pytorch as smp

    assert run.data.tags["domgen.smp_version"] == smp.__version__ and run.data.tags["domgen.domgen_version"]
    MlflowClient().set_tag(run_id, "domgen.smp_version", "0.0.1")
    MlflowClient().set_terminated(run_id, "KILLED")
    again, done = store.start_or_resume_run(exp, "round", {"a": 1}, tags)
    assert again == run_id and not done
    assert "different versions" in capsys.readouterr().err
    assert "smp_version 0.0.1 -> " in MlflowClient().get_run(run_id).data.tags["domgen.resumed_with_versions"]


def test_leases_claims_and_stale_runs(tracking_uri):
    exp = store.experiment_id("domgen-test")
    client = MlflowClient()
    first = store.claim_run(exp, "c", {}, store.tags(config_hash="h2"))
    assert first is not None
    assert store.claim_run(exp, "c", {}, store.tags(config_hash="h2")) is None  # live (ours): not claimed twice
    assert not store.is_stale(client.get_run(first.info.run_id))
    # a run whose owner process has exited is stale at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.set_tag(first.info.run_id, "domgen.owner", f"{store.socket.gethostname()}:{dead.pid}")
    assert store.is_stale(client.get_run(first.info.run_id))
    # another machine's run: stale only when its heartbeat is older than three periods
    client.set_tag(first.info.run_id, "domgen.owner", "other-host:1")
    client.set_tag(first.info.run_id, "domgen.lease_seconds", "10")
    client.set_tag(first.info.run_id, "domgen.heartbeat", f"{time.time() - 20:.3f}")
    assert not store.is_stale(client.get_run(first.info.run_id))
    client.set_tag(first.info.run_id, "domgen.heartbeat", f"{time.time() - 31:.3f}")
    assert store.is_stale(client.get_run(first.info.run_id))
    second = store.claim_run(exp, "c", {}, store.tags(config_hash="h2"))
    assert second is not None
    closed = client.get_run(first.info.run_id)
    assert closed.info.status == "KILLED" and store.is_interrupted(closed)
    with store.finishing(second.info.run_id):
        pass
    assert store.claim_run(exp, "c", {}, store.tags(config_hash="h2")) is None  # finished: nothing to do


def test_heartbeat_is_refreshed_while_a_run_lives(tracking_uri, monkeypatch):
    monkeypatch.setenv("DOMGEN_HEARTBEAT_SECONDS", "0.2")
    exp = store.experiment_id("domgen-test")
    with store.tracked_run(exp, "r", {}, store.tags(config_hash="h3")) as run:
        start = float(MlflowClient().get_run(run.info.run_id).data.tags["domgen.heartbeat"])
        time.sleep(1.0)
        later = float(MlflowClient().get_run(run.info.run_id).data.tags["domgen.heartbeat"])
    assert later > start
    with pytest.raises(KeyboardInterrupt):
        with store.tracked_run(exp, "r", {}, store.tags(config_hash="h4")) as run:
            raise KeyboardInterrupt
    assert store.is_interrupted(MlflowClient().get_run(run.info.run_id))
    with pytest.raises(ValueError):
        with store.tracked_run(exp, "r", {}, store.tags(config_hash="h5")) as run:
            raise ValueError("boom")
    failed = MlflowClient().get_run(run.info.run_id)
    assert failed.info.status == "FAILED" and not store.is_interrupted(failed)


def _commands() -> dict:
    from domgen.cli import main

    found = {name: cmd for name, cmd in main.commands.items() if not hasattr(cmd, "commands")}
    for group, cmd in main.commands.items():
        found.update({f"{group} {name}": sub for name, sub in getattr(cmd, "commands", {}).items()})
    return found


def test_every_flag_of_the_table_is_an_option_whose_default_leaves_it_to_the_profile():
    """A row naming a flag: that option exists on the command of each of the row's families (and on pseudolabel and data
    check where they take it), and its default is None (the profile decides) or the row's own default."""
    import click

    commands = _commands()
    also = {settings.LOO: ("pseudolabel", "data check")}  # commands that take leave-one-out's flags without a profile
    unset = getattr(getattr(click.core, "UNSET", None), "__class__", type(None))
    checked = 0
    for row in (s for s in settings.SETTINGS if s.flag):
        for family in row.families:
            for name in (family, *also.get(family, ())):
                option = next((p for p in commands[name].params if row.flag in p.opts), None)
                if option is None:
                    assert name != family, f"{row.key} names {row.flag}, which `domgen {name}` does not take"
                    continue
                default = None if isinstance(option.default, unset) or option.default in ((), []) else option.default
                assert default is None or default == row.default, f"domgen {name} {row.flag} defaults to {default}, the table to {row.default}"
                checked += 1
    assert checked > 50


def test_every_profile_file_is_allowed_by_its_rows():
    """Each experiments/<family>/*.yaml, read as written (no merging), holds only values its family's rows allow."""
    import yaml

    profiles = sorted(EXPERIMENTS_DIR.glob("*/*.yaml"))
    assert len(profiles) >= 8
    for path in profiles:
        raw = yaml.safe_load(path.read_text())
        assert raw["family"] in settings.FAMILIES_WITH_SETTINGS, path  # strict: an unknown key is refused too
        settings.validate(raw)  # raises a DomgenError sentence naming the key
