"""Competition tables: loaders with checks, row_id helpers, the studies to predict, and cross-validation folds.

numpy / pandas only (never torch). Every loader checks the columns and values it relies on and raises a
`ValueError` that names the file, what was wrong (missing/extra columns, the offending rows) and what
would be right.

Tables and their columns (RSNA_DATA.md):

| file | columns |
| --- | --- |
| `train.csv` | `StudyInstanceUID, patient_overall, C1..C7` (0/1) |
| `test.csv` | `row_id, StudyInstanceUID, prediction_type` |
| `sample_submission.csv` | `row_id, fractured` |
| `train_bounding_boxes.csv` | `StudyInstanceUID, x, y, width, height, slice_number` |

`row_id` is `<StudyInstanceUID>_<target>`; UIDs contain dots and never underscores, so the target is the
part after the last underscore.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import BROKEN_STUDIES, TARGETS, UID_PREFIX, VERTEBRAE
from ..paths import find_data_root

log = logging.getLogger("kit.io.rsna")

PathLike = str | os.PathLike

UID = "StudyInstanceUID"
TRAIN_COLUMNS = (UID, *TARGETS)
TEST_COLUMNS = ("row_id", UID, "prediction_type")
SUBMISSION_COLUMNS = ("row_id", "fractured")
BOX_COLUMNS = (UID, "x", "y", "width", "height", "slice_number")
FOLD_COLUMNS = (UID, "fold")
STRATA_COLUMNS = ("has_segmentation", "has_boxes")  # optional 0/1 study flags the folds also balance
DEFAULT_N_FOLDS = 5
DEFAULT_SEED = 42

_SHOW = 5  # offending values named in an error message before "... (N in all)"


# ---------------------------------------------------------------------------------------------------------
# Checks shared by the loaders
# ---------------------------------------------------------------------------------------------------------


def _few(values: Iterable, n: int = _SHOW) -> str:
    """'a, b, c, ... (12 in all)': the first `n` values and the count."""
    values = list(values)
    shown = ", ".join(repr(v) if not isinstance(v, str) else v for v in values[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


def _check_columns(df: pd.DataFrame, expected: Sequence[str], source: str, *, allow_extra: bool = False) -> None:
    missing = [c for c in expected if c not in df.columns]
    extra = [c for c in df.columns if c not in expected]
    if missing or (extra and not allow_extra):
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra and not allow_extra:
            parts.append(f"unexpected columns {extra}")
        raise ValueError(f"{source}: {' and '.join(parts)}; expected exactly {list(expected)}")


def _check_uids(uids: pd.Series, source: str, *, unique: bool) -> pd.Series:
    """UIDs as stripped strings; raise on empty values, underscores and (if `unique`) duplicates."""
    empty = uids.isna() | (uids.astype(str).str.strip() == "")
    if empty.any():
        rows = list(uids.index[empty])
        raise ValueError(f"{source}: empty {UID} in rows {_few(rows)}; every row needs a UID string")
    uids = uids.astype(str).str.strip()
    bad = uids[uids.str.contains("_", regex=False)]
    if len(bad):
        raise ValueError(f"{source}: {UID} must not contain '_' (row_ids split on it); got {_few(bad)}")
    if unique:
        dup = uids[uids.duplicated(keep=False)]
        if len(dup):
            raise ValueError(f"{source}: duplicated {UID}: {_few(dup.unique())}; one row per study expected")
    odd = uids[~uids.str.startswith(UID_PREFIX)]
    if len(odd):
        log.debug("%s: %d UIDs do not start with %s, e.g. %s", source, len(odd), UID_PREFIX, odd.iloc[0])
    return uids


def _check_binary(df: pd.DataFrame, columns: Sequence[str], source: str, key: str = UID) -> None:
    """Raise unless every value of `columns` is 0 or 1; names the rows (by `key`) and values that are not."""
    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ~values.isin([0, 1])
        if bad.any():
            offenders = [f"{k}={v!r}" for k, v in zip(df.loc[bad, key], df.loc[bad, col])]
            raise ValueError(f"{source}: column {col!r} must hold 0/1 labels; got {_few(offenders)}")


def _read_csv(path: Path, string_columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    # utf-8-sig: a byte-order mark (a CSV saved by Excel) is dropped, not read into the first column's name
    return pd.read_csv(path, dtype={c: str for c in string_columns}, keep_default_na=True, encoding="utf-8-sig")


def _root(root: PathLike | None) -> Path:
    return find_data_root(root)


# ---------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------


def check_train(train: pd.DataFrame, source: str = "train table") -> pd.DataFrame:
    """Check a train label table and return a clean copy: columns `StudyInstanceUID, *TARGETS`, int labels.

    Extra columns are kept (after the label columns) so a table with e.g. a fold column passes.

    Raises:
        ValueError: a missing column, a label other than 0/1, an empty/duplicated UID or a UID with '_',
            or a study whose patient_overall is not the OR of C1..C7.
    """
    _check_columns(train, TRAIN_COLUMNS, source, allow_extra=True)
    out = train.copy().reset_index(drop=True)
    out[UID] = _check_uids(out[UID], source, unique=True)
    _check_binary(out, TARGETS, source)
    for col in TARGETS:
        out[col] = pd.to_numeric(out[col]).astype(np.int64)
    any_vertebra = out[list(VERTEBRAE)].max(axis=1)
    bad = out[any_vertebra != out["patient_overall"]]
    if len(bad):
        raise ValueError(
            f"{source}: patient_overall must equal max(C1..C7) (any fractured vertebra); "
            f"it does not for {_few(bad[UID])}"
        )
    extra = [c for c in out.columns if c not in TRAIN_COLUMNS]
    return out[[*TRAIN_COLUMNS, *extra]]


def load_train(root: PathLike | None = None, *, drop_broken: bool = False) -> pd.DataFrame:
    """Read and check `train.csv`.

    Args:
        root: data root (see `kit.paths.find_data_root`); None looks in the usual places.
        drop_broken: drop `kit.constants.BROKEN_STUDIES` (studies public top solutions exclude).

    Returns:
        DataFrame `StudyInstanceUID` (str) + TARGETS (int64 0/1), in file order, index 0..N-1.

    Raises:
        ValueError: wrong/missing/extra columns, labels other than 0/1, bad or duplicated UIDs, or
            patient_overall that disagrees with C1..C7; the message names the file and the rows.
    """
    path = _root(root) / "train.csv"
    df = _read_csv(path, [UID])
    _check_columns(df, TRAIN_COLUMNS, str(path))
    df = check_train(df, str(path))
    if drop_broken:
        broken = df[UID].isin(BROKEN_STUDIES)
        if broken.any():
            log.info("dropped %d broken studies from %s: %s", int(broken.sum()), path, _few(df.loc[broken, UID]))
        df = df[~broken].reset_index(drop=True)
    return df


def load_test(root: PathLike | None = None) -> pd.DataFrame:
    """Read and check `test.csv`: `row_id, StudyInstanceUID, prediction_type` (all str).

    Raises:
        ValueError: wrong columns, a prediction_type outside TARGETS, a row_id that is not
            `<StudyInstanceUID>_<prediction_type>`, or duplicated row_ids.
    """
    path = _root(root) / "test.csv"
    df = _read_csv(path, TEST_COLUMNS)
    _check_columns(df, TEST_COLUMNS, str(path))
    df[UID] = _check_uids(df[UID], str(path), unique=False)
    df["prediction_type"] = df["prediction_type"].astype(str).str.strip()
    bad = df[~df["prediction_type"].isin(TARGETS)]
    if len(bad):
        raise ValueError(f"{path}: prediction_type must be one of {list(TARGETS)}; got {_few(bad['prediction_type'])}")
    df["row_id"] = df["row_id"].astype(str).str.strip()
    expected = df[UID] + "_" + df["prediction_type"]
    bad = df[df["row_id"] != expected]
    if len(bad):
        raise ValueError(
            f"{path}: row_id must be <StudyInstanceUID>_<prediction_type>; rows disagree: {_few(bad['row_id'])}"
        )
    dup = df["row_id"][df["row_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{path}: duplicated row_id {_few(dup.unique())}")
    return df.reset_index(drop=True)


def load_sample_submission(root: PathLike | None = None) -> pd.DataFrame:
    """Read and check `sample_submission.csv`: `row_id` (str, each a valid row_id) and `fractured` (float).

    Raises:
        ValueError: wrong columns, a malformed row_id, or a `fractured` value that is not a number in [0, 1].
    """
    path = _root(root) / "sample_submission.csv"
    df = _read_csv(path, ["row_id"])
    _check_columns(df, SUBMISSION_COLUMNS, str(path))
    df["row_id"] = df["row_id"].astype(str).str.strip()
    for row_id in df["row_id"]:
        split_row_id(row_id)
    values = pd.to_numeric(df["fractured"], errors="coerce")
    bad = values.isna() | (values < 0) | (values > 1)
    if bad.any():
        raise ValueError(f"{path}: fractured must be a number in [0, 1]; rows {_few(df.loc[bad, 'row_id'])}")
    df["fractured"] = values.astype(np.float64)
    return df


def load_boxes(root: PathLike | None = None) -> pd.DataFrame:
    """Read and check `train_bounding_boxes.csv` (one row per slice that shows a fracture).

    Returns:
        DataFrame `StudyInstanceUID` (str), `x, y, width, height` (float64, pixels of that slice),
        `slice_number` (int64, the DICOM file-name number, >= 1).

    Raises:
        ValueError: wrong columns, non-numeric or missing values, width/height <= 0, slice_number < 1
            or not an integer.
    """
    path = _root(root) / "train_bounding_boxes.csv"
    df = _read_csv(path, [UID])
    _check_columns(df, BOX_COLUMNS, str(path))
    df[UID] = _check_uids(df[UID], str(path), unique=False)
    for col in BOX_COLUMNS[1:]:
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any():
            rows = [f"row {i} ({u})" for i, u in zip(df.index[values.isna()], df.loc[values.isna(), UID])]
            raise ValueError(f"{path}: column {col!r} must be numeric with no gaps; bad at {_few(rows)}")
        df[col] = values.astype(np.float64)
    bad = df[(df["width"] <= 0) | (df["height"] <= 0)]
    if len(bad):
        raise ValueError(f"{path}: width and height must be > 0; not so at rows {_few(bad.index)}")
    sn = df["slice_number"]
    bad = df[(sn < 1) | (sn != np.round(sn))]
    if len(bad):
        raise ValueError(f"{path}: slice_number must be an integer >= 1; got {_few(bad['slice_number'])}")
    df["slice_number"] = sn.astype(np.int64)
    return df


# ---------------------------------------------------------------------------------------------------------
# row_id helpers
# ---------------------------------------------------------------------------------------------------------


def make_row_id(uid: str, target: str) -> str:
    """`<uid>_<target>`, e.g. `make_row_id("1.2.826.0.1.3680043.10197", "C1")` -> `"1.2.826.0.1.3680043.10197_C1"`.

    Raises:
        ValueError: `target` not in TARGETS, or `uid` empty or containing '_'.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {list(TARGETS)}")
    uid = str(uid).strip()
    if not uid or "_" in uid:
        raise ValueError(f"bad StudyInstanceUID {uid!r}: must be non-empty and contain no '_'")
    return f"{uid}_{target}"


def split_row_id(row_id: str) -> tuple[str, str]:
    """Inverse of `make_row_id`: `"1.2.3_C1"` -> `("1.2.3", "C1")`.

    The target is what follows the UID's '_' (UIDs never hold one): the part after the last '_', except
    `patient_overall`, which holds an underscore itself.

    Raises:
        ValueError: no '_', an empty UID, or a target outside TARGETS.
    """
    row_id = str(row_id).strip()
    if row_id.endswith("_patient_overall"):  # the one target with an underscore of its own
        uid, sep, target = row_id[: -len("_patient_overall")], "_", "patient_overall"
    else:
        uid, sep, target = row_id.rpartition("_")
    if not sep or not uid:
        raise ValueError(f"bad row_id {row_id!r}: expected <StudyInstanceUID>_<target>, e.g. 1.2.3_C1")
    if target not in TARGETS:
        raise ValueError(f"bad row_id {row_id!r}: target {target!r} is not one of {list(TARGETS)}")
    if "_" in uid:
        raise ValueError(f"bad row_id {row_id!r}: StudyInstanceUID {uid!r} contains '_'")
    return uid, target


def wide_to_long(df_wide: pd.DataFrame, value: str = "fractured") -> pd.DataFrame:
    """One row per (study, target): `row_id, <value>`, study by study in TARGETS order.

    Args:
        df_wide: `StudyInstanceUID` + the 8 TARGETS columns (other columns ignored).
        value: name of the value column in the result (`fractured` is Kaggle's).

    Raises:
        ValueError: a missing column or a bad UID.
    """
    _check_columns(df_wide, TRAIN_COLUMNS, "wide table", allow_extra=True)
    uids = _check_uids(df_wide[UID].reset_index(drop=True), "wide table", unique=True)
    values = df_wide[list(TARGETS)].to_numpy()
    row_ids = [f"{u}_{t}" for u in uids for t in TARGETS]
    return pd.DataFrame({"row_id": row_ids, value: values.reshape(-1)})


def long_to_wide(df_long: pd.DataFrame, value: str = "fractured") -> pd.DataFrame:
    """Inverse of `wide_to_long`: `StudyInstanceUID` + TARGETS columns, studies in first-seen order.

    Raises:
        ValueError: malformed or duplicated row_ids, or a study that lacks some of the 8 targets
            (naming the study and the targets).
    """
    _check_columns(df_long, ("row_id", value), "long table", allow_extra=True)
    parts = [split_row_id(r) for r in df_long["row_id"]]
    long = pd.DataFrame({UID: [p[0] for p in parts], "target": [p[1] for p in parts],
                         value: df_long[value].to_numpy()})
    dup = long[long.duplicated([UID, "target"], keep=False)]
    if len(dup):
        raise ValueError(f"long table: duplicated row_ids {_few((dup[UID] + '_' + dup['target']).unique())}")
    uids = list(pd.unique(long[UID]))
    present = set(zip(long[UID], long["target"]))
    missing = [f"{u}_{t}" for u in uids for t in TARGETS if (u, t) not in present]
    if missing:
        raise ValueError(f"long table: every study needs all 8 targets; missing row_ids {_few(missing)}")
    wide = long.pivot(index=UID, columns="target", values=value).reindex(index=uids, columns=list(TARGETS))
    wide = wide.reset_index().rename_axis(columns=None)
    return wide[list(TRAIN_COLUMNS)]


# ---------------------------------------------------------------------------------------------------------
# Studies to predict
# ---------------------------------------------------------------------------------------------------------


def rows_for_studies(uids: Iterable[str]) -> pd.DataFrame:
    """The 8 test rows of each study: `row_id, StudyInstanceUID, prediction_type` (test.csv layout)."""
    uids = [str(u) for u in uids]
    return pd.DataFrame({
        "row_id": [make_row_id(u, t) for u in uids for t in TARGETS],
        UID: [u for u in uids for _ in TARGETS],
        "prediction_type": [t for _ in uids for t in TARGETS],
    })


SEGMENTATION_SUFFIXES = (".nii", ".nii.gz")  # the competition's files are .nii; a gzipped copy reads the same


def segmentation_path(seg_dir: PathLike, uid: str) -> Path | None:
    """`<seg_dir>/<uid>.nii` or `.nii.gz`, whichever exists; None when the study has no segmentation."""
    for suffix in SEGMENTATION_SUFFIXES:
        path = Path(seg_dir) / f"{uid}{suffix}"
        if path.is_file():
            return path
    return None


def segmented_studies(seg_dir: PathLike) -> set[str]:
    """The studies with a segmentation file (`.nii` or `.nii.gz`) in `seg_dir`; empty when it is absent."""
    seg_dir = Path(seg_dir)
    if not seg_dir.is_dir():
        return set()
    return {p.name[: -len(s)] for p in seg_dir.iterdir() for s in SEGMENTATION_SUFFIXES
            if p.name.endswith(s) and p.is_file()}


def study_folders(images_dir: PathLike) -> list[str]:
    """Sorted names of the study folders under `images_dir` (e.g. `test_images/`); [] when it is absent."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        return []
    return sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def listed_without_folder(root: PathLike, split: str = "train", failures_csv: PathLike | None = None
                          ) -> dict[str, str]:
    """Training studies that `train.csv` lists but `train_images/` has no folder for, each with the reason.

    Stages that walk the study folders (`kit prepare`, `kit crops`) record these as failures, so a study
    whose images are missing is named rather than silently left out of training and of the out-of-fold
    scores; with `failures_csv` (where the caller lists them) one warning names a few and that file.
    Only the train split: the test split's gaps are `studies_to_predict`'s (the public-data quirk).
    {} when there is no `train.csv`, for another split, or when every listed study has its folder.
    """
    root = Path(root)
    path = root / f"{split}.csv"
    if split != "train" or not path.is_file():
        return {}
    listed = pd.read_csv(path, usecols=[UID], dtype={UID: str}, encoding="utf-8-sig")[UID].str.strip().dropna().unique()
    images = root / f"{split}_images"
    have = set(study_folders(images))
    absent = {uid: f"study {uid}: listed in {path} but there is no folder {images / uid}"
              for uid in listed if uid not in have}
    if absent and failures_csv is not None:
        log.warning("%d studies of %s have no folder under %s (e.g. %s); listed in %s", len(absent), path, images,
                    ", ".join(list(absent)[:3]), failures_csv)
    return absent


def studies_to_predict(root: PathLike | None = None) -> tuple[list[str], pd.DataFrame]:
    """The test studies and the submission rows they need.

    Normally this is `test.csv` as is. The public data has a quirk (RSNA_DATA.md): `test.csv` lists three
    studies that have no folder under `test_images/`, while three other studies do. When none of the listed
    studies has a folder, the list comes from the `test_images/` folders instead, so a notebook runs in the
    editor; at scoring time `test.csv` and `test_images/` agree and `test.csv` is used. When only some listed
    studies lack a folder, `test.csv` is kept (its rows are what Kaggle scores) and a warning names the
    studies without images, which the caller must fill with a fallback prediction. Without `test.csv`, the
    folders are used.

    Returns:
        (uids, rows): study UIDs in order of first appearance, and a DataFrame
        `row_id, StudyInstanceUID, prediction_type` with 8 rows per study.

    Raises:
        FileNotFoundError: neither a usable `test.csv` nor any folder under `test_images/`.
    """
    root = _root(root)
    images = root / "test_images"
    folders = study_folders(images)
    if not (root / "test.csv").is_file():
        if not folders:
            raise FileNotFoundError(f"{root}: no test.csv and no study folders under {images}")
        log.warning("no test.csv in %s: predicting the %d folders of %s", root, len(folders), images)
        return folders, rows_for_studies(folders)
    rows = load_test(root)
    listed = list(pd.unique(rows[UID]))
    have = set(folders)
    missing = [u for u in listed if u not in have]
    if not missing:
        log.info("predicting the %d studies of test.csv", len(listed))
        return listed, rows
    if len(missing) == len(listed) and folders:
        log.warning(
            "test.csv lists %d studies with no folder under %s (%s); using the %d folders there instead (%s). "
            "This is the public-data quirk; at scoring time the two agree.",
            len(listed), images, _few(listed), len(folders), _few(folders),
        )
        return folders, rows_for_studies(folders)
    if not folders:
        raise FileNotFoundError(
            f"test.csv lists {len(listed)} studies but {images} holds no study folders; "
            f"expected folders named like {listed[0]}"
        )
    log.warning(
        "%d of the %d studies in test.csv have no folder under %s: %s; keeping test.csv's rows, "
        "those studies need a fallback prediction", len(missing), len(listed), images, _few(missing),
    )
    return listed, rows


# ---------------------------------------------------------------------------------------------------------
# Folds
# ---------------------------------------------------------------------------------------------------------


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
