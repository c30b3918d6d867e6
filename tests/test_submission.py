"""kit.submit.submission: fault injection on real (tiny) DICOM studies, the time budget, devices, validation.

Every fault must end in a valid, complete submission and a log line naming the study and the reason. The fake
predictors and readers are top-level here so that spawned workers can import them.
"""

from __future__ import annotations

import functools
import math
import os
import multiprocessing
import shutil
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kit.constants import TARGETS, TRAIN_PREVALENCE
from kit.evaluate.metrics import score_submission
from kit.io.rsna import rows_for_studies, split_row_id, studies_to_predict
from kit.submit.submission import (CLIP, FALLBACK, DicomStudyReader, fallback_probs, predict_studies,
                                   validate_submission, write_submission)
from kit.submit.parallel import split_studies, write_submission_parallel

PREFIX = "1.2.826.0.1.3680043."


def uid(n: int) -> str:
    return f"{PREFIX}{900 + n}"


GOOD = [uid(i) for i in range(1, 6)]
CORRUPT, TWO_SIZES, ONE_SLICE, EMPTY, NO_FOLDER = uid(6), uid(7), uid(8), uid(9), uid(10)
NAN, RAISES, PARTIAL = GOOD[1], GOOD[2], GOOD[3]
FAULTS = {NAN: "nan", RAISES: "raise", PARTIAL: "partial"}
ALL = [*GOOD, CORRUPT, TWO_SIZES, ONE_SLICE, EMPTY, NO_FOLDER]


# ---------------------------------------------------------------------------------------------------------
# Fake predictors and readers (top-level: spawned workers import them)
# ---------------------------------------------------------------------------------------------------------


def fake_probs(uid: str, study) -> np.ndarray:
    """Deterministic, depends on the study's pixels and slice count (so it proves the study got here)."""
    base = (zlib.crc32(uid.encode()) % 997) / 997
    hu = float(np.asarray(study.hu, dtype=np.float64).mean())
    return (base + 0.1 * np.arange(8) + study.hu.shape[0] / 100 + (hu % 7) / 70) % 0.9 + 0.05


class FaultyPredictor:
    """fake_probs, except: "nan" -> all NaN, "partial" -> NaN for C3, "raise" -> RuntimeError."""

    def __init__(self, faults: dict[str, str]):
        self.faults = faults

    def __call__(self, uid: str, study):
        kind = self.faults.get(uid)
        if kind == "raise":
            raise RuntimeError(f"model failed on {uid}")
        if kind == "nan":
            return np.full(8, np.nan)
        probs = fake_probs(uid, study)
        if kind == "partial":
            probs[TARGETS.index("C3")] = np.nan
        return probs


def make_predictor(device: str) -> FaultyPredictor:
    return FaultyPredictor(FAULTS)


class SleepyPredictor:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, uid: str, study) -> list[float]:
        time.sleep(self.seconds)
        return [0.3] * 8


def make_constant_predictor(device: str) -> SleepyPredictor:
    if device == "bad":
        raise RuntimeError("no such device: bad")
    return SleepyPredictor(0.0)


class OutputPredictor:
    """Returns what `outputs[uid]` says (bad shapes, logits, dicts)."""

    def __init__(self, outputs: dict):
        self.outputs = outputs

    def __call__(self, uid: str, study):
        return self.outputs[uid]


def tiny_read(uid: str) -> dict:
    return {"uid": uid}


def stamped_read(folder: str, uid: str) -> dict:
    """Records when each read starts (the worker is another process: through files)."""
    Path(folder, f"{uid}.read").write_text(repr(time.time()))
    return {"uid": uid}


class StampedPredictor:
    def __init__(self, seconds: float):
        self.seconds, self.spans = seconds, {}

    def __call__(self, uid: str, study) -> list[float]:
        start = time.time()
        time.sleep(self.seconds)
        self.spans[uid] = (start, time.time())
        return [0.4] * 8


def crash_read(uid: str) -> dict:
    if uid == CORRUPT:
        os._exit(5)  # a native decoder crash
    return {"uid": uid}


HUNG = [uid(80), uid(81), uid(82), uid(83), uid(84), uid(85)]  # HUNG[3]: the study that never ends


def never_returns() -> None:
    threading.Event().wait()  # blocks forever, like a decoder in a loop or a model step that hangs


class HangingPredictor:
    """0.3 for every study, except `hang`, on which it never returns."""

    def __init__(self, hang: str):
        self.hang = hang

    def __call__(self, uid: str, study) -> list[float]:
        if uid == self.hang:
            never_returns()
        return [0.3] * 8


def make_hanging_predictor(device: str) -> HangingPredictor:
    return HangingPredictor(HUNG[3])


def hanging_read(folder: str, uid: str) -> dict:
    """tiny_read, except HUNG[3]: never returns (after writing the pid of the process it hangs in)."""
    if uid == HUNG[3]:
        Path(folder, "hung.pid").write_text(str(os.getpid()))
        never_returns()
    return {"uid": uid}


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a daemon thread; fails the test (rather than hanging it) when fn has not returned
    after `seconds`. Returns (fn's result, seconds it took)."""
    box = []
    start = time.time()
    thread = threading.Thread(target=lambda: box.append(fn(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert box, f"{fn.__name__} had not returned after {seconds} s"
    return box[0], time.time() - start


def assert_cut_at(summary: dict, uids: list[str], cut: str, doing: str) -> pd.DataFrame:
    """The studies before `cut` predicted (0.3), `cut` and every later one with time budget fallbacks."""
    sub = assert_valid_and_complete(summary, uids)
    log = read_log(summary)
    at = uids.index(cut)
    assert list(log["StudyInstanceUID"]) == uids[at:]  # nothing logged for the studies done in time
    assert set(log["stage"]) == {"budget"} and set(log["reason"]) == {"time budget"}
    assert set(log["fallback_values"]) == {8}
    details = dict(zip(log["StudyInstanceUID"], log["detail"]))
    assert details[cut].startswith(f"study {cut} cut off after ") and doing in details[cut]
    assert all(details[u].startswith("not started") and cut in details[u] for u in uids[at + 1:])
    assert summary["predicted"] == at and summary["fallbacks"] == {"time budget": len(uids) - at}
    values = by_study(sub)
    assert all(np.allclose(values[u], 0.3) for u in uids[:at])
    return log


# ---------------------------------------------------------------------------------------------------------
# Data: real DICOM files, 32 px, 12 slices
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """An RSNA-layout root: test.csv lists ALL (NO_FOLDER has no folder), sample_submission.csv in shuffled
    row order, test_images/ with the faulty studies."""
    from kit.synthetic import make_study, write_study

    data = tmp_path_factory.mktemp("rsna_test")
    rows = rows_for_studies(ALL)
    rows.to_csv(data / "test.csv", index=False)
    order = rows["row_id"].to_numpy()[np.random.default_rng(0).permutation(len(rows))]
    pd.DataFrame({"row_id": order, "fractured": 0.5}).to_csv(data / "sample_submission.csv", index=False)
    root = data / "test_images"
    for i, u in enumerate([*GOOD, CORRUPT, TWO_SIZES, ONE_SLICE], start=1):
        write_study(make_study(i, size=32, n_slices=12, uid=u), root / u)
    (root / CORRUPT / "5.dcm").write_bytes(b"not a DICOM file" * 50)
    other = root.parent / "other_size"
    write_study(make_study(7, size=48, n_slices=12, uid=TWO_SIZES), other)  # same series, other image size
    for n in (1, 2, 3):
        shutil.copy(other / f"{n}.dcm", root / TWO_SIZES / f"{100 + n}.dcm")
    for path in (root / ONE_SLICE).iterdir():
        if path.name != "1.dcm":
            path.unlink()
    (root / EMPTY).mkdir()
    return data


@pytest.fixture(scope="module")
def images(data_root):
    return data_root / "test_images"


def read_log(summary: dict) -> pd.DataFrame:
    return pd.read_csv(summary["log"], dtype={"StudyInstanceUID": str})


def by_study(submission: pd.DataFrame) -> dict[str, np.ndarray]:
    values = dict(zip(submission["row_id"], submission["fractured"]))
    uids = {split_row_id(r)[0] for r in submission["row_id"]}
    return {u: np.array([values[f"{u}_{t}"] for t in TARGETS]) for u in uids}


def assert_valid_and_complete(summary: dict, uids: list[str], order: list[str] | None = None) -> pd.DataFrame:
    sub = pd.read_csv(summary["submission"], dtype={"row_id": str})
    expected = order if order is not None else list(rows_for_studies(uids)["row_id"])
    validate_submission(sub, expected)  # every row once, in order, finite, clipped
    solution = pd.DataFrame({"row_id": expected, "fractured": 0})
    assert math.isfinite(score_submission(sub, solution))  # Kaggle's checks too
    return sub


def log_rows(log: pd.DataFrame, uid: str) -> list[tuple]:
    rows = log[log["StudyInstanceUID"] == uid]
    return list(zip(rows["stage"], rows["reason"], rows["fallback_values"]))


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_fallback_probs():
    np.testing.assert_array_equal(fallback_probs(), TRAIN_PREVALENCE)
    assert FALLBACK == TRAIN_PREVALENCE and len(FALLBACK) == len(TARGETS)
    partial = [0.9, np.nan, 0.2, np.inf, 0.4, 1.5, -0.1, 0.0]
    expected = [0.9, FALLBACK[1], 0.2, FALLBACK[3], 0.4, FALLBACK[5], FALLBACK[6], 0.0]
    np.testing.assert_array_equal(fallback_probs(partial), expected)
    with pytest.raises(ValueError, match="8 values"):
        fallback_probs([0.5] * 7)


def test_every_fault_gives_a_complete_submission_and_a_log_line(data_root, images, tmp_path):
    uids, _ = studies_to_predict(data_root)  # keeps test.csv: only one listed study lacks a folder
    assert uids == ALL
    sample = data_root / "sample_submission.csv"
    order = list(pd.read_csv(sample, dtype={"row_id": str})["row_id"])
    assert order != list(rows_for_studies(ALL)["row_id"])  # the file must follow the sample's order
    summary = write_submission(uids, FaultyPredictor(FAULTS), tmp_path / "out" / "submission.csv",
                               sample_submission=sample, images_dir=images, progress=False)
    sub = assert_valid_and_complete(summary, ALL, order)
    log = read_log(summary)
    assert summary["log"] == str(tmp_path / "out" / "submission_log.csv")
    assert log_rows(log, NO_FOLDER) == [("read", "no folder", 8)]
    assert log_rows(log, EMPTY) == [("read", "empty folder", 8)]
    assert log_rows(log, ONE_SLICE) == [("read", "too few slices", 8)]
    assert log_rows(log, NAN) == [("predict", "non-finite", 8)]
    assert log_rows(log, RAISES) == [("predict", "exception", 8)]
    assert log_rows(log, PARTIAL) == [("predict", "partial", 1)]
    # a corrupt file or a second image size: the study is read without those files, predicted, and logged
    assert log_rows(log, CORRUPT) == [("read", "read warnings", 0)]
    assert "5.dcm" in log.loc[log["StudyInstanceUID"] == CORRUPT, "detail"].item()
    assert log_rows(log, TWO_SIZES) == [("read", "read warnings", 0)]
    assert "size (48, 48) differs" in log.loc[log["StudyInstanceUID"] == TWO_SIZES, "detail"].item()
    assert "model failed on" in log.loc[log["StudyInstanceUID"] == RAISES, "detail"].item()
    for good in (GOOD[0], GOOD[4]):
        assert log_rows(log, good) == []

    values = by_study(sub)
    reader = DicomStudyReader(images)
    for u in (GOOD[0], GOOD[4], CORRUPT, TWO_SIZES):
        np.testing.assert_allclose(values[u], np.clip(fake_probs(u, reader(u)), *CLIP))
    assert reader(CORRUPT).hu.shape[0] == 11 and reader(TWO_SIZES).hu.shape == (12, 32, 32)
    for u in (NO_FOLDER, EMPTY, ONE_SLICE, NAN, RAISES):
        np.testing.assert_allclose(values[u], FALLBACK)
    partial = np.clip(fake_probs(PARTIAL, reader(PARTIAL)), *CLIP)
    partial[TARGETS.index("C3")] = FALLBACK[TARGETS.index("C3")]
    np.testing.assert_allclose(values[PARTIAL], partial)

    assert summary["studies"] == len(ALL) and summary["predicted"] == 4 and summary["fallback_studies"] == 6
    assert summary["fallbacks"] == {"no folder": 1, "empty folder": 1, "too few slices": 1, "non-finite": 1,
                                    "exception": 1, "partial": 1}
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temporary file


def test_time_budget_running_out_half_way(tmp_path):
    uids = [uid(i) for i in range(20, 28)]
    budget, step = 0.9, 0.2
    summary = write_submission(uids, SleepyPredictor(step), tmp_path / "submission.csv", read=tiny_read,
                               time_budget=budget, prefetch=False, progress=False)
    sub = assert_valid_and_complete(summary, uids)
    log = read_log(summary)
    cut = log[log["stage"] == "budget"]
    n_cut = len(cut)
    assert 3 <= n_cut <= 6  # ~4 of 8 studies fit in 0.9 s at 0.2 s each
    assert list(cut["StudyInstanceUID"]) == uids[-n_cut:]  # the studies after the cut
    assert set(cut["reason"]) == {"time budget"} and set(cut["fallback_values"]) == {8}
    assert summary["predicted"] == len(uids) - n_cut and summary["fallbacks"] == {"time budget": n_cut}
    assert summary["seconds"] <= budget + 0.6  # ends in time (one study's jitter and the writing)
    values = by_study(sub)
    assert all(np.allclose(values[u], 0.3) for u in uids[:-n_cut])
    assert all(np.allclose(values[u], FALLBACK) for u in uids[-n_cut:])


@pytest.mark.parametrize("prefetch, budget", [(False, 2.0), (True, 5.0)])  # True: a spawned reader starts first
def test_time_budget_holds_when_the_predictor_never_returns(tmp_path, prefetch, budget):
    summary, took = within(budget + 10, write_submission, HUNG, HangingPredictor(HUNG[3]),
                           tmp_path / "submission.csv", read=tiny_read, time_budget=budget, prefetch=prefetch,
                           progress=False)
    assert took <= budget + 3  # on time: the loop walked away from the predictor at the deadline
    log = assert_cut_at(summary, HUNG, HUNG[3], "predicting")
    assert 0.5 <= log["seconds"].iloc[0] <= budget + 0.5  # the hung study had what was left of the budget


@pytest.mark.parametrize("prefetch, budget", [(False, 2.0), (True, 5.0)])
def test_time_budget_holds_when_a_read_never_returns(tmp_path, prefetch, budget):
    read = functools.partial(hanging_read, str(tmp_path))
    summary, took = within(budget + 10, write_submission, HUNG, SleepyPredictor(0.0), tmp_path / "submission.csv",
                           read=read, time_budget=budget, prefetch=prefetch, progress=False)
    assert took <= budget + 3
    assert_cut_at(summary, HUNG, HUNG[3], "waiting for the read")
    pid = int((tmp_path / "hung.pid").read_text())
    if prefetch:  # the reader process was stopped and reaped
        assert pid != os.getpid()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    else:  # read here: its thread is left behind (a daemon: it does not hold the interpreter)
        assert pid == os.getpid()


def test_time_budget_holds_when_a_device_worker_hangs(tmp_path):
    budget = 8.0  # two spawned workers start, import the kit and build their predictors first
    summary, took = within(budget + 10, write_submission_parallel, HUNG, make_hanging_predictor, ["cpu", "cpu"],
                           tmp_path / "submission.csv", read=tiny_read, time_budget=budget, prefetch=False,
                           progress=False)
    assert took <= budget + 3  # the parent stopped the hung worker at the deadline
    assert not multiprocessing.active_children()  # both workers gone
    hung_share = split_studies(HUNG, 2)[1]
    assert hung_share == [HUNG[1], HUNG[3], HUNG[5]]
    sub = assert_valid_and_complete(summary, HUNG)
    log = read_log(summary)
    assert list(log["StudyInstanceUID"]) == [HUNG[3], HUNG[5]]  # the other worker finished its share in time
    assert set(log["stage"]) == {"budget"} and set(log["reason"]) == {"time budget"}
    details = dict(zip(log["StudyInstanceUID"], log["detail"]))
    assert details[HUNG[3]].startswith(f"study {HUNG[3]} cut off after ") and "on it" in details[HUNG[3]]
    assert details[HUNG[5]].startswith("not started") and HUNG[3] in details[HUNG[5]]
    assert summary["fallbacks"] == {"time budget": 2} and summary["predicted"] == 4
    values = by_study(sub)
    assert all(np.allclose(values[u], 0.3) for u in HUNG if u not in (HUNG[3], HUNG[5]))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_is_never_opened(tmp_path):
    from kit.synthetic import make_study, write_study

    with_pipe, only_pipe = uid(90), uid(91)
    write_study(make_study(1, size=32, n_slices=6, uid=with_pipe), tmp_path / with_pipe)
    os.mkfifo(tmp_path / with_pipe / "7.dcm")  # opening a named pipe for reading blocks until someone writes
    (tmp_path / only_pipe).mkdir()
    os.mkfifo(tmp_path / only_pipe / "1.dcm")
    uids = [with_pipe, only_pipe]
    summary, _ = within(30, write_submission, uids, FaultyPredictor({}), tmp_path / "out" / "submission.csv",
                        images_dir=tmp_path, prefetch=False, progress=False)
    sub = assert_valid_and_complete(summary, uids)
    log = read_log(summary)
    details = dict(zip(log["StudyInstanceUID"], log["detail"]))
    assert log_rows(log, with_pipe) == [("read", "read warnings", 0)]  # read without it, and predicted
    assert f"skipped {tmp_path / with_pipe / '7.dcm'}: not a regular file: a named pipe (FIFO)" in details[with_pipe]
    assert log_rows(log, only_pipe) == [("read", "empty folder", 8)]
    assert "1.dcm: not a regular file: a named pipe (FIFO)" in details[only_pipe]
    series = DicomStudyReader(tmp_path)(with_pipe)
    assert series.hu.shape[0] == 6
    np.testing.assert_allclose(by_study(sub)[with_pipe], np.clip(fake_probs(with_pipe, series), *CLIP))


def test_the_next_study_is_read_while_this_one_is_predicted(tmp_path):
    uids = [uid(i) for i in range(70, 74)]
    predictor = StampedPredictor(0.4)
    outcomes = list(predict_studies(uids, predictor, functools.partial(stamped_read, str(tmp_path))))
    assert [o.uid for o in outcomes] == uids and all(o.notes == [] for o in outcomes)
    assert all(o.predict_seconds >= 0.4 and o.read_seconds >= 0 for o in outcomes)
    read_start = {u: float((tmp_path / f"{u}.read").read_text()) for u in uids}
    for this, following in zip(uids, uids[1:]):
        assert read_start[following] < predictor.spans[this][1]  # read before this study's prediction ended


def test_a_reader_that_crashes_its_process(tmp_path):
    uids = [GOOD[0], CORRUPT, GOOD[1]]
    summary = write_submission(uids, SleepyPredictor(0.0), tmp_path / "submission.csv", read=crash_read,
                               progress=False)
    sub = assert_valid_and_complete(summary, uids)
    log = read_log(summary)
    assert log_rows(log, CORRUPT) == [("read", "reader crashed", 8)]
    assert "exit code 5" in log.loc[log["StudyInstanceUID"] == CORRUPT, "detail"].item()
    values = by_study(sub)
    assert np.allclose(values[GOOD[0]], 0.3) and np.allclose(values[GOOD[1]], 0.3)  # the rest still predicted


def test_bad_outputs(tmp_path):
    outputs = {uid(30): [0.5] * 7, uid(31): [3.0] + [0.5] * 7, uid(32): {"patient_overall": 0.8, "C1": 0.1},
               uid(33): {"C8": 0.5}, uid(34): "not numbers", uid(35): {t: 0.25 for t in TARGETS}}
    uids = list(outputs)
    summary = write_submission(uids, OutputPredictor(outputs), tmp_path / "submission.csv", read=tiny_read,
                               prefetch=False, progress=False)
    sub = assert_valid_and_complete(summary, uids)
    log = read_log(summary)
    assert log_rows(log, uid(30)) == [("predict", "bad output", 8)]
    assert log_rows(log, uid(31)) == [("predict", "out of range", 1)]
    assert log_rows(log, uid(32)) == [("predict", "partial", 6)]
    assert log_rows(log, uid(33)) == [("predict", "bad output", 8)]
    assert log_rows(log, uid(34)) == [("predict", "bad output", 8)]
    assert log_rows(log, uid(35)) == []
    values = by_study(sub)
    np.testing.assert_allclose(values[uid(31)], [FALLBACK[0]] + [0.5] * 7)
    np.testing.assert_allclose(values[uid(32)], [0.8, 0.1, *FALLBACK[2:]])
    np.testing.assert_allclose(values[uid(35)], 0.25)


def test_two_cpu_devices_write_the_same_file_as_one(images, tmp_path):
    one = write_submission(ALL, make_predictor("cpu"), tmp_path / "one" / "submission.csv", images_dir=images,
                           prefetch=False, progress=False)
    two = write_submission_parallel(ALL, make_predictor, ["cpu", "cpu"], tmp_path / "two" / "submission.csv",
                                    images_dir=images, progress=False)
    assert (tmp_path / "one" / "submission.csv").read_bytes() == (tmp_path / "two" / "submission.csv").read_bytes()
    assert two["devices"] == ["cpu", "cpu"]
    keys = ["StudyInstanceUID", "stage", "reason", "fallback_values", "detail"]
    pd.testing.assert_frame_equal(read_log(one)[keys], read_log(two)[keys])
    assert {k: one[k] for k in ("studies", "predicted", "fallbacks")} == \
        {k: two[k] for k in ("studies", "predicted", "fallbacks")}


def test_a_device_whose_predictor_fails_leaves_fallbacks(tmp_path):
    uids = [uid(i) for i in range(40, 46)]
    summary = write_submission_parallel(uids, make_constant_predictor, ["cpu", "bad"], tmp_path / "submission.csv",
                                        read=tiny_read, prefetch=False, progress=False)
    assert_valid_and_complete(summary, uids)
    log = read_log(summary)
    failed = split_studies(uids, 2)[1]
    assert list(log["StudyInstanceUID"]) == failed
    assert set(log["stage"]) == {"worker"} and set(log["reason"]) == {"predictor failed"}
    assert log["detail"].str.contains("no such device: bad").all()
    assert summary["fallbacks"] == {"predictor failed": len(failed)}
    values = by_study(pd.read_csv(summary["submission"], dtype={"row_id": str}))
    assert all(np.allclose(values[u], FALLBACK if u in failed else 0.3) for u in uids)
    with pytest.raises(RuntimeError, match="failed on every device: make_predictor\\('bad'\\) raised"):
        write_submission_parallel(uids, make_constant_predictor, ["bad", "bad"], tmp_path / "none.csv",
                                  read=tiny_read, prefetch=False, progress=False)
    assert not (tmp_path / "none.csv").exists()


def test_sample_submission_rows_rule(tmp_path):
    listed, extra, unlisted = uid(50), uid(51), uid(52)
    sample = pd.DataFrame({"row_id": list(rows_for_studies([extra, listed])["row_id"]), "fractured": 0.5})
    summary = write_submission([listed, unlisted], SleepyPredictor(0.0), tmp_path / "submission.csv",
                               sample_submission=sample, read=tiny_read, prefetch=False, progress=False)
    assert_valid_and_complete(summary, [extra, listed], list(sample["row_id"]))
    log = read_log(summary)
    assert log_rows(log, extra) == [("list", "not in study list", 8)]
    assert log_rows(log, unlisted) == [("list", "not in sample_submission", 0)]
    assert summary["skipped_not_in_sample"] == 1  # said loudly: an error-level log line, the summary, its line
    # the public-data quirk: the sample lists none of the studies to predict -> their rows are written
    quirk = pd.DataFrame({"row_id": list(rows_for_studies([uid(53)])["row_id"]), "fractured": 0.5})
    summary = write_submission([listed], SleepyPredictor(0.0), tmp_path / "quirk.csv", sample_submission=quirk,
                               read=tiny_read, prefetch=False, progress=False)
    assert_valid_and_complete(summary, [listed])


def test_split_studies():
    uids = [uid(i) for i in range(7)]
    shares = split_studies(uids, 3)
    assert shares == [uids[0::3], uids[1::3], uids[2::3]]
    assert sorted(u for s in shares for u in s) == sorted(uids)
    assert split_studies(uids[:1], 2) == [uids[:1], []]
    with pytest.raises(ValueError, match="n_workers must be >= 1"):
        split_studies(uids, 0)


def test_validate_submission_names_the_problem_rows():
    expected = list(rows_for_studies([uid(60), uid(61)])["row_id"])
    good = pd.DataFrame({"row_id": expected, "fractured": 0.5})
    validate_submission(good, expected)
    cases = [
        (good.rename(columns={"fractured": "p"}), "columns must be exactly"),
        (pd.concat([good, good.iloc[:1]]), f"appear more than once: {expected[0]}"),
        (good.iloc[1:], f"1 row_ids missing \\({expected[0]}\\)"),
        (good.assign(row_id=good["row_id"].replace(expected[3], f"{uid(62)}_C3")),
         f"not in the test list \\({uid(62)}_C3\\)"),
        (good.iloc[::-1], f"not in sample_submission order: row 0: {expected[-1]}"),
        (good.assign(fractured=[np.nan] + [0.5] * 15), f"{expected[0]}=nan"),
        (good.assign(fractured=[0.5] * 15 + [1.0]), f"{expected[-1]}=1.0"),
    ]
    for df, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_submission(df, expected)


def test_programming_errors_raise(tmp_path):
    with pytest.raises(ValueError, match="appear more than once"):
        write_submission([uid(1), uid(1)], SleepyPredictor(0), tmp_path / "s.csv", read=tiny_read, progress=False)
    with pytest.raises(ValueError, match="images_dir"):
        write_submission([uid(1)], SleepyPredictor(0), tmp_path / "s.csv", progress=False)
    with pytest.raises(ValueError, match="clip must be"):
        write_submission([uid(1)], SleepyPredictor(0), tmp_path / "s.csv", read=tiny_read, clip=(0.5, 0.1),
                         progress=False)


def test_the_fallback_comes_from_the_runs_and_is_filled_in_once(images, tmp_path):
    """`fallback=` (the runs' best constant, `kit.submit.predictor.run_fallback`) is what every value without an answer
    gets, in one place (the writer), for studies without a folder, a failed model and a partial answer alike;
    without it, the 2019 table."""
    runs_constant = np.array([0.41, 0.06, 0.12, 0.03, 0.05, 0.07, 0.12, 0.17])
    studies = [GOOD[0], RAISES, PARTIAL, NO_FOLDER]
    summary = write_submission(studies, FaultyPredictor(FAULTS), tmp_path / "s.csv", images_dir=images,
                               prefetch=False, progress=False, fallback=runs_constant)
    values = by_study(pd.read_csv(summary["submission"], dtype={"row_id": str}))
    np.testing.assert_allclose(values[RAISES], runs_constant)
    np.testing.assert_allclose(values[NO_FOLDER], runs_constant)
    assert values[PARTIAL][TARGETS.index("C3")] == pytest.approx(runs_constant[TARGETS.index("C3")])
    assert values[PARTIAL][0] != pytest.approx(runs_constant[0])
    assert summary["fallback"] == pytest.approx(runs_constant.tolist())
    assert summary["fallback_source"] == "the runs' training labels"
    table = write_submission([RAISES], FaultyPredictor(FAULTS), tmp_path / "t.csv", images_dir=images,
                             prefetch=False, progress=False)
    np.testing.assert_allclose(by_study(pd.read_csv(table["submission"], dtype={"row_id": str}))[RAISES],
                               TRAIN_PREVALENCE)
    assert table["fallback_source"] == "the 2019 table"
    with pytest.raises(ValueError, match="fallback must be 8 probabilities"):
        write_submission([RAISES], FaultyPredictor(FAULTS), tmp_path / "u.csv", images_dir=images,
                         prefetch=False, progress=False, fallback=[0.5] * 7)
