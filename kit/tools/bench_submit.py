"""`kit bench submit`: seconds per study by stage, prefetch on vs off, growth with slice count, peak memory, FLOPs.

What runs is the submission loop itself (`kit.submit.submission.predict_studies`, the loop under `kit.submit.predictor.submit`,
with the default reader `DicomStudyReader` in a prefetch process or in line) over synthetic JPEG Lossless studies,
with runs of randomly initialised weights written the way `fit_fold` writes them and loaded by
`kit.submit.predictor.load_runs`. Randomly initialised segmenters find arbitrary or no vertebrae, so the predictor
(`StagePredictor`) runs stage 1 at its full cost (`prepare_arrays` + `kit.stage1.infer.segment_study`) and then hands
the ground-truth labels of the study, on the same grid, to stage 2 (`kit.stage2.infer.classify_study`: crops of all
seven vertebrae and the classifier), which is what a trained segmenter gives it. The figures measure speed and
memory only.

Each configuration runs in a fresh Python process, so its peak RSS (`VmHWM`, see `_peak_rss_mb`) is its own: the
main process (models, the study, stage 1 and 2); the prefetch reader process (and its decode workers) and the sum
of all are sampled by `RssMonitor`.

`bench_read_ahead` (`kit bench submit --model-seconds S`) measures the read-ahead alone against its physical limit:
the same writer with a stand-in model that holds each study S seconds (`HoldPredictor`), prefetch off and on and
on two devices (`kit.submit.parallel.write_submission_parallel`), beside the reader's own time on one full-scale study.

Figures measured with it are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

#: stage 1 (segmenter, level model) and stage 2 configs of the demo and of the full-scale pipeline
DEMO_CONFIGS = ("demo_seg", "demo_level", "demo_cls")
FULL_SCALE_CONFIGS = ("seg_unet_effb3_384", "level_effb0_128", "cls_effv2s_224")
#: a Kaggle T4's published peaks, FLOP/s
T4_PEAK = {"fp16 tensor": 65e12, "fp32": 8.1e12}
STAGES = ("read_s", "stage1_s", "crop_s", "classify_s")


# ---------------------------------------------------------------------------------------------------------
# Inputs: runs of random weights, synthetic studies with their true labels
# ---------------------------------------------------------------------------------------------------------


def save_random_run(config_name: str, runs_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """A run folder `runs_dir/<config stem>/fold0/` (`model.pt`, `config.yaml`) as `kit.train.fit_fold` writes it,
    with randomly initialised weights, for `kit.runs.load_run`. Returns the run folder."""
    import torch

    from ..config import config_to_dict, load_config, save_config
    from ..models import create_model

    cfg = load_config(config_name)
    name, kwargs = cfg.model_spec()
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    fold_dir = Path(runs_dir) / Path(config_name).stem / "fold0"
    fold_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs,
                "config": config_to_dict(cfg), "epoch": 0, "metric": None}, fold_dir / "model.pt")
    save_config(cfg, fold_dir / "config.yaml")
    return fold_dir.parent


def write_bench_study(root: str | os.PathLike, name: str, seed: int, *, size: int, n_slices: int,
                      grid: int) -> dict:
    """One synthetic study for the submission loop: `root/test_images/<name>/*.dcm` (JPEG Lossless, .70) and
    its true C1..C7 labels resized to the stage-1 grid, `root/truth/<name>.npy` uint8 (Z, grid, grid).

    Returns:
        {"uid": name, "slices", "rows", "cols", "mb_on_disk"}.
    """
    from ..io.dicom import resize_slices
    from ..synthetic import make_study, write_study

    root = Path(root)
    study = make_study(seed, size=size, n_slices=n_slices)
    folder = root / "test_images" / name
    paths = write_study(study, folder, transfer_syntax="jpeg-lossless", head_first=False, modality=False)
    labels = np.where(study.labels <= 7, study.labels, 0).astype(np.uint8)  # C1..C7 only, index 0 = head
    (root / "truth").mkdir(parents=True, exist_ok=True)
    np.save(root / "truth" / f"{name}.npy", resize_slices(labels, grid, nearest=True))
    z, h, w = study.hu.shape
    return {"uid": name, "slices": z, "rows": h, "cols": w,
            "mb_on_disk": round(sum(p.stat().st_size for p in paths) / 2**20, 1)}


# ---------------------------------------------------------------------------------------------------------
# The predictor: stage 1 at full cost, stage 2 on the true labels
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StagePredictor:
    """The submission writer's predictor for benchmarks: `predictor(uid, series)` -> 8 probabilities.

    Stage 1 runs as in `kit.submit.predictor.predict_study` (`prepare_arrays` at the segmenter's size and window, then
    `segment_study` with every stage-1 model); its labels are then replaced by the study's true labels
    (`truth_dir/<uid>.npy`, loaded outside the timed stages) so that stage 2 (`classify_study`) crops and
    classifies all seven vertebrae, as after a trained segmenter. Per-study seconds go to `timings` (stage 1's
    `forward_s` and `cleanup_s` from `segment_study`'s own timing too).
    """

    runs: list
    truth_dir: Path
    device: str = "cpu"
    batch_size: int | None = None  # stage-1 slices per forward pass; None: `kit.stage1.infer.stage1_batch_size`
    timings: list = field(default_factory=list)

    def __call__(self, uid: str, series) -> np.ndarray:
        from ..constants import CLASSIFIER, LEVELS, SEGMENTER
        from ..io.cache import prepare_arrays
        from ..stage1.postprocess import missing_vertebrae, vertebra_extents
        from ..stage2.infer import classify_study
        from ..stage1.infer import segment_study
        from ..runs import flatten_models
        from ..stage1.results import SegResult

        models = flatten_models(self.runs)
        stage1 = [m for m in models if m.provides in (SEGMENTER, LEVELS)]
        segmenter = next(m for m in stage1 if m.provides == SEGMENTER)
        t0 = time.perf_counter()
        prepared = prepare_arrays(series, segmenter.image_size, segmenter.window)
        seg1 = segment_study({**prepared, "uid": uid}, stage1, batch_size=self.batch_size, device=self.device, uid=uid)
        t1 = time.perf_counter()
        labels = np.load(Path(self.truth_dir) / f"{uid}.npy")
        extents = vertebra_extents(labels, prepared["spacing"])
        seg = SegResult(uid=uid, labels=labels, extents=extents, missing=missing_vertebrae(extents),
                        orig_hw=tuple(series.hu.shape[1:]))
        t2 = time.perf_counter()
        result = classify_study(series.hu, seg, [m for m in models if m.provides == CLASSIFIER],
                                dz=float(series.spacing[0]), device=self.device, uid=uid)
        self.timings.append({"uid": uid, "slices": int(series.hu.shape[0]), "stage1_s": t1 - t0,
                             "forward_s": seg1.timing["forward_s"], "cleanup_s": seg1.timing["cleanup_s"],
                             "crop_s": result["timing"]["crop_s"], "classify_s": result["timing"]["classify_s"],
                             "truth_s": t2 - t1, "found": int(result["found"].sum())})
        return result["probs"]


def _rss_mb(pid: int) -> float:
    """VmRSS of a process in MB (Linux /proc), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children ...), from /proc/<n>/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


class RssMonitor:
    """Samples the resident memory of this process and of its descendants (the prefetch reader and its decode
    workers) every `interval` seconds, in a thread, on Linux; elsewhere the peaks stay None.

    Attributes after the `with` block: `children_mb` (largest single descendant), `total_mb` (largest sum of
    this process and all descendants at one sample: an upper bound, since pages shared between processes,
    such as the decode workers' volume, count once per process).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.children_mb, self.total_mb = interval, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            sizes = [_rss_mb(pid) for pid in _descendants(me)]
            self.children_mb = max([self.children_mb or 0.0, *sizes])
            self.total_mb = max(self.total_mb or 0.0, _rss_mb(me) + sum(sizes))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssMonitor":
        if Path(f"/proc/{os.getpid()}/status").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    On Linux `VmHWM` of /proc/self/status: the peak of this process's own image. `ru_maxrss` is not used there,
    because Linux carries the parent's resident size at fork time into a forked-then-exec'd child's `ru_maxrss`
    (a spawned reader started from a 1 GB torch process would report 1 GB). Elsewhere `ru_maxrss` (bytes on
    macOS).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def run_configuration(spec: dict) -> dict:
    """One configuration, meant to run alone in a fresh process (`python -m kit.tools.bench_submit spec.json out.json`).

    spec: {"runs": [run folders], "root": data root, "uids": [...], "prefetch": bool, "warmup": bool,
    "device": str, "batch_size": int or None}. Loads the runs (`kit.submit.predictor.load_runs`), optionally predicts the first
    study once untimed, then times `kit.submit.submission.predict_studies` over the studies with the submission's
    reader (`DicomStudyReader`) while `RssMonitor` samples the memory of the processes.

    Returns:
        {"load_s" (imports included), "wall_s" (the whole loop, the reader process's start included),
        "steady_s" (from the first study's result to the end: studies 2..n), "studies": [per study: uid, slices,
        read_s, stage1_s (forward_s and cleanup_s of it), crop_s, classify_s, predict_s, found], "notes" (log
        lines of the loop, none expected),
        "peak_rss_mb" (this process, `_peak_rss_mb`, exact), "reader_peak_rss_mb" (the largest descendant process,
        sampled: the prefetch reader or one of its decode workers; None without prefetch), "total_peak_rss_mb"
        (this process and its descendants together, sampled; None off Linux)}.
    """
    from ..submit.predictor import load_runs
    from ..submit.submission import DicomStudyReader, predict_studies, read_dicom_study

    root = Path(spec["root"])
    t0 = time.perf_counter()
    runs = load_runs(spec["runs"], device=spec["device"])
    load_s = time.perf_counter() - t0
    predictor = StagePredictor(runs, root / "truth", device=spec["device"], batch_size=spec["batch_size"])
    uids = list(spec["uids"])
    if spec.get("warmup"):
        predictor(uids[0], read_dicom_study(root / "test_images" / uids[0]))
        predictor.timings.clear()
    rows, notes, marks = [], [], []
    with RssMonitor() as monitor:
        start = time.perf_counter()
        for outcome in predict_studies(uids, predictor, DicomStudyReader(root / "test_images"),
                                       prefetch=spec["prefetch"]):
            marks.append(time.perf_counter())
            notes += outcome.notes
            rows.append({"uid": outcome.uid, "read_s": outcome.read_seconds, "predict_s": outcome.predict_seconds})
        end = time.perf_counter()
    timings = {t["uid"]: t for t in predictor.timings}
    lacking = [r["uid"] for r in rows if r["uid"] not in timings]
    if lacking:
        raise RuntimeError(f"bench submit: no prediction for {lacking}: {notes}")
    for row in rows:
        row.update({k: timings[row["uid"]][k] for k in ("slices", "stage1_s", "forward_s", "cleanup_s", "crop_s",
                                                         "classify_s", "found")})
    return {"load_s": load_s, "wall_s": end - start, "steady_s": end - marks[0], "studies": rows, "notes": notes,
            "peak_rss_mb": _peak_rss_mb(), "reader_peak_rss_mb": monitor.children_mb if spec["prefetch"] else None,
            "total_peak_rss_mb": monitor.total_mb}


def _in_fresh_process(spec: dict, *, tmp: Path, name: str) -> dict:
    """`run_configuration(spec)` in a new Python process (this kit first on its path); its result."""
    spec_path, out_path = tmp / f"{name}.spec.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "kit.tools.bench_submit", str(spec_path), str(out_path)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench submit: configuration {name!r} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(out_path.read_text())


# ---------------------------------------------------------------------------------------------------------
# FLOPs and the T4 projection
# ---------------------------------------------------------------------------------------------------------


def count_flops(config_names: tuple[str, ...] = FULL_SCALE_CONFIGS, *, n_slices: int = 250,
                dz: float = 0.75) -> dict[str, float]:
    """GFLOPs of one study's forward passes per stage, counted by `torch.utils.flop_counter.FlopCounterMode` on
    the meta device (no compute): the segmenter on every slice, the level model on its 2.5D steps over the study,
    the classifier on all seven vertebra stacks in one batch, one fold each, no TTA. Convolutions and matrix
    products are counted, not the GRUs' recurrences, norms or activations (a few % at most).

    Args:
        config_names: stage configs (task seg, level or cls).
        n_slices: the study's slices; dz: their spacing in mm (sets the level model's step count).

    Returns:
        {config name: GFLOPs per study}.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..config import load_config
    from ..models import create_model

    flops = {}
    for name in config_names:
        cfg = load_config(name)
        model_name, kwargs = cfg.model_spec()
        d = cfg.data
        with torch.device("meta"):
            model = create_model(model_name, **kwargs).eval()
            if cfg.task == "seg":
                x, times = torch.zeros(1, kwargs["in_channels"], d.image_size, d.image_size), n_slices
            elif cfg.task == "level":
                steps = len(cfg.recipe().grid(n_slices, dz))
                x, times = torch.zeros(1, steps, kwargs["in_channels"], d.image_size, d.image_size), 1
            else:
                x, times = torch.zeros(7, d.n_slices, cfg.in_channels, d.image_size, d.image_size), 1
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(x)
        flops[Path(name).stem] = counter.get_total_flops() * times / 1e9
    return flops


def t4_projection(gflops: float, utilisation: tuple[float, ...] = (0.25, 0.40)) -> dict[str, tuple[float, ...]]:
    """Seconds for `gflops` on a T4 at its fp16 tensor-core and fp32 peaks times each utilisation (a projection)."""
    return {kind: tuple(gflops * 1e9 / (peak * u) for u in utilisation) for kind, peak in T4_PEAK.items()}


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


def _stage_means(result: dict) -> dict[str, float]:
    """Mean seconds per study by stage, the loop's wall seconds per study, and the steady state's (studies 2..n)."""
    rows = result["studies"]
    means = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in (*STAGES, "forward_s", "cleanup_s",
                                                                         "predict_s")}
    steady = result["steady_s"] / (len(rows) - 1) if len(rows) > 1 else result["wall_s"]
    reader, total = result["reader_peak_rss_mb"], result["total_peak_rss_mb"]
    return {**means, "wall_s_per_study": round(result["wall_s"] / len(rows), 3),
            "steady_s_per_study": round(steady, 3), "wall_s": round(result["wall_s"], 2),
            "load_s": round(result["load_s"], 2), "peak_rss_mb": round(result["peak_rss_mb"]),
            "reader_peak_rss_mb": None if reader is None else round(reader),
            "total_peak_rss_mb": None if total is None else round(total), "notes": len(result["notes"])}


def bench_submit(configs: tuple[str, ...] = DEMO_CONFIGS, *, slice_counts: tuple[int, ...] = (50, 100, 200),
                 size: int = 128, rounds: int = 2, memory_configs: tuple[str, ...] | None = FULL_SCALE_CONFIGS,
                 memory_study: tuple[int, int] = (600, 512), flop_configs: tuple[str, ...] = FULL_SCALE_CONFIGS,
                 flop_slices: int = 250, device: str | None = None, batch_size: int | None = None, seed: int = 0,
                 isolate: bool | None = None, quick: bool = False) -> dict:
    """Seconds per study by stage with prefetch off and on, time against slice count, peak RSS on a full-scale
    study, and GFLOPs per study of the full-scale configs with a T4 projection, in one run.

    Args:
        configs: stage-1 and stage-2 configs of the timed runs (randomly initialised, `save_random_run`).
        slice_counts: study lengths; `rounds` studies of each, all at `size` px, make the timed set (in the
            order 50, 100, 200, 50, 100, 200, ...).
        size: in-plane pixels of those studies.
        rounds: studies per slice count.
        memory_configs: configs of the memory run on the `memory_study` (None or empty: no memory run).
        memory_study: (slices, pixels) of that study: 600 x 512 x 512 by default, JPEG Lossless.
        flop_configs: configs whose GFLOPs per study are counted and projected for a T4.
        flop_slices: slices of the study whose FLOPs are counted (dz 0.75 mm).
        device: where the models run (default CUDA when available).
        batch_size: stage-1 slices per forward pass (default `kit.stage1.infer.stage1_batch_size`: 32 at 128 px and 4
            at 384 px on a CPU, 16 on CUDA).
        seed: study and weight seed.
        isolate: each configuration in a fresh process (default; peak RSS per configuration). False runs them
            here, one after the other, so the peak RSS figures are this process's peak so far (tests).
        quick: a smoke-size run for tests: 2 studies of 16 and 32 slices at 64 px, a 32-slice 64 px memory study
            with the demo configs, FLOPs of the demo configs, no warm-up study, in this process unless `isolate`
            says otherwise.

    Returns:
        {"device", "threads", "load_average", "weights", "configs", "studies", "isolated", "sequential",
        "prefetch" (per mode: mean read_s, stage1_s, crop_s, classify_s, predict_s per study; wall_s_per_study (the
        whole loop, the reader process's start included), steady_s_per_study (studies 2..n), wall_s, load_s,
        peak_rss_mb, reader_peak_rss_mb, notes), "prefetch_speedup" (steady state), "prefetch_speedup_wall"
        (whole loop), "by_slices" [per slice count: slices, stage means of the sequential run, total_s],
        "memory" (the memory run's figures and study, or None), "gflops" {config: GFLOPs per study},
        "flop_slices", "t4_seconds" {"fp16 tensor" | "fp32": (s at 25 %, s at 40 % of peak)}}; also printed.
    """
    import torch

    if quick:
        slice_counts, size, rounds, memory_study, flop_slices = (16, 32), 64, 1, (32, 64), 32
        memory_configs, flop_configs = DEMO_CONFIGS, DEMO_CONFIGS
        isolate = False if isolate is None else isolate
    isolate = True if isolate is None else isolate
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="kit-bench-submit-") as tmp_name:
        tmp = Path(tmp_name)
        run = partial(_in_fresh_process, tmp=tmp) if isolate else lambda spec, name: run_configuration(spec)
        grid = _segmenter_size(configs)
        print(f"writing {rounds} x {len(slice_counts)} synthetic studies of {'/'.join(map(str, slice_counts))} slices "
              f"at {size} px (JPEG Lossless) and runs of random weights ...", flush=True)
        root = tmp / "timed"
        studies = [write_bench_study(root, f"s{n:04d}_{r}", seed + i, size=size, n_slices=n, grid=grid)
                   for r in range(rounds) for i, n in enumerate(slice_counts)]
        runs = [str(save_random_run(c, tmp / "runs", seed=seed)) for c in configs]
        base = {"runs": runs, "root": str(root), "uids": [s["uid"] for s in studies], "device": device,
                "batch_size": batch_size, "warmup": not quick}
        results = {}
        for mode in ("sequential", "prefetch"):
            print(f"{mode}: {len(studies)} studies{' in a fresh process' if isolate else ''} ...", flush=True)
            results[mode] = run({**base, "prefetch": mode == "prefetch"}, name=mode)
        memory = _memory_run(tmp, run, memory_configs, memory_study, device, batch_size, seed) if memory_configs \
            else None
    flops = count_flops(flop_configs, n_slices=flop_slices)
    summary = {mode: _stage_means(r) for mode, r in results.items()}
    by_slices = []
    for n in sorted({r["slices"] for r in results["sequential"]["studies"]}):
        rows = [r for r in results["sequential"]["studies"] if r["slices"] == n]
        means = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in STAGES}
        by_slices.append({"slices": n, **means, "total_s": round(sum(means.values()), 3)})
    total_gf = sum(flops.values())
    out = {"device": device, "threads": torch.get_num_threads(),
           "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan"),
           "weights": "random init (speed only); stage 2 on the true labels", "configs": list(configs),
           "studies": len(studies), "isolated": isolate, **summary,
           "prefetch_speedup": round(summary["sequential"]["steady_s_per_study"]
                                     / summary["prefetch"]["steady_s_per_study"], 2),
           "prefetch_speedup_wall": round(results["sequential"]["wall_s"] / results["prefetch"]["wall_s"], 2),
           "by_slices": by_slices, "memory": memory, "gflops": {k: round(v, 2) for k, v in flops.items()},
           "flop_slices": flop_slices,
           "t4_seconds": {k: tuple(round(s, 4) for s in v) for k, v in t4_projection(total_gf).items()}}
    _print_report(out, flop_configs)
    return out


def _segmenter_size(configs: tuple[str, ...]) -> int:
    """The stage-1 grid: the image size of the segmenter config among `configs`."""
    from ..config import load_config

    for name in configs:
        cfg = load_config(name)
        if cfg.task == "seg":
            return cfg.data.image_size
    raise ValueError(f"configs {list(configs)} hold no segmenter config (task: seg)")


def _memory_run(tmp: Path, run, configs: tuple[str, ...], study: tuple[int, int], device: str, batch_size: int | None,
                seed: int) -> dict:
    """The memory configuration: one `study` = (slices, px) study through `configs`, prefetch on, fresh process."""
    n_slices, px = study
    root = tmp / "memory"
    print(f"memory: writing a {n_slices} x {px} x {px} JPEG Lossless study ...", flush=True)
    info = write_bench_study(root, "memory", seed + 1000, size=px, n_slices=n_slices,
                             grid=_segmenter_size(configs))
    runs = [str(save_random_run(c, tmp / "memory_runs", seed=seed)) for c in configs]
    print(f"memory: {', '.join(configs)} on it ...", flush=True)
    r = run({"runs": runs, "root": str(root), "uids": [info["uid"]], "device": device, "batch_size": batch_size,
             "warmup": False, "prefetch": True}, name="memory")
    row = r["studies"][0]
    return {"configs": list(configs), "study": info,
            **{k: round(row[k], 2) for k in (*STAGES, "forward_s", "cleanup_s", "predict_s")},
            "wall_s": round(r["wall_s"], 2), "load_s": round(r["load_s"], 2), "peak_rss_mb": round(r["peak_rss_mb"]),
            "reader_peak_rss_mb": None if r["reader_peak_rss_mb"] is None else round(r["reader_peak_rss_mb"]),
            "total_peak_rss_mb": None if r["total_peak_rss_mb"] is None else round(r["total_peak_rss_mb"]),
            "found": row["found"], "notes": len(r["notes"])}


def _print_report(out: dict, flop_configs: tuple[str, ...]) -> None:
    print(f"\nkit bench submit: {out['studies']} studies through kit.submit.submission.predict_studies on {out['device']} "
          f"({out['threads']} torch threads, load average {out['load_average']:.1f}), {', '.join(out['configs'])}, "
          "random init (speed only), stage 2 on the true labels; "
          + ("each configuration in a fresh process" if out["isolated"] else
             "configurations in this process one after another: peak RSS = this process's so far"))
    header = (f"{'configuration':<12} {'read s':>7} {'stage 1 s':>9} {'crops s':>8} {'classify s':>10} "
              f"{'s/study':>8} {'steady s/study':>14} {'peak RSS MB':>11} {'reader MB':>9} {'all MB':>7}")
    print(header)
    print("-" * len(header))
    for mode in ("sequential", "prefetch"):
        r = out[mode]
        print(f"{mode:<12} {r['read_s']:>7.2f} {r['stage1_s']:>9.2f} {r['crop_s']:>8.2f} {r['classify_s']:>10.2f} "
              f"{r['wall_s_per_study']:>8.2f} {r['steady_s_per_study']:>14.2f} {r['peak_rss_mb']:>11} "
              f"{r['reader_peak_rss_mb'] if r['reader_peak_rss_mb'] is not None else '-':>9} "
              f"{r['total_peak_rss_mb'] if r['total_peak_rss_mb'] is not None else '-':>7}")
    verdict = "met" if out["prefetch_speedup"] >= 1.3 else "NOT met"
    print("s/study: the whole loop (with prefetch: the reader process's start included); steady: from the first "
          "study's result to the end (studies 2..n). read s with prefetch: in the reader process, overlapped.")
    print(f"prefetch speed-up, steady state = {out['prefetch_speedup']:.2f}x (target >= 1.3x: {verdict}); "
          f"whole loop = {out['prefetch_speedup_wall']:.2f}x")
    print(f"\n{'slices':>6} {'read s':>7} {'stage 1 s':>9} {'crops s':>8} {'classify s':>10} {'total s':>8} "
          f"{'x slices':>8} {'x time':>7}   (sequential run)")
    first = out["by_slices"][0]
    for r in out["by_slices"]:
        print(f"{r['slices']:>6} {r['read_s']:>7.2f} {r['stage1_s']:>9.2f} {r['crop_s']:>8.2f} "
              f"{r['classify_s']:>10.2f} {r['total_s']:>8.2f} {r['slices'] / first['slices']:>8.2f} "
              f"{r['total_s'] / first['total_s']:>7.2f}")
    m = out["memory"]
    if m:
        s = m["study"]
        ok = "met" if m["peak_rss_mb"] <= 3072 else "NOT met"
        print(f"\nmemory: {s['slices']} x {s['rows']} x {s['cols']} JPEG Lossless study ({s['mb_on_disk']} MB on "
              "disk), "
              f"{', '.join(m['configs'])}, prefetch on: read {m['read_s']:.1f} s, stage 1 {m['stage1_s']:.1f} s "
              f"(networks {m['forward_s']:.1f} s, clean-up {m['cleanup_s']:.1f} s), "
              f"crops {m['crop_s']:.1f} s, classify {m['classify_s']:.1f} s; peak RSS {m['peak_rss_mb']} MB main "
              f"process (target <= 3 GB: {ok}), {m['reader_peak_rss_mb']} MB largest reader process, "
              f"{m['total_peak_rss_mb']} MB all processes together (sampled; shared pages counted per process)")
    print(f"\nGFLOPs per study of {out['flop_slices']} slices (forward, one fold, no TTA; FlopCounterMode):")
    for name, gf in out["gflops"].items():
        print(f"  {name:<22} {gf:10.1f}")
    total = sum(out["gflops"].values())
    fp16, fp32 = out["t4_seconds"]["fp16 tensor"], out["t4_seconds"]["fp32"]
    print(f"  {'total':<22} {total:10.1f}")
    print(f"T4 projection for {' + '.join(flop_configs)} (model compute only, 25-40 % of the published peak; a "
          f"projection, not a measurement): fp16 tensor cores {fp16[1]:.3f}-{fp16[0]:.3f} s/study, fp32 "
          f"{fp32[1]:.3f}-{fp32[0]:.3f} s/study")


# ---------------------------------------------------------------------------------------------------------
# `--model-seconds`: the read-ahead against its physical limit, with a stand-in model that holds each study
# ---------------------------------------------------------------------------------------------------------


if __name__ == "__main__":  # one configuration in a fresh process: spec.json -> out.json
    spec_file, out_file = sys.argv[1:3]
    result = run_configuration(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))
