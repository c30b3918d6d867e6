"""One small class per trainable stage: its datasets, loss, validation and out-of-fold (OOF) writer.

`kit.train.fit_fold` owns the loop; a task owns what differs between stages. A stage is three
registrations, each where its kind lives: its config class (`@register_config("<task>")` in
`kit.config`), its task here (`@register_task("<task>")`) and its model (`@register_model` in
`kit/models/`). The trainer, `kit.infer.load_run` and the CLI find all three by the config's `task`.

The task interface:

    task = make_task(cfg)
    train_dataset, held_out_uids = task.build()
    loss = task.loss(model, batch)                              # scalar tensor
    result = task.evaluate(model, uids, device, autocast)       # EvalResult: loss sum, count, one row per study
    metric = task.score(result.rows)                            # higher is better; NaN when nothing scored
    summary = task.write_oof(rows, run_dir, epoch)              # oof.csv + oof_summary.json

OOF files: `oof.csv` holds one row per held-out study, with metric columns named so that no stage's file can
be mistaken for another's (`dice_C1`, `zerr_C1` for the segmenter, `iou_C1` for the level model, the 8
competition targets for the classifier); `kit.report` reads them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import data as kdata
from .constants import VERTEBRAE
from .losses import level_loss, seg_loss
from .slices import LevelRecipe, SegRecipe, true_presence

TASKS: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: the task `fit_fold` uses for configs with `task: <name>`."""

    def wrap(cls: type) -> type:
        TASKS[name] = cls
        return cls

    return wrap


def make_task(cfg):
    """The task object for `cfg.task`."""
    if cfg.task not in TASKS:
        raise ValueError(f"no training task {cfg.task!r}; available: {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg)


@dataclass
class EvalResult:
    """One rank's share of a validation pass: summed loss, number of loss terms, one row per study."""

    loss_sum: float
    count: int
    rows: list[dict]


def _nan_mean(values) -> float:
    values = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _write_table(rows: list[dict], run_dir: Path, fold: int, epoch: int) -> pd.DataFrame:
    table = pd.DataFrame(rows).sort_values("StudyInstanceUID")
    table.insert(1, "fold", fold)
    table.insert(2, "epoch", epoch)
    table.to_csv(run_dir / "oof.csv", index=False)
    return table


@register_task("seg")
class SegTask:
    """Stage 1: 2.5D vertebra segmentation on the segmented studies of the cache.

    Validation segments every slice of each held-out study with the input recipe inference uses
    (`SegRecipe.batches`), cleans the probabilities as inference does (`kit.crops.clean_vertebra_probs`) and
    scores per study the 3D Dice of C1..C7 (`kit.metrics.dice_per_vertebra`) and the z-range errors
    (`kit.metrics.z_range_errors`: a missed vertebra counts as the study's slice count). The metric is the
    mean over studies of their mean Dice. A level-conditioned segmenter (`data.level_input`) is given the
    true ranges here (`kit.slices.true_presence`, unjittered), so its validation leaves out the level model's
    errors; `segment_study` with the level model measures both.
    """

    metric_name = "dice"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.recipe = SegRecipe.from_config(cfg.data)
        self.held_out: dict[str, kdata.SegVolume] = {}

    def build(self) -> tuple[kdata.SegSliceDataset, list[str]]:
        """The training dataset and the held-out study ids (their volumes stay loaded for validation)."""
        d = self.cfg.data
        train_uids, held_out = kdata.split_segmentation_studies(d)
        train = kdata.SegSliceDataset(kdata.load_volumes(d.cache_dir, train_uids, self.recipe), self.recipe,
                                      other_vertebrae=d.other_vertebrae, background_fraction=d.background_fraction,
                                      foreground_fraction=d.foreground_fraction, augment=d.augment,
                                      seed=self.cfg.seed)
        self.held_out = kdata.load_volumes(d.cache_dir, held_out, self.recipe)
        return train, held_out

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        tc = self.cfg.train
        return seg_loss(model(batch["image"]), batch["target"], tc.dice_weight, exclusive=tc.exclusive)

    def planes(self, uid: str) -> np.ndarray | None:
        """The level planes validation gives a held-out study: from its true ranges, unjittered."""
        image, labels, dz = self.held_out[uid]
        return self.recipe.planes(true_presence(labels), dz) if self.recipe.level_input else None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, uids: Sequence[str], device: torch.device, autocast) -> EvalResult:
        """Segment and score each study of `uids` (this rank's share of the held-out studies)."""
        from .crops import clean_vertebra_probs
        from .metrics import dice_per_vertebra, z_range_errors

        tc, other = self.cfg.train, self.cfg.data.other_vertebrae
        loss_sum, count, rows = 0.0, 0, []
        for uid in uids:
            image, labels, dz = self.held_out[uid]
            probs = []
            for centres, x in self.recipe.batches(image, dz, self.planes(uid), tc.val_batch_size):
                y = torch.from_numpy(kdata.labels_to_channels(labels[centres], other)).transpose(0, 1)
                with autocast():
                    logits = model(torch.from_numpy(x).to(device))
                loss_sum += float(seg_loss(logits, y.to(device), tc.dice_weight, exclusive=tc.exclusive))
                count += 1
                probs.append(torch.sigmoid(logits.float())[:, :len(VERTEBRAE)].half().cpu())
            pred = clean_vertebra_probs(torch.cat(probs).transpose(0, 1).numpy())  # (7, Z, H, W) -> labels
            dice, zerr = dice_per_vertebra(pred, labels), z_range_errors(pred, labels)
            rows.append({"StudyInstanceUID": uid, "slices": len(image),
                         **{f"dice_{k}": round(float(v), 6) for k, v in dice.items()},
                         **{f"zerr_{k}": float(v) for k, v in zerr.items()}})
        return EvalResult(loss_sum, count, rows)

    @staticmethod
    def score(rows: list[dict]) -> float:
        """Mean over studies of the per-study mean Dice (NaN-safe)."""
        return _nan_mean(r["dice_mean"] for r in rows)

    def write_oof(self, rows: list[dict], run_dir: Path, epoch: int) -> dict:
        """`oof.csv` (per held-out study: slices, dice_C1..C7, dice_mean, zerr_C1..C7, zerr_max) and
        `oof_summary.json`."""
        table = _write_table(rows, run_dir, self.cfg.data.fold, epoch)
        zerr_median = {v: float(table[f"zerr_{v}"].median()) for v in VERTEBRAE}
        summary = {
            "metric": "mean Dice over C1..C7 (3D, per study, then mean over studies)",
            "mean_dice": _nan_mean(table["dice_mean"]),
            "per_vertebra": {v: _nan_mean(table[f"dice_{v}"]) for v in VERTEBRAE},
            "z_error_median_per_vertebra": zerr_median,
            "z_error_worst_median": _nan_mean([max(zerr_median.values())]),
            "n_studies": len(table), "fold": self.cfg.data.fold, "epoch": epoch,
        }
        (run_dir / "oof_summary.json").write_text(json.dumps(summary, indent=2))
        return summary


@register_task("level")
class LevelTask:
    """Stage 1, part two: per-slice vertebra presence from whole studies (`kit.models.level`).

    Trained on the segmented studies of the fold (presence read off the masks), windows of `data.seq_len`
    steps (the model skips padded steps); validation runs each held-out study whole, as inference does.
    Metric: the mean over studies and C1..C7 of the IoU between the predicted (p > 0.5) and true sets of
    steps showing each vertebra.
    """

    metric_name = "iou"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.recipe = LevelRecipe.from_config(cfg.data)
        self.held_out: kdata.LevelSequenceDataset | None = None

    def build(self):
        d = self.cfg.data
        train_uids, held_out = kdata.split_segmentation_studies(d)
        train = kdata.LevelSequenceDataset(kdata.load_volumes(d.cache_dir, train_uids, self.recipe), self.recipe,
                                           d.seq_len, d.repeats, augment=True, z_jitter=d.z_jitter,
                                           seed=self.cfg.seed)
        self.held_out = kdata.LevelSequenceDataset(kdata.load_volumes(d.cache_dir, held_out, self.recipe),
                                                   self.recipe, seq_len=None, augment=False)
        self.held_out_index = {uid: i for i, uid in enumerate(self.held_out.uids)}
        return train, held_out

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return level_loss(model(batch["image"], batch["mask"]), batch["target"], batch["mask"])

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
            rows.append({"StudyInstanceUID": uid, "steps": len(pred),
                         **{f"iou_{v}": round(float(x), 6) for v, x in zip(VERTEBRAE, iou)},
                         "iou_mean": _nan_mean(iou)})
        return EvalResult(loss_sum, count, rows)

    @staticmethod
    def score(rows: list[dict]) -> float:
        """Mean over studies of the per-study mean IoU (NaN-safe)."""
        return _nan_mean(r["iou_mean"] for r in rows)

    def write_oof(self, rows: list[dict], run_dir: Path, epoch: int) -> dict:
        """`oof.csv` (IoU of the steps showing C1..C7 per held-out study) and `oof_summary.json`."""
        table = _write_table(rows, run_dir, self.cfg.data.fold, epoch)
        summary = {"metric": "IoU of the slices showing each of C1..C7 (per study, then mean over studies)",
                   "mean_iou": _nan_mean(table["iou_mean"]),
                   "per_vertebra": {v: _nan_mean(table[f"iou_{v}"]) for v in VERTEBRAE},
                   "n_studies": len(table), "fold": self.cfg.data.fold, "epoch": epoch}
        (run_dir / "oof_summary.json").write_text(json.dumps(summary, indent=2))
        return summary
