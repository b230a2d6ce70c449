"""Müller et al.'s volume preprocessing against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from domgen.data.case import Case, IntensitySpace
from domgen.errors import DomgenError
from domgen.preprocessing.volume import (LESION, LUNG, Volume, VolumePreprocessing, normalise_intensity, prepare_volume,
                                         resample, to_case_grid, to_xyz)


def ramp_case(slice_spacing=2.0, intensity=IntensitySpace("hu")) -> Case:
    z, h, w = 4, 3, 2
    image = np.zeros((z, h, w), np.float32)
    image[:] = (np.arange(z) * 100.0 - 1000.0)[:, None, None]  # -1000, -900, -800, -700 HU along z
    lesion = np.zeros((z, h, w), np.uint8)
    lesion[1] = 1
    lung = np.ones((z, h, w), np.uint8)
    return Case("p", "T", image, lesion, spacing=(1.0, 1.0), slice_spacing=slice_spacing, lung=lung, intensity=intensity)


def test_resampling_matches_hand_computed_linear_interpolation():
    # a ramp 0, 10, 20, 30 along z at 2 mm; on a 3 mm grid through the same first centre: z = 0, 3, 6 mm
    # -> voxel positions 0, 1.5, 3 -> values 0, 15, 30 (linear); labels by nearest neighbour
    image = np.zeros((1, 3, 2, 4), np.float32)
    image[0] = np.arange(4) * 10.0
    labels = np.zeros((3, 2, 4), np.uint8)
    labels[..., 3] = 2
    out, lab, affine = resample(image, labels, np.diag([1.0, 1.0, 2.0, 1.0]), (1.0, 1.0, 3.0))
    assert out.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(out[0, 1, 1], [0.0, 15.0, 30.0], atol=1e-4)
    np.testing.assert_array_equal(lab[0, 0], [0, 0, 2])
    np.testing.assert_allclose(np.diag(affine), [1.0, 1.0, 3.0, 1.0])
    # and in-plane: 4 mm -> 1 mm along x, values every quarter step
    image = np.zeros((1, 2, 1, 1), np.float32)
    image[0, :, 0, 0] = [8.0, 0.0]
    out, _, _ = resample(image, np.zeros((2, 1, 1), np.uint8), np.diag([4.0, 1.0, 1.0, 1.0]), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(out[0, :, 0, 0], [8.0, 6.0, 4.0, 2.0, 0.0], atol=1e-4)


def test_intensity_clip_and_minmax_by_hand():
    hu = np.array([-2000.0, -1250.0, -500.0, 250.0, 1000.0], np.float32)[:, None, None]
    out = normalise_intensity(hu, windowed=False, clip_hu=(-1250.0, 250.0))[:, 0, 0]
    np.testing.assert_allclose(out, [0.0, 0.0, 127.5, 255.0, 255.0], atol=1e-4)
    # already windowed data is not clipped in HU, only stretched to 0..255 over its own range
    win = np.array([10.0, 60.0, 110.0], np.float32)[:, None, None]
    np.testing.assert_allclose(normalise_intensity(win, windowed=True, clip_hu=(-1250.0, 250.0))[:, 0, 0], [0.0, 127.5, 255.0])


def test_prepare_volume_full_pipeline_by_hand():
    case = ramp_case()
    v = prepare_volume(case, VolumePreprocessing(spacing=(1.0, 1.0, 1.0)))
    assert v.image.shape == (1, 2, 3, 7) and v.labels.shape == (2, 3, 7)
    # HU -1000..-700 clipped to [-1250, 250] unchanged, min-max: 0, 85, 170, 255; 1 mm steps halve them
    minmax = np.array([0.0, 42.5, 85.0, 127.5, 170.0, 212.5, 255.0])
    expected = (minmax - minmax.mean()) / minmax.std()
    np.testing.assert_allclose(v.image[0, 1, 2], expected, atol=1e-4)
    assert v.image.mean() == pytest.approx(0.0, abs=1e-5) and v.image.std() == pytest.approx(1.0, abs=1e-4)
    # label z = 1 (2 mm) is lesion, the rest lung; nearest neighbour on the 1 mm grid
    assert set(np.unique(v.labels[0, 0])) == {LUNG, LESION} and v.labels[0, 0, 2] == LESION
    assert v.spacing == (1.0, 1.0, 1.0)


def test_preprocessing_off_keeps_stored_values_and_grid():
    case = ramp_case()
    v = prepare_volume(case, VolumePreprocessing(enabled=False))
    np.testing.assert_array_equal(v.image[0], to_xyz(case.image))
    assert v.spacing == (1.0, 1.0, 2.0)


def test_probabilities_go_back_to_the_case_grid():
    case = ramp_case()
    v = prepare_volume(case, VolumePreprocessing(spacing=(1.0, 1.0, 1.0)))
    onehot = np.stack([v.labels == c for c in range(3)]).astype(np.float32)
    back = to_case_grid(onehot, v).argmax(0)
    np.testing.assert_array_equal(back, to_xyz(np.where(case.lesion > 0, LESION, LUNG)))


def test_unrelated_slices_and_unknown_spacing_are_refused():
    with pytest.raises(DomgenError, match="slice spacing .* is unknown"):
        prepare_volume(ramp_case(slice_spacing=None), VolumePreprocessing())
    with pytest.raises(DomgenError, match="preprocessing.spacing"):
        VolumePreprocessing.from_config({"spacing": [1, 0, 2]})
    with pytest.raises(DomgenError, match="unknown preprocessing key"):
        VolumePreprocessing.from_config({"resample": True})
