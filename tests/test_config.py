import pytest

from domgen.config import apply_overrides, config_hash, flatten, load_profile
from domgen.errors import DomgenError


def test_profiles_load_and_override():
    cfg = load_profile("leave_one_out", "quick")
    assert cfg["model"]["arch"] == "linknet" and cfg["model"]["encoder"] == "resnet34"
    out = apply_overrides(cfg, ["train.epochs=3", "pseudolabel.mix=pseudo-only"], source="B")
    assert out["train"]["epochs"] == 3 and out["pseudolabel"]["mix"] == "pseudo-only" and out["source"] == "B"
    assert cfg["train"]["epochs"] != 3  # the original is untouched
    with pytest.raises(DomgenError, match="unknown key 'epoch'"):
        apply_overrides(cfg, ["train.epoch=3"])
    with pytest.raises(DomgenError, match="does not exist"):
        load_profile("leave_one_out", "nonexistent")


def test_config_hash_is_order_independent_and_sensitive():
    a = {"x": 1, "y": {"b": 2, "a": [1, 2]}}
    b = {"y": {"a": [1, 2], "b": 2}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "x": 2})
    assert flatten(a) == {"x": "1", "y.b": "2", "y.a": "[1, 2]"}
