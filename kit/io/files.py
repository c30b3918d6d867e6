"""Atomic file writes: a file at its final path is always complete, never half-written by a run that was killed.

Each writer writes a temporary file beside the target (same folder, so the same file system) and renames it over
the target with `os.replace`, which is atomic on POSIX and Windows; the temporary name (`.<name>.<pid>.tmp`) matches
no reader's pattern. `NPZ_ERRORS` names what reading a damaged `.npz` raises. Standard library only (numpy imported
by the npz writer when called).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from ..paths import PathLike


def replace_atomic(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it to `path` (parent folders made).

    The temporary file is removed when `write` raises; `path` is then left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """`path` holds `text` (UTF-8), written atomically."""
    return replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv_atomic(df: "pandas.DataFrame", path: PathLike) -> Path:
    """`df.to_csv(path, index=False)`, written atomically."""
    return replace_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def write_npz_atomic(path: PathLike, arrays: dict, *, level: int = 6) -> Path:
    """A compressed `.npz` of `arrays` (what `np.savez_compressed` writes and `np.load` reads; no pickled objects),
    written atomically, at zlib `level` (6: `savez_compressed`'s; 1 is much faster for slightly larger files)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
            for key, value in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    return replace_atomic(path, write)


# what opening or reading a cached .npz raises when the file is missing, empty, truncated or not an npz, or a member's
# compressed stream is damaged (zlib.error is none of the others: found by fuzzing the files)
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
