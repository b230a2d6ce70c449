from pathlib import Path

import numpy as np
import pytest

from domgen.data.case import Case, IntensitySpace
from domgen.errors import DomgenError
from domgen.preprocessing.intensity import to_window_8bit
from domgen.preprocessing.lung_mask import (
    LUNG_MASK_PROVIDERS, LungmaskLungMask, get_lung_mask_provider, threshold_lung_mask,
)

SYNTHETIC = Path(__file__).resolve().parents[1] / "domgen" / "data" / "synthetic.py"


def chest_phantom(n_slices=10, size=64):
    """Two ellipsoid lungs (-850 HU) in a +40 HU body in -1000 HU air; a ground-glass lesion (-500 HU) in
    the patient's right lung and a consolidation (0 HU) in the left, both inside the lung."""
    z, y, x = np.mgrid[0:n_slices, 0:size, 0:size].astype(float)
    image = np.full(z.shape, -1000.0)
    body = ((y - 32) / 26) ** 2 + ((x - 32) / 30) ** 2 <= 1
    image[body] = 40.0
    lungs = np.zeros(z.shape, bool)
    for cx in (19, 45):
        lungs |= ((y - 32) / 18) ** 2 + ((x - cx) / 10) ** 2 + ((z - 4.5) / 7) ** 2 <= 1
    image[lungs] = -850.0
    ground_glass = (y - 28) ** 2 + (x - 19) ** 2 + (z - 4.5) ** 2 <= 16
    consolidation = (y - 36) ** 2 + (x - 45) ** 2 + (z - 4.5) ** 2 <= 12
    image[ground_glass] = -500.0
    image[consolidation] = 0.0
    image += np.random.default_rng(0).normal(0, 15, image.shape)
    return image.astype(np.float32), lungs, body, ground_glass | consolidation


def make_case(image, intensity=IntensitySpace("hu"), lung=None, spacing=(2.0, 2.0)):
    return Case("P001", "A", image, np.zeros(image.shape, np.uint8), spacing=spacing, intensity=intensity, lung=lung)


def test_threshold_covers_lungs_and_lesions_and_excludes_outside_air():
    image, lungs, body, lesions = chest_phantom()
    mask = get_lung_mask_provider("threshold")(make_case(image))
    assert mask.dtype == np.uint8 and mask.shape == image.shape and set(np.unique(mask)) == {0, 1}
    assert mask[lungs].mean() >= 0.95
    assert mask[lesions].mean() >= 0.95
    assert mask[~body].sum() == 0
    assert mask[body & ~lungs].sum() <= 0.05 * lungs.sum()


@pytest.mark.parametrize("level, width", [(-600, 1500), (40, 400)])
def test_threshold_on_8bit_windowed_data(level, width):
    # A mediastinal window (40/400) saturates air and lung alike at its lower edge; both must still work.
    image, lungs, body, lesions = chest_phantom()
    hu_mask = threshold_lung_mask(image, (2.0, 2.0))
    stored = to_window_8bit(image, level, width).astype(np.float32)
    mask = get_lung_mask_provider("threshold")(make_case(stored, IntensitySpace("windowed", level, width)))
    assert mask[lungs].mean() >= 0.95 and mask[~body].sum() == 0
    assert (mask == hu_mask).mean() >= 0.99


def test_threshold_refuses_unknown_window():
    image, *_ = chest_phantom(n_slices=2)
    with pytest.raises(DomgenError, match="threshold lung mask.*dataset 'A'.*--lung-mask otsu.*level: L, width: W"):
        get_lung_mask_provider("threshold")(make_case(image, IntensitySpace("windowed")))


@pytest.mark.parametrize("level, width", [(-600, 1500), (40, 400)])
def test_otsu_mode_needs_no_window_and_matches_the_hu_mask(level, width):
    image, lungs, body, lesions = chest_phantom()
    hu_mask = threshold_lung_mask(image, (2.0, 2.0))
    stored = to_window_8bit(image, level, width).astype(np.float32)
    mask = get_lung_mask_provider("otsu")(make_case(stored, IntensitySpace("windowed")))
    assert mask[lungs].mean() >= 0.95 and mask[lesions].mean() >= 0.95 and mask[~body].sum() == 0
    assert (mask == hu_mask).mean() >= 0.99


def test_ragged_case_is_masked_slice_by_slice():
    from domgen.preprocessing.lung_mask import lung_mask_of

    image, lungs, *_ = chest_phantom(n_slices=10, size=64)
    small, *_ = chest_phantom(n_slices=10, size=48)
    case = Case("P001", "A", [image[4], small[4]], [np.zeros((64, 64), np.uint8), np.zeros((48, 48), np.uint8)],
                spacing=(2.0, 2.0), intensity=IntensitySpace("hu"))
    masks = lung_mask_of(case, get_lung_mask_provider("threshold"))
    assert [m.shape for m in masks] == [(64, 64), (48, 48)]
    np.testing.assert_array_equal(masks[0], threshold_lung_mask(image[4:5], (2.0, 2.0))[0].astype(bool))


@pytest.mark.skipif(not SYNTHETIC.exists(), reason="the synthetic generator is not written yet")
def test_threshold_on_synthetic_cases_agrees_with_their_lung_masks():
    from domgen.data.synthetic import SITES, generate_case

    for site, patient in (("A", 0), ("A", 1), ("D", 0)):
        case = generate_case(SITES[site], patient, seed=0, scale=0.125)
        mask = get_lung_mask_provider("threshold")(case).astype(bool)
        truth = case.lung > 0
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice >= 0.9, (site, patient, dice)


def test_reference_provider():
    image, lungs, *_ = chest_phantom(n_slices=2)
    provider = get_lung_mask_provider("reference")
    np.testing.assert_array_equal(provider(make_case(image, lung=lungs.astype(np.uint8) * 255)), lungs)
    with pytest.raises(DomgenError, match="'A' has no reference lung masks"):
        provider(make_case(image))


def test_registry_rejects_unknown_names_and_options():
    assert set(LUNG_MASK_PROVIDERS) == {"threshold", "otsu", "reference", "lungmask"}
    assert all(get_lung_mask_provider(name).name == name for name in LUNG_MASK_PROVIDERS)
    with pytest.raises(DomgenError, match="--lung-mask"):
        get_lung_mask_provider("watershed")
    with pytest.raises(DomgenError, match="weights"):
        get_lung_mask_provider("threshold", weights="w.pth")
    assert get_lung_mask_provider("threshold", weights=None).name == "threshold"  # unset CLI flags pass through


# --- lungmask --------------------------------------------------------------------------------------


def _lungmask_unet(**overrides):
    torch = pytest.importorskip("torch")
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    config = dict(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    config.update(overrides)
    return UNet(**config)


@pytest.fixture
def lungmask_weights(tmp_path):
    """R231-shaped weights whose last layer says "right lung" everywhere, so the output shows they were used."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    model = _lungmask_unet()
    with torch.no_grad():
        model.last.weight.zero_()
        model.last.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    path = tmp_path / "r231.pth"
    torch.save(model.state_dict(), path)
    return path


def test_lungmask_runs_the_model_from_the_weights_file(lungmask_weights):
    from lungmask.mask import LMInferer

    image, lungs, body, _ = chest_phantom(n_slices=2)
    provider = get_lung_mask_provider("lungmask", weights=str(lungmask_weights))
    mask = provider(make_case(image))
    assert mask.dtype == np.uint8 and mask.shape == image.shape and set(np.unique(mask)) == {0, 1}
    # "Right lung everywhere" fills lungmask's body crop: all of the lungs, none of the image corners.
    assert mask[lungs].all() and mask[:, :3, :3].sum() == 0
    expected = LMInferer(modelpath=str(lungmask_weights), force_cpu=True, tqdm_disable=True).apply(image) > 0
    np.testing.assert_array_equal(mask, expected)


def test_lungmask_rejects_bad_weights_naming_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(DomgenError, match="garbage.pth"):
        LungmaskLungMask(weights=garbage).load_model()
    shallow = tmp_path / "depth4.pth"
    torch.save(_lungmask_unet(depth=4).state_dict(), shallow)
    with pytest.raises(DomgenError, match="depth4.pth.*do not fit"):
        LungmaskLungMask(weights=shallow).load_model()
    with pytest.raises(DomgenError, match="does not exist"):
        LungmaskLungMask(weights=tmp_path / "missing.pth").load_model()


def test_lungmask_uses_the_hub_cache_offline(tmp_path, monkeypatch, lungmask_weights):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    message = (f"lungmask weights for R231 are not in {tmp_path / 'hub' / 'checkpoints'} and cannot be "
               "downloaded offline; pass --lungmask-weights PATH or use --lung-mask threshold.")
    with pytest.raises(DomgenError) as error:
        LungmaskLungMask("R231").load_model()
    assert str(error.value) == message
    cached = tmp_path / "hub" / "checkpoints" / "unet_r231covid-0de78a7e.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(lungmask_weights.read_bytes())
    model = LungmaskLungMask("R231CovidWeb").load_model()
    assert torch.equal(model.last.bias, torch.tensor([0.0, 5.0, 0.0]))
    with pytest.raises(DomgenError, match="R231, R231CovidWeb, LTRCLobes"):
        LungmaskLungMask("U-Net")
