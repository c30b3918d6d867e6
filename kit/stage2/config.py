"""Stage-2 config: the fracture classifier (`task: cls`); its stage: `kit.stages`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..sections import (
    AugmentConfig,
    ConfigError,
    OptimConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
    input_scaling,
)

log = logging.getLogger("kit.stage2.config")


@dataclass
class ClsDataConfig(SourceConfig):
    """Data of the stage-2 classifier: per-vertebra slice stacks cut from the original DICOM grid (`kit crops`).

    Attributes:
        data_root, folds_csv, folds_seed, n_folds, fold, window: the studies and their split (`SourceConfig`),
            stage 1's.
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
        tta_flip: validation and inference average each vertebra's answer over its crops and their left-right
            mirror (probabilities; `kit submit --tta-flip` turns it on for a run trained without it).
    """

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
    tta_flip: bool = False


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
            `set_grad_checkpointing`): without it a batch of 16 stacks of 15 slices at 224 px through
            tf_efficientnetv2_s does not fit a 16 GB GPU (docs/benchmarks.md, Memory, "Training memory of the
            full-scale models"); it costs more training compute and changes nothing at inference.
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


@dataclass
class ClsConfig(RunConfig):
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

    def recipe(self):
        """The input recipe (`kit.stage2.recipe.ClsRecipe`): crop geometry, channels, the model's input. The one
        place `kit crops` (training crops), the dataset, inference and `kit explain` take them from, so their
        crops are identical."""
        from .recipe import ClsRecipe

        return ClsRecipe.from_data(self.data)

    @property
    def in_channels(self) -> int:
        """Channels of each slice of a crop: (2n+1) per window, plus the mask."""
        return self.recipe().n_channels

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
                  **input_scaling(m, self.in_channels - int(self.data.with_mask), int(self.data.with_mask))}
        from ..models.start import is_start, start_meta

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
        from ..constants import WINDOWS

        d = self.data
        self._check_source()
        if not d.windows or any(w not in WINDOWS for w in d.windows):
            raise ConfigError(f"data.windows={d.windows}; valid: {', '.join(WINDOWS)}")
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
