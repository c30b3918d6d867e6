"""Per-slice fracture targets from `train_bounding_boxes.csv`.

`match_boxes_to_slices` (box rows -> slice indices, unmatched rows returned), `assign_boxes_to_vertebrae`,
`slice_targets` (a vertebra's sampled slices that a box covers) and `vertebra_targets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import N_VERTEBRAE, VERTEBRAE
from ..stage1.postprocess import VertebraExtent
from ..stage1.recipe import mm_to_slices
from .crops import slice_positions

BOX_COLUMNS = ("x", "y", "width", "height", "slice_number")


def file_numbers(files: Sequence, instance_numbers: np.ndarray) -> np.ndarray:
    """(Z,) int64 the number in each slice's file name (`123.dcm` -> 123): what `train_bounding_boxes.csv`'s
    `slice_number` refers to. A file whose name is not a number gets its InstanceNumber instead.

    Args:
        files: the slices' files in volume order (`kit.io.dicom.Series.files`).
        instance_numbers: (Z,) the same slices' InstanceNumbers.
    """
    numbers = np.asarray(instance_numbers, dtype=np.int64).copy()
    for i, f in enumerate(files):
        stem = Path(f).name.split(".")[0]
        if stem.isdigit():
            numbers[i] = int(stem)
    return numbers


def match_boxes_to_slices(boxes: pd.DataFrame, instance_numbers: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Match one study's `train_bounding_boxes.csv` rows to the slices of its sorted series.

    A row matches slice z when its `slice_number` equals `instance_numbers[z]` (the DICOM file name
    number is the InstanceNumber). A row is unmatched when its slice_number is missing, is not among the
    series' InstanceNumbers, or is shared by several slices (ambiguous); every such row is returned with
    the reason, none is dropped.

    Args:
        boxes: rows with columns x, y, width, height, slice_number (original pixels; StudyInstanceUID
            optional, but a single study).
        instance_numbers: (Z,) InstanceNumber of each slice, index 0 = most superior (`Series`, cache).

    Returns:
        matched: the matched rows (original index kept) with an int column `z` (index into the series);
        unmatched: the other rows with a column `reason`.
    """
    missing = [c for c in BOX_COLUMNS if c not in boxes.columns]
    if missing:
        raise ValueError(f"boxes lack column(s) {missing}; expected {list(BOX_COLUMNS)} (train_bounding_boxes.csv)")
    if "StudyInstanceUID" in boxes.columns and boxes["StudyInstanceUID"].nunique() > 1:
        uids = sorted(boxes["StudyInstanceUID"].unique())
        raise ValueError(f"boxes of {len(uids)} studies ({uids[0]}, {uids[1]}, ...); pass one study's rows")
    numbers = np.asarray(instance_numbers).astype(np.int64).ravel()
    values, counts = np.unique(numbers, return_counts=True)
    z_of = {int(n): int(np.nonzero(numbers == n)[0][0]) for n, c in zip(values, counts) if c == 1}
    shared = {int(n): int(c) for n, c in zip(values, counts) if c > 1}
    span = f"{numbers.min()}..{numbers.max()}" if len(numbers) else "none"
    z = np.full(len(boxes), -1, np.int64)
    reason = [""] * len(boxes)
    for i, value in enumerate(boxes["slice_number"].to_numpy()):
        if pd.isna(value) or float(value) != int(value):
            reason[i] = f"slice_number {value} is missing or not a whole number"
        elif int(value) in shared:
            reason[i] = f"slice_number {int(value)} is the InstanceNumber of {shared[int(value)]} slices"
        elif int(value) not in z_of:
            reason[i] = f"slice_number {int(value)} not among the series' {len(numbers)} InstanceNumbers ({span})"
        else:
            z[i] = z_of[int(value)]
    ok = z >= 0
    matched = boxes[ok].copy()
    matched["z"] = z[ok]
    unmatched = boxes[~ok].copy()
    unmatched["reason"] = [r for r, good in zip(reason, ok) if not good]
    return matched, unmatched


def _box_index_range(start: float, length: float, scale: float, n: int) -> tuple[int, int]:
    """Prepared pixels [a, b) touched by the original interval [start, start + length), clipped to [0, n)."""
    a = int(np.floor(start / scale))
    b = int(np.ceil((start + length) / scale))
    return max(a, 0), min(max(b, a + 1), n)


def assign_boxes_to_vertebrae(matched: pd.DataFrame, labels_small: np.ndarray,
                              scale: tuple[float, float]) -> pd.DataFrame:
    """Which vertebra each matched box lies on, from the prepared-grid mask of its own slice.

    The rule: the box [x, x + width) x [y, y + height) in original pixels covers the prepared pixels it
    touches (divided by `scale`, floor / ceil); in slice `z` of `labels_small` the box lies on the
    vertebra (1..7) with the most pixels there (ties to the lower label), or on none (0) when it covers no
    C1..C7 pixel. Each box row so belongs to one vertebra at most: a box at a junction slice that grazes
    the neighbouring vertebra still counts for the one it mostly covers.

    Args:
        matched: `match_boxes_to_slices` output (columns x, y, width, height, z).
        labels_small: (Z, s, s) integer labels on the prepared grid.
        scale: (sy, sx) original pixels per prepared pixel.

    Returns:
        A copy of `matched` with int columns `vertebra` (0..7) and `overlap` (its prepared pixels in the box).
    """
    labels_small = np.asarray(labels_small)
    sy, sx = (float(v) for v in scale)
    out = matched.copy()
    vertebra = np.zeros(len(out), np.int64)
    overlap = np.zeros(len(out), np.int64)
    for i, (x, y, w, h, z) in enumerate(out[["x", "y", "width", "height", "z"]].to_numpy(float)):
        z = int(z)
        if not 0 <= z < len(labels_small):
            raise ValueError(f"box row {out.index[i]}: z={z} outside labels of {len(labels_small)} slices")
        y0, y1 = _box_index_range(y, h, sy, labels_small.shape[1])
        x0, x1 = _box_index_range(x, w, sx, labels_small.shape[2])
        counts = np.bincount(labels_small[z, y0:y1, x0:x1].ravel().astype(np.int64),
                             minlength=N_VERTEBRAE + 1)[1:N_VERTEBRAE + 1]
        if counts.max(initial=0) > 0:
            vertebra[i] = int(np.argmax(counts)) + 1
            overlap[i] = int(counts.max())
    out["vertebra"] = vertebra
    out["overlap"] = overlap
    return out


def slice_targets(
    positions: np.ndarray,
    vertebra_label: int,
    labels_small: np.ndarray,
    scale: tuple[float, float],
    matched_boxes: pd.DataFrame,
    dz: float = 1.0,
    *,
    tolerance_mm: float = 0.0,
) -> np.ndarray:
    """Per-slice fracture targets of one vertebra at its sampled slice positions.

    The exact rule: the boxes lying on this vertebra are those `assign_boxes_to_vertebrae` gives to
    `vertebra_label` (most mask pixels under the box, in the box's own slice); their z-range is first..last
    of their slices, widened by `mm_to_slices(tolerance_mm, dz)` slices at both ends; a sampled slice is 1 when
    its index lies in that range (inclusive), else 0. No box on the vertebra: all 0. (One range per
    vertebra: two separate fractures on it count the slices between them as positive.)

    Args:
        positions: (T,) sampled slice indices (`slice_positions`).
        vertebra_label: 1..7.
        labels_small: (Z, s, s) prepared-grid labels.
        scale: (sy, sx) original pixels per prepared pixel.
        matched_boxes: `match_boxes_to_slices` output (or `assign_boxes_to_vertebrae` output, reused).
        dz: slice spacing in mm (for `tolerance_mm`).
        tolerance_mm: widening of the box range at each end, in mm.

    Returns:
        float32 (T,) of 0 / 1.
    """
    if not 1 <= int(vertebra_label) <= N_VERTEBRAE:
        raise ValueError(f"vertebra_label must be 1..{N_VERTEBRAE} (C1..C7); got {vertebra_label}")
    positions = np.asarray(positions)
    boxes = matched_boxes if "vertebra" in matched_boxes.columns else \
        assign_boxes_to_vertebrae(matched_boxes, labels_small, scale)
    zs = boxes.loc[boxes["vertebra"] == int(vertebra_label), "z"].to_numpy()
    if len(zs) == 0:
        return np.zeros(len(positions), np.float32)
    pad = mm_to_slices(tolerance_mm, dz) if tolerance_mm else 0
    return ((positions >= zs.min() - pad) & (positions <= zs.max() + pad)).astype(np.float32)


def vertebra_targets(
    extents: dict[str, VertebraExtent],
    labels_small: np.ndarray,
    scale: tuple[float, float],
    matched_boxes: pd.DataFrame,
    dz: float = 1.0,
    *,
    n_slices: int = 15,
    tolerance_mm: float = 0.0,
) -> np.ndarray:
    """(7, T) per-slice targets of a study, C1..C7, at the same positions `ClsRecipe.crop_study` samples.

    `slice_targets` for every vertebra found (positions from `slice_positions(extent, n_slices)`); a
    vertebra not found has no positions and gets zeros. Boxes that lie on no vertebra (`vertebra` 0 in
    `assign_boxes_to_vertebrae`) count for none: check that table to report them.

    Returns:
        float32 (7, T) of 0 / 1.
    """
    boxes = assign_boxes_to_vertebrae(matched_boxes, labels_small, scale)
    out = np.zeros((N_VERTEBRAE, n_slices), np.float32)
    for i, name in enumerate(VERTEBRAE):
        if name in extents:
            out[i] = slice_targets(slice_positions(extents[name], n_slices), i + 1, labels_small, scale, boxes,
                                   dz, tolerance_mm=tolerance_mm)
    return out
