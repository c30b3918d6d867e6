"""Stage-1 clean-up: per-vertebra probabilities -> one clean label volume -> a `VertebraExtent` per vertebra.

1. `clean_vertebra_probs`: probabilities (7, Z, H, W) -> one clean label volume (Z, H, W) (threshold, largest
   component, ends grown, one label per voxel);
2. `vertebra_extents`: label volume -> a `VertebraExtent` per vertebra found (z-range, in-plane box, voxels
   per slice, centroid); `missing_vertebrae` and `extents_table` summarise them.

Conventions: volumes are (Z, H, W) with index 0 the most superior slice (so C1 comes before C7); label values
1..7 are C1..C7 (`kit.constants.SEG_LABELS`), anything else is not a cervical vertebra. Slice ranges are
inclusive (`z_first`..`z_last`), in-plane boxes half-open like numpy slices (`y0:y1`, `x0:x1`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from ..constants import N_VERTEBRAE, PROB_SCALE, VERTEBRAE
from .recipe import mm_to_slices

_FULL_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
_PLANE_8 = np.ones((3, 3), dtype=bool)  # 8-connectivity in-plane


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


#: Stage 1's clean-up threshold: a voxel belongs to a vertebra above this probability (every caller's default).
THRESHOLD = 0.5


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


#: The clean-up keeps, of each vertebra's components, the largest one on the spinal column: the largest at all
#: can be a blob elsewhere in the body that the segmenter also gives that vertebra (seen: a crescent of soft
#: tissue at the body's edge, beside the shoulders, larger than the real C6, so C6's crops showed skin; the
#: mandible as C2). The
#: column is the median in-plane centroid of the vertebrae's largest components; a component is on it when its
#: in-plane centroid lies within this share of the vertebrae's median in-plane box size, in rows and in columns.
#: True vertebrae lie within 0.15 (rows) and 0.09 (columns) of it in every segmented study of the tuning sets
#: (docs/benchmarks.md, Stage 1, "The clean-up: the component on the column").
COLUMN_TOLERANCE = 0.5


def largest_component(mask: np.ndarray, *, within: np.ndarray | None = None, gap: int = 0,
                      column: tuple[tuple[float, float], tuple[float, float]] | None = None) -> np.ndarray:
    """Keep the largest 3D connected component of a boolean mask, and optionally pieces cut off from it.

    Voxels touching by a face, an edge or a corner are connected (26-connectivity): thin bony parts
    (laminae, processes) at 64-128 px often touch only diagonally and would split otherwise.

    Args:
        mask: boolean (Z, H, W).
        within: boolean (Z,): with `gap` > 0, the other components lying wholly in these slices are kept too
            when a chain of them reaches the largest across at most `gap` empty slices, overlapping it in-plane
            (within one pixel); components touching any slice outside `within` never are.
        gap: empty slices bridged along z (0: the largest component alone).
        column: ((y, x), (dy, dx)): the component kept is the largest whose in-plane centroid lies within dy rows
            and dx columns of (y, x); the largest of all when none does.

    Returns:
        Boolean (Z, H, W), empty when `mask` is empty. Ties go to the lower component id.
    """
    out = np.zeros(mask.shape, dtype=bool)
    box, keep = _largest_in_box(mask, within, gap, column)
    if box is not None:
        out[box] = keep
    return out


def _largest_in_box(mask: np.ndarray, within: np.ndarray | None, gap: int,
                    column: tuple[tuple[float, float], tuple[float, float]] | None):
    """`largest_component`'s answer inside the bounding box of `mask`: (box, boolean array of the box's shape), or
    (None, None) when `mask` is empty."""
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box or box[0] is None:
        return None, None
    sub = mask[box[0]]  # label only inside the bounding box: much faster on thin masks
    comp, n = ndimage.label(sub, structure=_FULL_3D)
    if n <= 1:
        return box[0], sub
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    if column is not None:
        (y, x), (dy, dx) = column
        zz, yy, xx = np.nonzero(comp)  # the components' in-plane centroids from their voxels' coordinates only
        ids = comp[zz, yy, xx]
        cy = np.bincount(ids, weights=yy, minlength=n + 1)[1:] / sizes[1:] + box[0][1].start
        cx = np.bincount(ids, weights=xx, minlength=n + 1)[1:] / sizes[1:] + box[0][2].start
        far = (np.abs(cy - y) > dy) | (np.abs(cx - x) > dx)
        if not far.all():
            sizes[1:][far] = 0
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
    return box[0], keep


class _Piece:
    """A vertebra's kept voxels, `_largest_in_box`'s (box, mask) held bit-packed (the clean-up holds seven at
    once), with their count, in-plane centroid (y, x) and in-plane extent (rows, columns)."""

    def __init__(self, box: tuple[slice, ...] | None, sub: np.ndarray | None):
        self.box, self.shape = box, None if sub is None else sub.shape
        self.bits = None if sub is None else np.packbits(sub, axis=None)
        self.voxels = 0 if sub is None else int(np.count_nonzero(sub))
        if self.voxels:
            rows, cols = sub.sum(axis=(0, 2)), sub.sum(axis=(0, 1))
            y, x = np.flatnonzero(rows), np.flatnonzero(cols)
            self.centre = (float(rows @ np.arange(len(rows))) / self.voxels + box[1].start,
                           float(cols @ np.arange(len(cols))) / self.voxels + box[2].start)
            self.size = (int(y[-1] - y[0] + 1), int(x[-1] - x[0] + 1))

    def full(self, shape: tuple[int, ...]) -> np.ndarray:
        """The boolean (Z, H, W) mask."""
        out = np.zeros(shape, dtype=bool)
        if self.box is not None:
            out[self.box] = np.unpackbits(self.bits, count=int(np.prod(self.shape))).reshape(self.shape).view(bool)
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
    threshold: float = THRESHOLD,
    *,
    levels: np.ndarray | None = None,
    dz: float | None = None,
    end_threshold: float | None = END_THRESHOLD,
    column_tolerance: float | None = COLUMN_TOLERANCE,
    min_voxels: int = 1,
    return_dropped: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, str]]:
    """Turn per-vertebra probabilities into one clean label volume.

    Steps, per vertebra c (channel c = label c + 1):

    1. threshold: `probs[c] > threshold`;
    2. keep only its largest 3D connected component (26-connectivity, see `largest_component`) on the spinal
       column (`column_tolerance`: the largest at all when no component lies on it) and, given
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
            1/255 (`kit.stage1.infer.predict_vertebra_probs`; value / `PROB_SCALE` is the probability).
        threshold: probability above which a voxel belongs to a vertebra (for uint8 probs: above threshold x 255).
        levels: (7, Z) per-slice presence of C1..C7 (the level model's, `kit.stage1.infer.predict_levels`, or
            `kit.stage1.recipe.true_presence`); with `dz`, pieces of a vertebra are kept as in step 2.
        dz: the slice spacing in mm.
        end_threshold: probability above which a vertebra's end slices grow (`END_THRESHOLD`), at most `GROW_MAX_MM`
            when `dz` is given; None: no growth.
        column_tolerance: how far from the column a component's in-plane centroid may lie, as a share of the
            vertebrae's median in-plane box size (`COLUMN_TOLERANCE`); None: the largest component, wherever it is.
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
    # volume at the peak (docs/benchmarks.md, Memory), same result
    own = probs.dtype == np.uint8 or np.issubdtype(probs.dtype, np.floating)
    best = np.zeros(shape, dtype=probs.dtype if own else np.float32)
    scale = PROB_SCALE if probs.dtype == np.uint8 else 1.0
    cut = threshold * scale
    gap = 0
    reach = None if dz is None else mm_to_slices(GROW_MAX_MM, dz, within=True)  # end growth, in slices
    if levels is not None and dz is not None:
        levels = np.asarray(levels)
        if levels.shape != (N_VERTEBRAE, shape[0]):
            raise ValueError(f"levels must be ({N_VERTEBRAE}, {shape[0]}) for C1..C7; got shape {levels.shape}")
        gap = mm_to_slices(BRIDGE_MM, dz, within=True)
    dropped: dict[str, str] = {}

    def kept(c: int, column=None) -> _Piece:
        return _Piece(*_largest_in_box(probs[c] > cut, None if levels is None else levels[c] > 0.5, gap, column))

    pieces = [kept(c) for c in range(N_VERTEBRAE)]
    found = [piece for piece in pieces if piece.voxels]
    if column_tolerance is not None and len(found) >= 3:  # the column: the median centroid and in-plane size of the vertebrae's largest components
        axis = np.median([piece.centre for piece in found], axis=0)
        spread = column_tolerance * np.median([piece.size for piece in found], axis=0)
        for c, piece in enumerate(pieces):
            if piece.voxels and (np.abs(np.subtract(piece.centre, axis)) > spread).any():
                pieces[c] = kept(c, (tuple(axis), tuple(spread)))
    for c in range(N_VERTEBRAE):
        mask = pieces[c].full(shape)
        pieces[c] = None
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
