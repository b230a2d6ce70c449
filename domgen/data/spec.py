"""What a suite is: the dataset and suite types, the storage formats and the parsing of a suite YAML file.

The floor of the data layer: the readers, the synthetic generator and the registry all stand on it, so their
arrows point one way (registry -> synthetic -> readers -> spec).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from domgen.data.case import HU, IntensitySpace
from domgen.errors import DomgenError

FORMATS = ("nifti", "dicom", "slices")
LESION_KINDS = ("covid", "tumour", "effusion")
MASK_SCALES = ("auto", "index")
DEFAULT_PATIENT_ID = r"^(?P<patient>[A-Za-z0-9_-]+?)(_(?P<slice>\d+))?$"

_REQUIRED_KEYS = ("format", "root")
_KNOWN_KEYS = {
    "format", "root", "images", "lesions", "lungs", "intensity", "patient_id", "lesion_labels",
    "lesion_kind", "spacing", "mask_scale", "description", "ignore_labels", "mask_threshold", "resize_to",
}


@dataclass
class DatasetSpec:
    """Where one dataset lives and how to interpret its files (one entry of a suite file)."""

    name: str
    format: str
    root: Path
    images: str = "images"
    lesions: str = "masks"
    lungs: str | None = None
    intensity: IntensitySpace = HU
    patient_id: str = DEFAULT_PATIENT_ID
    lesion_labels: dict[int, str] = field(default_factory=lambda: {1: "lesion"})
    ignore_labels: tuple[int, ...] = ()  # mask values read as background (e.g. MedSeg's 3 = pleural effusion)
    lesion_kind: str = "covid"
    spacing: tuple[float, float] | None = None
    mask_scale: str = "auto"
    # soft or lossy masks (probability maps, JPEG): a value > mask_threshold is lesion / lung; None: masks must be exact labels
    mask_threshold: float | None = None
    # the dataset's working matrix (rows, cols): every slice is resized to it when read (Enshaei et al. resized
    # Dataset C from 630 to 512); None keeps each slice's own size
    resize_to: tuple[int, int] | None = None
    description: str = ""
    suite_file: Path | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def images_dir(self) -> Path:
        return self.root / self.images

    @property
    def lesions_dir(self) -> Path:
        return self.root / self.lesions

    @property
    def lungs_dir(self) -> Path | None:
        return None if self.lungs is None else self.root / self.lungs

    @property
    def patient_pattern(self) -> re.Pattern[str]:
        return re.compile(self.patient_id)

    @property
    def where(self) -> str:
        """How error messages refer to this dataset's definition."""
        if self.suite_file is None:
            return f"the spec of dataset '{self.name}'"
        return f"dataset '{self.name}' of {self.suite_file}"


@dataclass
class Suite:
    """A named set of datasets (the domains of a domain-generalisation experiment)."""

    name: str
    path: Path | None
    datasets: dict[str, DatasetSpec]

    def get(self, name: str) -> DatasetSpec:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "(none)"
            raise DomgenError(
                f"dataset '{name}' is not in suite '{self.name}' ({self.path}); known datasets: {known}"
            ) from None

    def names(self) -> list[str]:
        return list(self.datasets)


def parse_suite(path: Path) -> Suite:
    """Parse and validate one suite YAML file."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise DomgenError(f"suite file {path} is not valid YAML{line} ({problem}); fix the syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DomgenError(f"cannot read suite file {path} ({exc}); check the path and permissions") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict) or not raw["datasets"]:
        raise DomgenError(
            f"suite file {path} needs a 'datasets:' mapping of dataset names to their settings"
        )
    datasets = {
        str(name): _parse_dataset(str(name), entry, path) for name, entry in raw["datasets"].items()
    }
    return Suite(name=str(raw.get("name") or path.stem), path=path, datasets=datasets)


def _parse_dataset(name: str, entry: object, suite_file: Path) -> DatasetSpec:
    where = f"dataset '{name}' in {suite_file}"
    if not isinstance(entry, dict):
        raise DomgenError(f"{where} must be a mapping with at least 'format' and 'root'")
    for key in _REQUIRED_KEYS:
        if entry.get(key) in (None, ""):
            raise DomgenError(f"{where} is missing the required key '{key}'; add it")
    unknown = sorted(str(k) for k in entry if k not in _KNOWN_KEYS)
    if unknown:
        raise DomgenError(
            f"{where} has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(_KNOWN_KEYS))}"
        )
    fmt = str(entry["format"])
    if fmt not in FORMATS:
        raise DomgenError(f"{where} has unknown format '{fmt}' (key 'format'); use one of {', '.join(FORMATS)}")

    root = Path(str(entry["root"])).expanduser()
    if not root.is_absolute():
        root = suite_file.parent / root

    patient_id = str(entry.get("patient_id") or DEFAULT_PATIENT_ID)
    try:
        pattern = re.compile(patient_id)
    except re.error as exc:
        raise DomgenError(f"{where} has an invalid 'patient_id' regex ({exc}); fix the pattern") from None
    if "patient" not in pattern.groupindex:
        raise DomgenError(f"{where}: the 'patient_id' regex needs a named group (?P<patient>...)")

    lesion_kind = str(entry.get("lesion_kind") or "covid")
    if lesion_kind not in LESION_KINDS:
        raise DomgenError(f"{where} has unknown lesion_kind '{lesion_kind}'; use one of {', '.join(LESION_KINDS)}")
    mask_scale = str(entry.get("mask_scale") or "auto")
    if mask_scale not in MASK_SCALES:
        raise DomgenError(f"{where} has unknown mask_scale '{mask_scale}'; use one of {', '.join(MASK_SCALES)}")

    lungs = entry.get("lungs")
    return DatasetSpec(
        name=name,
        format=fmt,
        root=root,
        images=str(entry.get("images") or "images"),
        lesions=str(entry.get("lesions") or "masks"),
        lungs=None if lungs in (None, "") else str(lungs),
        intensity=_parse_intensity(entry.get("intensity", "hu"), where),
        patient_id=patient_id,
        lesion_labels=_parse_lesion_labels(entry.get("lesion_labels"), where),
        ignore_labels=_parse_ignore_labels(entry.get("ignore_labels"), where),
        lesion_kind=lesion_kind,
        spacing=_parse_spacing(entry.get("spacing"), where),
        mask_scale=mask_scale,
        mask_threshold=_parse_mask_threshold(entry.get("mask_threshold"), entry, where),
        resize_to=_parse_resize_to(entry.get("resize_to"), where),
        description=str(entry.get("description") or ""),
        suite_file=suite_file,
    )


def _parse_intensity(value: object, where: str) -> IntensitySpace:
    if value is None or value == "hu":
        return HU
    if value == "windowed":
        return IntensitySpace("windowed")
    if isinstance(value, dict) and value.get("kind") in ("hu", "windowed"):
        if value["kind"] == "hu":
            return HU
        level, width = value.get("level"), value.get("width")
        if (level is None) != (width is None):
            raise DomgenError(f"{where}: 'intensity' needs both level and width, or neither (unknown window)")
        try:
            level = None if level is None else float(level)
            width = None if width is None else float(width)
        except (TypeError, ValueError):
            raise DomgenError(f"{where}: 'intensity' level and width must be numbers in HU") from None
        if width is not None and width <= 0:
            raise DomgenError(f"{where}: 'intensity' width must be positive")
        return IntensitySpace("windowed", level, width)
    raise DomgenError(
        f"{where} has an invalid 'intensity' ({value!r}); use hu, windowed, or {{kind: windowed, level: L, width: W}}"
    )


def _parse_lesion_labels(value: object, where: str) -> dict[int, str]:
    if value is None:
        return {1: "lesion"}
    if not isinstance(value, dict) or not value:
        raise DomgenError(f"{where}: 'lesion_labels' must map mask values to class names, e.g. {{1: lesion}}")
    labels: dict[int, str] = {}
    for key, label in value.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            number = -1
        if number < 1 or number > 255 or str(number) != str(key).strip():
            raise DomgenError(f"{where}: 'lesion_labels' key {key!r} must be an integer mask value 1..255")
        labels[number] = str(label)
    return labels


def _parse_ignore_labels(value: object, where: str) -> tuple[int, ...]:
    if value in (None, []):
        return ()
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in value):
        raise DomgenError(f"{where}: 'ignore_labels' must be a list of mask values 1..255, e.g. [3]")
    return tuple(value)


def _parse_mask_threshold(value: object, entry: dict, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise DomgenError(f"{where}: 'mask_threshold' must be a non-negative number (e.g. 127 for 0..255 masks, 0.5 for "
                          f"0..1 probability maps), not {value!r}")
    labels = entry.get("lesion_labels")
    if isinstance(labels, dict) and len(labels) > 1:
        raise DomgenError(f"{where}: 'mask_threshold' binarises the masks, so 'lesion_labels' can name only one class; "
                          "drop one of the two keys")
    return float(value)


def _parse_resize_to(value: object, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    sizes = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(sizes, list) or len(sizes) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096 for v in sizes)):
        raise DomgenError(f"{where}: 'resize_to' must be a matrix size in pixels, 8..4096 (e.g. 512) or [rows, cols], not {value!r}")
    return (int(sizes[0]), int(sizes[1]))


def _parse_spacing(value: object, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DomgenError(f"{where}: 'spacing' must be [row_mm, col_mm] or null") from None
    if row <= 0 or col <= 0:
        raise DomgenError(f"{where}: 'spacing' values must be positive millimetres")
    return (row, col)
