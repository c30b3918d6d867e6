"""Tiny preprocessing caches for the segmenter tests (the cache contract of `kit.io.cache`, no DICOM step).

Each study is a (Z, S, S) uint8 volume of noise with C1..C7 and T1 stacked head to feet as discs whose
radius and brightness grow with the label, so a 2D network can tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def make_study(rng: np.random.Generator, z: int = 24, size: int = 64, levels: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (Z, S, S), labels uint8 (Z, S, S)) with labels 1..levels stacked down z."""
    image = rng.normal(25, 6, (z, size, size))
    labels = np.zeros((z, size, size), np.uint8)
    top = int(rng.integers(1, 3))
    per = max((z - top - 1) // levels, 2)
    yy, xx = np.mgrid[:size, :size]
    for lab in range(1, levels + 1):
        z0 = top + (lab - 1) * per
        z1 = min(z0 + per - 1, z)  # one gap slice between vertebrae
        if z0 >= z:
            break
        cy, cx = size / 2 + rng.uniform(-3, 3, 2)
        radius = size * (0.07 + 0.02 * lab)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        image[z0:z1, disc] = 90 + 18 * lab + rng.normal(0, 4, (z1 - z0, int(disc.sum())))
        labels[z0:z1, disc] = lab
    return np.clip(image, 0, 255).astype(np.uint8), labels


def make_cache(
    cache_dir: Path,
    n_studies: int = 6,
    *,
    n_unsegmented: int = 1,
    n_folds: int = 3,
    z: int = 24,
    size: int = 64,
    seed: int = 0,
) -> tuple[list[str], Path]:
    """Write `<uid>.npz` studies (the last `n_unsegmented` without a mask) and a folds CSV.

    Returns:
        (uids, folds_csv path). Folds go round-robin over all studies.
    """
    rng = np.random.default_rng(seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    uids = [f"1.2.826.0.1.3680043.{9000 + i}" for i in range(n_studies + n_unsegmented)]
    for i, uid in enumerate(uids):
        image, labels = make_study(rng, z=z, size=size)
        arrays = {"image": image, "spacing": np.array([1.0, 0.5, 0.5], np.float32),
                  "instance_numbers": np.arange(1, z + 1, dtype=np.int32)}
        if i < n_studies:
            arrays["mask"] = labels
        np.savez_compressed(cache_dir / f"{uid}.npz", **arrays)
    folds = pd.DataFrame({"StudyInstanceUID": uids, "fold": [i % n_folds for i in range(len(uids))]})
    folds_csv = cache_dir.parent / "folds.csv"
    folds.to_csv(folds_csv, index=False)
    return uids, folds_csv


def tiny_overrides(cache_dir: Path, folds_csv: Path, out_dir: Path, n_folds: int = 3, **extra) -> dict:
    """Overrides that turn `demo_seg` into a seconds-long CPU run on a `make_cache` cache."""
    return {
        "data.cache_dir": str(cache_dir),
        "data.folds_csv": str(folds_csv),
        "data.n_folds": n_folds,
        "data.image_size": 64,
        "data.slice_offsets_mm": [-1.0, 0.0, 1.0],
        "data.level_input": False,
        "data.background_fraction": 0.5,
        "model.encoder": "tu-mobilenetv3_small_050",
        "model.encoder_depth": 3,
        "model.decoder_width": 16,
        "train.epochs": 2,
        "train.val_every": 1,
        "train.batch_size": 8,
        "train.val_batch_size": 16,
        "train.threads": 1,
        "train.progress": False,
        "out_dir": str(out_dir),
        **extra,
    }
