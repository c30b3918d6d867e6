"""THE input recipe of stage 1: which slices a model sees, at what size and scale, with which level planes.

Training (`kit.data` datasets), validation (`kit.tasks`) and inference (`kit.stage1.infer`) build every model input
by calling a recipe made from the typed config, and nothing else, so the three cannot drift apart:

    recipe = SegRecipe.from_config(cfg.data)
    volume = recipe.resize(cached["image"])                         # uint8 (Z, S, S)
    planes = recipe.planes(presence, dz)                            # float32 (7, Z), level-conditioned only
    x = recipe.inputs(volume, centres, dz, planes)                  # float32 (n, C, S, S)

- **Slices**: offsets in mm from the slice segmented (`data.slice_offsets_mm`), rounded per study to whole
  slices (`offsets_to_slices`); indices past either end repeat the edge slice.
- **Scale**: uint8 / 255 in float32.
- **Level planes** (a level-conditioned segmenter): 7 constant planes, each slice's presence of C1..C7. The
  presence (7, Z) comes from the true labels in training and validation (`true_presence`) and from the level
  model at inference (`kit.stage1.infer.predict_levels`); `SegRecipe.planes` treats both alike: widened along z by
  `level_margin_mm` at each end, then smoothed by a box `level_ramp_mm` wide centred on each slice, so a step
  becomes a linear ramp centred on the vertebra's end. Training also moves each end by up to
  `level_jitter_mm` and scales each vertebra by 0.8-1 (`rng`).
- **The level model** (`LevelRecipe`): the study sampled every `slice_mm` (`grid`), each step with its
  `neighbours` steps on either side as channels.

numpy / scipy only: never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..constants import N_VERTEBRAE


def round_half_up(x: float) -> int:
    """Nearest integer, halves away from zero (Python's round() sends 2.5 to 2)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def mm_to_slices(mm: float, dz: float, *, within: bool = False) -> int:
    """The kit's one rule from millimetres to whole slices at slice spacing `dz` mm: the nearest count, halves away
    from zero (2.5 -> 3). `within=True`: the most whole slices that fit inside `mm` (4 mm at 1.3333 mm is 3,
    rounding error aside), for a reach that must not pass the distance.

    Raises:
        ValueError: dz not > 0.
    """
    if dz is None or not float(dz) > 0:
        raise ValueError(f"slice spacing dz must be > 0 mm; got {dz}")
    ratio = float(mm) / float(dz)
    if within:
        return int(math.copysign(math.floor(abs(ratio) + 1e-6), ratio))
    return round_half_up(ratio)


# ---------------------------------------------------------------------------------------------------------
# Slices
# ---------------------------------------------------------------------------------------------------------


def offsets_to_slices(offsets_mm: Sequence[float], dz: float) -> np.ndarray:
    """int (C,): offsets in mm -> whole slices of a study with slice spacing `dz` mm; a non-zero offset is at
    least one slice, so no channel collapses onto the centre on thick slices."""
    if dz is None or not dz > 0:
        raise ValueError(f"slice spacing dz must be > 0 mm; got {dz}")
    out = []
    for off in offsets_mm:
        n = mm_to_slices(off, dz)
        out.append(0 if off == 0 else int(math.copysign(max(1, abs(n)), off)))
    return np.asarray(out, dtype=np.int64)


def stack_slices(volume: np.ndarray, centres: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n, C, H, W) of `volume`'s dtype: for each centre z, slices z + offsets (clamped to the volume)."""
    idx = np.asarray(centres, dtype=np.int64)[:, None] + np.asarray(offsets, dtype=np.int64)[None, :]
    return volume[np.clip(idx, 0, len(volume) - 1)]


def scale(stack: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return stack.astype(np.float32) / np.float32(255.0)


def append_planes(x: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Slices x (n, C, H, W) followed by each sample's presence of C1..C7, `present` (n, 7), as 7 constant
    planes -> float32 (n, C + 7, H, W)."""
    n, _, h, w = x.shape
    planes = np.broadcast_to(np.asarray(present, dtype=np.float32)[:, :, None, None], (n, N_VERTEBRAE, h, w))
    return np.concatenate([x, planes], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Presence of C1..C7 per slice
# ---------------------------------------------------------------------------------------------------------


def level_presence(labels: np.ndarray) -> np.ndarray:
    """float32 (Z, 7): 1 where slice z shows vertebra C1..C7 (labels 1..7) at all."""
    present = np.zeros((len(labels), N_VERTEBRAE), dtype=np.float32)
    for c in range(N_VERTEBRAE):
        present[:, c] = (labels == c + 1).any(axis=(1, 2))
    return present


def true_presence(labels: np.ndarray) -> np.ndarray:
    """float32 (7, Z): 1 where slice z shows C1..C7, in the shape of `kit.stage1.infer.predict_levels`' output: what a
    perfect level model would give."""
    return np.ascontiguousarray(level_presence(labels).T)


def vertebra_ranges(presence: np.ndarray) -> np.ndarray:
    """int (7, 2): first and last slice where each row of a (7, Z) presence is > 0.5; (-1, -1) if never."""
    ranges = np.full((len(presence), 2), -1, dtype=np.int64)
    for c, row in enumerate(presence):
        zs = np.nonzero(row > 0.5)[0]
        if len(zs):
            ranges[c] = zs[0], zs[-1]
    return ranges


def ramp_weights(width: float) -> np.ndarray:
    """float64 (2m+1,): a box `width` slices wide centred on slice 0, as the share of each slice's unit cell
    inside it. Convolving a 0/1 range with it gives a linear ramp `width` slices wide centred on each end
    (0.5 exactly at the end's cell edge), for any width, odd or even. Width <= 1: the identity."""
    if width <= 1.0:
        return np.ones(1)
    half = width / 2.0
    m = math.ceil(half - 0.5)
    k = np.arange(-m, m + 1, dtype=np.float64)
    overlap = np.clip(np.minimum(k + 0.5, half) - np.maximum(k - 0.5, -half), 0.0, None)
    return overlap / width


def smooth_presence(presence: np.ndarray, width: float) -> np.ndarray:
    """(7, Z) presence smoothed along z by `ramp_weights(width)`; beyond the ends the edge value repeats."""
    weights = ramp_weights(width)
    if len(weights) == 1:
        return presence.astype(np.float32, copy=True)
    return ndimage.correlate1d(presence.astype(np.float64), weights, axis=1, mode="nearest").astype(np.float32)


def dilate_presence(presence: np.ndarray, n: int) -> np.ndarray:
    """(7, Z) presence widened by n slices at each end (a running maximum 2n+1 slices wide)."""
    if n <= 0:
        return presence.astype(np.float32, copy=True)
    return ndimage.maximum_filter1d(presence.astype(np.float32), size=2 * n + 1, axis=1, mode="nearest")


def jitter_presence(presence: np.ndarray, dz: float, jitter_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A 0/1 (7, Z) presence whose range ends each moved by a whole number of slices drawn from +-jitter_mm
    (the level model's error, for training); a vertebra never vanishes (its range keeps >= 1 slice)."""
    out = np.zeros_like(presence, dtype=np.float32)
    z = presence.shape[1]
    reach = jitter_mm / dz
    for c, (first, last) in enumerate(vertebra_ranges(presence)):
        if first < 0:
            continue
        a = first + round_half_up(rng.uniform(-reach, reach))
        b = last + round_half_up(rng.uniform(-reach, reach))
        a, b = int(np.clip(a, 0, z - 1)), int(np.clip(b, 0, z - 1))
        lo, hi = min(a, b), max(a, b)
        out[c, lo:hi + 1] = 1.0
    return out


# ---------------------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------------------


def _resize(volume: np.ndarray, size: int) -> np.ndarray:
    from ..io.dicom import resize_slices

    return resize_slices(volume, size)


@dataclass(frozen=True)
class SegRecipe:
    """The 2.5D segmenter's input, built from `DataConfig` (`from_config`).

    Attributes:
        offsets_mm: input slices as offsets in mm from the slice segmented (ascending, 0 included).
        image_size: in-plane size S.
        level_input: 7 level planes follow the slices.
        level_margin_mm: presence ranges widened by this much at each end.
        level_ramp_mm: width of the ramps at the ends.
        level_jitter_mm: training moves each end by up to this much.
    """

    offsets_mm: tuple[float, ...]
    image_size: int
    level_input: bool = False
    level_margin_mm: float = 0.0
    level_ramp_mm: float = 2.5
    level_jitter_mm: float = 2.5

    @classmethod
    def from_config(cls, data) -> SegRecipe:
        """From a `kit.sections.DataConfig` (a run's typed config section)."""
        return cls(tuple(float(v) for v in data.slice_offsets_mm), int(data.image_size), bool(data.level_input),
                   float(data.level_margin_mm), float(data.level_ramp_mm), float(data.level_jitter_mm))

    @property
    def n_slices(self) -> int:
        """Input slices."""
        return len(self.offsets_mm)

    @property
    def n_channels(self) -> int:
        """Model input channels: the slices, then 7 level planes when conditioned."""
        return self.n_slices + N_VERTEBRAE * int(self.level_input)

    def offsets(self, dz: float) -> np.ndarray:
        """int (n_slices,) slice offsets for a study of slice spacing dz mm."""
        return offsets_to_slices(self.offsets_mm, dz)

    def resize(self, volume: np.ndarray) -> np.ndarray:
        """(Z, H, W) image -> (Z, S, S) (`kit.io.dicom.resize_slices`)."""
        return _resize(volume, self.image_size)

    def planes(self, presence: np.ndarray, dz: float, rng: np.random.Generator | None = None) -> np.ndarray:
        """float32 (7, Z): the level planes of every slice from a (7, Z) presence (true 0/1 ranges, or the level
        model's probabilities): jittered when `rng` is given (training), widened by the margin, ramped, and,
        with `rng`, each vertebra scaled by a factor in 0.8-1."""
        presence = np.asarray(presence, dtype=np.float32)
        if presence.ndim != 2 or presence.shape[0] != N_VERTEBRAE:
            raise ValueError(f"presence must be ({N_VERTEBRAE}, Z); got {presence.shape}")
        if rng is not None and self.level_jitter_mm > 0:
            presence = jitter_presence(presence, dz, self.level_jitter_mm, rng)
        out = smooth_presence(dilate_presence(presence, mm_to_slices(self.level_margin_mm, dz)),
                              self.level_ramp_mm / dz)
        if rng is not None:
            out *= rng.uniform(0.8, 1.0, size=(N_VERTEBRAE, 1)).astype(np.float32)
        return out

    def inputs(self, volume: np.ndarray, centres: Sequence[int] | np.ndarray, dz: float,
               planes: np.ndarray | None = None) -> np.ndarray:
        """float32 (n, C, S, S): the model input for slices `centres` of a resized uint8 volume (Z, S, S).

        Args:
            volume: uint8 (Z, S, S), from `resize`.
            centres: slice indices to segment.
            dz: slice spacing in mm.
            planes: (7, Z) from `planes`, required when `level_input`.
        """
        x = scale(self.stack(volume, centres, dz))
        if not self.level_input:
            return x
        if planes is None:
            raise ValueError("this segmenter is level-conditioned (data.level_input): give the level planes")
        return append_planes(x, np.asarray(planes)[:, np.asarray(centres, dtype=np.int64)].T)

    def stack(self, volume: np.ndarray, centres: Sequence[int] | np.ndarray, dz: float) -> np.ndarray:
        """uint8 (n, n_slices, S, S): the input slices of each centre, unscaled (for augmentation)."""
        return stack_slices(volume, np.asarray(centres), self.offsets(dz))

    def batches(self, volume: np.ndarray, dz: float, planes: np.ndarray | None, batch_size: int,
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(centres, inputs) for every slice of the volume in order, `batch_size` slices at a time: what
        validation and inference feed the model."""
        for start in range(0, len(volume), batch_size):
            centres = np.arange(start, min(start + batch_size, len(volume)))
            yield centres, self.inputs(volume, centres, dz, planes)


@dataclass(frozen=True)
class LevelRecipe:
    """The level model's input, built from `LevelDataConfig` (`from_config`).

    Attributes:
        slice_mm: spacing of the steps along the study.
        neighbours: n; each step sees 2n+1 steps as channels.
        image_size: in-plane size.
        tta_flip: the model's presence is the mean over the study and its left-right mirror
            (`kit.models.level.level_presence_probs`).
    """

    slice_mm: float
    neighbours: int
    image_size: int
    tta_flip: bool

    @classmethod
    def from_config(cls, data) -> LevelRecipe:
        """From a `kit.stage1.config.LevelDataConfig`."""
        return cls(float(data.slice_mm), int(data.neighbours), int(data.image_size), bool(data.tta_flip))

    @property
    def n_channels(self) -> int:
        return 2 * self.neighbours + 1

    def resize(self, volume: np.ndarray) -> np.ndarray:
        """(Z, H, W) -> (Z, S, S) at the level model's size."""
        return _resize(volume, self.image_size)

    def grid(self, n_slices: int, dz: float, stretch: float = 1.0) -> np.ndarray:
        """Slice indices nearest to 0, step, 2 x step, ... mm from the first slice (step = slice_mm x stretch);
        at least one."""
        step = max(self.slice_mm * stretch / float(dz), 1.0)
        return np.unique(np.clip(np.round(np.arange(0.0, n_slices - 0.5, step)), 0, n_slices - 1).astype(int))

    def inputs(self, volume: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """float32 (T, 2n+1, S, S): each step's slice with its n neighbouring steps either side (clamped)."""
        steps = np.arange(len(grid))[:, None] + np.arange(-self.neighbours, self.neighbours + 1)[None, :]
        return scale(volume[grid[np.clip(steps, 0, len(grid) - 1)]])
