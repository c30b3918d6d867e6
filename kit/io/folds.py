"""Folds: iterative stratification over the targets and the optional study flags, saved and reloaded by path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import BROKEN_STUDIES, TARGETS
from .rsna import (
    UID,
    PathLike,
    _check_binary,
    _check_columns,
    _check_uids,
    _few,
    _read_csv,
    _root,
    check_train,
    load_boxes,
    load_train,
    log,
    segmented_studies,
)

FOLD_COLUMNS = (UID, "fold")


STRATA_COLUMNS = ("has_segmentation", "has_boxes")  # optional 0/1 study flags the folds also balance


DEFAULT_N_FOLDS = 5


DEFAULT_SEED = 42


def iterative_stratification(labels: np.ndarray, n_folds: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Assign each row of a multilabel 0/1 matrix to a fold by iterative stratification.

    After Sechidis, Tsoumakas & Vlahavas, "On the stratification of multi-label data" (ECML PKDD 2011):
    every fold wants `1/n_folds` of the rows and of each label's positives. Repeatedly take the label with
    the fewest positives still unassigned and give each of its rows to the fold that most wants that label.
    Rows with no positive label go last, each to the fold that most wants rows.

    One refinement over the paper's tie-breaking (which only looks at the current label, then at row
    counts): every fold within one example of the largest desire for the current label is a candidate, and
    among those the row goes to the fold that most wants the row's *other* labels, each relative to its
    even share. Without it, rows that carry a rare label and a common one (C3 + C7) are placed for the rare
    label alone and the common label ends up to 28% short in some fold; with it, on a table with the real
    RSNA label counts, every fold holds >= 95% of its even share of every label. Remaining ties go to the
    fold that most wants rows, then at random. Deterministic for a given `seed`.

    Args:
        labels: (N, L) array of 0/1.
        n_folds: number of folds, 2 <= n_folds <= N.
        seed: seed for the row order and tie breaking.

    Returns:
        (N,) int64 fold index in 0..n_folds-1.
    """
    y = np.asarray(labels)
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, L); got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must hold only 0 and 1")
    y = y.astype(bool)
    n = y.shape[0]
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be in [2, {n}] for {n} rows; got {n_folds}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # visit rows in a seeded random order
    want_rows = np.full(n_folds, n / n_folds)
    share = y.sum(0) / n_folds  # even share of each label's positives per fold
    want_label = np.tile(share, (n_folds, 1))  # (K, L): positives each fold still wants
    share = np.maximum(share, 1e-12)
    fold = np.full(n, -1, dtype=np.int64)
    remaining = y.copy()  # positives of rows not yet assigned

    def choose(candidates: np.ndarray) -> int:
        if len(candidates) > 1:
            rows_w = want_rows[candidates]
            candidates = candidates[rows_w >= rows_w.max() - 1e-9]
        return int(candidates[rng.integers(len(candidates))])

    while True:
        counts = remaining.sum(0)
        live = np.nonzero(counts > 0)[0]
        if not len(live):
            break
        label = live[np.argmin(counts[live])]  # rarest label first (lowest index on ties)
        for i in order[remaining[order, label]]:
            w = want_label[:, label]
            best = np.nonzero(w >= w.max() - 1.0 - 1e-9)[0]
            if len(best) > 1:
                others = (want_label[best][:, y[i]] / share[y[i]]).sum(1)
                best = best[others >= others.max() - 1e-9]
            k = choose(best)
            fold[i] = k
            want_rows[k] -= 1
            want_label[k] -= y[i]
            remaining[i] = False
    for i in order[fold[order] < 0]:  # rows with no positive label
        k = choose(np.arange(n_folds))
        fold[i] = k
        want_rows[k] -= 1
    return fold


def study_strata(root: PathLike | None, uids: Sequence[str]) -> pd.DataFrame:
    """The 0/1 flags a data root provides for each study, to balance across folds.

    `has_segmentation`: the study has `segmentations/<uid>.nii` (or `.nii.gz`); present only when the root
    has a `segmentations/` folder. `has_boxes`: the study has rows in `train_bounding_boxes.csv`; present
    only when that file exists. Only file names and the box table are read, no pixel data.

    Args:
        root: data root (see `kit.paths.find_data_root`).
        uids: the studies, e.g. `load_train(root)[UID]`.

    Returns:
        DataFrame `StudyInstanceUID` + whichever of STRATA_COLUMNS the root provides (int64 0/1), in the
        order of `uids`.
    """
    root = _root(root)
    uids = [str(u) for u in uids]
    out = pd.DataFrame({UID: uids})
    seg_dir = root / "segmentations"
    if seg_dir.is_dir():
        segmented = segmented_studies(seg_dir)
        out["has_segmentation"] = [int(u in segmented) for u in uids]
    if (root / "train_bounding_boxes.csv").is_file():
        boxed = set(load_boxes(root)[UID])
        out["has_boxes"] = [int(u in boxed) for u in uids]
    return out


def _strata(train: pd.DataFrame, given: dict[str, Sequence[int] | np.ndarray | None]) -> dict[str, np.ndarray]:
    """The strata flags to use: an explicit array wins over a column of `train` of the same name."""
    strata = {}
    for name in STRATA_COLUMNS:
        values = given.get(name)
        if values is None and name in train.columns:
            values = train[name].to_numpy()
        if values is None:
            continue
        values = np.asarray(values)
        if values.shape != (len(train),):
            raise ValueError(f"{name} must hold one 0/1 value per study ({len(train)}); got shape {values.shape}")
        bad = ~np.isin(values, (0, 1, True, False))
        if bad.any():
            offenders = [f"{u}={v!r}" for u, v in zip(train.loc[bad, UID], values[bad].tolist())]
            raise ValueError(f"{name} must hold 0/1 per study; got {_few(offenders)}")
        strata[name] = values.astype(np.int64)
    return strata


def make_folds(
    train: pd.DataFrame,
    n_folds: int = DEFAULT_N_FOLDS,
    seed: int = DEFAULT_SEED,
    *,
    has_segmentation: Sequence[int] | np.ndarray | None = None,
    has_boxes: Sequence[int] | np.ndarray | None = None,
) -> pd.DataFrame:
    """One fold per study, stratified by iterative stratification on the fracture pattern (TARGETS) and
    on whether a study has a segmentation and bounding boxes.

    The segmented studies (87 of 2019 in the real data) train the segmenter and the boxed ones (235) carry
    slice-level labels: balancing them gives every fold its share of both, e.g. 40 segmented studies over 5
    folds put 8 +- 1 in each.

    Args:
        train: label table (`StudyInstanceUID` + TARGETS), e.g. from `load_train`; it may hold
            `has_segmentation` / `has_boxes` columns (see `study_strata`).
        n_folds: number of folds.
        seed: makes the split reproducible.
        has_segmentation: (N,) 0/1 per row of `train`; overrides a column of that name. None and no column:
            not stratified on it.
        has_boxes: (N,) 0/1, likewise.

    Returns:
        DataFrame `StudyInstanceUID, fold` in the row order of `train`, followed by the strata columns used
        (int64 0/1), so the saved CSV records what was balanced.

    Raises:
        ValueError: a bad train table, a strata array of the wrong length or not 0/1, or n_folds out of
            [2, N].
    """
    train = check_train(train)
    strata = _strata(train, {"has_segmentation": has_segmentation, "has_boxes": has_boxes})
    labels = np.column_stack([train[list(TARGETS)].to_numpy(), *strata.values()])
    fold = iterative_stratification(labels, n_folds, seed)
    return pd.DataFrame({UID: train[UID].to_numpy(), "fold": fold, **strata})


def save_folds(folds: pd.DataFrame, path: PathLike) -> Path:
    """Write `StudyInstanceUID, fold` (and any of STRATA_COLUMNS it holds) to CSV, parent folders made."""
    _check_columns(folds, FOLD_COLUMNS, "folds", allow_extra=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folds[[*FOLD_COLUMNS, *(c for c in STRATA_COLUMNS if c in folds.columns)]].to_csv(path, index=False)
    return path


def load_folds(path: PathLike) -> pd.DataFrame:
    """Read a folds CSV written by `save_folds`: `StudyInstanceUID, fold` and any of STRATA_COLUMNS.

    Raises:
        ValueError: wrong columns, duplicated UIDs, folds that are not integers 0..K-1 with every fold used,
            or strata columns that are not 0/1.
    """
    path = Path(path)
    df = _read_csv(path, [UID])
    strata = [c for c in STRATA_COLUMNS if c in df.columns]
    _check_columns(df, (*FOLD_COLUMNS, *strata), str(path))
    df[UID] = _check_uids(df[UID], str(path), unique=True)
    fold = pd.to_numeric(df["fold"], errors="coerce")
    if fold.isna().any() or (fold != np.round(fold)).any() or (fold < 0).any():
        raise ValueError(f"{path}: fold must be an integer >= 0; bad for {_few(df.loc[fold.isna() | (fold < 0), UID])}")
    df["fold"] = fold.astype(np.int64)
    used = sorted(int(k) for k in df["fold"].unique())
    if used != list(range(len(used))):
        raise ValueError(f"{path}: folds must be 0..K-1 with none empty; found {used}")
    _check_binary(df, strata, str(path))
    for col in strata:
        df[col] = pd.to_numeric(df[col]).astype(np.int64)
    return df


def default_folds_path(n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED) -> Path:
    """`runs/folds_k{n_folds}_seed{seed}.csv` (relative to the working directory)."""
    return Path("runs") / f"folds_k{n_folds}_seed{seed}.csv"


def folds_for(
    root_or_train: PathLike | pd.DataFrame | None = None,
    path: PathLike | None = None,
    n_folds: int = DEFAULT_N_FOLDS,
    seed: int = DEFAULT_SEED,
) -> pd.DataFrame:
    """The one shared split: made and saved on first use, read back afterwards.

    So the segmenter and the classifier (and every later run) share one split, the first call writes the
    folds CSV and later calls re-read it. Made from a data root, the split is also stratified on the
    `study_strata` the root provides (has a segmentation, has boxes); made from a table, on its
    `has_segmentation` / `has_boxes` columns if it holds them. The CSV must cover every study of the train table; it may hold
    extra studies only when they are in `BROKEN_STUDIES` (so a split made on the full table serves a table
    loaded with `drop_broken=True`).

    Args:
        root_or_train: a train label table (optionally with STRATA_COLUMNS), or a data root to `load_train`
            and `study_strata` from (None: the usual places).
        path: the folds CSV; default `default_folds_path(n_folds, seed)`.
        n_folds: number of folds (checked against an existing CSV).
        seed: seed used when the CSV is made.

    Returns:
        DataFrame `StudyInstanceUID, fold` (+ the strata columns the CSV records) in the row order of the
        train table.

    Raises:
        ValueError: the CSV's studies or fold count do not match the train table / `n_folds`.
    """
    if isinstance(root_or_train, pd.DataFrame):
        train = check_train(root_or_train)
    else:
        train = load_train(root_or_train)
    path = Path(path) if path is not None else default_folds_path(n_folds, seed)
    if not path.is_file():
        if not isinstance(root_or_train, pd.DataFrame):
            train = train.merge(study_strata(root_or_train, train[UID]), on=UID, how="left", validate="1:1")
        folds = make_folds(train, n_folds, seed)
        save_folds(folds, path)
        balanced = ", ".join([*(c for c in STRATA_COLUMNS if c in folds.columns)]) or "no study flags"
        log.info("made %d folds (seed %d) for %d studies, stratified on the targets and %s -> %s",
                 n_folds, seed, len(folds), balanced, path)
        return folds
    folds = load_folds(path)
    k = folds["fold"].nunique()
    if k != n_folds:
        raise ValueError(f"{path} holds {k} folds but n_folds={n_folds}; pass n_folds={k} or another path")
    in_csv, in_train = set(folds[UID]), set(train[UID])
    lacking = [u for u in train[UID] if u not in in_csv]
    extra = sorted(in_csv - in_train - set(BROKEN_STUDIES))
    if lacking or extra:
        parts = []
        if lacking:
            parts.append(f"{len(lacking)} train studies have no fold ({_few(lacking)})")
        if extra:
            parts.append(f"{len(extra)} studies in the CSV are not in the train table ({_few(extra)})")
        raise ValueError(f"{path} does not match the train table: {'; '.join(parts)}. "
                         "Delete the CSV to remake the split, or pass the table it was made from.")
    log.info("read %d folds for %d studies from %s", k, len(train), path)
    return folds.set_index(UID).loc[train[UID]].reset_index()
