"""Segmentation -> vertebra boxes -> slice stacks (numpy / scipy / OpenCV only, never torch).

The steps between the segmenter and the stage-2 classifier:

1. `clean_vertebra_probs`: per-vertebra probabilities (7, Z, H, W) -> one clean label volume (Z, H, W);
2. `vertebra_extents`: label volume -> a `VertebraExtent` per vertebra found (z-range, in-plane box,
   voxels per slice, centroid);
3. `crop_vertebra` / `crop_vertebrae`: volume + extent -> a fixed-size slice stack (T, S, S), on the grid
   the extent was measured on;
4. stage-2 stacks, cut from the ORIGINAL pixel grid of the DICOM series: `slice_positions` (T slices over
   a vertebra), `neighbour_offsets` (its +-n neighbours, spaced in mm), `crop_box_original` (the stage-1
   box mapped to original pixels), `crop_vertebra_stack` (uint8 (T, C, S, S): windowed neighbours + the
   vertebra's mask) and `crop_study` (all seven, missing ones recorded with the reason);
5. per-slice targets from `train_bounding_boxes.csv`: `match_boxes_to_slices` (rows -> slice indices,
   unmatched rows returned), `assign_boxes_to_vertebrae`, `slice_targets` and `vertebra_targets`.

Conventions: volumes are (Z, H, W) with index 0 the most superior slice (so C1 comes before C7); label
values 1..7 are C1..C7 (`kit.constants.SEG_LABELS`), anything else is not a cervical vertebra. Slice
ranges are inclusive (`z_first`..`z_last`), in-plane boxes half-open like numpy slices (`y0:y1`, `x0:x1`).
Stage 1 measures extents on a "prepared" grid (Z, s, s): the original slices resized in-plane (never in
z), so z indices are shared and `scale` = (sy, sx) original pixels per prepared pixel maps the planes,
edge to edge: prepared pixels [y0, y1) cover original pixels [y0 * sy, y1 * sy).

Windowing is `kit.io.dicom.window` (the one HU -> uint8 recipe, shared with the stage-1 cache): the only
import of a sibling module here, made so the two stages cannot window differently.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from ..constants import PROB_SCALE, VERTEBRAE, WINDOWS
from ..io.dicom import window

N_VERTEBRAE = len(VERTEBRAE)
_FULL_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


@dataclass
class VertebraExtent:
    """Where one vertebra lies in a (Z, H, W) label volume.

    Attributes:
        name: "C1".."C7".
        label: its label value (1..7).
        z_first: first slice index holding the vertebra (inclusive).
        z_last: last slice index holding it (inclusive).
        y0: top row of the in-plane box over all its slices (inclusive).
        y1: bottom row, exclusive (`labels[:, y0:y1, x0:x1]`).
        x0: left column (inclusive).
        x1: right column, exclusive.
        voxels: number of voxels.
        centroid: (z, y, x) centre of mass in voxel indices.
        slice_voxels: (Z,) voxels of this vertebra in each slice of the whole volume (0 outside z-range).
        spacing: (dz, dy, dx) in mm when known.
    """

    name: str
    label: int
    z_first: int
    z_last: int
    y0: int
    y1: int
    x0: int
    x1: int
    voxels: int
    centroid: tuple[float, float, float]
    slice_voxels: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float] | None = None

    @property
    def n_slices(self) -> int:
        """Slices from `z_first` to `z_last`, both included."""
        return self.z_last - self.z_first + 1

    @property
    def coverage(self) -> np.ndarray:
        """(Z,) share of the vertebra's voxels in each slice (sums to 1)."""
        return self.slice_voxels / max(self.voxels, 1)

    @property
    def volume_ml(self) -> float | None:
        """Volume in millilitres, when the spacing is known."""
        if self.spacing is None:
            return None
        return float(self.voxels * np.prod(self.spacing) / 1000.0)

    def box(self) -> tuple[slice, slice, slice]:
        """The (z, y, x) slices of the vertebra's bounding box: `volume[extent.box()]`."""
        return slice(self.z_first, self.z_last + 1), slice(self.y0, self.y1), slice(self.x0, self.x1)


#: The clean-up also keeps the pieces of a vertebra that a thin dip of the segmenter's probability cut off from the
#: rest (C2's dens tip where C1's ring surrounds it: the tip dropped left C2 starting 10-14 slices late): a piece
#: lying wholly in the slices the level model gives that vertebra and at most this many mm from the rest along z,
#: overlapping it in-plane. Chosen on two tuning sets, not the demo's studies (docs/benchmarks.md, Stage 1,
#: "The clean-up: pieces within 4 mm inside the level range").
BRIDGE_MM = 4.0

#: The clean-up grows each vertebra beyond its first and last slice into the voxels above this probability that
#: touch it, slice by slice: the segmenter sees a vertebra's thin end slices (tips of a few pixels beside the
#: neighbour's body) only faintly, so at the 0.5 threshold alone its ranges started late and ended early (about
#: a slice on average). Chosen on two tuning sets, not the demo's studies (docs/benchmarks.md, Stage 1,
#: "The clean-up: faint end slices grown").
END_THRESHOLD = 0.05
#: ... and at most this many mm beyond each end: a guard against a model's faint haze over a bad study, which would
#: otherwise carry a vertebra through the volume (about a vertebra's height; over the 80 tuning studies the growth
#: reached 7.5 mm at most, a dens tip above a dip, and 0-1 slices in 98 % of the ends).
GROW_MAX_MM = 15.0
_PLANE_8 = np.ones((3, 3), dtype=bool)  # 8-connectivity in-plane


def _whole_slices(mm: float, dz: float) -> int:
    """The whole slices that fit in `mm` at slice spacing `dz` (rounding error aside: 4 mm at 1.3333 mm is 3)."""
    return int(np.floor(mm / float(dz) + 1e-6))


def grow_ends(mask: np.ndarray, probs: np.ndarray, cut: float, max_slices: int | None = None) -> np.ndarray:
    """Extend a vertebra's mask beyond its first and last slice into the voxels of `probs` above `cut` that touch it.

    Outwards slice by slice: on each slice, the in-plane components (8-connected) of `probs > cut` that touch what
    the slice before holds (26-connectivity) are added, until a slice adds nothing. Slices between the first and
    the last are not changed.

    Args:
        mask: boolean (Z, H, W), changed in place and returned.
        probs: (Z, H, W) probabilities of the same vertebra (any dtype; `cut` in its units).
        cut: the probability above which a voxel may be added.
        max_slices: at most this many slices added at each end (None: no limit).
    """
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if not len(zs):
        return mask
    reach = len(mask) if max_slices is None else max_slices
    for end, step in ((zs[0], -1), (zs[-1], 1)):
        front = mask[end]
        for z in range(end + step, end + step * (reach + 1), step):
            if not 0 <= z < len(mask):
                break
            weak = probs[z] > cut
            touch = weak & ndimage.binary_dilation(front, structure=_PLANE_8)
            if not touch.any():
                break
            parts, _ = ndimage.label(weak, structure=_PLANE_8)
            front = np.isin(parts, np.unique(parts[touch]))
            mask[z] = front
    return mask


def largest_component(mask: np.ndarray, *, within: np.ndarray | None = None, gap: int = 0) -> np.ndarray:
    """Keep the largest 3D connected component of a boolean mask, and optionally pieces cut off from it.

    Voxels touching by a face, an edge or a corner are connected (26-connectivity): thin bony parts
    (laminae, processes) at 64-128 px often touch only diagonally and would split otherwise.

    Args:
        mask: boolean (Z, H, W).
        within: boolean (Z,): with `gap` > 0, the other components lying wholly in these slices are kept too
            when a chain of them reaches the largest across at most `gap` empty slices, overlapping it in-plane
            (within one pixel); components touching any slice outside `within` never are.
        gap: empty slices bridged along z (0: the largest component alone).

    Returns:
        Boolean (Z, H, W), empty when `mask` is empty. Ties go to the lower component id.
    """
    out = np.zeros(mask.shape, dtype=bool)
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box or box[0] is None:
        return out
    sub = mask[box[0]]  # label only inside the bounding box: much faster on thin masks
    comp, n = ndimage.label(sub, structure=_FULL_3D)
    if n <= 1:
        out[box[0]] = sub
        return out
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    main = int(np.argmax(sizes))
    keep = comp == main
    if gap > 0 and within is not None:
        inside = np.asarray(within, dtype=bool)[box[0][0]]
        pieces = np.zeros(n + 1, dtype=bool)  # the other components lying wholly in `within`
        spans = [where[0] for where in ndimage.find_objects(comp)]
        for i, span in enumerate(spans, start=1):
            pieces[i] = i != main and bool(inside[span].all())
        found = np.flatnonzero(pieces)
        if len(found):  # join them in the slices around them only: the chains to the largest pass there
            lo, hi = min(spans[i - 1].start for i in found), max(spans[i - 1].stop for i in found)
            zs = slice(max(lo - gap - 1, 0), hi + gap + 1)
            near, ids = keep[zs], comp[zs]
            candidates = pieces[ids] | near
            grown = candidates.copy()  # each piece grown `gap` slices towards the feet meets one `gap` below it
            for k in range(1, min(gap, len(grown) - 1) + 1):
                grown[k:] |= candidates[:-k]
            joined, n_joined = ndimage.label(grown, structure=_FULL_3D)
            reached = np.zeros(n_joined + 1, dtype=bool)
            reached[joined[near]] = True
            keep[zs] = near | (candidates & reached[joined])
    out[box[0]] = keep
    return out


def _ordered_subset(centroid_z: dict[int, float], voxels: dict[int, int]) -> set[int]:
    """Labels whose centroids keep strictly increasing z in label order, with the most voxels in total.

    A weighted longest-increasing-subsequence over at most 7 items (O(n^2)).
    """
    labels = sorted(centroid_z)
    best: list[float] = []
    prev: list[int] = []
    for i, lab in enumerate(labels):
        best.append(float(voxels[lab]))
        prev.append(-1)
        for j in range(i):
            if centroid_z[labels[j]] < centroid_z[lab] and best[j] + voxels[lab] > best[i]:
                best[i], prev[i] = best[j] + voxels[lab], j
    if not labels:
        return set()
    i = int(np.argmax(best))
    keep = set()
    while i >= 0:
        keep.add(labels[i])
        i = prev[i]
    return keep


def clean_vertebra_probs(
    probs: np.ndarray,
    threshold: float = 0.5,
    *,
    levels: np.ndarray | None = None,
    dz: float | None = None,
    end_threshold: float | None = END_THRESHOLD,
    min_voxels: int = 1,
    return_dropped: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, str]]:
    """Turn per-vertebra probabilities into one clean label volume.

    Steps, per vertebra c (channel c = label c + 1):

    1. threshold: `probs[c] > threshold`;
    2. keep only its largest 3D connected component (26-connectivity, see `largest_component`) and, given
       `levels` and `dz`, the pieces cut off from it by up to `BRIDGE_MM` along z inside the slices where
       `levels[c]` > 0.5; then grow it beyond its first and last slice into the touching voxels above
       `end_threshold` (`grow_ends`; given `dz`, at most `GROW_MAX_MM`); drop it if that has fewer than
       `min_voxels` voxels;
    3. overlaps: a voxel claimed by several vertebrae goes to the one with the highest probability;
    4. anatomical order: C1..C7 must run head to feet, i.e. their centroid z (index 0 = superior) must
       strictly increase with the label. Of the vertebrae found, the kit keeps the subset in that order
       with the largest total voxel count (a weighted longest increasing subsequence), so one misplaced
       vertebra is dropped rather than all those after it. Dropped vertebrae become background and are
       reported with the reason.

    Args:
        probs: (7, Z, H, W) probabilities of C1..C7: float (any float dtype, float16 is fine) or uint8 in steps of
            1/255 (`kit.submit.infer.predict_vertebra_probs`; value / `PROB_SCALE` is the probability).
        threshold: probability above which a voxel belongs to a vertebra (for uint8 probs: above threshold x 255).
        levels: (7, Z) per-slice presence of C1..C7 (the level model's, `kit.submit.infer.predict_levels`, or
            `kit.stage1.recipe.true_presence`); with `dz`, pieces of a vertebra are kept as in step 2.
        dz: the slice spacing in mm.
        end_threshold: probability above which a vertebra's end slices grow (`END_THRESHOLD`), at most `GROW_MAX_MM`
            when `dz` is given; None: no growth.
        min_voxels: smallest kept component.
        return_dropped: also return the vertebrae removed and why.

    Returns:
        labels: uint8 (Z, H, W), 0 background, 1..7 = C1..C7; with `return_dropped`, also a dict
        {"C4": "centroid z=31.0 out of head-to-feet order", ...}.
    """
    probs = np.asarray(probs)
    if probs.ndim != 4 or probs.shape[0] != N_VERTEBRAE:
        raise ValueError(f"probs must be ({N_VERTEBRAE}, Z, H, W) for C1..C7; got shape {probs.shape}")
    shape = probs.shape[1:]
    labels = np.zeros(shape, dtype=np.uint8)
    # the winner's probability so far, in the input's own type (float16 or uint8): no float32 copy of the
    # volume (a 600-slice 384 px study: 0.35 GB less at the peak), same result
    own = probs.dtype == np.uint8 or np.issubdtype(probs.dtype, np.floating)
    best = np.zeros(shape, dtype=probs.dtype if own else np.float32)
    scale = PROB_SCALE if probs.dtype == np.uint8 else 1.0
    cut = threshold * scale
    gap = 0
    reach = None if dz is None else _whole_slices(GROW_MAX_MM, dz)  # end growth, in slices
    if levels is not None and dz is not None:
        levels = np.asarray(levels)
        if levels.shape != (N_VERTEBRAE, shape[0]):
            raise ValueError(f"levels must be ({N_VERTEBRAE}, {shape[0]}) for C1..C7; got shape {levels.shape}")
        gap = _whole_slices(BRIDGE_MM, dz)
    dropped: dict[str, str] = {}
    for c in range(N_VERTEBRAE):
        mask = largest_component(probs[c] > cut, within=None if levels is None else levels[c] > 0.5, gap=gap)
        if end_threshold is not None:
            grow_ends(mask, probs[c], end_threshold * scale, reach)
        n = int(mask.sum())
        if n == 0:
            continue
        if n < min_voxels:
            dropped[VERTEBRAE[c]] = f"{n} voxels < min_voxels={min_voxels}"
            continue
        p = probs[c].astype(best.dtype, copy=False)
        win = mask & (p > best)
        labels[win] = c + 1
        best[win] = p[win]
    # Order: centroids from the labels left after overlap resolution, via per-slice label counts.
    per_slice = np.stack([np.bincount(sl.ravel(), minlength=N_VERTEBRAE + 1)[: N_VERTEBRAE + 1] for sl in labels])
    counts = per_slice.sum(axis=0)
    zsum = (np.arange(shape[0])[:, None] * per_slice).sum(axis=0)
    voxels = {lab: int(counts[lab]) for lab in range(1, N_VERTEBRAE + 1) if counts[lab] > 0}
    centroid_z = {lab: float(zsum[lab] / counts[lab]) for lab in voxels}
    keep = _ordered_subset(centroid_z, voxels)
    for lab in sorted(set(voxels) - keep):
        labels[labels == lab] = 0
        dropped[VERTEBRAE[lab - 1]] = f"centroid z={centroid_z[lab]:.1f} out of head-to-feet order"
    return (labels, dropped) if return_dropped else labels


def vertebra_extents(
    labels: np.ndarray,
    spacing: tuple[float, float, float] | None = None,
) -> dict[str, VertebraExtent]:
    """Bounding boxes, voxels per slice and centroids of C1..C7 in a label volume.

    Args:
        labels: integer (Z, H, W), 1..7 = C1..C7; other values (0, thoracic 8+) are ignored.
        spacing: (dz, dy, dx) in mm, kept on each extent (for `volume_ml`).

    Returns:
        {"C1": VertebraExtent, ...} in C1..C7 order, only the vertebrae present; see `missing_vertebrae`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, H, W); got shape {labels.shape}")
    spacing = None if spacing is None else tuple(float(s) for s in spacing)
    boxes = ndimage.find_objects(labels.astype(np.int32, copy=False), max_label=N_VERTEBRAE)
    extents: dict[str, VertebraExtent] = {}
    for lab, box in enumerate(boxes, start=1):
        if box is None:
            continue
        inside = labels[box] == lab
        per_slice = inside.sum(axis=(1, 2))
        slice_voxels = np.zeros(labels.shape[0], dtype=np.int64)
        slice_voxels[box[0]] = per_slice
        zz, yy, xx = np.nonzero(inside)
        extents[VERTEBRAE[lab - 1]] = VertebraExtent(
            name=VERTEBRAE[lab - 1],
            label=lab,
            z_first=int(box[0].start),
            z_last=int(box[0].stop - 1),
            y0=int(box[1].start),
            y1=int(box[1].stop),
            x0=int(box[2].start),
            x1=int(box[2].stop),
            voxels=int(per_slice.sum()),
            centroid=(float(zz.mean() + box[0].start), float(yy.mean() + box[1].start),
                      float(xx.mean() + box[2].start)),
            slice_voxels=slice_voxels,
            spacing=spacing,
        )
    return extents


def missing_vertebrae(extents: dict[str, VertebraExtent]) -> list[str]:
    """C1..C7 names absent from `extents`, in order."""
    return [name for name in VERTEBRAE if name not in extents]


def extents_table(extents: dict[str, VertebraExtent]) -> pd.DataFrame:
    """One row per vertebra C1..C7 (missing ones too, with `found=False` and NaN geometry)."""
    rows = []
    for name in VERTEBRAE:
        e = extents.get(name)
        if e is None:
            rows.append({"vertebra": name, "found": False})
            continue
        rows.append({
            "vertebra": name, "found": True, "z_first": e.z_first, "z_last": e.z_last, "n_slices": e.n_slices,
            "y0": e.y0, "y1": e.y1, "x0": e.x0, "x1": e.x1, "voxels": e.voxels,
            "centroid_z": e.centroid[0], "centroid_y": e.centroid[1], "centroid_x": e.centroid[2],
            "volume_ml": e.volume_ml,
        })
    return pd.DataFrame(rows).set_index("vertebra")


def _axis_positions(first: float, last: float, n: int, margin: float, square_half: float | None) -> np.ndarray:
    """`n` sample positions from `first` to `last` (pixel centres, inclusive), widened by the margin."""
    if square_half is not None:  # centred, same half-width on both in-plane axes
        centre = (first + last) / 2.0
        first, last = centre - square_half, centre + square_half
    pad = margin * (last - first + 1)
    return np.linspace(first - pad, last + pad, n)


def crop_vertebra(
    volume: np.ndarray,
    extent: VertebraExtent,
    *,
    margin: float = 0.1,
    out_size: tuple[int, int, int] = (16, 128, 128),
    square: bool = True,
    order: int = 1,
) -> np.ndarray:
    """Cut one vertebra's box out of a volume and resample it to a fixed-size slice stack.

    The box spans slices `z_first..z_last` and pixels `y0:y1`, `x0:x1`, widened on each side by
    `margin` times its size along that axis (so margin=0.1 gives 20% more in each direction). With
    `square`, the in-plane box is first grown to a square around its centre so the anatomy keeps its
    aspect ratio. The stack is sampled at `T` evenly spaced slice positions and `S` x `S` evenly spaced
    pixel positions from the first to the last voxel of the widened box, with interpolation `order`
    (1 linear for images, 0 nearest for label volumes); samples outside the volume are 0. With
    `margin=0`, `square=False` and an `out_size` equal to the box's size, the result is exactly
    `volume[extent.box()]`.

    Args:
        volume: (Z, H, W) array the extent was measured on (image or labels, same grid).
        extent: the vertebra's extent (`vertebra_extents`).
        margin: widening per side, as a fraction of the box size on each axis (z too).
        out_size: (T, S, S') slices and pixels of the output.
        square: square the in-plane box before the margin.
        order: spline order of the interpolation (0 or 1 are the useful ones).

    Returns:
        (T, S, S') array of the volume's dtype (integers are rounded and clipped to their range).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (Z, H, W); got shape {volume.shape}")
    if len(out_size) != 3 or min(out_size) < 1:
        raise ValueError(f"out_size must be three positive ints (T, S, S); got {out_size}")
    t, s_y, s_x = (int(v) for v in out_size)
    half = None
    if square:
        half = max(extent.y1 - extent.y0, extent.x1 - extent.x0) / 2.0 - 0.5
    zs = _axis_positions(extent.z_first, extent.z_last, t, margin, None)
    ys = _axis_positions(extent.y0, extent.y1 - 1, s_y, margin, half)
    xs = _axis_positions(extent.x0, extent.x1 - 1, s_x, margin, half)
    # Read only the region the samples touch, then interpolate in it.
    lo = [max(int(np.floor(a.min())), 0) for a in (zs, ys, xs)]
    hi = [min(int(np.ceil(a.max())) + 1, n) for a, n in zip((zs, ys, xs), volume.shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return np.zeros((t, s_y, s_x), dtype=volume.dtype)
    region = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    grid = np.meshgrid(zs - lo[0], ys - lo[1], xs - lo[2], indexing="ij")
    out = ndimage.map_coordinates(region, grid, order=order, mode="constant", cval=0.0)
    if np.issubdtype(volume.dtype, np.integer):
        info = np.iinfo(volume.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(volume.dtype)


def crop_vertebrae(
    volume: np.ndarray,
    extents: dict[str, VertebraExtent],
    **kwargs,
) -> dict[str, np.ndarray]:
    """`crop_vertebra` for every extent: {"C1": (T, S, S), ...} in C1..C7 order, missing ones absent."""
    return {name: crop_vertebra(volume, extents[name], **kwargs) for name in VERTEBRAE if name in extents}


# ---------------------------------------------------------------------------------------------------------
# Stage-2 stacks: T slices per vertebra, each as its +-n neighbours (windowed) + the vertebra's mask, cut
# from the original pixel grid.

AIR_HU = -1024.0  # what pads a box reaching past the image: the scanner's own outside-the-field value


def grid_scale(orig_hw: tuple[int, int], prepared_hw: tuple[int, int]) -> tuple[float, float]:
    """(sy, sx) original pixels per prepared pixel, e.g. (512, 512) over (128, 128) -> (4.0, 4.0)."""
    if min(*orig_hw, *prepared_hw) <= 0:
        raise ValueError(f"sizes must be positive; got orig_hw={tuple(orig_hw)}, prepared_hw={tuple(prepared_hw)}")
    return float(orig_hw[0]) / float(prepared_hw[0]), float(orig_hw[1]) / float(prepared_hw[1])


def slice_positions(extent: VertebraExtent, n_slices: int = 15) -> np.ndarray:
    """`n_slices` slice indices spread evenly over the vertebra's z-range, head to feet.

    Position t is `z_first + t * (z_last - z_first) / (T - 1)` rounded half up, so the first and the last
    slice of the vertebra are always sampled and the indices never decrease; a vertebra with fewer than T
    slices repeats some. T = 1 samples the middle slice.

    Args:
        extent: the vertebra's extent (`vertebra_extents`).
        n_slices: T.

    Returns:
        int64 (T,) ascending slice indices in `z_first..z_last`.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1; got {n_slices}")
    if n_slices == 1:
        return np.array([int(np.floor((extent.z_first + extent.z_last) / 2 + 0.5))], dtype=np.int64)
    raw = np.linspace(extent.z_first, extent.z_last, n_slices)
    return np.floor(raw + 0.5).astype(np.int64)


def neighbour_offsets(dz: float, n_neighbours: int = 2, spacing_mm: float | None = None) -> np.ndarray:
    """Slice offsets of a slice and its +-n neighbours, spaced `spacing_mm` apart: the stage-1 recipe's
    rounding (`kit.stage1.recipe.offsets_to_slices` of 0, +-spacing_mm, +-2 spacing_mm, ...), so the 2n+1 slices
    span about the same height in mm whatever the study's slice spacing; with `spacing_mm=None` neighbours
    are adjacent slices. E.g. spacing_mm=1.0: dz=0.5 -> [-4, -2, 0, 2, 4], dz=1.0 -> [-2, -1, 0, 1, 2].

    Args:
        dz: slice spacing of the series in mm.
        n_neighbours: n.
        spacing_mm: distance between neighbouring channels in mm, or None for adjacent slices.

    Returns:
        int64 (2n+1,) offsets, ascending (head to feet), centre 0.
    """
    from ..stage1.recipe import offsets_to_slices

    if n_neighbours < 0:
        raise ValueError(f"n_neighbours must be >= 0; got {n_neighbours}")
    steps = np.arange(-n_neighbours, n_neighbours + 1, dtype=np.int64)
    if spacing_mm is None:
        return steps
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0 mm; got {spacing_mm}")
    return offsets_to_slices(steps * float(spacing_mm), dz)


def crop_box_original(
    extent: VertebraExtent,
    scale: tuple[float, float],
    orig_hw: tuple[int, int],
    margin: float = 0.15,
    square: bool = True,
) -> tuple[int, int, int, int]:
    """The extent's in-plane box on the original pixel grid, with a margin, optionally square.

    Steps: the prepared box [y0, y1) x [x0, x1) covers original pixels [y0 * sy, y1 * sy) x [x0 * sx,
    x1 * sx) (edge to edge, as an area/linear resize of the whole slice maps them); with `square`, both
    sides become the longer one, around the same centre; each side is then widened by `margin` times its
    size on both ends (margin=0.15: 30 % larger). Without `square` the result is floor / ceil of the
    widened edges (margin=0: `floor(y0 * sy), ceil(y1 * sy), ...`, as `SegResult.table` reports it); with
    `square` one integer side `ceil(widened side)` for both axes, its start rounded half up from
    `centre - side / 2`.

    The box is NOT clipped to the image: near an edge it may start below 0 or end past (H, W), so that it
    stays square and centred on the vertebra. `crop_vertebra_stack` reads the part inside the image and
    pads the rest with air (`AIR_HU`, -1024 HU) and an empty mask.

    Args:
        extent: the vertebra's extent on the prepared grid.
        scale: (sy, sx) original pixels per prepared pixel (`grid_scale`, `SegResult.scale`).
        orig_hw: (H, W) of the original slices (checked only: the box may leave them).
        margin: widening per side, as a fraction of the (squared) box size.
        square: make the box square (in original pixels) before the margin.

    Returns:
        (y0, y1, x0, x1) ints on the original grid, half-open like numpy slices; y1 > y0, x1 > x0.
    """
    sy, sx = (float(v) for v in scale)
    if sy <= 0 or sx <= 0 or margin < 0:
        raise ValueError(f"scale must be > 0 and margin >= 0; got scale={tuple(scale)}, margin={margin}")
    if min(orig_hw) <= 0:
        raise ValueError(f"orig_hw must be positive (H, W); got {tuple(orig_hw)}")
    cy, cx = (extent.y0 + extent.y1) / 2.0 * sy, (extent.x0 + extent.x1) / 2.0 * sx
    hy, hx = (extent.y1 - extent.y0) / 2.0 * sy, (extent.x1 - extent.x0) / 2.0 * sx
    if not square:
        hy, hx = hy * (1 + 2 * margin), hx * (1 + 2 * margin)
        edges = [cy - hy, cy + hy, cx - hx, cx + hx]
        edges = [round(v, 6) for v in edges]  # 3 * 10.1 must stay 30.3, not 30.300000000000004 -> 31
        return (int(np.floor(edges[0])), int(np.ceil(edges[1])), int(np.floor(edges[2])), int(np.ceil(edges[3])))
    side = max(1, int(np.ceil(round(2 * max(hy, hx) * (1 + 2 * margin), 6))))
    y0 = int(np.floor(cy - side / 2.0 + 0.5))
    x0 = int(np.floor(cx - side / 2.0 + 0.5))
    return y0, y0 + side, x0, x0 + side


def stack_channel_names(windows: tuple[str, ...] = ("bone",), n_neighbours: int = 2,
                        with_mask: bool = True) -> list[str]:
    """Names of the C channels of a `crop_vertebra_stack`, in order.

    Window-major: all 2n+1 slices (head to feet, offset -n..n) in the first window, then all in the
    second, ..., then the mask. So the bone-only stack is a prefix of bone + soft + ... stacks:
    ("bone", "soft"), n=1 -> ["bone-1", "bone+0", "bone+1", "soft-1", "soft+0", "soft+1", "mask"].
    """
    names = [f"{w}{k:+d}" for w in windows for k in range(-n_neighbours, n_neighbours + 1)]
    return names + ["mask"] if with_mask else names


def _check_windows(windows) -> tuple[str, ...]:
    windows = (windows,) if isinstance(windows, str) else tuple(windows)
    unknown = [w for w in windows if w not in WINDOWS]
    if unknown or not windows:
        raise ValueError(f"unknown window name(s) {unknown or list(windows)}; available: {', '.join(WINDOWS)}")
    return windows


def _cut_planes(volume: np.ndarray, zs: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """volume[zs, y0:y1, x0:x1] with the part outside the image filled with `fill`: (N, y1-y0, x1-x0)."""
    y0, y1, x0, x1 = box
    h, w = volume.shape[1:]
    dtype = volume.dtype
    holds_fill = np.issubdtype(dtype, np.floating) or (
        np.issubdtype(dtype, np.integer) and np.iinfo(dtype).min <= fill <= np.iinfo(dtype).max)
    if not holds_fill:  # e.g. uint16 HU cannot hold -1024
        dtype = np.float32
    out = np.full((len(zs), y1 - y0, x1 - x0), fill, dtype=dtype)
    ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if ya < yb and xa < xb:
        out[:, ya - y0:yb - y0, xa - x0:xb - x0] = volume[zs, ya:yb, xa:xb]
    return out


def _resize_planes(planes: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) uint8 -> (N, size, size): cv2 area averaging when shrinking both sides, else linear."""
    import cv2

    if planes.shape[1:] == (size, size):
        return planes
    shrink = planes.shape[1] > size and planes.shape[2] > size
    method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    out = np.empty((len(planes), size, size), planes.dtype)
    for i, plane in enumerate(planes):
        out[i] = cv2.resize(plane, (size, size), interpolation=method)
    return out


def _sample_index(start: int, stop: int, size: int, scale: float, n: int) -> np.ndarray:
    """Prepared-grid index under each of `size` output pixel centres spanning original [start, stop);
    -1 where that lies outside the prepared grid of `n` pixels (centre-aligned nearest neighbour)."""
    centres = start + (np.arange(size) + 0.5) * (stop - start) / size  # original pixel coordinates
    idx = np.floor(centres / scale).astype(np.int64)
    return np.where((idx >= 0) & (idx < n), idx, -1)


def _mask_planes(labels: np.ndarray, zs: np.ndarray, label: int, box: tuple[int, int, int, int],
                 scale: tuple[float, float], size: int) -> np.ndarray:
    """uint8 (N, size, size): 255 where `labels[z] == label`, on the original-grid box, else 0."""
    rows = _sample_index(box[0], box[1], size, scale[0], labels.shape[1])
    cols = _sample_index(box[2], box[3], size, scale[1], labels.shape[2])
    planes = labels[zs][:, np.maximum(rows, 0)][:, :, np.maximum(cols, 0)] == label
    planes &= (rows >= 0)[None, :, None] & (cols >= 0)[None, None, :]
    return planes.astype(np.uint8) * np.uint8(255)


def crop_vertebra_stack(
    hu: np.ndarray,
    labels: np.ndarray,
    extent: VertebraExtent,
    *,
    scale: tuple[float, float] | None = None,
    n_slices: int = 15,
    n_neighbours: int = 2,
    neighbour_mm: float | None = None,
    dz: float = 1.0,
    size: int = 224,
    windows: tuple[str, ...] = ("bone",),
    margin: float = 0.15,
    square: bool = True,
    with_mask: bool = True,
    pad_hu: float = AIR_HU,
) -> np.ndarray:
    """One vertebra as T slice stacks from the original HU volume: the stage-2 classifier's input.

    For each of the T positions (`slice_positions`, head to feet), the slice and its +-n neighbours
    (`neighbour_offsets`; indices past either end of the volume repeat the edge slice) are cut in the
    original-grid box (`crop_box_original`; outside the image: `pad_hu`), windowed with `kit.io.dicom.window`
    (window first, as the stage-1 cache does), and resized to size x size (cv2 area averaging when
    shrinking, linear when growing). Channels are window-major (`stack_channel_names`): the 2n+1 slices in
    the first window, ..., then, with `with_mask`, the vertebra's own mask (`labels == extent.label` in the
    centre slice, prepared grid, sampled at each output pixel's centre: centre-aligned nearest neighbour),
    0 / 255.

    Args:
        hu: (Z, H, W) HU volume of the original series (float32 or int16; `kit.io.dicom.read_series(...).hu`).
        labels: (Z, s, s) integer labels on the prepared grid the extent was measured on (same Z).
        extent: the vertebra's extent on that grid.
        scale: (sy, sx) original pixels per prepared pixel; None = (H / s, W / s) from the two shapes.
        n_slices: T.
        n_neighbours: n; each slice brings 2n+1 image channels per window.
        neighbour_mm: spacing of those neighbours in mm (None: adjacent slices).
        dz: the series' slice spacing in mm (used with `neighbour_mm`).
        size: S, output side in pixels.
        windows: names in `kit.constants.WINDOWS`.
        margin: box widening per side, as a fraction of the box size.
        square: square box (keeps the anatomy's aspect ratio).
        with_mask: append the mask channel.
        pad_hu: HU value of the box's part outside the image (air).

    Returns:
        uint8 (T, C, S, S), C = len(windows) * (2n+1) + with_mask (default 5 + 1 = 6).
    """
    hu, labels = np.asarray(hu), np.asarray(labels)
    if hu.ndim != 3 or labels.ndim != 3 or len(hu) != len(labels):
        raise ValueError(f"hu (Z, H, W) and labels (Z, s, s) must be 3D with the same Z; got {hu.shape}, "
                         f"{labels.shape}")
    if not extent.z_last < len(hu):
        raise ValueError(f"{extent.name}: z_last={extent.z_last} outside a volume of {len(hu)} slices")
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    windows = _check_windows(windows)
    scale = grid_scale(hu.shape[1:], labels.shape[1:]) if scale is None else tuple(float(v) for v in scale)
    positions = slice_positions(extent, n_slices)
    offsets = neighbour_offsets(dz, n_neighbours, neighbour_mm)
    index = np.clip(positions[:, None] + offsets[None, :], 0, len(hu) - 1)  # (T, 2n+1)
    needed, where = np.unique(index, return_inverse=True)  # each slice read, windowed, resized once
    where = where.reshape(index.shape)
    box = crop_box_original(extent, scale, hu.shape[1:], margin, square)
    planes = _cut_planes(hu, needed, box, pad_hu)
    k = len(offsets)
    out = np.empty((len(positions), len(windows) * k + int(with_mask), size, size), np.uint8)
    for w, name in enumerate(windows):
        out[:, w * k:(w + 1) * k] = _resize_planes(window(planes, *WINDOWS[name]), size)[where]
    if with_mask:
        out[:, -1] = _mask_planes(labels, positions, extent.label, box, scale, size)
    return out


def crop_study(
    hu: np.ndarray,
    labels: np.ndarray,
    extents: dict[str, VertebraExtent],
    *,
    dropped: dict[str, str] | None = None,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """`crop_vertebra_stack` for C1..C7 of one study; a vertebra not found is zeros, never left out.

    Args:
        hu: (Z, H, W) original HU volume.
        labels: (Z, s, s) prepared-grid labels.
        extents: {"C1": VertebraExtent, ...} of the vertebrae found (`SegResult.extents`).
        dropped: {name: reason} of the vertebrae the clean-up removed (`SegResult.dropped`), for the reasons.
        **kwargs: passed to `crop_vertebra_stack` (scale, n_slices, n_neighbours, windows, size, ...).

    Returns:
        stacks: uint8 (7, T, C, S, S) in C1..C7 order, zeros for a vertebra not found;
        found: bool (7,);
        reasons: {name: why} for each vertebra not found: "dropped by the clean-up: <reason>" or "not
        found by the segmenter".
    """
    dropped = dropped or {}
    t = int(kwargs.get("n_slices", 15))
    c = len(stack_channel_names(_check_windows(kwargs.get("windows", ("bone",))), kwargs.get("n_neighbours", 2),
                                kwargs.get("with_mask", True)))
    s = int(kwargs.get("size", 224))
    stacks = np.zeros((N_VERTEBRAE, t, c, s, s), np.uint8)
    found = np.zeros(N_VERTEBRAE, bool)
    reasons: dict[str, str] = {}
    for i, name in enumerate(VERTEBRAE):
        if name not in extents:
            reasons[name] = (f"dropped by the clean-up: {dropped[name]}" if name in dropped
                             else "not found by the segmenter")
            continue
        stacks[i] = crop_vertebra_stack(hu, labels, extents[name], **kwargs)
        found[i] = True
    return stacks, found, reasons


# ---------------------------------------------------------------------------------------------------------
# Per-slice targets from train_bounding_boxes.csv.

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
    of their slices, widened by `round(tolerance_mm / dz)` slices at both ends; a sampled slice is 1 when
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
    pad = int(round(float(tolerance_mm) / float(dz))) if tolerance_mm else 0
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
    """(7, T) per-slice targets of a study, C1..C7, at the same positions `crop_study` samples.

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


# ---------------------------------------------------------------------------------------------------------
# The crop cache's files (written by `kit.stage2.crop_cache`, read by the classifier's dataset and the reports)
# ---------------------------------------------------------------------------------------------------------

CROP_KEYS = ("crops", "found", "positions", "slice_targets", "instance_numbers", "spacing", "orig_hw")
# In the file, `crops` (7, T, C, S, S) is stored as one member per vertebra, `crops_0` .. `crops_6` (T, C, S, S):
# an npz member is one compressed stream, so a per-vertebra training sample then decompresses its own stack,
# not all seven (`load_vertebra_crops`). Files with a single `crops` member (before this layout) still load.
VERTEBRA_MEMBER = "crops_{}"
# what opening or reading a cached .npz raises when the file is missing, empty, truncated or not an npz, or a member's
# compressed stream is damaged (zlib.error is none of the others: found by fuzzing the files)
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def crop_path(crop_dir, uid: str) -> Path:
    """`<crop_dir>/<uid>.npz`."""
    return Path(crop_dir) / f"{uid}.npz"


def crop_file_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The members a crop file stores for `arrays` (`CROP_KEYS`, ...): `crops` split into one member per vertebra."""
    out = {key: value for key, value in arrays.items() if key != "crops"}
    out.update({VERTEBRA_MEMBER.format(v): np.ascontiguousarray(stack) for v, stack in enumerate(arrays["crops"])})
    return out


def _corrupt(uid: str, path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"study {uid}: crop file {path} is corrupt ({type(exc).__name__}: {exc}); delete it and run "
                      "`kit crops` again")


def _open_crops(crop_dir, uid: str):
    """(path, open NpzFile) of a study's crop file; errors name the file and what to do."""
    path = crop_path(crop_dir, uid)
    if not path.is_file():
        raise FileNotFoundError(f"study {uid}: no crops at {path}; build them with `kit crops --config <cls config>`")
    try:
        return path, np.load(path)
    except NPZ_ERRORS as exc:
        raise _corrupt(uid, path, exc) from exc


def _read_members(path: Path, uid: str, data, keys: list[str]) -> dict[str, np.ndarray]:
    absent = [k for k in keys if k not in data.files]
    if absent:
        raise ValueError(f"study {uid}: crop file {path} lacks {absent} (has {sorted(data.files)}); delete it and "
                         "run `kit crops` again")
    try:
        return {key: data[key] for key in keys}
    except NPZ_ERRORS as exc:
        raise _corrupt(uid, path, exc) from exc


def _check_crop_shapes(path: Path, arrays: dict[str, np.ndarray], stack_shape: tuple) -> None:
    if len(stack_shape) != 4:
        raise ValueError(f"{path}: crops must be uint8 ({N_VERTEBRAE}, T, C, S, S); got a vertebra stack of shape "
                         f"{stack_shape}")
    t = stack_shape[0]
    for key, shape in (("found", (N_VERTEBRAE,)), ("positions", (N_VERTEBRAE, t)),
                       ("slice_targets", (N_VERTEBRAE, t))):
        if arrays[key].shape != shape:
            raise ValueError(f"{path}: {key} must have shape {shape} to match crops of {t} slices; "
                             f"got {arrays[key].shape}")
    arrays["found"] = arrays["found"].astype(bool)
    arrays["slice_targets"] = arrays["slice_targets"].astype(np.float32)


def load_vertebra_crops(crop_dir, uid: str, vertebra: int) -> dict[str, np.ndarray]:
    """One vertebra's stack of a study's cached crops, decompressing only that stack (and the small arrays).

    Returns:
        `crops` uint8 (T, C, S, S) of vertebra `vertebra` (0..6 = C1..C7) and the study's `found` bool (7,),
        `positions` int32 (7, T), `slice_targets` float32 (7, T) (NaN = unknown).

    Raises:
        FileNotFoundError, ValueError: as `load_crops`.
    """
    path, data = _open_crops(crop_dir, uid)
    with data:
        member = VERTEBRA_MEMBER.format(vertebra)
        split = member in data.files
        arrays = _read_members(path, uid, data, ["found", "positions", "slice_targets",
                                                 member if split else "crops"])
    crops = arrays.pop(member) if split else arrays.pop("crops")[vertebra]
    if crops.dtype != np.uint8:
        raise ValueError(f"{path}: crops must be uint8; got {crops.dtype}")
    _check_crop_shapes(path, arrays, crops.shape)
    return {"crops": crops, **arrays}


def load_crops(crop_dir, uid: str) -> dict[str, np.ndarray]:
    """One study's cached crops: `crops` uint8 (7, T, C, S, S), `found` bool (7,), `positions` int32 (7, T)
    (slice index in the series, -1 where not found), `slice_targets` float32 (7, T) (NaN = unknown),
    `instance_numbers`, `spacing`, `orig_hw` of the series.

    Raises:
        FileNotFoundError: no `<crop_dir>/<uid>.npz` (names the file; build it with `kit crops`).
        ValueError: the file is not a readable npz, lacks keys or its shapes disagree (names the file).
    """
    path, data = _open_crops(crop_dir, uid)
    with data:
        members = [VERTEBRA_MEMBER.format(v) for v in range(N_VERTEBRAE)]
        split = all(m in data.files for m in members)
        keys = [k for k in data.files if k not in members]
        if split and "crops" not in keys:
            keys = [*keys, *members]
        absent = [k for k in CROP_KEYS if k not in keys and not (k == "crops" and split)]
        if absent:
            raise ValueError(f"study {uid}: crop file {path} lacks {absent} (has {sorted(data.files)}); delete it "
                             "and run `kit crops` again")
        arrays = _read_members(path, uid, data, keys)
    if "crops" not in arrays:
        stacks = [arrays.pop(m) for m in members]
        if len({(s.shape, s.dtype) for s in stacks}) != 1:
            raise ValueError(f"{path}: the vertebrae's crops differ in shape or type: {[s.shape for s in stacks]}")
        arrays["crops"] = np.stack(stacks)
    crops = arrays["crops"]
    if crops.ndim != 5 or crops.shape[0] != N_VERTEBRAE or crops.dtype != np.uint8:
        raise ValueError(f"{path}: crops must be uint8 ({N_VERTEBRAE}, T, C, S, S); got {crops.dtype} {crops.shape}")
    _check_crop_shapes(path, arrays, crops.shape[1:])
    return arrays


def missing_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """The vertebrae not found, one row each, from a crop cache's `manifest.csv` (`kit.stage2.crop_cache`).

    Args:
        manifest: its rows; `missing` holds "C3: reason; C7: reason" (empty when all seven were found).

    Returns:
        Columns `StudyInstanceUID, vertebra, reason, mask_source`, in manifest then C1..C7 order.
    """
    rows = []
    for record in manifest.itertuples(index=False):
        text = record.missing if isinstance(record.missing, str) else ""
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, _, reason = part.partition(":")
            rows.append({"StudyInstanceUID": record.StudyInstanceUID, "vertebra": name.strip(),
                         "reason": reason.strip(), "mask_source": record.mask_source})
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "vertebra", "reason", "mask_source"])
