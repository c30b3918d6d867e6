"""The competition metric and the other numbers the kit reports (numpy / pandas only).

The metric (RSNA_DATA.md) is a weighted multi-label log loss over the 8 columns
`[patient_overall, C1, ..., C7]` (`kit.constants.TARGETS`): a negative label weighs
`NEGATIVE_WEIGHTS = [7, 1, ..., 1]`, a positive one `POSITIVE_WEIGHTS = [14, 2, ..., 2]`, and probabilities
are clipped to `[1e-15, 1 - 1e-15]`. Two forms circulate:

- `"row"` (public reference implementations, the default): per study
  `sum_j w_ij * loss_ij / sum_j w_ij`, then the mean over studies;
- `"global"`: `sum_ij w_ij * loss_ij / sum_ij w_ij` over the whole table.

They agree when every study has the same total weight (e.g. all labels equal) and differ otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..constants import (
    LOGLOSS_EPS,
    NEGATIVE_WEIGHTS,
    POSITIVE_WEIGHTS,
    PROB_CLIP,
    TARGETS,
    VERTEBRAE,
)

UID = "StudyInstanceUID"
NORMALISE = ("row", "global")
_NEG = np.asarray(NEGATIVE_WEIGHTS, dtype=np.float64)
_POS = np.asarray(POSITIVE_WEIGHTS, dtype=np.float64)
#: (7,) the odds ratio a per-vertebra model learns (`kit.losses.vertebra_loss`: a positive vertebra weighs 2, a
#: negative 1), so that its probability has VERTEBRA_LOSS_ODDS times the odds of the chance of a fracture.
VERTEBRA_LOSS_ODDS = _POS[1:] / _NEG[1:]
_SHOW = 5


def _few(values: Sequence, n: int = _SHOW) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def _as_matrix(y, name: str, *, allow_1d: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 8) float64 in TARGETS order, and the UIDs when `y` is a DataFrame that has a UID column."""
    uids = None
    if isinstance(y, pd.DataFrame):
        missing = [t for t in TARGETS if t not in y.columns]
        if missing:
            raise ValueError(f"{name}: missing columns {missing}; need {list(TARGETS)} (any order, by name)")
        if UID in y.columns:
            uids = y[UID].astype(str).to_numpy()
        try:
            arr = y[list(TARGETS)].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: the {list(TARGETS)} columns must be numeric ({err})") from None
    else:
        arr = np.asarray(y, dtype=np.float64)
        if allow_1d and arr.shape == (len(TARGETS),):
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != len(TARGETS):
            raise ValueError(f"{name}: expected shape (N, {len(TARGETS)}) in order {list(TARGETS)}; got {arr.shape}")
    return arr, uids


def _check_labels(y: np.ndarray, name: str = "y_true") -> None:
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        rows, cols = np.nonzero(bad)
        cells = [f"row {r} {TARGETS[c]}={float(y[r, c])!r}" for r, c in zip(rows, cols)]
        raise ValueError(f"{name}: labels must be 0 or 1; got {_few(cells)}")


def _check_probs(p: np.ndarray, name: str = "y_pred") -> None:
    bad = np.isnan(p) | (p < 0) | (p > 1)
    if bad.any():
        rows, cols = np.nonzero(bad)
        cells = [f"row {r} {TARGETS[c]}={float(p[r, c])!r}" for r, c in zip(rows, cols)]
        raise ValueError(f"{name}: probabilities must be numbers in [0, 1] (not logits, not NaN); got {_few(cells)}")


def align_predictions(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Both tables as (N, 8) float64 arrays in TARGETS order, rows matched.

    DataFrames are matched by column name; when both carry `StudyInstanceUID`, `y_pred`'s rows are put in
    `y_true`'s order. `y_pred` may be a single (8,) row, used for every study.

    Raises:
        ValueError: missing columns, wrong shapes, row counts or study sets that differ, labels other than
            0/1, probabilities outside [0, 1] or NaN.
    """
    t, t_uids = _as_matrix(y_true, "y_true")
    p, p_uids = _as_matrix(y_pred, "y_pred", allow_1d=True)
    if t_uids is not None and p_uids is not None:
        for uids, name in ((t_uids, "y_true"), (p_uids, "y_pred")):
            dup = pd.unique(uids[pd.Series(uids).duplicated().to_numpy()])
            if len(dup):
                raise ValueError(f"{name}: duplicated {UID} {_few(dup)}")
        lacking = sorted(set(t_uids) - set(p_uids))
        unknown = sorted(set(p_uids) - set(t_uids))
        if lacking or unknown:
            raise ValueError(f"y_true and y_pred cover different studies: no prediction for {_few(lacking) or '-'}; "
                             f"no label for {_few(unknown) or '-'}")
        p = p[pd.Index(p_uids).get_indexer(t_uids)]
    if p.shape[0] == 1 and t.shape[0] != 1:
        p = np.repeat(p, t.shape[0], axis=0)
    if p.shape != t.shape:
        raise ValueError(f"y_true has {t.shape[0]} rows but y_pred has {p.shape[0]}; they must match")
    _check_labels(t)
    _check_probs(p)
    return t, p


def logit(p, eps: float = 1e-7) -> np.ndarray:
    """log(p / (1 - p)) in float64, p clipped to [eps, 1 - eps] so that every logit is finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(x) -> np.ndarray:
    """1 / (1 + exp(-x)) in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def metric_weights(y_true: np.ndarray) -> np.ndarray:
    """(N, 8) metric weight of each label: `POSITIVE_WEIGHTS` where 1, `NEGATIVE_WEIGHTS` where 0."""
    y = np.asarray(y_true, dtype=np.float64)
    return y * _POS + (1.0 - y) * _NEG


def scale_odds(p, ratio) -> np.ndarray:
    """The probability whose odds are `ratio` x the odds of `p` (elementwise, float64; NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    ratio = np.asarray(ratio, dtype=np.float64)
    return ratio * p / (1.0 - p + ratio * p)


def effective_odds(y_true) -> np.ndarray:
    """(8,) how much the row-normalised metric favours a positive label over a negative one, per target.

    Each study's losses are divided by the study's own weight sum, which is larger when it has positives, so a
    positive label weighs less than its nominal 2 (14 / 7 for patient_overall): r_t = mean over studies with
    y_t = 1 of w_pos / W_row, over the mean over studies with y_t = 0 of w_neg / W_row. The constant that minimises
    the row-normalised metric for target t has r_t times the odds of t's prevalence (exact for a constant;
    on real labels about 1.2-1.5). A target with no positive or no negative study gets its nominal ratio.
    """
    y, _ = _as_matrix(y_true, "y_true")
    _check_labels(y)
    w = metric_weights(y)
    share = w / w.sum(1, keepdims=True)
    out = _POS / _NEG
    for j in range(y.shape[1]):
        pos, neg = y[:, j] == 1, y[:, j] == 0
        if pos.any() and neg.any():
            out[j] = share[pos, j].mean() / share[neg, j].mean()
    return out


def _check_prior(odds, prevalence) -> tuple[np.ndarray, np.ndarray]:
    odds = np.asarray(odds, dtype=np.float64)
    prevalence = np.asarray(prevalence, dtype=np.float64)
    if odds.shape != (len(TARGETS),) or prevalence.shape != (len(TARGETS),):
        raise ValueError(f"odds and prevalence must be ({len(TARGETS)},) in TARGETS order; got {odds.shape} and "
                         f"{prevalence.shape}")
    return odds, np.clip(prevalence, PROB_CLIP, 1.0 - PROB_CLIP)


def fill_missing_vertebrae(chance, prevalence) -> np.ndarray:
    """THE rule for a vertebra with no crop (stage 1 did not find it, or a per-study model had it masked): its
    chance of a fracture is its training prevalence. (..., 7) chances with NaN replaced by `prevalence[1:]`
    (TARGETS order, clipped to [PROB_CLIP, 1 - PROB_CLIP]). Validation, the OOF table and the submission all
    come through here (`targets_from_vertebrae`, `complete_targets`), so a missing vertebra counts the same in
    each, in its own value and in patient_overall."""
    chance = np.asarray(chance, dtype=np.float64)
    prior = np.clip(np.asarray(prevalence, dtype=np.float64)[1:], PROB_CLIP, 1.0 - PROB_CLIP)
    if chance.shape[-1] != len(VERTEBRAE) or prior.shape != (len(VERTEBRAE),):
        raise ValueError(f"expected (..., {len(VERTEBRAE)}) chances and ({len(TARGETS)},) prevalence; got "
                         f"{chance.shape} and {np.shape(prevalence)}")
    return np.where(np.isnan(chance), prior, chance)


def best_constant(prevalence, odds) -> np.ndarray:
    """(8,) the constant prediction that minimises the row-normalised metric on labels with this prevalence and
    these `effective_odds`: each target's prevalence (clipped to [PROB_CLIP, 1 - PROB_CLIP]) at `odds` times its
    odds. The submission's fallback for a study without a model answer (`kit.submit.predictor.run_fallback`)."""
    odds, prevalence = _check_prior(odds, prevalence)
    return scale_odds(prevalence, odds)


def targets_from_vertebrae(p_vertebrae, odds, prevalence) -> np.ndarray:
    """The 8 TARGETS probabilities from a per-vertebra model's C1..C7 probabilities (..., 7), for the
    row-normalised metric.

    A per-vertebra model is trained on the vertebra part of the metric's global form (`kit.losses.vertebra_loss`:
    positives weigh 2), so its probabilities carry twice the odds of the chance of a fracture. Undo that, give a
    vertebra with no crop (NaN) its training prevalence (`fill_missing_vertebrae`), take patient_overall =
    1 - prod(1 - p) over all seven, and give each target `odds[t]` times its odds (`effective_odds` of the
    training labels: what the row-normalised metric rewards).

    Args:
        p_vertebrae: (..., 7) the model's probabilities, NaN for a vertebra with no crop.
        odds: (8,) the model's `metric_odds`.
        prevalence: (8,) the training labels' prevalence, TARGETS order (the model's `train_prevalence`).
    """
    q = np.asarray(p_vertebrae, dtype=np.float64)
    odds, prevalence = _check_prior(odds, prevalence)
    if q.shape[-1] != len(VERTEBRAE):
        raise ValueError(f"expected (..., {len(VERTEBRAE)}) vertebra probabilities; got {q.shape}")
    chance = fill_missing_vertebrae(scale_odds(q, 1.0 / VERTEBRA_LOSS_ODDS), prevalence)
    patient = 1.0 - np.prod(1.0 - chance, axis=-1)
    return scale_odds(np.concatenate([patient[..., None], chance], axis=-1), odds)


def complete_targets(p_targets, found, odds, prevalence) -> np.ndarray:
    """A per-study model's 8 probabilities (..., 8) with each vertebra that had no crop (`found` False, (..., 7))
    given the value `targets_from_vertebrae` gives it: its training prevalence at `odds` (`fill_missing_vertebrae`).
    patient_overall (the model's patient head, which saw the mask) is kept."""
    p = np.array(p_targets, dtype=np.float64)
    odds, prevalence = _check_prior(odds, prevalence)
    found = np.broadcast_to(np.asarray(found, dtype=bool), p.shape[:-1] + (len(VERTEBRAE),))
    chance = np.where(found, scale_odds(p[..., 1:], 1.0 / odds[1:]), np.nan)
    p[..., 1:] = np.where(found, p[..., 1:], scale_odds(fill_missing_vertebrae(chance, prevalence), odds[1:]))
    return p


# ---------------------------------------------------------------------------------------------------------
# The competition score
# ---------------------------------------------------------------------------------------------------------


def competition_score(y_true, y_pred, *, normalise: str = "row", per_target: bool = False):
    """Weighted multi-label log loss of the competition (lower is better).

    Args:
        y_true: (N, 8) 0/1 labels in TARGETS order, or a DataFrame with the TARGETS columns (any order).
        y_pred: (N, 8) probabilities, a single (8,) row for every study, or a DataFrame as above. When both
            are DataFrames with `StudyInstanceUID`, rows are matched on it.
        normalise: `"row"`: per study `sum(w * loss) / sum(w)`, mean over studies (default);
            `"global"`: `sum(w * loss) / sum(w)` over all cells.
        per_target: return each target's contribution instead of the total.

    Returns:
        The score (float), or with `per_target=True` a Series indexed by TARGETS whose values sum to it.

    Examples:
        >>> round(competition_score([[1, 1, 0, 0, 0, 0, 0, 0]], [[0.5] * 8]), 4)  # ln 2
        0.6931
    """
    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be one of {NORMALISE}; got {normalise!r}")
    y, p = align_predictions(y_true, y_pred)
    if not len(y):
        raise ValueError("y_true is empty: nothing to score")
    p = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    loss = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))  # (N, 8)
    w = metric_weights(y)
    if normalise == "row":
        parts = (w * loss / w.sum(1, keepdims=True)).mean(0)  # mean over studies of each target's share
    else:
        parts = (w * loss).sum(0) / w.sum()
    if per_target:
        return pd.Series(parts, index=list(TARGETS), name=f"{normalise} contribution")
    return float(parts.sum())


def score_submission(submission, solution, *, normalise: str = "row") -> float:
    """Score a Kaggle-format submission against an answer table, with the checks Kaggle makes.

    Args:
        submission: DataFrame (or CSV path) with exactly the columns `row_id, fractured`.
        solution: DataFrame (or CSV path) with `row_id` and `fractured` (0/1); other columns are ignored.
        normalise: as in `competition_score`.

    Raises:
        ValueError: wrong columns; a row_id duplicated, missing or unknown; a value that is not a number,
            is NaN or lies outside [0, 1]. Each message names the first offending row_ids and their count.
    """
    sub = pd.read_csv(submission, dtype={"row_id": str}) if not isinstance(submission, pd.DataFrame) else submission
    sol = pd.read_csv(solution, dtype={"row_id": str}) if not isinstance(solution, pd.DataFrame) else solution
    expected = ["row_id", "fractured"]
    if list(sub.columns) != expected:
        missing = [c for c in expected if c not in sub.columns]
        extra = [c for c in sub.columns if c not in expected]
        raise ValueError(f"submission columns must be exactly {expected}; got {list(sub.columns)}"
                         + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
    missing = [c for c in expected if c not in sol.columns]
    if missing:
        raise ValueError(f"solution lacks columns {missing}; needs {expected}")
    sub_ids = sub["row_id"].astype(str).str.strip()
    sol_ids = sol["row_id"].astype(str).str.strip()
    dup = sub_ids[sub_ids.duplicated()].unique()
    if len(dup):
        raise ValueError(f"submission: {len(dup)} row_ids appear more than once: {_few(dup)}")
    if sol_ids.duplicated().any():
        raise ValueError(f"solution: duplicated row_ids {_few(sol_ids[sol_ids.duplicated()].unique())}")
    sub_set = set(sub_ids)
    lacking = [r for r in sol_ids if r not in sub_set]
    if lacking:
        raise ValueError(f"submission: {len(lacking)} row_ids missing: {_few(lacking)}")
    sol_set = set(sol_ids)
    unknown = [r for r in sub_ids if r not in sol_set]
    if unknown:
        raise ValueError(f"submission: {len(unknown)} unknown row_ids (not in the test set): {_few(unknown)}")
    raw = sub["fractured"]
    values = pd.to_numeric(raw, errors="coerce").astype(np.float64)
    not_number = values.isna() & raw.notna()
    if not_number.any():
        rows = [f"{r}={v!r}" for r, v in zip(sub_ids[not_number], raw[not_number])]
        raise ValueError(f"submission: fractured must be numeric; {int(not_number.sum())} rows are not: {_few(rows)}")
    if values.isna().any():
        rows = list(sub_ids[values.isna()])
        raise ValueError(f"submission: fractured is NaN/empty in {len(rows)} rows: {_few(rows)}")
    outside = (values < 0) | (values > 1)
    if outside.any():
        rows = [f"{r}={float(v)!r}" for r, v in zip(sub_ids[outside], values[outside])]
        raise ValueError(f"submission: fractured must lie in [0, 1]; {int(outside.sum())} rows do not: {_few(rows)}")
    labels = pd.to_numeric(sol["fractured"], errors="coerce")
    if (~labels.isin([0, 1])).any():
        raise ValueError(f"solution: fractured must be 0/1; bad rows {_few(sol_ids[~labels.isin([0, 1])])}")

    # Long -> wide, one study per row. UIDs never contain '_'; 'patient_overall' does.
    def split(row_id: str) -> tuple[str, str]:
        for t in TARGETS:
            if row_id.endswith("_" + t):
                return row_id[: -len(t) - 1], t
        raise ValueError(f"solution: bad row_id {row_id!r}; expected <StudyInstanceUID>_<one of {list(TARGETS)}>")

    keys = [split(r) for r in sol_ids]
    index = pd.MultiIndex.from_tuples(keys, names=[UID, "target"])
    truth = pd.Series(labels.to_numpy(np.float64), index=index).unstack("target")
    pred = pd.Series(values.to_numpy(np.float64), index=sub_ids.to_numpy()).reindex(sol_ids.to_numpy())
    pred = pd.Series(pred.to_numpy(), index=index).unstack("target")
    incomplete = truth.columns.symmetric_difference(pd.Index(TARGETS))
    if len(incomplete) or truth.isna().any().any():
        raise ValueError(f"solution: every study needs the 8 targets {list(TARGETS)}")
    return competition_score(truth[list(TARGETS)].to_numpy(), pred[list(TARGETS)].to_numpy(), normalise=normalise)


def prevalence_baseline(y_true, *, normalise: str = "row") -> tuple[float, pd.Series]:
    """The score of predicting each target's prevalence (the column mean of `y_true`) for every study.

    Returns:
        (score, prevalences indexed by TARGETS).
    """
    y, _ = _as_matrix(y_true, "y_true")
    _check_labels(y)
    prev = y.mean(0)
    return competition_score(y, prev, normalise=normalise), pd.Series(prev, index=list(TARGETS), name="prevalence")


# ---------------------------------------------------------------------------------------------------------
# Ranking and calibration
# ---------------------------------------------------------------------------------------------------------


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve of one target (Mann-Whitney U with ties counted half); NaN with one class."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(p).rank(method="average").to_numpy()
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_per_target(y_true, y_pred) -> pd.Series:
    """ROC AUC of each target, indexed by TARGETS; NaN where a target has only one class in `y_true`."""
    y, p = align_predictions(y_true, y_pred)
    return pd.Series([roc_auc(y[:, j], p[:, j]) for j in range(len(TARGETS))], index=list(TARGETS), name="auc")


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) points of the ROC curve of one target, from (0, 0) to (1, 1), one point per distinct score."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order], p[order]
    last = np.r_[np.nonzero(np.diff(p))[0], len(p) - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = max(y.sum(), 1.0), max(len(y) - y.sum(), 1.0)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def calibration_table(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Reliability table of one target (or flattened targets): equal-width bins over [0, 1].

    Returns:
        DataFrame per non-empty bin: `bin_lo, bin_hi, count, mean_pred, frac_pos`.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    keep = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pd.DataFrame({"bin_lo": edges[:-1], "bin_hi": edges[1:], "count": count,
                              "mean_pred": sum_p / count, "frac_pos": sum_y / count})
    return table[keep].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


def dice_per_vertebra(pred_labels: np.ndarray, true_labels: np.ndarray) -> pd.Series:
    """3D Dice of each vertebra label (1..7 = C1..C7) in one study, and their mean.

    Labels other than 1..7 (background 0, thoracic 8..19) are ignored. A vertebra absent from both volumes
    gets NaN and is left out of the mean; absent from one only, 0.

    Args:
        pred_labels: (Z, H, W) integer label volume (any shape, equal to `true_labels`').
        true_labels: same shape.

    Returns:
        Series indexed `C1..C7, mean`.
    """
    pred = np.asarray(pred_labels)
    true = np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels {pred.shape} and true_labels {true.shape} must have the same shape")
    pred = pred.ravel().astype(np.int64)
    true = true.ravel().astype(np.int64)
    n = len(VERTEBRAE) + 1
    pred = np.where((pred >= 1) & (pred < n), pred, 0)
    true = np.where((true >= 1) & (true < n), true, 0)
    inter = np.bincount(pred[pred == true], minlength=n)[1:]
    size_p = np.bincount(pred, minlength=n)[1:]
    size_t = np.bincount(true, minlength=n)[1:]
    denom = (size_p + size_t).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denom > 0, 2.0 * inter / denom, np.nan)
    mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
    return pd.Series([*dice, mean], index=[*VERTEBRAE, "mean"], name="dice")


def z_range_errors(pred_labels: np.ndarray, true_labels: np.ndarray) -> pd.Series:
    """How far each vertebra's predicted slice range is from the true one, in slices, and the worst of them.

    Per vertebra C1..C7 present in the truth: max(|first slice error|, |last slice error|). A vertebra the
    prediction misses counts as the study's slice count (never dropped from a median as NaN); one absent
    from the truth is NaN (a scan that stops above it) and is left out of the max.

    Args:
        pred_labels: (Z, H, W) integer label volume (1..7 = C1..C7).
        true_labels: the same shape.

    Returns:
        Series indexed `C1..C7, max`.
    """
    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels {pred.shape} and true_labels {true.shape} must have the same shape")
    z = pred.shape[0]
    errors = []
    for label in range(1, len(VERTEBRAE) + 1):
        t = np.nonzero((true == label).any(axis=(1, 2)))[0]
        p = np.nonzero((pred == label).any(axis=(1, 2)))[0]
        if not len(t):
            errors.append(np.nan)
        elif not len(p):
            errors.append(float(z))
        else:
            errors.append(float(max(abs(p[0] - t[0]), abs(p[-1] - t[-1]))))
    worst = float(np.nanmax(errors)) if np.isfinite(errors).any() else float("nan")
    return pd.Series([*errors, worst], index=[*VERTEBRAE, "max"], name="z_error")
