"""kit.stage1.postprocess (clean-up of vertebra probabilities, extents) and kit.stage2 crops and targets, on hand-made and synthetic volumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kit.constants import VERTEBRAE, WINDOWS
from kit.stage2.crops import (crop_box_original, crop_vertebra_stack,
                              grid_scale, neighbour_offsets, slice_positions, stack_channel_names)
from kit.stage2.targets import assign_boxes_to_vertebrae, match_boxes_to_slices, slice_targets, vertebra_targets
from kit.stage1.postprocess import (GROW_MAX_MM, clean_vertebra_probs, extents_table, largest_component,
                                    missing_vertebrae, vertebra_extents)
from kit.io.dicom import window


# crop_vertebra_stack takes its whole geometry (a ClsRecipe passes its own); these tests start from
# the values below and change what each one is about
GEOMETRY = dict(n_slices=15, n_neighbours=2, neighbour_mm=None, dz=1.0, size=224, windows=("bone",), margin=0.15,
                with_mask=True)


def stack(hu, labels, extent, **changes):
    return crop_vertebra_stack(hu, labels, extent, **{**GEOMETRY, **changes})


def stacked_blobs(z: int = 70, size: int = 24, thick: int = 8, gap: int = 2) -> np.ndarray:
    """(Z, size, size) uint8 labels: C1..C7 as boxes stacked head to feet, `thick` slices each."""
    labels = np.zeros((z, size, size), dtype=np.uint8)
    for i in range(7):
        z0 = 2 + i * (thick + gap)
        labels[z0:z0 + thick, 6 + i % 2:16, 5:15 + i % 3] = i + 1
    return labels


def one_hot(labels: np.ndarray) -> np.ndarray:
    """(7, Z, H, W) float32 probabilities that are exactly the labels."""
    return np.stack([(labels == i + 1) for i in range(7)]).astype(np.float32)


def test_largest_component_keeps_the_biggest():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:5, 1:5, 1:5] = True  # 64 voxels
    mask[7:9, 7:9, 7:9] = True  # 8 voxels, separate
    out = largest_component(mask)
    assert out.sum() == 64 and out[1:5, 1:5, 1:5].all() and not out[7:9, 7:9, 7:9].any()
    assert largest_component(np.zeros((3, 3, 3), bool)).sum() == 0
    diagonal = np.zeros((6, 6, 6), dtype=bool)
    diagonal[0:2, 0:2, 0:2] = diagonal[2:5, 2:5, 2:5] = True  # touching only at a corner: one component
    assert largest_component(diagonal).sum() == 8 + 27


def test_largest_component_keeps_a_piece_cut_off_inside_its_slices():
    mask = np.zeros((20, 10, 10), dtype=bool)
    mask[8:18, 2:8, 2:8] = True  # the body
    mask[3:6, 4:6, 4:6] = True  # a tip above it, 2 empty slices (6, 7) between, over the body in-plane
    mask[3:6, 0, 9] = True  # a blob at the tip's height that overlaps nothing in-plane
    tip, blob = np.zeros_like(mask), np.zeros_like(mask)
    tip[3:6, 4:6, 4:6], blob[3:6, 0, 9] = True, True
    everywhere = np.ones(20, dtype=bool)
    body = largest_component(mask)
    assert body.sum() == 360 and not body[tip].any()
    out = largest_component(mask, within=everywhere, gap=2)
    assert out[tip].all() and not out[blob].any() and out.sum() == 360 + 12
    assert largest_component(mask, within=everywhere, gap=1).sum() == 360  # the gap is 2 slices
    above = everywhere.copy()
    above[3] = False  # one slice of the tip outside the vertebra's slices: the whole tip stays out
    assert largest_component(mask, within=above, gap=2).sum() == 360
    np.testing.assert_array_equal(largest_component(mask, gap=2), body)  # no `within`: the largest alone


def test_clean_keeps_the_tip_a_probability_dip_cut_off_given_the_level_ranges():
    from kit.stage1.recipe import true_presence

    labels = stacked_blobs(thick=14, z=112)
    probs = one_hot(labels) * 0.9
    first, last = np.nonzero((labels == 2).any(axis=(1, 2)))[0][[0, -1]]
    probs[1, first + 3:first + 5] = 0.02  # two slices of C2 the segmenter misses: its top 3 slices cut off
    levels = true_presence(labels)
    plain = clean_vertebra_probs(probs)
    assert np.nonzero((plain == 2).any(axis=(1, 2)))[0][0] == first + 5
    bridged = clean_vertebra_probs(probs, levels=levels, dz=1.0)  # BRIDGE_MM 4: gaps up to 4 slices at 1 mm
    assert np.nonzero((bridged == 2).any(axis=(1, 2)))[0][[0, -1]].tolist() == [first, last]
    np.testing.assert_array_equal(bridged[labels != 2], labels[labels != 2])
    assert (clean_vertebra_probs(probs, levels=levels, dz=3.0) == plain).all()  # 4 mm = 1 slice: not bridged
    shifted = levels.copy()
    shifted[1, first] = 0.0  # the level model starts C2 a slice below the tip: the tip is not kept
    assert (clean_vertebra_probs(probs, levels=shifted, dz=1.0) == plain).all()
    with pytest.raises(ValueError, match="levels must be"):
        clean_vertebra_probs(probs, levels=levels[:, :5], dz=1.0)


def test_largest_component_on_the_column_passes_over_a_larger_blob_off_it():
    mask = np.zeros((10, 40, 40), dtype=bool)
    mask[2:8, 18:24, 18:24] = True  # the vertebra on the column, 216 voxels, centre (20.5, 20.5)
    mask[1:9, 2:12, 30:38] = True  # a blob of 640 voxels at the body's edge, centre (6.5, 33.5)
    vertebra = np.zeros_like(mask)
    vertebra[2:8, 18:24, 18:24] = True
    on = largest_component(mask, column=((20.0, 20.0), (3.0, 3.0)))
    np.testing.assert_array_equal(on, vertebra)
    assert largest_component(mask).sum() == 640  # no column: the largest
    assert largest_component(mask, column=((20.0, 15.0), (3.0, 3.0))).sum() == 640  # none on it: the largest
    assert largest_component(mask, column=((20.0, 17.5), (3.0, 3.0))).sum() == 216  # the limit is inclusive


def test_clean_keeps_a_vertebra_on_the_column_when_a_larger_blob_elsewhere_gets_its_label():
    labels = stacked_blobs(z=70, size=48)
    probs = one_hot(labels) * 0.9
    c6 = labels == 6
    z6 = np.nonzero(c6.any(axis=(1, 2)))[0]
    probs[5, z6[0] - 1:z6[-1] + 2, 30:46, 36:46] = 0.8  # a blob at the edge, larger than C6, also called C6
    out = clean_vertebra_probs(probs)
    np.testing.assert_array_equal(out, labels)
    # the same study through the largest component alone (no column, or one wide enough to hold the blob): the blob
    assert not (clean_vertebra_probs(probs, column_tolerance=None) == 6)[c6].any()
    assert not (clean_vertebra_probs(probs, column_tolerance=10.0) == 6)[c6].any()
    two = np.where(np.isin(labels, (1, 6)), labels, 0)  # fewer than three vertebrae: no column, the largest
    probs2 = one_hot(two) * 0.9
    probs2[5, z6[0] - 1:z6[-1] + 2, 30:46, 36:46] = 0.8
    assert not (clean_vertebra_probs(probs2) == 6)[c6].any()


def test_clean_grows_a_vertebra_into_its_faint_end_slices():
    labels = stacked_blobs(thick=14, z=112)
    c4 = labels == 4
    first, last = np.nonzero(c4.any(axis=(1, 2)))[0][[0, -1]]
    probs = one_hot(labels) * 0.9
    probs[3, first:first + 2][c4[first:first + 2]] = 0.2  # the segmenter sees C4's two top slices faintly
    probs[3, last][c4[last]] = 0.1  # and its bottom slice
    probs[3, first - 1, 0, 23] = 0.3  # a faint voxel above it that touches nothing
    probs[3, first + 5, 16, 10] = 0.3  # one beside it between its ends: the ends alone grow
    assert np.nonzero((clean_vertebra_probs(probs, end_threshold=None) == 4).any(axis=(1, 2)))[0][[0, -1]].tolist() \
        == [first + 2, last - 1]
    out = clean_vertebra_probs(probs)
    np.testing.assert_array_equal(out, labels)  # C4 whole again, nothing else added or taken
    probs[3, first:first + 2][c4[first:first + 2]] = 0.03  # below END_THRESHOLD: not grown
    assert np.nonzero((clean_vertebra_probs(probs) == 4).any(axis=(1, 2)))[0][0] == first + 2
    stored = np.round(probs * 255).astype(np.uint8)  # the stored uint8 probabilities: the same result
    np.testing.assert_array_equal(clean_vertebra_probs(stored), clean_vertebra_probs(probs))


def test_end_growth_stops_at_its_limit_in_a_faint_haze():
    labels = stacked_blobs(thick=14, z=112)
    probs = one_hot(labels) * 0.9
    probs[3][probs[3] == 0] = 0.1  # a model's faint C4 haze over the whole study
    first, last = np.nonzero((labels == 4).any(axis=(1, 2)))[0][[0, -1]]
    reach = int(GROW_MAX_MM / 1.0)  # slices at 1 mm
    grown = clean_vertebra_probs(probs, dz=1.0)
    zs = np.nonzero((grown == 4).any(axis=(1, 2)))[0]
    assert zs[0] == max(first - reach, 0) and zs[-1] == min(last + reach, len(labels) - 1)
    np.testing.assert_array_equal(grown[labels > 0], labels[labels > 0])  # the others keep theirs
    unbounded = clean_vertebra_probs(probs)  # no dz: no limit
    assert np.nonzero((unbounded == 4).any(axis=(1, 2)))[0][[0, -1]].tolist() == [0, len(labels) - 1]


def test_clean_exact_labels_round_trip():
    labels = stacked_blobs()
    out, dropped = clean_vertebra_probs(one_hot(labels), return_dropped=True)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    np.testing.assert_array_equal(out, labels)
    assert dropped == {}


def test_clean_drops_spurious_blob_and_resolves_overlap():
    labels = stacked_blobs()
    probs = one_hot(labels) * 0.9
    # A spurious, smaller C3 blob far away from the real C3, with a higher probability.
    probs[2, 60:63, 0:3, 0:3] = 0.99
    # C4 leaks into C5's first slice with a lower probability than C5 there.
    z5 = np.nonzero(labels == 5)[0].min()
    probs[3, z5, 8:12, 8:12] = 0.7
    out = clean_vertebra_probs(probs, threshold=0.5)
    assert (out[60:63, 0:3, 0:3] == 0).all()
    assert (out[z5, 8:12, 8:12] == 5).all()
    np.testing.assert_array_equal(out, labels)


def test_clean_on_uint8_steps_matches_float():
    """Stage 1 stores probabilities as uint8 steps of 1/255: the 0.5 threshold falls between steps 127 and 128,
    so the same probabilities give the same labels stored either way (ties within one step aside)."""
    labels = stacked_blobs()
    rng = np.random.default_rng(3)
    probs = np.clip(one_hot(labels) * rng.uniform(0.45, 1.0, labels.shape) + rng.uniform(0, 0.55, (7, *labels.shape))
                    * (rng.random((7, *labels.shape)) < 0.02), 0, 1).astype(np.float32)
    probs[2, 60:63, 0:3, 0:3] = 0.99  # a spurious blob, dropped either way
    stored = np.rint(probs * 255).astype(np.uint8)
    np.testing.assert_array_equal(stored > 127, probs > 0.5)
    out_float, dropped_float = clean_vertebra_probs(probs, return_dropped=True)
    out_u8, dropped_u8 = clean_vertebra_probs(stored, return_dropped=True)
    top2 = np.sort(probs, axis=0)[-2:]
    near_tie = (top2[1] - top2[0]) * 255 < 1
    assert ((out_u8 != out_float) <= near_tie).all()
    assert dropped_u8 == dropped_float and (out_u8 > 0).sum() == (out_float > 0).sum()


def test_clean_overlap_goes_to_highest_probability():
    labels = stacked_blobs()
    probs = one_hot(labels) * 0.6
    z2 = np.nonzero(labels == 2)[0]
    region = (slice(z2.min(), z2.max() + 1), slice(8, 10), slice(8, 10))
    probs[0][region] = 0.95  # C1 claims a column through C2, joined to C1 by a bridge over the gap
    probs[0, z2.min() - 2: z2.min(), 8:10, 8:10] = 0.95
    out = clean_vertebra_probs(probs)
    assert (out[region] == 1).all()
    assert (out == 2).sum() == (labels == 2).sum() - (labels[region] == 2).sum()


def test_clean_enforces_head_to_feet_order():
    labels = stacked_blobs(z=80)  # C7 ends at slice 69: room below it
    # Move C2 (smaller) below C6: out of order, must go; all the others stay.
    moved = labels.copy()
    moved[moved == 2] = 0
    moved[74:77, 6:9, 5:8] = 2
    out, dropped = clean_vertebra_probs(one_hot(moved), return_dropped=True)
    assert set(dropped) == {"C2"} and "order" in dropped["C2"]
    assert (out == 2).sum() == 0
    for lab in (1, 3, 4, 5, 6, 7):
        assert (out == lab).sum() == (labels == lab).sum()
    # A misplaced C1 at the bottom drops only C1, not the six vertebrae after it.
    moved = labels.copy()
    moved[moved == 1] = 0
    moved[74:77, 6:9, 5:8] = 1
    out, dropped = clean_vertebra_probs(one_hot(moved), return_dropped=True)
    assert set(dropped) == {"C1"}
    assert sorted(np.unique(out)) == [0, 2, 3, 4, 5, 6, 7]


def test_clean_min_voxels_and_shape_check():
    labels = stacked_blobs()
    out, dropped = clean_vertebra_probs(one_hot(labels), min_voxels=10_000, return_dropped=True)
    assert out.max() == 0 and set(dropped) == set(VERTEBRAE)
    with pytest.raises(ValueError, match=r"\(7, Z, H, W\)"):
        clean_vertebra_probs(np.zeros((8, 2, 2, 2)))


def test_extents_on_hand_made_labels():
    labels = stacked_blobs()
    labels[labels == 6] = 0
    extents = vertebra_extents(labels, spacing=(1.0, 0.5, 0.5))
    assert list(extents) == ["C1", "C2", "C3", "C4", "C5", "C7"]
    assert missing_vertebrae(extents) == ["C6"]
    c3 = extents["C3"]  # i = 2: slices 22..29, rows 6:16, cols 5:17
    assert (c3.z_first, c3.z_last, c3.n_slices) == (22, 29, 8)
    assert (c3.y0, c3.y1, c3.x0, c3.x1) == (6, 16, 5, 17)
    assert c3.voxels == 8 * 10 * 12
    assert c3.slice_voxels.shape == (labels.shape[0],) and c3.slice_voxels[22] == 120 and c3.slice_voxels[21] == 0
    np.testing.assert_allclose(c3.coverage.sum(), 1.0)
    np.testing.assert_allclose(c3.centroid, (25.5, 10.5, 10.5))
    np.testing.assert_allclose(c3.volume_ml, 960 * 0.25 / 1000)
    assert np.array_equal(labels[c3.box()] == 3, np.ones((8, 10, 12), bool))
    table = extents_table(extents)
    assert list(table.index) == list(VERTEBRAE) and not table.loc["C6", "found"] and table.loc["C3", "voxels"] == 960


def test_extents_match_synthetic_truth_through_clean_up():
    synthetic = pytest.importorskip("kit.synthetic")
    study = synthetic.make_study(0, size=64)
    truth = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    out = clean_vertebra_probs(one_hot(truth))
    extents = vertebra_extents(out)
    assert list(extents) == list(VERTEBRAE)
    for name, e in extents.items():
        zs, ys, xs = np.nonzero(truth == e.label)
        assert (e.z_first, e.z_last) == (zs.min(), zs.max())
        assert (e.y0, e.y1, e.x0, e.x1) == (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
        assert e.voxels == len(zs)
    centroids = [e.centroid[0] for e in extents.values()]
    assert centroids == sorted(centroids)  # synthetic anatomy is head to feet


# --- stage-2 stacks on the original grid --------------------------------------------------------------------
# A 40-slice study: labels on a 32 px prepared grid, the "original" HU volume at 96 px (scale 3).
SCALE = 3


def small_study(z: int = 40, size: int = 32) -> np.ndarray:
    """uint8 (Z, size, size) prepared-grid labels: C1..C7 as boxes, C(i+1) on slices 5i..5i+3."""
    labels = np.zeros((z, size, size), dtype=np.uint8)
    for i in range(7):
        labels[5 * i:5 * i + 4, 10 + i % 2:20, 8:22 - i % 3] = i + 1
    return labels


def upsample(labels: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Nearest-neighbour (edge-aligned) in-plane upsampling: the labels on the original grid."""
    return labels.repeat(scale, axis=1).repeat(scale, axis=2)


def slice_code_hu(z: int = 40, size: int = 96) -> np.ndarray:
    """int16 HU volume whose bone window encodes the slice index: window(hu[z]) = round(z * 6.375)."""
    low = WINDOWS["bone"][0] - WINDOWS["bone"][1] / 2  # -500 HU -> 0
    return (low + 45 * np.arange(z, dtype=np.int16))[:, None, None].repeat(size, 1).repeat(size, 2).astype(np.int16)


def decode_slices(channels: np.ndarray) -> np.ndarray:
    """Slice index from `slice_code_hu` windowed channels (..., S, S) -> (...) ints (uniform planes)."""
    assert (channels == channels[..., :1, :1]).all()
    return np.rint(channels[..., 0, 0] / (45 * 255 / 1800)).astype(int)


def test_slice_positions_spread_head_to_feet():
    e = vertebra_extents(small_study())
    c3 = e["C3"]  # slices 10..13
    pos = slice_positions(c3, 15)
    assert pos.shape == (15,) and pos[0] == 10 and pos[-1] == 13
    assert (np.diff(pos) >= 0).all() and set(pos) == {10, 11, 12, 13}
    assert np.abs(pos - np.linspace(10, 13, 15)).max() <= 0.5  # evenly spread: nearest slice to each
    assert np.bincount(pos)[10:].min() >= 3  # 15 samples over 4 slices: every slice 3-5 times
    long = vertebra_extents(np.pad(np.ones((9, 2, 2), np.uint8), ((3, 0), (0, 0), (0, 0))))["C1"]  # 3..11
    np.testing.assert_array_equal(slice_positions(long, 5), [3, 5, 7, 9, 11])
    np.testing.assert_array_equal(slice_positions(long, 1), [7])


def test_neighbour_offsets_in_mm():
    np.testing.assert_array_equal(neighbour_offsets(0.5, 2, 1.0), [-4, -2, 0, 2, 4])
    np.testing.assert_array_equal(neighbour_offsets(1.0, 2, 1.0), [-2, -1, 0, 1, 2])
    np.testing.assert_array_equal(neighbour_offsets(0.5, 2, 0.5), [-2, -1, 0, 1, 2])
    np.testing.assert_array_equal(neighbour_offsets(1.0, 2, 0.5), [-1, -1, 0, 1, 1])  # never below one slice
    np.testing.assert_array_equal(neighbour_offsets(0.5, 1), [-1, 0, 1])  # None: adjacent slices
    np.testing.assert_array_equal(neighbour_offsets(0.7, 0, 3.0), [0])
    with pytest.raises(ValueError, match="dz"):
        neighbour_offsets(0.0, 2, 1.0)


def test_neighbour_offsets_follow_the_stage1_recipe():
    from kit.stage1.recipe import SegRecipe
    for dz in (0.3, 0.5, 0.625, 0.8, 1.0, 1.25):
        for mm in (0.5, 1.0, 2.0, 2.5):
            stage1 = SegRecipe(tuple(mm * k for k in (-2, -1, 0, 1, 2)), 32).offsets(dz)
            np.testing.assert_array_equal(neighbour_offsets(dz, 2, mm), stage1)


def test_crop_box_original_matches_the_extent():
    labels = small_study()
    e = vertebra_extents(labels)["C2"]  # rows 11:20, cols 8:21
    assert crop_box_original(e, (3.0, 3.0), (96, 96), margin=0, square=False) == (33, 60, 24, 63)
    # A non-integer scale (100 / 32 px): every edge within a pixel of box * scale, outward (floor / ceil).
    sy, sx = grid_scale((100, 100), labels.shape[1:])
    y0, y1, x0, x1 = crop_box_original(e, (sy, sx), (100, 100), margin=0, square=False)
    for got, want in ((y0, e.y0 * sy), (y1, e.y1 * sy), (x0, e.x0 * sx), (x1, e.x1 * sx)):
        assert abs(got - want) < 1
    assert y0 <= e.y0 * sy and y1 >= e.y1 * sy and x0 <= e.x0 * sx and x1 >= e.x1 * sx
    # Square with a margin: one side for both axes, 1 + 2 x margin times the longer side, same centre.
    y0, y1, x0, x1 = crop_box_original(e, (3.0, 3.0), (96, 96), margin=0.15)
    assert y1 - y0 == x1 - x0 == int(np.ceil(39 * 1.3))
    assert abs((y0 + y1) / 2 - (e.y0 + e.y1) / 2 * 3) <= 0.5 and abs((x0 + x1) / 2 - (e.x0 + e.x1) / 2 * 3) <= 0.5
    # Near the edge the box stays square and leaves the image (padded when cropping).
    corner = vertebra_extents(np.pad(np.ones((2, 4, 8), np.uint8), ((0, 0), (0, 28), (0, 24))))["C1"]
    y0, y1, x0, x1 = crop_box_original(corner, (3.0, 3.0), (96, 96), margin=0.25)
    assert y0 < 0 and x0 < 0 and y1 - y0 == x1 - x0 == 36


def test_stack_mask_channel_covers_the_vertebra():
    labels = junction_study()  # C3 on slices 10..14, sharing slice 14 with C4
    extents = vertebra_extents(labels)
    inside = upsample(labels) > 0  # original grid: bone where any vertebra is, air elsewhere
    hu = np.where(inside, 1000, -1000).astype(np.int16)
    e = extents["C3"]
    y0, y1, x0, x1 = crop_box_original(e, (3, 3), (96, 96))
    side = y1 - y0
    out = stack(hu, labels, e, scale=(3, 3), n_slices=5, size=side)
    assert out.shape == (5, 6, side, side) and out.dtype == np.uint8
    assert stack_channel_names(("bone",), 2) == ["bone-2", "bone-1", "bone+0", "bone+1", "bone+2", "mask"]
    for t, z in enumerate(slice_positions(e, 5)):  # no resize: pixel for pixel
        want = (upsample(labels)[z, y0:y1, x0:x1] == e.label)
        np.testing.assert_array_equal(out[t, -1], want.astype(np.uint8) * 255)
        assert ((out[t, -1] > 0) <= (out[t, 2] > 128)).all()  # the mask lies on the bone it marks
    # On the junction slice the box shows C4's bone too, which the mask leaves out.
    assert (out[4, 2] > 128).sum() > (out[4, -1] > 0).sum() > 0
    np.testing.assert_array_equal(out[:3, -1] > 0, out[:3, 2] > 128)  # elsewhere only C3 is in the box
    # Resized to 64 px: the mask still covers the vertebra's share of the box, centred where it is.
    small = stack(hu, labels, e, scale=(3, 3), n_slices=5, size=64)
    share = (upsample(labels)[e.z_first, y0:y1, x0:x1] == e.label).mean()
    assert abs((small[0, -1] > 0).mean() - share) < 0.03
    rows, cols = np.nonzero(small[0, -1])
    centre = ((e.y0 + e.y1) / 2 * 3 - y0) * 64 / side - 0.5
    assert abs(rows.mean() - centre) < 1.0
    assert set(np.unique(small[:, -1])) == {0, 255}


def test_stack_slices_head_to_feet_and_neighbours_clamp():
    labels = small_study()
    extents = vertebra_extents(labels)
    hu = slice_code_hu()
    kw = dict(scale=(3, 3), n_slices=5, size=16, with_mask=False)
    c3 = stack(hu, labels, extents["C3"], **kw)
    np.testing.assert_array_equal(decode_slices(c3[:, 2]), slice_positions(extents["C3"], 5))
    assert (np.diff(decode_slices(c3[:, 2])) >= 0).all()
    np.testing.assert_array_equal(decode_slices(c3[0]), [8, 9, 10, 11, 12])  # slice 10 and its neighbours
    # C1 starts at slice 0, C7 ends at 33; neighbours 4 mm apart at dz = 1 mm reach -8 / 41: edge slices repeat.
    c1 = stack(hu, labels, extents["C1"], neighbour_mm=4.0, dz=1.0, **kw)
    np.testing.assert_array_equal(decode_slices(c1[0]), [0, 0, 0, 4, 8])
    c7 = stack(hu, labels, extents["C7"], neighbour_mm=4.0, dz=1.0, **kw)
    np.testing.assert_array_equal(decode_slices(c7[-1]), [25, 29, 33, 37, 39])
    # Half-millimetre slices, neighbours 1 mm apart: every other slice.
    half = stack(hu, labels, extents["C3"], neighbour_mm=1.0, dz=0.5, **kw)
    np.testing.assert_array_equal(decode_slices(half[0]), [6, 8, 10, 12, 14])


def test_stack_window_channel_order_and_padding():
    labels = small_study()
    e = vertebra_extents(labels)["C5"]
    rng = np.random.default_rng(0)
    hu = rng.integers(-1100, 1600, size=(40, 96, 96)).astype(np.float32)
    y0, y1, x0, x1 = crop_box_original(e, (3, 3), (96, 96), margin=0.1)
    out = stack(hu, labels, e, scale=(3, 3), n_slices=3, n_neighbours=1, windows=("bone", "soft"), margin=0.1,
                size=y1 - y0)
    assert out.shape[1] == 7
    assert stack_channel_names(("bone", "soft"), 1) == ["bone-1", "bone+0", "bone+1", "soft-1", "soft+0",
                                                       "soft+1", "mask"]
    for t, z in enumerate(slice_positions(e, 3)):
        for c, (name, dzi) in enumerate([(w, k) for w in ("bone", "soft") for k in (-1, 0, 1)]):
            np.testing.assert_array_equal(out[t, c], window(hu[z + dzi, y0:y1, x0:x1], *WINDOWS[name]))
    # Past the image edge: air, i.e. 0 in the bone window, and no mask.
    corner = vertebra_extents(np.pad(np.ones((2, 4, 8), np.uint8), ((0, 38), (0, 28), (0, 24))))["C1"]
    edge = stack(np.full((40, 96, 96), 700, np.int16), np.pad(np.ones((2, 4, 8), np.uint8),
                 ((0, 38), (0, 28), (0, 24))), corner, n_slices=2, margin=0.25, size=36)
    assert edge[0, 2, 0, 0] == 0 and edge[0, 2, -1, -1] == window(np.array([700.0]), *WINDOWS["bone"])[0]
    assert edge[0, -1, 0, 0] == 0 and edge[0, -1, 20, 20] == 255  # scale derived from the shapes: (3, 3)
    with pytest.raises(ValueError, match="available"):
        stack(hu, labels, e, windows=("lung",))


def test_crop_study_missing_vertebra_is_zeros_with_reason():
    labels = small_study()
    extents = vertebra_extents(labels)
    del extents["C4"], extents["C6"]
    hu = slice_code_hu()
    from kit.stage2.recipe import ClsRecipe

    recipe = ClsRecipe(**{k: v for k, v in GEOMETRY.items() if k != "dz"} | {"n_slices": 3, "size": 12})
    stacks, found, reasons = recipe.crop_study(hu, labels, extents, dz=1.0,
                                               dropped={"C6": "centroid z=3.0 out of head-to-feet order"})
    assert stacks.shape == (7, 3, 6, 12, 12) and stacks.dtype == np.uint8
    np.testing.assert_array_equal(found, [True, True, True, False, True, False, True])
    assert reasons == {"C4": "not found by the segmenter",
                       "C6": "dropped by the clean-up: centroid z=3.0 out of head-to-feet order"}
    assert stacks[3].max() == 0 and stacks[5].max() == 0
    np.testing.assert_array_equal(stacks[2], stack(hu, labels, extents["C3"], n_slices=3, size=12))
    assert (stacks[found][:, :, -1] > 0).any(axis=(2, 3)).all()  # every found stack shows its mask


def junction_study() -> np.ndarray:
    """small_study with C3 and C4 sharing slice 14: C3 in rows 10:15 (anterior), C4 in rows 15:20."""
    labels = small_study()
    labels[14, 10:15, 8:22] = 3
    labels[14, 15:20, 8:22] = 4
    return labels


def boxes_frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])


def test_match_boxes_to_slices_reports_unmatched_rows():
    instance_numbers = np.arange(140, 100, -1)  # stored feet to head: z = 0 is InstanceNumber 140
    instance_numbers[30] = instance_numbers[31]  # two slices share InstanceNumber 109
    boxes = boxes_frame([
        ("1.2.3", 30.0, 33.0, 20.0, 10.0, 129),  # z = 11
        ("1.2.3", 30.0, 33.0, 20.0, 10.0, 99),  # no such slice
        ("1.2.3", 30.0, 33.0, 20.0, 10.0, 109),  # ambiguous
        ("1.2.3", 30.0, 33.0, 20.0, 10.0, 128),  # z = 12
    ])
    matched, unmatched = match_boxes_to_slices(boxes, instance_numbers)
    assert list(matched.index) == [0, 3] and list(matched["z"]) == [11, 12]
    assert list(unmatched.index) == [1, 2] and len(matched) + len(unmatched) == len(boxes)
    assert "99 not among" in unmatched.loc[1, "reason"] and "2 slices" in unmatched.loc[2, "reason"]
    with pytest.raises(ValueError, match="one study"):
        match_boxes_to_slices(pd.concat([boxes, boxes.assign(StudyInstanceUID="1.2.4")]), instance_numbers)
    with pytest.raises(ValueError, match="slice_number"):
        match_boxes_to_slices(boxes.drop(columns="slice_number"), instance_numbers)


def test_slice_targets_from_boxes_on_a_hand_made_study():
    labels = junction_study()
    extents = vertebra_extents(labels)
    assert (extents["C3"].z_first, extents["C3"].z_last) == (10, 14) and extents["C4"].z_first == 14
    instance_numbers = np.arange(1, 41)  # z = InstanceNumber - 1
    # Original pixels (scale 3): C3 on slice 14 is rows 30:45, C4 rows 45:60.
    boxes = boxes_frame([
        ("1.2.3", 30.0, 33.0, 30.0, 9.0, 12),  # z = 11, on C3
        ("1.2.3", 30.0, 33.0, 30.0, 9.0, 13),  # z = 12, on C3
        ("1.2.3", 30.0, 48.0, 30.0, 9.0, 15),  # z = 14, the junction slice, on C4's part
        ("1.2.3", 30.0, 48.0, 30.0, 9.0, 17),  # z = 16, on C4
        ("1.2.3", 0.0, 0.0, 9.0, 9.0, 13),  # z = 12, corner: on no vertebra
        ("1.2.3", 30.0, 33.0, 30.0, 9.0, 77),  # unmatched
    ])
    matched, unmatched = match_boxes_to_slices(boxes, instance_numbers)
    assert list(unmatched.index) == [5]
    assigned = assign_boxes_to_vertebrae(matched, labels, (3, 3))
    assert list(assigned["vertebra"]) == [3, 3, 4, 4, 0]
    pos3 = slice_positions(extents["C3"], 5)  # 10..14
    np.testing.assert_array_equal(slice_targets(pos3, 3, labels, (3, 3), matched, 1.0), [0, 1, 1, 0, 0])
    # The same slices ranked by z alone would make slice 14 positive for C3; its box lies on C4.
    pos4 = slice_positions(extents["C4"], 5)  # 14..18
    np.testing.assert_array_equal(slice_targets(pos4, 4, labels, (3, 3), matched, 1.0), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(slice_targets(pos3, 3, labels, (3, 3), matched, 0.5, tolerance_mm=0.5),
                                  [1, 1, 1, 1, 0])
    # half a slice of tolerance widens by one slice (the kit's one mm -> slices rule; Python's round() gave 0)
    np.testing.assert_array_equal(slice_targets(pos3, 3, labels, (3, 3), matched, 1.0, tolerance_mm=0.5),
                                  [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(slice_targets(pos3, 5, labels, (3, 3), matched, 1.0), np.zeros(5))
    targets = vertebra_targets(extents, labels, (3, 3), matched, 1.0, n_slices=5)
    assert targets.shape == (7, 5) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets[2], [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(targets[3], [1, 1, 1, 0, 0])
    assert targets[[0, 1, 4, 5, 6]].sum() == 0


def test_the_recipe_cuts_what_the_crop_functions_cut_with_the_configs_values():
    """`ClsConfig.recipe()`: every value from the config's data section, equal configs give equal (hashable) recipes,
    its channel layout is the model's input width, and its crops are `crop_vertebra_stack` called with those values;
    an unknown window is refused when the recipe is made."""
    from kit.config import load_config

    cfg = load_config("demo_cls", **{"data.image_size": 32, "data.n_slices": 4, "data.neighbour_mm": 4.0})
    recipe = cfg.recipe()
    d = cfg.data
    assert (recipe.n_slices, recipe.n_neighbours, recipe.neighbour_mm, recipe.size, recipe.windows, recipe.margin,
            recipe.with_mask) == (4, d.n_neighbours, 4.0, 32, tuple(d.windows), d.margin, d.with_mask)
    assert recipe == load_config("demo_cls", **{"data.image_size": 32, "data.n_slices": 4,
                                                "data.neighbour_mm": 4.0}).recipe()
    assert len({recipe, cfg.recipe()}) == 1 and recipe != load_config("demo_cls").recipe()
    assert recipe.n_channels == len(recipe.channel_names) == cfg.in_channels == cfg.model_spec()[1]["in_channels"]
    labels = small_study()
    extents = vertebra_extents(labels)
    hu = slice_code_hu()
    stacks, found, _ = recipe.crop_study(hu, labels, extents, dz=1.0)
    for i, name in enumerate(VERTEBRAE):
        direct = crop_vertebra_stack(hu, labels, extents[name], n_slices=4, n_neighbours=d.n_neighbours,
                                     neighbour_mm=4.0, dz=1.0, size=32, windows=tuple(d.windows), margin=d.margin,
                                     with_mask=d.with_mask)
        np.testing.assert_array_equal(stacks[i], direct)
    with pytest.raises(ValueError, match="available"):
        type(recipe)(**{**recipe.__dict__, "windows": ("lung",)})
    np.testing.assert_array_equal(stacks[2], recipe.crop_vertebra(hu, labels, extents["C3"], dz=1.0))
    assert stacks.shape == (7, 4, recipe.n_channels, 32, 32) and found.all()
