"""A radiologist in the loop (Enshaei et al.'s proposal): export the selected pseudo-labels for review, read the
corrections back.

Export folder::

    review.json            what was exported (target, cut-off, starting checkpoint, number of slices)
    manifest.csv           one row per slice: slice_id, patient_id, confidence, score, ci, n_pixels, image, mask, prediction
    images/<stem>.nii.gz   the slice as stored (HU where known), one-slice NIfTI (ITK-SNAP / 3D Slicer)
    masks/<stem>.nii.gz    the predicted lesion mask (0/1): edit it in place
    predicted/<stem>.nii.gz  the same prediction, kept untouched to measure the corrections
    overlays/<stem>.png    image with the predicted outline, for a quick look

A row deleted from ``manifest.csv`` means "reject this slice"; an edited mask replaces the prediction.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from domgen.data.case import Case
from domgen.errors import DomgenError
from domgen.preprocessing.intensity import hu_recoverable, resize_slice, to_hu
from domgen.preprocessing.slices import SliceSet

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("slice_id", "patient_id", "confidence", "score", "ci", "n_pixels", "image", "mask", "prediction")


def _stem(slice_id: str) -> str:
    return slice_id.replace("/", "__")


def _save_slice_nifti(array: np.ndarray, spacing: tuple[float, float], path: Path) -> None:
    """One (H, W) slice as a NIfTI volume of one slice, in domgen's convention (array (X, Y, Z), affine diag(col, row, 1))."""
    tmp = path.with_name(f".tmp-{path.name}")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(array).T[:, :, None]), np.diag([spacing[1], spacing[0], 1.0, 1.0])), tmp)
    os.replace(tmp, path)


def _overlay(path: Path, image: np.ndarray, mask: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3.2))
    ax.imshow(image, cmap="gray")
    if mask.any():
        ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_for_review(folder: Path, ranking: pd.DataFrame, probabilities: dict[str, np.ndarray], cases: dict[str, Case],
                      slices: SliceSet, cutoff: float, meta: dict) -> int:
    """Write the selected slices of ``ranking`` with their predicted masks; returns how many were written.

    ``probabilities``: original-size probability per slice id; ``cases``: the target's cases by patient id (the
    images as stored, which the model-ready slices no longer hold)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise DomgenError(f"review folder {folder} is not empty; give a new folder to --export-for-review")
    chosen = ranking[ranking.selected]
    for sub in ("images", "masks", "predicted", "overlays"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    position = {sid: i for i, sid in enumerate(slices.slice_ids)}
    rows = []
    score_name = meta.get("confidence", "ci")
    for _, row in chosen.iterrows():
        case = cases[row.patient_id]
        z = int(np.flatnonzero(np.asarray([sid == row.slice_id for sid in case.slice_ids()]))[0])
        image = np.asarray(case.image[z], dtype=np.float32)
        if hu_recoverable(case.intensity):
            image = to_hu(image, case.intensity)
        mask = (probabilities[row.slice_id] > cutoff).astype(np.uint8)
        stem = _stem(row.slice_id)
        spacing = slices.spacings[position[row.slice_id]]
        _save_slice_nifti(image, spacing, folder / "images" / f"{stem}.nii.gz")
        _save_slice_nifti(mask, spacing, folder / "masks" / f"{stem}.nii.gz")
        _save_slice_nifti(mask, spacing, folder / "predicted" / f"{stem}.nii.gz")
        _overlay(folder / "overlays" / f"{stem}.png", image, mask, f"{row.slice_id}  {score_name}={row.get(score_name, row.ci):.3f}")
        rows.append({"slice_id": row.slice_id, "patient_id": row.patient_id, "confidence": score_name,
                     "score": float(row.get(score_name, row.ci)), "ci": float(row.ci), "n_pixels": int(row.n_pixels),
                     "image": f"images/{stem}.nii.gz", "mask": f"masks/{stem}.nii.gz", "prediction": f"predicted/{stem}.nii.gz"})
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_csv(folder / MANIFEST, index=False)
    (folder / "review.json").write_text(json.dumps({**meta, "exported": len(rows)}, indent=2))
    return len(rows)


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except (OSError, ValueError, EOFError) as exc:
        raise DomgenError(f"cannot read reviewed mask {path} ({type(exc).__name__}); re-save it as NIfTI from the viewer") from None
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim != 2:
        raise DomgenError(f"reviewed mask {path} has shape {data.shape}; it must stay one slice of {shape[1]}x{shape[0]} (X x Y)")
    data = data.T
    if data.shape != tuple(shape):
        raise DomgenError(f"reviewed mask {path} is {data.shape[0]}x{data.shape[1]} but its slice is {shape[0]}x{shape[1]}; "
                          "edit the exported mask without resampling it")
    if not np.isfinite(data).all():
        raise DomgenError(f"reviewed mask {path} contains NaN or infinite values; fix the mask")
    values = set(np.unique(data).tolist())
    if not values <= {0, 1}:
        raise DomgenError(f"reviewed mask {path} holds values {sorted(values)[:6]}; lesion masks are 0 (background) and 1 (lesion)")
    return data.astype(np.uint8)


def _folder_digest(folder: Path, manifest: pd.DataFrame) -> str:
    digest = hashlib.sha256((folder / MANIFEST).read_bytes())
    for rel in manifest["mask"]:
        digest.update((folder / rel).read_bytes())
    return digest.hexdigest()


@dataclass
class Review:
    """The reviewed pseudo-labels: slices with corrected masks as model-size targets, and what the review did."""

    slices: SliceSet
    digest: str
    kept: int  # unchanged predictions
    corrected: int
    rejected: int
    correction_dice: float  # mean Dice between prediction and correction over the corrected slices

    def metrics(self) -> dict[str, float]:
        return {"review_kept": float(self.kept), "review_corrected": float(self.corrected), "review_rejected": float(self.rejected),
                "review_correction_dice": self.correction_dice}


def read_review(folder: Path, target: SliceSet) -> Review:
    """The corrected masks of a review folder, checked like any mask, for the slices of ``target``."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / "review.json").is_file():
        raise DomgenError(f"{folder} is not a review folder (no {MANIFEST} / review.json); pass the folder written by --export-for-review")
    try:
        manifest = pd.read_csv(folder / MANIFEST, dtype={"slice_id": str, "patient_id": str})
        meta = json.loads((folder / "review.json").read_text())
    except (pd.errors.ParserError, pd.errors.EmptyDataError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DomgenError(f"cannot read the review folder {folder} ({type(exc).__name__}); restore {MANIFEST} and review.json") from None
    missing = [c for c in ("slice_id", "mask", "prediction") if c not in manifest.columns]
    if missing:
        raise DomgenError(f"{folder / MANIFEST} lacks the column(s) {', '.join(missing)}; restore the header the export wrote")
    position = {sid: i for i, sid in enumerate(target.slice_ids)}
    unknown = [s for s in manifest.slice_id if s not in position]
    if unknown:
        raise DomgenError(f"{folder / MANIFEST} names slice {unknown[0]}, which is not a slice of this target; remove the row")
    if manifest.slice_id.duplicated().any():
        raise DomgenError(f"{folder / MANIFEST} names slice {manifest.slice_id[manifest.slice_id.duplicated()].iloc[0]} twice; keep one row")
    targets, index, dices = [], [], []
    kept = corrected = 0
    size = target.targets.shape[1:]
    for _, row in manifest.iterrows():
        i = position[row.slice_id]
        shape = target.truths[i].shape
        mask = _read_mask(folder / row["mask"], shape)
        predicted = _read_mask(folder / row["prediction"], shape)
        if np.array_equal(mask, predicted):
            kept += 1
        else:
            corrected += 1
            total = mask.sum() + predicted.sum()
            dices.append(2.0 * float((mask & predicted).sum()) / total if total else 1.0)
        targets.append(resize_slice(mask, size, kind="mask"))
        index.append(i)
    chosen = target.subset(index).with_targets(np.asarray(targets, dtype=np.uint8).reshape(len(index), *size)) if index else target.subset([])
    rejected = int(meta.get("exported", len(manifest))) - len(manifest)
    return Review(chosen, _folder_digest(folder, manifest), kept, corrected, max(rejected, 0),
                  float(np.mean(dices)) if dices else float("nan"))
