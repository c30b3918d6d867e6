"""`kit demo`: the whole pipeline on an RSNA-format synthetic dataset, on CPU, end to end.

Steps, each resumable (a second run reuses what the first one wrote):
1. `kit.synthetic.make_dataset` writes `<out>/data` in the competition layout, and the generator's answers
   (test labels, every fracture and look-alike) to `<out>/answers`, outside it;
2. `kit.cache.prepare_studies` reads every study back through the kit into `<out>/cache`, and a summary
   of what was read is printed;
3. the segmenter trains on the studies that have segmentations, fold by fold, and its out-of-fold Dice
   and z-range error are measured on held-out studies.
Figures go to `runs/demo/summary.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .constants import TARGETS, VERTEBRAE

SUMMARY = Path("runs") / "demo" / "summary.json"


def _update_summary(values: dict, path: Path = SUMMARY) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(values)
    path.write_text(json.dumps(summary, indent=2, default=float))
    return summary


def describe_dataset(root: Path, cache_dir: Path) -> dict:
    """What the kit read back from a prepared dataset: studies, slices, spacing, labels, masks."""
    from .cache import load_cached, read_manifest
    from .rsna import load_boxes, load_train

    train, boxes, manifest = load_train(root), load_boxes(root), read_manifest(cache_dir)
    seg = manifest[manifest["has_mask"]]
    found = {name: 0 for name in VERTEBRAE}
    for uid in seg["StudyInstanceUID"]:
        present = set(np.unique(load_cached(cache_dir, uid)["mask"]).tolist())
        for i, name in enumerate(VERTEBRAE, start=1):
            found[name] += i in present
    return {
        "train_studies": len(train),
        "studies_read": len(manifest),
        "slices_min_median_max": [int(manifest.slices.min()), int(manifest.slices.median()),
                                  int(manifest.slices.max())],
        "dz_mm_min_max": [round(float(manifest.dz.min()), 3), round(float(manifest.dz.max()), 3)],
        "in_plane_sizes": sorted({f"{h}x{w}" for h, w in zip(manifest.rows, manifest.cols)}),
        "prevalence": {t: round(float(train[t].mean()), 3) for t in TARGETS},
        "fracture_box_rows": len(boxes),
        "studies_with_boxes": int(boxes.StudyInstanceUID.nunique()),
        "segmentations": len(seg),
        "segmentations_showing_vertebra": found,
        "reader_warnings": int(manifest["warnings"].fillna("").astype(bool).sum()),
    }


def run_demo(out: str | Path = "demo", *, n_train: int = 60, n_test: int = 20, seed: int = 0, size: int = 128,
             seg_folds: int | None = 1) -> dict:
    """Run the demo pipeline; returns the summary written to `runs/demo/summary.json`.

    Args:
        seg_folds: train and score the segmenter on folds 0..seg_folds-1 (None: every fold of the config);
            one keeps the demo near ten minutes on a 2-core CPU, the held-out studies of those folds are scored.
    """
    from .cache import prepare_studies
    from .synthetic import make_dataset

    out = Path(out)
    data, cache = out / "data", out / "cache"
    start = time.perf_counter()
    if not (data / "train.csv").is_file():
        print(f"[1/3] synthetic dataset: {n_train} train studies at {size}x{size} -> {data}")
        made = make_dataset(data, n_train=n_train, n_test=n_test, size=size, seed=seed, answers_dir=out / "answers")
        print(f"      written in {made.get('seconds', float('nan')):.1f} s")
    else:
        print(f"[1/3] synthetic dataset: reusing {data}")
    print(f"[2/3] reading every study back through kit.dicom into {cache}")
    for split in ("train", "test"):
        result = prepare_studies(data, cache / split, split=split, size=size)
        if result["failed"]:
            print(f"      {result['failed']} {split} studies failed: {result['failures']}")
    described = describe_dataset(data, cache / "train")
    print(pd.Series(described).to_string())
    _update_summary({"dataset": described, "data_seconds": round(time.perf_counter() - start, 1)})

    print("[3/3] stage 1: level model (demo_level) and 2.5D segmenter (demo_seg) per fold, then out-of-fold "
          "Dice and z-ranges of both fused")
    seg = run_segmenter_stage(data, cache / "train", out / "folds.csv", n_folds_trained=seg_folds)
    print(pd.Series({k: v for k, v in seg.items() if not isinstance(v, dict)}).to_string())
    summary = _update_summary(seg)
    print(f"summary -> {SUMMARY}")
    return summary


def run_segmenter_stage(data: Path, cache_dir: Path, folds_csv: Path, config: str = "demo_seg",
                        n_folds_trained: int | None = None, level_config: str | None = "demo_level",
                        level_overrides: dict | None = None, **overrides) -> dict:
    """Train folds of `config` and of the level model `level_config` (the first `n_folds_trained`, default
    all), then score their held-out studies, segmented with both fused (`kit.infer.segment_study`).

    `overrides` are passed to `load_config` for `config` (dotted keys as strings: `**{"train.epochs": 1}`),
    `level_overrides` to the level model's (`out_dir` is shared unless `level_overrides` sets its own).

    Returns:
        `seg_dice` (mean over held-out studies of the mean 3D Dice over C1..C7, after clean-up),
        `seg_z_error_slices` (the worst vertebra's median z-range error over held-out studies, in slices:
        per study and vertebra the larger of |first slice error| and |last slice error|, a missed vertebra
        counted as the study's slice count: `kit.metrics.z_range_errors`), the per-vertebra
        figures behind both, the same two figures without the level model (`seg_alone_*`) or, for a
        level-conditioned segmenter (`data.level_input`), given the true level ranges instead of the level
        model's (`seg_true_levels_*`: what a perfect level model would give), `seg_train_seconds`
        (training both models) and `seg_seconds` (training and scoring).
    """
    from .cache import load_cached
    from .config import load_config
    from .data import split_segmentation_studies
    from .slices import true_presence
    from .infer import load_run
    from .train import fit_fold

    start = time.perf_counter()
    paths = {"data.data_root": str(data), "data.cache_dir": str(cache_dir), "data.folds_csv": str(folds_csv)}
    base = load_config(config, **paths, **overrides)
    shared = {"out_dir": base.out_dir, "data.n_folds": base.data.n_folds, "data.folds_seed": base.data.folds_seed}
    level_overrides = {**shared, **(level_overrides or {})}
    rows = {"fused": ([], []), "alone": ([], [])}
    conditioned = base.data.level_input
    if conditioned and not level_config:
        raise ValueError(f"{config} is conditioned on the level model (data.level_input); give a level_config")
    train_seconds = 0.0
    for fold in range(min(n_folds_trained or base.data.n_folds, base.data.n_folds)):
        cfg = load_config(config, **paths, **overrides, **{"data.fold": fold})
        level_models = []
        if level_config:
            level_cfg = load_config(level_config, **paths, **level_overrides, **{"data.fold": fold})
            t0 = time.perf_counter()
            fit_fold(level_cfg)
            train_seconds += time.perf_counter() - t0
            level_models = load_run(level_cfg.run_dir.parent, folds=[fold])
        t0 = time.perf_counter()
        fit_fold(cfg)
        train_seconds += time.perf_counter() - t0
        models = load_run(cfg.run_dir.parent, folds=[fold])
        for uid in split_segmentation_studies(cfg.data)[1]:
            cached = load_cached(cache_dir, uid)
            _score_study(cached, models, level_models, uid, fold, *rows["fused"])
            if conditioned:
                truth = true_presence(cached["mask"])
                _score_study(cached, models, truth, uid, fold, *rows["alone"])
            elif level_models:
                _score_study(cached, models, [], uid, fold, *rows["alone"])
    run_root = base.run_dir.parent
    out = _seg_figures(*rows["fused"], run_root, "")
    if rows["alone"][0]:
        key = "true_levels" if conditioned else "alone"
        alone = _seg_figures(*rows["alone"], run_root, "_true_levels" if conditioned else "_segmenter_alone")
        out.update({f"seg_{key}_dice": alone["seg_dice"], f"seg_{key}_z_error_slices": alone["seg_z_error_slices"]})
    out["seg_level_model"] = level_config
    out["seg_train_seconds"] = round(train_seconds, 1)
    out["seg_seconds"] = round(time.perf_counter() - start, 1)
    return out


def _score_study(cached: dict, models, level_models, uid: str, fold: int, dice_rows: list, z_rows: list) -> None:
    """Segment one held-out study and append its Dice per vertebra and z-range errors."""
    from .infer import segment_study
    from .metrics import dice_per_vertebra, z_range_errors

    result = segment_study(cached, models, uid=uid, levels=level_models if len(level_models) else None)
    truth = cached["mask"]
    dice_rows.append({"StudyInstanceUID": uid, "fold": fold, **dice_per_vertebra(result.labels, truth).to_dict()})
    errors = z_range_errors(result.labels, truth)  # a missed vertebra counts as the study's slice count
    for name in VERTEBRAE:
        if np.isfinite(errors[name]):
            z_rows.append({"StudyInstanceUID": uid, "vertebra": name, "error": errors[name],
                           "missed": not result.extents.get(name)})


def _seg_figures(dice_rows: list, z_rows: list, run_root: Path, suffix: str) -> dict:
    """Summary figures of scored studies; writes `oof_dice<suffix>.csv` and `oof_z_errors<suffix>.csv`."""
    dice, z = pd.DataFrame(dice_rows), pd.DataFrame(z_rows)
    z_median = z.groupby("vertebra")["error"].median().reindex(list(VERTEBRAE))
    dice.to_csv(run_root / f"oof_dice{suffix}.csv", index=False)
    z.to_csv(run_root / f"oof_z_errors{suffix}.csv", index=False)
    return {
        "seg_dice": round(float(dice["mean"].mean()), 4),
        "seg_z_error_slices": float(z_median.max()),
        "seg_dice_per_vertebra": {v: round(float(dice[v].mean()), 4) for v in VERTEBRAE},
        "seg_z_error_median_per_vertebra": {v: float(e) for v, e in z_median.items()},
        "seg_vertebrae_missed": int(z["missed"].sum()),
        "seg_heldout_studies": int(dice["StudyInstanceUID"].nunique()),
        "seg_folds_trained": int(dice["fold"].nunique()),
    }
