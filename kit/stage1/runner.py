"""Batch runs over a split: `segment_studies` segments every study, resumably, one failure never stopping the
rest, and keeps what it found in `<out>/<uid>.{npz,json}` (`kit.stage1.results`) with `summary.csv`,
`failures.csv` and `missing.csv`.

Studies are read and prepared (`kit.io.cache.load_prepared`: numpy only) ahead of the model: in a separate
worker process started with spawn when `prefetch` is on, never by forking from a thread of this torch
process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from ..constants import SEGMENTER
from ..io.cache import load_prepared
from ..io.jobs import Done, Ledger, read_ahead, run_job
from ..runs import load_run
from .infer import segment_study
from .postprocess import THRESHOLD
from .results import save_seg_result
from ..paths import PathLike

log = logging.getLogger("kit.stage1.runner")

MISSING = "missing.csv"
SUMMARY = "summary.csv"
SUMMARY_COLUMNS = ("StudyInstanceUID", "slices", "found", "missing", "dropped", "seconds")
MISSING_COLUMNS = ["StudyInstanceUID", "missing", "dropped"]


def study_source(source: Path, split: str) -> tuple[Path, list[str]]:
    """(folder, uids): the `<split>_images/` folder of a data root, or a cache folder of `.npz` files
    (`<source>/<split>/` or `<source>` itself)."""
    if (source / f"{split}_images").is_dir():
        images = source / f"{split}_images"
        return images, sorted(p.name for p in images.iterdir() if p.is_dir())
    for cache in (source / split, source):
        uids = sorted(p.name[:-4] for p in cache.glob("*.npz") if not p.name.endswith(".tmp.npz"))
        if uids:
            return cache, uids
    raise FileNotFoundError(f"{source} is neither a data root with {split}_images/ nor a cache folder of .npz files")


def segment_studies(
    source: PathLike,
    run_dirs: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    *,
    split: str = "train",
    uids: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    threshold: float = THRESHOLD,
    progress: bool = True,
    prefetch: bool = True,
    time_budget: float | None = None,
) -> dict:
    """Segment every study of a split, resumably, one failure never stopping the rest.

    Studies with their `<out_dir>/<uid>.json` and a row in `summary.csv` are skipped (`kit.io.jobs`). A study
    that fails (unreadable DICOM, NaN output, ...) is logged and listed in `failures.csv` with the error; studies
    where a vertebra was not found go to `missing.csv`; every segmented study gets a row in `summary.csv`
    (slices, vertebrae found, seconds). A study that succeeds on a later run leaves `failures.csv`. Each study's
    rows are written as soon as its files are: a run killed at any point loses at most the study it was on.

    Args:
        source: a data root in RSNA layout (`<split>_images/<uid>/*.dcm`) or a cache folder of `kit.io.cache`
            `.npz` files (`<source>/<split>/` or `<source>/` itself).
        run_dirs: one or more run folders (`runs/<config name>`); all their folds form the ensemble, and
            level-model runs among them are used for the levels (`segment_study`).
        out_dir: where `<uid>.npz` / `<uid>.json` and the CSVs go.
        split: "train" or "test".
        uids: restrict to these studies (default: all in the split).
        batch_size: slices per forward pass (default `kit.stage1.infer.stage1_batch_size`).
        device: default CUDA when available, else CPU.
        amp: autocast on CUDA (default on there).
        threshold: clean-up probability threshold.
        progress: show a tqdm bar.
        prefetch: read the next study in a spawned worker process while the current one is segmented.
        time_budget: seconds: no study is started that would end past it; the rest are left for the next run.

    Returns:
        Counts `segmented`, `skipped`, `failed`, `left` (not started: the time budget), the `failures`
        {uid: error}, `missing` {uid: [names]} of the studies segmented now, and `seconds`.
    """
    source, out_dir = Path(source), Path(out_dir)
    folder, all_uids = study_source(source, split)
    uids = list(all_uids if uids is None else uids)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    models = [m for run in run_dirs for m in load_run(run, device=device)]
    segmenters = [m for m in models if m.provides == SEGMENTER]
    if not segmenters:
        raise ValueError(f"no segmenter run among {[str(r) for r in run_dirs]}")
    read = partial(load_prepared, str(folder), size=segmenters[0].image_size, window_name=segmenters[0].window)

    def work(uid: str, study: dict, seconds: float) -> Done:
        result = segment_study(study, models, batch_size=batch_size, device=device, amp=amp, threshold=threshold,
                               uid=uid)
        save_seg_result(result, out_dir / uid)
        if result.missing:
            missing[uid] = result.missing
        row = {"StudyInstanceUID": uid, "slices": result.labels.shape[0], "found": " ".join(result.extents),
               "missing": " ".join(result.missing),
               "dropped": "; ".join(f"{k}: {v}" for k, v in result.dropped.items()),
               "seconds": result.timing["total_s"]}
        lost = pd.DataFrame([row] if row["missing"] or row["dropped"] else [], columns=MISSING_COLUMNS)
        return Done(row, {MISSING: lost})

    missing: dict[str, list[str]] = {}
    ledger = Ledger(out_dir, SUMMARY, lambda u: out_dir / f"{u}.json", columns=SUMMARY_COLUMNS,
                    tables={MISSING: MISSING_COLUMNS})
    result = run_job(uids, ledger, work, studies=lambda todo: read_ahead(read, todo, prefetch),
                     desc=f"segment {split}", progress=progress, where=lambda u: folder / u, time_budget=time_budget)
    return {"segmented": len(result["rows"]), "skipped": result["skipped"], "failed": len(result["failures"]),
            "left": result["left"], "failures": result["failures"], "missing": missing, "seconds": result["seconds"]}
