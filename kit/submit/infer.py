"""Inference with trained runs: load fold checkpoints, predict, segment one study.

Never imports `kit.train`: a run folder (`runs/<config name>/fold<k>/model.pt`) is all it needs.

- `load_run` rebuilds each fold's typed config from its checkpoint (`kit.config.config_from_dict`) and its
  model (`create_model(model_name, **model_kwargs)`, pretrained weights off), loads the weights, puts it in
  eval mode and on the device, once.
- `predict_vertebra_probs` (segmenters) and `predict_levels` (level models) build every input with the run's
  own recipe (`LoadedModel.recipe`, `kit.stage1.recipe`), the very code training and validation use.
- `segment_study` runs a fold ensemble over one study and turns the mean per-vertebra probabilities into
  clean labels and vertebra extents (`kit.stage2.crops`): a `kit.stage1.results.SegResult`.
- `classify_study` cuts the vertebra crops of a segmented study (`kit.stage2.crops.crop_study`, the call `kit crops`
  makes, geometry from each classifier's config: `ClsConfig.crop_geometry`) and runs a classifier ensemble on all
  vertebrae at once; `predict_study` is the whole pipeline for one study: DICOM in, 8 probabilities out.

Batch runs over a split (`segment_studies`) live in `kit.stage1.runner`, stored results in `kit.stage1.results`, plots in
`kit.evaluate.report`.

Checkpoint contract (written by `kit.train`): `{"model": state_dict, "model_name": str, "model_kwargs":
dict, "config": resolved config dict, "epoch": int, "metric": float}`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..evaluate.calibration import apply_calibration, read_calibration
from ..config import ConfigError, config_from_dict
from ..constants import PROB_SCALE, TARGETS, TRAIN_PREVALENCE, VERTEBRAE
from ..stage2.crops import clean_vertebra_probs, crop_study, missing_vertebrae, vertebra_extents
from ..data import stack_input
from ..devices import cuda_half_dtype
from ..evaluate.metrics import complete_targets, logit, sigmoid, targets_from_vertebrae
from ..models.level import level_presence_probs
from ..stage1.results import SegResult

log = logging.getLogger("kit.submit.infer")

PathLike = str | os.PathLike
# Keyword arguments forced off at inference: those that would make a model factory fetch or read weights (the
# checkpoint holds every weight), and activation checkpointing, a training-only memory trade that would also put
# Grad-CAM's hooks (`kit.evaluate.explain`) inside recomputed blocks.
_INFERENCE_KWARGS = {"pretrained": False, "encoder_weights": None, "pretrained_weights": None,
                     "grad_checkpointing": False}


class SegmentationError(RuntimeError):
    """A study could not be segmented (e.g. the model produced NaN); the message names the study."""


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
        """What the model predicts (`provides` of its config class): "vertebra_probs", "levels", ..."""
        return type(self.config).provides

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
    from ..models import create_model

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


def _flatten_models(runs) -> list[LoadedModel]:
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
            models.extend(_flatten_models(item))
    if not models:
        raise ValueError("no models given: pass load_run(run_dir) results or run folders")
    return models


def prepare_input(source, size: int, window_name: str) -> tuple[np.ndarray, dict]:
    """A study in any of its forms -> (uint8 (Z, S, S) image at the models' size, metadata).

    `source` is a `kit.io.dicom.Series` (prepared by `kit.io.cache.prepare_arrays`, as `kit prepare` does), the
    cache's arrays (`kit.io.cache.load_cached` / `load_prepared`) or a bare uint8 (Z, S, S) array (no spacing:
    models that need it raise). Arrays of another in-plane size are resized (`kit.io.dicom.resize_slices`).
    """
    from ..io.dicom import resize_slices

    if hasattr(source, "hu"):  # kit.io.dicom.Series
        from ..io.cache import prepare_arrays

        uid = getattr(source, "uid", None)
        source = {**prepare_arrays(source, size, window_name), "uid": uid}
    if isinstance(source, np.ndarray):
        source = {"image": source}
    if not isinstance(source, dict):
        raise TypeError(f"segment_study takes a kit.io.dicom.Series, cached arrays (dict) or a uint8 (Z, S, S) array; "
                        f"got {type(source).__name__}")
    image = np.asarray(source["image"])
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (Z, S, S); got {image.dtype} {image.shape}")
    spacing = source.get("spacing")
    spacing = None if spacing is None else tuple(float(v) for v in spacing)
    orig_hw = tuple(int(v) for v in source["orig_hw"]) if source.get("orig_hw") is not None else image.shape[1:]
    if image.shape[1:] != (size, size):
        log.debug("resizing image %s to the models' %d px", image.shape, size)
        if spacing is not None:
            spacing = (spacing[0], spacing[1] * image.shape[1] / size, spacing[2] * image.shape[2] / size)
        image = resize_slices(image, size)
    meta = {"uid": source.get("uid"), "instance_numbers": source.get("instance_numbers"), "spacing": spacing,
            "orig_hw": orig_hw}
    return np.ascontiguousarray(image), meta


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=cuda_half_dtype(device))
    return torch.autocast(device.type, enabled=False)


def _slice_spacing(dz: float | None, uid: str | None) -> float:
    if dz is None:
        raise ValueError(f"study {uid}: the slice spacing is needed (models take their input slices in mm); pass a "
                         "Series or cached arrays with `spacing`, or dz=")
    return float(dz)


def _to_model(x: np.ndarray, m: LoadedModel, device: torch.device) -> torch.Tensor:
    xt = torch.from_numpy(x).to(device, non_blocking=True)
    if m.config.train.channels_last and xt.ndim == 4:
        xt = xt.contiguous(memory_format=torch.channels_last)
    return xt


#: stage-1 forward passes on a CPU hold at most about this many pixels (slices x S x S) of input at once: the
#: activations of a 384 px Unet grow with the batch (~1.1 GB above the model at 16 slices, ~0.3 GB at 4), and on a
#: CPU they are the process's own memory; 4 slices at 384 px, 32 (the cap) at 128 px.
CPU_BATCH_PIXELS = 4 * 384 * 384
GPU_BATCH_SIZE = 16  # slices per forward pass on CUDA (activations in GPU memory, not the process's)


def stage1_batch_size(image_size: int, device: str | torch.device | None) -> int:
    """The default stage-1 batch: `GPU_BATCH_SIZE` slices on CUDA; on a CPU as many slices as fit in
    `CPU_BATCH_PIXELS` (at least 1, at most 32). The batch never changes the result, only time and memory."""
    if device is not None and torch.device(device).type == "cuda":
        return GPU_BATCH_SIZE
    return int(min(32, max(1, CPU_BATCH_PIXELS // (int(image_size) ** 2))))


def probs_to_float(probs: np.ndarray) -> np.ndarray:
    """Stage-1 probabilities as float32 in [0, 1]: uint8 ones (`predict_vertebra_probs`) divided by
    `PROB_SCALE`, float ones as they are."""
    probs = np.asarray(probs)
    if probs.dtype == np.uint8:
        return probs.astype(np.float32) / PROB_SCALE
    return probs.astype(np.float32, copy=False)


def predict_vertebra_probs(image: np.ndarray, models: Sequence[LoadedModel], *, batch_size: int | None = None,
                           device: str | torch.device | None = None, amp: bool | None = None,
                           uid: str | None = None, dz: float | None = None,
                           levels: np.ndarray | None = None, fuse: bool = False) -> np.ndarray:
    """Mean sigmoid of a fold ensemble of segmenters over every slice of a prepared volume.

    Each model's input comes from its own recipe (`LoadedModel.recipe.inputs`): the slices at its offsets in
    mm, scaled, and for a level-conditioned model the level planes made from `levels` exactly as training
    makes them from the true ranges; models with equal recipes (the folds of a run) share one input per batch,
    built once. Channels after the 7th (e.g. "other vertebra") are ignored. With `fuse`, `levels` is fused into
    each batch's mean (`fuse_levels`) where it was computed (on the GPU there), before it is stored.

    Args:
        image: uint8 (Z, S, S), S = the models' image size.
        models: the ensemble (each may have its own recipe).
        batch_size: slices per forward pass; default `stage1_batch_size` (4 at 384 px on a CPU). It does not
            change the result.
        device: where to run (default: the first model's device; models are moved there if needed).
        amp: autocast on CUDA (bf16 where the GPU has it in hardware, else fp16: `kit.devices`); default on for
            CUDA, always off on CPU.
        uid: study name for error messages.
        dz: the study's slice spacing in mm (required).
        levels: (7, Z) per-slice presence (`predict_levels`, or `kit.stage1.recipe.true_presence`), needed by
            level-conditioned models and by `fuse`.
        fuse: fuse `levels` into the probabilities (`fuse_levels`).

    Returns:
        uint8 (7, Z, S, S) probabilities of C1..C7 (fused when `fuse`) in steps of 1/255 (p = value /
        `PROB_SCALE`, rounded to the nearest step; `probs_to_float` converts): half the memory of float16 (a
        600-slice 384 px study: 0.62 GB instead of 1.24); the clean-up's 0.5 threshold falls between two steps.

    Raises:
        SegmentationError: a model gave NaN, or fewer than 7 channels, or another spatial size.
    """
    device = torch.device(device) if device is not None else models[0].device
    amp = device.type == "cuda" if amp is None else amp
    dz = _slice_spacing(dz, uid)
    for m in models:
        if m.device != device:
            m.model.to(device)
    z, s_y, s_x = image.shape
    batch_size = batch_size or stage1_batch_size(s_y, device)
    if levels is not None:
        levels = np.asarray(levels, dtype=np.float32)
        if levels.shape != (len(VERTEBRAE), z):
            raise ValueError(f"study {uid}: levels {tuple(levels.shape)}; expected ({len(VERTEBRAE)}, {z})")
    elif fuse:
        raise ValueError(f"study {uid}: fuse=True needs levels= (predict_levels(...))")
    planes = {}  # per recipe: the folds of a run share one
    for m in models:
        if m.recipe.level_input and levels is None:
            raise ValueError(f"study {uid}: {m.path} is conditioned on the level model; pass levels="
                             "predict_levels(...) (segment_study: a level run)")
        if m.recipe not in planes:
            planes[m.recipe] = m.recipe.planes(levels, dz) if m.recipe.level_input else None
    presence = torch.from_numpy(levels).to(device) if fuse else None
    probs = np.empty((len(VERTEBRAE), z, s_y, s_x), dtype=np.uint8)
    with torch.inference_mode(), _autocast(device, amp):
        for z0 in range(0, z, batch_size):
            centres = np.arange(z0, min(z0 + batch_size, z))
            total, inputs = None, {}
            for m in models:
                key = (m.recipe, m.config.train.channels_last)  # built once for the folds that share it
                if key not in inputs:
                    inputs[key] = _to_model(m.recipe.inputs(image, centres, dz, planes[m.recipe]), m, device)
                x = inputs[key]
                logits = m.model(x)
                if logits.ndim != 4 or logits.shape[1] < len(VERTEBRAE) or logits.shape[2:] != x.shape[2:]:
                    raise SegmentationError(f"study {uid}: {m.path} gave logits {tuple(logits.shape)} for input "
                                            f"{tuple(x.shape)}; expected (B, >=7, {s_y}, {s_x})")
                p = torch.sigmoid(logits[:, :len(VERTEBRAE)].float())
                if torch.isnan(p).any():
                    raise SegmentationError(f"study {uid}: NaN in the output of {m.path} at slices "
                                            f"{z0}..{int(centres[-1])}")
                total = p if total is None else total + p
            mean = (total / len(models)).transpose(0, 1)
            if presence is not None:
                mean = fuse_levels(mean, presence[:, z0:z0 + len(centres)])
            probs[:, z0:z0 + len(centres)] = mean.mul(PROB_SCALE).round_().to(torch.uint8).cpu().numpy()
    return probs


def predict_levels(image: np.ndarray, dz: float | None, models: Sequence[LoadedModel], *,
                   device: str | torch.device | None = None, uid: str | None = None) -> np.ndarray:
    """Per-slice presence of C1..C7 from level models (`kit.models.level`), mean over the ensemble.

    Each model's recipe (`kit.stage1.recipe.LevelRecipe`) resizes the study to its size and samples it every
    `data.slice_mm`, as in validation; the whole study runs at once, unpadded, and its sigmoid is
    interpolated linearly back to every slice.

    Args:
        image: uint8 (Z, S, S) windowed slices (any S; resized per model).
        dz: slice spacing in mm (required).
        models: level models from `load_run`.

    Returns:
        float32 (7, Z) probabilities that slice z shows C1..C7.

    Raises:
        SegmentationError: a model gave NaN.
    """
    dz = _slice_spacing(dz, uid)
    z = len(image)
    total = np.zeros((len(VERTEBRAE), z), dtype=np.float64)
    inputs = {}  # built once for the folds that share a recipe
    for m in models:
        dev = torch.device(device) if device is not None else m.device
        m.model.to(dev)
        recipe = m.recipe
        grid = recipe.grid(z, dz)
        key = (recipe, m.config.train.channels_last, dev)
        if key not in inputs:
            inputs[key] = _to_model(recipe.inputs(recipe.resize(image), grid), m, dev)
        x = inputs[key]
        with torch.inference_mode():
            p = level_presence_probs(m.model, x[None], recipe.tta_flip)[0].cpu().numpy()  # (T, 7)
        if np.isnan(p).any():
            raise SegmentationError(f"study {uid}: NaN in the output of level model {m.path}")
        for c in range(len(VERTEBRAE)):
            total[c] += np.interp(np.arange(z), grid, p[:, c])
    return (total / len(models)).astype(np.float32)


def fuse_levels(probs: torch.Tensor, levels: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Let the level model name the vertebra and the segmenter draw it.

    Per pixel: the segmenter's foreground, max_c p_c, is kept; it is shared among C1..C7 in proportion to
    p_c x L_c, where L_c = levels[c, z] is the level model's presence of vertebra c in the pixel's slice
    (clipped to at least `eps`):

        p'_c = max_j p_j x p_c L_c / sum_j p_j L_j

    A pixel the segmenter calls C3 or C4 alike (two look-alike levels learned as one) goes to the one the
    level model finds in that slice; a pixel only one vertebra claims keeps its probability even where the
    level model's coarser steps end a slice early (its tips), so outlines come from the segmenter alone.
    Where every L is tiny the clip makes the split fall back to the segmenter's own.

    `predict_vertebra_probs(..., fuse=True)` applies it to each batch of slices where the batch was computed
    (on the GPU there), so no whole-study volume is ever fused on the CPU.

    Args:
        probs: float (7, B, H, W) probabilities of C1..C7 of B slices.
        levels: (7, B) those slices' presence from `predict_levels`.

    Returns:
        float (7, B, H, W), the dtype of `probs`.
    """
    weighted = probs * levels.to(probs.dtype).clamp(eps, 1.0)[:, :, None, None]
    return probs.amax(dim=0) * weighted / weighted.sum(dim=0).clamp_min(1e-12)


def segment_study(
    source,
    runs,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    threshold: float = 0.5,
    keep_probs: bool = False,
    uid: str | None = None,
    levels=None,
    fuse: bool | None = None,
) -> SegResult:
    """Segment C1..C7 in one study with a fold ensemble and measure each vertebra's extent.

    Steps: prepare the input the way the cache does (`prepare_input`), run the level models if any
    (`predict_levels`), the segmenters (`predict_vertebra_probs`: mean of sigmoids, batched, under
    `torch.inference_mode`, autocast on CUDA), clean up (`kit.stage2.crops.clean_vertebra_probs`: threshold,
    largest component and the pieces cut off from it inside the level ranges, faint end slices, overlaps,
    head-to-feet order) and measure (`kit.stage2.crops.vertebra_extents`).

    NaN handling: a NaN anywhere in a model's output raises `SegmentationError` naming the study and the
    checkpoint, rather than producing silently wrong labels; `kit.stage1.runner.segment_studies` records it.

    Args:
        source: a `kit.io.dicom.Series` (HU), the cache's arrays (dict), or a prepared uint8 (Z, S, S) array
            (resized in-plane if S differs from the models' image size; give `spacing` through a dict).
        runs: `load_run` output, several of them (nested lists), or run folders (loaded on every call:
            load once with `load_run` when segmenting many studies). Level models among them
            (`provides == "levels"`) are used as `levels`.
        batch_size: slices per forward pass (does not change the result); default `stage1_batch_size`.
        device: where to run (default: where the models are).
        amp: autocast on CUDA (default: on there; CPU always runs float32).
        threshold: probability threshold of the clean-up.
        keep_probs: keep the uint8 (7, Z, S, S) probabilities (steps of 1/255, `probs_to_float`) on the result
            (after level fusion).
        uid: study name (default: the source's).
        levels: more level models (`load_run` of a level run, or its folder), or a (7, Z) presence array in
            their place (e.g. `kit.stage1.recipe.true_presence`). Their per-slice presence goes into
            level-conditioned segmenters (`data.level_input`) and is fused into the probabilities of the others
            before the clean-up (`fuse_levels`). None: the segmenter alone (level-conditioned ones then raise).
        fuse: apply `fuse_levels`; default: only when some segmenter is not level-conditioned.

    Returns:
        A `kit.stage1.results.SegResult`: labels (Z, S, S) uint8, extents, missing and dropped vertebrae, timing.
    """
    start = time.perf_counter()
    models = _flatten_models(runs)
    level_models = [m for m in models if m.provides == "levels"]
    models = [m for m in models if m.provides == "vertebra_probs"]
    presence = None
    if isinstance(levels, np.ndarray):
        presence = levels.astype(np.float32)
    elif levels is not None:
        level_models += _flatten_models(levels)
    if not models:
        raise ValueError("no segmenter among the models given")
    sizes = {m.image_size for m in models}
    if len(sizes) != 1:
        raise ValueError(f"the ensemble mixes image sizes {sorted(sizes)}; segment with one size at a time")
    windows = {m.window for m in models}
    if len(windows) != 1:
        raise ValueError(f"the ensemble mixes HU windows {sorted(windows)}")
    image, meta = prepare_input(source, sizes.pop(), windows.pop())
    uid = uid or meta["uid"]
    t_prep = time.perf_counter()
    dz = meta["spacing"][0] if meta["spacing"] is not None else None
    if presence is None and level_models:
        presence = predict_levels(image, dz, level_models, device=device, uid=uid)
    if fuse is None:
        fuse = not all(m.recipe.level_input for m in models)
    probs = predict_vertebra_probs(image, models, batch_size=batch_size, device=device, amp=amp, uid=uid, dz=dz,
                                   levels=presence, fuse=fuse and presence is not None)
    t_fwd = time.perf_counter()
    labels, dropped = clean_vertebra_probs(probs, threshold, levels=presence, dz=dz, return_dropped=True)
    extents = vertebra_extents(labels, meta["spacing"])
    t_end = time.perf_counter()
    total = t_end - start
    timing = {"prepare_s": round(t_prep - start, 4), "forward_s": round(t_fwd - t_prep, 4),
              "cleanup_s": round(t_end - t_fwd, 4), "total_s": round(total, 4),
              "slices_per_s": round(image.shape[0] / max(total, 1e-9), 2)}
    numbers = meta["instance_numbers"]
    return SegResult(uid=uid, labels=labels, extents=extents, missing=missing_vertebrae(extents), dropped=dropped,
                     timing=timing, orig_hw=tuple(int(v) for v in meta["orig_hw"]),
                     instance_numbers=None if numbers is None else np.asarray(numbers),
                     spacing=meta["spacing"], probs=probs if keep_probs else None)


# ---------------------------------------------------------------------------------------------------------
# Stage 2: classify the vertebrae of a study; the whole pipeline for one study
# ---------------------------------------------------------------------------------------------------------

MEANS = ("prob", "logit")


class ClassificationError(RuntimeError):
    """A classifier gave a non-finite output for a study; the message names the study and the checkpoint."""

def run_key(m: LoadedModel) -> str:
    """The run a fold model belongs to: its `runs/<config name>` folder (`path.parent.parent`)."""
    return str(Path(m.path).parent.parent)


def group_runs(models: Sequence[LoadedModel]) -> dict[str, list[LoadedModel]]:
    """{run folder: its fold models}, runs in order of first appearance (see `run_key`)."""
    runs: dict[str, list[LoadedModel]] = {}
    for m in models:
        runs.setdefault(run_key(m), []).append(m)
    return runs


def _model_weights(runs: dict[str, list[LoadedModel]], weights) -> list[float]:
    """One weight per model: its run's weight shared equally among the run's folds, normalised to sum 1.

    `weights`: None (every run 1), a sequence with one value per run (in `runs` order), or a mapping from the
    run's folder name (or full path) to its weight (runs not named: 1).
    """
    keys = list(runs)
    if weights is None:
        per_run = [1.0] * len(keys)
    elif isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in keys and k not in {Path(r).name for r in keys}]
        if unknown:
            raise ValueError(f"weights name runs {unknown} that are not among the classifier runs "
                             f"{[Path(k).name for k in keys]}")
        per_run = [float(weights.get(k, weights.get(Path(k).name, 1.0))) for k in keys]
    else:
        per_run = [float(w) for w in weights]
        if len(per_run) != len(keys):
            raise ValueError(f"weights has {len(per_run)} values for {len(keys)} classifier runs "
                             f"({', '.join(Path(k).name for k in keys)}); give one per run, in that order")
    if any(not np.isfinite(w) or w < 0 for w in per_run) or sum(per_run) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0; got {per_run}")
    flat = [w / len(runs[k]) for k, w in zip(keys, per_run) for _ in runs[k]]
    total = sum(flat)
    return [w / total for w in flat]


def _is_per_study(m: LoadedModel) -> bool:
    from ..tasks import PER_STUDY_MODELS

    return m.config.model.name in PER_STUDY_MODELS


def _classifier_views(m: LoadedModel, stacks: torch.Tensor, found: torch.Tensor, tta_flip: bool,
                      device: torch.device, amp: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One classifier on one study's stacks, all vertebrae (and both views with `tta_flip`) in one batch.

    Args:
        stacks: float32 (7, T, C, S, S) in [0, 1] on `device` (`kit.data.stack_input` of the crop cache's uint8).
        found: bool (7,) on `device`.

    Returns:
        vertebra logits float64 (V, 7) per view (V = 2 with the flip, 1 without), NaN where not found; the
        patient logits (V,) of a model with a patient head, else None.
    """
    views = [stacks, stacks.flip(-1)] if tta_flip else [stacks]  # left-right: the crops' W axis
    n_views = len(views)
    out = np.full((n_views, len(VERTEBRAE)), np.nan)
    found_np = found.cpu().numpy()
    with torch.inference_mode(), _autocast(device, amp):
        if _is_per_study(m):
            x = torch.stack(views)  # (V, 7, T, C, S, S)
            vertebra_mask = found[None].expand(n_views, -1)
            result = m.model(x, None, vertebra_mask)
            out[:, found_np] = result["logit"].float().cpu().numpy().astype(np.float64)[:, found_np]
            return out, result["patient_logit"].float().cpu().numpy().astype(np.float64)
        if not found_np.any():
            return out, None
        x = torch.cat([v[found] for v in views])  # (V * N, T, C, S, S): every found vertebra, every view
        level = torch.arange(len(VERTEBRAE), device=x.device)[found].repeat(n_views)  # 0..6 = C1..C7
        result = m.model(x, None, level)
        logits = result["logit"].float().cpu().numpy().astype(np.float64).reshape(n_views, -1)
        out[:, found_np] = logits
        return out, None


def model_prior(m: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's (`metric_odds`, `train_prevalence`), (8,) float64 each: the odds the row-normalised metric
    rewards and the training labels' prevalence, saved with its weights (`ClsTask.init_model`)."""
    vertebra = m.model.vertebra if _is_per_study(m) else m.model
    odds = getattr(vertebra, "metric_odds", None)  # a stand-in model without them: the classifiers' defaults
    prevalence = getattr(vertebra, "train_prevalence", None)
    return (np.full(len(TARGETS), 2.0) if odds is None else odds.detach().double().cpu().numpy(),
            np.asarray(TRAIN_PREVALENCE, np.float64) if prevalence is None
            else prevalence.detach().double().cpu().numpy())


def _model_values(vertebra_logits: np.ndarray, patient_logits: np.ndarray | None, found: np.ndarray,
                  mean: str, odds: np.ndarray, prevalence: np.ndarray) -> np.ndarray:
    """One model's (8,) values in TARGETS order in the space of `mean` ("prob" or "logit"), views averaged in
    that space, as its validation computes them: without a patient head through
    `kit.evaluate.metrics.targets_from_vertebrae`, with one through `kit.evaluate.metrics.complete_targets`; either way a vertebra
    not found is worth its training prevalence (`kit.evaluate.metrics.fill_missing_vertebrae`)."""
    if patient_logits is None:
        p = targets_from_vertebrae(np.where(found, sigmoid(vertebra_logits), np.nan), odds, prevalence)
    else:
        p = complete_targets(sigmoid(np.concatenate([patient_logits[:, None], vertebra_logits], axis=1)), found,
                             odds, prevalence)
    return logit(p).mean(0) if mean == "logit" else p.mean(0)


def classify_study(hu: np.ndarray, seg, runs, *, dz: float, mean: str = "prob", weights=None,
                   tta_flip: bool = False, device: str | torch.device | None = None, amp: bool | None = None,
                   uid: str | None = None) -> dict:
    """Classify the vertebrae of one study with an ensemble of classifier runs (`provides == "fractures"`).

    The crops are `kit.stage2.crops.crop_study(hu, seg.labels, seg.extents, dropped=seg.dropped, dz=dz,
    **config.crop_geometry())`, the very call `kit crops` makes, cut once per distinct crop geometry among the
    models. A model sees them as training and validation do (`kit.data.stack_input`: uint8 / 255): a per-vertebra
    model (`cls_gru`) gets every found vertebra of the study in one batch, a per-study model (`cls_patient_gru`)
    the whole study with `vertebra_mask` = found; with `tta_flip` the left-right mirrored crops (last axis) join
    the same batch.

    Each model gives 8 values (TARGETS order) as its validation computed them: a per-vertebra model's through
    `kit.evaluate.metrics.targets_from_vertebrae`, a per-study model's (patient_overall from its patient head) through
    `kit.evaluate.metrics.complete_targets`, with the `metric_odds` and `train_prevalence` saved with its weights; a
    vertebra not found is worth its training prevalence (`kit.evaluate.metrics.fill_missing_vertebrae`), also when none
    is found. The flip views are averaged first, then the models, in
    the space of `mean`: "prob" averages probabilities, "logit" averages logits and takes the sigmoid of the
    mean. A run's folds share its
    weight equally (`weights`, see `_model_weights`).

    Args:
        hu: (Z, H, W) HU volume of the original series (`kit.io.dicom.Series.hu`).
        seg: the stage-1 result (`kit.stage1.results.SegResult`: `labels`, `extents`, `dropped`), e.g. `segment_study`.
        runs: classifier models (`load_run` output, several, nested, or run folders).
        dz: the series' slice spacing in mm (`Series.spacing[0]`).
        mean: "prob" or "logit".
        weights: None (every run alike), one value per run (order of first appearance), or {run name: weight}.
        tta_flip: add the left-right flipped crops as a second view.
        device: where to run (default: the first model's device).
        amp: autocast on CUDA (default on there; CPU runs float32).
        uid: study name for messages.

    A run loaded with a `calibration.json` (`kit.evaluate.calibration`, fitted on the run's OOF predictions;
    `LoadedModel.calibration`) has its folds' mean mapped through it before the runs are combined;
    `calibrated_runs` lists those runs.

    Returns:
        `probs` float64 (8,) TARGETS order; `found` bool (7,); `missing`
        {name: why}; `patient_source`; `calibrated_runs`; `models` [{"run", "fold", "probs" (8,)}] per model
        (uncalibrated); `runs` {run folder: (8,) probabilities of its folds' mean, calibrated where the run
        is}; `timing` (`crop_s`, `classify_s`).

    Raises:
        ValueError: no classifier among the models, an unknown `mean`, bad `weights`.
        ClassificationError: a classifier gave NaN / inf for a vertebra found.
    """
    if mean not in MEANS:
        raise ValueError(f"mean must be one of {MEANS}; got {mean!r}")
    models = [m for m in _flatten_models(runs) if m.provides == "fractures"]
    if not models:
        raise ValueError("no classifier (a run whose config provides 'fractures') among the models given")
    grouped = group_runs(models)
    models = [m for run in grouped.values() for m in run]
    model_weights = _model_weights(grouped, weights)
    device = torch.device(device) if device is not None else models[0].device
    amp = device.type == "cuda" if amp is None else amp
    t0 = time.perf_counter()
    crops: dict[tuple, tuple] = {}
    for m in models:
        geometry = m.config.crop_geometry()
        key = tuple(sorted(geometry.items()))
        if key not in crops:
            stacks, found, missing = crop_study(hu, seg.labels, seg.extents, dropped=seg.dropped, dz=float(dz),
                                                **geometry)
            crops[key] = (stacks, found, missing)
    _, found, missing = next(iter(crops.values()))
    t1 = time.perf_counter()
    values = np.full((len(models), len(TARGETS)), np.nan)
    tensors = {key: (stack_input(torch.from_numpy(stacks).to(device)), torch.from_numpy(f).to(device))
               for key, (stacks, f, _) in crops.items()}
    for i, m in enumerate(models):
        if m.device != device:
            m.model.to(device)
        stacks, found_t = tensors[tuple(sorted(m.config.crop_geometry().items()))]
        vertebra_logits, patient_logits = _classifier_views(m, stacks, found_t, tta_flip, device, amp)
        if not np.isfinite(vertebra_logits[:, found]).all() or (
                patient_logits is not None and not np.isfinite(patient_logits).all()):
            raise ClassificationError(f"study {uid}: non-finite output of classifier {m.path}")
        values[i] = _model_values(vertebra_logits, patient_logits, found, mean, *model_prior(m))
    w = np.asarray(model_weights)[:, None]
    combined = (w * values).sum(0)
    to_probs = sigmoid if mean == "logit" else np.asarray
    heads = {_is_per_study(m) for m in models}
    patient_source = ("patient head" if heads == {True} else "the vertebrae found (targets_from_vertebrae)"
                      if heads == {False} else "mean of patient heads and the vertebrae found (targets_from_vertebrae)")
    per_run, run_weights, start = {}, {}, 0
    for key, run in grouped.items():
        share = np.asarray(model_weights[start:start + len(run)])[:, None]
        per_run[key] = to_probs((share * values[start:start + len(run)]).sum(0) / share.sum())
        run_weights[key] = float(share.sum())
        start += len(run)
    calibrated = [key for key, run in grouped.items() if run[0].calibration is not None]
    if calibrated:  # each run's fold mean through its own calibration, then the runs combined as before
        for key in calibrated:
            per_run[key] = apply_calibration(per_run[key], grouped[key][0].calibration)
        space = logit if mean == "logit" else np.asarray
        combined = sum(run_weights[key] * space(per_run[key]) for key in grouped)
    return {"probs": np.asarray(to_probs(combined), dtype=np.float64), "found": found, "missing": missing,
            "patient_source": patient_source, "calibrated_runs": calibrated,
            "models": [{"run": run_key(m), "fold": m.fold, "probs": to_probs(v)} for m, v in zip(models, values)],
            "runs": per_run,
            "timing": {"crop_s": round(t1 - t0, 4), "classify_s": round(time.perf_counter() - t1, 4)}}


def predict_study(study, runs, *, mean: str = "prob", weights=None, tta_flip: bool = False,
                  device: str | torch.device | None = None, amp: bool | None = None, seg=None,
                  threshold: float = 0.5, batch_size: int | None = None, uid: str | None = None) -> dict:
    """One study, DICOM in, the competition's 8 probabilities out.

    One DICOM read (`kit.io.dicom.read_series`, or the `Series` given) serves both stages: stage 1's input is
    `kit.io.cache.prepare_arrays(series, size, window)` at the segmenters' size and window (what `kit prepare`
    caches for training), segmented by the stage-1 runs (`segment_study`: segmenters, level models fused in);
    stage 2 crops the full-resolution `series.hu` (`classify_study`).

    A vertebra not found is worth its training prevalence, in its own value and in patient_overall, exactly as
    in validation (`kit.evaluate.metrics.fill_missing_vertebrae`). patient_overall comes from the patient head of a
    classifier that has one (`cls_patient_gru`), else from the vertebrae (`kit.evaluate.metrics.targets_from_vertebrae`).

    Args:
        study: a study folder of DICOM files, or a `kit.io.dicom.Series` already read.
        runs: `load_run` outputs (stage 1 and stage 2 together, nested lists allowed) or run folders; each
            model's stage is its config's `provides`: "vertebra_probs" (segmenter), "levels" (level model),
            "fractures" (classifier). Any number of folds and runs per stage.
        mean: how the classifier ensemble (folds, runs, flip views) is averaged: "prob" or "logit". Stage 1
            averages probabilities (`segment_study`).
        weights: classifier run weights (`classify_study`).
        tta_flip: left-right flip TTA for the classifier.
        device: where the models run (default: where they are).
        amp: autocast on CUDA (default: on there; always off on CPU).
        seg: a stage-1 result to use instead of running the stage-1 models (e.g. from the ground truth).
        threshold: stage 1's clean-up threshold.
        batch_size: stage-1 slices per forward pass (default `stage1_batch_size`).
        uid: study name (default: the series').

    Returns:
        `uid`; `probs` float64 (8,) in TARGETS order; `found` bool (7,);
        `missing` {name: why}; `patient_source`; `models` and `runs` (per-model and per-run probabilities);
        `seg` (the `SegResult`); `timing` seconds (`read_s`, `segment_s`, `crop_s`, `classify_s`, `total_s`).

    Raises:
        ValueError: no classifier, or no segmenter and no `seg`; bad `mean` or `weights`.
        SegmentationError, ClassificationError: a model produced NaN.
        kit.io.dicom.DicomError: the folder cannot be read.
    """
    from ..io.cache import prepare_arrays
    from ..io.dicom import read_series

    start = time.perf_counter()
    series = study if hasattr(study, "hu") else read_series(study)
    uid = uid or getattr(series, "uid", None)
    t_read = time.perf_counter()
    models = _flatten_models(runs)
    unknown = sorted({m.provides for m in models} - {"vertebra_probs", "levels", "fractures"})
    if unknown:
        raise ValueError(f"models that provide {unknown}: predict_study uses segmenters (vertebra_probs), level "
                         "models (levels) and classifiers (fractures)")
    stage1 = [m for m in models if m.provides in ("vertebra_probs", "levels")]
    classifiers = [m for m in models if m.provides == "fractures"]
    if not classifiers:
        raise ValueError("no classifier run among the runs given (a run whose config provides 'fractures')")
    if seg is None:
        segmenters = [m for m in stage1 if m.provides == "vertebra_probs"]
        if not segmenters:
            raise ValueError("no segmenter run among the runs given, and no seg= result to use instead")
        prepared = prepare_arrays(series, segmenters[0].image_size, segmenters[0].window)
        seg = segment_study({**prepared, "uid": uid}, stage1, batch_size=batch_size, device=device, amp=amp,
                            threshold=threshold, uid=uid)
    t_seg = time.perf_counter()
    result = classify_study(series.hu, seg, classifiers, dz=float(series.spacing[0]), mean=mean, weights=weights,
                            tta_flip=tta_flip, device=device, amp=amp, uid=uid)
    timing = {"read_s": round(t_read - start, 4), "segment_s": round(t_seg - t_read, 4), **result.pop("timing"),
              "total_s": round(time.perf_counter() - start, 4)}
    return {"uid": uid, **result, "seg": seg, "timing": timing}
