"""kit.synthetic: determinism, anatomy order, label statistics, fracture kinds and look-alikes, DICOM / NIfTI round
trips, the competition layout and the answers beside it.

Small studies (32-64 px, forced slice counts) keep the whole file to a few seconds of CPU.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import dicomsdl
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from libjpeg import decode as libjpeg_decode

from kit.constants import TRAIN_PREVALENCE, UID_PREFIX, VERTEBRAE
from kit.synthetic import (
    ANSWER_FILES,
    DATASET_TRANSFER_SYNTAXES,
    EXACT_ENCODINGS,
    FRACTURE_KINDS,
    HU_RANGE,
    LEVEL_LABELS,
    LOOKALIKE_KINDS,
    PUBLIC_TEST_CSV_UIDS,
    TRANSFER_SYNTAXES,
    VISIBLE_HU,
    encode_jpeg_lossless,
    load_answers,
    make_dataset,
    make_study,
    sample_fracture_kind,
    sample_fractures,
    sample_lookalikes,
    segmentation_affine,
    write_segmentation,
    write_study,
)

TARGETS = ["patient_overall", *VERTEBRAE]


# ----------------------------------------------------------------------------------------------- helpers
def stored_to_hu(raw: np.ndarray, bits_stored: int, signed: bool, intercept: float) -> np.ndarray:
    """The DICOM sign rule, written independently of the generator: low bits, two's complement if signed."""
    values = raw.astype(np.int64) % (1 << bits_stored)
    if signed:
        values = np.where(values >= 1 << (bits_stored - 1), values - (1 << bits_stored), values)
    return values + intercept


def read_with_pydicom(paths: list[Path]) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU volume ordered superior first (by ImagePositionPatient z), through pydicom's decoders."""
    items = []
    for path in paths:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.int64) * int(ds.RescaleSlope) + int(float(ds.RescaleIntercept))
        items.append((float(ds.ImagePositionPatient[2]), hu, ds))
    items.sort(key=lambda t: -t[0])
    return np.stack([t[1] for t in items]), [t[2] for t in items]


def read_with_dicomsdl(paths: list[Path]) -> np.ndarray:
    items = []
    for path in paths:
        ds = dicomsdl.open(str(path))
        raw = ds.pixelData(storedvalue=True)
        hu = stored_to_hu(raw, ds.BitsStored, ds.PixelRepresentation == 1, float(ds.RescaleIntercept))
        items.append((float(ds.ImagePositionPatient[2]), hu))
    items.sort(key=lambda t: -t[0])
    return np.stack([t[1] for t in items])


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "summary.json"):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny():
    """A small study with two forced clefts."""
    return make_study(11, size=40, n_slices=16, fractures={"C2": 1, "C6": 1}, difficulty="easy")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = make_dataset(root, n_train=8, n_test=2, size=48, seed=3, n_slices=48, workers=2, progress=False)
    return root, summary


# ----------------------------------------------------------------------------------------------- studies
def test_make_study_is_deterministic_by_seed_and_has_the_promised_shapes():
    a = make_study(7, size=48, n_slices=40)
    b = make_study(7, size=48, n_slices=40)
    c = make_study(8, size=48, n_slices=40)
    assert a.hu.shape == a.labels.shape == (40, 48, 48)
    assert a.hu.dtype == np.int16 and a.labels.dtype == np.uint8
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert a.boxes == b.boxes and a.fractures == b.fractures and a.spacing == b.spacing and a.origin == b.origin
    assert not np.array_equal(a.hu, c.hu)
    assert a.uid.startswith(UID_PREFIX) and a.uid != c.uid
    assert HU_RANGE[0] <= a.hu.min() and a.hu.max() <= HU_RANGE[1]
    assert set(np.unique(a.labels)) <= set(range(10))
    dz, dy, dx = a.spacing
    assert dy == dx and 120.0 <= dx * 48 <= 160.0  # in-plane field of view 120-160 mm whatever the size
    assert np.allclose(np.diff(a.slice_z()), -dz)


def test_default_slice_spacing_and_count_follow_the_drawn_field_of_view():
    for seed in range(3):
        s = make_study(seed, size=32)
        assert s.spacing[0] in (0.5, 0.625, 0.7, 0.75, 0.8, 1.0)
        extent = (s.n_slices - 1) * s.spacing[0]
        assert 120.0 < extent < 215.0, extent  # C1 (or part of it) down to C7..T2
        assert s.n_slices == pytest.approx((s.meta["s_bottom"] - s.meta["s_top"]) / s.spacing[0] + 1, abs=1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vertebrae_are_present_bony_and_in_head_to_feet_order(seed):
    study = make_study(seed, size=48, n_slices=120)
    present = [lv for lv, value in LEVEL_LABELS.items() if (study.labels == value).any()]
    assert present[:7] == list(VERTEBRAE)  # C1 may be cut at the top, never entirely
    assert present == list(LEVEL_LABELS)[: len(present)]  # the field of view may stop above T1 or T2
    z = np.arange(study.n_slices)[:, None, None]
    mean_z = [float(np.broadcast_to(z, study.labels.shape)[study.labels == LEVEL_LABELS[lv]].mean())
              for lv in present]
    assert mean_z == sorted(mean_z) and len(set(mean_z)) == len(mean_z)
    # the dens of C2 rises into the ring of C1
    c1_z = np.nonzero((study.labels == 1).any(axis=(1, 2)))[0]
    c2_z = np.nonzero((study.labels == 2).any(axis=(1, 2)))[0]
    assert c2_z.min() < c1_z.max()
    # labelled voxels are bone (cortex and cancellous), the rest of the body is mostly soft tissue and air
    bone = study.hu[study.labels > 0]
    assert np.median(bone) > 200 and np.percentile(bone, 90) > 600
    assert np.median(study.hu[study.labels == 0]) < 100


def test_fracture_label_statistics_match_the_competition():
    rng = np.random.default_rng(0)
    n = 2000
    draws = pd.DataFrame([sample_fractures(rng) for _ in range(n)])
    overall = (draws[list(VERTEBRAE)].sum(axis=1) > 0).mean()
    expected = dict(zip(TARGETS, TRAIN_PREVALENCE))
    observed = {"patient_overall": overall, **draws.mean().to_dict()}
    for target in TARGETS:  # 4 binomial standard errors: a false alarm about once in 16,000 runs per target
        p = expected[target]
        assert abs(observed[target] - p) <= 4 * np.sqrt(p * (1 - p) / n), (target, observed[target], p)
    counts = draws.sum(axis=1).value_counts(normalize=True)
    assert abs(counts[1] - 623 / 2019) < 0.03 and abs(counts[2] - 239 / 2019) < 0.02  # multiple fractures happen


def test_forced_fractures_give_boxes_on_the_fractured_vertebrae_only(tiny):
    assert tiny.fractures == {v: int(v in ("C2", "C6")) for v in VERTEBRAE} and tiny.patient_overall == 1
    assert {b["vertebra"] for b in tiny.boxes} == {"C2", "C6"}
    z, h, w = tiny.hu.shape
    for box in tiny.boxes:
        assert 0 <= box["x"] and box["x"] + box["width"] <= w and box["width"] > 0
        assert 0 <= box["y"] and box["y"] + box["height"] <= h and box["height"] > 0
        assert 0 <= box["slice_index"] < z
        rows = slice(int(box["y"]), int(np.ceil(box["y"] + box["height"])))
        cols = slice(int(box["x"]), int(np.ceil(box["x"] + box["width"])))
        assert (tiny.labels[box["slice_index"], rows, cols] == LEVEL_LABELS[box["vertebra"]]).any()
    healthy = make_study(11, size=40, n_slices=16, fractures={}, difficulty="easy")
    assert healthy.boxes == [] and healthy.patient_overall == 0


def test_a_fracture_is_a_thin_low_density_cleft_in_the_bone():
    """Same anatomy with and without the C5 cleft (fracture plans have their own stream): only C5 changes, a
    handful of voxels drop from bone to soft-tissue density, and every changed slice is boxed."""
    seed = 21
    healthy = make_study(seed, size=64, n_slices=160, fractures={}, noise_hu=0.0)
    broken = make_study(seed, size=64, n_slices=160, fractures={"C5": 1}, noise_hu=0.0, fracture_kinds={"C5": "cleft"})
    c5 = (healthy.labels == 5) | (broken.labels == 5)
    diff = np.abs(broken.hu.astype(int) - healthy.hu.astype(int)) > 100
    assert diff.any() and not (diff & ~ndilate(c5)).any()
    dropped = (healthy.hu.astype(int) - broken.hu.astype(int) > 100) & c5
    assert 0 < dropped.sum() < 0.1 * (healthy.labels == 5).sum()
    boxed = {b["slice_index"] for b in broken.boxes}
    assert set(np.nonzero(dropped.any(axis=(1, 2)))[0]) <= boxed | {min(boxed) - 1, max(boxed) + 1}


def ndilate(mask: np.ndarray, r: int = 2) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=r)


# ----------------------------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_files_decode_to_the_study_hu_for_every_header_variant(tmp_path, tiny, syntax):
    for (intercept, signed, bits) in EXACT_ENCODINGS:
        for head_first in (True, False):
            folder = tmp_path / f"{intercept}_{signed}_{bits}_{head_first}"
            paths = write_study(tiny, folder, transfer_syntax=syntax, head_first=head_first, intercept=intercept,
                                bits_stored=bits, signed=signed, modality=head_first)
            assert [p.name for p in paths] == [f"{n}.dcm" for n in range(1, tiny.n_slices + 1)]
            hu, headers = read_with_pydicom(paths)
            assert np.array_equal(hu, tiny.hu), (syntax, intercept, signed, bits, head_first)
            assert np.array_equal(read_with_dicomsdl(paths), tiny.hu)
            numbers = [int(ds.InstanceNumber) for ds in headers]  # superior first
            assert numbers == (list(range(1, tiny.n_slices + 1)) if head_first
                               else list(range(tiny.n_slices, 0, -1)))
            ds = headers[0]
            assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, bits, bits - 1)
            assert ds.PixelRepresentation == int(signed) and float(ds.RescaleIntercept) == intercept
            assert float(ds.RescaleSlope) == 1.0 and ds.StudyInstanceUID == tiny.uid
            assert ("Modality" in ds) == head_first
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.PixelSpacing] == [tiny.spacing[1], tiny.spacing[2]]
            assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(list(tiny.origin), abs=1e-6)
            assert len({h.SOPInstanceUID for h in headers}) == tiny.n_slices


@pytest.mark.parametrize("syntax", ["implicit", "big-endian", "jpeg-lossless"])
def test_fast_series_encoder_writes_the_bytes_pydicom_dcmwrite_would(tmp_path, tiny, syntax, monkeypatch):
    import io

    import kit.synthetic.dicom_writer as synthetic

    encode, same = synthetic._SeriesEncoder.encode, []

    def checked(self, elements, sop_uid):
        data = encode(self, elements, sop_uid)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, self.dataset(elements, sop_uid), enforce_file_format=True)
        same.append(buffer.getvalue() == data)
        return data

    monkeypatch.setattr(synthetic._SeriesEncoder, "encode", checked)
    write_study(tiny, tmp_path, transfer_syntax=syntax, modality=False, signed=False, bits_stored=12)
    assert len(same) == tiny.n_slices and all(same)


def test_signed_12_bit_values_leave_the_upper_bits_to_the_reader(tmp_path, tiny):
    paths = write_study(tiny, tmp_path, transfer_syntax="explicit", intercept=0, bits_stored=12, signed=True)
    ds = pydicom.dcmread(paths[0])
    raw = np.frombuffer(ds.PixelData, "<u2")
    assert raw.max() < 4096  # not sign-extended: -1000 HU is stored as 0xC18, not 0xFC18
    assert (raw >= 2048).any() and ds.pixel_array.min() < 0


def test_unrepresentable_hu_are_clipped_with_a_warning(tmp_path, tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="kit.synthetic"):
        paths = write_study(tiny, tmp_path, intercept=-1024, bits_stored=12, signed=True)
    assert "clipped" in caplog.text
    hu, _ = read_with_pydicom(paths)
    assert hu.max() == 1023 and np.array_equal(hu, np.minimum(tiny.hu, 1023))


def test_unknown_transfer_syntax_lists_the_choices(tmp_path, tiny):
    with pytest.raises(ValueError, match="jpeg-lossless"):
        write_study(tiny, tmp_path, transfer_syntax="jpeg-xl")


# ----------------------------------------------------------------------------------------------- JPEG
def jpeg_cases():
    rng = np.random.default_rng(5)
    return {
        "constant": (np.full((9, 7), 4095, np.uint16), 12),
        "single pixel": (np.array([[5]], np.uint16), 8),
        "random 16 bit": (rng.integers(0, 1 << 16, (33, 47)).astype(np.uint16), 16),
        "random 12 bit": (rng.integers(0, 1 << 12, (40, 64)).astype(np.uint16), 12),
        "category 16": (np.tile(np.array([0, 32768, 65535, 0, 1, 65535], np.uint16), (5, 3)), 16),
        "ct slice": ((make_study(2, size=64, n_slices=3).hu[1].astype(np.int32) + 1024).astype(np.uint16), 16),
    }


@pytest.mark.parametrize("name", list(jpeg_cases()))
def test_jpeg_lossless_encoder_round_trips_through_libjpeg(name):
    pixels, precision = jpeg_cases()[name]
    data = encode_jpeg_lossless(pixels, precision)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9" and b"\xff\xc3" in data and b"\xff\xc4" in data
    scan = data[data.index(b"\xff\xda") + 10: -2]
    ff = np.flatnonzero(np.frombuffer(scan, np.uint8) == 0xFF)
    assert all(scan[i + 1] == 0 for i in ff)  # every 0xFF in the entropy-coded data is stuffed
    decoded = libjpeg_decode(data)
    assert decoded.shape == pixels.shape and np.array_equal(decoded.astype(np.int64), pixels.astype(np.int64))


def test_jpeg_lossless_files_decode_bit_exactly_with_pydicom_and_dicomsdl(tmp_path):
    study = make_study(4, size=96, n_slices=4)
    for signed, bits in ((True, 16), (False, 12), (True, 12)):
        folder = tmp_path / f"{signed}{bits}"
        intercept = 0 if signed else -1024
        paths = write_study(study, folder, transfer_syntax="jpeg-lossless", intercept=intercept, bits_stored=bits,
                            signed=signed)
        ds = pydicom.dcmread(paths[0])
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70" and ds["PixelData"].VR == "OB"
        stored = dicomsdl.open(str(paths[0])).pixelData(storedvalue=True)
        expected = study.hu[0].astype(np.int64) - intercept
        assert np.array_equal(stored_to_hu(stored, bits, signed, 0), expected)
        assert np.array_equal(ds.pixel_array.astype(np.int64), expected)


def test_jpeg_lossless_encoder_rejects_out_of_range_samples():
    with pytest.raises(ValueError, match="precision 12"):
        encode_jpeg_lossless(np.full((4, 4), 5000, np.uint16), 12)


# ----------------------------------------------------------------------------------------------- NIfTI
@pytest.mark.parametrize("head_first", [True, False])
def test_segmentation_follows_the_rsna_layout_and_its_affine_matches_the_dicom_geometry(tmp_path, head_first):
    study = make_study(5, size=40, n_slices=30)
    paths = write_study(study, tmp_path / "dcm", head_first=head_first)
    nii = write_segmentation(study, tmp_path / f"{study.uid}.nii", head_first=head_first)
    image = nib.load(nii)
    raw = np.asarray(image.dataobj)
    assert raw.shape == (40, 40, 30) and raw.dtype == np.uint8
    assert np.allclose(image.affine, segmentation_affine(study, head_first))
    assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 1
    # the public notebooks' recipe: (H, W, Z) in InstanceNumber order
    hwz = raw[:, ::-1, ::-1].transpose(1, 0, 2)
    by_number = {int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber): i for i, p in enumerate(paths)}
    z_of_number = {n: float(pydicom.dcmread(paths[i], stop_before_pixels=True).ImagePositionPatient[2])
                   for n, i in by_number.items()}
    superior_first = sorted(z_of_number, key=lambda n: -z_of_number[n])
    assert np.array_equal(hwz.transpose(2, 0, 1)[[n - 1 for n in superior_first]], study.labels)
    # the affine: every raw voxel lands, through RAS -> LPS and the DICOM geometry, on its own label
    ii, jj, kk = np.meshgrid(*map(np.arange, raw.shape), indexing="ij")
    ras = image.affine @ np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)])
    x, y, z = -ras[0], -ras[1], ras[2]
    dz, dy, dx = study.spacing
    col = (x - study.origin[0]) / dx
    row = (y - study.origin[1]) / dy
    sl = (study.origin[2] - z) / dz
    for idx in (col, row, sl):
        assert np.abs(idx - np.rint(idx)).max() < 1e-4
    got = study.labels[np.rint(sl).astype(int), np.rint(row).astype(int), np.rint(col).astype(int)]
    assert np.array_equal(got.reshape(raw.shape), raw)


def test_kit_reader_recovers_hu_and_mask_exactly(tmp_path):
    dicom = pytest.importorskip("kit.io.dicom")
    study = make_study(6, size=40, n_slices=24, fractures={"C1": 1})
    for head_first, syntax in ((True, "jpeg-lossless"), (False, "implicit")):
        folder = tmp_path / syntax
        write_study(study, folder, transfer_syntax=syntax, head_first=head_first, intercept=0, bits_stored=12,
                    modality=False)
        nii = write_segmentation(study, tmp_path / f"{syntax}.nii", head_first=head_first)
        series = dicom.read_series(folder, workers=1)
        assert np.array_equal(series.hu, study.hu)
        assert np.array_equal(dicom.read_mask(nii, series), study.labels)


# ----------------------------------------------------------------------------------------------- dataset
def test_dataset_tables_have_the_competition_columns_and_rows(dataset):
    root, summary = dataset
    train = pd.read_csv(root / "train.csv")
    assert list(train.columns) == ["StudyInstanceUID", *TARGETS] and len(train) == 8
    assert all(train[t].dtype == np.int64 and set(train[t]) <= {0, 1} for t in TARGETS)
    assert (train["patient_overall"] == train[list(VERTEBRAE)].max(axis=1)).all()
    assert train["StudyInstanceUID"].str.startswith(UID_PREFIX).all() and train["StudyInstanceUID"].is_unique
    assert summary["prevalence"] == {t: round(float(train[t].mean()), 4) for t in TARGETS}
    for uid in train["StudyInstanceUID"]:
        files = sorted((root / "train_images" / uid).iterdir())
        assert len(files) == 48 and {f.name for f in files} == {f"{n}.dcm" for n in range(1, 49)}

    boxes = pd.read_csv(root / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert boxes["slice_number"].dtype == np.int64 and boxes["x"].dtype == np.float64
    positive = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
    assert len(boxes) > 0 and set(boxes["StudyInstanceUID"]) <= positive
    assert summary["n_bbox_studies"] == round(0.5 * len(positive))
    for row in boxes.itertuples():
        path = root / "train_images" / row.StudyInstanceUID / f"{row.slice_number}.dcm"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert int(ds.InstanceNumber) == row.slice_number
        assert 0 <= row.x and row.x + row.width <= ds.Columns and 0 <= row.y and row.y + row.height <= ds.Rows

    test = pd.read_csv(root / "test.csv")
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"] and len(test) == 2 * 8
    assert (test["row_id"] == test["StudyInstanceUID"] + "_" + test["prediction_type"]).all()
    assert all(list(g) == [*VERTEBRAE, "patient_overall"] for _, g in test.groupby("StudyInstanceUID")["prediction_type"])
    assert set(test["StudyInstanceUID"]) == {p.name for p in (root / "test_images").iterdir()}
    assert not set(test["StudyInstanceUID"]) & set(train["StudyInstanceUID"])
    sub = pd.read_csv(root / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", "fractured"] and (sub["row_id"] == test["row_id"]).all()
    assert (sub["fractured"] == 0.5).all()

    segs = sorted((root / "segmentations").glob("*.nii"))
    assert len(segs) == summary["n_segmentations"] == 4
    assert {p.stem for p in segs} <= set(train["StudyInstanceUID"])
    assert summary["n_train"] == 8 and summary["n_test"] == 2 and summary["n_slices"] == 10 * 48


def test_dataset_headers_vary_across_studies(dataset):
    root, _ = dataset
    seen = {k: set() for k in ("syntax", "intercept", "bits", "sign", "modality", "head_first")}
    for folder in sorted((root / "train_images").iterdir()) + sorted((root / "test_images").iterdir()):
        first, second = (pydicom.dcmread(folder / f"{n}.dcm", stop_before_pixels=True) for n in (1, 2))
        seen["syntax"].add(first.file_meta.TransferSyntaxUID)
        seen["intercept"].add(float(first.RescaleIntercept))
        seen["bits"].add(int(first.BitsStored))
        seen["sign"].add(int(first.PixelRepresentation))
        seen["modality"].add("Modality" in first)
        seen["head_first"].add(float(first.ImagePositionPatient[2]) > float(second.ImagePositionPatient[2]))
    assert seen == {"syntax": {TRANSFER_SYNTAXES[t] for t in DATASET_TRANSFER_SYNTAXES},
                    "intercept": {-1024.0, 0.0}, "bits": {12, 16}, "sign": {0, 1}, "modality": {True, False},
                    "head_first": {True, False}}
    studies = pd.read_csv(Path(str(root) + "_answers") / "studies.csv")
    assert len(studies) == 10 and set(studies["split"]) == {"train", "test"}


def test_dataset_is_deterministic_by_seed_whatever_the_workers(tmp_path):
    kw = dict(n_train=3, n_test=1, size=32, n_slices=10, progress=False)
    make_dataset(tmp_path / "a", seed=9, workers=1, **kw)
    make_dataset(tmp_path / "b", seed=9, workers=2, **kw)
    make_dataset(tmp_path / "c", seed=10, workers=1, **kw)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    a, c = (pd.read_csv(tmp_path / d / "train.csv") for d in "ac")
    assert not a["StudyInstanceUID"].equals(c["StudyInstanceUID"])


def test_test_csv_mismatch_lists_studies_without_folders(tmp_path):
    summary = make_dataset(tmp_path, n_train=1, n_test=3, size=32, n_slices=8, seed=1, workers=1, progress=False,
                           test_csv_mismatch=True)
    test = pd.read_csv(tmp_path / "test.csv")
    folders = {p.name for p in (tmp_path / "test_images").iterdir()}
    assert len(folders) == 3 and summary["test_csv_mismatch"] is True
    assert list(test["StudyInstanceUID"].unique()) == list(PUBLIC_TEST_CSV_UIDS) and len(test) == 24
    assert not set(test["StudyInstanceUID"]) & folders
    assert (pd.read_csv(tmp_path / "sample_submission.csv")["row_id"] == test["row_id"]).all()


# ----------------------------------------------------------------------------------------------- fracture kinds
def test_fracture_kind_mix_and_lookalike_rate_over_2000_draws():
    """The realistic mix: at least 30 % of fractures hairline, every kind present, no compression of C1/C2; at
    least 30 % of studies with a look-alike. The easy mix: clefts only, no look-alikes."""
    rng = np.random.default_rng(1)
    kinds = [(v, sample_fracture_kind(rng, v)) for _ in range(2000) for v, y in sample_fractures(rng).items() if y]
    share = pd.Series([k for _, k in kinds]).value_counts(normalize=True)
    assert len(kinds) > 1200 and set(share.index) == set(FRACTURE_KINDS)  # 0.715 fractures a study on average
    assert share["hairline"] >= 0.30, share.to_dict()
    assert not [v for v, k in kinds if k == "compression" and v in ("C1", "C2")]
    looks = [sample_lookalikes(rng) for _ in range(2000)]
    assert np.mean([bool(x) for x in looks]) >= 0.30
    assert {k for x in looks for k in x} == set(LOOKALIKE_KINDS)
    assert sample_fracture_kind(rng, "C5", "easy") == "cleft" and sample_lookalikes(rng, "easy") == []
    with pytest.raises(ValueError, match="realistic"):
        sample_lookalikes(rng, "hard")


def kind_pair(kind: str, seed: int = 21, vertebra: str = "C5", **kw):
    """(intact, fractured) studies of one seed without noise: the fracture is the only difference."""
    args = dict(size=64, n_slices=160, noise_hu=0.0, lookalikes=[], **kw)
    intact = make_study(seed, fractures={}, **args)
    broken = make_study(seed, fractures={vertebra: 1}, fracture_kinds={vertebra: kind}, **args)
    return intact, broken


@pytest.mark.parametrize("seed", [21, 5])
def test_a_hairline_changes_fewer_voxels_and_less_hu_than_a_cleft(seed):
    """Same seed, same fracture plane: the hairline (partial volume, <= 1 voxel) changes fewer voxels and far
    fewer HU than the 1-2 mm cleft; its strongest voxel-wise drop in the cancellous core is tens of HU."""
    intact, hair = kind_pair("hairline", seed)
    _, cleft = kind_pair("cleft", seed)
    d_hair = np.abs(hair.hu.astype(int) - intact.hu.astype(int))
    d_cleft = np.abs(cleft.hu.astype(int) - intact.hu.astype(int))
    assert 0 < (d_hair > 20).sum() < (d_cleft > 20).sum()
    assert d_hair.sum() < 0.7 * d_cleft.sum()
    (h,), (c,) = hair.fracture_sites, cleft.fracture_sites
    assert (h["kind"], h["subtlety"], c["kind"], c["subtlety"]) == ("hairline", "subtle", "cleft", "moderate")
    assert h["voxels"] <= c["voxels"] and 0.2 <= h["fraction"] <= 0.5 and h["gap_mm"] == 0 and c["gap_mm"] >= 1.0
    assert np.array_equal(hair.labels, intact.labels)  # a crack moves no bone


@pytest.mark.parametrize("kind", FRACTURE_KINDS)
def test_boxes_cover_the_voxels_each_fracture_kind_changes(kind):
    """Every voxel that differs visibly from the intact study lies in a box of its slice or a neighbour
    (blur spreads a change by a slice), each box holds a change, and nothing changes outside C5's reach."""
    intact, broken = kind_pair(kind)
    delta = np.abs(broken.hu.astype(int) - intact.hu.astype(int))
    assert broken.boxes and {b["vertebra"] for b in broken.boxes} == {"C5"}
    covered = np.zeros(delta.shape, bool)
    for b in broken.boxes:
        rows = slice(int(b["y"]), int(np.ceil(b["y"] + b["height"])))
        cols = slice(int(b["x"]), int(np.ceil(b["x"] + b["width"])))
        z = b["slice_index"]
        assert delta[z, rows, cols].max() >= VISIBLE_HU / 2, (kind, b)
        covered[max(z - 1, 0): z + 2, rows, cols] = True
    visible = delta >= 2 * VISIBLE_HU
    assert visible.any() and not (visible & ~covered).any(), (kind, int((visible & ~covered).sum()))
    (site,) = broken.fracture_sites
    assert site["kind"] == kind and site["slices"] == sorted({b["slice_index"] for b in broken.boxes})
    c5 = (intact.labels == 5) | (broken.labels == 5)
    assert not (delta > 50)[~ndilate(c5, 3)].any()


def test_displaced_and_compression_fractures_move_bone_and_its_label():
    intact, displaced = kind_pair("displaced")
    _, crushed = kind_pair("compression")
    assert displaced.fracture_sites[0]["shift_mm"] >= 1.5 and displaced.fracture_sites[0]["subtlety"] == "obvious"
    assert (displaced.labels != intact.labels).any()
    c5 = (intact.labels == 5).sum()
    loss = crushed.fracture_sites[0]["height_loss"]
    assert 0.15 <= loss <= 0.45 and (crushed.labels == 5).sum() < c5  # the wedge removes bone from C5 only
    assert np.array_equal(crushed.labels[intact.labels != 5] == 5, intact.labels[intact.labels != 5] == 5)
    with pytest.raises(ValueError, match="compression"):
        make_study(1, size=32, n_slices=20, fractures={"C1": 1}, fracture_kinds={"C1": "compression"})


# ----------------------------------------------------------------------------------------------- look-alikes
@pytest.mark.parametrize("kind", LOOKALIKE_KINDS)
def test_each_lookalike_changes_the_image_but_no_label_or_box(kind):
    seed = 4
    plain = make_study(seed, size=48, fractures={}, noise_hu=0.0, lookalikes=[])
    look = make_study(seed, size=48, fractures={}, noise_hu=0.0, lookalikes=[kind])
    assert look.boxes == [] and look.patient_overall == 0 and look.meta["lookalikes"] == [kind]
    (record,) = look.lookalikes
    assert record["kind"] == kind and record["slices"], record
    if kind == "truncated_c7":  # the scan stops inside C7: fewer slices, C7 on the last one
        assert look.n_slices < plain.n_slices and (look.labels[-1] == LEVEL_LABELS["C7"]).any()
        assert not (look.labels == LEVEL_LABELS["T1"]).any()
        assert np.array_equal(look.labels, plain.labels[: look.n_slices])
        return
    assert look.shape == plain.shape
    delta = np.abs(look.hu.astype(int) - plain.hu.astype(int))
    assert (delta > 100).sum() > 10
    changed_slices = np.nonzero((delta > 100).any(axis=(1, 2)))[0]
    assert set(changed_slices) <= set(range(min(record["slices"]) - 2, max(record["slices"]) + 3))
    if kind == "osteophyte":  # new bone, labelled as its vertebra
        grown = (look.labels > 0) & (plain.labels == 0)
        assert grown.any() and set(np.unique(look.labels[grown])) == {LEVEL_LABELS[record["vertebra"]]}
    else:
        assert np.array_equal(look.labels, plain.labels)
    if kind == "metal_implant":
        assert look.hu.max() == HU_RANGE[1]
    if kind == "osteopenia":
        bone = plain.labels > 0
        assert look.hu[bone].mean() < plain.hu[bone].mean() - 100


def test_labels_leave_headers_slices_file_size_mean_hu_and_lookalikes_unchanged(tmp_path):
    """The same seed with and without fractures: identical look-alikes, slice count, spacing and headers,
    file sizes within 1 % and mean HU within 1 HU; look-alikes are drawn (not forced) here."""
    seeds = [s for s in range(40) if sample_lookalikes(np.random.default_rng(np.random.SeedSequence(s).spawn(6)[5]))]
    assert len(seeds) >= 12  # >= 30 % of the seeds
    for seed in seeds[:3]:
        intact = make_study(seed, size=48, fractures={})
        broken = make_study(seed, size=48, fractures={"C2": 1, "C5": 1, "C7": 1})
        assert intact.lookalikes == broken.lookalikes and intact.lookalikes
        assert intact.n_slices == broken.n_slices and intact.spacing == broken.spacing
        assert intact.origin == broken.origin and intact.uid == broken.uid
        assert abs(float(intact.hu.mean()) - float(broken.hu.mean())) < 1.0
        sizes, headers = [], []
        for name, study in (("intact", intact), ("broken", broken)):
            paths = write_study(study, tmp_path / f"{seed}{name}", transfer_syntax="jpeg-lossless")
            sizes.append(sum(p.stat().st_size for p in paths))
            ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
            headers.append({e.keyword: str(e.value) for e in ds if e.keyword not in ("SOPInstanceUID",)})
        assert headers[0] == headers[1] and abs(sizes[0] - sizes[1]) < 0.01 * sizes[0]


def test_easy_difficulty_is_clefts_without_lookalikes_and_bad_values_name_the_choices():
    study = make_study(3, size=40, n_slices=60, fractures={"C2": 1, "C4": 1, "C6": 1}, difficulty="easy")
    assert {s["kind"] for s in study.fracture_sites} == {"cleft"} and study.lookalikes == []
    assert study.meta["difficulty"] == "easy"
    with pytest.raises(ValueError, match="easy"):
        make_study(3, size=40, n_slices=10, difficulty="medium")
    with pytest.raises(ValueError, match="vascular_channel"):
        make_study(3, size=40, n_slices=10, lookalikes=["bone island"])
    with pytest.raises(ValueError, match="hairline"):
        make_study(3, size=40, n_slices=10, fractures={"C3": 1}, fracture_kinds={"C3": "greenstick"})


# ----------------------------------------------------------------------------------------------- answers
COMPETITION_LAYOUT = {"train.csv", "train_bounding_boxes.csv", "test.csv", "sample_submission.csv", "train_images",
                      "test_images", "segmentations"}


def test_answers_live_beside_the_data_root_and_agree_with_it(dataset):
    root, summary = dataset
    assert {p.name for p in root.iterdir()} == COMPETITION_LAYOUT  # nothing label-related inside the data root
    answers_dir = Path(str(root) + "_answers")
    assert summary["answers_dir"] == str(answers_dir.resolve()) and sorted(p.name for p in answers_dir.iterdir()) \
        == sorted(ANSWER_FILES)
    answers = load_answers(answers_dir)
    assert answers["summary"]["difficulty"] == "realistic" and answers["summary"]["n_train"] == 8

    test_labels = answers["test_labels"]
    assert list(test_labels.columns) == ["StudyInstanceUID", *TARGETS] and len(test_labels) == 2
    assert set(test_labels["StudyInstanceUID"]) == {p.name for p in (root / "test_images").iterdir()}
    assert (test_labels["patient_overall"] == test_labels[list(VERTEBRAE)].max(axis=1)).all()

    # every fractured vertebra (train and test) has at least one fracture row, no intact vertebra has any
    labels = pd.concat([pd.read_csv(root / "train.csv"), test_labels])
    fractures = answers["fractures"]
    truth = {(r.StudyInstanceUID, v) for r in labels.itertuples() for v in VERTEBRAE if getattr(r, v)}
    assert set(zip(fractures["StudyInstanceUID"], fractures["vertebra"])) == truth
    assert set(fractures["kind"]) <= set(FRACTURE_KINDS) and fractures["subtlety"].notna().all()
    # boxed fractures: their slice numbers are exactly the study's box rows
    boxes = pd.read_csv(root / "train_bounding_boxes.csv")
    for uid, rows in fractures[fractures["in_bounding_boxes"]].groupby("StudyInstanceUID"):
        shown = rows.dropna(subset=["slice_number_first"])
        numbers = set(boxes.loc[boxes["StudyInstanceUID"] == uid, "slice_number"])
        for r in shown.itertuples():
            lo, hi = sorted((int(r.slice_number_first), int(r.slice_number_last)))
            assert {lo, hi} <= numbers
    assert set(boxes["StudyInstanceUID"]) == set(fractures.loc[fractures["in_bounding_boxes"]
                                                               & fractures["z_first"].notna(), "StudyInstanceUID"])

    studies, looks = answers["studies"], answers["lookalikes"]
    assert set(looks["kind"]) <= set(LOOKALIKE_KINDS)
    assert set(looks["StudyInstanceUID"]) <= set(studies["StudyInstanceUID"])
    n_looks = studies["lookalikes"].fillna("").str.split().str.len()
    assert n_looks.sum() == len(looks) == sum(answers["summary"]["lookalikes"][k] for k in LOOKALIKE_KINDS)


def test_load_answers_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no answers folder"):
        load_answers(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "test_labels.csv").write_text("StudyInstanceUID\n")
    with pytest.raises(FileNotFoundError, match="fractures.csv"):
        load_answers(tmp_path / "half")
    with pytest.raises(ValueError, match="outside"):
        make_dataset(tmp_path / "data", n_train=1, n_test=0, size=32, n_slices=8, progress=False,
                     answers_dir=tmp_path / "data" / "answers")


def test_kit_synth_writes_data_and_answers_where_asked(tmp_path, capsys):
    from kit.cli import main

    main(["synth", "--out", str(tmp_path / "data"), "--answers", str(tmp_path / "truth"), "--n-train", "2",
          "--n-test", "1", "--size", "24", "--workers", "1", "--difficulty", "easy"])
    assert {p.name for p in (tmp_path / "data").iterdir()} == COMPETITION_LAYOUT
    answers = load_answers(tmp_path / "truth")
    assert answers["summary"]["difficulty"] == "easy" and len(answers["test_labels"]) == 1
    assert set(answers["fractures"]["kind"]) <= {"cleft"} and answers["lookalikes"].empty
    assert '"difficulty": "easy"' in capsys.readouterr().out


def test_gallery_functions_draw_a_fracture_and_a_lookalike(tmp_path):
    import matplotlib.image

    from kit.synthetic.pictures import draw_fracture, draw_lookalike

    paths = [draw_fracture("compression", tmp_path, size=64), draw_fracture("hairline", tmp_path, size=64),
             draw_lookalike("vascular_channel", tmp_path, size=64)]
    assert [p.name for p in paths] == ["fracture_compression.png", "fracture_hairline.png",
                                       "lookalike_vascular_channel.png"]
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == (340, 640) and image[..., :3].std() > 0.05  # two crops, not blank
