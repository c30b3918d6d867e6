"""Stage-1 configs: the segmenter (`task: seg`) and the level model (`task: level`); their stages: `kit.stages`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sections import (
    ConfigError,
    DataConfig,
    OptimConfig,
    RunConfig,
    SegModelConfig,
    SourceConfig,
    TrainConfig,
    input_scaling,
)


@dataclass
class SegConfig(RunConfig):
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

    def recipe(self):
        """The input recipe of this run (`kit.stage1.recipe.SegRecipe`)."""
        from .recipe import SegRecipe

        return SegRecipe.from_config(self.data)

    def model_spec(self) -> tuple[str, dict]:
        """Registered model name and its plain kwargs, from this config alone (training records them in
        `model.pt`; `kit bench` builds the same model)."""
        d, m, recipe = self.data, self.model, self.recipe()
        return m.name, {"in_channels": recipe.n_channels, "classes": 7 + int(d.other_vertebrae),
                        "encoder": m.encoder, "encoder_depth": m.encoder_depth, "decoder_width": m.decoder_width,
                        "output_stride": m.output_stride,
                        **input_scaling(m, recipe.n_slices, recipe.n_channels - recipe.n_slices)}

    def check(self) -> None:
        """Raise ConfigError for values no run can use."""
        d = self.data
        self._check_source()
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
            # padded border that whole slices never have (docs/benchmarks.md, Stage 1, "Tried and not taken")
            raise ConfigError(f"data.augment.crop={crop} must be a multiple of the segmenter's stride {stride} "
                              f"(2 ** model.encoder_depth); e.g. {max(stride, crop // stride * stride)} or "
                              f"{-(-crop // stride) * stride}")
        self._check_train_and_name()


@dataclass
class LevelDataConfig(SourceConfig):
    """Data of the level model (`kit.models.level`): whole segmented studies at a coarse slice spacing.

    Attributes:
        data_root, folds_csv, folds_seed, n_folds, fold, window: the studies and their split (`SourceConfig`),
            the segmenter's.
        cache_dir: the segmenter's cache (`DataConfig.cache_dir`).
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

    cache_dir: str = "cache/train"
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


@dataclass
class LevelConfig(RunConfig):
    """Stage 1, part two: which vertebrae each slice shows, from the whole study (`kit.models.level`);
    `kit.stage1.infer.segment_study(..., levels=...)` gives it to the segmenter (input planes or fusion).

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

    def recipe(self):
        """The input recipe of this run (`kit.stage1.recipe.LevelRecipe`)."""
        from .recipe import LevelRecipe

        return LevelRecipe.from_config(self.data)

    def model_spec(self) -> tuple[str, dict]:
        """Registered model name and its plain kwargs, from this config alone."""
        m, channels = self.model, self.recipe().n_channels
        return m.name, {"in_channels": channels, "classes": 7, "encoder": m.encoder, "hidden": m.hidden,
                        **input_scaling(m, channels)}

    def check(self) -> None:
        """Raise ConfigError for values no run can use."""
        d = self.data
        self._check_source()
        if not 0.0 <= d.z_jitter < 1.0:
            raise ConfigError(f"data.z_jitter must be in [0, 1); got {d.z_jitter}")
        if not 0.0 <= d.zoom < 0.5:
            raise ConfigError(f"data.zoom must be in [0, 0.5); got {d.zoom}")
        if d.slice_mm <= 0 or d.neighbours < 0 or d.seq_len < 1 or d.repeats < 1 or d.image_size < 32:
            raise ConfigError("data.slice_mm must be > 0, data.neighbours >= 0, data.seq_len and data.repeats "
                              f">= 1, data.image_size >= 32; got {d}")
        self._check_train_and_name()
