"""Calibration of a classifier run from its out-of-fold predictions: per target, Platt scaling
p' = sigmoid(a * logit(p) + b), fitted by weighted log loss with the weights of the metric it is judged by, the
row-normalised competition score: each cell weighs w_ij / sum_j w_ij (`row_weights`).

Why: a classifier trained on a few studies is often overconfident, and the competition's log loss punishes that
harder than it rewards skill. Fitted on the OOF predictions (what each fold's model said about studies it never
saw), the map keeps what ranks well and shrinks what does not towards the weighted prevalence: a model with no
skill (a ~ 0) then predicts about the prevalence instead of its own noise. The fit is stored beside the folds as
`<run>/calibration.json` (`kit calibrate`, notebook 04, `kit.tools.demo`), and inference applies it to that run's fold mean
(`kit.stage2.infer.classify_study`); `kit export` carries it. Judge it by `cross_fitted` (each fold calibrated by a fit on
the other folds), never by the in-sample fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import TARGETS
from ..io.files import write_text_atomic
from .metrics import logit, metric_weights, sigmoid
from ..paths import PathLike

CALIBRATION_FILE = "calibration.json"
_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before the logit

def fit_platt(p: np.ndarray, y: np.ndarray, weights: np.ndarray, ridge: float = 1.0,
              iterations: int = 50) -> tuple[float, float]:
    """(a, b) minimising sum(w * logloss(sigmoid(a * logit(p) + b), y)) + ridge * a**2 (Newton's method).

    The ridge pulls the slope towards 0 (the prevalence) when the OOF gives little evidence of skill.
    """
    x, y, w = logit(p, _EPS), np.asarray(y, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    theta = np.array([0.0, float(logit((w * y).sum() / max(w.sum(), 1e-12), _EPS))])
    design = np.stack([x, np.ones_like(x)], axis=1)
    penalty = np.diag([ridge, 0.0])
    for _ in range(iterations):
        q = sigmoid(design @ theta)
        grad = design.T @ (w * (q - y)) + 2 * penalty @ theta
        hess = (design * (w * q * (1 - q))[:, None]).T @ design + 2 * penalty + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def row_weights(truth: np.ndarray) -> np.ndarray:
    """(N, 8) each cell's weight in the row-normalised metric: w_ij / sum_j w_ij (`kit.evaluate.metrics.competition_score`
    with `normalise="row"` is the mean over rows of sum_j w_ij * loss_ij / sum_j w_ij), times the mean row sum of
    the metric weights, a constant that keeps the weights on the scale of the metric weights themselves (the
    fit's optimum does not depend on it; the ridge's strength relative to the data does)."""
    w = metric_weights(truth)
    rows = w.sum(1, keepdims=True)
    return w / rows * rows.mean()


def fit_calibration(oof: pd.DataFrame, ridge: float = 1.0) -> dict:
    """{target: {"a", "b"}} for every target, from an OOF table with TARGETS and `<target>_true` columns
    (`kit.evaluate.oof.load_oof`), each cell weighted as the row-normalised metric weighs it (`row_weights`). Rows with
    a NaN prediction are left out of that target's fit."""
    out = {}
    truth = oof[[f"{t}_true" for t in TARGETS]].to_numpy(dtype=float)
    weights = row_weights(truth)
    for i, t in enumerate(TARGETS):
        p = oof[t].to_numpy(dtype=float)
        keep = np.isfinite(p)
        a, b = fit_platt(p[keep], truth[keep, i], weights[keep, i], ridge)
        out[t] = {"a": round(a, 6), "b": round(b, 6)}
    return out


def apply_calibration(probs: np.ndarray, calibration: dict) -> np.ndarray:
    """Calibrated (..., 8) probabilities in TARGETS order; NaN stays NaN."""
    probs = np.asarray(probs, dtype=np.float64)
    a = np.array([calibration[t]["a"] for t in TARGETS])
    b = np.array([calibration[t]["b"] for t in TARGETS])
    return np.where(np.isnan(probs), np.nan, sigmoid(a * logit(probs, _EPS) + b))


def cross_fitted(oof: pd.DataFrame, ridge: float = 1.0) -> pd.DataFrame:
    """The OOF table with each fold's predictions calibrated by a fit on the other folds' rows: an honest
    estimate of what calibration does to unseen studies (the in-sample fit would flatter it)."""
    out = oof.copy()
    for fold in sorted(oof["fold"].unique()):
        rows = oof["fold"] == fold
        if rows.all():
            raise ValueError("cross-fitting needs OOF predictions of at least two folds")
        cal = fit_calibration(oof[~rows], ridge)
        out.loc[rows, list(TARGETS)] = apply_calibration(oof.loc[rows, list(TARGETS)].to_numpy(), cal)
    return out


def write_calibration(run_dir: PathLike, calibration: dict, **meta) -> Path:
    """Save the fit as `<run_dir>/calibration.json` (with `meta`, e.g. the studies and folds it saw), atomically."""
    return write_text_atomic(Path(run_dir) / CALIBRATION_FILE, json.dumps({"targets": calibration, **meta},
                                                                           indent=1))


def read_calibration(run_dir: PathLike) -> dict | None:
    """The run's calibration ({target: {"a", "b"}}), or None when it has none.

    Raises:
        ValueError: the file exists but lacks a target or holds a non-finite number.
    """
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    targets = json.loads(path.read_text()).get("targets", {})
    bad = [t for t in TARGETS if t not in targets
           or not all(np.isfinite(float(targets[t].get(k, np.nan))) for k in ("a", "b"))]
    if bad:
        raise ValueError(f"{path}: no finite a, b for {bad}")
    return targets


def calibrate_run(run_dir: PathLike, ridge: float = 1.0, labels=None, only_if_better: bool = False) -> dict:
    """Fit a classifier run's calibration on all its OOF predictions and write `<run_dir>/calibration.json`.

    With `only_if_better`, the file is written only when the cross-fitted score beats the uncalibrated OOF
    score (and an older file is removed otherwise): on a few dozen studies the fit itself can cost more than
    it corrects.

    Returns:
        `written` (bool), `path`, `n_studies`, `folds`, `oof_score` (uncalibrated, row-normalised competition
        score), `oof_score_cross_fitted` (each fold calibrated by a fit on the others: what to expect on new
        studies; None with a single fold), `targets` (the fit).
    """
    from .metrics import competition_score
    from .oof import load_oof

    oof = load_oof(run_dir, labels=labels)
    truth = oof[[f"{t}_true" for t in TARGETS]].to_numpy()
    calibration = fit_calibration(oof, ridge)
    folds = sorted(int(f) for f in oof["fold"].unique())
    raw = float(competition_score(truth, oof[list(TARGETS)].to_numpy()))
    cv = (float(competition_score(truth, cross_fitted(oof, ridge)[list(TARGETS)].to_numpy()))
          if len(folds) > 1 else None)
    out = {"n_studies": len(oof), "folds": folds, "ridge": ridge, "oof_score": round(raw, 5),
           "oof_score_cross_fitted": None if cv is None else round(cv, 5)}
    path = Path(run_dir) / CALIBRATION_FILE
    written = not only_if_better or (cv is not None and cv < raw)
    if written:
        write_calibration(run_dir, calibration, **out)
    else:
        path.unlink(missing_ok=True)
    return {"written": written, "path": str(path), **out, "targets": calibration}
