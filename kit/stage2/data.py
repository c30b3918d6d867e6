"""Stage-2 dataset: cached vertebra crops -> slice stacks with slice and vertebra targets.

A classifier sample is one vertebra's slice stack, or a whole study's seven, from the crop cache
(`CropDataset`): uint8, with the intensity change `stack_input` applies where the batch is.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..sections import AugmentConfig
from ..constants import N_VERTEBRAE, TARGETS
from ..data import random_affine, skip_study
from ..io.files import NPZ_ERRORS
from .store import VERTEBRA_MEMBER, load_crops, load_vertebra_crops

CROP_MANIFEST = "manifest.csv"

log = logging.getLogger("kit.stage2.data")


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
    not, no pixels read); either file layout (`kit.stage2.store.VERTEBRA_MEMBER`)."""
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
        # plane by plane, straight into one array: faster than `warp` on (T x C, S, S), whose channel-last copies
        # dominate (docs/benchmarks.md, Stage 2, "The crops"); and cv2 rounds each plane as it does up to 4
        # channels (more channels in one call are interpolated slightly differently)
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
            from files written since the per-vertebra layout, `kit.stage2.store.VERTEBRA_MEMBER`; all seven from older ones).

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
