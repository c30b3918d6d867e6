"""Inference with trained runs: load fold checkpoints, segment studies, save what was found.

Never imports `kit.train`: a run folder (`runs/<config name>/fold<k>/model.pt`) is all it needs.

- `load_run` builds each fold's model from its checkpoint (`create_model(model_name, **model_kwargs)`,
  pretrained weights off), loads the weights, puts it in eval mode and on the device, once.
- `segment_study` runs a fold ensemble of 2.5D segmenters over one study and turns the mean per-vertebra
  probabilities into clean labels and vertebra extents (`kit.crops`).
- `save_seg_result` / `load_seg_result` keep one study's result as `<uid>.npz` (labels) + `<uid>.json`
  (extents, missing vertebrae, timing).
- `segment_studies` does every study of a split, resumably, catching per-study failures.
- `plot_training_curves`, `plot_dice_per_vertebra` (a run's `fold*/log.csv`, `fold*/oof.csv`) and
  `plot_segmentation` (sagittal overlay of predicted vs true labels) serve the segmenter notebook.

Checkpoint contract (written by `kit.train`): `{"model": state_dict, "model_name": str, "model_kwargs":
dict, "config": resolved config dict, "epoch": int, "metric": float}`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
import torch
from tqdm.auto import tqdm

from .cache import merge_csv
from .constants import VERTEBRAE, WINDOWS
from .crops import VertebraExtent, clean_vertebra_probs, missing_vertebrae, vertebra_extents
from .data import append_level_planes, context_offsets

log = logging.getLogger("kit.infer")

PathLike = str | os.PathLike
FAILURES = "failures.csv"
MISSING = "missing.csv"
SUMMARY = "summary.csv"
# Keyword arguments that would make a model factory fetch or read weights: forced off at inference,
# where the checkpoint holds every weight.
_WEIGHT_KWARGS = {"pretrained": False, "encoder_weights": None, "pretrained_weights": None}


class SegmentationError(RuntimeError):
    """A study could not be segmented (e.g. the model produced NaN); the message names the study."""


@dataclass
class LoadedModel:
    """One fold's model, ready for inference, with what it was trained with.

    Attributes:
        model: the network, in eval mode, on its device.
        config: the resolved training config as a dict (sections such as `data`, `model`, `train`).
        fold: fold index, from the checkpoint's folder name `fold<k>`.
        path: the checkpoint file.
        model_name: registry name given to `create_model`.
        epoch: epoch of the saved weights.
        metric: validation metric of the saved weights.
    """

    model: torch.nn.Module
    config: dict
    fold: int
    path: Path
    model_name: str
    epoch: int | None = None
    metric: float | None = None

    @property
    def image_size(self) -> int:
        """In-plane size S the model was trained on."""
        return int(config_value(self.config, "image_size"))

    @property
    def context(self) -> int:
        """k: the model sees 2k+1 neighbouring slices."""
        return int(config_value(self.config, "context"))

    def offsets(self, dz: float | None) -> np.ndarray:
        """Slice offsets of the input channels for a study of slice spacing `dz`, as in training
        (`kit.data.context_offsets`: from `context_offsets_mm`, `context_mm` or `context_stride`)."""
        data = self.config.get("data", {})
        stride = int(config_value(self.config, "context_stride", 1))
        context_mm, offsets_mm = data.get("context_mm"), data.get("context_offsets_mm")
        if (context_mm is not None or offsets_mm is not None) and dz is None:
            raise ValueError(f"{self.path}: trained with its input slices set in mm, so the study's slice "
                             "spacing is needed (pass a Series or cached arrays, not a bare array)")
        return context_offsets(dz if dz is not None else 1.0, self.context, stride, context_mm, offsets_mm)

    @property
    def level_input(self) -> bool:
        """Conditioned on the level model: its input ends with 7 presence planes (`data.level_input`)."""
        return bool(self.config.get("data", {}).get("level_input", False))

    @property
    def level_ramp_mm(self) -> float:
        """Width of the presence ramps the model was trained with (`data.level_ramp_mm`)."""
        return float(self.config.get("data", {}).get("level_ramp_mm", 2.5))

    @property
    def level_margin_mm(self) -> float:
        """How far the model was trained to see each range widened (`data.level_margin_mm`)."""
        return float(self.config.get("data", {}).get("level_margin_mm", 0.0))

    def level_planes(self, levels: np.ndarray, dz: float | None) -> np.ndarray:
        """(7, Z) presence as this level-conditioned model takes it: dilated along z by `level_margin_mm`
        at each end, then smoothed by a box of `level_ramp_mm` (a step becomes a linear ramp that wide, as in
        training; no smoothing below 2 slices)."""
        dz = dz or 1.0
        margin = int(round(self.level_margin_mm / dz))
        if margin > 0:
            levels = ndimage.maximum_filter1d(levels, size=2 * margin + 1, axis=1, mode="nearest")
        width = int(round(self.level_ramp_mm / dz))
        if width < 2:
            return levels
        return ndimage.uniform_filter1d(levels, size=width, axis=1, mode="nearest")

    @property
    def window(self) -> str:
        """HU window name (a key of `kit.constants.WINDOWS`); "bone" when the config has none."""
        return str(config_value(self.config, "window", "bone"))

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return next(self.model.parameters()).device


def config_value(config: dict, key: str, default=None):
    """A field of a resolved config dict, looked up at top level, then in each section (data, model, ...).

    Raises:
        KeyError: the key is nowhere and no default was given.
    """
    if key in config:
        return config[key]
    for section in config.values():
        if isinstance(section, dict) and key in section:
            return section[key]
    if default is not None:
        return default
    raise KeyError(f"config {config.get('name', '?')!r} has no field {key!r}; sections: {sorted(config)}")


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
        RuntimeError: a checkpoint is corrupt, names an unknown model, or its weights do not fit the model
            (the message names the file).
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
        kwargs = dict(ckpt["model_kwargs"])
        kwargs.update({k: v for k, v in _WEIGHT_KWARGS.items() if k in kwargs})
        try:
            model = create_model(ckpt["model_name"], **kwargs)
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RuntimeError(f"checkpoint {path}: cannot rebuild {ckpt['model_name']}({kwargs}) from it: {exc}"
                               ) from exc
        model.eval().to(device)
        if ckpt["config"].get("train", {}).get("channels_last"):
            model.to(memory_format=torch.channels_last)
        loaded.append(LoadedModel(model=model, config=dict(ckpt["config"]), fold=fold, path=path,
                                  model_name=ckpt["model_name"], epoch=ckpt.get("epoch"),
                                  metric=ckpt.get("metric")))
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


@dataclass
class SegResult:
    """One study's segmentation.

    Attributes:
        uid: StudyInstanceUID (None when unknown).
        labels: uint8 (Z, S, S) clean labels, 0 background, 1..7 = C1..C7, at the prepared in-plane size S.
            Slices are the study's slices, superior-first: index z here is index z of the sorted series
            (the cache never resamples z), so extents' slice indices are the original ones.
        extents: {"C1": VertebraExtent, ...} of the vertebrae found (in-plane boxes in the prepared scale).
        missing: C1..C7 names not found (including those dropped by the clean-up).
        dropped: {name: reason} removed by the clean-up (out of order, too small).
        timing: seconds per step (`prepare_s`, `forward_s`, `cleanup_s`, `total_s`) and `slices_per_s`.
        orig_hw: (H, W) of the original slices; `scale` maps prepared pixels to original ones.
        instance_numbers: (Z,) DICOM InstanceNumber of each slice, when known.
        spacing: (dz, dy, dx) mm in the prepared scale, when known.
        probs: float16 (7, Z, S, S) ensemble probabilities, only with `keep_probs=True`.
    """

    uid: str | None
    labels: np.ndarray
    extents: dict[str, VertebraExtent]
    missing: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    orig_hw: tuple[int, int] | None = None
    instance_numbers: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels per prepared pixel (1.0 when the original size is unknown)."""
        if self.orig_hw is None:
            return 1.0, 1.0
        return self.orig_hw[0] / self.labels.shape[1], self.orig_hw[1] / self.labels.shape[2]

    def table(self) -> pd.DataFrame:
        """One row per vertebra C1..C7: found, slice range, instance numbers, boxes in both scales."""
        return pd.DataFrame.from_dict(
            {name: _extent_record(self.extents.get(name), self.scale, self.instance_numbers)
             for name in VERTEBRAE}, orient="index")


def _extent_record(e: VertebraExtent | None, scale: tuple[float, float],
                   instance_numbers: np.ndarray | None) -> dict:
    """JSON-able description of one extent, with its box also in original pixels."""
    if e is None:
        return {"found": False}
    sy, sx = scale
    rec = {
        "found": True, "z_first": e.z_first, "z_last": e.z_last, "box": [e.y0, e.y1, e.x0, e.x1],
        "box_original": [math.floor(e.y0 * sy), math.ceil(e.y1 * sy), math.floor(e.x0 * sx), math.ceil(e.x1 * sx)],
        "voxels": e.voxels, "centroid": [round(c, 3) for c in e.centroid],
        "instance_numbers": None,
    }
    if instance_numbers is not None:
        numbers = np.asarray(instance_numbers)[e.z_first:e.z_last + 1]
        rec["instance_numbers"] = [int(numbers.min()), int(numbers.max())]
    return rec


def _prepare_input(source, size: int, window_name: str) -> tuple[np.ndarray, dict]:
    """Series | cached dict | uint8 array -> (uint8 (Z, S, S) image, metadata)."""
    meta: dict = {"uid": None, "instance_numbers": None, "spacing": None, "orig_hw": None}
    if isinstance(source, dict):  # kit.cache.load_cached output
        image = np.asarray(source["image"])
        meta["instance_numbers"] = source.get("instance_numbers")
        if "orig_hw" in source:
            meta["orig_hw"] = tuple(int(v) for v in source["orig_hw"])
        if "spacing" in source:
            meta["spacing"] = tuple(float(v) for v in source["spacing"])
    elif isinstance(source, np.ndarray):
        image = source
    elif hasattr(source, "hu"):  # kit.dicom.Series
        from .dicom import resize_slices, window

        hu = np.asarray(source.hu)
        if window_name not in WINDOWS:
            raise ValueError(f"unknown window {window_name!r}; available: {', '.join(WINDOWS)}")
        image = resize_slices(window(hu, *WINDOWS[window_name]), size)
        meta.update(uid=getattr(source, "uid", None), instance_numbers=getattr(source, "instance_numbers", None),
                    orig_hw=hu.shape[1:])
        sp = getattr(source, "spacing", None)
        if sp is not None:
            meta["spacing"] = (float(sp[0]), float(sp[1]) * hu.shape[1] / size, float(sp[2]) * hu.shape[2] / size)
    else:
        raise TypeError(f"segment_study takes a kit.dicom.Series, a cached dict or a uint8 (Z, S, S) array; "
                        f"got {type(source).__name__}")
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (Z, S, S); got {image.dtype} {image.shape}")
    if meta["orig_hw"] is None:
        meta["orig_hw"] = image.shape[1:]
    if image.shape[1:] != (size, size):
        log.debug("resizing image %s to the models' %d px", image.shape, size)
        if meta["spacing"] is not None:
            dz, dy, dx = meta["spacing"]
            meta["spacing"] = (dz, dy * image.shape[1] / size, dx * image.shape[2] / size)
        from .dicom import resize_slices

        image = resize_slices(image, size)
    return np.ascontiguousarray(image), meta


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def predict_vertebra_probs(image: np.ndarray, models: Sequence[LoadedModel], *, batch_size: int = 16,
                           device: str | torch.device | None = None, amp: bool | None = None,
                           uid: str | None = None, dz: float | None = None,
                           levels: np.ndarray | None = None) -> np.ndarray:
    """Mean sigmoid of a fold ensemble over every slice of a prepared volume.

    Slice z is predicted from the slices z + `LoadedModel.offsets(dz)` as in training (z-k*s..z+k*s, or
    the configured offsets in mm; indices clamped at the volume's ends), scaled to [0, 1] as in training (uint8 / 255). Channels after
    the 7th (e.g. "other vertebra") are ignored.

    Args:
        image: uint8 (Z, S, S), S = the models' image size.
        models: the ensemble (each may have its own context k).
        batch_size: slices per forward pass.
        device: where to run (default: the first model's device; models are moved there if needed).
        amp: autocast (bf16, else fp16) on CUDA; default on for CUDA, always off on CPU.
        uid: study name for error messages.
        dz: the study's slice spacing in mm (needed by models trained with `data.context_mm`).
        levels: (7, Z) per-slice presence from `predict_levels`, needed by level-conditioned models
            (`LoadedModel.level_input`): appended to their input as 7 constant planes.

    Returns:
        float16 (7, Z, S, S) probabilities of C1..C7.

    Raises:
        SegmentationError: a model gave NaN, or fewer than 7 channels, or another spatial size.
    """
    device = torch.device(device) if device is not None else models[0].device
    amp = device.type == "cuda" if amp is None else amp
    for m in models:
        if m.device != device:
            m.model.to(device)
    z, s_y, s_x = image.shape
    volume = torch.from_numpy(image).to(device)
    probs = np.empty((len(VERTEBRAE), z, s_y, s_x), dtype=np.float16)
    offsets = [torch.as_tensor(m.offsets(dz), device=device) for m in models]
    if any(m.level_input for m in models):
        if levels is None:
            raise ValueError(f"study {uid}: {next(m.path for m in models if m.level_input)} is conditioned on "
                             "the level model; pass levels=predict_levels(...) (segment_study: a level run)")
        levels = np.asarray(levels, dtype=np.float32)
        if levels.shape != (len(VERTEBRAE), z):
            raise ValueError(f"study {uid}: levels {tuple(levels.shape)}; expected ({len(VERTEBRAE)}, {z})")
    planes_of = {i: torch.as_tensor(m.level_planes(levels, dz), device=device)
                 for i, m in enumerate(models) if m.level_input}
    with torch.inference_mode(), _autocast(device, amp):
        for z0 in range(0, z, batch_size):
            centres = torch.arange(z0, min(z0 + batch_size, z), device=device)
            total = None
            for i, (m, offset) in enumerate(zip(models, offsets)):
                idx = (centres[:, None] + offset).clamp_(0, z - 1)  # (B, channels)
                x = volume[idx].float().div_(255.0)  # (B, channels, S, S)
                if m.level_input:
                    x = append_level_planes(x, planes_of[i][:, centres].T)
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

    Each model samples the study every `data.slice_mm` (`kit.data.level_grid`) at its own in-plane size,
    runs the whole study at once, and its sigmoid is interpolated linearly back to every slice.

    Args:
        image: uint8 (Z, S, S) windowed slices (any S; resized per model).
        dz: slice spacing in mm (required).
        models: level models from `load_run`.

    Returns:
        float32 (7, Z) probabilities that slice z shows C1..C7.

    Raises:
        SegmentationError: a model gave NaN.
    """
    from .dicom import resize_slices
    from .data import level_grid, level_stacks

    if dz is None:
        raise ValueError(f"study {uid}: the level model needs the slice spacing (pass a Series or cached arrays)")
    z = len(image)
    total = np.zeros((len(VERTEBRAE), z), dtype=np.float64)
    for m in models:
        dev = torch.device(device) if device is not None else m.device
        m.model.to(dev)
        size = m.image_size
        small = image if image.shape[1:] == (size, size) else resize_slices(image, size)
        data = m.config.get("data", {})
        grid = level_grid(z, dz, float(data.get("slice_mm", 2.5)))
        x = torch.from_numpy(level_stacks(small, grid, int(data.get("neighbours", 1)))).to(dev)
        with torch.inference_mode():
            p = torch.sigmoid(m.model(x[None].float() / 255.0)[0].float()).cpu().numpy()  # (T, 7)
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

    Steps: prepare the input the way the cache does (window + in-plane resize to the models' image
    size), run the ensemble (`predict_vertebra_probs`: mean of sigmoids, batched, under
    `torch.inference_mode`, autocast on CUDA), clean up (`kit.crops.clean_vertebra_probs`: threshold,
    largest component, overlaps, head-to-feet order) and measure (`kit.crops.vertebra_extents`).

    NaN handling: a NaN anywhere in a model's output raises `SegmentationError` naming the study and the
    checkpoint, rather than producing silently wrong labels; `segment_studies` records it as a failure.

    Args:
        source: a `kit.dicom.Series` (HU), a `kit.cache.load_cached` dict, or a prepared uint8 (Z, S, S)
            array (resized in-plane if S differs from the models' image size).
        runs: `load_run` output, several of them (nested lists), or run folders (loaded on every call:
            load once with `load_run` when segmenting many studies). Level models among them (runs of a
            `task: level` config) are used as `levels`.
        batch_size: slices per forward pass (does not change the result).
        device: where to run (default: where the models are).
        amp: autocast on CUDA (default: on there; CPU always runs float32).
        threshold: probability threshold of the clean-up.
        keep_probs: keep the float16 (7, Z, S, S) probabilities on the result (after level fusion).
        uid: study name (default: the Series' uid).
        levels: more level models (`load_run` of a `task: level` run, or its folder), or a (7, Z) presence
            array in their place (e.g. `kit.data.true_presence`). Their per-slice presence goes into
            level-conditioned segmenters (`data.level_input`) and is fused into the probabilities before
            the clean-up (`fuse_levels`), so the level of each vertebra comes from the whole study. None:
            the segmenter alone (level-conditioned segmenters then raise).
        fuse: apply `fuse_levels`; default: only when some segmenter is not level-conditioned (one that is
            has used the levels already).

    Returns:
        A `SegResult`: labels (Z, S, S) uint8, extents, missing and dropped vertebrae, timing.
    """
    start = time.perf_counter()
    models = _flatten_models(runs)
    level_models = [m for m in models if m.config.get("task") == "level"]
    models = [m for m in models if m.config.get("task") != "level"]
    presence = None
    if isinstance(levels, np.ndarray):
        presence = levels.astype(np.float32)
    elif levels is not None:
        level_models += _flatten_models(levels)
    if not models:
        raise ValueError("no segmenter among the models given (only level models)")
    sizes = {m.image_size for m in models}
    if len(sizes) != 1:
        raise ValueError(f"the ensemble mixes image sizes {sorted(sizes)}; segment with one size at a time")
    windows = {m.window for m in models}
    if len(windows) != 1:
        raise ValueError(f"the ensemble mixes HU windows {sorted(windows)}")
    image, meta = _prepare_input(source, sizes.pop(), windows.pop())
    uid = uid or meta["uid"]
    t_prep = time.perf_counter()
    dz = meta["spacing"][0] if meta["spacing"] is not None else None
    if presence is None and level_models:
        presence = predict_levels(image, dz, level_models, device=device, uid=uid)
    probs = predict_vertebra_probs(image, models, batch_size=batch_size, device=device, amp=amp, uid=uid, dz=dz,
                                   levels=presence)
    if fuse is None:
        fuse = not all(m.level_input for m in models)
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


def _stem(path: PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".npz", ".json") else path


def save_seg_result(result: SegResult, path: PathLike) -> Path:
    """Save one study's result as `<path>.npz` (labels, instance numbers, voxels per slice) + `<path>.json`.

    The JSON is written last (atomically), so its presence means the study is done. It holds, per vertebra,
    the slice range (original slice indices, superior-first), the InstanceNumbers it spans, the in-plane box
    in the prepared scale (`box`: y0, y1, x0, x1, half-open) and in original pixels (`box_original`), with
    `scale` = original / prepared pixels.

    Args:
        result: from `segment_study`.
        path: file stem, e.g. `out/<uid>` (a `.npz` / `.json` suffix is dropped).

    Returns:
        The JSON path.
    """
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    z = result.labels.shape[0]
    arrays = {"labels": result.labels,
              "slice_voxels": np.stack([result.extents[n].slice_voxels if n in result.extents
                                        else np.zeros(z, np.int64) for n in VERTEBRAE])}
    if result.instance_numbers is not None:
        arrays["instance_numbers"] = np.asarray(result.instance_numbers)
    tmp = stem.with_name(stem.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, stem.with_name(stem.name + ".npz"))
    info = {
        "uid": result.uid,
        "shape": list(result.labels.shape),
        "orig_hw": None if result.orig_hw is None else list(result.orig_hw),
        "scale": list(result.scale),
        "spacing": None if result.spacing is None else list(result.spacing),
        "missing": result.missing,
        "dropped": result.dropped,
        "timing": result.timing,
        "vertebrae": {n: _extent_record(result.extents.get(n), result.scale, result.instance_numbers)
                      for n in VERTEBRAE},
    }
    json_path = stem.with_name(stem.name + ".json")
    tmp = stem.with_name(stem.name + ".tmp.json")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, json_path)
    return json_path


def load_seg_result(path: PathLike) -> SegResult:
    """Read a result written by `save_seg_result` (`path`: the stem, or its `.npz` / `.json`)."""
    stem = _stem(path)
    json_path, npz_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".npz")
    if not json_path.is_file() or not npz_path.is_file():
        raise FileNotFoundError(f"no segmentation result at {stem}(.json, .npz)")
    info = json.loads(json_path.read_text())
    with np.load(npz_path) as data:
        labels, slice_voxels = data["labels"], data["slice_voxels"]
        numbers = data["instance_numbers"] if "instance_numbers" in data.files else None
    spacing = None if info["spacing"] is None else tuple(info["spacing"])
    extents = {}
    for i, name in enumerate(VERTEBRAE):
        rec = info["vertebrae"][name]
        if not rec["found"]:
            continue
        y0, y1, x0, x1 = rec["box"]
        extents[name] = VertebraExtent(name=name, label=i + 1, z_first=rec["z_first"], z_last=rec["z_last"],
                                       y0=y0, y1=y1, x0=x0, x1=x1, voxels=rec["voxels"],
                                       centroid=tuple(rec["centroid"]), slice_voxels=slice_voxels[i],
                                       spacing=spacing)
    return SegResult(uid=info["uid"], labels=labels, extents=extents, missing=info["missing"],
                     dropped=info["dropped"], timing=info["timing"],
                     orig_hw=None if info["orig_hw"] is None else tuple(info["orig_hw"]),
                     instance_numbers=numbers, spacing=spacing)


def _study_source(source: Path, split: str) -> tuple[str, Path, list[str]]:
    """("dicom", images dir, uids) or ("cache", cache dir, uids) for a data root or a cache folder."""
    if (source / f"{split}_images").is_dir():
        images = source / f"{split}_images"
        return "dicom", images, sorted(p.name for p in images.iterdir() if p.is_dir())
    for cache in (source / split, source):
        uids = sorted(p.name[:-4] for p in cache.glob("*.npz") if not p.name.endswith(".tmp.npz"))
        if uids:
            return "cache", cache, uids
    raise FileNotFoundError(f"{source} is neither a data root with {split}_images/ nor a cache folder of .npz files")


def segment_studies(
    source: PathLike,
    run_dirs: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    *,
    split: str = "train",
    uids: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    threshold: float = 0.5,
    progress: bool = True,
    prefetch: bool = True,
) -> dict:
    """Segment every study of a split, resumably, one failure never stopping the rest.

    Studies whose `<out_dir>/<uid>.json` exists are skipped. A study that fails (unreadable DICOM,
    NaN output, ...) is logged and listed in `failures.csv` with the error; studies where a vertebra was
    not found go to `missing.csv`; every segmented study gets a row in `summary.csv` (slices, vertebrae
    found, seconds). A study that succeeds on a later run leaves `failures.csv`. The CSVs are written
    when the loop ends, also when it is interrupted.

    Args:
        source: a data root in RSNA layout (`<split>_images/<uid>/*.dcm`, read with `kit.dicom`) or a
            cache folder of `kit.cache` `.npz` files (`<source>/<split>/` or `<source>/` itself).
        run_dirs: one or more run folders (`runs/<config name>`); all their folds form the ensemble, and
            level-model runs among them are fused in (`segment_study`).
        out_dir: where `<uid>.npz` / `<uid>.json` and the CSVs go.
        split: "train" or "test".
        uids: restrict to these studies (default: all in the split).
        batch_size: slices per forward pass.
        device: default CUDA when available, else CPU.
        amp: autocast on CUDA (default on there).
        threshold: clean-up probability threshold.
        progress: show a tqdm bar.
        prefetch: read the next study in a background thread while the current one is segmented.

    Returns:
        Counts `segmented`, `skipped`, `failed`, the `failures` {uid: error}, `missing` {uid: [names]}
        of the studies segmented now, and `seconds`.
    """
    start = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    kind, folder, all_uids = _study_source(source, split)
    uids = list(all_uids if uids is None else uids)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    models = [m for run in run_dirs for m in load_run(run, device=device)]
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [u for u in uids if not (out_dir / f"{u}.json").is_file()]

    def read(uid: str):
        if kind == "dicom":
            from .dicom import read_series

            return read_series(folder / uid)
        from .cache import load_cached

        return load_cached(folder, uid)

    rows, failures, missing = [], {}, {}
    # One reader thread keeps the next study loading (DICOM decoding on CPU) while this one is segmented.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, todo[0]) if todo and prefetch else None
        try:
            for i, uid in enumerate(tqdm(todo, desc=f"segment {split}", unit="study", disable=not progress)):
                current = pending if prefetch else None
                pending = pool.submit(read, todo[i + 1]) if prefetch and i + 1 < len(todo) else None
                try:
                    study = current.result() if current is not None else read(uid)
                    result = segment_study(study, models, batch_size=batch_size, device=device, amp=amp,
                                           threshold=threshold, uid=uid)
                    del study
                    save_seg_result(result, out_dir / uid)
                except Exception as exc:  # one broken study must not stop the others
                    failures[uid] = f"{type(exc).__name__}: {exc}"
                    log.warning("study %s not segmented: %s", uid, failures[uid])
                    continue
                if result.missing:
                    missing[uid] = result.missing
                rows.append({"StudyInstanceUID": uid, "slices": result.labels.shape[0],
                             "found": " ".join(result.extents), "missing": " ".join(result.missing),
                             "dropped": "; ".join(f"{k}: {v}" for k, v in result.dropped.items()),
                             "seconds": result.timing["total_s"]})
        finally:  # an interrupted run still records what it did
            if pending is not None:
                pending.cancel()
            _write_reports(out_dir, rows, failures)
    return {"segmented": len(rows), "skipped": len(uids) - len(todo), "failed": len(failures),
            "failures": failures, "missing": missing, "seconds": round(time.perf_counter() - start, 2)}


def _write_reports(out_dir: Path, rows: list[dict], failures: dict[str, str]) -> None:
    """Merge this run's rows into summary.csv, failures.csv and missing.csv."""
    done = [r["StudyInstanceUID"] for r in rows]
    merge_csv(out_dir / SUMMARY, pd.DataFrame(rows))
    merge_csv(out_dir / FAILURES, pd.DataFrame({"StudyInstanceUID": list(failures), "error": list(failures.values())}),
               drop=done)
    missing_rows = pd.DataFrame([r for r in rows if r["missing"] or r["dropped"]],
                                columns=["StudyInstanceUID", "missing", "dropped"])
    merge_csv(out_dir / MISSING, missing_rows[["StudyInstanceUID", "missing", "dropped"]],
               drop=[u for u in done if u not in set(missing_rows["StudyInstanceUID"])])


def plot_segmentation(image: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None, *,
                      spacing: Sequence[float] | None = None, column: int | None = None, title: str = ""):
    """Sagittal view of a prepared volume with predicted labels (and the true ones beside them).

    Args:
        image: uint8 (Z, S, S) prepared CT, superior-first (head at the top of the plot).
        labels: (Z, S, S) predicted labels, 1..7 = C1..C7.
        truth: (Z, S, S) true labels, drawn in a second panel when given.
        spacing: (dz, dy, dx) mm for the aspect ratio (default: square pixels).
        column: x index of the sagittal plane (default: the centroid column of the labels shown).
        title: figure title.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    shown = [("predicted", labels)] + ([("true", truth)] if truth is not None else [])
    if column is None:
        ref = truth if truth is not None and (truth > 0).any() else labels
        xs = np.nonzero((ref > 0) & (ref <= len(VERTEBRAE)))[2]
        column = int(np.round(xs.mean())) if len(xs) else image.shape[2] // 2
    aspect = 1.0 if spacing is None else float(spacing[0]) / float(spacing[1])
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 6), squeeze=False)
    for ax, (name, lab) in zip(axes[0], shown):
        ax.imshow(image[:, :, column], cmap="gray", aspect=aspect, vmin=0, vmax=255)
        plane = np.where(lab[:, :, column] <= len(VERTEBRAE), lab[:, :, column], 0).astype(float)
        ax.imshow(np.ma.masked_where(plane == 0, plane), cmap="tab10", vmin=1, vmax=10, alpha=0.5,
                  aspect=aspect, interpolation="nearest")
        for v, vname in enumerate(VERTEBRAE, start=1):
            zs = np.nonzero((lab == v).any(axis=(1, 2)))[0]
            if len(zs):
                ax.text(1, zs.mean(), vname, color="yellow", fontsize=8, va="center")
        ax.set(title=f"{name} (x = {column})", xlabel="y", ylabel="slice")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fold_tables(run_dir: PathLike, name: str) -> pd.DataFrame:
    """`fold*/<name>` of a run concatenated, with a `fold` column."""
    run_dir = Path(run_dir)
    tables = []
    for path in sorted(run_dir.glob(f"fold*/{name}")):
        table = pd.read_csv(path, dtype={"StudyInstanceUID": str})
        table["fold"] = int(path.parent.name[4:])
        tables.append(table)
    if not tables:
        raise FileNotFoundError(f"no fold*/{name} in {run_dir}; train the run first")
    return pd.concat(tables, ignore_index=True)


def plot_training_curves(run_dir: PathLike):
    """Train / validation loss and validation metric per epoch, one line per fold, from `fold*/log.csv`.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    log_table = _fold_tables(run_dir, "log.csv")
    metric = next((c for c in log_table.columns if c.startswith("val_") and c != "val_loss"), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(11 if metric else 5.5, 3.8), squeeze=False)
    for fold, rows in log_table.groupby("fold"):
        axes[0, 0].plot(rows["epoch"], rows["train_loss"], "-o", ms=3, label=f"fold {fold} train")
        axes[0, 0].plot(rows["epoch"], rows["val_loss"], "--o", ms=3, label=f"fold {fold} val")
        if metric:
            axes[0, 1].plot(rows["epoch"], rows[metric], "-o", ms=3, label=f"fold {fold}")
    axes[0, 0].set(title="Loss", xlabel="epoch")
    axes[0, 0].legend(fontsize=7)
    if metric:
        axes[0, 1].set(title=metric.replace("_", " "), xlabel="epoch", ylim=(0, 1.02))
        axes[0, 1].legend(fontsize=7)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    return fig


def plot_dice_per_vertebra(run_dir: PathLike):
    """Out-of-fold 3D Dice of C1..C7 (mean over held-out studies, with the study-to-study spread).

    Reads `fold*/oof.csv` (one row per held-out study, columns C1..C7 = Dice, written by the segmenter's
    training). Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    oof = _fold_tables(run_dir, "oof.csv")
    values = oof[list(VERTEBRAE)]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar(VERTEBRAE, values.mean(), yerr=values.std().fillna(0), capsize=3, color="tab:blue")
    for i, v in enumerate(values.mean()):
        ax.text(i, (v if np.isfinite(v) else 0) + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    ax.set(title=f"{Path(run_dir).name}: OOF Dice per vertebra ({len(oof)} studies, "
                 f"{oof['fold'].nunique()} folds), mean {np.nanmean(values.to_numpy()):.3f}",
           ylim=(0, 1.1), ylabel="Dice")
    fig.tight_layout()
    return fig
