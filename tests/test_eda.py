"""kit.evaluate.eda helpers that notebooks 00 and 02 draw with (and kit.stage2.store.missing_table behind 02's list)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kit.evaluate import eda  # noqa: E402
from kit.stage2.crops import stack_channel_names
from kit.stage2.store import missing_table  # noqa: E402


def boxes(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["slice_index", "x", "y", "width", "height"])


def test_fracture_spans_group_neighbouring_slices():
    table = boxes([(12, 5, 6, 4, 3), (10, 4, 5, 4, 4), (11, 6, 4, 2, 2),  # one fracture, rows out of order
                   (14, 5, 5, 1, 1),                                      # a one-slice gap: still the same one
                   (30, 20, 21, 3, 2), (31, 19, 22, 5, 2)])               # a second fracture further down
    spans = eda.fracture_spans(table)
    assert spans[["slice_first", "slice_last", "rows"]].values.tolist() == [[10, 14, 4], [30, 31, 2]]
    assert spans.loc[0, ["y0", "y1", "x0", "x1"]].tolist() == [4, 9, 4, 9]  # union of the four boxes
    assert spans.loc[1, ["y0", "y1", "x0", "x1"]].tolist() == [21, 24, 19, 24]
    assert len(eda.fracture_spans(table, max_gap=0)) == 3  # without the gap allowance slice 14 stands alone
    assert eda.fracture_spans(boxes([])).empty


def test_plot_fracture_boxes_one_panel_per_fracture_named_by_its_vertebra():
    hu = np.zeros((60, 32, 32), np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[5:25, 8:20, 8:20], labels[30:50, 8:20, 8:20] = 2, 3  # C2 above C3
    table = boxes([(10, 9, 9, 5, 5), (11, 9, 9, 5, 5), (40, 10, 10, 4, 4)])
    fig = eda.plot_fracture_boxes(hu, (1.0, 1.0, 1.0), table, labels=labels)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 2 and titles[0].startswith("C2: slices 10-11") and titles[1].startswith("C3: slices 40-40")
    plt.close(fig)
    fig = eda.plot_fracture_boxes(hu, (1.0, 1.0, 1.0), boxes([]))
    assert fig.axes[0].get_title() == "no fracture boxes in this study"
    plt.close(fig)


def test_plot_fracture_mix_counts_kinds_and_subtlety():
    fractures = pd.DataFrame({"kind": ["cleft", "cleft", "hairline"], "subtlety": ["moderate", "moderate", "subtle"],
                              "vertebra": ["C2", "C5", "C5"]})
    fig = eda.plot_fracture_mix(fractures, pd.DataFrame({"kind": ["osteophyte"]}))
    kinds = fig.axes[0]
    heights = sorted(p.get_height() for p in kinds.patches if p.get_height() > 0)
    assert heights == [1, 2] and "(3)" in kinds.get_title() and "(1)" in fig.axes[2].get_title()
    plt.close(fig)


def test_plot_crop_gallery_shows_image_and_mask_of_each_vertebra():
    names = stack_channel_names(("bone",), 1, True)  # bone-1, bone+0, bone+1, mask
    stacks = np.zeros((7, 3, len(names), 8, 8), np.uint8)
    stacks[:, :, 1] = 100
    stacks[:, :, 3, 2:6, 2:6] = 255
    found = np.array([True] * 6 + [False])
    targets = np.zeros((7, 3), np.float32)
    targets[3, 2] = 1  # a fracture on C4's last sampled slice
    fig = eda.plot_crop_gallery({"crops": stacks, "found": found, "slice_targets": targets}, names)
    assert len(fig.axes) == 14
    assert fig.axes[3].get_title() == "C4: slice 3/3 · fracture" and fig.axes[6].get_title() == "C7: not found"
    assert fig.axes[0].images[0].get_array().max() == 100 and fig.axes[7].images[0].get_array().max() == 255
    plt.close(fig)


def test_missing_table_one_row_per_vertebra_with_its_reason():
    manifest = pd.DataFrame({"StudyInstanceUID": ["a", "b"], "mask_source": ["truth", "ensemble"],
                             "missing": [np.nan, "C1: not found by the segmenter; C7: dropped by the clean-up: "
                                                 "12 voxels < min_voxels=50"]})
    table = missing_table(manifest)
    assert table.values.tolist() == [
        ["b", "C1", "not found by the segmenter", "ensemble"],
        ["b", "C7", "dropped by the clean-up: 12 voxels < min_voxels=50", "ensemble"]]
    assert missing_table(manifest.iloc[:1]).empty
