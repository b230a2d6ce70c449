"""Slice spacing read and written truthfully: NIfTI and DICOM round trips, checked with nibabel, pydicom
and SimpleITK as independent readers, and 'unknown' kept unknown."""
from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from domgen.data.case import Case
from domgen.data.readers import READERS, WRITERS
from domgen.data.spec import DatasetSpec


def spec(tmp_path, fmt: str) -> DatasetSpec:
    return DatasetSpec(name="V", format=fmt, root=tmp_path / fmt, images="images", lesions="labels", lungs="lungs")


def volume(slice_spacing: float | None, z: int = 6) -> Case:
    rng = np.random.default_rng(1)
    image = rng.integers(-1024, 400, size=(z, 10, 7)).astype(np.float32)
    lesion = np.zeros(image.shape, np.uint8)
    lesion[2, 3:5, 2:4] = 1
    lung = np.ones(image.shape, np.uint8)
    return Case("p1", "V", image, lesion, spacing=(0.7, 0.85), slice_spacing=slice_spacing, lung=lung)


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
@pytest.mark.parametrize("slice_spacing", [2.7, 0.625, 5.0])
def test_slice_spacing_round_trip(tmp_path, fmt, slice_spacing):
    s = spec(tmp_path, fmt)
    case = volume(slice_spacing)
    WRITERS[fmt](case, s)
    back = list(READERS[fmt](s))[0]
    assert back.slice_spacing == pytest.approx(slice_spacing, abs=1e-6)
    assert back.spacing == pytest.approx((0.7, 0.85), abs=1e-6)
    np.testing.assert_array_equal(back.image, case.image)
    np.testing.assert_array_equal(back.lesion, case.lesion)


def test_nifti_spacing_seen_by_nibabel_and_simpleitk(tmp_path):
    s = spec(tmp_path, "nifti")
    WRITERS["nifti"](volume(2.7), s)
    path = s.images_dir / "p1.nii.gz"
    assert nib.load(str(path)).header.get_zooms() == pytest.approx((0.85, 0.7, 2.7), abs=1e-6)
    assert sitk.ReadImage(str(path)).GetSpacing() == pytest.approx((0.85, 0.7, 2.7), abs=1e-6)
    # masks carry the same geometry as the image
    assert nib.load(str(s.lesions_dir / "p1.nii.gz")).header.get_zooms() == pytest.approx((0.85, 0.7, 2.7), abs=1e-6)


def test_dicom_series_spacing_seen_by_simpleitk(tmp_path):
    s = spec(tmp_path, "dicom")
    WRITERS["dicom"](volume(2.7), s)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(s.images_dir / "p1")))
    image = reader.Execute()
    assert image.GetSpacing() == pytest.approx((0.85, 0.7, 2.7), abs=1e-5)
    assert image.GetSize() == (7, 10, 6)


def test_nifti_in_metres_is_read_in_mm(tmp_path):
    s = spec(tmp_path, "nifti")
    WRITERS["nifti"](volume(2.0), s)
    for folder in (s.images_dir, s.lesions_dir, s.lungs_dir):
        path = folder / "p1.nii.gz"
        img = nib.load(str(path))
        metres = nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([0.00085, 0.0007, 0.002, 1.0]))
        metres.header.set_xyzt_units("meter")
        nib.save(metres, str(path))
    back = list(READERS["nifti"](s))[0]
    assert back.slice_spacing == pytest.approx(2.0)
    assert back.spacing == pytest.approx((0.7, 0.85))


@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_unknown_slice_spacing_stays_unknown(tmp_path, fmt):
    s = spec(tmp_path, fmt)
    case = volume(None)
    WRITERS[fmt](case, s)
    back = list(READERS[fmt](s))[0]
    assert back.slice_spacing is None
    np.testing.assert_array_equal(back.image, case.image)  # slice order kept (InstanceNumber for DICOM)


def test_dicom_spacing_from_positions_not_thickness(tmp_path):
    """Overlapping reconstructions: 5 mm thick slices every 2.5 mm; the spacing is the step of the positions."""
    import pydicom

    s = spec(tmp_path, "dicom")
    WRITERS["dicom"](volume(2.5), s)
    for path in sorted((s.images_dir / "p1").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SliceThickness = 5.0
        del ds.SpacingBetweenSlices
        ds.save_as(path)
    assert list(READERS["dicom"](s))[0].slice_spacing == pytest.approx(2.5)


def test_synthetic_volumes_carry_their_spacing(tiny_suite):
    from domgen.data.registry import load_cases, load_suite
    from domgen.data.synthetic import SITES

    suite = load_suite(tiny_suite)
    for name in ("A", "B", "C"):
        case = load_cases(suite.get(name))[0]
        assert case.slice_spacing == pytest.approx(SITES[name].z_range_mm / case.n_slices, abs=1e-5)
    assert load_cases(suite.get("D"))[0].slice_spacing is None
