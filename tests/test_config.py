import pytest

from domgen.config import apply_overrides, flatten, load_profile
from domgen.tracking.identity import config_hash
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


def _family_hashes(family: str, cfg: dict) -> list[str]:
    """Every hash a family takes from a config: its round (or sweep), a child run and, for transfer, a pretrained model."""
    from domgen.families import benchmark, common, leave_one_out, transfer
    from domgen.typed_config import typed

    if family == "benchmark":
        cfg = typed(cfg, benchmark.FAMILY)
        return [benchmark.configuration_hash(cfg, benchmark.expand_grid(cfg)[0]), config_hash(benchmark.base_config(cfg))]
    if family == "transfer":
        cfg = typed(cfg, transfer.FAMILY)
        view = transfer.round_view(cfg)
        return [config_hash(view), common.child_hash(view, fold=0, strategy="continual", pretrain="multi"),
                config_hash(transfer.pretraining_identity(cfg, ["A"]))]
    return [config_hash(common.hashed_view(cfg)), leave_one_out.child_hash(cfg, fold=0, phase="baseline", target="B")]


@pytest.mark.parametrize("family", ["leave_one_out", "transfer", "benchmark"])
def test_auto_precision_enters_every_hash_as_the_precision_it_resolves_to(family, monkeypatch):
    import domgen.training.trainer as trainer

    cfg = load_profile(family, "quick")
    sections = ["train"] + (["pretraining.train"] if family == "transfer" else [])

    def hashes(precision: str) -> list[str]:
        out = apply_overrides(cfg, ["device=cpu"])
        for section in sections:
            node = out
            for part in section.split("."):
                node = node.setdefault(part, {})
            node["precision"] = precision
        return _family_hashes(family, out)

    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    native = hashes("auto")
    assert native == hashes("bf16")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    plain = hashes("auto")
    assert plain == hashes("fp32")
    assert all(a != b for a, b in zip(native, plain))  # a CPU with native bf16 and one without never share a run
