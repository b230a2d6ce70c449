"""Readers and writers of the three on-disk layouts, on small files written here."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from domgen.data.case import Case, IntensitySpace
from domgen.data.readers import READERS, WRITERS, list_patient_ids, read_case_files
from domgen.data.registry import DatasetSpec, load_cases
from domgen.errors import DomgenError

SLICE_ID = r"^(?P<patient>[A-Za-z0-9_-]+?)(_(?P<slice>\d+))?$"
WINDOW = IntensitySpace("windowed", -600.0, 1500.0)


def spec(tmp_path: Path, fmt: str, **kw) -> DatasetSpec:
    kw.setdefault("lesion_labels", {1: "ground_glass", 2: "consolidation"})
    return DatasetSpec(name="D", format=fmt, root=tmp_path / fmt, **kw)


def small_case(pid: str = "p1", z: int = 5, h: int = 12, w: int = 9, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    image = rng.integers(-1024, 600, size=(z, h, w)).astype(np.float32)
    lesion = np.zeros((z, h, w), np.uint8)
    lesion[1, 2:5, 3:6] = 1
    lesion[z - 1, 7, 1] = 2
    lung = np.zeros((z, h, w), np.uint8)
    lung[:, 1:-1, 1:-1] = 1
    return Case(pid, "D", image, lesion, spacing=(0.7, 0.85), lung=lung,
                lesion_classes={1: "ground_glass", 2: "consolidation"})


def read_all(s: DatasetSpec) -> list[Case]:
    return list(READERS[s.format](s))


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def save_nifti(array_xyz: np.ndarray, path: Path, zooms=(1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array_xyz, np.diag([*zooms, 1.0])), str(path))


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------- NIfTI


def test_nifti_written_by_nibabel_gives_zyx_hu_and_spacing(tmp_path):
    s = spec(tmp_path, "nifti", lungs="lungs")
    x, y, z = np.meshgrid(np.arange(6), np.arange(4), np.arange(3), indexing="ij")
    volume = (-1000 + 100 * z + 10 * y + x).astype(np.int16)  # value encodes its own (x, y, z)
    mask = np.zeros((6, 4, 3), np.uint8)
    mask[5, 0, 2] = 2
    save_nifti(volume, s.images_dir / "b.nii.gz", zooms=(0.5, 0.8, 2.5))
    save_nifti(mask, s.lesions_dir / "b.nii", zooms=(0.5, 0.8, 2.5))  # .nii and .nii.gz pair by stem
    save_nifti(np.full((6, 4, 3), 2, np.uint8), s.lungs_dir / "b.nii.gz")
    save_nifti(volume, s.images_dir / "a.nii.gz")
    save_nifti(np.zeros((6, 4, 3), np.uint8), s.lesions_dir / "a.nii.gz")
    save_nifti(np.zeros((6, 4, 3), np.uint8), s.lungs_dir / "a.nii.gz")

    a, b = read_all(s)
    assert [a.patient_id, b.patient_id] == ["a", "b"]
    assert b.image.shape == (3, 4, 6) and b.image.dtype == np.float32
    assert b.image[2, 3, 1] == -1000 + 200 + 30 + 1  # image[z, y, x]
    assert b.lesion[2, 0, 5] == 2 and b.lesion.sum() == 2
    assert b.spacing == (0.8, 0.5)  # (zooms[1], zooms[0])
    assert b.lung.max() == 1 and b.lung.all()  # left/right labels merged
    assert list(b.slice_index) == [0, 1, 2]
    assert b.intensity.kind == "hu" and b.lesion_classes == {1: "ground_glass", 2: "consolidation"}


def test_nifti_round_trip_through_writer(tmp_path):
    s = spec(tmp_path, "nifti", lungs="lungs")
    cases = [small_case("p2", seed=2), small_case("p1", seed=1)]
    cases[1].image[0, 0, 0] = -1000.25  # fractional values keep float32
    for case in cases:
        WRITERS["nifti"](case, s)
    assert no_temp_files(s.root)
    back = load_cases(s)
    assert [c.patient_id for c in back] == ["p1", "p2"]
    for original, read in zip(sorted(cases, key=lambda c: c.patient_id), back):
        np.testing.assert_array_equal(read.image, original.image)
        np.testing.assert_array_equal(read.lesion, original.lesion)
        np.testing.assert_array_equal(read.lung, original.lung)
        assert read.spacing == pytest.approx(original.spacing)
    # The file itself follows the contract: (X, Y, Z) with affine diag(sx, sy, sz).
    img = nib.load(str(s.images_dir / "p2.nii.gz"))
    assert img.shape == (9, 12, 5)
    assert img.header.get_zooms()[:2] == pytest.approx((0.85, 0.7))


def test_nifti_patient_id_regex_and_filter(tmp_path):
    s = spec(tmp_path, "nifti", patient_id=r"^case_(?P<patient>\d+)$")
    for pid in ("007", "012"):
        save_nifti(np.zeros((3, 3, 2), np.int16), s.images_dir / f"case_{pid}.nii.gz")
        save_nifti(np.zeros((3, 3, 2), np.uint8), s.lesions_dir / f"case_{pid}.nii.gz")
    assert list_patient_ids(s) == ["007", "012"]
    assert [c.patient_id for c in load_cases(s, patient_ids=["012"])] == ["012"]
    assert read_case_files(s, "case_007").patient_id == "007"
    with pytest.raises(DomgenError, match="999"):
        load_cases(s, patient_ids=["999"])


@pytest.fixture
def nifti_pair(tmp_path):
    s = spec(tmp_path, "nifti")
    save_nifti(np.zeros((4, 4, 3), np.int16), s.images_dir / "p.nii.gz")
    save_nifti(np.zeros((4, 4, 3), np.uint8), s.lesions_dir / "p.nii.gz")
    return s


def test_truncated_nifti_names_the_file(nifti_pair):
    path = nifti_pair.images_dir / "p.nii.gz"
    big = np.arange(40 * 40 * 30, dtype=np.int16).reshape(40, 40, 30)
    save_nifti(big, path)
    save_nifti(np.zeros(big.shape, np.uint8), nifti_pair.lesions_dir / "p.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, data cut: fails only when read
    with pytest.raises(DomgenError, match=r"p\.nii\.gz.*corrupt or truncated"):
        read_all(nifti_pair)


def test_garbage_nifti_names_the_file(nifti_pair):
    (nifti_pair.lesions_dir / "p.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 5))
    with pytest.raises(DomgenError, match=r"masks/p\.nii\.gz"):
        read_all(nifti_pair)


def test_mask_shape_mismatch(nifti_pair):
    save_nifti(np.zeros((4, 5, 3), np.uint8), nifti_pair.lesions_dir / "p.nii.gz")
    with pytest.raises(DomgenError, match=r"masks/p\.nii\.gz.*shape"):
        read_all(nifti_pair)


def test_mask_values_outside_labels_are_named(nifti_pair):
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[0, 0, 0], mask[1, 1, 1] = 1, 7
    save_nifti(mask, nifti_pair.lesions_dir / "p.nii.gz")
    with pytest.raises(DomgenError, match=r"masks/p\.nii\.gz holds value\(s\) 7 "):
        read_all(nifti_pair)


def test_fractional_mask_values_are_rejected(nifti_pair):
    save_nifti(np.full((4, 4, 3), 0.5, np.float32), nifti_pair.lesions_dir / "p.nii.gz")
    with pytest.raises(DomgenError, match="0.5"):
        read_all(nifti_pair)


def test_nan_voxels(nifti_pair):
    volume = np.zeros((4, 4, 3), np.float32)
    volume[1, 2, 0] = np.nan
    volume[0, 0, 0] = np.inf
    save_nifti(volume, nifti_pair.images_dir / "p.nii.gz")
    with pytest.raises(DomgenError, match=r"images/p\.nii\.gz contains 2 NaN or infinite"):
        read_all(nifti_pair)


def test_image_without_mask_and_mask_without_image(nifti_pair):
    save_nifti(np.zeros((4, 4, 3), np.int16), nifti_pair.images_dir / "q.nii.gz")
    with pytest.raises(DomgenError, match=r"images/q\.nii\.gz has no lesion mask"):
        read_all(nifti_pair)
    (nifti_pair.images_dir / "q.nii.gz").unlink()
    save_nifti(np.zeros((4, 4, 3), np.uint8), nifti_pair.lesions_dir / "r.nii.gz")
    with pytest.raises(DomgenError, match=r"masks/r\.nii\.gz has no matching image"):
        read_all(nifti_pair)


def test_empty_and_missing_folders(tmp_path):
    s = spec(tmp_path, "nifti")
    with pytest.raises(DomgenError, match=r"no images found in .*nifti/images"):
        read_all(s)
    s.images_dir.mkdir(parents=True)
    (s.images_dir / "notes.txt").write_text("x")
    s.suite_file = tmp_path / "suite.yaml"
    with pytest.raises(DomgenError, match=r"no images found in .*check 'root'/'images' in .*suite\.yaml"):
        read_all(s)


def test_file_not_matching_patient_regex(nifti_pair):
    nifti_pair.patient_id = r"^(?P<patient>case\d+)$"
    with pytest.raises(DomgenError, match=r"p\.nii\.gz does not match the patient_id regex"):
        read_all(nifti_pair)


def test_writer_refuses_id_the_regex_would_not_read_back(tmp_path):
    s = spec(tmp_path, "nifti", patient_id=SLICE_ID)
    with pytest.raises(DomgenError, match="would not read back"):
        WRITERS["nifti"](small_case("p_001"), s)  # the regex would read patient 'p', slice 1


# ---------------------------------------------------------------------------------------------- DICOM


def ct_slice(path: Path, pixels: np.ndarray, z: float, instance: int, series: str, *, slope=1.0,
             intercept=-1024.0, spacing=(0.6, 0.9), signed=False, rescale=True) -> None:
    """A CT slice written directly with pydicom (independently of domgen's writer)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "x"
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, "1.2.3"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-100.0, -120.0, z]
    ds.PixelSpacing = list(spacing)
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def independent_series(s: DatasetSpec, folder: str = "LUNG1-001") -> np.ndarray:
    """Three 4x5 slices with z = 10, -5, 2.5 in shuffled file names; returns expected HU in z order."""
    series = generate_uid()
    stored = {z: np.full((4, 5), 100 * (i + 1), np.uint16) for i, z in enumerate((10.0, -5.0, 2.5))}
    for z, (name, instance) in zip(stored, (("b.dcm", 1), ("c.dcm", 3), ("a.dcm", 2))):
        stored[z][0, 0] = 7
        ct_slice(s.images_dir / folder / name, stored[z], z, instance, series, slope=2.0, intercept=-1000.0)
    return np.stack([stored[z] * 2.0 - 1000.0 for z in sorted(stored)])


def test_dicom_written_by_pydicom_sorted_by_position_with_rescale(tmp_path):
    s = spec(tmp_path, "dicom", patient_id=r"^(?P<patient>LUNG1-\d+)$")
    expected = independent_series(s)
    mask = np.zeros((5, 4, 3), np.uint8)  # NIfTI (X, Y, Z) aligned with the sorted series
    mask[4, 3, 0] = 1
    save_nifti(mask, s.lesions_dir / "LUNG1-001.nii.gz")
    (case,) = read_all(s)
    assert case.patient_id == "LUNG1-001"
    np.testing.assert_array_equal(case.image, expected)  # z order -5, 2.5, 10 and HU = 2 * stored - 1000
    assert case.image[0, 1, 1] == 2 * 200 - 1000
    assert case.spacing == (0.6, 0.9)
    assert case.lesion[0, 3, 4] == 1 and case.lesion.sum() == 1


def test_dicom_writer_output_reads_back_with_pydicom_and_simpleitk(tmp_path):
    s = spec(tmp_path, "dicom", lungs="lungs")
    case = small_case("p1", z=4)
    WRITERS["dicom"](case, s)
    assert no_temp_files(s.root)
    folder = s.images_dir / "p1"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 4
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == CTImageStorage and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PatientID == "p1" and ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
    assert {pydicom.dcmread(f).SeriesInstanceUID for f in files} == {ds.SeriesInstanceUID}
    # A second, independent reader.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    volume = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), case.image)
    assert volume.GetSpacing()[:2] == pytest.approx((0.85, 0.7))  # SimpleITK gives (x, y)
    (back,) = read_all(s)
    np.testing.assert_array_equal(back.image, case.image)
    np.testing.assert_array_equal(back.lesion, case.lesion)
    np.testing.assert_array_equal(back.lung, case.lung)
    assert back.spacing == pytest.approx(case.spacing)
    # Writing again replaces the series instead of mixing two.
    WRITERS["dicom"](small_case("p1", z=3, seed=5), s)
    assert len(list(folder.glob("*.dcm"))) == 3 and read_all(s)[0].n_slices == 3


def test_dicom_mixed_series_is_refused(tmp_path):
    s = spec(tmp_path, "dicom")
    independent_series(s, "p1")
    ct_slice(s.images_dir / "p1" / "z.dcm", np.zeros((4, 5), np.uint16), 20.0, 9, generate_uid())
    save_nifti(np.zeros((5, 4, 4), np.uint8), s.lesions_dir / "p1.nii.gz")
    with pytest.raises(DomgenError, match=r"p1 mixes 2 DICOM series.*one axial CT series"):
        read_all(s)


def test_dicom_corrupt_and_truncated_files(tmp_path):
    s = spec(tmp_path, "dicom")
    independent_series(s, "p1")
    save_nifti(np.zeros((5, 4, 3), np.uint8), s.lesions_dir / "p1.nii.gz")
    assert read_all(s)[0].n_slices == 3
    victim = s.images_dir / "p1" / "a.dcm"
    data = victim.read_bytes()
    victim.write_bytes(data[:-15])  # pixel data cut short
    with pytest.raises(DomgenError, match=r"a\.dcm"):
        read_all(s)
    victim.write_bytes(b"\x00" * 50)
    with pytest.raises(DomgenError, match=r"cannot read DICOM file .*a\.dcm"):
        read_all(s)


def test_dicom_missing_rescale_tags(tmp_path):
    s = spec(tmp_path, "dicom")
    series = generate_uid()
    pixels = np.full((4, 5), -1000, np.int16)
    for k in range(2):
        ct_slice(s.images_dir / "p1" / f"{k}.dcm", pixels, float(k), k + 1, series, signed=True, rescale=False)
    save_nifti(np.zeros((5, 4, 2), np.uint8), s.lesions_dir / "p1.nii.gz")
    assert read_all(s)[0].image.min() == -1000  # signed values are already HU
    for k in range(2):
        ct_slice(s.images_dir / "p1" / f"{k}.dcm", np.full((4, 5), 24, np.uint16), float(k), k + 1, series,
                 rescale=False)
    with pytest.raises(DomgenError, match=r"0\.dcm has no RescaleSlope/RescaleIntercept"):
        read_all(s)


def test_dicom_folder_without_files_and_size_mismatch(tmp_path):
    s = spec(tmp_path, "dicom")
    (s.images_dir / "p1").mkdir(parents=True)
    save_nifti(np.zeros((5, 4, 2), np.uint8), s.lesions_dir / "p1.nii.gz")
    with pytest.raises(DomgenError, match=r"no DICOM files found in .*p1"):
        read_all(s)
    series = generate_uid()
    ct_slice(s.images_dir / "p1" / "0.dcm", np.zeros((4, 5), np.uint16), 0.0, 1, series)
    ct_slice(s.images_dir / "p1" / "1.dcm", np.zeros((6, 5), np.uint16), 1.0, 2, series)
    with pytest.raises(DomgenError, match=r"1\.dcm is 6x5"):
        read_all(s)


# --------------------------------------------------------------------------------------------- slices


def test_pil_slices_non_square_binary_masks_and_numeric_order(tmp_path):
    s = spec(tmp_path, "slices", lungs="lungs", lesion_labels={1: "lesion"}, spacing=(0.75, 0.75),
             patient_id=SLICE_ID, intensity=IntensitySpace("windowed"))
    h, w = 37, 53
    for number in (10, 2, 1):
        image = np.full((h, w), number, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[number, : number + 1] = 255
        suffix = ".jpg" if number == 2 else ".png"
        if suffix == ".jpg":
            Image.fromarray(image).convert("RGB").save(s.images_dir / f"pat-A_{number}.jpg", quality=100)
        else:
            save_png(image, s.images_dir / f"pat-A_{number}.png")
        save_png(mask, s.lesions_dir / f"pat-A_{number}.png")
        save_png(np.full((h, w), 255, np.uint8), s.lungs_dir / f"pat-A_{number}.png")
    save_png(np.zeros((20, 20), np.uint8), s.images_dir / "other_1.png")
    save_png(np.zeros((20, 20), np.uint8), s.lesions_dir / "other_1.png")
    save_png(np.zeros((20, 20), np.uint8), s.lungs_dir / "other_1.png")

    other, case = read_all(s)
    assert (other.patient_id, case.patient_id) == ("other", "pat-A")
    assert case.image.shape == (3, 37, 53)
    assert list(case.slice_index) == [1, 2, 10]  # numeric, not "1", "10", "2"
    assert [int(case.image[k, 5, 5]) for k in range(3)] == [1, 2, 10]
    assert set(np.unique(case.lesion)) == {0, 1}
    assert [int(case.lesion[k].sum()) for k in range(3)] == [2, 3, 11]
    assert case.lesion[2, 10, 10] == 1 and case.lung.min() == 1
    assert case.spacing == (0.75, 0.75) and case.intensity.kind == "windowed"
    assert case.slice_ids()[0] == "D/pat-A/0001"


def test_slices_round_trip_windowed_and_class_indices(tmp_path):
    case = small_case("p1", h=37, w=53)
    case.image = np.clip(np.round((case.image + 1350) / 1500 * 255), 0, 255).astype(np.float32)
    case.intensity = WINDOW
    case.slice_index = np.array([3, 4, 5, 6, 7])
    s = spec(tmp_path, "slices", lungs="lungs", intensity=WINDOW, patient_id=SLICE_ID)
    WRITERS["slices"](case, s)
    assert no_temp_files(s.root)
    assert sorted(p.name for p in s.images_dir.iterdir())[0] == "p1_0003.png"
    stored = np.array(Image.open(s.lesions_dir / "p1_0004.png"))
    assert stored.dtype == np.uint8 and stored.max() == 1  # class indices, not 0/255 (two classes)
    (back,) = read_all(s)
    np.testing.assert_array_equal(back.image, case.image)
    np.testing.assert_array_equal(back.lesion, case.lesion)
    np.testing.assert_array_equal(back.lung, case.lung)
    assert list(back.slice_index) == [3, 4, 5, 6, 7]


def test_slices_binary_mask_written_0_255_when_auto(tmp_path):
    case = small_case("p1")
    case.image = np.full(case.image.shape, 100.0, np.float32)
    case.lesion = (case.lesion > 0).astype(np.uint8)
    s = spec(tmp_path, "slices", lesion_labels={1: "lesion"})
    WRITERS["slices"](case, s)
    assert set(np.unique(np.array(Image.open(s.lesions_dir / "p1_0001.png")))) == {0, 255}
    np.testing.assert_array_equal(read_all(s)[0].lesion, case.lesion)


def test_slice_writer_refuses_unwindowed_hu(tmp_path):
    with pytest.raises(DomgenError, match="window"):
        WRITERS["slices"](small_case("p1"), spec(tmp_path, "slices"))


@pytest.fixture
def slice_pair(tmp_path):
    s = spec(tmp_path, "slices", patient_id=SLICE_ID)
    for k in (0, 1):
        save_png(np.zeros((6, 7), np.uint8), s.images_dir / f"p_{k}.png")
        save_png(np.zeros((6, 7), np.uint8), s.lesions_dir / f"p_{k}.png")
    return s


def test_slices_of_different_sizes_keep_their_own_size(slice_pair):
    lesion = np.zeros((6, 8), np.uint8)
    lesion[2:4, 3:6] = 255
    save_png(np.full((6, 8), 90, np.uint8), slice_pair.images_dir / "p_1.png")
    save_png(lesion, slice_pair.lesions_dir / "p_1.png")
    [case] = read_all(slice_pair)
    assert case.ragged and case.slice_shapes() == [(6, 7), (6, 8)]
    assert case.image[1].shape == (6, 8) and int(case.lesion[1].sum()) == 6
    one = case.single_slice(1)
    assert one.image.shape == (1, 6, 8) and one.slice_index.tolist() == [1]


def test_resize_to_brings_every_slice_to_the_working_matrix(slice_pair):
    from domgen.data.registry import load_cases

    save_png(np.zeros((12, 14), np.uint8), slice_pair.images_dir / "p_1.png")
    lesion = np.zeros((12, 14), np.uint8)
    lesion[:6] = 1
    save_png(lesion, slice_pair.lesions_dir / "p_1.png")
    slice_pair.resize_to = (6, 7)
    [case] = load_cases(slice_pair)
    assert not case.ragged and case.image.shape == (2, 6, 7)
    # nearest-neighbour masks: the top half of the 12x14 slice is the top 3 rows at 6x7
    assert case.lesion[1].sum() == 21 and case.lesion[1][:3].all()
    # spacing follows the resize of the first slice (6x7 -> 6x7: unchanged)
    assert case.spacing == (1.0, 1.0)


def test_soft_and_jpeg_masks_need_mask_threshold(slice_pair):
    soft = np.tile(np.linspace(0, 255, 7).astype(np.uint8), (6, 1))
    save_png(soft, slice_pair.lesions_dir / "p_1.png")
    slice_pair.lesion_labels = {1: "lesion"}
    with pytest.raises(DomgenError, match=r"p_1\.png holds value.*mask_threshold: 127"):
        read_all(slice_pair)
    slice_pair.mask_threshold = 127.0
    [case] = read_all(slice_pair)
    # value > 127 is lesion: 170, 212, 255 (the last three columns)
    assert case.lesion[1].tolist() == [[0, 0, 0, 0, 1, 1, 1]] * 6
    assert case.notes["mask_values"] == 7 and case.notes["mask_threshold"] == 127.0
    # JPEG masks: accepted with the threshold, lossy values binarised
    (slice_pair.lesions_dir / "p_1.png").unlink()
    Image.fromarray(np.where(soft > 127, 255, 0).astype(np.uint8)).save(slice_pair.lesions_dir / "p_1.jpg", quality=70)
    [case] = read_all(slice_pair)
    assert case.lesion[1][:, :4].sum() <= 2 and case.lesion[1][:, 4:].sum() >= 16


def test_truncated_png_names_the_file(slice_pair):
    path = slice_pair.images_dir / "p_1.png"
    save_png(np.random.default_rng(0).integers(0, 255, (40, 40)), path)
    save_png(np.zeros((40, 40), np.uint8), slice_pair.lesions_dir / "p_1.png")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DomgenError, match=r"images/p_1\.png"):
        read_all(slice_pair)


def test_png_mask_bad_values_and_size(slice_pair):
    mask = np.zeros((6, 7), np.uint8)
    mask[0, 0] = 128
    save_png(mask, slice_pair.lesions_dir / "p_0.png")
    with pytest.raises(DomgenError, match=r"p_0\.png holds value\(s\) 128"):
        read_all(slice_pair)
    save_png(np.zeros((7, 6), np.uint8), slice_pair.lesions_dir / "p_0.png")
    with pytest.raises(DomgenError, match=r"masks/p_0\.png has shape"):
        read_all(slice_pair)


def test_slice_image_without_mask_and_jpeg_mask(slice_pair):
    (slice_pair.lesions_dir / "p_1.png").unlink()
    with pytest.raises(DomgenError, match=r"p_1\.png has no lesion mask"):
        read_all(slice_pair)
    Image.fromarray(np.zeros((6, 7), np.uint8)).save(slice_pair.lesions_dir / "p_1.jpg")
    with pytest.raises(DomgenError, match=r"p_1\.jpg is a JPEG.*mask_threshold"):
        read_all(slice_pair)
