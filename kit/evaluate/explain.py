"""Why did the classifier say so: attention over the sampled slices and a Grad-CAM saliency per slice.

For one study's cached crops (`kit.stage2.store.load_crops`) and one fold of a classifier run (`kit.runs.load_run`):

- attention: the model's own pooling weights over the T sampled slices of each vertebra (they sum to 1), with
  each slice's logit (`kit.models.classifier`: `attention`, `slice_logits`);
- saliency: Grad-CAM (Selvaraju et al., 2017) of the per-slice CNN: the gradient of the vertebra's logit with
  respect to the last feature map of the timm backbone (its `forward_features` output, (K, h, w) per slice),
  averaged over each map into one weight per channel; the ReLU of the weighted sum of the maps, upsampled
  (bilinear) to the crop size S. The logit reads all T slices through the BiGRU, so every slice gets its own map;
  they are scaled together, by their maximum over the vertebra's T slices, so a slice the model ignores stays dark.
  The map is as coarse as the backbone's last stage: S / 32 for most timm CNNs (2 x 2 on the demo's 64 px crops,
  7 x 7 at 224 px); all 0 when no channel of it raises the logit (e.g. a model that has not learnt yet);
- the true fracture boxes: `train_bounding_boxes.csv` rows matched to the sampled slices by InstanceNumber
  (`kit.stage2.targets.match_boxes_to_slices`, as `kit crops` does) and mapped from original pixels into crop pixels
  through the crop box the cache stores (`crop_boxes`; `box_to_crop`).

    explanations = explain_study("runs/demo_cls", None, uid)        # every vertebra found, the held-out fold
    fig = plot_explanation(max(explanations, key=lambda e: e.prob))  # the most likely fractured vertebra

`kit explain RUN --uid UID` writes such figures as PNGs (`write_explanations`). The fold that held the study out
(its `fold<k>/oof.csv` lists it) explains a training study by default, so the figure shows what the model did on a
study it never trained on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..constants import CLASSIFIER, VERTEBRAE
from ..stage2.store import load_crops
from ..stage2.targets import match_boxes_to_slices
from .metrics import targets_from_vertebrae
from ..paths import PathLike

log = logging.getLogger("kit.evaluate.explain")

UID = "StudyInstanceUID"


@dataclass
class VertebraExplanation:
    """What one classifier fold saw in one vertebra of one study.

    Attributes:
        uid: the study.
        vertebra: "C1".."C7".
        fold: the fold whose model explained it.
        held_out: that fold held the study out (its `oof.csv` lists it); False for a study it trained on, or one
            of no fold (e.g. a test study).
        logit: the vertebra's fracture logit.
        prob: the probability validation and `kit submit` give the vertebra: its sigmoid for a model with a
            patient head, for a per-vertebra model mapped as `kit.evaluate.metrics.targets_from_vertebrae` maps it;
            with the run's `data.tta_flip` the mean of that over the crops and their left-right mirror (`logit`,
            attention and saliency are those of the crops as they are).
        label: the true label (`train.csv`), None when unknown.
        attention: float32 (T,) pooling weights over the sampled slices, summing to 1.
        slice_logits: float32 (T,) per-slice logits.
        saliency: float32 (T, S, S) Grad-CAM in [0, 1], scaled by its maximum over the T slices.
        saliency_max: that maximum before scaling (0: the logit's gradient reaches no feature map).
        image: uint8 (T, S, S) the centre slice of each stack in the first window (bone by default).
        mask: bool (T, S, S) the vertebra's mask channel, None for crops without one.
        positions: int (T,) slice index of each sampled slice in the sorted series (head first).
        slice_numbers: int (T,) InstanceNumber (file name number) of each sampled slice.
        slice_targets: float32 (T,) the cache's per-slice targets (1 / 0, NaN = unknown).
        box_slices: bool (T,) sampled slices with a fracture box row (on any vertebra under it).
        boxes: per sampled slice a float (k, 4) array of its boxes (x0, y0, x1, y1) in crop pixels (edges: 0 is
            the left edge of the first pixel, S the right edge of the last); None when the cache has no
            `crop_boxes` (made before they were stored), so only `box_slices` is known.
    """

    uid: str
    vertebra: str
    fold: int
    held_out: bool
    logit: float
    prob: float
    label: int | None
    attention: np.ndarray
    slice_logits: np.ndarray
    saliency: np.ndarray
    saliency_max: float
    image: np.ndarray
    mask: np.ndarray | None
    positions: np.ndarray
    slice_numbers: np.ndarray
    slice_targets: np.ndarray
    box_slices: np.ndarray
    boxes: list[np.ndarray] | None

    @property
    def peak(self) -> int:
        """The sampled slice (0..T-1) with the highest attention weight."""
        return int(np.argmax(self.attention))


# ---------------------------------------------------------------------------------------------------------
# Pure pieces: box mapping and Grad-CAM
# ---------------------------------------------------------------------------------------------------------

def box_to_crop(boxes: np.ndarray, crop_box: Sequence[int], size: int) -> np.ndarray:
    """Fracture boxes from original pixels into the pixels of a crop cut from `crop_box` and resized to size².

    A crop covers original pixels [y0, y1) x [x0, x1) (`kit.stage2.crops.crop_box_original`, possibly reaching past
    the image) resized edge to edge to S x S, so an original coordinate u maps to `(u - x0) * S / (x1 - x0)`
    (and likewise for y). Boxes partly or wholly outside the crop keep their mapped coordinates (< 0 or > S).

    Args:
        boxes: (N, 4) `x, y, width, height` as in `train_bounding_boxes.csv`.
        crop_box: (y0, y1, x0, x1) of the crop on the original grid.
        size: S.

    Returns:
        float64 (N, 4) `x0, y0, x1, y1` in crop pixels.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    y0, y1, x0, x1 = (float(v) for v in crop_box)
    if y1 <= y0 or x1 <= x0 or size < 1:
        raise ValueError(f"crop_box (y0, y1, x0, x1) must have y1 > y0 and x1 > x0, size >= 1; got "
                         f"{tuple(crop_box)}, size={size}")
    fy, fx = size / (y1 - y0), size / (x1 - x0)
    x, y, w, h = boxes.T
    return np.stack([(x - x0) * fx, (y - y0) * fy, (x + w - x0) * fx, (y + h - y0) * fy], axis=1)


def grad_cam(feature_maps: torch.Tensor, gradients: torch.Tensor, size: int) -> torch.Tensor:
    """Grad-CAM maps: ReLU(sum_k mean_hw(dy/dA_k) * A_k), upsampled bilinearly to size x size.

    Args:
        feature_maps: (N, K, h, w) activations A of N images.
        gradients: (N, K, h, w) gradients of the explained output with respect to them.
        size: S.

    Returns:
        float32 (N, S, S), >= 0, unscaled.
    """
    if feature_maps.ndim != 4 or feature_maps.shape != gradients.shape:
        raise ValueError(f"feature_maps and gradients must both be (N, K, h, w); got {tuple(feature_maps.shape)} "
                         f"and {tuple(gradients.shape)}")
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * feature_maps.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    return cam[:, 0].clamp_min(0.0)


@contextmanager
def capture_feature_maps(backbone: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record every output of a timm model's `forward_features` (its last feature map, before pooling) while
    the block runs: one tensor per call, in call order (a classifier with `chunk` calls it once per chunk).

    timm models compute `forward(x) = forward_head(forward_features(x))`; an instance attribute wraps the method
    for the duration of the block and is removed afterwards.
    """
    if not hasattr(backbone, "forward_features"):
        raise ValueError(f"{type(backbone).__name__} has no forward_features: saliency needs a timm backbone")
    maps: list[torch.Tensor] = []
    original = backbone.forward_features

    def forward_features(x: torch.Tensor) -> torch.Tensor:
        out = original(x)
        maps.append(out)
        return out

    backbone.forward_features = forward_features
    try:
        yield maps
    finally:
        del backbone.forward_features


# ---------------------------------------------------------------------------------------------------------
# One study
# ---------------------------------------------------------------------------------------------------------

def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The per-slice timm CNN of a `cls_gru` or `cls_patient_gru` model."""
    inner = getattr(model, "vertebra", model)
    if not hasattr(inner, "cnn"):
        raise ValueError(f"{type(model).__name__} is not a kit classifier (cls_gru / cls_patient_gru): no per-slice "
                         "CNN to explain")
    return inner.cnn


def _held_out_fold(run_dir: Path, uid: str) -> int | None:
    """The fold whose `fold<k>/oof.csv` lists `uid`, None when none does."""
    for path in sorted(run_dir.glob("fold*/oof.csv")):
        table = pd.read_csv(path, usecols=[UID], dtype={UID: str})
        if uid in set(table[UID]) and path.parent.name[4:].isdigit():
            return int(path.parent.name[4:])
    return None


def _choose_model(run, uid: str, fold: int | None, device: str | torch.device):
    """(LoadedModel, held_out) for `run` (a run folder, a `load_run` list or one LoadedModel) and `fold`."""
    from ..runs import LoadedModel, load_run

    if isinstance(run, (str, os.PathLike)):
        run_dir = Path(run)
        held = _held_out_fold(run_dir, uid)
        chosen = fold if fold is not None else held
        if chosen is None:  # the first fold trained: load only that one
            trained = sorted(int(p.parent.name[4:]) for p in run_dir.glob("fold*/model.pt")
                             if p.parent.name[4:].isdigit())
            chosen = trained[0] if trained else None
        models = load_run(run_dir, folds=None if chosen is None else [chosen], device=device)
        return models[0], held is not None and models[0].fold == held
    models = [run] if isinstance(run, LoadedModel) else list(run)
    if not models:
        raise ValueError("run holds no model: pass a run folder or kit.runs.load_run(...) output")
    held = _held_out_fold(models[0].path.parent.parent, uid)
    wanted = fold if fold is not None else held
    if wanted is not None:
        matching = [m for m in models if m.fold == wanted]
        if not matching and fold is not None:
            raise ValueError(f"fold {fold} is not among the models given (folds {[m.fold for m in models]})")
        models = matching or models
    model = models[0]
    model.model.to(device)
    return model, held is not None and model.fold == held


def _true_labels(data_root: Path, uid: str) -> dict[str, int] | None:
    """The study's C1..C7 labels from `train.csv` (`kit.io.rsna.load_train`), None without the file or the study."""
    from ..io.rsna import load_train

    if not (data_root / "train.csv").is_file():
        return None
    table = load_train(data_root).set_index(UID)
    return None if uid not in table.index else {v: int(table.at[uid, v]) for v in VERTEBRAE}


def _study_boxes(boxes: pd.DataFrame | None, data_root: Path, uid: str) -> pd.DataFrame:
    """The study's box rows: from `boxes`, else `<data_root>/train_bounding_boxes.csv` (`kit.io.rsna.load_boxes`)
    when it exists."""
    if boxes is None:
        if not (data_root / "train_bounding_boxes.csv").is_file():
            return pd.DataFrame(columns=["x", "y", "width", "height", "slice_number"])
        from ..io.rsna import load_boxes

        boxes = load_boxes(data_root)
    if UID in boxes.columns:
        boxes = boxes[boxes[UID].astype(str) == uid]
    return boxes


def _run(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, per_study: bool,
         level: torch.Tensor | None) -> dict:
    """The classifier's forward pass on `_explain_vertebrae`'s batch."""
    return model(x, mask, mask.any(-1)) if per_study else model(x, mask, level)


def _forward_with_maps(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, per_study: bool,
                       rows: list[int], level: torch.Tensor | None = None
                       ) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """Forward pass recording the backbone's feature maps, and their gradients from the sum of the logits of
    the vertebra rows `rows` (vertebrae do not interact before their own logits, so each vertebra's maps get
    exactly the gradient of its own logit)."""
    backbone = _backbone(model)
    cudnn_off = torch.backends.cudnn.flags(enabled=False)  # cuDNN's GRU has no backward in eval mode
    with torch.enable_grad(), cudnn_off, capture_feature_maps(backbone) as maps:
        x = x.detach().requires_grad_(True)  # a graph even when the weights are frozen
        out = _run(model, x, mask, per_study, level)
        logits = out["logit"][0] if per_study else out["logit"]
        if not maps or maps[0].ndim != 4:
            shape = tuple(maps[0].shape) if maps else None
            raise ValueError(f"saliency needs a CNN backbone whose forward_features gives (N, K, h, w) maps; "
                             f"{type(backbone).__name__} gave {shape}")
        grads = torch.autograd.grad(logits[rows].sum(), maps, allow_unused=True)
    grads = [torch.zeros_like(m) if g is None else g for m, g in zip(maps, grads)]
    return {k: v.detach() for k, v in out.items()}, [m.detach() for m in maps], grads


def _explain_vertebrae(m, arrays: dict[str, np.ndarray], index: list[int], device: torch.device,
                       mirror: bool = False) -> dict[int, dict]:
    """One forward and backward pass of a classifier over the cached crops of the vertebrae `index` (0..6); with
    `mirror` one more forward pass, without gradients, over the left-right mirrored crops (validation's second
    view under `data.tta_flip`).

    Returns:
        {vertebra index: {"logit": float, "slice_logits": (T,), "attention": (T,), "cam": float32 (T, S, S)
        unscaled Grad-CAM, and with `mirror` "mirrored_logit": float}}, in the order of `index`.
    """
    from ..tasks import PER_STUDY_MODELS

    crops = arrays["crops"]
    t, size = crops.shape[1], crops.shape[-1]
    stacks = m.config.recipe().model_input(torch.from_numpy(crops).to(device))  # (7, T, C, S, S), as the classifier sees them
    real = torch.from_numpy(arrays["positions"] >= 0).to(device)  # (7, T)
    per_study = m.config.model.name in PER_STUDY_MODELS
    if per_study:  # the whole study: batch row 0, vertebra v
        x, mask, rows = stacks[None], real[None], index
    else:  # the asked vertebrae are the batch: row i is vertebra index[i]
        x, mask, rows = stacks[index], real[index], list(range(len(index)))
    level = None if per_study else torch.as_tensor(index, device=x.device)  # each row's vertebra level
    out, maps, grads = _forward_with_maps(m.model, x, mask, per_study, rows, level)
    if mirror:
        with torch.no_grad():
            mirrored = _run(m.model, x.flip(-1), mask, per_study, level)["logit"]
    # the CNN saw the real slices only, in (batch, vertebra, slice) order: put each map back in its place
    cams = np.zeros((mask.numel(), size, size), np.float32)
    cams[mask.flatten().cpu().numpy()] = torch.cat([grad_cam(a, g, size) for a, g in zip(maps, grads)]).cpu().numpy()
    cams = cams.reshape(-1, t, size, size)
    result = {}
    for i, v in enumerate(index):
        where = (0, v) if per_study else (i,)
        result[v] = {"logit": float(out["logit"][where]),
                     "slice_logits": out["slice_logits"][where].float().cpu().numpy(),
                     "attention": out["attention"][where].float().cpu().numpy(),
                     "cam": cams[v if per_study else i]}
        if mirror:
            result[v]["mirrored_logit"] = float(mirrored[where])
    return result


def explain_study(run, crop_dir: PathLike | None, uid: str, vertebrae: Sequence[str] | None = None,
                  fold: int | None = None, device: str | torch.device = "cpu", *,
                  boxes: pd.DataFrame | None = None) -> list[VertebraExplanation]:
    """Attention, slice logits and Grad-CAM saliency of one classifier fold on one study's cached crops.

    The crops go in as training and validation give them (`kit.stage2.data.stack_input`, slices head to feet, no
    augmentation): a per-vertebra model (`cls_gru`) gets the asked vertebrae as one batch, a per-study model
    (`cls_patient_gru`) the whole study with the vertebrae found. One forward and one backward pass give every
    asked vertebra's explanation (see the module docstring for the saliency); a run with `data.tta_flip` adds a
    forward pass over the mirrored crops for the probability, as its validation does.

    Args:
        run: a classifier run folder (`runs/<config name>`), `kit.runs.load_run` output, or one LoadedModel.
        crop_dir: the crop cache (`kit crops`); None: the run's `data.crop_dir`.
        uid: the study.
        vertebrae: names ("C1".."C7") to explain; None: every vertebra found.
        fold: the fold to use; None: the fold that held the study out (its `fold<k>/oof.csv` lists it), else the
            first fold.
        device: where the model runs.
        boxes: fracture box rows (`train_bounding_boxes.csv` columns, one study or several); None: the run's
            `<data.data_root>/train_bounding_boxes.csv` when it exists.

    Returns:
        One `VertebraExplanation` per vertebra, in C1..C7 order.

    Raises:
        ValueError: an unknown vertebra name, a vertebra asked that the crops do not hold (not found), no
            vertebra found at all, crops that do not fit the model's channels, a run that is not a classifier.
        FileNotFoundError: no run / checkpoint / crop file.
    """
    device = torch.device(device)
    m, held_out = _choose_model(run, uid, fold, device)
    cfg = m.config
    if m.provides != CLASSIFIER:
        raise ValueError(f"{m.path}: a {cfg.task} run (provides {m.provides!r}); kit explain needs a classifier run")
    d = cfg.data
    crop_dir = Path(crop_dir if crop_dir is not None else d.crop_dir)
    arrays = load_crops(crop_dir, uid)
    crops, found = arrays["crops"], arrays["found"]
    if crops.shape[2] != cfg.in_channels:
        raise ValueError(f"study {uid}: {crop_dir / (uid + '.npz')} holds {crops.shape[2]} channels per slice, the "
                         f"model {m.path} takes {cfg.in_channels}; use the crop cache of its config")
    unknown = [v for v in vertebrae or () if v not in VERTEBRAE]
    if unknown:
        raise ValueError(f"unknown vertebra name(s) {unknown}; valid: {', '.join(VERTEBRAE)}")
    found_names = [v for v, f in zip(VERTEBRAE, found) if f]
    if not found_names:
        raise ValueError(f"study {uid}: no vertebra was found in its crops ({crop_dir}); nothing to explain")
    wanted = [v for v in VERTEBRAE if v in set(vertebrae)] if vertebrae else found_names
    absent = [v for v in wanted if v not in found_names]
    if absent:
        raise ValueError(f"study {uid}: {', '.join(absent)} not found in its crops (see {crop_dir}/manifest.csv); "
                         f"found: {', '.join(found_names)}")
    outputs = _explain_vertebrae(m, arrays, [VERTEBRAE.index(v) for v in wanted], device, mirror=d.tta_flip)

    names = cfg.recipe().channel_names
    image_channel = names.index(f"{'bone' if 'bone' in d.windows else d.windows[0]}+0")
    labels = _true_labels(Path(d.data_root), uid)
    study_boxes = _study_boxes(boxes, Path(d.data_root), uid)
    numbers = arrays.get("slice_numbers", arrays["instance_numbers"])  # older caches: InstanceNumbers stand in
    if len(study_boxes):
        matched, _ = match_boxes_to_slices(study_boxes, numbers)
    else:
        matched = pd.DataFrame({"x": [], "y": [], "width": [], "height": [], "z": []})
    crop_boxes = arrays.get("crop_boxes")
    if crop_boxes is None and len(matched):
        log.warning("study %s: %s has no crop_boxes (made before they were stored): the fracture slices are marked, "
                    "their boxes cannot be placed; rebuild the crops (kit crops) to draw them", uid, crop_dir)

    # a per-vertebra model maps its probabilities as `classify_study` does; a patient model (no `metric_odds` of
    # its own) gives its sigmoids as they are
    odds = getattr(m.model, "metric_odds", None)
    odds = None if odds is None else odds.double().cpu().numpy()
    prevalence = None if odds is None else m.model.train_prevalence.double().cpu().numpy()

    def mapped(v: int, logit: float) -> float:
        prob = float(1.0 / (1.0 + np.exp(-logit)))
        if odds is None:
            return prob
        alone = np.full(len(VERTEBRAE), np.nan)  # a vertebra's own mapping does not depend on the others
        alone[v] = prob
        return float(targets_from_vertebrae(alone, odds, prevalence)[1 + v])

    result = []
    for v, o in outputs.items():
        prob = float(np.mean([mapped(v, o[key]) for key in ("logit", "mirrored_logit") if key in o]))
        positions = arrays["positions"][v].astype(np.int64)
        on_slice = [matched[matched["z"] == z][["x", "y", "width", "height"]].to_numpy(float) for z in positions]
        peak = float(o["cam"].max())
        result.append(VertebraExplanation(
            uid=uid, vertebra=VERTEBRAE[v], fold=m.fold, held_out=held_out, logit=o["logit"],
            prob=prob, label=None if labels is None else labels[VERTEBRAE[v]],
            attention=o["attention"], slice_logits=o["slice_logits"],
            saliency=o["cam"] / peak if peak > 0 else o["cam"], saliency_max=peak,
            image=crops[v, :, image_channel].copy(), mask=crops[v, :, -1] > 127 if d.with_mask else None,
            positions=positions, slice_numbers=numbers[positions].astype(np.int64),
            slice_targets=arrays["slice_targets"][v].astype(np.float32),
            box_slices=np.array([len(b) > 0 for b in on_slice]),
            boxes=None if crop_boxes is None else [box_to_crop(b, crop_boxes[v], crops.shape[-1]) for b in on_slice]))
    return result


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------

def _row_title(e: VertebraExplanation) -> str:
    label = "" if e.label is None else f" (true {e.label})"
    fold = f"fold {e.fold}" + (", held out" if e.held_out else "")
    return f"{e.uid} {e.vertebra}: p = {e.prob:.3f}{label} · {fold}"


def plot_explanation(explanations: VertebraExplanation | Sequence[VertebraExplanation], *, alpha: float = 0.6,
                     show_mask: bool = True) -> Figure:
    """One row per vertebra: its T sampled slices (centre slice, bone window), Grad-CAM overlaid, fracture boxes.

    Each panel is titled with the sampled slice's index t, its series slice z, its attention weight `a` and slice
    logit `s` (the attention peak in bold red); the saliency colours the slice with an opacity that grows with its
    value (up to `alpha`); the vertebra's mask is outlined in cyan; a slice with a fracture box row has a coloured
    frame and, when the cache stores the crop box, the box itself: red where the cache's slice target says the
    fracture is this vertebra's (`kit crops` gives a box to the vertebra with most mask under it), dashed orange
    where it is another's (e.g. C2's dens fracture seen in a C1 slice). The row title gives the probability, the
    true label when known, and the fold.

    Args:
        explanations: `explain_study` output (or one of its items).
        alpha: opacity of the saliency at its maximum.
        show_mask: outline the mask channel.

    Returns:
        The Figure (Agg canvas, no pyplot): leave it as a notebook cell's last value, or `fig.savefig(path)`.
    """
    rows = [explanations] if isinstance(explanations, VertebraExplanation) else list(explanations)
    if not rows:
        raise ValueError("no explanation to plot: explain_study returned none")
    t = max(len(e.attention) for e in rows)
    # a fixed layout in inches (a layout engine costs seconds on a 7 x 15 grid): square panels, room above each
    # row for its title and the panels' two-line titles
    panel, gap, row_gap, top, side = 1.25, 0.08, 0.75, 0.9, 0.1
    width, height = 2 * side + t * panel + (t - 1) * gap, top + side + len(rows) * panel + (len(rows) - 1) * row_gap
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(rows), t, squeeze=False, gridspec_kw={
        "left": side / width, "right": 1 - side / width, "bottom": side / height, "top": 1 - top / height,
        "wspace": gap / panel, "hspace": row_gap / panel})
    fig.text(0.5, 1 - 0.06 / height, "a: attention, s: slice logit, colour: Grad-CAM\nfracture boxes: red on this "
             "vertebra, dashed orange on another", ha="center", va="top", fontsize=7)
    for axes, e in zip(grid, rows):
        axes[0].text(0.0, 1 + 0.38 / panel, _row_title(e), transform=axes[0].transAxes, ha="left", va="bottom",
                     fontsize=8)
        size = e.image.shape[-1]
        for i, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= len(e.attention):
                ax.set_visible(False)
                continue
            ax.imshow(e.image[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.imshow(e.saliency[i], cmap="jet", vmin=0.0, vmax=1.0, alpha=np.clip(alpha * e.saliency[i], 0, 1),
                      interpolation="bilinear")
            if show_mask and e.mask is not None and e.mask[i].any() and not e.mask[i].all():
                ax.contour(e.mask[i].astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.5)
            own = e.slice_targets[i] == 1  # kit crops gave this slice the vertebra's fracture
            if e.boxes is not None:
                for x0, y0, x1, y1 in e.boxes[i]:
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, linewidth=1.2,
                                           edgecolor="red" if own else "orange", linestyle="-" if own else "--"))
            ax.set_xlim(-0.5, size - 0.5)
            ax.set_ylim(size - 0.5, -0.5)
            if e.box_slices[i]:
                for spine in ax.spines.values():
                    spine.set(edgecolor="red" if own else "orange", linewidth=2.0)
            is_peak = i == e.peak
            ax.set_title(f"t{i} z{e.positions[i]}\na {e.attention[i]:.2f}  s {e.slice_logits[i]:+.1f}", fontsize=7,
                         color="red" if is_peak else "black", fontweight="bold" if is_peak else "normal")
    return fig


def write_explanations(run: PathLike, uid: str, out_dir: PathLike | None = None, *,
                       crop_dir: PathLike | None = None, vertebrae: Sequence[str] | None = None,
                       fold: int | None = None, device: str | torch.device = "cpu") -> list[dict]:
    """`kit explain`: explain vertebrae of one study and write one PNG each.

    Args:
        run: a classifier run folder.
        uid: the study.
        out_dir: where the PNGs go (default `<run>/explain`), named `<uid>_<vertebra>.png`.
        crop_dir: the crop cache (default: the run's `data.crop_dir`).
        vertebrae: names to explain; None: the most likely fractured vertebra (highest probability).
        fold: the fold (default: the one that held the study out).
        device: where the model runs.

    Returns:
        One dict per PNG: `vertebra`, `prob`, `label`, `fold`, `held_out`, `peak` (sampled slice),
        `peak_slice` (its series slice), `png` (Path).
    """
    explanations = explain_study(run, crop_dir, uid, vertebrae, fold, device)
    if not vertebrae:
        explanations = [max(explanations, key=lambda e: e.prob)]
    out_dir = Path(out_dir) if out_dir is not None else Path(run) / "explain"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for e in explanations:
        path = out_dir / f"{uid}_{e.vertebra}.png"
        plot_explanation(e).savefig(path, dpi=110, bbox_inches="tight")
        written.append({"vertebra": e.vertebra, "prob": e.prob, "label": e.label, "fold": e.fold,
                        "held_out": e.held_out, "peak": e.peak, "peak_slice": int(e.positions[e.peak]), "png": path})
    return written
