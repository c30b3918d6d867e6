"""Plots of OOF predictions (ROC, calibration, histograms) and training curves: matplotlib figures the reports save."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from ..constants import TARGETS, VERTEBRAE
from .metrics import (
    calibration_table,
    roc_auc,
    roc_curve,
)
from .oof import fold_tables
from ..paths import PathLike

_COLORS = ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


_GROUPS = (("patient_overall", ("patient_overall",)), ("vertebrae C1-C7 (pooled)", VERTEBRAE))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_roc(y: np.ndarray, p: np.ndarray, title: str) -> Figure:
    """ROC curves: patient_overall on the left, C1..C7 on the right; AUCs in the legends."""
    fig = Figure(figsize=(12, 5.2))
    axes = fig.subplots(1, 2)
    for ax, targets in zip(axes, (("patient_overall",), VERTEBRAE)):
        for t in targets:
            j = TARGETS.index(t)
            auc = roc_auc(y[:, j], p[:, j])
            if math.isnan(auc):
                ax.plot([], [], color=_COLORS[j], label=f"{t}: one class only")
                continue
            fpr, tpr = roc_curve(y[:, j], p[:, j])
            ax.plot(fpr, tpr, color=_COLORS[j], lw=2 if t == "patient_overall" else 1.4,
                    label=f"{t}  AUC {auc:.3f}  (n+ {int(y[:, j].sum())})")
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance (AUC 0.5)")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
               ylabel="true positive rate (sensitivity)", aspect="equal")
        ax.set_title("patient_overall" if len(targets) == 1 else "per vertebra", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    fig.suptitle(f"ROC curves: {title}", fontsize=13)
    return fig


def plot_calibration(y: np.ndarray, p: np.ndarray, title: str, n_bins: int = 10) -> Figure:
    """Reliability diagrams for patient_overall and the pooled vertebrae, with prediction counts below."""
    fig = Figure(figsize=(12, 6.2))
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1), hspace=0.08)
    for col, (name, targets) in enumerate(_GROUPS):
        idx = [TARGETS.index(t) for t in targets]
        yy, pp = y[:, idx].ravel(), p[:, idx].ravel()
        table = calibration_table(yy, pp, n_bins)
        ax = fig.add_subplot(grid[0, col])
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
        ax.plot(table["mean_pred"], table["frac_pos"], "o-", color=_COLORS[0 if col == 0 else 1], lw=1.8,
                label=f"model ({n_bins} equal-width bins)")
        ax.axhline(yy.mean(), color="0.3", lw=0.8, ls=":", label=f"prevalence {yy.mean():.3f}")
        ece = float((table["count"] * (table["mean_pred"] - table["frac_pos"]).abs()).sum() / max(len(pp), 1))
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed fraction fractured")
        ax.set_title(f"{name}  (ECE {ece:.3f})", fontsize=11)
        ax.tick_params(labelbottom=False)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8.5)
        hist = fig.add_subplot(grid[1, col], sharex=ax)
        hist.bar((table["bin_lo"] + table["bin_hi"]) / 2, table["count"], width=1.0 / n_bins * 0.9, color="0.55")
        hist.set(xlabel="mean predicted probability", ylabel="predictions", yscale="log")
        hist.yaxis.set_major_formatter(ScalarFormatter())
        hist.yaxis.set_minor_formatter(NullFormatter())
        hist.grid(alpha=0.3)
    fig.suptitle(f"Reliability: {title}", fontsize=13)
    return fig


def plot_histograms(y: np.ndarray, p: np.ndarray, title: str, bins: int = 25) -> Figure:
    """Predicted probabilities split by true label, for patient_overall and the pooled vertebrae."""
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (name, targets) in zip(axes, _GROUPS):
        idx = [TARGETS.index(t) for t in targets]
        yy, pp = y[:, idx].ravel(), p[:, idx].ravel()
        for label, color, text in ((0, "tab:blue", "not fractured"), (1, "tab:red", "fractured")):
            vals = pp[yy == label]
            if len(vals):
                ax.hist(vals, bins=edges, color=color, alpha=0.45, density=True,
                        label=f"{text} (n={len(vals)}, mean p {vals.mean():.3f})")
                ax.hist(vals, bins=edges, color=color, histtype="step", lw=1.4, density=True)
        ax.set(xlim=(0, 1), xlabel="predicted probability of fracture", ylabel="density")
        ax.set_title(name, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", fontsize=8.5)
    fig.suptitle(f"Predictions by true label: {title}", fontsize=13)
    return fig


def plot_training_curves(run_dir: PathLike) -> Figure:
    """Train / validation loss and the validation metric per epoch, one colour per fold, from `fold*/log.csv`.

    Args:
        run_dir: `runs/<name>` whose folds hold `log.csv` (epoch, train_loss, val_loss, val_<metric>, lr, ...).

    Returns:
        The Figure: loss on the left, `val_<metric>` (e.g. val_dice, val_iou) on the right when logged.
    """
    table = fold_tables(run_dir, "log.csv")
    metric = next((c for c in table.columns if c.startswith("val_") and c != "val_loss"), None)
    fig = Figure(figsize=(11 if metric else 5.5, 3.8))
    axes = fig.subplots(1, 2 if metric else 1, squeeze=False)[0]
    for i, (fold, rows) in enumerate(table.groupby("fold")):
        color = _COLORS[i % len(_COLORS)]
        axes[0].plot(rows["epoch"], rows["train_loss"], "-o", ms=3, color=color, label=f"fold {fold} train")
        if "val_loss" in rows:
            val = rows.dropna(subset=["val_loss"])
            axes[0].plot(val["epoch"], val["val_loss"], "--s", ms=3, color=color, label=f"fold {fold} val")
        if metric:
            val = rows.dropna(subset=[metric])
            axes[1].plot(val["epoch"], val[metric], "-o", ms=3, color=color, label=f"fold {fold}")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    if metric:
        axes[1].set(title=metric.replace("_", " "), xlabel="epoch", ylim=(0, 1.02))
        axes[1].legend(fontsize=7)
        axes[1].grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).resolve().name}: training curves")
    fig.tight_layout()
    return fig
