"""Run identity is pinned: these hashes and folds were computed on the code before issue 19 moved them into one module,
so a refactor that changes a single value (and would orphan every finished MLflow run) fails here."""
import hashlib

from domgen.tracking.identity import config_hash
from domgen.families import common, cross_validate, leave_one_out
from domgen.preprocessing.splits import inverse_kfold_splits, kfold_splits

CFG = {"family": "leave-one-out", "seed": 3, "train": {"lr": 0.01, "epochs": 2, "loader_workers": 4, "precision": "fp32"},
       "suite": "s.yaml", "content_digest": {"datasets": {"A": "abc"}}}
PATIENTS = [f"p{i:02d}" for i in range(10)]


def test_hashes_of_fixed_configs_are_unchanged(monkeypatch):
    from domgen.tracking import identity

    monkeypatch.setattr(identity, "RESULTS_VERSION", 3)  # the pins were taken at RESULTS_VERSION 3; the function is what is pinned
    assert config_hash({"a": 1, "b": [1, 2], "c": {"d": "x"}}) == "c275ef496f021400"
    assert config_hash(common.hashed_view(CFG)) == "b85b15646b353e7d"
    assert common.child_hash(common.hashed_view(CFG), fold=0, strategy="continual", pretrain="multi") == "7982cd33ab2105a0"
    assert leave_one_out.child_hash(CFG, fold=1, phase="baseline", target="B") == "c332e243947e4a1f"
    assert cross_validate.child_hash({"family": "cross-validate", "seed": 1}, fold=2, role="fold") == "f574460a12c9e09e"


def test_hashed_view_leaves_out_loader_keys_and_paths_once_contents_are_in():
    view = common.hashed_view(CFG)
    assert "loader_workers" not in view["train"] and "suite" not in view
    assert "suite" in common.hashed_view({k: v for k, v in CFG.items() if k != "content_digest"})


def test_file_digest_is_the_sha256_of_the_contents(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    # FIPS 180-2's test vector for "abc"
    assert common.file_digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert common.file_digest(path) == hashlib.sha256(b"abc").hexdigest()


def test_kfold_folds_are_unchanged():
    assert kfold_splits(PATIENTS, 3, seed=7) == [
        {"fold": 0, "train": ["p01", "p03", "p04", "p07", "p09"], "val": ["p06"], "test": ["p00", "p02", "p05", "p08"]},
        {"fold": 1, "train": ["p00", "p02", "p04", "p05", "p06", "p08"], "val": ["p03"], "test": ["p01", "p07", "p09"]},
        {"fold": 2, "train": ["p00", "p01", "p05", "p07", "p08", "p09"], "val": ["p02"], "test": ["p03", "p04", "p06"]}]
    rest = ["p00", "p01", "p02", "p03", "p04", "p05", "p06", "p07", "p08", "p09"]
    assert inverse_kfold_splits(PATIENTS, 5, seed=2, val_fraction=0.2) == [
        {"fold": k, "train": [train], "val": [val], "test": [p for p in rest if p not in (train, val)]}
        for k, (train, val) in enumerate([("p01", "p04"), ("p00", "p05"), ("p02", "p07"), ("p03", "p06"), ("p08", "p09")])]
