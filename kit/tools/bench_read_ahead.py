"""`kit bench submit --model-seconds`: the read-ahead against its physical limit, with a stand-in model that holds each study."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .bench_submit import write_bench_study

#: the stand-in model's answer for each of the 8 targets
HOLD_VALUE = 0.5


#: prefetch on, steady state: wall seconds per study at most this times max(read, S)
READ_AHEAD_TARGET = 1.15


QUICK_READ_AHEAD = {"size": 64, "n_slices": 16, "model_seconds": 0.2}


def _record(record_dir: str | None, kind: str, uid: str, **fields) -> None:
    """Write `record_dir/<kind>-<uid>.json` ({uid, pid, **fields}); nothing when `record_dir` is None."""
    if record_dir is not None:
        (Path(record_dir) / f"{kind}-{uid}.json").write_text(json.dumps({"uid": uid, "pid": os.getpid(), **fields}))


@dataclass(frozen=True)
class HoldPredictor:
    """The stand-in model: `predictor(uid, study)` holds the study for `seconds` (sleeps, using no CPU), then
    returns 8 probabilities, all `value`, in TARGETS order.

    Picklable (a top-level frozen dataclass), so `make_hold_predictor` builds it in a spawned device worker of
    `kit.submit.parallel.write_submission_parallel`. With `record_dir`, each call writes `record_dir/hold-<uid>.json`:
    {uid, pid, device, start, end (`time.time()`), shape (the study's `hu` shape, [] when it has none)}.
    """

    seconds: float
    record_dir: str | None = None
    device: str = "cpu"
    value: float = HOLD_VALUE

    def __call__(self, uid: str, study) -> np.ndarray:
        from ..constants import TARGETS

        start = time.time()
        time.sleep(self.seconds)
        shape = list(np.shape(getattr(study, "hu", ())))
        _record(self.record_dir, "hold", uid, device=self.device, start=start, end=time.time(), shape=shape)
        return np.full(len(TARGETS), self.value, dtype=np.float64)


def make_hold_predictor(device: str, *, seconds: float, record_dir: str | None = None) -> HoldPredictor:
    """`make_predictor` for `write_submission_parallel` (bind `seconds` and `record_dir` with functools.partial)."""
    return HoldPredictor(seconds, record_dir, device)


@dataclass(frozen=True)
class TimedReader:
    """The submission's default reader, `kit.submit.submission.DicomStudyReader(images_dir)`, that also writes
    `record_dir/read-<uid>.json` per study read: {uid, pid, start, end (`time.time()`), seconds (of the read),
    may_fork (`kit.io.dicom.fork_is_safe()` where it read: whether its decoding may use worker processes)}.

    Picklable and numpy-only, so it runs in the prefetch reader process as the default reader does. A study that
    fails to read raises as `DicomStudyReader` does and leaves no record.
    """

    images_dir: str
    record_dir: str

    def __call__(self, uid: str):
        from ..io.dicom import fork_is_safe
        from ..submit.submission import DicomStudyReader

        may_fork = fork_is_safe()
        start, t0 = time.time(), time.perf_counter()
        series = DicomStudyReader(Path(self.images_dir))(uid)
        _record(self.record_dir, "read", uid, start=start, end=time.time(), seconds=time.perf_counter() - t0,
                may_fork=may_fork)
        return series


def _read_shape(read, uid: str) -> list[int]:
    """`read(uid)`'s volume shape: what the reader-alone run sends back instead of the volume."""
    return list(read(uid).hu.shape)


def _records(record_dir: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record_dir.glob(f"{kind}-*.json"))]


def _steady_read_s(reads: list[dict]) -> float:
    """Mean seconds of a read, leaving out the first read of each reader process (lazy imports, a fresh decode
    pool) when that process read more than one study."""
    by_pid: dict[int, list[dict]] = {}
    for r in sorted(reads, key=lambda r: r["start"]):
        by_pid.setdefault(r["pid"], []).append(r)
    kept = [r["seconds"] for rows in by_pid.values() for r in (rows[1:] if len(rows) > 1 else rows)]
    return float(np.mean(kept))


def _steady_s_per_study(holds: list[dict]) -> float:
    """Wall seconds per study in the steady state: per predicting process, the time from its first study's end
    to its last one's over the studies in between (studies 2..k); processes working side by side add their
    rates, so per study it is 1 / sum(1 / seconds per study of each)."""
    by_pid: dict[int, list[float]] = {}
    for h in holds:
        by_pid.setdefault(h["pid"], []).append(h["end"])
    rates = [(len(ends) - 1) / (max(ends) - min(ends)) for ends in by_pid.values() if len(ends) > 1]
    if not rates:
        raise RuntimeError(f"bench submit: no process predicted two studies ({len(holds)} studies in all); "
                           "a steady state needs at least 2 studies per process")
    return 1.0 / sum(rates)


def _overlap_share(reads: list[dict]) -> float:
    """Share of all read time during which another process was reading too (0: never, 1: always)."""
    total = sum(r["end"] - r["start"] for r in reads)
    shared = 0.0
    for r in reads:
        others = sorted((o["start"], o["end"]) for o in reads if o["pid"] != r["pid"])
        covered, cursor = 0.0, r["start"]
        for start, end in others:  # the union of the others' intervals, clipped to r's
            start, end = max(start, cursor), min(end, r["end"])
            if end > start:
                covered, cursor = covered + end - start, end
        shared += covered
    return shared / total if total > 0 else 0.0


def _run_submission(name: str, uids: list[str], images: Path, work: Path, seconds: float, *, prefetch: bool,
                    devices: list[str] | None, reference: str, reference_s: float) -> dict:
    """One configuration: the submission writer with the stand-in model over `uids`; its figures.

    `devices` None runs `write_submission` in this process, otherwise `write_submission_parallel` on them.

    Raises:
        RuntimeError: a study got fallbacks, a row is missing or not the stand-in's value, or a study was not
            held: the figures would not measure the read-ahead.
    """
    import pandas as pd

    from ..constants import TARGETS
    from ..submit.parallel import write_submission_parallel
    from ..submit.submission import write_submission

    record_dir = work / name.replace(" ", "_")
    record_dir.mkdir(parents=True)
    out_csv = record_dir / "submission.csv"
    reader = TimedReader(str(images), str(record_dir))
    start = time.perf_counter()
    if devices is None:
        summary = write_submission(uids, HoldPredictor(seconds, str(record_dir)), out_csv, read=reader,
                                   prefetch=prefetch, progress=False)
    else:
        make = partial(make_hold_predictor, seconds=seconds, record_dir=str(record_dir))
        summary = write_submission_parallel(uids, make, devices, out_csv, read=reader, prefetch=prefetch,
                                            progress=False)
    wall = time.perf_counter() - start
    table = pd.read_csv(out_csv)
    holds, reads = _records(record_dir, "hold"), _records(record_dir, "read")
    from_stand_in = bool(np.allclose(table["fractured"], HOLD_VALUE))
    rows_expected = len(TARGETS) * len(uids)
    if summary["fallback_studies"] or len(table) != rows_expected or not from_stand_in or len(holds) != len(uids):
        raise RuntimeError(f"bench submit: {name}: {summary['fallback_studies']} studies with fallbacks "
                           f"({summary['fallbacks']}), {len(table)} rows for {len(uids)} studies, "
                           f"{len(holds)} held by the stand-in; see {summary['log']}")
    steady = _steady_s_per_study(holds)
    return {"devices": devices or ["cpu"], "prefetch": prefetch, "studies": len(uids), "wall_s": round(wall, 3),
            "s_per_study": round(wall / len(uids), 3), "steady_s_per_study": round(steady, 3),
            "read_s": round(_steady_read_s(reads), 3), "reads_overlap": round(_overlap_share(reads), 3),
            "reads_may_fork": all(r["may_fork"] for r in reads),
            "reference": reference, "reference_s": round(reference_s, 3),
            "ratio": round(steady / reference_s, 3), "ratio_total": round(wall / len(uids) / reference_s, 3),
            "predicted": summary["predicted"], "fallback_studies": summary["fallback_studies"], "rows": len(table),
            "values_from_stand_in": from_stand_in, "probabilities_per_study": len(table) // len(uids),
            "hold_shapes": sorted({tuple(h["shape"]) for h in holds}),
            "workers": len({h["pid"] for h in holds}), "readers": len({r["pid"] for r in reads})}


def _link_study(source: Path, target: Path) -> None:
    """`target` as a copy of the study folder `source`, file by file hard links (plain copies where links fail)."""
    import shutil

    target.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)


def bench_read_ahead(model_seconds: float | str | None = "auto", *, size: int = 512, n_slices: int = 250,
                     studies: int = 6, seed: int = 0, quick: bool = False) -> dict:
    """The read-ahead against its physical limit: the submission writer with a stand-in model that holds each
    study `model_seconds` (S) seconds, so reading (R s a study) and predicting can overlap at most to max(R, S).

    One synthetic JPEG Lossless study of `n_slices` x `size` x `size` is written (`write_bench_study`) and linked
    under as many study names as the runs need (each study reads the same files: the same R every time). Then:

    - reader alone: `kit.submit.submission.DicomStudyReader` on `studies` studies, one after another, in a spawned
      numpy-only process (`kit.io.prefetch.prefetch`, ahead 0), where the prefetch reader runs; R is the mean of
      studies 2..n;
    - prefetch off and on: `kit.submit.submission.write_submission` over `studies` studies with the stand-in
      (`HoldPredictor`), expected about R + S and max(R, S) a study;
    - 2 devices: `kit.submit.parallel.write_submission_parallel` on ["cpu", "cpu"] over 2 x `studies` studies
      (`studies` per worker, each worker with its own prefetch reader), against max(R, S) / 2 a study, the limit
      when the two readers do not compete for the CPU; the read time inside that run (vs R) says whether they do.

    Wall per study is given for the whole run (total wall / studies: process starts and the first, unhidden read
    included) and for the steady state (`_steady_s_per_study`: studies 2..n of each predicting process).

    Args:
        model_seconds: S, or "auto" / None for R (the default: the case where overlap matters most).
        size: in-plane pixels of the study (512: full scale).
        n_slices: its slices.
        studies: studies per configuration (2 devices: twice as many); at least 2, a steady state wants 5 or more.
        seed: the study's seed.
        quick: a smoke-size run for tests: `QUICK_READ_AHEAD` (64 px, 16 slices, S = 0.2 s unless a number is
            given), replacing `size` and `n_slices`.

    Returns:
        {"study" (`write_bench_study`'s info), "studies", "model_seconds", "model_seconds_from" ("measured read
        time" or "given"), "cpu_count", "usable_cores", "load_average" [start, end], "inline_reads_fork" (prefetch
        off's reads_may_fork),
        "read_alone" {"read_s" (R), "first_read_s", "s_per_study", "shapes"}, "limit_s" (max(R, S)),
        "prefetch_off" | "prefetch_on" | "two_devices" {devices, prefetch, studies, wall_s, s_per_study,
        steady_s_per_study, read_s (per study in that run, first read of each reader left out), reads_overlap
        (`_overlap_share`), reads_may_fork (every read could use decoding processes: `TimedReader`),
        reference, reference_s, ratio (steady / reference), ratio_total (s_per_study / reference), predicted,
        fallback_studies, rows, values_from_stand_in, probabilities_per_study, hold_shapes, workers, readers},
        "prefetch_on_ratio", "target", "target_met", "read_slowdown_two_devices" (read inside the 2-device run /
        R), "two_readers_full_speed" (that slowdown <= `READ_AHEAD_TARGET`), "two_devices_limit_measured_s"
        (max(that read, S) / 2), "two_devices_ratio_measured" (the 2-device steady state over it)}; also printed.

    Raises:
        ValueError: `model_seconds` is neither "auto" nor a number > 0, or `studies` < 2.
        RuntimeError: a configuration's submission is not entirely the stand-in's (see `_run_submission`).
    """
    from ..io.prefetch import prefetch
    from ..submit.submission import DicomStudyReader

    given = None if model_seconds is None or str(model_seconds).strip().lower() == "auto" else model_seconds
    if given is not None:
        try:
            given = float(given)
        except (TypeError, ValueError):
            given = math.nan
        if not math.isfinite(given) or given <= 0:
            raise ValueError(f"model_seconds must be 'auto' (the measured read time) or seconds > 0; "
                             f"got {model_seconds!r}")
    if quick:
        size, n_slices = QUICK_READ_AHEAD["size"], QUICK_READ_AHEAD["n_slices"]
        given = QUICK_READ_AHEAD["model_seconds"] if given is None else given
    if studies < 2:
        raise ValueError(f"studies must be >= 2 (a steady state needs studies 2..n; 6 or more is better); "
                         f"got {studies}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    with tempfile.TemporaryDirectory(prefix="kit-bench-read-ahead-") as tmp_name:
        work = Path(tmp_name)
        print(f"writing a {n_slices} x {size} x {size} JPEG Lossless study ...", flush=True)
        info = write_bench_study(work / "study", "study", seed, size=size, n_slices=n_slices, grid=32)
        images = work / "test_images"
        uids = [f"1.2.3.{i + 1}" for i in range(2 * studies)]
        for uid in uids:
            _link_study(work / "study" / "test_images" / "study", images / uid)

        print(f"reader alone: {studies} studies in a spawned process ...", flush=True)
        timed = list(prefetch(partial(_read_shape, DicomStudyReader(images)), uids[:studies], ahead=0))
        failed = [(t.item, t.error) for t in timed if t.error is not None]
        if failed:
            raise RuntimeError(f"bench submit: the reader failed on {failed}")
        seconds = [t.seconds for t in timed]
        read_s = float(np.mean(seconds[1:]))
        alone = {"read_s": round(read_s, 3), "first_read_s": round(seconds[0], 3),
                 "s_per_study": round(float(np.mean(seconds)), 3), "shapes": sorted({tuple(t.result) for t in timed})}
        hold = given if given is not None else read_s
        limit = max(read_s, hold)
        print(f"S = {hold:.3f} s ({'given' if given is not None else 'the measured read time'}); "
              f"prefetch off, prefetch on, 2 devices ...", flush=True)
        run = partial(_run_submission, images=images, work=work, seconds=hold)
        off = run("prefetch off", uids[:studies], prefetch=False, devices=None, reference="read + S",
                  reference_s=read_s + hold)
        on = run("prefetch on", uids[:studies], prefetch=True, devices=None, reference="max(read, S)",
                 reference_s=limit)
        two = run("2 devices", uids, prefetch=True, devices=["cpu", "cpu"], reference="max(read, S) / 2",
                  reference_s=limit / 2)
    slowdown, limit_measured = two["read_s"] / read_s, max(two["read_s"], hold) / 2
    out = {"study": info, "studies": studies, "model_seconds": round(hold, 3),
           "model_seconds_from": "given" if given is not None else "measured read time",
           "cpu_count": os.cpu_count(), "usable_cores": usable,
           "load_average": [round(load_start, 2),
                            round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan],
           "inline_reads_fork": off["reads_may_fork"], "read_alone": alone, "limit_s": round(limit, 3),
           "prefetch_off": off, "prefetch_on": on, "two_devices": two, "prefetch_on_ratio": on["ratio"],
           "target": READ_AHEAD_TARGET, "target_met": on["ratio"] <= READ_AHEAD_TARGET,
           "read_slowdown_two_devices": round(slowdown, 3),
           "two_readers_full_speed": slowdown <= READ_AHEAD_TARGET,
           "two_devices_limit_measured_s": round(limit_measured, 3),
           "two_devices_ratio_measured": round(two["steady_s_per_study"] / limit_measured, 3)}
    _print_read_ahead(out)
    return out


def _print_read_ahead(out: dict) -> None:
    s, alone, hold = out["study"], out["read_alone"], out["model_seconds"]
    print(f"\nkit bench submit --model-seconds: the read-ahead against its limit, a stand-in model holding each "
          f"study S = {hold:.2f} s ({out['model_seconds_from']})")
    print(f"study: {s['slices']} x {s['rows']} x {s['cols']} JPEG Lossless ({s['mb_on_disk']} MB), read by "
          f"kit.submit.submission.DicomStudyReader; {out['studies']} studies a configuration ({2 * out['studies']} with 2 "
          f"devices); {out['usable_cores']} usable CPU cores (os.cpu_count {out['cpu_count']}), load average "
          f"{out['load_average'][0]:.1f} -> {out['load_average'][1]:.1f}")
    header = (f"{'configuration':<14} {'s/study':>7} {'steady':>7} {'read s':>7}   {'limit':<17} {'limit s':>7} "
              f"{'steady/limit':>12} {'total/limit':>11}")
    print(header)
    print("-" * len(header))
    print(f"{'reader alone':<14} {alone['s_per_study']:>7.2f} {alone['read_s']:>7.2f} {alone['read_s']:>7.2f}")
    for key in ("prefetch_off", "prefetch_on", "two_devices"):
        r = out[key]
        name = {"prefetch_off": "prefetch off", "prefetch_on": "prefetch on", "two_devices": "2 devices"}[key]
        print(f"{name:<14} {r['s_per_study']:>7.2f} {r['steady_s_per_study']:>7.2f} {r['read_s']:>7.2f}   "
              f"{r['reference']:<17} {r['reference_s']:>7.2f} {r['ratio']:>12.2f} {r['ratio_total']:>11.2f}")
    print("s/study: total wall / studies (process starts and the first, unhidden read included); steady: studies "
          "2..n of each predicting process; read s: a study's read in that run (first read of each reader left out)")
    verdict = "met" if out["target_met"] else "NOT met"
    off, on, two = out["prefetch_off"], out["prefetch_on"], out["two_devices"]
    print(f"prefetch on, steady state: {on['ratio']:.2f}x max(read, S) (target <= {out['target']:.2f}x: {verdict}); "
          f"{off['steady_s_per_study'] / on['steady_s_per_study']:.2f}x faster than prefetch off")
    full = "yes" if out["two_readers_full_speed"] else "no"
    print(f"2 devices: reads inside the run {two['read_s']:.2f} s vs {alone['read_s']:.2f} s alone "
          f"({out['read_slowdown_two_devices']:.2f}x; the two readers overlapped {100 * two['reads_overlap']:.0f} % "
          f"of their read time): two concurrent readers at full speed on {out['usable_cores']} cores: {full}. "
          f"With the read time of the run the limit is max({two['read_s']:.2f}, S) / 2 = "
          f"{out['two_devices_limit_measured_s']:.2f} s a study (steady {out['two_devices_ratio_measured']:.2f}x)")
    if not out["inline_reads_fork"]:
        print("prefetch off read in this process without decoding workers (torch is loaded here, or this is not "
              "the main thread: kit.io.dicom.fork_is_safe), unlike the reader alone")
