"""`kit bench learn`: the bootstrap intervals on hand-made data, the held-out scoring, and the quick run end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kit.tools.bench_learn import KINDS, SETTINGS, resolve_settings, score_heldout, training_view, vertebra_table
from kit.evaluate.bootstrap import bootstrap_auc, bootstrap_mean
from kit.constants import TARGETS, VERTEBRAE
from kit.evaluate.metrics import roc_auc

# ---------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------------------


def test_perfect_ranking_gives_one_and_a_point_interval():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.05, 0.6])
    r = bootstrap_auc(y, p, n_boot=300, seed=1)
    assert (r["auc"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)
    assert (r["n_pos"], r["n_neg"]) == (4, 4)
    assert 0 < r["n_valid"] <= 300
    reversed_ = bootstrap_auc(y, -p, n_boot=300, seed=1)
    assert (reversed_["auc"], reversed_["lo"], reversed_["hi"]) == (0.0, 0.0, 0.0)


def test_known_auc_ties_and_one_class():
    # pairs (pos, neg): 0.35 > 0.1, 0.35 < 0.4, 0.8 > both: 3 of 4
    r = bootstrap_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], n_boot=200)
    assert r["auc"] == pytest.approx(0.75)
    assert r["lo"] <= r["auc"] <= r["hi"]
    tied = bootstrap_auc([0, 1, 0, 1], [0.5] * 4, n_boot=100)
    assert (tied["auc"], tied["lo"], tied["hi"]) == (0.5, 0.5, 0.5)
    one_class = bootstrap_auc([0, 0, 0], [0.1, 0.2, 0.3])
    assert one_class["auc"] is None and one_class["lo"] is None and one_class["hi"] is None
    assert one_class["n_neg"] == 3 and one_class["n_valid"] == 0
    with pytest.raises(ValueError, match="0/1"):
        bootstrap_auc([0, 2], [0.1, 0.2])


def test_auc_matches_the_kits_and_groups_are_drawn_whole():
    rng = np.random.default_rng(3)
    y = (rng.random(140) < 0.3).astype(float)
    p = rng.random(140) + 0.3 * y
    groups = np.repeat(np.arange(20), 7)  # 20 studies of 7 vertebrae
    r = bootstrap_auc(y, p, groups, n_boot=400, seed=0)
    assert r["auc"] == pytest.approx(roc_auc(y, p))
    assert r["lo"] < r["auc"] < r["hi"]
    assert 0.0 <= r["lo"] <= r["hi"] <= 1.0
    # two studies, each of one class: a draw holds both classes only when it takes both studies (half the draws)
    split = bootstrap_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], ["a", "a", "b", "b"], n_boot=400, seed=0)
    assert split["auc"] == 1.0 and 120 < split["n_valid"] < 280
    # same seed, same interval
    assert bootstrap_auc(y, p, groups, n_boot=400, seed=0) == r


def test_within_strata_a_score_that_knows_only_the_stratum_gets_half():
    # level "a" fractured more often than "b": a score equal to each level's prevalence ranks well pooled ...
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=float)
    level = np.array(["a"] * 4 + ["b"] * 6)
    prior = np.where(level == "a", 0.5, 1 / 6)
    groups = np.arange(10) // 2
    pooled = bootstrap_auc(y, prior, groups, n_boot=200)
    # 3 positives x 7 negatives: a-pos vs a-neg tie (4 pairs), a-pos beat b-neg (10), b-pos ties b-neg (5), loses to a
    assert pooled["auc"] == pytest.approx((4 * 0.5 + 10 + 5 * 0.5) / 21)
    # ... but within levels it knows nothing
    within = bootstrap_auc(y, prior, groups, level, n_boot=200)
    assert (within["auc"], within["lo"], within["hi"]) == (0.5, 0.5, 0.5)
    # pairs-weighted: level a perfect (2 x 2 pairs), level b reversed (1 x 5 pairs)
    p = np.array([0.9, 0.8, 0.1, 0.2, 0.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert bootstrap_auc(y, p, None, level, n_boot=50)["auc"] == pytest.approx(4 / 9)
    assert bootstrap_auc(y[:4], p[:4], None, level[:4], n_boot=50)["auc"] == 1.0


def test_bootstrap_mean():
    flat = bootstrap_mean([0.4] * 10, n_boot=100)
    assert flat["mean"] == pytest.approx(0.4) and flat["lo"] == pytest.approx(0.4) and flat["hi"] == pytest.approx(0.4)
    r = bootstrap_mean(np.arange(100.0), n_boot=500, seed=2)
    assert r["mean"] == pytest.approx(49.5) and r["lo"] < 49.5 < r["hi"]
    assert 40 < r["lo"] and r["hi"] < 59  # about +-1.645 x 2.9
    assert bootstrap_mean([])["mean"] is None


# ---------------------------------------------------------------------------------------------------------
# Scoring held-out studies
# ---------------------------------------------------------------------------------------------------------


def _oof(labels: np.ndarray, probs: np.ndarray, fold: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame(probs, columns=list(TARGETS))
    for j, t in enumerate(TARGETS):
        table[f"{t}_true"] = labels[:, j].astype(int)
    table.insert(0, "StudyInstanceUID", [f"u{i}" for i in range(len(labels))])
    return table.assign(fold=fold)


def test_score_heldout_perfect_model_beats_the_constant():
    rng = np.random.default_rng(0)
    vertebrae = (rng.random((24, 7)) < 0.2).astype(float)
    vertebrae[0, 2] = vertebrae[1, 5] = 1  # both classes in every target that matters
    labels = np.column_stack([vertebrae.max(1), vertebrae])
    probs = np.where(labels == 1, 0.95, 0.03)
    oof = _oof(labels, probs, np.repeat([0, 1], 12))
    train = {0: labels[12:], 1: labels[:12]}
    fractures = pd.DataFrame({"StudyInstanceUID": ["u0", "u1"], "vertebra": ["C3", "C6"], "kind": ["cleft",
                                                                                                 "compression"]})
    lookalikes = pd.DataFrame({"StudyInstanceUID": ["u2"], "vertebra": ["all"], "kind": ["osteopenia"]})
    r = score_heldout(oof, train, fractures=fractures, lookalikes=lookalikes, n_boot=200)
    assert r["n_studies"] == 24
    assert r["patient"]["auc"] == 1.0 and r["vertebra"]["auc"] == 1.0 and r["vertebra_level"]["auc"] == 1.0
    assert (r["patient"]["lo"], r["patient"]["hi"]) == (1.0, 1.0)
    assert r["by_kind"]["cleft"]["auc"] == 1.0 and r["by_kind"]["cleft"]["n_pos"] == 1
    assert r["by_kind"]["hairline"]["auc"] is None  # no hairline among the answers
    assert r["by_kind_level"]["compression"]["auc"] == 1.0
    assert r["by_kind_constant"]["cleft"]["auc"] is not None
    assert r["lookalike"]["n_pos"] == int((vertebrae[2] == 0).sum())  # u2's intact vertebrae
    assert r["score"]["mean"] < r["constant"]["mean"]
    assert r["score_minus_constant"]["hi"] < 0
    assert r["score_minus_constant"]["mean"] == pytest.approx(r["score"]["mean"] - r["constant"]["mean"])


def test_vertebra_table_marks_kinds_and_lookalikes():
    labels = np.zeros((2, 8))
    labels[0, [0, 3]] = 1  # u0: C3 fractured
    oof = _oof(labels, np.full((2, 8), 0.1), np.zeros(2, int))
    fractures = pd.DataFrame({"StudyInstanceUID": ["u0"], "vertebra": ["C3"], "kind": ["displaced"]})
    lookalikes = pd.DataFrame({"StudyInstanceUID": ["u1", "u0"], "vertebra": ["C5", "all"], "kind": ["x", "y"]})
    table = vertebra_table(oof, fractures, lookalikes)
    assert len(table) == 14 and set(table["vertebra"]) == set(VERTEBRAE)
    row = table.set_index(["StudyInstanceUID", "vertebra"])
    assert row.loc[("u0", "C3"), "displaced"] == 1 and row.loc[("u0", "C3"), "y"] == 1
    assert row[list(KINDS)].to_numpy().sum() == 1
    assert row.loc[("u1", "C5"), "lookalike"] == 1 and row.loc[("u1", "C4"), "lookalike"] == 0
    assert row.loc[("u0", VERTEBRAE), "lookalike"].eq(1).all()


def test_training_view_keeps_the_held_out_fold(tmp_path):
    crops = tmp_path / "set" / "crops64"
    crops.mkdir(parents=True)
    uids = [f"1.2.{i}" for i in range(12)]
    for u in uids:
        (crops / f"{u}.npz").write_bytes(b"x")
    pd.DataFrame({"StudyInstanceUID": uids}).to_csv(crops / "manifest.csv", index=False)
    folds = pd.DataFrame({"StudyInstanceUID": uids, "fold": [i % 3 for i in range(12)]})
    assert training_view(crops, folds, 0, 1.0, 7, tmp_path / "views") == crops
    view = training_view(crops, folds, 0, 0.5, 7, tmp_path / "views")
    kept = pd.read_csv(view / "manifest.csv", dtype=str)["StudyInstanceUID"].tolist()
    held = [u for i, u in enumerate(uids) if i % 3 == 0]
    assert set(held) <= set(kept) and len(kept) == 4 + 4  # every held-out study, half of the 8 training ones
    assert all((view / f"{u}.npz").read_bytes() == b"x" for u in kept)
    again = training_view(crops, folds, 0, 0.5, 7, tmp_path / "views")
    assert pd.read_csv(again / "manifest.csv", dtype=str)["StudyInstanceUID"].tolist() == kept


def test_settings_by_name():
    assert set(resolve_settings(None, False)) <= set(SETTINGS)
    quick = resolve_settings(["lite0_128"], True)["lite0_128"]
    assert (quick.grid, quick.crop, quick.pretrained) == (64, 32, "imagenet")
    with pytest.raises(ValueError, match="available: base"):
        resolve_settings(["nope"], False)
    # one lever at a time from base
    base = SETTINGS["base"]
    for name in ("crop128", "lite0", "grid256"):
        s = SETTINGS[name]
        changed = [f for f in ("grid", "crop", "encoder") if getattr(s, f) != getattr(base, f)]
        assert len(changed) == 1, name


def test_flip_tta_is_a_lever_of_its_own(tmp_path):
    """start_as_is (the demo: flip TTA on) and start_as_is_noflip differ in the flip only; it reaches the run's
    config and its name, so a run scored without the flip is never reused as one with it."""
    from dataclasses import asdict

    from kit.tools.bench_learn import _run_name, run_overrides

    on, off = SETTINGS["start_as_is"], SETTINGS["start_as_is_noflip"]
    assert {k for k, v in asdict(on).items() if asdict(off)[k] != v} == {"tta_flip", "what"}
    assert run_overrides(on, {}, 1, 0, "x", tmp_path)["data.tta_flip"] is True
    assert run_overrides(off, {}, 1, 0, "x", tmp_path)["data.tta_flip"] is False
    assert "flip TTA" in on.describe() and "flip TTA" not in off.describe()
    assert _run_name("s", on, "k", 1, 3, 101) != _run_name("s", off, "k", 1, 3, 101)


# ---------------------------------------------------------------------------------------------------------
# The quick run end to end, through the CLI
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from kit.cli import main

    out = tmp_path_factory.mktemp("bench_learn")
    main(["bench", "learn", "--quick", "--out", str(out)])
    return out


def _aucs(row: dict) -> list[dict]:
    return [row["patient"], row["vertebra"], row["vertebra_level"], row["vertebra_constant"], row["lookalike"],
            row["lookalike_level"], *row["by_kind"].values(), *row["by_kind_level"].values(),
            *row["by_kind_constant"].values()]


def test_quick_run_table_and_files(quick_run, capsys):
    result = json.loads((quick_run / "bench_learn.json").read_text())
    rows = result["rows"]
    assert [r["setting"] for r in rows] == ["base", "lite0"]
    assert result["parameters"]["quick"] and result["parameters"]["seed"] != 0
    for r in rows:
        assert r["heldout_studies"] == 4 and r["train_studies"] == [8]  # 12 studies in 3 folds, fold 0
        assert set(r["by_kind"]) == set(r["by_kind_level"]) == set(KINDS)
        for auc in _aucs(r):
            if auc["auc"] is None:
                assert auc["lo"] is None and (auc["n_pos"] == 0 or auc["n_neg"] == 0)
            else:
                assert 0.0 <= auc["auc"] <= 1.0
                assert 0.0 <= auc["lo"] <= auc["hi"] <= 1.0
        for key in ("score", "constant", "score_minus_constant"):
            assert r[key]["lo"] <= r[key]["hi"]
        assert r["score"]["mean"] > 0 and r["constant"]["mean"] > 0
        assert set(r["minutes"]) == {"data", "crops", "training"} and all(v >= 0 for v in r["minutes"].values())
        png = quick_run / "galleries" / f"{r['setting']}.png"
        assert r["gallery"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert r["gallery_tiles"] >= 1
    assert rows[0]["set"] == rows[1]["set"] and rows[0]["crop_dir"] == rows[1]["crop_dir"]  # made once, shared
    assert rows[0]["run_dir"] != rows[1]["run_dir"]
    lines = result["table"].splitlines()
    assert lines[0].split()[:2] == ["setting", "grid/crop"] and len(lines) == 2 + len(rows)
    assert "patient AUC [90% CI]" in lines[0]


def test_quick_run_again_reuses_everything(quick_run):
    from kit.tools.bench_learn import bench_learn

    summary = next((quick_run / "sets").glob("*/answers/summary.json"))
    made = summary.stat().st_mtime_ns
    first = json.loads((quick_run / "bench_learn.json").read_text())
    again = bench_learn(quick_run, ["base"], quick=True, print_table=False)
    assert summary.stat().st_mtime_ns == made
    assert again["rows"][0]["patient"] == first["rows"][0]["patient"]
    assert again["rows"][0]["minutes"] == first["rows"][0]["minutes"]
