"""`kit bench crops`: does loading cached crops keep up with training the classifier?

Three figures measured side by side in one run, per classifier config:

- building the crop cache (`kit.stage2.crop_cache.build_crops`, what `kit crops` runs: DICOM read in a prefetch worker,
  crops cut from the original grid, npz written) in studies/s, on synthetic studies with ground-truth masks
  (`data.true_masks`), so no trained segmenter is needed;
- loading the cached crops, in vertebra stacks/s (T x C x S x S each, e.g. 15 x 6 x 224^2): `kit.stage2.store.load_crops`
  alone, and the classifier's dataset (`kit.stage2.data.CropDataset`, per vertebra, with the config's augmentation) both
  reading each sample's own vertebra stack from its study's file and holding the cache in memory;
- the classifier's forward + backward pass (randomly initialised model from the config, BCE on the vertebra
  logit) in stacks/s.

loading / training >= 1 means one loading process feeds the model as fast as it trains.
Figures measured with it are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from ..constants import TARGETS, VERTEBRAE

#: configs of a default run: the demo's CPU classifier and the full-scale one (15 x 6 x 224^2 stacks)
DEFAULT_CONFIGS = ("demo_cls", "cls_effv2s_224")


def write_synthetic_root(root: str | os.PathLike, n_studies: int, *, size: int, n_slices: int | None,
                         seed: int = 0, transfer_syntax: str = "jpeg-lossless") -> list[str]:
    """A small RSNA-format training set for the benchmarks: every study with its segmentation and box rows.

    Writes `train_images/<uid>/*.dcm`, `segmentations/<uid>.nii`, `train.csv` and `train_bounding_boxes.csv`
    under `root` (`kit.synthetic.make_study`, `write_study`, `write_segmentation`).

    Args:
        root: the data root (created).
        n_studies: studies, seeds `seed`, `seed + 1`, ...
        size: in-plane pixels.
        n_slices: slices per study (None: the generator's own count for the anatomy).
        seed: first seed.
        transfer_syntax: a key of `kit.synthetic.TRANSFER_SYNTAXES`.

    Returns:
        The StudyInstanceUIDs, in seed order.
    """
    from ..synthetic import make_study, write_segmentation, write_study

    root = Path(root)
    rows, boxes = [], []
    for i in range(n_studies):
        study = make_study(seed + i, size=size, n_slices=n_slices)
        write_study(study, root / "train_images" / study.uid, transfer_syntax=transfer_syntax)
        write_segmentation(study, root / "segmentations" / f"{study.uid}.nii")
        rows.append(study.label_row())
        boxes += study.box_rows(head_first=True)
    pd.DataFrame(rows, columns=["StudyInstanceUID", *TARGETS]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(boxes, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]).to_csv(
        root / "train_bounding_boxes.csv", index=False)
    return [r["StudyInstanceUID"] for r in rows]


def _best_rate(fn, n: int, repeats: int) -> float:
    """Best items/s of `fn()` (which handles `n` items) over `repeats` calls."""
    best = 0.0
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - start))
    return best


def _loading_rates(cfg, uids: list[str], labels: pd.DataFrame, repeats: int) -> tuple[dict[str, float], tuple]:
    """Stacks/s of the three ways the classifier's stacks are loaded; and the shape of one stack."""
    from ..stage2.store import load_crops
    from ..stage2.data import CropDataset

    d = cfg.data
    crop_dir = d.crop_dir
    n_stacks = len(uids) * len(VERTEBRAE)
    common = {"mask_channel": d.with_mask, "augment": d.augment, "reverse_slices": d.reverse_slices,
              "n_neighbours": d.n_neighbours,
              "skip_missing": False, "seed": cfg.seed}
    from_files = CropDataset(crop_dir, uids, labels, in_memory=False, **common)
    in_memory = CropDataset(crop_dir, uids, labels, in_memory=True, **common)

    def iterate(dataset) -> None:
        for i in range(len(dataset)):
            dataset[i]

    rates = {"load_crops": _best_rate(lambda: [load_crops(crop_dir, u) for u in uids], n_stacks, repeats),
             "dataset_files": _best_rate(lambda: iterate(from_files), len(from_files), repeats),
             "dataset_memory": _best_rate(lambda: iterate(in_memory), len(in_memory), repeats)}
    return rates, tuple(in_memory[0]["image"].shape)


def training_rate(cfg, *, batch_size: int, device: str = "cpu", repeats: int = 2, seed: int = 0) -> float:
    """Stacks/s of the classifier's forward + backward pass, randomly initialised from `cfg` (`model_spec`).

    Input: random uint8 (B, T, C, S, S) stacks at the config's crop shape, all slices real, made float by
    `kit.stage2.data.stack_input` with an intensity change in the step, as training does; loss: BCE on the vertebra logit
    plus the slice logits (as training's slice loss), then `backward()`; the optimizer step is not timed. One
    untimed warm-up pass first; the best of `repeats` passes counts.
    """
    import torch

    from ..stage2.data import stack_input
    from ..models import create_model

    torch.manual_seed(seed)
    d = cfg.data
    name, kwargs = cfg.model_spec()
    model = create_model(name, **kwargs).to(device).train()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch_size, d.n_slices, cfg.in_channels, d.image_size, d.image_size),
                      dtype=torch.uint8, device=device)
    intensity = torch.tensor([[0.05, 1.1]], device=device).repeat(batch_size, 1)
    target = torch.randint(0, 2, (batch_size,), device=device).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(stack_input(x, intensity, mask_channel=d.with_mask))
        loss = bce(out["logit"], target) + bce(out["slice_logits"], target[:, None].expand_as(out["slice_logits"]))
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up
    return _best_rate(step, batch_size, repeats)


def bench_crops(config_names: tuple[str, ...] = DEFAULT_CONFIGS, *, n_studies: int = 3, study_size: int = 256,
                n_slices: int | None = 200, batch_size: int | None = None, device: str | None = None,
                repeats: int = 2, seed: int = 0, quick: bool = False) -> dict:
    """Crop building (studies/s), cached-crop loading and the classifier's training pass (stacks/s), in one run.

    The same synthetic studies (JPEG Lossless DICOM, ground-truth segmentations and box rows,
    `write_synthetic_root`) serve every config; each config builds its own crop cache from them with
    `kit.stage2.crop_cache.build_crops` (ground-truth masks, prefetch on), then its loading and training figures are
    measured (randomly initialised weights: speed only).

    Args:
        config_names: classifier configs (packaged names or YAML paths).
        n_studies: synthetic studies.
        study_size: their in-plane size (the crops are cut from this grid; real studies are 512).
        n_slices: their slice count (None: the generator's own).
        batch_size: stacks per training pass (default: the config's `train.batch_size` on CUDA, 2 on CPU).
        device: where the model trains (default CUDA when available).
        repeats: timing rounds for loading and training; the best counts (building runs once).
        seed: synthetic study and weight seed.
        quick: a smoke-size run for tests: demo_cls only at 32 px crops of 4 slices, 2 studies of 48 x 64^2.

    Returns:
        {"device", "threads", "load_average", "weights", "studies", "study_shape", "rows": [one dict per config:
        config, encoder, stack (T, C, S, S), build_studies_per_s, build_s_per_study, load_crops_stacks_per_s,
        dataset_files_stacks_per_s, dataset_memory_stacks_per_s, train_stacks_per_s, batch_size, and the ratios
        files_vs_train, memory_vs_train (loading / training)]}; the table is also printed.
    """
    import torch

    from ..config import load_config
    from ..stage2.crop_cache import build_crops
    from ..io.rsna import load_train

    overrides: dict = {}
    if quick:
        config_names, n_studies, study_size, n_slices, repeats = ("demo_cls",), 2, 64, 48, 1
        overrides = {"data.image_size": 32, "data.n_slices": 4}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kit-bench-crops-") as tmp:
        root = Path(tmp) / "data"
        print(f"writing {n_studies} synthetic studies of {n_slices or 'default'} x {study_size}^2 (JPEG Lossless, "
              "with segmentations) ...", flush=True)
        uids = write_synthetic_root(root, n_studies, size=study_size, n_slices=n_slices, seed=seed)
        labels = load_train(root)
        for name in config_names:
            cfg = load_config(name, **overrides, **{"data.data_root": str(root), "data.seg_runs": [],
                                                     "data.true_masks": True,
                                                     "data.crop_dir": str(Path(tmp) / f"crops_{Path(name).stem}")})
            print(f"{name}: building crops ...", flush=True)
            built = build_crops(cfg, split="train", progress=False, prefetch=True)
            if built["failed"]:
                raise RuntimeError(f"bench crops: {built['failed']} studies failed: {built['failures']}")
            build_rate = built["built"] / built["seconds"]
            print(f"{name}: loading and training ...", flush=True)
            loading, stack = _loading_rates(cfg, uids, labels, repeats)
            bs = batch_size or (cfg.train.batch_size if device.startswith("cuda") else 2)
            train = training_rate(cfg, batch_size=bs, device=device, repeats=repeats, seed=seed)
            rows.append({"config": Path(name).stem, "encoder": cfg.model.encoder, "stack": list(stack),
                         "build_studies_per_s": round(build_rate, 3), "build_s_per_study": round(1 / build_rate, 2),
                         **{f"{k}_stacks_per_s": round(v, 1) for k, v in loading.items()},
                         "train_stacks_per_s": round(train, 2), "batch_size": bs,
                         "files_vs_train": round(loading["dataset_files"] / train, 2),
                         "memory_vs_train": round(loading["dataset_memory"] / train, 2)})
        shape = [int(v) for v in _series_shape(root, uids[0])]
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    _print_table(rows, device, threads, load, n_studies, shape)
    return {"device": device, "threads": threads, "load_average": round(load, 2), "weights": "random init (speed only)",
            "studies": n_studies, "study_shape": shape, "rows": rows}


def _series_shape(root: Path, uid: str) -> tuple[int, int, int]:
    from ..io.dicom import scan_series

    info = scan_series(root / "train_images" / uid)
    return info["slices"], info["rows"], info["cols"]


def _print_table(rows: list[dict], device: str, threads: int, load: float, n_studies: int, shape: list[int]) -> None:
    print(f"\nkit bench crops: {n_studies} synthetic studies {'x'.join(map(str, shape))} (JPEG Lossless, true masks); "
          f"classifier on {device} ({threads} torch threads, load average {load:.1f}), random init (speed only)")
    header = (f"{'config':<16} {'stack T x C x S^2':<18} {'build st/s':>10} {'load_crops':>10} {'ds files':>9} "
              f"{'ds memory':>9} {'train':>7} {'batch':>5} {'files/train':>11} {'mem/train':>9}")
    print(header)
    print(f"{'':<16} {'':<18} {'studies/s':>10} {'stacks/s':>10} {'stacks/s':>9} {'stacks/s':>9} {'stacks/s':>7}")
    print("-" * len(header))
    for r in rows:
        t, c, s, _ = r["stack"]
        print(f"{r['config']:<16} {f'{t} x {c} x {s}^2':<18} {r['build_studies_per_s']:>10.2f} "
              f"{r['load_crops_stacks_per_s']:>10.1f} {r['dataset_files_stacks_per_s']:>9.1f} "
              f"{r['dataset_memory_stacks_per_s']:>9.1f} {r['train_stacks_per_s']:>7.2f} {r['batch_size']:>5} "
              f"{r['files_vs_train']:>11.2f} {r['memory_vs_train']:>9.2f}")
    print("ds = kit.stage2.data.CropDataset per vertebra with the config's augmentation (files: each sample decompresses its "
          "own stack from its study's npz; memory: the cache held in memory); train = forward + backward. A ratio "
          ">= 1: one loading process keeps up with training.")
