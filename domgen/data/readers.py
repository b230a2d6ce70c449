"""Readers and writers for the three on-disk layouts of a suite (each dataset's entry: ``data_cards/README.md``).

- ``nifti``:  ``root/<images>/<stem>.nii[.gz]`` + ``root/<lesions>/<stem>.nii[.gz]`` (+ lungs).
- ``dicom``:  ``root/<images>/<patient folder>/*.dcm`` (one CT series) + ``root/<lesions>/<folder>.nii.gz``.
- ``slices``: ``root/<images>/<stem>.png|jpg`` + ``root/<lesions>/<stem>.png`` (+ lungs), 8-bit; slices of one
  patient may differ in size; with ``mask_threshold`` masks may be soft (0..255) or JPEG.

NIfTI arrays are (X, Y, Z); a :class:`Case` holds (Z, Y, X) so a slice's rows are Y and columns X, and
its in-plane spacing is (zooms[1], zooms[0]). Every problem with the files is a :class:`DomgenError`
naming the file. Writers put each file (or a DICOM series folder) under a temporary name first and
``os.replace`` it into place, so a crash never leaves a half-written case.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from domgen.data.case import Case
from domgen.errors import DomgenError

if TYPE_CHECKING:
    from domgen.data.spec import DatasetSpec

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIX = ".png"
DICOM_SUFFIX = ".dcm"
# NIfTI has no "unknown" voxel size: a case whose slice spacing is unknown (unrelated 2D slices) is written
# with this placeholder z size and UNKNOWN_SLICE_SPACING in the header's descrip, which the reader honours.
PLACEHOLDER_SLICE_SPACING_MM = 1.0
UNKNOWN_SLICE_SPACING = "domgen: slice spacing unknown"
# NIfTI xyzt_units -> millimetres ("unknown" is read as mm, the usual convention).
_MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
# Stored DICOM value = HU - intercept; -1024 is the usual CT intercept, keeping air near 0.
WRITTEN_RESCALE_INTERCEPT = -1024.0


@dataclass
class SliceFiles:
    number: int | None
    stem: str
    image: Path
    lesion: Path
    lung: Path | None = None


@dataclass
class PatientFiles:
    """The files of one patient: a NIfTI file, a DICOM series folder, or a list of PNG slices."""

    patient_id: str
    image: Path
    lesion: Path | None = None
    lung: Path | None = None
    slices: list[SliceFiles] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Finding the files of each patient


def _strip_suffix(name: str, suffixes: Iterable[str]) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def _listed(folder: Path) -> list[Path]:
    # Hidden names are skipped: the writers' temporary files start with a dot.
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _require_folder(spec: DatasetSpec, folder: Path, key: str, what: str) -> None:
    if not folder.is_dir():
        raise DomgenError(
            f"no {what} found in {folder} (folder missing); check 'root'/'{key}' in {spec.where}"
        )


def _files_by_stem(folder: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in _listed(folder):
        split = _strip_suffix(path.name, suffixes)
        if split is None or not path.is_file():
            continue
        stem = split[0]
        if stem in found:
            raise DomgenError(f"{path} and {found[stem]} have the same name stem; keep only one of them")
        found[stem] = path
    return found


def _match_patient(spec: DatasetSpec, name: str, path: Path) -> re.Match[str]:
    match = spec.patient_pattern.search(name)
    if match is None or not match.group("patient"):
        raise DomgenError(
            f"{path} does not match the patient_id regex {spec.patient_id!r}; rename the file or fix "
            f"'patient_id' in {spec.where}"
        )
    return match


def _pair_masks(
    spec: DatasetSpec, images: dict[str, Path], folder: Path, key: str, suffixes: Iterable[str], what: str
) -> dict[str, Path]:
    """The mask file for each image stem; an image without a mask, or a mask without an image, is an error."""
    _require_folder(spec, folder, key, what)
    masks = _files_by_stem(folder, suffixes)
    for stem, image in images.items():
        if stem not in masks:
            raise DomgenError(
                f"image {image} has no {what} file (expected {folder / stem}{next(iter(suffixes))}); "
                f"add the mask or remove the image"
            )
    for stem, mask in masks.items():
        if stem not in images:
            raise DomgenError(f"{what} file {mask} has no matching image in {spec.images_dir}; add the image or remove the mask")
    return masks


def _find_nifti(spec: DatasetSpec) -> dict[str, PatientFiles]:
    _require_folder(spec, spec.images_dir, "images", "images")
    return _pair_volumes(spec, _files_by_stem(spec.images_dir, NIFTI_SUFFIXES), "one NIfTI file")


def _find_dicom(spec: DatasetSpec) -> dict[str, PatientFiles]:
    _require_folder(spec, spec.images_dir, "images", "images")
    return _pair_volumes(spec, {p.name: p for p in _listed(spec.images_dir) if p.is_dir()}, "one series folder")


def _pair_volumes(spec: DatasetSpec, images: dict[str, Path], unit: str) -> dict[str, PatientFiles]:
    """Pair each image volume (file or series folder, by name) with its NIfTI masks, one per patient."""
    _require_some(spec, images)
    lesions = _pair_masks(spec, images, spec.lesions_dir, "lesions", NIFTI_SUFFIXES, "lesion mask")
    lungs = None
    if spec.lungs_dir is not None:
        lungs = _pair_masks(spec, images, spec.lungs_dir, "lungs", NIFTI_SUFFIXES, "lung mask")
    patients: dict[str, PatientFiles] = {}
    for name, image in images.items():
        pid = _match_patient(spec, name, image).group("patient")
        if pid in patients:
            raise DomgenError(
                f"{image} and {patients[pid].image} both give patient id '{pid}'; {unit} per "
                f"patient, or fix 'patient_id' in {spec.where}"
            )
        patients[pid] = PatientFiles(pid, image, lesions[name], None if lungs is None else lungs[name])
    return patients


def _find_slices(spec: DatasetSpec) -> dict[str, PatientFiles]:
    _require_folder(spec, spec.images_dir, "images", "images")
    images = _files_by_stem(spec.images_dir, SLICE_IMAGE_SUFFIXES)
    _require_some(spec, images)
    # lossy (JPEG) masks are read only when a mask_threshold says how to binarise them
    mask_suffixes = (MASK_SUFFIX,) if spec.mask_threshold is None else SLICE_IMAGE_SUFFIXES
    _require_png_masks(spec, images, spec.lesions_dir)
    lesions = _pair_masks(spec, images, spec.lesions_dir, "lesions", mask_suffixes, "lesion mask")
    lungs = None
    if spec.lungs_dir is not None:
        _require_png_masks(spec, images, spec.lungs_dir)
        lungs = _pair_masks(spec, images, spec.lungs_dir, "lungs", mask_suffixes, "lung mask")
    patients: dict[str, PatientFiles] = {}
    for stem, image in images.items():
        match = _match_patient(spec, stem, image)
        pid = match.group("patient")
        number = match.groupdict().get("slice")
        entry = SliceFiles(
            None if number is None else int(number), stem, image, lesions[stem], None if lungs is None else lungs[stem]
        )
        patients.setdefault(pid, PatientFiles(pid, spec.images_dir)).slices.append(entry)
    for files in patients.values():
        # Slice order: the number in the name when every slice has one, else the sorted stem.
        numbered = all(s.number is not None for s in files.slices)
        files.slices.sort(key=(lambda s: (s.number, s.stem)) if numbered else (lambda s: s.stem))
        if numbered:
            seen: dict[int, Path] = {}
            for s in files.slices:
                if s.number in seen:
                    raise DomgenError(
                        f"{s.image} and {seen[s.number]} are both slice {s.number} of patient "
                        f"'{files.patient_id}'; remove the duplicate"
                    )
                seen[s.number] = s.image
    return patients


def _require_png_masks(spec: DatasetSpec, images: dict[str, Path], folder: Path) -> None:
    if not folder.is_dir() or spec.mask_threshold is not None:
        return
    lossy = _files_by_stem(folder, (".jpg", ".jpeg"))
    for stem, path in lossy.items():
        if stem in images:
            raise DomgenError(f"mask {path} is a JPEG; convert it to a lossless {stem}.png, or set `mask_threshold: 127` "
                              f"(value > 127 is lesion) in {spec.where} to binarise lossy masks")


def _require_some(spec: DatasetSpec, found: dict[str, Path]) -> None:
    if not found:
        kind = {"nifti": "NIfTI images", "dicom": "DICOM series folders", "slices": "PNG/JPG images"}[spec.format]
        raise DomgenError(
            f"no images found in {spec.images_dir} (looked for {kind}); check 'root'/'images' in {spec.where}"
        )


_FINDERS: dict[str, Callable[[DatasetSpec], dict[str, PatientFiles]]] = {
    "nifti": _find_nifti,
    "dicom": _find_dicom,
    "slices": _find_slices,
}


def find_patients(spec: DatasetSpec) -> dict[str, PatientFiles]:
    """Pair every patient's image with its masks, sorted by patient id (checks names, not contents)."""
    if spec.format not in _FINDERS:
        raise DomgenError(f"unknown format '{spec.format}' in {spec.where}; use one of {', '.join(_FINDERS)}")
    patients = _FINDERS[spec.format](spec)
    return {pid: patients[pid] for pid in sorted(patients)}


def list_patient_ids(spec: DatasetSpec) -> list[str]:
    return list(find_patients(spec))


# --------------------------------------------------------------------------------------------------
# Reading and checking arrays


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float | None]]:
    """The (X, Y, Z) array of a NIfTI file and its voxel size in mm; corrupt or truncated files raise DomgenError.

    The z size is None when the file says it is unknown (a 2-D image, a z size <= 0, or the descrip
    written by domgen for unrelated slices); x and y fall back to 1 mm.
    """
    try:
        img = nib.load(str(path))
        # Forces the decompression now: a truncated .nii.gz only fails when its data are read.
        data = np.asanyarray(img.dataobj)
        unit = _MM_PER_UNIT.get(img.header.get_xyzt_units()[0], 1.0)
        # Rounded: the header stores float32, so 0.7 would come back as 0.699999988.
        zooms = tuple(round(float(z) * unit, 6) for z in img.header.get_zooms()[:3])
        descrip = img.header["descrip"].item().decode("latin-1", "replace").strip() if "descrip" in img.header else ""
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise DomgenError(
            f"cannot read NIfTI file {path} ({_reason(exc)}); the file is corrupt or truncated, "
            f"re-download or re-export it"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    z_known = data.ndim >= 3 and len(zooms) >= 3 and zooms[2] > 0 and descrip != UNKNOWN_SLICE_SPACING
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DomgenError(f"NIfTI file {path} has shape {data.shape}; expected a 3-D volume (X, Y, Z)")
    x, y = (tuple(z if z > 0 else 1.0 for z in zooms[:2]) + (1.0, 1.0))[:2]
    return data, (x, y, zooms[2] if z_known else None)


def _to_zyx(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def _finite_image(data: np.ndarray, path: Path) -> np.ndarray:
    image = np.asarray(data, dtype=np.float32)
    if not np.isfinite(image).all():
        count = int(image.size - np.isfinite(image).sum())
        raise DomgenError(f"{path} contains {count} NaN or infinite voxel(s); fix or re-export the image")
    return image


def _integer_values(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a mask and the values rounded to integers."""
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return np.unique(data), data
    return np.unique(data), np.rint(data)


def lesion_mask(data: np.ndarray, path: Path, spec: DatasetSpec) -> np.ndarray:
    """A lesion mask as uint8 class values, checked against ``{0} | lesion_labels``; ``ignore_labels`` become 0."""
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DomgenError(f"lesion mask {path} contains NaN or infinite values; fix or re-export the mask")
    if spec.mask_threshold is not None:
        # a soft or lossy mask: binarise; ignore_labels cannot be told apart from lesion after a threshold
        return (np.asarray(data) > spec.mask_threshold).astype(np.uint8) * np.uint8(min(spec.lesion_labels))
    values, rounded = _integer_values(data)
    if spec.ignore_labels:
        rounded = np.where(np.isin(rounded, spec.ignore_labels), 0, rounded)
        values = np.setdiff1d(values, spec.ignore_labels)
    allowed = {0, *spec.lesion_labels}
    bad = [v for v in values.tolist() if float(v) != round(float(v)) or int(round(float(v))) not in allowed]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        soft = len(values) > len(allowed) + 2
        raise DomgenError(
            f"lesion mask {path} holds value(s) {shown} outside the allowed {sorted(allowed)}; fix the mask "
            f"or 'lesion_labels' in {spec.where}"
            + ("; if it is a soft mask (a probability map) set `mask_threshold: 127` there (value > 127 is lesion)" if soft else "")
        )
    return rounded.astype(np.uint8)


def lung_mask(data: np.ndarray, path: Path, threshold: float | None = None) -> np.ndarray:
    """A binary lung mask; left/right lung labels (lungmask's 1/2) are merged; ``threshold`` binarises soft masks."""
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DomgenError(f"lung mask {path} contains NaN or infinite values; fix or re-export the mask")
    return (np.asarray(data) > (0 if threshold is None else threshold)).astype(np.uint8)


def _mask_notes(spec: DatasetSpec, raw_values: set) -> dict:
    """What `data check` reports about a case's masks: how many distinct raw values, and the threshold applied."""
    return {"mask_values": len(raw_values), "mask_threshold": spec.mask_threshold}


def _same_shape(image: np.ndarray, image_path: Path, mask: np.ndarray, mask_path: Path) -> None:
    if image.shape != mask.shape:
        raise DomgenError(
            f"mask {mask_path} has shape {mask.shape} but image {image_path} has {image.shape} "
            f"({'slices, rows, columns' if image.ndim == 3 else 'rows, columns'}); the mask must be drawn on this image"
        )


def _spacing(spec: DatasetSpec, found: tuple[float, float]) -> tuple[float, float]:
    return tuple(spec.spacing) if spec.spacing is not None else found  # type: ignore[return-value]


def _masks_from_nifti(
    spec: DatasetSpec, files: PatientFiles, image: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    assert files.lesion is not None
    lesion_data, _ = load_nifti(files.lesion)
    # distinct raw values, for `data check` (a soft mask has many); a sample keeps this cheap on big volumes
    raw_values = set(np.unique(np.asarray(lesion_data).ravel()[:: max(1, np.asarray(lesion_data).size // 2_000_000)]).tolist())
    lesion = _to_zyx(lesion_mask(lesion_data, files.lesion, spec))
    _same_shape(image, files.image, lesion, files.lesion)
    lung = None
    if files.lung is not None:
        lung_data, _ = load_nifti(files.lung)
        lung = _to_zyx(lung_mask(lung_data, files.lung, spec.mask_threshold))
        _same_shape(image, files.image, lung, files.lung)
    return lesion, lung, _mask_notes(spec, raw_values)


def _source_files(files: PatientFiles) -> tuple[str, ...]:
    return tuple(str(p) for p in (files.image, files.lesion, files.lung) if p is not None)


def read_nifti_case(spec: DatasetSpec, files: PatientFiles) -> Case:
    data, zooms = load_nifti(files.image)
    image = _to_zyx(_finite_image(data, files.image))
    lesion, lung, notes = _masks_from_nifti(spec, files, image)
    return Case(
        patient_id=files.patient_id,
        dataset=spec.name,
        image=image,
        lesion=lesion,
        spacing=_spacing(spec, (zooms[1], zooms[0])),
        slice_spacing=zooms[2],
        intensity=spec.intensity,
        lung=lung,
        lesion_classes=dict(spec.lesion_labels),
        source_files=_source_files(files),
        notes=notes,
    )


# ---- DICOM


def _dicom_files(folder: Path) -> list[Path]:
    files = [p for p in _listed(folder) if p.is_file() and p.name.upper() != "DICOMDIR"]
    tagged = [p for p in files if p.suffix.lower() == DICOM_SUFFIX]
    # Many scanners write DICOM files without an extension; use every file when none ends in .dcm.
    return tagged or files


def _read_dicom_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error...)
        raise DomgenError(
            f"cannot read DICOM file {path} ({_reason(exc)}); the file is corrupt, truncated or not DICOM, "
            f"remove or replace it"
        ) from None


def _slice_position(ds: pydicom.Dataset) -> tuple[float, int]:
    position = ds.get("ImagePositionPatient")
    z = float(position[2]) if position is not None and len(position) == 3 else 0.0
    return (z, int(ds.get("InstanceNumber") or 0))


def _hounsfield(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise DomgenError(f"{path} is a multi-frame DICOM; convert the series to NIfTI (e.g. with dcm2niix)")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # missing/short PixelData or an undecodable compression, many exception types
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DomgenError(
            f"cannot decode the pixels of DICOM file {path} ({_reason(exc)}; transfer syntax "
            f"{getattr(syntax, 'name', syntax)}); the file is truncated or compressed in a way pydicom cannot "
            f"decode, replace it or decompress the series (e.g. gdcmconv --raw)"
        ) from None
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        # Without the tags a signed image is taken as already in HU; unsigned values are ambiguous.
        if stored.min() >= 0:
            raise DomgenError(
                f"DICOM file {path} has no RescaleSlope/RescaleIntercept and only non-negative stored "
                f"values, so its HU cannot be known; add the tags (CT usually uses slope 1, intercept -1024)"
            )
        return stored.astype(np.float32)
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    return (stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _dicom_slice_spacing(headers: list[tuple[Path, pydicom.Dataset]]) -> float | None:
    """Distance between slice centres: the median step of ImagePositionPatient along the slice normal;
    for one slice SpacingBetweenSlices (else SliceThickness); None when the series does not say."""
    positions = [ds.get("ImagePositionPatient") for _, ds in headers]
    if len(headers) > 1:
        if any(p is None or len(p) != 3 for p in positions):
            return None
        orientation = headers[0][1].get("ImageOrientationPatient")
        normal = (np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
                  if orientation is not None and len(orientation) == 6 else np.array([0.0, 0.0, 1.0]))
        along = np.sort(np.asarray(positions, dtype=float) @ normal)
        step = float(np.median(np.diff(along)))
        return round(step, 6) if step > 0 else None
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        value = headers[0][1].get(tag)
        if value is not None and float(value) > 0:
            return round(float(value), 6)
    return None


def read_dicom_series(
    folder: Path, spec: DatasetSpec | None = None
) -> tuple[np.ndarray, tuple[float, float], list[Path], float | None]:
    """One CT series as HU (Z, rows, cols) sorted by ImagePositionPatient z then InstanceNumber, its pixel
    spacing, files and slice spacing (None when unknown, see ``_dicom_slice_spacing``)."""
    files = _dicom_files(folder)
    if not files:
        raise DomgenError(f"no DICOM files found in {folder}; put one CT series (*.dcm) in each patient folder")
    headers = [(path, _read_dicom_header(path)) for path in files]
    for path, ds in headers:
        if "PixelData" not in ds:
            raise DomgenError(f"DICOM file {path} holds no image (no PixelData); move it out of {folder}")
    series: dict[str, list[Path]] = {}
    for path, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid or '(no SeriesInstanceUID)'}: {len(paths)} file(s) e.g. {paths[0].name}"
            for uid, paths in series.items()
        )
        raise DomgenError(
            f"{folder} mixes {len(series)} DICOM series ({listing}); keep one axial CT series per patient folder"
        )
    headers.sort(key=lambda item: (_slice_position(item[1]), item[0].name))
    first_path, first = headers[0]
    shape = (int(first.Rows), int(first.Columns))
    slices = []
    for path, ds in headers:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DomgenError(
                f"DICOM file {path} is {ds.Rows}x{ds.Columns} but {first_path.name} is {shape[0]}x{shape[1]}; "
                f"a patient folder must hold one series of equal-sized slices"
            )
        slices.append(_hounsfield(ds, path))
    pixel_spacing = first.get("PixelSpacing")
    if pixel_spacing is not None and len(pixel_spacing) == 2:
        spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    elif spec is not None and spec.spacing is not None:
        spacing = tuple(spec.spacing)
    else:
        where = spec.where if spec is not None else "the suite file"
        raise DomgenError(f"DICOM file {first_path} has no PixelSpacing; add the tag or set 'spacing' in {where}")
    return np.stack(slices), spacing, [path for path, _ in headers], _dicom_slice_spacing(headers)  # type: ignore[return-value]


def read_dicom_case(spec: DatasetSpec, files: PatientFiles) -> Case:
    image, spacing, paths, slice_spacing = read_dicom_series(files.image, spec)
    lesion, lung, notes = _masks_from_nifti(spec, files, image)
    return Case(
        patient_id=files.patient_id,
        dataset=spec.name,
        image=image,
        lesion=lesion,
        spacing=_spacing(spec, spacing),
        slice_spacing=slice_spacing,
        intensity=spec.intensity,
        lung=lung,
        lesion_classes=dict(spec.lesion_labels),
        source_files=tuple(str(p) for p in paths) + _source_files(files)[1:],
        notes=notes,
    )


# ---- slices


def _read_picture(path: Path, is_mask: bool) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F") or (is_mask and picture.mode == "P"):
                # Palette masks keep their indices (class values), not their colours.
                return np.array(picture)
            if picture.mode == "1":
                return np.array(picture).astype(np.uint8) * (1 if is_mask else 255)
            return np.array(picture.convert("L"))
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as exc:
        raise DomgenError(
            f"cannot read image file {path} ({_reason(exc)}); the file is corrupt or truncated, re-export it"
        ) from None


def _slice_lesion(data: np.ndarray, path: Path, spec: DatasetSpec) -> np.ndarray:
    if spec.mask_scale == "auto" and spec.mask_threshold is None:
        values = np.unique(data)
        # A {0, 255} picture is a binary mask saved for viewing, not class 255.
        if values.size and values.max() == 255 and set(values.tolist()) <= {0, 255}:
            data = (data > 0).astype(np.uint8)
    return lesion_mask(data, path, spec)


def read_slice_case(spec: DatasetSpec, files: PatientFiles) -> Case:
    """One patient of a ``slices`` dataset. Slices may differ in size (collections cropped slice by slice):
    then the case keeps a list of slices (``Case.ragged``) instead of one stacked volume."""
    images, lesions, lungs = [], [], []
    raw_values: set = set()
    for s in files.slices:
        image = _finite_image(_read_picture(s.image, is_mask=False), s.image)
        if image.ndim != 2:
            raise DomgenError(f"{s.image} has shape {image.shape}; expected a single-channel 2-D slice")
        raw = _read_picture(s.lesion, is_mask=True)
        raw_values.update(np.unique(raw).tolist())
        lesion = _slice_lesion(raw, s.lesion, spec)
        _same_shape(image, s.image, lesion, s.lesion)
        images.append(image)
        lesions.append(lesion)
        if s.lung is not None:
            lung = lung_mask(_read_picture(s.lung, is_mask=True), s.lung, spec.mask_threshold)
            _same_shape(image, s.image, lung, s.lung)
            lungs.append(lung)
    numbered = all(s.number is not None for s in files.slices)
    slice_index = np.array([s.number for s in files.slices]) if numbered else np.arange(len(files.slices))
    sources = [str(p) for s in files.slices for p in (s.image, s.lesion, s.lung) if p is not None]
    one_size = len({a.shape for a in images}) == 1
    stack = np.stack if one_size else list
    return Case(
        patient_id=files.patient_id,
        dataset=spec.name,
        image=stack(images),
        lesion=stack(lesions),
        spacing=_spacing(spec, (1.0, 1.0)),
        intensity=spec.intensity,
        lung=stack(lungs) if lungs else None,
        slice_index=slice_index,
        lesion_classes=dict(spec.lesion_labels),
        source_files=tuple(sources),
        notes=_mask_notes(spec, raw_values),
    )


def resize_case(case: Case, size: tuple[int, int]) -> Case:
    """The case at the working matrix ``size`` (suite key ``resize_to``): images bilinear with anti-aliasing, masks
    nearest neighbour, in-plane spacing scaled so physical distances (NSD, HD95) stay true."""
    from skimage.transform import resize

    rows, cols = int(size[0]), int(size[1])

    def image_slice(a):
        return resize(np.asarray(a, dtype=np.float32), (rows, cols), order=1, mode="edge", anti_aliasing=True,
                      preserve_range=True).astype(np.float32)

    def mask_slice(a):
        return np.rint(resize(a, (rows, cols), order=0, mode="edge", anti_aliasing=False, preserve_range=True)).astype(a.dtype)

    shapes = case.slice_shapes()
    image = np.stack([image_slice(a) for a in case.image]) if shapes else np.zeros((0, rows, cols), np.float32)
    lesion = np.stack([mask_slice(np.asarray(a)) for a in case.lesion]) if shapes else np.zeros((0, rows, cols), np.uint8)
    lung = None if case.lung is None else np.stack([mask_slice(np.asarray(a)) for a in case.lung])
    # per-slice sizes may differ; the spacing of the first slice is scaled (all slices of a case share one spacing)
    h, w = shapes[0] if shapes else (rows, cols)
    spacing = (case.spacing[0] * h / rows, case.spacing[1] * w / cols)
    return Case(case.patient_id, case.dataset, image, lesion, spacing, case.slice_spacing, case.intensity, lung,
                case.slice_index, dict(case.lesion_classes), case.source_files, {**case.notes, "resized_from": sorted(set(shapes))})


# ---- datasets

_CASE_READERS: dict[str, Callable[[DatasetSpec, PatientFiles], Case]] = {
    "nifti": read_nifti_case,
    "dicom": read_dicom_case,
    "slices": read_slice_case,
}


def _read_dataset(spec: DatasetSpec, patient_ids: Iterable[str] | None) -> Iterator[Case]:
    patients = find_patients(spec)
    wanted = list(patients) if patient_ids is None else sorted(set(patient_ids))
    for pid in wanted:
        if pid not in patients:
            raise DomgenError(f"patient '{pid}' not found in {spec.where}; known ids start with {list(patients)[:5]}")
        yield _CASE_READERS[spec.format](spec, patients[pid])


def read_nifti_dataset(spec: DatasetSpec, patient_ids: Iterable[str] | None = None) -> Iterator[Case]:
    """One Case per patient of a ``nifti`` dataset, sorted by patient id."""
    return _read_dataset(spec, patient_ids)


def read_dicom_dataset(spec: DatasetSpec, patient_ids: Iterable[str] | None = None) -> Iterator[Case]:
    """One Case per patient of a ``dicom`` dataset, sorted by patient id."""
    return _read_dataset(spec, patient_ids)


def read_slice_dataset(spec: DatasetSpec, patient_ids: Iterable[str] | None = None) -> Iterator[Case]:
    """One Case per patient of a ``slices`` dataset, sorted by patient id."""
    return _read_dataset(spec, patient_ids)


def read_case_files(spec: DatasetSpec, stem_or_folder: str) -> Case:
    """The Case of one patient, named by its patient id, NIfTI stem or DICOM folder name."""
    patients = find_patients(spec)
    if stem_or_folder not in patients:
        match = spec.patient_pattern.search(stem_or_folder)
        stem_or_folder = match.group("patient") if match else stem_or_folder
    if stem_or_folder not in patients:
        raise DomgenError(f"no patient '{stem_or_folder}' in {spec.where}; check the name")
    return _CASE_READERS[spec.format](spec, patients[stem_or_folder])


READERS: dict[str, Callable[..., Iterator[Case]]] = {
    "nifti": read_nifti_dataset,
    "dicom": read_dicom_dataset,
    "slices": read_slice_dataset,
}


# --------------------------------------------------------------------------------------------------
# Writers


def _temporary(path: Path) -> Path:
    # Same folder (so os.replace is atomic) and same suffix (nibabel and PIL pick the format from it).
    return path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")


def _check_writable_id(case: Case, spec: DatasetSpec, name: str) -> None:
    match = spec.patient_pattern.search(name)
    if match is None or match.group("patient") != case.patient_id:
        raise DomgenError(
            f"patient id '{case.patient_id}' written as '{name}' would not read back with the patient_id regex "
            f"{spec.patient_id!r} of {spec.where}; change the id or the regex"
        )


def _nifti_affine(case: Case) -> np.ndarray:
    """diag(col mm, row mm, slice spacing, 1); the placeholder z size when the slice spacing is unknown."""
    row_mm, col_mm = case.spacing
    z_mm = PLACEHOLDER_SLICE_SPACING_MM if case.slice_spacing is None else float(case.slice_spacing)
    return np.diag([float(col_mm), float(row_mm), z_mm, 1.0])


def _save_nifti(volume_zyx: np.ndarray, affine: np.ndarray, path: Path, z_known: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.transpose(volume_zyx, (2, 1, 0)), affine)
    img.header.set_xyzt_units("mm")
    if not z_known:
        img.header["descrip"] = UNKNOWN_SLICE_SPACING
    tmp = _temporary(path)
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _image_for_nifti(image: np.ndarray) -> np.ndarray:
    if not np.isfinite(image).all():
        raise DomgenError("the image to write contains NaN or infinite voxels; fix the case before writing it")
    whole = np.array_equal(image, np.rint(image))
    if whole and image.min() >= np.iinfo(np.int16).min and image.max() <= np.iinfo(np.int16).max:
        return image.astype(np.int16)
    return image.astype(np.float32)


def _write_masks_nifti(case: Case, spec: DatasetSpec, stem: str, affine: np.ndarray) -> None:
    z_known = case.slice_spacing is not None
    _save_nifti(case.lesion.astype(np.uint8), affine, spec.lesions_dir / f"{stem}.nii.gz", z_known)
    if spec.lungs_dir is not None:
        if case.lung is None:
            raise DomgenError(
                f"{spec.where} has a 'lungs' folder but case '{case.patient_id}' has no lung mask; "
                f"compute one (lung-mask provider) or remove 'lungs' from the spec"
            )
        _save_nifti((case.lung > 0).astype(np.uint8), affine, spec.lungs_dir / f"{stem}.nii.gz", z_known)


def write_nifti_case(case: Case, spec: DatasetSpec) -> None:
    """Write ``root/<images>/<id>.nii.gz`` and the masks with the same name (affine diag(sx, sy, sz, 1))."""
    _check_writable_id(case, spec, case.patient_id)
    affine = _nifti_affine(case)
    _save_nifti(_image_for_nifti(case.image), affine, spec.images_dir / f"{case.patient_id}.nii.gz",
                case.slice_spacing is not None)
    _write_masks_nifti(case, spec, case.patient_id, affine)


def _ct_slice_dataset(
    stored: np.ndarray, index: int, case: Case, study_uid: str, series_uid: str, frame_uid: str
) -> pydicom.Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.PatientID = case.patient_id
    ds.PatientName = case.patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    if case.slice_spacing is not None:
        # Unknown spacing (unrelated slices) writes no position: the reader then orders by InstanceNumber
        # and reports the spacing as unknown instead of inventing one.
        z = round(index * float(case.slice_spacing), 6)
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.SliceLocation = z
        ds.SliceThickness = float(case.slice_spacing)
        ds.SpacingBetweenSlices = float(case.slice_spacing)
    ds.PixelSpacing = [float(case.spacing[0]), float(case.spacing[1])]
    ds.RescaleSlope = 1
    ds.RescaleIntercept = WRITTEN_RESCALE_INTERCEPT
    ds.RescaleType = "HU"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = stored.astype("<i2").tobytes()
    return ds


def write_dicom_case(case: Case, spec: DatasetSpec) -> None:
    """Write one CT series ``root/<images>/<id>/NNNN.dcm`` (int16, HU = stored - 1024) and NIfTI masks."""
    from pydicom.uid import generate_uid

    _check_writable_id(case, spec, case.patient_id)
    if not np.isfinite(case.image).all():
        raise DomgenError(f"case '{case.patient_id}' has NaN or infinite voxels; fix it before writing DICOM")
    stored = np.rint(case.image - WRITTEN_RESCALE_INTERCEPT)
    if stored.min() < np.iinfo(np.int16).min or stored.max() > np.iinfo(np.int16).max:
        raise DomgenError(
            f"case '{case.patient_id}' has values outside the int16 range DICOM CT stores; clip it to HU first"
        )
    final = spec.images_dir / case.patient_id
    staging = _temporary(final)
    staging.mkdir(parents=True)
    try:
        study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
        for index, plane in enumerate(stored.astype(np.int16)):
            ds = _ct_slice_dataset(plane, index, case, study_uid, series_uid, frame_uid)
            ds.save_as(staging / f"{index:04d}{DICOM_SUFFIX}", enforce_file_format=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_masks_nifti(case, spec, case.patient_id, _nifti_affine(case))


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_slice_case(case: Case, spec: DatasetSpec) -> None:
    """Write ``root/<images>/<id>_<slice:04d>.png`` (8-bit) and PNG masks with the same names.

    Windowed intensities (0..255) are stored directly; a HU image must be windowed by the caller.
    Binary lesion masks are stored 0/255 when ``mask_scale`` is ``auto``, else as class indices.
    """
    image = np.asarray(case.image, dtype=np.float64)
    if not np.isfinite(image).all():
        raise DomgenError(f"case '{case.patient_id}' has NaN or infinite voxels; fix it before writing PNG slices")
    if case.intensity.kind == "hu" and (image.min() < 0 or image.max() > 255):
        raise DomgenError(
            f"case '{case.patient_id}' is in HU ({image.min():g}..{image.max():g}); window it to 0..255 "
            f"(a HU window) before writing 8-bit PNG slices"
        )
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    lesion = np.asarray(case.lesion)
    if lesion.max(initial=0) > 255:
        raise DomgenError(f"case '{case.patient_id}' has lesion values above 255; PNG masks hold 0..255")
    binary = spec.mask_scale == "auto" and lesion.max(initial=0) <= 1
    lesion_png = lesion.astype(np.uint8) * (255 if binary else 1)
    lung_scale = 255 if spec.mask_scale == "auto" else 1
    if spec.lungs_dir is not None and case.lung is None:
        raise DomgenError(
            f"{spec.where} has a 'lungs' folder but case '{case.patient_id}' has no lung mask; "
            f"compute one (lung-mask provider) or remove 'lungs' from the spec"
        )
    for plane, number in enumerate(case.slice_index):
        stem = f"{case.patient_id}_{int(number):04d}"
        if plane == 0:
            _check_writable_id(case, spec, stem)
        _save_png(pixels[plane], spec.images_dir / f"{stem}.png")
        _save_png(lesion_png[plane], spec.lesions_dir / f"{stem}{MASK_SUFFIX}")
        if spec.lungs_dir is not None:
            _save_png((case.lung[plane] > 0).astype(np.uint8) * lung_scale, spec.lungs_dir / f"{stem}{MASK_SUFFIX}")


WRITERS: dict[str, Callable[[Case, DatasetSpec], None]] = {
    "nifti": write_nifti_case,
    "dicom": write_dicom_case,
    "slices": write_slice_case,
}
