"""Files a run leaves behind in MLflow: predicted masks as NIfTI, overlay PNGs, tables (checkpoints: ``domgen.models.checkpoint``)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from skimage.transform import resize  # noqa: E402

import pandas as pd  # noqa: E402

from domgen.errors import DomgenError  # noqa: E402
from domgen.preprocessing.slices import SliceSet  # noqa: E402
from domgen.tracking import mlflow_store as store  # noqa: E402


def write_prediction_niftis(folder: Path, probabilities: list[np.ndarray], slices: SliceSet, cutoff: float) -> list[Path]:
    """One binary NIfTI per patient (opens in ITK-SNAP / 3D Slicer); slices not evaluated stay 0."""
    folder.mkdir(parents=True, exist_ok=True)
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(slices.patient_ids):
        by_patient[pid].append(i)
    paths = []
    for pid, index in by_patient.items():
        z = [int(slices.slice_ids[i].rsplit("/", 1)[1]) for i in index]
        h, w = slices.truths[index[0]].shape
        volume = np.zeros((max(z) + 1, h, w), dtype=np.uint8)
        for zi, i in zip(z, index):
            if probabilities[i].shape == (h, w):
                volume[zi] = probabilities[i] > cutoff
        row, col = slices.spacings[index[0]]
        # domgen's NIfTI convention: array (X, Y, Z) = volume transposed, affine diag(col, row, 1)
        img = nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.diag([col, row, 1.0, 1.0]))
        path = folder / f"{pid}.nii.gz"
        nib.save(img, path)
        paths.append(path)
    return paths


def overlay_figure(path: Path, slices: SliceSet, probabilities: list[np.ndarray], index: list[int], cutoff: float, titles: list[str]) -> Path:
    """Image with the true lesion (green) and the predicted lesion (red) outlines, one panel a slice."""
    n = max(len(index), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    for ax, i, title in zip(axes[0], index, titles):
        image = slices.inputs[i, 0]
        truth, prob = slices.truths[i], probabilities[i]
        ax.imshow(resize(image, truth.shape, order=1), cmap="gray")
        if truth.any():
            ax.contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
        if (prob > cutoff).any():
            ax.contour(prob > cutoff, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    for ax in axes[0][len(index):]:
        ax.axis("off")
    fig.suptitle("green: ground truth, red: prediction", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_evaluation_artifacts(run_id: str, probs: list[np.ndarray], slices: SliceSet, cutoff: float, per_slice: pd.DataFrame,
                             ranking: pd.DataFrame | None, tmp: Path) -> None:
    """Per-slice metrics CSV, predicted masks (NIfTI), and with a CI ranking: ci_ranking.csv and overlays."""
    per_slice.to_csv(tmp / "per_slice_metrics.csv", index=False)
    store.log_artifact_file(run_id, tmp / "per_slice_metrics.csv")
    write_prediction_niftis(tmp / "predictions", probs, slices, cutoff)
    store.log_artifact_folder(run_id, tmp / "predictions", "predictions")
    if ranking is not None:
        ranking.to_csv(tmp / "ci_ranking.csv", index=False)
        store.log_artifact_file(run_id, tmp / "ci_ranking.csv")
        position = {sid: i for i, sid in enumerate(slices.slice_ids)}
        ranked = ranking[ranking.eligible] if "eligible" in ranking else ranking[ranking.n_pixels > 0]  # least certain: ranked slices only
        for label, part in (("most_certain", ranked.head(5)), ("least_certain", ranked.tail(5))):
            if len(part):
                idx = [position[s] for s in part.slice_id]
                titles = [f"{s.split('/', 1)[1]}\nCI={c:.3f} N={n}" for s, c, n in zip(part.slice_id, part.ci, part.n_pixels)]
                store.log_artifact_file(run_id, overlay_figure(tmp / f"overlay_{label}.png", slices, probs, idx, cutoff, titles), "overlays")
