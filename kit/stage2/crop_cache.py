"""The stage-2 crop cache (`kit crops`): every study -> its seven vertebra slice stacks, cut from the original
DICOM grid, with per-slice fracture targets.

For each study, ONE DICOM read (`kit.io.dicom.read_series`, in a spawned prefetch worker while the previous study
is segmented) gives both the stage-1 input (`kit.io.cache.prepare_arrays` at the segmenter's size and window) and
the full-resolution HU volume the crops are cut from (`kit.stage2.recipe.ClsRecipe.crop_study`). The vertebrae come from:

- the ground truth, with `data.true_masks` and a `segmentations/<uid>.nii` (`kit.io.dicom.read_mask`, resized to
  the prepared grid with `resize_slices(..., nearest=True)`; one that cannot be read fails the study): mask
  source "truth";
- else the stage-1 runs of `data.seg_runs` (segmenter and level-model runs, every fold loaded once): a training
  study with a segmentation (the studies stage 1 trains on) is segmented by the models of the fold that held
  it out, "oof fold k"; every other study (test split, training studies without a segmentation, which no
  fold trained on) by the whole fold ensemble, "ensemble". A segmented training study whose fold no run held
  out was trained on by every model: "ensemble (trained on it: ...)", with a warning.

Cache format (`<crop_dir>/`; the contract with the classifier's dataset):

- `<uid>.npz`, written atomically (a temporary name, then `os.replace`):
  `crops` uint8 (7, T, C, S, S) C1..C7, T slices each head to feet, C channels in the order of
  `kit.stage2.crops.stack_channel_names` ((2n+1) slices per window of `data.windows`, then the mask, 0 / 255, with
  `data.with_mask`), all zeros for a vertebra not found; `found` bool (7,); `positions` int32 (7, T) slice
  index into the sorted series (head first) of each sampled slice, -1 when not found; `slice_targets` float32
  (7, T) 1 / 0 per sampled slice from the fracture boxes (`kit.stage2.targets.vertebra_targets`), NaN everywhere when
  no box row of the study matched a slice (unknown, not negative); `instance_numbers` int32 (Z,),
  `spacing` float32 (dz, dy, dx) mm and `orig_hw` int32 (H, W) of the original series; `crop_boxes` int32 (7, 4)
  the in-plane box (y0, y1, x0, x1) each vertebra's crop was cut from, in original pixels, half-open, not clipped
  to the image (`kit.stage2.crops.crop_box_original`), zeros for a vertebra not found: it maps original-grid positions
  (e.g. the fracture boxes) into crop pixels, `(x - x0) * S / (x1 - x0)` (`kit.evaluate.explain`). Caches written before
  it lack it.; `slice_numbers` int32 (Z,) each slice's file-name number (`kit.stage2.targets.file_numbers`), what the
  boxes' `slice_number` means (older caches lack it: their InstanceNumbers stand in).
- `manifest.csv`: one row per study built: StudyInstanceUID, split, found ("C1 C2 ..."), missing
  ("C3: not found by the segmenter; ..."), mask_source, n_boxes, unmatched_boxes, seconds.
- `failures.csv`: StudyInstanceUID, error (studies that could not be read, segmented or cropped).
- `unmatched_boxes.csv`: every box row that gives no target, with its reason: it matched no slice
  (`kit.stage2.targets.match_boxes_to_slices`), or its slice shows no vertebra under it.

Labels are not in the cache: the dataset joins `train.csv` by StudyInstanceUID. This module imports torch only
inside `build_crops` when stage-1 runs are used, so its reader runs in a light spawned worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.cache import prepare_arrays
from ..io.files import write_npz_atomic
from ..io.jobs import FAILURES, Done, Ledger, read_ahead, run_job
from ..constants import SEGMENTER, VERTEBRAE
from .crops import crop_box_original, grid_scale, slice_positions
from .store import crop_file_arrays, crop_path
from .targets import assign_boxes_to_vertebrae, file_numbers, match_boxes_to_slices, vertebra_targets
from ..stage1.postprocess import vertebra_extents
from ..io.dicom import read_mask, read_series, resize_slices
from ..io.rsna import listed_without_folder, segmentation_path

log = logging.getLogger("kit.stage2.crop_cache")

MANIFEST = "manifest.csv"
UNMATCHED = "unmatched_boxes.csv"
MANIFEST_COLUMNS = ("StudyInstanceUID", "split", "found", "missing", "mask_source", "n_boxes", "unmatched_boxes",
                    "target_conflicts", "seconds")
UNMATCHED_COLUMNS = ("StudyInstanceUID", "x", "y", "width", "height", "slice_number", "reason")
TRUTH_GRID_SIZE = 128  # prepared grid of ground-truth masks when no segmenter sets one (kit prepare's default)


def read_study(uid: str, *, image_dir: str, seg_dir: str | None, size: int, window_name: str,
               segment: bool) -> dict:
    """The prefetch worker's reader (numpy only): one DICOM read -> what building one study's crops needs.

    Args:
        uid: the study (its folder under `image_dir`).
        image_dir: `<data_root>/<split>_images`.
        seg_dir: `<data_root>/segmentations` when ground-truth masks are wanted, else None.
        size: the prepared grid's in-plane size (the segmenter's image size).
        window_name: the segmenter's HU window.
        segment: a segmenter is available (prepare its input when there is no ground truth).

    Returns:
        `series` (`kit.io.dicom.Series`), and either `truth` (uint8 (Z, size, size) labels) or `prepared`
        (`kit.io.cache.prepare_arrays` output).

    Raises:
        ValueError: no ground truth for the study and no segmenter to find its vertebrae.
        DicomError: the series, or its ground truth, cannot be read (a broken ground truth fails the study; it
            never falls back to predictions silently).
    """
    series = read_series(Path(image_dir) / uid)
    nii = None if seg_dir is None else segmentation_path(seg_dir, uid)
    if nii is not None:
        labels = read_mask(nii, series)
        labels = np.where((labels >= 0) & (labels <= len(VERTEBRAE)), labels, 0).astype(np.uint8)  # C1..C7 only
        return {"series": series, "truth": resize_slices(labels, size, nearest=True)}
    if not segment:
        where = f"{uid}.nii(.gz) in {seg_dir}" if seg_dir else "data.true_masks is off"
        raise ValueError(f"study {uid}: no ground-truth segmentation ({where}) and no data.seg_runs to segment it; "
                         "add stage-1 runs to data.seg_runs or build only the segmented studies")
    return {"series": series, "prepared": prepare_arrays(series, size, window_name)}


def study_targets(boxes: pd.DataFrame, slice_numbers: np.ndarray, extents: dict, labels: np.ndarray,
                  scale: tuple[float, float], dz: float, n_slices: int, label: np.ndarray | None = None
                  ) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Per-slice targets of one study, checked against its `train.csv` labels, and the box rows that give none.

    The rules:
    - a study labelled 0 throughout (`label` all 0): every slice is a known negative (0);
    - a study with box rows that match slices: the boxes' targets (`kit.stage2.targets.vertebra_targets`), then each
      vertebra checked against its label; where they disagree (a vertebra labelled 0 with boxed slices: the box
      lies on it but belongs to a neighbour; a found vertebra labelled 1 with no boxed slice: its box landed on a
      neighbour or on no mask) that vertebra's slices are unknown (NaN) and the conflict is listed;
    - otherwise (no box rows, none matched a slice, or no label): unknown (NaN) everywhere.

    Args:
        boxes: the study's `train_bounding_boxes.csv` rows (x, y, width, height, slice_number).
        slice_numbers: (Z,) of the sorted series: each slice's file-name number, what `slice_number` means
            (`kit.stage2.targets.file_numbers`).
        extents: {"C1": VertebraExtent, ...} on the prepared grid of `labels`.
        labels: (Z, s, s) prepared-grid labels.
        scale: (sy, sx) original pixels per prepared pixel.
        dz: slice spacing in mm.
        n_slices: T.
        label: (7,) the study's C1..C7 labels from `train.csv`, or None when it has none (test split).

    Returns:
        targets: float32 (7, T);
        unmatched: rows without a target, columns of `UNMATCHED_COLUMNS` but the uid: those that matched no
        slice and those whose slice shows no vertebra under the box;
        conflicts: one sentence per vertebra whose boxes disagree with its label.
    """
    nan = np.full((len(VERTEBRAE), n_slices), np.nan, np.float32)
    none = pd.DataFrame(columns=list(UNMATCHED_COLUMNS[1:]))
    if label is not None and not np.asarray(label).any():
        targets = np.zeros_like(nan)
        if len(boxes) == 0:
            return targets, none, []
        conflicts = [f"labelled 0 throughout in train.csv but {len(boxes)} box rows: every slice unknown"]
        _, unmatched = match_boxes_to_slices(boxes, slice_numbers)
        return nan, unmatched, conflicts
    if len(boxes) == 0:
        return nan, none, []
    matched, unmatched = match_boxes_to_slices(boxes, slice_numbers)
    if len(matched) == 0:
        return nan, unmatched, []
    assigned = assign_boxes_to_vertebrae(matched, labels, scale)
    off = assigned[assigned["vertebra"] == 0].copy()
    off["reason"] = [f"slice_number {int(n)} (slice {int(z)}) shows no C1..C7 under the box"
                     for n, z in zip(off["slice_number"], off["z"])]
    targets = vertebra_targets(extents, labels, scale, matched, dz, n_slices=n_slices)
    rows = pd.concat([unmatched, off[[*unmatched.columns]]]) if len(off) else unmatched
    conflicts = []
    if label is None:
        return targets, rows, conflicts
    counts = np.bincount(assigned["vertebra"].to_numpy(np.int64), minlength=len(VERTEBRAE) + 1)[1:]
    for i, name in enumerate(VERTEBRAE):
        if name not in extents:
            continue
        positive = bool(targets[i].any())
        if label[i] == 0 and positive:
            conflicts.append(f"{name}: labelled 0 in train.csv but {counts[i]} boxes lie on it")
        elif label[i] == 1 and not positive:
            on = [f"{VERTEBRAE[j]} {c}" for j, c in enumerate(counts) if c]
            conflicts.append(f"{name}: labelled 1 in train.csv but none of its sampled slices is boxed (boxes on "
                             f"{', '.join(on) or 'no vertebra'})")
        else:
            continue
        targets[i] = np.nan
    return targets, rows, conflicts


def choose_models(uid: str, split: str, fold_of: dict[str, int], segmented: bool, runs: Sequence[Sequence]
                  ) -> tuple[list, str]:
    """Which stage-1 models segment a study, and the manifest's mask source.

    A training study with a segmentation (what stage 1 trains and validates on) goes to the models of the fold
    that held it out, when every run has that fold ("oof fold k"); any other study to all models ("ensemble").
    A segmented training study that no run held out was trained on by every model: the ensemble is used and
    the source says so.

    Args:
        uid: the study.
        split: "train" or "test".
        fold_of: {uid: fold} of the folds table.
        segmented: the study has a ground-truth segmentation.
        runs: one list of `LoadedModel` per run of `data.seg_runs` (segmenters and level models).

    Returns:
        (models, mask_source).
    """
    every = [m for run in runs for m in run]
    if split != "train" or not segmented:
        return every, "ensemble"
    fold = fold_of.get(uid)
    held_out = set.intersection(*({m.fold for m in run} for run in runs)) if runs else set()
    if fold in held_out:
        return [m for m in every if m.fold == fold], f"oof fold {fold}"
    why = "it has no fold" if fold is None else f"no run holds fold {fold} out"
    return every, f"ensemble (trained on it: {why})"


def _load_runs(cfg, device) -> list[list]:
    """`load_run` of every run in `data.seg_runs`, each fold once."""
    from ..runs import load_run

    runs = [load_run(run, device=device) for run in cfg.data.seg_runs]
    segmenters = [m for run in runs for m in run if m.provides == SEGMENTER]
    if not segmenters:
        raise ValueError(f"data.seg_runs={cfg.data.seg_runs} holds no segmenter run (only level models)")
    return runs


def _fold_table(cfg, runs: Sequence[Sequence]) -> dict[str, int]:
    """{uid: fold} of the classifier's folds table, checked against the split each stage-1 run trained on: the
    studies each of its folds held out (its `fold<k>/oof.csv`), and its folds table (`data.folds_csv`, or the
    default table its `n_folds` and `folds_seed` name when that is unset)."""
    from ..io.folds import default_folds_path, folds_for, load_folds

    d = cfg.data
    folds = folds_for(d.data_root, path=d.folds_csv, n_folds=d.n_folds, seed=d.folds_seed)
    fold_of = dict(zip(folds["StudyInstanceUID"], folds["fold"].astype(int)))
    mine = d.folds_csv or default_folds_path(d.n_folds, d.folds_seed)

    def check(other: dict, where: str, run: Path) -> None:
        differ = [u for u, k in other.items() if u in fold_of and int(k) != fold_of[u]]
        if differ:
            raise ValueError(f"stage-1 run {run} was trained on another split ({where}): {len(differ)} studies "
                             f"(e.g. {differ[0]}) lie in other folds than in the classifier's folds table ({mine}); "
                             "out-of-fold masks need one shared split: set data.folds_csv of both to one file")

    for run in runs:
        m = run[0]
        run_dir = Path(m.path).parent.parent
        if m.config.data.n_folds != d.n_folds:
            raise ValueError(f"stage-1 run {run_dir} has data.n_folds={m.config.data.n_folds} but the "
                             f"classifier's data.n_folds={d.n_folds}: both stages must share one split")
        for model in run:  # the split it trained on, as it was: the studies each fold held out
            oof = Path(model.path).parent / "oof.csv"
            if oof.is_file():
                held = pd.read_csv(oof, dtype={"StudyInstanceUID": str}, usecols=["StudyInstanceUID"])
                check(dict.fromkeys(held["StudyInstanceUID"], model.fold), f"fold {model.fold} held out", run_dir)
        theirs = m.config.data.folds_csv or default_folds_path(m.config.data.n_folds, m.config.data.folds_seed)
        if Path(theirs).is_file():
            table = load_folds(theirs)
            check(dict(zip(table["StudyInstanceUID"], table["fold"])), f"the folds table {theirs}", run_dir)
    return fold_of


def _study_boxes(root: Path, split: str) -> pd.DataFrame:
    """The split's box rows (`kit.io.rsna.load_boxes`); none for the test split or without the CSV."""
    from ..io.rsna import load_boxes

    if split != "train" or not (root / "train_bounding_boxes.csv").is_file():
        if split == "train":
            log.warning("no %s: slice targets are NaN (unknown) for every study", root / "train_bounding_boxes.csv")
        return pd.DataFrame(columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
    return load_boxes(root)


def _train_labels(root: Path) -> dict[str, np.ndarray]:
    """{uid: (7,) C1..C7 labels} of `train.csv` (empty without it: targets are then not checked)."""
    from ..io.rsna import load_train

    if not (root / "train.csv").is_file():
        return {}
    table = load_train(root)
    return dict(zip(table["StudyInstanceUID"], table[list(VERTEBRAE)].to_numpy(np.int64)))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The study's crop file, written atomically at zlib level 1, not `savez_compressed`'s 6: much faster for
    slightly larger files (docs/benchmarks.md, Stage 2, "The crops")."""
    write_npz_atomic(path, arrays, level=1)


def build_study(uid: str, study: dict, cfg, *, models: list | None = None, mask_source: str = "truth",
                boxes: pd.DataFrame | None = None, label: np.ndarray | None = None, device=None
                ) -> tuple[dict[str, np.ndarray], dict, pd.DataFrame]:
    """One study's crop arrays, manifest row (without split and seconds) and box rows without a target.

    Args:
        uid: the study.
        study: `read_study` output (`series` and `truth` or `prepared`).
        cfg: a `ClsConfig` (its `data` section sets the crop geometry).
        models: stage-1 models (`choose_models`) when `study` has no `truth`.
        mask_source: the manifest's mask source for those models.
        boxes: the study's box rows (empty or None: targets NaN unless `label` is all 0).
        label: (7,) the study's C1..C7 labels of `train.csv` (None: unknown; `study_targets`).
        device: where the models run (default: where they are).

    Returns:
        (arrays of `CROP_KEYS`, manifest fields, unmatched box rows).
    """
    d = cfg.data
    series = study["series"]
    if "truth" in study:
        labels, dropped, mask_source = study["truth"], {}, "truth"
        extents = vertebra_extents(labels)
    else:
        from ..stage1.infer import segment_study

        result = segment_study({**study["prepared"], "uid": uid}, models, uid=uid, device=device)
        labels, extents, dropped = result.labels, result.extents, result.dropped
    dz = float(series.spacing[0])
    crops, found, reasons = cfg.recipe().crop_study(series.hu, labels, extents, dz=dz, dropped=dropped)
    if mask_source == "truth":
        reasons = {name: "not in the ground-truth segmentation" for name in reasons}
    scale = grid_scale(series.hu.shape[1:], labels.shape[1:])
    positions = np.full((len(VERTEBRAE), d.n_slices), -1, np.int32)
    crop_boxes = np.zeros((len(VERTEBRAE), 4), np.int32)
    for i, name in enumerate(VERTEBRAE):
        if name in extents:  # what ClsRecipe.crop_study samples and cuts
            positions[i] = slice_positions(extents[name], d.n_slices)
            crop_boxes[i] = crop_box_original(extents[name], scale, series.hu.shape[1:], d.margin)
    boxes = boxes if boxes is not None else pd.DataFrame(columns=["x", "y", "width", "height", "slice_number"])
    numbers = file_numbers(series.files, series.instance_numbers)
    targets, unmatched, conflicts = study_targets(boxes, numbers, extents, labels, scale, dz, d.n_slices, label)
    arrays = {"crops": crops, "found": found, "positions": positions, "slice_targets": targets,
              "instance_numbers": np.asarray(series.instance_numbers, np.int32),
              "spacing": np.asarray(series.spacing, np.float32), "orig_hw": np.asarray(series.hu.shape[1:], np.int32),
              "crop_boxes": crop_boxes, "slice_numbers": numbers.astype(np.int32)}
    row = {"StudyInstanceUID": uid, "found": " ".join(n for n, f in zip(VERTEBRAE, found) if f),
           "missing": "; ".join(f"{n}: {why}" for n, why in reasons.items()), "mask_source": mask_source,
           "n_boxes": len(boxes), "unmatched_boxes": len(unmatched), "target_conflicts": "; ".join(conflicts)}
    unmatched = unmatched.assign(StudyInstanceUID=uid)
    return arrays, row, unmatched.reindex(columns=list(UNMATCHED_COLUMNS))


def build_crops(cfg, *, split: str = "train", uids: Sequence[str] | None = None, progress: bool = True,
                prefetch: bool = True, device=None, grid_size: int = TRUTH_GRID_SIZE,
                time_budget: float | None = None) -> dict:
    """Build the crop cache of a split, resumably, one failure never stopping the rest.

    Studies whose `<crop_dir>/<uid>.npz` exists are skipped. Each other study is read once (in a spawned
    prefetch worker while the previous one is segmented and cropped), gets its vertebrae from the ground truth
    or the stage-1 runs (module docstring), and is written as `<uid>.npz` with a row in `manifest.csv`; its
    box rows that give no target go to `unmatched_boxes.csv`; a study that fails goes to `failures.csv` with
    the error (and leaves it when a later run builds it). Each study's rows are written (atomically) as soon as
    its file is, so a run killed at any point loses at most the study it was on; a file without its manifest row
    (a kill between the two writes) is built again by the next run (`kit.io.jobs`).

    Args:
        cfg: a `ClsConfig`; `data` gives data_root, crop_dir, seg_runs, true_masks, the folds table and the crop
            geometry (n_slices, n_neighbours, neighbour_mm, windows, with_mask, image_size, margin).
        split: "train" or "test" (`<data_root>/<split>_images/`).
        uids: restrict to these studies (default: every folder of the split; a training study that
            `train.csv` lists with no folder goes to `failures.csv`).
        progress: a tqdm bar (only on a terminal).
        prefetch: read the next study in a spawned worker process.
        device: where stage-1 models run (default CUDA when available, else CPU).
        grid_size: prepared grid of ground-truth masks when `data.seg_runs` is empty (with runs, the
            segmenter's image size is used, so true and predicted masks share one grid).
        time_budget: seconds: no study is started that would end past it; the rest are left for the next run.

    Returns:
        Counts `built`, `skipped`, `failed`, `left` (not started: the time budget), the `failures` {uid: error},
        `in_sample` (studies segmented by models trained on them), `seconds`, `seconds_per_study` and `crop_dir`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; valid: train, test")
    start = time.perf_counter()
    d = cfg.data
    root, crop_dir = Path(d.data_root), Path(d.crop_dir)
    image_dir = root / f"{split}_images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"no {split}_images/ folder under data.data_root={root}")
    absent = listed_without_folder(root, split, crop_dir / FAILURES) if uids is None else {}  # named, not left out
    uids = sorted(p.name for p in image_dir.iterdir() if p.is_dir()) if uids is None else list(uids)
    ledger = Ledger(crop_dir, MANIFEST, lambda u: crop_path(crop_dir, u), columns=MANIFEST_COLUMNS,
                    tables={UNMATCHED: UNMATCHED_COLUMNS})
    todo = ledger.todo(uids)
    seg_dir = root / "segmentations"

    runs, fold_of, size, window_name = [], {}, grid_size, d.window
    if d.seg_runs and todo:
        import torch

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        runs = _load_runs(cfg, device)
        segmenter = next(m for run in runs for m in run if m.provides == SEGMENTER)
        size, window_name = segmenter.image_size, segmenter.window
        if split == "train":
            fold_of = _fold_table(cfg, runs)
    boxes = _study_boxes(root, split) if todo else None
    train_labels = _train_labels(root) if split == "train" and todo else {}
    read = partial(read_study, image_dir=str(image_dir), seg_dir=str(seg_dir) if d.true_masks else None,
                   size=size, window_name=window_name, segment=bool(runs))
    unusable = {}
    if not runs:  # nothing can find the vertebrae of a study without ground truth: no need to read it
        unusable = {uid: f"study {uid}: no ground-truth segmentation to use (data.true_masks={d.true_masks}, "
                         f"{seg_dir / (uid + '.nii')}) and no data.seg_runs to segment it"
                    for uid in todo if not (d.true_masks and segmentation_path(seg_dir, uid))}
        for uid, why in unusable.items():
            log.warning("study %s: no crops: %s", uid, why)
    in_sample, conflicted = [], []

    def work(uid: str, study: dict, read_seconds: float) -> Done:
        t0 = time.perf_counter()
        models, source = None, "truth"
        if "truth" not in study:
            has_truth = segmentation_path(seg_dir, uid) is not None
            models, source = choose_models(uid, split, fold_of, has_truth, runs)
        arrays, row, lost = build_study(uid, study, cfg, models=models, mask_source=source,
                                        boxes=boxes[boxes["StudyInstanceUID"] == uid], label=train_labels.get(uid),
                                        device=device)
        if row["target_conflicts"]:
            conflicted.append(uid)
            log.warning("study %s: slice targets disagree with train.csv, marked unknown: %s", uid,
                        row["target_conflicts"])
        del study
        _write_npz(crop_path(crop_dir, uid), crop_file_arrays(arrays))
        if source.startswith("ensemble (trained"):
            in_sample.append(uid)
            log.warning("study %s: segmented by models trained on it (%s)", uid, source)
        return Done({**row, "split": split, "seconds": round(read_seconds + time.perf_counter() - t0, 3)},
                    {UNMATCHED: lost})

    result = run_job(uids, ledger, work, studies=lambda todo: read_ahead(read, todo, prefetch),
                     desc=f"crops {split}", progress=progress, known_failures={**absent, **unusable},
                     where=lambda u: image_dir / u, todo=[u for u in todo if u not in unusable],
                     time_budget=time_budget)
    rows = result["rows"]
    seconds = time.perf_counter() - start
    summary = {"built": len(rows), "skipped": len(uids) - len(todo), "failed": len(result["failures"]),
               "left": result["left"],
               "failures": result["failures"], "target_conflicts": len(conflicted),
               "in_sample": in_sample, "seconds": round(seconds, 2),
               "seconds_per_study": round(sum(r["seconds"] for r in rows) / max(len(rows), 1), 3),
               "crop_dir": str(crop_dir)}
    log.info("crops %s: %d built, %d skipped, %d failed in %.1f s (%.2f s a study) -> %s", split, summary["built"],
             summary["skipped"], summary["failed"], seconds, summary["seconds_per_study"], crop_dir)
    return summary
