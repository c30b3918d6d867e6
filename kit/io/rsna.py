"""Competition tables: loaders with checks, row_id helpers and the studies to predict (folds: `kit.io.folds`).

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
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import BROKEN_STUDIES, TARGETS, UID_PREFIX, VERTEBRAE
from ..paths import find_data_root
from ..paths import PathLike

log = logging.getLogger("kit.io.rsna")

UID = "StudyInstanceUID"
TRAIN_COLUMNS = (UID, *TARGETS)
TEST_COLUMNS = ("row_id", UID, "prediction_type")
SUBMISSION_COLUMNS = ("row_id", "fractured")
BOX_COLUMNS = (UID, "x", "y", "width", "height", "slice_number")

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


