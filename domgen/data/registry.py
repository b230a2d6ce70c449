"""The dataset registry: a suite YAML file names datasets and says how each is stored on disk.

Layouts (``nifti`` | ``dicom`` | ``slices``) are described in ``domgen.data.readers``, the suite types and the
suite-file parser in ``domgen.data.spec``; this module finds a suite and hands each :class:`DatasetSpec` to the readers.
"""
from __future__ import annotations

from pathlib import Path

from domgen.data.case import Case
from domgen.data.spec import (DEFAULT_PATIENT_ID, FORMATS, LESION_KINDS, MASK_SCALES, DatasetSpec,  # noqa: F401 - the registry's names
                              Suite, parse_suite)
from domgen.errors import DomgenError


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a suite: a path to a YAML file, or ``synthetic`` (the generated suite, the only built-in one)."""
    text = str(name_or_path)
    if text == "synthetic":
        # Imported here: the generator is heavy and only needed for the built-in suite.
        from domgen.data.synthetic import ensure_synthetic_suite

        path = Path(ensure_synthetic_suite())
    else:
        path = Path(text).expanduser()
    if not path.is_file():
        raise DomgenError(
            f"suite file {path} does not exist; give the path to a suite YAML file or 'synthetic'"
        )
    return parse_suite(path)


def load_cases(spec: DatasetSpec, patient_ids: list[str] | None = None, progress: bool = False) -> list[Case]:
    """Read a dataset's cases (all, or only ``patient_ids``), sorted by patient id."""
    from tqdm import tqdm

    from domgen.data.readers import READERS, list_patient_ids, resize_case

    known = list_patient_ids(spec)
    wanted = None if patient_ids is None else list(dict.fromkeys(str(p) for p in patient_ids))
    if wanted is not None:
        missing = sorted(set(wanted) - set(known))
        if missing:
            raise DomgenError(
                f"patient(s) {', '.join(missing)} not found in {spec.where}; check the patient ids"
            )
    cases = READERS[spec.format](spec, patient_ids=wanted)
    if spec.resize_to is not None:
        cases = (resize_case(case, spec.resize_to) for case in cases)
    if progress:
        total = len(wanted) if wanted is not None else len(known)
        cases = tqdm(cases, total=total, desc=f"reading {spec.name}", unit="patient")
    return list(cases)
