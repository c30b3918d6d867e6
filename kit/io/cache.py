"""Preprocessing cache: studies -> the arrays training needs (in-plane resampled, windowed, uint8).

One `<cache_dir>/<StudyInstanceUID>.npz` per study, written atomically, so an interrupted `kit prepare`
resumes where it stopped. Contents:

- `image` uint8 (Z, S, S): the CT in one HU window, index 0 = most superior slice;
- `mask` uint8 (Z, S, S): segmentation labels (0 background, 1..7 = C1..C7, 8+ thoracic), only when the
  study has a `segmentations/<uid>.nii` (or `.nii.gz`);
- `spacing` float32 (dz, dy, dx) in mm after resampling; `orig_hw` int32 (H, W) before it;
- `positions` float32 (Z, 3) ImagePositionPatient; `instance_numbers` int32 (Z,).

`prepare_arrays` is the one preprocessing function: `kit prepare` caches its output and inference
(`kit.stage1.infer.segment_study`, `load_prepared`) computes the same from new studies.

`manifest.csv` keeps one row per prepared study and `failures.csv` the studies that could not be read, or
whose segmentation could not be used (the image is cached all the same), with the reason. numpy / pandas
only.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import WINDOWS
from .dicom import fork_is_safe, read_mask, read_series, resize_slices, window
from .files import write_npz_atomic
from .jobs import FAILURES, Done, Ledger, run_job
from .prefetch import Prefetched
from .rsna import listed_without_folder, segmentation_path, segmented_studies

log = logging.getLogger("kit.io.cache")

MANIFEST = "manifest.csv"


def cache_path(cache_dir: str | os.PathLike, uid: str) -> Path:
    """Path of one study's cached arrays."""
    return Path(cache_dir) / f"{uid}.npz"


def prepare_arrays(series, size: int = 128, window_name: str = "bone") -> dict[str, np.ndarray]:
    """THE preprocessing of a study, for `kit prepare` and for inference alike: a `kit.io.dicom.Series` (HU) ->
    the cache's arrays (without `mask`).

    Returns:
        `image` uint8 (Z, S, S) in the HU window, in-plane resized to S = size; `spacing` float32 (dz, dy, dx)
        mm after resizing; `orig_hw` int32 (H, W) before it; `positions` float32 (Z, 3); `instance_numbers`
        int32 (Z,).
    """
    if window_name not in WINDOWS:
        raise ValueError(f"unknown window {window_name!r}; available: {', '.join(WINDOWS)}")
    z, h, w = series.hu.shape
    return {
        "image": resize_slices(window(series.hu, *WINDOWS[window_name]), size),
        "spacing": np.array([series.spacing[0], series.spacing[1] * h / size, series.spacing[2] * w / size],
                            dtype=np.float32),
        "orig_hw": np.array([h, w], dtype=np.int32),
        "positions": np.asarray(series.positions, dtype=np.float32),
        "instance_numbers": np.asarray(series.instance_numbers, dtype=np.int32),
    }


def prepare_study(
    study_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    size: int = 128,
    window_name: str = "bone",
    seg_path: str | os.PathLike | None = None,
    workers: int | None = 1,
    backend: str = "auto",
) -> dict:
    """Read one study, window and resample it (`prepare_arrays`), and save it as the cache's `.npz`.

    A segmentation that cannot be read or aligned does not cost the study its image: the image is cached
    without a mask and the reason goes into the manifest row (`mask_error`).

    Args:
        study_dir: folder of the study's DICOM files.
        out_path: where the `.npz` goes; written to a temporary name first, then renamed.
        size: in-plane output size S (square).
        window_name: a key of `kit.constants.WINDOWS`.
        seg_path: the study's segmentation NIfTI, if it has one.
        workers: decoding workers for this one study.
        backend: `kit.io.dicom.read_series`' decoder choice.

    Returns:
        One manifest row: uid, slices, original and cached shape, spacing, mask presence, mask error,
        warnings, seconds.
    """
    start = time.perf_counter()
    series = read_series(study_dir, workers=workers, backend=backend)
    arrays = prepare_arrays(series, size, window_name)
    mask_error = ""
    if seg_path is not None and Path(seg_path).is_file():
        try:
            labels = read_mask(seg_path, series)
            arrays["mask"] = resize_slices(labels.astype(np.uint8), size, nearest=True)
        except Exception as exc:  # a broken mask must not drop the image
            mask_error = f"{Path(seg_path).name}: {type(exc).__name__}: {exc}"
            log.warning("study %s: segmentation not used: %s", series.uid, mask_error)
    write_npz_atomic(out_path, arrays)
    z, h, w = series.hu.shape
    return {
        "StudyInstanceUID": series.uid,
        "slices": z,
        "rows": h,
        "cols": w,
        "size": size,
        "dz": float(series.spacing[0]),
        "dy": float(series.spacing[1]),
        "dx": float(series.spacing[2]),
        "has_mask": "mask" in arrays,
        "mask_error": mask_error,
        "warnings": " | ".join(series.warnings),
        "seconds": round(time.perf_counter() - start, 3),
    }


def load_cached(cache_dir: str | os.PathLike, uid: str) -> dict[str, np.ndarray]:
    """Load one study's cached arrays as a dict (see the module docstring for keys and shapes)."""
    path = cache_path(cache_dir, uid)
    if not path.is_file():
        raise FileNotFoundError(f"study {uid}: no cached arrays at {path}; run `kit prepare` first")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _prepare_one(args: tuple) -> tuple[str, dict | None, str | None]:
    uid, study_dir, out_path, size, window_name, seg_path, backend = args
    try:
        row = prepare_study(study_dir, out_path, size=size, window_name=window_name, seg_path=seg_path,
                            backend=backend)
        row["StudyInstanceUID"] = uid  # the folder name is the competition's key
        return uid, row, None
    except Exception as exc:  # one broken study must not stop the others
        return uid, None, f"{type(exc).__name__}: {exc}"


def prepare_studies(
    data_root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    split: str = "train",
    uids: list[str] | None = None,
    size: int = 128,
    window_name: str = "bone",
    workers: int | None = None,
    progress: bool = True,
    segmented_only: bool = False,
    time_budget: float | None = None,
) -> dict:
    """Prepare every study of a split into the cache, in parallel, resumably.

    Studies whose `.npz` already exists are skipped. A study that cannot be read is skipped, logged and
    written to `failures.csv` with the reason; the others go on. So is a training study that `train.csv`
    lists with no folder under `train_images/` (when `uids` is not given).

    Args:
        data_root: RSNA layout root (holds `<split>_images/` and `segmentations/`).
        cache_dir: output folder.
        split: "train" or "test".
        uids: restrict to these studies (default: every folder of `<split>_images/`, or with `segmented_only`
            every one that has a segmentation).
        size: in-plane output size.
        window_name: HU window, a key of `kit.constants.WINDOWS`.
        workers: processes (default: all cores).
        progress: show a tqdm bar.
        segmented_only: only the studies with a `segmentations/<uid>.nii` (or `.nii.gz`): all that stage 1
            trains on (87 of the competition's 2,019 training studies), so a full-scale cache (384 px) does not
            decode and store the ~1,900 others. A segmentation without a study folder is listed in
            `failures.csv`.
        time_budget: seconds: no study is started that would end past it; the rest are left for the next run
            (`kit.io.jobs.run_job`).

    Returns:
        Counts `prepared`, `skipped`, `failed`, `left` (not started: the time budget), the `failures`
        {uid: reason} and `seconds`.
    """
    root, cache_dir = Path(data_root), Path(cache_dir)
    image_dir = root / f"{split}_images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"no {split}_images/ folder under {root}")
    absent = {}
    if uids is None and segmented_only:
        segmented = segmented_studies(root / "segmentations")
        uids = sorted(u for u in segmented if (image_dir / u).is_dir())
        absent = {u: f"study {u}: segmented, but there is no folder {image_dir / u}" for u in sorted(segmented)
                  if u not in uids}
        log.info("%s: %d segmented studies (of %d folders)", split, len(uids),
                 sum(p.is_dir() for p in image_dir.iterdir()))
    elif uids is None:
        uids = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
        absent = listed_without_folder(root, split, Path(cache_dir) / FAILURES)  # named, not silently left out

    def jobs(todo: list[str]) -> list[tuple]:
        return [(u, image_dir / u, cache_path(cache_dir, u), size, window_name,
                 segmentation_path(root / "segmentations", u), "auto") for u in todo]

    def studies(todo: list[str]) -> Iterator[Prefetched]:  # each study read and cached in a worker process
        n = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
        return (_in_pool(jobs(todo), n) if n > 1 else
                (Prefetched(uid, row, error, 0.0) for uid, row, error in map(_prepare_one, jobs(todo))))

    def work(uid: str, row: dict, seconds: float) -> Done:  # the worker has written the study's file
        # cached, but its segmentation could not be used: listed with the reason too
        return Done(row, problem=f"segmentation: {row['mask_error']}" if row["mask_error"] else None)

    ledger = Ledger(cache_dir, MANIFEST, lambda u: cache_path(cache_dir, u))
    result = run_job(uids, ledger, work, studies=studies, desc=f"prepare {split}", progress=progress,
                     known_failures=absent, where=lambda u: image_dir / u, time_budget=time_budget)
    return {"prepared": len(result["rows"]), "skipped": result["skipped"], "failed": len(result["failures"]),
            "left": result["left"], "failures": result["failures"], "seconds": result["seconds"]}


_REREAD = "read again alone with pydicom: a reading process died while this study was in it"


def _in_pool(jobs: list[tuple], workers: int) -> Iterator[Prefetched]:
    """`_prepare_one` over `jobs` in `workers` processes, one study per process at a time; yields each outcome as
    it finishes (not in order).

    A native decoder can kill its process on a corrupt file (dicomsdl segfaults on some), which breaks the whole
    pool. The studies then in flight (at most `workers`) are read again one by one, each alone in a new process
    and with pydicom (`read_series(backend="pydicom")`, the same HU; a warning in the manifest row says so): one
    that kills that process too is reported as failed. The other studies go on in a new pool.
    """
    # fork only where it is safe (no torch loaded, main thread: kit.io.dicom.fork_is_safe), else spawn
    context = multiprocessing.get_context("fork" if fork_is_safe() else "spawn")
    todo = deque(jobs)
    while todo:
        suspects = []
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            running = {}
            while (todo or running) and not suspects:
                while todo and len(running) < workers:
                    job = todo.popleft()
                    running[pool.submit(_prepare_one, job)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        yield Prefetched(*future.result(), 0.0)
                    except BrokenProcessPool:
                        suspects.append(job)
            suspects += running.values()  # the pool is broken: these cannot finish in it
        for job in suspects:
            with ProcessPoolExecutor(1, mp_context=context) as alone:
                try:
                    uid, row, error = alone.submit(_prepare_one, (*job[:-1], "pydicom")).result()
                    if row is not None:
                        row["warnings"] = " | ".join(w for w in (_REREAD, row["warnings"]) if w)
                    yield Prefetched(uid, row, error, 0.0)
                except BrokenProcessPool:
                    yield Prefetched(job[0], None, f"its reading process died, also with pydicom alone (a native "
                                     f"decoder crashed on a corrupt file in {job[1]}, or it ran out of memory)", 0.0)


def read_manifest(cache_dir: str | os.PathLike) -> pd.DataFrame:
    """The manifest of prepared studies (one row each: slices, shape, spacing, mask presence, warnings)."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {cache_dir}; run `kit prepare` first")
    return pd.read_csv(path, dtype={"StudyInstanceUID": str, "warnings": str})


def load_prepared(source: str | os.PathLike, uid: str, *, size: int = 128, window_name: str = "bone",
                  workers: int | None = None) -> dict[str, np.ndarray]:
    """One study as the cache's arrays, from wherever it is: `source` is a folder of study folders of DICOM
    files (`<split>_images/`: read and prepared now, `prepare_arrays`) or a cache folder (`<uid>.npz`).
    numpy-only and picklable, so a prefetching worker process can run it."""
    source = Path(source)
    if (source / uid).is_dir():
        return prepare_arrays(read_series(source / uid, workers=workers), size, window_name)
    return load_cached(source, uid)
