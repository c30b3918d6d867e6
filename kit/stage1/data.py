"""Stage-1 datasets over the preprocessing cache (the only place that builds stage-1 dict samples).

A segmentation sample is one axial slice z of a study as the input recipe builds it (`kit.stage1.recipe.SegRecipe`:
its input slices, then 7 level planes when level-conditioned):

    {"image": float32 (C, S, S) in [0, 1], "target": float32 (K, S, S) multilabel one-hot of C1..C7
     (+ "other vertebra" = labels >= 8 when enabled), "uid": str, "z": int}

A level-model sample is a window of a whole study (`LevelSequenceDataset`). `SegAugment` is the thin dict
wrapper that applies the same warp to the image (linear) and the labels (nearest).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..sections import AugmentConfig, DataConfig
from ..constants import N_VERTEBRAE
from ..data import (
    adjust_intensity,
    affine_matrix,
    cached_uids,
    load_study,
    random_affine,
    skip_study,
    split_by_fold,
    warp,
)
from ..io.dicom import resize_slices
from ..io.files import NPZ_ERRORS
from .recipe import (
    LevelRecipe,
    SegRecipe,
    append_planes,
    level_presence,
    scale,
    true_presence,
)


def split_segmentation_studies(cfg: DataConfig, skipped: dict[str, str] | None = None
                               ) -> tuple[list[str], list[str]]:
    """(train, held-out) studies of `cfg.fold` among the cached studies that have a segmentation (unreadable
    files left out and recorded in `skipped`, see `cached_uids`).

    Raises:
        ValueError: a side is empty, or cached segmented studies are missing from the folds table.
    """
    uids = cached_uids(cfg.cache_dir, with_mask=True, skipped=skipped)
    return split_by_fold(cfg, uids, f"segmented studies in {cfg.cache_dir}")


def labels_to_channels(labels: np.ndarray, other_vertebrae: bool = False) -> np.ndarray:
    """Integer labels (..., H, W) -> float32 multilabel one-hot (C, ..., H, W).

    Channel c < 7 is label c+1 (C1..C7); with `other_vertebrae`, channel 7 is every label >= 8.
    """
    planes = [labels == v for v in range(1, N_VERTEBRAE + 1)]
    if other_vertebrae:
        planes.append(labels > N_VERTEBRAE)
    return np.stack(planes).astype(np.float32)


class SegAugment:
    """Dict wrapper: the same random warp on `sample["image"]` (C, H, W) float and `sample["labels"]`
    (H, W) int, then brightness/contrast on the image. Returns a new dict."""

    def __init__(self, aug: AugmentConfig, top: int = N_VERTEBRAE) -> None:
        self.aug, self.top = aug, top

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
            image, labels = crop_around_labels(image, labels, self.aug.crop, rng, self.top)
        return {**sample, "image": image, "labels": labels}


def end_slices(labels: np.ndarray, end_mm: float, dz: float) -> np.ndarray:
    """(Z,) bool: slices within `end_mm` (and at least the slice itself) of some C1..C7's first or last slice."""
    z = np.arange(len(labels))
    near = np.zeros(len(labels), dtype=bool)
    reach = end_mm / dz if dz > 0 else 0.0
    for lab in range(1, N_VERTEBRAE + 1):
        zs = np.nonzero((labels == lab).any(axis=(1, 2)))[0]
        for end in zs[:1].tolist() + zs[-1:].tolist():
            near |= np.abs(z - end) <= reach
    return near


def crop_around_labels(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator,
                       top: int = N_VERTEBRAE) -> tuple[np.ndarray, np.ndarray]:
    """A size x size patch of image (C, H, W) and labels (H, W): centred on the bounding box of the pixels
    labelled 1..top (the segmenter's targets: C1..C7, or every vertebra with the "other" channel), jittered by
    +-size/4, kept inside the slice; anywhere on a slice without them. Slices smaller than `size` are
    returned whole."""
    h, w = labels.shape
    if size >= h and size >= w:
        return image, labels
    ch, cw = min(size, h), min(size, w)
    ys, xs = np.nonzero((labels >= 1) & (labels <= top))
    origin = []
    for c, n, pos in ((ch, h, ys), (cw, w, xs)):
        if len(pos):
            centre = (pos.min() + pos.max()) / 2 + rng.uniform(-c / 4, c / 4)
            origin.append(int(np.clip(round(centre - c / 2), 0, n - c)))
        else:
            origin.append(int(rng.integers(0, n - c + 1)))
    y0, x0 = origin
    return image[..., y0:y0 + ch, x0:x0 + cw], labels[y0:y0 + ch, x0:x0 + cw]


class SegVolume(NamedTuple):
    """One segmented study in memory: image and labels uint8 (Z, S, S), slice spacing dz in mm."""

    image: np.ndarray
    labels: np.ndarray
    dz: float = 1.0


def load_volumes(cache_dir: str | os.PathLike, uids: Sequence[str], recipe: SegRecipe | LevelRecipe,
                 skipped: dict[str, str] | None = None) -> dict[str, SegVolume]:
    """{uid: SegVolume} for segmented studies, resized in-plane as the recipe does at inference (labels with
    centre-aligned nearest neighbour).

    Everything is held in memory (uint8; ~2 x Z x S^2 bytes a study), shared copy-on-write with forked
    DataLoader workers. A study whose cached file cannot be read is left out and recorded in `skipped`
    ({uid: reason}; raised without it).
    """
    volumes = {}
    for uid in uids:
        try:
            arrays = load_study(cache_dir, uid)
        except NPZ_ERRORS as exc:
            skip_study(skipped, uid, Path(cache_dir) / f"{uid}.npz", exc, "delete it and run `kit prepare` again")
            continue
        if "mask" not in arrays:
            raise ValueError(f"study {uid}: no segmentation in {cache_dir}; only segmented studies train stage 1")
        volumes[uid] = SegVolume(recipe.resize(arrays["image"]),
                                 resize_slices(arrays["mask"].astype(np.uint8), recipe.image_size, nearest=True),
                                 float(arrays["spacing"][0]))
    return volumes


class SegSliceDataset(Dataset):
    """Slices of segmented studies for the 2.5D segmenter, built by the input recipe (`kit.stage1.recipe.SegRecipe`).

    Each epoch holds a random `foreground_fraction` of the slices that show a vertebra (all of them by
    default) and a random `background_fraction` of the others, redrawn by `set_epoch` (deterministically
    from seed and epoch, so every DDP rank sees the same list; adjacent thin slices are near duplicates,
    so a fraction of them per epoch loses little).
    Augmentations draw from a generator seeded by (seed, epoch, index): a resumed run repeats them exactly.
    Without augmentation a sample's image is exactly what validation and inference give the model for that
    slice (`SegRecipe.inputs`, planes from the true ranges).

    Args:
        volumes: {uid: SegVolume}, e.g. from `load_volumes`.
        recipe: the input recipe (`SegRecipe.from_config(cfg.data)`).
        other_vertebrae: add the "other vertebra" target channel (labels >= 8); such slices then count as
            vertebra slices too.
        background_fraction: share of slices without a vertebra drawn per epoch.
        foreground_fraction: share of slices with a vertebra drawn per epoch.
        end_weight: sampling weight of a vertebra slice within `end_mm` of some vertebra's first or last
            slice, against 1 for the other vertebra slices (only matters with `foreground_fraction` < 1).
        end_mm: how near an end a slice counts as an end slice (the end slice itself always does).
        augment: augmentation ranges, or None for none. With augmentation the level planes' ends are
            jittered too (`SegRecipe.planes(..., rng)`).
        seed: base seed of the background draw and the augmentations.
    """

    def __init__(
        self,
        volumes: Mapping[str, SegVolume],
        recipe: SegRecipe,
        *,
        other_vertebrae: bool = False,
        background_fraction: float = 0.1,
        foreground_fraction: float = 1.0,
        end_weight: float = 1.0,
        end_mm: float = 2.0,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.volumes = {uid: SegVolume(*v) for uid, v in volumes.items()}
        self.recipe = recipe
        self.presence = {uid: true_presence(v.labels) for uid, v in self.volumes.items()} if recipe.level_input \
            else {}
        self.other_vertebrae = other_vertebrae
        self.background_fraction = background_fraction
        self.foreground_fraction = foreground_fraction
        top = 255 if other_vertebrae else N_VERTEBRAE
        self.augment = SegAugment(augment, top) if augment is not None and augment.enabled else None
        self.seed = seed
        self.foreground: list[tuple[str, int]] = []
        self.background: list[tuple[str, int]] = []
        weights = []
        for uid, (image, labels, dz) in self.volumes.items():
            if image.shape != labels.shape:
                raise ValueError(f"study {uid}: image {image.shape} and labels {labels.shape} differ")
            has = ((labels >= 1) & (labels <= top)).any(axis=(1, 2))
            zs = np.nonzero(has)[0]
            self.foreground += [(uid, int(z)) for z in zs]
            self.background += [(uid, int(z)) for z in np.nonzero(~has)[0]]
            if end_weight != 1.0:
                near = end_slices(labels, end_mm, dz)
                weights.append(np.where(near[zs], end_weight, 1.0))
        weights = np.concatenate(weights) if weights else None
        self.foreground_p = None if weights is None else weights / weights.sum()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the background slices and the augmentation seeds for `epoch`."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.index = []
        for pool, fraction, p in ((self.foreground, self.foreground_fraction, self.foreground_p),
                                  (self.background, self.background_fraction, None)):
            n = int(round(fraction * len(pool)))
            picked = range(len(pool)) if n == len(pool) else sorted(rng.choice(len(pool), size=n, replace=False, p=p))
            self.index += [pool[i] for i in picked]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        uid, z = self.index[i]
        image, labels, dz = self.volumes[uid]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.augment is not None else None
        planes = self.recipe.planes(self.presence[uid], dz, rng) if self.recipe.level_input else None
        if self.augment is None:
            x, target = self.recipe.inputs(image, [z], dz, planes)[0], labels[z]
        else:  # warp / crop the slices and labels together, then append the (constant) planes
            sample = self.augment({"image": scale(self.recipe.stack(image, [z], dz)[0]), "labels": labels[z]}, rng)
            x, target = sample["image"], sample["labels"]
            if planes is not None:
                x = append_planes(x[None], planes[:, z][None])[0]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "target": torch.from_numpy(labels_to_channels(target, self.other_vertebrae)),
            "uid": uid,
            "z": z,
        }


class LevelSequenceDataset(Dataset):
    """Whole segmented studies as sequences for the level model (`kit.models.level`), built by its input
    recipe (`kit.stage1.recipe.LevelRecipe`).

    Each study is sampled every `slice_mm` (`LevelRecipe.grid`); a training sample is a random window of
    `seq_len` steps (shorter studies are zero-padded, with `mask` 0 on the padding: the model skips padded
    steps, see `LevelNet.forward`), so the model also learns studies that start or stop anywhere along the
    neck. Each study appears `repeats` times per epoch. Augmentation: the step drawn from slice_mm x
    (1 +- z_jitter) (taller or shorter necks: the model must count levels, not measure millimetres),
    left-right flip and brightness/contrast, and optionally an in-plane zoom and shift of the whole window
    (`zoom`), all drawn from (seed, epoch, index).

    Args:
        volumes: {uid: SegVolume} at the level model's in-plane size.
        recipe: the level model's input recipe.
        seq_len: steps per training window; None: whole studies (batch size 1 then).
        repeats: samples per study per epoch.
        augment: augmentation on/off.
        z_jitter: relative range of the step's random stretch when augmenting.
        zoom: relative range of an in-plane zoom, and of a shift, of the whole window (0: none).
        seed: base seed.
    """

    def __init__(self, volumes: Mapping[str, SegVolume], recipe: LevelRecipe, seq_len: int | None = 64,
                 repeats: int = 1, augment: bool = True, z_jitter: float = 0.15, seed: int = 0, *,
                 zoom: float = 0.0) -> None:
        self.uids = list(volumes)
        self.recipe, self.seq_len, self.repeats = recipe, seq_len, repeats
        self.augment, self.z_jitter, self.seed = augment, z_jitter, seed
        self.zoom = zoom
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
        grid = self.recipe.grid(len(volume), dz, stretch)
        n = len(grid)
        length = n if self.seq_len is None else self.seq_len
        start = int(rng.integers(0, n - length + 1)) if n > length else 0
        # only the window's steps and the neighbours its edge steps see (clamped at the study's ends as before)
        lo, hi = max(start - self.recipe.neighbours, 0), min(start + length + self.recipe.neighbours, n)
        steps = grid[lo:hi]
        if self.augment and self.zoom > 0:  # the same zoom and shift for every step of the window
            size = volume.shape[-1]
            matrix = affine_matrix(size, size, scale=1.0 + rng.uniform(-self.zoom, self.zoom),
                                   shift=tuple(rng.uniform(-self.zoom, self.zoom, 2) * size))
            warped = np.stack([warp(np.ascontiguousarray(volume[z]), matrix) for z in steps])
            stacks = self.recipe.inputs(warped, np.arange(len(steps)))
        else:
            stacks = self.recipe.inputs(volume, steps)
        stacks = stacks[start - lo:start - lo + length]
        target = presence[grid[start:start + length]]
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
                "target": torch.from_numpy(np.ascontiguousarray(target)), "mask": torch.from_numpy(mask),
                "uid": self.uids[i % len(self.studies)]}
