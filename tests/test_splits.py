import json

import pytest

from domgen.errors import DomgenError
from domgen.preprocessing.splits import (
    inverse_kfold_splits, kfold_splits, read_splits, train_on, train_val_test_split, write_splits,
)

PATIENTS = [f"P{i:03d}" for i in range(40)]


def _assert_partition(fold, patients):
    parts = [set(fold[p]) for p in ("train", "val", "test")]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert set().union(*parts) == set(patients)
    for p in ("train", "val", "test"):
        assert fold[p] == sorted(fold[p])


def test_train_val_test_split_partitions_patients_with_fractions():
    split = train_val_test_split(PATIENTS + PATIENTS[:5], (0.6, 0.1, 0.3), seed=0)  # repeated ids: one patient
    _assert_partition(split, PATIENTS)
    assert [len(split[p]) for p in ("train", "val", "test")] == [24, 4, 12]


def test_split_is_deterministic_and_seed_dependent():
    assert train_val_test_split(PATIENTS, seed=3) == train_val_test_split(list(reversed(PATIENTS)), seed=3)
    assert train_val_test_split(PATIENTS, seed=3) != train_val_test_split(PATIENTS, seed=4)


def test_small_cohort_gets_one_patient_per_part():
    split = train_val_test_split(["a", "b", "c", "d"], (0.8, 0.1, 0.1))
    assert [len(split[p]) for p in ("train", "val", "test")] == [2, 1, 1]
    with pytest.raises(DomgenError):
        train_val_test_split(PATIENTS, (0.5, 0.2, 0.2))


def test_kfold_test_parts_partition_patients():
    folds = kfold_splits(PATIENTS, k=5, seed=1)
    assert [f["fold"] for f in folds] == list(range(5))
    tests = [set(f["test"]) for f in folds]
    assert sum(len(t) for t in tests) == len(PATIENTS) and set().union(*tests) == set(PATIENTS)
    for fold in folds:
        _assert_partition(fold, PATIENTS)
        assert len(fold["test"]) == 8 and len(fold["val"]) == 4  # 32 non-test patients / 9
    assert kfold_splits(PATIENTS, 5, seed=1) == folds and kfold_splits(PATIENTS, 5, seed=2) != folds
    with pytest.raises(DomgenError):
        kfold_splits(PATIENTS[:3], k=5)


def test_inverse_kfold_trains_on_one_part_and_tests_on_the_rest():
    folds = inverse_kfold_splits(PATIENTS, k=5, seed=0)
    trains = [set(f["train"]) for f in folds]
    assert set().union(*trains) == set(PATIENTS) and sum(len(t) for t in trains) == len(PATIENTS)
    for fold, regular in zip(folds, kfold_splits(PATIENTS, k=5, seed=0, val_fraction=0)):
        _assert_partition(fold, PATIENTS)
        assert len(fold["train"]) == 8 and len(fold["test"]) == 32
        assert fold["train"] == regular["test"]  # the same KFold parts, roles swapped


def test_train_on_moves_seen_patients_from_test_to_train():
    folds = [{"fold": 0, "train": ["p1", "p2"], "val": ["p3"], "test": ["p4", "p5", "p6"]},
             {"fold": 1, "train": ["p4", "p5"], "val": ["p6"], "test": ["p1", "p2", "p3"]}]
    moved = train_on(folds, ["p3", "p5"])
    assert moved == [{"fold": 0, "train": ["p1", "p2", "p5"], "val": ["p3"], "test": ["p4", "p6"]},
                     {"fold": 1, "train": ["p3", "p4", "p5"], "val": ["p6"], "test": ["p1", "p2"]}]
    assert folds[0]["test"] == ["p4", "p5", "p6"]  # the input is not changed
    assert train_on(folds, []) == folds


def test_json_round_trip_and_edited_file_is_honoured(tmp_path):
    path = tmp_path / "sub" / "splits.json"
    folds = kfold_splits(PATIENTS, k=4, seed=0)
    write_splits(path, folds, {"dataset": "A", "seed": 0, "protocol": "kfold"})
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temp file left behind
    document = read_splits(path)
    assert document["meta"] == {"dataset": "A", "seed": 0, "protocol": "kfold"}
    assert document["folds"] == folds
    # A person moves a patient from test to train by hand.
    raw = json.loads(path.read_text())
    moved = raw["folds"][0]["test"].pop()
    raw["folds"][0]["train"].append(moved)
    path.write_text(json.dumps(raw, indent=1))
    assert moved in read_splits(path)["folds"][0]["train"]
    single = tmp_path / "single.json"
    write_splits(single, train_val_test_split(PATIENTS), {"protocol": "holdout"})
    assert read_splits(single)["folds"][0]["fold"] == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"folds": [', "not valid JSON"),
        ('{"meta": {}}', "folds"),
        ('{"folds": [{"train": ["a"], "test": ["b"]}]}', "lacks val"),
        ('{"folds": [{"train": ["a"], "val": [], "test": ["a"]}]}', "'a' is in both train and test"),
        ('{"folds": [{"train": [1], "val": [], "test": []}]}', "patient-id strings"),
    ],
)
def test_broken_splits_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "splits.json"
    path.write_text(text)
    with pytest.raises(DomgenError, match=message) as error:
        read_splits(path)
    assert str(path) in str(error.value)
    with pytest.raises(DomgenError, match="does not exist"):
        read_splits(tmp_path / "missing.json")
