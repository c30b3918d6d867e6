"""Run `fn` on the next items in a separate process while the caller works on the current one.

`prefetch(fn, items)` yields `(item, result, error, seconds)` in input order. With `processes=True`, `fn(item)`
runs in ONE worker process started with the **spawn** context: never fork, because the caller usually has torch
loaded and thread pools running, and a forked copy of such a process can deadlock. The worker keeps at most
`ahead` items beyond the one the caller holds, so at most `ahead` results wait in memory.

What `fn` must be:
- a picklable top-level function of an importable module (or a `functools.partial` of one): spawn sends it to
  the worker by name, so a function defined in a notebook cell or a lambda does not work;
- numpy-only (numpy, pandas, pydicom, `kit.io.dicom` ...): the worker imports fn's module, and a module that imports
  torch makes every worker start take seconds and hundreds of MB;
- small in, anything picklable out: items are sent to the worker as they are (keep them to paths and UIDs);
  results come back with numpy buffers sent out of band (one copy, arrays arrive writable). A result built in
  a `shared_block` (how `kit.io.dicom` decodes a volume inside a worker) comes back with no copy at all.

Failures are per item and never stop the iteration: an exception in `fn` comes back as the error string of that
item; a worker that dies (segfault in a native decoder, killed for memory) is reported as the error of the item
it was on and a new worker takes the remaining items. A worker that cannot even start (fn not importable in a
fresh interpreter) is a programming error: the first start raises `RuntimeError`; if a *replacement* worker
cannot start, the remaining items run in this process (with a warning) rather than fail.

The worker is stopped when the iteration ends, when the generator is closed early (`break`, `close()`, garbage
collection), on KeyboardInterrupt (the worker ignores SIGINT and is stopped by the caller), and at interpreter
exit. numpy-free itself; never imports torch.

A `deadline` (a `time.time()`) bounds every wait: when the next item's result has not come by then, `prefetch`
raises `TimeoutError` and the worker is stopped (SIGTERM, then SIGKILL after `_DEADLINE_JOIN_S`), so an `fn`
that never returns (a decoder in a loop, a read that blocks) cannot hold the caller past it. In this process
(`processes=False`) each `fn(item)` then runs in a daemon thread (`call_before`) that is left behind when it
runs past the deadline: it cannot be stopped, but it does not keep the interpreter from exiting.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import mmap
import multiprocessing.connection
import multiprocessing.util  # registers multiprocessing's own atexit hook before ours (see _close_all)
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("kit.io.prefetch")

_JOIN_S = 5.0  # how long a stopping worker may take before it is killed
_DEADLINE_JOIN_S = 1.0  # the same once the deadline has passed: the caller has no time left to wait
_LIVE: "weakref.WeakSet[_Worker]" = weakref.WeakSet()


class Prefetched(NamedTuple):
    """One item's outcome.

    Attributes:
        item: the input item, as given.
        result: `fn(item)`, or None when it failed.
        error: None, or "<ExceptionType>: <message> (at <file>:<line> in <function>)", or a sentence saying
            the worker died and with which signal / exit code.
        seconds: time `fn(item)` took (for a dead worker: the time the caller waited for it).
    """

    item: Any
    result: Any
    error: str | None
    seconds: float


def describe_error(exc: BaseException) -> str:
    """`"ValueError: bad value (at reader.py:12 in read)"`: the type, the message and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}{where}"


def call_before(deadline: float, fn: Callable, *args: Any) -> Any:
    """`fn(*args)` in a daemon thread, waited for until `deadline` (a `time.time()`), so that the caller can
    walk away from a call that never returns.

    Returns what fn returns, and raises what it raises (any exception, re-raised here). The thread does not
    share the caller's thread-local state (e.g. torch's grad mode or current CUDA device): fn must set what it
    needs itself. KeyboardInterrupt reaches the caller while it waits; fn keeps running.

    Raises:
        TimeoutError: fn had not returned by the deadline (at once when the deadline has passed). Its thread is
            left running: nothing can stop a thread, but a daemon thread does not hold the interpreter at exit.
    """
    box: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
            box.append((False, exc))

    thread = threading.Thread(target=target, name=f"kit-{_name(fn)}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.time()))
    if not box:
        raise TimeoutError(f"{_name(fn)} had not returned at the deadline; its thread is left running")
    ok, value = box[0]
    if ok:
        return value
    raise value


def prefetch(fn: Callable[[Any], Any], items: Iterable, *, ahead: int = 1, processes: bool = True,
             deadline: float | None = None) -> Iterator[Prefetched]:
    """Yield `Prefetched(item, fn(item) or None, error or None, seconds)` for each item, in input order.

    Args:
        fn: a picklable, numpy-only top-level function (see the module docstring). Exceptions it raises are
            caught (not KeyboardInterrupt / SystemExit) and returned as the item's error.
        items: any iterable; consumed lazily, at most `ahead + 1` items before the caller asks for them.
        ahead: items computed beyond the one the caller holds (0: compute each item only when asked, still in
            the worker). At most `ahead` results wait in memory.
        processes: True runs fn in one spawned worker process; False runs it here, in the caller's process,
            when each item is asked for (same results, for tests and debugging).
        deadline: None (wait as long as fn takes), or a `time.time()` by which each result must have come; a
            result that is ready is still taken at the deadline.

    Returns:
        A generator; close it (or leave the loop) to stop the worker early.

    Raises:
        ValueError: ahead < 0.
        RuntimeError: (on the first item, processes=True) the worker could not start, e.g. fn is not importable
            in a fresh interpreter.
        TimeoutError: (from the generator) the item asked for had no result by the deadline; the worker is
            stopped (a thread running fn in this process is left behind, see `call_before`) and the generator
            is finished.
    """
    if not isinstance(ahead, int) or ahead < 0:
        raise ValueError(f"ahead must be an integer >= 0 (results waiting in memory); got {ahead!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    return _in_worker(fn, items, ahead, deadline) if processes else _in_process(fn, items, deadline)


# ---------------------------------------------------------------------------------------------------------
# In this process
# ---------------------------------------------------------------------------------------------------------


def _name(fn: Callable) -> str:
    """`read_series`, or `_read_task(...)` for a functools.partial: short enough for a log line."""
    inner = getattr(fn, "func", None)
    return f"{_name(inner)}(...)" if inner is not None else getattr(fn, "__qualname__", type(fn).__name__)


def _call(fn: Callable, item: Any) -> tuple[Any, str | None, float]:
    start = time.perf_counter()
    try:
        result, error = fn(item), None
    except Exception as exc:  # the item's failure, reported with it
        result, error = None, describe_error(exc)
    return result, error, time.perf_counter() - start


def _call_by(fn: Callable, item: Any, deadline: float | None) -> tuple[Any, str | None, float]:
    """`_call` here, or in a daemon thread waited for until `deadline`; raises TimeoutError past it."""
    if deadline is None:
        return _call(fn, item)
    try:
        return call_before(deadline, _call, fn, item)
    except TimeoutError:
        raise TimeoutError(f"prefetch: no result for item {item!r} by the deadline: {_name(fn)} was still "
                           "running on it (left running in a daemon thread)") from None


def _in_process(fn: Callable, items: Iterable, deadline: float | None = None) -> Iterator[Prefetched]:
    for item in items:
        yield Prefetched(item, *_call_by(fn, item, deadline))


# ---------------------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------------------


SHM_DIR = Path("/dev/shm")  # where large results travel (Linux tmpfs); elsewhere, or when it is full: the pipe
SHM_MIN_BYTES = 1 << 20  # buffers at least this large go through a shared-memory file, smaller ones the pipe
_SHM_PREFIX = "kit-prefetch-"


_IN_WORKER = False  # set in the worker process: `shared_block` hands out blocks there only
_BLOCKS: dict[int, tuple[int, str, weakref.finalize]] = {}  # address -> (size, file name, unlinker) of live blocks


def shared_block(nbytes: int) -> tuple[mmap.mmap, Path] | None:
    """In a prefetch worker: a new zero-filled, writable block of `nbytes` in a shared-memory file, and the file's
    path (other processes may map it to write into it, e.g. a decoding pool). A result whose buffers lie in such a
    block travels back to the caller with no copy: the caller maps the same pages. None outside a worker, or when
    the shared-memory folder cannot hold it (allocate as usual then).

    The file goes when the caller has mapped it, or with the block when it is never sent (garbage collection)."""
    if not _IN_WORKER or nbytes <= 0 or (made := _new_shared_file(nbytes)) is None:
        return None
    block, path = made
    address = ctypes.addressof(ctypes.c_char.from_buffer(block))
    _BLOCKS[address] = (nbytes, path.name, weakref.finalize(block, _forget, address, path))
    return block, path


def _forget(address: int, path: Path) -> None:
    """A block collected before it was sent: its file goes with it."""
    _BLOCKS.pop(address, None)
    path.unlink(missing_ok=True)


def _handed_off(view: memoryview) -> tuple[str, int] | None:
    """(file name, offset) when `view` lies inside a live `shared_block`: the caller maps that file and takes the
    file over (the block is forgotten here, so it is handed off once); None otherwise."""
    if not _BLOCKS or view.readonly:
        return None
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    for start, (size, name, unlinker) in _BLOCKS.items():
        if start <= address and address + view.nbytes <= start + size:
            del _BLOCKS[start]
            unlinker.detach()
            return name, address - start
    return None


def _new_shared_file(nbytes: int) -> tuple[mmap.mmap, Path] | None:
    """A new file of `nbytes` under `SHM_DIR`, named for this process (space reserved first: a full tmpfs is an
    OSError here, never a SIGBUS later), mapped writable; None when it cannot be made."""
    if not SHM_DIR.is_dir():
        return None
    path = SHM_DIR / f"{_SHM_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return mmap.mmap(fd, nbytes), path
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    finally:
        os.close(fd)


def _to_shared_file(view: memoryview) -> str | None:
    """Copy `view` into a new shared-memory file (`_new_shared_file`) and return its name; None when that cannot be
    done (the pipe carries it then)."""
    if (made := _new_shared_file(view.nbytes)) is None:
        return None
    block, path = made
    try:
        with block:
            block[:] = view.cast("B")
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    return path.name


def _from_shared_file(name: str, size: int, offset: int = 0) -> memoryview:
    """The `size` bytes at `offset` of the file `_to_shared_file` wrote (or a `shared_block`'s), mapped
    copy-on-write (writable, nothing copied up front); the file is unlinked at once, the mapping lives as long as
    the arrays over it."""
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDONLY)
    try:
        return memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_COPY))[offset:offset + size]
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def _send(conn: multiprocessing.connection.Connection, message: Any) -> None:
    """Pickle with protocol 5 and send numpy buffers out of band: no copy of a large volume on this side. A buffer
    of `SHM_MIN_BYTES` or more is written to a shared-memory file (one copy here) that the receiver maps instead
    of reading it from the pipe: a 250 x 512^2 volume takes a few hundredths of a second instead of most of a
    second through the pipe."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    specs = []
    for view in views:
        if view.nbytes < SHM_MIN_BYTES:
            specs.append((view.nbytes, None, 0))
        elif (handed := _handed_off(view)) is not None:  # already in shared memory: no copy
            specs.append((view.nbytes, *handed))
        else:
            specs.append((view.nbytes, _to_shared_file(view), 0))
    conn.send(specs)
    conn.send_bytes(payload)
    for view, (_, name, _) in zip(views, specs):
        if name is None:
            conn.send_bytes(view)


def _recv(conn: multiprocessing.connection.Connection) -> Any:
    """Inverse of `_send`; each buffer lands in its own bytearray or copy-on-write mapping, so the arrays come back
    writable."""
    specs = conn.recv()
    payload = conn.recv_bytes()
    buffers = []
    try:
        for size, name, offset in specs:
            if name is not None:
                buffers.append(_from_shared_file(name, size, offset))
                continue
            buffer = bytearray(size)
            if size:
                conn.recv_bytes_into(buffer)
            else:
                conn.recv_bytes()
            buffers.append(buffer)
    finally:  # a message cut short leaves no file behind
        for _, name, _ in specs:
            if name is not None:
                (SHM_DIR / name).unlink(missing_ok=True)
    return pickle.loads(payload, buffers=buffers)


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds `with` blocks (e.g. a decoding pool) instead of dying in place


def _serve(fn: Callable, conn: multiprocessing.connection.Connection) -> None:
    """The worker's loop: receive `(index, item)`, send `(index, result, error, seconds)`; None stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the caller decides
    signal.signal(signal.SIGTERM, _exit_on_term)
    global _IN_WORKER
    _IN_WORKER = True
    _send(conn, ("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the caller is gone
            return
        if task is None:
            return
        index, item = task
        result, error, seconds = _call(fn, item)
        try:
            _send(conn, (index, result, error, seconds))
        except (EOFError, OSError):
            return
        except Exception as exc:  # the result cannot be pickled: report it as this item's error
            del result
            _send(conn, (index, None, f"the result of {_name(fn)} could not be sent back: {describe_error(exc)}",
                         seconds))


class _WorkerDied(Exception):
    pass


class _Worker:
    """One spawned worker and its pipe."""

    def __init__(self, fn: Callable, context: multiprocessing.context.BaseContext):
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(fn, child), name="kit-prefetch", daemon=False)
        try:
            self.process.start()
        finally:
            child.close()  # the worker holds its end; ours must go so that its death reads as EOF
        self.ready = False
        self.closed = False
        _LIVE.add(self)

    def death(self) -> str:
        self.process.join(_JOIN_S)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"{signal.Signals(-code).name} (exit code {code})"
            except ValueError:
                pass
        return f"exit code {code}"

    def submit(self, index: int, item: Any) -> None:
        try:
            self.conn.send((index, item))
        except OSError:  # dead already: receive() will say so
            pass

    def receive(self, deadline: float | None = None) -> tuple:
        """The next `(index, result, error, seconds)`; raises `_WorkerDied` when the worker is gone, TimeoutError
        when nothing has come by `deadline`."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            ready = multiprocessing.connection.wait([self.conn, self.process.sentinel], timeout)
            if not ready:
                raise TimeoutError("no result by the deadline")
            if self.conn not in ready:
                raise _WorkerDied(self.death())
            try:
                message = _recv(self.conn)
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                raise _WorkerDied(self.death()) from exc
            if message[0] == "ready":
                self.ready = True
                continue
            return message

    def close(self, busy: bool, grace: float = _JOIN_S) -> None:
        """Stop the worker: a polite stop when idle, SIGTERM when busy, SIGKILL if it has not gone in `grace` s."""
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        if self.process.is_alive():
            if busy:
                self.process.terminate()
            else:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
            self.process.join(grace)
            if self.process.is_alive():
                log.warning("prefetch worker %s did not stop in %.1f s: killed", self.process.pid, grace)
                self.process.kill()
                self.process.join()
        self.conn.close()
        if self.process.pid is not None and SHM_DIR.is_dir():  # results it wrote that nobody will read
            for left in SHM_DIR.glob(f"{_SHM_PREFIX}{self.process.pid}-*"):
                left.unlink(missing_ok=True)


def _close_all() -> None:
    # Registered after multiprocessing's own exit hook (imported above), so it runs first: that hook joins
    # every non-daemon child, and a worker still waiting for items would make the interpreter hang at exit.
    for worker in list(_LIVE):
        worker.close(busy=True)


atexit.register(_close_all)


def _in_worker(fn: Callable, items: Iterable, ahead: int, deadline: float | None = None) -> Iterator[Prefetched]:
    context = multiprocessing.get_context("spawn")
    source = enumerate(items)
    pending: deque[tuple[int, Any]] = deque()  # sent to the worker, result not yet received, in input order
    worker: _Worker | None = None
    served = False  # a worker has returned at least one result: fn works in a spawned process
    try:
        while True:
            if worker is None:
                worker = _Worker(fn, context)
                for index, item in pending:
                    worker.submit(index, item)
            while len(pending) < ahead + 1 and (task := next(source, None)) is not None:
                pending.append(task)
                worker.submit(*task)
            if not pending:
                return
            waited = time.perf_counter()
            try:
                index, result, error, seconds = worker.receive(deadline)
            except TimeoutError:
                raise TimeoutError(f"prefetch: no result for item {pending[0][1]!r} by the deadline (waited "
                                   f"{time.perf_counter() - waited:.1f} s for {_name(fn)}); the worker is stopped") \
                    from None
            except _WorkerDied as died:
                worker.close(busy=False)
                started, worker = worker.ready, None
                if not started and not served:
                    raise RuntimeError(
                        f"the prefetch worker exited ({died}) before it could run {_name(fn)}: fn must be a top-level "
                        "function of an importable module (spawn sends it by name), and the caller's script "
                        "must guard its entry point with `if __name__ == '__main__':`") from None
                if not started:  # a replacement could not start: finish here rather than fail
                    log.warning("a new prefetch worker exited (%s) before it started; the remaining items run "
                                "in this process", died)
                    for _, item in pending:
                        yield Prefetched(item, *_call_by(fn, item, deadline))
                    pending.clear()
                    yield from _in_process(fn, (item for _, item in source), deadline)
                    return
                _, item = pending.popleft()
                message = f"prefetch worker died with {died} while running {_name(fn)} on this item; a new " \
                          "worker takes the rest"
                log.warning("%s: %s", item, message)
                yield Prefetched(item, None, message, time.perf_counter() - waited)
                continue
            served = True
            expected, item = pending.popleft()
            if index != expected:  # the pipe is ordered: this would be a bug here, not in fn
                raise RuntimeError(f"prefetch: got the result of item {index} while waiting for item {expected}")
            yield Prefetched(item, result, error, seconds)
    finally:
        if worker is not None:
            grace = _JOIN_S if deadline is None else min(_JOIN_S, max(_DEADLINE_JOIN_S, deadline - time.time()))
            worker.close(busy=bool(pending), grace=grace)  # stopping never runs far past the deadline
