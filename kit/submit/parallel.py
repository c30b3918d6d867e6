"""One submission worker per device: the studies dealt across devices, each worker a spawned process with its
own predictor, the deadline enforced from the parent."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..io.prefetch import describe_error
from ..progress import progress_bar
from .submission import (
    _STOP_S,
    CLIP,
    PathLike,
    Predictor,
    StudyOutcome,
    _fallback_outcome,
    _finish,
    _prepare,
    _reader,
    _skipped_notes,
    _unlisted_outcomes,
    log,
    predict_studies,
    write_submission,
)


def split_studies(uids: Sequence[str], n_workers: int) -> list[list[str]]:
    """Deal the studies round-robin into `n_workers` shares (neighbours in the list, often alike in size,
    go to different workers); shares differ in length by at most one.

    Raises:
        ValueError: n_workers < 1.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1; got {n_workers}")
    uids = list(uids)
    return [uids[i::n_workers] for i in range(n_workers)]


def _stop_on_term(signum, frame) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: the prefetch worker is stopped too


def _device_worker(make_predictor: Callable[[str], Predictor], device: str, uids: list[str],
                   read: Callable[[str], Any], deadline: float | None, prefetch: bool,
                   conn: multiprocessing.connection.Connection) -> None:
    """One device's process: build the predictor, then send ("study", uid, probs, notes) per study."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its workers
    signal.signal(signal.SIGTERM, _stop_on_term)
    try:
        predict = make_predictor(device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, whose studies get fallbacks
        conn.send(("failed", f"make_predictor({device!r}) raised {describe_error(exc)}"))
        return
    conn.send(("ready",))
    # the predictor is called in this thread (where make_predictor set the CUDA device): at the deadline the
    # parent stops this process, a thread is not needed to walk away from a hung call
    for outcome in predict_studies(uids, predict, read, deadline=deadline, prefetch=prefetch, walk_away=False):
        conn.send(("study", outcome.uid, outcome.probs.tolist(), outcome.notes, outcome.read_seconds,
                   outcome.predict_seconds))
    conn.send(("done",))


@dataclass
class _DeviceRun:
    device: str
    uids: list[str]
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    done: set[str] = field(default_factory=set)
    over: bool = False
    failed: str | None = None  # why make_predictor raised there
    ready: bool = False  # make_predictor returned
    last: float = field(default_factory=time.time)  # when it last sent news (its predictor built, a study done)


def _run_devices(shares: list[list[str]], devices: Sequence[str], make_predictor, read, deadline, prefetch,
                 outcomes: dict[str, StudyOutcome], bar) -> list[str | None]:
    """Run one worker per device until all are over or the deadline comes (then `_stop_at_deadline`); returns,
    per device, why its predictor failed (or None)."""
    context = multiprocessing.get_context("spawn")
    runs = []
    try:
        for device, share in zip(devices, shares):
            parent, child = context.Pipe(duplex=False)
            process = context.Process(target=_device_worker, name=f"kit-submit-{device}",
                                      args=(make_predictor, device, share, read, deadline, prefetch, child))
            process.start()
            child.close()
            runs.append(_DeviceRun(device, share, process, parent))
        while not all(r.over for r in runs):
            live = [r for r in runs if not r.over]
            timeout = None if deadline is None else deadline - time.time()
            if timeout is not None and timeout <= 0:
                _stop_at_deadline(live, outcomes, bar)
                break
            ready = multiprocessing.connection.wait([r.conn for r in live] + [r.process.sentinel for r in live],
                                                    timeout)
            for run in live:
                if run.conn in ready or run.process.sentinel in ready:
                    _receive(run, outcomes, bar)
        return [r.failed for r in runs]
    finally:
        for run in runs:
            if run.process.is_alive():
                run.process.terminate()
            run.process.join(10)
            if run.process.is_alive():
                run.process.kill()
                run.process.join()
            run.conn.close()


def _take(run: _DeviceRun, outcomes: dict[str, StudyOutcome], bar) -> tuple[str, str] | None:
    """Record every message a device worker has sent so far; (reason, detail) when its predictor failed."""
    failure = None
    try:
        while run.conn.poll():
            message = run.conn.recv()
            if message[0] == "study":
                _, uid, probs, notes, read_seconds, predict_seconds = message
                outcomes[uid] = StudyOutcome(uid, np.asarray(probs, dtype=np.float64), notes, read_seconds,
                                             predict_seconds)
                run.done.add(uid)
                run.last = time.time()
                bar.update(1)
            elif message[0] == "ready":
                run.ready, run.last = True, time.time()
            elif message[0] == "failed":
                failure = ("predictor failed", message[1])
                run.over, run.failed = True, message[1]
            else:  # "done"
                run.over = True
    except (EOFError, OSError):  # a worker stopped in the middle of a message
        pass
    return failure


def _stop_at_deadline(runs: list[_DeviceRun], outcomes: dict[str, StudyOutcome], bar) -> None:
    """The deadline has come: stop these workers (SIGTERM, then SIGKILL for any not gone in `_STOP_S`), take
    what they sent, and give each one's unfinished studies fallbacks (stage "budget"; the detail names the
    study it was on and for how long)."""
    now = time.time()
    for run in runs:
        if run.process.is_alive():
            run.process.terminate()
    for run in runs:
        run.process.join(max(0.0, now + _STOP_S - time.time()))
        if run.process.is_alive():
            run.process.kill()
            run.process.join()
    for run in runs:
        failure = _take(run, outcomes, bar)
        unfinished = [u for u in run.uids if u not in run.done]
        if unfinished:
            log.warning("time budget ran out: the %s worker was stopped; its %d unfinished studies get fallbacks",
                        run.device, len(unfinished))
        for uid in unfinished:
            if failure is not None:  # its predictor failed just now
                outcomes[uid] = _fallback_outcome(uid, "worker", failure[0], 0.0, failure[1])
            elif uid != unfinished[0]:
                outcomes[uid] = _fallback_outcome(uid, "budget", "time budget", 0.0, f"not started: the time "
                                                  f"budget ran out while the {run.device} worker was on study "
                                                  f"{unfinished[0]}; the worker was stopped")
            else:
                seconds = now - run.last
                doing = "on it" if run.ready else "building the worker's predictor"
                outcomes[uid] = _fallback_outcome(uid, "budget", "time budget", seconds, f"study {uid} cut off "
                                                  f"after {seconds:.1f} s {doing}: the time budget ran out and the "
                                                  f"{run.device} worker was stopped")
            bar.update(1)
        run.over = True


def _receive(run: _DeviceRun, outcomes: dict[str, StudyOutcome], bar) -> None:
    """Take everything a device worker has sent; when it is over, give its unfinished studies fallbacks."""
    failure = _take(run, outcomes, bar)
    if not run.over and not run.process.is_alive():
        run.process.join()
        failure, run.over = ("worker died", f"the {run.device} worker exited with code {run.process.exitcode}"), True
    if run.over:
        if failure is not None:
            log.error("device %s: %s: %s; its %d unfinished studies get fallbacks", run.device, *failure,
                      len(run.uids) - len(run.done))
        for uid in run.uids:
            if uid not in run.done:
                reason, detail = failure or ("worker died", f"the {run.device} worker ended without this study")
                outcomes[uid] = _fallback_outcome(uid, "worker", reason, 0.0, detail)
                bar.update(1)


def write_submission_parallel(uids: Sequence[str], make_predictor: Callable[[str], Predictor],
                              devices: Sequence[str], out_path: PathLike, *,
                              sample_submission: pd.DataFrame | PathLike | None = None,
                              read: Callable[[str], Any] | None = None, images_dir: PathLike | None = None,
                              log_path: PathLike | None = None, time_budget: float | None = None,
                              prefetch: bool = True, progress: bool = True,
                              clip: tuple[float, float] = CLIP,
                              fallback: Sequence[float] | np.ndarray | None = None) -> dict:
    """`write_submission` with one spawned worker process per device, each on its share of the studies.

    Each worker builds its own predictor with `make_predictor(device)` and runs the same loop (with its own
    prefetch reader) over `split_studies(todo, len(devices))[i]`; the parent merges rows and log lines and
    writes one file, identical to what one device would write. A worker whose `make_predictor` raises or that
    dies leaves its unfinished studies with fallbacks (stage "worker"); when it raises on every device, that is
    a setup error and is raised. One device runs in this process.

    Args:
        make_predictor: a picklable top-level callable, `device -> predictor` (e.g. loads the runs there).
        devices: one entry per worker, e.g. ["cuda:0", "cuda:1"] or ["cpu", "cpu"].
        Others: as `write_submission`; `time_budget` counts from this call, model loading included. At the
            deadline the parent stops every worker still running (SIGTERM, SIGKILL soon after: a hung predictor
            goes with its process) and gives their unfinished studies fallbacks (stage "budget"). With one
            device, `make_predictor` runs in this process before the deadline is watched: only the studies are
            bounded.

    Returns:
        The summary of `write_submission`, plus `devices`.

    Raises:
        RuntimeError: make_predictor raised on every device (the messages name each device's error).
        ValueError, OSError: as `write_submission`.
    """
    devices = [str(d) for d in devices]
    if not devices:
        raise ValueError("devices must name at least one device, e.g. ['cuda:0', 'cuda:1'] or ['cpu']")
    if len(devices) == 1:
        started = time.time()
        predict = make_predictor(devices[0])
        budget = None if time_budget is None else max(0.0, float(time_budget) - (time.time() - started))
        summary = write_submission(uids, predict, out_path, sample_submission=sample_submission, read=read,
                                   images_dir=images_dir, log_path=log_path, time_budget=budget,
                                   prefetch=prefetch, progress=progress, clip=clip, fallback=fallback)
        return {**summary, "devices": devices}
    started = time.time()
    uids, row_ids, todo, unlisted, clip = _prepare(uids, sample_submission, clip)
    read = _reader(read, images_dir)
    deadline = started + float(time_budget) if time_budget is not None else None
    outcomes = _unlisted_outcomes(unlisted)
    shares = split_studies(todo, len(devices))
    bar = progress_bar(total=len(todo), desc=f"submission ({len(devices)} devices)", unit="study",
                       enabled=progress)
    try:
        failed = _run_devices(shares, devices, make_predictor, read, deadline, prefetch, outcomes, bar)
    finally:
        bar.close()
    if todo and all(failed):  # no model anywhere: a setup error, not a bad study
        raise RuntimeError("make_predictor failed on every device: " + "; ".join(failed))
    return _finish(outcomes, row_ids, _skipped_notes(uids, todo, unlisted), uids, out_path, log_path, clip,
                   started, progress, fallback, devices=devices)
