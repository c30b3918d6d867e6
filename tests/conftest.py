"""Shared fixtures: a tiny RSNA-format synthetic dataset made once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic RSNA dataset (8 train studies, half with segmentations, 2 test studies, 64 px).

    The easy mix (clefts only, no look-alikes): the pipeline tests need a stable, fast set; the realistic mix is
    tested in tests/test_synthetic.py. The answers lie beside it, in ``<root>_answers``.
    """
    from kit.synthetic import make_dataset

    root = tmp_path_factory.mktemp("rsna")
    make_dataset(root, n_train=8, n_test=2, size=64, seed=0, seg_share=0.5, progress=False, difficulty="easy")
    return root


@pytest.fixture(scope="session")
def smoke_runs(synthetic_root, tmp_path_factory):
    """Tiny trained runs of every stage on `synthetic_root`, made once per session (about 20 s on 2 cores).

    Fold 0 of demo_level and demo_seg (32 px, 1 epoch, tiny networks: what 01's SMOKE trains), the crop cache of
    every training study cut with them (demo_cls geometry shrunk to 32 px x 5 slices; true masks where a study
    has them), and both folds of two classifier runs on those crops: `demo_cls` (cls_gru) and `demo_cls_patient`
    (cls_patient_gru), so reports have two runs to blend. One 2-fold split, `<run_root>/folds_smoke.csv`, the
    file the notebooks' SMOKE settings use. The 1-epoch models find no vertebra in unsegmented studies: smoke
    runs check the wiring, not quality.

    Returns:
        dict of paths: `data_root`, `answers_dir`, `run_root`, `folds_csv`, `cache_dir`, `crop_dir`, `seg`,
        `level`, `cls`, `cls_patient` (run folders `<run_root>/<name>`), and `cls_overrides` (the classifier
        overrides used, for a notebook or test that trains more of it).
    """
    from kit.io.cache import prepare_studies
    from kit.config import load_config
    from kit.stage2.crop_cache import build_crops
    from kit.synthetic import default_answers_dir
    from kit.train import fit_fold

    work = tmp_path_factory.mktemp("smoke_runs")
    run_root, cache = work / "runs", work / "cache"
    shared = {"out_dir": str(run_root), "data.data_root": str(synthetic_root), "data.n_folds": 2, "data.fold": 0,
              "data.folds_csv": str(run_root / "folds_smoke.csv"), "train.epochs": 1, "train.threads": 1,
              "train.progress": False}
    prepare_studies(synthetic_root, cache, size=32, workers=1, progress=False)
    stage1 = {**shared, "data.cache_dir": str(cache), "data.image_size": 32}
    fit_fold(load_config("demo_level", **stage1, **{"data.seq_len": 16, "data.repeats": 1, "model.hidden": 8,
                                                    "train.batch_size": 2}))
    fit_fold(load_config("demo_seg", **stage1, **{"data.slice_offsets_mm": [-1, 0, 1], "model.encoder_depth": 3,
                                                  "model.decoder_width": 16, "data.foreground_fraction": 0.05,
                                                  "data.augment.crop": 24, "train.batch_size": 8}))
    cls = {**shared, "data.crop_dir": str(work / "crops"), "data.true_masks": True,
           "data.seg_runs": [str(run_root / "demo_seg"), str(run_root / "demo_level")],
           "data.image_size": 32, "data.n_slices": 5, "model.hidden": 8, "train.batch_size": 8,
           "model.encoder": "mobilenetv3_small_050", "model.pretrained_weights": None, "model.freeze_backbone": False}
    build_crops(load_config("demo_cls", **cls), progress=False, prefetch=False)
    patient = {"model.name": "cls_patient_gru", "train.batch_size": 2}  # one sample a study: 2 make a batch
    for name, extra in (("demo_cls", {}), ("demo_cls_patient", patient)):
        for fold in (0, 1):
            fit_fold(load_config("demo_cls", **{**cls, **extra, "name": name, "data.fold": fold}))
    return {"data_root": synthetic_root, "answers_dir": default_answers_dir(synthetic_root), "run_root": run_root,
            "folds_csv": run_root / "folds_smoke.csv", "cache_dir": cache, "crop_dir": work / "crops",
            "seg": run_root / "demo_seg", "level": run_root / "demo_level", "cls": run_root / "demo_cls",
            "cls_patient": run_root / "demo_cls_patient", "cls_overrides": cls}
