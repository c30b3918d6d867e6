"""kit.data: slice stacks, targets, sampling, augmentations that keep image and labels aligned, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from seg_fixtures import make_cache, make_study

from kit.config import AugmentConfig, DataConfig
from kit.data import (SegAugment, load_study, SegSliceDataset, affine_matrix, cached_uids, labels_to_channels, load_volumes,
                      slice_stack, slice_stacks, split_segmentation_studies, warp, context_offsets, n_input_slices,
                      LevelSequenceDataset, SegVolume, level_grid, level_presence, level_stacks)


def test_slice_stack_clamps_at_the_edges():
    vol = np.arange(5)[:, None, None] * np.ones((5, 2, 3), np.uint8)
    assert slice_stack(vol, 0, 2)[:, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert slice_stack(vol, 4, 1)[:, 0, 0].tolist() == [3, 4, 4]
    all_stacks = slice_stacks(vol, 2)
    assert all_stacks.shape == (5, 5, 2, 3)
    for z in range(5):
        np.testing.assert_array_equal(all_stacks[z], slice_stack(vol, z, 2))
    assert slice_stacks(vol, 1, 3, 99).shape == (2, 3, 2, 3)  # stop capped at Z
    offsets = np.array([-3, -1, 0, 2])
    assert slice_stack(vol, 1, 0, offsets=offsets)[:, 0, 0].tolist() == [0, 0, 1, 3]
    np.testing.assert_array_equal(slice_stacks(vol, 0, offsets=offsets)[1], slice_stack(vol, 1, 0, offsets=offsets))


def test_context_offsets_in_slices():
    assert context_offsets(0.5, 2, context_stride=3).tolist() == [-6, -3, 0, 3, 6]
    assert context_offsets(0.5, 1, context_mm=2.0).tolist() == [-4, 0, 4]
    assert context_offsets(0.625, offsets_mm=[-20, -1, 0, 1.2, 20]).tolist() == [-32, -2, 0, 2, 32]
    assert context_offsets(3.0, offsets_mm=[-1, 0, 1]).tolist() == [-1, 0, 1]  # never collapse onto the centre
    assert n_input_slices(4) == 9 and n_input_slices(4, [-5, 0, 5]) == 3


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
    volumes = load_volumes(tmp_path / "cache", uids[:3], 32)  # resized on load
    image, labels, dz = volumes[uids[0]]
    assert dz == pytest.approx(float(load_study(tmp_path / "cache", uids[0])["spacing"][0]))
    assert image.shape == labels.shape == (20, 32, 32) and image.dtype == labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(range(9))  # nearest: no new label values

    fg = sum(int(((lab >= 1) & (lab <= 7)).any(axis=(1, 2)).sum()) for _, lab, _ in volumes.values())
    ds = SegSliceDataset(volumes, context=2, background_fraction=0.5, augment=None, seed=3)
    bg_total = 3 * 20 - fg
    assert len(ds.foreground) == fg and len(ds.background) == bg_total
    assert len(ds) == fg + round(0.5 * bg_total)
    sample = ds[0]
    assert sample["image"].shape == (5, 32, 32) and sample["target"].shape == (7, 32, 32)
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1
    uid, z = sample["uid"], sample["z"]
    np.testing.assert_allclose(sample["image"].numpy(), slice_stack(volumes[uid][0], z, 2) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(sample["target"].numpy(), labels_to_channels(volumes[uid][1][z]))
    assert sample["target"].sum() > 0  # foreground first

    first = list(ds.index)
    ds.set_epoch(1)
    assert len(ds) == len(first) and ds.index != first  # other background slices
    ds.set_epoch(0)
    assert ds.index == first  # the draw depends only on (seed, epoch)
    half = SegSliceDataset(volumes, context=1, background_fraction=0.0, foreground_fraction=0.5, seed=3)
    assert len(half) == round(0.5 * fg) and all(item in ds.foreground for item in half.index)

    # with augmentation the same (epoch, index) gives the same sample
    aug = SegSliceDataset(volumes, context=1, augment=AugmentConfig(), seed=3)
    np.testing.assert_array_equal(aug[5]["image"].numpy(), aug[5]["image"].numpy())
    # the other-vertebra channel makes thoracic slices foreground too
    other = SegSliceDataset(volumes, context=1, other_vertebrae=True, background_fraction=0.0)
    assert other[0]["target"].shape == (8, 32, 32) and len(other.foreground) >= len(ds.foreground)


def test_split_uses_the_folds_csv_and_segmented_studies(tmp_path):
    uids, folds_csv = make_cache(tmp_path / "cache", n_studies=5, n_unsegmented=1, n_folds=3, z=8, size=16)
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), folds_csv=str(folds_csv), n_folds=3, fold=1)
    train, held_out = split_segmentation_studies(cfg)
    assert held_out == [uids[1], uids[4]] and sorted(train) == sorted([uids[0], uids[2], uids[3]])
    assert uids[5] not in train + held_out  # no segmentation
    with pytest.raises(ValueError, match="holds 3 folds but data.n_folds=4"):
        split_segmentation_studies(DataConfig(cache_dir=cfg.cache_dir, folds_csv=cfg.folds_csv, n_folds=4))


def test_level_grid_stacks_and_presence():
    assert level_grid(10, 1.0, 2.5).tolist() == [0, 2, 5, 8]  # 0, 2.5, 5, 7.5 mm -> nearest slices
    assert level_grid(7, 3.0, 2.5).tolist() == list(range(7))  # never finer than the study
    vol = np.arange(10, dtype=np.uint8)[:, None, None] * np.ones((10, 2, 2), np.uint8)
    stacks = level_stacks(vol, np.array([0, 2, 5, 8]), neighbours=1)
    assert stacks.shape == (4, 3, 2, 2) and stacks[:, :, 0, 0].tolist() == [[0, 0, 2], [0, 2, 5], [2, 5, 8], [5, 8, 8]]
    labels = np.zeros((3, 4, 4), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1], labels[1, 2, 2], labels[2, 3, 3] = 1, 2, 3, 9  # 9: thoracic, ignored
    present = level_presence(labels)
    assert present.shape == (3, 7) and present.sum() == 3 and present[0, 0] == present[1, 1] == present[1, 2] == 1


def test_level_sequence_dataset_windows_pads_and_repeats():
    rng = np.random.default_rng(0)
    long = SegVolume(rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), np.zeros((40, 8, 8), np.uint8), 1.0)
    short = SegVolume(rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), np.ones((6, 8, 8), np.uint8), 2.0)
    ds = LevelSequenceDataset({"long": long, "short": short}, slice_mm=2.0, neighbours=1, seq_len=8, repeats=3)
    assert len(ds) == 6
    a = ds[0]
    assert a["image"].shape == (8, 3, 8, 8) and a["target"].shape == (8, 7) and a["mask"].sum() == 8
    b = ds[1]  # the short study: 6 slices at 2 mm = 6 steps, padded to 8
    assert b["mask"].tolist() == [1] * 6 + [0, 0] and b["target"][:6, 0].sum() == 6 and b["target"][6:].sum() == 0
    assert float(b["image"][6:].abs().sum()) == 0.0
    again = ds[0]
    torch.testing.assert_close(a["image"], again["image"])  # same epoch, same draw
    whole = LevelSequenceDataset({"long": long}, slice_mm=2.0, seq_len=None, augment=False)
    np.testing.assert_allclose(whole[0]["image"][:, 1].numpy(), long.image[::2] / 255.0, atol=1e-6)


def test_crop_around_labels_keeps_the_vertebrae_in_view():
    from kit.data import crop_around_labels
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


def test_soft_presence_ramps_and_jitter():
    from kit.data import soft_presence, vertebra_ranges
    labels = np.zeros((40, 8, 8), np.uint8)
    labels[5:15, 2:4, 2:4] = 1
    labels[12:30, 4:6, 4:6] = 2
    ranges = vertebra_ranges(labels)
    assert ranges[:2].tolist() == [[5, 14], [12, 29]] and (ranges[2:] == -1).all()
    at = np.stack([soft_presence(ranges, z, 1.0, ramp_mm=2.0) for z in range(40)])
    assert at.shape == (40, 7) and (at[:, 2:] == 0).all()
    # the ramp is centred on each range's outer edge: 0.5 there, 1 a ramp/2 inside, 0 a ramp/2 outside
    np.testing.assert_allclose(at[[3, 4, 5, 6, 10, 14, 15, 16], 0], [0, 0.25, 0.75, 1, 1, 0.75, 0.25, 0])
    np.testing.assert_allclose(at[[12, 13, 29, 30], 1], [0.75, 1, 0.75, 0.25])
    # in mm: a 0.5 mm study has twice the slices in its ramp
    np.testing.assert_allclose(soft_presence(ranges, 4, 0.5, ramp_mm=2.0)[0], 0.375)
    rng = np.random.default_rng(0)
    jittered = np.stack([soft_presence(ranges, 16, 1.0, rng, jitter_mm=2.0, ramp_mm=2.0) for _ in range(200)])
    assert jittered[:, 0].min() == 0 and 0.5 < jittered[:, 0].max() <= 0.75  # the end moved both ways (+-2 mm)
    assert jittered[:, 1].min() >= 0.8 and jittered[:, 1].max() <= 1.0  # inside: only the 0.8-1 scale
    # a margin widens every range by that many mm at each end before the ramps (3 slices at 1 mm, 6 at 0.5 mm)
    wide = np.stack([soft_presence(ranges, z, 1.0, ramp_mm=2.0, margin_mm=3.0) for z in range(40)])
    np.testing.assert_allclose(wide[[0, 1, 2, 3, 17, 18, 19, 20], 0], [0, 0.25, 0.75, 1, 0.75, 0.25, 0, 0])
    np.testing.assert_allclose(wide[:, 2:], 0)
    np.testing.assert_allclose([soft_presence(ranges, z, 0.5, ramp_mm=1.0, margin_mm=3.0)[0] for z in (19, 21, 22)],
                               [1.0, 0.25, 0.0])


def test_dataset_level_input_adds_the_presence_planes():
    from kit.data import soft_presence, vertebra_ranges
    rng = np.random.default_rng(0)
    image, labels = make_study(rng, z=24, size=32)
    vols = {"s": SegVolume(image, labels, 1.0)}
    plain = SegSliceDataset(vols, 1, augment=None)
    conditioned = SegSliceDataset(vols, 1, augment=None, level_input=True)
    for i in (0, 5, len(plain) - 1):
        a, b = plain[i], conditioned[i]
        assert b["image"].shape == (3 + 7, 32, 32)
        torch.testing.assert_close(b["image"][:3], a["image"])
        expected = soft_presence(vertebra_ranges(labels), b["z"], 1.0)
        torch.testing.assert_close(b["image"][3:], torch.from_numpy(expected)[:, None, None].expand(7, 32, 32))
    wide = SegSliceDataset(vols, 1, augment=None, level_input=True, level_margin_mm=2.0)
    for i in (0, 5, len(wide) - 1):
        expected = soft_presence(vertebra_ranges(labels), wide[i]["z"], 1.0, margin_mm=2.0)
        torch.testing.assert_close(wide[i]["image"][3:], torch.from_numpy(expected)[:, None, None].expand(7, 32, 32))
    assert (wide[0]["image"][3:] > conditioned[0]["image"][3:]).any()  # the first vertebra slice: inside the margin
    augmented = SegSliceDataset(vols, 1, augment=AugmentConfig(), level_input=True)
    planes = augmented[5]["image"][3:]
    assert (planes == planes[:, :1, :1]).all()  # constant planes, not warped
