"""Exploratory plots for the label tables and single studies (numpy / pandas / matplotlib).

Each function returns the matplotlib Figure so notebooks show it and scripts can save it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from ..constants import TARGETS, VERTEBRAE, WINDOWS
from ..stage1.recipe import mm_to_slices
from ..stage2.targets import file_numbers


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
            `kit.io.cache.read_manifest`).
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

    from ..io.dicom import scan_series
    from ..progress import progress_bar

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

    from ..io.rsna import segmented_studies

    seg = segmented_studies(Path(root) / "segmentations")
    fractured = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
    boxed = set(boxes["StudyInstanceUID"])
    for pool in (seg & boxed, seg & fractured, boxed, fractured, set(train["StudyInstanceUID"])):
        if pool:
            return sorted(pool)[0]
    raise ValueError("train table is empty: no study to show")


def boxes_for_series(boxes: pd.DataFrame, series) -> pd.DataFrame:
    """The fracture boxes of `series.uid`, with `slice_index` = position of their slice in `series.hu`."""
    rows = boxes[boxes["StudyInstanceUID"] == series.uid].copy()
    index = {int(n): i for i, n in enumerate(file_numbers(series.files, series.instance_numbers))}
    rows["slice_index"] = rows["slice_number"].map(index)
    return rows.dropna(subset=["slice_index"]).astype({"slice_index": int})


def fracture_spans(boxes: pd.DataFrame, max_gap: int = 1) -> pd.DataFrame:
    """Group one study's box rows into fractures: runs of slices at most `max_gap` slices apart.

    Boxes are drawn per axial slice; a fracture is the run of consecutive slices that show it.

    Args:
        boxes: one study's rows with `slice_index, x, y, width, height` (`boxes_for_series`).
        max_gap: slices without a box that a run may skip and still be one fracture.

    Returns:
        One row per fracture, head to feet: `slice_first`, `slice_last` (inclusive), `y0`, `y1`, `x0`, `x1`
        (the union of its boxes, pixels, half-open) and `rows` (box rows in it).
    """
    columns = ["slice_first", "slice_last", "y0", "y1", "x0", "x1", "rows"]
    if len(boxes) == 0:
        return pd.DataFrame(columns=columns)
    rows = boxes.sort_values("slice_index")
    run = (rows["slice_index"].diff().fillna(0) > max_gap + 1).cumsum()
    spans = rows.assign(y1=rows["y"] + rows["height"], x1=rows["x"] + rows["width"]).groupby(run).agg(
        slice_first=("slice_index", "min"), slice_last=("slice_index", "max"), y0=("y", "min"), y1=("y1", "max"),
        x0=("x", "min"), x1=("x1", "max"), rows=("slice_index", "size"))
    return spans.reset_index(drop=True)[columns]


def _vertebra_under(labels: np.ndarray | None, span) -> str:
    """The vertebra most of a fracture span's box volume lies on ("" without labels or when none)."""
    if labels is None:
        return ""
    z0, z1 = int(span.slice_first), int(span.slice_last) + 1
    y0, y1, x0, x1 = (int(round(v)) for v in (span.y0, span.y1, span.x0, span.x1))
    values = labels[z0:z1, y0:y1, x0:x1]
    values = values[(values >= 1) & (values <= len(VERTEBRAE))]
    return VERTEBRAE[int(np.bincount(values).argmax()) - 1] if values.size else ""


def plot_fracture_boxes(hu: np.ndarray, spacing: tuple[float, float, float], boxes: pd.DataFrame, *,
                        labels: np.ndarray | None = None, window: str = "bone", max_panels: int = 4,
                        context_mm: float = 25.0, title: str = "") -> plt.Figure:
    """Each fracture's boxes on a sagittal plane through it: its slice range x its y-extent.

    One panel per fracture (`fracture_spans`), on the sagittal plane at the column through the centre of its
    boxes, so the fracture lies in the plane shown: the span as a red rectangle, each slice's box as a thin
    yellow line (its y-extent at its slice), the vertebra labels overlaid when given.

    Args:
        hu: (Z, H, W) HU volume, index 0 = most superior.
        spacing: (dz, dy, dx) mm, for the aspect ratio.
        boxes: one study's rows with `slice_index, x, y, width, height` (`boxes_for_series`).
        labels: (Z, H, W) labels aligned with `hu` (1..7 = C1..C7), to name the vertebra of each fracture.
        max_panels: show at most this many fractures.
        context_mm: neck shown above and below each fracture.
    """
    spans = fracture_spans(boxes)
    n = max(1, min(len(spans), max_panels))
    pad = mm_to_slices(context_mm, spacing[0])  # slices shown above and below each fracture
    windows = [(max(0, int(sp.slice_first) - pad), min(len(hu) - 1, int(sp.slice_last) + pad))
               for sp in spans.head(n).itertuples()] or [(0, len(hu) - 1)]
    aspect = spacing[0] / spacing[1]
    tallest = max(z1 - z0 + 1 for z0, z1 in windows) * aspect / hu.shape[1]  # panel height / width
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, float(np.clip(4.5 * tallest, 1.5, 9.0)) + 1.2), squeeze=False)
    if len(spans) == 0:
        axes[0, 0].imshow(_windowed(hu[:, :, hu.shape[2] // 2], window), cmap="gray", aspect=aspect)
        axes[0, 0].set_title("no fracture boxes in this study", fontsize=10)
    for ax, span, (z0, z1) in zip(axes[0], spans.head(n).itertuples(), windows):
        column = int(np.clip(round((span.x0 + span.x1) / 2), 0, hu.shape[2] - 1))
        ax.imshow(_windowed(hu[:, :, column], window), cmap="gray", aspect=aspect)
        if labels is not None:
            lab = labels[:, :, column].astype(float)
            ax.imshow(np.ma.masked_where(lab == 0, lab), cmap="tab10", vmin=1, vmax=10, alpha=0.3, aspect=aspect,
                      interpolation="nearest")
        inside = boxes[boxes["slice_index"].between(span.slice_first, span.slice_last)]
        for b in inside.itertuples():
            ax.plot([b.y, b.y + b.height], [b.slice_index, b.slice_index], color="yellow", lw=0.6, alpha=0.7)
        ax.add_patch(Rectangle((span.y0, span.slice_first - 0.5), span.y1 - span.y0,
                               span.slice_last - span.slice_first + 1, fill=False, ec="red", lw=1.6))
        ax.set_ylim(z1 + 0.5, z0 - 0.5)
        name = _vertebra_under(labels, span)
        ax.set_title(f"{name + ': ' if name else ''}slices {span.slice_first}-{span.slice_last}, "
                     f"{span.rows} boxes\nsagittal plane at column {column}", fontsize=9)
        ax.set(xlabel="y (rows)", ylabel="slice")
    fig.suptitle(title or f"Fracture boxes on the sagittal plane ({len(spans)} fractures)")
    fig.tight_layout()
    return fig


def plot_fracture_mix(fractures: pd.DataFrame, lookalikes: pd.DataFrame | None = None) -> plt.Figure:
    """The synthetic fractures by kind and subtlety, by vertebra and kind, and the look-alikes by kind.

    Args:
        fractures: the generator's answer table (`kit.synthetic.load_answers(dir)["fractures"]` or
            `kit.synthetic.score.read_answers`): one row per fracture with `kind`, `subtlety`, `vertebra`.
        lookalikes: its look-alike table (`kind` per row); None or empty: that panel says so.
    """
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    by_kind = pd.crosstab(fractures["kind"], fractures["subtlety"].fillna("").replace("", "?"))
    colors = {"subtle": "tab:red", "moderate": "tab:orange", "obvious": "tab:green"}
    order = [s for s in colors if s in by_kind.columns] + [c for c in by_kind.columns if c not in colors]
    by_kind[order].plot.bar(stacked=True, ax=axes[0], color=[colors.get(c, "tab:gray") for c in order], rot=0)
    axes[0].set(title=f"Fractures by kind and subtlety ({len(fractures)})", xlabel="", ylabel="fractures")
    by_vertebra = pd.crosstab(fractures["vertebra"].astype(str), fractures["kind"]).reindex(list(VERTEBRAE),
                                                                                             fill_value=0)
    by_vertebra.plot.bar(stacked=True, ax=axes[1], rot=0)
    axes[1].set(title="Fractures by vertebra and kind", xlabel="", ylabel="fractures")
    if lookalikes is not None and len(lookalikes):
        lookalikes["kind"].value_counts().sort_index().plot.barh(ax=axes[2], color="tab:purple")
        axes[2].set(title=f"Look-alikes by kind ({len(lookalikes)})", xlabel="studies' findings", ylabel="")
    else:
        axes[2].text(0.5, 0.5, "no look-alikes in this set", ha="center", va="center")
        axes[2].set(title="Look-alikes by kind", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


def plot_crop_gallery(crops: dict, channel_names: list[str], *, title: str = "") -> plt.Figure:
    """One study's vertebra crops, C1..C7: the centre image channel beside the vertebra's mask channel.

    Each vertebra shows the sampled slice with a fracture target when it has one (else its middle slice).

    Args:
        crops: `kit.stage2.store.load_crops` output (`crops` uint8 (7, T, C, S, S), `found`, `positions`,
            `slice_targets`).
        channel_names: the C channel names (`kit.stage2.crops.stack_channel_names`); the image shown is the first
            window's centre slice ("<window>+0"), the mask the "mask" channel when there is one.
    """
    image_channel = next(i for i, name in enumerate(channel_names) if name.endswith("+0"))
    mask_channel = channel_names.index("mask") if "mask" in channel_names else None
    stacks, found, targets = crops["crops"], crops["found"], crops["slice_targets"]
    fig, axes = plt.subplots(2, len(VERTEBRAE), figsize=(2.1 * len(VERTEBRAE), 4.8), squeeze=False)
    for i, name in enumerate(VERTEBRAE):
        top, bottom = axes[0, i], axes[1, i]
        positive = np.flatnonzero(np.nan_to_num(targets[i]) > 0)
        t = int(positive[len(positive) // 2]) if len(positive) else stacks.shape[1] // 2
        top.imshow(stacks[i, t, image_channel], cmap="gray", vmin=0, vmax=255)
        if mask_channel is not None:
            bottom.imshow(stacks[i, t, mask_channel], cmap="magma", vmin=0, vmax=255)
        status = "not found" if not found[i] else f"slice {t + 1}/{stacks.shape[1]}"
        top.set_title(f"{name}: {status}" + (" · fracture" if len(positive) else ""), fontsize=9,
                      color="red" if len(positive) else "black")
        bottom.set_title("mask" if mask_channel is not None else "no mask channel", fontsize=8)
        for ax in (top, bottom):
            ax.axis("off")
    fig.suptitle(title or "Vertebra crops: image and mask channels")
    fig.tight_layout()
    return fig
