"""kit.evaluate.report: each kind of run gets its report from contract-format files, and its numbers are the metric's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kit.constants import TARGETS, TRAIN_PREVALENCE
from kit.evaluate.metrics import competition_score, prevalence_baseline
from kit.evaluate.report import oof_report, run_report, run_task
from kit.evaluate.stage1_report import level_report, seg_report
from kit.evaluate.stage1_report import plot_segmentation
from kit.synthetic.score import CEILING_KINDS, fracture_recall, read_answers, score_ceilings
from kit.evaluate.oof import FITTED_BLEND, MEAN_BLEND, fit_blend_weights, load_oof

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


# ---------------------------------------------------------------------------------------------------------
# Segmenter and level-model runs (fake run folders in the trainer's contract; no training)
# ---------------------------------------------------------------------------------------------------------

NAN = float("nan")
V = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
# study: (fold, slices, Dice C1..C7, z-range error C1..C7); NaN = vertebra absent from the truth,
# an error equal to the slice count = a vertebra the prediction missed.
SEG_STUDIES = {
    "1.2.826.0.1.3680043.1": (0, 40, [0.9] * 7, [0, 1, 0, 0, 1, 2, 3]),
    "1.2.826.0.1.3680043.2": (0, 40, [0.8] * 6 + [0.0], [1, 0, 0, 1, 0, 1, 40]),
    "1.2.826.0.1.3680043.3": (0, 50, [0.95, 0.9, NAN, 0.9, 0.9, 0.9, 0.8], [0, 0, NAN, 0, 0, 1, 2]),
    "1.2.826.0.1.3680043.4": (1, 30, [0.95] * 7, [0, 0, 0, 0, 1, 1, 1]),
    "1.2.826.0.1.3680043.5": (1, 30, [0.9] * 5 + [0.6, 0.5], [2, 1, 0, 0, 0, 3, 5]),
    "1.2.826.0.1.3680043.6": (1, 30, [NAN] + [0.9] * 5 + [0.6], [NAN, 0, 0, 0, 1, 2, 4]),
}
LEVEL_STUDIES = {
    "1.2.826.0.1.3680043.11": (0, 20, [1.0, 0.8, 0.8, 0.6, 1.0, 1.0, 0.5]),
    "1.2.826.0.1.3680043.12": (0, 25, [1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9]),
    "1.2.826.0.1.3680043.13": (1, 22, [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, NAN]),
    "1.2.826.0.1.3680043.14": (1, 30, [1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.8]),
}


def write_fold_files(run: Path, task: str, rows: list[dict], cache_dir: Path | None = None) -> None:
    """config.yaml, log.csv and oof.csv of each fold, as `kit train` writes them."""
    table = pd.DataFrame(rows)
    metric = {"seg": "val_dice", "level": "val_iou"}[task]
    for k, part in table.groupby("fold"):
        folder = run / f"fold{k}"
        folder.mkdir(parents=True, exist_ok=True)
        data = {"fold": int(k), **({"cache_dir": str(cache_dir)} if cache_dir else {})}
        (folder / "config.yaml").write_text(yaml.safe_dump({"task": task, "name": run.name, "data": data}))
        pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.7, 0.5],
                      metric: [0.3, 0.6, 0.8], "lr": [1e-3, 5e-4, 1e-4], "seconds": [2.0, 2.1, 2.0]}
                     ).to_csv(folder / "log.csv", index=False)
        part.to_csv(folder / "oof.csv", index=False)


def write_seg_run(run: Path, cache_dir: Path | None = None) -> None:
    rows = []
    for uid, (fold, slices, dice, zerr) in SEG_STUDIES.items():
        row = {"StudyInstanceUID": uid, "fold": fold, "epoch": 3, "slices": slices}
        row.update({f"dice_{v}": d for v, d in zip(V, dice)})
        row["dice_mean"] = np.nanmean(dice)
        row.update({f"zerr_{v}": z for v, z in zip(V, zerr)})
        row["zerr_max"] = np.nanmax(zerr)
        rows.append(row)
    write_fold_files(run, "seg", rows, cache_dir)


def write_level_run(run: Path) -> None:
    rows = []
    for uid, (fold, steps, iou) in LEVEL_STUDIES.items():
        rows.append({"StudyInstanceUID": uid, "fold": fold, "epoch": 3, "steps": steps,
                     **{f"iou_{v}": x for v, x in zip(V, iou)}, "iou_mean": np.nanmean(iou)})
    write_fold_files(run, "level", rows)


def assert_png(path) -> None:
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 5_000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seg_report_numbers_plots_and_worst_studies(tmp_path):
    run = tmp_path / "runs" / "seg_fake"
    write_seg_run(run, cache_dir=tmp_path / "no_cache_here")
    result = seg_report(run, n_worst=3)
    stored = json.loads((run / "report.json").read_text())
    assert Path(result["report_md"]) == run / "report.md" and stored["n_studies"] == 6 and stored["folds"] == [0, 1]

    # Dice per vertebra: C1 = (0.9 + 0.8 + 0.95) / 3 in fold 0, (0.95 + 0.9) / 2 in fold 1 (study 6 lacks C1),
    # 4.5 / 5 over both; C7 = (0.9 + 0 + 0.8 + 0.95 + 0.5 + 0.6) / 6.
    dice = stored["dice"]
    assert dice["per_fold"][0]["C1"] == pytest.approx(0.883333, abs=1e-6)
    assert dice["per_fold"][1]["C1"] == pytest.approx(0.925)
    assert dice["all"]["C1"] == pytest.approx(0.9) and dice["all"]["C7"] == pytest.approx(0.625)
    assert dice["per_fold"][1]["C7"] == pytest.approx(0.683333, abs=1e-6)
    # mean of the per-study means 0.9, 0.685714, 0.891667, 0.95, 0.8, 0.85
    assert dice["all"]["mean"] == pytest.approx(0.846230, abs=1e-6)

    # z-range errors: C7 over all studies 1, 2, 3, 4, 5, 40 -> median 3.5 (the worst); fold 0: C7 2, 3, 40 -> 3;
    # fold 1: C7 1, 4, 5 -> 4. Within 2 slices: 35 of the 40 scored vertebrae (18/20 and 17/20 per fold).
    z = stored["zrange"]
    assert z["all"]["worst_median"] == pytest.approx(3.5) and z["all"]["worst_vertebra"] == "C7"
    assert z["all"]["median"]["C6"] == pytest.approx(1.5) and z["all"]["median"]["C3"] == 0.0
    assert [f["worst_median"] for f in z["per_fold"]] == [3.0, 4.0]
    assert z["all"]["within"] == pytest.approx(35 / 40) and z["all"]["n_vertebrae"] == 40
    assert [f["within"] for f in z["per_fold"]] == pytest.approx([0.9, 0.85])
    assert z["all"]["within_per_vertebra"]["C7"] == pytest.approx(2 / 6)
    assert stored["spread"]["worst_median"]["mean"] == pytest.approx(3.5)
    assert stored["spread"]["worst_median"]["sd"] == pytest.approx(np.std([3.0, 4.0], ddof=1))

    for name in ("dice_per_vertebra.png", "zrange_errors.png", "training_curves.png"):
        assert_png(run / name)
        assert str(run / name) in result["pngs"]

    # the worst studies by mean Dice: study 2 (0.686), 5 (0.8), 6 (0.85); no cache -> a line, not a failure
    md = (run / "report.md").read_text()
    ranked = [w["StudyInstanceUID"] for w in stored["worst"]]
    assert ranked == ["1.2.826.0.1.3680043.2", "1.2.826.0.1.3680043.5", "1.2.826.0.1.3680043.6"]
    positions = [md.index(f"### {i}. {uid}") for i, uid in enumerate(ranked, start=1)]
    assert positions == sorted(positions)
    assert "| 1 | `1.2.826.0.1.3680043.2` | 0 | 0.686 | C7 0.000 | 40 | C7 |" in md  # C7 missed: error = slices
    assert stored["pictures"] == {} and set(stored["missing_pictures"]) == set(ranked)
    for uid in ranked:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"Picture missing for {uid}: "))
        assert "no_cache_here" in line
    assert "| **all folds** | 6 | 0.846 | 3.5 | C7 | 0.875 |" in md


def test_level_report_numbers(tmp_path):
    run = tmp_path / "level_fake"
    write_level_run(run)
    result = level_report(run, tmp_path / "out", n_worst=2)
    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    iou = stored["iou"]
    # C1: (1.0 + 1.0) / 2 in fold 0, (0.5 + 1.0) / 2 in fold 1; C7: (0.5 + 0.9 + 0.8) / 3 (study 13 lacks C7)
    assert iou["per_fold"][0]["C1"] == pytest.approx(1.0) and iou["per_fold"][1]["C1"] == pytest.approx(0.75)
    assert iou["all"]["C7"] == pytest.approx(2.2 / 3)
    assert iou["all"]["mean"] == pytest.approx(np.mean([5.7 / 7, 6.8 / 7, 0.5, 6.4 / 7]))
    assert [w["StudyInstanceUID"] for w in stored["worst"]] == ["1.2.826.0.1.3680043.13", "1.2.826.0.1.3680043.11"]
    md = Path(result["report_md"]).read_text()
    assert "| 1 | `1.2.826.0.1.3680043.13` | 1 | 22 | 0.500 | C1 0.500 |" in md
    assert "lowest vertebra C7" in result["headline"]  # C7 0.733 is the lowest all-fold mean
    for png in ("iou_per_vertebra.png", "training_curves.png"):
        assert_png(tmp_path / "out" / png)
    assert not (run / "report.md").exists()  # out_dir given: the run folder stays untouched


def test_run_report_picks_each_runs_report(tmp_path, capsys):
    write_seg_run(tmp_path / "seg_run")
    write_level_run(tmp_path / "level_run")
    write_run(tmp_path / "cls_run", labels(30, seed=8), seed=9, noise=1.0)
    results = run_report([tmp_path / "seg_run", tmp_path / "level_run", tmp_path / "cls_run"], n_worst=2)
    assert [r["kind"] for r in results] == ["seg", "level", "cls"]
    assert [Path(r["report_md"]).parent.name for r in results] == ["seg_run", "level_run", "cls_run"]
    assert results[2]["scores"]["cls_run"]["row"] == pytest.approx(
        json.loads((tmp_path / "cls_run" / "report.json").read_text())["scores"]["cls_run"]["row"])
    assert run_task(tmp_path / "seg_run") == "seg" and run_task(tmp_path / "cls_run") == "cls"

    # without config.yaml the oof.csv columns decide
    for cfg in (tmp_path / "level_run").glob("fold*/config.yaml"):
        cfg.unlink()
    assert run_task(tmp_path / "level_run") == "level"

    # several reports into one --out: one folder each
    results = run_report([tmp_path / "seg_run", tmp_path / "level_run"], tmp_path / "reports", n_worst=1)
    assert [Path(r["out_dir"]) for r in results] == [tmp_path / "reports" / "seg_run",
                                                       tmp_path / "reports" / "level_run"]

    # the CLI: a short table, where the report is, exit 0
    from kit.cli import main

    main(["report", str(tmp_path / "seg_run"), "--worst", "1"])
    out = capsys.readouterr().out
    assert "seg_run  seg   6" in out and "worst median z-error 3.5 slices (C7)" in out
    assert f"report: {tmp_path / 'seg_run' / 'report.md'}" in out
    assert "1 of the worst studies' pictures missing, e.g. FileNotFoundError" in out  # no cache here


def test_run_report_errors_name_the_run_and_the_layouts(tmp_path):
    old = tmp_path / "old_seg"  # an oof.csv in the old layout: Dice named like the classifier's probabilities
    (old / "fold0").mkdir(parents=True)
    pd.DataFrame({"StudyInstanceUID": ["1.2.3"], "fold": [0], **{v: [0.9] for v in V}, "mean": [0.9]}
                 ).to_csv(old / "fold0" / "oof.csv", index=False)
    with pytest.raises(ValueError, match=r"old_seg: unknown layout.*expected task 'seg' with oof.csv "
                                         r"columns StudyInstanceUID, fold, epoch, slices, dice_C1.*task 'cls'"):
        run_report(old)
    (old / "fold0" / "config.yaml").write_text("task: seg\n")  # a seg config over old columns
    with pytest.raises(ValueError, match=r"lacks columns \['dice_C1'.*older kit; retrain"):
        run_report(old)
    (old / "fold0" / "config.yaml").write_text("task: detector\n")
    with pytest.raises(ValueError, match="config task 'detector' has no report; reports exist for seg, level, cls"):
        run_report(old)
    (tmp_path / "empty" / "fold0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty: no fold<k>/config.yaml with a task and no oof.csv"):
        run_report(tmp_path / "empty")


def test_plot_segmentation_draws_prediction_beside_truth():
    image = np.zeros((6, 32, 32), np.uint8)
    truth = np.zeros((6, 32, 32), np.uint8)
    truth[1:3, 8:24, 10:14] = 1
    truth[3:5, 8:24, 10:14] = 2
    pred = truth[:, ::2, ::2].copy()  # the model's smaller size: resized for display
    fig = plot_segmentation(image, pred, truth, spacing=(2.0, 1.0, 1.0), title="t")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "predicted (x = 12)"
    assert [t.get_text() for t in fig.axes[1].texts] == ["C1", "C2"]
    assert len(plot_segmentation(image, pred).axes) == 1


def test_seg_report_puts_the_whole_stage_first_for_a_level_conditioned_segmenter(tmp_path):
    """A segmenter that takes the level model's ranges is validated given the true ranges; `kit demo` also writes the
    same studies segmented as inference does (oof_dice.csv / oof_z_errors.csv at the run's root): the report's
    headline is that whole-stage figure, the validation one stays beside it, and a stale pair is named."""
    run = tmp_path / "runs" / "seg_fake"
    write_seg_run(run)
    for folder in run.glob("fold*"):
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        cfg["data"]["level_input"] = True
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    # the whole stage: studies 1 and 4; study 1's C6 10 slices off, study 4's C7 missed (its slice count, 30)
    z = {"1.2.826.0.1.3680043.1": [0, 1, 0, 0, 1, 10, 3], "1.2.826.0.1.3680043.4": [0, 0, 0, 0, 1, 2, 30]}
    pd.DataFrame([{"StudyInstanceUID": u, "fold": f, **{v: d for v in V}, "mean": d}
                  for u, f, d in (("1.2.826.0.1.3680043.1", 0, 0.9), ("1.2.826.0.1.3680043.4", 1, 0.7))]
                 ).to_csv(run / "oof_dice.csv", index=False)
    pd.DataFrame([{"StudyInstanceUID": u, "vertebra": v, "error": e, "missed": e == 30}
                  for u, errors in z.items() for v, e in zip(V, errors)]).to_csv(run / "oof_z_errors.csv", index=False)

    result = seg_report(run, pictures=False)
    stage1 = result["stage1"]
    # medians over the two studies: C6 (10 + 2) / 2 = 6, C7 (3 + 30) / 2 = 16.5 -> the worst; 10 of 14 within 2
    assert stage1["zrange"]["all"]["worst_median"] == pytest.approx(16.5)
    assert stage1["zrange"]["all"]["worst_vertebra"] == "C7"
    assert stage1["zrange"]["all"]["median"]["C6"] == pytest.approx(6.0)
    assert stage1["dice"]["all"]["mean"] == pytest.approx(0.8) and stage1["n_studies"] == 2 and not stage1["stale"]
    assert result["headline"].startswith("Dice 0.800 | worst median z-error 16.5 slices (C7)")
    assert result["headline"].endswith("(whole stage 1)")
    assert "worst median z-error 3.5 slices (C7)" in result["validation_headline"]  # the folds' oof.csv, as before
    md = (run / "report.md").read_text()
    assert "**Whole stage 1 (as inference runs it): Dice 0.800 | worst median z-error 16.5 slices (C7)" in md
    assert "Segmenter validation (true level ranges): Dice 0.846" in md
    assert "Vertebrae missed (counted as the study's slice count): 1.2.826.0.1.3680043.4 (C7)." in md

    (run / "fold0" / "model.pt").write_bytes(b"newer weights")  # trained again after the pair was written
    os.utime(run / "oof_dice.csv", (1, 1))
    assert "older than the run's newest fold weights" in seg_report(run, pictures=False)["stage1"]["stale"]

    for name in ("oof_dice.csv", "oof_z_errors.csv"):
        (run / name).unlink()
    result = seg_report(run, pictures=False)
    assert result["stage1"] is None and result["headline"] == result["validation_headline"]
    assert "No figures of the whole stage here: no oof_dice.csv" in (run / "report.md").read_text()


def test_seg_report_pictures_a_real_run(tmp_path):
    """A seconds-long real segmenter run: the worst study's picture comes from its fold's model."""
    from seg_fixtures import make_cache, tiny_overrides

    from kit.config import load_config
    from kit.train import fit_fold

    uids, folds_csv = make_cache(tmp_path / "cache", n_studies=6, n_unsegmented=0, n_folds=3, z=24, size=64)
    cfg = load_config("demo_seg", **tiny_overrides(tmp_path / "cache", folds_csv, tmp_path / "runs",
                                                   **{"train.epochs": 1}))
    fit_fold(cfg)
    run = tmp_path / "runs" / "demo_seg"
    held_out = [u for i, u in enumerate(uids) if i % 3 == 0]
    oof = pd.DataFrame({"StudyInstanceUID": held_out, "fold": 0, "epoch": 1, "slices": 24,
                        **{f"dice_{v}": [0.5, 0.7] for v in V}, "dice_mean": [0.5, 0.7],
                        **{f"zerr_{v}": [1, 2] for v in V}, "zerr_max": [1, 2]})
    oof.to_csv(run / "fold0" / "oof.csv", index=False)  # the new contract, whatever this trainer wrote
    result = seg_report(run, n_worst=1)
    assert list(result["pictures"]) == [held_out[0]] and result["missing_pictures"] == {}
    assert_png(result["pictures"][held_out[0]])
    assert f"]({Path(result['pictures'][held_out[0]]).name})" in Path(result["report_md"]).read_text()


# --------------------------------------------------------------------------------------------------------- classifier:
# the baseline from the training folds, and recall by fracture kind on synthetic answers


def write_oof_table(run_dir: Path, uids, y: np.ndarray, p: np.ndarray, folds) -> None:
    """Hand-made classifier OOF files, one per fold."""
    table = pd.DataFrame(p, columns=list(TARGETS))
    table.insert(0, "fold", folds)
    table.insert(0, UID, uids)
    for j, t in enumerate(TARGETS):
        table[f"{t}_true"] = y[:, j].astype(int)
    for k in sorted(set(folds)):
        (run_dir / f"fold{k}").mkdir(parents=True, exist_ok=True)
        table[table["fold"] == k].to_csv(run_dir / f"fold{k}" / "oof.csv", index=False)


def test_baseline_from_training_folds_is_not_the_in_sample_one(tmp_path):
    uids = [f"1.2.826.0.1.3680043.{900 + i}" for i in range(6)]
    v = np.zeros((6, 7), int)
    v[:3, 0] = 1  # fold 0 holds every C1 fracture, fold 1 none; C2 is fractured once in each fold
    v[0, 1] = v[3, 1] = 1
    y = np.c_[v.max(1), v]
    folds = np.array([0, 0, 0, 1, 1, 1])
    run = tmp_path / "cls_hand"
    write_oof_table(run, uids, y, np.full((6, 8), 0.4), folds)
    # fold 1's model trained on more studies than the OOF shows: its summary says so
    stored = dict(zip(TARGETS, [0.5, 0.25, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]))
    (run / "fold1" / "oof_summary.json").write_text(json.dumps({"train_prevalence": stored}))
    result = oof_report(run)

    fair, in_sample = result["baseline_from_train_folds"], result["baseline"]
    # by hand: fold 0 studies get the prevalence of fold 1's labels, fold 1 studies the stored one
    pred = np.vstack([np.repeat(y[3:].mean(0, keepdims=True), 3, 0),
                      np.repeat(np.array([list(stored.values())]), 3, 0)])
    assert fair["score_row"] == pytest.approx(competition_score(y, pred), abs=1e-9)
    assert in_sample["score_row"] == pytest.approx(prevalence_baseline(y)[0], abs=1e-9)
    assert fair["score_row"] > in_sample["score_row"] + 1.0  # fold 0's training folds never saw a C1 fracture
    assert fair["per_fold"][1] == pytest.approx(competition_score(y[3:], pred[3:]), abs=1e-9)
    assert "fold1/oof_summary.json" in fair["sources"][1] and "other folds" in fair["sources"][0]
    md = Path(result["report_md"]).read_text()
    assert "prevalence baseline (training folds)" in md and "prevalence baseline (in-sample)" in md
    stored_json = json.loads(Path(result["report_json"]).read_text())
    assert stored_json["baseline_from_train_folds"]["score_row"] == pytest.approx(fair["score_row"])

    # a single fold without a summary: the training folds' prevalence is unknown, and the report says so
    single = tmp_path / "cls_single_fold"
    write_oof_table(single, uids[:3], y[:3], np.full((3, 8), 0.4), folds[:3])
    alone = oof_report(single)
    assert alone["baseline_from_train_folds"] is None
    assert "unknown for some fold" in Path(alone["report_md"]).read_text()


def test_studies_of_trained_folds_without_an_oof_row_are_named(tmp_path):
    """The folds table has 8 studies in folds 0-2; folds 0 and 1 were trained but one of their studies has no OOF
    row (its crops failed): the report names it; fold 2 was not trained, so its studies are not counted."""
    uids = [f"1.2.826.0.1.3680043.{700 + i}" for i in range(8)]
    folds_csv = tmp_path / "folds.csv"
    pd.DataFrame({UID: uids, "fold": [0, 0, 0, 1, 1, 1, 2, 2]}).to_csv(folds_csv, index=False)
    y = np.zeros((5, 8), int)
    y[0, [0, 1]] = y[3, [0, 4]] = 1
    run = tmp_path / "cls_lost"
    write_oof_table(run, uids[:2] + uids[3:6], y, np.full((5, 8), 0.3), [0, 0, 1, 1, 1])  # uids[2] lost
    (run / "fold0" / "config.yaml").write_text(yaml.safe_dump({"task": "cls", "data": {"folds_csv": str(folds_csv)}}))
    result = oof_report(run)
    assert result["studies_without_oof"]["cls_lost"] == {"folds_csv": str(folds_csv), "n_expected": 6,
                                                         "missing": [uids[2]]}
    md = Path(result["report_md"]).read_text()
    assert "**1 of the 6 studies of cls_lost's trained folds" in md and uids[2] in md
    assert json.loads(Path(result["report_json"]).read_text())["studies_without_oof"]["cls_lost"]["missing"] == [uids[2]]

    full = tmp_path / "cls_full"
    write_oof_table(full, uids[:6], np.zeros((6, 8), int), np.full((6, 8), 0.3), [0, 0, 0, 1, 1, 1])
    (full / "fold1" / "config.yaml").write_text(yaml.safe_dump({"data": {"folds_csv": str(folds_csv)}}))
    md = Path(oof_report(full)["report_md"]).read_text()
    assert "Every one of the 6 studies of cls_full's trained folds" in md
    # a report written elsewhere checks the same; without a config there is nothing to compare with
    assert oof_report(run, tmp_path / "elsewhere")["studies_without_oof"]["cls_lost"]["missing"] == [uids[2]]
    (run / "fold0" / "config.yaml").unlink()
    assert oof_report(run)["studies_without_oof"] == {"cls_lost": None}


def test_recall_by_fracture_kind_and_subtlety(tmp_path):
    uids = [f"1.2.826.0.1.3680043.{950 + i}" for i in range(3)]
    v = np.zeros((3, 7), int)
    v[0, [0, 1]] = v[1, 4] = v[2, 6] = 1
    y = np.c_[v.max(1), v]
    p = np.full((3, 8), 0.1)
    p[0, 1], p[0, 2], p[1, 5], p[2, 7] = 0.9, 0.3, 0.6, 0.4  # C1 and C5 found, C2 and C7 missed
    run = tmp_path / "cls_synthetic"
    write_oof_table(run, uids, y, p, [0, 1, 2])
    answers = tmp_path / "answers"
    answers.mkdir()
    pd.DataFrame({UID: [*uids[:1], uids[0], uids[1], uids[2], "1.2.826.0.1.3680043.999"],
                  "split": "train", "vertebra": ["C1", "C2", "C5", "7", "C3"],
                  "kind": ["compression", "burst", "compression", "burst", "burst"],
                  "subtlety": ["subtle", "obvious", "obvious", "subtle", "subtle"],
                  "z_first": 1, "z_last": 3}).to_csv(answers / "fractures.csv", index=False)
    (result,) = run_report(run, answers_dir=answers)
    kind = {r["kind"]: r for r in result["recall"]["kind"]}
    assert kind["compression"]["fractures"] == 2 and kind["compression"]["cls_synthetic"] == 1.0
    # the 5th answer row's study is not in the OOF: 2 burst fractures, both missed
    assert kind["burst"]["fractures"] == 2 and kind["burst"]["cls_synthetic"] == 0.0
    subtlety = {r["subtlety"]: r["cls_synthetic"] for r in result["recall"]["subtlety"]}
    assert subtlety == {"obvious": 0.5, "subtle": 0.5}
    md = Path(result["report_md"]).read_text()
    assert "## Recall by fracture" in md and "| compression | 2 | 1.000 |" in md
    assert oof_report(run)["recall"] is None  # no answers, no recall
    assert "## Ceiling: a perfect detector" in md and len(result["ceilings"]) == len(CEILING_KINDS)

    # numeric subtlety with many values: equal-count bins named by their ranges
    rows = read_answers(answers).iloc[:4]
    rows = pd.concat([rows, rows], ignore_index=True).assign(subtlety=np.arange(1, 9) / 10)
    oof = load_oof(run)
    binned = fracture_recall(oof, rows, {"m": oof[list(TARGETS)].to_numpy()})["subtlety"]
    assert binned["subtlety"].tolist() == ["0.1 to 0.3", "0.4 to 0.5", "0.6 to 0.8"]
    assert binned["fractures"].tolist() == [3, 2, 3]
    # rows (subtlety 0.1 .. 0.8): C1 hit, C2 miss, C5 hit, C7 miss, then the same four again
    assert binned["m"].tolist() == pytest.approx([2 / 3, 1 / 2, 1 / 3])


def test_attention_hit_rate_on_a_hand_made_case(tmp_path):
    from kit.synthetic.score import attention_hit_rate

    t, uids = 4, ["1.2.1", "1.2.2"]
    for uid in uids:  # C2 sampled at slices 10, 13, 16, 19 (step 3: a peak within 1.5 slices of a range counts)
        positions = np.full((7, t), -1, np.int32)
        positions[1] = [10, 13, 16, 19]
        np.savez(tmp_path / f"{uid}.npz", crops=np.zeros((7, t, 2, 4, 4), np.uint8), found=np.arange(7) == 1,
                 positions=positions, slice_targets=np.full((7, t), np.nan, np.float32),
                 instance_numbers=np.arange(30, dtype=np.int32), spacing=np.ones(3, np.float32),
                 orig_hw=np.array([4, 4], np.int32))
    oof = pd.DataFrame({"StudyInstanceUID": uids, "C1": [0.1, 0.1], "C2": [0.9, 0.8], "C3": [0.7, 0.1],
                        **{f"attn_peak_C{i}": [-1, -1] for i in (1, 3, 4, 5, 6, 7)},
                        "attn_peak_C2": [2, 0]})
    answers = pd.DataFrame({"StudyInstanceUID": ["1.2.1", "1.2.2", "1.2.2", "1.2.1"],
                            "vertebra": ["C2", "C2", "C2", "C3"], "z_first": [17, 25, 11, 30], "z_last": [18, 27, 12, 31],
                            "in_bounding_boxes": [True, True, True, True]})
    result = attention_hit_rate(oof, tmp_path, answers)
    # study 1: peak at slice 16, fracture 17..18 -> within 1.5: hit; study 2: peak at 10, ranges 25..27 and 11..12: hit
    # (the second range); C3 of study 1 is detected but has no attention peak (not found): left out
    assert result["n_boxed"] == 3 and result["n_detected"] == 2 and result["attention_hit_rate"] == 1.0
    answers.loc[2, ["z_first", "z_last"]] = [14, 14]  # now 4 slices from the peak: a miss
    assert attention_hit_rate(oof, tmp_path, answers)["attention_hit_rate"] == 0.5
    oof.loc[0, "C2"] = 0.3  # not detected: not counted
    assert attention_hit_rate(oof, tmp_path, answers)["n_detected"] == 1


def test_oof_tables_hold_the_report_numbers(two_run_report):
    from kit.evaluate.report import oof_tables

    result, table, a, *_ = two_run_report
    tables = oof_tables(result)
    summary = tables["summary"]
    models = ["cls_a", "cls_b", MEAN_BLEND, FITTED_BLEND]
    assert list(summary.index) == ["prevalence baseline (training folds)", "prevalence baseline (in-sample)", *models]
    fair = result["baseline_from_train_folds"]["score_row"]
    y = table[list(TARGETS)].to_numpy()
    assert summary.at["cls_a", "score (row)"] == pytest.approx(competition_score(y, a[list(TARGETS)].to_numpy()))
    assert summary.at["cls_a", "gain vs baseline"] == pytest.approx(fair - summary.at["cls_a", "score (row)"])
    per_target = tables["per_target"]
    assert list(per_target.index) == list(TARGETS)
    assert per_target["cls_b"].sum() == pytest.approx(summary.at["cls_b", "score (row)"])  # contributions sum up
    assert per_target["AUC cls_a"].between(0, 1).all()
    assert tables["per_fold"].shape == (1 + len(models), N_FOLDS)
    assert tables["blend_weights"].sum() == pytest.approx(1.0) and "recall_kind" not in tables


def test_find_answers_dir_and_score_test_submission(tmp_path):
    from kit.synthetic.score import find_answers_dir, score_test_submission
    from kit.io.rsna import wide_to_long

    root, answers = tmp_path / "data", tmp_path / "data_answers"
    root.mkdir()
    assert find_answers_dir(root) is None  # competition data: no answers
    answers.mkdir()
    (answers / "fractures.csv").write_text(",".join(c for c in ("StudyInstanceUID", "vertebra")) + "\n")
    assert find_answers_dir(root) == answers.resolve()
    train, test = labels(40, seed=3), labels(10, seed=4)
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(answers / "test_labels.csv", index=False)
    truth = wide_to_long(test)
    perfect = truth.assign(fractured=truth["fractured"].clip(1e-4, 1 - 1e-4))
    scores = score_test_submission(perfect, answers, root)
    assert scores["n_studies"] == 10 and scores["test_score"] < 1e-3
    prevalence = train[list(TARGETS)].mean().to_numpy()
    assert scores["test_baseline_score"] == pytest.approx(
        competition_score(test[list(TARGETS)].to_numpy(), np.tile(prevalence, (10, 1))))


def test_score_ceilings_by_hand():
    uids = ["s0", "s1", "s2", "s3"]
    y = np.zeros((4, 8))
    y[0, [0, 1]] = 1  # s0: C1, displaced
    y[1, [0, 5]] = 1  # s1: C5, a hairline
    answers = pd.DataFrame({UID: ["s0", "s1", "other"], "vertebra": ["C1", "C5", "C2"],
                            "kind": ["displaced", "hairline", "cleft"]})
    table = score_ceilings(uids, y, answers, kinds=("displaced", "hairline"))
    assert table["found"].tolist() == ["displaced", "displaced + hairline"]
    assert table["fractures_found"].tolist() == [1, 2] and table["fractures"].tolist() == [2, 2]
    # displaced found: s0's C1 and patient sure; the rest the share fractured among the others
    p = np.zeros((4, 8))
    p[:, 0] = [1 - 1e-4, 1 / 3, 1 / 3, 1 / 3]
    p[:, 1] = [1 - 1e-4, 0, 0, 0]
    p[:, 5] = 0.25
    assert table["score"][0] == pytest.approx(competition_score(y, p.clip(1e-4, 1 - 1e-4)))
    assert 0.1 < table["score"][0] < prevalence_baseline(y)[0]
    assert table["score"][1] < 1e-3  # every fracture found: the labels themselves


def test_false_alarms_on_lookalikes_by_hand():
    """Among vertebrae with no fracture: the share predicted above the threshold, by the look-alike they carry;
    fractured vertebrae are left out."""
    from kit.synthetic.score import lookalike_false_alarms

    oof = pd.DataFrame({"StudyInstanceUID": ["a", "b"]})
    p = np.full((2, 8), 0.1)
    p[0, 1 + 2] = 0.9  # a: C3 (an osteophyte) flagged
    p[1, 1 + 0] = 0.9  # b: C1 flagged but fractured: not a false alarm
    p[1, 1 + 6] = 0.9  # b: C7, no look-alike, flagged
    fractures = pd.DataFrame({"StudyInstanceUID": ["b"], "vertebra": ["C1"]})
    mimics = pd.DataFrame({"StudyInstanceUID": ["a", "b"], "vertebra": ["C3", "C4"],
                           "kind": ["osteophyte", "vascular_channel"]})
    table = lookalike_false_alarms(oof, fractures, mimics, {"m": p}, threshold=0.5).set_index("lookalike")
    assert table.loc["osteophyte", "vertebrae"] == 1 and table.loc["osteophyte", "m"] == 1.0
    assert table.loc["vascular_channel", "m"] == 0.0
    assert table.loc["none", "vertebrae"] == 11 and table.loc["none", "m"] == pytest.approx(1 / 11)
