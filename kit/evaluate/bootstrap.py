"""Bootstrap intervals of AUC (studies resampled, optionally within strata) and of a mean."""

from __future__ import annotations

import numpy as np
import pandas as pd

LEVEL = 0.90  # the bootstrap intervals' coverage
N_BOOT = 1000



def _auc(y: np.ndarray, p: np.ndarray, strata: np.ndarray | None = None) -> float:
    """`kit.evaluate.metrics.roc_auc` (Mann-Whitney, ties half) without pandas: NaN with one class. With `strata`, only
    pairs within a stratum count: each stratum's AUC weighted by its (positive, negative) pairs; NaN when no
    stratum holds both classes."""
    from scipy.stats import rankdata

    if strata is not None:
        total, pairs = 0.0, 0
        for s in np.unique(strata):
            inside = strata == s
            n_pos = int(y[inside].sum())
            n = n_pos * (int(inside.sum()) - n_pos)
            if n:
                total, pairs = total + _auc(y[inside], p[inside]) * n, pairs + n
        return total / pairs if pairs else float("nan")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _resamples(groups: np.ndarray, n_boot: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Row indices of each group, and (n_boot, n_groups) group draws with replacement."""
    codes, _ = pd.factorize(pd.Series(groups), sort=False)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)] if len(codes) else []
    draws = np.random.default_rng(seed).integers(0, len(members), size=(n_boot, len(members)))
    return members, draws


def _interval(values: list[float], level: float) -> tuple[float | None, float | None]:
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if not len(finite):
        return None, None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_auc(y, p, groups=None, strata=None, *, n_boot: int = N_BOOT, level: float = LEVEL,
                  seed: int = 0) -> dict:
    """ROC AUC of `p` for the 0/1 labels `y`, with a percentile bootstrap interval over `groups` (studies).

    Whole groups are drawn with replacement (a study's seven vertebrae stay together); a draw with one class only
    gives no AUC and is left out (`n_valid` counts the others). A perfect ranking gives AUC 1 and [1, 1].
    With `strata` (each vertebra's level) positives are ranked only against negatives of their own stratum: a
    score that knows the level and nothing else (a constant per level) then gets exactly 0.5.

    Args:
        y: (N,) 0/1 labels.
        p: (N,) scores.
        groups: (N,) the study of each row (default: each row its own group).
        strata: (N,) the stratum of each row (default: one).
        n_boot: draws.
        level: the interval's coverage (0.9: the 5th to the 95th percentile).
        seed: the draws' seed.

    Returns:
        {"auc", "lo", "hi"} (None when `y` has one class or no row), "n_pos", "n_neg", "n_valid".
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p must have one value per row; got {y.shape} and {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"y must be 0/1; got values {sorted(set(y.tolist()) - {0.0, 1.0})[:5]}")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    strata = None if strata is None else np.asarray(strata)
    out = {"auc": None, "lo": None, "hi": None, "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum()),
           "n_valid": 0}
    point = _auc(y, p, strata)
    if not np.isfinite(point):
        return out
    members, draws = _resamples(groups, n_boot, seed)
    values = []
    for draw in draws:
        rows = np.concatenate([members[g] for g in draw])
        values.append(_auc(y[rows], p[rows], None if strata is None else strata[rows]))
    lo, hi = _interval(values, level)
    return {**out, "auc": point, "lo": lo, "hi": hi, "n_valid": int(np.isfinite(values).sum())}


def bootstrap_mean(values, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict:
    """Mean of per-study values with a percentile bootstrap interval (studies drawn with replacement).

    Returns:
        {"mean", "lo", "hi"} (None without values).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if not len(values):
        return {"mean": None, "lo": None, "hi": None}
    draws = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    lo, hi = _interval(values[draws].mean(1).tolist(), level)
    return {"mean": float(values.mean()), "lo": lo, "hi": hi}
