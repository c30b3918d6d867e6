"""The `kit` console script: thin argument parsing over kit functions (imports stay lazy for a fast --help)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _cmd_synth(args: argparse.Namespace) -> None:
    from .synthetic import make_dataset

    summary = make_dataset(args.out, n_train=args.n_train, n_test=args.n_test, size=args.size, seed=args.seed,
                           seg_share=args.seg_share, workers=args.workers)
    print(json.dumps(summary, indent=2, default=str))


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .cache import prepare_studies

    result = prepare_studies(args.data_root, args.cache_dir, split=args.split, size=args.size,
                             window_name=args.window, workers=args.workers)
    print(json.dumps(result, indent=2))
    if result["failed"]:
        print(f"{result['failed']} studies failed; see {Path(args.cache_dir) / 'failures.csv'}", file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> None:
    from .report import run_report, summary_table

    print(summary_table(run_report(args.run_dirs, args.out, n_worst=args.worst)))


def _cmd_bench(args: argparse.Namespace) -> None:
    from . import bench

    if args.what == "read":
        bench.bench_read(args.series_dir, n_slices=args.slices, size=args.size, workers=args.workers)
    else:
        bench.bench_seg()


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"override {item!r} is not key=value (e.g. train.epochs=3)")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def _cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import fit_fold

    overrides = _parse_overrides(args.overrides)
    for fold in args.folds:
        cfg = load_config(args.config, **{**overrides, "data.fold": fold})
        print(json.dumps(fit_fold(cfg), indent=2, default=str))


def _cmd_segment(args: argparse.Namespace) -> None:
    from .runner import segment_studies

    result = segment_studies(args.data_root, args.runs, args.out, split=args.split)
    print(json.dumps(result, indent=2, default=str))


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, n_train=args.n_train, seed=args.seed, seg_folds=args.seg_folds or None)


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
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="cache studies as resampled, windowed uint8 arrays")
    p.add_argument("--data-root", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--window", default="bone")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train folds of a config: kit train --config demo_seg --folds 0 1 key=value")
    p.add_argument("--config", required=True, help="packaged config name or YAML path")
    p.add_argument("--folds", type=int, nargs="+", default=[0])
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("segment", help="segment every study of a split with trained segmenter runs")
    p.add_argument("--data-root", required=True)
    p.add_argument("--runs", nargs="+", required=True,
                   help="run folders (runs/<config name>): segmenter runs, plus level-model runs to fuse in")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("report", help="report of trained runs (markdown + PNG + JSON): segmenter, level model "
                                      "or classifier, chosen by each run's config")
    p.add_argument("run_dirs", nargs="+", help="run folders, e.g. runs/demo_seg")
    p.add_argument("--out", default=None, help="output folder (default: each run's own folder)")
    p.add_argument("--worst", type=int, default=5, help="worst studies listed (with a picture for a segmenter)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("bench", help="benchmarks: read (DICOM decoding) or seg (segment_study)")
    p.add_argument("what", choices=["read", "seg"])
    p.add_argument("--series-dir", default=None, help="read: an existing series (default: a synthetic one)")
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="the whole pipeline on a synthetic dataset")
    p.add_argument("--out", default="demo")
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seg-folds", type=int, default=1, help="segmenter folds to train and score (0: all)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kit` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
