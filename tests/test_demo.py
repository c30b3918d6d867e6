"""kit.tools.demo: the segmenter stage trains, reloads its checkpoints through kit.runs and scores held-out studies."""

from __future__ import annotations

import json

import numpy as np

from kit.io.cache import prepare_studies
from kit.config import load_config
from kit.constants import TARGETS, VERTEBRAE
from kit.tools.demo import describe_dataset, run_segmenter_stage


def test_stage1_then_stage2_on_the_tiny_set(synthetic_root, tmp_path, monkeypatch):
    """Stage 1 trains, reloads through kit.runs and scores held-out studies; stage 2 crops (true masks where the
    study has them, the 1-epoch stage-1 runs elsewhere), trains 2 classifier folds and scores them out of fold."""
    from kit.tools.demo import run_classifier_stage
    from kit.synthetic import default_answers_dir

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    prepare_studies(synthetic_root, cache, size=32, workers=1, progress=False)
    described = describe_dataset(synthetic_root, cache)
    assert described["studies_read"] == described["train_studies"] == 8
    assert described["segmentations"] == 4 and described["segmentations_showing_vertebra"]["C4"] == 4

    tiny = {"out_dir": str(tmp_path / "runs"), "data.n_folds": 2, "data.image_size": 32, "data.slice_offsets_mm": [-1, 0, 1],
            "model.encoder_depth": 3, "model.decoder_width": 16, "train.epochs": 1, "train.progress": False}
    tiny_level = {"data.image_size": 32, "data.seq_len": 16, "data.repeats": 1, "model.hidden": 8,
                  "train.batch_size": 2, "train.epochs": 1, "train.progress": False}
    # as `kit demo` runs it: each fold's level model in a second process beside the segmenter
    seg = run_segmenter_stage(synthetic_root, cache, tmp_path / "folds.csv", level_overrides=tiny_level,
                              side_by_side=True, **tiny)
    assert seg["seg_folds_trained"] == 2 and seg["seg_heldout_studies"] == 4
    assert 0.0 <= seg["seg_dice"] <= 1.0 and set(seg["seg_dice_per_vertebra"]) == set(VERTEBRAE)
    assert seg["seg_z_error_slices"] >= 0 or np.isnan(seg["seg_z_error_slices"])
    # demo_seg is conditioned on the level model: the comparison is with the true level ranges
    assert load_config("demo_seg").data.level_input
    assert 0.0 <= seg["seg_true_levels_dice"] <= 1.0 and seg["seg_level_model"] == "demo_level"
    assert "seg_alone_dice" not in seg
    assert (tmp_path / "runs" / "demo_level" / "fold1" / "model.pt").is_file()
    assert (tmp_path / "runs" / "demo_seg" / "oof_dice_true_levels.csv").is_file()
    dice = (tmp_path / "runs" / "demo_seg" / "oof_dice.csv").read_text().splitlines()
    assert len(dice) == 1 + 4  # header + one row per held-out study
    for fold in (0, 1):
        run = tmp_path / "runs" / "demo_seg" / f"fold{fold}"
        assert (run / "model.pt").is_file() and json.loads((run / "oof_summary.json").read_text())["fold"] == fold
    # the true-level figures come from the segmenter's own validation: the same as segmenting each held-out
    # study given its true level ranges (up to the float16 of the stored probabilities)
    import pandas as pd

    from kit.io.cache import load_cached
    from kit.evaluate.stage1 import score_segmented_study
    from kit.runs import load_run
    from kit.stage1.recipe import true_presence

    from_validation = pd.read_csv(tmp_path / "runs" / "demo_seg" / "oof_dice_true_levels.csv", dtype=str)
    z_validation = pd.read_csv(tmp_path / "runs" / "demo_seg" / "oof_z_errors_true_levels.csv", dtype=str)
    for fold, group in from_validation.groupby("fold"):
        models = load_run(tmp_path / "runs" / "demo_seg", folds=[int(fold)])
        for uid in group["StudyInstanceUID"]:
            cached = load_cached(cache, uid)
            dice_rows, z_rows = [], []
            score_segmented_study(cached, models, true_presence(cached["mask"]), uid, int(fold), dice_rows, z_rows)
            row = group.set_index("StudyInstanceUID").loc[uid]
            assert np.allclose([dice_rows[0][v] for v in VERTEBRAE], row[list(VERTEBRAE)].astype(float),
                               atol=2e-3, equal_nan=True)
            mine = {r["vertebra"]: r["error"] for r in z_rows}
            theirs = z_validation[z_validation["StudyInstanceUID"] == uid].set_index("vertebra")["error"].astype(float)
            assert mine == theirs.to_dict()

    runs = tmp_path / "runs"
    cls = run_classifier_stage(synthetic_root, tmp_path / "folds.csv", default_answers_dir(synthetic_root),
                               progress=False, **{"out_dir": str(runs), "data.n_folds": 2, "data.true_masks": True,
                                                  "data.crop_dir": str(tmp_path / "crops"),
                                                  "data.seg_runs": [str(runs / "demo_seg"), str(runs / "demo_level")],
                                                  "data.image_size": 32, "data.n_slices": 4, "train.epochs": 1,
                                                  "train.batch_size": 4, "train.progress": False,
                                                  "model.encoder": "mobilenetv3_small_050",
                                                  "model.pretrained_weights": None, "model.freeze_backbone": False})
    assert cls["cls_folds_trained"] == 2 and cls["crops_built"] == 8 and cls["crops_failed"] == 0
    assert cls["cls_oof_studies"] == 8  # every training study scored out of fold
    assert 0 < cls["oof_score"] < 5 and 0 < cls["baseline_score"] < 5
    assert set(cls["cls_auc"]) == set(TARGETS) and cls["cls_seconds"] > 0
    assert cls["patient_auc"] == cls["cls_auc"]["patient_overall"] and "cls_start" not in cls
    assert (runs / "demo_cls" / "report.md").is_file()


def test_side_by_side_names_the_run_that_failed(tmp_path):
    """A failure in the spawned training surfaces as an error naming its config and fold; the run beside it
    still finishes."""
    import pytest

    from kit.tools.demo import fit_side_by_side
    from tests.seg_fixtures import make_cache

    uids, folds_csv = make_cache(tmp_path / "cache", n_studies=4, n_unsegmented=0, n_folds=2, z=12, size=32)
    common = {"data.cache_dir": str(tmp_path / "cache"), "data.folds_csv": str(folds_csv), "data.n_folds": 2,
              "data.fold": 0, "out_dir": str(tmp_path / "runs"), "train.epochs": 1, "train.progress": False}
    seg = load_config("demo_seg", **common, **{"data.image_size": 32, "data.slice_offsets_mm": [-1, 0, 1],
                                               "data.augment.crop": None, "model.encoder_depth": 3,
                                               "model.decoder_width": 16, "data.foreground_fraction": 1.0,
                                               "train.batch_size": 2})
    broken = load_config("demo_level", **{**common, "data.cache_dir": str(tmp_path / "nowhere")})
    with pytest.raises(RuntimeError, match="training demo_level fold 0 in its own process failed"):
        fit_side_by_side([broken, seg])
    assert (tmp_path / "runs" / "demo_seg" / "fold0" / "model.pt").is_file()


def test_the_summary_records_the_environment():
    """Figures move with the libraries (opencv 5.0 -> 5.1 moved stage 1's Dice): the demo's summary says which."""
    from importlib.metadata import version

    import torch

    from kit.tools.demo import ENVIRONMENT_PACKAGES, environment

    env = environment()
    assert set(env["packages"]) == set(ENVIRONMENT_PACKAGES)
    assert env["packages"]["torch"] == version("torch") and env["packages"]["numpy"] == np.__version__
    assert env["cpus"] >= 1 and env["torch_threads"] == torch.get_num_threads() and env["python"].count(".") == 2
    json.dumps(env)  # goes into summary.json as it is
