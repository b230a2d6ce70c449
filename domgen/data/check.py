"""Check a dataset before using it: read every file (the first broken one raises) and summarise it."""
from __future__ import annotations

from collections import Counter

import numpy as np

from domgen.data.readers import READERS
from domgen.data.registry import DatasetSpec


def check_dataset(spec: DatasetSpec) -> dict:
    """Read all cases of ``spec`` and count patients, slices, lesions and sizes.

    Returns a dict with: name, format, root, intensity, patients (count), patient_ids, slices,
    infected_slices (slices with any lesion voxel), slice_sizes (set of (H, W)), intensity_min,
    intensity_max, lesion_voxels and lesion_slices ({class name: count}), lung_masks (patients with a
    lung mask) and spacings (set of in-plane (row_mm, col_mm)).
    """
    patient_ids: list[str] = []
    slices = infected = lungs = 0
    sizes: set[tuple[int, int]] = set()
    spacings: set[tuple[float, float]] = set()
    low, high = np.inf, -np.inf
    voxels: Counter[str] = Counter({name: 0 for name in spec.lesion_labels.values()})
    slices_with: Counter[str] = Counter({name: 0 for name in spec.lesion_labels.values()})
    for case in READERS[spec.format](spec):
        patient_ids.append(case.patient_id)
        slices += case.n_slices
        infected += int((case.lesion.reshape(case.n_slices, -1) > 0).any(axis=1).sum())
        sizes.add((int(case.image.shape[1]), int(case.image.shape[2])))
        spacings.add((round(float(case.spacing[0]), 4), round(float(case.spacing[1]), 4)))
        if case.image.size:
            low, high = min(low, float(case.image.min())), max(high, float(case.image.max()))
        lungs += case.lung is not None
        for value, name in spec.lesion_labels.items():
            per_slice = (case.lesion == value).reshape(case.n_slices, -1)
            voxels[name] += int(per_slice.sum())
            slices_with[name] += int(per_slice.any(axis=1).sum())
    return {
        "name": spec.name,
        "format": spec.format,
        "root": str(spec.root),
        "intensity": spec.intensity.describe(),
        "patients": len(patient_ids),
        "patient_ids": patient_ids,
        "slices": slices,
        "infected_slices": infected,
        "slice_sizes": sizes,
        "spacings": spacings,
        "intensity_min": None if not patient_ids else low,
        "intensity_max": None if not patient_ids else high,
        "lesion_voxels": dict(voxels),
        "lesion_slices": dict(slices_with),
        "lung_masks": lungs,
    }


def format_check(summary: dict) -> str:
    """The summary of :func:`check_dataset` as a few lines of text."""
    sizes = ", ".join(f"{h}x{w}" for h, w in sorted(summary["slice_sizes"])) or "-"
    spacings = ", ".join(f"{r:g}x{c:g}" for r, c in sorted(summary.get("spacings", ()))) or "-"
    share = summary["infected_slices"] / summary["slices"] if summary["slices"] else 0.0
    low, high = summary["intensity_min"], summary["intensity_max"]
    value_range = "-" if low is None else f"{low:g} .. {high:g}"
    classes = ", ".join(
        f"{name}: {summary['lesion_voxels'][name]} voxels in {summary['lesion_slices'][name]} slices"
        for name in summary["lesion_voxels"]
    )
    lines = [
        f"dataset {summary['name']} ({summary['format']}, {summary['root']}): OK",
        f"  patients         {summary['patients']}",
        f"  slices           {summary['slices']} ({summary['infected_slices']} with lesions, {share:.0%})",
        f"  slice sizes      {sizes}",
        f"  pixel spacing    {spacings} mm",
        f"  intensity        {summary['intensity']}, values {value_range}",
        f"  lesion classes   {classes or '-'}",
        f"  lung masks       {summary['lung_masks']} of {summary['patients']} patients",
    ]
    return "\n".join(lines)
