"""Real 2D CT data as it is shared: per-slice sizes, soft and JPEG masks, 8-bit images with no recorded window,
a lung-mask provider that finds nothing; the k-fold protocol, min_pixels_at, and the three-round experiment."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy import ndimage

from domgen.cli import main
from domgen.families import leave_one_out as loo
from domgen.methods.certainty import Selection
from domgen.methods.pseudolabel import ci_ranking
from domgen.tracking import mlflow_store as store
from domgen.typed_config import typed
from stores import sqlite_store

TINY = ["--set", "train.epochs=1", "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8",
        "--set", "pseudolabel.ci_min=0.0", "--set", "split.protocol=repeated-holdout", "--folds", "1", "--quiet"]


def chest_slice(rng: np.random.Generator, size: tuple[int, int], lesion_at: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """One axial slice in HU (air, a +40 HU body, two -850 HU lungs, a -300 HU lesion) and its lesion mask."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(float)
    image = np.full(size, -1000.0)
    image[((y - h / 2) / (0.42 * h)) ** 2 + ((x - w / 2) / (0.46 * w)) ** 2 <= 1] = 40.0
    for cx in (0.3 * w, 0.7 * w):
        image[((y - h / 2) / (0.3 * h)) ** 2 + ((x - cx) / (0.15 * w)) ** 2 <= 1] = -850.0
    lesion = np.zeros(size, bool)
    if lesion_at is not None:
        lesion = (y - lesion_at[0]) ** 2 + (x - lesion_at[1]) ** 2 <= (0.08 * min(h, w)) ** 2
        image[lesion] = -300.0
    return image + rng.normal(0, 20, size), lesion


def to_8bit(hu: np.ndarray) -> np.ndarray:
    # a lung window the files do not record: the reader only sees 0..255
    return np.clip(np.rint((hu + 1350.0) / 1500.0 * 255.0), 0, 255).astype(np.uint8)


def write_collection(root: Path, patients: int, quirk: str, seed: int) -> None:
    """A folder of PNG/JPG slices: per-slice sizes (``cropped``), JPEG images and masks (``jpeg``) or flat
    images in which no lung can be found (``no-lung``); lesion masks are soft (blurred, 0..255) in ``cropped``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for p in range(patients):
        for z in range(4):
            size = (56 + 4 * ((p + z) % 3), 60 + 2 * z) if quirk == "cropped" else (64, 64)
            has_lesion = z % 2 == 0
            hu, lesion = chest_slice(rng, size, (size[0] // 2, int(0.3 * size[1])) if has_lesion else None)
            stem = f"pat{p}_{z:03d}"
            if quirk == "no-lung":  # slices below the diaphragm: body and outside air, no lung to find
                hu = np.where(hu > -950.0, 40.0, -1000.0) + rng.normal(0, 5, size)
            if quirk == "cropped":
                soft = ndimage.gaussian_filter(lesion.astype(float) * 255.0, 1.0)
                Image.fromarray(to_8bit(hu)).save(root / "images" / f"{stem}.png")
                Image.fromarray(np.clip(np.rint(soft), 0, 255).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
            elif quirk == "jpeg":
                Image.fromarray(to_8bit(hu)).save(root / "images" / f"{stem}.jpg", quality=85)
                Image.fromarray(lesion.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.jpg", quality=85)
            else:
                Image.fromarray(to_8bit(hu)).save(root / "images" / f"{stem}.png")
                Image.fromarray(lesion.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")


@pytest.fixture(scope="module")
def quirky_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quirky")
    for name, quirk, n in (("S", "cropped", 4), ("T", "jpeg", 3), ("U", "no-lung", 2)):
        write_collection(root / name, n, quirk, seed=len(name) + n)
    # a chest is ~35 cm across: these 60-pixel slices have ~6 mm pixels (the lung-mask morphology works in mm)
    entry = {"format": "slices", "intensity": "windowed", "mask_threshold": 127, "spacing": [6.0, 6.0], "patient_id": r"^(?P<patient>pat\d+)_(?P<slice>\d+)$"}
    suite = {"name": "quirky", "datasets": {name: {**entry, "root": name} for name in ("S", "T", "U")}}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root / "suite.yaml"


def _runs(uri: str):
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(loo.EXPERIMENT)
    return [] if exp is None else store.runs_of(exp.experiment_id, "", status=None)


def test_data_check_reports_the_quirks(quirky_suite):
    out = CliRunner().invoke(main, ["data", "check", "S", "--suite", str(quirky_suite), "--lung-mask", "otsu"])
    assert out.exit_code == 0, out.output
    assert "slices differ in size within 4 patient(s)" in out.output
    assert "binarised at value > 127 (mask_threshold)" in out.output
    assert "HU unknown" in out.output and "lung-mask providers usable: otsu" in out.output
    assert "16 kept, 0 dropped under keep_slices=lung" in out.output
    lost = CliRunner().invoke(main, ["data", "check", "U", "--suite", str(quirky_suite), "--lung-mask", "otsu"])
    assert lost.exit_code == 0 and "0 kept, 8 dropped" in lost.output and "2 patient(s) lose every slice" in lost.output


def test_data_check_reports_an_unusable_lung_mask_as_a_finding(tmp_path, quirky_suite):
    """8-bit slices with no recorded window under the profile's threshold provider: every finding is reported, exit 0;
    only a broken file makes the check fail."""
    out = CliRunner().invoke(main, ["data", "check", "S", "--suite", str(quirky_suite)])
    assert out.exit_code == 0, out.output
    assert "patients         4" in out.output and "slices           16 (8 with lesions" in out.output  # 4 patients x 4 slices
    assert "lung-mask providers usable: otsu" in out.output
    counted = next(line for line in out.output.splitlines() if line.strip().startswith("kept slices"))
    assert "not counted" in counted and "threshold lung mask" in counted and "--lung-mask otsu" in counted
    root = tmp_path / "broken"
    write_collection(root / "S", 1, "cropped", seed=3)
    (root / "S" / "images" / "pat0_002.png").write_bytes(b"\x89PNG not really")
    (root / "suite.yaml").write_text(quirky_suite.read_text())
    broken = CliRunner().invoke(main, ["data", "check", "S", "--suite", str(root / "suite.yaml")])
    assert broken.exit_code == 2 and "pat0_002.png" in broken.output and "Traceback" not in broken.output


def test_unknown_window_names_dataset_step_and_alternatives(tmp_path, quirky_suite):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = CliRunner().invoke(main, ["leave-one-out", "--source", "S", "--targets", "T", "--suite", str(quirky_suite),
                                    "--tracking-uri", uri, *TINY])
    assert out.exit_code == 2
    assert out.output.count("\n") == 1 and "Traceback" not in out.output
    assert "threshold lung mask" in out.output and "'S'" in out.output and "--lung-mask otsu" in out.output
    assert _runs(uri) == []  # nothing was started
    fixed = CliRunner().invoke(main, ["leave-one-out", "--source", "S", "--targets", "T", "--suite", str(quirky_suite), "--tracking-uri",
                                      uri, "--lung-mask", "otsu", "--set", "preprocessing.normalisation=fixed", *TINY])
    assert fixed.exit_code == 2 and "normalisation 'fixed'" in fixed.output and "preprocessing.normalisation=zscore" in fixed.output


def test_round_on_real_world_quirks_scores_each_slice_at_its_own_size(tmp_path, quirky_suite):
    uri = sqlite_store(tmp_path / "mlflow.db")
    out = CliRunner().invoke(main, ["leave-one-out", "--source", "S", "--targets", "T", "--suite", str(quirky_suite), "--tracking-uri", uri,
                                    "--lung-mask", "otsu", "--min-pixels", "1", *TINY])
    assert out.exit_code == 0, out.output
    assert "| S | S (in-domain) |" in out.output and "| S | T |" in out.output
    assert "| S | S | 16 | 0 |" in out.output and "| S | T | 12 | 0 |" in out.output  # slices kept / dropped
    runs = _runs(uri)
    test_run = next(r for r in runs if r.data.tags.get("domgen.role") == "in-domain")
    per_slice = pd.read_csv(store.download_artifact(test_run.info.run_id, "per_slice_metrics.csv", tmp_path))
    # every in-domain test slice is scored at the size it was stored at, not at the model's 32x32
    for _, row in per_slice.iterrows():
        patient, z = row.slice_id.split("/")[1:]
        with Image.open(quirky_suite.parent / "S" / "images" / f"{patient}_{z[-3:]}.png") as im:
            assert row.tp + row.fp + row.fn + row.tn == im.size[0] * im.size[1]
    assert len({(row.tp + row.fp + row.fn + row.tn) for _, row in per_slice.iterrows()}) > 1
    target = next(r for r in runs if r.data.tags.get("domgen.target") == "T" and r.data.tags.get("domgen.phase") == "baseline")
    assert target.data.metrics["n_slices"] == 12  # no target slice disappeared


def test_provider_that_finds_no_lung_is_an_error_or_a_count(tmp_path, quirky_suite):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["leave-one-out", "--source", "S", "--targets", "U", "--suite", str(quirky_suite), "--tracking-uri", uri,
            "--lung-mask", "otsu", *TINY]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2 and out.output.count("\n") == 1
    assert "every slice of dataset U was dropped" in out.output and "keep_slices=all" in out.output
    assert _runs(uri) == []
    kept = CliRunner().invoke(main, [*args, "--keep-slices", "all", "--set", "preprocessing.mask_to_lung=false"])
    assert kept.exit_code == 0, kept.output
    assert "| S | U | 8 | 0 |" in kept.output


def test_splits_file_naming_an_emptied_patient_is_refused(tmp_path, quirky_suite):
    # a splits file naming patients of U (all of whose slices have no lung) cannot silently shrink
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"folds": [{"fold": 0, "train": ["pat0"], "val": [], "test": ["pat1"]}]}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = CliRunner().invoke(main, ["leave-one-out", "--source", "U", "--targets", "S", "--suite", str(quirky_suite), "--tracking-uri", uri,
                                    "--lung-mask", "otsu", "--set", f"splits_file={splits}", *TINY])
    assert out.exit_code == 2
    assert "every slice of dataset U was dropped" in out.output or "all its slices were dropped" in out.output


class _Source:
    def __init__(self, patients):
        self._patients = sorted(patients)
        self.report = {"per_patient": {p: [4, 4] for p in patients}}

    def patients(self):
        return self._patients


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kfold_test_sets_are_disjoint_and_cover_every_patient(k):
    patients = [f"p{i:02d}" for i in range(17)]
    cfg = {"seed": 3, "folds": k, "split": {"protocol": "kfold", "train": 0.6, "val": 0.1, "test": 0.3}}
    folds = loo.fold_splits(typed(cfg, loo.FAMILY), _Source(patients))
    tests = [set(f["test"]) for f in folds]
    assert len(folds) == k and set().union(*tests) == set(patients)
    assert sum(len(t) for t in tests) == len(patients)  # disjoint
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and not (set(f["train"]) | set(f["val"])) & set(f["test"])
        assert set(f["train"]) | set(f["val"]) | set(f["test"]) == set(patients)
        # validation is carved from the rest in the 60:10 proportion
        rest = len(f["train"]) + len(f["val"])
        assert abs(len(f["val"]) - rest / 7) <= 1
    old = loo.fold_splits(typed({**cfg, "split": {**cfg["split"], "protocol": "repeated-holdout"}}, loo.FAMILY), _Source(patients))
    assert all(len(f["test"]) == 5 for f in old)  # 30 % of 17, the test sets of independent splits


def test_min_pixels_at_selects_the_same_slices_at_any_matrix():
    """A slice and the same slice at twice the matrix: with min_pixels_at the N filter keeps the same slices."""
    sides = (5, 7, 8, 10)  # N = 25, 49, 64, 100 pixels above the cut-off at 64x64
    small = []
    for side in sides:
        p = np.full((64, 64), 0.1, np.float32)
        p[10:10 + side, 20:20 + side] = 0.9
        small.append(p)
    large = [np.kron(p, np.ones((2, 2), np.float32)) for p in small]  # the same slices at 128x128: N x 4

    class Slices:
        def __init__(self, probs):
            self.slice_ids = [f"X/p/{i:04d}" for i in range(len(probs))]
            self.patient_ids = ["p"] * len(probs)
            self.truths = [None] * len(probs)

    scaled = Selection(min_pixels=50, ci_min=0.0, min_pixels_at=64)
    a = ci_ranking(small, Slices(small), 0.5, scaled)
    b = ci_ranking(large, Slices(large), 0.5, scaled)
    assert a.set_index("slice_id").eligible.to_dict() == b.set_index("slice_id").eligible.to_dict()
    assert sorted(a[a.eligible].slice_id) == ["X/p/0002", "X/p/0003"]
    assert b.min_pixels.tolist() == [200.0] * 4
    absolute = Selection(min_pixels=50, ci_min=0.0)
    assert ci_ranking(large, Slices(large), 0.5, absolute).eligible.sum() == 4  # without scaling: 4x more lenient
    # the paper's setting: 50 pixels at 512 is 12.5 pixels at 256 and 75.7 at 630
    paper = Selection(min_pixels=50, min_pixels_at=512)
    assert paper.min_pixels_for((256, 256)) == 12.5 and round(paper.min_pixels_for((630, 630)), 1) == 75.7


def test_three_rounds_give_table_iii_over_rounds(tmp_path, tiny_suite):
    uri = sqlite_store(tmp_path / "mlflow.db")
    args = ["leave-one-out", "--source", "A,B,C", "--targets", "B,C", "--suite", str(tiny_suite), "--tracking-uri", uri,
            "--min-pixels", "1", "--set", "pseudolabel.min_pixels_at=null", "--set", "evaluation.surface=false", *TINY]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    runs = _runs(uri)
    experiment = [r for r in runs if r.data.tags.get("domgen.role") == "experiment"]
    rounds = [r for r in runs if r.data.tags.get("domgen.role") == "round"]
    assert len(experiment) == 1 and len(rounds) == 3
    assert sorted(json.loads(experiment[0].data.tags["domgen.rounds"])) == sorted(r.info.run_id for r in rounds)
    assert {r.data.tags["domgen.source"] for r in rounds} == {"A", "B", "C"}
    # round A tests B and C; round B tests C (B is its source); round C tests B
    assert {(r.data.tags["domgen.source"], r.data.tags["domgen.target"]) for r in runs if r.data.tags.get("domgen.phase") == "enhanced"} == \
        {("A", "B"), ("A", "C"), ("B", "C"), ("C", "B")}
    table3 = out.output.split("Table III")[1].split("\n\n")[1]
    lines = [line for line in table3.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0].strip("| ") for line in lines] == ["in-domain", "in-domain after enhancement", "unseen before", "unseen after", "unseen change (after - before)"]
    assert all(" | 3 | " in line and "±" in line for line in lines)  # three rounds, mean ± std over rounds
    # the same command again runs nothing; a single round of the same source reuses its round
    assert CliRunner().invoke(main, args).exit_code == 0
    single = CliRunner().invoke(main, ["leave-one-out", "--source", "B", "--targets", "B,C", "--suite", str(tiny_suite),
                                       "--tracking-uri", uri, "--min-pixels", "1", "--set", "pseudolabel.min_pixels_at=null",
                                       "--set", "evaluation.surface=false", *TINY])
    assert single.exit_code == 0, single.output
    assert len(_runs(uri)) == len(runs)


def test_pseudolabel_from_another_checkpoint_is_new_work(tmp_path, tiny_suite):
    uri = sqlite_store(tmp_path / "mlflow.db")
    base = ["leave-one-out", "--source", "A", "--targets", "B", "--suite", str(tiny_suite), "--tracking-uri", uri,
            "--min-pixels", "1", *TINY]
    assert CliRunner().invoke(main, base).exit_code == 0
    runs = _runs(uri)
    fold = next(r for r in runs if r.data.tags.get("domgen.role") == "in-domain")
    enhanced = next(r for r in runs if r.data.tags.get("domgen.phase") == "enhanced")
    first = CliRunner().invoke(main, ["pseudolabel", "--target", "B", "--run-id", fold.info.run_id, "--tracking-uri", uri, "--quiet"])
    assert first.exit_code == 0, first.output
    # the enhanced model as the starting point: same config and fold, another checkpoint -> other runs and numbers
    second = CliRunner().invoke(main, ["pseudolabel", "--target", "B", "--run-id", enhanced.info.run_id, "--tracking-uri", uri, "--quiet"])
    assert second.exit_code == 0, second.output
    run_ids = lambda text: {line.split()[-1] for line in text.splitlines() if line.startswith(("baseline", "enhanced"))}  # noqa: E731
    assert run_ids(first.output).isdisjoint(run_ids(second.output))
    assert first.output.splitlines()[1] != second.output.splitlines()[1]


def test_edited_splits_file_at_the_same_path_is_new_work(tmp_path):
    from domgen.tracking.identity import config_hash

    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"folds": [{"fold": 0, "train": ["a"], "val": [], "test": ["b"]}]}))
    from domgen.families.common import hashed_view, with_content_digests

    cfg = typed({"source": "A", "splits_file": str(path), "init_checkpoint": None}, loo.FAMILY)
    first = config_hash(hashed_view(with_content_digests(cfg, []).as_dict()))
    assert config_hash(hashed_view(with_content_digests(cfg, []).as_dict())) == first
    path.write_text(json.dumps({"folds": [{"fold": 0, "train": ["b"], "val": [], "test": ["a"]}]}))
    assert config_hash(hashed_view(with_content_digests(cfg, []).as_dict())) != first


def test_source_lists(tiny_suite):
    from domgen.data.registry import load_suite
    from domgen.errors import DomgenError

    suite = load_suite(str(tiny_suite))
    sources = lambda value: loo.source_names(suite, typed({"source": value}, loo.FAMILY))  # noqa: E731
    assert sources("all") == ["A", "B", "C", "D"]  # the COVID datasets, not tumour/effusion
    assert sources("A, C") == ["A", "C"]
    with pytest.raises(DomgenError, match="twice"):
        sources("A,A")
    with pytest.raises(DomgenError, match="'Z' is not in suite"):
        sources("A,Z")
    round_b = loo.round_config(typed({"source": "A,B", "targets": None}, loo.FAMILY), suite, "B")
    assert round_b.source == "B" and round_b.targets == ("A", "C", "D")
    assert round_b.as_dict()["targets"] == ["A", "C", "D"]
