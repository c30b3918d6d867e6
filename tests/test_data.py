"""kit.data: slice stacks, targets, sampling, augmentations that keep image and labels aligned, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from seg_fixtures import make_cache, make_study

from kit.sections import AugmentConfig, DataConfig
from kit.data import affine_matrix, cached_uids, load_study, warp
from kit.stage1.data import (LevelSequenceDataset, SegAugment, SegSliceDataset, SegVolume, end_slices,
                             labels_to_channels, load_volumes, split_segmentation_studies)
from kit.stage1.recipe import LevelRecipe, SegRecipe, true_presence


def recipe(offsets=(-2, -1, 0, 1, 2), size=32, **kw) -> SegRecipe:
    return SegRecipe(tuple(float(v) for v in offsets), size, **kw)


def test_labels_to_channels():
    labels = np.array([[0, 1, 7], [8, 3, 12]], np.uint8)
    seven = labels_to_channels(labels)
    assert seven.shape == (7, 2, 3) and seven.dtype == np.float32
    assert seven.sum() == 3 and seven[0, 0, 1] == 1 and seven[6, 0, 2] == 1 and seven[2, 1, 1] == 1
    eight = labels_to_channels(labels, other_vertebrae=True)
    assert eight.shape == (8, 2, 3) and eight[7].tolist() == [[0, 0, 0], [1, 0, 1]]


def test_affine_matrix_flips_and_rotation():
    img = np.arange(6 * 6, dtype=np.float32).reshape(6, 6)
    np.testing.assert_allclose(warp(img, affine_matrix(6, 6, hflip=True)), img[:, ::-1], atol=1e-4)
    np.testing.assert_allclose(warp(img, affine_matrix(6, 6, vflip=True)), img[::-1], atol=1e-4)
    # cv2 angles are counter-clockwise: +90 degrees is numpy's rot90 (k=1)
    np.testing.assert_allclose(warp(img, affine_matrix(6, 6, angle=90)), np.rot90(img), atol=1e-4)
    shifted = warp(img, affine_matrix(6, 6, shift=(2, 0)), nearest=True)
    np.testing.assert_array_equal(shifted[:, 2:], img[:, :-2])
    assert (shifted[:, :2] == 0).all()  # outside the image is air / background


def test_augment_keeps_image_and_labels_aligned():
    rng = np.random.default_rng(0)
    image, labels = make_study(rng, z=20, size=64)
    z = int(np.nonzero(labels.any(axis=(1, 2)))[0][3])
    lab = labels[z]
    # an image whose value encodes the label, on 3 channels
    code = np.stack([lab.astype(np.float32) * 10] * 3)
    aug = SegAugment(AugmentConfig(p_affine=1.0, rotate_deg=15, scale=0.1, shift=0.06, hflip=0.5, vflip=0.5,
                                   brightness=0.0, contrast=0.0))
    moved = 0
    for seed in range(8):
        out = aug({"image": code, "labels": lab}, np.random.default_rng(seed))
        assert out["image"].shape == (3, 64, 64) and out["labels"].shape == (64, 64)
        assert out["labels"].dtype == lab.dtype and set(np.unique(out["labels"])) <= set(np.unique(lab))
        # away from label boundaries, the linearly warped image equals 10 x the nearest-warped labels
        w = out["labels"].astype(np.float32)
        pad = np.pad(w, 1, mode="edge")
        flat = np.ones_like(w, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                flat &= pad[1 + dy:65 + dy, 1 + dx:65 + dx] == w
        assert flat.sum() > 2000
        np.testing.assert_allclose(out["image"][:, flat], np.broadcast_to(w[flat] * 10, (3, int(flat.sum()))),
                                   atol=1e-3)
        moved += not np.array_equal(out["labels"], lab)
    assert moved == 8
    # brightness / contrast only touch the image, and keep it in [0, 1]
    bc = SegAugment(AugmentConfig(p_affine=0.0, brightness=0.2, contrast=0.2))
    x = rng.random((3, 8, 8)).astype(np.float32)
    out = bc({"image": x, "labels": lab[:8, :8]}, np.random.default_rng(1))
    assert out["labels"] is lab[:8, :8] or np.array_equal(out["labels"], lab[:8, :8])
    assert not np.allclose(out["image"], x) and out["image"].min() >= 0 and out["image"].max() <= 1
    # linear in x: out = x * c + b, one (b, c) per sample
    c, b = np.polyfit(x.ravel()[(out["image"].ravel() > 0) & (out["image"].ravel() < 1)],
                      out["image"].ravel()[(out["image"].ravel() > 0) & (out["image"].ravel() < 1)], 1)
    assert 0.8 <= c <= 1.2 and -0.2 <= b <= 0.2


def test_dataset_samples_and_epochs(tmp_path):
    uids, folds_csv = make_cache(tmp_path / "cache", n_studies=3, n_unsegmented=1, z=20, size=48)
    assert cached_uids(tmp_path / "cache") == sorted(uids)
    assert cached_uids(tmp_path / "cache", with_mask=True) == sorted(uids[:3])
    volumes = load_volumes(tmp_path / "cache", uids[:3], recipe())  # resized on load
    image, labels, dz = volumes[uids[0]]
    assert dz == pytest.approx(float(load_study(tmp_path / "cache", uids[0])["spacing"][0]))
    assert image.shape == labels.shape == (20, 32, 32) and image.dtype == labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(range(9))  # nearest: no new label values

    fg = sum(int(((lab >= 1) & (lab <= 7)).any(axis=(1, 2)).sum()) for _, lab, _ in volumes.values())
    ds = SegSliceDataset(volumes, recipe(), background_fraction=0.5, augment=None, seed=3)
    bg_total = 3 * 20 - fg
    assert len(ds.foreground) == fg and len(ds.background) == bg_total
    assert len(ds) == fg + round(0.5 * bg_total)
    sample = ds[0]
    assert sample["image"].shape == (5, 32, 32) and sample["target"].shape == (7, 32, 32)
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1
    uid, z = sample["uid"], sample["z"]
    stack = volumes[uid][0][np.clip(z + np.arange(-2, 3), 0, 19)]  # dz = 1 mm: offsets of 1 slice
    np.testing.assert_allclose(sample["image"].numpy(), stack / 255.0, atol=1e-6)
    np.testing.assert_array_equal(sample["target"].numpy(), labels_to_channels(volumes[uid][1][z]))
    assert sample["target"].sum() > 0  # foreground first

    first = list(ds.index)
    ds.set_epoch(1)
    assert len(ds) == len(first) and ds.index != first  # other background slices
    ds.set_epoch(0)
    assert ds.index == first  # the draw depends only on (seed, epoch)
    half = SegSliceDataset(volumes, recipe((-1, 0, 1)), background_fraction=0.0, foreground_fraction=0.5,
                           seed=3)
    assert len(half) == round(0.5 * fg) and all(item in ds.foreground for item in half.index)

    # with augmentation the same (epoch, index) gives the same sample
    aug = SegSliceDataset(volumes, recipe((-1, 0, 1)), augment=AugmentConfig(), seed=3)
    np.testing.assert_array_equal(aug[5]["image"].numpy(), aug[5]["image"].numpy())
    # the other-vertebra channel makes thoracic slices foreground too
    other = SegSliceDataset(volumes, recipe((-1, 0, 1)), other_vertebrae=True, background_fraction=0.0)
    assert other[0]["target"].shape == (8, 32, 32) and len(other.foreground) >= len(ds.foreground)


def test_end_slices_and_end_weighted_draw():
    labels = np.zeros((20, 4, 4), np.uint8)
    labels[2:8, 1, 1] = 1   # C1: slices 2..7
    labels[6:15, 2, 2] = 2  # C2: slices 6..14
    np.testing.assert_array_equal(np.nonzero(end_slices(labels, 0.0, 1.0))[0], [2, 6, 7, 14])
    np.testing.assert_array_equal(np.nonzero(end_slices(labels, 2.0, 2.0))[0], [1, 2, 3, 5, 6, 7, 8, 13, 14, 15])
    np.testing.assert_array_equal(np.nonzero(end_slices(labels, 1.9, 2.0))[0], [2, 6, 7, 14])  # under a slice
    image = np.zeros_like(labels)
    volumes = {f"s{i}": (image, labels, 1.0) for i in range(20)}
    rec = recipe((0,))
    plain = SegSliceDataset(volumes, rec, background_fraction=0.0, foreground_fraction=0.3, seed=0)
    ends = SegSliceDataset(volumes, rec, background_fraction=0.0, foreground_fraction=0.3, end_weight=8.0,
                           end_mm=0.0, seed=0)
    assert len(plain) == len(ends) == round(0.3 * 20 * 13)  # same epoch size
    share = [np.mean([z in (2, 6, 7, 14) for _, z in ds.index]) for ds in (plain, ends)]
    # 4 of 13 vertebra slices are ends: a uniform draw is ~31 % end slices, weight 8 over twice as many
    assert share[0] < 0.4 and share[1] > 2 * share[0]
    assert len(set(ends.index)) == len(ends)  # without replacement
    full = SegSliceDataset(volumes, rec, background_fraction=0.0, end_weight=8.0, seed=0)
    assert len(full) == 20 * 13  # foreground_fraction 1: every slice once, weights or not


def test_split_uses_the_folds_csv_and_segmented_studies(tmp_path):
    uids, folds_csv = make_cache(tmp_path / "cache", n_studies=5, n_unsegmented=1, n_folds=3, z=8, size=16)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), folds_csv=str(folds_csv), n_folds=3, fold=1)
    train, held_out = split_segmentation_studies(cfg)
    assert held_out == [uids[1], uids[4]] and sorted(train) == sorted([uids[0], uids[2], uids[3]])
    assert uids[5] not in train + held_out  # no segmentation
    with pytest.raises(ValueError, match="holds 3 folds but data.n_folds=4"):
        split_segmentation_studies(DataConfig(cache_dir=cfg.cache_dir, folds_csv=cfg.folds_csv, n_folds=4))


def test_level_sequence_dataset_windows_pads_and_repeats():
    rng = np.random.default_rng(0)
    long = SegVolume(rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), np.zeros((40, 8, 8), np.uint8), 1.0)
    short = SegVolume(rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), np.ones((6, 8, 8), np.uint8), 2.0)
    ds = LevelSequenceDataset({"long": long, "short": short}, LevelRecipe(2.0, 1, 8, tta_flip=False), seq_len=8,
                              repeats=3)
    assert len(ds) == 6
    a = ds[0]
    assert a["image"].shape == (8, 3, 8, 8) and a["target"].shape == (8, 7) and a["mask"].sum() == 8
    b = ds[1]  # the short study: 6 slices at 2 mm = 6 steps, padded to 8
    assert (a["uid"], b["uid"], ds[4]["uid"]) == ("long", "short", "long")  # named in skipped_batches.csv if need be
    assert b["mask"].tolist() == [1] * 6 + [0, 0] and b["target"][:6, 0].sum() == 6 and b["target"][6:].sum() == 0
    assert float(b["image"][6:].abs().sum()) == 0.0
    again = ds[0]
    torch.testing.assert_close(a["image"], again["image"])  # same epoch, same draw
    whole = LevelSequenceDataset({"long": long}, LevelRecipe(2.0, 1, 8, tta_flip=False), seq_len=None, augment=False)
    np.testing.assert_allclose(whole[0]["image"][:, 1].numpy(), long.image[::2] / 255.0, atol=1e-6)


def test_level_window_zoom_moves_pixels_not_slices():
    z = 60
    labels = np.zeros((z, 16, 16), np.uint8)
    for c in range(7):  # C1..C7 in bands of 8 slices, each a bright square of its own brightness
        labels[2 + 8 * c:10 + 8 * c, 4:12, 4:12] = c + 1
    vol = {"s": SegVolume((labels * 30).astype(np.uint8), labels, 1.0)}
    recipe = LevelRecipe(2.0, 0, 16, tta_flip=False)
    plain = LevelSequenceDataset(vol, recipe, seq_len=None, augment=False)[0]
    boxes = {}
    for zoom in (0.0, 0.15):
        ds = LevelSequenceDataset(vol, recipe, seq_len=None, augment=True, z_jitter=0.0, seed=3, zoom=zoom)
        boxes[zoom] = set()
        for epoch in range(6):
            ds.set_epoch(epoch)
            b = ds[0]
            torch.testing.assert_close(b["target"], plain["target"])  # the same steps, the same targets
            x, level = b["image"][:, 0].numpy(), (b["target"].numpy() * np.arange(1, 8)).max(axis=1)
            shown = level > 0
            # the centre pixel stays inside the square: still brightest where the level is highest
            assert np.corrcoef(x[shown, 8, 8], level[shown])[0, 1] > 0.9
            # one zoom and shift for the whole window: the square has the same outline on every step
            cols = [img.max(axis=0) for img in x[shown]]
            outlines = {tuple(np.flatnonzero(c > 0.9 * c.max())) for c in cols}  # the square's inside
            assert len(outlines) == 1
            boxes[zoom] |= outlines
    assert len(boxes[0.0]) == 1 and len(boxes[0.15]) > 1  # zoom off: a fixed square (flips are symmetric)


def test_crop_around_labels_keeps_the_vertebrae_in_view():
    from kit.stage1.data import crop_around_labels
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 64), np.uint8)
    labels[40:52, 5:15] = 3
    image = np.stack([labels.astype(np.float32), np.arange(64 * 64, dtype=np.float32).reshape(64, 64)])
    origins = set()
    for _ in range(20):
        img, lab = crop_around_labels(image, labels, 32, rng)
        assert img.shape == (2, 32, 32) and lab.shape == (32, 32)
        assert (lab == 3).sum() == (labels == 3).sum()  # the box (12 x 10) fits whatever the jitter
        np.testing.assert_array_equal(img[0], lab)  # image and labels cut at the same place
        y0, x0 = divmod(int(img[1, 0, 0]), 64)
        assert 0 <= y0 <= 32 and 0 <= x0 <= 2  # inside the slice (the box is near the left edge)
        origins.add(y0)
    assert len(origins) > 3  # jittered
    empty = np.zeros_like(labels)
    seen = {divmod(int(crop_around_labels(image, empty, 32, rng)[0][1, 0, 0]), 64) for _ in range(10)}
    assert len(seen) > 5  # anywhere on a slice without vertebrae
    img, lab = crop_around_labels(image, labels, 64, rng)
    assert img is image and lab is labels


def test_crop_centres_on_the_targets_not_on_thoracic_labels():
    rng = np.random.default_rng(0)
    from kit.stage1.data import crop_around_labels
    labels = np.zeros((64, 64), np.uint8)
    labels[4:10, 4:10] = 7  # C7, top left
    labels[50:60, 50:60] = 8  # T1, bottom right: not a target of the C1..C7 segmenter
    image = np.arange(64 * 64, dtype=np.float32).reshape(1, 64, 64)
    for _ in range(10):
        img, lab = crop_around_labels(image, labels, 24, rng)
        assert (lab == 7).sum() == 36  # C7 always in view
    # with the "other vertebra" channel (top=255) every vertebra is a target: the box spans both
    both = [crop_around_labels(image, labels, 24, rng, top=255)[0][0, 0, 0] for _ in range(10)]
    assert np.mean([divmod(int(v), 64)[0] for v in both]) > 10


def test_dataset_level_input_adds_the_recipe_planes():
    rng = np.random.default_rng(0)
    image, labels = make_study(rng, z=24, size=32)
    vols = {"s": SegVolume(image, labels, 1.0)}
    plain = SegSliceDataset(vols, recipe((-1, 0, 1)), augment=None)
    cond = recipe((-1, 0, 1), level_input=True)
    conditioned = SegSliceDataset(vols, cond, augment=None)
    planes = cond.planes(true_presence(labels), 1.0)
    for i in (0, 5, len(plain) - 1):
        a, b = plain[i], conditioned[i]
        assert b["image"].shape == (3 + 7, 32, 32)
        torch.testing.assert_close(b["image"][:3], a["image"])
        torch.testing.assert_close(b["image"][3:], torch.from_numpy(planes[:, b["z"]])[:, None, None].expand(7, 32, 32))
    wide = SegSliceDataset(vols, recipe((-1, 0, 1), level_input=True, level_margin_mm=2.0), augment=None)
    assert (wide[0]["image"][3:] > conditioned[0]["image"][3:]).any()  # the first vertebra slice: inside the margin
    augmented = SegSliceDataset(vols, cond, augment=AugmentConfig())
    p = augmented[5]["image"][3:]
    assert (p == p[:, :1, :1]).all()  # constant planes, not warped
    assert not torch.equal(p, conditioned[5]["image"][3:])  # jittered and scaled in training
