"""Suite files (dataset registry), load_cases and the dataset check."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from domgen.data.case import Case
from domgen.data.check import check_dataset, format_check
from domgen.data.readers import WRITERS
from domgen.data.registry import DEFAULT_PATIENT_ID, load_cases, load_suite
from domgen.errors import DomgenError

SUITE = """
name: test-suite
datasets:
  A:
    format: nifti
    root: A
    images: imagesTr
    lesions: labelsTr
    lungs: lungsTr
    intensity: hu
    lesion_labels: {1: ground_glass, 2: consolidation}
    lesion_kind: covid
  B:
    format: slices
    root: data/B
    intensity: {kind: windowed, level: -600, width: 1500}
    spacing: [0.8, 0.7]
    description: PNG slices
  C:
    format: dicom
    root: /abs/C
    intensity: windowed
    patient_id: '^(?P<patient>LUNG1-\\d+)$'
    lesion_kind: effusion
    mask_scale: index
"""


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_suite_file_is_parsed_with_defaults_and_relative_roots(tmp_path):
    suite = load_suite(str(write(tmp_path, SUITE)))
    assert suite.name == "test-suite" and suite.names() == ["A", "B", "C"]
    a, b, c = (suite.get(n) for n in "ABC")
    assert a.root == tmp_path / "A" and a.images_dir == tmp_path / "A" / "imagesTr"
    assert a.lungs_dir == tmp_path / "A" / "lungsTr" and a.lesion_labels == {1: "ground_glass", 2: "consolidation"}
    assert a.suite_file == tmp_path / "suite.yaml" and a.patient_id == DEFAULT_PATIENT_ID
    assert b.root == tmp_path / "data" / "B" and (b.images, b.lesions, b.lungs) == ("images", "masks", None)
    assert b.intensity.window_known and (b.intensity.level, b.intensity.width) == (-600.0, 1500.0)
    assert b.spacing == (0.8, 0.7) and b.mask_scale == "auto" and b.lesion_labels == {1: "lesion"}
    assert c.root == Path("/abs/C") and c.intensity.kind == "windowed" and not c.intensity.window_known
    assert c.lesion_kind == "effusion" and c.mask_scale == "index"
    assert c.patient_pattern.match("LUNG1-001").group("patient") == "LUNG1-001"


def test_unknown_dataset_lists_known_names(tmp_path):
    suite = load_suite(write(tmp_path, SUITE))
    with pytest.raises(DomgenError, match="'Z' is not in suite 'test-suite'.*known datasets: A, B, C"):
        suite.get("Z")


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("    format: nifti\n", "", r"dataset 'A' in .*suite\.yaml is missing the required key 'format'"),
        ("    root: data/B\n", "", r"dataset 'B' in .*suite\.yaml is missing the required key 'root'"),
        ("format: dicom", "format: mha", r"unknown format 'mha' \(key 'format'\)"),
        ("(?P<patient>LUNG1-\\d+)", "(?P<id>LUNG1-\\d+)", r"'patient_id' regex needs a named group \(\?P<patient>"),
        ("(?P<patient>LUNG1-\\d+)", "(?P<patient>LUNG1-[)", r"invalid 'patient_id' regex"),
        ("lesion_kind: covid", "lesion_kind: cancer", r"unknown lesion_kind 'cancer'"),
        ("mask_scale: index", "mask_scale: 255", r"unknown mask_scale '255'"),
        ("spacing: [0.8, 0.7]", "spacing: [0.8]", r"'spacing' must be \[row_mm, col_mm\]"),
        ("description: PNG slices", "descripton: PNG slices", r"unknown key\(s\) descripton"),
        ("{kind: windowed, level: -600, width: 1500}", "{kind: windowed, level: -600}", "both level and width"),
        ("{1: ground_glass, 2: consolidation}", "{0: background}", r"'lesion_labels' key 0"),
    ],
)
def test_suite_errors_name_the_file_and_key(tmp_path, old, new, message):
    assert old in SUITE
    path = write(tmp_path, SUITE.replace(old, new))
    with pytest.raises(DomgenError, match=message) as raised:
        load_suite(path)
    assert str(path) in str(raised.value)


def test_missing_and_malformed_suite_files(tmp_path):
    with pytest.raises(DomgenError, match=r"suite file .*nope\.yaml does not exist"):
        load_suite(str(tmp_path / "nope.yaml"))
    broken = write(tmp_path, "name: x\ndatasets:\n  A: {format: nifti, root: [\n")
    with pytest.raises(DomgenError, match=r"suite\.yaml is not valid YAML at line \d+"):
        load_suite(broken)
    with pytest.raises(DomgenError, match="needs a 'datasets:' mapping"):
        load_suite(write(tmp_path, "name: x\n", "empty.yaml"))


def test_synthetic_means_the_generated_suite(tmp_path, monkeypatch):
    """The real generator (no stand-in): ``synthetic`` writes the default suite under $DOMGEN_DATA once, then reuses it."""
    monkeypatch.setenv("DOMGEN_DATA", str(tmp_path))
    suite = load_suite("synthetic")
    assert suite.path == (tmp_path / "synthetic" / "suite.yaml").resolve()
    assert suite.names() == ["A", "B", "C", "D", "tumour", "effusion"]
    assert (tmp_path / "synthetic" / "generator.json").is_file()
    written = (tmp_path / "synthetic" / "generator.json").stat().st_mtime_ns
    assert load_suite("synthetic").path == suite.path
    assert (tmp_path / "synthetic" / "generator.json").stat().st_mtime_ns == written  # current: not generated again


def make_case(pid: str, z: int, lesion_slices: list[int], cls: int = 1) -> Case:
    image = np.full((z, 8, 6), -800.0, np.float32)
    image[0, 0, 0] = 150.0
    lesion = np.zeros((z, 8, 6), np.uint8)
    for k in lesion_slices:
        lesion[k, 2:4, 1:3] = cls  # 4 voxels
    lung = np.ones((z, 8, 6), np.uint8)
    return Case(pid, "A", image, lesion, spacing=(0.5, 0.5), lung=lung)


def test_load_cases_and_check_dataset_counts(tmp_path):
    suite = load_suite(write(tmp_path, SUITE))
    spec = suite.get("A")
    WRITERS["nifti"](make_case("p2", 4, [0, 1, 3], cls=2), spec)
    WRITERS["nifti"](make_case("p1", 3, [1]), spec)
    cases = load_cases(spec, progress=True)
    assert [c.patient_id for c in cases] == ["p1", "p2"] and [c.n_slices for c in cases] == [3, 4]
    assert [c.patient_id for c in load_cases(spec, patient_ids=["p2"])] == ["p2"]
    with pytest.raises(DomgenError, match="p9 not found"):
        load_cases(spec, patient_ids=["p9", "p1"])

    summary = check_dataset(spec)
    assert summary["patients"] == 2 and summary["patient_ids"] == ["p1", "p2"]
    assert summary["slices"] == 7 and summary["infected_slices"] == 4
    assert summary["slice_sizes"] == {(8, 6)}
    assert (summary["intensity_min"], summary["intensity_max"]) == (-800.0, 150.0)
    assert summary["lesion_voxels"] == {"ground_glass": 4, "consolidation": 12}
    assert summary["lesion_slices"] == {"ground_glass": 1, "consolidation": 3}
    assert summary["lung_masks"] == 2
    text = format_check(summary)
    assert "7 (4 with lesions, 57%)" in text and "8x6" in text and "consolidation: 12 voxels" in text


def test_check_dataset_stops_at_first_broken_file(tmp_path):
    spec = load_suite(write(tmp_path, SUITE)).get("A")
    WRITERS["nifti"](make_case("p1", 3, [1]), spec)
    WRITERS["nifti"](make_case("p2", 3, [1]), spec)
    bad = spec.lesions_dir / "p2.nii.gz"
    mask = np.zeros((6, 8, 3), np.uint8)
    mask[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(bad))
    with pytest.raises(DomgenError, match=r"labelsTr/p2\.nii\.gz holds value\(s\) 5"):
        check_dataset(spec)
