"""`kit bench submit`: seconds per study by stage, prefetch on vs off, growth with slice count, peak memory, FLOPs.

What runs is the submission loop itself (`kit.submit.submission.predict_studies`, the loop under `kit.submit.predictor.submit`,
with the default reader `DicomStudyReader` in a prefetch process or in line) over synthetic JPEG Lossless studies,
with runs of randomly initialised weights written the way `fit_fold` writes them and loaded by
`kit.submit.predictor.load_runs`. Randomly initialised segmenters find arbitrary or no vertebrae, so the predictor
(`StagePredictor`) runs stage 1 at its full cost (`prepare_arrays` + `kit.submit.infer.segment_study`) and then hands
the ground-truth labels of the study, on the same grid, to stage 2 (`kit.submit.infer.classify_study`: crops of all
seven vertebrae and the classifier), which is what a trained segmenter gives it. The figures measure speed and
memory only.

Each configuration runs in a fresh Python process, so its peak RSS (`VmHWM`, see `_peak_rss_mb`) is its own: the
main process (models, the study, stage 1 and 2); the prefetch reader process (and its decode workers) and the sum
of all are sampled by `RssMonitor`.

`bench_read_ahead` (`kit bench submit --model-seconds S`) measures the read-ahead alone against its physical limit:
the same writer with a stand-in model that holds each study S seconds (`HoldPredictor`), prefetch off and on and
on two devices (`kit.submit.submission.write_submission_parallel`), beside the reader's own time on one full-scale study.

Figures measured with it are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
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
    with randomly initialised weights, for `kit.submit.infer.load_run`. Returns the run folder."""
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

    Stage 1 runs as in `kit.submit.infer.predict_study` (`prepare_arrays` at the segmenter's size and window, then
    `segment_study` with every stage-1 model); its labels are then replaced by the study's true labels
    (`truth_dir/<uid>.npy`, loaded outside the timed stages) so that stage 2 (`classify_study`) crops and
    classifies all seven vertebrae, as after a trained segmenter. Per-study seconds go to `timings` (stage 1's
    `forward_s` and `cleanup_s` from `segment_study`'s own timing too).
    """

    runs: list
    truth_dir: Path
    device: str = "cpu"
    batch_size: int | None = None  # stage-1 slices per forward pass; None: `kit.submit.infer.stage1_batch_size`
    timings: list = field(default_factory=list)

    def __call__(self, uid: str, series) -> np.ndarray:
        from ..io.cache import prepare_arrays
        from ..stage2.crops import missing_vertebrae, vertebra_extents
        from ..submit.infer import _flatten_models, classify_study, segment_study
        from ..stage1.results import SegResult

        models = _flatten_models(self.runs)
        stage1 = [m for m in models if m.provides in ("vertebra_probs", "levels")]
        segmenter = next(m for m in stage1 if m.provides == "vertebra_probs")
        t0 = time.perf_counter()
        prepared = prepare_arrays(series, segmenter.image_size, segmenter.window)
        seg1 = segment_study({**prepared, "uid": uid}, stage1, batch_size=self.batch_size, device=self.device, uid=uid)
        t1 = time.perf_counter()
        labels = np.load(Path(self.truth_dir) / f"{uid}.npy")
        extents = vertebra_extents(labels, prepared["spacing"])
        seg = SegResult(uid=uid, labels=labels, extents=extents, missing=missing_vertebrae(extents),
                        orig_hw=tuple(series.hu.shape[1:]))
        t2 = time.perf_counter()
        result = classify_study(series.hu, seg, [m for m in models if m.provides == "fractures"],
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
        batch_size: stage-1 slices per forward pass (default `kit.submit.infer.stage1_batch_size`: 32 at 128 px and 4
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

#: the stand-in model's answer for each of the 8 targets
HOLD_VALUE = 0.5
#: prefetch on, steady state: wall seconds per study at most this times max(read, S)
READ_AHEAD_TARGET = 1.15
QUICK_READ_AHEAD = {"size": 64, "n_slices": 16, "model_seconds": 0.2}


def _record(record_dir: str | None, kind: str, uid: str, **fields) -> None:
    """Write `record_dir/<kind>-<uid>.json` ({uid, pid, **fields}); nothing when `record_dir` is None."""
    if record_dir is not None:
        (Path(record_dir) / f"{kind}-{uid}.json").write_text(json.dumps({"uid": uid, "pid": os.getpid(), **fields}))


@dataclass(frozen=True)
class HoldPredictor:
    """The stand-in model: `predictor(uid, study)` holds the study for `seconds` (sleeps, using no CPU), then
    returns 8 probabilities, all `value`, in TARGETS order.

    Picklable (a top-level frozen dataclass), so `make_hold_predictor` builds it in a spawned device worker of
    `kit.submit.submission.write_submission_parallel`. With `record_dir`, each call writes `record_dir/hold-<uid>.json`:
    {uid, pid, device, start, end (`time.time()`), shape (the study's `hu` shape, [] when it has none)}.
    """

    seconds: float
    record_dir: str | None = None
    device: str = "cpu"
    value: float = HOLD_VALUE

    def __call__(self, uid: str, study) -> np.ndarray:
        from ..constants import TARGETS

        start = time.time()
        time.sleep(self.seconds)
        shape = list(np.shape(getattr(study, "hu", ())))
        _record(self.record_dir, "hold", uid, device=self.device, start=start, end=time.time(), shape=shape)
        return np.full(len(TARGETS), self.value, dtype=np.float64)


def make_hold_predictor(device: str, *, seconds: float, record_dir: str | None = None) -> HoldPredictor:
    """`make_predictor` for `write_submission_parallel` (bind `seconds` and `record_dir` with functools.partial)."""
    return HoldPredictor(seconds, record_dir, device)


@dataclass(frozen=True)
class TimedReader:
    """The submission's default reader, `kit.submit.submission.DicomStudyReader(images_dir)`, that also writes
    `record_dir/read-<uid>.json` per study read: {uid, pid, start, end (`time.time()`), seconds (of the read),
    may_fork (`kit.io.dicom.fork_is_safe()` where it read: whether its decoding may use worker processes)}.

    Picklable and numpy-only, so it runs in the prefetch reader process as the default reader does. A study that
    fails to read raises as `DicomStudyReader` does and leaves no record.
    """

    images_dir: str
    record_dir: str

    def __call__(self, uid: str):
        from ..io.dicom import fork_is_safe
        from ..submit.submission import DicomStudyReader

        may_fork = fork_is_safe()
        start, t0 = time.time(), time.perf_counter()
        series = DicomStudyReader(Path(self.images_dir))(uid)
        _record(self.record_dir, "read", uid, start=start, end=time.time(), seconds=time.perf_counter() - t0,
                may_fork=may_fork)
        return series


def _read_shape(read, uid: str) -> list[int]:
    """`read(uid)`'s volume shape: what the reader-alone run sends back instead of the volume."""
    return list(read(uid).hu.shape)


def _records(record_dir: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record_dir.glob(f"{kind}-*.json"))]


def _steady_read_s(reads: list[dict]) -> float:
    """Mean seconds of a read, leaving out the first read of each reader process (lazy imports, a fresh decode
    pool) when that process read more than one study."""
    by_pid: dict[int, list[dict]] = {}
    for r in sorted(reads, key=lambda r: r["start"]):
        by_pid.setdefault(r["pid"], []).append(r)
    kept = [r["seconds"] for rows in by_pid.values() for r in (rows[1:] if len(rows) > 1 else rows)]
    return float(np.mean(kept))


def _steady_s_per_study(holds: list[dict]) -> float:
    """Wall seconds per study in the steady state: per predicting process, the time from its first study's end
    to its last one's over the studies in between (studies 2..k); processes working side by side add their
    rates, so per study it is 1 / sum(1 / seconds per study of each)."""
    by_pid: dict[int, list[float]] = {}
    for h in holds:
        by_pid.setdefault(h["pid"], []).append(h["end"])
    rates = [(len(ends) - 1) / (max(ends) - min(ends)) for ends in by_pid.values() if len(ends) > 1]
    if not rates:
        raise RuntimeError(f"bench submit: no process predicted two studies ({len(holds)} studies in all); "
                           "a steady state needs at least 2 studies per process")
    return 1.0 / sum(rates)


def _overlap_share(reads: list[dict]) -> float:
    """Share of all read time during which another process was reading too (0: never, 1: always)."""
    total = sum(r["end"] - r["start"] for r in reads)
    shared = 0.0
    for r in reads:
        others = sorted((o["start"], o["end"]) for o in reads if o["pid"] != r["pid"])
        covered, cursor = 0.0, r["start"]
        for start, end in others:  # the union of the others' intervals, clipped to r's
            start, end = max(start, cursor), min(end, r["end"])
            if end > start:
                covered, cursor = covered + end - start, end
        shared += covered
    return shared / total if total > 0 else 0.0


def _run_submission(name: str, uids: list[str], images: Path, work: Path, seconds: float, *, prefetch: bool,
                    devices: list[str] | None, reference: str, reference_s: float) -> dict:
    """One configuration: the submission writer with the stand-in model over `uids`; its figures.

    `devices` None runs `write_submission` in this process, otherwise `write_submission_parallel` on them.

    Raises:
        RuntimeError: a study got fallbacks, a row is missing or not the stand-in's value, or a study was not
            held: the figures would not measure the read-ahead.
    """
    import pandas as pd

    from ..constants import TARGETS
    from ..submit.submission import write_submission, write_submission_parallel

    record_dir = work / name.replace(" ", "_")
    record_dir.mkdir(parents=True)
    out_csv = record_dir / "submission.csv"
    reader = TimedReader(str(images), str(record_dir))
    start = time.perf_counter()
    if devices is None:
        summary = write_submission(uids, HoldPredictor(seconds, str(record_dir)), out_csv, read=reader,
                                   prefetch=prefetch, progress=False)
    else:
        make = partial(make_hold_predictor, seconds=seconds, record_dir=str(record_dir))
        summary = write_submission_parallel(uids, make, devices, out_csv, read=reader, prefetch=prefetch,
                                            progress=False)
    wall = time.perf_counter() - start
    table = pd.read_csv(out_csv)
    holds, reads = _records(record_dir, "hold"), _records(record_dir, "read")
    from_stand_in = bool(np.allclose(table["fractured"], HOLD_VALUE))
    rows_expected = len(TARGETS) * len(uids)
    if summary["fallback_studies"] or len(table) != rows_expected or not from_stand_in or len(holds) != len(uids):
        raise RuntimeError(f"bench submit: {name}: {summary['fallback_studies']} studies with fallbacks "
                           f"({summary['fallbacks']}), {len(table)} rows for {len(uids)} studies, "
                           f"{len(holds)} held by the stand-in; see {summary['log']}")
    steady = _steady_s_per_study(holds)
    return {"devices": devices or ["cpu"], "prefetch": prefetch, "studies": len(uids), "wall_s": round(wall, 3),
            "s_per_study": round(wall / len(uids), 3), "steady_s_per_study": round(steady, 3),
            "read_s": round(_steady_read_s(reads), 3), "reads_overlap": round(_overlap_share(reads), 3),
            "reads_may_fork": all(r["may_fork"] for r in reads),
            "reference": reference, "reference_s": round(reference_s, 3),
            "ratio": round(steady / reference_s, 3), "ratio_total": round(wall / len(uids) / reference_s, 3),
            "predicted": summary["predicted"], "fallback_studies": summary["fallback_studies"], "rows": len(table),
            "values_from_stand_in": from_stand_in, "probabilities_per_study": len(table) // len(uids),
            "hold_shapes": sorted({tuple(h["shape"]) for h in holds}),
            "workers": len({h["pid"] for h in holds}), "readers": len({r["pid"] for r in reads})}


def _link_study(source: Path, target: Path) -> None:
    """`target` as a copy of the study folder `source`, file by file hard links (plain copies where links fail)."""
    import shutil

    target.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, target / path.name)
        except OSError:
            shutil.copy2(path, target / path.name)


def bench_read_ahead(model_seconds: float | str | None = "auto", *, size: int = 512, n_slices: int = 250,
                     studies: int = 6, seed: int = 0, quick: bool = False) -> dict:
    """The read-ahead against its physical limit: the submission writer with a stand-in model that holds each
    study `model_seconds` (S) seconds, so reading (R s a study) and predicting can overlap at most to max(R, S).

    One synthetic JPEG Lossless study of `n_slices` x `size` x `size` is written (`write_bench_study`) and linked
    under as many study names as the runs need (each study reads the same files: the same R every time). Then:

    - reader alone: `kit.submit.submission.DicomStudyReader` on `studies` studies, one after another, in a spawned
      numpy-only process (`kit.io.prefetch.prefetch`, ahead 0), where the prefetch reader runs; R is the mean of
      studies 2..n;
    - prefetch off and on: `kit.submit.submission.write_submission` over `studies` studies with the stand-in
      (`HoldPredictor`), expected about R + S and max(R, S) a study;
    - 2 devices: `kit.submit.submission.write_submission_parallel` on ["cpu", "cpu"] over 2 x `studies` studies
      (`studies` per worker, each worker with its own prefetch reader), against max(R, S) / 2 a study, the limit
      when the two readers do not compete for the CPU; the read time inside that run (vs R) says whether they do.

    Wall per study is given for the whole run (total wall / studies: process starts and the first, unhidden read
    included) and for the steady state (`_steady_s_per_study`: studies 2..n of each predicting process).

    Args:
        model_seconds: S, or "auto" / None for R (the default: the case where overlap matters most).
        size: in-plane pixels of the study (512: full scale).
        n_slices: its slices.
        studies: studies per configuration (2 devices: twice as many); at least 2, a steady state wants 5 or more.
        seed: the study's seed.
        quick: a smoke-size run for tests: `QUICK_READ_AHEAD` (64 px, 16 slices, S = 0.2 s unless a number is
            given), replacing `size` and `n_slices`.

    Returns:
        {"study" (`write_bench_study`'s info), "studies", "model_seconds", "model_seconds_from" ("measured read
        time" or "given"), "cpu_count", "usable_cores", "load_average" [start, end], "inline_reads_fork" (prefetch
        off's reads_may_fork),
        "read_alone" {"read_s" (R), "first_read_s", "s_per_study", "shapes"}, "limit_s" (max(R, S)),
        "prefetch_off" | "prefetch_on" | "two_devices" {devices, prefetch, studies, wall_s, s_per_study,
        steady_s_per_study, read_s (per study in that run, first read of each reader left out), reads_overlap
        (`_overlap_share`), reads_may_fork (every read could use decoding processes: `TimedReader`),
        reference, reference_s, ratio (steady / reference), ratio_total (s_per_study / reference), predicted,
        fallback_studies, rows, values_from_stand_in, probabilities_per_study, hold_shapes, workers, readers},
        "prefetch_on_ratio", "target", "target_met", "read_slowdown_two_devices" (read inside the 2-device run /
        R), "two_readers_full_speed" (that slowdown <= `READ_AHEAD_TARGET`), "two_devices_limit_measured_s"
        (max(that read, S) / 2), "two_devices_ratio_measured" (the 2-device steady state over it)}; also printed.

    Raises:
        ValueError: `model_seconds` is neither "auto" nor a number > 0, or `studies` < 2.
        RuntimeError: a configuration's submission is not entirely the stand-in's (see `_run_submission`).
    """
    from ..io.prefetch import prefetch
    from ..submit.submission import DicomStudyReader

    given = None if model_seconds is None or str(model_seconds).strip().lower() == "auto" else model_seconds
    if given is not None:
        try:
            given = float(given)
        except (TypeError, ValueError):
            given = math.nan
        if not math.isfinite(given) or given <= 0:
            raise ValueError(f"model_seconds must be 'auto' (the measured read time) or seconds > 0; "
                             f"got {model_seconds!r}")
    if quick:
        size, n_slices = QUICK_READ_AHEAD["size"], QUICK_READ_AHEAD["n_slices"]
        given = QUICK_READ_AHEAD["model_seconds"] if given is None else given
    if studies < 2:
        raise ValueError(f"studies must be >= 2 (a steady state needs studies 2..n; 6 or more is better); "
                         f"got {studies}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    with tempfile.TemporaryDirectory(prefix="kit-bench-read-ahead-") as tmp_name:
        work = Path(tmp_name)
        print(f"writing a {n_slices} x {size} x {size} JPEG Lossless study ...", flush=True)
        info = write_bench_study(work / "study", "study", seed, size=size, n_slices=n_slices, grid=32)
        images = work / "test_images"
        uids = [f"1.2.3.{i + 1}" for i in range(2 * studies)]
        for uid in uids:
            _link_study(work / "study" / "test_images" / "study", images / uid)

        print(f"reader alone: {studies} studies in a spawned process ...", flush=True)
        timed = list(prefetch(partial(_read_shape, DicomStudyReader(images)), uids[:studies], ahead=0))
        failed = [(t.item, t.error) for t in timed if t.error is not None]
        if failed:
            raise RuntimeError(f"bench submit: the reader failed on {failed}")
        seconds = [t.seconds for t in timed]
        read_s = float(np.mean(seconds[1:]))
        alone = {"read_s": round(read_s, 3), "first_read_s": round(seconds[0], 3),
                 "s_per_study": round(float(np.mean(seconds)), 3), "shapes": sorted({tuple(t.result) for t in timed})}
        hold = given if given is not None else read_s
        limit = max(read_s, hold)
        print(f"S = {hold:.3f} s ({'given' if given is not None else 'the measured read time'}); "
              f"prefetch off, prefetch on, 2 devices ...", flush=True)
        run = partial(_run_submission, images=images, work=work, seconds=hold)
        off = run("prefetch off", uids[:studies], prefetch=False, devices=None, reference="read + S",
                  reference_s=read_s + hold)
        on = run("prefetch on", uids[:studies], prefetch=True, devices=None, reference="max(read, S)",
                 reference_s=limit)
        two = run("2 devices", uids, prefetch=True, devices=["cpu", "cpu"], reference="max(read, S) / 2",
                  reference_s=limit / 2)
    slowdown, limit_measured = two["read_s"] / read_s, max(two["read_s"], hold) / 2
    out = {"study": info, "studies": studies, "model_seconds": round(hold, 3),
           "model_seconds_from": "given" if given is not None else "measured read time",
           "cpu_count": os.cpu_count(), "usable_cores": usable,
           "load_average": [round(load_start, 2),
                            round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan],
           "inline_reads_fork": off["reads_may_fork"], "read_alone": alone, "limit_s": round(limit, 3),
           "prefetch_off": off, "prefetch_on": on, "two_devices": two, "prefetch_on_ratio": on["ratio"],
           "target": READ_AHEAD_TARGET, "target_met": on["ratio"] <= READ_AHEAD_TARGET,
           "read_slowdown_two_devices": round(slowdown, 3),
           "two_readers_full_speed": slowdown <= READ_AHEAD_TARGET,
           "two_devices_limit_measured_s": round(limit_measured, 3),
           "two_devices_ratio_measured": round(two["steady_s_per_study"] / limit_measured, 3)}
    _print_read_ahead(out)
    return out


def _print_read_ahead(out: dict) -> None:
    s, alone, hold = out["study"], out["read_alone"], out["model_seconds"]
    print(f"\nkit bench submit --model-seconds: the read-ahead against its limit, a stand-in model holding each "
          f"study S = {hold:.2f} s ({out['model_seconds_from']})")
    print(f"study: {s['slices']} x {s['rows']} x {s['cols']} JPEG Lossless ({s['mb_on_disk']} MB), read by "
          f"kit.submit.submission.DicomStudyReader; {out['studies']} studies a configuration ({2 * out['studies']} with 2 "
          f"devices); {out['usable_cores']} usable CPU cores (os.cpu_count {out['cpu_count']}), load average "
          f"{out['load_average'][0]:.1f} -> {out['load_average'][1]:.1f}")
    header = (f"{'configuration':<14} {'s/study':>7} {'steady':>7} {'read s':>7}   {'limit':<17} {'limit s':>7} "
              f"{'steady/limit':>12} {'total/limit':>11}")
    print(header)
    print("-" * len(header))
    print(f"{'reader alone':<14} {alone['s_per_study']:>7.2f} {alone['read_s']:>7.2f} {alone['read_s']:>7.2f}")
    for key in ("prefetch_off", "prefetch_on", "two_devices"):
        r = out[key]
        name = {"prefetch_off": "prefetch off", "prefetch_on": "prefetch on", "two_devices": "2 devices"}[key]
        print(f"{name:<14} {r['s_per_study']:>7.2f} {r['steady_s_per_study']:>7.2f} {r['read_s']:>7.2f}   "
              f"{r['reference']:<17} {r['reference_s']:>7.2f} {r['ratio']:>12.2f} {r['ratio_total']:>11.2f}")
    print("s/study: total wall / studies (process starts and the first, unhidden read included); steady: studies "
          "2..n of each predicting process; read s: a study's read in that run (first read of each reader left out)")
    verdict = "met" if out["target_met"] else "NOT met"
    off, on, two = out["prefetch_off"], out["prefetch_on"], out["two_devices"]
    print(f"prefetch on, steady state: {on['ratio']:.2f}x max(read, S) (target <= {out['target']:.2f}x: {verdict}); "
          f"{off['steady_s_per_study'] / on['steady_s_per_study']:.2f}x faster than prefetch off")
    full = "yes" if out["two_readers_full_speed"] else "no"
    print(f"2 devices: reads inside the run {two['read_s']:.2f} s vs {alone['read_s']:.2f} s alone "
          f"({out['read_slowdown_two_devices']:.2f}x; the two readers overlapped {100 * two['reads_overlap']:.0f} % "
          f"of their read time): two concurrent readers at full speed on {out['usable_cores']} cores: {full}. "
          f"With the read time of the run the limit is max({two['read_s']:.2f}, S) / 2 = "
          f"{out['two_devices_limit_measured_s']:.2f} s a study (steady {out['two_devices_ratio_measured']:.2f}x)")
    if not out["inline_reads_fork"]:
        print("prefetch off read in this process without decoding workers (torch is loaded here, or this is not "
              "the main thread: kit.io.dicom.fork_is_safe), unlike the reader alone")


if __name__ == "__main__":  # one configuration in a fresh process: spec.json -> out.json
    spec_file, out_file = sys.argv[1:3]
    result = run_configuration(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))
