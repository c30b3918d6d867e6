"""Exploratory plots for the label tables and single studies (numpy / pandas / matplotlib).

Each function returns the matplotlib Figure so notebooks show it and scripts can save it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from .constants import TARGETS, VERTEBRAE, WINDOWS


def label_prevalence(train: pd.DataFrame) -> pd.DataFrame:
    """Positives and prevalence per target, in TARGETS order."""
    counts = train[list(TARGETS)].sum().astype(int)
    return pd.DataFrame({"positives": counts, "prevalence": counts / len(train)})


def cooccurrence(train: pd.DataFrame) -> pd.DataFrame:
    """(7, 7) counts of studies fractured at both row and column vertebra (diagonal: at that vertebra)."""
    y = train[list(VERTEBRAE)].to_numpy(dtype=np.int64)
    return pd.DataFrame(y.T @ y, index=VERTEBRAE, columns=VERTEBRAE)


def plot_labels(train: pd.DataFrame) -> plt.Figure:
    """Prevalence per target, fractured vertebrae per study, and the vertebra co-occurrence matrix."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    prev = label_prevalence(train)
    names = ["overall" if t == "patient_overall" else t for t in prev.index]
    axes[0].bar(names, prev["prevalence"], color=["tab:red"] + ["tab:blue"] * 7)
    for i, (n, p) in enumerate(zip(prev["positives"], prev["prevalence"])):
        axes[0].text(i, p, f"{n}", ha="center", va="bottom", fontsize=8)
    axes[0].set(title=f"Label prevalence ({len(train)} studies)", ylabel="share of studies positive")
    per_study = train[list(VERTEBRAE)].sum(axis=1).value_counts().sort_index()
    axes[1].bar(per_study.index.astype(str), per_study.values, color="tab:gray")
    axes[1].set(title="Fractured vertebrae per study", xlabel="vertebrae", ylabel="studies")
    co = cooccurrence(train)
    im = axes[2].imshow(co.to_numpy(), cmap="viridis")
    axes[2].set(title="Co-occurrence (studies)", xticks=range(7), yticks=range(7),
                xticklabels=VERTEBRAE, yticklabels=VERTEBRAE)
    for (i, j), v in np.ndenumerate(co.to_numpy()):
        axes[2].text(j, i, str(v), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    return fig


def plot_study_table(table: pd.DataFrame) -> plt.Figure:
    """Histograms of slices per study, slice spacing and in-plane size.

    Args:
        table: one row per study with columns `slices`, `dz`, `rows`, `cols` (`study_table` or
            `kit.cache.read_manifest`).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    axes[0].hist(table["slices"], bins=20, color="tab:blue")
    axes[0].set(title="Slices per study", xlabel="slices", ylabel="studies")
    axes[1].hist(table["dz"], bins=20, color="tab:green")
    axes[1].set(title="Slice spacing", xlabel="dz (mm)", ylabel="studies")
    sizes = table["rows"].astype(str) + "×" + table["cols"].astype(str)
    vc = sizes.value_counts()
    axes[2].bar(vc.index, vc.values, color="tab:purple")
    axes[2].set(title="In-plane size", xlabel="rows × columns", ylabel="studies")
    fig.tight_layout()
    return fig


def _windowed(hu: np.ndarray, window: str) -> np.ndarray:
    center, width = WINDOWS[window]
    return np.clip((hu.astype(np.float32) - (center - width / 2)) / width, 0, 1)


def plot_axial(hu: np.ndarray, slices: list[int] | None = None, *, boxes: pd.DataFrame | None = None,
               window: str = "bone", title: str = "") -> plt.Figure:
    """A row of axial slices in an HU window, with fracture boxes drawn where given.

    Args:
        hu: (Z, H, W) HU volume, index 0 = most superior.
        slices: slice indices to show (default: 6 evenly spaced).
        boxes: rows with `slice_index, x, y, width, height` in this volume's pixel coordinates.
        window: a key of `kit.constants.WINDOWS`.
    """
    if slices is None:
        slices = np.linspace(0, len(hu) - 1, 6).round().astype(int).tolist()
    fig, axes = plt.subplots(1, len(slices), figsize=(3 * len(slices), 3.3))
    for ax, z in zip(np.atleast_1d(axes), slices):
        ax.imshow(_windowed(hu[z], window), cmap="gray")
        if boxes is not None:
            for b in boxes[boxes["slice_index"] == z].itertuples():
                ax.add_patch(Rectangle((b.x, b.y), b.width, b.height, fill=False, ec="red", lw=1.5))
        ax.set_title(f"slice {z}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title or f"Axial slices ({window} window)")
    fig.tight_layout()
    return fig


def plot_sagittal(hu: np.ndarray, spacing: tuple[float, float, float], *, labels: np.ndarray | None = None,
                  boxes: pd.DataFrame | None = None, column: int | None = None, window: str = "bone",
                  title: str = "") -> plt.Figure:
    """A sagittal reconstruction with the vertebra labels overlaid and fracture boxes marked.

    Args:
        hu: (Z, H, W) HU volume, index 0 = most superior, so the head is at the top.
        spacing: (dz, dy, dx) mm, for the aspect ratio.
        labels: (Z, H, W) integer labels aligned with `hu` (1..7 = C1..C7).
        boxes: rows with `slice_index, x, y, width, height`; each is drawn on the sagittal plane as the
            y-extent of the box at its slice.
        column: the x index of the plane (default: the labels' centroid column, else the middle).
    """
    if column is None:
        column = hu.shape[2] // 2
        if labels is not None and (labels > 0).any():
            column = int(np.round(np.nonzero(labels)[2].mean()))
    fig, ax = plt.subplots(figsize=(6, 8))
    ax.imshow(_windowed(hu[:, :, column], window), cmap="gray", aspect=spacing[0] / spacing[1])
    if labels is not None:
        lab = labels[:, :, column].astype(float)
        overlay = np.ma.masked_where(lab == 0, lab)
        ax.imshow(overlay, cmap="tab10", vmin=1, vmax=10, alpha=0.45, aspect=spacing[0] / spacing[1],
                  interpolation="nearest")
        for v, name in enumerate(VERTEBRAE, start=1):
            zs = np.nonzero((labels == v).any(axis=(1, 2)))[0]
            if len(zs):
                ax.text(2, zs.mean(), name, color="yellow", fontsize=9, va="center")
    if boxes is not None:
        for b in boxes.itertuples():
            ax.add_patch(Rectangle((b.y, b.slice_index - 0.5), b.height, 1, fill=False, ec="red", lw=1))
    ax.set(title=title or f"Sagittal reconstruction at column {column}", xlabel="y (rows)", ylabel="slice")
    fig.tight_layout()
    return fig


def study_table(root, split: str = "train", *, max_studies: int | None = None) -> pd.DataFrame:
    """Geometry of the studies of a split from their DICOM headers: slices, spacing, size, transfer syntax.

    Args:
        root: RSNA data root.
        split: "train" or "test".
        max_studies: scan only the first this many studies (sorted by UID); None scans all.
    """
    from pathlib import Path

    from .progress import progress_bar

    from .dicom import scan_series

    folders = sorted(p for p in (Path(root) / f"{split}_images").iterdir() if p.is_dir())[:max_studies]
    rows = []
    for folder in progress_bar(folders, desc=f"scan {split} headers", unit="study"):
        try:
            rows.append(scan_series(folder))
        except ValueError as exc:  # a broken study is reported, not fatal
            rows.append({"StudyInstanceUID": folder.name, "error": str(exc)})
    return pd.DataFrame(rows)


def pick_study(root, train: pd.DataFrame, boxes: pd.DataFrame) -> str:
    """A study worth looking at: fractured, with boxes and a segmentation if there is one."""
    from pathlib import Path

    seg = {p.stem for p in (Path(root) / "segmentations").glob("*.nii")}
    fractured = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
    boxed = set(boxes["StudyInstanceUID"])
    for pool in (seg & boxed, seg & fractured, boxed, fractured, set(train["StudyInstanceUID"])):
        if pool:
            return sorted(pool)[0]
    raise ValueError("train table is empty: no study to show")


def boxes_for_series(boxes: pd.DataFrame, series) -> pd.DataFrame:
    """The fracture boxes of `series.uid`, with `slice_index` = position of their slice in `series.hu`."""
    rows = boxes[boxes["StudyInstanceUID"] == series.uid].copy()
    index = {int(n): i for i, n in enumerate(series.instance_numbers)}
    rows["slice_index"] = rows["slice_number"].map(index)
    return rows.dropna(subset=["slice_index"]).astype({"slice_index": int})
