"""`fit_fold(cfg)`: the one explicit training loop, shared by every stage through a small task object.

The loop owns what every stage needs: seeding, devices, DDP (torchrun), AMP, gradient accumulation and
clipping, timm's AdamW + per-step warmup/cosine schedule, EMA weights, checkpoints with resume, early
stopping, logs. A task owns what differs: which model and datasets, the loss, how the held-out studies
are scored and how their out-of-fold (OOF) predictions are written (`SegTask` here; the stage-2
classifier adds its own with `@register_task("cls")`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import data as kdata
from .config import config_to_dict, load_config, save_config
from .constants import VERTEBRAE
from .models import create_model

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

    "auto": bf16 on GPUs that support it, else fp16; off on CPU. "bf16"/"fp16" force it (fp16 only on CUDA).
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; on CPU use bf16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Tasks: what differs between stages
# ---------------------------------------------------------------------------------------------------------

TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: the task `fit_fold` uses for configs with `task: <name>`."""

    def wrap(cls: type) -> type:
        TASKS[name] = cls
        return cls

    return wrap


@dataclass
class EvalResult:
    """One rank's share of a validation pass: summed loss, number of loss terms, one row per study."""

    loss_sum: float
    count: int
    rows: list[dict]


def seg_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, *, exclusive: bool = False,
             eps: float = 1.0) -> torch.Tensor:
    """Pixel loss + dice_weight x (1 - soft Dice), the Dice taken per channel over the whole batch and averaged
    over the channels that have a positive pixel in the batch (smp's DiceLoss does the same).

    Pixel loss: per-channel BCE; with `exclusive`, the cross-entropy of softmax([0, logits]) against the
    integer label instead (a background logit fixed at 0 in front of the C channels). True labels never
    overlap, so this makes neighbouring levels compete for a pixel. The sigmoid of each channel still reads
    as its probability against background: where a channel wins the softmax, its sigmoid is above 0.5.

    Why not Dice per slice (`kit.losses.bce_dice_loss`): a slice shows at most one or two of the 7 vertebrae,
    so per (slice, channel) Dice is dominated by empty channels that reward predicting nothing, and the
    network collapses to all-background. Nor Dice over absent channels: a batch without C1 would push C1
    to zero everywhere.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, C, H, W) in {0, 1}; at most one channel set per pixel when `exclusive`.
    """
    logits, target = logits.float(), target.float()
    if exclusive:  # cross-entropy of softmax([0, logits]) written out (3x faster on CPU than F.pad + F.cross_entropy)
        top = logits.amax(1, keepdim=True).clamp(min=0.0)
        lse = top[:, 0] + torch.log(torch.exp(-top[:, 0]) + torch.exp(logits - top).sum(1))
        pixel = (lse - (logits * target).sum(1)).mean()
    else:
        pixel = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dims = (0, *range(2, logits.ndim))
    truth = target.sum(dims)
    dice = (2.0 * (prob * target).sum(dims) + eps) / (prob.sum(dims) + truth + eps)
    present = truth > 0
    if not present.any():
        return pixel
    return pixel + dice_weight * (1.0 - dice[present]).mean()


@register_task("seg")
class SegTask:
    """Stage 1: 2.5D vertebra segmentation on the segmented studies of the cache.

    Validation segments every slice of each held-out study, cleans the probabilities as inference does
    (`kit.crops.clean_vertebra_probs`) and scores the 3D Dice of C1..C7 per study
    (`kit.metrics.dice_per_vertebra`); the metric is the mean over studies of their mean Dice. A
    level-conditioned segmenter (`data.level_input`) is given the true ranges here, so its validation
    Dice leaves out the level model's errors; `segment_study` with the level model measures both.
    """

    metric_name = "dice"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.held_out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def model_spec(self) -> tuple[str, dict]:
        """Registered model name and its plain kwargs (what `model.pt` records)."""
        d, m = self.cfg.data, self.cfg.model
        return m.name, {"in_channels": kdata.n_input_slices(d.context, d.context_offsets_mm)
                        + (kdata.N_VERTEBRAE if d.level_input else 0),
                        "classes": kdata.n_seg_classes(d.other_vertebrae),
                        "encoder": m.encoder, "encoder_depth": m.encoder_depth, "decoder_width": m.decoder_width}

    def build(self) -> tuple[kdata.SegSliceDataset, list[str]]:
        """The training dataset and the held-out study ids (their volumes stay loaded for validation)."""
        d = self.cfg.data
        train_uids, held_out = kdata.split_segmentation_studies(d)
        train = kdata.SegSliceDataset(kdata.load_volumes(d.cache_dir, train_uids, d.image_size), d.context,
                                      context_stride=d.context_stride, context_mm=d.context_mm,
                                      offsets_mm=d.context_offsets_mm,
                                      other_vertebrae=d.other_vertebrae, background_fraction=d.background_fraction,
                                      foreground_fraction=d.foreground_fraction, augment=d.augment,
                                      seed=self.cfg.seed, level_input=d.level_input,
                                      level_jitter_mm=d.level_jitter_mm, level_ramp_mm=d.level_ramp_mm,
                                      level_margin_mm=d.level_margin_mm)
        self.held_out = kdata.load_volumes(d.cache_dir, held_out, d.image_size)
        return train, held_out

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        tc = self.cfg.train
        return seg_loss(model(batch["image"]), batch["target"], tc.dice_weight, exclusive=tc.exclusive)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, uids: Sequence[str], device: torch.device, autocast) -> EvalResult:
        """Segment and score each study of `uids` (this rank's share of the held-out studies)."""
        from .crops import clean_vertebra_probs
        from .metrics import dice_per_vertebra

        d, bs = self.cfg.data, self.cfg.train.val_batch_size
        loss_sum, count, rows = 0.0, 0, []
        for uid in uids:
            image, labels, dz = self.held_out[uid]
            offsets = kdata.context_offsets(dz, d.context, d.context_stride, d.context_mm, d.context_offsets_mm)
            ranges = kdata.vertebra_ranges(labels) if d.level_input else None
            probs = []
            for start in range(0, len(image), bs):
                x = kdata.slice_stacks(image, d.context, start, start + bs, offsets=offsets)
                x = torch.from_numpy(x).to(device)
                if ranges is not None:  # the true ranges, unjittered: validation measures the segmenter
                    present = np.stack([kdata.soft_presence(ranges, z, dz, ramp_mm=d.level_ramp_mm,
                                                              margin_mm=d.level_margin_mm)
                                        for z in range(start, start + len(x))])
                    x = kdata.append_level_planes(x.float(), torch.from_numpy(present * 255.0))
                y = torch.from_numpy(kdata.labels_to_channels(labels[start:start + bs], d.other_vertebrae))
                with autocast():
                    logits = model(x.float() / 255.0)
                loss_sum += float(seg_loss(logits, y.transpose(0, 1).to(device), self.cfg.train.dice_weight,
                                           exclusive=self.cfg.train.exclusive))
                count += 1
                probs.append(torch.sigmoid(logits.float())[:, :len(VERTEBRAE)].half().cpu())
            probs = torch.cat(probs).transpose(0, 1).numpy()  # (7, Z, H, W)
            dice = dice_per_vertebra(clean_vertebra_probs(probs), labels)
            rows.append({"StudyInstanceUID": uid, "slices": len(image), **dice.round(6).to_dict()})
        return EvalResult(loss_sum, count, rows)

    @staticmethod
    def score(rows: list[dict]) -> float:
        """Mean over studies of the per-study mean Dice (NaN-safe)."""
        values = [r["mean"] for r in rows if np.isfinite(r["mean"])]
        return float(np.mean(values)) if values else float("nan")

    def write_oof(self, rows: list[dict], run_dir: Path, epoch: int) -> dict:
        """`oof.csv` (one row per held-out study: Dice of C1..C7 and their mean) and `oof_summary.json`."""
        table = pd.DataFrame(rows).sort_values("StudyInstanceUID")
        table.insert(1, "fold", self.cfg.data.fold)
        table.insert(2, "epoch", epoch)
        table.to_csv(run_dir / "oof.csv", index=False)
        summary = {
            "metric": "mean Dice over C1..C7 (3D, per study, then mean over studies)",
            "mean_dice": float(table["mean"].mean()),  # NaN-skipping, as `score`
            "per_vertebra": {v: float(table[v].mean()) for v in VERTEBRAE},
            "n_studies": len(table),
            "fold": self.cfg.data.fold,
            "epoch": epoch,
        }
        (run_dir / "oof_summary.json").write_text(json.dumps(summary, indent=2))
        return summary


@register_task("level")
class LevelTask:
    """Stage 1, part two: per-slice vertebra presence from whole studies (`kit.models.level`).

    Trained on the segmented studies of the fold (presence read off the masks), windows of `data.seq_len`
    steps; validation runs each held-out study whole. Metric: the mean over studies and C1..C7 of the IoU
    between the predicted (p > 0.5) and true sets of steps showing each vertebra.
    """

    metric_name = "iou"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.held_out: kdata.LevelSequenceDataset | None = None

    def model_spec(self) -> tuple[str, dict]:
        d, m = self.cfg.data, self.cfg.model
        return m.name, {"in_channels": 2 * d.neighbours + 1, "classes": len(VERTEBRAE), "encoder": m.encoder,
                        "hidden": m.hidden}

    def build(self):
        d = self.cfg.data
        train_uids, held_out = kdata.split_segmentation_studies(d)
        train = kdata.LevelSequenceDataset(kdata.load_volumes(d.cache_dir, train_uids, d.image_size), d.slice_mm,
                                           d.neighbours, d.seq_len, d.repeats, augment=True, z_jitter=d.z_jitter,
                                           seed=self.cfg.seed)
        self.held_out = kdata.LevelSequenceDataset(kdata.load_volumes(d.cache_dir, held_out, d.image_size),
                                                   d.slice_mm, d.neighbours, seq_len=None, augment=False)
        self.held_out_index = {uid: i for i, uid in enumerate(self.held_out.uids)}
        return train, held_out

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return level_loss(model(batch["image"]), batch["target"], batch["mask"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, uids: Sequence[str], device: torch.device, autocast) -> EvalResult:
        loss_sum, count, rows = 0.0, 0, []
        for uid in uids:
            sample = self.held_out[self.held_out_index[uid]]
            with autocast():
                logits = model(sample["image"][None].to(device))[0].float()
            target = sample["target"].to(device)
            loss_sum += float(level_loss(logits, target, sample["mask"].to(device)))
            count += 1
            pred, true = (logits > 0).cpu().numpy(), target.cpu().numpy() > 0.5
            union = (pred | true).sum(0)
            iou = np.where(union > 0, (pred & true).sum(0) / np.maximum(union, 1), np.nan)
            rows.append({"StudyInstanceUID": uid, "steps": len(pred), **dict(zip(VERTEBRAE, iou.round(6))),
                         "mean": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")})
        return EvalResult(loss_sum, count, rows)

    score = staticmethod(SegTask.score)

    def write_oof(self, rows: list[dict], run_dir: Path, epoch: int) -> dict:
        """`oof.csv` (IoU of the steps showing C1..C7 per held-out study) and `oof_summary.json`."""
        table = pd.DataFrame(rows).sort_values("StudyInstanceUID")
        table.insert(1, "fold", self.cfg.data.fold)
        table.insert(2, "epoch", epoch)
        table.to_csv(run_dir / "oof.csv", index=False)
        summary = {"metric": "IoU of the slices showing each of C1..C7 (per study, then mean over studies)",
                   "mean_iou": float(table["mean"].mean()),
                   "per_vertebra": {v: float(table[v].mean()) for v in VERTEBRAE},
                   "n_studies": len(table), "fold": self.cfg.data.fold, "epoch": epoch}
        (run_dir / "oof_summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def level_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE of per-step presence logits (..., T, 7) against 0/1 targets, averaged over unpadded steps."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").mean(-1)
    return (bce * mask).sum() / mask.sum().clamp(min=1.0)


def make_task(cfg):
    """The task object for `cfg.task`."""
    if cfg.task not in TASKS:
        raise ValueError(f"no training task {cfg.task!r}; available: {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg)


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
    if state is not None and (state["early_stopped"] or state["epoch"] >= tc.epochs):
        log.info("%s: finished (%d epochs), nothing to do", run_dir, state["epoch"])
        return _summary(state, cfg, run_dir, info)
    if state is not None:
        _warn_config_changes(state["config"], config_to_dict(cfg))
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    seed_everything(cfg.seed)
    model_name, model_kwargs = task.model_spec()
    # local backbone weights only when starting fresh; a resumed run gets its own weights from last.pt
    pretrained = cfg.model.pretrained_weights if state is None else None
    model = create_model(model_name, **model_kwargs, pretrained_weights=pretrained)
    if tc.sync_bn and info.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    train_ds, held_out = task.build()
    sampler = (DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=True)
               if info.world_size > 1 else None)
    loader = DataLoader(train_ds, batch_size=tc.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.data.num_workers, drop_last=True, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{len(train_ds)} training samples per epoch give no full batch of {tc.batch_size}"
                         f"{f' on each of {info.world_size} processes' if info.world_size > 1 else ''}")
    steps_per_epoch = -(-len(loader) // tc.accum_steps)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    optimizer = create_optimizer_v2(model, opt=oc.opt, lr=oc.lr, weight_decay=oc.weight_decay)
    total = tc.epochs * steps_per_epoch
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

    epochs_this_call = 0
    while epoch < tc.epochs and not early:
        t0 = time.perf_counter()
        seed_everything(cfg.seed + 1_000 * (epoch + 1) + info.rank)  # resume replays the same epoch exactly
        train_ds.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        loss_sum, n_batches, n = 0.0, 0, len(loader)
        bar = tqdm(loader, desc=f"{cfg.name} fold{cfg.data.fold} epoch {epoch + 1}/{tc.epochs}", leave=False,
                   disable=not (info.main and tc.progress))
        for i, batch in enumerate(bar):
            batch = {k: _to_device(v, device, tc.channels_last) for k, v in batch.items()}
            group = min(tc.accum_steps, n - (i // tc.accum_steps) * tc.accum_steps)  # last group may be short
            do_step = (i + 1) % tc.accum_steps == 0 or i + 1 == n
            sync = net.no_sync() if info.world_size > 1 and not do_step else contextlib.nullcontext()
            with sync:
                with autocast():
                    loss = task.loss(net, batch)
                scaler.scale(loss / group).backward()
            if do_step:
                if oc.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), oc.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(model, step=step)
            loss_sum, n_batches = loss_sum + float(loss.detach()), n_batches + 1
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}")
        epoch += 1
        train_loss = float(np.mean([s / c for s, c in _gather((loss_sum, n_batches), info)]))
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": float("nan"),
               f"val_{task.metric_name}": float("nan"), "lr": optimizer.param_groups[0]["lr"]}

        if epoch % tc.val_every == 0 or epoch == tc.epochs:
            eval_model = ema.module if ema is not None else model
            eval_model.eval()
            part = task.evaluate(eval_model, held_out[info.rank::info.world_size], device, autocast)
            parts = _gather(part, info)
            rows = [r for p in parts for r in p.rows]
            metric = task.score(rows)
            row["val_loss"] = sum(p.loss_sum for p in parts) / max(sum(p.count for p in parts), 1)
            row[f"val_{task.metric_name}"] = metric
            if best_epoch < 0 or metric > best:
                best, best_epoch, bad = metric, epoch, 0
                if info.main:
                    _atomic_save({"model": eval_model.state_dict(), "model_name": model_name,
                                  "model_kwargs": model_kwargs, "config": config_to_dict(cfg), "epoch": epoch,
                                  "metric": metric, "metric_name": task.metric_name}, run_dir / "model.pt")
                    task.write_oof(rows, run_dir, epoch)
            else:
                bad += 1
                early = tc.patience is not None and bad >= tc.patience
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
        epochs_this_call += 1
        if tc.stop_after_epochs is not None and epochs_this_call >= tc.stop_after_epochs:
            break
    summary = _summary(state, cfg, run_dir, info)
    summary["seconds"] = round(time.perf_counter() - start_time, 1)
    return summary


_VOLATILE = {"train.stop_after_epochs", "train.resume", "train.progress", "train.threads", "data.num_workers"}


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
