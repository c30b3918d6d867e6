"""The one loop of the batch jobs (`kit.io.jobs.run_job`): resume, failures, rows as each study finishes."""

from pathlib import Path

import pandas as pd
import pytest

from kit.io.jobs import FAILURES, Done, Ledger, read_ahead, run_job

UID = "StudyInstanceUID"


def _read(uid: str) -> int:
    if uid.startswith("bad"):
        raise ValueError(f"cannot read {uid}")
    return len(uid)


def _job(tmp_path: Path, fail_work: set[str] = frozenset(), stop_after: str | None = None):
    ledger = Ledger(tmp_path, "manifest.csv", lambda u: tmp_path / f"{u}.out", columns=[UID, "value"],
                    tables={"extra.csv": [UID, "note"]})
    calls = []

    def work(uid: str, study: int, seconds: float) -> Done:
        calls.append(uid)
        if uid in fail_work:
            raise RuntimeError("model gave NaN")
        (tmp_path / f"{uid}.out").write_text(str(study))
        if uid == stop_after:
            raise KeyboardInterrupt  # the job killed after this study's file, before its rows
        notes = pd.DataFrame({UID: [uid, uid], "note": ["a", "b"]}) if uid == "s2" else pd.DataFrame()
        return Done({UID: uid, "value": study}, {"extra.csv": notes}, problem="mask unusable" if uid == "s3" else None)

    return ledger, work, calls


def _run(ledger, work, uids, prefetch=False):
    return run_job(uids, ledger, work, studies=lambda todo: read_ahead(_read, todo, prefetch), desc="test",
                   progress=False, where=lambda u: f"images/{u}")


def test_failures_recorded_others_go_on_and_resume(tmp_path):
    ledger, work, calls = _job(tmp_path, fail_work={"s4"})
    result = _run(ledger, work, ["s1", "bad1", "s2", "s3", "s4"])
    assert [r[UID] for r in result["rows"]] == ["s1", "s2", "s3"] and result["skipped"] == 0
    failures = pd.read_csv(tmp_path / FAILURES)
    assert list(failures[UID]) == ["bad1", "s3", "s4"]
    assert failures["error"][0].startswith("RuntimeError: reading images/bad1: ValueError: cannot read bad1")
    assert failures["error"][1] == "mask unusable" and "NaN" in failures["error"][2]
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    assert list(manifest[UID]) == ["s1", "s2", "s3"] and list(manifest["value"]) == [2, 2, 2]
    assert list(pd.read_csv(tmp_path / "extra.csv")["note"]) == ["a", "b"]

    # a second run does only what is unfinished; a study that works now leaves failures.csv
    ledger, work, calls = _job(tmp_path)
    result = _run(ledger, work, ["s1", "bad1", "s2", "s3", "s4"])
    assert calls == ["s4"] and result["skipped"] == 3
    assert list(pd.read_csv(tmp_path / FAILURES)[UID]) == ["bad1", "s3"]


def test_a_killed_run_keeps_the_studies_before_and_redoes_the_one_it_was_on(tmp_path):
    ledger, work, _ = _job(tmp_path, stop_after="s2")
    with pytest.raises(KeyboardInterrupt):
        _run(ledger, work, ["s1", "s2", "s3"], prefetch=True)
    assert list(pd.read_csv(tmp_path / "manifest.csv")[UID]) == ["s1"]  # written as s1 finished
    assert (tmp_path / "s2.out").is_file()  # its file, but no row: not finished
    ledger, work, calls = _job(tmp_path)
    result = _run(ledger, work, ["s1", "s2", "s3"])
    assert calls == ["s2", "s3"] and result["skipped"] == 1
    assert list(pd.read_csv(tmp_path / "manifest.csv")[UID]) == ["s1", "s2", "s3"]
    assert list(pd.read_csv(tmp_path / "extra.csv")[UID]) == ["s2", "s2"]


def test_known_failures_and_tables_exist_before_any_study(tmp_path):
    ledger, work, calls = _job(tmp_path)
    result = run_job([], ledger, work, studies=lambda todo: iter(()), desc="test", progress=False,
                     known_failures={"gone": "listed in train.csv but there is no folder"})
    assert calls == [] and result["failures"] == {"gone": "listed in train.csv but there is no folder"}
    assert list(pd.read_csv(tmp_path / FAILURES)[UID]) == ["gone"]
    assert list(pd.read_csv(tmp_path / "manifest.csv").columns) == [UID, "value"]
    assert list(pd.read_csv(tmp_path / "extra.csv").columns) == [UID, "note"]


def test_a_time_budget_stops_before_a_study_that_would_pass_it_and_the_next_run_resumes(tmp_path, monkeypatch):
    from kit.io import jobs

    class Clock:  # the job's clock, moved by the work alone: the test does not depend on the machine's speed
        now = 1000.0

        def time(self) -> float:
            return self.now

        perf_counter = time

    clock = Clock()
    monkeypatch.setattr(jobs, "time", clock)
    ledger, work, calls = _job(tmp_path)

    def slow(uid: str, study: int, seconds: float) -> Done:
        clock.now += 0.3
        return work(uid, study, seconds)

    uids = [f"s{i}" for i in range(1, 7)]
    # 0.3 s a study: after two (0.6 s) the third would end at 0.9 s, past a 0.75 s budget
    first = run_job(uids, ledger, slow, studies=lambda todo: read_ahead(_read, todo, False), desc="test",
                    progress=False, time_budget=0.75)
    assert calls == ["s1", "s2"] and first["left"] == 4 and first["failures"] == {}
    assert list(pd.read_csv(tmp_path / "manifest.csv")[UID]) == ["s1", "s2"]
    assert pd.read_csv(tmp_path / FAILURES).empty  # left, not failed
    second = _run(ledger, work, uids)
    assert calls == uids and second["skipped"] == 2 and second["left"] == 0


def test_kit_prepare_with_a_time_budget_leaves_the_rest_for_the_next_run(synthetic_root, tmp_path):
    from kit.io.cache import prepare_studies

    uids = sorted(p.name for p in (synthetic_root / "train_images").iterdir())
    first = prepare_studies(synthetic_root, tmp_path / "cache", size=32, workers=1, progress=False, time_budget=0)
    assert (first["prepared"], first["left"], first["failed"]) == (0, len(uids), 0)
    second = prepare_studies(synthetic_root, tmp_path / "cache", size=32, workers=1, progress=False)
    assert (second["prepared"], second["skipped"], second["left"]) == (len(uids), 0, 0)
