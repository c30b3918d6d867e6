"""Stage-1 reports: the segmenter's and the level model's plots, pictures of single studies and markdown reports."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from ..constants import VERTEBRAE
from ..io.rsna import UID
from .markdown import file_slug, fmt, jsonable, md_table
from .oof import _first_fold_config
from .plots import _COLORS, _save, plot_training_curves
from .stage1 import (
    STAGE1_DICE,
    STAGE1_Z,
    Z_TOLERANCE,
    ZERR_COLUMNS,
    _lowest_vertebra,
    _nanmean,
    _nanmedian,
    _spread,
    load_level_oof,
    load_seg_oof,
    load_stage1_oof,
    per_vertebra_means,
    worst_studies,
    zrange_errors,
)
from ..paths import PathLike

log = logging.getLogger("kit.evaluate.stage1_report")


class _PerFold:
    """`load(fold)` called once per fold: its value, or the same error again on every later call."""

    def __init__(self, load: Callable[[int], object]) -> None:
        self.load = load
        self.done: dict[int, tuple[object, Exception | None]] = {}

    def __call__(self, fold: int):
        if fold not in self.done:
            try:
                self.done[fold] = (self.load(fold), None)
            except Exception as exc:  # kept: the report says why, for each study of the fold
                self.done[fold] = (None, exc)
        value, exc = self.done[fold]
        if exc is not None:
            raise exc
        return value


def _fold_loaders(run_dir: Path) -> tuple[_PerFold, _PerFold]:
    """(config of a fold, segmenter of a fold): loaded on first use, once."""

    def config(fold: int):
        from ..config import load_config

        path = run_dir / f"fold{fold}" / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"no {path} to find the cache and the model's input")
        return load_config(path)

    def models(fold: int):
        from ..runs import load_run

        return load_run(run_dir, folds=[fold])

    return _PerFold(config), _PerFold(models)


def _study_picture(run_dir: Path, loaders: tuple[_PerFold, _PerFold], fold: int, uid: str, path: Path,
                   title: str) -> str | None:
    """Segment one held-out study with its fold's model and save the sagittal picture at `path`.

    Returns:
        None when the picture was written, else why not (no config, cache, mask or model, or segmenting
        failed), for the report to say.
    """
    config, models = loaders
    try:
        from ..io.cache import load_cached
        from ..stage1.infer import segment_study
        from ..stage1.recipe import true_presence

        cfg = config(fold)
        cached = load_cached(cfg.data.cache_dir, uid)
        if "mask" not in cached:
            return f"the cached study in {cfg.data.cache_dir} has no mask to compare with"
        levels = true_presence(cached["mask"]) if cfg.data.level_input else None
        result = segment_study(cached, models(fold), uid=uid, levels=levels)
        fig = plot_segmentation(cached["image"], result.labels, cached["mask"],
                                spacing=cached.get("spacing"), title=title)
        _save(fig, path)
        return None
    except Exception as exc:
        log.warning("%s, study %s: no picture (%s: %s)", run_dir, uid, type(exc).__name__, exc)
        return f"{type(exc).__name__}: {exc}"


def _vertebra_table(rows: Sequence[dict], last: str, digits: int = 3) -> list[list[str]]:
    """Markdown rows `fold | C1..C7 | <last>` from dicts holding those keys."""
    out = []
    for r in rows:
        name = "**all folds**" if r["fold"] == "all" else f"fold {r['fold']}"
        out.append([name] + [fmt(r[v], digits) for v in VERTEBRAE] + [fmt(r[last], digits)])
    return out


def _curves(run_dir: Path, out_dir: Path, pngs: list[Path]) -> list[str]:
    """The training-curves section: the PNG, or why there is none."""
    lines = ["## Training curves", ""]
    try:
        pngs.append(_save(plot_training_curves(run_dir), out_dir / "training_curves.png"))
        lines += ["Loss (train solid, validation dashed) and the validation metric per epoch, one colour a fold.", "",
                  "![Training curves](training_curves.png)", ""]
    except FileNotFoundError as exc:
        lines += [f"No curves: {exc}.", ""]
    return lines


def _intro(kind: str, run_dir: Path, oof: pd.DataFrame) -> list[str]:
    folds = sorted(oof["fold"].unique())
    epochs = ""
    if "epoch" in oof:
        by_fold = oof.groupby("fold")["epoch"].first()
        epochs = " (best epoch " + ", ".join(f"fold {k}: {int(e)}" for k, e in by_fold.items() if pd.notna(e)) + ")"
    return [f"# {kind} report: {run_dir.resolve().name}", "",
            f"`{run_dir}`: {len(oof)} held-out studies in {len(folds)} fold(s) ({', '.join(map(str, folds))}), "
            f"each scored by its fold's best weights{epochs}.", ""]


def _out_dir(run_dir: Path, out_dir: PathLike | None) -> Path:
    out = run_dir if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _finish(result: dict, lines: list[str], out_dir: Path) -> dict:
    """Write report.md and report.json; add their paths to `result`."""
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    md_path.write_text("\n".join(lines) + "\n")
    result["pngs"] = [str(p) for p in result["pngs"]]
    result["report_md"], result["report_json"] = str(md_path), str(json_path)
    json_path.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    log.info("%s report for %s -> %s", result["kind"], result["run"], md_path)
    return result


def _seg_headline(dice_all: dict, z_all: dict, tol: str) -> str:
    """"Dice … | worst median z-error … slices (C…) | …% of vertebrae within … slices" of one set of studies."""
    return (f"Dice {fmt(dice_all['mean'], 3)} | worst median z-error {fmt(z_all['worst_median'], 1)} slices "
            f"({z_all['worst_vertebra'] or '–'}) | {fmt(100 * z_all['within'], 0)}% of vertebrae within {tol} slices")


def seg_report(run_dir: PathLike, out_dir: PathLike | None = None, *, n_worst: int = 5,
               tolerance: float = Z_TOLERANCE, pictures: bool = True) -> dict:
    """Report a segmenter run (`task: seg`): Dice and z-range errors per vertebra and fold, curves, worst studies.

    Writes `report.md`, `report.json`, `dice_per_vertebra.png`, `zrange_errors.png`, `training_curves.png` and
    one `worst_<rank>_<uid>.png` per worst study: a sagittal view of the cached study with the fold model's
    labels next to the true ones. A picture that cannot be made (no cache, no mask, no model) is replaced by a
    line in report.md saying why; the report itself does not fail for it.

    Args:
        run_dir: `runs/<name>` with `fold<k>/oof.csv` (columns `SEG_COLUMNS`), `log.csv`, `config.yaml`, `model.pt`.
        out_dir: where to write (default: the run folder).
        n_worst: how many of the lowest-Dice studies to list and picture.
        tolerance: slices within which a z-range counts as right.
        pictures: segment the worst studies for their pictures (off: list them only).

    Returns:
        dict with `kind` ("seg"), `run`, `run_dir`, `out_dir`, `n_studies`, `folds`, `dice`
        (`per_vertebra_means`), `zrange` (`zrange_errors`), `spread` (mean/sd/min/max over folds of
        `mean_dice`, `worst_median`, `within`), `worst` (rows of the worst studies), `pictures` ({uid: png}),
        `missing_pictures` ({uid: reason}), `pngs`, `headline`, `report_md`, `report_json`.
    """
    run_dir = Path(run_dir)
    oof = load_seg_oof(run_dir)
    out_dir = _out_dir(run_dir, out_dir)
    dice = per_vertebra_means(oof, "dice_")
    zerr = zrange_errors(oof, tolerance)
    spread = {"mean_dice": _spread([r["mean"] for r in dice["per_fold"]]),
              "worst_median": _spread([r["worst_median"] for r in zerr["per_fold"]]),
              "within": _spread([r["within"] for r in zerr["per_fold"]])}
    name = run_dir.resolve().name
    pngs = [_save(plot_dice_per_vertebra(run_dir), out_dir / "dice_per_vertebra.png"),
            _save(plot_zrange_errors(oof, f"{name}: z-range errors ({len(oof)} studies)", tolerance),
                  out_dir / "zrange_errors.png")]
    tol = f"{tolerance:g}"
    a, za = dice["all"], zerr["all"]
    headline = _seg_headline(a, za, tol)

    lines = _intro("Segmenter", run_dir, oof)
    lines += ["3D Dice per vertebra after the clean-up. z-range error = max(|first slice error|, |last slice "
              "error|) in slices; a vertebra the prediction misses counts as the study's slice count, one absent "
              "from the truth is left out. *Worst median* = the largest of the per-vertebra medians.", ""]
    stage1, stale = load_stage1_oof(run_dir)
    conditioned = bool((_first_fold_config(run_dir).get("data") or {}).get("level_input"))
    if stage1 is not None:
        s_dice, s_z = per_vertebra_means(stage1, "dice_"), zrange_errors(stage1, tolerance)
        sza = s_z["all"]
        s_head = _seg_headline(s_dice["all"], sza, tol)
        lines += ["## Summary", "", f"**Whole stage 1 (as inference runs it): {s_head}**", "",
                  f"Segmenter validation{' (true level ranges)' if conditioned else ''}: {headline}", ""]
    else:
        lines += ["## Summary", "", f"**{headline}**", ""]
    rows = []
    for d, z in zip(dice["per_fold"], zerr["per_fold"]):
        rows.append([f"fold {d['fold']}", str(d["n_studies"]), fmt(d["mean"], 3), fmt(z["worst_median"], 1),
                     z["worst_vertebra"] or "–", fmt(z["within"], 3)])
    rows.append(["**all folds**", str(a["n_studies"]), fmt(a["mean"], 3), fmt(za["worst_median"], 1),
                 za["worst_vertebra"] or "–", fmt(za["within"], 3)])
    if len(dice["per_fold"]) > 1:
        rows.append(["mean ± sd over folds", ""] + [f"{fmt(spread[k]['mean'], p)} ± {fmt(spread[k]['sd'], p)}"
                                                     for k, p in (("mean_dice", 3), ("worst_median", 1))]
                    + ["", f"{fmt(spread['within']['mean'], 3)} ± {fmt(spread['within']['sd'], 3)}"])
    lines += [md_table(["fold", "studies", "mean Dice", "worst median z-error", "worst vertebra",
                      f"share within {tol} slices"], rows), ""]
    if conditioned:
        lines += ["The segmenter takes the level model's vertebra ranges as input (`data.level_input`): the figures "
                  "above are its own validation, given each study's *true* ranges (what a perfect level model "
                  "would give)." + (" The same studies segmented as inference runs them follow." if stage1 is not None
                                    else f" No figures of the whole stage here: {stale}."), ""]
    stage1_result = None
    if stage1 is not None:
        s_rows = [{**z["median"], "fold": z["fold"], "worst": z["worst_median"]} for z in [*s_z["per_fold"], sza]]
        missed = [f"{r[UID]} ({r['missed']})" for _, r in stage1.iterrows() if r["missed"]]
        lines += ["## Stage 1 as inference runs it", "",
                  f"`{STAGE1_DICE}`, `{STAGE1_Z}` (written by `kit demo`): {len(stage1)} held-out studies segmented by "
                  "`kit.stage1.infer.segment_study`" + (" with the level model's ranges" if conditioned else "") + ".", "",
                  f"**{s_head}**", ""]
        lines += [f"Note: {stale}.", ""] if stale else []
        lines += [md_table(["fold", *VERTEBRAE, "worst"], _vertebra_table(s_rows, "worst", 1)), "",
                  "Vertebrae missed (counted as the study's slice count): " + ("; ".join(missed) or "none") + ".", ""]
        stage1_result = {"dice": s_dice, "zrange": s_z, "headline": s_head, "stale": stale or None,
                         "n_studies": int(len(stage1))}
    lines += ["## Dice per vertebra", "", "Mean over the held-out studies that show the vertebra.", "",
              md_table(["fold", *VERTEBRAE, "mean"], _vertebra_table([*dice["per_fold"], a], "mean")), "",
              "![Dice per vertebra](dice_per_vertebra.png)", ""]
    med_rows = [{**z["median"], "fold": z["fold"], "worst": z["worst_median"]} for z in [*zerr["per_fold"], za]]
    share_rows = [{**z["within_per_vertebra"], "fold": z["fold"], "all": z["within"]} for z in [*zerr["per_fold"], za]]
    lines += ["## z-range error per vertebra", "", "### Median error (slices)", "",
              md_table(["fold", *VERTEBRAE, "worst"], _vertebra_table(med_rows, "worst", 1)), "",
              f"### Share of studies within {tol} slices", "",
              md_table(["fold", *VERTEBRAE, "all"], _vertebra_table(share_rows, "all")), "",
              "![z-range errors](zrange_errors.png)", ""]
    lines += _curves(run_dir, out_dir, pngs)

    worst = worst_studies(oof, "dice_mean", n_worst)
    lines += ["## Worst studies", "", f"The {len(worst)} held-out studies with the lowest mean Dice.", ""]
    table_rows = []
    for i, r in worst.iterrows():
        missed = [v for v in VERTEBRAE if "slices" in r and pd.notna(r[f"zerr_{v}"]) and r[f"zerr_{v}"] >= r["slices"]]
        table_rows.append([str(i + 1), f"`{r[UID]}`", str(int(r["fold"])), fmt(r["dice_mean"], 3),
                           _lowest_vertebra(r, "dice"), fmt(r["zerr_max"], 0), ", ".join(missed) or "–"])
    lines += [md_table(["rank", "study", "fold", "mean Dice", "lowest vertebra", "max z-error", "missed"],
                     table_rows, "rlrrlrl"), ""]
    loaders, shown, missing = _fold_loaders(run_dir), {}, {}
    for i, r in worst.iterrows():
        uid, fold = r[UID], int(r["fold"])
        lines += [f"### {i + 1}. {uid} (fold {fold}, mean Dice {fmt(r['dice_mean'], 3)})", ""]
        png = out_dir / f"worst_{i + 1}_{file_slug(uid)}.png"
        reason = "pictures were turned off" if not pictures else _study_picture(
            run_dir, loaders, fold, uid, png, f"{uid}: fold {fold}, mean Dice {fmt(r['dice_mean'], 3)}")
        if reason is None:
            shown[uid] = str(png)
            pngs.append(png)
            lines += [f"![{uid}: predicted and true labels]({png.name})", ""]
        else:
            missing[uid] = reason
            lines += [f"Picture missing for {uid}: {reason}", ""]

    result = {"kind": "seg", "run": name, "run_dir": str(run_dir), "out_dir": str(out_dir),
              "n_studies": int(len(oof)), "folds": sorted(int(k) for k in oof["fold"].unique()),
              "dice": dice, "zrange": zerr, "spread": spread,
              "worst": worst.to_dict(orient="records"), "pictures": shown, "missing_pictures": missing,
              "pngs": pngs, "validation_headline": headline, "stage1": stage1_result,
              "headline": f"{stage1_result['headline']} (whole stage 1)" if stage1_result else headline}
    return _finish(result, lines, out_dir)


def level_report(run_dir: PathLike, out_dir: PathLike | None = None, *, n_worst: int = 5) -> dict:
    """Report a level-model run (`task: level`): IoU per vertebra and fold, curves, worst studies.

    The IoU of a vertebra is that of the predicted and true sets of slices (steps) showing it, per study.
    Writes `report.md`, `report.json`, `iou_per_vertebra.png` and `training_curves.png`.

    Args:
        run_dir: `runs/<name>` with `fold<k>/oof.csv` (columns `LEVEL_COLUMNS`) and `log.csv`.
        out_dir: where to write (default: the run folder).
        n_worst: how many of the lowest-IoU studies to list.

    Returns:
        dict with `kind` ("level"), `run`, `run_dir`, `out_dir`, `n_studies`, `folds`, `iou`
        (`per_vertebra_means`), `spread` (of `mean_iou` over folds), `worst`, `pngs`, `headline`,
        `report_md`, `report_json`.
    """
    run_dir = Path(run_dir)
    oof = load_level_oof(run_dir)
    out_dir = _out_dir(run_dir, out_dir)
    iou = per_vertebra_means(oof, "iou_")
    spread = {"mean_iou": _spread([r["mean"] for r in iou["per_fold"]])}
    a = iou["all"]
    per_v = {v: a[v] for v in VERTEBRAE if math.isfinite(a[v])}
    low = min(per_v, key=per_v.get) if per_v else None
    headline = f"IoU {fmt(a['mean'], 3)} | lowest vertebra {low or '–'} {fmt(per_v.get(low), 3)}"
    pngs = [_save(plot_iou_per_vertebra(run_dir), out_dir / "iou_per_vertebra.png")]

    lines = _intro("Level model", run_dir, oof)
    lines += ["IoU per vertebra: of the predicted (p > 0.5) and true sets of slices showing it, per held-out "
              "study; a vertebra absent from the truth is left out.", "", "## Summary", "", f"**{headline}**", ""]
    rows = [[f"fold {r['fold']}", str(r["n_studies"]), fmt(r["mean"], 3)] for r in iou["per_fold"]]
    rows.append(["**all folds**", str(a["n_studies"]), fmt(a["mean"], 3)])
    if len(iou["per_fold"]) > 1:
        rows.append(["mean ± sd over folds", "", f"{fmt(spread['mean_iou']['mean'], 3)} ± "
                                                 f"{fmt(spread['mean_iou']['sd'], 3)}"])
    lines += [md_table(["fold", "studies", "mean IoU"], rows), ""]
    lines += ["## IoU per vertebra", "",
              md_table(["fold", *VERTEBRAE, "mean"], _vertebra_table([*iou["per_fold"], a], "mean")), "",
              "![IoU per vertebra](iou_per_vertebra.png)", ""]
    lines += _curves(run_dir, out_dir, pngs)
    worst = worst_studies(oof, "iou_mean", n_worst)
    lines += ["## Worst studies", "", f"The {len(worst)} held-out studies with the lowest mean IoU.", ""]
    rows = []
    for i, r in worst.iterrows():
        rows.append([str(i + 1), f"`{r[UID]}`", str(int(r["fold"])), str(int(r["steps"])) if "steps" in r else "–",
                     fmt(r["iou_mean"], 3), _lowest_vertebra(r, "iou")])
    lines += [md_table(["rank", "study", "fold", "steps", "mean IoU", "lowest vertebra"], rows, "rlrrrl"), ""]

    result = {"kind": "level", "run": run_dir.resolve().name, "run_dir": str(run_dir), "out_dir": str(out_dir),
              "n_studies": int(len(oof)), "folds": sorted(int(k) for k in oof["fold"].unique()), "iou": iou,
              "spread": spread, "worst": worst.to_dict(orient="records"), "pngs": pngs, "headline": headline}
    return _finish(result, lines, out_dir)


def _plot_per_vertebra(oof: pd.DataFrame, prefix: str, label: str, title: str) -> Figure:
    """Bars: the mean of `<prefix>C1..C7` per fold; black dots: every held-out study."""
    folds = sorted(oof["fold"].unique())
    fig = Figure(figsize=(max(6.5, 1.0 * len(VERTEBRAE) * (1 + 0.25 * len(folds))), 4.0))
    ax = fig.subplots()
    width = 0.8 / len(folds)
    x = np.arange(len(VERTEBRAE))
    for i, k in enumerate(folds):
        rows = oof[oof["fold"] == k]
        means = [_nanmean(rows[f"{prefix}{v}"]) for v in VERTEBRAE]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, np.nan_to_num(means), width * 0.9, color=_COLORS[(i + 1) % len(_COLORS)], alpha=0.75,
               label=f"fold {k} ({len(rows)} studies, mean {_nanmean(rows[f'{prefix}mean']):.3f})")
        for j, v in enumerate(VERTEBRAE):
            vals = rows[f"{prefix}{v}"].dropna().to_numpy()
            ax.plot(np.full(len(vals), pos[j]), vals, ".", color="black", ms=3, alpha=0.6)
    for j, v in enumerate(VERTEBRAE):
        ax.text(j, 1.03, f"{_nanmean(oof[f'{prefix}{v}']):.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, VERTEBRAE)
    ax.set(ylim=(0, 1.1), ylabel=label, title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def plot_dice_per_vertebra(run_dir: PathLike) -> Figure:
    """Out-of-fold 3D Dice of C1..C7: one bar per fold (its mean), a dot per held-out study, the all-fold mean
    above each vertebra. Reads `fold*/oof.csv` (`dice_C1..dice_C7`, `dice_mean`).

    Returns:
        The Figure.
    """
    oof = load_seg_oof(run_dir)
    return _plot_per_vertebra(oof, "dice_", "Dice", f"{Path(run_dir).resolve().name}: OOF Dice per vertebra "
                              f"({len(oof)} studies), mean {_nanmean(oof['dice_mean']):.3f}")


def plot_iou_per_vertebra(run_dir: PathLike) -> Figure:
    """The level model's out-of-fold IoU of the slices showing C1..C7, per fold (`iou_C1..iou_C7`)."""
    oof = load_level_oof(run_dir)
    return _plot_per_vertebra(oof, "iou_", "IoU of the slices showing it",
                              f"{Path(run_dir).resolve().name}: OOF level IoU per vertebra ({len(oof)} studies), "
                              f"mean {_nanmean(oof['iou_mean']):.3f}")


def plot_zrange_errors(oof: pd.DataFrame, title: str = "", tolerance: float = Z_TOLERANCE) -> Figure:
    """z-range errors per vertebra: their spread (box plot over all folds, symlog scale, per-fold medians as
    markers) and the share of studies within `tolerance` slices, per fold.

    Args:
        oof: `load_seg_oof` table (`zerr_C1..zerr_C7`, `fold`).
        title: figure title.
        tolerance: slices; drawn as a dashed line.
    """
    folds = sorted(oof["fold"].unique())
    fig = Figure(figsize=(12, 4.2))
    left, right = fig.subplots(1, 2)
    data = [oof[f"zerr_{v}"].dropna().to_numpy() for v in VERTEBRAE]
    x = np.arange(1, len(VERTEBRAE) + 1)
    left.boxplot([d if len(d) else [np.nan] for d in data], positions=x, widths=0.5, showfliers=True)
    for i, k in enumerate(folds):
        rows = oof[oof["fold"] == k]
        medians = [_nanmedian(rows[f"zerr_{v}"]) for v in VERTEBRAE]
        left.plot(x + 0.3 * (i / max(len(folds) - 1, 1) - 0.5) * (len(folds) > 1), medians, "D", ms=4,
                  color=_COLORS[(i + 1) % len(_COLORS)], label=f"fold {k} median")
    left.axhline(tolerance, ls="--", color="tab:red", lw=1, label=f"{tolerance:g} slices")
    top = max([float(np.max(d)) for d in data if len(d)] + [tolerance])
    left.set_yscale("symlog", linthresh=1.0)
    left.set_ylim(-0.1, top * 1.6 + 1)
    left.yaxis.set_major_formatter(ScalarFormatter())
    left.set_xticks(x, VERTEBRAE)
    left.set(ylabel="z-range error (slices)", title="error per vertebra (missed = study's slice count)")
    left.grid(alpha=0.3, axis="y")
    left.legend(fontsize=7)
    width = 0.8 / len(folds)
    for i, k in enumerate(folds):
        z = oof.loc[oof["fold"] == k, list(ZERR_COLUMNS)].to_numpy(np.float64)
        scored = np.isfinite(z).sum(0)
        share = np.where(scored > 0, ((z <= tolerance) & np.isfinite(z)).sum(0) / np.maximum(scored, 1), np.nan)
        right.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(share), width * 0.9,
                  color=_COLORS[(i + 1) % len(_COLORS)], alpha=0.75, label=f"fold {k}")
    right.set_xticks(x, VERTEBRAE)
    right.set(ylim=(0, 1.05), ylabel=f"share within {tolerance:g} slices", title="studies with the range right")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(Z, H', W') -> (Z, height, width) by nearest pixel centres (for display only)."""
    ys = np.minimum(((np.arange(height) + 0.5) * labels.shape[1] / height).astype(int), labels.shape[1] - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * labels.shape[2] / width).astype(int), labels.shape[2] - 1)
    return labels[:, ys][:, :, xs]


def plot_segmentation(image: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None, *,
                      spacing: Sequence[float] | None = None, column: int | None = None, title: str = "") -> Figure:
    """Sagittal view of a prepared volume with predicted labels (and the true ones beside them).

    Args:
        image: uint8 (Z, S, S) prepared CT, superior-first (head at the top of the plot).
        labels: (Z, S', S') predicted labels, 1..7 = C1..C7 (resized to the image's S by nearest pixel if S' != S).
        truth: (Z, S, S) true labels, drawn in a second panel when given.
        spacing: (dz, dy, dx) mm of `image` for the aspect ratio (default: square pixels).
        column: x index of the sagittal plane (default: the centroid column of the labels shown).
        title: figure title.

    Returns:
        The Figure.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if labels.shape[1:] != image.shape[1:]:
        labels = _resize_nearest(labels, *image.shape[1:])
    if labels.shape[0] != image.shape[0] or (truth is not None and np.shape(truth) != image.shape):
        raise ValueError(f"image {image.shape}, labels {labels.shape} and truth "
                         f"{None if truth is None else np.shape(truth)} must have the same slices and size")
    shown = [("predicted", labels)] + ([("true", np.asarray(truth))] if truth is not None else [])
    if column is None:
        ref = shown[-1][1] if (shown[-1][1] > 0).any() else labels
        xs = np.nonzero((ref > 0) & (ref <= len(VERTEBRAE)))[2]
        column = int(np.round(xs.mean())) if len(xs) else image.shape[2] // 2
    aspect = 1.0 if spacing is None else float(spacing[0]) / float(spacing[1])
    height = float(np.clip(4.5 * image.shape[0] * aspect / image.shape[1], 3.0, 9.0)) + 0.8
    fig = Figure(figsize=(4.5 * len(shown), height))
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, (name, lab) in zip(axes, shown):
        ax.imshow(image[:, :, column], cmap="gray", aspect=aspect, vmin=0, vmax=255)
        plane = np.where(lab[:, :, column] <= len(VERTEBRAE), lab[:, :, column], 0).astype(float)
        ax.imshow(np.ma.masked_where(plane == 0, plane), cmap="tab10", vmin=1, vmax=10, alpha=0.5,
                  aspect=aspect, interpolation="nearest")
        for v, vname in enumerate(VERTEBRAE, start=1):
            zs = np.nonzero((lab == v).any(axis=(1, 2)))[0]
            if len(zs):
                ax.text(1, zs.mean(), vname, color="yellow", fontsize=8, va="center")
        ax.set(title=f"{name} (x = {column})", xlabel="y", ylabel="slice")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
