"""kit.evaluate.metrics: the competition score (hand-computed cases, row vs global), submission checks, AUC, Dice."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kit.constants import TARGETS, TRAIN_PREVALENCE, VERTEBRAE
from kit.evaluate.metrics import (
    calibration_table,
    competition_score,
    effective_odds,
    scale_odds,
    targets_from_vertebrae,
    fill_missing_vertebrae,
    complete_targets,
    best_constant,
    dice_per_vertebra,
    prevalence_baseline,
    roc_auc,
    roc_auc_per_target,
    roc_curve,
    score_submission,
)

UID = "StudyInstanceUID"
LN2 = math.log(2.0)


def random_labels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = (rng.random((n, 7)) < np.array(TRAIN_PREVALENCE[1:])).astype(np.float64)
    return np.c_[v.max(1), v]


def wide(y: np.ndarray, uids=None) -> pd.DataFrame:
    df = pd.DataFrame(y, columns=list(TARGETS))
    df.insert(0, UID, uids if uids is not None else [f"1.2.826.0.1.3680043.{i}" for i in range(len(y))])
    return df


def long(df: pd.DataFrame, value: str = "fractured") -> pd.DataFrame:
    return pd.DataFrame({"row_id": [f"{u}_{t}" for u in df[UID] for t in TARGETS],
                         value: df[list(TARGETS)].to_numpy().reshape(-1)})


# --------------------------------------------------------------------------------------------------------- by hand


def test_half_everywhere_is_ln2_whatever_the_weights():
    # Every cell loses -ln(0.5) = ln 2 whatever its label, so any weighted mean of them is ln 2.
    y = random_labels(300)
    assert competition_score(y, np.full_like(y, 0.5)) == pytest.approx(LN2, abs=1e-12)
    assert competition_score(y, np.full_like(y, 0.5), normalise="global") == pytest.approx(LN2, abs=1e-12)
    assert round(competition_score(y, [0.5] * 8), 4) == 0.6931  # a single (8,) row is broadcast


def test_two_studies_by_hand():
    # Study A: all negative, p = 0.1 everywhere. Each cell loses -ln(0.9) = 0.1053605;
    #   weights 7 + 7 * 1 = 14; row score A = 14 * 0.1053605 / 14 = 0.1053605.
    # Study B: patient_overall and C1 positive, p = 0.1 everywhere.
    #   patient_overall: weight 14, loss -ln(0.1) = 2.3025851
    #   C1:              weight  2, loss -ln(0.1)
    #   C2..C7:          weight  1 each (6 cells), loss -ln(0.9)
    #   sum w = 14 + 2 + 6 = 22; sum w*l = 16 * 2.3025851 + 6 * 0.1053605 = 37.4735233
    #   row score B = 37.4735233 / 22 = 1.7033420
    # row    = (0.1053605 + 1.7033420) / 2                      = 0.9043513
    # global = (14 * 0.1053605 + 37.4735233) / (14 + 22) = 38.9485706 / 36 = 1.0819047
    y = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=float)
    p = np.full((2, 8), 0.1)
    la, lb = -math.log(0.9), -math.log(0.1)
    row_a = la
    row_b = (16 * lb + 6 * la) / 22
    assert competition_score(y, p) == pytest.approx((row_a + row_b) / 2, abs=1e-12)
    assert competition_score(y, p) == pytest.approx(0.9043513, abs=1e-7)
    assert competition_score(y, p, normalise="global") == pytest.approx((14 * la + 16 * lb + 6 * la) / 36, abs=1e-12)
    assert competition_score(y, p, normalise="global") == pytest.approx(1.0819047, abs=1e-7)


def test_one_positive_study_by_hand():
    # patient_overall = C5 = 1 predicted 0.8; all others 0 predicted 0.2.
    # Every cell loses -ln(0.8) = 0.2231436 -> any weighting gives 0.2231436.
    y = np.zeros((1, 8))
    y[0, [0, 5]] = 1
    p = np.where(y == 1, 0.8, 0.2)
    assert competition_score(y, p) == pytest.approx(-math.log(0.8), abs=1e-12)
    # Now the patient prediction is 0.5: its weight 14 carries loss ln 2, the other 7 cells (weights 2 + 6 * 1 = 8)
    # lose -ln(0.8); study weight 14 + 8 = 22. Score = (14 ln 2 + 8 * 0.2231436) / 22 = 0.5225525.
    p[0, 0] = 0.5
    assert competition_score(y, p) == pytest.approx((14 * LN2 - 8 * math.log(0.8)) / 22, abs=1e-12)


def test_clipping_at_1e15():
    # A confident miss costs -ln(1e-15) = 34.5388, not infinity. (In float64 1 - (1 - 1e-15) is 0.9992e-15,
    # so the cost of a prediction of 1 is 34.5396: equal to 1e-4 relative.)
    y = np.zeros((1, 8))
    p = np.zeros((1, 8))
    p[0, 3] = 1.0  # C3 predicted 1, truly 0: weight 1 of the study's 14
    assert competition_score(y, p) == pytest.approx(-math.log(1e-15) / 14, rel=1e-4)
    y[0, 3] = 1
    p[0, 3] = 0.0  # a miss the other way: C3 truly 1 predicted 0; weight 2 of the study's 7 + 2 + 6 = 15
    assert competition_score(y, p) == pytest.approx(2 * -math.log(1e-15) / 15, rel=1e-12)


def test_row_and_global_agree_only_with_equal_study_weights():
    rng = np.random.default_rng(1)
    # Every study: patient positive and exactly 2 vertebrae positive -> weight 14 + 2*2 + 5*1 = 23 each.
    y = np.zeros((40, 8))
    y[:, 0] = 1
    for i in range(40):
        y[i, 1 + rng.choice(7, 2, replace=False)] = 1
    p = rng.uniform(0.05, 0.95, y.shape)
    row, glob = competition_score(y, p, normalise="row"), competition_score(y, p, normalise="global")
    assert row == pytest.approx(glob, abs=1e-12)
    # Mixed studies (weights 14 and 21 + k) make the two forms differ.
    y2 = random_labels(40, seed=2)
    assert abs(competition_score(y2, p) - competition_score(y2, p, normalise="global")) > 1e-3


@pytest.mark.parametrize("normalise", ["row", "global"])
def test_per_target_contributions_sum_to_the_score(normalise):
    y = random_labels(50)
    p = np.random.default_rng(3).uniform(0.01, 0.99, y.shape)
    parts = competition_score(y, p, normalise=normalise, per_target=True)
    assert list(parts.index) == list(TARGETS)
    assert parts.sum() == pytest.approx(competition_score(y, p, normalise=normalise), abs=1e-12)
    assert (parts > 0).all()


def test_dataframes_are_matched_by_name_and_uid():
    y = random_labels(20)
    p = np.random.default_rng(4).uniform(0.01, 0.99, y.shape)
    expected = competition_score(y, p)
    truth, pred = wide(y), wide(p)
    shuffled = pred.sample(frac=1.0, random_state=0)[[UID, *TARGETS[::-1]]]  # rows and columns reordered
    assert competition_score(truth, shuffled) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match=r"no prediction for 1\.2\.826\.0\.1\.3680043\.0"):
        competition_score(truth, pred.iloc[1:])
    with pytest.raises(ValueError, match=r"missing columns \['C4'\]"):
        competition_score(truth, pred.drop(columns="C4"))


@pytest.mark.parametrize("y, p, message", [
    (np.zeros((2, 8)), np.full((2, 7), 0.5), r"expected shape \(N, 8\)"),
    (np.zeros((2, 8)), np.full((3, 8), 0.5), "y_true has 2 rows but y_pred has 3"),
    (np.full((1, 8), 2.0), np.full((1, 8), 0.5), r"labels must be 0 or 1; got row 0 patient_overall=2\.0"),
    (np.zeros((1, 8)), np.full((1, 8), 1.5), r"probabilities must be numbers in \[0, 1\].*=1\.5"),
    (np.zeros((1, 8)), np.full((1, 8), np.nan), "not NaN"),
])
def test_competition_score_rejects(y, p, message):
    with pytest.raises(ValueError, match=message):
        competition_score(y, p)


# --------------------------------------------------------------------------------------------------------- baseline


def test_prevalence_baseline_equals_scoring_the_prevalence():
    y = random_labels(200, seed=5)
    score, prev = prevalence_baseline(y)
    np.testing.assert_allclose(prev.to_numpy(), y.mean(0))
    assert score == pytest.approx(competition_score(y, np.tile(y.mean(0), (200, 1))), abs=1e-12)
    g, _ = prevalence_baseline(y, normalise="global")
    assert g == pytest.approx(competition_score(y, y.mean(0), normalise="global"), abs=1e-12)
    assert score < LN2  # better than a coin


# --------------------------------------------------------------------------------------------------------- submission


@pytest.fixture()
def solution_and_submission():
    y = random_labels(6, seed=6)
    p = np.random.default_rng(6).uniform(0.01, 0.99, y.shape)
    return long(wide(y)), long(wide(p)), y, p


def test_score_submission_matches_competition_score(solution_and_submission):
    sol, sub, y, p = solution_and_submission
    shuffled = sub.sample(frac=1.0, random_state=1)
    assert score_submission(shuffled, sol) == pytest.approx(competition_score(y, p), abs=1e-12)
    assert score_submission(sub, sol.assign(Usage="Public"), normalise="global") == pytest.approx(
        competition_score(y, p, normalise="global"), abs=1e-12)


def test_score_submission_reads_csv_paths(tmp_path, solution_and_submission):
    sol, sub, y, p = solution_and_submission
    sol.to_csv(tmp_path / "sol.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    assert score_submission(tmp_path / "sub.csv", tmp_path / "sol.csv") == pytest.approx(competition_score(y, p))


def _bad(sub: pd.DataFrame, what: str) -> pd.DataFrame:
    sub = sub.copy()
    if what == "missing":
        return sub.drop(index=[0, 1, 2, 3, 4, 5, 6])
    if what == "duplicated":
        return pd.concat([sub, sub.iloc[[9]]], ignore_index=True)
    if what == "unknown":
        return pd.concat([sub, pd.DataFrame({"row_id": ["1.2.3_C1"], "fractured": [0.5]})], ignore_index=True)
    if what == "text":
        return sub.assign(fractured=sub["fractured"].astype(object).where(sub.index != 10, "high"))
    if what == "nan":
        return sub.assign(fractured=sub["fractured"].where(sub.index != 11))
    if what == "range":
        return sub.assign(fractured=sub["fractured"].where(sub.index != 12, 1.2))
    if what == "columns":
        return sub.rename(columns={"fractured": "probability"})
    raise AssertionError(what)


@pytest.mark.parametrize("what, message", [
    ("missing", r"7 row_ids missing: 1\.2\.826\.0\.1\.3680043\.0_patient_overall, .*\(7 in all\)"),
    ("duplicated", r"1 row_ids appear more than once: 1\.2\.826\.0\.1\.3680043\.1_C1"),
    ("unknown", r"1 unknown row_ids \(not in the test set\): 1\.2\.3_C1"),
    ("text", r"must be numeric; 1 rows are not: 1\.2\.826\.0\.1\.3680043\.1_C2='high'"),
    ("nan", r"NaN/empty in 1 rows: 1\.2\.826\.0\.1\.3680043\.1_C3"),
    ("range", r"must lie in \[0, 1\]; 1 rows do not: 1\.2\.826\.0\.1\.3680043\.1_C4=1\.2"),
    ("columns",
     r"columns must be exactly \['row_id', 'fractured'\].*missing \['fractured'\].*unexpected \['probability'\]"),
])
def test_score_submission_rejects(solution_and_submission, what, message):
    sol, sub, _, _ = solution_and_submission
    with pytest.raises(ValueError, match=message):
        score_submission(_bad(sub, what), sol)


# -------------------------------------------------------------------------------------------------- AUC, calibration


def test_roc_auc_by_hand_and_against_sklearn():
    # Positives score 0.35 and 0.8, negatives 0.1 and 0.4. Pairs (pos > neg): 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie counts half
    from sklearn.metrics import roc_auc_score

    y = random_labels(300, seed=8)
    p = np.clip(y * 0.3 + np.random.default_rng(8).uniform(0, 0.7, y.shape), 0, 1).round(2)  # with ties
    aucs = roc_auc_per_target(y, p)
    for j, t in enumerate(TARGETS):
        assert aucs[t] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-12)
        fpr, tpr = roc_curve(y[:, j], p[:, j])
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.trapezoid(tpr, fpr) == pytest.approx(aucs[t], abs=1e-12)


def test_roc_auc_is_nan_with_one_class():
    y = np.zeros((10, 8))
    y[:5, 0] = 1  # patient_overall has both classes; C1..C7 are all negative
    aucs = roc_auc_per_target(y, np.random.default_rng(0).random((10, 8)))
    assert not math.isnan(aucs["patient_overall"]) and aucs[list(VERTEBRAE)].isna().all()


def test_calibration_table():
    p = np.array([0.05, 0.05, 0.15, 0.95, 1.0])
    y = np.array([0, 1, 0, 1, 1])
    t = calibration_table(y, p, n_bins=10)
    assert t["count"].tolist() == [2, 1, 2]  # bins [0, .1), [.1, .2), [.9, 1]
    assert t["frac_pos"].tolist() == [0.5, 0.0, 1.0]
    assert t["mean_pred"].iloc[2] == pytest.approx(0.975)


# --------------------------------------------------------------------------------------------------------- Dice


def test_dice_per_vertebra_by_hand():
    true = np.zeros((2, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(true)
    true[0, :2, :2] = 1  # C1: 4 voxels
    pred[0, :2, :1] = 1  # predicted 2 of them -> Dice 2 * 2 / (2 + 4) = 0.6667
    true[1, :, :] = 2  # C2: 16 voxels, predicted exactly -> 1.0
    pred[1, :, :] = 2
    pred[0, 3, 3] = 5  # C5 predicted, absent in truth -> 0.0
    pred[0, 2, 2] = true[0, 2, 2] = 9  # thoracic label: ignored
    dice = dice_per_vertebra(pred, true)
    assert list(dice.index) == [*VERTEBRAE, "mean"]
    assert dice["C1"] == pytest.approx(2 / 3) and dice["C2"] == 1.0 and dice["C5"] == 0.0
    assert dice[["C3", "C4", "C6", "C7"]].isna().all()  # absent from both: left out
    assert dice["mean"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError, match="same shape"):
        dice_per_vertebra(pred[:1], true)


def test_z_range_errors_count_a_missed_vertebra_as_the_study_length():
    from kit.evaluate.metrics import z_range_errors

    true = np.zeros((20, 4, 4), np.uint8)
    true[2:6, 1, 1], true[6:10, 1, 1], true[10:14, 1, 1] = 1, 2, 3
    pred = np.zeros_like(true)
    pred[3:6, 1, 1], pred[6:12, 1, 1] = 1, 2  # C1 starts 1 late; C2 ends 2 late; C3 missed
    pred[15:17, 1, 1] = 5  # C5 is not in the truth: left out
    err = z_range_errors(pred, true)
    assert err[["C1", "C2", "C3"]].tolist() == [1.0, 2.0, 20.0]
    assert err[["C4", "C5", "C6", "C7"]].isna().all() and err["max"] == 20.0
    with pytest.raises(ValueError, match="same shape"):
        z_range_errors(pred[:3], true)


def test_effective_odds_by_hand_and_the_best_constant():
    """Row normalisation makes a positive weigh less than its nominal 2: studies (a) no fracture, W = 14;
    (b) patient + C1, W = 14 + 2 + 6 = 22; (c) patient + C6 + C7, W = 14 + 4 + 5 = 23."""
    y = np.array([[0] * 8, [1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 1, 1]], dtype=float)
    r = effective_odds(y)
    assert r[0] == pytest.approx(((14 / 22 + 14 / 23) / 2) / (7 / 14))  # patient_overall: 1.245
    assert r[1] == pytest.approx((2 / 22) / ((1 / 14 + 1 / 23) / 2))  # C1: positive only in (b)
    assert r[6] == pytest.approx((2 / 23) / ((1 / 14 + 1 / 22) / 2))
    assert r[2] == 2.0  # no positive C2: the nominal ratio
    # the constant with r times the prevalence's odds is the best constant for the row-normalised score
    rng = np.random.default_rng(0)
    y = (rng.random((400, 8)) < [0.5, 0.1, 0.15, 0.05, 0.05, 0.1, 0.2, 0.2]).astype(float)
    y[:, 0] = y[:, 1:].max(1)
    best = scale_odds(y.mean(0), effective_odds(y))
    score = competition_score(y, np.tile(best, (len(y), 1)))
    for j in range(8):
        for step in (-0.02, 0.02):
            moved = best.copy()
            moved[j] += step
            assert competition_score(y, np.tile(moved, (len(y), 1))) > score
    assert score < competition_score(y, np.tile(y.mean(0), (len(y), 1)))  # and better than the prevalence


def test_targets_from_vertebrae_by_hand():
    """Vertebra probabilities at the vertebra loss's doubled odds -> the chance of a fracture -> patient_overall
    = 1 - prod(1 - chance) -> each target at its metric odds; a vertebra with no crop (NaN) counts as its training
    prevalence, in its own value and in patient_overall."""
    prevalence = np.array([0.5, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1, 0.3])
    q = np.array([2 / 3, np.nan, 0.0, 0.0, 0.0, 0.0, 2 / 3])  # doubled odds of 0.5 (odds 2 = 2 x 1)
    out = targets_from_vertebrae(q, np.ones(8), prevalence)  # odds 1: the chance itself
    np.testing.assert_allclose(out[[0, 1, 2, 3, 7]], [1 - 0.5 * 0.8 * 0.5, 0.5, 0.2, 0.0, 0.5])
    out = targets_from_vertebrae(q, np.full(8, 3.0), prevalence)
    assert out[1] == pytest.approx(0.75) and out[2] == pytest.approx(scale_odds(0.2, 3.0))
    assert out[0] == pytest.approx(scale_odds(0.8, 3.0))  # chance 1 - 0.5 * 0.8 * 0.5 = 0.8, at odds x 3
    none = targets_from_vertebrae(np.full((2, 7), np.nan), np.ones(8), prevalence)  # nothing found: the prior
    np.testing.assert_allclose(none[:, 1:], np.tile(prevalence[1:], (2, 1)))
    np.testing.assert_allclose(none[:, 0], 1 - np.prod(1 - prevalence[1:]))
    with pytest.raises(ValueError, match="expected"):
        targets_from_vertebrae(np.zeros(8), np.ones(8), prevalence)


def test_one_rule_for_a_vertebra_with_no_crop():
    """fill_missing_vertebrae is the rule; a per-study model's masked vertebra (complete_targets) gets the same
    value as a per-vertebra model's vertebra not found (targets_from_vertebrae); found values and the patient
    head's value are kept."""
    prevalence = np.array([0.4, 0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2])
    odds = np.array([1.3, 1.2, 1.1, 1.0, 1.5, 1.2, 1.4, 1.25])
    np.testing.assert_allclose(fill_missing_vertebrae([[0.3, np.nan, 0, 0, 0, 0, np.nan]], prevalence),
                               [[0.3, 0.14, 0, 0, 0, 0, 0.2]])
    q = np.array([0.3, 0.5, np.nan, 0.1, 0.2, 0.6, np.nan])
    per_vertebra = targets_from_vertebrae(q, odds, prevalence)
    found = ~np.isnan(q)
    head = np.array([0.9, *np.where(found, 0.33, 0.77)])  # whatever the model said for the masked ones
    per_study = complete_targets(head, found, odds, prevalence)
    np.testing.assert_allclose(per_study[1:][~found], per_vertebra[1:][~found])
    np.testing.assert_allclose(per_study[1:][found], 0.33)
    assert per_study[0] == 0.9
    np.testing.assert_allclose(per_vertebra[[3, 7]], scale_odds(prevalence[[3, 7]], odds[[3, 7]]))


def test_best_constant_minimises_the_row_metric():
    """best_constant(prevalence, effective_odds) is the row-normalised metric's optimal constant (no step of
    any target lowers the score), and not the raw prevalence."""
    rng = np.random.default_rng(3)
    v = (rng.random((400, 7)) < [0.07, 0.14, 0.04, 0.05, 0.08, 0.14, 0.2]).astype(float)
    y = np.concatenate([v.max(1, keepdims=True), v], axis=1)
    best = best_constant(y.mean(0), effective_odds(y))
    score = competition_score(y, best)
    for j in range(8):
        for step in (-0.01, 0.01):
            moved = best.copy()
            moved[j] += step
            assert competition_score(y, moved) > score
    assert score < competition_score(y, y.mean(0)) - 1e-3
