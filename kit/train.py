"""`fit_fold(cfg)`: the one explicit training loop, shared by every stage through a small task object.

The loop owns what every stage needs: seeding, devices, DDP (torchrun), AMP, gradient accumulation and
clipping, timm's AdamW + per-step warmup/cosine schedule, EMA weights, checkpoints with resume, early
stopping, logs. A task (`kit.tasks`) owns what differs: which datasets, the loss, how the held-out studies
are scored and how their out-of-fold (OOF) predictions are written; the config names the model
(`cfg.model_spec()`).

Outputs in `runs/<config name>/fold<k>/`:
    config.yaml        the resolved config
    model.pt           best weights (EMA when on): {"model", "model_name", "model_kwargs", "config", "epoch",
                       "metric", "metric_name"}
    last.pt            everything to resume: model, ema, optimizer, scaler, epoch, step, best, history
    log.csv, log.json  one row per epoch: train_loss, val_loss, val_<metric>, lr, seconds
    oof.csv, oof_summary.json   the held-out studies scored by the best weights (written by the task)

Multi-GPU / multi-node: `torchrun --nproc_per_node N -m kit.cli train ...` (or any script calling
`fit_fold`); RANK / WORLD_SIZE / LOCAL_RANK come from the environment, without them it is one process.
Batch size is per process. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from .progress import progress_bar

from .config import config_to_dict, load_config, save_config
from .devices import cuda_half_dtype, has_native_bf16
from .io.files import replace_atomic
from .models import create_model
from .sections import SourceConfig
from .tasks import make_task

log = logging.getLogger("kit.train")

# ---------------------------------------------------------------------------------------------------------
# Processes, devices, precision, seeds
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """This process's place in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owner: bool = False  # this call initialised the process group, so it destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK; a plain process without them.

    The backend is nccl when this process trains on a GPU, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(rank, world, local, owner=False)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, owner=True)


def close_distributed(info: DistInfo) -> None:
    """Destroy the process group if `init_distributed` made it."""
    if info.owner and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def pick_device(name: str, info: DistInfo) -> torch.device:
    """"auto" -> this rank's GPU if there is one, else CPU; "cuda" under torchrun -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but torch sees no GPU; use train.device=cpu or auto")
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.amp on this device; None = full precision.

    "auto": bf16 on GPUs that have it in hardware, else fp16 (a T4's tensor cores; `kit.devices`); off on CPU.
    "bf16"/"fp16" force it (fp16 only on CUDA); a forced bf16 on a GPU that only emulates it is kept, with a warning.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return cuda_half_dtype(device)
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; on CPU use bf16 or off")
    if amp == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        log.warning("train.amp=bf16 on %s (compute capability %s), which only emulates bfloat16: slow; "
                    "train.amp=auto or fp16 uses its fp16 tensor cores", torch.cuda.get_device_name(device),
                    ".".join(map(str, torch.cuda.get_device_capability(device))))
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def loader_workers(requested: int, world_size: int = 1) -> int:
    """data.num_workers capped at this process's share of the CPUs it may run on (a config written for an
    8-core box on a 4-core Kaggle notebook or a 2-core Colab: more workers than cores only contend)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(requested, cpus // max(world_size, 1))
    if workers < requested:
        log.info("data.num_workers %d -> %d: %d CPU(s) for %d process(es)", requested, workers, cpus, world_size)
    return workers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather(obj: Any, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _atomic_save(obj: Any, path: Path) -> None:
    replace_atomic(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def _summary(state: dict, cfg, run_dir: Path, info: DistInfo) -> dict:
    oof = run_dir / "oof_summary.json"
    return {
        "run_dir": str(run_dir),
        "epochs_done": state["epoch"],
        "finished": state["early_stopped"] or state["epoch"] >= cfg.train.epochs,
        "early_stopped": state["early_stopped"],
        "best_epoch": state["best_epoch"],
        f"best_{state['metric_name']}": state["best_metric"],
        "world_size": info.world_size,
        "oof": json.loads(oof.read_text()) if oof.is_file() else None,
    }


def _write_logs(history: list[dict], run_dir: Path) -> None:
    pd.DataFrame(history).to_csv(run_dir / "log.csv", index=False)
    (run_dir / "log.json").write_text(json.dumps(history, indent=2))


def _to_device(value, device: torch.device, channels_last: bool = False):
    """A batch entry on `device`; 4D float tensors in channels-last layout when asked (non-tensors untouched)."""
    if not torch.is_tensor(value):
        return value
    value = value.to(device, non_blocking=True)
    if channels_last and value.ndim == 4 and value.is_floating_point():
        value = value.contiguous(memory_format=torch.channels_last)
    return value


def optimizer_step(model: nn.Module, optimizer, scaler: torch.amp.GradScaler, clip_grad: float | None) -> bool:
    """Clip, step through the GradScaler and clear the gradients; True when the optimizer really stepped.

    With fp16 the scaler skips a step whose gradients hold inf/NaN (and lowers its scale): the caller must then
    not count it, so the learning-rate schedule and the EMA move only with the weights.
    """
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale_before is None or scaler.get_scale() >= scale_before


def group_step(model: nn.Module, optimizer, scaler: torch.amp.GradScaler, clip_grad: float | None,
               finite_batches: int) -> bool:
    """`optimizer_step` for one accumulation group, unless none of its batches had a finite loss and no gradient
    arrived from another DDP rank either: then nothing moves (no momentum or weight-decay step on zero
    gradients) and the caller counts no step. True when the optimizer really stepped."""
    if finite_batches == 0 and all(p.grad is None or not p.grad.any() for p in model.parameters()):
        optimizer.zero_grad(set_to_none=True)
        return False
    return optimizer_step(model, optimizer, scaler, clip_grad)


def _no_gradient(model: nn.Module) -> torch.Tensor:
    """A zero loss that reaches every trainable parameter: stands in for a non-finite one, so the batch adds no
    gradient while every DDP rank still runs its backward pass over every parameter."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def _report_skipped(uids: list[str], epoch: int, run_dir: Path, cfg) -> None:
    """Log the studies of the batches left out for a non-finite loss and add them to `skipped_batches.csv`."""
    counts = pd.Series(uids).value_counts()
    path = run_dir / "skipped_batches.csv"
    log.warning("%s fold%d epoch %d: %d samples in batches with a non-finite loss added no gradient (studies: %s); "
                "listed in %s", cfg.name, cfg.data.fold, epoch, len(uids), ", ".join(counts.index[:5]) +
                (" ..." if len(counts) > 5 else ""), path)
    rows = pd.DataFrame({"epoch": epoch, "StudyInstanceUID": counts.index, "samples": counts.to_numpy()})
    rows.to_csv(path, mode="a", header=not path.is_file(), index=False)


def _report_unreadable(skipped: dict[str, str], run_dir: Path, cfg) -> None:
    """List the studies a task left out because their cached file could not be read in `skipped_studies.csv`
    (StudyInstanceUID, reason); without any, a stale list of an earlier build is removed."""
    path = run_dir / "skipped_studies.csv"
    if not skipped:
        path.unlink(missing_ok=True)
        return
    pd.DataFrame({"StudyInstanceUID": list(skipped), "reason": list(skipped.values())}).to_csv(path, index=False)
    log.warning("%s fold%d: %d studies left out, their cached files unreadable (e.g. %s); listed in %s", cfg.name,
                cfg.data.fold, len(skipped), ", ".join(list(skipped)[:3]), path)


def improved(metric: float, best: float, best_epoch: int) -> bool:
    """A validation metric (higher is better) that beats the best so far; NaN never does, and never becomes the
    best, so a NaN epoch cannot block the checkpoints of the epochs after it."""
    if not np.isfinite(metric):
        return False
    return best_epoch < 0 or not np.isfinite(best) or metric > best


def fit_fold(cfg, task=None) -> dict:
    """Train one fold of a config to completion, resuming from `last.pt` when there is one.

    Args:
        cfg: a resolved config (`load_config(...)`); `cfg.data.fold` is the held-out fold.
        task: the task object (default: `make_task(cfg)`).

    Returns:
        Summary: run_dir, epochs_done, finished, early_stopped, best_epoch, best_<metric>, world_size, oof.
        A run that is already finished returns its summary without training.
    """
    info = init_distributed(cfg.train.device)
    try:
        return _fit(cfg, task if task is not None else make_task(cfg), info)
    finally:
        close_distributed(info)


def _fit(cfg, task, info: DistInfo) -> dict:
    tc, oc = cfg.train, cfg.optim
    run_dir, start_time = cfg.run_dir, time.perf_counter()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = pick_device(tc.device, info)
    last_path = run_dir / "last.pt"
    state = torch.load(last_path, map_location="cpu", weights_only=True) if tc.resume and last_path.is_file() else None
    now = config_to_dict(cfg)
    if state is not None and (changed := _other_studies(state["config"], now)):
        # a run of other studies (another dataset, cache or split) is never resumed: set aside whole, not lost
        # named so that no fold* pattern (loaders, reports) finds it
        aside = run_dir.with_name(f"set-aside-{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if info.main:
            run_dir.rename(aside)
        log.warning("%s was trained on other studies (%s); set aside as %s, training afresh", run_dir,
                    ", ".join(f"data.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), aside)
        state = None
    if tc.epochs == 0 and not getattr(cfg.model, "pretrained_weights", None):
        raise ValueError(f"{cfg.name}: train.epochs=0 validates starting weights without training, but "
                         "model.pretrained_weights names none: give it weights, or train.epochs >= 1")
    if state is not None and (state["early_stopped"] or state["epoch"] >= tc.epochs):
        log.info("%s: finished (%d epochs), nothing to do", run_dir, state["epoch"])
        return _summary(state, cfg, run_dir, info)
    if state is not None:
        _warn_config_changes(state["config"], now)
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    seed_everything(cfg.seed)
    model_name, model_kwargs = cfg.model_spec()
    # local backbone weights only when starting fresh; a resumed run gets its own weights from last.pt
    pretrained = cfg.model.pretrained_weights if state is None else None
    model = create_model(model_name, **model_kwargs, pretrained_weights=pretrained)
    if tc.sync_bn and info.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    train_ds, held_out = task.build()
    if info.main:
        _report_unreadable(getattr(task, "skipped_studies", None) or {}, run_dir, cfg)
    if not held_out:
        raise ValueError(f"{cfg.name} fold {cfg.data.fold}: no held-out study left to validate on "
                         f"(unreadable files: {run_dir / 'skipped_studies.csv'})")
    if state is None and hasattr(task, "init_model"):  # data-dependent initialisation (before EMA copies it)
        task.init_model(model)
    sampler = (DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=True)
               if info.world_size > 1 else None)
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=loader_workers(cfg.data.num_workers, info.world_size), drop_last=True,
                        pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{len(train_ds)} training samples per epoch give no full batch of {tc.batch_size}"
                         f"{f' on each of {info.world_size} processes' if info.world_size > 1 else ''}")
    steps_per_epoch = -(-len(loader) // tc.accum_steps)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    # foreach: one multi-tensor update over all parameters (torch picks it by itself on CUDA only; on a CPU it
    # takes ~45 % off the update of these many small tensors, docs/benchmarks.md)
    optimizer = create_optimizer_v2(model, opt=oc.opt, lr=oc.lr, weight_decay=oc.weight_decay, foreach=True)
    total = max(tc.epochs, 1) * steps_per_epoch
    warmup = min(int(round(oc.warmup_epochs * steps_per_epoch)), total - 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=oc.lr * oc.min_lr_ratio,
                                  warmup_t=warmup, warmup_lr_init=oc.lr * 0.01, warmup_prefix=True,
                                  t_in_epochs=False)
    dtype = amp_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True) if tc.ema else None

    epoch, step, best, best_epoch, bad, history, early = 0, 0, float("-inf"), -1, 0, [], False
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        epoch, step, history = state["epoch"], state["step"], state["history"]
        best, best_epoch, bad = state["best_metric"], state["best_epoch"], state["bad_epochs"]
        log.info("%s: resuming after epoch %d (step %d)", run_dir, epoch, step)
    scheduler.step_update(step)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.world_size > 1 else model

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def validate(row: dict) -> None:
        """Score the held-out studies with the EMA (else the plain) weights into `row`; a better score saves
        `model.pt` and `oof.csv`; a worse one counts towards early stopping."""
        nonlocal best, best_epoch, bad, early
        eval_model = ema.module if ema is not None else model
        eval_model.eval()
        part = task.evaluate(eval_model, held_out[info.rank::info.world_size], device, autocast)
        parts = _gather(part, info)
        rows = [r for p in parts for r in p.rows]
        metric = task.score(rows)
        row["val_loss"] = sum(p.loss_sum for p in parts) / max(sum(p.count for p in parts), 1)
        row[f"val_{task.metric_name}"] = metric
        if improved(metric, best, best_epoch):
            best, best_epoch, bad = metric, epoch, 0
            if info.main:
                _atomic_save({"model": eval_model.state_dict(), "model_name": model_name,
                              "model_kwargs": model_kwargs, "config": config_to_dict(cfg), "epoch": epoch,
                              "metric": metric, "metric_name": task.metric_name}, run_dir / "model.pt")
                task.write_oof(rows, run_dir, epoch)
        else:
            bad += 1
            early = tc.patience is not None and bad >= tc.patience

    def finish_epoch(row: dict, t0: float) -> None:
        """Log the epoch's row and save everything a resumed run needs (`last.pt`)."""
        nonlocal state
        row["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        state = {"model": model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                 "best_metric": best, "best_epoch": best_epoch, "bad_epochs": bad, "early_stopped": early,
                 "metric_name": task.metric_name, "history": history, "config": config_to_dict(cfg)}
        if info.main:
            _atomic_save(state, last_path)
            _write_logs(history, run_dir)
            log.info("%s epoch %d: %s", cfg.name, epoch, {k: round(v, 5) for k, v in row.items()})
        barrier(info)

    epochs_this_call = 0
    while epoch < tc.epochs and not early:
        t0 = time.perf_counter()
        seed_everything(cfg.seed + 1_000 * (epoch + 1) + info.rank)  # resume replays the same epoch exactly
        train_ds.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        loss_sum, n_batches, n = 0.0, 0, len(loader)
        skipped: list[str] = []  # studies of the batches whose loss was not finite
        finite_in_group = 0
        bar = progress_bar(loader, desc=f"{cfg.name} fold{cfg.data.fold} epoch {epoch + 1}/{tc.epochs}", leave=False,
                           enabled=info.main and tc.progress)
        for i, batch in enumerate(bar):
            batch = {k: _to_device(v, device, tc.channels_last) for k, v in batch.items()}
            group = min(tc.accum_steps, n - (i // tc.accum_steps) * tc.accum_steps)  # last group may be short
            do_step = (i + 1) % tc.accum_steps == 0 or i + 1 == n
            sync = net.no_sync() if info.world_size > 1 and not do_step else contextlib.nullcontext()
            with sync:
                with autocast():
                    loss = task.loss(net, batch)
                value = float(loss.detach())
                finite = bool(np.isfinite(value))
                if finite:
                    finite_in_group += 1
                else:  # a bad study or a diverging step: the batch adds no gradient
                    skipped += [str(u) for u in batch.get("uid", ())] or [f"batch {i}"]
                    loss = _no_gradient(model)
                scaler.scale(loss / group).backward()
            if do_step:
                stepped = group_step(model, optimizer, scaler, oc.clip_grad, finite_in_group)
                finite_in_group = 0
                if stepped:  # a skipped step (inf/NaN gradients, no finite batch) moves neither schedule nor EMA
                    step += 1
                    scheduler.step_update(step)
                    if ema is not None:
                        ema.update(model, step=step)
            if finite:
                loss_sum, n_batches = loss_sum + value, n_batches + 1
            if i % 10 == 0 and n_batches:
                bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}")
        epoch += 1
        sums = _gather((loss_sum, n_batches), info)
        train_loss = float(np.mean([s / c for s, c in sums if c])) if any(c for _, c in sums) else float("nan")
        skipped = [u for part in _gather(skipped, info) for u in part]
        if skipped and info.main:
            _report_skipped(skipped, epoch, run_dir, cfg)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": float("nan"),
               f"val_{task.metric_name}": float("nan"), "lr": optimizer.param_groups[0]["lr"]}

        if epoch % tc.val_every == 0 or epoch == tc.epochs:
            validate(row)
        finish_epoch(row, t0)
        epochs_this_call += 1
        if tc.stop_after_epochs is not None and epochs_this_call >= tc.stop_after_epochs:
            break
    if tc.epochs == 0 and state is None:  # no training: the starting weights, initialised for this fold
        t0 = time.perf_counter()
        row = {"epoch": 0, "train_loss": float("nan"), "val_loss": float("nan"),
               f"val_{task.metric_name}": float("nan"), "lr": 0.0}
        validate(row)
        finish_epoch(row, t0)
    summary = _summary(state, cfg, run_dir, info)
    summary["seconds"] = round(time.perf_counter() - start_time, 1)
    return summary


_VOLATILE = {"train.stop_after_epochs", "train.resume", "train.progress", "train.threads", "data.num_workers"}


#: data keys that say which studies a run learns from (the studies and their split, and the folder its inputs are
#: read from): a run whose saved values differ trained on other studies
_STUDY_KEYS = tuple(f.name for f in fields(SourceConfig) if f.name != "window") + ("cache_dir", "crop_dir")


def _other_studies(old: dict, new: dict) -> dict:
    """{key: (saved, now)} for the `_STUDY_KEYS` of the data section that differ; empty when the same studies."""
    a, b = old.get("data", {}), new.get("data", {})
    return {k: (a.get(k), b.get(k)) for k in _STUDY_KEYS if k in b and a.get(k) != b.get(k)}


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    """Log config keys that changed since the run started (resuming with them may not be what you want)."""
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{path}.")
        elif a != b and path not in _VOLATILE:
            log.warning("resuming with %s changed: %r -> %r", path, a, b)


def train_folds(config: str, folds: Sequence[int] = (0,), **overrides) -> list[dict]:
    """`fit_fold` for several folds of one config (the notebook / CLI entry)."""
    return [fit_fold(load_config(config, **{**overrides, "data.fold": int(k)})) for k in folds]
