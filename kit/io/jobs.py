"""One loop over the studies of a split for the kit's batch jobs (`kit prepare`, `kit segment`, `kit crops`).

`run_job(uids, ledger, work, studies=...)` does for every job what a long run over 2,000 studies needs:
- **resume**: only the studies the ledger has not finished are done (`Ledger.todo`: no output file, or a file
  without its manifest row, i.e. a run killed between the two writes);
- **read ahead**: the studies come from a stream of `kit.io.prefetch.Prefetched` (`read_ahead`: the next study
  read in one spawned worker while this one is worked on; or a job's own stream, e.g. a process pool);
- **one failure never stops the rest**: a study that cannot be read or worked on is logged and listed in
  `failures.csv` with its error, and leaves that file when a later run does it;
- **nothing lost**: each study's rows are written (atomically, `kit.io.files`) as soon as its output file is;
- **a time budget**: before each study, when the seconds so far plus the mean a study would pass it, the job stops
  (`out_of_time`, the submission's rule too) and the studies left are done by the next run;
- **progress** (a bar on a terminal only) and a summary of counts and seconds.

The submission (`kit.submit.submission.predict_studies`) reads ahead with the same `kit.io.prefetch` but keeps its
own loop: it writes no file per study and no failure list, every study gets a row (fallback values for a failure)
and a deadline cuts off even a study in progress; it stops taking studies by the same rule (`out_of_time`).
numpy-free; never imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..progress import progress_bar
from .files import write_csv_atomic
from .prefetch import Prefetched, prefetch

log = logging.getLogger("kit.io.jobs")

UID = "StudyInstanceUID"
FAILURES = "failures.csv"


def merge_csv(path: Path, new: pd.DataFrame, drop: Sequence[str] = (), key: str = UID, create: bool = False) -> None:
    """Rows of `new` replace those with the same key in the CSV at `path`; keys in `drop` are removed
    (a study that failed before and succeeded now). An emptied CSV stays, with its header only; with `create`, a
    CSV that does not exist is made even when nothing is merged (`new`'s header). Written atomically
    (`kit.io.files.write_csv_atomic`): a run killed while writing leaves the CSV as it was."""
    gone = set(drop) | (set(new[key]) if len(new) else set())
    kept = pd.read_csv(path, dtype={key: str}) if path.is_file() else new.iloc[:0]
    kept = kept[~kept[key].isin(gone)] if key in kept.columns else kept
    # concatenating an empty frame would turn the integer columns of the other into floats (178 -> 178.0)
    parts = [frame for frame in (kept, new) if len(frame)]
    merged = pd.concat(parts, ignore_index=True) if len(parts) == 2 else (parts[0] if parts else kept)
    if len(merged) or path.is_file() or create:
        write_csv_atomic(merged.sort_values(key), path)


def record_failures(path: Path, failures: Mapping[str, str], done: Sequence[str] = ()) -> None:
    """Merge {uid: error} into the failures CSV at `path` (`StudyInstanceUID, error`), removing the studies of
    `done` (they succeeded now); the file is made, header only, when it does not exist."""
    merge_csv(path, pd.DataFrame({UID: list(failures), "error": list(failures.values())}), drop=done, create=True)


def unfinished(out_dir: Path, uids: Sequence[str], manifest: str, file_of: Callable[[str], Path]) -> list[str]:
    """The studies of `uids` still to do in a resumable job: those without their output file, and those whose
    file has no row in `out_dir/manifest` (a run killed between the two writes; redone, with a warning)."""
    path = Path(out_dir) / manifest
    recorded = set(pd.read_csv(path, dtype={UID: str}, usecols=[UID])[UID]) if path.is_file() else set()
    have = [u for u in uids if file_of(u).is_file()]
    orphans = [u for u in have if u not in recorded]
    if orphans:
        log.warning("%s: %d studies have a file but no row in %s (a run stopped between the two): redone: %s",
                    out_dir, len(orphans), manifest, ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
    done = set(have) - set(orphans)
    return [u for u in uids if u not in done]


def out_of_time(deadline: float | None, started: float, done: int) -> bool:
    """True when the next study is not expected to end before `deadline` (a `time.time()`): now + the mean seconds
    a study took since `started` (0 before the first) reaches it. False without a deadline."""
    if deadline is None:
        return False
    now = time.time()
    mean = (now - started) / done if done else 0.0
    return now + mean >= deadline


@dataclass
class Ledger:
    """What a resumable job has done, in `out_dir`: one output file per study (`file_of(uid)`), a row each in
    `manifest`, the failures with their errors in `failures.csv`, and further per-study tables (`tables`: file
    name -> columns; a study's rows there replace its earlier ones, e.g. `unmatched_boxes.csv`).

    `columns`: the manifest's columns (None: the rows' own keys). Every table and the failures file exist, with
    their header at least, once `open` has run."""

    out_dir: Path
    manifest: str
    file_of: Callable[[str], Path]
    columns: Sequence[str] | None = None
    tables: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def todo(self, uids: Sequence[str]) -> list[str]:
        return unfinished(self.out_dir, uids, self.manifest, self.file_of)

    def open(self, failures: Mapping[str, str] = {}) -> None:
        """Make the folder and the tables; record `failures` known before any study is read."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.columns is not None:
            merge_csv(self.out_dir / self.manifest, pd.DataFrame(columns=list(self.columns)), create=True)
        for name, columns in self.tables.items():
            merge_csv(self.out_dir / name, pd.DataFrame(columns=list(columns)), create=True)
        record_failures(self.out_dir / FAILURES, failures)

    def done(self, uid: str, row: Mapping[str, Any], tables: Mapping[str, pd.DataFrame] = {},
             problem: str | None = None) -> None:
        """Record a finished study (after its file is written): its manifest row, its rows of the tables, and
        either its removal from the failures or, with `problem` (done, but with a part that failed), its reason."""
        merge_csv(self.out_dir / self.manifest, pd.DataFrame([row], columns=self.columns), create=True)
        for name, columns in self.tables.items():
            rows = tables.get(name, pd.DataFrame(columns=list(columns)))
            merge_csv(self.out_dir / name, rows.reindex(columns=list(columns)), drop=[uid], create=True)
        record_failures(self.out_dir / FAILURES, {uid: problem} if problem else {}, done=[] if problem else [uid])

    def failed(self, uid: str, error: str) -> None:
        record_failures(self.out_dir / FAILURES, {uid: error})


@dataclass
class Done:
    """What `work` gives for one study, after writing its file: its manifest row, its rows of the ledger's
    tables, and a problem to list in `failures.csv` although the study is done (e.g. an unusable segmentation)."""

    row: dict
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    problem: str | None = None


def read_ahead(read: Callable[[str], Any], uids: Sequence[str], prefetch_on: bool = True) -> Iterator[Prefetched]:
    """The studies of `uids` in order, as `Prefetched(uid, read(uid), error, seconds)`; with `prefetch_on` (and
    more than one study) the next one is read in a spawned worker process (`kit.io.prefetch`) while the caller
    works on this one. `read` must then be a picklable, numpy-only top-level function (or a partial of one)."""
    return prefetch(read, uids, ahead=1, processes=prefetch_on and len(uids) > 1)


def run_job(uids: Sequence[str], ledger: Ledger, work: Callable[[str, Any, float], Done], *,
            studies: Callable[[list[str]], Iterable[Prefetched]], desc: str, progress: bool = True,
            known_failures: Mapping[str, str] | None = None, where: Callable[[str], Any] | None = None,
            todo: Sequence[str] | None = None, time_budget: float | None = None) -> dict:
    """Do every unfinished study of `uids`: `work(uid, study, read_seconds)` on what `studies(todo)` gives for it.

    Args:
        uids: the studies, in order.
        ledger: where the job's files and tables are (`Ledger`).
        work: `(uid, study, seconds the read took) -> Done`; writes the study's output file (`ledger.file_of(uid)`) before it returns.
            An exception fails that study only.
        studies: `todo -> Prefetched` per study in `todo`'s order (`read_ahead`, or a job's own stream).
        desc: the progress bar's label.
        progress: a bar (only on a terminal, `kit.progress`).
        known_failures: {uid: error} known before reading (e.g. a study listed without a folder): recorded.
        where: `uid -> what was read` (a path) for the error of a study that could not be read.
        todo: the unfinished studies of `uids`, when the caller has asked `ledger.todo` already.
        time_budget: seconds from this call: no study is started that would end past it at the mean pace so far
            (`out_of_time`); the studies left are neither done nor failed, so the next run does them. None: no limit.

    Returns:
        `rows` (the manifest rows done now), `failures` {uid: error} (with the known ones), `skipped` (finished
        before), `left` (not started: the time budget ran out), `seconds`.
    """
    start, started = time.perf_counter(), time.time()
    deadline = started + float(time_budget) if time_budget is not None else None
    failures = dict(known_failures or {})
    ledger.open(failures)
    todo = ledger.todo(list(uids)) if todo is None else list(todo)
    rows: list[dict] = []
    left = 0
    stream = studies(todo)
    bar = progress_bar(stream, total=len(todo), desc=desc, unit="study", enabled=progress)
    try:
        pulled = iter(bar)
        for done_so_far in range(len(todo)):
            if out_of_time(deadline, started, done_so_far):  # checked before the next study is taken
                left = len(todo) - done_so_far
                log.warning("%s: the time budget (%.0f s) would run out during the next study: %d studies left for "
                            "the next run, which resumes here", desc, time_budget, left)
                break
            taken = next(pulled, None)
            if taken is None:
                break
            uid, study, error, seconds = taken
            try:
                if error is not None:
                    raise RuntimeError(f"reading {where(uid) if where else uid}: {error}")
                done = work(uid, study, seconds)
            except Exception as exc:  # one broken study must not stop the others
                failures[uid] = f"{type(exc).__name__}: {exc}"
                log.warning("study %s skipped: %s", uid, failures[uid])
                ledger.failed(uid, failures[uid])
                continue
            finally:
                del study
            if done.problem:
                failures[uid] = done.problem
            rows.append(done.row)
            ledger.done(uid, done.row, done.tables, done.problem)  # its file first, then its rows
    finally:
        bar.close()
        if hasattr(stream, "close"):
            stream.close()
    return {"rows": rows, "failures": failures, "skipped": len(uids) - len(todo), "left": left,
            "seconds": round(time.perf_counter() - start, 2)}
