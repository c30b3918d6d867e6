"""CT series and their segmentations: the one place in the kit that touches DICOM pixel data.

`read_series` turns a study folder into a `Series`: a (Z, H, W) HU volume with index 0 = most superior
slice, ordered by position along the slice normal (never by file name or InstanceNumber), plus the
geometry needed to place it in patient space. `read_mask` samples a segmentation NIfTI onto that voxel
grid through both affines. `window`, `window_channels` and `resize_slices` turn HU into network inputs.

Decoding: headers are parsed with pydicom (pure Python, so a truncated or stray file cannot crash the
interpreter); uncompressed pixel data is read with numpy from the offset the header gives; compressed data is
decoded with dicomsdl where it is known to be exact, else pydicom (pylibjpeg plugins, GDCM if installed). A
native decoder can still crash its process on a corrupt compressed file: the callers that read many studies
read in worker processes and report such a study (`kit.io.cache.prepare_studies`, `kit.io.prefetch`). Stored values
are masked to BitsStored and sign-extended when PixelRepresentation is 1 before HU = stored * RescaleSlope +
RescaleIntercept, so every backend gives identical numbers. numpy only: never import torch here.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import sys
import threading
import os
import stat
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from collections import Counter, namedtuple
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pydicom
from pydicom import uid as UID

from ..constants import WINDOWS
from .prefetch import shared_block

try:
    import dicomsdl
except ImportError:  # the kit still works, only slower
    dicomsdl = None

log = logging.getLogger("kit.io.dicom")

_NATIVE = {UID.ImplicitVRLittleEndian, UID.ExplicitVRLittleEndian, UID.ExplicitVRBigEndian}
# Compressed transfer syntaxes where dicomsdl was checked to decode exactly what pydicom decodes
# (tests/test_dicom.py); uncompressed data never reaches it under backend "auto" (`_read_native`).
# RLE is left to pydicom: dicomsdl 0.109 aborts the interpreter on a corrupt RLE stream; lossy baseline
# JPEG decoders disagree by a grey level, so those go to pydicom too.
_DICOMSDL_SYNTAXES = {UID.JPEGLossless, UID.JPEGLosslessSV1, UID.JPEGLSLossless, UID.JPEGLSNearLossless,
                      UID.JPEG2000Lossless, UID.JPEG2000}
_NOT_ERRORS = (KeyboardInterrupt, SystemExit, GeneratorExit)  # what a per-file `except BaseException` lets through
_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient",
                "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns", "SamplesPerPixel",
                "NumberOfFrames", "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope",
                "RescaleIntercept"]
BACKENDS = ("auto", "dicomsdl", "pydicom")
EXECUTORS = ("process", "thread")
# Threads or processes: dicomsdl holds the GIL while decoding, so two threads read no faster than one and two
# processes read much faster (docs/benchmarks.md, Reading, "Threads or processes"). Processes it is, writing
# straight into a shared output volume; one per ~8 MB of files (~32 compressed 512 x 512 slices), as a pool is
# not free.
_BYTES_PER_WORKER = 8 << 20
_CHUNK = 8  # slices per decoding task


class DicomError(ValueError):
    """A study or segmentation that cannot be read: the message names the study and the file."""


@dataclass
class Series:
    """One CT series: HU volume, index 0 = most superior slice, and its geometry (LPS, mm).

    Attributes:
        uid: StudyInstanceUID (the folder name when the files have none).
        hu: (Z, H, W) int16, or float32 when the rescale is not integral or the HU overflow int16.
        positions: (Z, 3) ImagePositionPatient of each slice.
        orientation: (6,) ImageOrientationPatient: row direction, then column direction.
        pixel_spacing: (row spacing, column spacing).
        spacing: (dz, dy, dx); dz = median step between slices along the slice normal.
        instance_numbers: (Z,) InstanceNumber of each slice (0 when missing).
        files: the file of each slice, in volume order.
        warnings: everything skipped or worth knowing, one sentence each, naming study and file.
        backend: the decoder(s) used: "dicomsdl", "pydicom" or "dicomsdl+pydicom".
    """

    uid: str
    hu: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    spacing: tuple[float, float, float]
    instance_numbers: np.ndarray
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    backend: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal, oriented so that larger = more superior (LPS z-component >= 0)."""
        return _normal(self.orientation)

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel (z, row, col, 1) to LPS mm (mean slice step along z)."""
        step = (self.positions[-1] - self.positions[0]) / (len(self.positions) - 1) \
            if len(self.positions) > 1 else -self.normal * self.spacing[0]
        affine = np.eye(4)
        affine[:3, 0] = step
        affine[:3, 1] = self.orientation[3:] * self.pixel_spacing[0]
        affine[:3, 2] = self.orientation[:3] * self.pixel_spacing[1]
        affine[:3, 3] = self.positions[0]
        return affine


# What one image file's header says; a tuple so that worker processes can send it back cheaply.
_Slice = namedtuple("_Slice", "path study series syntax instance position orientation pixel_spacing rows cols "
                              "bits_allocated bits_stored signed slope intercept thickness pixel_offset")


def _normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    return -normal if normal[2] < 0 else normal


def _float(value, default=None):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _read_header(path: Path) -> _Slice | tuple[str, str]:
    """Parse one file's header; (reason, StudyInstanceUID) says why the file is skipped."""
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            start, size, head = fp.tell(), os.fstat(fp.fileno()).st_size, fp.read(12)
    except Exception as exc:  # pydicom raises many types for non-DICOM bytes
        return f"not a DICOM file ({type(exc).__name__}: {str(exc).split('. ')[0]})", ""
    try:  # pydicom parses values when they are read: a corrupt header fails here, not in dcmread
        return _parse_header(path, ds, start, size, head)
    except Exception as exc:  # an unknown VR, a number that does not parse, a missing Rows / Columns ...
        try:
            study = str(ds.get("StudyInstanceUID", ""))
        except Exception:  # noqa: BLE001 - the UID itself is corrupt
            study = ""
        return f"corrupt header ({_error_text(exc)})", study


def _error_text(exc: BaseException) -> str:
    """'Type: message' on one line, at most 400 characters (pydicom's plugin errors span several lines)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


def _parse_header(path: Path, ds, start: int, size: int, head: bytes) -> _Slice | tuple[str, str]:
    study = str(ds.get("StudyInstanceUID", ""))
    syntax = str(ds.file_meta.get("TransferSyntaxUID", UID.ImplicitVRLittleEndian))
    tag = b"\xe0\x7f\x10\x00" if syntax != UID.ExplicitVRBigEndian else b"\x7f\xe0\x00\x10"
    deflated = syntax == UID.DeflatedExplicitVRLittleEndian  # fp is the compressed stream: no offsets
    if (head[:4] != tag and not deflated) or "Rows" not in ds:
        return "no pixel data (not an image)", study
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return f"not a single-frame greyscale image ({ds.get('SamplesPerPixel')} samples, " \
               f"{ds.get('NumberOfFrames', 1)} frames)", study
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.get("BitsAllocated", 16))
    pixel_offset = None
    if syntax in _NATIVE:  # uncompressed: checked here and read straight from the file (`_read_native`)
        implicit = syntax == UID.ImplicitVRLittleEndian
        length = int.from_bytes(head[4:8] if implicit else head[8:12],
                                "big" if syntax == UID.ExplicitVRBigEndian else "little")
        available = size - start - (8 if implicit else 12)
        if min(length, available) < rows * cols * bits // 8:
            return f"truncated pixel data ({min(length, available)} of {rows * cols * bits // 8} bytes)", study
        pixel_offset = start + (8 if implicit else 12) if bits in (8, 16, 32) else None
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    spacing = ds.get("PixelSpacing")
    return _Slice(
        path=path, study=study, series=str(ds.get("SeriesInstanceUID", "")),
        syntax=syntax, instance=int(_float(ds.get("InstanceNumber"), 0)),
        position=tuple(map(float, position)) if position and len(position) == 3 else None,
        orientation=tuple(map(float, orientation)) if orientation and len(orientation) == 6 else None,
        pixel_spacing=tuple(map(float, spacing)) if spacing and len(spacing) == 2 else None,
        rows=rows, cols=cols, bits_allocated=bits, bits_stored=int(ds.get("BitsStored", bits)),
        signed=int(ds.get("PixelRepresentation", 0)) == 1, slope=_float(ds.get("RescaleSlope"), 1.0),
        intercept=_float(ds.get("RescaleIntercept"), 0.0), thickness=_float(ds.get("SliceThickness")),
        pixel_offset=pixel_offset,
    )


def _read_headers(paths: list[Path]) -> list[tuple[Path, _Slice | tuple[str, str]]]:
    return [(p, _read_header(p)) for p in paths]


def _hu_into(raw: np.ndarray, s: _Slice, dst: np.ndarray) -> np.ndarray | None:
    """Write HU = stored * slope + intercept of one decoded frame into `dst` (int16 or float32).

    Stored values are the low BitsStored bits of `raw`, two's complement when PixelRepresentation is 1
    (decoders differ on whether they already did this, so it is always done here). Returns None, or a
    float32 frame when the HU do not fit an int16 `dst` (the caller then widens the volume).
    """
    raw = raw if raw.dtype.isnative and raw.flags.writeable else raw.astype(raw.dtype.newbyteorder("="))
    size = raw.dtype.itemsize
    raw = raw.view(f"i{size}" if s.signed else f"u{size}")  # same bits, the header's signedness
    if s.bits_stored < 8 * size:
        if s.signed:
            raw <<= 8 * size - s.bits_stored  # sign-extend from BitsStored: shift up, arithmetic shift down
            raw >>= 8 * size - s.bits_stored
        else:
            raw &= (1 << s.bits_stored) - 1
    if dst.dtype == np.float32:
        np.multiply(raw, np.float32(s.slope), out=dst, casting="unsafe")
        dst += np.float32(s.intercept)
        return None
    slope, intercept, low, high = int(s.slope), int(s.intercept), int(raw.min()), int(raw.max())
    ends = (low * slope + intercept, high * slope + intercept)
    if min(ends) < -32768 or max(ends) > 32767:
        return (raw.astype(np.float64) * slope + intercept).astype(np.float32)
    if slope == 1 and size == 2 and high <= 32767 and -32768 <= intercept <= 32767:
        np.add(raw.view(np.int16), np.int16(intercept), out=dst)  # cannot wrap: the ends fit int16
    else:
        np.add(raw.astype(np.int32) * slope, intercept, out=dst, casting="unsafe")
    return None


def _read_native(s: _Slice) -> np.ndarray:
    """Uncompressed pixel data as stored, read with numpy from the offset and length the header parse checked:
    as fast as dicomsdl, and a corrupt file cannot crash it (dicomsdl segfaults on some: found by fuzzing)."""
    order = ">" if s.syntax == UID.ExplicitVRBigEndian else "<"
    dtype = np.dtype(f"{order}u{s.bits_allocated // 8}")
    return np.fromfile(s.path, dtype=dtype, count=s.rows * s.cols, offset=s.pixel_offset).reshape(s.rows, s.cols)


def _decode_raw(s: _Slice, backend: str) -> tuple[np.ndarray, str]:
    """Decode one file's pixel data as the decoder gives it; returns (array, backend used)."""
    if backend == "auto" and s.pixel_offset is not None:
        return _read_native(s), "numpy"
    if backend == "dicomsdl" or (backend == "auto" and dicomsdl is not None and s.syntax in _DICOMSDL_SYNTAXES
                                 and s.bits_allocated in (8, 16)):
        try:
            ds = dicomsdl.open(str(s.path))
            info = ds.getPixelDataInfo()
            raw = np.empty((info["Rows"], info["Cols"]), dtype=info["dtype"])
            ds.copyFrameData(0, raw)
            return raw, "dicomsdl"
        except Exception as exc:
            if backend == "dicomsdl":
                raise
            log.debug("%s: dicomsdl failed (%s); trying pydicom", s.path, exc)
    return pydicom.dcmread(s.path).pixel_array, "pydicom"


def _attach(target: np.ndarray | tuple) -> np.ndarray | None:
    """The output volume: the array itself (same process), a map of the caller's memfd (worker), or
    None when frames must travel back (no memfd on this platform)."""
    if isinstance(target, np.ndarray):
        return target
    path, shape, dtype = target
    try:
        with open(path, "r+b") as fh:
            return np.frombuffer(mmap.mmap(fh.fileno(), 0), dtype=dtype).reshape(shape)
    except OSError:  # no memfd, or /proc hidden: send the frames back instead
        return None


def _decode_chunk(jobs: list[tuple[int, _Slice]], backend: str, target: np.ndarray | tuple) -> list[tuple]:
    """Decode (index, slice) jobs into the output volume. One (index, error, frame, backend) per job:
    error is a reason string or None; frame is one the caller must place itself, or None."""
    volume, out = _attach(target), []
    for index, s in jobs:
        try:
            raw, used = _decode_raw(s, backend)
            if raw.shape != (s.rows, s.cols):
                raise ValueError(f"decoded shape {raw.shape} != header ({s.rows}, {s.cols})")
            dst = volume[index] if volume is not None else np.empty(raw.shape, target[2])
            extra = _hu_into(raw, s, dst)
            out.append((index, None, extra if extra is not None or volume is not None else dst, used))
        except _NOT_ERRORS:
            raise
        except BaseException as exc:  # reported by the caller. BaseException: a Rust decoder's panic (pyo3's
            out.append((index, _error_text(exc), None, None))  # PanicException: pylibjpeg-rle) is no Exception
    return out


def _default_workers(files: list[Path]) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, sum(p.stat().st_size for p in files) // _BYTES_PER_WORKER))


def fork_is_safe() -> bool:
    """Whether this process may fork workers: only from its main thread and while torch is not loaded (a
    forked copy of a process with torch's thread pools, or of a thread other than the main one, can
    deadlock). Where it is not, readers work in-process or start workers with spawn."""
    return ("fork" in multiprocessing.get_all_start_methods() and "torch" not in sys.modules
            and threading.current_thread() is threading.main_thread())


@contextmanager
def _pool(workers: int, executor: str) -> Iterator[Executor | None]:
    """A worker pool, or None to work in this process (1 worker; a daemon such as a DataLoader worker, which
    may not have child processes; or a process that may not fork, `fork_is_safe`: a torch process, or a thread
    other than the main one)."""
    if workers <= 1 or (executor == "process" and (multiprocessing.current_process().daemon
                                                   or not fork_is_safe())):
        yield None
        return
    if executor == "thread":
        with ThreadPoolExecutor(workers) as pool:
            yield pool
        return
    # fork: a pool starts and stops in milliseconds (docs/benchmarks.md, Reading); spawn / forkserver would import
    # numpy and pydicom again, per study
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool


def _run_chunks(pool: Executor | None, fn: Callable, chunks: list[list], *args) -> Iterator[list]:
    """Yield fn(chunk, *args) in completion order, with at most 2 chunks per worker in flight so that
    decoded frames never pile up."""
    if pool is None or len(chunks) <= 1:
        yield from (fn(c, *args) for c in chunks)
        return
    todo, running, limit = iter(chunks), set(), 2 * pool._max_workers
    while True:
        while len(running) < limit and (chunk := next(todo, None)) is not None:
            running.add(pool.submit(fn, chunk, *args))
        if not running:
            return
        done, running = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            yield future.result()


def _split(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def study_files(study_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The regular files of a study folder, and the entries that are skipped because they are not one.

    Only a regular file (or a link to one) is ever opened: opening a named pipe for reading blocks until
    something writes to it, a device may never end. Sub-folders are not slices and are left out silently.

    Returns:
        (files sorted by (name length, name), [(entry, why it is skipped)] sorted by name): a named pipe, a
        socket, a device, a broken link.

    Raises:
        OSError: the folder cannot be listed (e.g. it does not exist).
    """
    folder = Path(study_dir)
    files, skipped = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            path = folder / entry.name
            try:
                mode = os.stat(entry.path).st_mode  # follows a link to what it points at
            except OSError as exc:
                skipped.append((path, f"cannot be read ({_error_text(exc)})"))  # e.g. a broken link
                continue
            if stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):
                kind = next((name for test, name in _KINDS if test(mode)), f"not a file (mode {mode:o})")
                skipped.append((path, f"not a regular file: {kind}"))
    files.sort(key=lambda p: (len(p.name), p.name))
    skipped.sort(key=lambda pair: pair[0].name)
    return files, skipped


def _list_files(study_dir: str | os.PathLike) -> tuple[Path, list[Path], list[tuple[Path, str]]]:
    folder = Path(study_dir)
    if not folder.is_dir():
        raise DicomError(f"study {folder.name}: folder {folder} does not exist")
    files, skipped = study_files(folder)
    if not files:
        others = f" (skipped: {'; '.join(f'{p.name}: {r}' for p, r in skipped)})" if skipped else ""
        raise DicomError(f"study {folder.name}: 0 DICOM files in {folder}{others}")
    return folder, files, skipped


def _select(folder: Path, files: list[Path], pool: Executor | None,
            not_files: Sequence[tuple[Path, str]] = ()) -> tuple[str, list[_Slice], list[str]]:
    """Parse and filter a study's files. Returns (uid, slices sorted superior first, warnings); the warnings
    name `not_files` (entries of the folder that are not regular files, `study_files`) first."""
    size = max(1, -(-len(files) // (2 * pool._max_workers))) if pool else len(files)
    parsed = dict(pair for chunk in _run_chunks(pool, _read_headers, _split(files, size)) for pair in chunk)
    slices = [parsed[p] for p in files if isinstance(parsed[p], _Slice)]
    skipped = [*not_files, *((p, parsed[p][0]) for p in files if not isinstance(parsed[p], _Slice))]
    studies = Counter(h.study if isinstance(h, _Slice) else h[1] for h in parsed.values())
    studies.pop("", None)
    uid = studies.most_common(1)[0][0] if studies else folder.name

    def keep_majority(key: Callable[[_Slice], object], what: str) -> None:
        nonlocal slices
        values = [key(s) for s in slices]
        counts = Counter(values)
        best = max(counts, key=lambda v: (counts[v], str(v)), default=None)
        skipped.extend((s.path, f"{what} {v} differs from the series' {best}") for s, v in zip(slices, values)
                       if v != best)
        slices = [s for s, v in zip(slices, values) if v == best]

    skipped += [(s.path, "no ImagePositionPatient / ImageOrientationPatient / PixelSpacing") for s in slices
                if None in (s.position, s.orientation, s.pixel_spacing)]
    slices = [s for s in slices if None not in (s.position, s.orientation, s.pixel_spacing)]
    keep_majority(lambda s: s.series, "SeriesInstanceUID")
    keep_majority(lambda s: (s.rows, s.cols), "size")
    keep_majority(lambda s: tuple(np.round(s.orientation, 3)), "ImageOrientationPatient")
    if not slices:
        path, reason = skipped[len(not_files)]  # the first file that was opened
        raise DicomError(f"study {uid}: no readable image slice among {len(files)} files in {folder}; "
                         f"first: {path}: {reason}")
    normal = _normal(np.array(slices[0].orientation))
    slices.sort(key=lambda s: (-float(np.dot(s.position, normal)), s.instance, len(s.path.name), s.path.name))
    unique, last = [], np.inf
    for s in slices:  # positions are written with ~1e-6 mm precision
        depth = float(np.dot(s.position, normal))
        if abs(depth - last) < 1e-3:
            skipped.append((s.path, f"duplicate position ({depth:.3f} mm along the slice normal) of "
                                    f"{unique[-1].path.name}, which is kept"))
        else:
            unique.append(s)
            last = depth
    slices = unique
    warnings = [f"study {uid}: skipped {p}: {r}" for p, r in skipped]
    for message in warnings:
        log.warning(message)
    return uid, slices, warnings


def read_series(study_dir: str | os.PathLike, *, workers: int | None = None, backend: str = "auto",
                executor: str = "process") -> Series:
    """Read one study folder of single-slice DICOM files into a `Series` (index 0 = most superior).

    Args:
        study_dir: folder of the slices; stray non-DICOM or non-image files are skipped, and so are entries
            that are not regular files (a named pipe, a socket, a device: never opened, `study_files`).
        workers: parallel workers (default: one per ~8 MB of files, at most the usable cores);
            1 works in this process.
        backend: "auto" (uncompressed data read with numpy, compressed data with dicomsdl where it is exact,
            pydicom for the rest and for any file dicomsdl refuses; `Series.backend` names those used),
            "dicomsdl" or "pydicom" (that backend only).
        executor: "process" (default, faster: dicomsdl holds the GIL) or "thread".

    Returns:
        The series; `warnings` lists every skipped file and why (also logged to "kit.io.dicom").

    Raises:
        DicomError: missing or empty folder, or no slice that can be decoded; names the study and a file.
    """
    if backend not in BACKENDS or executor not in EXECUTORS:
        raise ValueError(f"backend={backend!r}, executor={executor!r}; choose from {BACKENDS} and {EXECUTORS}")
    if backend == "dicomsdl" and dicomsdl is None:
        raise ImportError("backend='dicomsdl' but dicomsdl is not installed (pip install dicomsdl)")
    folder, files, not_files = _list_files(study_dir)
    try:
        with _pool(workers if workers is not None else _default_workers(files), executor) as pool:
            uid, slices, warnings = _select(folder, files, pool, not_files)
            hu, slices, used = _decode(uid, slices, pool, backend, warnings)
    except BrokenProcessPool as exc:  # a native decoder crashed a worker: start again here, pydicom only
        series = read_series(folder, workers=1, backend="pydicom")
        series.warnings.insert(0, f"study {series.uid}: a decoding worker died ({exc}); read again with pydicom")
        log.warning(series.warnings[0])
        return series
    positions = np.array([s.position for s in slices], dtype=np.float64)
    orientation = np.array(slices[0].orientation, dtype=np.float64)
    steps = -np.diff(positions @ _normal(orientation))
    dz = float(np.median(steps)) if len(steps) else float(slices[0].thickness or 1.0)
    if len(steps) and steps.max() > 1.5 * steps.min():
        warnings.append(f"study {uid}: uneven slice steps {steps.min():.3f}..{steps.max():.3f} mm; dz = median")
        log.warning(warnings[-1])
    row_mm, col_mm = slices[0].pixel_spacing
    return Series(uid=uid, hu=hu, positions=positions, orientation=orientation, pixel_spacing=(row_mm, col_mm),
                  spacing=(dz, row_mm, col_mm), instance_numbers=np.array([s.instance for s in slices]),
                  files=[s.path for s in slices], warnings=warnings, backend="+".join(sorted(used)))


def _decode(uid: str, slices: list[_Slice], pool: Executor | None, backend: str, warnings: list[str]):
    """Decode every slice into one pre-allocated volume, shared with worker processes through a memfd (inside a
    prefetch worker: a `shared_block`, which goes back to the caller with no copy); drop (and report) the slices
    that fail."""
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    shape, dtype = (len(slices), slices[0].rows, slices[0].cols), np.dtype(np.int16 if integral else np.float32)
    fd, nbytes = None, int(np.prod(shape)) * dtype.itemsize
    if (shared := shared_block(nbytes)) is not None:
        hu = np.frombuffer(shared[0], dtype=dtype).reshape(shape)
        target = (str(shared[1]), shape, dtype.str) if isinstance(pool, ProcessPoolExecutor) else hu
    elif isinstance(pool, ProcessPoolExecutor) and hasattr(os, "memfd_create"):
        fd = os.memfd_create("kit-dicom-volume")
        os.ftruncate(fd, nbytes)
        hu = np.frombuffer(mmap.mmap(fd, 0), dtype=dtype).reshape(shape)
        target = (f"/proc/{os.getpid()}/fd/{fd}", shape, dtype.str)
    else:
        hu = np.empty(shape, dtype)
        target = hu if not isinstance(pool, ProcessPoolExecutor) else ("/nonexistent", shape, dtype.str)
    failed, wide, used = {}, {}, set()
    try:
        for chunk in _run_chunks(pool, _decode_chunk, _split(list(enumerate(slices)), _CHUNK), backend, target):
            for index, error, frame, name in chunk:
                if error is not None:
                    failed[index] = error
                elif frame is not None and frame.dtype == hu.dtype:
                    hu[index] = frame
                elif frame is not None:
                    wide[index] = frame  # HU beyond int16: placed once everything is decoded
                used.add(name)
    finally:
        if fd is not None:
            os.close(fd)  # the mapping stays valid
    if wide:
        hu = hu.astype(np.float32)
        for index, frame in wide.items():
            hu[index] = frame
    if len(failed) == len(slices):
        first = slices[min(failed)]
        raise DicomError(f"study {uid}: cannot decode {first.path} ({UID.UID(first.syntax).name}): "
                         f"{failed[min(failed)]}; none of its {len(slices)} slices could be decoded")
    for index in sorted(failed):
        s = slices[index]
        warnings.append(f"study {uid}: skipped {s.path}: cannot decode ({UID.UID(s.syntax).name}): {failed[index]}")
        log.warning(warnings[-1])
    keep = [i for i in range(len(slices)) if i not in failed]
    if failed:
        for new, old in enumerate(keep):  # compact in place rather than copy the volume
            hu[new] = hu[old]
    return hu[:len(keep)], [slices[i] for i in keep], used - {None}


def scan_series(study_dir: str | os.PathLike) -> dict:
    """Header-only summary of a study (no pixel decoding): slices, size, spacing, transfer syntax.

    Raises:
        DicomError: as `read_series`.
    """
    folder, files, not_files = _list_files(study_dir)
    uid, slices, warnings = _select(folder, files, None, not_files)
    depth = np.array([s.position for s in slices]) @ _normal(np.array(slices[0].orientation))
    steps = -np.diff(depth)
    return {
        "StudyInstanceUID": uid, "slices": len(slices), "rows": slices[0].rows, "cols": slices[0].cols,
        "dz": float(np.median(steps)) if len(steps) else np.nan, "dy": slices[0].pixel_spacing[0],
        "dx": slices[0].pixel_spacing[1], "transfer_syntax": UID.UID(slices[0].syntax).name,
        "bits_stored": slices[0].bits_stored, "intercept": slices[0].intercept,
        "instance_order": "superior-first" if slices[0].instance <= slices[-1].instance else "inferior-first",
        "skipped_files": len(warnings),
    }


def read_mask(nii_path: str | os.PathLike, series: Series) -> np.ndarray:
    """Sample a label NIfTI onto the voxel grid of `series` (nearest neighbour, through both affines).

    Each DICOM voxel centre (LPS, from ImagePositionPatient / ImageOrientationPatient / PixelSpacing) is
    mapped to RAS (x and y negated) and through the inverse NIfTI affine to a voxel index, so any storage
    layout (RSNA's sagittal files, dcm2niix / TotalSegmentator LAS, ...) lines up without flips or lists.

    Returns:
        (Z, H, W) stored integer labels, uint8 (or int16 when they do not fit), aligned with `series.hu`.

    Raises:
        DicomError: the file is not a 3-D label image, or the series reaches beyond it by > half a voxel.
    """
    import nibabel as nib

    path = Path(nii_path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise DicomError(f"study {series.uid}: cannot read segmentation {path}: {exc}") from exc
    data = data.reshape(data.shape[:3] + tuple(n for n in data.shape[3:] if n != 1))
    if data.ndim != 3:
        raise DicomError(f"study {series.uid}: segmentation {path} has shape {data.shape}, expected 3-D")
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise DicomError(f"study {series.uid}: segmentation {path} holds non-integer values")
        data = data.astype(np.int32)
    to_index = np.linalg.inv(image.affine) @ np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS mm -> NIfTI index
    rot, shift = to_index[:3, :3], to_index[:3, 3]
    z_count, height, width = series.shape
    origin = series.positions @ rot.T + shift  # (Z, 3): index of each slice's first voxel
    down = rot @ (series.orientation[3:] * series.pixel_spacing[0])  # index step per DICOM row
    right = rot @ (series.orientation[:3] * series.pixel_spacing[1])  # index step per DICOM column
    edge_rows, edge_cols = np.array([0, height - 1])[:, None, None, None], np.array([0, width - 1])[:, None, None]
    corners = origin + edge_rows * down + edge_cols * right  # (2, 2, Z, 3): the 4 corners of every slice
    low, high = corners.reshape(-1, 3).min(0), corners.reshape(-1, 3).max(0)
    if (low < -0.5 - 1e-3).any() or (high > np.array(data.shape) - 0.5 + 1e-3).any():
        raise DicomError(
            f"study {series.uid}: segmentation {path} does not cover the series: its {series.shape} voxels "
            f"fall at NIfTI indices {np.round(low, 2).tolist()}..{np.round(high, 2).tolist()}, but the mask "
            f"has shape {data.shape} (allowed -0.5..n-0.5 on each axis)")
    rows, cols = np.arange(height), np.arange(width)
    axis_down, axis_right = int(np.argmax(np.abs(down))), int(np.argmax(np.abs(right)))
    off_axis = np.abs(down).sum() - abs(down[axis_down]), np.abs(right).sum() - abs(right[axis_right])
    if axis_down != axis_right and off_axis[0] * height < 1e-2 and off_axis[1] * width < 1e-2:
        # The common case: DICOM rows / columns run along NIfTI axes. Separable 1-D indices, one gather.
        axis_slice = 3 - axis_down - axis_right
        index = [None, None, None]
        index[axis_slice] = np.rint(origin[:, axis_slice])[:, None, None]
        index[axis_down] = np.rint(origin[:, axis_down, None] + rows * down[axis_down])[:, :, None]
        index[axis_right] = np.rint(origin[:, axis_right, None] + cols * right[axis_right])[:, None, :]
        index = [np.clip(i, 0, n - 1).astype(np.intp) for i, n in zip(index, data.shape)]
        labels = data[tuple(index)]
    else:  # oblique: full per-voxel indices, one slice at a time
        labels = np.empty(series.shape, data.dtype)
        for z in range(z_count):
            point = origin[z][:, None, None] + down[:, None, None] * rows[:, None] + right[:, None, None] * cols
            index = [np.clip(np.rint(point[a]), 0, data.shape[a] - 1).astype(np.intp) for a in range(3)]
            labels[z] = data[tuple(index)]
    small = labels.size == 0 or (labels.min() >= 0 and labels.max() <= 255)
    return labels.astype(np.uint8 if small else np.int16, copy=False)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU to uint8: center - width/2 -> 0, center + width/2 -> 255, clipped, rounded (same shape)."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    hu = np.asarray(hu)
    out = np.empty(hu.shape, np.uint8)
    for start in range(0, len(hu) if hu.ndim == 3 else 1, 32):  # float32 work in blocks of 32 slices
        part = (slice(start, start + 32),) if hu.ndim == 3 else ...
        scaled = (hu[part].astype(np.float32) - np.float32(center - width / 2)) * np.float32(255 / width)
        out[part] = np.rint(np.clip(scaled, 0, 255, out=scaled), out=scaled)
    return out


def window_channels(hu: np.ndarray, names: Iterable[str] = ("bone", "soft")) -> np.ndarray:
    """Stack several named windows of `kit.constants.WINDOWS` as the last axis: (...) -> (..., C) uint8."""
    names = list(names)
    unknown = [n for n in names if n not in WINDOWS]
    if unknown or not names:
        raise ValueError(f"unknown window name(s) {unknown or names}; available: {', '.join(WINDOWS)}")
    return np.stack([window(hu, *WINDOWS[n]) for n in names], axis=-1)


def resize_slices(volume: np.ndarray, size: int | tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resample (Z, H, W) in-plane to (Z, size, size) (or (Z, *size)); nearest for label masks.

    Linear interpolation when enlarging, area averaging when shrinking; the dtype is kept. Nearest takes, for
    each output pixel, the input pixel under its centre (`centred_nearest_index`), so a mask stays aligned with
    its image within 1/8 px (cv2's INTER_NEAREST takes the top-left pixel of each block: 0.375 px off at
    512 -> 128). A
    volume that already has the size is returned as it is (not copied).
    """
    import cv2

    height, width = (int(size), int(size)) if np.ndim(size) == 0 else tuple(map(int, size))
    if volume.ndim != 3:
        raise ValueError(f"resize_slices expects (Z, H, W), got shape {volume.shape}")
    if volume.shape[1:] == (height, width):
        return volume
    if nearest:
        rows = centred_nearest_index(volume.shape[1], height)
        cols = centred_nearest_index(volume.shape[2], width)
        return np.ascontiguousarray(volume[:, rows][:, :, cols])
    shrink = height < volume.shape[1] and width < volume.shape[2]
    method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    native = volume.dtype in (np.uint8, np.int16, np.uint16, np.float32, np.float64)
    work = volume if native else volume.astype(np.float32)  # int32 / bool / int64: cv2 cannot resize them
    out = np.empty((len(volume), height, width), work.dtype)
    for z, plane in enumerate(work):
        out[z] = cv2.resize(plane, (width, height), interpolation=method)
    if not native and volume.dtype.kind in "iub":
        out = np.rint(out, out=out)
    return out.astype(volume.dtype, copy=False)


def centred_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """int (n_out,): the input index under the centre of each output pixel when n_in pixels are resampled to
    n_out over the same extent (pixel edges aligned, as area and linear resizing do)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
