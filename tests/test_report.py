"""kit.report: the OOF report renders from contract-format files, and its numbers are the metric's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kit.constants import TARGETS, TRAIN_PREVALENCE
from kit.metrics import competition_score, prevalence_baseline
from kit.report import FITTED_BLEND, MEAN_BLEND, fit_blend_weights, load_oof, oof_report

UID = "StudyInstanceUID"
N_STUDIES, N_FOLDS = 120, 3


def labels(n: int = N_STUDIES, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    v = (rng.random((n, 7)) < np.array(TRAIN_PREVALENCE[1:])).astype(np.int64)
    df = pd.DataFrame(np.c_[v.max(1), v], columns=list(TARGETS))
    df.insert(0, UID, [f"1.2.826.0.1.3680043.{100 + i}" for i in range(n)])
    return df


def write_run(run_dir: Path, table: pd.DataFrame, *, seed: int, noise: float, per_fold: bool = True) -> pd.DataFrame:
    """A fixed-seed random predictor in the OOF contract: informative logits plus noise, 3 folds."""
    rng = np.random.default_rng(seed)
    y = table[list(TARGETS)].to_numpy()
    p = 1.0 / (1.0 + np.exp(-((2 * y - 1) * 1.2 - 1.0 + rng.normal(0.0, noise, y.shape))))
    oof = pd.DataFrame(p, columns=list(TARGETS))
    oof.insert(0, "fold", np.arange(len(table)) % N_FOLDS)
    oof.insert(0, UID, table[UID].to_numpy())
    for t in TARGETS:
        oof[f"{t}_true"] = table[t].to_numpy()
    if per_fold:
        for k in range(N_FOLDS):
            (run_dir / f"fold{k}").mkdir(parents=True, exist_ok=True)
            oof[oof["fold"] == k].to_csv(run_dir / f"fold{k}" / "oof.csv", index=False)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        oof.to_csv(run_dir / "oof.csv", index=False)
    return oof


@pytest.fixture(scope="module")
def two_run_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    table = labels()
    a = write_run(root / "cls_a", table, seed=1, noise=1.2)
    b = write_run(root / "cls_b", table, seed=2, noise=2.0)
    result = oof_report([root / "cls_a", root / "cls_b"], root / "report")
    return result, table, a, b, root


def test_report_files_and_pngs(two_run_report):
    result, *_ , root = two_run_report
    out = root / "report"
    assert Path(result["report_md"]) == out / "report.md" and Path(result["report_json"]) == out / "report.json"
    assert len(result["pngs"]) == 3 * 4  # roc, calibration, histograms for 2 runs + 2 blends
    for png in result["pngs"]:
        path = Path(png)
        assert path.is_file() and path.stat().st_size > 10_000, png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| model | studies | score (row) | score (global)" in md
    assert "optimistic" in md and "roc_cls_a.png" in md and "fitted blend" in md
    assert md.count("| C3 |") == 2  # per-target contribution and AUC tables


def test_report_numbers_are_the_metrics(two_run_report):
    result, table, a, b, root = two_run_report
    stored = json.loads((root / "report" / "report.json").read_text())
    y = table[list(TARGETS)].to_numpy()
    for name, oof in (("cls_a", a), ("cls_b", b)):
        row = competition_score(y, oof[list(TARGETS)].to_numpy())
        glob = competition_score(y, oof[list(TARGETS)].to_numpy(), normalise="global")
        assert stored["scores"][name]["row"] == pytest.approx(row, abs=1e-12)
        assert stored["scores"][name]["global"] == pytest.approx(glob, abs=1e-12)
        assert sum(stored["models"][name]["per_target_row"].values()) == pytest.approx(row, abs=1e-12)
        folds = stored["models"][name]["per_fold"]
        assert [f["fold"] for f in folds] == [0, 1, 2] and sum(f["n_studies"] for f in folds) == N_STUDIES
        m = oof["fold"].to_numpy() == 1
        assert folds[1]["score_row"] == pytest.approx(competition_score(y[m], oof[list(TARGETS)].to_numpy()[m]))
    assert stored["baseline"]["score_row"] == pytest.approx(prevalence_baseline(y)[0], abs=1e-12)
    mean = (a[list(TARGETS)].to_numpy() + b[list(TARGETS)].to_numpy()) / 2
    assert stored["scores"][MEAN_BLEND]["row"] == pytest.approx(competition_score(y, mean), abs=1e-12)
    # The fitted blend is fitted on these OOF predictions: never worse than the mean blend there.
    assert stored["scores"][FITTED_BLEND]["row"] <= stored["scores"][MEAN_BLEND]["row"] + 1e-12
    w = stored["blend_weights"]
    assert set(w) == {"cls_a", "cls_b"} and sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
    assert w["cls_a"] > w["cls_b"]  # the less noisy run gets more weight
    assert stored["scores"]["cls_a"]["row"] < stored["baseline"]["score_row"]  # informative beats the prior


def test_single_run_defaults_and_root_oof(tmp_path):
    table = labels(60, seed=3)
    run = tmp_path / "runs" / "cls_single"
    write_run(run, table, seed=4, noise=1.0, per_fold=False)  # one oof.csv at the run root
    result = oof_report(run)
    assert Path(result["out_dir"]) == run and (run / "report.md").is_file()
    assert len(result["pngs"]) == 3 and result["blend_weights"] is None
    assert set(result["scores"]) == {"cls_single"}


def test_labels_argument_and_contract_errors(tmp_path):
    table = labels(30, seed=5)
    run = tmp_path / "run"
    oof = write_run(run, table, seed=6, noise=1.0, per_fold=False)
    oof.drop(columns=[f"{t}_true" for t in TARGETS]).to_csv(run / "oof.csv", index=False)
    with pytest.raises(ValueError, match=r"missing columns \['patient_overall_true'"):
        load_oof(run)
    got = load_oof(run, labels=table)  # labels from a table instead
    np.testing.assert_array_equal(got[[f"{t}_true" for t in TARGETS]].to_numpy(), table[list(TARGETS)].to_numpy())
    oof.assign(C2=oof["C2"] + 1.0).to_csv(run / "oof.csv", index=False)
    with pytest.raises(ValueError, match=r"predictions must be probabilities in \[0, 1\]"):
        load_oof(run)
    with pytest.raises(FileNotFoundError, match="no OOF predictions"):
        load_oof(tmp_path)


def test_fit_blend_weights_finds_the_better_run():
    table = labels(200, seed=7)
    y = table[list(TARGETS)].to_numpy()
    good = np.clip(y * 0.7 + 0.15, 0, 1)
    bad = np.full(y.shape, 0.5)
    w = fit_blend_weights(y, [bad, good])
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and w[1] > 0.9
