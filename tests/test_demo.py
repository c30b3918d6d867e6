"""kit.demo: the segmenter stage trains, reloads its checkpoints through kit.infer and scores held-out studies."""

from __future__ import annotations

import json

import numpy as np

from kit.cache import prepare_studies
from kit.config import load_config
from kit.constants import VERTEBRAE
from kit.demo import describe_dataset, run_segmenter_stage


def test_segmenter_stage_scores_heldout_studies(synthetic_root, tmp_path, monkeypatch):
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
    seg = run_segmenter_stage(synthetic_root, cache, tmp_path / "folds.csv", level_overrides=tiny_level, **tiny)
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
