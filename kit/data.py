"""torch Datasets over the preprocessing cache, and the in-plane augmentations (the only place that builds
dict samples).

A segmentation sample is one axial slice z of a study as the input recipe builds it (`kit.stage1.recipe.SegRecipe`:
its input slices, then 7 level planes when level-conditioned):

    {"image": float32 (C, S, S) in [0, 1], "target": float32 (K, S, S) multilabel one-hot of C1..C7
     (+ "other vertebra" = labels >= 8 when enabled), "uid": str, "z": int}

A level-model sample is a window of a whole study (`LevelSequenceDataset`). A classifier sample is one
vertebra's slice stack, or a whole study's seven, from the crop cache (`CropDataset`): uint8, with the intensity
change `stack_input` applies where the batch is.

The augmentations are pure numpy functions (`affine_matrix`, `warp`, `adjust_intensity`) with one thin
dict wrapper (`SegAugment`) that applies the same warp to the image (linear) and the labels (nearest).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .io.cache import load_cached
from .stage2.crops import NPZ_ERRORS, VERTEBRA_MEMBER, load_crops, load_vertebra_crops
from .config import AugmentConfig, DataConfig
from .constants import TARGETS, VERTEBRAE
from .io.dicom import resize_slices
from .stage1.recipe import LevelRecipe, SegRecipe, append_planes, level_presence, scale, true_presence

log = logging.getLogger("kit.data")

N_VERTEBRAE = len(VERTEBRAE)


# ---------------------------------------------------------------------------------------------------------
# Cache access
# ---------------------------------------------------------------------------------------------------------


def load_study(cache_dir: str | os.PathLike, uid: str) -> dict[str, np.ndarray]:
    """One study's cached arrays (`image`, optional `mask`, `spacing`, `instance_numbers`, ...)."""
    return load_cached(cache_dir, uid)


def skip_study(skipped: dict[str, str] | None, uid: str, path: str | os.PathLike, exc: BaseException,
               remedy: str) -> None:
    """Log a study whose cached file cannot be read, and record it in `skipped` ({uid: reason}) for the run's
    `skipped_studies.csv` (`kit.train`); training goes on without it. Without `skipped` the error is raised."""
    if skipped is None:
        raise exc
    skipped[uid] = f"{path}: {type(exc).__name__}: {exc}; {remedy}"
    log.warning("study %s left out: %s", uid, skipped[uid])


def cached_uids(cache_dir: str | os.PathLike, *, with_mask: bool = False,
                skipped: dict[str, str] | None = None) -> list[str]:
    """Studies in the cache, sorted; `with_mask` keeps those that have a segmentation (reads no pixels). A file
    that cannot be opened is left out and recorded in `skipped` (raised without it)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"cache folder {cache_dir} does not exist; run `kit prepare` first")
    uids = []
    for path in sorted(cache_dir.glob("*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        if with_mask:
            try:
                with np.load(path) as data:
                    if "mask" not in data.files:
                        continue
            except NPZ_ERRORS as exc:
                skip_study(skipped, path.stem, path, exc, "delete it and run `kit prepare` again")
                continue
        uids.append(path.stem)
    return uids


def read_folds(cfg: DataConfig):
    """The shared `StudyInstanceUID, fold` table: `cfg.folds_csv` if it exists, else made by
    `kit.io.rsna.folds_for` from `cfg.data_root` (and saved to `cfg.folds_csv` or the default path)."""
    from .io import rsna

    if cfg.folds_csv and Path(cfg.folds_csv).is_file():
        folds = rsna.load_folds(cfg.folds_csv)
        if folds["fold"].nunique() != cfg.n_folds:
            raise ValueError(f"{cfg.folds_csv} holds {folds['fold'].nunique()} folds but data.n_folds={cfg.n_folds}")
        return folds
    return rsna.folds_for(cfg.data_root, path=cfg.folds_csv, n_folds=cfg.n_folds, seed=cfg.folds_seed)


def split_segmentation_studies(cfg: DataConfig, skipped: dict[str, str] | None = None
                               ) -> tuple[list[str], list[str]]:
    """(train, held-out) studies of `cfg.fold` among the cached studies that have a segmentation (unreadable
    files left out and recorded in `skipped`, see `cached_uids`).

    Raises:
        ValueError: a side is empty, or cached segmented studies are missing from the folds table.
    """
    uids = cached_uids(cfg.cache_dir, with_mask=True, skipped=skipped)
    return split_by_fold(cfg, uids, f"segmented studies in {cfg.cache_dir}")


def split_by_fold(cfg, uids: Sequence[str], what: str) -> tuple[list[str], list[str]]:
    """(train, held-out) of `uids` for `cfg.fold` of the shared folds table (`read_folds(cfg)`).

    Args:
        cfg: a data config section (folds_csv, data_root, n_folds, folds_seed, fold).
        uids: the studies available to this stage.
        what: how to name them in errors, e.g. "segmented studies in cache/train".

    Raises:
        ValueError: a study has no fold, or a side is empty.
    """
    folds = read_folds(cfg)
    fold_of = dict(zip(folds["StudyInstanceUID"], folds["fold"]))
    unknown = [u for u in uids if u not in fold_of]
    if unknown:
        raise ValueError(f"{len(unknown)} {what} have no fold (e.g. {unknown[:3]}); is data.folds_csv made from "
                         "the same train table?")
    train = [u for u in uids if fold_of[u] != cfg.fold]
    held_out = [u for u in uids if fold_of[u] == cfg.fold]
    if not train or not held_out:
        raise ValueError(f"fold {cfg.fold}: {len(train)} training and {len(held_out)} held-out studies among the "
                         f"{len(uids)} {what}; need both")
    return train, held_out


# ---------------------------------------------------------------------------------------------------------
# Pure array functions
# ---------------------------------------------------------------------------------------------------------


def labels_to_channels(labels: np.ndarray, other_vertebrae: bool = False) -> np.ndarray:
    """Integer labels (..., H, W) -> float32 multilabel one-hot (C, ..., H, W).

    Channel c < 7 is label c+1 (C1..C7); with `other_vertebrae`, channel 7 is every label >= 8.
    """
    planes = [labels == v for v in range(1, N_VERTEBRAE + 1)]
    if other_vertebrae:
        planes.append(labels > N_VERTEBRAE)
    return np.stack(planes).astype(np.float32)


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


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The level model's data: whole studies at a coarse slice spacing
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The classifier's data: vertebra crops from `kit crops`
# ---------------------------------------------------------------------------------------------------------

CROP_MANIFEST = "manifest.csv"
IN_MEMORY_BYTES = 2 * 1024**3  # crop caches whose `crops` arrays add up to this are held in memory by default


def crop_uids(crop_dir: str | os.PathLike) -> list[str]:
    """Studies of the crop cache: the manifest's rows that have their `<uid>.npz`, in manifest order.

    Raises:
        FileNotFoundError: no `manifest.csv` in `crop_dir` (run `kit crops` first).
    """
    crop_dir = Path(crop_dir)
    manifest = crop_dir / CROP_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"crop cache {crop_dir} has no {CROP_MANIFEST}; run `kit crops` first")
    uids = pd.read_csv(manifest, dtype={"StudyInstanceUID": str}, usecols=["StudyInstanceUID"])["StudyInstanceUID"]
    present = [u for u in uids if (crop_dir / f"{u}.npz").is_file()]
    if len(present) < len(uids):
        log.warning("%s: %d studies of the manifest have no .npz file; left out", crop_dir, len(uids) - len(present))
    listed = set(uids)
    orphans = sorted(p.stem for p in crop_dir.glob("*.npz") if p.stem not in listed and ".tmp" not in p.name)
    if orphans:
        log.warning("%s: %d crop files have no manifest row (a build stopped between the two); left out until "
                    "`kit crops` runs again and finishes them: %s", crop_dir, len(orphans),
                    ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
    return present


def crops_nbytes(path: str | os.PathLike) -> int:
    """Bytes of a crop file's crops in memory (all seven vertebrae), read from the array headers (compressed or
    not, no pixels read); either file layout (`kit.stage2.crops.VERTEBRA_MEMBER`)."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        members = ["crops.npy"] if "crops.npy" in names else \
            [f"{VERTEBRA_MEMBER.format(v)}.npy" for v in range(N_VERTEBRAE)]
        total = 0
        for name in members:
            with archive.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return total


NO_INTENSITY = (0.0, 1.0)  # (brightness, contrast) of a stack left as it is


def augment_stack(stack: np.ndarray, rng: np.random.Generator, aug: AugmentConfig, *,
                  mask_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One random in-plane warp for a whole slice stack, and the intensity change that goes with it.

    Every slice and channel gets the same affine (`random_affine`: rotation, zoom, shift, flips); the image
    channels are warped linearly, the mask channel (the last, when `mask_channel`) with nearest neighbour so
    it stays 0/1. The stack keeps its dtype: the crop cache's uint8 is warped as uint8 and travels to the model
    as such; `stack_input` scales it and applies the brightness / contrast there (on the GPU in training), a
    quarter of the bytes through the loader and none of the float work in its workers.

    Args:
        stack: (T, C, S, S), the crop cache's uint8.
        rng: the sample's generator (draws: the affine, then brightness, then contrast).
        aug: the ranges.
        mask_channel: the last channel is a mask.

    Returns:
        (the warped stack, in the dtype it came in; float32 (2,) (brightness, contrast) for `stack_input`).
    """
    t, c, h, w = stack.shape
    n_image = c - int(mask_channel)
    matrix = random_affine(rng, h, w, aug)
    if matrix is not None:
        # plane by plane, straight into one array: 3.4x faster at 15 x 6 x 224^2 than `warp` on (T x C, S, S),
        # whose channel-last copies dominate; and cv2 rounds each plane as it does up to 4 channels (more
        # channels in one call are interpolated slightly differently)
        warped = np.empty_like(stack)
        for i in range(t):
            for j in range(c):
                cv2.warpAffine(stack[i, j], matrix, (w, h), dst=warped[i, j], borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0, flags=cv2.INTER_LINEAR if j < n_image else cv2.INTER_NEAREST)
        stack = warped
    brightness, contrast = NO_INTENSITY
    if aug.brightness or aug.contrast:
        brightness = rng.uniform(-aug.brightness, aug.brightness)
        contrast = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
    return np.ascontiguousarray(stack), np.array([brightness, contrast], dtype=np.float32)


def stack_input(image: torch.Tensor, intensity: torch.Tensor | None = None, *, mask_channel: bool = True
                ) -> torch.Tensor:
    """THE classifier's input from crop-cache stacks, in training, validation, inference and `kit explain` alike:
    uint8 / 255 in float32, then each stack's intensity change (`augment_stack`) on its image channels, clipped to
    [0, 1]; the mask channel (the last, when `mask_channel`) stays 0/1. Runs where `image` is (the GPU in training).

    Args:
        image: uint8 (..., T, C, S, S): a stack (T, C, S, S), a study (7, T, C, S, S), or batches of either.
        intensity: float32 (..., 2) (brightness, contrast) per stack, the leading dimensions of `image` before
            (T, C, S, S); None for none (`NO_INTENSITY` leaves the values as they are, bit for bit).

    Returns:
        float32, the shape of `image`.
    """
    if image.dtype != torch.uint8:
        raise TypeError(f"stack_input takes the crop cache's uint8 stacks; got {image.dtype}")
    x = image.to(torch.float32).div_(255.0)
    if intensity is None:
        return x
    lead = tuple(intensity.shape[:-1])
    if lead != tuple(x.shape[:-4]):
        raise ValueError(f"intensity {tuple(intensity.shape)} does not match stacks {tuple(x.shape)}")
    brightness, contrast = (intensity[..., i].to(x).reshape(*lead, 1, 1, 1, 1) for i in (0, 1))
    view = x[..., :x.shape[-3] - int(mask_channel), :, :]
    view.mul_(contrast).add_(brightness).clamp_(0.0, 1.0)
    return x


def reverse_stack(image: np.ndarray, n_neighbours: int, mask_channel: bool = True) -> np.ndarray:
    """A stack mirrored along z: image (T, C, S, S) -> the same layout with the slice order reversed and, within
    each window's 2n+1 neighbour channels (`kit.stage2.crops.stack_channel_names`: offsets -n..n, head to feet), the
    offsets reversed too, so the result is the stack of the z-mirrored volume; the mask channel stays last.

    Raises:
        ValueError: C is not a whole number of windows of 2n+1 channels (plus the mask).
    """
    k = 2 * int(n_neighbours) + 1
    planes = image.shape[1] - int(mask_channel)
    if planes <= 0 or planes % k:
        raise ValueError(f"a stack of {image.shape[1]} channels is not windows of {k} neighbour channels"
                         f"{' + mask' if mask_channel else ''} (n_neighbours={n_neighbours})")
    order = [w * k + (k - 1 - j) for w in range(planes // k) for j in range(k)]
    order += list(range(planes, image.shape[1]))
    return image[::-1][:, order]


class CropDataset(Dataset):
    """Vertebra slice stacks from the crop cache (`kit crops`) with their labels, for the classifier.

    Two layouts, chosen by `per_study`:

    - per vertebra (`cls_gru`, `per_study=False`): one sample per (study, vertebra)
      `{"image": uint8 (T, C, S, S), "intensity": float32 (2,), "mask": bool (T,), "label": float32 (),
      "slice_target": float32 (T,), "slice_known": bool (T,), "found": bool, "uid": str, "vertebra": int (0..6 =
      C1..C7)}`;
    - per study (`cls_patient_gru`, `per_study=True`): one sample per study
      `{"image": uint8 (7, T, C, S, S), "intensity": float32 (7, 2), "mask": bool (7, T), "vertebra_mask": bool
      (7,), "label": float32 (8,) in TARGETS order, "slice_target": float32 (7, T), "slice_known": bool (7, T),
      "found": bool (7,), "uid": str}`.

    `image` is the cached uint8 stack, warped when augmented; the model's input is `stack_input(image,
    intensity)` (/ 255 and the stack's brightness / contrast, made where the batch is: the loader ships a
    quarter of the bytes and does no float work); `mask` marks real slices (position >= 0);
    `slice_target` is 1/0 per sampled slice where boxes say so, 0 with `slice_known` False where unknown
    (a study without box rows). A vertebra not found is all zeros with `found` False: with `skip_missing`,
    per-vertebra samples leave it out (and per-study samples leave out studies with none found); the task
    predicts a fallback for it in validation. `study(uid)` gives any study's per-study sample, unaugmented.

    Augmentation (training only, `augment.enabled`): per vertebra stack, `augment_stack` (one affine for all
    slices and channels, mask nearest; the intensity change drawn, applied by `stack_input`), then a reversal along
    z with probability `reverse_slices` (`reverse_stack`: the slice order and each slice's neighbour channels;
    targets and masks reversed with it); all drawn from a generator
    seeded by (seed, epoch, index), so a resumed run repeats them exactly. An unaugmented stack may share memory
    with the in-memory cache: read it, do not write it (`stack_input` makes a new tensor).

    Args:
        crop_dir: the crop cache.
        uids: the studies.
        labels: train table (`StudyInstanceUID` + TARGETS, e.g. `kit.io.rsna.load_train`); every study needs a row.
        per_study: the per-study layout instead of per vertebra.
        skip_missing: leave out vertebrae (per study: studies) that were not found.
        mask_channel: the last channel is the vertebra's mask (warped with nearest neighbour).
        augment: augmentation ranges, or None for none.
        reverse_slices: probability of reversing a stack along z (with `augment` only, `reverse_stack`).
        n_neighbours: neighbours each side of a slice in its channels (`data.n_neighbours`); needed with
            `reverse_slices`.
        seed: base seed of the augmentations.
        skipped: {uid: reason} to record studies whose crop file cannot be read (left out, with a warning);
            None: such a file raises.
        in_memory: hold every study's arrays in memory (uint8, shared copy-on-write with forked workers);
            None: when the studies' `crops` arrays add up to at most `IN_MEMORY_BYTES` (`crops_nbytes`).
            Otherwise each sample reads its study's file (a per-vertebra sample decompresses only its own stack
            from files written since the per-vertebra layout, `kit.stage2.crops.VERTEBRA_MEMBER`; all seven from older ones).

    Raises:
        ValueError: a study lacks labels, or its crops do not fit the others (shape).
    """

    def __init__(
        self,
        crop_dir: str | os.PathLike,
        uids: Sequence[str],
        labels: pd.DataFrame,
        *,
        per_study: bool = False,
        skip_missing: bool = True,
        mask_channel: bool = True,
        augment: AugmentConfig | None = None,
        reverse_slices: float = 0.0,
        n_neighbours: int | None = None,
        seed: int = 0,
        in_memory: bool | None = None,
        skipped: dict[str, str] | None = None,
    ) -> None:
        if reverse_slices > 0 and n_neighbours is None:
            raise ValueError("reverse_slices needs n_neighbours (data.n_neighbours): each slice's neighbour channels "
                             "are reversed with the slices")
        self.crop_dir, self.uids = Path(crop_dir), list(uids)
        self.per_study, self.mask_channel = per_study, mask_channel
        self.augment = augment if augment is not None and augment.enabled else None
        self.reverse_slices, self.n_neighbours, self.seed, self.epoch = reverse_slices, n_neighbours, seed, 0
        table = labels.set_index("StudyInstanceUID")
        lacking = [u for u in self.uids if u not in table.index]
        if lacking:
            raise ValueError(f"{len(lacking)} studies of {self.crop_dir} have no labels, e.g. {lacking[:3]}; "
                             "is data.data_root the train.csv the crops were made for?")
        self.labels = {u: table.loc[u, list(TARGETS)].to_numpy(np.float32) for u in self.uids}
        nbytes, self.found = {}, {}
        for u in list(self.uids):  # a file that cannot be opened: left out and recorded (or raised)
            try:
                nbytes[u], self.found[u] = crops_nbytes(self.crop_dir / f"{u}.npz"), self._read_found(u)
            except (*NPZ_ERRORS, KeyError) as exc:  # KeyError: no `found`
                skip_study(skipped, u, self.crop_dir / f"{u}.npz", exc, "delete it and run `kit crops` again")
        self.cache = None
        if in_memory or (in_memory is None and sum(nbytes.values()) <= IN_MEMORY_BYTES):
            self.cache = {}
            for u in nbytes:
                try:
                    self.cache[u] = load_crops(self.crop_dir, u)
                except NPZ_ERRORS as exc:
                    skip_study(skipped, u, self.crop_dir / f"{u}.npz", exc, "delete it and run `kit crops` again")
        self.uids = [u for u in self.uids if u in (self.cache if self.cache is not None else nbytes)]
        if per_study:
            self.index = [(u, -1) for u in self.uids if self.found[u].any() or not skip_missing]
        else:
            self.index = [(u, v) for u in self.uids for v in range(N_VERTEBRAE)
                          if self.found[u][v] or not skip_missing]

    def _read_found(self, uid: str) -> np.ndarray:
        with np.load(self.crop_dir / f"{uid}.npz") as data:  # reads this small array only
            return data["found"].astype(bool)

    def _arrays(self, uid: str) -> dict[str, np.ndarray]:
        return self.cache[uid] if self.cache is not None else load_crops(self.crop_dir, uid)

    def set_epoch(self, epoch: int) -> None:
        """Use the augmentation draws of `epoch`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _stack(self, raw: np.ndarray, arrays: dict, v: int, rng: np.random.Generator | None
               ) -> tuple[np.ndarray, ...]:
        """Vertebra v from its uint8 stack `raw` (T, C, S, S) and the study's `found`, `positions` and
        `slice_targets` in `arrays`: image uint8 (T, C, S, S), intensity (2,), mask (T,), slice target (T,),
        known (T,), augmented by rng."""
        mask = arrays["positions"][v] >= 0
        target = arrays["slice_targets"][v]
        known = np.isfinite(target) & mask
        target = np.where(known, target, 0.0).astype(np.float32)
        image, intensity = raw, np.array(NO_INTENSITY, dtype=np.float32)
        if rng is not None and arrays["found"][v]:
            image, intensity = augment_stack(raw, rng, self.augment, mask_channel=self.mask_channel)
            if rng.random() < self.reverse_slices:
                image = reverse_stack(image, self.n_neighbours, self.mask_channel)
                mask, target, known = mask[::-1], target[::-1], known[::-1]
        return image, intensity, mask, target, known

    def _study_sample(self, uid: str, rng: np.random.Generator | None) -> dict:
        arrays = self._arrays(uid)
        parts = [self._stack(arrays["crops"][v], arrays, v, rng) for v in range(N_VERTEBRAE)]
        image, intensity, mask, target, known = (np.stack([p[i] for p in parts]) for i in range(5))
        found = arrays["found"].copy()
        return {"image": torch.from_numpy(image), "intensity": torch.from_numpy(intensity),
                "mask": torch.from_numpy(mask),
                "vertebra_mask": torch.from_numpy(found), "label": torch.from_numpy(self.labels[uid].copy()),
                "slice_target": torch.from_numpy(np.ascontiguousarray(target)),
                "slice_known": torch.from_numpy(np.ascontiguousarray(known)), "found": torch.from_numpy(found),
                "uid": uid}

    def study(self, uid: str) -> dict:
        """The per-study sample of `uid`, unaugmented (validation and OOF)."""
        if uid not in self.labels:
            raise KeyError(f"study {uid} is not in this dataset ({len(self.uids)} studies from {self.crop_dir})")
        return self._study_sample(uid, None)

    def __getitem__(self, i: int) -> dict:
        uid, v = self.index[i]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.augment is not None else None
        if self.per_study:
            return self._study_sample(uid, rng)
        if self.cache is not None:
            arrays = self.cache[uid]
            raw = arrays["crops"][v]
        else:  # from the file: this vertebra's stack only
            arrays = load_vertebra_crops(self.crop_dir, uid, v)
            raw = arrays["crops"]
        image, intensity, mask, target, known = self._stack(raw, arrays, v, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "intensity": torch.from_numpy(intensity),
                "mask": torch.from_numpy(mask.copy()),
                "label": torch.tensor(self.labels[uid][1 + v]),
                "slice_target": torch.from_numpy(np.ascontiguousarray(target)),
                "slice_known": torch.from_numpy(np.ascontiguousarray(known)),
                "found": bool(self.found[uid][v]),
                "uid": uid, "vertebra": v}
