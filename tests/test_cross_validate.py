"""The cross-validate family (Müller et al.) on the tiny suite with a real MLflow store: runs, per-volume
metrics checked against the written NIfTI predictions, resume after a crash, report, and CLI errors."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from domgen.cli import main
from domgen.data.registry import load_cases, load_suite
from domgen.preprocessing.volume import class_labels, to_xyz
from domgen.tracking import mlflow_store as store
from stores import sqlite_store

TINY = ["--set", "model.features=[4, 8]", "--set", "train.patch_size=[16, 16, 8]", "--set", "train.epochs=1",
        "--set", "train.iterations_per_epoch=2", "--set", "preprocessing.spacing=[12.0, 12.0, 12.0]",
        "--set", "train.augment_p=0.5", "--quiet"]


def _runs(uri: str) -> list:
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name("domgen-cross-validate")
    return [] if exp is None else store.runs_of(exp.experiment_id, status=None)


@pytest.fixture(scope="module")
def tiny_round(tiny_suite, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    uri = store.configure(sqlite_store(root / "mlflow.db"))
    args = ["cross-validate", "--source", "A", "--external", "B", "--folds", "2", "--suite", str(tiny_suite), "--tracking-uri", uri, *TINY]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"root": root, "uri": uri, "args": args, "output": result.output, "suite": tiny_suite}


def test_round_runs_and_per_volume_metrics(tiny_round):
    runs = _runs(tiny_round["uri"])
    assert all(r.info.status == "FINISHED" for r in runs)
    roles = sorted(r.data.tags["domgen.role"] for r in runs)
    assert roles == ["ensemble", "fold", "fold", "round"]
    parent = next(r for r in runs if r.data.tags["domgen.role"] == "round")
    folds = json.loads(store.download_artifact(parent.info.run_id, "splits.json", tiny_round["root"] / "dl").read_text())["folds"]
    rows = []
    for r in runs:
        if r.data.tags["domgen.role"] == "round":
            continue
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        df = pd.read_csv(store.download_artifact(r.info.run_id, "per_volume.csv", tiny_round["root"] / r.info.run_id))
        df["run"], df["fold"] = r.info.run_id, r.data.tags["domgen.fold"]
        rows.append(df)
        assert "ext_lesion_dsc" in r.data.metrics
    table = pd.concat(rows)
    # every source patient is validated exactly once, by the fold model that did not train on it
    validation = table[table["set"] == "validation"]
    assert sorted(validation.patient_id) == sorted(p for f in folds for p in f["test"]) and len(validation) == 4
    for _, row in validation.iterrows():
        assert row.patient_id in folds[int(row.fold)]["test"]
    assert (table["set"] == "external").sum() == 3 * 3  # two fold models and the ensemble on B's 3 patients
    for column in [c for c in table.columns if c.endswith(("_dsc", "_iou", "_sen", "_spc", "_acc"))]:
        values = table[column].dropna()
        assert ((values >= 0) & (values <= 1)).all(), column


def test_nifti_predictions_have_the_source_geometry_and_match_the_metrics(tiny_round):
    runs = _runs(tiny_round["uri"])
    fold = next(r for r in runs if r.data.tags.get("domgen.fold") == "0")
    per_volume = pd.read_csv(store.download_artifact(fold.info.run_id, "per_volume.csv", tiny_round["root"] / "pv"))
    row = per_volume[per_volume["set"] == "validation"].iloc[0]
    path = store.download_artifact(fold.info.run_id, f"predictions/validation/{row.patient_id}.nii.gz", tiny_round["root"] / "pred")
    spec = load_suite(tiny_round["suite"]).get("A")
    case = load_cases(spec, [row.patient_id])[0]
    source = nib.load(str(spec.images_dir / f"{row.patient_id}.nii.gz"))
    pred = nib.load(str(path))
    np.testing.assert_allclose(pred.affine, source.affine)
    assert pred.shape == source.shape
    # the logged Dice and IoU, recomputed by hand from the written label map and the reference masks
    labels = np.asarray(pred.dataobj)
    truth = to_xyz(class_labels(case.lesion, case.lung))
    for region, values in (("lung", (1,)), ("lesion", (2,))):  # each class on its own label
        p, t = np.isin(labels, values), np.isin(truth, values)
        if p.sum() + t.sum():
            assert row[f"{region}_dsc"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), abs=1e-9)
        if (p | t).sum():
            assert row[f"{region}_iou"] == pytest.approx((p & t).sum() / (p | t).sum(), abs=1e-9)


def test_lung_is_scored_without_its_lesion_by_hand():
    """Müller et al. score each class on its own label: a model that calls the lesion lung is perfect on lung ∪ lesion
    (DSC 1) but over-segments the lung class. By hand: truth lung 4 voxels, prediction lung 6 (the 4 + the 2 lesion)."""
    from domgen.evaluation.volume_metrics import volume_metrics

    truth = np.array([0, 0, 1, 1, 1, 1, 2, 2], np.uint8).reshape(2, 2, 2)
    pred = np.array([0, 0, 1, 1, 1, 1, 1, 1], np.uint8).reshape(2, 2, 2)
    m = volume_metrics(pred, truth, (1.0, 1.0, 1.0), surface=False)
    assert m["lung_dsc"] == pytest.approx(2 * 4 / (6 + 4))  # 0.8, where lung ∪ lesion would give 1.0
    assert m["lung_iou"] == pytest.approx(4 / 6)
    assert m["lung_sen"] == pytest.approx(1.0) and m["lung_prec"] == pytest.approx(4 / 6)
    assert m["lung_spc"] == pytest.approx(2 / 4) and m["lung_acc"] == pytest.approx(6 / 8)
    assert m["lesion_dsc"] == pytest.approx(0.0) and m["lesion_sen"] == pytest.approx(0.0)


def test_rerun_resumes_without_training_again(tiny_round):
    before = {r.info.run_id for r in _runs(tiny_round["uri"])}
    result = CliRunner().invoke(main, tiny_round["args"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {r.info.run_id for r in _runs(tiny_round["uri"])} == before


def test_crash_before_the_ensemble_resumes_from_the_fold_checkpoints(tiny_suite, tmp_path, monkeypatch):
    import domgen.families.cross_validate as cv

    uri = store.configure(sqlite_store(tmp_path / "mlflow.db"))
    args = ["cross-validate", "--source", "A", "--external", "B", "--folds", "2", "--suite", str(tiny_suite), "--tracking-uri", uri,
            "--set", "seed=3", *TINY]
    original = cv.evaluate_ensemble

    def crash(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(cv, "evaluate_ensemble", crash)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    runs = _runs(uri)
    assert sorted((r.data.tags["domgen.role"], r.info.status) for r in runs) == [("fold", "FINISHED"), ("fold", "FINISHED"),
                                                                                  ("round", "FAILED")]
    monkeypatch.setattr(cv, "evaluate_ensemble", original)
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = _runs(uri)
    assert sorted(r.data.tags["domgen.role"] for r in after) == ["ensemble", "fold", "fold", "round"]  # folds not trained again
    assert all(r.info.status == "FINISHED" for r in after)
    parent = next(r for r in after if r.data.tags["domgen.role"] == "round")
    assert parent.info.run_id == next(r for r in runs if r.data.tags["domgen.role"] == "round").info.run_id
    ensemble = next(r for r in after if r.data.tags["domgen.role"] == "ensemble")
    assert ensemble.data.metrics["n_models"] == 2


def test_report_rebuilds_the_tables(tiny_round, tmp_path):
    result = CliRunner().invoke(main, ["report", "--experiment", "domgen-cross-validate", "--tracking-uri", tiny_round["uri"],
                                       "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = tiny_round["output"].split("validation\n", 1)[1].split("Tables again")[0].strip()
    assert printed.splitlines()[2] in result.output  # the same median ± SD row, rebuilt from MLflow
    written = list(tmp_path.rglob("external.md"))
    assert written and "ensemble" in written[0].read_text()


def test_tables_carry_each_fold_model_on_the_external_set_and_label_the_ensemble(tiny_round):
    """The paper's external figures are its fold models'; the ensemble is domgen's addition and says so in every table."""
    from domgen.reports.cross_validate_report import ablation_table, cross_validate_tables

    runs = _runs(tiny_round["uri"])
    parent = next(r for r in runs if r.data.tags["domgen.role"] == "round").info.run_id
    fold_rows = pd.concat([pd.read_csv(store.download_artifact(r.info.run_id, "per_volume.csv", tiny_round["root"] / f"t{r.info.run_id}"))
                           for r in runs if r.data.tags["domgen.role"] == "fold"])
    fold_ext = fold_rows[fold_rows["set"] == "external"]
    external = cross_validate_tables(parent)["external"]
    lesion = external[external["class"] == "lesion"].set_index("model")
    assert list(lesion.index) == ["fold 0", "fold 1", "fold models, pooled", "ensemble (domgen's addition)"]
    assert lesion.loc["fold models, pooled", "volumes"] == 2 * 3  # two fold models x B's 3 volumes
    dsc = fold_ext["lesion_dsc"].dropna().to_numpy()  # median ± SD (population) over the 6 scores, by numpy
    assert lesion.loc["fold models, pooled", "DSC"] == (f"{np.median(dsc):.3f} ± {dsc.std():.3f}" if dsc.size else "-")
    ablation = ablation_table([parent])
    assert ablation.loc[0, "lesion DSC (external, fold models, pooled)"] == lesion.loc["fold models, pooled", "DSC"]
    assert ablation.loc[0, "lesion DSC (external, ensemble (domgen's addition))"] == lesion.loc["ensemble (domgen's addition)", "DSC"]
    assert "lung DSC (external, fold models, pooled)" in ablation.columns
    assert "fold models, pooled" in tiny_round["output"] and "ensemble (domgen's addition)" in tiny_round["output"]


@pytest.fixture(scope="module")
def error_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('errors')}/mlflow.db"


def _clean_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize("extra, needles", [
    (["--source", "D"], ["unrelated 2D slices", "'D'"]),
    (["--external", "D"], ["unrelated 2D slices"]),
    (["--external", "A"], ["--external A is the source"]),
    (["--source", "Z"], ["dataset 'Z' is not in suite"]),
    (["--folds", "1"], ["folds (--folds) = 1 is too small"]),
    (["--folds", "9"], ["Cannot make 9 folds of 4 patients"]),
    (["--encoder-weights", "imagenet"], ["--encoder-weights"]),
    (["--set", "train.patch_size=[15, 16, 8]"], ["multiples of 2"]),
    (["--set", "train.patch_size=[16, 16]"], ["train.patch_size"]),
    (["--set", "train.sampler=random"], ["train.sampler"]),
    (["--set", "preprocessing.spacing=[1, 0, 1]"], ["preprocessing.spacing"]),
    (["--set", "inference.overlap=1.5"], ["inference.overlap"]),
    (["--set", "model.arch=vnet"], ["model.arch"]),
    (["--profile", "nope"], ["profile file", "nope.yaml"]),
])
def test_cli_errors_are_one_sentence_and_leave_no_run(tiny_suite, error_store, extra, needles):
    uri = error_store  # one store for all cases (each new SQLite store costs seconds of migrations)
    args = ["cross-validate", "--source", "A", "--external", "B", "--folds", "2", "--suite", str(tiny_suite), "--tracking-uri", uri, *TINY]
    result = CliRunner().invoke(main, [*args, *extra])
    _clean_error(result, *needles)
    assert _runs(uri) == []


def test_volume_without_slice_spacing_is_refused(tmp_path, error_store):
    from domgen.data.case import Case
    from domgen.data.readers import WRITERS
    from domgen.data.spec import DatasetSpec

    for name, spacing in (("V", 2.0), ("W", None)):
        spec = DatasetSpec(name=name, format="nifti", root=tmp_path / name, images="images", lesions="labels", lungs="lungs")
        for i in range(2):
            image = np.full((4, 16, 16), -800.0, np.float32)
            WRITERS["nifti"](Case(f"p{i}", name, image, np.zeros(image.shape, np.uint8), (2.0, 2.0), spacing,
                                  lung=np.ones(image.shape, np.uint8)), spec)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"datasets": {n: {"format": "nifti", "root": n, "images": "images", "lesions": "labels",
                                                      "lungs": "lungs"} for n in ("V", "W")}}))
    uri = error_store
    result = CliRunner().invoke(main, ["cross-validate", "--source", "V", "--external", "W", "--folds", "2", "--suite", str(suite),
                                       "--tracking-uri", uri, *TINY])
    _clean_error(result, "slice spacing of W/p0 is unknown")
    assert _runs(uri) == []


def test_ablation_grid_reuses_finished_rounds(tiny_round):
    from domgen.config import load_profile
    from domgen.families.cross_validate import FAMILY, ablation_configs
    from domgen.typed_config import typed

    grid = ablation_configs(typed(load_profile("cross_validate", "paper"), FAMILY))
    assert len(grid) == 4 * 2 * 2
    assert {(c.folds, c.preprocessing.enabled, c.train.augment) for c in grid} == {
        (k, p, a) for k in (2, 3, 4, 5) for p in (True, False) for a in (True, False)}
    parent = next(r for r in _runs(tiny_round["uri"]) if r.data.tags["domgen.role"] == "round").info.run_id
    args = [*tiny_round["args"], "--ablation", "--set", "ablation.folds=[2]", "--set", "ablation.preprocessing=[true]",
            "--set", "ablation.augmentation=[true, false]"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2
    assert parent in next(row for row in rows if "| True | True |" in row)  # the finished round is found, not re-run
    assert len([r for r in _runs(tiny_round["uri"]) if r.data.tags["domgen.role"] == "round"]) == 2


def test_folds_on_ray_give_the_numbers_of_one_process(tiny_round, tmp_path, monkeypatch):
    """The same round with its 2 folds on a local Ray instance (2 at once, a real `mlflow server`): the same tables."""
    monkeypatch.setenv("DOMGEN_THREADS", "1")  # one torch thread per fold, as in this process
    ray_uri = sqlite_store(tmp_path / "ray.db")
    args = [a if not a.startswith("sqlite:") else ray_uri for a in tiny_round["args"]]
    result = CliRunner().invoke(main, [*args, "--executor", "ray", "--workers", "2"])
    assert result.exit_code == 0, result.output
    rows = lambda output: [line for line in output.splitlines() if line.startswith("|")]  # noqa: E731
    assert rows(result.output) and rows(result.output) == rows(tiny_round["output"])
    runs = _runs(ray_uri)
    assert sorted(r.data.tags["domgen.role"] for r in runs) == ["ensemble", "fold", "fold", "round"]
    assert all(r.info.status == "FINISHED" for r in runs)
