"""kit bench crops / kit bench submit in their quick (smoke) sizes, the benchmarks' study writer, FLOP counting."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
import torch

from kit.bench_crops import bench_crops
from kit.bench_submit import FULL_SCALE_CONFIGS, T4_PEAK, bench_submit, count_flops, t4_projection, write_bench_study
from kit.cli import apply_smoke, parse_args
from kit.dicom import read_series, resize_slices, scan_series
from kit.synthetic import make_study

torch.set_num_threads(1)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_crops_quick():
    result = bench_crops(quick=True)
    (row,) = result["rows"]
    assert row["config"] == "demo_cls" and row["stack"] == [4, 6, 32, 32]  # T x C x S x S of the quick crops
    assert result["studies"] == 2 and result["study_shape"] == [48, 64, 64]
    rates = ("build_studies_per_s", "load_crops_stacks_per_s", "dataset_files_stacks_per_s",
             "dataset_memory_stacks_per_s", "train_stacks_per_s")
    assert all(positive(row[k]) for k in (*rates, "build_s_per_study", "files_vs_train", "memory_vs_train")), row
    # the ratios are loading over training, as printed
    assert row["files_vs_train"] == pytest.approx(row["dataset_files_stacks_per_s"] / row["train_stacks_per_s"],
                                                  rel=0.02)
    assert row["memory_vs_train"] == pytest.approx(row["dataset_memory_stacks_per_s"] / row["train_stacks_per_s"],
                                                   rel=0.02)


def test_bench_submit_quick():
    result = bench_submit(quick=True)
    assert result["studies"] == 2 and result["isolated"] is False
    stages = ("read_s", "stage1_s", "crop_s", "classify_s", "predict_s", "wall_s_per_study", "steady_s_per_study",
              "wall_s", "load_s", "peak_rss_mb")
    for mode in ("sequential", "prefetch"):
        figures = result[mode]
        assert all(positive(figures[k]) for k in stages), (mode, figures)
        assert figures["notes"] == 0  # no study fell back
    assert result["sequential"]["reader_peak_rss_mb"] is None  # read in line: no reader process
    # the spawned reader is numpy-only: its sampled peak stays below the torch process's
    assert 0 < result["prefetch"]["reader_peak_rss_mb"] < result["prefetch"]["peak_rss_mb"]
    assert positive(result["prefetch"]["total_peak_rss_mb"]) and positive(result["memory"]["total_peak_rss_mb"])
    assert positive(result["prefetch_speedup"]) and positive(result["prefetch_speedup_wall"])
    assert [r["slices"] for r in result["by_slices"]] == [16, 32]
    for r in result["by_slices"]:
        assert r["total_s"] == pytest.approx(r["read_s"] + r["stage1_s"] + r["crop_s"] + r["classify_s"], abs=2e-3)
    memory = result["memory"]
    assert memory["study"]["slices"] == 32 and memory["study"]["rows"] == 64
    assert memory["found"] == 7 and positive(memory["peak_rss_mb"]) and positive(memory["stage1_s"])
    assert memory["forward_s"] + memory["cleanup_s"] <= memory["stage1_s"] + 0.02  # parts of stage 1
    assert set(result["gflops"]) == {"demo_seg", "demo_level", "demo_cls"}
    assert all(positive(v) for v in result["gflops"].values())
    total = sum(result["gflops"].values()) * 1e9
    fp16_at_25, fp16_at_40 = result["t4_seconds"]["fp16 tensor"]
    assert fp16_at_25 == pytest.approx(total / (T4_PEAK["fp16 tensor"] * 0.25), rel=0.02, abs=1e-4)
    assert fp16_at_40 < fp16_at_25
    # the segmenter runs on every slice, the classifier on seven stacks whatever the length (quick: 32 slices)
    half = count_flops(("demo_seg", "demo_cls"), n_slices=16)
    assert half["demo_seg"] == pytest.approx(result["gflops"]["demo_seg"] / 2, rel=0.01)
    assert half["demo_cls"] == pytest.approx(result["gflops"]["demo_cls"], rel=0.01)


def test_bench_study_writer_round_trips_jpeg_lossless(tmp_path):
    info = write_bench_study(tmp_path, "study", 3, size=64, n_slices=12, grid=32)
    study = make_study(3, size=64, n_slices=12)
    folder = tmp_path / "test_images" / "study"
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for f in folder.iterdir()}
    assert syntaxes == {"1.2.840.10008.1.2.4.70"}  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)
    assert scan_series(folder)["transfer_syntax"].startswith("JPEG Lossless, Non-Hierarchical, First-Order")
    series = read_series(folder)
    assert series.hu.shape == (12, 64, 64) and (info["slices"], info["rows"], info["cols"]) == (12, 64, 64)
    np.testing.assert_array_equal(series.hu, study.hu.astype(series.hu.dtype))  # written feet first, read head first
    truth = np.load(tmp_path / "truth" / "study.npy")
    labels = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)
    np.testing.assert_array_equal(truth, resize_slices(labels, 32, nearest=True))
    assert set(np.unique(truth)) <= set(range(8)) and truth.max() > 0


def test_t4_projection():
    seconds = t4_projection(65_000.0, utilisation=(0.5, 0.25))  # GFLOPs
    assert seconds["fp16 tensor"] == pytest.approx((2.0, 4.0))
    assert seconds["fp32"] == pytest.approx((65e12 / 8.1e12 * 2.0, 65e12 / 8.1e12 * 4.0))
    assert [c.split("_")[0] for c in FULL_SCALE_CONFIGS] == ["seg", "level", "cls"]


def test_cli_bench_crops_and_submit(monkeypatch):
    args = parse_args(["bench", "submit", "--memory-configs", "none", "--slice-counts", "50", "100"])
    assert (args.what, args.memory_configs, args.slice_counts, args.quick) == ("submit", ["none"], [50, 100], False)
    monkeypatch.setenv("KIT_SMOKE", "1")
    for what in ("crops", "submit"):
        args = parse_args(["bench", what])
        apply_smoke(args)
        assert args.quick is True
