"""kit.stage2.crop_cache: the crop cache on the synthetic set, from ground-truth masks (no model) and from tiny stage-1
runs (the out-of-fold rule)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kit.config import config_from_dict
from kit.constants import VERTEBRAE
from kit.stage2.crop_cache import FAILURES, MANIFEST, UNMATCHED, build_crops, choose_models
from kit.stage2.store import CROP_KEYS, crop_path, load_crops
from kit.stage2.crops import crop_box_original
from kit.stage1.postprocess import vertebra_extents
from kit.io.dicom import centred_nearest_index, read_mask, read_series

torch.set_num_threads(1)

T, N, S = 5, 1, 32  # slices per vertebra, neighbours, crop size: small crops keep the tests fast


def cls_config(root: Path, crop_dir: Path, **overrides):
    return config_from_dict({"task": "cls"}, **{
        "data.data_root": str(root), "data.crop_dir": str(crop_dir), "data.true_masks": True, "data.n_slices": T,
        "data.n_neighbours": N, "data.image_size": S, **overrides})


def segmented_uids(root: Path) -> list[str]:
    return sorted(p.name[:-4] for p in (root / "segmentations").glob("*.nii"))


@pytest.fixture(scope="module")
def truth_cache(synthetic_root, tmp_path_factory):
    """The segmented training studies cut with their ground truth, on a 64 px grid (the original one)."""
    crop_dir = tmp_path_factory.mktemp("crops")
    cfg = cls_config(synthetic_root, crop_dir)
    uids = segmented_uids(synthetic_root)
    result = build_crops(cfg, uids=uids, progress=False, prefetch=False, grid_size=64)
    return cfg, uids, result


def truth_labels(root: Path, uid: str):
    series = read_series(root / "train_images" / uid, workers=1)
    return series, read_mask(root / "segmentations" / f"{uid}.nii", series)


def test_truth_cache_arrays_found_positions_and_mask(truth_cache, synthetic_root):
    cfg, uids, result = truth_cache
    assert (result["built"], result["skipped"], result["failed"]) == (4, 0, 0)
    manifest = pd.read_csv(Path(cfg.data.crop_dir) / MANIFEST, dtype={"StudyInstanceUID": str})
    assert sorted(manifest["StudyInstanceUID"]) == uids and set(manifest["mask_source"]) == {"truth"}
    for uid in uids:
        with np.load(crop_path(cfg.data.crop_dir, uid)) as data:  # one member per vertebra, no whole `crops`
            assert {f"crops_{v}" for v in range(7)} <= set(data.files) and "crops" not in data.files
        arrays = load_crops(cfg.data.crop_dir, uid)
        series, labels = truth_labels(synthetic_root, uid)
        z = len(labels)
        assert set(arrays) == {*CROP_KEYS, "crop_boxes", "slice_numbers"}
        np.testing.assert_array_equal(arrays["slice_numbers"], [int(f.stem) for f in series.files])
        assert arrays["crop_boxes"].dtype == np.int32 and arrays["crop_boxes"].shape == (7, 4)
        assert arrays["crops"].dtype == np.uint8 and arrays["crops"].shape == (7, T, 2 * N + 2, S, S)
        assert arrays["found"].dtype == bool and arrays["found"].shape == (7,)
        assert arrays["positions"].dtype == np.int32 and arrays["positions"].shape == (7, T)
        assert arrays["slice_targets"].dtype == np.float32 and arrays["slice_targets"].shape == (7, T)
        assert arrays["instance_numbers"].dtype == np.int32 and arrays["instance_numbers"].shape == (z,)
        np.testing.assert_array_equal(arrays["instance_numbers"], series.instance_numbers)
        assert arrays["spacing"].dtype == np.float32 and np.allclose(arrays["spacing"], series.spacing)
        assert arrays["orig_hw"].dtype == np.int32 and tuple(arrays["orig_hw"]) == series.hu.shape[1:]
        present = np.array([(labels == v).any() for v in range(1, 8)])
        np.testing.assert_array_equal(arrays["found"], present)
        row = manifest.set_index("StudyInstanceUID").loc[uid]
        assert row["found"].split() == [n for n, f in zip(VERTEBRAE, present) if f]
        starts = []
        for i in range(7):
            pos, crops = arrays["positions"][i], arrays["crops"][i]
            if not present[i]:
                assert (pos == -1).all() and not crops.any() and not arrays["crop_boxes"][i].any()
                continue
            zs = np.nonzero((labels == i + 1).any(axis=(1, 2)))[0]
            assert pos[0] == zs.min() and pos[-1] == zs.max() and (np.diff(pos) >= 0).all()
            starts.append(pos[0])
            # the mask channel, cut independently from the truth on the original grid (= the prepared grid here)
            extent = vertebra_extents(labels)[VERTEBRAE[i]]
            y0, y1, x0, x1 = crop_box_original(extent, (1.0, 1.0), labels.shape[1:], cfg.data.margin, True)
            assert tuple(arrays["crop_boxes"][i]) == (y0, y1, x0, x1)
            rows = y0 + centred_nearest_index(y1 - y0, S)
            cols = x0 + centred_nearest_index(x1 - x0, S)
            inside = ((rows >= 0) & (rows < labels.shape[1]))[:, None] & ((cols >= 0) & (cols < labels.shape[2]))
            for t, zt in enumerate(pos):
                plane = labels[zt][np.clip(rows, 0, labels.shape[1] - 1)][:, np.clip(cols, 0, labels.shape[2] - 1)]
                expected = np.where(inside & (plane == i + 1), 255, 0)
                np.testing.assert_array_equal(crops[t, -1], expected)
            assert (crops[T // 2, -1] == 255).any()  # the vertebra shows in its middle slice
        assert starts == sorted(starts)  # C1 .. C7 head to feet


def test_slice_targets_from_boxes_and_nan_without_boxes(truth_cache, synthetic_root):
    cfg, uids, _ = truth_cache
    boxes = pd.read_csv(synthetic_root / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    train = pd.read_csv(synthetic_root / "train.csv", dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    with_boxes = [u for u in uids if u in set(boxes["StudyInstanceUID"])]
    without = [u for u in uids if u not in set(boxes["StudyInstanceUID"])]
    assert with_boxes and without
    for uid in without:  # a study labelled 0 throughout: known negatives; a fractured one without boxes: unknown
        targets = load_crops(cfg.data.crop_dir, uid)["slice_targets"]
        if train.loc[uid, "patient_overall"] == 0:
            assert (targets == 0).all()
        else:
            assert np.isnan(targets).all()
    for uid in with_boxes:
        arrays = load_crops(cfg.data.crop_dir, uid)
        _, labels = truth_labels(synthetic_root, uid)
        z_of = {int(n): z for z, n in enumerate(arrays["instance_numbers"])}
        ranges: dict[int, list[int]] = {}
        for x, y, w, h, n in boxes.loc[boxes["StudyInstanceUID"] == uid,
                                       ["x", "y", "width", "height", "slice_number"]].to_numpy():
            z = z_of[int(n)]
            under = labels[z, int(np.floor(y)):int(np.ceil(y + h)), int(np.floor(x)):int(np.ceil(x + w))]
            counts = np.bincount(under.ravel(), minlength=8)[1:8]
            ranges.setdefault(int(np.argmax(counts)) + 1, []).append(z)
        expected = np.zeros((7, T), np.float32)
        for v, zs in ranges.items():
            expected[v - 1] = (arrays["positions"][v - 1] >= min(zs)) & (arrays["positions"][v - 1] <= max(zs))
        fractured = train.loc[uid, list(VERTEBRAE)].to_numpy().astype(bool)
        disagree = (fractured != expected.any(1)) & arrays["found"]  # checked against train.csv: unknown
        expected[disagree] = np.nan
        np.testing.assert_array_equal(arrays["slice_targets"], expected)
        assert np.nansum(expected) > 0
        assert not np.nan_to_num(arrays["slice_targets"][~fractured]).any()  # positives only on fractured ones


def test_resume_skips_built_studies(truth_cache):
    cfg, uids, _ = truth_cache
    stamps = {u: os.stat(crop_path(cfg.data.crop_dir, u)).st_mtime_ns for u in uids}
    again = build_crops(cfg, uids=uids, progress=False, prefetch=False, grid_size=64)
    assert (again["built"], again["skipped"], again["failed"]) == (0, 4, 0)
    assert stamps == {u: os.stat(crop_path(cfg.data.crop_dir, u)).st_mtime_ns for u in uids}
    assert len(pd.read_csv(Path(cfg.data.crop_dir) / MANIFEST)) == 4


def test_failures_and_unmatched_boxes_are_reported(synthetic_root, tmp_path):
    """A corrupt study, one that nothing can segment and those train.csv lists with no folder go to failures.csv;
    the good study is built and its box rows without a target (no such slice, no vertebra under the box) go to
    unmatched_boxes.csv."""
    root = tmp_path / "data"
    (root / "train_images").mkdir(parents=True)
    (root / "segmentations").mkdir()
    shutil.copy(synthetic_root / "train.csv", root / "train.csv")
    boxes = pd.read_csv(synthetic_root / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    good = next(u for u in segmented_uids(synthetic_root) if u in set(boxes["StudyInstanceUID"]))
    unsegmented = next(p.name for p in sorted((synthetic_root / "train_images").iterdir())
                       if p.name not in segmented_uids(synthetic_root))
    corrupt = "1.2.826.0.1.3680043.99999"
    for uid in (good, unsegmented):
        os.symlink(synthetic_root / "train_images" / uid, root / "train_images" / uid)
    os.symlink(synthetic_root / "segmentations" / f"{good}.nii", root / "segmentations" / f"{good}.nii")
    os.symlink(synthetic_root / "segmentations" / f"{good}.nii", root / "segmentations" / f"{corrupt}.nii")
    (root / "train_images" / corrupt).mkdir()
    (root / "train_images" / corrupt / "1.dcm").write_bytes(b"not a dicom file" * 10)
    rows = boxes[boxes["StudyInstanceUID"] == good]
    first = int(rows["slice_number"].iloc[0])
    extra = pd.DataFrame({"StudyInstanceUID": [good, good], "x": [0.0, 0.0], "y": [0.0, 0.0], "width": [2.0, 2.0],
                          "height": [2.0, 2.0], "slice_number": [99999, first]})  # no such slice; air in a corner
    pd.concat([rows, extra]).to_csv(root / "train_bounding_boxes.csv", index=False)

    crop_dir = tmp_path / "crops"
    result = build_crops(cls_config(root, crop_dir), progress=False, prefetch=True, grid_size=64)  # worker path
    listed = pd.read_csv(root / "train.csv", dtype={"StudyInstanceUID": str})["StudyInstanceUID"]
    absent = sorted(set(listed) - {good, unsegmented})
    assert absent, "the fixture's train.csv lists studies this root has no folder for"
    assert (result["built"], result["failed"]) == (1, 2 + len(absent)) and crop_path(crop_dir, good).is_file()
    failures = pd.read_csv(crop_dir / FAILURES, dtype={"StudyInstanceUID": str}).set_index("StudyInstanceUID")
    assert sorted(failures.index) == sorted([corrupt, unsegmented, *absent])
    for uid in absent:
        assert f"no folder {root / 'train_images' / uid}" in failures.loc[uid, "error"]
    assert corrupt in failures.loc[corrupt, "error"] and "DicomError" in failures.loc[corrupt, "error"]
    assert "no data.seg_runs" in failures.loc[unsegmented, "error"]
    unmatched = pd.read_csv(crop_dir / UNMATCHED, dtype={"StudyInstanceUID": str})
    assert list(unmatched["StudyInstanceUID"]) == [good, good]
    reasons = dict(zip(unmatched["slice_number"], unmatched["reason"]))
    assert "not among the series" in reasons[99999] and "no C1..C7 under the box" in reasons[first]
    row = pd.read_csv(crop_dir / MANIFEST, dtype={"StudyInstanceUID": str}).iloc[0]
    assert (row["n_boxes"], row["unmatched_boxes"]) == (len(rows) + 2, 2)
    assert np.nansum(load_crops(crop_dir, good)["slice_targets"]) > 0  # the real boxes still give targets


def test_load_crops_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="1.2.3.npz"):
        load_crops(tmp_path, "1.2.3")
    (tmp_path / "1.2.3.npz").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"1\.2\.3\.npz.*corrupt"):
        load_crops(tmp_path, "1.2.3")
    np.savez(tmp_path / "1.2.4.npz", crops=np.zeros(3))
    with pytest.raises(ValueError, match="lacks"):
        load_crops(tmp_path, "1.2.4")
    # the per-vertebra layout with a vertebra's member missing: named, by both readers
    from kit.stage2.store import load_vertebra_crops

    small = {"found": np.ones(7, bool), "positions": np.zeros((7, 2), np.int32),
             "slice_targets": np.zeros((7, 2), np.float32), "instance_numbers": np.arange(3, dtype=np.int32),
             "spacing": np.ones(3, np.float32), "orig_hw": np.array([8, 8], np.int32)}
    np.savez(tmp_path / "1.2.5.npz", **small, **{f"crops_{v}": np.zeros((2, 3, 8, 8), np.uint8) for v in range(6)})
    with pytest.raises(ValueError, match=r"1\.2\.5\.npz lacks \['crops'\]"):
        load_crops(tmp_path, "1.2.5")
    with pytest.raises(ValueError, match=r"1\.2\.5\.npz lacks \['crops'\]"):
        load_vertebra_crops(tmp_path, "1.2.5", 6)
    np.testing.assert_array_equal(load_vertebra_crops(tmp_path, "1.2.5", 5)["crops"], 0)


class _Fake:
    def __init__(self, fold: int, provides: str):
        self.fold, self.provides = fold, provides


def test_choose_models_out_of_fold_rule():
    seg = [_Fake(0, "vertebra_probs"), _Fake(1, "vertebra_probs")]
    level = [_Fake(0, "levels"), _Fake(1, "levels")]
    fold_of = {"a": 1, "b": 0, "c": 2}
    models, source = choose_models("a", "train", fold_of, True, [seg, level])
    assert source == "oof fold 1" and models == [seg[1], level[1]]
    assert choose_models("a", "train", fold_of, False, [seg, level]) == (seg + level, "ensemble")
    assert choose_models("a", "test", {}, False, [seg, level]) == (seg + level, "ensemble")
    models, source = choose_models("c", "train", fold_of, True, [seg, level])  # fold 2 has no run
    assert models == seg + level and source.startswith("ensemble (trained on it") and "fold 2" in source
    # a fold is held out only when every run holds it out
    models, source = choose_models("a", "train", fold_of, True, [seg, level[:1]])
    assert source.startswith("ensemble (trained on it")
    assert choose_models("b", "train", fold_of, True, [seg, level[:1]])[1] == "oof fold 0"


def test_out_of_fold_masks_from_tiny_stage1_runs(synthetic_root, tmp_path, monkeypatch):
    """Two 1-epoch folds of a tiny segmenter: each segmented training study is cut with the fold that held it
    out, the others with both."""
    from kit.io.cache import prepare_studies
    from kit.config import load_config
    from kit.io.folds import folds_for
    from kit.train import fit_fold

    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    segmented = segmented_uids(synthetic_root)
    prepare_studies(synthetic_root, cache, uids=segmented, size=32, workers=1, progress=False)  # what stage 1 uses
    folds_csv = tmp_path / "folds.csv"
    paths = {"data.data_root": str(synthetic_root), "data.folds_csv": str(folds_csv), "data.n_folds": 2}
    tiny = {**paths, "data.cache_dir": str(cache), "out_dir": str(tmp_path / "runs"), "data.image_size": 32,
            "data.slice_offsets_mm": [-1, 0, 1], "data.level_input": False, "data.foreground_fraction": 0.2,
            "model.encoder_depth": 3, "model.decoder_width": 8, "train.epochs": 1, "train.val_every": 1,
            "train.threads": 1, "train.progress": False}
    for fold in (0, 1):
        fit_fold(load_config("demo_seg", **tiny, **{"data.fold": fold}))

    runs = {"data.true_masks": False, "data.seg_runs": [str(tmp_path / "runs" / "demo_seg")]}
    cfg = cls_config(synthetic_root, tmp_path / "crops", **paths, **runs)
    others = sorted(p.name for p in (synthetic_root / "train_images").iterdir() if p.name not in segmented)[:2]
    result = build_crops(cfg, uids=segmented + others, progress=False, prefetch=False, device="cpu")
    assert result["built"] == 6 and result["failed"] == 0 and result["in_sample"] == []
    fold_of = dict(zip(*folds_for(synthetic_root, folds_csv, n_folds=2)[["StudyInstanceUID", "fold"]].T.to_numpy()))
    manifest = pd.read_csv(tmp_path / "crops" / MANIFEST, dtype={"StudyInstanceUID": str, "found": str})
    for uid, source, found in manifest[["StudyInstanceUID", "mask_source", "found"]].fillna("").to_numpy():
        assert source == (f"oof fold {fold_of[uid]}" if uid in segmented else "ensemble")
        arrays = load_crops(tmp_path / "crops", uid)
        assert found.split() == [n for n, f in zip(VERTEBRAE, arrays["found"]) if f]
    assert {f"oof fold {k}" for k in (0, 1)} <= set(manifest["mask_source"])

    # a classifier split that differs from the one the runs trained on cannot give out-of-fold masks
    swapped = pd.read_csv(folds_csv, dtype={"StudyInstanceUID": str}).assign(fold=lambda f: 1 - f["fold"])
    swapped.to_csv(tmp_path / "swapped.csv", index=False)
    split = {**paths, "data.folds_csv": str(tmp_path / "swapped.csv")}
    other = cls_config(synthetic_root, tmp_path / "crops2", **split, **runs)
    with pytest.raises(ValueError, match="one shared split"):
        build_crops(other, uids=segmented, progress=False, prefetch=False, device="cpu")
    # ... also when the stage-1 run's config names no folds table (its split is read from what each fold held
    # out); this used to pass unchecked
    unnamed = tmp_path / "runs_unnamed" / "demo_seg"
    shutil.copytree(tmp_path / "runs" / "demo_seg", unnamed)
    for ckpt_path in unnamed.glob("fold*/model.pt"):
        ckpt = torch.load(ckpt_path, weights_only=True)
        ckpt["config"]["data"]["folds_csv"] = None
        torch.save(ckpt, ckpt_path)
    other = cls_config(synthetic_root, tmp_path / "crops3", **split, **{**runs, "data.seg_runs": [str(unnamed)]})
    with pytest.raises(ValueError, match="fold . held out.*one shared split"):
        build_crops(other, uids=segmented, progress=False, prefetch=False, device="cpu")


def test_cli_crops_takes_a_config_and_overrides(synthetic_root, tmp_path, capsys):
    """`kit crops --config <yaml> --split test key=value`: the overrides reach the config (crop_dir); test
    studies have no ground truth and no runs are given, so both are reported as failures, unread."""
    from kit.cli import main

    config = tmp_path / "cls_tiny.yaml"
    config.write_text(f"task: cls\ndata:\n  data_root: {synthetic_root}\n  true_masks: true\n")
    main(["crops", "--config", str(config), "--split", "test", f"data.crop_dir={tmp_path / 'out'}",
          "data.image_size=32"])
    out = capsys.readouterr()
    assert '"failed": 2' in out.out and "2 studies failed" in out.err
    failures = pd.read_csv(tmp_path / "out" / FAILURES)
    assert len(failures) == 2 and failures["error"].str.contains("no data.seg_runs").all()


_KILLED_BUILD = """
import os, signal, sys
import kit.stage2.crop_cache as cc
from kit.config import config_from_dict
written = []
write = cc._write_npz
def write_then_die(path, arrays):
    write(path, arrays)
    written.append(path)
    if len(written) == 2:  # the second study's file is on disk, its manifest row not yet: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)
cc._write_npz = write_then_die
root, crop_dir = sys.argv[1], sys.argv[2]
cfg = config_from_dict({"task": "cls"}, **{"data.data_root": root, "data.crop_dir": crop_dir, "data.true_masks": True,
                        "data.n_slices": 5, "data.n_neighbours": 1, "data.image_size": 32})
cc.build_crops(cfg, uids=sys.argv[3:], progress=False, prefetch=False, grid_size=64)
"""


def test_a_build_killed_part_way_loses_nothing(synthetic_root, tmp_path):
    """SIGKILL (an out-of-memory kill) right after a study's file is written and before its manifest row: the
    studies finished before it have their rows (written as each finishes, not in a `finally` that a SIGKILL skips);
    the resumed run builds the file without a row again and the rest, and every study reaches training
    (`crop_uids`). Before, the rows lived in memory: the resumed run skipped both files and training lost them."""
    import subprocess
    import sys

    from kit.stage2.data import crop_uids

    crop_dir = tmp_path / "crops"
    uids = segmented_uids(synthetic_root)
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(synthetic_root), str(crop_dir), *uids],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert len(list(crop_dir.glob("*.npz"))) == 2
    listed = pd.read_csv(crop_dir / MANIFEST, dtype={"StudyInstanceUID": str})["StudyInstanceUID"].tolist()
    assert listed == uids[:1]  # the first study's row is on disk; the second has a file but no row
    result = build_crops(cls_config(synthetic_root, crop_dir), uids=uids, progress=False, prefetch=False,
                         grid_size=64)
    assert (result["built"], result["skipped"], result["failed"]) == (3, 1, 0)
    assert sorted(crop_uids(crop_dir)) == uids
    assert not list(crop_dir.glob("*.tmp*")) and not list(crop_dir.glob(".*"))


def test_slice_targets_are_checked_against_the_labels_and_boxes_match_file_numbers():
    """study_targets by hand: slices are matched by the file-name number; a box that lands on a neighbour gives a
    labelled-1 vertebra no positive slice and the neighbour a positive one: both listed and unknown (NaN), the
    others kept; a study labelled 0 throughout has known negatives."""
    from kit.stage2.crop_cache import study_targets
    from kit.stage2.targets import file_numbers
    from kit.stage1.postprocess import vertebra_extents

    labels = np.zeros((14, 8, 8), np.uint8)
    for v in range(1, 8):
        labels[2 * (v - 1):2 * v, 2:6, 2:6] = v  # C1 slices 0-1, C2 slices 2-3, ...
    extents = vertebra_extents(labels)
    files = [Path(f"{100 + i}.dcm") for i in range(14)]  # file names are not the InstanceNumbers
    numbers = file_numbers(files, np.arange(1, 15))
    np.testing.assert_array_equal(numbers, np.arange(100, 114))
    assert file_numbers([Path("IM0001.dcm"), Path("7.dcm")], [5, 6]).tolist() == [5, 6 + 1]  # not a number: tag
    box = lambda n: {"x": 3, "y": 3, "width": 2, "height": 2, "slice_number": n}  # noqa: E731
    # C2 (slices 2-3) labelled 1 and boxed on file 102; C5 labelled 1 but its box is on file 106 = C4's slice
    boxes = pd.DataFrame([box(102), box(103), box(106)])
    label = np.array([0, 1, 0, 0, 1, 0, 0])
    targets, unmatched, conflicts = study_targets(boxes, numbers, extents, labels, (1.0, 1.0), 1.0, 2, label)
    assert len(unmatched) == 0
    np.testing.assert_array_equal(targets[1], [1, 1])  # C2 agrees with its label
    assert np.isnan(targets[3]).all() and np.isnan(targets[4]).all()  # C4 (0, boxed) and C5 (1, no box): unknown
    assert (targets[[0, 2, 5, 6]] == 0).all()
    assert len(conflicts) == 2 and conflicts[0].startswith("C4: labelled 0") and conflicts[1].startswith("C5")
    # matched by InstanceNumber (1..14) instead, no box would match a slice
    _, unmatched, _ = study_targets(boxes, np.arange(1, 15), extents, labels, (1.0, 1.0), 1.0, 2, label)
    assert len(unmatched) == 3
    negative, _, none = study_targets(boxes.iloc[:0], numbers, extents, labels, (1.0, 1.0), 1.0, 2, np.zeros(7))
    assert (negative == 0).all() and none == []
    unknown, _, _ = study_targets(boxes.iloc[:0], numbers, extents, labels, (1.0, 1.0), 1.0, 2, label)
    assert np.isnan(unknown).all()  # fractured, no boxes: unknown, not negative
