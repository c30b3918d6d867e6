"""torch Datasets over the preprocessing cache, and the in-plane augmentations (the only place that builds
dict samples).

A segmentation sample is one axial slice z of a study with its 2k neighbours as channels:

    {"image": float32 (2k+1, S, S) in [0, 1], "target": float32 (C, S, S) multilabel one-hot of C1..C7
     (+ "other vertebra" = labels >= 8 when enabled), "uid": str, "z": int}

The augmentations are pure numpy functions (`affine_matrix`, `warp`, `adjust_intensity`) with one thin
dict wrapper (`SegAugment`) that applies the same warp to the image (linear) and the labels (nearest).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import load_cached
from .config import AugmentConfig, DataConfig
from .constants import VERTEBRAE
from .dicom import resize_slices

log = logging.getLogger("kit.data")

N_VERTEBRAE = len(VERTEBRAE)


# ---------------------------------------------------------------------------------------------------------
# Cache access
# ---------------------------------------------------------------------------------------------------------


def load_study(cache_dir: str | os.PathLike, uid: str) -> dict[str, np.ndarray]:
    """One study's cached arrays (`image`, optional `mask`, `spacing`, `instance_numbers`, ...)."""
    return load_cached(cache_dir, uid)


def cached_uids(cache_dir: str | os.PathLike, *, with_mask: bool = False) -> list[str]:
    """Studies in the cache, sorted; `with_mask` keeps those that have a segmentation (reads no pixels)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"cache folder {cache_dir} does not exist; run `kit prepare` first")
    uids = []
    for path in sorted(cache_dir.glob("*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        if with_mask:
            with np.load(path) as data:
                if "mask" not in data.files:
                    continue
        uids.append(path.stem)
    return uids


def read_folds(cfg: DataConfig):
    """The shared `StudyInstanceUID, fold` table: `cfg.folds_csv` if it exists, else made by
    `kit.rsna.folds_for` from `cfg.data_root` (and saved to `cfg.folds_csv` or the default path)."""
    from . import rsna

    if cfg.folds_csv and Path(cfg.folds_csv).is_file():
        folds = rsna.load_folds(cfg.folds_csv)
        if folds["fold"].nunique() != cfg.n_folds:
            raise ValueError(f"{cfg.folds_csv} holds {folds['fold'].nunique()} folds but data.n_folds={cfg.n_folds}")
        return folds
    return rsna.folds_for(cfg.data_root, path=cfg.folds_csv, n_folds=cfg.n_folds, seed=cfg.folds_seed)


def split_segmentation_studies(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, held-out) studies of `cfg.fold` among the cached studies that have a segmentation.

    Raises:
        ValueError: a side is empty, or cached segmented studies are missing from the folds table.
    """
    folds = read_folds(cfg)
    fold_of = dict(zip(folds["StudyInstanceUID"], folds["fold"]))
    segmented = cached_uids(cfg.cache_dir, with_mask=True)
    unknown = [u for u in segmented if u not in fold_of]
    if unknown:
        raise ValueError(f"{len(unknown)} segmented studies in {cfg.cache_dir} have no fold "
                         f"(e.g. {unknown[:3]}); is data.folds_csv made from the same train table?")
    train = [u for u in segmented if fold_of[u] != cfg.fold]
    held_out = [u for u in segmented if fold_of[u] == cfg.fold]
    if not train or not held_out:
        raise ValueError(f"fold {cfg.fold}: {len(train)} training and {len(held_out)} held-out studies with a "
                         f"segmentation among {len(segmented)} in {cfg.cache_dir}; need both")
    return train, held_out


# ---------------------------------------------------------------------------------------------------------
# Pure array functions
# ---------------------------------------------------------------------------------------------------------


def slice_stack(volume: np.ndarray, z: int, context: int, stride: int = 1,
                offsets: np.ndarray | None = None) -> np.ndarray:
    """Slices z-k*s, ..., z, ..., z+k*s of a (Z, H, W) volume as (2k+1, H, W) (k = context, s = stride), or
    slices z + offsets when `offsets` (ints) is given; indices past either end repeat the edge slice."""
    offsets = stride * np.arange(-context, context + 1) if offsets is None else np.asarray(offsets)
    return volume[np.clip(z + offsets, 0, len(volume) - 1)]


def slice_stacks(volume: np.ndarray, context: int, start: int = 0, stop: int | None = None,
                 stride: int = 1, offsets: np.ndarray | None = None) -> np.ndarray:
    """Stacks for slices start..stop-1 (stop capped at Z) at once: (n, channels, H, W), as `slice_stack`."""
    stop = len(volume) if stop is None else min(stop, len(volume))
    offsets = stride * np.arange(-context, context + 1) if offsets is None else np.asarray(offsets)
    idx = np.arange(start, stop)[:, None] + offsets[None, :]
    return volume[np.clip(idx, 0, len(volume) - 1)]


def labels_to_channels(labels: np.ndarray, other_vertebrae: bool = False) -> np.ndarray:
    """Integer labels (..., H, W) -> float32 multilabel one-hot (C, ..., H, W).

    Channel c < 7 is label c+1 (C1..C7); with `other_vertebrae`, channel 7 is every label >= 8.
    """
    planes = [labels == v for v in range(1, N_VERTEBRAE + 1)]
    if other_vertebrae:
        planes.append(labels > N_VERTEBRAE)
    return np.stack(planes).astype(np.float32)


def vertebra_ranges(labels: np.ndarray) -> np.ndarray:
    """int (7, 2): first and last slice showing C1..C7 in a (Z, H, W) label volume; (-1, -1) if absent."""
    ranges = np.full((N_VERTEBRAE, 2), -1, dtype=np.int64)
    present = level_presence(labels)
    for c in range(N_VERTEBRAE):
        zs = np.nonzero(present[:, c])[0]
        if len(zs):
            ranges[c] = zs[0], zs[-1]
    return ranges


def soft_presence(ranges: np.ndarray, z: int, dz: float, rng: np.random.Generator | None = None,
                  jitter_mm: float = 2.5, ramp_mm: float = 2.5, margin_mm: float = 0.0) -> np.ndarray:
    """float32 (7,): how much slice z is inside each vertebra's z-range, the training stand-in for the level
    model's output (`kit.infer.predict_levels`) given to a level-conditioned segmenter.

    1 well inside [first - margin_mm, last + margin_mm], 0 well outside, a linear ramp `ramp_mm` wide centred
    on each end (the level model samples every few mm and is interpolated). With `rng`, each end moves by up
    to +-jitter_mm and the value is scaled by 0.8-1, so the segmenter learns to use the prior without
    trusting its exact edges.
    """
    ramp = max(ramp_mm / dz, 1.0)
    out = np.zeros(N_VERTEBRAE, dtype=np.float32)
    for c, (first, last) in enumerate(ranges):
        if first < 0:
            continue
        first, last = float(first) - 0.5 - margin_mm / dz, float(last) + 0.5 + margin_mm / dz  # outer edges
        if rng is not None:
            first += rng.uniform(-jitter_mm, jitter_mm) / dz
            last += rng.uniform(-jitter_mm, jitter_mm) / dz
        out[c] = np.clip((z - first) / ramp + 0.5, 0, 1) * np.clip((last - z) / ramp + 0.5, 0, 1)
        if rng is not None:
            out[c] *= rng.uniform(0.8, 1.0)
    return out


def append_level_planes(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The input of a level-conditioned segmenter: slices x (B, C, H, W) followed by each sample's
    presence of C1..C7, `present` (B, 7), as 7 constant planes -> (B, C + 7, H, W) in x's dtype and device.
    Training, validation and inference all build it here, so the layout cannot drift between them."""
    return torch.cat([x, present.to(x)[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)


def true_presence(labels: np.ndarray) -> np.ndarray:
    """float32 (7, Z): 1 where slice z shows C1..C7, the level model's target in the shape of
    `kit.infer.predict_levels`' output: what a perfect level model would give a level-conditioned segmenter."""
    return np.ascontiguousarray(level_presence(labels).T)


def affine_matrix(
    height: int,
    width: int,
    *,
    angle: float = 0.0,
    scale: float = 1.0,
    shift: tuple[float, float] = (0.0, 0.0),
    hflip: bool = False,
    vflip: bool = False,
) -> np.ndarray:
    """2x3 matrix: flips, then rotation by `angle` degrees and zoom `scale` about the centre, then a shift.

    Args:
        height: image height.
        width: image width.
        angle: degrees, counter-clockwise (cv2 convention).
        scale: zoom factor.
        shift: (dx, dy) in pixels.
        hflip: mirror left-right.
        vflip: mirror top-bottom.
    """
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    flip = np.array([[-1.0 if hflip else 1.0, 0.0, (width - 1.0) if hflip else 0.0],
                     [0.0, -1.0 if vflip else 1.0, (height - 1.0) if vflip else 0.0],
                     [0.0, 0.0, 1.0]])
    rot = np.vstack([cv2.getRotationMatrix2D((cx, cy), angle, scale), [0.0, 0.0, 1.0]])
    rot[0, 2] += shift[0]
    rot[1, 2] += shift[1]
    return (rot @ flip)[:2]


def warp(array: np.ndarray, matrix: np.ndarray, *, nearest: bool = False) -> np.ndarray:
    """Apply a 2x3 affine to (H, W) or (C, H, W); outside the image becomes 0 (air / background)."""
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    h, w = array.shape[-2:]
    if array.ndim == 2:
        return cv2.warpAffine(array, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    channels_last = np.ascontiguousarray(array.transpose(1, 2, 0))
    out = cv2.warpAffine(channels_last, matrix, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(h, w, -1).transpose(2, 0, 1)


def adjust_intensity(image: np.ndarray, brightness: float = 0.0, contrast: float = 1.0) -> np.ndarray:
    """`image * contrast + brightness`, clipped to [0, 1] (image float in [0, 1])."""
    return np.clip(image * contrast + brightness, 0.0, 1.0).astype(np.float32, copy=False)


def random_affine(rng: np.random.Generator, height: int, width: int, aug: AugmentConfig) -> np.ndarray | None:
    """Draw one affine matrix from the ranges in `aug`; None when this sample is not warped."""
    if rng.random() >= aug.p_affine:
        return None
    return affine_matrix(
        height, width,
        angle=rng.uniform(-aug.rotate_deg, aug.rotate_deg),
        scale=1.0 + rng.uniform(-aug.scale, aug.scale),
        shift=(rng.uniform(-aug.shift, aug.shift) * width, rng.uniform(-aug.shift, aug.shift) * height),
        hflip=bool(rng.random() < aug.hflip),
        vflip=bool(rng.random() < aug.vflip),
    )


class SegAugment:
    """Dict wrapper: the same random warp on `sample["image"]` (C, H, W) float and `sample["labels"]`
    (H, W) int, then brightness/contrast on the image. Returns a new dict."""

    def __init__(self, aug: AugmentConfig) -> None:
        self.aug = aug

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image, labels = sample["image"], sample["labels"]
        matrix = random_affine(rng, *image.shape[-2:], self.aug)
        if matrix is not None:
            image = warp(image, matrix)
            labels = warp(labels, matrix, nearest=True)
        if self.aug.brightness or self.aug.contrast:
            image = adjust_intensity(image, rng.uniform(-self.aug.brightness, self.aug.brightness),
                                     1.0 + rng.uniform(-self.aug.contrast, self.aug.contrast))
        if self.aug.crop:
            image, labels = crop_around_labels(image, labels, self.aug.crop, rng)
        return {**sample, "image": image, "labels": labels}


def crop_around_labels(image: np.ndarray, labels: np.ndarray, size: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A size x size patch of image (C, H, W) and labels (H, W): centred on the labelled pixels' bounding
    box, jittered by +-size/4, kept inside the slice; anywhere on a slice without labels. Slices smaller
    than `size` are returned whole."""
    h, w = labels.shape
    if size >= h and size >= w:
        return image, labels
    ch, cw = min(size, h), min(size, w)
    ys, xs = np.nonzero(labels)
    origin = []
    for c, n, pos in ((ch, h, ys), (cw, w, xs)):
        if len(pos):
            centre = (pos.min() + pos.max()) / 2 + rng.uniform(-c / 4, c / 4)
            origin.append(int(np.clip(round(centre - c / 2), 0, n - c)))
        else:
            origin.append(int(rng.integers(0, n - c + 1)))
    y0, x0 = origin
    return image[..., y0:y0 + ch, x0:x0 + cw], labels[y0:y0 + ch, x0:x0 + cw]


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


class SegVolume(NamedTuple):
    """One segmented study in memory: image and labels uint8 (Z, S, S), slice spacing dz in mm."""

    image: np.ndarray
    labels: np.ndarray
    dz: float = 1.0


def context_step(dz: float, context_stride: int = 1, context_mm: float | None = None) -> int:
    """Slices between neighbouring input channels of one study.

    With `context_mm`, round(context_mm / dz) (at least 1): the 2k+1 input slices then span the same height
    in millimetres whatever the study's slice spacing (0.5-1.0 mm in the competition). Else `context_stride`.
    """
    if context_mm is None:
        return int(context_stride)
    return max(1, int(round(context_mm / float(dz))))


def context_offsets(dz: float, context: int = 2, context_stride: int = 1, context_mm: float | None = None,
                    offsets_mm: Sequence[float] | None = None) -> np.ndarray:
    """Slice offsets (ints, centre = 0) of the input channels for one study of slice spacing `dz`.

    With `offsets_mm`, each offset in mm divided by dz and rounded, non-zero ones to at least one slice:
    e.g. [-30, -15, -2, 0, 2, 15, 30] sees fine detail next to the slice and landmarks two levels away in
    seven channels. Else evenly spaced: `context_step(...) * (-k..k)`.
    """
    if offsets_mm is None:
        return context_step(dz, context_stride, context_mm) * np.arange(-context, context + 1)
    raw = np.asarray(offsets_mm, dtype=float) / float(dz)
    return (np.sign(raw) * np.where(raw == 0, 0, np.maximum(1, np.round(np.abs(raw))))).astype(int)


def n_input_slices(context: int, offsets_mm: Sequence[float] | None = None) -> int:
    """Slices in the 2.5D segmenter's input: 2k+1, or one per entry of `offsets_mm` (a level-conditioned
    segmenter has N_VERTEBRAE more input channels, see `SegSliceDataset`)."""
    return 2 * int(context) + 1 if offsets_mm is None else len(offsets_mm)


def load_volumes(cache_dir: str | os.PathLike, uids: Sequence[str], image_size: int) -> dict[str, SegVolume]:
    """{uid: SegVolume} for segmented studies, resized in-plane to image_size.

    Everything is held in memory (uint8; ~2 x Z x S^2 bytes a study), shared copy-on-write with forked
    DataLoader workers.
    """
    volumes = {}
    for uid in uids:
        arrays = load_study(cache_dir, uid)
        if "mask" not in arrays:
            raise ValueError(f"study {uid}: no segmentation in {cache_dir}; only segmented studies train the segmenter")
        volumes[uid] = SegVolume(resize_slices(arrays["image"], image_size),
                                 resize_slices(arrays["mask"].astype(np.uint8), image_size, nearest=True),
                                 float(arrays["spacing"][0]))
    return volumes


class SegSliceDataset(Dataset):
    """Slices of segmented studies for the 2.5D segmenter.

    Each epoch holds a random `foreground_fraction` of the slices that show a vertebra (all of them by
    default) and a random `background_fraction` of the others, redrawn by `set_epoch` (deterministically
    from seed and epoch, so every DDP rank sees the same list; adjacent thin slices are near duplicates,
    so a fraction of them per epoch loses little).
    Augmentations draw from a generator seeded by (seed, epoch, index): a resumed run repeats them exactly.

    Args:
        volumes: {uid: SegVolume}, e.g. from `load_volumes`.
        context: k; the input holds 2k+1 slices.
        context_stride: slices between neighbouring input channels.
        context_mm: when set, the step is round(context_mm / dz) per study instead (`context_step`).
        offsets_mm: explicit channel offsets in mm instead of k and the step (`context_offsets`).
        other_vertebrae: add the "other vertebra" target channel (labels >= 8); such slices then count as
            vertebra slices too.
        background_fraction: share of slices without a vertebra drawn per epoch.
        foreground_fraction: share of slices with a vertebra drawn per epoch.
        augment: augmentation ranges, or None for none.
        seed: base seed of the background draw and the augmentations.
        level_input: append 7 constant planes, the slice's presence of C1..C7 (`soft_presence` of the true
            ranges, jittered when augmenting), for a segmenter conditioned on the level model.
        level_jitter_mm: how far the ends of those ranges move when augmenting.
        level_ramp_mm: width of the presence ramps (`soft_presence`).
        level_margin_mm: how far those ranges are widened at each end (`soft_presence`).
    """

    def __init__(
        self,
        volumes: Mapping[str, SegVolume],
        context: int = 2,
        *,
        context_stride: int = 1,
        context_mm: float | None = None,
        offsets_mm: Sequence[float] | None = None,
        other_vertebrae: bool = False,
        background_fraction: float = 0.1,
        foreground_fraction: float = 1.0,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        level_input: bool = False,
        level_jitter_mm: float = 2.5,
        level_ramp_mm: float = 2.5,
        level_margin_mm: float = 0.0,
    ) -> None:
        self.volumes = {uid: SegVolume(*v) for uid, v in volumes.items()}
        self.level_input, self.level_jitter_mm, self.level_ramp_mm = level_input, level_jitter_mm, level_ramp_mm
        self.level_margin_mm = level_margin_mm
        self.ranges = {uid: vertebra_ranges(v.labels) for uid, v in self.volumes.items()} if level_input else {}
        self.context = context
        self.offsets = {uid: context_offsets(v.dz, context, context_stride, context_mm, offsets_mm)
                        for uid, v in self.volumes.items()}
        self.other_vertebrae = other_vertebrae
        self.background_fraction = background_fraction
        self.foreground_fraction = foreground_fraction
        self.augment = SegAugment(augment) if augment is not None and augment.enabled else None
        self.seed = seed
        self.foreground: list[tuple[str, int]] = []
        self.background: list[tuple[str, int]] = []
        top = 255 if other_vertebrae else N_VERTEBRAE
        for uid, (image, labels, _) in self.volumes.items():
            if image.shape != labels.shape:
                raise ValueError(f"study {uid}: image {image.shape} and labels {labels.shape} differ")
            has = ((labels >= 1) & (labels <= top)).any(axis=(1, 2))
            self.foreground += [(uid, int(z)) for z in np.nonzero(has)[0]]
            self.background += [(uid, int(z)) for z in np.nonzero(~has)[0]]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the background slices and the augmentation seeds for `epoch`."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.index = []
        for pool, fraction in ((self.foreground, self.foreground_fraction), (self.background, self.background_fraction)):
            n = int(round(fraction * len(pool)))
            picked = range(len(pool)) if n == len(pool) else sorted(rng.choice(len(pool), size=n, replace=False))
            self.index += [pool[i] for i in picked]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        uid, z = self.index[i]
        image, labels, _ = self.volumes[uid]
        stack = slice_stack(image, z, self.context, offsets=self.offsets[uid])
        sample = {"image": stack.astype(np.float32) / 255.0, "labels": labels[z]}
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.augment is not None:
            sample = self.augment(sample, rng)
        image = torch.from_numpy(np.ascontiguousarray(sample["image"], dtype=np.float32))
        if self.level_input:
            present = soft_presence(self.ranges[uid], z, self.volumes[uid].dz,
                                    rng if self.augment is not None else None, self.level_jitter_mm,
                                    self.level_ramp_mm, self.level_margin_mm)
            image = append_level_planes(image[None], torch.from_numpy(present)[None])[0]
        return {
            "image": image,
            "target": torch.from_numpy(labels_to_channels(sample["labels"], self.other_vertebrae)),
            "uid": uid,
            "z": z,
        }


def n_seg_classes(other_vertebrae: bool) -> int:
    """Output channels of the segmenter: 7 (C1..C7) + 1 with the "other vertebra" channel."""
    return N_VERTEBRAE + int(other_vertebrae)



# ---------------------------------------------------------------------------------------------------------
# The level model's data: whole studies at a coarse slice spacing
# ---------------------------------------------------------------------------------------------------------


def level_grid(n_slices: int, dz: float, slice_mm: float) -> np.ndarray:
    """Native slice indices nearest to 0, slice_mm, 2 x slice_mm, ... mm from the first slice (the level
    model's steps); at least one."""
    step = max(float(slice_mm) / float(dz), 1.0)
    return np.unique(np.clip(np.round(np.arange(0.0, n_slices - 0.5, step)), 0, n_slices - 1).astype(int))


def level_stacks(volume: np.ndarray, grid: np.ndarray, neighbours: int = 1) -> np.ndarray:
    """(T, 2n+1, H, W): each step's slice with its n neighbouring steps on either side as channels (clamped)."""
    steps = np.clip(np.arange(len(grid))[:, None] + np.arange(-neighbours, neighbours + 1)[None, :], 0, len(grid) - 1)
    return volume[grid[steps]]


def level_presence(labels: np.ndarray) -> np.ndarray:
    """float32 (Z, 7): 1 where slice z shows vertebra C1..C7 (labels 1..7) at all."""
    present = np.zeros((len(labels), N_VERTEBRAE), dtype=np.float32)
    for c in range(N_VERTEBRAE):
        present[:, c] = (labels == c + 1).any(axis=(1, 2))
    return present


class LevelSequenceDataset(Dataset):
    """Whole segmented studies as sequences for the level model (`kit.models.level`).

    Each study is sampled every `slice_mm` (`level_grid`); a training sample is a random window of `seq_len`
    steps (shorter studies are zero-padded, with `mask` 0 on the padding), so the model also learns
    studies that start or stop anywhere along the neck. Each study appears `repeats` times per epoch.
    Augmentation: the step drawn from slice_mm x (1 +- z_jitter) (taller or shorter necks: the model must
    count levels, not measure millimetres), left-right flip and brightness/contrast, all drawn from
    (seed, epoch, index).

    Args:
        volumes: {uid: SegVolume} at the level model's in-plane size.
        slice_mm: spacing of the steps in mm.
        neighbours: n; each step's input holds 2n+1 steps.
        seq_len: steps per training window; None: whole studies (batch size 1 then).
        repeats: samples per study per epoch.
        augment: augmentation on/off.
        z_jitter: relative range of the step's random stretch when augmenting.
        seed: base seed.
    """

    def __init__(self, volumes: Mapping[str, SegVolume], slice_mm: float = 2.5, neighbours: int = 1,
                 seq_len: int | None = 64, repeats: int = 1, augment: bool = True, z_jitter: float = 0.15,
                 seed: int = 0) -> None:
        self.uids = list(volumes)
        self.slice_mm, self.neighbours, self.seq_len, self.repeats = slice_mm, neighbours, seq_len, repeats
        self.augment, self.z_jitter, self.seed = augment, z_jitter, seed
        self.studies = [(v.image, level_presence(v.labels), v.dz) for v in volumes.values()]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.studies) * self.repeats

    def __getitem__(self, i: int) -> dict:
        volume, presence, dz = self.studies[i % len(self.studies)]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        stretch = 1.0 + rng.uniform(-self.z_jitter, self.z_jitter) if self.augment else 1.0
        grid = level_grid(len(volume), dz, self.slice_mm * stretch)
        n = len(grid)
        length = n if self.seq_len is None else self.seq_len
        start = int(rng.integers(0, n - length + 1)) if n > length else 0
        stacks = level_stacks(volume, grid, self.neighbours)[start:start + length].astype(np.float32) / 255.0
        target = presence[grid][start:start + length]
        if self.augment:
            if rng.random() < 0.5:
                stacks = stacks[..., ::-1]
            stacks = adjust_intensity(stacks, rng.uniform(-0.1, 0.1), 1.0 + rng.uniform(-0.1, 0.1))
        mask = np.ones(length, dtype=np.float32)
        if len(stacks) < length:  # pad a short study
            pad = length - len(stacks)
            stacks = np.concatenate([stacks, np.zeros((pad, *stacks.shape[1:]), np.float32)])
            target = np.concatenate([target, np.zeros((pad, N_VERTEBRAE), np.float32)])
            mask[length - pad:] = 0.0
        return {"image": torch.from_numpy(np.ascontiguousarray(stacks, dtype=np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(target)), "mask": torch.from_numpy(mask)}
