"""kit.io.prefetch: order, per-item errors, a worker that dies, the memory bound, shutdown.

The functions given to `prefetch` are top-level functions of this module, so that the spawned worker can
import them. Each process test starts one or two workers (~1 s each).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from kit.io.prefetch import Prefetched, call_before, prefetch


def _left_behind(kp, before: set) -> set:
    """Shared-memory files made since `before` that no live process owns: by this process, or by a worker that
    has exited (the name carries its maker's pid). Another kit job running on the machine owns its own files."""
    def dead_or_mine(path) -> bool:
        pid = int(path.name[len(kp._SHM_PREFIX):].split("-")[0])
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    return {p for p in set(kp.SHM_DIR.glob(f"{kp._SHM_PREFIX}*")) - before if dead_or_mine(p)}


def square_or_fail(x: int) -> np.ndarray:
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return np.arange(4, dtype=np.int16) * x * x


def die_on_two(x: int) -> tuple[int, int]:
    if x == 2:
        os._exit(3)  # like a native decoder that takes the process down
    return x + 10, os.getpid()


def record_start(folder: str, x: int) -> int:
    Path(folder, f"{x}.started").touch()
    return x


def big_array(x: int) -> dict:
    """A result with a buffer large enough for the shared-memory path and a small one for the pipe."""
    return {"big": np.full((1024, 1024), x, np.int16), "small": np.arange(x + 3, dtype=np.float32)}


def pid_of_worker(x: int) -> int:
    return os.getpid()


def hang_on_two(folder: str, x: int) -> int:
    """Never returns for item 2 (after writing the pid of the process it hangs in)."""
    if x == 2:
        Path(folder, "hung.pid").write_text(str(os.getpid()))
        threading.Event().wait()
    return x


def started(folder: Path) -> int:
    return len(list(folder.glob("*.started")))


def strip_seconds(results: list[Prefetched]) -> list[tuple]:
    out = []
    for r in results:
        value = r.result.tolist() if isinstance(r.result, np.ndarray) else r.result
        error = r.error.split(" (at ")[0] if r.error else None
        out.append((r.item, value, error))
    return out


def test_order_errors_and_same_results_in_process():
    items = [5, 1, 3, 0, 2, 4]
    in_worker = list(prefetch(square_or_fail, items, ahead=2))
    here = list(prefetch(square_or_fail, items, processes=False))
    assert [r.item for r in in_worker] == items
    assert strip_seconds(in_worker) == strip_seconds(here)
    for r in in_worker:
        if r.item == 3:
            assert r.result is None
            assert r.error.startswith("ValueError: item 3 is bad (at test_prefetch.py:")
        else:
            assert r.error is None
            np.testing.assert_array_equal(r.result, np.arange(4) * r.item ** 2)
            assert r.result.dtype == np.int16 and r.result.flags.writeable  # arrives as a usable array
            assert r.seconds >= 0


def test_a_worker_that_dies_is_reported_and_the_rest_still_come():
    results = list(prefetch(die_on_two, [0, 1, 2, 3, 4]))
    assert [r.item for r in results] == [0, 1, 2, 3, 4]
    dead = results[2]
    assert dead.result is None and "died" in dead.error and "exit code 3" in dead.error
    assert [r.result[0] for r in results if r.item != 2] == [10, 11, 13, 14]
    assert all(r.error is None for r in results if r.item != 2)
    pids = {r.item: r.result[1] for r in results if r.item != 2}
    assert pids[0] == pids[1] != pids[3] == pids[4]  # one new worker took the rest
    assert os.getpid() not in pids.values()


@pytest.mark.parametrize("ahead", [1, 2])
def test_no_more_than_ahead_results_wait(tmp_path, ahead):
    n = 6
    gen = prefetch(functools.partial(record_start, str(tmp_path)), range(n), ahead=ahead)
    for consumed, r in enumerate(gen, start=1):
        assert r.result == consumed - 1
        expected = min(n, consumed + ahead)  # the held item plus `ahead` beyond it
        deadline = time.time() + 10
        while started(tmp_path) < expected and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.15)  # an unbounded worker would have run further by now
        assert started(tmp_path) == expected


def test_in_process_runs_each_item_only_when_asked(tmp_path):
    gen = prefetch(functools.partial(record_start, str(tmp_path)), range(4), processes=False)
    assert started(tmp_path) == 0
    for consumed, _ in enumerate(gen, start=1):
        assert started(tmp_path) == consumed


def test_closing_early_stops_the_worker():
    gen = prefetch(pid_of_worker, range(100))
    pid = next(gen).result
    assert pid != os.getpid()
    os.kill(pid, 0)  # alive while the iteration runs
    gen.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped


def test_a_function_the_worker_cannot_import_is_a_clear_error(monkeypatch):
    phantom = types.ModuleType("kit_phantom_module")  # exists here only: pickles by name, fails to import there

    def double(x):
        return 2 * x

    double.__module__, double.__qualname__ = phantom.__name__, "double"
    phantom.double = double
    monkeypatch.setitem(sys.modules, phantom.__name__, phantom)
    with pytest.raises(RuntimeError, match="top-level function of an importable module"):
        list(prefetch(double, [1, 2]))


@pytest.mark.parametrize("processes, seconds", [(True, 4.0), (False, 1.0)])  # True: the worker starts first
def test_a_deadline_bounds_the_wait_and_stops_the_worker(tmp_path, processes, seconds):
    deadline = time.time() + seconds
    gen = prefetch(functools.partial(hang_on_two, str(tmp_path)), range(5), deadline=deadline, processes=processes)
    results = []
    with pytest.raises(TimeoutError, match="no result for item 2 by the deadline"):
        for r in gen:
            results.append(r.result)
    assert results == [0, 1]
    assert deadline - 0.05 <= time.time() <= deadline + 1.5  # at the deadline, the worker stopped right after
    assert next(gen, None) is None  # the generator is finished
    pid = int((tmp_path / "hung.pid").read_text())
    if processes:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped and reaped
    else:
        assert pid == os.getpid()  # ran here, in a daemon thread that is left behind


def test_call_before_returns_raises_or_walks_away():
    assert call_before(time.time() + 10, divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        call_before(time.time() + 10, divmod, 1, 0)
    start = time.time()
    with pytest.raises(TimeoutError, match="had not returned at the deadline"):
        call_before(start + 0.3, threading.Event().wait)
    assert 0.3 <= time.time() - start < 1.0
    with pytest.raises(TimeoutError):
        call_before(start, threading.Event().wait)  # a deadline already past: no wait


def test_bad_ahead():
    with pytest.raises(ValueError, match="ahead must be an integer >= 0"):
        prefetch(pid_of_worker, [1], ahead=-1)


def test_large_results_travel_through_shared_memory_and_leave_no_file():
    """Buffers of SHM_MIN_BYTES or more come through a shared-memory file (mapped by the receiver, unlinked at
    once), smaller ones through the pipe; the arrays arrive equal and writable, and no file is left behind."""
    from kit.io import prefetch as kp

    if not kp.SHM_DIR.is_dir():
        pytest.skip("no /dev/shm here: results travel through the pipe")
    before = set(kp.SHM_DIR.glob(f"{kp._SHM_PREFIX}*"))
    results = list(prefetch(big_array, [1, 2, 3], ahead=1))
    for x, (item, result, error, _) in zip([1, 2, 3], results):
        assert error is None and item == x
        assert result["big"].shape == (1024, 1024) and (result["big"] == x).all()
        np.testing.assert_array_equal(result["small"], np.arange(x + 3, dtype=np.float32))
        result["big"][0, 0] = -1  # writable (copy-on-write)
    assert not _left_behind(kp, before)


def test_the_pipe_carries_large_buffers_where_there_is_no_shared_memory(monkeypatch, tmp_path):
    """Without a shared-memory folder, _send / _recv carry every buffer through the pipe, the same arrays."""
    import multiprocessing

    from kit.io import prefetch as kp

    monkeypatch.setattr(kp, "SHM_DIR", tmp_path / "absent")
    a, b = multiprocessing.Pipe()
    sender = threading.Thread(target=kp._send, args=(a, big_array(5)))
    sender.start()
    got = kp._recv(b)
    sender.join()
    assert (got["big"] == 5).all() and got["big"].flags.writeable


def test_a_result_built_in_a_shared_block_goes_back_with_no_copy(monkeypatch):
    """Inside a worker, an array over a `shared_block` is handed to the caller by its file (no copy: the copying
    path is made to fail), arrives equal and writable without writing through, and the file is gone after."""
    import multiprocessing

    from kit.io import prefetch as kp

    if not kp.SHM_DIR.is_dir():
        pytest.skip("no /dev/shm here: results travel through the pipe")
    assert kp.shared_block(1 << 20) is None  # outside a worker: allocate as usual
    monkeypatch.setattr(kp, "_IN_WORKER", True)
    block, path = kp.shared_block(4 << 20)
    assert path.is_file() and path.name.startswith(f"{kp._SHM_PREFIX}{os.getpid()}-")
    volume = np.frombuffer(block, np.int16).reshape(8, 512, 512)
    volume[:] = np.arange(8, dtype=np.int16)[:, None, None]

    def no_copy(view):
        raise AssertionError("the block was copied")

    monkeypatch.setattr(kp, "_to_shared_file", no_copy)
    a, b = multiprocessing.Pipe()
    sender = threading.Thread(target=kp._send, args=(a, {"hu": volume[2:6], "name": "s"}))
    sender.start()
    got = kp._recv(b)
    sender.join()
    assert got["name"] == "s" and np.array_equal(got["hu"], volume[2:6]) and got["hu"].flags.writeable
    got["hu"][0, 0, 0] = -7
    assert volume[2, 0, 0] == 2 and not path.exists()  # copy-on-write on the caller's side; the file taken over
    assert kp._handed_off(memoryview(block)) is None  # handed off once: a second send would copy

    unsent, unsent_path = kp.shared_block(1 << 20)
    del unsent
    assert not unsent_path.exists()  # a block never sent takes its file with it


def test_a_series_read_in_the_worker_equals_one_read_here_and_leaves_no_file(tmp_path):
    """read_series in a prefetch worker decodes into a shared block (with its own decoding pool) and the caller
    gets the same volume and metadata as a read in this process; no shared-memory file is left behind."""
    from kit.io import prefetch as kp
    from kit.io.dicom import read_series
    from kit.synthetic import make_study, write_study

    study = make_study(3, size=128, n_slices=70)
    write_study(study, tmp_path / "s", transfer_syntax="jpeg-lossless")
    before = set(kp.SHM_DIR.glob(f"{kp._SHM_PREFIX}*")) if kp.SHM_DIR.is_dir() else set()
    here = read_series(tmp_path / "s", workers=1)
    (item, there, error, _), = prefetch(functools.partial(read_series, workers=2), [str(tmp_path / "s")])
    assert error is None and there.hu.nbytes >= kp.SHM_MIN_BYTES
    assert np.array_equal(there.hu, here.hu) and there.hu.flags.writeable and there.files == here.files
    assert there.spacing == here.spacing and there.warnings == here.warnings == []
    if kp.SHM_DIR.is_dir():
        assert not _left_behind(kp, before)
