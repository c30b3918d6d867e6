"""kit.evaluate.calibration: Platt scaling per target fitted on OOF predictions with the competition's weights."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kit.evaluate.calibration import (apply_calibration, calibrate_run, cross_fitted, fit_calibration, fit_platt,
                             read_calibration, write_calibration)
from kit.constants import TARGETS


def _oof(n: int = 400, seed: int = 0, skill: float = 2.0) -> pd.DataFrame:
    """OOF table whose labels follow sigmoid(skill * logit(p) - 1) for predictions p."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, size=(n, len(TARGETS)))
    x = np.log(p) - np.log1p(-p)
    y = (rng.random(p.shape) < 1 / (1 + np.exp(-(skill * x - 1.0)))).astype(int)
    df = pd.DataFrame(p, columns=list(TARGETS))
    for i, t in enumerate(TARGETS):
        df[f"{t}_true"] = y[:, i]
    df.insert(0, "StudyInstanceUID", [f"s{i}" for i in range(n)])
    df.insert(1, "fold", np.arange(n) % 4)
    return df


def test_platt_recovers_a_known_map_and_shrinks_noise_to_the_prevalence():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, 20000)
    x = np.log(p) - np.log1p(-p)
    y = (rng.random(p.size) < 1 / (1 + np.exp(-(0.5 * x + 0.7)))).astype(float)
    a, b = fit_platt(p, y, np.ones_like(p), ridge=0.0)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(0.7, abs=0.05)
    # predictions unrelated to the labels: slope ~0, output ~ the weighted prevalence
    y = (rng.random(p.size) < 0.2).astype(float)
    w = np.where(y > 0, 2.0, 1.0)
    a, b = fit_platt(p, y, w)
    q = 1 / (1 + np.exp(-b))
    assert abs(a) < 0.05 and q == pytest.approx((w * y).sum() / w.sum(), abs=0.01)


def test_apply_keeps_nan_and_the_identity_map_changes_nothing():
    probs = np.array([[0.1, 0.5, np.nan, 0.9, 0.3, 0.2, 0.7, 0.6]])
    same = apply_calibration(probs, {t: {"a": 1.0, "b": 0.0} for t in TARGETS})
    np.testing.assert_allclose(same, probs, atol=1e-9)
    assert np.isnan(same[0, 2])


def test_cross_fitting_never_uses_a_fold_on_itself():
    oof = _oof()
    base = cross_fitted(oof)
    changed = oof.copy()
    rows = changed["fold"] == 1
    changed.loc[rows, [f"{t}_true" for t in TARGETS]] = 1 - changed.loc[rows, [f"{t}_true" for t in TARGETS]]
    again = cross_fitted(changed)
    np.testing.assert_allclose(again.loc[rows, list(TARGETS)], base.loc[rows, list(TARGETS)])  # fold 1 as before
    assert not np.allclose(again.loc[~rows, list(TARGETS)], base.loc[~rows, list(TARGETS)])  # the others moved
    with pytest.raises(ValueError, match="at least two folds"):
        cross_fitted(oof.assign(fold=0))


def test_calibrate_run_writes_only_when_it_helps_out_of_fold(tmp_path):
    oof = _oof(skill=2.0)  # underconfident and biased (labels follow sigmoid(2 logit p - 1)): calibration helps
    for fold, part in oof.groupby("fold"):
        (tmp_path / f"fold{fold}").mkdir()
        part.to_csv(tmp_path / f"fold{fold}" / "oof.csv", index=False)
    result = calibrate_run(tmp_path, only_if_better=True)
    assert result["written"] and result["oof_score_cross_fitted"] < result["oof_score"]
    stored = read_calibration(tmp_path)
    assert stored == result["targets"] and stored["C1"]["a"] == pytest.approx(2.0, abs=0.4)
    # predictions already optimal for the weighted loss (the true probability with its odds times the weights'
    # ratio, 2 for every target): a fit cannot beat them out of fold, so the file goes
    good = _oof(skill=1.0)
    logit = np.log(good[list(TARGETS)]) - np.log1p(-good[list(TARGETS)])
    good[list(TARGETS)] = 1 / (1 + np.exp(-(logit - 1.0 + np.log(2.0))))
    for fold, part in good.groupby("fold"):
        part.to_csv(tmp_path / f"fold{fold}" / "oof.csv", index=False)
    again = calibrate_run(tmp_path, only_if_better=True)
    assert not again["written"] and read_calibration(tmp_path) is None


def test_a_broken_calibration_file_is_a_clear_error(tmp_path):
    write_calibration(tmp_path, {t: {"a": 1.0, "b": 0.0} for t in TARGETS if t != "C3"})
    with pytest.raises(ValueError, match="C3"):
        read_calibration(tmp_path)


def test_calibrating_a_constant_oof_lands_on_the_row_optimal_constant(tmp_path):
    """A no-skill OOF (0.5 everywhere) calibrates to the constant that minimises the row-normalised metric,
    best_constant(prevalence, effective_odds): the fit weighs each cell as the row form does. (Weighted by the
    global form's weights, it landed at twice the odds and made the score worse.)"""
    from kit.evaluate.metrics import best_constant, competition_score, effective_odds

    rng = np.random.default_rng(4)
    v = (rng.random((600, 7)) < [0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2]).astype(int)
    y = np.concatenate([v.max(1, keepdims=True), v], axis=1)
    oof = pd.DataFrame(np.full(y.shape, 0.5), columns=list(TARGETS))
    for i, t in enumerate(TARGETS):
        oof[f"{t}_true"] = y[:, i]
    calibrated = apply_calibration(oof[list(TARGETS)].to_numpy(), fit_calibration(oof))
    best = best_constant(y.mean(0), effective_odds(y))
    np.testing.assert_allclose(calibrated[0], best, rtol=1e-6)
    assert competition_score(y, calibrated) == pytest.approx(competition_score(y, best))
    path = write_calibration(tmp_path, fit_calibration(oof))
    assert path.name == "calibration.json" and not list(tmp_path.glob(".*.tmp"))  # written whole, no leftovers
    assert read_calibration(tmp_path)["C1"]["b"] == pytest.approx(np.log(best[1] / (1 - best[1])), abs=1e-5)
