"""A whole synthetic dataset in the competition layout, and the generator's answers beside it.

:func:`make_dataset` writes ``<out>`` exactly as the competition lays its data out (nothing else: no file in
it holds the test labels or says where a fracture is beyond ``train_bounding_boxes.csv``) and the answers to
``<out>_answers`` (or ``answers_dir``); :func:`load_answers` reads them back.

numpy / pandas / pydicom / nibabel only.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import UID_PREFIX, VERTEBRAE
from .anatomy import LEVEL_LABELS, LEVELS
from .dicom_writer import DATASET_TRANSFER_SYNTAXES, EXACT_ENCODINGS, write_segmentation, write_study
from .fractures import FRACTURE_KINDS, KIND_MIX, LOOKALIKE_KINDS, LOOKALIKE_MIX, check_difficulty, sample_fractures
from .study import make_study

log = logging.getLogger(__name__)

#: prediction_type order of the rows of one study in test.csv / sample_submission.csv.
PREDICTION_TYPES = (*VERTEBRAE, "patient_overall")

#: The public test.csv lists these three studies, which have no folder in the public test_images/.
PUBLIC_TEST_CSV_UIDS = (UID_PREFIX + "10197", UID_PREFIX + "10454", UID_PREFIX + "10690")

#: The files of the answers folder (:func:`load_answers` keys: the names without extension).
ANSWER_FILES = ("test_labels.csv", "studies.csv", "fractures.csv", "lookalikes.csv", "summary.json")

LABEL_COLUMNS = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
FRACTURE_COLUMNS = ["StudyInstanceUID", "split", "vertebra", "kind", "site", "subtlety", "z_first", "z_last",
                    "slice_number_first", "slice_number_last", "n_slices_shown", "voxels", "contrast_hu", "gap_mm",
                    "shift_mm", "fraction", "height_loss", "in_bounding_boxes"]
LOOKALIKE_COLUMNS = ["StudyInstanceUID", "split", "kind", "vertebra", "site", "z_first", "z_last",
                     "slice_number_first", "slice_number_last", "detail"]


def default_answers_dir(out_dir: str | os.PathLike) -> Path:
    """Where :func:`make_dataset` puts the answers of ``out_dir``: the sibling ``<name>_answers``."""
    out = Path(out_dir).resolve()
    return out.parent / f"{out.name}_answers"


def _balanced(rng: np.random.Generator, values: list, n: int) -> list:
    """n values covering every value as evenly as possible, shuffled."""
    reps = list(values) * (n // len(values) + 1)
    out = reps[:n]
    return [out[i] for i in rng.permutation(n)]


def _slice_range(slices: list[int], inst: np.ndarray) -> dict:
    if not slices:
        return dict(z_first=None, z_last=None, slice_number_first=None, slice_number_last=None)
    lo, hi = min(slices), max(slices)
    return dict(z_first=lo, z_last=hi, slice_number_first=int(inst[lo]), slice_number_last=int(inst[hi]))


def _study_task(task: dict) -> dict:
    """Worker: make, write and summarise one study."""
    study = make_study(task["seed"], size=task["size"], n_slices=task["n_slices"], fractures=task["fractures"],
                       uid=task["uid"], difficulty=task["difficulty"])
    v = task["variant"]
    write_study(study, task["study_dir"], transfer_syntax=v["transfer_syntax"], head_first=v["head_first"],
                intercept=v["intercept"], bits_stored=v["bits_stored"], signed=v["signed"],
                modality=v["modality"])
    if task["segmentation"]:
        write_segmentation(study, task["seg_path"], head_first=v["head_first"])
    inst = study.instance_numbers(v["head_first"])
    boxes = study.box_rows(v["head_first"])
    present = [n for n in LEVELS if (study.labels == LEVEL_LABELS[n]).any()]
    ids = dict(StudyInstanceUID=study.uid, split=task["split"])
    fractures = [dict(**ids, vertebra=f["vertebra"], kind=f["kind"], site=f["site"], subtlety=f["subtlety"],
                      **_slice_range(f["slices"], inst), n_slices_shown=len(f["slices"]), voxels=f["voxels"],
                      contrast_hu=f["contrast_hu"], gap_mm=f.get("gap_mm"), shift_mm=f.get("shift_mm"),
                      fraction=f.get("fraction"), height_loss=f.get("height_loss"),
                      in_bounding_boxes=bool(task["boxed"]))
                 for f in study.fracture_sites]
    lookalikes = [dict(**ids, kind=r["kind"], vertebra=r["vertebra"], site=r["site"],
                       **_slice_range(r["slices"], inst), detail=r["detail"]) for r in study.lookalikes]
    return dict(index=task["index"], split=task["split"], uid=study.uid, labels=study.label_row(), boxes=boxes,
                fractures=fractures, lookalikes=lookalikes,
                info=dict(StudyInstanceUID=study.uid, split=task["split"], slices=study.n_slices,
                          rows=study.hu.shape[1], columns=study.hu.shape[2], dz=study.spacing[0],
                          pixel_spacing=study.spacing[1], **v, segmentation=bool(task["segmentation"]),
                          levels=" ".join(present), lookalikes=" ".join(study.meta["lookalikes"]),
                          seed=task["seed"]))


def _mp_context():
    # fork is fastest, but not once torch (and its thread pools) is loaded in this process
    if "torch" in sys.modules or "fork" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    return mp.get_context("fork")


def _run(tasks: list[dict], workers: int, progress: bool) -> list[dict]:
    results = []
    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar(total=len(tasks), desc="synthetic studies", unit="study")
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(_study_task(task))
            if bar is not None:
                bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=_mp_context()) as pool:
            for fut in as_completed([pool.submit(_study_task, t) for t in tasks]):
                results.append(fut.result())
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return sorted(results, key=lambda r: r["index"])


def _write_competition_tables(out: Path, results: list[dict], test_csv_mismatch: bool) -> tuple[pd.DataFrame, int]:
    """train.csv, train_bounding_boxes.csv, test.csv, sample_submission.csv; returns train and the box rows."""
    train = pd.DataFrame([r["labels"] for r in results if r["split"] == "train"], columns=LABEL_COLUMNS)
    train.to_csv(out / "train.csv", index=False)
    box_rows = [b for r in results if r["split"] == "train" and r["boxed"] for b in r["boxes"]]
    boxes = pd.DataFrame(box_rows, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"])
    boxes.to_csv(out / "train_bounding_boxes.csv", index=False)
    test_uids = [r["uid"] for r in results if r["split"] == "test"]
    listed = list(PUBLIC_TEST_CSV_UIDS) if test_csv_mismatch else test_uids
    test = pd.DataFrame([dict(row_id=f"{u}_{p}", StudyInstanceUID=u, prediction_type=p)
                         for u in listed for p in PREDICTION_TYPES],
                        columns=["row_id", "StudyInstanceUID", "prediction_type"])
    test.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": test["row_id"], "fractured": 0.5}).to_csv(out / "sample_submission.csv", index=False)
    return train, len(boxes)


def _write_answers(answers: Path, results: list[dict], summary: dict) -> None:
    answers.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r["labels"] for r in results if r["split"] == "test"], columns=LABEL_COLUMNS).to_csv(
        answers / "test_labels.csv", index=False)
    pd.DataFrame([r["info"] for r in results]).to_csv(answers / "studies.csv", index=False)
    pd.DataFrame([f for r in results for f in r["fractures"]], columns=FRACTURE_COLUMNS).to_csv(
        answers / "fractures.csv", index=False)
    pd.DataFrame([x for r in results for x in r["lookalikes"]], columns=LOOKALIKE_COLUMNS).to_csv(
        answers / "lookalikes.csv", index=False)
    (answers / "summary.json").write_text(json.dumps(summary, indent=2))


def _summary(out: Path, answers: Path, results: list[dict], train: pd.DataFrame, n_box_rows: int, **settings) -> dict:
    fractures = [f for r in results for f in r["fractures"]]
    kinds = Counter(f["kind"] for f in fractures)
    looks = Counter(x["kind"] for r in results for x in r["lookalikes"])
    with_look = sum(bool(r["lookalikes"]) for r in results)
    return dict(
        out_dir=str(out), answers_dir=str(answers), **settings,
        n_segmentations=sum(r["info"]["segmentation"] for r in results),
        n_bbox_studies=sum(bool(r["boxed"]) for r in results), n_bbox_rows=n_box_rows,
        n_slices=int(sum(r["info"]["slices"] for r in results)),
        prevalence={t: round(float(train[t].mean()), 4) if len(train) else 0.0 for t in LABEL_COLUMNS[1:]},
        fractures={"total": len(fractures), **{k: kinds.get(k, 0) for k in FRACTURE_KINDS},
                   "shown_on_no_slice": sum(f["n_slices_shown"] == 0 for f in fractures)},
        fracture_kind_mix=KIND_MIX if settings["difficulty"] == "realistic" else {"all": {"cleft": 1.0}},
        lookalikes={"studies_with_any": with_look, "share_of_studies": round(with_look / max(len(results), 1), 4),
                    **{k: looks.get(k, 0) for k in LOOKALIKE_KINDS}},
        lookalike_mix=LOOKALIKE_MIX if settings["difficulty"] == "realistic" else {},
    )


def make_dataset(out_dir: str | os.PathLike, *, n_train: int = 60, n_test: int = 3, size: int = 128, seed: int = 0,
                 seg_share: float = 0.5, bbox_share: float = 0.5, workers: int | None = None,
                 test_csv_mismatch: bool = False, progress: bool = True, n_slices: int | None = None,
                 answers_dir: str | os.PathLike | None = None, difficulty: str = "realistic") -> dict:
    """Write an RSNA-format synthetic dataset, and its answers outside it.

    Layout of ``out_dir`` (as the competition's, nothing more): ``train.csv``, ``train_bounding_boxes.csv``
    (for a ``bbox_share`` subset of the positive studies), ``test.csv``, ``sample_submission.csv``,
    ``train_images/<uid>/<n>.dcm``, ``test_images/<uid>/<n>.dcm``, ``segmentations/<uid>.nii`` (for a
    ``seg_share`` subset of the training studies).

    Answers (``answers_dir``, default the sibling ``<out_dir>_answers``; read them with :func:`load_answers`):
    ``test_labels.csv`` (the test studies' 8 targets), ``studies.csv`` (header variant, geometry, split,
    look-alikes of every study), ``fractures.csv`` (one row per fracture: vertebra, kind, subtlety, slice
    range as indices of the superior-first volume and as slice numbers), ``lookalikes.csv`` (one row per
    look-alike) and ``summary.json`` (counts, prevalence, difficulty, the kind mixes).

    Across studies the headers vary deterministically (each value appears once n >= its count): transfer
    syntax (implicit, jpeg-lossless, explicit, rle), head-first / feet-first InstanceNumbers, the exact
    (intercept, signed, BitsStored) combinations of :data:`EXACT_ENCODINGS`, Modality present / absent.

    Args:
        test_csv_mismatch: list in test.csv / sample_submission.csv three studies that have no folder in
            test_images/ (the public competition's quirk) instead of the test folders' studies.
        workers: processes (default min(2, cpu count)); 0 or 1 runs in this process.
        n_slices: force every study's slice count (fast tests); default: drawn per study.
        difficulty: "realistic" (graded fracture kinds and look-alikes) or "easy" (clefts only, no look-alikes).

    Returns:
        The summary written to ``summary.json``, with the seconds taken.
    """
    t0 = time.perf_counter()
    check_difficulty(difficulty)
    out = Path(out_dir)
    answers = Path(answers_dir) if answers_dir is not None else default_answers_dir(out)
    if answers.resolve() == out.resolve() or out.resolve() in answers.resolve().parents:
        raise ValueError(f"answers_dir {answers} lies inside the data root {out}: the answers must stay outside "
                         "the competition layout")
    for sub in ("train_images", "test_images", "segmentations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2022]))
    n_all = n_train + n_test
    pool_ids = np.setdiff1d(np.arange(10000, 33000), [int(u.rsplit(".", 1)[1]) for u in PUBLIC_TEST_CSV_UIDS])
    uids = [f"{UID_PREFIX}{i}" for i in rng.choice(pool_ids, size=n_all, replace=False)]
    ts = _balanced(rng, list(DATASET_TRANSFER_SYNTAXES), n_all)
    hf = _balanced(rng, [True, False], n_all)
    enc = _balanced(rng, list(EXACT_ENCODINGS), n_all)
    mod = _balanced(rng, [False, True], n_all)
    fractures = [sample_fractures(rng) for _ in range(n_train)]
    seg_idx = set(rng.permutation(n_train)[: int(round(seg_share * n_train))].tolist())
    positive = [i for i in range(n_train) if any(fractures[i].values())]
    bbox_idx = set(rng.permutation(positive)[: int(round(bbox_share * len(positive)))].tolist()) if positive \
        else set()
    study_seeds = np.random.SeedSequence([int(seed), 7]).generate_state(n_all).tolist()

    tasks = []
    for i in range(n_all):
        split = "train" if i < n_train else "test"
        tasks.append(dict(
            index=i, split=split, uid=uids[i], seed=int(study_seeds[i]), size=size, n_slices=n_slices,
            fractures=fractures[i] if split == "train" else None, difficulty=difficulty,
            variant=dict(transfer_syntax=ts[i], head_first=hf[i], intercept=enc[i][0], signed=enc[i][1],
                         bits_stored=enc[i][2], modality=mod[i]),
            study_dir=str(out / f"{split}_images" / uids[i]),
            segmentation=split == "train" and i in seg_idx, boxed=split == "train" and i in bbox_idx,
            seg_path=str(out / "segmentations" / f"{uids[i]}.nii"),
        ))
    results = _run(tasks, min(2, os.cpu_count() or 1) if workers is None else workers, progress)
    for r, task in zip(results, tasks):
        r["boxed"] = task["boxed"]

    train, n_box_rows = _write_competition_tables(out, results, test_csv_mismatch)
    for split in ("train", "test"):
        stale = sorted({p.name for p in (out / f"{split}_images").iterdir()} - {r["uid"] for r in results
                                                                                if r["split"] == split})
        if stale:
            log.warning("%s/%s_images holds %d study folders from an earlier run (e.g. %s); they are not in the "
                        "new tables: write into an empty folder", out, split, len(stale), stale[0])
    summary = _summary(out, answers, results, train, n_box_rows, n_train=n_train, n_test=n_test, size=size,
                       seed=seed, difficulty=difficulty, test_csv_mismatch=bool(test_csv_mismatch))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    _write_answers(answers, results, summary)
    return summary


def load_answers(answers_dir: str | os.PathLike) -> dict:
    """Read a synthetic dataset's answers folder (see :func:`make_dataset`).

    Returns:
        ``{"test_labels", "studies", "fractures", "lookalikes"}`` -> DataFrame, ``"summary"`` -> dict.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (naming what was looked for).
    """
    folder = Path(answers_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no answers folder {folder}: `kit synth --out DIR` writes it as DIR_answers "
                                "(or where --answers says)")
    missing = [name for name in ANSWER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"answers folder {folder} lacks {missing}; expected {list(ANSWER_FILES)}")
    answers: dict = {Path(name).stem: pd.read_csv(folder / name) for name in ANSWER_FILES if name.endswith(".csv")}
    answers["summary"] = json.loads((folder / "summary.json").read_text())
    return answers
