"""kit.io.files: the one atomic writer (text, CSV, npz) that every cache, result and report file goes through."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kit.io.files import NPZ_ERRORS, replace_atomic, write_csv_atomic, write_npz_atomic, write_text_atomic


def test_npz_round_trips_at_any_level_and_reads_as_numpy_writes_it(tmp_path):
    arrays = {"hu": np.arange(4000, dtype=np.int16).reshape(10, 20, 20), "labels": np.eye(3, dtype=np.uint8)}
    for level in (1, 6):
        path = write_npz_atomic(tmp_path / f"s{level}.npz", arrays, level=level)
        with np.load(path) as data:
            assert sorted(data.files) == ["hu", "labels"]
            assert all(np.array_equal(data[k], v) and data[k].dtype == v.dtype for k, v in arrays.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.npz", "s6.npz"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "report.json", "old")  # parent folders made
    with pytest.raises(ZeroDivisionError):
        replace_atomic(path, lambda tmp: (tmp.write_text("half"), 1 / 0))
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["report.json"]
    with pytest.raises(ValueError):  # an object array is refused (no pickles in the caches), nothing written
        write_npz_atomic(tmp_path / "x.npz", {"o": np.array([{}, 1], dtype=object)})
    assert not (tmp_path / "x.npz").exists() and not list(tmp_path.glob(".*tmp"))
    write_csv_atomic(pd.DataFrame({"uid": ["1.2"], "n": [3]}), tmp_path / "m.csv")
    assert pd.read_csv(tmp_path / "m.csv", dtype=str).to_dict("list") == {"uid": ["1.2"], "n": ["3"]}


def test_the_temporary_name_matches_no_reader_pattern(tmp_path):
    seen = []
    write_npz_atomic(tmp_path / "1.2.3.npz", {"a": np.zeros(3)})
    replace_atomic(tmp_path / "1.2.4.npz", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b""))
    assert not seen[0].endswith(".npz") and seen[0].startswith(".")  # never globbed as a study's file
    with pytest.raises(NPZ_ERRORS):
        np.load(tmp_path / "1.2.4.npz")
