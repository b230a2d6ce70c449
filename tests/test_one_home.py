"""One home for every default (issue 19): the rows of domgen/settings.py.

Independent truth: the table's rows and the profile YAML files read as written (yaml.safe_load). The typed settings
classes must start from the row's default, validate must fill what a profile omits with it, and the object built from
a validated section must carry what the profile says, else the row's default.
"""
import copy
import re
import dataclasses
from pathlib import Path

import pytest
import yaml

from domgen import settings
from domgen.config import EXPERIMENTS_DIR
from domgen.errors import DomgenError
from domgen.evaluation.evaluate import EvaluationSettings
from domgen.families import cross_validate
from domgen.families.transfer import volume_train_settings
from domgen.methods.pseudolabel import PseudoLabelSettings
from domgen.preprocessing.slices import SlicePreprocessing
from domgen.preprocessing.volume import VolumePreprocessing
from domgen.settings import CV, LOO, TABLE
from domgen.training.trainer import TrainSettings
from domgen.training.volume_trainer import VolumeTrainSettings

PROFILES = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*/*.yaml"))

# (family, section) -> the class whose fields are that section's rows; the rows of this family are its defaults
CLASSES = {(LOO, "train"): TrainSettings, (LOO, "preprocessing"): SlicePreprocessing, (LOO, "evaluation"): EvaluationSettings,
           (LOO, "pseudolabel"): PseudoLabelSettings, (CV, "train"): VolumeTrainSettings, (CV, "preprocessing"): VolumePreprocessing}
# fields that are no row: seed and device are top-level rows the families pass in; Müller et al.'s optimiser is fixed in
# cross-validate (no row), only transfer's volume.train rows change it
NOT_ROWS = {TrainSettings: {"seed", "device", "augment_params"},  # augment_params: compare sets it from method.<name>.* rows
            VolumeTrainSettings: {"seed", "device", "optimizer", "momentum", "nesterov", "schedule", "poly_power"}}
# rows of these sections that are no field: the families read them themselves
NOT_FIELDS = {(LOO, "evaluation.cutoff_candidates"), (LOO, "pseudolabel.track_target_slices")}
# cross_validate.Settings: the row -> its attribute (it has no field defaults; from_config fills an omitted key)
CV_SETTINGS = {"inference.overlap": "overlap", "inference.sw_batch_size": "sw_batch_size",
               "evaluation.nsd_tolerance_mm": "tolerance_mm", "evaluation.empty": "empty", "evaluation.surface": "surface"}


def rows_of(family, section):
    return {key.split(".", 1)[1]: s for (fam, key), s in TABLE.items() if fam == family and key.startswith(section + ".")}


def field_default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@pytest.mark.parametrize(("family", "section"), list(CLASSES))
def test_every_field_default_is_its_row_default_and_every_row_has_a_field(family, section):
    cls = CLASSES[(family, section)]
    rows = rows_of(family, section)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in NOT_ROWS.get(cls, set())}
    without_field = {k for k in rows if k not in fields and (family, f"{section}.{k}") not in NOT_FIELDS}
    assert not without_field, f"rows of {family} {section}.* that {cls.__name__} has no field for"
    assert not set(fields) - set(rows), f"fields of {cls.__name__} with no {family} row"
    for name, f in fields.items():
        assert field_default(f) == rows[name].default, f"{cls.__name__}.{name}"


def test_cross_validate_settings_take_an_omitted_key_from_its_row():
    cfg = {"seed": 0, "device": "cpu", "train": {}, "preprocessing": {}, "inference": {}, "evaluation": {}}
    built = cross_validate.Settings.from_config(cfg)
    assert set(CV_SETTINGS) == {k for (fam, k) in TABLE if fam == CV and k.split(".")[0] in ("inference", "evaluation")}
    for key, attribute in CV_SETTINGS.items():
        assert getattr(built, attribute) == TABLE[(CV, key)].default, key
    assert built.train == VolumeTrainSettings(seed=0, device="cpu") and built.pre == VolumePreprocessing()


def get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def listed(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_validate_fills_every_row_the_profile_omits_with_its_default(path):
    raw = yaml.safe_load(path.read_text())
    family = raw["family"]
    out = settings.validate(copy.deepcopy(raw))
    rows = [s for (fam, _), s in TABLE.items() if fam == family]
    assert rows
    for s in rows:
        given, got = get(raw, s.key), get(out, s.key)
        if s.key.startswith(("strategy_train.", "pretraining.train.")):
            continue
        if given is not KeyError:
            # as the profile says (coerced: 1.0e-5 stays a number, a list stays a list)
            assert got == given, s.key
        elif s.default is None:
            assert got is KeyError, f"{s.key}: a None default means not set, so it stays absent"
        else:
            assert got == listed(s.default), s.key
            assert not isinstance(got, (list, dict)) or got is not s.default, s.key  # a copy, never the row's own object
    for section in ("strategy_train", "pretraining"):  # partial overrides of train stay as written
        if isinstance(raw.get(section), dict):
            assert out[section] == raw[section]


def built_sections(out):
    """(class, section given to it, built object) of every typed class a family builds from a validated profile."""
    family = out["family"]
    if family == CV:
        s = cross_validate.Settings.from_config(out)
        return [(VolumeTrainSettings, out["train"], s.train), (VolumePreprocessing, out["preprocessing"], s.pre)]
    built = [(TrainSettings, out["train"], settings.build(TrainSettings, out["train"], seed=out["seed"], device=out["device"])),
             (SlicePreprocessing, out["preprocessing"], SlicePreprocessing.from_config(out["preprocessing"])),
             (EvaluationSettings, out["evaluation"], EvaluationSettings.from_config(out["evaluation"]))]
    if "pseudolabel" in out:
        built.append((PseudoLabelSettings, out["pseudolabel"], PseudoLabelSettings.from_config(out["pseudolabel"])))
    if family == settings.TRANSFER:
        built += [(VolumeTrainSettings, out["volume"]["train"], volume_train_settings(out, out["seed"])),
                  (VolumePreprocessing, out["volume"]["preprocessing"],
                   VolumePreprocessing.from_config(out["volume"]["preprocessing"]))]
    return built


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_the_typed_objects_carry_the_validated_values(path):
    out = settings.validate(yaml.safe_load(path.read_text()))
    for cls, section, obj in built_sections(out):
        for f in dataclasses.fields(cls):
            if f.name in section:
                value = getattr(obj, f.name)
                assert listed(value) == section[f.name] or (f.name == "filters" and value == (section[f.name] or {})), \
                    f"{path.name}: {cls.__name__}.{f.name}"
    if out["family"] == settings.TRANSFER:
        # the 3D section trains with transfer's own rows (Wang et al.'s SGD and poly), not VolumeTrainSettings' defaults
        volume = volume_train_settings(out, 0)
        for key in ("optimizer", "lr", "schedule", "momentum", "nesterov", "poly_power", "plateau_factor", "min_lr"):
            assert getattr(volume, key) == out["volume"]["train"][key], key


def test_changing_a_default_in_one_place_changes_it_everywhere(monkeypatch):
    monkeypatch.setitem(TABLE, (LOO, "train.epochs"), dataclasses.replace(TABLE[(LOO, "train.epochs")], default=7))
    raw = yaml.safe_load((PROFILES[0].parents[1] / "leave_one_out" / "quick.yaml").read_text())
    del raw["train"]["epochs"]
    out = settings.validate(raw)
    assert out["train"]["epochs"] == 7
    assert TrainSettings.from_config(out["train"]).epochs == 7


def test_partial_sections_and_command_families_are_not_filled():
    flags = {"family": LOO, "pseudolabel": {"ci_min": 0.9}}
    assert settings.validate(flags, fill=False) == {"family": LOO, "pseudolabel": {"ci_min": 0.9}}
    assert settings.fill_defaults({"family": "confidence"}, "confidence") == {"family": "confidence"}


def test_default_names_an_unknown_key():
    with pytest.raises(KeyError, match="train.epoch is not a leave-one-out setting"):
        settings.default(LOO, "train.epoch")
    assert settings.default(CV, "train.patch_size") == VolumeTrainSettings().patch_size


def test_a_row_the_profile_leaves_to_its_default_can_still_be_set_and_a_typo_cannot():
    from domgen.families import FAMILIES

    quick = yaml.safe_load((EXPERIMENTS_DIR / "leave_one_out" / "quick.yaml").read_text())
    assert "threads" not in quick and "compile" not in quick["train"]  # left to the table
    cfg = FAMILIES["leave-one-out"].config("quick", ["threads=1", "train.compile=true"])
    assert cfg["threads"] == 1 and cfg["train"]["compile"] is True
    for typo, words in (("train.compiled=true", "unknown key 'compiled'"), ("thread=1", "unknown key 'thread'"),
                        ("threads=0", "threads = 0 is too small")):
        with pytest.raises(DomgenError, match=re.escape(words)):
            FAMILIES["leave-one-out"].config("quick", [typo])


@pytest.mark.parametrize("family", ["leave-one-out", "transfer", "benchmark", "cross-validate", "compare"])
def test_a_config_built_in_python_is_completed_like_the_command_lines(family):
    """A family's run function completes what it is given, so a profile read in Python without ``validate`` hashes
    (and finds its runs) as the same command does (a killed sweep resumed from Python found none before)."""
    from domgen.config import load_profile
    from domgen.families import FAMILIES
    from domgen.families.common import completed

    for profile in ("quick", "paper") if family != "compare" else ("quick",):
        assert completed(load_profile(FAMILIES[family].profiles, profile), family) == FAMILIES[family].config(profile)
