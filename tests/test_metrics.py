"""Metrics against scikit-learn, MONAI-independent hand computations and the cut-off choice by hand."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, recall_score

from domgen.evaluation.cutoff import best_cutoff, dsc_per_cutoff
from domgen.evaluation.metrics import confusion, overlap_metrics, summarise, surface_metrics


def test_overlap_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    truth = rng.random((40, 37)) > 0.7
    pred = rng.random((40, 37)) > 0.6
    m = overlap_metrics(confusion(pred, truth))
    t, p = truth.ravel(), pred.ravel()
    assert m["dsc"] == pytest.approx(f1_score(t, p))
    assert m["iou"] == pytest.approx(jaccard_score(t, p))
    assert m["sen"] == pytest.approx(recall_score(t, p))
    assert m["spc"] == pytest.approx(recall_score(~t, ~p))


def test_confusion_counts_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    truth = np.array([[1, 0, 0], [1, 1, 0]])
    assert confusion(pred, truth).tolist() == [2, 1, 1, 2]
    m = overlap_metrics(confusion(pred, truth))
    assert m["dsc"] == pytest.approx(4 / 6)
    assert m["spc"] == pytest.approx(2 / 3)


def test_empty_conventions():
    empty = np.zeros((4, 4), bool)
    lesion = empty.copy()
    lesion[1, 1] = True
    both_empty = confusion(empty, empty)
    assert np.isnan(overlap_metrics(both_empty, "nan")["dsc"])
    assert overlap_metrics(both_empty, "both-empty-one")["dsc"] == 1.0
    # a missed lesion with no prediction: TP + FP = 0 -> Bizopoulos' rule gives 1 everywhere
    missed = confusion(empty, lesion)
    assert overlap_metrics(missed, "no-prediction-one") == {"dsc": 1.0, "sen": 1.0, "spc": 1.0, "iou": 1.0}
    assert overlap_metrics(missed, "both-empty-one")["dsc"] == 0.0
    assert overlap_metrics(missed, "nan")["sen"] == 0.0
    with pytest.raises(ValueError):
        overlap_metrics(missed, "zero")


def test_dice_eps_is_in_the_denominator_only():
    # 2TP / (2TP + FP + FN + eps) by hand: 2 / (2 + 1 + 1 + 4) = 0.25; an empty slice is 0 / eps = 0, not 1
    assert overlap_metrics(np.array([1, 1, 1, 13]), "nan", eps=4.0)["dsc"] == pytest.approx(0.25)
    assert overlap_metrics(np.array([0, 0, 0, 16]), "nan", eps=1e-5)["dsc"] == 0.0
    # the conventions still decide their own cases: both-empty-one gives the empty slice 1 whatever eps is
    assert overlap_metrics(np.array([0, 0, 0, 16]), "both-empty-one", eps=1e-5)["dsc"] == 1.0


def test_surface_metrics_on_shifted_squares():
    truth = np.zeros((40, 40), bool)
    truth[10:20, 10:20] = True
    pred = np.roll(truth, 2, axis=1)  # shifted 2 columns
    m = surface_metrics(pred, truth, spacing=(1.0, 0.5), tolerance_mm=0.5)
    # every boundary point is at most 2 columns * 0.5 mm = 1 mm from the other boundary
    assert m["hd95"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < m["nsd"] < 1.0
    assert surface_metrics(pred, truth, spacing=(1.0, 0.5), tolerance_mm=1.0)["nsd"] == pytest.approx(1.0)
    assert surface_metrics(truth, truth, (1, 1), 1.0) == {"nsd": 1.0, "hd95": 0.0}
    gone = surface_metrics(np.zeros_like(truth), truth, (1, 1), 1.0)
    assert gone["nsd"] == 0.0 and np.isnan(gone["hd95"])


def test_summarise_ignores_nan():
    assert summarise([1.0, np.nan, 3.0]) == (2.0, 1.0)
    assert all(np.isnan(summarise([np.nan])))


def test_best_cutoff_by_hand():
    # 4 pixels: truth 1,1,0,0 with probabilities .9,.35,.4,.1
    prob = [np.array([0.9, 0.35, 0.4, 0.1])]
    truth = [np.array([1, 1, 0, 0])]
    dsc = dsc_per_cutoff(prob, truth, [0.3, 0.38, 0.5])
    # t=.3: pred 1,1,1,0 -> TP2 FP1 -> 4/5; t=.38: pred 1,0,1,0 -> TP1 FP1 FN1 -> 2/4; t=.5: TP1 FN1 -> 2/3
    assert dsc.tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert best_cutoff(prob, truth, [0.3, 0.38, 0.5]) == 0.3


def test_best_cutoff_pools_slices_and_breaks_ties_towards_half():
    prob = [np.array([0.9, 0.1]), np.array([0.8, 0.2])]
    truth = [np.array([1, 0]), np.array([1, 0])]
    # every cut-off in [0.2, 0.8) is perfect; 0.5 is among them
    assert best_cutoff(prob, truth) == 0.5
