"""OOF tables: reading a run's oof.csv files, blends, training-fold baselines."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..constants import TARGETS
from ..io.rsna import UID, check_train, load_train
from .metrics import (
    competition_score,
    roc_auc_per_target,
)
from ..paths import PathLike

log = logging.getLogger("kit.evaluate.oof")

TRUE_SUFFIX = "_true"


TRUE_COLUMNS = tuple(f"{t}{TRUE_SUFFIX}" for t in TARGETS)


OOF_NAME = "oof.csv"


MEAN_BLEND = "mean blend"


FITTED_BLEND = "fitted blend"


def find_oof_files(run_dir: PathLike) -> list[Path]:
    """The OOF files of a run: `fold*/oof.csv` sorted by fold number, else `oof.csv` at the run root.

    Raises:
        FileNotFoundError: the run folder holds neither.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    per_fold = [p for p in run_dir.glob(f"fold*/{OOF_NAME}") if p.parent.name[4:].isdigit()]
    if per_fold:
        return sorted(per_fold, key=lambda p: int(p.parent.name[4:]))
    if (run_dir / OOF_NAME).is_file():
        return [run_dir / OOF_NAME]
    raise FileNotFoundError(
        f"{run_dir}: no OOF predictions; expected {run_dir}/fold<k>/{OOF_NAME} or {run_dir}/{OOF_NAME}")


def _read_labels(labels) -> pd.DataFrame:
    """A checked label table (StudyInstanceUID + TARGETS) from a DataFrame, a CSV path or a data root folder."""
    if isinstance(labels, pd.DataFrame):
        return check_train(labels, "labels")[[UID, *TARGETS]]
    path = Path(labels)
    if path.is_dir():
        return load_train(path)
    return check_train(pd.read_csv(path, dtype={UID: str}), str(path))[[UID, *TARGETS]]


def load_oof(run_dir: PathLike, *, labels=None) -> pd.DataFrame:
    """All OOF predictions of one run in one table: `StudyInstanceUID, fold, TARGETS..., <target>_true...`.

    Args:
        run_dir: the run folder.
        labels: optional label table (DataFrame, CSV path or data root); when given, the `_true` columns
            come from it (and must agree with the file's own `_true` columns where those exist).

    Raises:
        ValueError: a file lacks contract columns, a probability is outside [0, 1] or NaN, a label is not 0/1,
            a study appears twice, or the labels disagree.
    """
    frames = []
    for path in find_oof_files(run_dir):
        df = pd.read_csv(path, dtype={UID: str})
        need = [UID, "fold", *TARGETS] + ([] if labels is not None else list(TRUE_COLUMNS))
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; an OOF file needs {need}")
        p = df[list(TARGETS)].apply(pd.to_numeric, errors="coerce")
        bad = (p.isna() | (p < 0) | (p > 1)).any(axis=1)
        if bad.any():
            raise ValueError(f"{path}: predictions must be probabilities in [0, 1]; bad rows for "
                             f"{', '.join(df.loc[bad, UID].head(5))} ({int(bad.sum())} in all)")
        frames.append(df)
    oof = pd.concat(frames, ignore_index=True)
    dup = oof[UID][oof[UID].duplicated()]
    if len(dup):
        raise ValueError(f"{run_dir}: studies predicted more than once: {', '.join(dup.head(5))} ({len(dup)} in all)")
    if labels is not None:
        table = _read_labels(labels).set_index(UID)
        lacking = [u for u in oof[UID] if u not in table.index]
        if lacking:
            raise ValueError(f"labels lack {len(lacking)} OOF studies of {run_dir}: {', '.join(lacking[:5])}")
        given = table.loc[oof[UID], list(TARGETS)].to_numpy()
        if all(c in oof.columns for c in TRUE_COLUMNS):
            differ = (oof[list(TRUE_COLUMNS)].to_numpy() != given).any(axis=1)
            if differ.any():
                raise ValueError(f"{run_dir}: the OOF `_true` columns disagree with `labels` for "
                                 f"{', '.join(oof.loc[differ, UID].head(5))} ({int(differ.sum())} studies)")
        oof[list(TRUE_COLUMNS)] = given
    y = oof[list(TRUE_COLUMNS)]
    if not y.isin([0, 1]).all().all():
        raise ValueError(f"{run_dir}: label columns {list(TRUE_COLUMNS)} must hold 0/1")
    oof[list(TRUE_COLUMNS)] = y.astype(np.int64)
    oof["fold"] = oof["fold"].astype(np.int64)
    return oof[[UID, "fold", *TARGETS, *TRUE_COLUMNS]]


def fit_blend_weights(y: np.ndarray, preds: Sequence[np.ndarray], *, normalise: str = "row") -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the competition score of `sum_r w_r * preds[r]`.

    Fitted on the very predictions it is scored on, so its score is optimistic. Starts from the mean blend
    (equal weights) and never returns weights that score worse than it.
    """
    from scipy.optimize import minimize

    stack = np.stack([np.asarray(p, dtype=np.float64) for p in preds])  # (R, N, 8)
    n = len(stack)
    start = np.full(n, 1.0 / n)

    def objective(w: np.ndarray) -> float:
        w = np.clip(w, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else start
        return competition_score(y, np.clip(np.tensordot(w, stack, axes=1), 0.0, 1.0), normalise=normalise)

    result = minimize(objective, start, method="SLSQP", bounds=[(0.0, 1.0)] * n,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                      options={"maxiter": 200, "ftol": 1e-10})
    w = np.clip(result.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else start
    return w if objective(w) <= objective(start) else start


def _model_summary(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> dict:
    """Scores, per-target contributions, AUCs and per-fold scores of one set of predictions."""
    prev = y.mean(0)
    per_fold = []
    for k in np.unique(folds):
        m = folds == k
        per_fold.append({
            "fold": int(k), "n_studies": int(m.sum()),
            "score_row": competition_score(y[m], p[m], normalise="row"),
            "score_global": competition_score(y[m], p[m], normalise="global"),
            "baseline_row": competition_score(y[m], prev, normalise="row"),
        })
    auc = roc_auc_per_target(y, p)
    return {
        "n_studies": int(len(y)),
        "score_row": competition_score(y, p, normalise="row"),
        "score_global": competition_score(y, p, normalise="global"),
        "per_target_row": competition_score(y, p, normalise="row", per_target=True).to_dict(),
        "auc": auc.to_dict(),
        "mean_auc": float(np.nanmean(auc.to_numpy())) if auc.notna().any() else float("nan"),
        "mean_pred": dict(zip(TARGETS, p.mean(0).tolist())),
        "per_fold": per_fold,
    }


SUMMARY_NAME = "oof_summary.json"


def train_fold_prevalence(run_dir: PathLike, oof: pd.DataFrame) -> dict[int, tuple[np.ndarray | None, str]]:
    """For each fold k of a classifier OOF table: the prevalence of the 8 targets over the studies fold k's model
    trained on, and where it comes from.

    Sources, in order: `fold<k>/oof_summary.json`'s `train_prevalence` (the task computes it from train.csv
    over the training folds); else the OOF's own studies of the other folds (all the training folds' labels
    when every fold was run); else None ("unknown": a single fold run without a summary).

    Returns:
        {fold: (prevalence (8,) in TARGETS order or None, source in words)}.
    """
    run_dir = Path(run_dir)
    out = {}
    y = oof[list(TRUE_COLUMNS)].to_numpy(np.float64)
    for k in sorted(int(f) for f in oof["fold"].unique()):
        summary = run_dir / f"fold{k}" / SUMMARY_NAME
        stored = json.loads(summary.read_text()).get("train_prevalence") if summary.is_file() else None
        others = (oof["fold"] != k).to_numpy()
        if stored is not None and all(t in stored for t in TARGETS):
            out[k] = (np.array([stored[t] for t in TARGETS], dtype=np.float64), f"fold{k}/{SUMMARY_NAME}")
        elif others.any():
            out[k] = (y[others].mean(0), f"OOF labels of the other folds ({int(others.sum())} studies)")
        else:
            out[k] = (None, "unknown (no oof_summary.json, no other fold in the OOF)")
    return out


def _first_fold_config(run_dir: PathLike) -> dict:
    """The first `fold<k>/config.yaml` of a run as raw YAML ({} when there is none), so that a config that no
    longer validates does not stop a report."""
    configs = sorted(Path(run_dir).glob("fold*/config.yaml"))
    return (yaml.safe_load(configs[0].read_text()) or {}) if configs else {}


def studies_without_oof(run_dir: PathLike, oof: pd.DataFrame) -> dict | None:
    """Studies of the folds a run trained that have no OOF row (their folder, DICOM, stage 1 or crops failed).

    The expected studies are those of the run's folds table (`data.folds_csv` of its first `fold<k>/config.yaml`)
    whose fold appears in the OOF, so folds that were not trained are not counted as lost.

    Returns:
        {"folds_csv", "n_expected", "missing": [uids]}, or None when the run has no config or its folds table
        is not there (nothing to compare with).
    """
    folds_csv = (_first_fold_config(run_dir).get("data") or {}).get("folds_csv")
    if not folds_csv or not Path(folds_csv).is_file():
        return None
    from ..io.folds import load_folds

    try:
        folds = load_folds(folds_csv)
    except (OSError, ValueError) as exc:  # the report does without the check
        log.warning("%s: cannot read the folds table to check OOF coverage: %s", run_dir, exc)
        return None
    trained = {int(k) for k in oof["fold"].unique()}
    expected = folds.loc[folds["fold"].isin(trained), UID].tolist()
    have = set(oof[UID])
    return {"folds_csv": str(folds_csv), "n_expected": len(expected), "missing": [u for u in expected if u not in have]}


def train_fold_baseline(y: np.ndarray, folds: np.ndarray, prevalence: dict) -> dict | None:
    """The prevalence baseline without peeking: each study predicted with its fold's training-fold prevalence
    (`train_fold_prevalence`), scored like the models. None when a fold's prevalence is unknown."""
    if any(prevalence[int(k)][0] is None for k in np.unique(folds)):
        return None
    pred = np.stack([prevalence[int(k)][0] for k in folds])
    return {
        "n_studies": int(len(y)),
        "score_row": competition_score(y, pred, normalise="row"),
        "score_global": competition_score(y, pred, normalise="global"),
        "per_target_row": competition_score(y, pred, normalise="row", per_target=True).to_dict(),
        "per_fold": {int(k): competition_score(y[folds == k], pred[folds == k]) for k in np.unique(folds)},
        "sources": {int(k): src for k, (_, src) in prevalence.items()},
    }


def fold_dirs(run_dir: PathLike) -> dict[int, Path]:
    """{k: run_dir/fold<k>} for every fold folder of a run, in fold order."""
    run_dir = Path(run_dir)
    found = {int(p.name[4:]): p for p in run_dir.glob("fold*") if p.is_dir() and p.name[4:].isdigit()}
    return dict(sorted(found.items()))


def fold_tables(run_dir: PathLike, name: str) -> pd.DataFrame:
    """`fold*/<name>` (a CSV) of a run concatenated, with a `fold` column taken from the folder name.

    Raises:
        FileNotFoundError: no fold folder holds `name`.
    """
    tables = []
    for k, folder in fold_dirs(run_dir).items():
        if (folder / name).is_file():
            table = pd.read_csv(folder / name, dtype={UID: str})
            table["fold"] = k
            tables.append(table)
    if not tables:
        raise FileNotFoundError(f"no fold*/{name} in {run_dir}; train the run first (kit train --config ...)")
    return pd.concat(tables, ignore_index=True)
