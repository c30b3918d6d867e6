"""Stage-1 inference on one study: vertebra probabilities, level presence, clean-up into vertebra extents.

`predict_vertebra_probs` (segmenters) and `predict_levels` (level models) build every input with the run's own
recipe (`LoadedModel.recipe`, `kit.stage1.recipe`), the very code training and validation use. `segment_study`
runs a fold ensemble over one study and turns the mean per-vertebra probabilities into clean labels and vertebra
extents (`kit.stage1.postprocess`): a `kit.stage1.results.SegResult`. Batch runs over a split live in
`kit.stage1.runner`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..constants import LEVELS, PROB_SCALE, SEGMENTER, VERTEBRAE
from ..devices import autocast
from ..models.level import level_presence_probs
from ..runs import LoadedModel, flatten_models
from .postprocess import (
    THRESHOLD,
    clean_vertebra_probs,
    missing_vertebrae,
    vertebra_extents,
)
from .results import SegResult

log = logging.getLogger("kit.stage1.infer")


class SegmentationError(RuntimeError):
    """A study could not be segmented (e.g. the model produced NaN); the message names the study."""


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
#: activations of a 384 px Unet grow with the batch, and on a CPU they are the process's own memory (figures:
#: docs/benchmarks.md, Memory, "The submission's peak RSS"); 4 slices at 384 px, 32 (the cap) at 128 px.
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
    with torch.inference_mode(), autocast(device, amp):
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
    threshold: float = THRESHOLD,
    keep_probs: bool = False,
    uid: str | None = None,
    levels=None,
    fuse: bool | None = None,
) -> SegResult:
    """Segment C1..C7 in one study with a fold ensemble and measure each vertebra's extent.

    Steps: prepare the input the way the cache does (`prepare_input`), run the level models if any
    (`predict_levels`), the segmenters (`predict_vertebra_probs`: mean of sigmoids, batched, under
    `torch.inference_mode`, autocast on CUDA), clean up (`kit.stage1.postprocess.clean_vertebra_probs`: threshold,
    largest component and the pieces cut off from it inside the level ranges, faint end slices, overlaps,
    head-to-feet order) and measure (`kit.stage1.postprocess.vertebra_extents`).

    NaN handling: a NaN anywhere in a model's output raises `SegmentationError` naming the study and the
    checkpoint, rather than producing silently wrong labels; `kit.stage1.runner.segment_studies` records it.

    Args:
        source: a `kit.io.dicom.Series` (HU), the cache's arrays (dict), or a prepared uint8 (Z, S, S) array
            (resized in-plane if S differs from the models' image size; give `spacing` through a dict).
        runs: `load_run` output, several of them (nested lists), or run folders (loaded on every call:
            load once with `load_run` when segmenting many studies). Level models among them
            (`provides == LEVELS`) are used as `levels`.
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
    models = flatten_models(runs)
    level_models = [m for m in models if m.provides == LEVELS]
    models = [m for m in models if m.provides == SEGMENTER]
    presence = None
    if isinstance(levels, np.ndarray):
        presence = levels.astype(np.float32)
    elif levels is not None:
        level_models += flatten_models(levels)
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
