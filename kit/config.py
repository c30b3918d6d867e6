"""Typed experiment configs: dataclass defaults here, YAML files in `kit/configs/` hold overrides only.

One config file per experiment; its file stem is the run name, so `runs/<name>/fold<k>/` holds what the run
made (`config.yaml`, `model.pt`, `last.pt`, `log.csv`, `oof.csv`). Every call builds fresh objects from the
defaults, so changing one config never changes another.

    cfg = load_config("demo_seg", **{"train.epochs": 2, "data.fold": 1})
    cfg = load_config("runs/demo_seg/fold0/config.yaml")       # a saved, resolved config
    cfg = load_config("demo_seg", train={"epochs": 2})          # nested dicts merge, they do not replace

Which dataclass a file builds is chosen by its `task` key (`"seg"` when absent). A stage registers its
top-level class here (`@register_config("<task>")`), its task in `kit.tasks` and its model in `kit.models`;
the class gives `model_spec()` (model name and kwargs), `recipe()` (its input recipe, `kit.stage1.recipe`) and
`provides` (what its models predict, for `kit.submit.infer`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
AMP_CHOICES = ("auto", "bf16", "fp16", "off")

log = logging.getLogger("kit.config")


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclass."""


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """In-plane augmentations, applied identically to the slice stack and its labels.

    Attributes:
        enabled: master switch (validation never augments).
        p_affine: probability of the affine warp (rotation, scale, shift, flips) per sample.
        rotate_deg: rotation drawn from +-rotate_deg.
        scale: zoom drawn from 1 +- scale.
        shift: translation drawn from +-shift x image size, per axis.
        hflip: probability of a left-right flip (vertebra identity does not depend on side).
        vflip: probability of an anterior-posterior flip.
        brightness: additive brightness drawn from +-brightness (image in [0, 1]).
        contrast: multiplicative contrast drawn from 1 +- contrast.
        crop: when set, train on crop x crop patches around the vertebrae (centre jittered by +-crop/4;
            random on slices without one) instead of whole slices; fully convolutional models still see
            whole slices at validation and inference. Cuts the cost per sample by (crop / image_size)^2.
    """

    enabled: bool = True
    p_affine: float = 0.9
    rotate_deg: float = 12.0
    scale: float = 0.1
    shift: float = 0.06
    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    crop: int | None = None


@dataclass
class DataConfig:
    """Where the data is and how samples are made.

    Attributes:
        data_root: RSNA layout folder (holds train.csv, train_images/, segmentations/).
        cache_dir: prepared arrays from `kit prepare` (`<uid>.npz`, manifest.csv).
        folds_csv: `StudyInstanceUID, fold` CSV shared by all stages; None uses
            `kit.io.rsna.default_folds_path(n_folds, folds_seed)` (made from `data_root` on first use).
        folds_seed: seed of the split when it is made.
        n_folds: number of folds.
        fold: the held-out fold of this run.
        window: HU window the cache was prepared with (a key of `kit.constants.WINDOWS`); recorded so
            inference windows new studies the same way.
        image_size: in-plane model input size S; cached arrays of another size are resized on the fly.
        slice_offsets_mm: the segmenter's input slices, as offsets in mm from the slice segmented (ascending,
            0 included), each rounded to whole slices of the study (`kit.stage1.recipe.offsets_to_slices`; a non-zero
            offset is at least one slice). [-2, -1, 0, 1, 2] is five adjacent slices at 1 mm; [-40, -30, ...,
            40] sees two levels up and down the neck in nine channels, whatever the slice spacing.
        other_vertebrae: add an 8th output channel for labels >= 8 (thoracic vertebrae).
        level_input: condition the segmenter on the level model: 7 more input channels, constant planes
            holding each vertebra's presence in the slice; the true ranges (`kit.data.soft_presence`,
            jittered) in training and validation, the level model's `predict_levels` at inference, which
            then needs a level run (`segment_study(..., levels=...)`).
        level_jitter_mm: how far each true range's ends move in training (the level model's error).
        level_margin_mm: widen every range by this much at each end, in training (the true ends, then
            jittered) and at inference (the level model's presence dilated along z): the prior then covers
            each vertebra's thin tips that the level model's coarse steps miss, and the segmenter finds the
            ends inside the margin from the pixels.
        level_ramp_mm: width of the presence ramps at each range's ends, in training (linear ramps) and at
            inference (the level model's presence smoothed along z by a box this wide): the segmenter
            finds the boundary inside the ramp from the pixels, the prior only says which levels are near.
        background_fraction: share of the slices without any vertebra drawn each epoch (redrawn per epoch).
        foreground_fraction: share of the slices showing a vertebra drawn each epoch (redrawn per epoch);
            below 1 makes epochs shorter, not the data smaller.
        end_weight: with `foreground_fraction` below 1, how much likelier a slice within `end_mm` of a
            vertebra's first or last slice is drawn than another vertebra slice (1: all alike). A vertebra's
            end slices show a few pixels of it beside its neighbour; they decide its z-range.
        end_mm: how near a vertebra's end a slice counts as an end slice (at least the end slice itself).
        num_workers: DataLoader worker processes (capped at the CPUs per process: `kit.train.loader_workers`).
        augment: training augmentations.
    """

    data_root: str = "data"
    cache_dir: str = "cache/train"
    folds_csv: str | None = None
    folds_seed: int = 42
    n_folds: int = 5
    fold: int = 0
    window: str = "bone"
    image_size: int = 384
    slice_offsets_mm: list[float] = field(default_factory=lambda: [-2.0, -1.0, 0.0, 1.0, 2.0])
    other_vertebrae: bool = False
    level_input: bool = False
    level_jitter_mm: float = 2.5
    level_margin_mm: float = 0.0
    level_ramp_mm: float = 2.5
    background_fraction: float = 0.1
    foreground_fraction: float = 1.0
    end_weight: float = 1.0
    end_mm: float = 2.0
    num_workers: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class SegModelConfig:
    """The segmenter (`kit.models.segmenter`); in/out channels follow from the data section.

    Attributes:
        name: registered model name (`kit.models.list_models()`), e.g. seg_unet, seg_fpn, seg_unetpp.
        encoder: `tu-<timm name>` (any timm backbone with features_only) or an smp native encoder name.
        encoder_depth: encoder stages used (3..5); fewer is faster and lighter.
        decoder_width: decoder channels at its widest stage (Unet halves it per stage; FPN pyramid width).
        output_stride: 1, or 2 (Unet only): the last, full-resolution decoder block is left out and the
            logits are upsampled bilinearly; faster on CPU (`kit.models.segmenter.Segmenter`).
        pretrained_weights: local state-dict file (timm backbone or whole segmenter); never downloaded. Or
            "imagenet": the ImageNet weights a pip package ships for the encoder (`tu-tf_efficientnet_lite0`,
            `-lite1`, `-lite2`; `kit.models.imagenet`); the model then also scales its input as those weights
            expect (`input_mean` / `input_std` in `model_spec()`).
    """

    name: str = "seg_unet"
    encoder: str = "tu-efficientnet_b3"
    encoder_depth: int = 5
    decoder_width: int = 256
    output_stride: int = 1
    pretrained_weights: str | None = None


def _input_scaling(model, image_channels: int, extra_channels: int = 0) -> dict:
    """The `input_mean` / `input_std` model kwargs for `model.pretrained_weights: imagenet`: the scaling the
    packaged weights were trained on, over the image channels, the extra channels (mask, level planes) left as
    they are (`kit.models.imagenet_input_scaling`). No kwargs otherwise: the model sees its [0, 1] input as it is."""
    from .models.start import is_start, start_meta

    if is_start(model.pretrained_weights):  # the scaling the starting checkpoint was trained with
        try:
            meta = start_meta(model.pretrained_weights)
        except ValueError as exc:
            raise ConfigError(f"model.pretrained_weights: {exc}") from None
        kwargs = meta["model_kwargs"]
        if kwargs.get("input_mean") is None:
            return {}
        if len(kwargs["input_mean"]) != image_channels + extra_channels:
            raise ConfigError(f"model.pretrained_weights={model.pretrained_weights} takes {len(kwargs['input_mean'])} "
                              f"channels a slice; this config gives {image_channels + extra_channels}")
        return {"input_mean": list(kwargs["input_mean"]), "input_std": list(kwargs["input_std"])}
    if model.pretrained_weights != "imagenet":
        return {}
    from .models.imagenet import imagenet_input_scaling

    mean, std = imagenet_input_scaling(model.encoder, image_channels, extra_channels)
    return {"input_mean": list(mean), "input_std": list(std)}


@dataclass
class OptimConfig:
    """Optimizer (timm's `create_optimizer_v2`) and the per-step warmup + cosine schedule.

    Attributes:
        opt: timm optimizer name (adamw, adam, sgd, lamb, ...).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases and norms).
        warmup_epochs: linear warmup length in epochs (fractions allowed), counted in optimizer steps.
        min_lr_ratio: the cosine ends at lr x min_lr_ratio.
        clip_grad: max global gradient norm; None disables clipping.
    """

    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    clip_grad: float | None = 1.0


@dataclass
class TrainConfig:
    """The loop: epochs, batches, precision, EMA, stopping, devices.

    Attributes:
        epochs: total epochs; 0 trains nothing: the starting weights (`model.pretrained_weights`), after the task's
            data-dependent initialisation (the classifier's level offsets and priors from the training folds),
            are validated and saved as the fold's model.
        batch_size: samples per process and micro-batch (DDP: per GPU).
        val_batch_size: slices per forward pass in validation.
        accum_steps: micro-batches per optimizer step.
        amp: "auto" (bf16 on GPUs that have it in hardware, else fp16 + GradScaler, e.g. a T4; off on CPU),
            "bf16", "fp16", "off".
        ema: keep an exponential moving average of the weights; validate and save it.
        ema_decay: EMA decay (warmed up from 0 over the first steps).
        patience: stop after this many validations without improvement; None never stops early.
        val_every: validate every n epochs (and always after the last).
        dice_weight: segmentation loss = pixel loss + dice_weight x soft Dice.
        exclusive: pixel loss = cross-entropy of softmax([0, logits]) (vertebra labels never overlap, so the
            levels compete for each pixel); False: per-channel BCE.
        device: "auto", "cpu", "cuda" or "cuda:<i>" (under torchrun each process takes its LOCAL_RANK GPU).
        threads: torch CPU threads (None leaves torch's default).
        channels_last: keep the model and 4D inputs in channels-last memory layout (faster convolutions on
            recent CPUs and on tensor-core GPUs; results equal up to float rounding).
        sync_bn: convert BatchNorm to SyncBatchNorm under multi-GPU DDP.
        progress: tqdm bars.
        resume: continue from `last.pt` when it exists (False starts over).
        stop_after_epochs: return after this many epochs in this call, as if interrupted (time-sliced
            sessions, tests); re-running resumes.
    """

    epochs: int = 30
    batch_size: int = 16
    val_batch_size: int = 32
    accum_steps: int = 1
    amp: str = "auto"
    ema: bool = True
    ema_decay: float = 0.999
    patience: int | None = None
    val_every: int = 1
    dice_weight: float = 1.0
    exclusive: bool = False
    device: str = "auto"
    threads: int | None = None
    channels_last: bool = False
    sync_bn: bool = False
    progress: bool = True
    resume: bool = True
    stop_after_epochs: int | None = None


# ---------------------------------------------------------------------------------------------------------
# Top-level configs, one class per task
# ---------------------------------------------------------------------------------------------------------

CONFIG_CLASSES: dict[str, type] = {}


def register_config(task: str):
    """Class decorator: make a top-level config class loadable for YAML files with `task: <task>`."""

    def wrap(cls: type) -> type:
        CONFIG_CLASSES[task] = cls
        return cls

    return wrap


class _RunConfig:
    """What every trainable config (a dataclass with name, out_dir, data and train sections) shares."""

    @property
    def run_dir(self) -> Path:
        """`<out_dir>/<name>/fold<k>`."""
        return Path(self.out_dir) / self.name / f"fold{self.data.fold}"

    def _check_fold(self) -> None:
        d = self.data
        if not 0 <= d.fold < d.n_folds:
            raise ConfigError(f"data.fold={d.fold} must be in 0..{d.n_folds - 1} (data.n_folds={d.n_folds})")

    def _check_train_and_name(self) -> None:
        t = self.train
        if t.amp not in AMP_CHOICES:
            raise ConfigError(f"train.amp={t.amp!r}; valid: {', '.join(AMP_CHOICES)}")
        for key in ("batch_size", "val_batch_size", "accum_steps", "val_every"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1; got {getattr(t, key)}")
        if t.epochs < 0:
            raise ConfigError(f"train.epochs must be >= 0 (0: the starting weights validated as they are); got "
                              f"{t.epochs}")
        if not self.name or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"name must be a non-empty file-name-like string; got {self.name!r}")


@register_config("seg")
@dataclass
class SegConfig(_RunConfig):
    """Stage 1: the 2.5D vertebra segmenter.

    Attributes:
        task: selects this class ("seg").
        name: run name, the YAML file stem unless the file sets it; outputs go to `<out_dir>/<name>/fold<k>`.
        out_dir: root of all runs.
        seed: seeds the model init, sampling and augmentations.
    """

    task: str = "seg"
    name: str = "seg"
    out_dir: str = "runs"
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    provides = "vertebra_probs"  # what its models predict (a class attribute, not a config key)

    def recipe(self):
        """The input recipe of this run (`kit.stage1.recipe.SegRecipe`)."""
        from .stage1.recipe import SegRecipe

        return SegRecipe.from_config(self.data)

    def model_spec(self) -> tuple[str, dict]:
        """Registered model name and its plain kwargs, from this config alone (training records them in
        `model.pt`; `kit bench` builds the same model)."""
        d, m, recipe = self.data, self.model, self.recipe()
        return m.name, {"in_channels": recipe.n_channels, "classes": 7 + int(d.other_vertebrae),
                        "encoder": m.encoder, "encoder_depth": m.encoder_depth, "decoder_width": m.decoder_width,
                        "output_stride": m.output_stride,
                        **_input_scaling(m, recipe.n_slices, recipe.n_channels - recipe.n_slices)}

    def check(self) -> None:
        """Raise ConfigError for values no run can use."""
        d = self.data
        self._check_fold()
        from .constants import WINDOWS

        if d.window not in WINDOWS:
            raise ConfigError(f"data.window={d.window!r}; valid: {', '.join(WINDOWS)}")
        offs = d.slice_offsets_mm
        if not offs or 0 not in offs or list(offs) != sorted(set(offs)):
            raise ConfigError(f"data.slice_offsets_mm must be ascending, without repeats, and include 0; got {offs}")
        if d.image_size < 32:
            raise ConfigError(f"data.image_size must be >= 32; got {d.image_size}")
        for key in ("background_fraction", "foreground_fraction"):
            if not 0.0 <= getattr(d, key) <= 1.0:
                raise ConfigError(f"data.{key} must be in [0, 1]; got {getattr(d, key)}")
        if d.end_weight < 1.0 or d.end_mm < 0.0:
            raise ConfigError(f"data.end_weight must be >= 1 and data.end_mm >= 0; got {d.end_weight}, {d.end_mm}")
        if self.model.output_stride not in (1, 2) or (self.model.output_stride == 2 and self.model.name != "seg_unet"):
            raise ConfigError(f"model.output_stride must be 1, or 2 with model.name seg_unet; got "
                              f"{self.model.output_stride} ({self.model.name})")
        crop, stride = d.augment.crop, 2 ** self.model.encoder_depth
        if crop and crop < d.image_size and crop % stride:
            # the segmenter zero-pads inputs to a multiple of its stride: crops that need it would train on a
            # padded border that whole slices never have (a crop of 72 at stride 16 gave Dice 0.45, 80 gave 0.94)
            raise ConfigError(f"data.augment.crop={crop} must be a multiple of the segmenter's stride {stride} "
                              f"(2 ** model.encoder_depth); e.g. {max(stride, crop // stride * stride)} or "
                              f"{-(-crop // stride) * stride}")
        self._check_train_and_name()


@dataclass
class LevelDataConfig:
    """Data of the level model (`kit.models.level`): whole segmented studies at a coarse slice spacing.

    Attributes:
        data_root, cache_dir, folds_csv, folds_seed, n_folds, fold, window: as in `DataConfig` (the same
            studies, cache and folds as the segmenter).
        image_size: in-plane size of each slice for the level model (small: it names levels, it does not
            outline them).
        slice_mm: spacing of the model's steps along the study, in mm.
        neighbours: n; each step sees 2n+1 steps as channels.
        seq_len: steps in a training window (random position; shorter studies padded).
        repeats: windows drawn per study per epoch.
        z_jitter: training stretches the step by a random factor in 1 +- z_jitter (necks differ in height;
            the model must count levels, not millimetres).
        zoom: training zooms each window in-plane by a factor in 1 +- zoom and shifts it by up to zoom x the
            image size, the same for every step of the window; 0: off.
        num_workers: DataLoader worker processes (capped at the CPUs per process: `kit.train.loader_workers`).
        tta_flip: validation and inference average the model's presence over each study and its left-right
            mirror (training flips half its windows); off: the study as it is.
    """

    data_root: str = "data"
    cache_dir: str = "cache/train"
    folds_csv: str | None = None
    folds_seed: int = 42
    n_folds: int = 5
    fold: int = 0
    window: str = "bone"
    image_size: int = 64
    slice_mm: float = 2.5
    neighbours: int = 1
    seq_len: int = 64
    repeats: int = 4
    z_jitter: float = 0.15
    zoom: float = 0.0
    num_workers: int = 0
    tta_flip: bool = True


@dataclass
class LevelModelConfig:
    """The level model: a timm CNN per slice, a BiGRU over the study.

    Attributes:
        name: registered model name (`level_gru`).
        encoder: timm model name for the per-slice CNN.
        hidden: slice embedding and GRU width.
        pretrained_weights: local state-dict file (timm backbone or whole model); never downloaded. Or
            "imagenet": the packaged ImageNet weights of the encoder (`tf_efficientnet_lite0/1/2`), input
            scaling included (see `SegModelConfig`).
    """

    name: str = "level_gru"
    encoder: str = "mobilenetv3_small_050"
    hidden: int = 64
    pretrained_weights: str | None = None


@register_config("level")
@dataclass
class LevelConfig(_RunConfig):
    """Stage 1, part two: which vertebrae each slice shows, from the whole study (`kit.models.level`);
    `kit.submit.infer.segment_study(..., levels=...)` gives it to the segmenter (input planes or fusion).

    Attributes: as `SegConfig`, with `LevelDataConfig` and `LevelModelConfig` sections.
    """

    task: str = "level"
    name: str = "level"
    out_dir: str = "runs"
    seed: int = 42
    data: LevelDataConfig = field(default_factory=LevelDataConfig)
    model: LevelModelConfig = field(default_factory=LevelModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    provides = "levels"

    def recipe(self):
        """The input recipe of this run (`kit.stage1.recipe.LevelRecipe`)."""
        from .stage1.recipe import LevelRecipe

        return LevelRecipe.from_config(self.data)

    def model_spec(self) -> tuple[str, dict]:
        """Registered model name and its plain kwargs, from this config alone."""
        m, channels = self.model, self.recipe().n_channels
        return m.name, {"in_channels": channels, "classes": 7, "encoder": m.encoder, "hidden": m.hidden,
                        **_input_scaling(m, channels)}

    def check(self) -> None:
        """Raise ConfigError for values no run can use."""
        d = self.data
        self._check_fold()
        if not 0.0 <= d.z_jitter < 1.0:
            raise ConfigError(f"data.z_jitter must be in [0, 1); got {d.z_jitter}")
        if not 0.0 <= d.zoom < 0.5:
            raise ConfigError(f"data.zoom must be in [0, 0.5); got {d.zoom}")
        if d.slice_mm <= 0 or d.neighbours < 0 or d.seq_len < 1 or d.repeats < 1 or d.image_size < 32:
            raise ConfigError("data.slice_mm must be > 0, data.neighbours >= 0, data.seq_len and data.repeats "
                              f">= 1, data.image_size >= 32; got {d}")
        self._check_train_and_name()


@dataclass
class ClsDataConfig:
    """Data of the stage-2 classifier: per-vertebra slice stacks cut from the original DICOM grid (`kit crops`).

    Attributes:
        data_root, folds_csv, folds_seed, n_folds, fold, window: as in `DataConfig` (the same studies and folds
            as stage 1; `window` is stage 1's).
        crop_dir: the crop cache (`<crop_dir>/<uid>.npz`, `manifest.csv` with the missing vertebrae, `failures.csv`,
            `unmatched_boxes.csv`), made by `kit crops` (`kit.stage2.crop_cache.build_crops`).
        seg_runs: stage-1 run folders (segmenter and level model) that find the vertebrae of each study;
            studies they trained on are segmented by the folds that held them out.
        true_masks: crop from the ground-truth segmentation where a study has one, instead of predictions.
        n_slices: T, slices per vertebra spread evenly over its z-range, head to feet.
        n_neighbours: n; each slice is stacked with its +-n neighbours (2n+1 image channels per window).
        neighbour_mm: spacing of those neighbours in mm (stage 1's rounding); None: adjacent slices.
        windows: HU windows stacked as channels (keys of `kit.constants.WINDOWS`), in order.
        with_mask: add the vertebra's own mask as the last channel.
        image_size: S, the crop's in-plane size.
        margin: widening of the in-plane box on each side, as a fraction of its size.
        num_workers: DataLoader worker processes (capped at the CPUs per process: `kit.train.loader_workers`).
        augment: in-plane augmentations of the stacks (all slices and channels of a stack alike; the mask
            channel warped with nearest neighbour, brightness/contrast on the image channels only).
        reverse_slices: probability of reversing a training stack's slice order (feet to head), per vertebra;
            the slice targets and masks are reversed with it. 0 keeps the anatomical order always.
    """

    data_root: str = "data"
    folds_csv: str | None = None
    folds_seed: int = 42
    n_folds: int = 5
    fold: int = 0
    window: str = "bone"
    crop_dir: str = "cache/crops"
    seg_runs: list[str] = field(default_factory=list)
    true_masks: bool = False
    n_slices: int = 15
    n_neighbours: int = 2
    neighbour_mm: float | None = 1.0
    windows: list[str] = field(default_factory=lambda: ["bone"])
    with_mask: bool = True
    image_size: int = 224
    margin: float = 0.15
    num_workers: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    reverse_slices: float = 0.0


@dataclass
class ClsModelConfig:
    """The classifier (`kit.models.classifier`): a timm CNN per slice, a BiGRU over the slices, attention.

    Attributes:
        name: registered model name (`cls_gru` per vertebra, `cls_patient_gru` for all seven at once).
        encoder: timm model name of the per-slice CNN.
        hidden: GRU width per direction.
        dropout: dropout before the GRU.
        drop_path_rate: stochastic depth of the CNN.
        grad_checkpointing: recompute the CNN's activations in the backward pass (timm's
            `set_grad_checkpointing`): a stack of 15 slices at 224 px holds ~1.4 GB of activations in bf16
            through tf_efficientnetv2_s (measured on CPU), so a batch of 16 does not fit a 16 GB GPU without it;
            costs ~30 % more training compute, changes nothing at inference.
        pretrained_weights: local state-dict file (timm backbone or whole model); never downloaded. Or
            "imagenet": the packaged ImageNet weights of the encoder (`tf_efficientnet_lite0/1/2`), input
            scaling included (see `SegModelConfig`). Or "kit:<name>": a whole classifier the kit ships as a
            starting point (`kit.models.start`, made by `kit pretrain`), which this config must build alike.
        freeze_backbone: keep the CNN's weights and BatchNorm statistics as loaded and train only the GRU,
            attention and heads: the CNN runs forward only (about a third of its training compute).
    """

    name: str = "cls_gru"
    encoder: str = "tf_efficientnetv2_s"
    hidden: int = 256
    dropout: float = 0.1
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    pretrained_weights: str | None = None
    freeze_backbone: bool = False


@dataclass
class ClsLossConfig:
    """The classifier's loss: the competition's weighted log loss (its torch twin, `kit.losses`) plus a
    per-slice auxiliary BCE where fracture boxes give slice targets.

    Attributes:
        slice_weight: weight of the slice auxiliary loss.
        normalise: "row" or "global", as the metric.
    """

    slice_weight: float = 0.5
    normalise: str = "row"


@register_config("cls")
@dataclass
class ClsConfig(_RunConfig):
    """Stage 2: the fracture classifier over vertebra crops.

    Attributes: as `SegConfig`, with `ClsDataConfig`, `ClsModelConfig` and `ClsLossConfig` sections.
    """

    task: str = "cls"
    name: str = "cls"
    out_dir: str = "runs"
    seed: int = 42
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    loss: ClsLossConfig = field(default_factory=ClsLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    provides = "fractures"

    def crop_geometry(self) -> dict:
        """The `kit.stage2.crops.crop_study` keyword arguments this config fixes (all but `dz`, the series'): the one
        place `kit crops` (training crops) and inference (`kit.submit.infer.classify_study`) read them from, so their
        crops are identical."""
        d = self.data
        return {"n_slices": d.n_slices, "n_neighbours": d.n_neighbours, "neighbour_mm": d.neighbour_mm,
                "size": d.image_size, "windows": tuple(d.windows), "margin": d.margin, "with_mask": d.with_mask}

    @property
    def in_channels(self) -> int:
        """Channels of each slice of a crop: (2n+1) per window, plus the mask."""
        d = self.data
        return (2 * d.n_neighbours + 1) * len(d.windows) + int(d.with_mask)

    def model_spec(self) -> tuple[str, dict]:
        """Registered model name and its plain kwargs, from this config alone.

        Raises:
            ConfigError: `model.pretrained_weights` names a starting checkpoint (`kit:<name>`) of another
                architecture (model name, encoder, channels or GRU width); another crop size is only logged.
        """
        m = self.model
        kwargs = {"in_channels": self.in_channels, "encoder": m.encoder, "hidden": m.hidden,
                  "dropout": m.dropout, "drop_path_rate": m.drop_path_rate,
                  "grad_checkpointing": m.grad_checkpointing,
                  **({"freeze_backbone": True} if m.freeze_backbone else {}),
                  **_input_scaling(m, self.in_channels - int(self.data.with_mask), int(self.data.with_mask))}
        from .models.start import is_start, start_meta

        if is_start(m.pretrained_weights):
            meta = start_meta(m.pretrained_weights)
            ours = {"model_name": m.name, **{k: kwargs[k] for k in ("in_channels", "encoder", "hidden")}}
            theirs = {"model_name": meta["model_name"],
                      **{k: meta["model_kwargs"][k] for k in ("in_channels", "encoder", "hidden")}}
            differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
            if differ:
                raise ConfigError(f"model.pretrained_weights={m.pretrained_weights} was trained as another model: "
                                  + ", ".join(f"{k} {a!r} here, {b!r} there" for k, (a, b) in differ.items()))
            if self.data.image_size != meta["image_size"]:  # the CNN takes any size; what it learnt may not carry
                log.warning("model.pretrained_weights=%s was trained on %d px crops; data.image_size is %d",
                            m.pretrained_weights, meta["image_size"], self.data.image_size)
        return m.name, kwargs

    def check(self) -> None:
        """Raise ConfigError for values no run can use."""
        from .constants import WINDOWS

        d = self.data
        self._check_fold()
        unknown = [w for w in [d.window, *d.windows] if w not in WINDOWS]
        if unknown or not d.windows:
            raise ConfigError(f"data.windows={d.windows} / data.window={d.window!r}; valid: {', '.join(WINDOWS)}")
        if d.n_slices < 1 or d.n_neighbours < 0 or d.image_size < 32 or not 0 <= d.margin < 1:
            raise ConfigError("data.n_slices must be >= 1, data.n_neighbours >= 0, data.image_size >= 32, "
                              f"data.margin in [0, 1); got {d.n_slices}, {d.n_neighbours}, {d.image_size}, {d.margin}")
        if not 0.0 <= d.reverse_slices <= 1.0:
            raise ConfigError(f"data.reverse_slices must be a probability in [0, 1]; got {d.reverse_slices}")
        if d.neighbour_mm is not None and d.neighbour_mm <= 0:
            raise ConfigError(f"data.neighbour_mm must be > 0 or null; got {d.neighbour_mm}")
        if self.loss.normalise not in ("row", "global"):
            raise ConfigError(f"loss.normalise={self.loss.normalise!r}; valid: row, global")
        self._check_train_and_name()


# ---------------------------------------------------------------------------------------------------------
# Building, loading, saving
# ---------------------------------------------------------------------------------------------------------


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Coerce `value` to the annotated type `hint` or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path} may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list; got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return [_check_value(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping; got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true/false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer; got {value!r}")
        return value
    if hint is float:
        number = NUMBER.fullmatch(value.strip()) if isinstance(value, str) else None
        if number and number.group(2):
            return float(value)  # PyYAML (YAML 1.1) reads `lr: 5e-3` (an exponent, no dot) as the string '5e-3'
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string; got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {hint}")


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a decimal number, group 2 its exponent if any


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"train.epochs": 2, "data": {"fold": 1}} -> {"train": {"epochs": 2}, "data": {"fold": 1}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r} conflicts with {part}={child!r}")
            node = child
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _merge(node[leaf], _nest(value))
        else:
            node[leaf] = _nest(value) if isinstance(value, dict) else value
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys that older configs used, with what replaced them: such a YAML fails with this message.
RENAMED = {
    f"data.{old}": "data.slice_offsets_mm (the input slices as offsets in mm, e.g. [-2, -1, 0, 1, 2] for five "
                   "adjacent 1 mm slices, or [-40, -30, -20, -10, 0, 10, 20, 30, 40] for context: 4, context_mm: 10)"
    for old in ("context", "context_stride", "context_mm", "context_offsets_mm")
}


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Set nested dataclass fields from a nested dict, checking names and types."""
    hints = typing.get_type_hints(type(obj))
    names = _field_names(obj)
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if path in RENAMED:
            raise ConfigError(f"config key {path!r} was replaced by {RENAMED[path]}")
        if key not in names:
            where = prefix[:-1] or type(obj).__name__
            raise ConfigError(f"unknown config key {path!r}; valid keys in {where}: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section ({', '.join(_field_names(current))}); got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _check_value(path, value, hints[key]))


def config_from_dict(values: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """Build a fresh config from (possibly partial, possibly dotted) values on top of the defaults.

    Args:
        values: nested dict, e.g. a loaded YAML file; `task` picks the class (default "seg").
        **overrides: applied after `values`; dotted keys (`**{"train.epochs": 2}`) or nested dicts.

    Returns:
        A new config object (e.g. `SegConfig`), checked.

    Raises:
        ConfigError: an unknown key (the valid keys are listed), a value of the wrong type, or an unusable value.
    """
    merged = _merge(_nest(values or {}), _nest(overrides))
    task = merged.get("task", "seg")
    if task not in CONFIG_CLASSES:
        raise ConfigError(f"unknown task {task!r}; valid: {', '.join(CONFIG_CLASSES)}")
    cfg = CONFIG_CLASSES[task]()
    _apply(cfg, merged)
    cfg.check()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as a plain nested dict (what `save_config` writes and checkpoints keep)."""
    return dataclasses.asdict(cfg)


def list_configs() -> list[str]:
    """Names of the packaged configs in `kit/configs/`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a packaged config name or a YAML path.

    Raises:
        FileNotFoundError: neither a file nor a packaged name; the packaged names are listed.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{path.name}.yaml"
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1 and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a YAML file nor a packaged config; "
                            f"packaged: {', '.join(list_configs())}")


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> Any:
    """Load a packaged config by name or a YAML file, apply overrides, return a fresh object.

    The run name is the YAML's `name` key if it has one (a saved `config.yaml` keeps it), else the file stem;
    an override `name=...` wins over both.

    Args:
        name_or_path: e.g. "demo_seg" or "path/to/exp.yaml".
        **overrides: dotted keys (`**{"train.epochs": 2}`) or nested dicts (`train={"epochs": 2}`).

    Raises:
        FileNotFoundError: unknown config name (the packaged ones are listed).
        ConfigError: unknown keys (the valid ones are listed) or wrong value types.
    """
    path = config_path(name_or_path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping; got {type(values).__name__}")
    values.setdefault("name", path.stem)
    try:
        return config_from_dict(values, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config (every field, not only overrides) as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
