"""kit.crops: clean-up of vertebra probabilities, extents and crops, on hand-made and synthetic volumes."""

from __future__ import annotations

import numpy as np
import pytest

from kit.constants import VERTEBRAE
from kit.crops import (
    clean_vertebra_probs,
    crop_vertebra,
    crop_vertebrae,
    extents_table,
    largest_component,
    missing_vertebrae,
    vertebra_extents,
)


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


def test_crop_exact_box_and_resampled_shape():
    rng = np.random.default_rng(0)
    labels = stacked_blobs()
    volume = rng.integers(0, 256, size=labels.shape, dtype=np.uint8)
    e = vertebra_extents(labels)["C4"]
    exact = crop_vertebra(volume, e, margin=0.0, square=False, out_size=(e.n_slices, e.y1 - e.y0, e.x1 - e.x0))
    np.testing.assert_array_equal(exact, volume[e.box()])
    out = crop_vertebra(volume, e, out_size=(16, 32, 32))
    assert out.shape == (16, 32, 32) and out.dtype == np.uint8
    # Nearest-neighbour crop of the labels: the vertebra sits in the middle, with margin around it.
    lab = crop_vertebra(labels, e, margin=0.25, out_size=(16, 32, 32), order=0)
    assert lab[8, 16, 16] == 4 and lab[:, 0, 0].max() == 0 and set(np.unique(lab)) <= {0, 3, 4, 5}
    # A box at the volume's edge pads with zeros instead of failing.
    edge = vertebra_extents(np.pad(np.ones((3, 4, 4), np.uint8), ((0, 5), (0, 6), (0, 6))))["C1"]
    out = crop_vertebra(np.full((8, 10, 10), 200, np.uint8), edge, margin=0.5, out_size=(4, 8, 8), order=0)
    assert out[0, 0, 0] == 0 and out[2, 4, 4] == 200
    stacks = crop_vertebrae(volume, vertebra_extents(labels), out_size=(8, 16, 16))
    assert list(stacks) == list(VERTEBRAE) and all(s.shape == (8, 16, 16) for s in stacks.values())
