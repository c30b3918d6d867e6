"""Segmentation -> vertebra boxes -> slice stacks (numpy / scipy only, never torch).

The three steps between the segmenter and the stage-2 classifier:

1. `clean_vertebra_probs`: per-vertebra probabilities (7, Z, H, W) -> one clean label volume (Z, H, W);
2. `vertebra_extents`: label volume -> a `VertebraExtent` per vertebra found (z-range, in-plane box,
   voxels per slice, centroid);
3. `crop_vertebra` / `crop_vertebrae`: volume + extent -> a fixed-size slice stack (T, S, S).

Conventions: volumes are (Z, H, W) with index 0 the most superior slice (so C1 comes before C7); label
values 1..7 are C1..C7 (`kit.constants.SEG_LABELS`), anything else is not a cervical vertebra. Slice
ranges are inclusive (`z_first`..`z_last`), in-plane boxes half-open like numpy slices (`y0:y1`, `x0:x1`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from .constants import VERTEBRAE

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


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 3D connected component of a boolean mask.

    Voxels touching by a face, an edge or a corner are connected (26-connectivity): thin bony parts
    (laminae, processes) at 64-128 px often touch only diagonally and would split otherwise.

    Args:
        mask: boolean (Z, H, W).

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
    out[box[0]] = comp == int(np.argmax(sizes))
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
    min_voxels: int = 1,
    return_dropped: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, str]]:
    """Turn per-vertebra probabilities into one clean label volume.

    Steps, per vertebra c (channel c = label c + 1):

    1. threshold: `probs[c] > threshold`;
    2. keep only its largest 3D connected component (26-connectivity, see `largest_component`); drop it
       if that has fewer than `min_voxels` voxels;
    3. overlaps: a voxel claimed by several vertebrae goes to the one with the highest probability;
    4. anatomical order: C1..C7 must run head to feet, i.e. their centroid z (index 0 = superior) must
       strictly increase with the label. Of the vertebrae found, the kit keeps the subset in that order
       with the largest total voxel count (a weighted longest increasing subsequence), so one misplaced
       vertebra is dropped rather than all those after it. Dropped vertebrae become background and are
       reported with the reason.

    Args:
        probs: (7, Z, H, W) float probabilities of C1..C7 (any float dtype, float16 is fine).
        threshold: probability above which a voxel belongs to a vertebra.
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
    best = np.zeros(shape, dtype=np.float32)
    dropped: dict[str, str] = {}
    for c in range(N_VERTEBRAE):
        mask = largest_component(probs[c] > threshold)
        n = int(mask.sum())
        if n == 0:
            continue
        if n < min_voxels:
            dropped[VERTEBRAE[c]] = f"{n} voxels < min_voxels={min_voxels}"
            continue
        p = probs[c].astype(np.float32, copy=False)
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
