"""Patient-wise splits (train / val / test, k-fold, inverse k-fold) and the splits JSON file.

Splits are always by patient so no patient's slices leak between parts. Like nnU-Net's
``splits_final.json`` the file is plain JSON that anyone can read and edit; an edited file is honoured.

File layout::

    {"meta": {"dataset": "A", "seed": 0, "protocol": "kfold", ...},
     "folds": [{"fold": 0, "train": [...], "val": [...], "test": [...]}, ...]}
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold, train_test_split

from domgen.errors import DomgenError

PARTS = ("train", "val", "test")


def _unique_patients(patient_ids) -> list[str]:
    patients = sorted({str(patient) for patient in patient_ids})
    if not patients:
        raise DomgenError("There are no patients to split; check that the dataset was read and is not empty.")
    return patients


def _part_sizes(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Patients per part: largest remainders, then at least one patient per non-zero part when possible."""
    exact = np.asarray(fractions, dtype=float) * n
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    for i, fraction in enumerate(fractions):
        if fraction > 0 and sizes[i] == 0:
            donor = int(np.argmax(sizes))
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[i] += 1
    return [int(size) for size in sizes]


def _split_off(patients: list[str], n_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(kept, split off): ``n_out`` patients drawn at random with scikit-learn."""
    if n_out <= 0:
        return list(patients), []
    if n_out >= len(patients):
        return [], list(patients)
    kept, out = train_test_split(patients, test_size=n_out, random_state=seed, shuffle=True)
    return sorted(kept), sorted(out)


def train_val_test_split(patient_ids, fractions: tuple[float, float, float] = (0.6, 0.1, 0.3),
                         seed: int = 0) -> dict[str, list[str]]:
    """One patient-wise train/val/test split; deterministic in ``seed``, each part sorted."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise DomgenError(
            f"Split fractions {fractions} must be three non-negative numbers (train, val, test) summing to 1."
        )
    patients = _unique_patients(patient_ids)
    _, n_val, n_test = _part_sizes(len(patients), fractions)
    rest, test = _split_off(patients, n_test, seed)
    train, val = _split_off(rest, n_val, seed)
    return {"train": train, "val": val, "test": test}


def _check_k(patients: list[str], k: int) -> int:
    k = int(k)
    if not 2 <= k <= len(patients):
        raise DomgenError(f"Cannot make {k} folds of {len(patients)} patients; choose k between 2 and {len(patients)}.")
    return k


def _kfold(patient_ids, k: int, seed: int, val_fraction: float, inverse: bool) -> list[dict]:
    """The one k-fold body: KFold parts by patient; each fold tests on its part (``inverse``: trains on it) and
    holds ``val_fraction`` of its training patients out for validation."""
    patients = _unique_patients(patient_ids)
    k = _check_k(patients, k)
    folds = []
    kfold = KFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (rest_index, part_index) in enumerate(kfold.split(patients)):
        train_index, test_index = (part_index, rest_index) if inverse else (rest_index, part_index)
        pool = [patients[i] for i in train_index]
        n_val = _part_sizes(len(pool), (1.0 - val_fraction, val_fraction))[1] if val_fraction > 0 else 0
        train, val = _split_off(pool, n_val, seed)
        folds.append({"fold": fold, "train": train, "val": val, "test": sorted(patients[i] for i in test_index)})
    return folds


def kfold_splits(patient_ids, k: int = 5, seed: int = 0, val_fraction: float = 0.1 / 0.9) -> list[dict]:
    """k-fold cross-validation by patient: each fold tests on one KFold part and splits the rest into
    train and val (``val_fraction`` of the rest; the default gives 10 % val of all patients for k=10)."""
    return _kfold(patient_ids, k, seed, val_fraction, inverse=False)


def inverse_kfold_splits(patient_ids, k: int = 5, seed: int = 0, val_fraction: float = 0.0) -> list[dict]:
    """Wang et al.'s inverse k-fold: each fold *trains* on one KFold part (1/k of the patients, 20 % for
    k=5) and tests on all the others; ``val_fraction`` of the train part may be held out for validation."""
    return _kfold(patient_ids, k, seed, val_fraction, inverse=True)


def train_on(folds: list[dict], patients) -> list[dict]:
    """``folds`` with ``patients`` moved out of every test part into that fold's train part: for a round started from
    a model that trained on them, so none of them is scored in-domain (val parts stay as they are)."""
    seen = {str(p) for p in patients}
    return [{**fold, "train": sorted(set(fold["train"]) | (set(fold["test"]) & seen)),
             "test": [p for p in fold["test"] if p not in seen]} for fold in folds]


def write_splits(path: str | os.PathLike, splits: dict | list[dict], meta: dict) -> Path:
    """Write splits (one train/val/test dict or a list of folds) with ``meta`` as JSON, atomically."""
    path = Path(path)
    folds = [splits] if isinstance(splits, dict) else list(splits)
    document = {
        "meta": dict(meta),
        "folds": [
            {"fold": int(fold.get("fold", i)), **{part: sorted(fold.get(part, [])) for part in PARTS}}
            for i, fold in enumerate(folds)
        ],
    }
    _check_folds(document["folds"], path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_splits(path: str | os.PathLike) -> dict:
    """Read and validate a splits file; returns ``{"meta": {...}, "folds": [{"fold", "train", "val", "test"}]}``."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DomgenError(f"The splits file {path} does not exist; fix the path (every round logs its splits.json as an MLflow artifact to start from).") from error
    except OSError as error:
        raise DomgenError(f"Cannot read the splits file {path} ({error.strerror or error}); check the path.") from error
    except UnicodeDecodeError as error:
        raise DomgenError(f"The splits file {path} is not UTF-8 text; replace it with the JSON splits file.") from error
    except json.JSONDecodeError as error:
        raise DomgenError(
            f"The splits file {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); fix or delete it."
        ) from error
    if not isinstance(document, dict) or not isinstance(document.get("folds"), list):
        raise DomgenError(f"The splits file {path} has no \"folds\" list at its top level; see domgen.preprocessing.splits for the layout.")
    meta = document.get("meta", {})
    if not isinstance(meta, dict):
        raise DomgenError(f"The \"meta\" entry of the splits file {path} must be an object; fix or delete it.")
    folds = []
    for i, fold in enumerate(document["folds"]):
        if not isinstance(fold, dict):
            raise DomgenError(f"Fold {i} of the splits file {path} is not an object with train/val/test lists; fix it.")
        missing = [part for part in PARTS if part not in fold]
        if missing:
            raise DomgenError(f"Fold {i} of the splits file {path} lacks {', '.join(missing)}; add the key(s) (an empty list is fine).")
        for part in PARTS:
            if not isinstance(fold[part], list) or not all(isinstance(p, str) for p in fold[part]):
                raise DomgenError(f"\"{part}\" of fold {i} in the splits file {path} must be a list of patient-id strings; fix it.")
        number = fold.get("fold", i)
        if not isinstance(number, int) or isinstance(number, bool):
            raise DomgenError(f"The fold number of fold {i} in the splits file {path} must be an integer; fix it.")
        folds.append({"fold": number, **{part: list(fold[part]) for part in PARTS}})
    _check_folds(folds, path)
    return {"meta": meta, "folds": folds}


def _check_folds(folds: list[dict], path: Path) -> None:
    """Every fold number once, every patient in at most one part of a fold."""
    numbers = [fold["fold"] for fold in folds]
    if len(set(numbers)) != len(numbers):
        raise DomgenError(f"The splits file {path} numbers two folds the same; give each fold its own \"fold\" number.")
    for fold in folds:
        seen: dict[str, str] = {}
        for part in PARTS:
            for patient in fold[part]:
                if patient in seen:
                    where = f"both {seen[patient]} and {part}" if seen[patient] != part else f"{part} twice"
                    raise DomgenError(
                        f"Patient {patient!r} is in {where} of fold {fold['fold']} in the splits file {path}; "
                        "keep each patient in one part."
                    )
                seen[patient] = part
