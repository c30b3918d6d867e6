"""kit.stage1.recipe: the one input recipe (offsets in mm, stacking, scale, level planes, the level model's steps)."""

from __future__ import annotations

import numpy as np
import pytest

from kit.stage1.recipe import (LevelRecipe, SegRecipe, dilate_presence, jitter_presence, mm_to_slices, offsets_to_slices,
                        ramp_weights,
                        smooth_presence, stack_slices, true_presence, vertebra_ranges)


def test_one_rule_from_mm_to_slices():
    """Nearest, halves away from zero; `within`: the most slices inside the distance, despite float error."""
    assert [mm_to_slices(mm, 1.0) for mm in (0.4, 0.5, 1.5, 2.5, -2.5, 0.0)] == [0, 1, 2, 3, -3, 0]
    assert mm_to_slices(4.0, 0.7) == 6 and mm_to_slices(4.0, 0.7, within=True) == 5
    assert mm_to_slices(4.0, 4 / 3, within=True) == 3 and mm_to_slices(-4.0, 0.7, within=True) == -5
    for dz in (0.0, -1.0, None):
        with pytest.raises(ValueError, match="dz must be > 0"):
            mm_to_slices(1.0, dz)


def test_offsets_in_mm_become_whole_slices():
    assert offsets_to_slices([-2, -1, 0, 1, 2], 1.0).tolist() == [-2, -1, 0, 1, 2]
    assert offsets_to_slices([-2, -1, 0, 1, 2], 0.5).tolist() == [-4, -2, 0, 2, 4]
    assert offsets_to_slices([-20, -1, 0, 1.2, 20], 0.625).tolist() == [-32, -2, 0, 2, 32]
    assert offsets_to_slices([-1, 0, 1], 3.0).tolist() == [-1, 0, 1]  # never collapse onto the centre
    assert offsets_to_slices([-10, 0, 10], 0.8).tolist() == [-13, 0, 13]  # 12.5 rounds half up, both ways
    with pytest.raises(ValueError, match="dz must be > 0"):
        offsets_to_slices([0], 0.0)


def test_stack_clamps_at_the_edges_and_scales():
    vol = (np.arange(5)[:, None, None] * np.ones((5, 2, 3))).astype(np.uint8)
    stack = stack_slices(vol, np.array([0, 4]), np.array([-2, 0, 1]))
    assert stack.shape == (2, 3, 2, 3) and stack[:, :, 0, 0].tolist() == [[0, 0, 1], [2, 4, 4]]
    r = SegRecipe((-1.0, 0.0, 1.0), 2)
    x = r.inputs(vol.repeat(1, 1)[:, :2, :2], [0, 1], dz=1.0)
    assert x.dtype == np.float32 and x.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(x[1, :, 0, 0], np.array([0, 1, 2], np.float32) / np.float32(255))
    batches = list(r.batches(vol[:, :2, :2], 1.0, None, batch_size=2))
    assert [c.tolist() for c, _ in batches] == [[0, 1], [2, 3], [4]]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), r.inputs(vol[:, :2, :2], range(5), 1.0))


def test_ramp_is_centred_on_the_range_ends_for_odd_and_even_widths():
    presence = np.zeros((7, 20), np.float32)
    presence[0, 5:15] = 1  # C1 on slices 5..14: its ends are the cell edges 4.5 and 14.5
    for width in (2.0, 3.0, 2.5, 4.0):
        out = smooth_presence(presence, width)[0]
        z = np.arange(20)
        expected = np.clip((z - 4.5) / width + 0.5, 0, 1) * np.clip((14.5 - z) / width + 0.5, 0, 1)
        np.testing.assert_allclose(out, expected, atol=1e-6, err_msg=f"width {width}")
    # at dz = 1 mm and a 2.5 mm ramp: symmetric about each end (the old even box gave 0.3 / 0.7 against 0 / 0.5)
    r = smooth_presence(presence, 2.0)[0]
    np.testing.assert_allclose(r[[3, 4, 5, 6]], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(r[[13, 14, 15, 16]], [1.0, 0.75, 0.25, 0.0])
    assert ramp_weights(1.0).tolist() == [1.0] and ramp_weights(2.5).sum() == pytest.approx(1.0)


def test_margin_and_jitter_of_the_presence():
    labels = np.zeros((40, 8, 8), np.uint8)
    labels[5:15, 2:4, 2:4] = 1
    labels[12:30, 4:6, 4:6] = 2
    presence = true_presence(labels)
    assert presence.shape == (7, 40) and vertebra_ranges(presence)[:2].tolist() == [[5, 14], [12, 29]]
    assert vertebra_ranges(dilate_presence(presence, 3))[0].tolist() == [2, 17]
    rng = np.random.default_rng(0)
    firsts = {int(vertebra_ranges(jitter_presence(presence, 1.0, 2.0, rng))[0, 0]) for _ in range(200)}
    assert firsts == {3, 4, 5, 6, 7}  # +-2 mm at 1 mm slices
    assert (vertebra_ranges(jitter_presence(presence, 1.0, 2.0, rng))[2:] == -1).all()


def test_planes_are_the_same_from_true_ranges_and_from_a_perfect_level_model():
    labels = np.zeros((30, 4, 4), np.uint8)
    labels[6:12] = 3
    r = SegRecipe((0.0,), 4, level_input=True, level_margin_mm=2.5, level_ramp_mm=2.5)
    truth = true_presence(labels)
    planes = r.planes(truth, 1.0)
    # margin: round(2.5) = 3 slices, then a 2.5-slice ramp centred on the widened ends (cell edges 2.5, 14.5)
    z = np.arange(30)
    expected = np.clip((z - 2.5) / 2.5 + 0.5, 0, 1) * np.clip((14.5 - z) / 2.5 + 0.5, 0, 1)
    np.testing.assert_allclose(planes[2], expected, atol=1e-6)
    np.testing.assert_array_equal(planes[[0, 1, 3, 4, 5, 6]], 0)
    # training draws: jittered ends and a 0.8-1 scale, never above the prior
    jittered = r.planes(truth, 1.0, np.random.default_rng(1))
    assert jittered.shape == (7, 30) and jittered.max() <= 1.0 and not np.array_equal(jittered, planes)
    with pytest.raises(ValueError, match=r"presence must be \(7, Z\)"):
        r.planes(truth[:3], 1.0)
    with pytest.raises(ValueError, match="give the level planes"):
        r.inputs(labels, [0], 1.0)


def test_level_recipe_grid_and_inputs():
    r = LevelRecipe(2.5, 1, 2, tta_flip=False)
    assert r.grid(10, 1.0).tolist() == [0, 2, 5, 8]  # 0, 2.5, 5, 7.5 mm -> nearest slices
    assert r.grid(7, 3.0).tolist() == list(range(7))  # never finer than the study
    vol = (np.arange(10)[:, None, None] * np.ones((10, 2, 2))).astype(np.uint8)
    x = r.inputs(vol, np.array([0, 2, 5, 8]))
    assert x.shape == (4, 3, 2, 2) and x.dtype == np.float32
    assert np.rint(x[:, :, 0, 0] * 255).tolist() == [[0, 0, 2], [0, 2, 5], [2, 5, 8], [5, 8, 8]]
