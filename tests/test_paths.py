"""kit.paths: the data root is found in the documented order, with a clear error when absent."""

from __future__ import annotations

import pytest

from kit.paths import find_data_root


def test_explicit_root_and_env(tmp_path, monkeypatch):
    (tmp_path / "train.csv").write_text("StudyInstanceUID\n")
    assert find_data_root(tmp_path) == tmp_path
    monkeypatch.setenv("KIT_DATA_ROOT", str(tmp_path))
    assert find_data_root() == tmp_path


def test_missing_root_names_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KIT_DATA_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="rsna-2022-cervical-spine-fracture-detection"):
        find_data_root()
    with pytest.raises(FileNotFoundError, match="not an RSNA data root"):
        find_data_root(tmp_path)
