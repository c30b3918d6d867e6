"""`kit demo`: the whole pipeline on an RSNA-format synthetic dataset, on CPU, end to end.

Steps, each resumable (a second run reuses what the first one wrote):
1. `kit.synthetic.make_dataset` writes `<out>/data` in the competition layout, and the generator's answers
   (test labels, every fracture and look-alike) to `<out>/answers`, outside it;
2. `kit.io.cache.prepare_studies` reads every study back through the kit into `<out>/cache`, and a summary
   of what was read is printed;
3. the segmenter trains on the studies that have segmentations, fold by fold, and its out-of-fold Dice
   and z-range error are measured on held-out studies.
Figures go to `runs/demo/summary.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import TARGETS, VERTEBRAE

SUMMARY = Path("runs") / "demo" / "summary.json"


def _update_summary(values: dict, path: Path = SUMMARY) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(values)
    path.write_text(json.dumps(summary, indent=2, default=float))
    return summary


#: the packages whose versions change the demo's numbers (opencv 5.0 -> 5.1 moved stage 1's Dice 0.948 -> 0.945:
#: its affine warps augment the training samples)
ENVIRONMENT_PACKAGES = ("torch", "timm", "segmentation-models-pytorch", "opencv-python-headless", "numpy", "scipy",
                        "pydicom", "dicomsdl", "pylibjpeg-libjpeg", "pylibjpeg-rle")


def environment() -> dict:
    """What the figures were measured with: Python, the CPU, torch's threads, and `ENVIRONMENT_PACKAGES`' versions
    (None: not installed)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "machine": platform.machine(), "processor": _cpu_name(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "packages": {name: installed(name) for name in ENVIRONMENT_PACKAGES}}


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def describe_dataset(root: Path, cache_dir: Path) -> dict:
    """What the kit read back from a prepared dataset: studies, slices, spacing, labels, masks."""
    from ..io.cache import load_cached, read_manifest
    from ..io.rsna import load_boxes, load_train

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


def run_demo(out: str | Path = "demo", *, n_train: int = 60, n_test: int = 20, seed: int = 0, size: int = 256,
             cache_size: int = 128, seg_folds: int | None = 1, cls_folds: int | None = None, progress: bool = True,
             submission_csv: str | Path = "submissions/demo/submission.csv") -> dict:
    """Run the demo pipeline; returns the summary written to `runs/demo/summary.json`.

    Args:
        seg_folds: train and score stage 1 on folds 0..seg_folds-1 (None: every fold of the config); one keeps
            the demo within its budget on a 2-core CPU, the held-out studies of those folds are scored.
        cls_folds: classifier folds to train (None: all, so every training study gets an out-of-fold score).
        size: the synthetic DICOM's pixel grid (256: ~0.55 mm a pixel, fine enough for the classifier's crops to
            show a 1-2 mm fracture gap; at 128 they do not).
        cache_size: the grid of stage 1's cache (`kit prepare`): the segmenter and level model train at 128.
    """
    from ..io.cache import prepare_studies
    from ..synthetic import make_dataset

    out = Path(out)
    data, cache, answers = out / "data", out / "cache", out / "answers"
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if not (data / "train.csv").is_file():
        print(f"[1/5] synthetic dataset: {n_train} train + {n_test} test studies at {size}x{size} -> {data} "
              f"(answers -> {answers})")
        made = make_dataset(data, n_train=n_train, n_test=n_test, size=size, seed=seed, answers_dir=answers,
                            progress=progress)
        print(f"      written in {made.get('seconds', float('nan')):.1f} s")
    else:
        print(f"[1/5] synthetic dataset: reusing {data}")
    print(f"[2/5] reading every study back through kit.io.dicom into {cache}")
    for split in ("train", "test"):
        result = prepare_studies(data, cache / split, split=split, size=cache_size, progress=progress)
        if result["failed"]:
            print(f"      {result['failed']} {split} studies failed: {result['failures']}")
    described = describe_dataset(data, cache / "train")
    print(pd.Series(described).to_string())
    seconds["data"] = round(time.perf_counter() - start, 1)
    _update_summary({"dataset": described, "n_train": n_train, "n_test": n_test, "environment": environment()})

    print("[3/5] stage 1: level model (demo_level) and 2.5D segmenter (demo_seg) per fold, then out-of-fold "
          "Dice and z-ranges")
    pairs = (os.cpu_count() or 1) > 1  # two trainings at a time, one thread each on 2 cores (fit_side_by_side)
    seg = run_segmenter_stage(data, cache / "train", out / "folds.csv", n_folds_trained=seg_folds,
                              side_by_side=pairs)
    print(pd.Series({k: v for k, v in seg.items() if not isinstance(v, dict)}).to_string())
    seconds["stage1"] = seg["seg_seconds"]
    _update_summary(seg)

    print("[4/5] stage 2: vertebra crops (kit crops), the classifier's folds (demo_cls), out-of-fold report")
    cls = run_classifier_stage(data, out / "folds.csv", answers, n_folds_trained=cls_folds, progress=progress,
                               side_by_side=pairs)
    print(pd.Series({k: v for k, v in cls.items() if not isinstance(v, dict)}).to_string())
    seconds["stage2"] = cls["cls_seconds"]
    _update_summary(cls)

    print(f"[5/5] submission: the test split through both stages -> {submission_csv}")
    runs = Path("runs")
    sub = run_submission_stage(data, [runs / "demo_seg", runs / "demo_level", runs / "demo_cls"], answers,
                               Path(submission_csv), progress=progress)
    seconds["submission"] = sub["submit_seconds"]
    seconds["total"] = round(time.perf_counter() - start, 1)
    summary = _update_summary({**sub, "seconds": seconds})
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    """The demo's closing table: each figure, its target, where the artefacts are."""
    def fig(key, digits=3):
        value = summary.get(key)
        return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    s = summary.get("seconds", {})
    from ..synthetic.score import CEILING_KINDS, ceiling_label

    plain = (summary.get("oof_ceilings") or {}).get(ceiling_label(CEILING_KINDS[:-1]))  # all kinds but hairlines
    ceiling = "–" if plain is None else f"{plain:.4f}"
    rows = [
        ("stage 1 Dice (held-out, C1-C7)", fig("seg_dice"), ">= 0.90"),
        ("stage 1 worst median z-error, slices", fig("seg_z_error_slices", 1), "<= 2"),
        ("classifier OOF score", fig("oof_score", 4), f"<= 0.75 x baseline {fig('baseline_score', 4)}"),
        ("  a perfect detector of all but hairlines", ceiling, "(the ceiling: kit.synthetic.score.score_ceilings)"),
        ("  calibration (row form, cross-fitted): OOF change", fig("calibration_oof_change", 4),
         "kept" if summary.get("calibration_used") else "not kept (it did not lower the OOF score)"),
        ("classifier patient AUC (OOF)", fig("patient_auc"), ">= 0.80"),
        ("attention hit rate", fig("attention_hit_rate"), ">= 0.70"),
        ("test score", fig("test_score", 4), f"<= 0.85 x baseline {fig('test_baseline_score', 4)}"),
        ("seconds: data / stage 1 / stage 2 / submission / total",
         " / ".join(str(s.get(k, "–")) for k in ("data", "stage1", "stage2", "submission", "total")), ""),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{name:<{width}}  {value:>18}  {target}" for name, value, target in rows))
    started = summary.get("cls_start")
    if started:
        epochs = started.get("fine_tuning_epochs")
        how = ("used as shipped, each fold setting only its level offsets and priors" if epochs == 0
               else f"fine-tuned for {epochs} epoch(s)" + (" with the CNN frozen" if started.get("backbone_frozen")
                                                          else ""))
        runs = started.get("runs", 1)
        chain = "trained once" if runs == 1 else f"trained in {runs} runs, each from the one before, the last"
        print(f"the classifier is {started['weights']} ({how}), {chain} on {started['set']['n_train']} synthetic "
              f"studies of seed {started['set']['seed']}, never the demo's (its provenance: kit/models/weights/): "
              f"{started['command']}")
    print(f"artefacts: runs/demo_seg, runs/demo_level, runs/demo_cls (report.md), {summary.get('submission')}, "
          f"summary {SUMMARY}")


def fit_side_by_side(configs) -> None:
    """Train fold configs two at a time: the first of each pair in a spawned process, the second here, each
    on half of this process's CPU threads (one each on 2 cores) for its whole run; an odd one out trains alone
    as configured. Put the longer run second.

    The second run keeps its threads after the first has finished: a thread count changed mid-run changes the
    floating-point order of what follows, and the epoch it changed at depended on timing, so two fresh clones
    gave different models (the segmenter's hand-over moved by one epoch between two runs, the classifier's OOF
    score by 0.003). Kept as they are, two fresh clones on the same machine give bit-identical models and
    submissions, for ~20 s more on the demo's stage 1.

    On a small CPU two single-threaded trainings get more done than one after the other on two threads
    (small convolutions do not scale to a second thread: ~1.4x, not 2x). The configs must be independent
    (different runs or folds). A process of its own (spawned, never forked from a torch process) keeps each
    run's RNG, threads and files its own; resuming works as for any run. The spawned run trains without a
    progress bar, so that two bars do not share a terminal line.

    Raises:
        RuntimeError: a spawned run failed (naming its config, fold and run folder; its traceback is on stderr).
    """
    import dataclasses
    import multiprocessing as mp

    import torch

    from ..train import fit_fold

    def with_threads(cfg, n: int, progress: bool):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=n,
                                                                  progress=cfg.train.progress and progress))

    configs = list(configs)
    for i in range(0, len(configs), 2):
        if i + 1 == len(configs):
            fit_fold(configs[i])
            break
        first, second = configs[i], configs[i + 1]
        threads = torch.get_num_threads()  # torch's default: the physical cores
        half = max(1, threads // 2)
        proc = mp.get_context("spawn").Process(target=fit_fold, args=(with_threads(first, half, False),))
        proc.start()
        try:  # the same threads to the end, whenever the run beside finishes: reproducible models
            fit_fold(with_threads(second, half, True))
        except BaseException:  # Ctrl-C or a failure here: stop the other run too (both resume from last.pt)
            proc.terminate()
            raise
        finally:
            proc.join()
            torch.set_num_threads(threads)
        if proc.exitcode != 0:
            raise RuntimeError(f"training {first.name} fold {first.data.fold} in its own process failed (exit "
                               f"code {proc.exitcode}); its traceback is above, its run folder is {first.run_dir}")


def run_segmenter_stage(data: Path, cache_dir: Path, folds_csv: Path, config: str = "demo_seg",
                        n_folds_trained: int | None = None, level_config: str | None = "demo_level",
                        level_overrides: dict | None = None, side_by_side: bool = False, **overrides) -> dict:
    """Train folds of `config` and of the level model `level_config` (the first `n_folds_trained`, default
    all), then score their held-out studies, segmented with both fused (`kit.stage1.infer.segment_study`).
    With `side_by_side` each fold's level model trains in a second process while the segmenter trains here,
    one CPU thread each (`fit_side_by_side`: faster on a 2-core CPU; the same models as one after the other,
    up to the threads' floating-point order).

    `overrides` are passed to `load_config` for `config` (dotted keys as strings: `**{"train.epochs": 1}`),
    `level_overrides` to the level model's (`out_dir` is shared unless `level_overrides` sets its own).

    Returns:
        `seg_dice` (mean over held-out studies of the mean 3D Dice over C1..C7, after clean-up),
        `seg_z_error_slices` (the worst vertebra's median z-range error over held-out studies, in slices:
        per study and vertebra the larger of |first slice error| and |last slice error|, a missed vertebra
        counted as the study's slice count: `kit.evaluate.metrics.z_range_errors`), the per-vertebra
        figures behind both, the same two figures without the level model (`seg_alone_*`) or, for a
        level-conditioned segmenter (`data.level_input`), given the true level ranges instead of the level
        model's (`seg_true_levels_*`: what a perfect level model would give; read from the segmenter's own
        validation, `fold<k>/oof.csv`, which segments the same studies that way), `seg_train_seconds`
        (training both models) and `seg_seconds` (training and scoring).
    """
    from ..config import load_config
    from ..evaluate.stage1 import score_as_inference
    from ..train import fit_fold

    start = time.perf_counter()
    paths = {"data.data_root": str(data), "data.cache_dir": str(cache_dir), "data.folds_csv": str(folds_csv)}
    base = load_config(config, **paths, **overrides)
    shared = {"out_dir": base.out_dir, "data.n_folds": base.data.n_folds, "data.folds_seed": base.data.folds_seed}
    level_overrides = {**shared, **(level_overrides or {})}
    if base.data.level_input and not level_config:
        raise ValueError(f"{config} is conditioned on the level model (data.level_input); give a level_config")
    train_seconds = 0.0
    folds = list(range(min(n_folds_trained or base.data.n_folds, base.data.n_folds)))
    level_root = None
    for fold in folds:
        cfg = load_config(config, **paths, **overrides, **{"data.fold": fold})
        t0 = time.perf_counter()
        if level_config:
            level_cfg = load_config(level_config, **paths, **level_overrides, **{"data.fold": fold})
            level_root = level_cfg.run_dir.parent
            if side_by_side:
                fit_side_by_side([level_cfg, cfg])
            else:
                fit_fold(level_cfg)
                fit_fold(cfg)
        else:
            fit_fold(cfg)
        train_seconds += time.perf_counter() - t0
    out = score_as_inference(base.run_dir.parent, level_root, cache_dir, folds=folds)
    out["seg_level_model"] = level_config
    out["seg_train_seconds"] = round(train_seconds, 1)
    out["seg_seconds"] = round(time.perf_counter() - start, 1)
    return out


def run_classifier_stage(data: Path, folds_csv: Path, answers_dir: Path | None = None, config: str = "demo_cls",
                         n_folds_trained: int | None = None, progress: bool = True, side_by_side: bool = False,
                         **overrides) -> dict:
    """Stage 2 of the demo: crop every training study (`kit.stage2.crop_cache.build_crops`), train folds of the
    classifier `config` (default all), and score their out-of-fold predictions (`kit.evaluate.report.oof_report`).

    `overrides` are passed to `load_config` (dotted keys as strings: `**{"train.epochs": 1}`). With
    `side_by_side` the folds train two at a time, one CPU thread each (`fit_side_by_side`).

    Returns:
        `oof_score` (row-normalised competition metric over the out-of-fold studies), `baseline_score` (the
        same labels and weights, each fold's studies predicted with the prevalence of the studies its model
        trained on), the patient figure from 1 - prod(1 - p) beside it, per-target AUCs, with the generator's
        answers `attention_hit_rate` and the recall by fracture kind, the crop figures and `cls_seconds`;
        `oof_score_calibrated_cross_fitted`, `calibration_used` and `calibration_oof_change` (cross-fitted minus
        raw): the run's calibration (`kit.evaluate.calibration.calibrate_run`, fitted on the row-normalised metric) is
        kept for the submission only when it beats the raw OOF score out of fold.
    """
    from ..evaluate.calibration import calibrate_run
    from ..config import load_config
    from ..stage2.crop_cache import build_crops
    from ..evaluate.report import oof_report
    from ..synthetic.score import attention_hit_rate, read_answers
    from ..evaluate.oof import load_oof
    from ..train import fit_fold

    start = time.perf_counter()
    paths = {"data.data_root": str(data), "data.folds_csv": str(folds_csv)}
    base = load_config(config, **paths, **overrides)
    crops = build_crops(base, split="train", progress=progress)
    folds = range(min(n_folds_trained or base.data.n_folds, base.data.n_folds))
    configs = [load_config(config, **paths, **overrides, **{"data.fold": fold}) for fold in folds]
    if side_by_side:
        fit_side_by_side(configs)
    else:
        for cfg in configs:
            fit_fold(cfg)
    run_dir = base.run_dir.parent
    calibration = calibrate_run(run_dir, only_if_better=True)  # used by the submission only if it helps OOF
    report = oof_report(run_dir, answers_dir=answers_dir)
    name = next(iter(report["scores"]))
    model = report["models"][name]
    fair = report["baseline_from_train_folds"]
    out = {
        "oof_score": round(float(report["scores"][name]["row"]), 4),
        "baseline_score": round(float(fair["score_row"]), 4) if fair else None,
        "baseline_in_sample_score": round(float(report["baseline"]["score_row"]), 4),
        "cls_auc": {t: round(float(v), 3) for t, v in model["auc"].items()},
        "patient_auc": None if model["auc"].get("patient_overall") is None
        else round(float(model["auc"]["patient_overall"]), 3),
        "cls_folds_trained": len(folds),
        "cls_oof_studies": int(model["n_studies"]),
        "crops_built": crops["built"], "crops_failed": crops["failed"],
        "crops_in_sample": len(crops["in_sample"]),
        "cls_report": report["report_md"],
        "oof_score_calibrated_cross_fitted": calibration["oof_score_cross_fitted"],
        "calibration_used": calibration["written"],
        "calibration_oof_change": None if calibration["oof_score_cross_fitted"] is None
        else round(calibration["oof_score_cross_fitted"] - calibration["oof_score"], 4),
    }
    oof = load_oof(run_dir)
    raw = pd.concat([pd.read_csv(p, dtype={"StudyInstanceUID": str}) for p in sorted(run_dir.glob("fold*/oof.csv"))])
    if "patient_overall_from_vertebrae" in raw.columns:
        from ..evaluate.metrics import competition_score

        derived = raw.set_index("StudyInstanceUID").loc[oof["StudyInstanceUID"]]
        p = oof[list(TARGETS)].to_numpy(dtype=float)
        p[:, 0] = derived["patient_overall_from_vertebrae"].to_numpy(dtype=float)
        out["oof_score_patient_from_vertebrae"] = round(float(competition_score(
            oof[[f"{t}_true" for t in TARGETS]].to_numpy(), p)), 4)
    if answers_dir is not None and (Path(answers_dir) / "fractures.csv").is_file():
        hits = attention_hit_rate(raw.drop_duplicates("StudyInstanceUID"), base.data.crop_dir, read_answers(answers_dir))
        out["attention_hit_rate"] = round(hits["attention_hit_rate"], 4) if hits["n_detected"] else None
        out["attention_detected_boxed"] = f"{hits['n_detected']} of {hits['n_boxed']}"
        if report.get("ceilings"):  # the score a perfect detector of the plainest kinds would reach
            out["oof_ceilings"] = {r["found"]: round(float(r["score"]), 4) for r in report["ceilings"]}
        if report.get("recall"):
            out["recall_by_kind"] = {r["kind"]: round(float(r[name]), 3) for r in report["recall"]["kind"]}
            out["recall_by_subtlety"] = {str(r["subtlety"]): round(float(r[name]), 3)
                                         for r in report["recall"]["subtlety"]}
            if report["recall"].get("lookalike"):
                out["false_alarms_by_lookalike"] = {r["lookalike"]: round(float(r[name]), 3)
                                                    for r in report["recall"]["lookalike"]}
    from ..models.start import is_start, start_meta, training_runs

    if is_start(base.model.pretrained_weights):  # the summary says where the classifier started
        meta = start_meta(base.model.pretrained_weights)
        out["cls_start"] = {"weights": base.model.pretrained_weights, "command": meta["command"],
                            "set": meta["set"], "runs": training_runs(meta), "kit_commit": meta.get("kit_commit"),
                            "fine_tuning_epochs": base.train.epochs, "backbone_frozen": base.model.freeze_backbone}
    out["cls_seconds"] = round(time.perf_counter() - start, 1)
    return out


def run_submission_stage(data: Path, run_dirs: list[Path], answers_dir: Path | None, out_csv: Path,
                         progress: bool = True) -> dict:
    """The demo's submission: `kit.submit.predictor.submit` over the test split (stage 1, crops and the classifier's
    fold ensemble, every failure a logged fallback), then, with the generator's answers, `test_score` against
    `test_baseline_score` (the training labels' prevalence for every row), both by `metrics.score_submission`.
    """
    from ..submit.predictor import submit
    from ..synthetic.score import score_test_submission
    from ..submit.submission import default_log_path

    start = time.perf_counter()
    newest = max((p.stat().st_mtime for r in run_dirs for p in Path(r).glob("fold*/model.pt")), default=0.0)
    out = {"submission": str(out_csv), "submission_log": str(default_log_path(out_csv))}
    if out_csv.is_file() and out_csv.stat().st_mtime > newest:  # a second demo run: the models have not changed
        print(f"      reusing {out_csv} (newer than every model.pt)")
    else:
        written = submit(data, [str(r) for r in run_dirs], out_csv, progress=progress)
        out.update({"test_studies": written["studies"], "test_predicted": written["predicted"],
                    "test_fallbacks": written["fallbacks"]})
    if answers_dir is not None and (Path(answers_dir) / "test_labels.csv").is_file():
        submission = pd.read_csv(out_csv, dtype={"row_id": str})
        scores = score_test_submission(submission, answers_dir, data)
        out["test_score"] = round(float(scores["test_score"]), 4)
        out["test_baseline_score"] = round(float(scores["test_baseline_score"]), 4)
    out["submit_seconds"] = round(time.perf_counter() - start, 1)
    return out
