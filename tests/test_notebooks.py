"""Every numbered notebook runs headless in a real Jupyter kernel on a tiny synthetic set."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path, params: dict, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute `path` with `params` injected after its parameters cell; raises on the first failing cell."""
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[1] if nb.cells[0].cell_type == "markdown" else nb.cells[0]
    assert "parameters" in first.metadata.get("tags", []), f"{path.name}: first code cell must be parameters"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    nb.cells.insert(nb.cells.index(first) + 1, injected)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_notebooks_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_00_eda(synthetic_root, tmp_path):
    nb = run_notebook(NOTEBOOKS / "00_eda.ipynb", {"DATA_ROOT": str(synthetic_root), "SMOKE": True}, tmp_path)
    assert _images(nb) >= 4  # labels, geometry, axial, sagittal


def test_01_train_segmenter(synthetic_root, tmp_path):
    params = {"DATA_ROOT": str(synthetic_root), "SMOKE": True, "RUN_ROOT": str(tmp_path / "runs")}
    nb = run_notebook(NOTEBOOKS / "01_train_segmenter.ipynb", params, tmp_path)
    assert _images(nb) >= 3  # curves, Dice per vertebra, sagittal overlay
    assert (tmp_path / "runs" / "demo_seg" / "fold0" / "model.pt").is_file()
    assert (tmp_path / "runs" / "demo_seg" / "fold0" / "oof.csv").is_file()
    assert (tmp_path / "runs" / "demo_level" / "fold0" / "model.pt").is_file()


def test_03_train_classifier(synthetic_root, tmp_path, monkeypatch):
    import os

    # the kernel imports this checkout's kit (not another editable install's)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), os.getenv("PYTHONPATH")])))
    params = {"DATA_ROOT": str(synthetic_root), "SMOKE": True, "RUN_ROOT": str(tmp_path / "runs")}
    nb = run_notebook(NOTEBOOKS / "03_train_classifier.ipynb", params, tmp_path)
    assert _images(nb) == 3  # training curves, the explained vertebra, every vertebra of its study
    fold = tmp_path / "runs" / "demo_cls" / "fold0"
    for name in ("config.yaml", "model.pt", "log.csv", "oof.csv", "oof_summary.json"):
        assert (fold / name).is_file(), name
    # SMOKE cuts crops from the ground truth: exactly the studies with a segmentation
    cut = sorted(p.name[:-4] for p in (tmp_path / "cache" / "smoke" / "crops").glob("*.npz"))
    assert cut == sorted(p.name[:-4] for p in (synthetic_root / "segmentations").glob("*.nii"))
