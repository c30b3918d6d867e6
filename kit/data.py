"""What every stage's datasets share: cache access, the fold split, skipped studies, in-plane augmentation.

The augmentations are pure numpy functions (`affine_matrix`, `warp`, `adjust_intensity`, `random_affine`); the
stages wrap them (`kit.stage1.data.SegAugment`, `kit.stage2.data.augment_stack`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .sections import AugmentConfig, DataConfig
from .io.cache import load_cached
from .io.files import NPZ_ERRORS

log = logging.getLogger("kit.data")


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
    `kit.io.folds.folds_for` from `cfg.data_root` (and saved to `cfg.folds_csv` or the default path)."""
    from .io import folds as kfolds

    if cfg.folds_csv and Path(cfg.folds_csv).is_file():
        folds = kfolds.load_folds(cfg.folds_csv)
        if folds["fold"].nunique() != cfg.n_folds:
            raise ValueError(f"{cfg.folds_csv} holds {folds['fold'].nunique()} folds but data.n_folds={cfg.n_folds}")
        return folds
    return kfolds.folds_for(cfg.data_root, path=cfg.folds_csv, n_folds=cfg.n_folds, seed=cfg.folds_seed)


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
