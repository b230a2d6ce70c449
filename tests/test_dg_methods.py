"""Defining properties of the domain-generalisation methods (issue 20), each against an independent truth."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from domgen.families.compare import comparison_tables, mean_interval
from domgen.methods.dg import METHODS, AdaptContext, EpisodicTent, binary_entropy, get_method, unlabelled
from domgen.preprocessing.slices import SliceSet
from domgen.training.augment import build_augmentation
from domgen.training.trainer import TrainSettings


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 1, 1))


def _slices(n: int = 6, size: int = 16, datasets=None) -> SliceSet:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((n, 1, size, size)) * 2 + 1).astype(np.float32)
    y = (x[:, 0] > 1.5).astype(np.uint8)
    return SliceSet(x, y, [f"s{i}" for i in range(n)], [f"p{i // 2}" for i in range(n)], list(datasets or ["A"] * n),
                    [t.copy() for t in y], [np.ones_like(t) for t in y], [(1.0, 1.0)] * n)


def _ctx(**params) -> AdaptContext:
    s = _slices()
    return AdaptContext(s, s, 0.5, "cpu", 0, TrainSettings(epochs=1), params=params)


def test_binary_entropy_matches_the_formula_by_hand():
    z = torch.tensor([-3.0, -0.2, 0.0, 1.5, 8.0])
    p = 1 / (1 + np.exp(-z.numpy().astype(float)))
    by_hand = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert np.allclose(binary_entropy(z).numpy(), by_hand, atol=1e-6)
    assert math.isclose(float(binary_entropy(torch.tensor(0.0))), math.log(2), rel_tol=1e-6)  # the maximum, at p = 1/2


def test_tent_changes_only_batch_norm_affine_parameters_and_its_episodic_reset_restores_the_weights():
    model = _net()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    tent = EpisodicTent(model, steps=3, lr=0.05, optimizer="adam")
    x1, x2 = torch.from_numpy(_slices().inputs[:3]), torch.from_numpy(_slices().inputs[3:])
    tent(x1)
    after = model.state_dict()
    changed = {k for k in source if not torch.equal(source[k], after[k])}
    assert changed and changed <= {"1.weight", "1.bias"}  # BatchNorm2d's affine parameters, nothing else
    tent.reset()
    assert all(torch.equal(source[k], v) for k, v in model.state_dict().items())  # bit for bit
    # episodic: a batch's prediction does not depend on the batches before it
    fresh = EpisodicTent(_net(), steps=3, lr=0.05, optimizer="adam")
    tent(x1)
    assert torch.equal(tent(x2), fresh(x2))


def test_adabn_changes_only_running_statistics_to_the_target_mean_and_variance():
    model = _net()
    params = {k: v.clone() for k, v in model.named_parameters()}
    target = _slices(n=6)
    get_method("adabn").adapt(model, target, _ctx(batch_size=6))  # one batch: the statistics are that batch's
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    with torch.no_grad():
        features = model[0](torch.from_numpy(target.inputs)).numpy()  # the BatchNorm's input, by a second route
    bn = model[1]
    assert np.allclose(bn.running_mean.numpy(), features.mean(axis=(0, 2, 3)), atol=1e-5)
    assert np.allclose(bn.running_var.numpy(), features.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1), rtol=1e-4)
    assert not model.training


def test_gin_is_seeded_keeps_the_frobenius_norm_and_never_moves_a_label_pixel():
    image = _slices().inputs[0, 0]
    mask = (image > 1).astype(np.uint8)
    t = build_augmentation("gin", 0)
    outs = []
    for seed in (3, 3, 4):
        t.set_random_seed(seed)
        outs.append(t(image=image, mask=mask))
    assert np.array_equal(outs[0]["image"], outs[1]["image"]) and not np.array_equal(outs[0]["image"], outs[2]["image"])
    for out in outs:
        assert np.array_equal(out["mask"], mask)  # intensity only
        assert math.isclose(np.linalg.norm(out["image"]), np.linalg.norm(image), rel_tol=1e-4)  # Eq. 3's rescaling
        assert not np.allclose(out["image"], image)


def test_bigaug_is_seeded_stacks_nine_steps_with_p_half_and_its_intensity_steps_keep_the_mask():
    from domgen.training.dg_augment import bigaug

    steps = bigaug()
    assert len(steps) == 9 and all(s.p == 0.5 for s in steps)  # Zhang et al.: 3 groups x 3 transformations, p = 0.5
    image = _slices().inputs[0, 0]
    mask = (image > 1).astype(np.uint8)
    t = build_augmentation("bigaug", 0)
    draws = []
    for seed in (5, 5, 6):
        t.set_random_seed(seed)
        draws.append(t(image=image, mask=mask))
    assert np.array_equal(draws[0]["image"], draws[1]["image"]) and np.array_equal(draws[0]["mask"], draws[1]["mask"])
    import albumentations as A

    for step in steps[:6]:  # image quality and appearance: the intensities change, the label does not
        step.p = 1.0
        out = A.Compose([step], seed=1)(image=image, mask=mask)
        assert np.array_equal(out["mask"], mask) and not np.allclose(out["image"], image)
        assert out["image"].dtype == np.float32 and out["image"].min() < 0  # z-scored values are not clipped to [0, 1]
    brightness = steps[3]
    brightness.set_random_seed(0)
    shifted = A.Compose([brightness], seed=2)(image=image, mask=mask)["image"] - image
    assert np.allclose(shifted, shifted.flat[0]) and abs(shifted.flat[0]) <= 0.1 + 1e-6  # a shift in [-0.1, 0.1]


def test_erm_multi_gives_every_source_domain_the_same_number_of_training_slices():
    s = _slices(n=6, datasets=["A"] * 4 + ["B"] * 2)
    view = get_method("erm-multi").training_view(s, seed=0)
    assert view.datasets.count("A") == view.datasets.count("B") == 4
    assert set(view.slice_ids) == set(s.slice_ids)  # only repeats, nothing new


def test_a_test_time_method_is_given_no_label():
    hidden = unlabelled(_slices())
    assert not hidden.targets.any() and not any(t.any() for t in hidden.truths)
    assert [t.shape for t in hidden.truths] == [t.shape for t in _slices().truths]


def test_registry_lists_the_issue_methods():
    assert {"erm", "erm-multi", "bigaug", "gin", "adabn", "tent", "ci-pseudolabel", "transfer"} <= set(METHODS)
    assert all(METHODS[m].paper for m in METHODS)


def test_comparison_statistics_match_a_hand_computed_case():
    # two targets, three methods, three runs (seeds x folds) each
    dsc = {("erm", "B"): [0.5, 0.6, 0.7], ("x", "B"): [0.6, 0.7, 0.8], ("y", "B"): [0.4, 0.4, 0.4],
           ("erm", "C"): [0.3, 0.3, 0.6], ("x", "C"): [0.2, 0.2, 0.2], ("y", "C"): [0.5, 0.5, 0.5]}
    records = pd.DataFrame([{"method": m, "target": t, "dsc": v, "nsd": v, "sen": v} for (m, t), vs in dsc.items() for v in vs])
    patients = {(m, t): {f"p{i}": 0.5 for i in range(5)} for (m, t) in dsc}
    patients[("x", "B")] = {f"p{i}": 0.5 + 0.1 * (i + 1) for i in range(5)}  # every patient better by 0.1..0.5
    tables = comparison_tables(records, patients, "training-domain")
    # mean 0.6, sd 0.1, t(0.975, 2) = 4.302652729911275: 0.6 -+ 4.3027 * 0.1 / sqrt(3)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert np.allclose(mean_interval([0.5, 0.6, 0.7])[:3], (0.6, 0.6 - half, 0.6 + half))
    results = tables["results"].set_index(["target", "method"])
    assert results.loc[("B", "erm"), "DSC [95 % CI]"] == f"0.600 [{0.6 - half:.3f}, {0.6 + half:.3f}]"
    assert results.loc[("B", "y"), "DSC [95 % CI]"] == "0.400 [0.400, 0.400]"  # no spread, no width
    # paired change of x against erm on B: mean of 0.1..0.5 = 0.3; every patient gained: exact Wilcoxon p = 2 / 2^5
    assert results.loc[("B", "x"), "DSC - erm [95 % CI]"].startswith("+0.300 [")
    assert results.loc[("B", "x"), "Wilcoxon p"] == "0.0625"
    # ranks by mean DSC: B: x 0.7 (1), erm 0.6 (2), y 0.4 (3); C: y 0.5 (1), erm 0.4 (2), x 0.2 (3)
    ranks = tables["ranks"].set_index("method")
    assert ranks.loc["erm", "average rank"] == 2.0 and ranks.loc["x", "average rank"] == 2.0 and ranks.loc["y", "average rank"] == 2.0
    assert ranks.loc["x", "rank B"] == 1.0 and ranks.loc["x", "rank C"] == 3.0


def test_the_oracle_label_is_on_every_row_of_every_table():
    records = pd.DataFrame([{"method": m, "target": "B", "dsc": 0.5, "nsd": 0.5, "sen": 0.5} for m in ("erm", "tent")])
    tables = comparison_tables(records, {}, "oracle")
    for name in ("results", "ranks", "dsc_means"):
        assert all("oracle" in str(v) for v in tables[name].method), name
    assert all("oracle" in v for v in tables["results"].selection)
