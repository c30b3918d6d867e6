"""kit bench crops / kit bench submit (and its --model-seconds read-ahead run) in their quick (smoke) sizes, the
benchmarks' study writer, FLOP counting."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
import torch

from kit.tools.bench_crops import bench_crops
from kit.tools.bench_submit import (FULL_SCALE_CONFIGS, T4_PEAK, bench_submit, count_flops, t4_projection,
                                    write_bench_study)
from kit.tools.bench_read_ahead import (HOLD_VALUE, HoldPredictor, _overlap_share, _steady_s_per_study,
                                        bench_read_ahead)
from kit.cli import apply_smoke, parse_args
from kit.io.dicom import read_series, resize_slices, scan_series
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


def test_bench_read_ahead_quick():
    result = bench_read_ahead(quick=True)
    hold, shape = result["model_seconds"], (16, 64, 64)
    assert hold == 0.2 and result["model_seconds_from"] == "given" and result["studies"] == 6
    assert (result["study"]["slices"], result["study"]["rows"], result["study"]["cols"]) == shape
    alone = result["read_alone"]
    assert positive(alone["read_s"]) and positive(alone["first_read_s"]) and alone["shapes"] == [shape]
    assert result["limit_s"] == pytest.approx(max(alone["read_s"], hold), abs=2e-3)
    for key, workers, studies in (("prefetch_off", 1, 6), ("prefetch_on", 1, 6), ("two_devices", 2, 12)):
        r = result[key]
        figures = ("wall_s", "s_per_study", "steady_s_per_study", "read_s", "reference_s", "ratio", "ratio_total")
        assert all(positive(r[k]) for k in figures), (key, r)
        assert r["ratio"] == pytest.approx(r["steady_s_per_study"] / r["reference_s"], rel=0.02, abs=2e-3)
        # the stand-in held every study as a volume and gave its 8 values; the submission has every row
        assert (r["studies"], r["predicted"], r["fallback_studies"]) == (studies, studies, 0), (key, r)
        assert r["probabilities_per_study"] == 8 and r["rows"] == 8 * studies and r["values_from_stand_in"]
        assert r["hold_shapes"] == [shape] and r["workers"] == workers and r["readers"] == workers
        assert r["steady_s_per_study"] >= hold / workers * 0.98  # a study is held S seconds by one of the workers
    off, on, two = result["prefetch_off"], result["prefetch_on"], result["two_devices"]
    assert off["devices"] == ["cpu"] and two["devices"] == ["cpu", "cpu"] and not off["prefetch"] and on["prefetch"]
    assert off["steady_s_per_study"] >= hold and off["s_per_study"] >= hold  # read, then held: no overlap
    assert off["reference_s"] == pytest.approx(alone["read_s"] + hold, abs=2e-3)
    assert on["reference_s"] == pytest.approx(result["limit_s"], abs=1e-3)
    assert two["reference_s"] == pytest.approx(result["limit_s"] / 2, abs=1e-3)
    assert result["prefetch_on_ratio"] == on["ratio"] and result["target_met"] == (on["ratio"] <= result["target"])
    assert positive(result["read_slowdown_two_devices"]) and 0 <= two["reads_overlap"] <= 1
    assert result["two_readers_full_speed"] == (result["read_slowdown_two_devices"] <= result["target"])
    assert result["usable_cores"] >= 1 and result["cpu_count"] >= result["usable_cores"]
    # torch is loaded in this process, so its in-line reads (prefetch off) may not fork decoding processes
    assert result["inline_reads_fork"] is False and off["reads_may_fork"] is False


def test_read_ahead_figures_and_stand_in(tmp_path):
    # steady state: per process, first to last study's end over the studies between; processes add their rates
    holds = [{"pid": 1, "end": e} for e in (1.0, 2.0, 3.0)] + [{"pid": 2, "end": e} for e in (1.5, 3.5)]
    assert _steady_s_per_study(holds) == pytest.approx(1 / (1 / 1.0 + 1 / 2.0))
    with pytest.raises(RuntimeError, match="two studies"):
        _steady_s_per_study([{"pid": 1, "end": 1.0}, {"pid": 2, "end": 2.0}])
    reads = [{"pid": 1, "start": 0.0, "end": 2.0}, {"pid": 2, "start": 1.0, "end": 3.0},
             {"pid": 1, "start": 5.0, "end": 6.0}]
    assert _overlap_share(reads) == pytest.approx(2 / 5)  # 1 s of pid 1's read and 1 s of pid 2's, of 5 s
    stand_in = HoldPredictor(0.01, str(tmp_path))
    probs = stand_in("1.2.3", type("Study", (), {"hu": np.zeros((4, 8, 8), np.int16)})())
    assert probs.shape == (8,) and np.all(probs == HOLD_VALUE)
    record = (tmp_path / "hold-1.2.3.json").read_text()
    assert '"shape": [4, 8, 8]' in record
    for bad in ("soon", 0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="model_seconds"):
            bench_read_ahead(bad)
    with pytest.raises(ValueError, match="studies must be >= 2"):
        bench_read_ahead(0.1, studies=1)


def test_cli_bench_submit_model_seconds():
    args = parse_args(["bench", "submit"])
    assert args.model_seconds is None  # the stage benchmark, unchanged
    args = parse_args(["bench", "submit", "--model-seconds"])
    assert args.model_seconds == "auto"
    args = parse_args(["bench", "submit", "--model-seconds", "1.5", "--size", "128", "--slices", "60",
                       "--studies", "5"])
    assert (args.model_seconds, args.size, args.slices, args.studies) == ("1.5", 128, 60, 5)
