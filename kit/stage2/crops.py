"""Stage-2 crop geometry: a vertebra's slice stack cut from the ORIGINAL pixel grid (numpy / OpenCV, never torch).

`slice_positions` (T slices over a vertebra), `neighbour_offsets` (each slice's +-n neighbours, spaced in mm),
`crop_box_original` (the stage-1 box mapped to original pixels), `crop_vertebra_stack` (uint8 (T, C, S, S):
windowed neighbours + the vertebra's mask); `kit.stage2.recipe.ClsRecipe.crop_study` cuts all seven of a study.

Conventions: volumes are (Z, H, W) with index 0 the most superior slice (so C1 comes before C7); label values
1..7 are C1..C7 (`kit.constants.SEG_LABELS`). Stage 1 measures extents on a "prepared" grid (Z, s, s): the
original slices resized in-plane (never in z), so z indices are shared and `scale` = (sy, sx) original pixels
per prepared pixel maps the planes, edge to edge: prepared pixels [y0, y1) cover original pixels
[y0 * sy, y1 * sy). Windowing is `kit.io.dicom.window`, the one HU -> uint8 recipe shared with the stage-1
cache, so the two stages cannot window differently.
"""

from __future__ import annotations

import numpy as np

from ..constants import WINDOWS
from ..io.dicom import window
from ..stage1.postprocess import VertebraExtent

# ---------------------------------------------------------------------------------------------------------
# Stage-2 stacks: T slices per vertebra, each as its +-n neighbours (windowed) + the vertebra's mask, cut
# from the original pixel grid.

AIR_HU = -1024.0  # what pads a box reaching past the image: the scanner's own outside-the-field value


def grid_scale(orig_hw: tuple[int, int], prepared_hw: tuple[int, int]) -> tuple[float, float]:
    """(sy, sx) original pixels per prepared pixel, e.g. (512, 512) over (128, 128) -> (4.0, 4.0)."""
    if min(*orig_hw, *prepared_hw) <= 0:
        raise ValueError(f"sizes must be positive; got orig_hw={tuple(orig_hw)}, prepared_hw={tuple(prepared_hw)}")
    return float(orig_hw[0]) / float(prepared_hw[0]), float(orig_hw[1]) / float(prepared_hw[1])


def slice_positions(extent: VertebraExtent, n_slices: int) -> np.ndarray:
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


def neighbour_offsets(dz: float, n_neighbours: int, spacing_mm: float | None = None) -> np.ndarray:
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


def stack_channel_names(windows: tuple[str, ...], n_neighbours: int, with_mask: bool = True) -> list[str]:
    """Names of the C channels of a `crop_vertebra_stack`, in order.

    Window-major: all 2n+1 slices (head to feet, offset -n..n) in the first window, then all in the
    second, ..., then the mask. So the bone-only stack is a prefix of bone + soft + ... stacks:
    ("bone", "soft"), n=1 -> ["bone-1", "bone+0", "bone+1", "soft-1", "soft+0", "soft+1", "mask"].
    """
    names = [f"{w}{k:+d}" for w in windows for k in range(-n_neighbours, n_neighbours + 1)]
    return names + ["mask"] if with_mask else names


def check_windows(windows) -> tuple[str, ...]:
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
    n_slices: int,
    n_neighbours: int,
    neighbour_mm: float | None,
    dz: float,
    size: int,
    windows: tuple[str, ...],
    margin: float,
    with_mask: bool,
    scale: tuple[float, float] | None = None,
    square: bool = True,
    pad_hu: float = AIR_HU,
) -> np.ndarray:
    """One vertebra as T slice stacks from the original HU volume: the stage-2 classifier's input. The geometry
    (n_slices ... with_mask) comes from a `kit.stage2.recipe.ClsRecipe` (`ClsRecipe.crop_vertebra`), never from
    defaults here.

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
        uint8 (T, C, S, S), C = len(windows) * (2n+1) + with_mask.
    """
    hu, labels = np.asarray(hu), np.asarray(labels)
    if hu.ndim != 3 or labels.ndim != 3 or len(hu) != len(labels):
        raise ValueError(f"hu (Z, H, W) and labels (Z, s, s) must be 3D with the same Z; got {hu.shape}, "
                         f"{labels.shape}")
    if not extent.z_last < len(hu):
        raise ValueError(f"{extent.name}: z_last={extent.z_last} outside a volume of {len(hu)} slices")
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    windows = check_windows(windows)
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



# ---------------------------------------------------------------------------------------------------------
# Per-slice targets from train_bounding_boxes.csv.
