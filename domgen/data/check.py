"""Check a dataset before using it: read every file (the first broken one raises) and summarise it."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from domgen.data.case import Case
from domgen.errors import DomgenError
from domgen.data.registry import DatasetSpec, load_cases


def check_dataset(spec: DatasetSpec, keep: Callable[[Case], tuple[int, int]] | None = None) -> dict:
    """Read all cases of ``spec`` (at its ``resize_to`` matrix, if any) and count patients, slices, lesions and sizes.

    Returns a dict with: name, format, root, intensity, patients (count), patient_ids, slices,
    infected_slices (slices with any lesion voxel), slice_sizes (set of (H, W)), mixed_size_patients
    (patients whose slices differ in size), intensity_min/max, lesion_voxels and lesion_slices ({class
    name: count}), lung_masks (patients with a lung mask), spacings, mask_values (most distinct raw values
    in one patient's lesion mask), mask_threshold, resize_to, resized_from, and with ``keep`` (a function
    giving (kept, total) slices of a case under a profile's rule) kept and dropped slice counts. When ``keep``
    cannot run on this dataset (a lung-mask provider that needs HU it does not have), ``not_counted`` holds its
    sentence and the count is left out: that is a finding about the profile, not a broken file.
    """
    patient_ids: list[str] = []
    slices = infected = lungs = kept = 0
    sizes: set[tuple[int, int]] = set()
    resized_from: set[tuple[int, int]] = set()
    mixed: list[str] = []
    spacings: set[tuple[float, float]] = set()
    low, high = np.inf, -np.inf
    mask_values = 0
    voxels: Counter[str] = Counter({name: 0 for name in spec.lesion_labels.values()})
    slices_with: Counter[str] = Counter({name: 0 for name in spec.lesion_labels.values()})
    emptied: list[str] = []
    not_counted: str | None = None
    for case in load_cases(spec):
        patient_ids.append(case.patient_id)
        slices += case.n_slices
        shapes = set(case.slice_shapes())
        sizes |= shapes
        if len(shapes) > 1:
            mixed.append(case.patient_id)
        resized_from |= {tuple(s) for s in case.notes.get("resized_from", [])}
        mask_values = max(mask_values, int(case.notes.get("mask_values", 0)))
        spacings.add((round(float(case.spacing[0]), 4), round(float(case.spacing[1]), 4)))
        for z in range(case.n_slices):
            image, lesion = np.asarray(case.image[z]), np.asarray(case.lesion[z])
            if image.size:
                low, high = min(low, float(image.min())), max(high, float(image.max()))
            infected += bool((lesion > 0).any())
            for value, name in spec.lesion_labels.items():
                hits = int((lesion == value).sum())
                voxels[name] += hits
                slices_with[name] += hits > 0
        lungs += case.lung is not None
        if keep is not None and not_counted is None:
            # every file was read above, so an error here is the provider refusing this dataset, not a broken file
            try:
                k, _ = keep(case)
            except DomgenError as exc:
                not_counted = str(exc)
                continue
            kept += k
            if k == 0:
                emptied.append(case.patient_id)
    return {
        "name": spec.name,
        "format": spec.format,
        "root": str(spec.root),
        "intensity": spec.intensity.describe(),
        "hu_known": spec.intensity.kind == "hu" or spec.intensity.window_known,
        "patients": len(patient_ids),
        "patient_ids": patient_ids,
        "slices": slices,
        "infected_slices": infected,
        "slice_sizes": sizes,
        "mixed_size_patients": mixed,
        "resize_to": spec.resize_to,
        "resized_from": resized_from,
        "spacings": spacings,
        "intensity_min": None if not patient_ids else low,
        "intensity_max": None if not patient_ids else high,
        "lesion_voxels": dict(voxels),
        "lesion_slices": dict(slices_with),
        "lung_masks": lungs,
        "mask_values": mask_values,
        "mask_threshold": spec.mask_threshold,
        "kept": kept if keep is not None and not_counted is None else None,
        "not_counted": not_counted,
        "patients_without_slices": emptied,
    }


def format_check(summary: dict, usable_providers: list[str] | None = None, rule: str | None = None) -> str:
    """The summary of :func:`check_dataset` as a few lines of text."""
    sizes = ", ".join(f"{h}x{w}" for h, w in sorted(summary["slice_sizes"])[:6]) or "-"
    if len(summary["slice_sizes"]) > 6:
        sizes += f" ... ({len(summary['slice_sizes'])} sizes)"
    if summary["mixed_size_patients"]:
        sizes += f"; slices differ in size within {len(summary['mixed_size_patients'])} patient(s) (kept at their own size)"
    if summary.get("resize_to"):
        before = ", ".join(f"{h}x{w}" for h, w in sorted(summary["resized_from"])[:4]) or "-"
        sizes += f"; resized to {summary['resize_to'][0]}x{summary['resize_to'][1]} from {before} (resize_to)"
    spacings = ", ".join(f"{r:g}x{c:g}" for r, c in sorted(summary.get("spacings", ()))) or "-"
    share = summary["infected_slices"] / summary["slices"] if summary["slices"] else 0.0
    low, high = summary["intensity_min"], summary["intensity_max"]
    value_range = "-" if low is None else f"{low:g} .. {high:g}"
    classes = ", ".join(
        f"{name}: {summary['lesion_voxels'][name]} voxels in {summary['lesion_slices'][name]} slices"
        for name in summary["lesion_voxels"]
    )
    threshold = summary["mask_threshold"]
    masks = f"up to {summary['mask_values']} distinct values per patient; " + (
        f"binarised at value > {threshold:g} (mask_threshold)" if threshold is not None else "read as exact labels")
    hu = ("HU known: every step can run" if summary["hu_known"] else
          "HU unknown (no recorded window): the threshold and lungmask lung masks and the fixed/window normalisations "
          "cannot run; the per-slice z-score and the otsu/reference lung masks can")
    lines = [
        f"dataset {summary['name']} ({summary['format']}, {summary['root']}): OK",
        f"  patients         {summary['patients']}",
        f"  slices           {summary['slices']} ({summary['infected_slices']} with lesions, {share:.0%})",
        f"  slice sizes      {sizes}",
        f"  pixel spacing    {spacings} mm",
        f"  intensity        {summary['intensity']}, values {value_range}",
        f"  steps needing HU {hu}",
        f"  lesion classes   {classes or '-'}",
        f"  masks            {masks}",
        f"  lung masks       {summary['lung_masks']} of {summary['patients']} patients",
    ]
    if usable_providers is not None:
        lines.append(f"  lung-mask providers usable: {', '.join(usable_providers)}")
    if summary.get("kept") is not None:
        dropped = summary["slices"] - summary["kept"]
        line = f"  kept slices      {summary['kept']} kept, {dropped} dropped under keep_slices={rule}"
        if summary["patients_without_slices"]:
            line += f"; {len(summary['patients_without_slices'])} patient(s) lose every slice (e.g. {summary['patients_without_slices'][0]})"
        lines.append(line)
    if summary.get("not_counted"):
        lines.append(f"  kept slices      not counted under keep_slices={rule}: {summary['not_counted']}")
    return "\n".join(lines)
