"""One small class per trainable stage: its datasets, loss, validation and out-of-fold (OOF) writer.

`kit.train.fit_fold` owns the loop; a task owns what differs between stages. Each stage's entry in
`kit.stages.STAGES` names its task class here, its config class and its report; the trainer finds the task
by the config's `task` (`make_task`), the model by the config's `model_spec()` (`kit.models`).

The task interface:

    task = make_task(cfg)
    train_dataset, held_out_uids = task.build()
    loss = task.loss(model, batch)                              # scalar tensor
    result = task.evaluate(model, uids, device, autocast)       # EvalResult: loss sum, count, one row per study
    metric = task.score(result.rows)                            # higher is better; NaN when nothing scored
    summary = task.write_oof(rows, run_dir, epoch)              # oof.csv + oof_summary.json

OOF files: `oof.csv` holds one row per held-out study, with metric columns named so that no stage's file can
be mistaken for another's (`dice_C1`, `zerr_C1` for the segmenter, `iou_C1` for the level model, the 8
competition targets for the classifier); `kit.evaluate.report` reads them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .constants import PROB_CLIP, TARGETS, VERTEBRAE
from .losses import combine_logits, competition_loss, level_loss, seg_loss, slice_bce_loss, vertebra_loss
from .io.files import write_csv_atomic
from .evaluate.metrics import (VERTEBRA_LOSS_ODDS, complete_targets, effective_odds, logit, scale_odds,
                      targets_from_vertebrae)
from .models.level import level_presence_probs
from .data import split_by_fold
from .stage1.data import (LevelSequenceDataset, SegSliceDataset, SegVolume, labels_to_channels, load_volumes,
                          split_segmentation_studies)
from .stage2.data import CropDataset, crop_uids
from .stage1.recipe import LevelRecipe, SegRecipe, true_presence

log = logging.getLogger("kit.tasks")

def make_task(cfg):
    """The task object for `cfg.task` (its stage's task class, `kit.stages`).

    Raises:
        ValueError: no stage has that task.
    """
    from .stages import STAGES

    if cfg.task not in STAGES:
        raise ValueError(f"no training task {cfg.task!r}; available: {', '.join(STAGES)}")
    return STAGES[cfg.task].task_class()(cfg)


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
    write_csv_atomic(table, run_dir / "oof.csv")
    return table


class SegTask:
    """Stage 1: 2.5D vertebra segmentation on the segmented studies of the cache.

    Validation segments every slice of each held-out study with the input recipe inference uses
    (`SegRecipe.batches`), cleans the probabilities as inference does (`kit.stage1.postprocess.clean_vertebra_probs`) and
    scores per study the 3D Dice of C1..C7 (`kit.evaluate.metrics.dice_per_vertebra`) and the z-range errors
    (`kit.evaluate.metrics.z_range_errors`: a missed vertebra counts as the study's slice count). The metric is the
    mean over studies of their mean Dice. A level-conditioned segmenter (`data.level_input`) is given the
    true ranges here (`kit.stage1.recipe.true_presence`, unjittered), and its clean-up uses them as inference's uses
    the level model's, so its validation leaves out the level model's errors; `segment_study` with the level
    model measures both.
    """

    metric_name = "dice"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.recipe = SegRecipe.from_config(cfg.data)
        self.held_out: dict[str, SegVolume] = {}

    def build(self) -> tuple[SegSliceDataset, list[str]]:
        """The training dataset and the held-out study ids (their volumes stay loaded for validation)."""
        d = self.cfg.data
        self.skipped_studies: dict[str, str] = {}  # unreadable cache files, left out (kit.train lists them)
        train_uids, held_out = split_segmentation_studies(d, self.skipped_studies)
        train = SegSliceDataset(load_volumes(d.cache_dir, train_uids, self.recipe, self.skipped_studies),
                                      self.recipe,
                                      other_vertebrae=d.other_vertebrae, background_fraction=d.background_fraction,
                                      foreground_fraction=d.foreground_fraction, end_weight=d.end_weight,
                                      end_mm=d.end_mm, augment=d.augment,
                                      seed=self.cfg.seed)
        self.held_out = load_volumes(d.cache_dir, held_out, self.recipe, self.skipped_studies)
        return train, [u for u in held_out if u in self.held_out]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        tc = self.cfg.train
        return seg_loss(model(batch["image"]), batch["target"], tc.dice_weight, exclusive=tc.exclusive)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, uids: Sequence[str], device: torch.device, autocast) -> EvalResult:
        """Segment and score each study of `uids` (this rank's share of the held-out studies)."""
        from .stage1.postprocess import clean_vertebra_probs
        from .evaluate.metrics import dice_per_vertebra, z_range_errors

        tc, other = self.cfg.train, self.cfg.data.other_vertebrae
        loss_sum, count, rows = 0.0, 0, []
        for uid in uids:
            image, labels, dz = self.held_out[uid]
            levels = true_presence(labels) if self.recipe.level_input else None  # its true ranges, unjittered
            planes = None if levels is None else self.recipe.planes(levels, dz)
            probs = []
            for centres, x in self.recipe.batches(image, dz, planes, tc.val_batch_size):
                y = torch.from_numpy(labels_to_channels(labels[centres], other)).transpose(0, 1)
                with autocast():
                    logits = model(torch.from_numpy(x).to(device))
                loss_sum += float(seg_loss(logits, y.to(device), tc.dice_weight, exclusive=tc.exclusive))
                count += 1
                probs.append(torch.sigmoid(logits.float())[:, :len(VERTEBRAE)].half().cpu())
            pred = clean_vertebra_probs(torch.cat(probs).transpose(0, 1).numpy(), levels=levels, dz=dz)  # -> labels
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
        self.held_out: LevelSequenceDataset | None = None

    def build(self):
        d = self.cfg.data
        self.skipped_studies: dict[str, str] = {}  # unreadable cache files, left out (kit.train lists them)
        train_uids, held_out = split_segmentation_studies(d, self.skipped_studies)
        volumes = load_volumes(d.cache_dir, train_uids, self.recipe, self.skipped_studies)
        train = LevelSequenceDataset(volumes, self.recipe, d.seq_len, d.repeats, augment=True,
                                           z_jitter=d.z_jitter, seed=self.cfg.seed, zoom=d.zoom)
        self.held_out = LevelSequenceDataset(load_volumes(d.cache_dir, held_out, self.recipe,
                                                                      self.skipped_studies),
                                                   self.recipe, seq_len=None, augment=False)
        self.held_out_index = {uid: i for i, uid in enumerate(self.held_out.uids)}
        return train, [u for u in held_out if u in self.held_out_index]

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return level_loss(model(batch["image"], batch["mask"]), batch["target"], batch["mask"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, uids: Sequence[str], device: torch.device, autocast) -> EvalResult:
        loss_sum, count, rows = 0.0, 0, []
        for uid in uids:
            sample = self.held_out[self.held_out_index[uid]]
            with autocast():
                probs = level_presence_probs(model, sample["image"][None].to(device), self.recipe.tta_flip)[0]
            logits = torch.logit(probs, eps=1e-6)
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


# ---------------------------------------------------------------------------------------------------------
# Stage 2: the fracture classifier
# ---------------------------------------------------------------------------------------------------------

PER_STUDY_MODELS = ("cls_patient_gru",)  # models that take whole studies (7 stacks) and have a patient head
TRUE_SUFFIX = "_true"


def _none_if_nan(values: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}


class ClsTask:
    """Stage 2: fracture classification on the crop cache (`kit crops`, `kit.stage2.data.CropDataset`).

    Studies: the crop manifest's studies that have crops; training = those whose fold (`data.folds_csv`) is not
    `data.fold`, held out = that fold. Labels come from `train.csv` in `data.data_root`.

    Layout, by the model's name: a model in `PER_STUDY_MODELS` (`cls_patient_gru`) trains on whole studies,
    the vertebrae not found passed as `vertebra_mask` (studies with none found are left out of training);
    any other (`cls_gru`) trains on single vertebrae, the ones not found left out.

    Loss, plus `loss.slice_weight` x the slice BCE (`slice_bce_loss`) over the sampled slices whose target is
    known (studies with fracture boxes):
    - per study: `competition_loss` on the 8 logits [patient head, C1..C7] (`combine_logits`), normalised as
      `loss.normalise`: on the same predictions it equals `kit.evaluate.metrics.competition_score`. A vertebra not
      found still counts with its label: its logit is then the head's bias, which learns a fallback.
    - per vertebra: a batch mixes vertebrae of different studies, so there is no study row to normalise by;
      `vertebra_loss` is the metric's weighted BCE with the vertebra weights (1 negative, 2 positive),
      sum(w * BCE) / sum(w) over the batch (the vertebra part of the metric's global form); each vertebra's
      level adds its learnt offset (`init_model` starts them at the training folds' prevalence). patient_overall
      is not trained: the 8 targets come from the 7 vertebra probabilities through
      `kit.evaluate.metrics.targets_from_vertebrae` (the positive weight 2 undone, 1 - prod(1 - p), each target at the
      odds the row-normalised metric rewards, `effective_odds` of the training labels, kept in the model's
      `metric_odds` buffer so that inference does the same).

    Validation (eval mode, no augmentation) predicts all 7 vertebrae of every held-out study. A vertebra with no
    crop (not found; a per-study model's masked vertebra) gets its training folds' prevalence, in its own value
    and in patient_overall (`kit.evaluate.metrics.fill_missing_vertebrae`, the rule inference follows too).
    patient_overall comes from the patient head when the model has one (the OOF's
    `patient_overall_from_vertebrae` then holds 1 - prod(1 - p_Ci) beside it), else from the vertebrae. The
    validation loss is the row metric of each study's 8 logits (`competition_loss`), the score the negated
    `competition_score` (higher is better for the loop; `log.csv` calls it `val_neg_score`).
    """

    metric_name = "neg_score"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.recipe = cfg.recipe()  # how a cached crop becomes the model's input (`kit.stage2.recipe.ClsRecipe`)
        self.per_study = cfg.model.name in PER_STUDY_MODELS
        self.held_out: CropDataset | None = None
        self.train_prevalence = np.full(len(TARGETS), np.nan)
        self.train_labels = np.zeros((0, len(TARGETS)))

    # ----- data -----
    def split(self) -> tuple[list[str], list[str]]:
        """(training, held-out) studies of the crop cache for `data.fold`.

        Raises:
            ValueError: cached studies without a fold, or an empty side.
        """
        d = self.cfg.data
        return split_by_fold(d, crop_uids(d.crop_dir), f"studies in {d.crop_dir}")

    def build(self) -> tuple[CropDataset, list[str]]:
        """The training dataset and the held-out study ids (their crops stay available for validation)."""
        from .io.rsna import load_train

        d = self.cfg.data
        train_uids, held_out = self.split()
        labels = load_train(d.data_root)
        self.skipped_studies: dict[str, str] = {}  # unreadable crop files, left out (kit.train lists them)
        common = dict(mask_channel=d.with_mask, per_study=self.per_study, skipped=self.skipped_studies)
        train = CropDataset(d.crop_dir, train_uids, labels, skip_missing=True, augment=d.augment,
                                  reverse_slices=d.reverse_slices, n_neighbours=d.n_neighbours, seed=self.cfg.seed,
                                  **common)
        self.held_out = CropDataset(d.crop_dir, held_out, labels, skip_missing=False, augment=None, **common)
        held_out = self.held_out.uids  # none readable: kit.train stops, naming skipped_studies.csv
        self.train_labels = labels.set_index("StudyInstanceUID").loc[train.uids, list(TARGETS)].to_numpy(np.float64)
        self.train_prevalence = self.train_labels.mean(0)
        if held_out:
            self._check_shape(held_out[0])
        if len(train) == 0:
            raise ValueError(f"fold {d.fold}: no vertebra was found in any of the {len(train_uids)} training "
                             f"studies of {d.crop_dir}; nothing to train on")
        return train, held_out

    def _check_shape(self, uid: str) -> None:
        d = self.cfg.data
        crops = self.held_out._arrays(uid)["crops"]
        if crops.shape[2] != self.cfg.in_channels:
            raise ValueError(f"{d.crop_dir}/{uid}.npz holds {crops.shape[2]} channels per slice but the config "
                             f"needs {self.cfg.in_channels} ((2 x data.n_neighbours + 1) x {len(d.windows)} windows"
                             f"{' + mask' if d.with_mask else ''}); rebuild the crops with this config")
        if crops.shape[1] != d.n_slices or crops.shape[-1] != d.image_size:
            log.warning("%s: crops of %d slices at %d px, the config says data.n_slices=%d, data.image_size=%d; "
                        "the cache is used as it is", d.crop_dir, crops.shape[1], crops.shape[-1], d.n_slices,
                        d.image_size)

    def init_model(self, model: nn.Module) -> None:
        """Start the model's per-level logit offsets (`level_bias`) where its loss would drive a constant, less
        the logit head's bias: each vertebra's training-fold prevalence at the odds its loss rewards (2x for the
        per-vertebra loss, the metric's global form; `effective_odds` for a per-study model on the row-normalised
        loss). Without it the offsets would take most of a short CPU run to move from zero (Adam moves a weight
        by about lr a step), while the crops alone barely tell C3 (rarely fractured) from C7. A per-vertebra
        model also keeps `effective_odds` of the training labels in `metric_odds` (`targets_from_vertebrae`).
        Called by `fit_fold` on a fresh model (not on resume), after `build`."""
        vertebra = model.vertebra if self.per_study else model
        odds = effective_odds(self.train_labels)
        row = self.per_study and self.cfg.loss.normalise == "row"
        p = np.clip(self.train_prevalence[1:], PROB_CLIP, 1.0 - PROB_CLIP)
        q = scale_odds(p, odds[1:] if row else VERTEBRA_LOSS_ODDS)
        with torch.no_grad():
            start = torch.from_numpy(logit(q)).to(vertebra.level_bias)
            vertebra.level_bias.copy_(start - vertebra.logit_head.bias.detach())
            vertebra.metric_odds.copy_(torch.from_numpy(odds))
            vertebra.train_prevalence.copy_(torch.from_numpy(self.train_prevalence))
        log.info("fold %d: level offsets start at the training folds' prevalence of C1..C7 (%s at the loss's odds); "
                 "the row-normalised metric's odds per target: %s", self.cfg.data.fold,
                 ", ".join(f"{x:.3f}" for x in q), ", ".join(f"{x:.2f}" for x in odds))

    # ----- training -----
    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Competition loss (per study) or weighted vertebra BCE (per vertebra), plus the slice BCE."""
        image = self.recipe.model_input(batch["image"], batch["intensity"])
        if self.per_study:
            out = model(image, batch["mask"], batch["vertebra_mask"])
            logits = combine_logits(out["logit"].float(), out["patient_logit"].float())
            main = competition_loss(logits, batch["label"], normalise=self.cfg.loss.normalise)
            slices, target, known = (out["slice_logits"].flatten(0, 1), batch["slice_target"].flatten(0, 1),
                                     batch["slice_known"].flatten(0, 1))
        else:
            out = model(image, batch["mask"], batch["vertebra"])
            main = vertebra_loss(out["logit"], batch["label"])
            slices, target, known = out["slice_logits"], batch["slice_target"], batch["slice_known"]
        if self.cfg.loss.slice_weight > 0:
            main = main + self.cfg.loss.slice_weight * slice_bce_loss(slices, target, known)
        return main

    # ----- validation -----
    def predict_study(self, model: nn.Module, sample: dict, device: torch.device, autocast
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One study's 8 logits [patient_overall, C1..C7] (float32, CPU) and its attention (7, T); with
        `data.tta_flip` the probabilities and attention averaged over the crops and their left-right mirror, as
        `kit.stage2.infer.classify_study` does."""
        image = self.recipe.model_input(sample["image"].to(device))  # unaugmented: no intensity change
        vertebra = model.vertebra if self.per_study else model
        odds, prevalence = vertebra.metric_odds.cpu().numpy(), vertebra.train_prevalence.cpu().numpy()
        views = [image, image.flip(-1)] if self.cfg.data.tta_flip else [image]  # the crops' W axis
        probs, attentions = [], []
        for view in views:
            p, attention = self._predict_view(model, view, sample, device, autocast, odds, prevalence)
            probs.append(p)
            attentions.append(attention)
        return (torch.from_numpy(logit(np.mean(probs, axis=0))).float(),
                torch.stack(attentions).mean(0))

    def _predict_view(self, model: nn.Module, image: torch.Tensor, sample: dict, device: torch.device, autocast,
                      odds: np.ndarray, prevalence: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """One view's 8 probabilities (float64) and attention (7, T) of `predict_study`."""
        found = sample["found"]
        if self.per_study:
            with autocast():
                out = model(image[None], sample["mask"][None].to(device), sample["vertebra_mask"][None].to(device))
            logits = combine_logits(out["logit"].float().cpu(), out["patient_logit"].float().cpu())[0]
            p = complete_targets(torch.sigmoid(logits.detach().double()).numpy(), found.numpy(), odds, prevalence)
            return p, out["attention"][0].float().cpu()
        logits = torch.full((len(VERTEBRAE),), float("nan"))  # a vertebra not found: fill_missing_vertebrae
        attention = torch.zeros(sample["mask"].shape)
        if found.any():
            with autocast():
                out = model(image[found.to(device)], sample["mask"][found].to(device),
                            torch.arange(len(VERTEBRAE))[found].to(device))
            logits[found] = out["logit"].float().cpu()
            attention[found] = out["attention"].float().cpu()
        return targets_from_vertebrae(torch.sigmoid(logits.detach().double()).numpy(), odds, prevalence), attention

    @torch.no_grad()
    def evaluate(self, model: nn.Module, uids: Sequence[str], device: torch.device, autocast) -> EvalResult:
        """Predict the 7 vertebrae and patient_overall of each study of `uids` (one OOF row each)."""
        loss_sum, count, rows = 0.0, 0, []
        for uid in uids:
            sample = self.held_out.study(uid)
            logits, attention = self.predict_study(model, sample, device, autocast)
            label = sample["label"]
            loss_sum += float(competition_loss(logits[None], label[None], normalise=self.cfg.loss.normalise))
            count += 1
            p = torch.sigmoid(logits.double()).numpy()
            found = sample["found"].numpy()
            peaks = attention.argmax(1).numpy()
            rows.append({"StudyInstanceUID": uid,
                         **{t: float(p[j]) for j, t in enumerate(TARGETS)},
                         "patient_overall_from_vertebrae": float(1.0 - np.prod(1.0 - p[1:])) if self.per_study
                         else float(p[0]),
                         **{f"{t}{TRUE_SUFFIX}": int(label[j]) for j, t in enumerate(TARGETS)},
                         **{f"found_{v}": int(found[i]) for i, v in enumerate(VERTEBRAE)},
                         **{f"attn_peak_{v}": int(peaks[i]) if found[i] else -1 for i, v in enumerate(VERTEBRAE)}})
        return EvalResult(loss_sum, count, rows)

    @staticmethod
    def _arrays(rows_or_table) -> tuple[np.ndarray, np.ndarray]:
        table = pd.DataFrame(rows_or_table)
        return (table[[f"{t}{TRUE_SUFFIX}" for t in TARGETS]].to_numpy(np.float64),
                table[list(TARGETS)].to_numpy(np.float64))

    @classmethod
    def score(cls, rows: list[dict]) -> float:
        """-competition_score (row form) of the rows (higher is better); NaN without rows."""
        from .evaluate.metrics import competition_score

        if not rows:
            return float("nan")
        return -competition_score(*cls._arrays(rows))

    def write_oof(self, rows: list[dict], run_dir: Path, epoch: int) -> dict:
        """`oof.csv` (per held-out study: the 8 TARGETS probabilities, `patient_overall_from_vertebrae`, the 8
        `<target>_true` labels, `found_C1..C7`, `attn_peak_C1..C7` = the sampled slice 0..T-1 with the highest
        attention, -1 where not found) and `oof_summary.json` (`score`, `baseline_score`: the training folds'
        prevalence scored on the held-out labels, same metric and weights; per-target scores and AUCs)."""
        from .evaluate.metrics import competition_score, prevalence_baseline, roc_auc, roc_auc_per_target

        table = _write_table(rows, run_dir, self.cfg.data.fold, epoch)
        y, p = self._arrays(table)
        from_vertebrae = p.copy()
        from_vertebrae[:, 0] = table["patient_overall_from_vertebrae"].to_numpy()
        found = table[[f"found_{v}" for v in VERTEBRAE]].to_numpy()
        summary = {
            "metric": "competition weighted log loss (row-normalised, lower is better)",
            "score": competition_score(y, p),
            "score_global": competition_score(y, p, normalise="global"),
            "baseline_score": competition_score(y, self.train_prevalence),
            "baseline_in_sample": prevalence_baseline(y)[0],
            "train_prevalence": dict(zip(TARGETS, self.train_prevalence.tolist())),
            "patient_overall_source": "patient head" if self.per_study else "kit.evaluate.metrics.targets_from_vertebrae",
            "score_patient_from_vertebrae": competition_score(y, from_vertebrae),
            "per_target": competition_score(y, p, per_target=True).to_dict(),
            "auc": _none_if_nan(roc_auc_per_target(y, p).to_dict()),
            "auc_patient_from_vertebrae": _none_if_nan({"auc": roc_auc(y[:, 0], from_vertebrae[:, 0])})["auc"],
            "vertebrae_not_found": int((found == 0).sum()),
            "not_found_prediction": "training folds' prevalence of that vertebra (kit.evaluate.metrics.fill_missing_vertebrae)",
            "n_studies": len(table), "fold": self.cfg.data.fold, "epoch": epoch,
        }
        (run_dir / "oof_summary.json").write_text(json.dumps(summary, indent=2))
        return summary
