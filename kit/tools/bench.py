"""Benchmarks behind `kit bench`: DICOM reading (`bench_read`) and segmentation (`bench_seg`); stage-2 crops
(`kit.tools.bench_crops.bench_crops`) and the submission loop (`kit.tools.bench_submit.bench_submit`) have modules of their own.

Figures measured with them are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _rates(readers: dict, n: int, repeats: int) -> tuple[dict[str, float], dict]:
    """Best slices/s of each reader over `repeats` rounds, the readers taking turns within a round so
    that a busy spell on a shared machine does not fall on one reader only. Returns (rates, last results)."""
    rates, results = dict.fromkeys(readers, 0.0), {}
    for _ in range(max(1, repeats)):
        for name, fn in readers.items():
            start = time.perf_counter()
            result = fn()
            if name in ("pydicom", "kit"):  # the two compared at the end; drop the others' volumes
                results[name] = result
            del result
            rates[name] = max(rates[name], n / (time.perf_counter() - start))
    return rates, results


def _pydicom_loop(files: list[Path]) -> np.ndarray:
    """The plain baseline of public notebooks: one file at a time, pixel_array * slope + intercept, sorted.

    A second reader on purpose: it is what kit.io.dicom is measured against, never used by the kit.
    """
    import pydicom

    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda item: -item[0])  # superior first, like kit.io.dicom for axial series
    return np.stack([hu for _, hu in slices])


def _dicomsdl_loop(files: list[Path]) -> None:
    import dicomsdl

    for f in files:
        dicomsdl.open(str(f)).pixelData(storedvalue=True)


def bench_read(series_dir: str | os.PathLike | None = None, *, n_slices: int = 200, size: int = 512,
               workers: int | None = None, repeats: int = 1) -> dict:
    """Compare `kit.io.dicom.read_series` with a plain pydicom loop on the same series, in one run.

    Args:
        series_dir: a folder of DICOM slices; default: a synthetic JPEG Lossless (.70) series of
            `n_slices` slices of `size` x `size` written to a temporary folder with kit.synthetic.
        n_slices, size: the synthetic series' shape (ignored with `series_dir`).
        workers: kit's parallel workers (default: read_series' own choice).
        repeats: rounds; each reader's best round counts (the readers take turns within a round).

    Returns:
        slices/s of every reader ("pydicom", "dicomsdl_1thread", "kit_serial", "kit_threads",
        "kit_processes", "kit"), "ratio" = kit / pydicom, the series shape, syntax and worker count.

    Raises:
        AssertionError: kit and the pydicom loop disagree on the HU.
    """
    from ..io.dicom import dicomsdl, read_series, scan_series

    with tempfile.TemporaryDirectory(prefix="kit-bench-") as tmp:
        if series_dir is None:
            from ..synthetic import make_study, write_study

            print(f"writing a synthetic {n_slices} x {size} x {size} JPEG Lossless series ...", flush=True)
            series_dir = Path(tmp) / "study"
            study = make_study(0, size=size, n_slices=n_slices)
            write_study(study, series_dir, transfer_syntax="jpeg-lossless", head_first=False, modality=False)
        files = sorted(p for p in Path(series_dir).iterdir() if p.is_file())
        for f in files:  # every reader starts from the page cache, none pays for the disk
            f.read_bytes()
        info = scan_series(series_dir)
        n = info["slices"]
        n_workers = workers or max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
        readers = {"pydicom": lambda: _pydicom_loop(files)}
        if dicomsdl is not None:
            readers["dicomsdl_1thread"] = lambda: _dicomsdl_loop(files)
        readers["kit_serial"] = lambda: read_series(series_dir, workers=1)
        readers["kit_threads"] = lambda: read_series(series_dir, workers=n_workers, executor="thread")
        readers["kit_processes"] = lambda: read_series(series_dir, workers=n_workers, executor="process")
        readers["kit"] = lambda: read_series(series_dir, workers=workers)
        rates, results = _rates(readers, n, repeats)
        baseline, series = results["pydicom"], results["kit"]
    assert np.array_equal(series.hu, baseline), "kit.io.dicom and the pydicom loop read different HU"
    ratio = rates["kit"] / rates["pydicom"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"kit bench read: {n} slices {info['rows']}x{info['cols']}, {info['transfer_syntax']}, {cores} usable cores")
    labels = {"pydicom": "pydicom loop (dcmread + pixel_array)", "dicomsdl_1thread": "dicomsdl loop, 1 thread",
              "kit_serial": "kit read_series, workers=1", "kit_threads": f"kit read_series, {n_workers} threads",
              "kit_processes": f"kit read_series, {n_workers} processes",
              "kit": f"kit read_series, default (workers={workers or 'auto'})"}
    for key, rate in rates.items():
        print(f"  {labels[key]:<44} {rate:8.1f} slices/s  {rate / rates['pydicom']:5.2f}x")
    print(f"kit / pydicom = {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); HU identical")
    return {**{k: round(v, 1) for k, v in rates.items()}, "ratio": round(ratio, 2), "slices": n,
            "rows": info["rows"], "cols": info["cols"], "transfer_syntax": info["transfer_syntax"],
            "workers": n_workers, "cores": cores}


def bench_seg(config_names: tuple[str, ...] = ("demo_seg", "seg_unet_effb3_384"),
              slice_counts: tuple[int, ...] = (64, 128, 256), device: str | None = None, *,
              batch_size: int | None = None, repeats: int = 1, seed: int = 0,
              level_config: str = "demo_level") -> dict:
    """Slices/s of `kit.stage1.infer.segment_study` per segmenter config, and how it scales with slice count.

    Each config's model is built by `create_model` with its kwargs from the config (as `kit.train` records
    them; channels-last when `train.channels_last`, as `load_run` does) and randomly initialised weights: the
    figures measure speed only, not segmentation quality. The input is a synthetic study
    (`kit.synthetic.make_study`) in the bone window at the config's image size, cut to each slice count. One
    warm-up call per config runs first; each figure is the best of `repeats` rounds in which the sizes take
    turns. A level-conditioned segmenter (`data.level_input`) runs with a randomly initialised level model of
    `level_config`, whose time is part of `segment_study`'s.

    Args:
        config_names: packaged segmenter configs (or YAML paths).
        slice_counts: study lengths to time (>= 3 sizes show the scaling).
        device: "cuda", "cpu", ... (default: CUDA when available).
        batch_size: slices per forward pass (default: the config's `train.val_batch_size`).
        repeats: timing rounds; the fastest call per size is kept.
        seed: weights and synthetic study seed.
        level_config: level model config for level-conditioned segmenters.

    Returns:
        {"device", "threads", "load_average", "weights", "rows": [one dict per config and slice count:
        config, image_size, encoder, slices, seconds, forward_s, cleanup_s, slices_per_s, time_ratio,
        slices_ratio]}; the table is also printed.
    """
    import torch

    from ..config import load_config
    from ..constants import WINDOWS
    from ..io.dicom import window
    from ..stage1.infer import segment_study
    from ..runs import LoadedModel
    from ..models import create_model
    from ..synthetic import make_study

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    counts = sorted(int(n) for n in slice_counts)
    rows = []

    def random_model(config_name: str):  # as `load_run` would give it, with random weights
        cfg = load_config(config_name)
        model_name, kwargs = cfg.model_spec()
        model = create_model(model_name, **kwargs).eval().to(device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        return cfg, kwargs, LoadedModel(model=model, config=cfg, fold=0, model_name=model_name,
                                        path=Path(f"<random init: {config_name}>"))

    for name in config_names:
        torch.manual_seed(seed)
        cfg, kwargs, loaded = random_model(name)
        size, model_name = cfg.data.image_size, loaded.model_name
        models = [loaded]
        if cfg.data.level_input:
            models.append(random_model(level_config)[2])
        bs = batch_size or cfg.train.val_batch_size
        study = make_study(seed, size=size, n_slices=counts[-1])
        image = window(study.hu, *WINDOWS["bone"])
        print(f"{name}: {model_name} {kwargs['encoder']} at {size} px, {kwargs['in_channels']} channels in"
              f"{' (the last 7: level planes, with ' + level_config + ')' if cfg.data.level_input else ''}, "
              f"batch {bs}, {device} ...", flush=True)
        def source(n: int) -> dict:  # cached-array form: the recipe needs dz
            return {"image": image[:n], "spacing": np.asarray(study.spacing, dtype=np.float32)}

        segment_study(source(min(bs, counts[0])), models, batch_size=bs, device=device)  # warm-up
        best: dict[int, dict] = {}
        for _ in range(max(1, repeats)):  # sizes take turns in each round, so a busy spell hits all of them
            for n in counts:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timing = segment_study(source(n), models, batch_size=bs, device=device).timing
                if n not in best or timing["total_s"] < best[n]["total_s"]:
                    best[n] = timing
        for n in counts:
            t = best[n]
            rows.append({"config": name, "image_size": size, "encoder": kwargs["encoder"], "slices": n,
                         "seconds": round(t["total_s"], 3), "forward_s": round(t["forward_s"], 3),
                         "cleanup_s": round(t["cleanup_s"], 3), "slices_per_s": round(n / t["total_s"], 2),
                         "slices_ratio": round(n / counts[0], 2),
                         "time_ratio": round(t["total_s"] / best[counts[0]]["total_s"], 2)})
        del loaded, models
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nkit bench seg: segment_study on {device} ({threads} torch threads, load average {load:.1f}), "
          "randomly initialised weights (speed only), synthetic study, bone window")
    header = f"{'config':<22} {'px':>4} {'slices':>6} {'total s':>8} {'forward s':>9} {'clean-up s':>10} " \
             f"{'slices/s':>9} {'x slices':>8} {'x time':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<22} {r['image_size']:>4} {r['slices']:>6} {r['seconds']:>8.2f} {r['forward_s']:>9.2f} "
              f"{r['cleanup_s']:>10.2f} {r['slices_per_s']:>9.1f} {r['slices_ratio']:>8.2f} {r['time_ratio']:>7.2f}")
    print("x time / x slices near 1: time grows linearly with the number of slices.")
    return {"device": str(device), "threads": threads, "load_average": round(load, 2),
            "weights": "random init (speed only)", "rows": rows}


def _training_batch(cfg):
    """A random training batch shaped as `cfg`'s trainer feeds its model: (model inputs, their sizes in words)."""
    import torch

    d, bs = cfg.data, cfg.train.batch_size
    _, kwargs = cfg.model_spec()
    c = kwargs["in_channels"]
    if cfg.task == "seg":
        size = d.augment.crop or d.image_size
        return (torch.randn(bs, c, size, size),), f"{bs} x {c} x {size}^2"
    if cfg.task == "level":
        return (torch.randn(bs, d.seq_len, c, d.image_size, d.image_size),), \
            f"{bs} x {d.seq_len} steps x {c} x {d.image_size}^2"
    if cfg.model.name.startswith("cls_patient"):
        return (torch.randn(bs, 7, d.n_slices, c, d.image_size, d.image_size),), \
            f"{bs} x 7 x {d.n_slices} x {c} x {d.image_size}^2"
    return (torch.randn(bs, d.n_slices, c, d.image_size, d.image_size),), \
        f"{bs} x {d.n_slices} slices x {c} x {d.image_size}^2"


def bench_train(config_names: tuple[str, ...] = ("demo_seg", "demo_level", "demo_cls"), *, steps: int = 4,
                rounds: int = 3, threads: int = 1, seed: int = 0) -> dict:
    """Seconds per training step (forward, backward, AdamW) of each config's model on CPU, with PyTorch's own
    depthwise convolutions and with `kit.models.fastconv.DepthwiseConv2d` (what `create_model` builds), side
    by side in one run.

    The model is built as `kit.train` builds it (kwargs from the config, channels-last when
    `train.channels_last`), with random weights and a random batch of the config's training shape (the
    segmenter's crop, the level model's window, the classifier's slices); the loss is the mean output, so the
    figures time the model, not the data or the task's loss. In each round the two builds take turns, a first
    step per build is not timed, and each figure is the median step of all rounds; `threads` torch threads
    (the demo trains its models one thread each, side by side).

    Returns:
        {"threads", "load_average", "rows": [one dict per config: config, batch, depthwise_layers, native_ms,
        fast_ms, speedup]}; the table is also printed.
    """
    import torch

    from ..config import load_config
    from ..models import create_model
    from ..models.fastconv import DepthwiseConv2d

    torch.set_num_threads(threads)
    rows = []
    for name in config_names:
        cfg = load_config(name)
        model_name, kwargs = cfg.model_spec()
        torch.manual_seed(seed)
        inputs, shape = _training_batch(cfg)
        builds, times = {}, {"native": [], "fast": []}
        for variant in times:
            torch.manual_seed(seed)
            model = create_model(model_name, **kwargs).train()
            layers = sum(type(m) is DepthwiseConv2d for m in model.modules())
            if variant == "native":
                for m in model.modules():
                    if type(m) is DepthwiseConv2d:
                        m.__class__ = torch.nn.Conv2d
            if cfg.train.channels_last:
                model.to(memory_format=torch.channels_last)
            builds[variant] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True))
        xs = tuple(x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last and x.ndim == 4
                   else x for x in inputs)
        print(f"{name}: {model_name} {kwargs['encoder']}, batch {shape}, {layers} depthwise convolutions ...",
              flush=True)

        def step(model, optim):
            out = model(*xs)
            out = out["logit"] if isinstance(out, dict) else out
            optim.zero_grad(set_to_none=True)
            out.float().mean().backward()
            optim.step()

        for _ in range(max(1, rounds)):
            for variant, (model, optim) in builds.items():
                step(model, optim)  # not timed
                for _ in range(max(1, steps)):
                    t0 = time.perf_counter()
                    step(model, optim)
                    times[variant].append(time.perf_counter() - t0)
        native, fast = (float(np.median(times[v])) * 1000 for v in ("native", "fast"))
        rows.append({"config": name, "batch": shape, "depthwise_layers": layers, "native_ms": round(native, 1),
                     "fast_ms": round(fast, 1), "speedup": round(native / fast, 2)})
        del builds
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nkit bench train: one training step on CPU ({threads} torch thread(s), load average {load:.1f}), "
          "random weights and inputs; median of all timed steps")
    header = f"{'config':<14} {'batch':<30} {'depthwise':>9} {'native ms':>10} {'fast ms':>8} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<14} {r['batch']:<30} {r['depthwise_layers']:>9} {r['native_ms']:>10.1f} "
              f"{r['fast_ms']:>8.1f} {r['speedup']:>7.2f}x")
    return {"threads": threads, "load_average": round(load, 2), "rows": rows}
