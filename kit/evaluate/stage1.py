"""Stage-1 evaluation: the per-fold OOF tables of the segmenter and the level model, and stage 1 scored as
inference runs it (`score_as_inference`: any trained segmenter run, `kit demo` included)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import VERTEBRAE
from ..io.rsna import UID
from .markdown import fmt
from .oof import OOF_NAME, fold_dirs, fold_tables
from ..paths import PathLike

log = logging.getLogger("kit.evaluate.stage1")

DICE_COLUMNS = tuple(f"dice_{v}" for v in VERTEBRAE)

#: Written at a segmenter run's root by `score_as_inference` (`kit demo` calls it): its held-out studies segmented as
#: inference does (the level model's ranges fed to a level-conditioned segmenter), one row per study / per
#: (study, vertebra).
STAGE1_DICE, STAGE1_Z = "oof_dice.csv", "oof_z_errors.csv"


ZERR_COLUMNS = tuple(f"zerr_{v}" for v in VERTEBRAE)


IOU_COLUMNS = tuple(f"iou_{v}" for v in VERTEBRAE)


SEG_COLUMNS = (UID, "fold", *DICE_COLUMNS, "dice_mean", *ZERR_COLUMNS, "zerr_max")


LEVEL_COLUMNS = (UID, "fold", *IOU_COLUMNS, "iou_mean")


Z_TOLERANCE = 2  # slices: a vertebra's z-range counts as right when both ends are within this many slices


def _read_fold_oof(run_dir: PathLike, columns: Sequence[str], kind: str) -> pd.DataFrame:
    """All `fold*/oof.csv` of a seg or level run, checked against the contract `columns`."""
    oof = fold_tables(run_dir, OOF_NAME)
    missing = [c for c in columns if c not in oof.columns]
    if missing:
        old = " (columns C1..C7 without a prefix: an oof.csv from an older kit; retrain the run)" \
            if all(v in oof.columns for v in VERTEBRAE) else ""
        raise ValueError(f"{run_dir}: the {kind} oof.csv lacks columns {missing}{old}; expected {list(columns)}")
    numeric = [c for c in columns if c != UID]
    oof[numeric] = oof[numeric].apply(pd.to_numeric, errors="coerce")
    return oof


def load_seg_oof(run_dir: PathLike) -> pd.DataFrame:
    """A segmenter run's `fold*/oof.csv` in one table (columns `SEG_COLUMNS`, plus `epoch`, `slices` if present).

    Raises:
        FileNotFoundError: no `fold*/oof.csv`.
        ValueError: a contract column is missing (the message names them).
    """
    return _read_fold_oof(run_dir, SEG_COLUMNS, "segmenter")


def load_stage1_oof(run_dir: PathLike) -> tuple[pd.DataFrame | None, str]:
    """The whole stage 1's held-out scores of a segmenter run, in the segmenter OOF layout, and a note.

    `fold<k>/oof.csv` is the segmenter's own validation; a level-conditioned segmenter (`data.level_input`) is
    validated there given each study's *true* level ranges. `oof_dice.csv` + `oof_z_errors.csv` at the run's root
    (`STAGE1_DICE`, `STAGE1_Z`: `kit demo`) hold the same studies segmented as inference does, with the level
    model's ranges. Returns (table with `StudyInstanceUID, fold, dice_C1..C7, dice_mean, zerr_C1..C7, zerr_max,
    missed`, "") or (None, why there is none); a pair older than the newest `fold*/model.pt` is named as stale
    in the note but still returned.
    """
    run_dir = Path(run_dir)
    dice_path, z_path = run_dir / STAGE1_DICE, run_dir / STAGE1_Z
    if not (dice_path.is_file() and z_path.is_file()):
        return None, f"no {STAGE1_DICE} / {STAGE1_Z} in {run_dir} (written by kit demo)"
    dice = pd.read_csv(dice_path, dtype={UID: str})
    z = pd.read_csv(z_path, dtype={UID: str})
    need = {UID, "fold", *VERTEBRAE, "mean"} - set(dice.columns) | {UID, "vertebra", "error"} - set(z.columns)
    if need:
        raise ValueError(f"{run_dir}: {STAGE1_DICE} / {STAGE1_Z} lack columns {sorted(need)}")
    table = dice[[UID, "fold"]].copy()
    for v in VERTEBRAE:
        table[f"dice_{v}"] = pd.to_numeric(dice[v], errors="coerce")
    table["dice_mean"] = pd.to_numeric(dice["mean"], errors="coerce")
    wide = z.pivot_table(index=UID, columns="vertebra", values="error", aggfunc="max")
    for v in VERTEBRAE:
        table[f"zerr_{v}"] = table[UID].map(wide[v]) if v in wide else np.nan
    table["zerr_max"] = table[list(ZERR_COLUMNS)].max(axis=1)
    names = pd.Series(dtype=str)
    if "missed" in z:
        flagged = z[z["missed"].astype(str).str.lower().isin(["true", "1"])]
        names = flagged.groupby(UID)["vertebra"].agg(", ".join)
    table["missed"] = table[UID].map(names).fillna("")
    models = [m.stat().st_mtime for m in run_dir.glob("fold*/model.pt")]
    written = min(dice_path.stat().st_mtime, z_path.stat().st_mtime)
    note = (f"{STAGE1_DICE} / {STAGE1_Z} are older than the run's newest fold weights: they score an earlier "
            "training (rerun kit demo to refresh them)") if models and written < max(models) else ""
    return table, note


def load_level_oof(run_dir: PathLike) -> pd.DataFrame:
    """A level-model run's `fold*/oof.csv` in one table (columns `LEVEL_COLUMNS`, plus `epoch`, `steps`)."""
    return _read_fold_oof(run_dir, LEVEL_COLUMNS, "level model")


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _nanmedian(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")


def per_vertebra_means(oof: pd.DataFrame, prefix: str) -> dict:
    """Mean over studies of `<prefix>C1..C7` and of `<prefix>mean`, per fold and over all folds.

    NaN (a vertebra absent from the truth) is left out of each mean.

    Returns:
        {"per_fold": [{"fold", "n_studies", "C1".."C7", "mean"}...], "all": {...same keys, fold "all"}}.
    """
    def row(table: pd.DataFrame, fold) -> dict:
        out = {"fold": fold, "n_studies": int(len(table))}
        out.update({v: _nanmean(table[f"{prefix}{v}"]) for v in VERTEBRAE})
        out["mean"] = _nanmean(table[f"{prefix}mean"])
        return out

    return {"per_fold": [row(t, int(k)) for k, t in oof.groupby("fold")], "all": row(oof, "all")}


def zrange_errors(oof: pd.DataFrame, tolerance: float = Z_TOLERANCE) -> dict:
    """z-range errors of a segmenter's OOF, per fold and over all folds.

    For each group of studies: the median error of each vertebra over the studies that show it (a missed
    vertebra is already in the file as the study's slice count; NaN = absent from the truth), the worst of
    those medians and its vertebra, and the share of (study, vertebra) pairs within `tolerance` slices.

    Returns:
        {"tolerance", "per_fold": [{"fold", "median": {C1..C7}, "worst_median", "worst_vertebra", "within",
        "within_per_vertebra": {C1..C7}, "n_vertebrae"}...], "all": {...}}.
    """
    def row(table: pd.DataFrame, fold) -> dict:
        z = table[list(ZERR_COLUMNS)].to_numpy(np.float64)
        medians = {v: _nanmedian(z[:, j]) for j, v in enumerate(VERTEBRAE)}
        finite = {v: m for v, m in medians.items() if math.isfinite(m)}
        worst = max(finite, key=finite.get) if finite else None
        scored = np.isfinite(z)
        within = (z <= tolerance) & scored
        per_v = {v: float(within[:, j].sum() / scored[:, j].sum()) if scored[:, j].any() else float("nan")
                 for j, v in enumerate(VERTEBRAE)}
        return {"fold": fold, "median": medians, "worst_median": finite[worst] if worst else float("nan"),
                "worst_vertebra": worst, "within": float(within.sum() / scored.sum()) if scored.any() else float("nan"),
                "within_per_vertebra": per_v, "n_vertebrae": int(scored.sum())}

    return {"tolerance": tolerance, "per_fold": [row(t, int(k)) for k, t in oof.groupby("fold")],
            "all": row(oof, "all")}


def _lowest_vertebra(row: pd.Series, prefix: str) -> str:
    """"C4 0.812": the vertebra with the lowest `<prefix>_<vertebra>` score of an OOF row, or "–"."""
    scores = {v: row[f"{prefix}_{v}"] for v in VERTEBRAE if pd.notna(row[f"{prefix}_{v}"])}
    if not scores:
        return "–"
    low = min(scores, key=scores.get)
    return f"{low} {fmt(scores[low], 3)}"


def worst_studies(oof: pd.DataFrame, column: str, n: int) -> pd.DataFrame:
    """The `n` rows with the lowest `column` (NaN last), lowest first."""
    return oof.sort_values([column, UID], na_position="last").head(max(int(n), 0)).reset_index(drop=True)


def _spread(values: Sequence[float]) -> dict:
    """Mean, sample sd, min and max of per-fold figures (NaN skipped)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def score_segmented_study(cached: dict, models, level_models, uid: str, fold: int, dice_rows: list,
                          z_rows: list) -> None:
    """Segment one held-out study as inference does and append its Dice per vertebra and z-range errors."""
    from ..evaluate.metrics import dice_per_vertebra, z_range_errors
    from ..stage1.infer import segment_study

    result = segment_study(cached, models, uid=uid, levels=level_models if len(level_models) else None)
    truth = cached["mask"]
    dice_rows.append({UID: uid, "fold": fold, **dice_per_vertebra(result.labels, truth).to_dict()})
    errors = z_range_errors(result.labels, truth)  # a missed vertebra counts as the study's slice count
    for name in VERTEBRAE:
        if np.isfinite(errors[name]):
            z_rows.append({UID: uid, "vertebra": name, "error": errors[name], "missed": not result.extents.get(name)})


def validation_rows(oof_csv: Path, fold: int, dice_rows: list, z_rows: list) -> None:
    """Append the Dice and z-range errors of a segmenter fold's own validation (`oof.csv`, written by
    `kit.tasks.SegTask`: its held-out studies segmented given their true level ranges) in
    `score_segmented_study`'s rows."""
    table = pd.read_csv(oof_csv, dtype={UID: str})
    for _, r in table.iterrows():
        dice_rows.append({UID: r[UID], "fold": fold, **{v: r[f"dice_{v}"] for v in VERTEBRAE}, "mean": r["dice_mean"]})
        for name in VERTEBRAE:
            if np.isfinite(r[f"zerr_{name}"]):  # a missed vertebra counts as the study's slice count
                z_rows.append({UID: r[UID], "vertebra": name, "error": r[f"zerr_{name}"],
                               "missed": r[f"zerr_{name}"] >= r["slices"]})


def stage1_figures(dice_rows: list, z_rows: list, run_root: Path, suffix: str) -> dict:
    """Summary figures of scored studies; writes `oof_dice<suffix>.csv` and `oof_z_errors<suffix>.csv`."""
    dice, z = pd.DataFrame(dice_rows), pd.DataFrame(z_rows)
    z_median = z.groupby("vertebra")["error"].median().reindex(list(VERTEBRAE))
    dice.to_csv(run_root / f"oof_dice{suffix}.csv", index=False)
    z.to_csv(run_root / f"oof_z_errors{suffix}.csv", index=False)
    return {
        "seg_dice": round(float(dice["mean"].mean()), 4),
        "seg_z_error_slices": float(z_median.max()),
        "seg_dice_per_vertebra": {v: round(float(dice[v].mean()), 4) for v in VERTEBRAE},
        "seg_z_error_median_per_vertebra": {v: float(e) for v, e in z_median.items()},
        "seg_vertebrae_missed": int(z["missed"].sum()),
        "seg_heldout_studies": int(dice[UID].nunique()),
        "seg_folds_trained": int(dice["fold"].nunique()),
    }


def score_as_inference(seg_run: PathLike, level_run: PathLike | None, cache_dir: PathLike,
                       folds: Sequence[int] | None = None) -> dict:
    """Stage 1 scored as inference runs it: each trained fold of a segmenter run (with the same fold of a level
    run, fused as `kit.stage1.infer.segment_study` fuses them) segments its held-out studies from the cache
    `cache_dir`; their 3D Dice and z-range errors are written at the run's root (`STAGE1_DICE`, `STAGE1_Z`, which
    `seg_report` reads) and summarised.

    Args:
        seg_run: `runs/<segmenter config>` holding `fold<k>/model.pt`.
        level_run: `runs/<level config>` with the same folds, or None (the segmenter alone).
        cache_dir: the stage-1 cache holding the held-out studies with their masks.
        folds: the folds to score (default: every trained fold of `seg_run`).

    Returns:
        `seg_dice` (mean over held-out studies of the mean 3D Dice over C1..C7, after clean-up),
        `seg_z_error_slices` (the worst vertebra's median z-range error, in slices: per study and vertebra the
        larger of |first slice error| and |last slice error|, a missed vertebra counted as the study's slice
        count), the per-vertebra figures behind both, and the same two figures without the level model
        (`seg_alone_*`) or, for a level-conditioned segmenter (`data.level_input`), given the true level ranges
        (`seg_true_levels_*`, read from the segmenter's own validation, which segments the same studies that way).
    """
    from ..io.cache import load_cached
    from ..runs import load_run
    from ..stage1.data import split_segmentation_studies

    seg_run = Path(seg_run)
    folds = sorted(fold_dirs(seg_run)) if folds is None else list(folds)
    rows = {"fused": ([], []), "alone": ([], [])}
    conditioned = False
    for fold in folds:
        models = load_run(seg_run, folds=[fold])
        cfg = models[0].config
        conditioned = bool(cfg.data.level_input)
        level_models = load_run(level_run, folds=[fold]) if level_run else []
        for uid in split_segmentation_studies(cfg.data)[1]:
            cached = load_cached(cache_dir, uid)
            score_segmented_study(cached, models, level_models, uid, fold, *rows["fused"])
            if not conditioned and level_models:
                score_segmented_study(cached, models, [], uid, fold, *rows["alone"])
        if conditioned:  # the trainer's validation segmented the same studies given their true level ranges
            validation_rows(seg_run / f"fold{fold}" / "oof.csv", fold, *rows["alone"])
    out = stage1_figures(*rows["fused"], seg_run, "")
    if rows["alone"][0]:
        key = "true_levels" if conditioned else "alone"
        alone = stage1_figures(*rows["alone"], seg_run, "_true_levels" if conditioned else "_segmenter_alone")
        out.update({f"seg_{key}_dice": alone["seg_dice"], f"seg_{key}_z_error_slices": alone["seg_z_error_slices"]})
    return out
