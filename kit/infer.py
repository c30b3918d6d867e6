"""Inference with trained runs: load fold checkpoints, predict, segment one study.

Never imports `kit.train`: a run folder (`runs/<config name>/fold<k>/model.pt`) is all it needs.

- `load_run` rebuilds each fold's typed config from its checkpoint (`kit.config.config_from_dict`) and its
  model (`create_model(model_name, **model_kwargs)`, pretrained weights off), loads the weights, puts it in
  eval mode and on the device, once.
- `predict_vertebra_probs` (segmenters) and `predict_levels` (level models) build every input with the run's
  own recipe (`LoadedModel.recipe`, `kit.slices`), the very code training and validation use.
- `segment_study` runs a fold ensemble over one study and turns the mean per-vertebra probabilities into
  clean labels and vertebra extents (`kit.crops`): a `kit.results.SegResult`.

Batch runs over a split (`segment_studies`) live in `kit.runner`, stored results in `kit.results`, plots in
`kit.report`.

Checkpoint contract (written by `kit.train`): `{"model": state_dict, "model_name": str, "model_kwargs":
dict, "config": resolved config dict, "epoch": int, "metric": float}`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, config_from_dict
from .constants import VERTEBRAE
from .crops import clean_vertebra_probs, missing_vertebrae, vertebra_extents
from .results import SegResult

log = logging.getLogger("kit.infer")

PathLike = str | os.PathLike
# Keyword arguments that would make a model factory fetch or read weights: forced off at inference,
# where the checkpoint holds every weight.
_WEIGHT_KWARGS = {"pretrained": False, "encoder_weights": None, "pretrained_weights": None}


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
    """

    model: torch.nn.Module
    config: object
    fold: int
    path: Path
    model_name: str
    epoch: int | None = None
    metric: float | None = None

    @property
    def provides(self) -> str:
        """What the model predicts (`provides` of its config class): "vertebra_probs", "levels", ..."""
        return type(self.config).provides

    @property
    def recipe(self):
        """The run's input recipe (`kit.slices.SegRecipe` / `LevelRecipe`), as in training."""
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
    loaded = []
    for fold, path in paths.items():
        ckpt = _read_checkpoint(path)
        try:
            config = config_from_dict(ckpt["config"])
        except ConfigError as exc:
            raise RuntimeError(f"checkpoint {path}: its config does not fit this kit: {exc}") from None
        kwargs = dict(ckpt["model_kwargs"])
        kwargs.update({k: v for k, v in _WEIGHT_KWARGS.items() if k in kwargs})
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
                                  epoch=ckpt.get("epoch"), metric=ckpt.get("metric")))
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

    `source` is a `kit.dicom.Series` (prepared by `kit.cache.prepare_arrays`, as `kit prepare` does), the
    cache's arrays (`kit.cache.load_cached` / `load_prepared`) or a bare uint8 (Z, S, S) array (no spacing:
    models that need it raise). Arrays of another in-plane size are resized (`kit.dicom.resize_slices`).
    """
    from .dicom import resize_slices

    if hasattr(source, "hu"):  # kit.dicom.Series
        from .cache import prepare_arrays

        uid = getattr(source, "uid", None)
        source = {**prepare_arrays(source, size, window_name), "uid": uid}
    if isinstance(source, np.ndarray):
        source = {"image": source}
    if not isinstance(source, dict):
        raise TypeError(f"segment_study takes a kit.dicom.Series, cached arrays (dict) or a uint8 (Z, S, S) array; "
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
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
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


def predict_vertebra_probs(image: np.ndarray, models: Sequence[LoadedModel], *, batch_size: int = 16,
                           device: str | torch.device | None = None, amp: bool | None = None,
                           uid: str | None = None, dz: float | None = None,
                           levels: np.ndarray | None = None) -> np.ndarray:
    """Mean sigmoid of a fold ensemble of segmenters over every slice of a prepared volume.

    Each model's input comes from its own recipe (`LoadedModel.recipe.inputs`): the slices at its offsets in
    mm, scaled, and for a level-conditioned model the level planes made from `levels` exactly as training
    makes them from the true ranges. Channels after the 7th (e.g. "other vertebra") are ignored.

    Args:
        image: uint8 (Z, S, S), S = the models' image size.
        models: the ensemble (each may have its own recipe).
        batch_size: slices per forward pass.
        device: where to run (default: the first model's device; models are moved there if needed).
        amp: autocast (bf16, else fp16) on CUDA; default on for CUDA, always off on CPU.
        uid: study name for error messages.
        dz: the study's slice spacing in mm (required).
        levels: (7, Z) per-slice presence (`predict_levels`, or `kit.slices.true_presence`), needed by
            level-conditioned models.

    Returns:
        float16 (7, Z, S, S) probabilities of C1..C7.

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
    planes = []
    for m in models:
        if not m.recipe.level_input:
            planes.append(None)
            continue
        if levels is None:
            raise ValueError(f"study {uid}: {m.path} is conditioned on the level model; pass levels="
                             "predict_levels(...) (segment_study: a level run)")
        levels = np.asarray(levels, dtype=np.float32)
        if levels.shape != (len(VERTEBRAE), z):
            raise ValueError(f"study {uid}: levels {tuple(levels.shape)}; expected ({len(VERTEBRAE)}, {z})")
        planes.append(m.recipe.planes(levels, dz))
    probs = np.empty((len(VERTEBRAE), z, s_y, s_x), dtype=np.float16)
    with torch.inference_mode(), _autocast(device, amp):
        for z0 in range(0, z, batch_size):
            centres = np.arange(z0, min(z0 + batch_size, z))
            total = None
            for m, plane in zip(models, planes):
                x = _to_model(m.recipe.inputs(image, centres, dz, plane), m, device)
                logits = m.model(x)
                if logits.ndim != 4 or logits.shape[1] < len(VERTEBRAE) or logits.shape[2:] != x.shape[2:]:
                    raise SegmentationError(f"study {uid}: {m.path} gave logits {tuple(logits.shape)} for input "
                                            f"{tuple(x.shape)}; expected (B, >=7, {s_y}, {s_x})")
                p = torch.sigmoid(logits[:, :len(VERTEBRAE)].float())
                if torch.isnan(p).any():
                    raise SegmentationError(f"study {uid}: NaN in the output of {m.path} at slices "
                                            f"{z0}..{int(centres[-1])}")
                total = p if total is None else total + p
            probs[:, z0:z0 + len(centres)] = (total / len(models)).transpose(0, 1).to(torch.float16).cpu().numpy()
    return probs


def predict_levels(image: np.ndarray, dz: float | None, models: Sequence[LoadedModel], *,
                   device: str | torch.device | None = None, uid: str | None = None) -> np.ndarray:
    """Per-slice presence of C1..C7 from level models (`kit.models.level`), mean over the ensemble.

    Each model's recipe (`kit.slices.LevelRecipe`) resizes the study to its size and samples it every
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
    for m in models:
        dev = torch.device(device) if device is not None else m.device
        m.model.to(dev)
        recipe = m.recipe
        grid = recipe.grid(z, dz)
        x = _to_model(recipe.inputs(recipe.resize(image), grid), m, dev)
        with torch.inference_mode():
            p = torch.sigmoid(m.model(x[None])[0].float()).cpu().numpy()  # (T, 7)
        if np.isnan(p).any():
            raise SegmentationError(f"study {uid}: NaN in the output of level model {m.path}")
        for c in range(len(VERTEBRAE)):
            total[c] += np.interp(np.arange(z), grid, p[:, c])
    return (total / len(models)).astype(np.float32)


def fuse_levels(probs: np.ndarray, levels: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Let the level model name the vertebra and the segmenter draw it.

    Per pixel: the segmenter's foreground, max_c p_c, is kept; it is shared among C1..C7 in proportion to
    p_c x L_c, where L_c = levels[c, z] is the level model's presence of vertebra c in the pixel's slice
    (clipped to at least `eps`):

        p'_c = max_j p_j x p_c L_c / sum_j p_j L_j

    A pixel the segmenter calls C3 or C4 alike (two look-alike levels learned as one) goes to the one the
    level model finds in that slice; a pixel only one vertebra claims keeps its probability even where the
    level model's coarser steps end a slice early (its tips), so outlines come from the segmenter alone.
    Where every L is tiny the clip makes the split fall back to the segmenter's own.

    Args:
        probs: (7, Z, H, W) segmenter probabilities of C1..C7.
        levels: (7, Z) per-slice presence from `predict_levels`.

    Returns:
        float16 (7, Z, H, W).
    """
    p = probs.astype(np.float32)
    weighted = p * np.clip(levels.astype(np.float32), eps, 1.0)[:, :, None, None]
    total = weighted.sum(axis=0)
    return (p.max(axis=0) * weighted / np.maximum(total, 1e-12)).astype(np.float16)


def segment_study(
    source,
    runs,
    *,
    batch_size: int = 16,
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
    `torch.inference_mode`, autocast on CUDA), clean up (`kit.crops.clean_vertebra_probs`: threshold,
    largest component, overlaps, head-to-feet order) and measure (`kit.crops.vertebra_extents`).

    NaN handling: a NaN anywhere in a model's output raises `SegmentationError` naming the study and the
    checkpoint, rather than producing silently wrong labels; `kit.runner.segment_studies` records it.

    Args:
        source: a `kit.dicom.Series` (HU), the cache's arrays (dict), or a prepared uint8 (Z, S, S) array
            (resized in-plane if S differs from the models' image size; give `spacing` through a dict).
        runs: `load_run` output, several of them (nested lists), or run folders (loaded on every call:
            load once with `load_run` when segmenting many studies). Level models among them
            (`provides == "levels"`) are used as `levels`.
        batch_size: slices per forward pass (does not change the result).
        device: where to run (default: where the models are).
        amp: autocast on CUDA (default: on there; CPU always runs float32).
        threshold: probability threshold of the clean-up.
        keep_probs: keep the float16 (7, Z, S, S) probabilities on the result (after level fusion).
        uid: study name (default: the source's).
        levels: more level models (`load_run` of a level run, or its folder), or a (7, Z) presence array in
            their place (e.g. `kit.slices.true_presence`). Their per-slice presence goes into
            level-conditioned segmenters (`data.level_input`) and is fused into the probabilities of the others
            before the clean-up (`fuse_levels`). None: the segmenter alone (level-conditioned ones then raise).
        fuse: apply `fuse_levels`; default: only when some segmenter is not level-conditioned.

    Returns:
        A `kit.results.SegResult`: labels (Z, S, S) uint8, extents, missing and dropped vertebrae, timing.
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
    probs = predict_vertebra_probs(image, models, batch_size=batch_size, device=device, amp=amp, uid=uid, dz=dz,
                                   levels=presence)
    if fuse is None:
        fuse = not all(m.recipe.level_input for m in models)
    if presence is not None and fuse:
        probs = fuse_levels(probs, presence)
    t_fwd = time.perf_counter()
    labels, dropped = clean_vertebra_probs(probs, threshold, return_dropped=True)
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
