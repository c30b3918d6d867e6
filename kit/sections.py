"""Config sections every stage shares (the studies and their split, data, model, optim, train) and the run-config base
(the stages themselves: `kit.stages`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclass."""


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
class SourceConfig:
    """The part of every stage's data section that says which studies a run learns from and how they are split:
    the same studies and folds in stage 1 and stage 2 (the stage's data sections extend it).

    Attributes:
        data_root: RSNA layout folder (holds train.csv, train_images/, segmentations/).
        folds_csv: `StudyInstanceUID, fold` CSV shared by all stages; None uses
            `kit.io.folds.default_folds_path(n_folds, folds_seed)` (made from `data_root` on first use).
        folds_seed: seed of the split when it is made.
        n_folds: number of folds.
        fold: the held-out fold of this run.
        window: stage 1's HU window (a key of `kit.constants.WINDOWS`), the one its cache was prepared with;
            recorded so inference windows new studies the same way.
    """

    data_root: str = "data"
    folds_csv: str | None = None
    folds_seed: int = 42
    n_folds: int = 5
    fold: int = 0
    window: str = "bone"


@dataclass
class DataConfig(SourceConfig):
    """Where the segmenter's data is and how its samples are made.

    Attributes:
        data_root, folds_csv, folds_seed, n_folds, fold, window: the studies and their split (`SourceConfig`).
        cache_dir: prepared arrays from `kit prepare` (`<uid>.npz`, manifest.csv).
        image_size: in-plane model input size S; cached arrays of another size are resized on the fly.
        slice_offsets_mm: the segmenter's input slices, as offsets in mm from the slice segmented (ascending,
            0 included), each rounded to whole slices of the study (`kit.stage1.recipe.offsets_to_slices`; a non-zero
            offset is at least one slice). [-2, -1, 0, 1, 2] is five adjacent slices at 1 mm; [-40, -30, ...,
            40] sees two levels up and down the neck in nine channels, whatever the slice spacing.
        other_vertebrae: add an 8th output channel for labels >= 8 (thoracic vertebrae).
        level_input: condition the segmenter on the level model: 7 more input channels, constant planes
            holding each vertebra's presence in the slice; the true ranges (`kit.stage1.recipe.true_presence`,
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

    cache_dir: str = "cache/train"
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


def input_scaling(model, image_channels: int, extra_channels: int = 0) -> dict:
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



class RunConfig:
    """What every trainable config (a dataclass with name, out_dir, data and train sections) shares."""

    @property
    def run_dir(self) -> Path:
        """`<out_dir>/<name>/fold<k>`."""
        return Path(self.out_dir) / self.name / f"fold{self.data.fold}"

    def _check_source(self) -> None:
        """The data section's `SourceConfig` part: a fold inside the split, a known window."""
        from .constants import WINDOWS

        d = self.data
        if not 0 <= d.fold < d.n_folds:
            raise ConfigError(f"data.fold={d.fold} must be in 0..{d.n_folds - 1} (data.n_folds={d.n_folds})")
        if d.window not in WINDOWS:
            raise ConfigError(f"data.window={d.window!r}; valid: {', '.join(WINDOWS)}")

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
