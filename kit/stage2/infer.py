"""Stage-2 inference on one segmented study: crops, a classifier ensemble over all vertebrae, 8 probabilities.

`classify_study` cuts the vertebra crops (`kit.stage2.recipe.ClsRecipe.crop_study`, the call `kit crops` makes, geometry
from each classifier's config: `ClsConfig.recipe`) and runs a classifier ensemble on all vertebrae at once.
The whole pipeline for one study, DICOM in, 8 probabilities out, is `kit.submit.predictor.predict_study`.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..constants import CLASSIFIER, TARGETS, TRAIN_PREVALENCE, VERTEBRAE
from ..devices import autocast
from ..evaluate.calibration import apply_calibration
from ..evaluate.metrics import complete_targets, logit, sigmoid, targets_from_vertebrae
from ..models.classifier import VertebraClassifier
from ..runs import InferenceOptions, LoadedModel, flatten_models



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


_CNN_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CNN module -> (tensor versions, digest)


def cnn_digest(model: torch.nn.Module) -> str | None:
    """A digest of a per-vertebra classifier's slice CNN and its input scaling (names, dtypes, shapes, values);
    None for any other model. Folds fine-tuned from one checkpoint with the backbone frozen (or not trained at all,
    as in the demo) share it, and `classify_study` then runs that CNN once for all of them. Kept per module and
    recomputed when a tensor of it changes in place."""
    if not isinstance(model, VertebraClassifier):
        return None
    tensors = [(f"cnn.{k}", v) for k, v in model.cnn.state_dict().items()] + \
        [(f"input_norm.{k}", v) for k, v in model.input_norm.state_dict().items()]
    versions = tuple(v._version for _, v in tensors)
    known = _CNN_DIGESTS.get(model.cnn)
    if known is not None and known[0] == versions:
        return known[1]
    h = hashlib.blake2b(type(model.cnn).__name__.encode(), digest_size=16)
    for name, v in tensors:
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    _CNN_DIGESTS[model.cnn] = (versions, h.hexdigest())
    return h.hexdigest()


def _classifier_views(m: LoadedModel, stacks: torch.Tensor, found: torch.Tensor, tta_flip: bool,
                      device: torch.device, amp: bool, shared: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """One classifier on one study's stacks, all vertebrae (and both views with `tta_flip`) in one batch.

    Args:
        stacks: float32 (7, T, C, S, S) in [0, 1] on `device` (`kit.stage2.data.stack_input` of the crop cache's uint8).
        found: bool (7,) on `device`.
        shared: slice features already computed for these stacks, by (`tta_flip`, `cnn_digest`); a per-vertebra
            classifier takes its CNN's from there, or computes and leaves them there.

    Returns:
        vertebra logits float64 (V, 7) per view (V = 2 with the flip, 1 without), NaN where not found; the
        patient logits (V,) of a model with a patient head, else None.
    """
    views = [stacks, stacks.flip(-1)] if tta_flip else [stacks]  # left-right: the crops' W axis
    n_views = len(views)
    out = np.full((n_views, len(VERTEBRAE)), np.nan)
    found_np = found.cpu().numpy()
    with torch.inference_mode(), autocast(device, amp):
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
        key = cnn_digest(m.model)
        if key is None:  # not a per-vertebra classifier of the kit's: its own forward
            result = m.model(x, None, level)
        else:
            if (tta_flip, key) not in shared:
                shared[tta_flip, key] = m.model.slice_features(x)
            result = m.model.from_slice_features(shared[tta_flip, key], None, level)
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


def classify_study(hu: np.ndarray, seg, runs, *, dz: float, options: InferenceOptions | None = None,
                   device: str | torch.device | None = None, uid: str | None = None) -> dict:
    """Classify the vertebrae of one study with an ensemble of classifier runs (`provides == CLASSIFIER`).

    The crops are `config.recipe().crop_study(hu, seg.labels, seg.extents, dz=dz, dropped=seg.dropped)`, the very
    call `kit crops` makes, cut once per distinct recipe among the
    models. A model sees them as training and validation do (`kit.stage2.data.stack_input`: uint8 / 255): a per-vertebra
    model (`cls_gru`) gets every found vertebra of the study in one batch, a per-study model (`cls_patient_gru`)
    the whole study with `vertebra_mask` = found; with the model's `data.tta_flip` (as its validation) or
    `options.tta_flip` the left-right mirrored crops (last axis) join the same batch. Per-vertebra models whose slice
    CNNs are equal (`cnn_digest`: folds trained with the backbone frozen) run that CNN once on a study and share its
    features.

    Each model gives 8 values (TARGETS order) as its validation computed them: a per-vertebra model's through
    `kit.evaluate.metrics.targets_from_vertebrae`, a per-study model's (patient_overall from its patient head) through
    `kit.evaluate.metrics.complete_targets`, with the `metric_odds` and `train_prevalence` saved with its weights; a
    vertebra not found is worth its training prevalence (`kit.evaluate.metrics.fill_missing_vertebrae`), also when none
    is found. The flip views are averaged first, then the models, in
    the space of `options.mean`: "prob" averages probabilities, "logit" averages logits and takes the sigmoid of
    the mean. A run's folds share its weight equally (`options.weights`, see `_model_weights`).

    Args:
        hu: (Z, H, W) HU volume of the original series (`kit.io.dicom.Series.hu`).
        seg: the stage-1 result (`kit.stage1.results.SegResult`: `labels`, `extents`, `dropped`), e.g. `segment_study`.
        runs: classifier models (`load_run` output, several, nested, or run folders).
        dz: the series' slice spacing in mm (`Series.spacing[0]`).
        options: mean, weights, flip TTA and autocast (`kit.runs.InferenceOptions`; default: its defaults).
        device: where to run (default: the first model's device).
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
        ValueError: no classifier among the models, `options.weights` that do not fit the runs.
        ClassificationError: a classifier gave NaN / inf for a vertebra found.
    """
    options = options or InferenceOptions()
    mean = options.mean
    models = [m for m in flatten_models(runs) if m.provides == CLASSIFIER]
    if not models:
        raise ValueError("no classifier (a run whose config provides 'fractures') among the models given")
    grouped = group_runs(models)
    models = [m for run in grouped.values() for m in run]
    model_weights = _model_weights(grouped, options.weights)
    device = torch.device(device) if device is not None else models[0].device
    amp = device.type == "cuda" if options.amp is None else options.amp
    t0 = time.perf_counter()
    recipes = [m.config.recipe() for m in models]
    crops: dict = {}
    for recipe in recipes:
        if recipe not in crops:
            crops[recipe] = recipe.crop_study(hu, seg.labels, seg.extents, dz=float(dz), dropped=seg.dropped)
    _, found, missing = next(iter(crops.values()))
    t1 = time.perf_counter()
    values = np.full((len(models), len(TARGETS)), np.nan)
    tensors = {recipe: (recipe.model_input(torch.from_numpy(stacks).to(device)), torch.from_numpy(f).to(device))
               for recipe, (stacks, f, _) in crops.items()}
    shared: dict = {recipe: {} for recipe in tensors}  # slice features of the CNNs folds share, per recipe
    for i, (m, recipe) in enumerate(zip(models, recipes)):
        if m.device != device:
            m.model.to(device)
        stacks, found_t = tensors[recipe]
        flip = options.tta_flip or m.config.data.tta_flip
        vertebra_logits, patient_logits = _classifier_views(m, stacks, found_t, flip, device, amp, shared[recipe])
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
