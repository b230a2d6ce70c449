import numpy as np
import pytest

from domgen.data.case import HU, IntensitySpace
from domgen.errors import DomgenError
from domgen.preprocessing.intensity import (
    NORMALISATIONS, clip_hu, fixed_normalise, get_normalisation, hu_window, resize_slice, resize_volume, to_hu,
    to_window_8bit, zscore_per_slice,
)

LUNG = IntensitySpace("windowed", level=-600.0, width=1500.0)


def test_to_hu_passthrough_and_window_edges():
    image = np.array([[-1000, 0], [40, 3000]], dtype=np.int16)
    assert to_hu(image, HU).dtype == np.float32
    np.testing.assert_array_equal(to_hu(image, HU), image.astype(np.float32))
    stored = np.array([0, 255, 51], dtype=np.uint8)
    # level -600, width 1500: window [-1350, 150]; 51/255 of the way is -1350 + 300.
    np.testing.assert_allclose(to_hu(stored, LUNG), [-1350.0, 150.0, -1050.0], atol=1e-3)


def test_window_round_trip_within_quantisation():
    hu = np.linspace(-1350, 150, 1001, dtype=np.float32)
    back = to_hu(to_window_8bit(hu, -600, 1500), LUNG)
    assert np.abs(back - hu).max() <= 1500 / 255 / 2 + 1e-3
    clipped = to_hu(to_window_8bit(np.array([-3000.0, 900.0]), -600, 1500), LUNG)
    np.testing.assert_allclose(clipped, [-1350.0, 150.0])


def test_unknown_window_says_what_to_declare():
    with pytest.raises(DomgenError, match=r"intensity: \{kind: windowed, level: L, width: W\}"):
        to_hu(np.zeros((2, 2)), IntensitySpace("windowed"), source="dataset 'C'")


def test_clip_and_window():
    image = np.array([-2000.0, -1350.0, -600.0, 150.0, 500.0])
    np.testing.assert_array_equal(clip_hu(image, -1000, 100), [-1000, -1000, -600, 100, 100])
    np.testing.assert_allclose(hu_window(image, -600, 1500), [0, 0, 0.5, 1, 1])
    assert hu_window(image, -600, 1500).dtype == np.float32


def test_zscore_per_slice_matches_hand_computation():
    rng = np.random.default_rng(0)
    volume = rng.normal(-500, 200, (3, 8, 8)).astype(np.float32)
    volume[1] = 7.0  # constant slice
    out = zscore_per_slice(volume)
    for z in (0, 2):
        expected = (volume[z] - volume[z].mean()) / volume[z].std()
        np.testing.assert_allclose(out[z], expected, atol=1e-5)
    assert np.all(out[1] == 0) and np.isfinite(out).all()
    np.testing.assert_allclose(zscore_per_slice(volume[0]), out[0])


def test_zscore_with_mask_uses_mask_statistics_and_zeros_outside():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 1
    values = image[1:3, 1:3]
    out = zscore_per_slice(image, mask)
    np.testing.assert_allclose(out[1:3, 1:3], (values - values.mean()) / values.std(), atol=1e-6)
    assert np.all(out[mask == 0] == 0)
    assert np.all(zscore_per_slice(image, np.zeros((4, 4))) == 0)


def test_zscore_slice_uses_every_pixel_then_the_lung_mask_zeros_outside():
    # 0..15: mean 7.5, population variance (16^2 - 1) / 12 = 21.25, by hand
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = get_normalisation("zscore-slice")(image)
    np.testing.assert_allclose(out, (image - 7.5) / np.sqrt(21.25), atol=1e-6)
    # through the slice preprocessing with mask_to_lung: whole-slice statistics, zeros outside the lung
    from domgen.data.case import Case
    from domgen.preprocessing.slices import SlicePreprocessing, _normalised_slices

    lung = np.zeros((1, 4, 4), np.uint8)
    lung[0, 1:3, 1:3] = 1
    case = Case("p", "A", image[None], np.zeros((1, 4, 4), np.uint8), spacing=(1.0, 1.0), lung=lung)
    [whole] = _normalised_slices(case, SlicePreprocessing(normalisation="zscore-slice"), list(lung))
    [inside] = _normalised_slices(case, SlicePreprocessing(normalisation="zscore"), list(lung))
    np.testing.assert_allclose(whole[1:3, 1:3], (image[1:3, 1:3] - 7.5) / np.sqrt(21.25), atol=1e-6)
    # lung-only: 5, 6, 9, 10 -> mean 7.5, variance (2.5^2 + 1.5^2) / 2 = 4.25
    np.testing.assert_allclose(inside[1:3, 1:3], (image[1:3, 1:3] - 7.5) / np.sqrt(4.25), atol=1e-6)
    assert np.all(whole[lung[0] == 0] == 0) and np.all(inside[lung[0] == 0] == 0)


def test_fixed_normalise_and_registry():
    np.testing.assert_allclose(fixed_normalise(np.array([-1000.0, -500.0, 0.0])), [-1, 0, 1])
    assert set(NORMALISATIONS) == {"zscore", "zscore-slice", "fixed", "window"}
    assert get_normalisation("fixed") is fixed_normalise
    with pytest.raises(DomgenError, match="zscore"):
        get_normalisation("minmax")


def test_resize_mask_keeps_labels_exactly_and_image_is_smooth():
    mask = np.zeros((30, 20), np.uint8)
    mask[5:15, 4:10] = 1
    mask[20:28, 12:18] = 2
    up = resize_slice(mask, (60, 40), "mask")
    assert up.dtype == np.uint8 and set(np.unique(up)) == {0, 1, 2}
    # Nearest neighbour on an exact 2x grid: every source pixel becomes a 2x2 block.
    np.testing.assert_array_equal(up[::2, ::2], mask)
    down = resize_slice(up, (30, 20), "mask")
    assert set(np.unique(down)) <= {0, 1, 2}
    ramp = np.tile(np.linspace(-1000, 0, 20, dtype=np.float32), (30, 1))
    small = resize_slice(ramp, (15, 10), "image")
    assert small.dtype == np.float32 and small.shape == (15, 10)
    assert np.all(np.diff(small, axis=1) > 0) and -1000 <= small.min() and small.max() <= 0


def test_resize_volume_is_slice_wise():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(3, 16, 12)).astype(np.float32)
    out = resize_volume(volume, (8, 6), "image")
    assert out.shape == (3, 8, 6)
    for z in range(3):
        np.testing.assert_allclose(out[z], resize_slice(volume[z], (8, 6), "image"))
    with pytest.raises(ValueError):
        resize_slice(volume, (8, 6))
