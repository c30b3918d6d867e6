"""Every numbered notebook runs headless in a real Jupyter kernel on a tiny synthetic set."""

from __future__ import annotations

from pathlib import Path

import nbformat
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
    assert _images(nb) >= 6  # labels, geometry, axial, sagittal, fracture boxes, fracture mix


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


def _text(nb) -> str:
    """Everything a notebook printed or showed as text."""
    return "\n".join(out.get("text", "") + out.get("data", {}).get("text/plain", "")
                     for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_02_make_crops(smoke_runs, tmp_path):
    """02 segments and crops every training study with the smoke stage-1 runs into a fresh folder."""
    import numpy as np
    import pandas as pd

    from kit.stage2.store import load_crops, missing_table
    from kit.io.rsna import load_train

    crop_dir = tmp_path / "crops"
    params = {"DATA_ROOT": str(smoke_runs["data_root"]), "SMOKE": True, "RUN_ROOT": str(smoke_runs["run_root"]),
              "CROP_DIR": str(crop_dir), "TRUE_MASKS": True}
    nb = run_notebook(NOTEBOOKS / "02_make_crops.ipynb", params, tmp_path)
    assert _images(nb) >= 1  # the crop gallery
    uids = sorted(load_train(smoke_runs["data_root"]).StudyInstanceUID)
    assert sorted(p.stem for p in crop_dir.glob("*.npz")) == uids
    manifest = pd.read_csv(crop_dir / "manifest.csv", dtype={"StudyInstanceUID": str})
    assert sorted(manifest.StudyInstanceUID) == uids
    assert (manifest.mask_source == "truth").sum() == 4  # the studies with a segmentation (true masks asked)
    studies = [load_crops(crop_dir, u) for u in uids]
    assert all(s["crops"].shape == (7, 5, 6, 32, 32) for s in studies)  # SMOKE: 5 slices x (5 + mask) x 32 px
    not_found = sum(int((~s["found"]).sum()) for s in studies)
    assert len(missing_table(manifest)) == not_found
    assert f"{not_found} vertebrae not found" in _text(nb)
    assert (crop_dir / "failures.csv").is_file() and (crop_dir / "unmatched_boxes.csv").is_file()
    assert np.isfinite(studies[0]["spacing"]).all()


def test_04_oof_evaluation(smoke_runs, tmp_path):
    """04 reports two classifier runs and their blends, with every figure shown inline."""
    import json

    out = tmp_path / "report"
    params = {"DATA_ROOT": str(smoke_runs["data_root"]), "SMOKE": True, "OUT_DIR": str(out),
              "RUNS": [str(smoke_runs["cls"]), str(smoke_runs["cls_patient"])]}
    nb = run_notebook(NOTEBOOKS / "04_oof_evaluation.ipynb", params, tmp_path)
    result = json.loads((out / "report.json").read_text())
    models = {"demo_cls", "demo_cls_patient", "mean blend", "fitted blend"}
    assert set(result["scores"]) == models and (out / "report.md").is_file()
    assert result["baseline_from_train_folds"]["n_studies"] == 8  # both folds: every training study held out once
    assert result["recall"] is not None  # the generator's answers were found beside the data
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 * len(models)  # ROC, calibration, histograms per run and blend
    assert _images(nb) >= len(pngs)
    # the calibration cell: kept (calibration.json) exactly where it says so; removed again so that the shared
    # smoke runs stay as the other tests expect them
    text = _text(nb)
    for run in (smoke_runs["cls"], smoke_runs["cls_patient"]):
        kept = (run / "calibration.json").is_file()
        assert f"{run}: OOF " in text and (f"kept: {run / 'calibration.json'}" in text) == kept
        (run / "calibration.json").unlink(missing_ok=True)


def test_05_submission(smoke_runs, tmp_path):
    """05 exports the smoke runs, submits from the export, shows the file and its log and scores it."""
    import pandas as pd

    from kit.constants import TARGETS
    from kit.synthetic.score import score_test_submission
    from kit.io.rsna import studies_to_predict

    root, out = smoke_runs["data_root"], tmp_path / "sub" / "submission.csv"
    params = {"DATA_ROOT": str(root), "SMOKE": True, "OUT": str(out), "EXPORT_DIR": str(tmp_path / "export"),
              "RUNS": [str(smoke_runs[k]) for k in ("seg", "level", "cls")]}
    nb = run_notebook(NOTEBOOKS / "05_submission.ipynb", params, tmp_path)
    assert (tmp_path / "export" / "manifest.json").is_file()
    submission = pd.read_csv(out, dtype={"row_id": str})
    uids, _ = studies_to_predict(root)
    assert sorted(submission.row_id) == sorted(f"{u}_{t}" for u in uids for t in TARGETS)
    assert submission.fractured.between(1e-4, 1 - 1e-4).all()
    log = pd.read_csv(out.parent / "submission_log.csv", dtype={"StudyInstanceUID": str})
    assert set(log.StudyInstanceUID) <= set(uids)
    scores = score_test_submission(out, smoke_runs["answers_dir"], root)
    shown = f"test score {scores['test_score']:.4f} vs prevalence baseline {scores['test_baseline_score']:.4f}"
    assert shown in _text(nb)
