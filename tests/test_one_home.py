"""One home for every default (issue 19): the rows of domgen/settings.py.

Independent truth: the table's rows and the profile YAML files read as written (yaml.safe_load). The typed settings
classes must start from the row's default, validate must fill what a profile omits with it, and the object built from
a validated section must carry what the profile says, else the row's default.
"""
import copy
import dataclasses
import itertools
import pickle
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from domgen import settings
from domgen.config import EXPERIMENTS_DIR
from domgen.errors import DomgenError
from domgen.evaluation.evaluate import EvaluationSettings
from domgen.families import common, cross_validate
from domgen.families.transfer import volume_train_settings
from domgen.methods.pseudolabel import PseudoLabelSettings
from domgen.preprocessing.slices import SlicePreprocessing
from domgen.preprocessing.volume import VolumePreprocessing
from domgen.settings import CV, LOO, TABLE
from domgen.training.trainer import TrainSettings
from domgen.training.volume_trainer import VolumeTrainSettings
from domgen.tracking.identity import config_hash
from domgen.typed_config import config_class, typed

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
    cfg = typed({"seed": 0, "device": "cpu", "train": {}, "preprocessing": {}, "inference": {}, "evaluation": {}}, CV)
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
        s = cross_validate.Settings.from_config(typed(out, CV))
        return [(VolumeTrainSettings, out["train"], s.train), (VolumePreprocessing, out["preprocessing"], s.pre)]
    built = [(TrainSettings, out["train"], settings.build(TrainSettings, out["train"], seed=out["seed"], device=out["device"])),
             (SlicePreprocessing, out["preprocessing"], SlicePreprocessing.from_config(out["preprocessing"])),
             (EvaluationSettings, out["evaluation"], EvaluationSettings.from_config(out["evaluation"]))]
    if "pseudolabel" in out:
        built.append((PseudoLabelSettings, out["pseudolabel"], PseudoLabelSettings.from_config(out["pseudolabel"])))
    if family == settings.TRANSFER:
        built += [(VolumeTrainSettings, out["volume"]["train"], volume_train_settings(typed(out, family), out["seed"])),
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
        volume = volume_train_settings(typed(out, settings.TRANSFER), 0)
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
    assert cfg.threads == 1 and cfg.train.compile is True
    for typo, words in (("train.compiled=true", "unknown key 'compiled'"), ("thread=1", "unknown key 'thread'"),
                        ("threads=0", "threads = 0 is too small")):
        with pytest.raises(DomgenError, match=re.escape(words)):
            FAMILIES["leave-one-out"].config("quick", [typo])


@pytest.mark.parametrize("family", ["leave-one-out", "transfer", "benchmark", "cross-validate", "compare"])
def test_a_config_built_in_python_is_completed_like_the_command_lines(family):
    """A family's run function makes its typed config from what it is given, so a profile read in Python without
    ``validate`` hashes (and finds its runs) as the same command does (a killed sweep resumed from Python found none before)."""
    from domgen.config import load_profile
    from domgen.families import FAMILIES

    for profile in ("quick", "paper") if family != "compare" else ("quick",):
        raw = load_profile(FAMILIES[family].profiles, profile)
        assert typed(raw, family) == FAMILIES[family].config(profile)
        assert typed(raw, family).as_dict() == settings.validate(copy.deepcopy(raw))


# ---------------------------------------------------------------- the typed configs made from the rows (domgen.typed_config)
# a row's kind -> the type its field is annotated with, as the Setting docstring describes the kinds
KIND_ANNOTATIONS = {"int": int, "float": float, "bool": bool, "switch": bool | str, "choice": str, "str": str, "path": str,
                    "names": tuple[str, ...], "floats": tuple[float, ...], "ints": tuple[int, ...], "bools": tuple[bool, ...],
                    "mapping": Mapping[str, Any]}
PROFILED = [(path, family) for path in PROFILES for family in [yaml.safe_load(path.read_text())["family"]]]


def validated(path):
    return settings.validate(yaml.safe_load(path.read_text()))


def plain(value):
    """A field's value as YAML and ``validate`` spell it: tuples as lists, read-only mappings as dicts."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, tuple) else value


def field_paths(cls, prefix=""):
    """{dotted path: dataclass field} of a generated class and its nested section classes."""
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            out.update(field_paths(f.type, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def attribute(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def conforms(value, annotation) -> bool:
    """``value`` is of the annotated type (a union, ``tuple[X, ...]``, a Mapping or a plain class)."""
    if isinstance(annotation, types.UnionType):
        return any(conforms(value, a) for a in annotation.__args__)
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return isinstance(value, tuple) and all(conforms(v, annotation.__args__[0]) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, annotation) and not (annotation in (int, float) and isinstance(value, bool))


@pytest.mark.parametrize(("path", "family"), PROFILED, ids=lambda p: f"{p.parent.name}/{p.stem}" if isinstance(p, Path) else p)
def test_the_typed_config_holds_every_row_and_only_rows_with_the_validated_value(path, family):
    out = validated(path)
    cfg = typed(yaml.safe_load(path.read_text()), family)
    rows = {key: s for (fam, key), s in TABLE.items() if fam == family}
    fields = field_paths(config_class(family))
    assert set(fields) == set(rows), "every row is a field and every field a row"
    for key, s in rows.items():
        value = attribute(cfg, key)
        given = get(out, key)
        assert plain(value) == (s.default if given is KeyError else given), key  # absent: a None default, "not set"
        assert fields[key].metadata["row"] is s and fields[key].type == (
            KIND_ANNOTATIONS[s.kind] | None if s.nullable or s.default is None else KIND_ANNOTATIONS[s.kind]), key
        assert conforms(value, fields[key].type), f"{key} = {value!r} is not {fields[key].type}"


@pytest.mark.parametrize("family", ["leave-one-out", "transfer", "benchmark", "cross-validate", "compare"])
def test_every_field_starts_from_its_row_default(family):
    for key, f in field_paths(config_class(family)).items():
        assert plain(field_default(f)) == plain(TABLE[(family, key)].default), key


@pytest.mark.parametrize(("path", "family"), PROFILED, ids=lambda p: f"{p.parent.name}/{p.stem}" if isinstance(p, Path) else p)
def test_a_typed_config_round_trips_through_its_dict_and_cannot_change(path, family):
    cfg = typed(yaml.safe_load(path.read_text()), family)
    assert cfg.as_dict() == validated(path)
    assert typed(cfg.as_dict(), family) == cfg and typed(cfg, family) is cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg and pickle.loads(pickle.dumps(cfg)).as_dict() == cfg.as_dict()  # worker processes
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 1
    mapping = next(k for k, s in TABLE.items() if k[0] == family and s.kind == "mapping" and attribute(cfg, k[1]) is not None)[1] \
        if family in (LOO, settings.TRANSFER) else None
    if mapping:
        with pytest.raises(TypeError):
            attribute(cfg, mapping)["x"] = 1
    copied = cfg.as_dict()
    copied["train"]["epochs"] = 999
    assert cfg.as_dict() == validated(path) and cfg.train.epochs != 999  # as_dict hands out a copy


@pytest.mark.parametrize(("family", "key", "bad"), [(LOO, "train.epochs", 0), (LOO, "device", "tpu"), (LOO, "split.train", 2.0),
                                                    (LOO, "pseudolabel.filters", {"nope": 0.9}), (CV, "inference.overlap", 1.0),
                                                    (settings.TRANSFER, "volume.train.patch_size", [0, 1, 2]),
                                                    (settings.BENCHMARK, "grid.archs", "unet,nonesuch")])
def test_a_bad_value_is_refused_with_the_sentence_of_validate(family, key, bad):
    folder = next(f.profiles for f in __import__("domgen.families", fromlist=["FAMILIES"]).FAMILIES.values() if f.name == family)
    raw = yaml.safe_load((EXPERIMENTS_DIR / folder / "quick.yaml").read_text())
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = bad
    with pytest.raises(DomgenError) as expected:
        settings.validate(copy.deepcopy(raw))
    with pytest.raises(DomgenError) as got:
        typed(raw, family)
    assert str(got.value) == str(expected.value) and key in str(got.value)
    good = typed(yaml.safe_load((EXPERIMENTS_DIR / folder / "quick.yaml").read_text()), family)
    with pytest.raises(DomgenError) as replaced:
        good.replace(**{key: bad})
    assert str(replaced.value) == str(expected.value)


def test_replace_checks_and_derives_without_changing_the_original():
    cfg = typed(yaml.safe_load((EXPERIMENTS_DIR / "leave_one_out" / "quick.yaml").read_text()), LOO)
    changed = cfg.replace(**{"pseudolabel.ci_min": 0.9, "source": "B"})
    assert (changed.pseudolabel.ci_min, changed.source) == (0.9, "B") and (cfg.pseudolabel.ci_min, cfg.source) == (0.8, "A")
    assert changed.as_dict() == {**cfg.as_dict(), "source": "B", "pseudolabel": {**cfg.as_dict()["pseudolabel"], "ci_min": 0.9}}
    attached = cfg.attach(content_digest={"datasets": {"A": "abc"}})
    assert attached.as_dict() == {**cfg.as_dict(), "content_digest": {"datasets": {"A": "abc"}}}
    assert attached.replace(seed=1).attached("content_digest") == {"datasets": {"A": "abc"}}
    with pytest.raises(DomgenError, match="setting nonesuch is not a leave-one-out setting"):
        cfg.replace(nonesuch=1)
    cv = typed(yaml.safe_load((EXPERIMENTS_DIR / "cross_validate" / "quick.yaml").read_text()), CV)
    assert cv.ablation.folds and "ablation" not in cv.without("ablation").as_dict() and cv.without("ablation").ablation.folds is None


class FakeSuite:
    """The datasets of the synthetic suite, as ``source_names`` / ``round_config`` look them up."""

    datasets = {n: types.SimpleNamespace(lesion_kind="covid") for n in "ABC"} | {"tumour": types.SimpleNamespace(lesion_kind="tumour")}

    def get(self, name):
        return self.datasets[name]


DIGEST = {"datasets": {"A": "a1", "B": "b2", "C": "c3", "D": "d4", "tumour": "t5"}}


def typed_route_hashes(family, cfg):
    """The hashes a family's code computes from its typed config (the round, its children, its derived configs)."""
    from domgen.families import benchmark as bm, compare as cmp, cross_validate as cv, leave_one_out as loo, transfer as tr

    if family == LOO:
        rc = loo.round_config(cfg, FakeSuite(), "B").attach(content_digest=DIGEST)
        return [config_hash(common.hashed_view(rc.as_dict())), loo.child_hash(rc.as_dict(), fold=0, phase="baseline", target="B")]
    if family == settings.COMPARE:
        rc = cmp.model_config(cfg.attach(content_digest=DIGEST), 0, "erm", False, ["A"], ["B"])
        return [loo.child_hash(rc.as_dict(), fold=0, phase="baseline", target="A")]
    if family == settings.TRANSFER:
        cfg = cfg.attach(content_digest=DIGEST)
        return [config_hash(tr.round_view(cfg)), config_hash(tr.pretraining_identity(cfg, ["tumour"]))]
    if family == settings.BENCHMARK:
        cfg = cfg.attach(content_digest=DIGEST)
        return [bm.configuration_hash(cfg, bm.expand_grid(cfg)[0]), config_hash(bm.base_config(cfg))]
    return [config_hash(c.without("ablation").as_dict()) for c in [cfg, *cv.ablation_configs(cfg)]]


def dict_route_hashes(family, out):
    """The same hashes from the plain validated dict with the hash functions alone (what the families did with dicts)."""
    from domgen.families import benchmark as bm, compare as cmp

    if family == LOO:
        rc = {**out, "source": "B", "targets": ["A", "C"], "content_digest": DIGEST}
        return [config_hash(common.hashed_view(rc)), common.child_hash(common.hashed_view(rc), fold=0, phase="baseline", target="B")]
    if family == settings.COMPARE:  # erm, seed 0, one source: leave-one-out's own round
        rc = {**{k: v for k, v in out.items() if k not in cmp._COMPARE_KEYS}, "family": LOO, "source": "A", "targets": ["B"],
              "content_digest": DIGEST}
        return [common.child_hash(common.hashed_view(rc), fold=0, phase="baseline", target="A")]
    view = common.hashed_view({**out, "content_digest": DIGEST})
    if family == settings.TRANSFER:
        identity = {"family": family, "phase": "pretrain", "datasets": ["tumour"], "suite": {"tumour": "t5"}, "seed": out["seed"],
                    "device": out["device"], "model": out["model"], "preprocessing": out["preprocessing"],
                    "pretraining": view["pretraining"], "train": view["train"]}
        return [config_hash({k: v for k, v in view.items() if k not in ("dims", "volume")}), config_hash(identity)]
    if family == settings.BENCHMARK:
        base = common.hashed_view({k: v for k, v in {**out, "content_digest": DIGEST}.items() if k not in bm.RUN_ONLY_KEYS})
        cell = {axis: out["grid"][key][0] for axis, key in
                (("experiment", "experiments"), ("arch", "archs"), ("encoder", "encoders"), ("weights", "weights"))}
        return [config_hash({"config": base, **cell}), config_hash(base)]
    rounds = [{k: v for k, v in out.items() if k != "ablation"}]
    grid = out["ablation"]
    for k, pre, aug in itertools.product(grid["folds"], grid["preprocessing"], grid["augmentation"]):
        child = copy.deepcopy(rounds[0])
        child["folds"], child["preprocessing"]["enabled"], child["train"]["augment"] = k, pre, aug
        rounds.append(child)
    return [config_hash(r) for r in rounds]


@pytest.mark.parametrize(("path", "family"), PROFILED, ids=lambda p: f"{p.parent.name}/{p.stem}" if isinstance(p, Path) else p)
def test_the_typed_route_keeps_every_hash_of_every_shipped_profile(path, family):
    """Finished runs are found again: each family's hashes from its typed config are those of the plain validated dict."""
    from domgen.config import flatten

    out = validated(path)
    cfg = typed(yaml.safe_load(path.read_text()), family)
    assert config_hash(common.hashed_view(cfg.as_dict())) == config_hash(common.hashed_view(out))
    assert flatten(cfg.as_dict()) == flatten(out)  # the MLflow params
    hashes = typed_route_hashes(family, cfg)
    assert hashes == dict_route_hashes(family, out)
