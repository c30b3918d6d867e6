"""The submission writer: every test study gets its 8 rows, whatever happens to it, within a time budget.

The model is not this module's business: `write_submission` takes a *predictor*, any callable
`predict(uid, study) -> 8 probabilities` (array in TARGETS order, or a dict by target; NaN where it has no
answer, e.g. a vertebra the segmenter did not find), and a *reader* `read(uid) -> study` that runs in a
separate, spawned process (`kit.io.prefetch`) while the predictor works on the previous study. The default reader
is `DicomStudyReader(images_dir)` (`kit.io.dicom.read_series`, numpy only); `kit.submit.predictor.predict_study` plugs in as
the predictor.

Every failure is caught per study and logged, never raised:

| stage | reason | what the study gets |
| --- | --- | --- |
| list | not in study list | a study of sample_submission that is not in `uids`: fallbacks |
| read | no folder, empty folder, too few slices, unreadable, reader crashed | fallbacks |
| read | read warnings (skipped slices: a corrupt file, a second image size ...) | the model's values |
| predict | exception, bad output, out of range, non-finite | fallbacks |
| predict | partial (some values NaN / inf) | the model's finite values, fallbacks for the rest |
| budget | time budget (expected to end past the deadline, or cut off at it) | fallbacks, and every later study too |
| worker | predictor failed, worker died (parallel runs) | fallbacks for that worker's studies still to do |

The time budget is a deadline that this (the caller's) process enforces, not a hope placed in a child. Before
each study, when elapsed + the mean seconds a study so far would pass it, that study and the rest get fallbacks.
Inside a study nothing waits past it: the wait for the prefetch reader ends at the deadline and the reader
process is stopped; the predictor runs in a daemon thread that the loop waits on until the deadline and then
leaves behind (a call stuck in this process cannot be stopped, only abandoned); in parallel runs the parent
waits for its device workers until the deadline, then stops them (SIGTERM, SIGKILL soon after). The study cut
off (the log's detail names it and the seconds it had run) and every later one get fallbacks, and the files are
written within a couple of seconds of the deadline. Without a budget nothing of this runs: no thread, no timeout.

A fallback value is the constant that minimises the scored metric on the runs' training labels (`fallback=`,
`kit.submit.predictor.run_fallback`: each target's training prevalence at the metric's odds, what the models carry), or
the 2019 table's prevalence (`FALLBACK`) when no run says; it is filled in once, by the writer, for every value
without an answer. A vertebra stage 1 did not find is not such a value: the predictor gives it the value its
validation gave it (`kit.evaluate.metrics.fill_missing_vertebrae`) and may say so in the log (`Prediction.notes`).

The log (`submission_log.csv` beside the submission) has one row per event: `StudyInstanceUID, stage, reason,
seconds, fallback_values` (how many of the 8 values are fallbacks) and `detail` (the error message).

Before writing, the table is validated (`validate_submission`): every row_id of the test list exactly once, in
sample_submission order, values finite and clipped to [1e-4, 1 - 1e-4]. Both files are written atomically
(temporary file + `os.replace`), so an interrupted run never leaves a half-written submission.

numpy / pandas only: never imports torch (the predictor brings it).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pandas as pd
from ..progress import progress_bar

from ..constants import PROB_CLIP, TARGETS, TRAIN_PREVALENCE
from ..io.files import write_csv_atomic
from ..io.jobs import out_of_time
from ..io.dicom import Series, read_series, study_files
from ..io.prefetch import call_before, describe_error
from ..io.prefetch import prefetch as prefetch_items
from ..io.rsna import UID, rows_for_studies, split_row_id
from ..paths import PathLike

log = logging.getLogger("kit.submit.submission")

FALLBACK = TRAIN_PREVALENCE  # (8,) TARGETS order: the 2019 table's prevalence, the fallback when no run gives one
CLIP = (PROB_CLIP, 1 - PROB_CLIP)
MIN_SLICES = 2  # fewer is a single image, not a volume: no slice context, no order along z
LOG_COLUMNS = (UID, "stage", "reason", "seconds", "fallback_values", "detail")
_SHOW = 5
_DETAIL_CHARS = 500
_STOP_S = 1.5  # at the deadline, how long the device workers have to stop after SIGTERM before SIGKILL


class Predictor(Protocol):
    """What `write_submission` calls for each study that was read.

    Returns 8 probabilities in TARGETS order: a sequence / (8,) array, or a dict {target: p} (a missing key is
    a value with no answer). NaN / inf mark values with no answer (a partial result); values must lie in
    [0, 1] (probabilities, not logits). May raise: the study then gets fallbacks.
    """

    def __call__(self, uid: str, study: Any) -> Sequence[float] | np.ndarray | Mapping[str, float]: ...


class StudyUnavailable(Exception):
    """Raised by a reader for a study that cannot be predicted; `reason` is what the log's reason column says."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _few(values: Sequence, n: int = _SHOW) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


# ---------------------------------------------------------------------------------------------------------
# Fallbacks
# ---------------------------------------------------------------------------------------------------------


class Prediction(NamedTuple):
    """What a predictor may return instead of bare values: the 8 values and lines for the log.

    Attributes:
        probs: 8 values as `Predictor` describes them.
        notes: (reason, detail) pairs, each a log row of stage "predict" with no fallback value (e.g. "vertebrae
            not found").
    """

    probs: Any
    notes: tuple[tuple[str, str], ...] = ()


def fallback_probs(partial: Sequence[float] | np.ndarray | None = None,
                   fallback: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """(8,) float64: the values of `partial` that are finite and in [0, 1], `fallback` elsewhere.

    Args:
        partial: None, or 8 values in TARGETS order (NaN / inf where there is no answer).
        fallback: 8 values in TARGETS order (`kit.submit.predictor.run_fallback`); None: `FALLBACK`.

    Raises:
        ValueError: `partial` or `fallback` does not hold 8 values.
    """
    fallback = np.asarray(FALLBACK if fallback is None else fallback, dtype=np.float64)
    if fallback.shape != (len(TARGETS),) or not (np.isfinite(fallback) & (fallback >= 0) & (fallback <= 1)).all():
        raise ValueError(f"fallback must be 8 probabilities in order {list(TARGETS)}; got {fallback}")
    if partial is None:
        return fallback.copy()
    values = np.asarray(partial, dtype=np.float64)
    if values.shape != fallback.shape:
        raise ValueError(f"partial must hold {len(TARGETS)} values in order {list(TARGETS)}; got shape {values.shape}")
    usable = np.isfinite(values) & (values >= 0) & (values <= 1)
    return np.where(usable, values, fallback)


def _model_values(output: Any) -> np.ndarray:
    """A predictor's output as (8,) float64 in TARGETS order; raises ValueError when it is not 8 values."""
    if hasattr(output, "detach"):  # a torch tensor, without importing torch
        output = output.detach().float().cpu().numpy()
    if isinstance(output, Mapping):
        unknown = [k for k in output if k not in TARGETS]
        if unknown:
            raise ValueError(f"predictor returned unknown targets {unknown}; expected keys among {list(TARGETS)}")
        output = [output.get(t, math.nan) for t in TARGETS]
    try:
        values = np.asarray(output, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"predictor returned {type(output).__name__}, not 8 numbers: {exc}") from None
    if values.shape not in ((len(TARGETS),), (1, len(TARGETS))):
        raise ValueError(f"predictor returned shape {values.shape}; expected ({len(TARGETS)},) in order "
                         f"{list(TARGETS)}")
    return values.reshape(-1)


def _judge(values: np.ndarray) -> tuple[str | None, str]:
    """(reason, detail) for a predictor's values; reason None when all 8 are usable probabilities."""
    finite = np.isfinite(values)
    outside = finite & ((values < 0) | (values > 1))
    if outside.any():
        cells = [f"{t}={v:.4g}" for t, v, bad in zip(TARGETS, values, outside) if bad]
        return "out of range", f"values outside [0, 1] (logits?): {', '.join(cells)}"
    if finite.all():
        return None, ""
    cells = ", ".join(f"{t}={v}" for t, v, ok in zip(TARGETS, values, finite) if not ok)
    return ("non-finite" if not finite.any() else "partial"), f"no answer for {cells}"


# ---------------------------------------------------------------------------------------------------------
# Reading (runs in the prefetch worker: numpy only)
# ---------------------------------------------------------------------------------------------------------


def read_dicom_study(path: PathLike, *, min_slices: int = MIN_SLICES) -> Series:
    """Read one study folder with `kit.io.dicom.read_series`; the `Series`' warnings list any skipped files.

    Raises:
        StudyUnavailable: reason "no folder", "empty folder" (no regular file: `kit.io.dicom.study_files`) or
            "too few slices" (fewer than `min_slices`).
        kit.io.dicom.DicomError: no slice can be read (corrupt files, no image data).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise StudyUnavailable("no folder", f"study {folder.name}: no folder {folder}")
    files, not_files = study_files(folder)  # a named pipe, a socket or a device is no file: never opened
    if not files:
        others = f" (only: {'; '.join(f'{p.name}: {r}' for p, r in not_files)})" if not_files else ""
        raise StudyUnavailable("empty folder", f"study {folder.name}: no files in {folder}{others}")
    series = read_series(folder)
    if series.hu.shape[0] < min_slices:
        raise StudyUnavailable("too few slices", f"study {series.uid}: {series.hu.shape[0]} readable slice(s) in "
                                                 f"{folder}; at least {min_slices} needed")
    return series


@dataclass(frozen=True)
class DicomStudyReader:
    """The default reader: `uid -> read_dicom_study(images_dir / uid)`; picklable, so it runs in a worker."""

    images_dir: Path
    min_slices: int = MIN_SLICES

    def __call__(self, uid: str) -> Series:
        return read_dicom_study(Path(self.images_dir) / uid, min_slices=self.min_slices)


class _ReadFailure(NamedTuple):
    reason: str
    detail: str


def _read_task(read: Callable[[str], Any], uid: str) -> Any:
    """Runs in the prefetch worker: the study, or a `_ReadFailure` saying why there is none."""
    try:
        return read(uid)
    except StudyUnavailable as exc:
        return _ReadFailure(exc.reason, str(exc))
    except FileNotFoundError as exc:
        return _ReadFailure("no folder", describe_error(exc))
    except Exception as exc:  # noqa: BLE001 - any unreadable study gets fallbacks
        return _ReadFailure("unreadable", describe_error(exc))


def _reader(read: Callable[[str], Any] | None, images_dir: PathLike | None) -> Callable[[str], Any]:
    if read is not None:
        return read
    if images_dir is None:
        raise ValueError("pass read= (uid -> study, picklable) or images_dir= (the folder of study folders, "
                         "e.g. <data root>/test_images)")
    return DicomStudyReader(Path(images_dir))


# ---------------------------------------------------------------------------------------------------------
# The loop over studies
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    """What one study ended with.

    Attributes:
        uid: the study.
        probs: (8,) values in TARGETS order, NaN where the writer fills in the fallback, not yet clipped.
        notes: its log rows (`LOG_COLUMNS`), none when all went well.
        read_seconds: time the reader took on it (in the prefetch worker: overlapped with the previous study).
        predict_seconds: time the predictor took on it.
    """

    uid: str
    probs: np.ndarray
    notes: list[dict] = field(default_factory=list)
    read_seconds: float = 0.0
    predict_seconds: float = 0.0

    @property
    def fallback_values(self) -> int:
        return max((n["fallback_values"] for n in self.notes), default=0)


def _note(uid: str, stage: str, reason: str, seconds: float, fallback_values: int, detail: str = "") -> dict:
    return {UID: uid, "stage": stage, "reason": reason, "seconds": round(float(seconds), 3),
            "fallback_values": int(fallback_values), "detail": " ".join(str(detail).split())[:_DETAIL_CHARS]}


def _fallback_outcome(uid: str, stage: str, reason: str, seconds: float = 0.0, detail: str = "",
                      read_seconds: float = 0.0) -> StudyOutcome:
    return StudyOutcome(uid, np.full(len(TARGETS), np.nan), [_note(uid, stage, reason, seconds, len(TARGETS),
                                                                   detail)], read_seconds=read_seconds)


def _predict_one(uid: str, study: Any, predict: Predictor, read_seconds: float, started: float) -> StudyOutcome:
    notes = []
    t0 = time.time()
    warnings = getattr(study, "warnings", None)
    if warnings:
        notes.append(_note(uid, "read", "read warnings", read_seconds, 0,
                           f"{len(warnings)} warning(s): " + "; ".join(warnings)))
    nothing = np.full(len(TARGETS), np.nan)
    try:
        output = predict(uid, study)
    except Exception as exc:  # noqa: BLE001 - one study's failure never stops the run
        values, reason, detail = nothing, "exception", describe_error(exc)
    else:
        if isinstance(output, Prediction):
            notes += [_note(uid, "predict", str(r), 0.0, 0, str(d)) for r, d in output.notes]
            output = output.probs
        try:
            values = _model_values(output)
            reason, detail = _judge(values)
        except ValueError as exc:  # not 8 numbers
            values, reason, detail = nothing, "bad output", str(exc)
    predict_seconds = time.time() - t0
    usable = np.isfinite(values) & (values >= 0) & (values <= 1)
    probs = np.where(usable, values, np.nan)
    if reason is not None:
        replaced = int((~usable).sum())
        notes.append(_note(uid, "predict", reason, time.time() - started, replaced, detail))
    return StudyOutcome(uid, probs, notes, read_seconds, predict_seconds)


def _cut_off(uids: list[str], seconds: float, doing: str, budget: float) -> Iterator[StudyOutcome]:
    """Fallbacks (stage "budget") for `uids[0]`, still `doing` after `seconds` at the deadline, and the rest."""
    cut = uids[0]
    log.warning("time budget (%.1f s) ran out %s study %s (%.1f s): it and %d later studies get fallbacks", budget,
                doing, cut, seconds, len(uids) - 1)
    yield _fallback_outcome(cut, "budget", "time budget", seconds, f"study {cut} cut off after {seconds:.1f} s "
                            f"{doing} it: the time budget ({budget:.1f} s from the start) ran out")
    for rest in uids[1:]:
        yield _fallback_outcome(rest, "budget", "time budget", 0.0, f"not started: the time budget ({budget:.1f} s "
                                f"from the start) ran out {doing} study {cut}")


def predict_studies(uids: Sequence[str], predict: Predictor, read: Callable[[str], Any], *,
                    deadline: float | None = None, prefetch: bool = True,
                    walk_away: bool = True) -> Iterator[StudyOutcome]:
    """Yield one `StudyOutcome` per uid, in order; never raises for a bad study.

    Args:
        uids: the studies, in order.
        predict: the predictor (see `Predictor`).
        read: `uid -> study`, a picklable numpy-only callable (it runs in the prefetch worker).
        deadline: `time.time()` by which the loop must end. Before each study, when elapsed + the mean seconds
            a study so far would pass it, this and every later study get fallbacks (stage "budget"). Inside a
            study, no wait goes past it: the wait for the read (the prefetch worker is then stopped) and, with
            `walk_away`, the wait for the predictor; the study cut off and every later one get fallbacks (stage
            "budget"; the detail names the study and the seconds it had run). None: no timeout, no thread.
        prefetch: read the next study in a spawned process while this one is predicted (False: read here).
        walk_away: with a deadline, call the predictor (and, without prefetch, the reader) in a daemon thread
            that the loop waits on until the deadline and leaves running if it has not returned
            (`kit.io.prefetch.call_before`). The predictor then runs outside the caller's thread: thread-local
            state (torch's grad mode, `torch.cuda.set_device`) must be set inside it, as `kit.submit.predictor` does.
            False: call them in this thread and bound only the prefetch worker's reads, for a caller that
            enforces the deadline by stopping this whole process (a device worker of `write_submission_parallel`).
    """
    uids = list(uids)
    started = time.time()
    in_thread = walk_away and deadline is not None
    stream = prefetch_items(functools.partial(_read_task, read), uids, ahead=1, processes=prefetch,
                            deadline=deadline if prefetch or in_thread else None)
    try:
        for i, uid in enumerate(uids):
            if out_of_time(deadline, started, i):
                stream.close()  # stops the reader at once
                elapsed = time.time() - started
                detail = (f"{elapsed:.1f} s for {i} of {len(uids)} studies; the next one would end past the "
                          f"deadline, {deadline - started:.1f} s after the start" if deadline else "")
                for rest in uids[i:]:
                    yield _fallback_outcome(rest, "budget", "time budget", 0.0, detail)
                return
            t0 = time.time()
            try:
                item, study, error, read_seconds = next(stream)
            except TimeoutError:  # the read ran past the deadline; prefetch has stopped its worker
                yield from _cut_off(uids[i:], time.time() - t0, "waiting for the read of", deadline - started)
                return
            if item != uid:  # prefetch keeps the order: this would be a bug
                raise RuntimeError(f"prefetch returned study {item} while {uid} was expected")
            if error is not None:  # the reader process died on this study
                outcome = _fallback_outcome(uid, "read", "reader crashed", time.time() - t0, error)
            elif isinstance(study, _ReadFailure):
                outcome = _fallback_outcome(uid, "read", study.reason, read_seconds, study.detail, read_seconds)
            else:
                work = functools.partial(_predict_one, uid, study, predict, read_seconds, t0)
                try:
                    outcome = call_before(deadline, work) if in_thread else work()
                except TimeoutError:  # the predictor ran past the deadline: its thread is left behind
                    del study, work
                    yield from _cut_off(uids[i:], time.time() - t0, "predicting", deadline - started)
                    return
                del work
            del study  # before yielding: in memory, at most this study and the one being read
            yield outcome
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------------------
# Rows, validation, files
# ---------------------------------------------------------------------------------------------------------


def _sample_row_ids(sample_submission: pd.DataFrame | PathLike) -> list[str]:
    if isinstance(sample_submission, pd.DataFrame):
        df, source = sample_submission, "sample_submission"
    else:
        df = pd.read_csv(sample_submission, dtype={"row_id": str}, encoding="utf-8-sig")  # a BOM dropped
        source = str(sample_submission)
    if "row_id" not in df.columns:
        raise ValueError(f"{source}: no row_id column; columns are {list(df.columns)}")
    row_ids = [str(r).strip() for r in df["row_id"]]
    for row_id in row_ids:
        split_row_id(row_id)  # raises on a malformed row_id
    dup = pd.Series(row_ids)[pd.Series(row_ids).duplicated()].unique()
    if len(dup):
        raise ValueError(f"{source}: duplicated row_ids {_few(dup)}")
    return row_ids


def _plan_rows(uids: list[str], sample_submission) -> tuple[list[str], list[str], list[str]]:
    """(row_ids to write, studies to predict, studies of the sample not in `uids`)."""
    if sample_submission is None:
        return list(rows_for_studies(uids)["row_id"]), uids, []
    row_ids = _sample_row_ids(sample_submission)
    listed = list(pd.unique(pd.Series([split_row_id(r)[0] for r in row_ids], dtype=object)))
    wanted = set(listed)
    if uids and not wanted & set(uids):
        log.warning("sample_submission lists %d studies (%s), none of the %d to predict (%s): writing the rows "
                    "of the studies to predict instead (the public-data quirk; at scoring time they agree)",
                    len(listed), _few(listed), len(uids), _few(uids))
        return list(rows_for_studies(uids)["row_id"]), uids, []
    unlisted = [u for u in uids if u not in wanted]
    if unlisted:  # the rule: sample_submission's rows are what Kaggle scores; extra rows would be rejected
        log.error("!! %d of the %d studies to predict (test.csv) are NOT in sample_submission and get NO rows: %s. "
                  "The file has exactly sample_submission's rows (Kaggle scores those and rejects others); check "
                  "that test.csv and sample_submission.csv belong together", len(unlisted), len(uids),
                  _few(unlisted))
    have = set(uids)
    return row_ids, [u for u in uids if u in wanted], [u for u in listed if u not in have]


def validate_submission(df: pd.DataFrame, expected_row_ids: Sequence[str], *,
                        bounds: tuple[float, float] = CLIP) -> None:
    """Check a submission table before it is written.

    Args:
        df: the table; columns exactly `row_id, fractured`.
        expected_row_ids: every row_id of the test list, in the order the file must have.
        bounds: (low, high) every value must lie in (the clip range).

    Raises:
        ValueError: wrong columns, a row_id duplicated / missing / not expected, rows out of order, or a value
            that is not a finite number in `bounds`; the message names the first offending rows and their count.
    """
    expected_columns = ["row_id", "fractured"]
    if list(df.columns) != expected_columns:
        raise ValueError(f"submission columns must be exactly {expected_columns}; got {list(df.columns)}")
    row_ids = df["row_id"].astype(str).tolist()
    expected = [str(r) for r in expected_row_ids]
    counts = Counter(row_ids)
    dup = [r for r, n in counts.items() if n > 1]
    if dup:
        raise ValueError(f"submission: {len(dup)} row_ids appear more than once: {_few(dup)}")
    wanted = set(expected)
    missing = [r for r in expected if r not in counts]
    unknown = [r for r in row_ids if r not in wanted]
    if missing or unknown:
        raise ValueError(f"submission: {len(missing)} row_ids missing ({_few(missing) or '-'}) and {len(unknown)} "
                         f"not in the test list ({_few(unknown) or '-'})")
    if row_ids != expected:
        moved = [f"row {i}: {got} (expected {want})" for i, (got, want) in enumerate(zip(row_ids, expected))
                 if got != want]
        raise ValueError(f"submission: rows not in sample_submission order: {_few(moved)}")
    values = pd.to_numeric(df["fractured"], errors="coerce").to_numpy(dtype=np.float64)
    low, high = bounds
    bad = ~np.isfinite(values) | (values < low) | (values > high)
    if bad.any():
        cells = [f"{r}={v!r}" for r, v, b in zip(row_ids, df["fractured"], bad) if b]
        raise ValueError(f"submission: {len(cells)} values are not finite numbers in [{low}, {high}]: {_few(cells)}")


def default_log_path(out_path: PathLike) -> Path:
    """`<out_path stem>_log.csv` beside the submission: `DIR/submission.csv` -> `DIR/submission_log.csv`."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}_log.csv")


def _check_clip(clip: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(c) for c in clip)
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"clip must be (low, high) with 0 <= low < high <= 1; got {clip}")
    return low, high


def _finish(outcomes: dict[str, StudyOutcome], row_ids: list[str], extra_notes: list[dict], uid_order: list[str],
            out_path: PathLike, log_path: PathLike | None, clip: tuple[float, float], started: float,
            progress: bool, fallback=None, **summary_extra) -> dict:
    """Fill in the fallbacks, build, validate and write the submission and the log; return and print the summary."""
    low, high = clip
    filled = {uid: fallback_probs(o.probs, fallback) for uid, o in outcomes.items()}
    values = []
    for row_id in row_ids:
        uid, target = split_row_id(row_id)
        values.append(filled[uid][TARGETS.index(target)])
    df = pd.DataFrame({"row_id": row_ids, "fractured": np.clip(np.asarray(values, dtype=np.float64), low, high)})
    validate_submission(df, row_ids, bounds=(low, high))
    out_path = Path(out_path)
    log_path = Path(log_path) if log_path is not None else default_log_path(out_path)
    rank = {u: i for i, u in enumerate(uid_order)}
    notes = sorted([n for o in outcomes.values() for n in o.notes] + extra_notes,
                   key=lambda n: rank.get(n[UID], len(rank)))
    write_csv_atomic(df, out_path)
    write_csv_atomic(pd.DataFrame(notes, columns=list(LOG_COLUMNS)), log_path)
    with_fallbacks = [o for o in outcomes.values() if o.fallback_values]
    reasons = Counter(max((n for n in o.notes if n["fallback_values"]), key=lambda n: n["fallback_values"])["reason"]
                      for o in with_fallbacks)
    skipped = sum(n["reason"] == "not in sample_submission" for n in extra_notes)
    summary = {"studies": len(outcomes), "predicted": len(outcomes) - len(with_fallbacks),
               "fallback_studies": len(with_fallbacks), "fallbacks": dict(reasons.most_common()),
               "fallback": [round(float(v), 6) for v in fallback_probs(None, fallback)],
               "fallback_source": "the runs' training labels" if fallback is not None else "the 2019 table",
               "skipped_not_in_sample": skipped,
               "seconds": round(time.time() - started, 2), "submission": str(out_path), "log": str(log_path),
               **summary_extra}
    line = (f"submission: {summary['studies']} studies, {summary['predicted']} predicted, "
            f"{summary['fallback_studies']} with fallbacks"
            + (f" ({', '.join(f'{r} {n}' for r, n in reasons.most_common())})" if reasons else "")
            + (f", {skipped} listed studies NOT WRITTEN (not in sample_submission)" if skipped else "")
            + f", {summary['seconds']:.1f} s -> {out_path} (log: {log_path.name})")
    log.info(line)
    if progress:
        print(line)
    return summary


def _prepare(uids: Sequence[str], sample_submission, clip) -> tuple[list[str], list[str], list[str], list[str],
                                                                  tuple[float, float]]:
    uids = [str(u).strip() for u in uids]
    dup = [u for u, n in Counter(uids).items() if n > 1]
    if dup:
        raise ValueError(f"uids: {len(dup)} studies appear more than once: {_few(dup)}")
    clip = _check_clip(clip)
    row_ids, todo, unlisted = _plan_rows(uids, sample_submission)
    return uids, row_ids, todo, unlisted, clip


def _unlisted_outcomes(unlisted: list[str]) -> dict[str, StudyOutcome]:
    return {u: _fallback_outcome(u, "list", "not in study list", 0.0,
                                 "in sample_submission but not among the studies to predict") for u in unlisted}


def _skipped_notes(uids: list[str], todo: list[str], unlisted: list[str]) -> list[dict]:
    kept = set(todo)
    return [_note(u, "list", "not in sample_submission", 0.0, 0, "not predicted: Kaggle scores the rows of "
                  "sample_submission only") for u in uids if u not in kept and u not in unlisted]


def write_submission(uids: Sequence[str], predict: Predictor, out_path: PathLike, *,
                     sample_submission: pd.DataFrame | PathLike | None = None,
                     read: Callable[[str], Any] | None = None, images_dir: PathLike | None = None,
                     log_path: PathLike | None = None, time_budget: float | None = None, prefetch: bool = True,
                     progress: bool = True, clip: tuple[float, float] = CLIP,
                     fallback: Sequence[float] | np.ndarray | None = None) -> dict:
    """Predict every study and write a complete, validated `submission.csv` (and `submission_log.csv`).

    Args:
        uids: the studies to predict, e.g. from `kit.io.rsna.studies_to_predict`.
        predict: `predict(uid, study) -> 8 probabilities` (see `Predictor`).
        out_path: the submission CSV (`row_id, fractured`); parent folders are made.
        sample_submission: DataFrame or CSV path; when given, the file has exactly its rows in its order (its
            studies missing from `uids` get fallbacks, `uids` it does not list are skipped). When it shares no
            study with `uids` (the public data's quirk), the rows of `uids` are written instead.
        read: `uid -> study`, a picklable numpy-only callable run in the prefetch worker; default
            `DicomStudyReader(images_dir)`.
        images_dir: the folder of study folders (e.g. `<root>/test_images`) for the default reader.
        log_path: the log CSV; default `default_log_path(out_path)` (`DIR/submission_log.csv` for
            `DIR/submission.csv`).
        time_budget: seconds from this call to the deadline. Before each study, when elapsed + the mean seconds
            a study so far would pass it, the remaining studies get fallbacks (stage "budget"); a study still
            being read or predicted at the deadline is cut off (the reader process is stopped, the predictor's
            thread left behind, see `predict_studies`), it and the rest get fallbacks, and the files are written
            within a couple of seconds of the deadline. The predictor then runs in a daemon thread, not in the
            caller's thread. None: no deadline.
        prefetch: read the next study in a spawned process while this one is predicted.
        progress: show a progress bar and print the summary line.
        clip: every value is clipped to this range.
        fallback: the 8 values (TARGETS order) a value without an answer gets (`kit.submit.predictor.run_fallback`:
            the runs' training labels at the metric's odds); None: `FALLBACK`, the 2019 table.

    Returns:
        Summary: `studies`, `predicted` (all 8 values from the model), `fallback_studies`, `fallbacks`
        {reason: studies}, `fallback` (the 8 values used) and `fallback_source`, `skipped_not_in_sample`
        (studies to predict that sample_submission does not list: no rows), `seconds`, `submission` and `log`
        paths.

    Raises:
        ValueError: programming errors only: duplicated uids, a bad clip range, neither read nor images_dir,
            a malformed sample_submission. Never for a bad study.
        OSError: out_path or log_path cannot be written.
    """
    started = time.time()
    uids, row_ids, todo, unlisted, clip = _prepare(uids, sample_submission, clip)
    read = _reader(read, images_dir)
    deadline = started + float(time_budget) if time_budget is not None else None
    outcomes = _unlisted_outcomes(unlisted)
    bar = progress_bar(total=len(todo), desc="submission", unit="study", enabled=progress)
    try:
        for outcome in predict_studies(todo, predict, read, deadline=deadline, prefetch=prefetch):
            outcomes[outcome.uid] = outcome
            bar.update(1)
            if outcome.fallback_values:
                bar.set_postfix(fallbacks=sum(o.fallback_values > 0 for o in outcomes.values()))
    finally:
        bar.close()
    return _finish(outcomes, row_ids, _skipped_notes(uids, todo, unlisted), uids, out_path, log_path, clip,
                   started, progress, fallback)


# ---------------------------------------------------------------------------------------------------------
# One worker per device
# ---------------------------------------------------------------------------------------------------------


