"""The `kit` console script: thin argument parsing over kit functions (imports stay lazy for a fast --help)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


SMOKE_ENV = "KIT_SMOKE"

# What `KIT_SMOKE=1` changes, so that every line of the README's command block runs verbatim in seconds
# (tests/test_readme.py): argparse values per command, replacing what the command line gave ...
SMOKE_ARGS: dict[str, dict] = {
    "synth": {"n_train": 10, "n_test": 2, "size": 64, "n_slices": 64},  # 10 studies: a segmented one a fold
    "prepare": {"size": 64},
    "bench read": {"slices": 16, "size": 64},
    "bench seg": {"configs": ["demo_seg"], "slice_counts": [8, 16, 32]},
    "bench crops": {"quick": True},
    "bench submit": {"quick": True},
    "bench learn": {"quick": True, "out": "runs/bench_learn_smoke"},
    "bench train": {"steps": 1, "rounds": 1},
    # config overrides appended after the command line's: small crops of few slices
    "crops": {"smoke_overrides": ["data.image_size=32", "data.n_slices=5"]},
    # a small set and a small model, exported beside its working folder (never over the shipped checkpoint)
    "pretrain": {"n_train": 12, "grid": 64, "n_folds": 3, "epochs": 1, "export_dir": "runs/cls_start_smoke",
                 "smoke_overrides": ["data.image_size=32", "data.n_slices=4", "model.hidden=8"]},
}
# ... and config overrides of `kit train` per task, appended after the command line's (so they win).
SMOKE_TRAIN: dict[str, dict] = {
    "seg": {"train.epochs": 1, "data.image_size": 64, "data.augment.crop": 48, "data.foreground_fraction": 0.1},
    "level": {"train.epochs": 1, "data.repeats": 1, "data.seq_len": 16},
}
SMOKE_TRAIN_OTHER = {"train.epochs": 1}  # a task without its own entry


def smoke_mode() -> bool:
    """True when the environment variable KIT_SMOKE is set to anything but '', 0, false, no or off."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def apply_smoke(args: argparse.Namespace) -> str:
    """Shrink a parsed command to a smoke run (SMOKE_ARGS / SMOKE_TRAIN) in place; returns the line it prints.

    Smoke runs check that a command works end to end (files found, runs written, outputs read back), not
    the quality of what it makes. Commands without an entry (segment, report, demo) run as asked; `kit
    segment` and `kit report` are small anyway when they read smoke runs.
    """
    command = f"{args.command} {args.what}" if args.command == "bench" else args.command
    changes = dict(SMOKE_ARGS.get(command, {}))
    for key, value in changes.items():
        setattr(args, key, value)
    if args.command == "train":
        from .config import load_config

        task = load_config(args.config).task
        changes = SMOKE_TRAIN.get(task, SMOKE_TRAIN_OTHER)
        args.overrides = [*args.overrides, *(f"{k}={v}" for k, v in changes.items())]
    shown = " ".join(f"{k}={v}" for k, v in changes.items()) or "nothing changed, it runs as asked"
    return f"smoke mode ({SMOKE_ENV}={os.environ.get(SMOKE_ENV)}): kit {command}: {shown}"


def _cmd_synth(args: argparse.Namespace) -> None:
    from .synthetic import make_dataset

    summary = make_dataset(args.out, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                           seg_share=args.seg_share, workers=args.workers, n_slices=args.n_slices,
                           answers_dir=args.answers, difficulty=args.difficulty)
    print(json.dumps(summary, indent=2, default=str))


def _few_failures(result: dict, n: int = 10) -> dict:
    """`result` with at most `n` of its `failures` shown (all of them are in failures.csv)."""
    failures = result.get("failures") or {}
    if len(failures) <= n:
        return result
    shown = dict(list(failures.items())[:n])
    shown["..."] = f"{len(failures) - n} more in failures.csv"
    return {**result, "failures": shown}


def _add_time_budget(p: argparse.ArgumentParser) -> None:
    """The batch jobs' (`kit prepare`, `segment`, `crops`) `--time-budget` (`kit.io.jobs.run_job`)."""
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop before a study that would end past it; a second run resumes where this one stopped")


def _say_left(result: dict) -> None:
    if result.get("left"):
        print(f"{result['left']} studies left by the time budget: the same command again resumes there",
              file=sys.stderr)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .io.cache import prepare_studies

    result = prepare_studies(args.data_root, args.cache_dir, split=args.split, size=args.size,
                             window_name=args.window, workers=args.workers, segmented_only=args.segmented_only,
                             time_budget=args.time_budget)
    print(json.dumps(_few_failures(result), indent=2))
    _say_left(result)
    if result["failed"]:
        print(f"{result['failed']} studies failed; see {Path(args.cache_dir) / 'failures.csv'}", file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> None:
    from .evaluate.report import run_report, summary_table

    print(summary_table(run_report(args.run_dirs, args.out, n_worst=args.worst)))


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from .evaluate.calibration import calibrate_run

    for run in args.run_dirs:
        r = calibrate_run(run, ridge=args.ridge, only_if_better=args.only_if_better)
        cv = "n/a (one fold)" if r["oof_score_cross_fitted"] is None else f"{r['oof_score_cross_fitted']:.4f}"
        print(f"{run}: {r['n_studies']} OOF studies, folds {r['folds']}; OOF score {r['oof_score']:.4f}, "
              f"calibrated (cross-fitted) {cv}; {'wrote ' + r['path'] if r['written'] else 'not calibrated'}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .tools import bench

    if args.what == "read":
        bench.bench_read(args.series_dir, n_slices=args.slices, size=args.size, workers=args.workers)
    elif args.what == "seg":
        chosen = {"config_names": args.configs, "slice_counts": args.slice_counts}
        bench.bench_seg(**{k: tuple(v) for k, v in chosen.items() if v})
    elif args.what == "train":
        chosen = {"config_names": tuple(args.configs or ()), "steps": args.steps, "rounds": args.rounds}
        bench.bench_train(**{k: v for k, v in chosen.items() if v})
    elif args.what == "learn":
        from .tools.bench_learn import bench_learn

        bench_learn(args.out or "bench_learn", args.settings, n_train=args.n_train, folds=args.folds,
                    n_folds=args.n_folds, epochs=args.epochs, quick=args.quick)
    elif args.what == "crops":
        from .tools.bench_crops import bench_crops

        chosen = {"config_names": tuple(args.configs or ()), "n_studies": args.studies}
        bench_crops(**{k: v for k, v in chosen.items() if v}, quick=args.quick)
    elif args.what == "submit" and args.model_seconds is not None:  # the read-ahead against its limit
        from .tools.bench_read_ahead import bench_read_ahead

        chosen = {"size": args.size, "n_slices": args.slices, "studies": args.studies}
        bench_read_ahead(args.model_seconds, **{k: v for k, v in chosen.items() if v}, quick=args.quick)
    else:
        from .tools.bench_submit import bench_submit

        chosen = {"configs": tuple(args.configs or ()), "slice_counts": tuple(args.slice_counts or ())}
        kwargs = {k: v for k, v in chosen.items() if v}
        if args.memory_configs is not None:  # "none": no memory run
            kwargs["memory_configs"] = tuple(c for c in args.memory_configs if c.lower() != "none") or None
        bench_submit(**kwargs, quick=args.quick)


def _fold_or_override(token: str) -> int | str:
    """argparse type of `kit train --folds`: an int >= 0 is a fold, `key=value` an override.

    `--folds` takes one or more values, so in `--folds 0 1 2 train.epochs=3` the override follows the folds
    into the same list; `folds_and_overrides` sorts them out.
    """
    if "=" in token:
        return _override(token)
    try:
        fold = int(token)
    except ValueError:
        fold = -1
    if fold < 0:
        raise argparse.ArgumentTypeError(
            f"{token!r} is neither a fold number (an int >= 0, e.g. --folds 0 1 2) "
            "nor a key=value override (e.g. train.epochs=3)")
    return fold


def _override(token: str) -> str:
    """argparse type of a `kit train` override: `dotted.key=value` with a non-empty key."""
    key, sep, _ = token.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"{token!r} is not a key=value override (e.g. train.epochs=3); fold numbers go after --folds")
    return token


def _parse_value(text: str):
    """An override's value as YAML would read it, minus YAML 1.1's surprises: `1e-3` is a number (not the
    string '1e-3') and only true/false are booleans (`off`, `no`, `on`, `yes` stay strings: `train.amp=off`)."""
    import yaml

    from .config import NUMBER

    if NUMBER.fullmatch(text.strip()):
        return float(text) if any(c in text for c in ".eE") else int(text)
    value = yaml.safe_load(text)
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        return text.strip()
    return value


def _parse_overrides(items: list[str]) -> dict:
    """`["train.epochs=3", "optim.lr=1e-3", "train.amp=off"]` -> `{"train.epochs": 3, "optim.lr": 0.001,
    "train.amp": "off"}` (values read by `_parse_value`)."""
    overrides = {}
    for item in items:
        key, _, value = _override(item).partition("=")
        overrides[key.strip()] = _parse_value(value)
    return overrides


def folds_and_overrides(args: argparse.Namespace) -> tuple[list[int], dict]:
    """The folds to train and the config overrides of a parsed `kit train` command line.

    The ints among `--folds` are the folds (default [0]); its `key=value` values join the positional
    overrides, in the order given.

    Raises:
        ValueError: `--folds` named no fold or a fold twice, or an override sets `data.fold` (the folds
            come from `--folds`).
    """
    given = list(args.folds or [])
    folds = [t for t in given if isinstance(t, int)]
    overrides = _parse_overrides([t for t in given if isinstance(t, str)] + list(args.overrides))
    if given and not folds:
        raise ValueError(f"--folds got no fold number, only overrides {given}; e.g. --folds 0 1 2")
    repeated = sorted({k for k in folds if folds.count(k) > 1})
    if repeated:
        raise ValueError(f"--folds names fold(s) {repeated} more than once: {folds}")
    if "data.fold" in overrides:
        raise ValueError(f"override data.fold={overrides['data.fold']} clashes with --folds; "
                         f"use --folds {overrides['data.fold']}")
    return folds or [0], overrides


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import fit_fold

    folds, overrides = folds_and_overrides(args)
    for fold in folds:
        cfg = load_config(args.config, **{**overrides, "data.fold": fold})
        print(json.dumps(fit_fold(cfg), indent=2, default=str))


def _cmd_segment(args: argparse.Namespace) -> None:
    from .stage1.runner import segment_studies

    result = segment_studies(args.data_root, args.runs, args.out, split=args.split, time_budget=args.time_budget)
    print(json.dumps(result, indent=2, default=str))
    _say_left(result)


def _cmd_crops(args: argparse.Namespace) -> None:
    from .config import load_config
    from .stage2.crop_cache import build_crops

    cfg = load_config(args.config, **_parse_overrides([*args.overrides, *args.smoke_overrides]))
    result = build_crops(cfg, split=args.split, time_budget=args.time_budget)
    print(json.dumps(_few_failures(result), indent=2, default=str))
    _say_left(result)
    if result["failed"]:
        print(f"{result['failed']} studies failed; see {Path(cfg.data.crop_dir) / 'failures.csv'}", file=sys.stderr)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from .tools.pretrain import pretrain

    chosen = {"n_train": args.n_train, "seed": args.seed, "grid": args.grid, "n_folds": args.n_folds,
              "fold": args.fold, "epochs": args.epochs, "config": args.config, "name": args.name,
              "export_dir": args.export_dir}
    meta = pretrain(args.out, **{k: v for k, v in chosen.items() if v is not None}, progress=True,
                    overrides=_parse_overrides([*args.overrides, *args.smoke_overrides]))
    held = meta["held_out"]

    def fig(d: dict, key: str) -> str:
        return "n/a" if d.get(key) is None else f"{d[key]:.3f}"

    print(f"{meta['name']}: {meta['bytes'] / 1e6:.1f} MB, sha256 {meta['sha256'][:12]}; held-out fold of "
          f"{held['studies']} studies: patient AUC {fig(held['patient_auc'], 'auc')}, vertebra AUC within level "
          f"{fig(held['vertebra_auc_within_level'], 'auc')}, score {fig(held['score'], 'mean')} vs best constant "
          f"{fig(held['best_constant'], 'mean')}")
    print(f"written to {meta['path']} (and its .json provenance)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .tools.demo import run_demo

    run_demo(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed, seg_folds=args.seg_folds or None,
             cls_folds=args.cls_folds or None)


def _cmd_submit(args: argparse.Namespace) -> None:
    from .runs import InferenceOptions
    from .submit.predictor import submit

    options = InferenceOptions(mean=args.mean, weights=args.weights or None, tta_flip=args.tta_flip)
    submit(args.data_root, args.runs, args.out, options=options, time_budget=args.time_budget, devices=args.devices,
           prefetch=not args.no_prefetch, threads=args.threads)


def _cmd_export(args: argparse.Namespace) -> None:
    from .submit.export import export_runs

    manifest = export_runs(args.runs, args.out)
    for name, run in manifest["runs"].items():
        print(f"{name}: task {run['task']}, folds {run['folds']} <- {run['source']}")
    print(f"{len(manifest['files'])} files with SHA-256 in {Path(args.out) / 'manifest.json'}")


def _cmd_explain(args: argparse.Namespace) -> None:
    from .evaluate.explain import write_explanations

    written = write_explanations(args.run, args.uid, args.out, crop_dir=args.crop_dir, vertebrae=args.vertebra,
                                 fold=args.fold, device=args.device)
    for w in written:
        label = "" if w["label"] is None else f" (true {w['label']})"
        fold = f"fold {w['fold']}" + (", held out" if w["held_out"] else "")
        print(f"{args.uid} {w['vertebra']}: p={w['prob']:.3f}{label}, {fold}, attention peak on sampled slice "
              f"{w['peak']} (series slice {w['peak_slice']}) -> {w['png']}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `kit` command."""
    parser = argparse.ArgumentParser(prog="kit", description="RSNA 2022 cervical spine fracture kit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write an RSNA-format synthetic dataset")
    p.add_argument("--out", required=True, help="output folder (RSNA layout)")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-test", type=int, default=3)
    p.add_argument("--size", type=int, default=128, help="in-plane pixels (512 = real scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seg-share", type=float, default=0.5, help="share of train studies with a segmentation")
    p.add_argument("--n-slices", type=int, default=None,
                   help="slices of every study (default: drawn, 0.5-1.0 mm apart, ~190-400 slices)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--answers", default=None,
                   help="folder for the answers (test labels, every fracture and look-alike); default OUT_answers, "
                        "beside the data, never inside it")
    p.add_argument("--difficulty", default="realistic", choices=["easy", "realistic"],
                   help="realistic: graded fractures (hairline, cleft, displaced, compression) and look-alikes; "
                        "easy: clefts only, no look-alikes")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="cache studies as resampled, windowed uint8 arrays")
    p.add_argument("--data-root", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--window", default="bone")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--segmented-only", action="store_true",
                   help="only the studies with a segmentation: all that stage 1 trains on (87 of the 2,019)")
    _add_time_budget(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train folds of a config: kit train --config demo_seg --folds 0 1 key=value",
                       description="Train folds of a config. Overrides (key=value) may come before, between or "
                                   "after the options: kit train --config demo_seg --folds 0 1 2 train.epochs=3")
    p.add_argument("--config", required=True, help="packaged config name or YAML path")
    p.add_argument("--folds", type=_fold_or_override, nargs="+", action="extend", default=None, metavar="K",
                   help="folds to train (default 0); key=value values among them are overrides")
    p.add_argument("overrides", type=_override, nargs="*", help="dotted overrides, e.g. train.epochs=3")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("segment", help="segment every study of a split with trained segmenter runs")
    p.add_argument("--data-root", required=True)
    p.add_argument("--runs", nargs="+", required=True,
                   help="run folders (runs/<config name>): segmenter runs, plus level-model runs to fuse in")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    _add_time_budget(p)
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("crops", help="cache the classifier's vertebra crops: kit crops --config <cls config> key=value",
                       description="Cut every study's seven vertebra slice stacks from the original DICOM grid into "
                                   "<data.crop_dir>/<uid>.npz (resumable), with vertebrae from the ground truth or "
                                   "the stage-1 runs of data.seg_runs (out-of-fold for the studies they trained on).")
    p.add_argument("--config", required=True, help="classifier config (task: cls), packaged name or YAML path")
    p.add_argument("--split", default="train", choices=["train", "test"])
    _add_time_budget(p)
    p.add_argument("overrides", type=_override, nargs="*", help="dotted overrides, e.g. data.image_size=128")
    p.set_defaults(func=_cmd_crops, smoke_overrides=[])

    from .constants import VERTEBRAE  # a plain tuple: --help stays fast

    p = sub.add_parser("explain", help="attention and Grad-CAM saliency of a classifier run on one study (PNG)",
                       description="Per vertebra, the sampled slices of its cached crops with the classifier's "
                                   "attention weight and slice logit, a Grad-CAM saliency of the CNN and the true "
                                   "fracture boxes (kit.evaluate.explain); one PNG per vertebra.")
    p.add_argument("run", metavar="RUN", help="classifier run folder, e.g. runs/demo_cls")
    p.add_argument("--uid", required=True, help="StudyInstanceUID of a study in the crop cache")
    p.add_argument("--vertebra", nargs="+", default=None, choices=VERTEBRAE,
                   help="vertebrae to explain (default: the most likely fractured one)")
    p.add_argument("--out", default=None, help="folder for <uid>_<vertebra>.png (default RUN/explain)")
    p.add_argument("--fold", type=int, default=None, help="fold to use (default: the one that held the study out)")
    p.add_argument("--crop-dir", default=None, help="crop cache (default: the run's data.crop_dir)")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda:0")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("report", help="report of trained runs (markdown + PNG + JSON): segmenter, level model "
                                      "or classifier, chosen by each run's config")
    p.add_argument("run_dirs", nargs="+", help="run folders, e.g. runs/demo_seg")
    p.add_argument("--out", default=None, help="output folder (default: each run's own folder)")
    p.add_argument("--worst", type=int, default=5, help="worst studies listed (with a picture for a segmenter)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("calibrate", help="fit a classifier run's calibration on its OOF predictions "
                                         "(<run>/calibration.json, applied by kit submit and predict_study)")
    p.add_argument("run_dirs", nargs="+", help="classifier run folders, e.g. runs/demo_cls")
    p.add_argument("--ridge", type=float, default=1.0, help="pull of each slope towards 0 (the prevalence)")
    p.add_argument("--only-if-better", action="store_true",
                   help="write the calibration only when its cross-fitted OOF score beats the uncalibrated one")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("bench", help="benchmarks: read (DICOM decoding), seg (segment_study), crops (crop building "
                                     "and loading vs classifier training), submit (seconds per study by stage, "
                                     "prefetch, peak RSS, FLOPs) or train (a training step, PyTorch's depthwise "
                                     "convolutions vs kit's)")
    p.add_argument("what", choices=["read", "seg", "crops", "submit", "train", "learn"])
    p.add_argument("--series-dir", default=None, help="read: an existing series (default: a synthetic one)")
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--configs", nargs="+", default=None,
                   help="seg: segmenter configs; crops: classifier configs; train: any configs; "
                        "submit: stage 1 + stage 2 configs (defaults: kit.tools.bench*'s)")
    p.add_argument("--slice-counts", type=int, nargs="+", default=None, help="seg, submit: study lengths to time")
    p.add_argument("--studies", type=int, default=None, help="crops: synthetic studies (default 3)")
    p.add_argument("--memory-configs", nargs="+", default=None,
                   help="submit: configs of the 600-slice memory run (default: the full-scale ones; none: skip it)")
    p.add_argument("--model-seconds", nargs="?", const="auto", default=None, metavar="S",
                   help="submit: the read-ahead against its limit instead, with a stand-in model holding each study "
                        "S seconds (no value or auto: the measured read time of the study), prefetch off / on / 2 "
                        "devices; the study is --slices x --size px (e.g. --slices 250 --size 512), --studies per "
                        "configuration (default 6)")
    p.add_argument("--quick", action="store_true", help="crops, submit, learn: a smoke-size run (seconds)")
    p.add_argument("--steps", type=int, default=None, help="train: timed steps per build and round (default 4)")
    p.add_argument("--rounds", type=int, default=None, help="train: rounds in which the builds take turns (3)")
    p.add_argument("--out", default=None, help="learn: output folder (default bench_learn/)")
    p.add_argument("--settings", nargs="+", default=None,
                   help="learn: names of kit.tools.bench_learn.SETTINGS (default: base grid256_crop128 lite0_128 "
                        "lite0_128_long)")
    p.add_argument("--n-train", type=int, default=None, help="learn: studies of each synthetic set (default 96)")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="learn: folds trained and scored (0 1)")
    p.add_argument("--n-folds", type=int, default=None, help="learn: folds of the split (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="learn: epochs (default 3; a setting may scale them)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="the whole pipeline on a synthetic dataset")
    p.add_argument("--out", default="demo")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--seg-folds", type=int, default=1, help="stage-1 folds to train and score (0: all)")
    p.add_argument("--cls-folds", type=int, default=0, help="classifier folds to train (0: all)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="make the classifier's starting checkpoint (kit:<name>) that the demo "
                                        "fine-tunes from: a large synthetic set of its own seed, crops, training, "
                                        "held-out figures, half-precision export with provenance")
    p.add_argument("--out", default="runs/cls_start", help="working folder, reused and resumed")
    p.add_argument("--n-train", type=int, default=None, help="studies of the set (default 480)")
    p.add_argument("--seed", type=int, default=None, help="the set's seed (default 1000; 0-99 are the demo's)")
    p.add_argument("--grid", type=int, default=None, help="the set's pixel grid (default 256)")
    p.add_argument("--n-folds", type=int, default=None, help="folds of the split (default 10)")
    p.add_argument("--fold", type=int, default=None, help="the held-out fold, scored (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    p.add_argument("--config", default=None, help="training config (default start_cls)")
    p.add_argument("--name", default=None, help="checkpoint name (default cls_lite0_128)")
    p.add_argument("--export-dir", default=None, help="where <name>.pt/.json go (default kit/models/weights)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. to train on from a shipped "
                                                 "checkpoint: model.pretrained_weights=kit:cls_lite0_128)")
    p.set_defaults(func=_cmd_pretrain, smoke_overrides=[])

    p = sub.add_parser("submit", help="predict the test studies with trained runs and write submission.csv",
                       description="Predict every test study (kit.io.rsna.studies_to_predict) with segmenter, level "
                                   "and classifier runs and write a complete, validated submission.csv plus "
                                   "its log; failures get fallbacks, never a missing row.")
    p.add_argument("--data-root", required=True, help="competition folder (test_images/, test.csv, "
                                                      "sample_submission.csv)")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="runs/<config name> (all folds), runs/<config name>/fold<k>, or an export's folders "
                        "(export/*); each run's stage comes from its config")
    p.add_argument("--out", default="submissions/submission.csv", help="the submission CSV (log beside it)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="a deadline, model loading included: studies that would end past it, and one still being read "
                        "or predicted when it comes, get fallbacks; the file is written on time")
    p.add_argument("--devices", nargs="+", default=None,
                   help="one worker per device, e.g. cuda:0 cuda:1 (default: every GPU, else cpu)")
    p.add_argument("--mean", default="prob", choices=["prob", "logit"], help="how the classifier ensemble averages")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per classifier run, in the order given")
    p.add_argument("--tta-flip", action="store_true",
                   help="left-right flip TTA for every classifier (runs with data.tta_flip have it on already)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="read each study in this process, not ahead (a native decoder that crashes on a corrupt "
                        "file then ends the run; with prefetch that study gets fallbacks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("export", help="gather runs' configs and best weights with checksums, for a Kaggle dataset")
    p.add_argument("runs", nargs="+", metavar="RUN", help="runs/<config name> or runs/<config name>/fold<k>")
    p.add_argument("--out", required=True, help="the export folder (manifest.json + <run>/fold<k>/)")
    p.set_defaults(func=_cmd_export)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a `kit` command line.

    As `build_parser().parse_args`, except that `kit train` takes its key=value overrides anywhere (argparse
    alone accepts one run of positionals: `kit train a=1 --config X b=2` would leave `b=2` unrecognised),
    and its folds and overrides are checked here, so a bad one is a usage error (exit 2) before any import.
    After it, `args.folds` holds ints only and `args.overrides` the key=value strings.
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "train":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args
    strays = [r for r in rest if r.startswith("-") or "=" not in r]
    if strays:
        parser.error(f"kit train: unrecognized arguments: {' '.join(strays)}")
    try:
        args.overrides = [*args.overrides, *(_override(r) for r in rest)]
        folds, _ = folds_and_overrides(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"kit train: {exc}")
    args.overrides = [t for t in args.folds or [] if isinstance(t, str)] + args.overrides
    args.folds = folds
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kit` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if smoke_mode():
        print(apply_smoke(args), flush=True)
    args.func(args)


if __name__ == "__main__":
    main()
