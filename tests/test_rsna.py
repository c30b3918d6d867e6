"""kit.io.rsna: loaders and their checks, row_id helpers, the studies to predict, folds."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from kit.io import folds as kfolds
from kit.io import rsna
from kit.constants import BROKEN_STUDIES, TARGETS, UID_PREFIX, VERTEBRAE
from kit.evaluate.metrics import prevalence_baseline

UID = "StudyInstanceUID"

# Real label counts over the 2019 training studies (RSNA_DATA.md): positives per vertebra (the prevalences
# times 2019, rounded so they sum to the 1444 fractured vertebrae) and fractured vertebrae per study.
REAL_VERTEBRA_POSITIVES = {"C1": 145, "C2": 285, "C3": 73, "C4": 109, "C5": 161, "C6": 277, "C7": 394}
REAL_FRACTURES_PER_STUDY = {0: 1058, 1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}


def real_label_table() -> pd.DataFrame:
    """A deterministic 2019-study label table with the real per-vertebra counts and per-study distribution.

    Studies with the most fractured vertebrae are filled first, each taking the vertebrae with the most
    positives still to place (this greedy order always completes: 623*1 + 239*2 + ... + 2*6 = 1444 = the sum
    of the vertebra counts). Rows are then shuffled with a fixed seed.
    """
    remaining = np.array([REAL_VERTEBRA_POSITIVES[v] for v in VERTEBRAE])
    rows = []
    for k in sorted(REAL_FRACTURES_PER_STUDY, reverse=True):
        for _ in range(REAL_FRACTURES_PER_STUDY[k]):
            row = np.zeros(7, dtype=np.int64)
            pick = np.argsort(-remaining, kind="stable")[:k]
            row[pick] = 1
            remaining[pick] -= 1
            rows.append(row)
    assert (remaining == 0).all()
    v = np.array(rows)[np.random.default_rng(0).permutation(len(rows))]
    df = pd.DataFrame(v, columns=list(VERTEBRAE))
    df.insert(0, "patient_overall", v.max(1))
    df.insert(0, UID, [f"{UID_PREFIX}{1000 + i}" for i in range(len(df))])
    return df


@pytest.fixture(scope="module")
def real_table() -> pd.DataFrame:
    return real_label_table()


def small_train(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    v = (rng.random((n, 7)) < 0.25).astype(np.int64)
    df = pd.DataFrame(v, columns=list(VERTEBRAE))
    df.insert(0, "patient_overall", v.max(1))
    df.insert(0, UID, [f"{UID_PREFIX}{i}0" for i in range(1, n + 1)])  # trailing 0: breaks if read as float
    return df


def write_root(tmp_path, train=None, test_uids=None, folders=()):
    root = tmp_path / "data"
    root.mkdir(parents=True)
    (small_train() if train is None else train).to_csv(root / "train.csv", index=False)
    if test_uids is not None:
        rows = rsna.rows_for_studies(test_uids)
        rows.to_csv(root / "test.csv", index=False)
        rows[["row_id"]].assign(fractured=0.5).to_csv(root / "sample_submission.csv", index=False)
    for uid in folders:
        (root / "test_images" / uid).mkdir(parents=True)
        (root / "test_images" / uid / "1.dcm").write_bytes(b"")
    return root


# --------------------------------------------------------------------------------------------------------- loaders


def test_load_train_types_and_order(tmp_path):
    root = write_root(tmp_path)
    train = rsna.load_train(root)
    assert list(train.columns) == [UID, *TARGETS]
    assert train[UID].tolist() == small_train()[UID].tolist()  # "....10" stays a string, not 1.1
    assert all(train[t].dtype == np.int64 for t in TARGETS)
    assert train.shape == (12, 9)


def test_load_train_drop_broken(tmp_path):
    df = small_train(4)
    df.loc[1, UID] = BROKEN_STUDIES[0]
    root = write_root(tmp_path, train=df)
    assert len(rsna.load_train(root)) == 4
    kept = rsna.load_train(root, drop_broken=True)
    assert len(kept) == 3 and BROKEN_STUDIES[0] not in set(kept[UID])


@pytest.mark.parametrize("change, message", [
    (lambda df: df.drop(columns=["C3"]), r"missing columns \['C3'\]"),
    (lambda df: df.assign(extra=1), r"unexpected columns \['extra'\]"),
    (lambda df: df.assign(C2=df["C2"].replace(0, 2)), r"'C2' must hold 0/1 labels.*=2"),
    (lambda df: df.assign(C2=df["C2"].astype(object).where(df.index != 3, "yes")),
     r"'C2'.*1\.2\.826\.0\.1\.3680043\.40='yes'"),
    (lambda df: pd.concat([df, df.iloc[[2]]]), r"duplicated StudyInstanceUID: 1\.2\.826\.0\.1\.3680043\.30"),
    (lambda df: df.assign(StudyInstanceUID=df[UID].str.replace(".10", "_10", regex=False)), r"must not contain '_'"),
    (lambda df: df.assign(patient_overall=0), r"patient_overall must equal max\(C1..C7\)"),
])
def test_load_train_rejects(tmp_path, change, message):
    root = write_root(tmp_path, train=change(small_train()))
    with pytest.raises(ValueError, match=message) as err:
        rsna.load_train(root)
    assert "train.csv" in str(err.value)  # the file is named


def test_load_test_and_sample_submission(tmp_path):
    uids = [f"{UID_PREFIX}10197", f"{UID_PREFIX}10454"]
    root = write_root(tmp_path, test_uids=uids)
    test = rsna.load_test(root)
    assert list(test.columns) == ["row_id", UID, "prediction_type"] and len(test) == 16
    assert test.loc[0, "row_id"] == f"{uids[0]}_patient_overall"
    sub = rsna.load_sample_submission(root)
    assert sub["fractured"].dtype == np.float64 and len(sub) == 16
    for name in ("test.csv", "sample_submission.csv"):  # saved by Excel: a byte-order mark before the header
        path = root / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert rsna.load_test(root).equals(test) and rsna.load_sample_submission(root).equals(sub)
    from kit.submit.submission import _sample_row_ids

    assert _sample_row_ids(root / "sample_submission.csv") == list(sub["row_id"])

    bad = test.copy()
    bad.loc[3, "prediction_type"] = "C9"
    bad.to_csv(root / "test.csv", index=False)
    with pytest.raises(ValueError, match=r"test.csv: prediction_type must be one of .* got C9"):
        rsna.load_test(root)
    bad = test.copy()
    bad.loc[3, "row_id"] = f"{uids[1]}_C3"
    bad.to_csv(root / "test.csv", index=False)
    with pytest.raises(ValueError, match="row_id must be <StudyInstanceUID>_<prediction_type>"):
        rsna.load_test(root)


def test_load_boxes(tmp_path):
    root = write_root(tmp_path)
    boxes = pd.DataFrame({UID: [f"{UID_PREFIX}10", f"{UID_PREFIX}10"], "x": [10.5, 11.0], "y": [20.0, 21.0],
                          "width": [30.0, 31.0], "height": [40.0, 41.0], "slice_number": [133, 134]})
    boxes.to_csv(root / "train_bounding_boxes.csv", index=False)
    got = rsna.load_boxes(root)
    assert got["slice_number"].dtype == np.int64 and got[UID].iloc[0] == f"{UID_PREFIX}10"
    boxes.assign(width=[30.0, 0.0]).to_csv(root / "train_bounding_boxes.csv", index=False)
    with pytest.raises(ValueError, match="width and height must be > 0"):
        rsna.load_boxes(root)
    boxes.drop(columns=["height"]).to_csv(root / "train_bounding_boxes.csv", index=False)
    with pytest.raises(ValueError, match=r"train_bounding_boxes.csv: missing columns \['height'\]"):
        rsna.load_boxes(root)


# --------------------------------------------------------------------------------------------------------- row_id


@pytest.mark.parametrize("target", TARGETS)
def test_row_id_round_trip(target):
    uid = f"{UID_PREFIX}10197"
    row_id = rsna.make_row_id(uid, target)
    assert row_id == f"{uid}_{target}"
    assert rsna.split_row_id(row_id) == (uid, target)


@pytest.mark.parametrize("row_id, message", [
    ("1.2.3", "expected <StudyInstanceUID>_<target>"),
    ("1.2.3_C8", "target 'C8' is not one of"),
    ("_C1", "expected <StudyInstanceUID>_<target>"),
    ("1.2_3_C1", "contains '_'"),
])
def test_split_row_id_rejects(row_id, message):
    with pytest.raises(ValueError, match=message):
        rsna.split_row_id(row_id)


def test_make_row_id_rejects():
    with pytest.raises(ValueError, match="unknown target 'T1'"):
        rsna.make_row_id("1.2.3", "T1")
    with pytest.raises(ValueError, match="contain no '_'"):
        rsna.make_row_id("1.2_3", "C1")


def test_wide_long_round_trip():
    wide = small_train(5)
    long = rsna.wide_to_long(wide)
    assert list(long.columns) == ["row_id", "fractured"] and len(long) == 40
    assert long["row_id"].iloc[:8].tolist() == [f"{wide[UID].iloc[0]}_{t}" for t in TARGETS]
    assert long["fractured"].iloc[8 + 3] == wide["C3"].iloc[1]
    back = rsna.long_to_wide(long.sample(frac=1.0, random_state=0))  # any row order
    back = back.set_index(UID).loc[wide[UID]].reset_index()
    pd.testing.assert_frame_equal(back, wide, check_dtype=False)
    with pytest.raises(ValueError, match=r"missing row_ids .*_C4"):
        rsna.long_to_wide(long.drop(index=4))


# --------------------------------------------------------------------------------------------------------- test studies


def test_studies_to_predict_uses_test_csv_when_folders_agree(tmp_path):
    uids = [f"{UID_PREFIX}22327", f"{UID_PREFIX}25399"]
    root = write_root(tmp_path, test_uids=uids, folders=uids)
    got, rows = rsna.studies_to_predict(root)
    assert got == uids and len(rows) == 16


def test_studies_to_predict_public_quirk_falls_back_to_folders(tmp_path, caplog):
    listed = [f"{UID_PREFIX}10197", f"{UID_PREFIX}10454", f"{UID_PREFIX}10690"]
    folders = [f"{UID_PREFIX}22327", f"{UID_PREFIX}25399", f"{UID_PREFIX}5876"]
    root = write_root(tmp_path, test_uids=listed, folders=folders)
    with caplog.at_level(logging.WARNING, logger="kit.io.rsna"):
        got, rows = rsna.studies_to_predict(root)
    assert got == sorted(folders)
    assert list(rows.columns) == ["row_id", UID, "prediction_type"] and len(rows) == 24
    assert set(rows[UID]) == set(folders) and set(rows["prediction_type"]) == set(TARGETS)
    assert rows["row_id"].iloc[0] == f"{sorted(folders)[0]}_patient_overall"
    assert "using the 3 folders" in caplog.text and "10197" in caplog.text


def test_studies_to_predict_partial_and_missing(tmp_path, caplog):
    listed = [f"{UID_PREFIX}1", f"{UID_PREFIX}2"]
    root = write_root(tmp_path, test_uids=listed, folders=listed[:1])
    with caplog.at_level(logging.WARNING, logger="kit.io.rsna"):
        got, rows = rsna.studies_to_predict(root)
    assert got == listed and len(rows) == 16  # keep what Kaggle scores; the caller fills the gap
    assert "need a fallback" in caplog.text

    root2 = write_root(tmp_path / "b", test_uids=listed)
    with pytest.raises(FileNotFoundError, match="holds no study folders"):
        rsna.studies_to_predict(root2)

    root3 = write_root(tmp_path / "c", folders=listed)  # no test.csv at all
    got, rows = rsna.studies_to_predict(root3)
    assert got == listed and len(rows) == 16


# --------------------------------------------------------------------------------------------------------- folds


def test_real_label_table_matches_the_facts(real_table):
    assert len(real_table) == 2019
    counts = real_table[list(TARGETS)].sum()
    assert counts["patient_overall"] == 961 and counts["C3"] == 73 and counts["C7"] == 394
    per_study = real_table[list(VERTEBRAE)].sum(axis=1).value_counts().to_dict()
    assert per_study == REAL_FRACTURES_PER_STUDY
    # RSNA_DATA.md: predicting the train prevalence scores 0.5638 on the real labels. This table has the real
    # marginals but not the real co-occurrence, on which the row form depends a little.
    assert prevalence_baseline(real_table)[0] == pytest.approx(0.5638, abs=0.002)


def test_make_folds_stratifies_the_real_label_counts(real_table):
    folds = kfolds.make_folds(real_table, n_folds=5, seed=42)
    assert list(folds.columns) == [UID, "fold"]
    assert folds[UID].tolist() == real_table[UID].tolist()  # one fold per study, table order
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1  # 2019 / 5: four folds of 404, one of 403
    per_fold = real_table[list(TARGETS)].groupby(folds["fold"].to_numpy()).sum()
    even_share = real_table[list(TARGETS)].sum() / 5  # e.g. C3: 73 / 5 = 14.6 positives per fold
    ratio = per_fold / even_share
    assert (ratio >= 0.85).all().all(), f"a fold is short of positives:\n{per_fold}"
    assert per_fold["C3"].min() >= 13  # 0.85 * 14.6 = 12.4


def test_make_folds_is_deterministic_by_seed(real_table):
    a = kfolds.make_folds(real_table, seed=42)
    b = kfolds.make_folds(real_table, seed=42)
    c = kfolds.make_folds(real_table, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert (a["fold"] != c["fold"]).any()
    with pytest.raises(ValueError, match=r"n_folds must be in \[2, 12\]"):
        kfolds.make_folds(small_train(12), n_folds=13)


def test_save_load_folds_round_trip(tmp_path):
    folds = kfolds.make_folds(small_train(12), n_folds=3, seed=0)
    path = kfolds.save_folds(folds, tmp_path / "sub" / "folds.csv")
    pd.testing.assert_frame_equal(kfolds.load_folds(path), folds)
    folds.assign(fold=folds["fold"] + 1).to_csv(path, index=False)  # folds 1..3, no fold 0
    with pytest.raises(ValueError, match=r"folds must be 0..K-1 with none empty; found \[1, 2, 3\]"):
        kfolds.load_folds(path)


def test_folds_for_makes_once_then_rereads(tmp_path):
    train = small_train(12)
    path = tmp_path / "folds.csv"
    first = kfolds.folds_for(train, path=path, n_folds=3, seed=0)
    assert path.is_file()
    # Edit the file: a second call must return the file's content, not a fresh split.
    edited = first.assign(fold=(first["fold"] + 1) % 3)
    edited.to_csv(path, index=False)
    again = kfolds.folds_for(train.iloc[::-1], path=path, n_folds=3, seed=0)  # rows follow the table
    assert again[UID].tolist() == train[UID].tolist()[::-1]
    assert again.set_index(UID)["fold"].to_dict() == edited.set_index(UID)["fold"].to_dict()

    with pytest.raises(ValueError, match="holds 3 folds but n_folds=5"):
        kfolds.folds_for(train, path=path, n_folds=5)
    bigger = pd.concat([train, small_train(13).iloc[[12]]], ignore_index=True)
    with pytest.raises(ValueError, match=r"1 train studies have no fold \(1\.2\.826\.0\.1\.3680043\.130\)"):
        kfolds.folds_for(bigger, path=path, n_folds=3)
    with pytest.raises(ValueError, match="2 studies in the CSV are not in the train table"):
        kfolds.folds_for(train.iloc[2:], path=path, n_folds=3)


def test_folds_for_accepts_dropped_broken_studies(tmp_path):
    train = small_train(12)
    train.loc[0, UID] = BROKEN_STUDIES[0]
    root = write_root(tmp_path, train=train)
    path = tmp_path / "folds.csv"
    full = kfolds.folds_for(root, path=path, n_folds=3)
    assert len(full) == 12
    kept = kfolds.folds_for(rsna.load_train(root, drop_broken=True), path=path, n_folds=3)
    assert len(kept) == 11 and BROKEN_STUDIES[0] not in set(kept[UID])


def strata_table(n: int = 200, n_seg: int = 40, n_boxes: int = 30, seed: int = 0) -> pd.DataFrame:
    """A label table with realistic vertebra prevalences, `n_seg` segmented studies drawn at random and
    `n_boxes` boxed studies drawn among the fractured ones (boxes mark fractures)."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195])  # RSNA_DATA.md, C1..C7
    v = (rng.random((n, 7)) < prevalence).astype(np.int64)
    df = pd.DataFrame(v, columns=list(VERTEBRAE))
    df.insert(0, "patient_overall", v.max(1))
    df.insert(0, UID, [f"{UID_PREFIX}{5000 + i}" for i in range(n)])
    df["has_segmentation"] = 0
    df.loc[rng.choice(n, n_seg, replace=False), "has_segmentation"] = 1
    df["has_boxes"] = 0
    df.loc[rng.choice(np.nonzero(v.max(1))[0], n_boxes, replace=False), "has_boxes"] = 1
    return df


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_folds_balances_segmented_and_boxed_studies(seed):
    table = strata_table(seed=seed)  # 200 studies, 40 segmented, 30 with boxes
    folds = kfolds.make_folds(table, n_folds=5, seed=seed)
    assert list(folds.columns) == [UID, "fold", "has_segmentation", "has_boxes"]
    assert folds["has_segmentation"].tolist() == table["has_segmentation"].tolist()
    by_fold = table.groupby(folds["fold"].to_numpy())
    assert by_fold.size().tolist() == [40] * 5
    assert (by_fold["has_segmentation"].sum() - 8).abs().max() <= 1  # 40 / 5 = 8 +- 1 segmented a fold
    assert (by_fold["has_boxes"].sum() - 6).abs().max() <= 1  # 30 / 5 = 6 +- 1 boxed
    # The targets stay stratified: every fold within 2 positives of its even share of every label.
    per_fold = by_fold[list(TARGETS)].sum()
    share = table[list(TARGETS)].sum() / 5
    assert ((per_fold - share).abs() <= 2).all().all(), f"targets off their share:\n{per_fold}\nshare {share}"


def test_make_folds_strata_arrays_equal_columns_and_are_checked():
    table = strata_table(seed=3)
    from_columns = kfolds.make_folds(table, seed=11)
    plain = table.drop(columns=["has_segmentation", "has_boxes"])
    from_arrays = kfolds.make_folds(plain, seed=11, has_segmentation=table["has_segmentation"].to_numpy(),
                                  has_boxes=table["has_boxes"].tolist())
    pd.testing.assert_frame_equal(from_columns, from_arrays)
    pd.testing.assert_frame_equal(from_columns, kfolds.make_folds(table, seed=11))  # same seed, same folds
    assert (kfolds.make_folds(table, seed=12)["fold"] != from_columns["fold"]).any()
    only_seg = kfolds.make_folds(plain, seed=11, has_segmentation=table["has_segmentation"])
    assert list(only_seg.columns) == [UID, "fold", "has_segmentation"]
    with pytest.raises(ValueError, match=r"has_boxes must hold one 0/1 value per study \(200\); got shape \(3,\)"):
        kfolds.make_folds(plain, has_boxes=[0, 1, 0])
    bad = table.assign(has_segmentation=table["has_segmentation"].replace(1, 2))
    with pytest.raises(ValueError, match=r"has_segmentation must hold 0/1 per study; got 1\.2\.826\.[\d.]+=2, "):
        kfolds.make_folds(bad)


def test_folds_csv_records_strata_and_checks_them(tmp_path):
    folds = kfolds.make_folds(strata_table(seed=4), n_folds=4, seed=0)
    path = kfolds.save_folds(folds, tmp_path / "folds.csv")
    assert path.read_text().splitlines()[0] == "StudyInstanceUID,fold,has_segmentation,has_boxes"
    pd.testing.assert_frame_equal(kfolds.load_folds(path), folds)
    folds.assign(has_boxes=folds["has_boxes"] * 3).to_csv(path, index=False)
    with pytest.raises(ValueError, match="column 'has_boxes' must hold 0/1 labels"):
        kfolds.load_folds(path)


# --------------------------------------------------------------------------------------------------------- synthetic data


def test_loaders_read_the_synthetic_dataset(request):
    pytest.importorskip("kit.synthetic")
    root = request.getfixturevalue("synthetic_root")  # 8 train studies, 2 test studies
    train = rsna.load_train(root)
    assert len(train) == 8 and train[UID].str.startswith(UID_PREFIX).all()
    rsna.load_boxes(root)
    uids, rows = rsna.studies_to_predict(root)
    assert len(uids) == 2 and len(rows) == 16
    assert set(kfolds.make_folds(train, n_folds=2)["fold"]) == {0, 1}


def test_study_strata_read_the_synthetic_root(request):
    root = request.getfixturevalue("synthetic_root")  # 8 train studies, 4 with a segmentation
    train = rsna.load_train(root)
    strata = kfolds.study_strata(root, train[UID])
    segmented = {p.name[: -len(".nii")] for p in (root / "segmentations").glob("*.nii")}
    boxed = set(rsna.load_boxes(root)[UID])
    assert strata[UID].tolist() == train[UID].tolist()
    assert strata["has_segmentation"].tolist() == [int(u in segmented) for u in train[UID]]
    assert strata["has_boxes"].tolist() == [int(u in boxed) for u in train[UID]]
    assert strata["has_segmentation"].sum() == 4 and strata["has_boxes"].sum() == len(boxed) >= 1


def test_default_folds_of_the_synthetic_root_spread_the_segmented_studies(request, tmp_path):
    root = request.getfixturevalue("synthetic_root")
    path = tmp_path / "folds.csv"
    folds = kfolds.folds_for(root, path=path)  # the defaults: 5 folds, seed 42
    segmented = folds.loc[folds["has_segmentation"] == 1, "fold"]
    assert len(segmented) == 4
    # 4 segmented studies over 5 folds: at most one a fold (stratified on targets alone, two shared a fold).
    assert segmented.value_counts().max() == 1 and segmented.nunique() == 4
    assert list(pd.read_csv(path).columns) == [UID, "fold", "has_segmentation", "has_boxes"]
    pd.testing.assert_frame_equal(kfolds.folds_for(root, path=path), folds)  # re-read: same table
