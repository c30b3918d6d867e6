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
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from ..constants import SEGMENTER
from ..io.cache import load_prepared, merge_csv
from ..progress import progress_bar
from ..runs import load_run
from .infer import segment_study
from .postprocess import THRESHOLD
from .results import save_seg_result

log = logging.getLogger("kit.stage1.runner")

PathLike = str | os.PathLike
FAILURES = "failures.csv"
MISSING = "missing.csv"
SUMMARY = "summary.csv"


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


def _read_ahead(read, uids: Sequence[str], prefetch: bool) -> Iterator[tuple[str, dict | None, str | None]]:
    """(uid, study, error) in order; with `prefetch`, the next study is read in a spawned worker process."""
    if prefetch:
        from ..io.prefetch import prefetch as run_ahead

        for uid, study, error, _ in run_ahead(read, uids, ahead=1, processes=True):
            yield uid, study, error
        return
    for uid in uids:
        try:
            yield uid, read(uid), None
        except Exception as exc:  # one broken study must not stop the others
            yield uid, None, f"{type(exc).__name__}: {exc}"


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
) -> dict:
    """Segment every study of a split, resumably, one failure never stopping the rest.

    Studies whose `<out_dir>/<uid>.json` exists are skipped. A study that fails (unreadable DICOM, NaN
    output, ...) is logged and listed in `failures.csv` with the error; studies where a vertebra was not
    found go to `missing.csv`; every segmented study gets a row in `summary.csv` (slices, vertebrae found,
    seconds). A study that succeeds on a later run leaves `failures.csv`. The CSVs are written when the loop
    ends, also when it is interrupted.

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

    Returns:
        Counts `segmented`, `skipped`, `failed`, the `failures` {uid: error}, `missing` {uid: [names]}
        of the studies segmented now, and `seconds`.
    """
    start = time.perf_counter()
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
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [u for u in uids if not (out_dir / f"{u}.json").is_file()]

    rows, failures, missing = [], {}, {}
    studies = _read_ahead(read, todo, prefetch and len(todo) > 1)
    try:
        for uid, study, error in progress_bar(studies, total=len(todo), desc=f"segment {split}", unit="study",
                                      enabled=progress):
            try:
                if error is not None:
                    raise RuntimeError(f"reading {folder / uid}: {error}")
                result = segment_study(study, models, batch_size=batch_size, device=device, amp=amp,
                                       threshold=threshold, uid=uid)
                del study
                save_seg_result(result, out_dir / uid)
            except Exception as exc:  # one broken study must not stop the others
                failures[uid] = f"{type(exc).__name__}: {exc}"
                log.warning("study %s not segmented: %s", uid, failures[uid])
                continue
            if result.missing:
                missing[uid] = result.missing
            rows.append({"StudyInstanceUID": uid, "slices": result.labels.shape[0],
                         "found": " ".join(result.extents), "missing": " ".join(result.missing),
                         "dropped": "; ".join(f"{k}: {v}" for k, v in result.dropped.items()),
                         "seconds": result.timing["total_s"]})
    finally:  # an interrupted run still records what it did
        if hasattr(studies, "close"):
            studies.close()
        _write_reports(out_dir, rows, failures)
    return {"segmented": len(rows), "skipped": len(uids) - len(todo), "failed": len(failures),
            "failures": failures, "missing": missing, "seconds": round(time.perf_counter() - start, 2)}


def _write_reports(out_dir: Path, rows: list[dict], failures: dict[str, str]) -> None:
    """Merge this run's rows into summary.csv, failures.csv and missing.csv."""
    done = [r["StudyInstanceUID"] for r in rows]
    merge_csv(out_dir / SUMMARY, pd.DataFrame(rows))
    merge_csv(out_dir / FAILURES, pd.DataFrame({"StudyInstanceUID": list(failures), "error": list(failures.values())}),
              drop=done)
    missing_rows = pd.DataFrame([r for r in rows if r["missing"] or r["dropped"]],
                                columns=["StudyInstanceUID", "missing", "dropped"])
    merge_csv(out_dir / MISSING, missing_rows[["StudyInstanceUID", "missing", "dropped"]],
              drop=[u for u in done if u not in set(missing_rows["StudyInstanceUID"])])
