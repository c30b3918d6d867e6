"""Trained runs: a run folder's fold checkpoints -> models in eval mode, with their typed configs and calibration.

`load_run` rebuilds each fold's typed config from its checkpoint (`kit.config.config_from_dict`) and its model
(`create_model(model_name, **model_kwargs)`, pretrained weights off), loads the weights, puts it in eval mode and
on the device, once. Never imports `kit.train`: a run folder (`runs/<config name>/fold<k>/model.pt`) is all it
needs.

Checkpoint contract (written by `kit.train`): `{"model": state_dict, "model_name": str, "model_kwargs": dict,
"config": resolved config dict, "epoch": int, "metric": float}`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import config_from_dict
from .sections import ConfigError
from .evaluate.calibration import read_calibration
from .paths import PathLike

# Keyword arguments forced off at inference: those that would make a model factory fetch or read weights (the
# checkpoint holds every weight), and activation checkpointing, a training-only memory trade that would also put
# Grad-CAM's hooks (`kit.evaluate.explain`) inside recomputed blocks.
_INFERENCE_KWARGS = {"pretrained": False, "encoder_weights": None, "pretrained_weights": None,
                     "grad_checkpointing": False}

log = logging.getLogger("kit.runs")


#: how an ensemble of classifiers (folds, runs, flip views) is averaged: probabilities, or logits then the sigmoid
MEANS = ("prob", "logit")


@dataclass(frozen=True)
class InferenceOptions:
    """How trained runs predict a study, as one object from the command line (`kit submit --mean --weights
    --tta-flip`) through `submit`, the predictor and `predict_study` to `classify_study`.

    Attributes:
        mean: how the classifier ensemble is averaged, "prob" or "logit" (stage 1 averages probabilities).
        weights: classifier run weights: None (every run alike), one value per run (order of first appearance)
            or {run folder name: weight} (runs not named: 1); checked against the runs by `classify_study`.
        tta_flip: the left-right mirrored crops join the classifier's batch as a second view, for every
            classifier (a run trained with `data.tta_flip` has it on already).
        amp: autocast on CUDA (None: on there); CPU always runs float32.

    Raises:
        ValueError: an unknown `mean`, or weights that are not numbers.
    """

    mean: str = "prob"
    weights: tuple[float, ...] | Mapping[str, float] | None = None
    tta_flip: bool = False
    amp: bool | None = None

    def __post_init__(self) -> None:
        if self.mean not in MEANS:
            raise ValueError(f"mean must be one of {MEANS}; got {self.mean!r}")
        if self.weights is not None:  # a plain, picklable copy: the options travel to device workers
            weights = ({str(k): float(v) for k, v in self.weights.items()} if isinstance(self.weights, Mapping)
                       else tuple(float(w) for w in self.weights))
            object.__setattr__(self, "weights", weights)


@dataclass
class LoadedModel:
    """One fold's model, ready for inference, with the typed config it was trained with.

    Attributes:
        model: the network, in eval mode, on its device.
        config: the resolved training config (e.g. `SegConfig`, `LevelConfig`), rebuilt from the checkpoint.
        fold: fold index, from the checkpoint's folder name `fold<k>`.
        path: the checkpoint file.
        model_name: registry name given to `create_model`.
        epoch: epoch of the saved weights.
        metric: validation metric of the saved weights.
        calibration: the run's `calibration.json` (`kit.evaluate.calibration`), read once by `load_run`; None without one.
    """

    model: torch.nn.Module
    config: object
    fold: int
    path: Path
    model_name: str
    epoch: int | None = None
    metric: float | None = None
    calibration: dict | None = None

    @property
    def provides(self) -> str:
        """What the model gives a study at inference, its stage's role (`kit.stages`: SEGMENTER, LEVELS,
        CLASSIFIER)."""
        from .stages import stage_of

        return stage_of(self.config).gives

    @property
    def recipe(self):
        """The run's input recipe (`kit.stage1.recipe.SegRecipe` / `LevelRecipe`), as in training."""
        return self.config.recipe()

    @property
    def image_size(self) -> int:
        """In-plane size S the model was trained on."""
        return int(self.config.data.image_size)

    @property
    def window(self) -> str:
        """HU window name (a key of `kit.constants.WINDOWS`)."""
        return self.config.data.window

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return next(self.model.parameters()).device


def _read_checkpoint(path: Path) -> dict:
    try:  # weights_only: tensors and plain containers only, never arbitrary pickled code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in ("model", "model_name", "model_kwargs", "config") if not isinstance(ckpt, dict)
               or k not in ckpt]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {missing}; expected keys model, model_name, model_kwargs, "
                           "config, epoch, metric (written by kit.train.fit_fold)")
    return ckpt


def load_run(run_dir: PathLike, folds: Sequence[int] | None = None, device: str | torch.device = "cpu",
             ) -> list[LoadedModel]:
    """Load the fold models of one run.

    Args:
        run_dir: `runs/<config name>` holding `fold<k>/model.pt`.
        folds: fold indices to load (default: every `fold*/model.pt` found).
        device: where the models go.

    Returns:
        One `LoadedModel` per fold, in fold order, each in eval mode on `device` (in channels-last layout
        when it was trained so, `train.channels_last`).

    Raises:
        FileNotFoundError: no run folder, no checkpoint at all, or a requested fold's `model.pt` is missing.
        RuntimeError: a checkpoint is corrupt, holds a config this kit cannot read, names an unknown model, or
            its weights do not fit the model (the message names the file).
        ValueError: the run's `calibration.json` lacks a target or holds a non-finite number.
    """
    from .models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if folds is None:
        found = {int(m.group(1)): p for p in run_dir.glob("fold*/model.pt")
                 if (m := re.fullmatch(r"fold(\d+)", p.parent.name))}
        if not found:
            raise FileNotFoundError(f"no fold*/model.pt in {run_dir}; train it first (kit train --config ...)")
        paths = dict(sorted(found.items()))
    else:
        paths = {int(k): run_dir / f"fold{int(k)}" / "model.pt" for k in folds}
        absent = [str(p) for p in paths.values() if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"missing checkpoint(s): {', '.join(absent)}")
    device = torch.device(device)
    calibration = read_calibration(run_dir)
    loaded = []
    for fold, path in paths.items():
        ckpt = _read_checkpoint(path)
        try:
            config = config_from_dict(ckpt["config"])
        except ConfigError as exc:
            raise RuntimeError(f"checkpoint {path}: its config does not fit this kit: {exc}") from None
        kwargs = dict(ckpt["model_kwargs"])
        kwargs.update({k: v for k, v in _INFERENCE_KWARGS.items() if k in kwargs})
        try:
            model = create_model(ckpt["model_name"], **kwargs)
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RuntimeError(f"checkpoint {path}: cannot rebuild {ckpt['model_name']}({kwargs}) from it: {exc}"
                               ) from exc
        model.eval().to(device)
        if config.train.channels_last:
            model.to(memory_format=torch.channels_last)
        loaded.append(LoadedModel(model=model, config=config, fold=fold, path=path, model_name=ckpt["model_name"],
                                  epoch=ckpt.get("epoch"), metric=ckpt.get("metric"), calibration=calibration))
    return loaded


def flatten_models(runs) -> list[LoadedModel]:
    """LoadedModel | run folder | a sequence of those (nested once) -> a flat list of models."""
    if isinstance(runs, (LoadedModel, str, os.PathLike)):
        runs = [runs]
    models: list[LoadedModel] = []
    for item in runs:
        if isinstance(item, LoadedModel):
            models.append(item)
        elif isinstance(item, (str, os.PathLike)):
            models.extend(load_run(item, device="cuda" if torch.cuda.is_available() else "cpu"))
        else:
            models.extend(flatten_models(item))
    if not models:
        raise ValueError("no models given: pass load_run(run_dir) results or run folders")
    return models
