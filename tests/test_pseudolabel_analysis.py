"""Pseudo-labels under the microscope: confidence scores, selection constraints, retraining choices, review."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch import nn

from domgen.cli import main
from domgen.errors import DomgenError
from domgen.families import leave_one_out as loo
from domgen.methods.certainty import Selection, rank_and_select
from domgen.methods.confidence import ScoreContext, binary_entropy, entropy_score, get_score, mask_dice
from domgen.preprocessing.slices import SliceSet
from domgen.tracking import mlflow_store as store
from stores import sqlite_store

TINY = ["--set", "train.epochs=1", "--set", "preprocessing.image_size=32", "--set", "train.batch_size=8",
        "--set", "pseudolabel.ci_min=0.0", "--min-pixels", "1", "--set", "pseudolabel.min_pixels_at=null",
        "--set", "split.protocol=repeated-holdout", "--folds", "1", "--quiet"]


def slice_set(inputs: np.ndarray) -> SliceSet:
    n, _, h, w = inputs.shape
    truths = [np.zeros((h, w), np.uint8) for _ in range(n)]
    return SliceSet(inputs.astype(np.float32), np.zeros((n, h, w), np.uint8), [f"X/p/{i:04d}" for i in range(n)], ["p"] * n,
                    ["X"] * n, truths, truths, [(1.0, 1.0)] * n)


class Pixelwise(nn.Module):
    """A 1x1 convolution: its prediction commutes with every flip and rotation."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(4.0)
            self.conv.bias.fill_(-2.0)

    def forward(self, x):
        return self.conv(self.drop(x))


class LeftHalf(nn.Module):
    """Predicts lesion on the left half of the image whatever it shows: flips disagree with it."""

    def forward(self, x):
        out = torch.full_like(x, -5.0)
        out[..., : x.shape[-1] // 2] = 5.0
        return out


def context(model, inputs, cutoff=0.5) -> ScoreContext:
    from domgen.training.trainer import predict_model_size, to_original_size

    slices = slice_set(inputs)
    small = predict_model_size(model, slices)
    return ScoreContext(model, slices, to_original_size(small, slices), small, cutoff)


def test_scores_on_hand_made_probability_maps():
    p = np.full((8, 8), 0.1)
    p[2:4, 2:4] = 0.9
    p[5, 5] = 0.99
    ctx = ScoreContext(None, slice_set(np.zeros((1, 1, 8, 8))), [p], p[None], 0.5)
    assert get_score("ci")(ctx)[0] == pytest.approx((4 * 0.9 + 0.99) / 5)
    h = lambda q: -(q * np.log2(q) + (1 - q) * np.log2(1 - q))  # noqa: E731
    assert entropy_score(ctx)[0] == pytest.approx(1 - (4 * h(0.9) + h(0.99)) / 5)
    assert binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0)
    empty = ScoreContext(None, ctx.slices, [np.full((8, 8), 0.2)], np.full((1, 8, 8), 0.2), 0.5)
    assert np.isnan(entropy_score(empty)[0]) and np.isnan(get_score("ci")(empty)[0])
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2] = True
    b[0, :1] = True
    assert mask_dice(a, b).tolist() == [pytest.approx(2 * 4 / 12), 1.0]  # both-empty slice agrees


def test_tta_agreement_is_one_for_an_invariant_model_and_lower_otherwise():
    rng = np.random.default_rng(0)
    inputs = rng.normal(0, 1, (3, 1, 16, 16))
    invariant = get_score("tta")(context(Pixelwise().eval(), inputs))
    assert np.allclose(invariant[np.isfinite(invariant)], 1.0) and np.isfinite(invariant).any()
    biased = get_score("tta")(context(LeftHalf(), inputs))
    # hflip maps the left half onto the right: 1 of the 15 pairs among 6 transforms agree fully...
    assert (biased < 0.8).all()


def test_mc_dropout_needs_dropout_and_measures_its_variance():
    rng = np.random.default_rng(1)
    inputs = np.abs(rng.normal(2, 0.5, (2, 1, 16, 16)))
    with pytest.raises(DomgenError, match="needs dropout layers"):
        get_score("mc-dropout")(context(Pixelwise().eval(), inputs))
    torch.manual_seed(0)
    spread = get_score("mc-dropout")(context(Pixelwise(dropout=0.5).eval(), inputs, cutoff=0.1))
    assert ((spread > -1.0) & (spread < 0.999)).all()  # dropout passes disagree: variance > 0


def test_selection_constraints_by_hand():
    score = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.94])
    n = np.array([10, 200, 20, 300, 30, 400])
    patients = np.array(["a", "a", "a", "b", "b", "c"])
    base = dict(min_pixels=1, ci_min=0.0)
    _, sel = rank_and_select(score, n, Selection(**base, per_patient_max=1), patients=patients)
    assert sel.tolist() == [True, False, False, True, False, True]
    _, sel = rank_and_select(score, n, Selection(**base, per_patient_max=2, top_k=3), patients=patients)
    assert sel.tolist() == [True, True, False, True, False, False]
    # two size strata (N below / above the median 115): round-robin small, large, small, large
    order, sel = rank_and_select(score, n, Selection(**base, size_strata=2, top_k=2), patients=patients)
    assert sel.tolist() == [True, True, False, False, False, False]
    _, sel = rank_and_select(score, n, Selection(**base, size_strata=2, top_k=4), patients=patients)
    assert np.flatnonzero(sel).tolist() == [0, 1, 2, 3]
    _, sel = rank_and_select(score, n, Selection(**base, top_k=2, min_patients=2), patients=patients)
    assert not sel.any()  # the two best slices come from one patient: nothing is selected
    _, sel = rank_and_select(score, n, Selection(**base, top_k=4, min_patients=2), patients=patients)
    assert sel.sum() == 4


def _runs(uri, experiment=loo.EXPERIMENT):
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else store.runs_of(exp.experiment_id, "", status=None)


@pytest.fixture(scope="module")
def fold_round(tmp_path_factory, tiny_suite):
    tmp = tmp_path_factory.mktemp("analysis")
    uri = sqlite_store(tmp / "mlflow.db")
    out = CliRunner().invoke(main, ["leave-one-out", "--source", "A", "--targets", "B", "--suite", str(tiny_suite), "--tracking-uri", uri,
                                    "--seeds", "2", "--select-by", "last", *TINY, "--set", "pseudolabel.retrain_epochs=2",
                                    "--top-k", "3", "--seed", "1"])  # seed 1: a one-epoch model whose slice DSCs on B differ
    assert out.exit_code == 0, out.output
    runs = _runs(uri)
    return {"uri": uri, "tmp": tmp, "runs": runs, "output": out.output,
            "fold": next(r for r in runs if r.data.tags.get("domgen.role") == "in-domain")}


def test_seeds_last_weights_and_target_curves(fold_round):
    enhanced = [r for r in fold_round["runs"] if r.data.tags.get("domgen.phase") == "enhanced"]
    assert sorted(r.data.tags["domgen.repeat"] for r in enhanced) == ["0", "1"]
    client = MlflowClient()
    for run in enhanced:
        # top-k 3 of B's slices: 3 retrained on, every other slice scored apart as unused
        selection = pd.read_csv(store.download_artifact(run.info.run_id, "pseudo_label_selection.csv", fold_round["tmp"]))
        assert selection.selected.sum() == run.data.metrics["n_pseudo_labels"] == 3
        assert run.data.metrics["n_slices_unused"] == len(selection) - 3 > 0 and "unused_dsc" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run.info.run_id, "target_dsc")] == [0, 1]  # one per retraining epoch
        assert "plots/retraining_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert run.data.params["pseudolabel.select_by"] == "last"
    assert "change over seeds x folds" in fold_round["output"]


def test_confidence_command_scores_every_slice(fold_round, tiny_suite):
    args = ["confidence", "--target", "B", "--run-id", fold_round["fold"].info.run_id, "--tracking-uri", fold_round["uri"], "--top-k", "5",
            "--quiet"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    for name in ("| ci |", "| entropy |", "| tta |", "| mc-dropout |", "(best possible K)"):
        assert name in out.output
    assert "n/a (not available for this model)" in out.output  # Linknet has no dropout layers
    [run] = _runs(fold_round["uri"], "domgen-confidence")
    assert {"ci_topk_dsc", "tta_topk_dsc", "entropy_topk_dsc"} <= set(run.data.metrics)
    table = pd.read_csv(store.download_artifact(run.info.run_id, "slice_scores.csv", fold_round["tmp"]))
    assert {"ci", "entropy", "tta", "dice"} <= set(table.columns)
    ok = table[table.eligible & table.dice.notna()]
    assert len(ok) >= 3 and ok.ci.nunique() > 1 and ok.dice.nunique() > 1
    # Spearman by hand: Pearson's r of the average ranks (ties share their mean rank)
    rx, ry = ok.ci.rank().to_numpy(), ok.dice.rank().to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert run.data.metrics["ci_dsc_spearman"] == pytest.approx((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    # AURC by hand from the logged slice scores: mean over k of the mean risk (1 - DSC) of the k most confident slices
    risk = 1 - ok.sort_values("ci", ascending=False, kind="stable").dice.to_numpy()
    assert run.data.metrics["ci_aurc"] == pytest.approx(np.mean(np.cumsum(risk) / np.arange(1, len(risk) + 1)))
    assert run.data.metrics["ci_eaurc"] >= 0 and "| AURC | E-AURC |" in out.output
    # selection by the CI and the scaled CI, calibration of both domains before and after temperature scaling
    assert "| ci-ts |" in out.output and "temperature" in run.data.metrics and run.data.metrics["temperature"] > 0
    assert {"ece_indomain", "ece_target", "ece_target_ts", "ece_target_lesion", "mce_target", "ace_indomain_ts"} <= set(run.data.metrics)
    calibration = pd.read_csv(store.download_artifact(run.info.run_id, "calibration.csv", fold_round["tmp"]))
    assert len(calibration) == 8 and set(calibration.model) == {"as trained", "temperature-scaled"}
    plots = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert {"plots/risk_coverage.png", "plots/reliability.png", "plots/dsc_vs_score.png"} <= plots
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and len(_runs(fold_round["uri"], "domgen-confidence")) == 1
    assert "Lesion-pixel calibration" in again.output  # a resumed run prints the same tables from its artifacts
    report = CliRunner().invoke(main, ["report", "--experiment", "domgen-confidence", "--tracking-uri", fold_round["uri"],
                                       "--out", str(fold_round["tmp"] / "report")])
    assert report.exit_code == 0, report.output
    assert "calibration" in report.output and "E-AURC" in report.output


def test_review_folder_round_trip(fold_round, tmp_path):
    folder = tmp_path / "review"
    base = ["pseudolabel", "--target", "B", "--run-id", fold_round["fold"].info.run_id, "--tracking-uri", fold_round["uri"], "--quiet",
            "--top-k", "3"]
    out = CliRunner().invoke(main, [*base, "--export-for-review", str(folder)])
    assert out.exit_code == 0, out.output
    manifest = list(csv.DictReader((folder / "manifest.csv").open()))
    assert len(manifest) == 3 and json.loads((folder / "review.json").read_text())["exported"] == 3
    for row in manifest:
        assert (folder / row["image"]).is_file() and (folder / row["mask"]).is_file()
        assert (folder / "overlays" / (row["mask"].split("/")[1].replace(".nii.gz", ".png"))).is_file()
    # the radiologist draws a lesion square on the first slice and rejects the last one
    edited = folder / manifest[0]["mask"]
    img = nib.load(str(edited))
    data = np.asarray(img.dataobj).copy()
    predicted = data.copy()
    data[:, :, 0] = 0
    data[2:6, 2:6, 0] = 1
    nib.save(nib.Nifti1Image(data, img.affine), str(edited))
    with (folder / "manifest.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(manifest[0]))
        writer.writeheader()
        writer.writerows(manifest[:2])
    out = CliRunner().invoke(main, [*base, "--reviewed", str(folder)])
    assert out.exit_code == 0, out.output
    assert "review: 1 kept, 1 corrected" in out.output and "1 rejected" in out.output
    run = next(r for r in _runs(fold_round["uri"]) if "review_corrected" in r.data.metrics)
    p, c = predicted[:, :, 0] > 0, data[:, :, 0] > 0
    dice = 2 * (p & c).sum() / (p.sum() + c.sum())
    assert run.data.metrics["review_correction_dice"] == pytest.approx(dice)
    assert run.data.metrics["n_pseudo_labels"] == 2
    # a mask drawn at the wrong size is refused in one sentence
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 1), np.uint8), img.affine), str(edited))
    bad = CliRunner().invoke(main, [*base, "--reviewed", str(folder)])
    assert bad.exit_code == 2 and "without resampling" in bad.output and bad.output.count("\n") == 1


def test_pseudo_val_holds_out_whole_patients():
    from domgen.methods.pseudolabel import hold_out_patients

    inputs = np.zeros((10, 1, 4, 4))
    s = slice_set(inputs)
    s.patient_ids = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    train, val = hold_out_patients(s, 0.2, seed=3)
    assert len(val.patients()) == 1 and not set(train.patients()) & set(val.patients())
    assert len(train) + len(val) == 10
    single = slice_set(inputs[:5])
    train, val = hold_out_patients(single, 0.2, seed=3)
    assert len(val) == 1 and len(train) == 4  # one patient: held out by slice


def _enhance_record(target_bright: list[int], patients: list[str], select_by: str, fraction: float = 0.34) -> dict:
    """enhance() on hand-made slices with the 1x1-convolution model: slices in ``target_bright`` have a 3x3 patch of
    value 2 (probability sigmoid(6) > 0.5), the others none, so exactly they become pseudo-labels."""
    from domgen.methods.pseudolabel import PseudoLabelSettings, enhance
    from domgen.training.trainer import TrainSettings

    inputs = np.zeros((len(patients), 1, 8, 8))
    for i in target_bright:
        inputs[i, 0, 2:5, 2:5] = 2.0
    target = slice_set(inputs)
    target.patient_ids = list(patients)
    source = slice_set(np.zeros((2, 1, 8, 8)))
    record: dict = {}
    settings = PseudoLabelSettings(ci_min=0.0, min_pixels=1, select_by=select_by, pseudo_val_fraction=fraction)
    enhance(Pixelwise(), source, source, target, 0.5, settings, TrainSettings(epochs=1, batch_size=4, augment="none"),
            progress=False, record=record)
    return record


def test_pseudo_val_with_one_pseudo_label_says_it_chose_on_source_val():
    record = _enhance_record([0], ["a", "b", "c"], "pseudo-val")
    assert record["select_by_used"] == ["source-val"] and record["trained"] == {"X/p/0000"} and not record["held_out"]


def test_pseudo_val_held_out_slices_are_not_counted_as_trained():
    # six pseudo-labels of patients a, b, c; round(0.34 x 3) = 1 patient (2 slices) held out to choose the weights
    record = _enhance_record([0, 1, 2, 3, 4, 5], ["a", "a", "b", "b", "c", "c"], "pseudo-val")
    assert record["select_by_used"] == ["pseudo-val"]
    assert len(record["held_out"]) == 2 and len(record["trained"]) == 4 and not record["held_out"] & record["trained"]
    assert record["held_out"] | record["trained"] == {f"X/p/{i:04d}" for i in range(6)}
    assert _enhance_record([0, 1], ["a", "b", "c"], "source-val")["trained"] == {"X/p/0000", "X/p/0001"}
