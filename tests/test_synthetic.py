"""The synthetic multi-site suite: determinism, anatomy in the right HU ranges, real site differences,
and a write -> read round trip through the suite file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from domgen.data import synthetic
from domgen.data.case import CONSOLIDATION, GROUND_GLASS
from domgen.data.synthetic import SITES, build_anatomy, case_rng, generate_case
from domgen.errors import DomgenError

TINY = {"A": 2, "B": 2, "C": 1, "D": 2, "tumour": 1, "effusion": 1}


def cases(site: str, n: int = 2, scale: float = 0.125, slices: int = 6, seed: int = 0):
    return [generate_case(SITES[site], i, seed, scale, slices_per_patient=slices) for i in range(n)]


def stack(items, attr):
    return np.concatenate([getattr(c, attr) for c in items])


def inner(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Erode each slice of ``mask`` by ``pixels`` to keep away from partial-volume edges."""
    return np.stack([ndimage.binary_erosion(m, iterations=pixels) for m in mask.astype(bool)])


def noise_patches(case) -> np.ndarray:
    """Top-corner patches: air far from the body and the table, so all variation there is noise."""
    return np.concatenate([case.image[:, :8, :8], case.image[:, :8, -8:]])


def lag1_correlation(patches: np.ndarray) -> float:
    """Correlation of horizontally adjacent pixels: high for smooth kernels, <= 0 for sharp ones."""
    p = patches - patches.mean(axis=(-2, -1), keepdims=True)
    return float((p[..., 1:] * p[..., :-1]).mean() / (p ** 2).mean())


def test_same_seed_gives_identical_arrays_and_other_seed_differs():
    first = generate_case(SITES["A"], 1, seed=3, scale=0.125, slices_per_patient=4)
    again = generate_case(SITES["A"], 1, seed=3, scale=0.125, slices_per_patient=4)
    other = generate_case(SITES["A"], 1, seed=4, scale=0.125, slices_per_patient=4)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.lesion, again.lesion)
    np.testing.assert_array_equal(first.lung, again.lung)
    assert not np.array_equal(first.image, other.image)
    assert not np.array_equal(first.lesion, other.lesion)


def test_case_fields_follow_the_data_model():
    case = generate_case(SITES["B"], 7, seed=0, scale=0.125, slices_per_patient=5)
    assert case.patient_id == "B_p007" and case.dataset == "B"
    assert case.image.dtype == np.float32 and case.image.shape == (5, 64, 64)
    assert case.lesion.dtype == np.uint8 and case.lung.dtype == np.uint8
    assert set(np.unique(case.lung)) <= {0, 1}
    assert set(np.unique(case.lesion)) <= {0, GROUND_GLASS, CONSOLIDATION}
    assert case.lesion_classes == {1: "ground_glass", 2: "consolidation"}
    # Field of view stays ~350-380 mm whatever the matrix.
    assert 330 < case.spacing[0] * 64 < 400 and case.spacing[0] == case.spacing[1]


def test_matrix_follows_scale_per_site():
    assert generate_case(SITES["A"], 0, 0, 0.125, 2).image.shape[1:] == (64, 64)
    assert generate_case(SITES["C"], 0, 0, 0.125, 2).image.shape[1:] == (79, 79)
    case = generate_case(SITES["C"], 0, 0, 0.25, 2)
    assert case.image.shape[1:] == (158, 158)
    assert abs(case.spacing[0] * 158 - SITES["C"].fov_mm) < 1e-6


def test_tissues_are_in_their_hounsfield_ranges():
    items = cases("A", n=3, scale=0.25)
    image, lesion, lung = stack(items, "image"), stack(items, "lesion"), stack(items, "lung")
    healthy = inner(lung, 2) & (lesion == 0)
    assert -880 < image[healthy].mean() < -760
    assert -700 < image[lesion == GROUND_GLASS].mean() < -300
    assert -100 < image[lesion == CONSOLIDATION].mean() < 50
    # Body: rebuild the same anatomy from the same random stream to get the skin outline.
    site = SITES["A"]
    anatomy = build_anatomy(site, case_rng(0, site, 0), 6, 128)
    body_not_lung = anatomy.body & ~anatomy.lung_region
    assert 0 < np.median(items[0].image[body_not_lung]) < 80  # muscle and mediastinum
    air = ~ndimage.binary_dilation(anatomy.body, iterations=4) & (items[0].image < -500)
    assert abs(items[0].image[air].mean() - (-1000)) < 15


def test_covid_lesions_stay_inside_the_lungs_and_leave_clean_slices():
    for site in ("A", "B", "C", "D"):
        items = cases(site, n=3)
        lesion, lung = stack(items, "lesion"), stack(items, "lung")
        assert lesion.any(), site
        assert not (lesion[lung == 0] > 0).any(), site
        infected = (lesion.reshape(len(lesion), -1) > 0).any(axis=1)
        assert 0.4 < infected.mean() < 1.0, site  # most slices have lesions, some do not


def test_ground_glass_is_peripheral():
    items = cases("A", n=3, slices=8)
    lesion, lung = stack(items, "lesion"), stack(items, "lung").astype(bool)
    spacing = items[0].spacing
    depth = np.stack([ndimage.distance_transform_edt(m, sampling=spacing) for m in lung])
    assert depth[lesion == GROUND_GLASS].mean() < 0.8 * depth[lung].mean()  # uniform spread gives ~1


def test_sites_differ_in_noise_kernel_calibration_and_lesion_mix():
    a, b, c = cases("A", n=3), cases("B", n=3), cases("C", n=3)
    noise = {name: np.std(np.concatenate([noise_patches(x) for x in items]))
             for name, items in (("A", a), ("B", b), ("C", c))}
    assert 12 < noise["A"] < 18 and noise["B"] > 1.8 * noise["A"] and noise["C"] < 0.75 * noise["A"]
    sharpness = {name: lag1_correlation(np.concatenate([noise_patches(x) for x in items]))
                 for name, items in (("A", a), ("B", b), ("C", c))}
    assert sharpness["B"] < 0.05 < sharpness["A"] < 0.6 < sharpness["C"]

    def healthy_lung_mean(items):
        image, lesion, lung = stack(items, "image"), stack(items, "lesion"), stack(items, "lung")
        return image[inner(lung, 2) & (lesion == 0)].mean()

    # B's calibration (gain 0.97, +30 HU) lifts lung by ~55 HU.
    assert healthy_lung_mean(b) - healthy_lung_mean(a) > 25

    def consolidation_share(items):
        lesion = stack(items, "lesion")
        return (lesion == CONSOLIDATION).sum() / max(1, (lesion > 0).sum())

    more_a = cases("A", n=6, slices=6, seed=1)
    more_b = cases("B", n=6, slices=6, seed=1)
    assert consolidation_share(more_b) > 2 * consolidation_share(more_a)


def homogeneous(site_name: str, value: float = 0.0, seed: int = 0, noise_scale=1.0) -> np.ndarray:
    """A uniform phantom of ``value`` HU through ``site_name``'s scanner: all variation is the site's noise."""
    site = SITES[site_name]
    return synthetic.apply_scanner(site, np.full((6, 96, 96), value, np.float32), np.random.default_rng(seed), noise_scale)


@pytest.mark.parametrize("name", ["A", "B", "C", "D", "tumour", "effusion"])
def test_scanner_noise_and_calibration_follow_the_site_spec(name):
    site = SITES[name]
    image = homogeneous(name, value=40.0)
    # Stored = gain * (true + noise) + offset; ramp-filtered noise has no DC, so the mean is exact.
    assert image.mean() == pytest.approx(site.hu_gain * 40.0 + site.hu_offset, abs=1e-2)
    assert image.std() == pytest.approx(site.hu_gain * site.noise_hu, rel=1e-3)
    # A twice-as-wide patient (factor 2^1.5) is noisier by that factor.
    assert homogeneous(name, 40.0, noise_scale=2 ** 1.5).std() == pytest.approx(2 ** 1.5 * image.std(), rel=1e-3)


def test_noise_power_spectrum_is_ramp_shaped_and_kernel_ordered():
    def radial_nps(image):
        nps = (np.abs(np.fft.fft2(image - image.mean(axis=(-2, -1), keepdims=True))) ** 2).mean(axis=0)
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(96), np.fft.fftfreq(96), indexing="ij"))
        bands = [(0.0, 0.06), (0.06, 0.2), (0.2, 0.35), (0.35, 0.5)]
        return np.array([nps[(f >= lo) & (f < hi)].mean() for lo, hi in bands]) / nps.mean()

    standard, sharp, smooth = radial_nps(homogeneous("A")), radial_nps(homogeneous("B")), radial_nps(homogeneous("C"))
    for nps in (standard, sharp, smooth):
        assert nps[0] < nps[1]  # FBP noise: little power at the lowest frequencies (ramp filter)
    # The sharp kernel puts its noise at the highest frequencies, the smooth one at mid-low ones.
    assert sharp[3] > standard[3] > smooth[3]
    assert np.argmax(sharp) == 3 and np.argmax(smooth) <= 1
    sharpness = {n: lag1_correlation(homogeneous(n)) for n in ("A", "B", "C")}
    assert sharpness["B"] < sharpness["A"] < sharpness["C"]


def test_kernel_edge_response_follows_the_site_spec():
    # A -1000 / +0 HU step edge, noise-free: the smooth kernel blurs it most, the sharp kernel overshoots.
    profiles = {}
    for name in ("A", "B", "C"):
        site = replace_noise(SITES[name])
        edge = np.full((1, 64, 64), -1000.0, np.float32)
        edge[..., 32:] = 0.0
        out = synthetic.apply_scanner(site, edge, np.random.default_rng(0))[0, 32]
        profiles[name] = (out - site.hu_offset) / site.hu_gain
    width = {n: int(((p > -900) & (p < -100)).sum()) for n, p in profiles.items()}
    assert width["C"] > width["A"] >= 1 and width["B"] <= width["A"]
    assert profiles["B"].max() > 10.0 and profiles["A"].max() <= 1.0  # overshoot above 0 HU only with the sharp kernel
    # Gaussian kernel of kernel_px pixels: 10-90 % rise ~ 2.56 sigma
    assert width["C"] == pytest.approx(2.56 * SITES["C"].kernel_px, abs=1.5)


def replace_noise(site):
    from dataclasses import replace

    return replace(site, noise_hu=0.0)


def test_stored_intensity_space_per_site():
    for name in ("A", "B", "C", "D"):
        site = SITES[name]
        case = generate_case(site, 0, 0, 0.125, slices_per_patient=2)
        stored = synthetic.stored_case(site, case)
        if site.stored_intensity.kind == "hu":
            assert stored.image is case.image and stored.intensity.kind == "hu"
        else:
            assert stored.intensity == synthetic.MEDSEG_WINDOW
            assert stored.image.min() >= 0 and stored.image.max() <= 255
            np.testing.assert_array_equal(stored.image, np.round(stored.image))
            low = synthetic.MEDSEG_WINDOW.level - synthetic.MEDSEG_WINDOW.width / 2
            inside = (case.image > low + 10) & (case.image < low + 1490)
            back = stored.image / 255 * synthetic.MEDSEG_WINDOW.width + low
            assert np.abs(back - case.image)[inside].max() <= synthetic.MEDSEG_WINDOW.width / 255 / 2 + 1e-3


def test_slice_spacing_is_the_generated_z_step_and_wider_patients_are_noisier():
    site = SITES["A"]
    case = generate_case(site, 0, 0, 0.125, slices_per_patient=5)
    assert case.slice_spacing == pytest.approx(site.z_range_mm / 5)
    anatomy = build_anatomy(site, case_rng(0, site, 0), 5, 64)
    factor = synthetic.patient_noise_scale(anatomy)
    half_width = anatomy.body.any(axis=1).sum(axis=-1) * (site.fov_mm / 64) / 2
    np.testing.assert_allclose(factor[:, 0, 0], (half_width / synthetic.REFERENCE_HALF_WIDTH_MM) ** 1.5, rtol=1e-5)


def test_default_suite_is_at_least_128_pixels():
    assert synthetic.DEFAULT_SCALE * min(s.matrix for s in SITES.values()) >= 128
    assert synthetic.resolve_parameters()["scale"] == synthetic.DEFAULT_SCALE


def test_crazy_paving_and_ground_glass_texture_are_heterogeneous():
    items = cases("B", n=4, scale=0.25)
    image, lesion = stack(items, "image"), stack(items, "lesion")
    ggo = inner(lesion == GROUND_GLASS, 1)
    # hazy, heterogeneous ground glass: spread well above B's noise alone
    assert image[ggo].std() > 1.5 * SITES["B"].noise_hu


def test_site_d_masks_are_binary():
    for case in cases("D", n=2, slices=4):
        assert set(np.unique(case.lesion)) <= {0, 1}
        assert case.lesion_classes == {1: "lesion"}


def test_tumours_are_solid_nodules_inside_the_lung():
    items = cases("tumour", n=3, scale=0.25, slices=8)
    image, lesion, lung = stack(items, "image"), stack(items, "lesion"), stack(items, "lung")
    assert lesion.any() and not (lesion[lung == 0] > 0).any()
    core = inner(lesion, 1)
    assert -20 < image[core].mean() < 80
    assert set(np.unique(lesion)) == {0, 1}


def test_effusion_is_dependent_fluid_outside_the_lung_mask():
    items = cases("effusion", n=3, scale=0.125, slices=8)
    for case in items:
        fluid, lung = case.lesion == 1, case.lung.astype(bool)
        assert fluid.any()
        assert not (fluid & lung).any()
        rows = np.arange(case.image.shape[1])[None, :, None]
        slices = fluid.any(axis=(1, 2))
        # Supine: fluid lies posterior (image bottom) to the aerated lung on the same slices.
        fluid_row = np.broadcast_to(rows, fluid.shape)[fluid].mean()
        lung_row = np.broadcast_to(rows, lung.shape)[lung & slices[:, None, None]].mean()
        assert fluid_row > lung_row + 3
        # And it collects toward the base (later slices).
        assert fluid[-1].sum() >= fluid[0].sum()
    image, fluid = stack(items, "image"), stack(items, "lesion") == 1
    assert -40 < image[inner(fluid, 1)].mean() < 40


def test_bad_parameters_raise_domgen_error():
    with pytest.raises(DomgenError, match="scale"):
        generate_case(SITES["A"], 0, 0, scale=0)
    with pytest.raises(DomgenError, match="Z"):
        synthetic.resolve_parameters(patients={"Z": 2})
    with pytest.raises(DomgenError, match="slices_per_patient"):
        synthetic.resolve_parameters(slices_per_patient=0)


def test_window_conversion_matches_the_declared_window():
    window = synthetic.MEDSEG_WINDOW  # level -600, width 1500 -> [-1350, 150] HU maps to [0, 255]
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 500.0], dtype=np.float32)
    np.testing.assert_array_equal(synthetic.to_window(hu, window), [0, 0, 128, 255, 255])


def test_write_suite_round_trips_through_the_readers(tmp_path):
    from domgen.data.registry import load_cases, load_suite

    path = synthetic.write_suite(tmp_path / "suite", seed=5, scale=0.125, patients=TINY, slices_per_patient=3)
    suite = load_suite(path)
    assert sorted(suite.names()) == sorted(TINY)
    for name, count in TINY.items():
        spec = suite.get(name)
        site = SITES[name]
        read = load_cases(spec)
        assert [c.patient_id for c in read] == [f"{name}_p{i:03d}" for i in range(count)]
        for i, case in enumerate(read):
            truth = generate_case(site, i, 5, 0.125, slices_per_patient=3)
            np.testing.assert_array_equal(case.lesion, truth.lesion)
            np.testing.assert_array_equal(case.lung, truth.lung)
            np.testing.assert_allclose(case.spacing, truth.spacing, rtol=1e-5)
            assert case.lesion_classes == truth.lesion_classes
            if site.stored_intensity.kind == "hu":
                assert case.intensity.kind == "hu"
                # DICOM stores whole int16 numbers (HU + 1024); NIfTI keeps float32.
                tolerance = 0.51 if site.format == "dicom" else 1e-3
                np.testing.assert_allclose(case.image, truth.image, atol=tolerance)
            else:
                assert case.intensity.window_known
                assert (case.intensity.level, case.intensity.width) == (-600, 1500)
                np.testing.assert_array_equal(case.image, synthetic.to_window(truth.image, synthetic.MEDSEG_WINDOW))
                # Undoing the declared window gives HU back to within one grey level (~6 HU) inside it.
                hu = case.image / 255.0 * 1500 - 1350
                inside = (truth.image > -1300) & (truth.image < 100)
                assert np.abs(hu - truth.image)[inside].max() < 1500 / 255
    # B really is an int16 series with the -1024 intercept.
    import pydicom

    first = sorted((tmp_path / "suite" / "B" / "images" / "B_p000").glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    assert ds.RescaleIntercept == -1024 and ds.pixel_array.dtype == np.int16
    record = json.loads((tmp_path / "suite" / "generator.json").read_text())
    assert record["parameters"]["patients"] == TINY and record["parameters"]["seed"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_ensure_reuses_a_current_suite_and_regenerates_a_stale_one(tmp_path, monkeypatch):
    small = {"A": 1, "B": 0, "C": 0, "D": 1, "tumour": 0, "effusion": 0}
    monkeypatch.setenv("DOMGEN_DATA", str(tmp_path / "data"))
    path = synthetic.ensure_synthetic_suite(patients=small, slices_per_patient=2)
    assert path == (tmp_path / "data" / "synthetic" / "suite.yaml").resolve()
    marker = path.parent / "marker"
    marker.write_text("kept while parameters match")
    assert synthetic.ensure_synthetic_suite(patients=small, slices_per_patient=2) == path
    assert marker.exists()
    synthetic.ensure_synthetic_suite(patients=small, slices_per_patient=3)
    assert not marker.exists()
    record = json.loads((path.parent / "generator.json").read_text())
    assert record["parameters"]["slices_per_patient"]["A"] == 3


def test_interrupted_write_leaves_the_old_suite_untouched(tmp_path, monkeypatch):
    small = {"A": 2, "B": 0, "C": 0, "D": 0, "tumour": 0, "effusion": 0}
    root = tmp_path / "suite"
    synthetic.write_suite(root, patients=small, slices_per_patient=2)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    real = synthetic.generate_case

    def fails_on_second_patient(site, index, *args, **kwargs):
        if index == 1:
            raise KeyboardInterrupt
        return real(site, index, *args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_case", fails_on_second_patient)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_suite(root, seed=9, patients=small, slices_per_patient=2)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert json.loads((root / "generator.json").read_text())["parameters"]["seed"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["suite"]
