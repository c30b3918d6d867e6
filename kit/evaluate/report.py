"""Reports of trained runs: out-of-fold (OOF) tables, plots and the worst studies, for every kind of run.

`run_report(run_dirs)` (what `kit report` calls) picks each run's report by the `task` of its
`fold*/config.yaml` (by its `oof.csv` columns when there is no config); a kind is one `register_report` entry:

- `seg` -> `seg_report`: 3D Dice and z-range errors per vertebra and fold, training curves, the worst studies
  with a sagittal picture each. `fold<k>/oof.csv`: `StudyInstanceUID, fold, epoch, slices, dice_C1..dice_C7,
  dice_mean, zerr_C1..zerr_C7, zerr_max` (z-range error in slices; a missed vertebra counts as the study's
  slice count; NaN = absent from the truth).
- `level` -> `level_report`: IoU per vertebra and fold, curves, the worst studies. `fold<k>/oof.csv`:
  `StudyInstanceUID, fold, epoch, steps, iou_C1..iou_C7, iou_mean`.
- `cls` (classifier format) -> `oof_report`: competition score next to the prevalence baseline, per-target
  contributions and AUCs, per-fold scores, ROC / calibration / histogram plots, blends of several runs.
  `fold<k>/oof.csv` (or one `oof.csv` at the run root): `StudyInstanceUID`, `fold`, the 8 predicted
  probabilities named exactly as TARGETS (`patient_overall, C1..C7`) and the 8 labels as `<target>_true`.
  Optional: `fold<k>/oof_summary.json` with `train_prevalence` (the training folds' prevalence of each target,
  written by `kit.tasks.ClsTask`) for the baseline from the training folds; on synthetic data, the generator's
  answers (`<answers_dir>/fractures.csv`) for the recall by fracture kind and subtlety and the score a perfect
  detector of the plainest kinds would reach (`score_ceilings`).

Each report writes `report.md`, `report.json` and PNGs (by default in the run folder) and returns what it wrote
and its numbers. Every fold folder also holds `log.csv` (epoch, train_loss, val_loss, val_<metric>, lr,
seconds), read for the training curves. Plots are drawn on `matplotlib.figure.Figure` objects with the Agg
canvas, never through pyplot, so they work headless and do not touch a notebook's backend (in a notebook,
show one by leaving it as a cell's last value).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from ..constants import TARGETS, VERTEBRAE
from .metrics import (
    calibration_table,
    competition_score,
    prevalence_baseline,
    roc_auc,
    roc_auc_per_target,
    roc_curve,
)
from ..io.rsna import check_train, load_train

log = logging.getLogger("kit.evaluate.report")

PathLike = str | os.PathLike
UID = "StudyInstanceUID"
TRUE_SUFFIX = "_true"
TRUE_COLUMNS = tuple(f"{t}{TRUE_SUFFIX}" for t in TARGETS)
OOF_NAME = "oof.csv"
MEAN_BLEND = "mean blend"
FITTED_BLEND = "fitted blend"
_COLORS = ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


# ---------------------------------------------------------------------------------------------------------
# Reading OOF files
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------


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
ANSWERS_NAME = "fractures.csv"
ANSWER_COLUMNS = (UID, "split", "vertebra", "kind", "subtlety", "z_first", "z_last")
RECALL_THRESHOLD = 0.5
SUBTLETY_BINS = 3  # numeric subtlety with more distinct values than 5 is grouped into this many equal-count bins


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
    from ..io.rsna import load_folds

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


def read_answers(answers_dir: PathLike) -> pd.DataFrame:
    """The synthetic generator's answer table `<answers_dir>/fractures.csv` (one row per fracture).

    Columns `StudyInstanceUID, split, vertebra, kind, subtlety, z_first, z_last`; `vertebra` as "C1".."C7"
    (1..7 is accepted and converted).

    Raises:
        FileNotFoundError: no fractures.csv.
        ValueError: missing columns or a vertebra outside C1..C7.
    """
    path = Path(answers_dir) / ANSWERS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {ANSWERS_NAME} in {answers_dir}; the synthetic generator writes it with "
                                "the data")
    table = pd.read_csv(path, dtype={UID: str})
    missing = [c for c in ANSWER_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {list(ANSWER_COLUMNS)}")
    vertebra = table["vertebra"].astype(str).str.strip()
    vertebra = vertebra.where(~vertebra.isin([str(i) for i in range(1, 8)]), "C" + vertebra)
    bad = sorted(set(vertebra) - set(VERTEBRAE))
    if bad:
        raise ValueError(f"{path}: vertebra must be one of {', '.join(VERTEBRAE)}; got {bad[:5]}")
    return table.assign(vertebra=vertebra)


def find_answers_dir(data_root: PathLike) -> Path | None:
    """The synthetic generator's answers folder of a data root, or None (competition data has none).

    Looks at `<data_root>_answers` (where `kit synth --out DIR` writes them) and `<data_root>/../answers`
    (`kit demo`'s `demo/answers` beside `demo/data`); a folder counts when it holds `fractures.csv`.
    """
    root = Path(data_root).resolve()
    for folder in (root.parent / f"{root.name}_answers", root.parent / "answers"):
        if (folder / ANSWERS_NAME).is_file():
            return folder
    return None


def score_test_submission(submission: PathLike | pd.DataFrame, answers_dir: PathLike, data_root: PathLike) -> dict:
    """A submission of the synthetic test split scored against the generator's test labels, next to the
    prevalence baseline (the training labels' prevalence for every row), both by `metrics.score_submission`.

    Args:
        submission: `submission.csv` (path or DataFrame: `row_id, fractured`).
        answers_dir: the generator's answers folder (`test_labels.csv`).
        data_root: the data root, for the training labels (`train.csv`).

    Returns:
        {"test_score", "test_baseline_score", "n_studies"}.

    Raises:
        FileNotFoundError: no `test_labels.csv` in `answers_dir`.
        ValueError: the submission fails `score_submission`'s checks (rows missing, unknown or not numbers).
    """
    from .metrics import score_submission
    from ..io.rsna import split_row_id, wide_to_long

    labels = Path(answers_dir) / "test_labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"no test_labels.csv in {answers_dir}; the synthetic generator writes it")
    solution = wide_to_long(pd.read_csv(labels, dtype={UID: str}))
    prevalence = load_train(data_root)[list(TARGETS)].mean()
    baseline = solution[["row_id"]].assign(fractured=[prevalence[split_row_id(r)[1]] for r in solution["row_id"]])
    return {"test_score": score_submission(submission, solution),
            "test_baseline_score": score_submission(baseline, solution),
            "n_studies": int(len(solution) // len(TARGETS))}


def _subtlety_groups(subtlety: pd.Series) -> pd.Series:
    """Subtlety as groups: its values when few (<= 5 distinct or not numeric), else `SUBTLETY_BINS` equal-count
    bins named by the range of values they hold ("0.1 to 0.35")."""
    numeric = pd.to_numeric(subtlety, errors="coerce")
    if numeric.notna().all() and numeric.nunique() > 5:
        codes = pd.qcut(numeric, SUBTLETY_BINS, labels=False, duplicates="drop")
        spans = numeric.groupby(codes).agg(["min", "max"])
        names = {c: f"{lo:.3g} to {hi:.3g}" for c, (lo, hi) in spans.iterrows()}
        return codes.map(names).astype(str)
    return subtlety.astype(str)


def attention_hit_rate(oof: pd.DataFrame, crop_dir: PathLike, answers: pd.DataFrame,
                       threshold: float = RECALL_THRESHOLD) -> dict:
    """Does the classifier look where the fracture is? Over the fractured vertebrae that have fracture boxes
    (answers' `in_bounding_boxes`) and that the OOF detects (p > threshold): the share whose attention peak
    (`attn_peak_<vertebra>`, the sampled slice with the highest attention weight) lies within one of that
    vertebra's fracture slice ranges [z_first, z_last], widened by half the vertebra's sampling step (so the
    sample nearest a fracture thinner than the step counts).

    Args:
        oof: a classifier OOF table (`attn_peak_C1..C7` and the C1..C7 probabilities).
        crop_dir: the crop cache the OOF was made from (its `positions` map sampled slices to series slices).
        answers: `read_answers` output (synthetic data).

    Returns:
        {"attention_hit_rate": share or NaN, "n_detected": int, "n_boxed": int, "rows": DataFrame (one row per
        detected vertebra: uid, vertebra, p, peak slice, fracture ranges, hit)}.
    """
    from ..stage2.crops import load_crops

    boxed = answers[answers["in_bounding_boxes"].astype(bool) & answers[UID].isin(set(oof[UID]))]
    by_uid = oof.set_index(UID)
    rows = []
    for (uid, name), group in boxed.groupby([UID, "vertebra"]):
        p, peak = float(by_uid.at[uid, name]), int(by_uid.at[uid, f"attn_peak_{name}"])
        if p <= threshold or peak < 0:
            continue
        positions = load_crops(crop_dir, uid)["positions"][VERTEBRAE.index(name)]
        step = float(np.median(np.diff(positions))) if len(positions) > 1 else 1.0
        z, tol = int(positions[peak]), max(step, 1.0) / 2.0
        ranges = list(zip(group["z_first"].astype(int), group["z_last"].astype(int)))
        rows.append({UID: uid, "vertebra": name, "p": p, "peak_slice": z, "ranges": ranges,
                     "hit": any(first - tol <= z <= last + tol for first, last in ranges)})
    table = pd.DataFrame(rows, columns=[UID, "vertebra", "p", "peak_slice", "ranges", "hit"])
    n_boxed = int(boxed.groupby([UID, "vertebra"]).ngroups)
    return {"attention_hit_rate": float(table["hit"].mean()) if len(table) else float("nan"),
            "n_detected": len(table), "n_boxed": n_boxed, "rows": table}


def fracture_recall(oof: pd.DataFrame, answers: pd.DataFrame, preds: dict[str, np.ndarray],
                    threshold: float = RECALL_THRESHOLD) -> dict[str, pd.DataFrame]:
    """Recall of fractured vertebrae by fracture kind and by subtlety (synthetic data).

    A fracture counts as detected when its vertebra's predicted probability is above `threshold`; recall is
    the share detected among the answer rows whose study is in the OOF. A vertebra with two fractures counts
    once per fracture (in each fracture's kind).

    Args:
        oof: the OOF table (its `StudyInstanceUID` order is the order of the rows of `preds`).
        answers: `read_answers` output.
        preds: {model: (N, 8) probabilities in TARGETS order, rows as `oof`}.
        threshold: detection threshold.

    Returns:
        {"kind": DataFrame, "subtlety": DataFrame}: one row per group with `fractures` and, per model,
        the recall.
    """
    row_of = {u: i for i, u in enumerate(oof[UID])}
    rows = answers[answers[UID].isin(row_of)].reset_index(drop=True)
    index = rows[UID].map(row_of).to_numpy()
    column = rows["vertebra"].map(TARGETS.index).to_numpy()
    groups = {"kind": rows["kind"].astype(str), "subtlety": _subtlety_groups(rows["subtlety"])}
    out = {}
    for by, keys in groups.items():
        table = pd.DataFrame({by: keys})
        for name, p in preds.items():
            table[name] = (p[index, column] > threshold).astype(np.float64) if len(rows) else []
        grouped = table.groupby(by, sort=True)
        result = grouped.size().rename("fractures").to_frame()
        for name in preds:
            result[name] = grouped[name].mean()
        out[by] = result.reset_index()
    return out


def lookalike_false_alarms(oof: pd.DataFrame, fractures: pd.DataFrame, lookalikes: pd.DataFrame,
                           preds: dict[str, np.ndarray], threshold: float = RECALL_THRESHOLD) -> pd.DataFrame:
    """False alarms on look-alikes (synthetic data): among the vertebrae with no fracture, the share predicted
    p > `threshold`, for those carrying each kind of look-alike (`lookalikes.csv`) and for the rest ("none").

    Args:
        oof: the OOF table (its `StudyInstanceUID` order is the order of the rows of `preds`).
        fractures: `read_answers` output (the fractured vertebrae, left out).
        lookalikes: the generator's `lookalikes.csv` (StudyInstanceUID, kind, vertebra).
        preds: {model: (N, 8) probabilities in TARGETS order, rows as `oof`}.
        threshold: detection threshold.

    Returns:
        One row per look-alike kind and "none": `lookalike`, `vertebrae`, and per model the false-alarm rate.
    """
    uids = list(oof[UID])
    fractured = set(zip(fractures[UID], fractures["vertebra"]))
    mimic = {(u, v): k for u, v, k in zip(lookalikes[UID], lookalikes["vertebra"], lookalikes["kind"])}
    rows = [(i, j, mimic.get((u, v), "none")) for i, u in enumerate(uids) for j, v in enumerate(VERTEBRAE)
            if (u, v) not in fractured]
    table = pd.DataFrame(rows, columns=["row", "column", "lookalike"])
    for name, p in preds.items():
        table[name] = (p[table["row"].to_numpy(int), 1 + table["column"].to_numpy(int)] > threshold
                       ).astype(np.float64) if len(table) else []
    grouped = table.groupby("lookalike", sort=True)
    out = grouped.size().rename("vertebrae").to_frame()
    for name in preds:
        out[name] = grouped[name].mean()
    return out.reset_index()


CEILING_KINDS = ("displaced", "compression", "cleft", "hairline")  # the generator's kinds, plainest first


def ceiling_label(kinds: Sequence[str]) -> str:
    """The `found` label of a `score_ceilings` row (and its key in the demo's `oof_ceilings`)."""
    return " + ".join(kinds)


def score_ceilings(uids: Sequence[str], y: np.ndarray, answers: pd.DataFrame,
                   kinds: Sequence[str] = CEILING_KINDS) -> pd.DataFrame:
    """What a perfect detector of some fracture kinds would score on these studies (synthetic data): the
    ceiling of a classifier that cannot see the other kinds.

    For the first 1, 2, ... of `kinds`: every vertebra with a fracture of those kinds (in `answers`) gets
    p = 1 - 1e-4, and so does patient_overall of its study; every other vertebra (and patient) gets the
    share of fractured ones among those others, their prevalence (in-sample: a ceiling, not a model).

    Args:
        uids: the studies, in the row order of `y`.
        y: (N, 8) labels in TARGETS order.
        answers: `read_answers` output.
        kinds: fracture kinds, added one at a time.

    Returns:
        one row per step: `found` (the kinds found, joined by " + "), `score` (row-normalised competition
        score), `fractures_found` / `fractures` (answer rows of these studies).
    """
    y = np.asarray(y, dtype=np.float64)
    row_of = {u: i for i, u in enumerate(uids)}
    rows = answers[answers[UID].isin(row_of)]
    index = rows[UID].map(row_of).to_numpy()
    column = rows["vertebra"].map(TARGETS.index).to_numpy()
    out = []
    for k in range(1, len(kinds) + 1):
        found = np.zeros_like(y, dtype=bool)
        hit = rows["kind"].isin(kinds[:k]).to_numpy()
        found[index[hit], column[hit]] = True
        found[:, 0] = found[:, 1:].any(axis=1)
        p = np.empty_like(y)
        for c in range(y.shape[1]):
            rest = ~found[:, c]
            p[:, c] = np.where(found[:, c], 1.0 - 1e-4, y[rest, c].mean() if rest.any() else 0.5)
        out.append({"found": ceiling_label(kinds[:k]), "score": competition_score(y, p.clip(1e-4, 1 - 1e-4)),
                    "fractures_found": int(hit.sum()), "fractures": len(rows)})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _f(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(result: dict, slug: dict) -> str:
    models = result["models"]
    base = result["baseline"]
    lines = [f"# OOF report: {', '.join(result['runs'])}", ""]
    fair = result.get("baseline_from_train_folds")
    lines += [f"{base['n_studies']} studies with out-of-fold predictions in all runs. Competition metric: weighted "
              "multi-label log loss, lower is better. **row** = per-study normalised (public reference form), "
              "**global** = total weighted loss / total weight. Two prevalence baselines predict the same "
              "constants for every study: **training folds** = each fold's studies get the prevalence of the "
              "studies its model trained on (what a model could have known; the gains are against it), "
              "**in-sample** = the OOF's own prevalence (peeks at the held-out labels, so it is a little "
              "optimistic).", ""]
    for name, info in (result.get("studies_without_oof") or {}).items():
        if info and info["missing"]:
            shown = ", ".join(info["missing"][:10]) + (" ..." if len(info["missing"]) > 10 else "")
            lines += [f"**{len(info['missing'])} of the {info['n_expected']} studies of {name}'s trained folds "
                      f"(`{info['folds_csv']}`) have no out-of-fold prediction** and are not scored: {shown}. "
                      "Their folder, reading, stage 1 or crops failed: see the crop cache's `failures.csv`.", ""]
        elif info:
            lines += [f"Every one of the {info['n_expected']} studies of {name}'s trained folds "
                      f"(`{info['folds_csv']}`) has an out-of-fold prediction.", ""]
    if fair is None:
        lines += ["The training folds' prevalence is unknown for some fold (no `oof_summary.json` with "
                  "`train_prevalence`, and no other fold in the OOF): gains are against the in-sample "
                  "baseline.", ""]
    else:
        sources = sorted(set(fair["sources"].values()))
        lines += [f"Training-fold prevalence from: {'; '.join(sources)}.", ""]
    lines += ["## Summary", ""]
    best = min(m["score_row"] for m in models.values())
    reference = fair if fair is not None else base
    rows = []
    if fair is not None:
        rows.append(["prevalence baseline (training folds)", str(fair["n_studies"]), _f(fair["score_row"]),
                     _f(fair["score_global"]), "–", "0.500", "0.500"])
    rows.append(["prevalence baseline (in-sample)", str(base["n_studies"]), _f(base["score_row"]),
                 _f(base["score_global"]), "–", "0.500", "0.500"])
    for name, m in models.items():
        gain = reference["score_row"] - m["score_row"]
        score = _f(m["score_row"])
        rows.append([name, str(m["n_studies"]), f"**{score}**" if m["score_row"] == best else score,
                     _f(m["score_global"]), f"{gain:+.4f}", _f(m["auc"]["patient_overall"], 3), _f(m["mean_auc"], 3)])
    lines += [_table(["model", "studies", "score (row)", "score (global)", "gain vs baseline (row)",
                      "AUC patient", "mean AUC"], rows), ""]
    if result.get("blend_weights"):
        w = result["blend_weights"]
        lines += ["Blends average the runs' probabilities. The *fitted blend*'s weights "
                  f"({', '.join(f'{r} {v:.3f}' for r, v in w.items())}) were chosen on these same OOF predictions "
                  "to minimise the row score, so its score is **optimistic**; judge it on a held-out set.", ""]

    names = list(models)
    lines += ["## Per target", "", "### Contribution to the row score", "",
              "Each column sums to the model's score: where the loss comes from.", ""]
    fair_part = (lambda t: [_f(fair["per_target_row"][t])]) if fair is not None else (lambda t: [])
    rows = [[t, _f(base["prevalence"][t], 3), *fair_part(t), _f(base["per_target_row"][t])]
            + [_f(models[n]["per_target_row"][t]) for n in names] for t in TARGETS]
    rows.append(["**total**", "", *([f"**{_f(fair['score_row'])}**"] if fair is not None else []),
                 f"**{_f(base['score_row'])}**"] + [f"**{_f(models[n]['score_row'])}**" for n in names])
    lines += [_table(["target", "prevalence", *(["baseline (training folds)"] if fair is not None else []),
                      "baseline (in-sample)", *names], rows), ""]
    lines += ["### ROC AUC and mean prediction", "",
              "AUC per target (– where a target has one class); in brackets the mean predicted probability, "
              "to compare with the prevalence.", ""]
    rows = [[t, str(int(round(base["prevalence"][t] * base["n_studies"]))), _f(base["prevalence"][t], 3)]
            + [f"{_f(models[n]['auc'][t], 3)} ({_f(models[n]['mean_pred'][t], 3)})" for n in names] for t in TARGETS]
    rows.append(["**mean AUC**", "", ""] + [f"**{_f(models[n]['mean_auc'], 3)}**" for n in names])
    lines += [_table(["target", "positives", "prevalence", *names], rows), ""]

    lines += ["## Per fold", ""]
    folds = sorted({f["fold"] for m in models.values() for f in m["per_fold"]})
    header = ["model"] + [f"fold {k}" for k in folds] + ["mean ± sd", "all (row)"]
    rows = []
    fold_base = {f["fold"]: f for f in next(iter(models.values()))["per_fold"]}
    if fair is not None:
        rows.append(["prevalence baseline (training folds)"] + [_f(fair["per_fold"].get(k)) for k in folds]
                    + ["", _f(fair["score_row"])])
    rows.append(["prevalence baseline (in-sample)"] + [_f(fold_base[k]["baseline_row"]) if k in fold_base
                                                       else "–" for k in folds] + ["", _f(base["score_row"])])
    for name, m in models.items():
        by = {f["fold"]: f["score_row"] for f in m["per_fold"]}
        vals = np.array(list(by.values()))
        rows.append([name] + [_f(by.get(k)) for k in folds]
                    + [f"{vals.mean():.4f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.4f}", _f(m["score_row"])])
    counts = ["studies"] + [str(fold_base[k]["n_studies"]) if k in fold_base else "–" for k in folds] + ["", ""]
    rows.append(counts)
    lines += [_table(header, rows), "", "Row-normalised scores; the in-sample baseline uses the prevalence over all "
              "folds of the OOF, the training-folds baseline each fold's own training prevalence.", ""]

    recall = result.get("recall")
    if recall is not None:
        lines += ["## Recall by fracture (synthetic answers)", "",
                  f"From `{result['answers_dir']}/{ANSWERS_NAME}`: the share of fractures whose vertebra is predicted "
                  f"p > {RECALL_THRESHOLD} (a vertebra with two fractures counts once per fracture).", ""]
        for by in ("kind", "subtlety"):
            table = recall[by]
            lines += [f"### By {by}", ""]
            if not table:
                lines += ["No fracture of the answers is among the OOF studies.", ""]
                continue
            rows = [[str(r[by]), str(int(r["fractures"]))] + [_f(r[n], 3) for n in models] for r in table]
            lines += [_table([by, "fractures", *models], rows), ""]
        if recall.get("lookalike"):
            lines += ["### False alarms on look-alikes", "",
                      f"Vertebrae with no fracture predicted p > {RECALL_THRESHOLD}, by the look-alike they carry "
                      "(`lookalikes.csv`; none: no look-alike).", ""]
            rows = [[str(r["lookalike"]), str(int(r["vertebrae"]))] + [_f(r[n], 3) for n in models]
                    for r in recall["lookalike"]]
            lines += [_table(["look-alike", "vertebrae", *models], rows), ""]

    ceilings = result.get("ceilings")
    if ceilings:
        lines += ["## Ceiling: a perfect detector of some fracture kinds (synthetic answers)", "",
                  "The score if every fracture of these kinds were found (p = 1 - 1e-4 for its vertebra and its "
                  "study) and every other vertebra the prevalence among the rest (in-sample): what a classifier that "
                  "cannot see the remaining kinds could reach at most. Compare with the scores above.", ""]
        rows = [[r["found"], f"{r['fractures_found']} of {r['fractures']}", _f(r["score"])] for r in ceilings]
        lines += [_table(["kinds found", "fractures found", "score"], rows), ""]

    lines += ["## Plots", ""]
    for name in models:
        lines += [f"### {name}", ""]
        for kind, caption in (("roc", "ROC curves"), ("calibration", "Reliability"), ("hist", "Prediction histograms")):
            lines += [f"![{caption}: {name}]({kind}_{slug[name]}.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_") or "run"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return x


def oof_report(run_dirs: PathLike | Sequence[PathLike], out_dir: PathLike | None = None, *, labels=None,
               answers_dir: PathLike | None = None) -> dict:
    """Score one or several runs' OOF predictions and write `report.md`, `report.json` and PNG plots.

    For each run: row and global scores, per-target contributions and AUCs, per-fold scores, each next to two
    prevalence baselines: the in-sample one (the OOF's own prevalence, which a model cannot know) and the one
    from the training folds (`train_fold_baseline`: each fold's studies predicted with the prevalence of the
    studies its model trained on; the fair reference). ROC curves, reliability diagrams and prediction
    histograms. With several runs, also the mean blend and a blend whose weights are fitted on the OOF itself
    (optimistic), over the studies all runs share. With `answers_dir` (synthetic data), the recall of
    fractured vertebrae by fracture kind and subtlety (`fracture_recall`).

    Args:
        run_dirs: one run folder or several (`runs/<name>` holding `fold<k>/oof.csv` or `oof.csv`).
        out_dir: where to write; default the run folder for one run, `reports/<name>+<name>...` for several.
        labels: optional label table (DataFrame, train.csv path or data root) used for the `_true` columns.
        answers_dir: folder of the synthetic generator's `fractures.csv`; None: no recall tables.

    Returns:
        dict with `out_dir`, `report_md`, `report_json`, `pngs` (list of paths), `scores`
        ({model: {"row", "global"}}), `baseline` (in-sample), `baseline_from_train_folds` (None when a fold's
        training prevalence is unknown), `models` (full numbers per model), `blend_weights`, `runs`,
        `recall` ({"kind": [...], "subtlety": [...]} records, or None).
    """
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, os.PathLike)) else [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("oof_report needs at least one run folder")
    names = []
    for r in run_dirs:
        name = r.resolve().name
        names.append(name if name not in names else f"{r.resolve().parent.name}/{name}")
    oofs = {n: load_oof(r, labels=labels) for n, r in zip(names, run_dirs)}

    # Studies every run predicted, in the first run's order; labels must agree between runs.
    first = oofs[names[0]]
    common = set(first[UID])
    for n in names[1:]:
        common &= set(oofs[n][UID])
    if not common:
        raise ValueError(f"the runs {names} share no study; cannot compare or blend them")
    for n, df in oofs.items():
        if len(df) != len(common):
            log.warning("run %s: %d of its %d studies are not in every run; the report uses the %d shared ones",
                        n, len(df) - len(common), len(df), len(common))
    uids = [u for u in first[UID] if u in common]
    aligned = {n: df.set_index(UID).loc[uids] for n, df in oofs.items()}
    y = aligned[names[0]][list(TRUE_COLUMNS)].to_numpy()
    for n in names[1:]:
        differ = (aligned[n][list(TRUE_COLUMNS)].to_numpy() != y).any(axis=1)
        if differ.any():
            raise ValueError(f"runs {names[0]} and {n} disagree on the labels of {int(differ.sum())} studies, "
                             f"e.g. {np.array(uids)[differ][:3].tolist()}")
    preds = {n: a[list(TARGETS)].to_numpy(np.float64) for n, a in aligned.items()}
    folds = {n: a["fold"].to_numpy() for n, a in aligned.items()}

    blend_weights = None
    if len(names) > 1:
        w = fit_blend_weights(y, list(preds.values()))
        blend_weights = dict(zip(names, w.tolist()))
        preds[MEAN_BLEND] = np.mean(list(preds.values()), axis=0)
        preds[FITTED_BLEND] = np.tensordot(w, np.stack([preds[n] for n in names]), axes=1).clip(0.0, 1.0)
        folds[MEAN_BLEND] = folds[FITTED_BLEND] = folds[names[0]]

    base_row, prev = prevalence_baseline(y, normalise="row")
    baseline = {
        "n_studies": len(uids),
        "score_row": base_row,
        "score_global": prevalence_baseline(y, normalise="global")[0],
        "prevalence": prev.to_dict(),
        "per_target_row": competition_score(y, prev.to_numpy(), normalise="row", per_target=True).to_dict(),
    }
    models = {n: _model_summary(y, p, folds[n]) for n, p in preds.items()}
    lost = {n: studies_without_oof(r, oofs[n]) for n, r in zip(names, run_dirs)}
    for n, info in lost.items():
        if info and info["missing"]:
            log.warning("run %s: %d of the %d studies of its trained folds have no OOF prediction (%s): their "
                        "folder, reading, stage 1 or crops failed (see the crop cache's failures.csv)", n,
                        len(info["missing"]), info["n_expected"], ", ".join(info["missing"][:5]))
    fold_prev = train_fold_prevalence(run_dirs[0], oofs[names[0]])
    fair = train_fold_baseline(y, folds[names[0]], fold_prev)
    recall = ceilings = None
    if answers_dir is not None:
        answers = read_answers(answers_dir)
        recall = fracture_recall(aligned[names[0]].reset_index(), answers, preds)
        ceilings = score_ceilings(uids, y, answers)
        if (Path(answers_dir) / "lookalikes.csv").is_file():
            mimics = pd.read_csv(Path(answers_dir) / "lookalikes.csv", dtype={UID: str})
            recall["lookalike"] = lookalike_false_alarms(aligned[names[0]].reset_index(), answers, mimics, preds)

    if out_dir is None:
        out_dir = run_dirs[0] if len(run_dirs) == 1 else Path("reports") / "+".join(_slug(n) for n in names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = {n: _slug(n) for n in preds}
    pngs = []
    for n, p in preds.items():
        title = f"{n} ({len(uids)} studies, OOF)"
        for kind, plot in (("roc", plot_roc), ("calibration", plot_calibration), ("hist", plot_histograms)):
            pngs.append(_save(plot(y, p, title), out_dir / f"{kind}_{slug[n]}.png"))

    result = {
        "runs": names,
        "run_dirs": [str(r) for r in run_dirs],
        "out_dir": str(out_dir),
        "scores": {n: {"row": m["score_row"], "global": m["score_global"]} for n, m in models.items()},
        "baseline": baseline,
        "baseline_from_train_folds": fair,
        "models": models,
        "blend_weights": blend_weights,
        "pngs": [str(p) for p in pngs],
        "recall": None if recall is None else {k: t.to_dict(orient="records") for k, t in recall.items()},
        "ceilings": None if ceilings is None else ceilings.to_dict(orient="records"),
        "answers_dir": None if answers_dir is None else str(answers_dir),
        "studies_without_oof": lost,
    }
    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(result, slug) + "\n")
    json_path = out_dir / "report.json"
    result["report_md"], result["report_json"] = str(md_path), str(json_path)
    json_path.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    log.info("OOF report for %s -> %s", ", ".join(names), md_path)
    return result


def oof_tables(result: dict) -> dict[str, pd.DataFrame]:
    """The numbers of an `oof_report` result (or its `report.json`) as DataFrames, for a notebook.

    Returns:
        "summary": one row per baseline and model: studies, row and global score, gain against the
        training-fold baseline (the in-sample one when that is unknown), AUC of patient_overall, mean AUC;
        "per_target": rows TARGETS: prevalence, the baselines' and each model's contribution to the row score
        (`<model>` columns) and AUC (`AUC <model>`); "per_fold": the row score of each model and baseline per
        fold (columns "fold k"); "blend_weights": the fitted blend's weight per run (empty with one run);
        with the generator's answers, "recall_kind" and "recall_subtlety" (share of fractures detected) and
        "ceilings" (`score_ceilings`: the score of a perfect detector of the plainest kinds).
    """
    base, fair, models = result["baseline"], result.get("baseline_from_train_folds"), result["models"]
    reference = fair if fair is not None else base
    summary = []
    if fair is not None:
        summary.append({"model": "prevalence baseline (training folds)", "studies": fair["n_studies"],
                        "score (row)": fair["score_row"], "score (global)": fair["score_global"]})
    summary.append({"model": "prevalence baseline (in-sample)", "studies": base["n_studies"],
                    "score (row)": base["score_row"], "score (global)": base["score_global"]})
    for name, m in models.items():
        summary.append({"model": name, "studies": m["n_studies"], "score (row)": m["score_row"],
                        "score (global)": m["score_global"],
                        "gain vs baseline": reference["score_row"] - m["score_row"],
                        "AUC patient": m["auc"]["patient_overall"], "mean AUC": m["mean_auc"]})
    per_target = pd.DataFrame({"prevalence": pd.Series(base["prevalence"])}, index=list(TARGETS))
    if fair is not None:
        per_target["baseline (training folds)"] = pd.Series(fair["per_target_row"])
    per_target["baseline (in-sample)"] = pd.Series(base["per_target_row"])
    for name, m in models.items():
        per_target[name] = pd.Series(m["per_target_row"])
    for name, m in models.items():
        per_target[f"AUC {name}"] = pd.Series(m["auc"], dtype=float)
    per_fold = {name: {f"fold {f['fold']}": f["score_row"] for f in m["per_fold"]} for name, m in models.items()}
    if fair is not None:
        per_fold = {"prevalence baseline (training folds)": {f"fold {k}": v for k, v in fair["per_fold"].items()},
                    **per_fold}
    tables = {"summary": pd.DataFrame(summary).set_index("model"), "per_target": per_target,
              "per_fold": pd.DataFrame(per_fold).T,
              "blend_weights": pd.Series(result.get("blend_weights") or {}, name="weight", dtype=float)}
    for by, records in (result.get("recall") or {}).items():
        tables[f"recall_{by}"] = pd.DataFrame(records)
    if result.get("ceilings"):
        tables["ceilings"] = pd.DataFrame(result["ceilings"])
    return tables


# ---------------------------------------------------------------------------------------------------------
# Stage 1 runs: segmenter (`task: seg`) and level model (`task: level`)
# ---------------------------------------------------------------------------------------------------------

DICE_COLUMNS = tuple(f"dice_{v}" for v in VERTEBRAE)
ZERR_COLUMNS = tuple(f"zerr_{v}" for v in VERTEBRAE)
IOU_COLUMNS = tuple(f"iou_{v}" for v in VERTEBRAE)
SEG_COLUMNS = (UID, "fold", *DICE_COLUMNS, "dice_mean", *ZERR_COLUMNS, "zerr_max")
LEVEL_COLUMNS = (UID, "fold", *IOU_COLUMNS, "iou_mean")
Z_TOLERANCE = 2  # slices: a vertebra's z-range counts as right when both ends are within this many slices


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


#: Written at a segmenter run's root by `kit.tools.demo.run_segmenter_stage`: its held-out studies segmented as inference
#: does (the level model's ranges fed to a level-conditioned segmenter), one row per study / per (study, vertebra).
STAGE1_DICE, STAGE1_Z = "oof_dice.csv", "oof_z_errors.csv"


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
    return f"{low} {_f(scores[low], 3)}"


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


# ---------------------------------------------------------------------------------------------------------
# Stage 1 plots (a run folder or arrays in, a Figure out)
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# Pictures of single studies (the fold's own model on its held-out study)
# ---------------------------------------------------------------------------------------------------------


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
        from ..submit.infer import load_run

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
        from ..data import true_presence
        from ..submit.infer import segment_study

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


# ---------------------------------------------------------------------------------------------------------
# Segmenter and level-model reports
# ---------------------------------------------------------------------------------------------------------


def _vertebra_table(rows: Sequence[dict], last: str, digits: int = 3) -> list[list[str]]:
    """Markdown rows `fold | C1..C7 | <last>` from dicts holding those keys."""
    out = []
    for r in rows:
        name = "**all folds**" if r["fold"] == "all" else f"fold {r['fold']}"
        out.append([name] + [_f(r[v], digits) for v in VERTEBRAE] + [_f(r[last], digits)])
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
    json_path.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    log.info("%s report for %s -> %s", result["kind"], result["run"], md_path)
    return result


def _seg_headline(dice_all: dict, z_all: dict, tol: str) -> str:
    """"Dice … | worst median z-error … slices (C…) | …% of vertebrae within … slices" of one set of studies."""
    return (f"Dice {_f(dice_all['mean'], 3)} | worst median z-error {_f(z_all['worst_median'], 1)} slices "
            f"({z_all['worst_vertebra'] or '–'}) | {_f(100 * z_all['within'], 0)}% of vertebrae within {tol} slices")


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
        rows.append([f"fold {d['fold']}", str(d["n_studies"]), _f(d["mean"], 3), _f(z["worst_median"], 1),
                     z["worst_vertebra"] or "–", _f(z["within"], 3)])
    rows.append(["**all folds**", str(a["n_studies"]), _f(a["mean"], 3), _f(za["worst_median"], 1),
                 za["worst_vertebra"] or "–", _f(za["within"], 3)])
    if len(dice["per_fold"]) > 1:
        rows.append(["mean ± sd over folds", ""] + [f"{_f(spread[k]['mean'], p)} ± {_f(spread[k]['sd'], p)}"
                                                     for k, p in (("mean_dice", 3), ("worst_median", 1))]
                    + ["", f"{_f(spread['within']['mean'], 3)} ± {_f(spread['within']['sd'], 3)}"])
    lines += [_table(["fold", "studies", "mean Dice", "worst median z-error", "worst vertebra",
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
                  "`kit.submit.infer.segment_study`" + (" with the level model's ranges" if conditioned else "") + ".", "",
                  f"**{s_head}**", ""]
        lines += [f"Note: {stale}.", ""] if stale else []
        lines += [_table(["fold", *VERTEBRAE, "worst"], _vertebra_table(s_rows, "worst", 1)), "",
                  "Vertebrae missed (counted as the study's slice count): " + ("; ".join(missed) or "none") + ".", ""]
        stage1_result = {"dice": s_dice, "zrange": s_z, "headline": s_head, "stale": stale or None,
                         "n_studies": int(len(stage1))}
    lines += ["## Dice per vertebra", "", "Mean over the held-out studies that show the vertebra.", "",
              _table(["fold", *VERTEBRAE, "mean"], _vertebra_table([*dice["per_fold"], a], "mean")), "",
              "![Dice per vertebra](dice_per_vertebra.png)", ""]
    med_rows = [{**z["median"], "fold": z["fold"], "worst": z["worst_median"]} for z in [*zerr["per_fold"], za]]
    share_rows = [{**z["within_per_vertebra"], "fold": z["fold"], "all": z["within"]} for z in [*zerr["per_fold"], za]]
    lines += ["## z-range error per vertebra", "", "### Median error (slices)", "",
              _table(["fold", *VERTEBRAE, "worst"], _vertebra_table(med_rows, "worst", 1)), "",
              f"### Share of studies within {tol} slices", "",
              _table(["fold", *VERTEBRAE, "all"], _vertebra_table(share_rows, "all")), "",
              "![z-range errors](zrange_errors.png)", ""]
    lines += _curves(run_dir, out_dir, pngs)

    worst = worst_studies(oof, "dice_mean", n_worst)
    lines += ["## Worst studies", "", f"The {len(worst)} held-out studies with the lowest mean Dice.", ""]
    table_rows = []
    for i, r in worst.iterrows():
        missed = [v for v in VERTEBRAE if "slices" in r and pd.notna(r[f"zerr_{v}"]) and r[f"zerr_{v}"] >= r["slices"]]
        table_rows.append([str(i + 1), f"`{r[UID]}`", str(int(r["fold"])), _f(r["dice_mean"], 3),
                           _lowest_vertebra(r, "dice"), _f(r["zerr_max"], 0), ", ".join(missed) or "–"])
    lines += [_table(["rank", "study", "fold", "mean Dice", "lowest vertebra", "max z-error", "missed"],
                     table_rows, "rlrrlrl"), ""]
    loaders, shown, missing = _fold_loaders(run_dir), {}, {}
    for i, r in worst.iterrows():
        uid, fold = r[UID], int(r["fold"])
        lines += [f"### {i + 1}. {uid} (fold {fold}, mean Dice {_f(r['dice_mean'], 3)})", ""]
        png = out_dir / f"worst_{i + 1}_{_slug(uid)}.png"
        reason = "pictures were turned off" if not pictures else _study_picture(
            run_dir, loaders, fold, uid, png, f"{uid}: fold {fold}, mean Dice {_f(r['dice_mean'], 3)}")
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
    headline = f"IoU {_f(a['mean'], 3)} | lowest vertebra {low or '–'} {_f(per_v.get(low), 3)}"
    pngs = [_save(plot_iou_per_vertebra(run_dir), out_dir / "iou_per_vertebra.png")]

    lines = _intro("Level model", run_dir, oof)
    lines += ["IoU per vertebra: of the predicted (p > 0.5) and true sets of slices showing it, per held-out "
              "study; a vertebra absent from the truth is left out.", "", "## Summary", "", f"**{headline}**", ""]
    rows = [[f"fold {r['fold']}", str(r["n_studies"]), _f(r["mean"], 3)] for r in iou["per_fold"]]
    rows.append(["**all folds**", str(a["n_studies"]), _f(a["mean"], 3)])
    if len(iou["per_fold"]) > 1:
        rows.append(["mean ± sd over folds", "", f"{_f(spread['mean_iou']['mean'], 3)} ± "
                                                 f"{_f(spread['mean_iou']['sd'], 3)}"])
    lines += [_table(["fold", "studies", "mean IoU"], rows), ""]
    lines += ["## IoU per vertebra", "",
              _table(["fold", *VERTEBRAE, "mean"], _vertebra_table([*iou["per_fold"], a], "mean")), "",
              "![IoU per vertebra](iou_per_vertebra.png)", ""]
    lines += _curves(run_dir, out_dir, pngs)
    worst = worst_studies(oof, "iou_mean", n_worst)
    lines += ["## Worst studies", "", f"The {len(worst)} held-out studies with the lowest mean IoU.", ""]
    rows = []
    for i, r in worst.iterrows():
        rows.append([str(i + 1), f"`{r[UID]}`", str(int(r["fold"])), str(int(r["steps"])) if "steps" in r else "–",
                     _f(r["iou_mean"], 3), _lowest_vertebra(r, "iou")])
    lines += [_table(["rank", "study", "fold", "steps", "mean IoU", "lowest vertebra"], rows, "rlrrrl"), ""]

    result = {"kind": "level", "run": run_dir.resolve().name, "run_dir": str(run_dir), "out_dir": str(out_dir),
              "n_studies": int(len(oof)), "folds": sorted(int(k) for k in oof["fold"].unique()), "iou": iou,
              "spread": spread, "worst": worst.to_dict(orient="records"), "pngs": pngs, "headline": headline}
    return _finish(result, lines, out_dir)


# ---------------------------------------------------------------------------------------------------------
# Any run: which report a run gets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportKind:
    """How one kind of run is reported.

    Attributes:
        task: the `task` key of the run's `fold*/config.yaml`.
        columns: `oof.csv` columns that identify the kind when a run has no config.
        layout: the expected oof.csv layout in words, for error messages.
        write: `write(run_dirs, out_dir, **options) -> result dict` (one run, or several when `combine`).
        combine: runs of this kind given together share one report (the classifier's blends).
    """

    task: str
    columns: tuple[str, ...]
    layout: str
    write: Callable[..., dict]
    combine: bool = False


REPORT_KINDS: dict[str, ReportKind] = {}


def register_report(task: str, columns: Sequence[str], layout: str, *, combine: bool = False):
    """Decorator: `write(run_dirs, out_dir, **options)` reports the runs whose config says `task: <task>`."""

    def wrap(write: Callable[..., dict]) -> Callable[..., dict]:
        REPORT_KINDS[task] = ReportKind(task, tuple(columns), layout, write, combine)
        return write

    return wrap


@register_report("cls", (UID, "fold", *TARGETS), "StudyInstanceUID, fold, patient_overall, C1..C7 "
                 "(probabilities), <target>_true", combine=True)
def _write_cls(run_dirs: Sequence[Path], out_dir: PathLike | None, *, labels=None, answers_dir=None, **_) -> dict:
    result = oof_report(run_dirs, out_dir, labels=labels, answers_dir=answers_dir)
    base = result["baseline"]["score_row"]
    fair = result["baseline_from_train_folds"]
    scores = ", ".join(f"{n} {s['row']:.4f}" for n, s in result["scores"].items())
    baselines = (f"prevalence baseline {fair['score_row']:.4f} (training folds), {base:.4f} (in-sample)"
                 if fair is not None else f"prevalence baseline {base:.4f} (in-sample)")
    return {**result, "kind": "cls", "run": "+".join(result["runs"]), "n_studies": result["baseline"]["n_studies"],
            "headline": f"score (row) {scores} | {baselines}"}


@register_report("seg", SEG_COLUMNS[2:], "StudyInstanceUID, fold, epoch, slices, dice_C1..dice_C7, dice_mean, "
                 "zerr_C1..zerr_C7, zerr_max")
def _write_seg(run_dirs: Sequence[Path], out_dir: PathLike | None, *, n_worst: int = 5, **_) -> dict:
    return seg_report(run_dirs[0], out_dir, n_worst=n_worst)


@register_report("level", LEVEL_COLUMNS[2:], "StudyInstanceUID, fold, epoch, steps, iou_C1..iou_C7, iou_mean")
def _write_level(run_dirs: Sequence[Path], out_dir: PathLike | None, *, n_worst: int = 5, **_) -> dict:
    return level_report(run_dirs[0], out_dir, n_worst=n_worst)


def _expected() -> str:
    return "; ".join(f"task {k.task!r} with oof.csv columns {k.layout}" for k in REPORT_KINDS.values())


def run_task(run_dir: PathLike) -> str:
    """Which report a run gets: the `task` of its `fold*/config.yaml`, else the one its oof.csv columns fit.

    Raises:
        FileNotFoundError: no run folder, or neither a config with a task nor an oof.csv in it.
        ValueError: folds disagree on the task, the task has no report, or the oof.csv columns fit no kind
            (or several); the message names the run and the layouts expected.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    tasks = {}
    for folder in fold_dirs(run_dir).values():
        if (folder / "config.yaml").is_file():
            values = yaml.safe_load((folder / "config.yaml").read_text())
            if isinstance(values, dict) and values.get("task"):
                tasks[folder.name] = str(values["task"])
    if len(set(tasks.values())) > 1:
        raise ValueError(f"{run_dir}: the folds' config.yaml disagree on the task ({tasks}); one run, one task")
    if tasks:
        task = next(iter(tasks.values()))
        if task not in REPORT_KINDS:
            raise ValueError(f"{run_dir}: config task {task!r} has no report; reports exist for "
                             f"{', '.join(REPORT_KINDS)}")
        return task
    oofs = sorted(p for p in run_dir.glob(f"fold*/{OOF_NAME}") if p.parent.name[4:].isdigit())
    oofs = oofs or [p for p in (run_dir / OOF_NAME,) if p.is_file()]
    if not oofs:
        raise FileNotFoundError(f"{run_dir}: no fold<k>/config.yaml with a task and no {OOF_NAME}; expected a run "
                                f"folder written by kit train: fold<k>/config.yaml, log.csv, {OOF_NAME}")
    header = set(pd.read_csv(oofs[0], nrows=0).columns)
    found = [k.task for k in REPORT_KINDS.values() if header >= set(k.columns)]
    if len(found) != 1:
        raise ValueError(f"{run_dir}: unknown layout: no config.yaml with a task, and the columns of {oofs[0]} "
                         f"({', '.join(sorted(header)[:12])}{', ...' if len(header) > 12 else ''}) fit "
                         f"{'several kinds ' + str(found) if found else 'no report'}; expected {_expected()}")
    return found[0]


def run_report(run_dirs: PathLike | Sequence[PathLike], out_dir: PathLike | None = None, *, n_worst: int = 5,
               labels=None, answers_dir: PathLike | None = None) -> list[dict]:
    """The report of any runs (what `kit report` calls): each run gets the report of its kind (`run_task`).

    Segmenter (`seg_report`) and level-model (`level_report`) runs get one report each; classifier-format
    runs given together share one `oof_report` (scores side by side and their blends).

    Args:
        run_dirs: one run folder or several, of any kinds.
        out_dir: where to write; default each run's own folder (`oof_report`'s default for several
            classifier runs). With several reports, each goes to `out_dir/<run name>`.
        n_worst: worst studies listed (and pictured, for a segmenter) per seg / level report.
        labels: label table for classifier OOF files without `_true` columns (see `load_oof`).
        answers_dir: the synthetic generator's answers folder (`fractures.csv`): classifier reports add the
            recall by fracture kind and subtlety (see `oof_report`).

    Returns:
        One result dict per report, each with at least `kind`, `run`, `n_studies`, `headline`, `out_dir`,
        `report_md`, `report_json`, `pngs`.

    Raises:
        FileNotFoundError, ValueError: a run has an unknown layout (see `run_task`), before anything is written.
    """
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, os.PathLike)) else [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("run_report needs at least one run folder")
    groups: dict = {}
    for run_dir in run_dirs:
        task = run_task(run_dir)
        key = task if REPORT_KINDS[task].combine else (task, len(groups))
        groups.setdefault(key, (task, []))[1].append(run_dir)
    results = []
    for task, runs in groups.values():
        dest = out_dir
        if out_dir is not None and len(groups) > 1:
            dest = Path(out_dir) / "+".join(_slug(r.resolve().name) for r in runs)
        results.append(REPORT_KINDS[task].write(runs, dest, n_worst=n_worst, labels=labels, answers_dir=answers_dir))
    return results


def summary_table(results: Sequence[dict]) -> str:
    """A short plain-text table of `run_report` results: run, kind, studies, headline, then where each report is."""
    rows = [("run", "kind", "studies", "headline")]
    rows += [(r["run"], r["kind"], str(r["n_studies"]), r["headline"]) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    for r in results:
        lines.append(f"report: {r['report_md']}  ({len(r['pngs'])} plots)")
        missing = r.get("missing_pictures") or {}
        if missing:
            lines.append(f"  {len(missing)} of the worst studies' pictures missing, e.g. "
                         f"{next(iter(missing.values()))}")
    return "\n".join(lines)
