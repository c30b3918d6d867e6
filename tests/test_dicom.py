"""kit.io.dicom: slice order, HU parity between backends, robustness, mask alignment, windowing.

Real files come with pydicom; small series are written here with pydicom's encoders; RSNA-format studies
come from kit.synthetic. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import uid as UID
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset

from kit.io import dicom
from kit.io.dicom import DicomError, read_mask, read_series, resize_slices, scan_series, window, window_channels

STUDY = "1.2.826.0.1.3680043.777"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------- helpers
def independent_hu(raw: np.ndarray, bits_stored: int, signed: bool, slope: float, intercept: float) -> np.ndarray:
    """The sign rule written another way: keep the low `bits_stored` bits, two's complement if signed."""
    values = raw.astype(np.int64) % (1 << bits_stored)
    if signed:
        values = np.where(values >= 1 << (bits_stored - 1), values - (1 << bits_stored), values)
    return values * slope + intercept


def raw_from_file(path) -> np.ndarray:
    """Stored values straight from the bytes (native) or the J2K codestream, without pydicom's decoders."""
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax in (UID.JPEG2000, UID.JPEG2000Lossless):
        import openjpeg

        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        return openjpeg.decode(frame)
    assert not syntax.is_encapsulated, syntax
    dtype = ("<" if syntax.is_little_endian else ">") + ("i2" if ds.PixelRepresentation else "u2")
    return np.frombuffer(ds.PixelData, dtype=dtype)[: ds.Rows * ds.Columns].reshape(ds.Rows, ds.Columns)


def file_hu(path) -> np.ndarray:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return independent_hu(raw_from_file(path), ds.BitsStored, ds.PixelRepresentation == 1,
                          float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0)))


def write_slice(path, stored: np.ndarray, *, position, orientation=AXIAL, pixel_spacing=(0.8, 0.7),
                instance=1, study=STUDY, series="1.2.3.4", syntax=UID.ExplicitVRLittleEndian, bits_stored=16,
                slope=1.0, intercept=-1024.0, raw_bits: np.ndarray | None = None) -> None:
    """One CT slice. `raw_bits` (uint16) overrides the stored bytes, e.g. to set the unused high bits."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, instance
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 1
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = list(pixel_spacing)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept  # no Modality: real RSNA slices have none
    bits = raw_bits if raw_bits is not None else stored.astype(np.int16).view(np.uint16)
    ds.PixelData = bits.astype("<u2").tobytes()
    if syntax == UID.ExplicitVRBigEndian:
        ds.PixelData = bits.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax == UID.ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax != UID.ExplicitVRLittleEndian:
        ds.compress(syntax, stored.astype(np.int16))
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, stored: np.ndarray, *, feet_first=False, z0=100.0, dz=1.25, **kw) -> list[Path]:
    """(Z, H, W) stored values, index 0 most superior, as files 1..Z (InstanceNumber order = write order)."""
    folder.mkdir(parents=True, exist_ok=True)
    order = range(len(stored) - 1, -1, -1) if feet_first else range(len(stored))
    paths = []
    for number, z in enumerate(order, start=1):
        paths.append(folder / f"{number}.dcm")
        write_slice(paths[-1], stored[z], position=(-60.0, -45.0, z0 - z * dz), instance=number, **kw)
    return paths


def ramp(z=6, h=40, w=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(-1000, 2500, (z, h, w)) + np.arange(z)[:, None, None] * 7).astype(np.int16)


def read_every_way(folder, **kw):
    """dicomsdl alone, pydicom alone and "auto" (numpy for uncompressed pixel data) give the same HU."""
    a = read_series(folder, backend="dicomsdl", workers=1, **kw)
    b = read_series(folder, backend="pydicom", workers=1, **kw)
    c = read_series(folder, workers=1, **kw)
    assert a.backend == "dicomsdl" and b.backend == "pydicom"
    for other in (b, c):
        assert a.hu.dtype == other.hu.dtype and np.array_equal(a.hu, other.hu)
    return a


# ------------------------------------------------------------------------------ real files from pydicom
@pytest.mark.parametrize("name, lo, hi", [
    ("CT_small.dcm", 128 - 1024, 2191 - 1024),
    ("693_J2KI.dcm", -2971 - 1024, 2836 - 1024),
    ("J2K_pixelrep_mismatch.dcm", -2000, 1896),  # unsigned 13-bit J2K stream, PixelRepresentation 1
])
def test_real_files_same_hu_from_both_backends_and_the_sign_rule(tmp_path, name, lo, hi):
    (tmp_path / "s").mkdir()
    shutil.copy(get_testdata_file(name), tmp_path / "s" / "1.dcm")
    series = read_every_way(tmp_path / "s")
    expected = file_hu(tmp_path / "s" / "1.dcm")
    assert series.hu.shape == (1, *expected.shape) and series.hu.dtype == np.int16
    assert np.array_equal(series.hu[0], expected)
    assert (series.hu.min(), series.hu.max()) == (lo, hi)


def test_pydicom_fallback_when_dicomsdl_refuses(tmp_path, monkeypatch):
    (tmp_path / "s").mkdir()
    shutil.copy(get_testdata_file("J2K_pixelrep_mismatch.dcm"), tmp_path / "s" / "1.dcm")

    class Refuses:
        @staticmethod
        def open(path):
            raise RuntimeError(f"cannot decode {path}")

    monkeypatch.setattr(dicom, "dicomsdl", Refuses)
    series = read_series(tmp_path / "s", workers=1)
    assert series.backend == "pydicom" and series.warnings == []
    assert np.array_equal(series.hu[0], file_hu(tmp_path / "s" / "1.dcm"))
    assert series.hu.min() == -2000  # the documented value: sign-extended from 13 bits
    with pytest.raises(DicomError, match=r"study .*: cannot decode .*1\.dcm \(JPEG 2000"):
        read_series(tmp_path / "s", workers=1, backend="dicomsdl")


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_every_transfer_syntax_of_mr_small_equals_the_native_file(tmp_path, name):
    for folder, source in (("ref", "MR_small.dcm"), ("other", name)):
        (tmp_path / folder).mkdir()
        shutil.copy(get_testdata_file(source), tmp_path / folder / "1.dcm")
    reference = read_series(tmp_path / "ref", workers=1, backend="pydicom").hu
    assert np.array_equal(read_every_way(tmp_path / "other").hu, reference)
    assert reference.shape == (1, 64, 64) and reference.max() == 2145


@pytest.mark.filterwarnings("ignore:The pixel data is 8320 bytes long")  # MR_small_padded, on purpose
@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPEGLSNearLossless_16.dcm", "MR_small_padded.dcm"])
def test_other_real_files_same_hu_from_both_backends(tmp_path, name):
    (tmp_path / "s").mkdir()
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], list(AXIAL), [1, 1]
    ds.save_as(tmp_path / "s" / "1.dcm")  # geometry added (NM / SC files have none); pixels untouched
    series = read_every_way(tmp_path / "s")
    assert series.hu.shape == (1, ds.Rows, ds.Columns)
    assert np.array_equal(series.hu[0], ds.pixel_array.astype(np.int64))  # no rescale in these headers


def test_ct5n_series_is_ordered_superior_first_whatever_the_file_names(tmp_path):
    sources = sorted(Path(get_testdata_file("CT_small.dcm")).parent.glob("dicomdirtests/98892001/CT5N*/*"))
    assert len(sources) == 5
    folder = tmp_path / "s"
    folder.mkdir()
    for i, source in enumerate(sources):  # name them backwards so that file order misleads
        shutil.copy(source, folder / f"{5 - i}.dcm")
    series = read_every_way(folder)
    heights = series.positions[:, 2]
    assert series.hu.shape == (5, 16, 16) and np.all(np.diff(heights) < 0)
    assert np.allclose(np.diff(heights), -2.5) and series.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert list(series.instance_numbers) == [6, 7, 8, 9, 10]  # here z falls as InstanceNumber rises
    for z, path in enumerate(series.files):
        assert np.array_equal(series.hu[z], file_hu(path))
        assert float(pydicom.dcmread(path).ImagePositionPatient[2]) == pytest.approx(heights[z])
    assert np.allclose(series.normal, [0, 0, 1])
    affine = series.affine_lps()
    assert np.allclose(affine @ [4, 3, 2, 1], [*(series.positions[4] + [2 * 0.488281, 3 * 0.488281, 0]), 1])


# ------------------------------------------------------------------------------ series written here
@pytest.mark.parametrize("syntax", [UID.ExplicitVRLittleEndian, UID.ImplicitVRLittleEndian,
                                    UID.ExplicitVRBigEndian, UID.RLELossless, UID.JPEG2000Lossless])
def test_written_series_roundtrip_in_both_directions(tmp_path, syntax):
    stored = ramp()
    write_series(tmp_path / "head", stored, syntax=syntax)
    write_series(tmp_path / "feet", stored, syntax=syntax, feet_first=True)
    head, feet = read_every_way(tmp_path / "head"), read_every_way(tmp_path / "feet")
    for series in (head, feet):
        assert series.uid == STUDY and series.hu.dtype == np.int16
        assert np.array_equal(series.hu, stored.astype(np.int32) - 1024)
        assert np.allclose(series.positions[:, 2], 100 - 1.25 * np.arange(6))
        assert series.spacing == pytest.approx((1.25, 0.8, 0.7)) and series.warnings == []
    assert list(head.instance_numbers) == [1, 2, 3, 4, 5, 6] and list(feet.instance_numbers) == [6, 5, 4, 3, 2, 1]


def test_deflated_series_goes_to_pydicom(tmp_path):
    stored = ramp(z=3)
    for path in write_series(tmp_path / "s", stored):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = UID.DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    series = read_series(tmp_path / "s", workers=1)
    assert series.backend == "pydicom" and np.array_equal(series.hu, stored.astype(np.int32) - 1024)


def test_unused_high_bits_are_masked_and_sign_extended(tmp_path):
    stored = ramp(z=3).clip(-2048, 2047)  # 12-bit signed values
    garbage = np.random.default_rng(1).integers(0, 16, stored.shape).astype(np.uint16) << 12
    bits = (stored.astype(np.int32) & 0xFFF).astype(np.uint16) | garbage
    folder = tmp_path / "s"
    folder.mkdir()
    for z in range(3):
        write_slice(folder / f"{z + 1}.dcm", stored[z], position=(0, 0, -z), instance=z + 1, bits_stored=12,
                    raw_bits=bits[z])
    series = read_every_way(folder)
    assert np.array_equal(series.hu, stored.astype(np.int32) - 1024)
    assert np.array_equal(series.hu[0], file_hu(folder / "1.dcm"))


def test_non_integral_rescale_gives_float32_and_overflow_leaves_int16(tmp_path):
    stored = ramp(z=2)
    write_series(tmp_path / "f", stored, slope=0.5, intercept=-1024.25)
    series = read_every_way(tmp_path / "f")
    assert series.hu.dtype == np.float32 and np.allclose(series.hu, stored * 0.5 - 1024.25)
    big = np.full((2, 40, 48), 32000, np.int16)
    write_series(tmp_path / "o", big, intercept=1000.0)
    series = read_every_way(tmp_path / "o")
    assert series.hu.dtype == np.float32 and np.all(series.hu == 33000)


@pytest.fixture
def forking(monkeypatch):
    """Let read_series fork its decoding pool although this test process has torch loaded (the workers only
    decode; what is tested here is the pool)."""
    monkeypatch.setattr(dicom, "fork_is_safe", lambda: True)


def test_no_fork_where_torch_is_loaded_or_off_the_main_thread(tmp_path, monkeypatch):
    import sys
    import threading

    write_series(tmp_path / "s", ramp(z=20, h=32, w=32))

    class NoPool(dicom.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            raise AssertionError("read_series forked a pool in a torch process")

    import torch  # noqa: F401  (a torch process)

    assert not dicom.fork_is_safe()
    monkeypatch.setattr(dicom, "ProcessPoolExecutor", NoPool)
    series = read_series(tmp_path / "s", workers=2, executor="process")  # read in-process instead
    assert series.hu.shape == (20, 32, 32)
    monkeypatch.delitem(sys.modules, "torch")  # as if torch were not loaded: the main thread may fork
    assert dicom.fork_is_safe()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(dicom.fork_is_safe()))
    thread.start()
    thread.join()
    assert seen == [False]


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_parallel_decoding_matches_serial(tmp_path, executor, forking):
    stored = ramp(z=20, h=32, w=32)
    write_series(tmp_path / "s", stored, syntax=UID.RLELossless)
    series = read_series(tmp_path / "s", workers=2, executor=executor)
    assert np.array_equal(series.hu, stored.astype(np.int32) - 1024) and len(series.files) == 20


def test_a_crashing_worker_falls_back_to_pydicom(tmp_path, monkeypatch, forking):
    write_series(tmp_path / "s", ramp(z=20, h=32, w=32))
    parent, decode = os.getpid(), dicom._decode_raw

    def crash_in_child(s, backend):
        if os.getpid() != parent and s.path.name == "3.dcm":
            os._exit(139)  # what a segfaulting native decoder does to a worker
        return decode(s, backend)

    monkeypatch.setattr(dicom, "_decode_raw", crash_in_child)
    series = read_series(tmp_path / "s", workers=2, executor="process")
    assert series.backend == "pydicom" and series.hu.shape == (20, 32, 32)
    assert "decoding worker died" in series.warnings[0] and STUDY in series.warnings[0]


# ------------------------------------------------------------------------------ synthetic RSNA studies
@pytest.fixture(scope="module")
def study():
    from kit.synthetic import make_study

    return make_study(3, size=32, n_slices=24, fractures={"C2": 1})


def synthetic_syntaxes() -> list[str]:
    from kit.synthetic import TRANSFER_SYNTAXES

    return sorted(TRANSFER_SYNTAXES)


@pytest.mark.parametrize("syntax", synthetic_syntaxes())
def test_synthetic_studies_read_back_exactly_head_and_feet_first(tmp_path, study, syntax):
    from kit.synthetic import write_study

    assert {"explicit", "implicit", "jpeg-lossless", "rle"} <= set(synthetic_syntaxes())
    write_study(study, tmp_path / "head", transfer_syntax=syntax, head_first=True, modality=False)
    write_study(study, tmp_path / "feet", transfer_syntax=syntax, head_first=False)
    head, feet = read_every_way(tmp_path / "head"), read_every_way(tmp_path / "feet")
    auto = read_series(tmp_path / "feet", workers=1)
    assert auto.backend == ("numpy" if syntax in ("explicit", "implicit", "big-endian") else  # uncompressed
                            "pydicom" if syntax == "rle" else "dicomsdl")
    for series in (head, feet, auto):
        assert series.uid == study.uid and series.hu.dtype == np.int16 and series.warnings == []
        assert np.array_equal(series.hu, study.hu)
        assert series.spacing == pytest.approx(study.spacing, abs=1e-5)
    assert np.array_equal(head.positions, feet.positions)
    assert list(head.instance_numbers) == list(range(1, 25)) and list(feet.instance_numbers) == list(range(24, 0, -1))


@pytest.mark.parametrize("intercept, signed, bits_stored", [(0, True, 12), (-1024, False, 12), (-1024, False, 16)])
def test_synthetic_jpeg_lossless_header_variants(tmp_path, study, intercept, signed, bits_stored):
    """12-bit signed JPEG samples must be sign-extended; unsigned ones must not."""
    from kit.synthetic import write_study

    write_study(study, tmp_path / "s", transfer_syntax="jpeg-lossless", intercept=intercept, signed=signed,
                bits_stored=bits_stored)
    assert pydicom.dcmread(tmp_path / "s" / "1.dcm").BitsStored == bits_stored
    assert np.array_equal(read_every_way(tmp_path / "s").hu, study.hu)
    assert study.hu.min() < -1000 and study.hu.max() > 500  # negative stored values when intercept is 0


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_jpeg_lossless_slice_is_skipped(tmp_path, study):
    from kit.synthetic import write_study

    paths = write_study(study, tmp_path / "s", transfer_syntax="jpeg-lossless")
    paths[4].write_bytes(paths[4].read_bytes()[:-300])
    series = read_series(tmp_path / "s", workers=1)
    assert series.hu.shape == (23, 32, 32) and np.array_equal(series.hu, np.delete(study.hu, 4, axis=0))
    assert series.warnings[0].startswith(f"study {study.uid}: skipped {paths[4]}: cannot decode (JPEG Lossless")


@pytest.mark.parametrize("mask_head_first", [True, False])
@pytest.mark.parametrize("series_head_first", [True, False])
def test_read_mask_rsna_layout_reproduces_the_labels(tmp_path, study, mask_head_first, series_head_first):
    from kit.synthetic import write_segmentation, write_study

    write_study(study, tmp_path / "s", transfer_syntax="explicit", head_first=series_head_first)
    write_segmentation(study, tmp_path / "m.nii", head_first=mask_head_first)
    series = read_series(tmp_path / "s", workers=1)
    mask = read_mask(tmp_path / "m.nii", series)
    assert mask.dtype == np.uint8 and mask.shape == study.labels.shape
    assert np.array_equal(mask, study.labels) and set(np.unique(mask)) >= {0, 1, 2, 7}
    las_nifti(study.labels, series, tmp_path / "las.nii")  # the same labels as dcm2niix would store them
    assert np.array_equal(read_mask(tmp_path / "las.nii", series), study.labels)


# ------------------------------------------------------------------------------------------- bad inputs
def test_missing_and_empty_folders_raise_naming_them(tmp_path):
    with pytest.raises(DicomError, match=rf"study nope: folder {tmp_path / 'nope'} does not exist"):
        read_series(tmp_path / "nope")
    (tmp_path / "1.2.3").mkdir()
    with pytest.raises(DicomError, match=rf"study 1\.2\.3: 0 DICOM files in {tmp_path / '1.2.3'}"):
        read_series(tmp_path / "1.2.3")


def test_stray_files_and_corrupt_slices_are_skipped_and_reported(tmp_path, caplog):
    stored = ramp(z=6)
    paths = write_series(tmp_path / "s", stored)
    (tmp_path / "s" / "notes.txt").write_text("not an image\n")
    (tmp_path / "s" / "7.dcm").write_bytes(os.urandom(3000))
    non_image = pydicom.dcmread(paths[0])
    del non_image.PixelData
    non_image.save_as(tmp_path / "s" / "sr.dcm")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-500])  # truncated native pixel data: dicomsdl would crash on it
    with caplog.at_level(logging.WARNING, logger="kit.io.dicom"):
        series = read_every_way(tmp_path / "s")
    assert series.hu.shape == (5, 40, 48) and list(series.instance_numbers) == [1, 2, 4, 5, 6]
    assert np.array_equal(series.hu, np.delete(stored, 2, axis=0).astype(np.int32) - 1024)
    text = "\n".join(series.warnings)
    assert len(series.warnings) == 5 and all(w.startswith(f"study {STUDY}: ") for w in series.warnings)
    assert series.warnings[-1].endswith("uneven slice steps 1.250..2.500 mm; dz = median")  # the gap left by 3.dcm
    assert series.spacing[0] == 1.25
    assert f"{paths[2]}: truncated pixel data ({40 * 48 * 2 - 500} of {40 * 48 * 2} bytes)" in text
    assert f"{tmp_path / 's' / 'notes.txt'}: not a DICOM file" in text
    assert f"{tmp_path / 's' / '7.dcm'}: not a DICOM file" in text
    assert f"{tmp_path / 's' / 'sr.dcm'}: no pixel data (not an image)" in text
    assert sum(r.name == "kit.io.dicom" and r.levelno == logging.WARNING for r in caplog.records) == 15  # 3 reads


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_in_the_folder_is_skipped_unopened_and_reported(tmp_path):
    stored = ramp(z=4)
    write_series(tmp_path / "s", stored)
    fifo = tmp_path / "s" / "2.dcm.part"
    os.mkfifo(fifo)  # opening it for reading would block until something writes to it
    (tmp_path / "s" / "sub").mkdir()  # a sub-folder is no slice and no warning
    for workers in (1, 2):
        series = read_series(tmp_path / "s", workers=workers)
        assert np.array_equal(series.hu, stored.astype(np.int32) - 1024)
        assert series.warnings == [f"study {STUDY}: skipped {fifo}: not a regular file: a named pipe (FIFO)"]
    assert scan_series(tmp_path / "s")["skipped_files"] == 1
    files, skipped = dicom.study_files(tmp_path / "s")
    assert [p.name for p in files] == ["1.dcm", "2.dcm", "3.dcm", "4.dcm"]
    assert skipped == [(fifo, "not a regular file: a named pipe (FIFO)")]
    (tmp_path / "only").mkdir()
    os.mkfifo(tmp_path / "only" / "1.dcm")
    with pytest.raises(DicomError, match=r"study only: 0 DICOM files in .*only \(skipped: 1\.dcm: not a regular "
                                         r"file: a named pipe \(FIFO\)\)"):
        read_series(tmp_path / "only")


def test_undecodable_compressed_slice_is_skipped_and_all_undecodable_raises(tmp_path):
    stored = ramp(z=4)
    paths = write_series(tmp_path / "s", stored, syntax=UID.RLELossless)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:200] + b"\0" * 16  # broken RLE segments
    ds.save_as(paths[1])
    series = read_series(tmp_path / "s", workers=1)
    assert series.hu.shape == (3, 40, 48) and list(series.instance_numbers) == [1, 3, 4]
    assert np.array_equal(series.hu, np.delete(stored, 1, axis=0).astype(np.int32) - 1024)
    assert len(series.warnings) == 2 and series.warnings[0].startswith(
        f"study {STUDY}: skipped {paths[1]}: cannot decode (RLE Lossless): RuntimeError: Unable to decode")
    assert "uneven slice steps" in series.warnings[1]
    for path in paths:
        path.write_bytes(paths[1].read_bytes())
    with pytest.raises(DicomError, match=rf"study {STUDY}: cannot decode .*1\.dcm \(RLE Lossless\): .*none of its"):
        read_series(tmp_path / "s", workers=1)


def patch_bytes(path: Path, find: bytes, at: int, new: bytes) -> None:
    """Overwrite bytes `at` past the first `find` in the file (e.g. an element's tag: explicit VR little endian
    is tag, VR, 2-byte length, value)."""
    data = bytearray(path.read_bytes())
    start = data.index(find) + at
    data[start:start + len(new)] = new
    path.write_bytes(bytes(data))


def test_corrupt_headers_and_a_panicking_decoder_cost_only_their_file(tmp_path):
    """Found by fuzzing (random bytes of one file changed, 400 studies): pydicom parses an element's value only
    when it is read, so a corrupt header failed after the header's try and stopped the whole study; and
    pylibjpeg-rle's Rust panic is a BaseException, which `except Exception` let through."""
    stored = ramp(z=6)
    paths = write_series(tmp_path / "s", stored)
    patch_bytes(paths[1], b"\x28\x00\x30\x00DS", 4, b"YS")  # PixelSpacing: an unknown VR
    patch_bytes(paths[2], b"\x20\x00\x32\x00DS", 8, b"x")  # ImagePositionPatient: a number that does not parse
    ds = pydicom.dcmread(paths[3])
    del ds.Columns
    ds.save_as(paths[3])
    series = read_every_way(tmp_path / "s")
    assert list(series.instance_numbers) == [1, 5, 6]
    assert np.array_equal(series.hu, stored[[0, 4, 5]].astype(np.int32) - 1024)
    text = "\n".join(series.warnings)
    assert f"skipped {paths[1]}: corrupt header (NotImplementedError: Unknown Value Representation 'YS'" in text
    assert f"skipped {paths[2]}: corrupt header (ValueError: could not convert string to float" in text
    assert f"skipped {paths[3]}: corrupt header (AttributeError:" in text and "Columns" in text

    paths = write_series(tmp_path / "rle", stored[:3], syntax=UID.RLELossless)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:2137] + bytes(64) + ds.PixelData[2137 + 64:]  # makes pylibjpeg-rle panic
    ds.save_as(paths[1])
    series = read_series(tmp_path / "rle", workers=1)
    assert list(series.instance_numbers) == [1, 3]
    assert f"skipped {paths[1]}: cannot decode (RLE Lossless): PanicException: index out of bounds" in \
        "\n".join(series.warnings)


FUZZ_READER = """
import json, sys
from kit.io.dicom import DicomError, read_series
try:
    print(json.dumps({"kind": "read", "slices": len(read_series(sys.argv[1], workers=1).hu)}))
except DicomError as exc:
    print(json.dumps({"kind": "DicomError"}))
except BaseException as exc:
    print(json.dumps({"kind": type(exc).__name__, "message": str(exc)[:300]}))
"""


def corrupt_one_file(folder: Path, rng: np.random.Generator, mode: str) -> Path:
    files = sorted(folder.glob("*.dcm"))
    path = files[rng.integers(len(files))]
    data = bytearray(path.read_bytes())
    if mode == "header":  # a few bytes of the header (after the preamble)
        for j in rng.integers(128, min(len(data), 1500), size=rng.integers(1, 9)):
            data[j] = rng.integers(256)
    elif mode == "anywhere":
        for j in rng.integers(0, len(data), size=rng.integers(1, 33)):
            data[j] = rng.integers(256)
    elif mode == "truncated":
        data = data[:rng.integers(0, len(data))]
    else:  # a block of zeros
        j, n = int(rng.integers(len(data))), int(rng.integers(1, 400))
        data[j:j + n] = bytes(len(data[j:j + n]))
    path.write_bytes(bytes(data))
    return path


def test_fuzzed_studies_raise_nothing_but_dicom_error(tmp_path):
    """One file of a small study changed at random (bytes of the header or anywhere, truncated, a block zeroed),
    each read in a fresh interpreter: `read_series` returns (that file skipped, or read) or raises DicomError,
    nothing else. Uncompressed studies never crash the process; a compressed one may (dicomsdl segfaults on some
    corrupt JPEG streams: the readers of many studies survive it, tests/test_cache.py and kit.io.prefetch)."""
    from kit.synthetic import make_study, write_study

    study = make_study(5, size=32, n_slices=8)
    syntaxes = ("implicit", "explicit", "big-endian", "jpeg-lossless", "rle")
    for syntax in syntaxes:
        write_study(study, tmp_path / "base" / syntax, transfer_syntax=syntax)
    rng = np.random.default_rng(0)
    outcomes = []
    for case in range(40):
        syntax, mode = syntaxes[case % 5], ("header", "anywhere", "truncated", "zeros")[case // 5 % 4]
        folder = tmp_path / f"case{case}"
        shutil.copytree(tmp_path / "base" / syntax, folder)
        path = corrupt_one_file(folder, rng, mode)
        done = subprocess.run([sys.executable, "-c", FUZZ_READER, str(folder)], capture_output=True, text=True,
                              timeout=120)
        kind = json.loads(done.stdout.strip().splitlines()[-1])["kind"] if done.returncode == 0 else \
            f"crashed ({done.returncode})"
        outcomes.append((syntax, mode, path.name, kind))
    assert not [o for o in outcomes if o[3] not in ("read", "DicomError") and not o[3].startswith("crashed")], \
        outcomes
    assert not [o for o in outcomes if o[3].startswith("crashed") and o[0] not in ("jpeg-lossless", "rle")], outcomes
    assert sum(o[3] == "read" for o in outcomes) >= 30, outcomes  # most corruptions cost one file, not the study


def test_all_files_unreadable_raises_naming_study_and_file(tmp_path):
    paths = write_series(tmp_path / "s", ramp(z=3))
    for path in paths:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DicomError, match=rf"study {STUDY}: no readable image slice among 3 files in "
                                         rf"{tmp_path / 's'}; first: {paths[0]}: truncated pixel data"):
        read_series(tmp_path / "s")
    for path in paths:
        path.write_bytes(b"garbage" * 10)
    with pytest.raises(DicomError, match=rf"study s: no readable image slice .* first: {paths[0]}: not a DICOM"):
        read_series(tmp_path / "s")


def test_odd_size_duplicates_and_mixed_series(tmp_path):
    stored = ramp(z=6)
    paths = write_series(tmp_path / "s", stored)
    write_slice(tmp_path / "s" / "odd.dcm", stored[0, :, :40], position=(-60, -45, 50), instance=7)
    write_slice(tmp_path / "s" / "dup.dcm", stored[3], position=(-60, -45, 100 - 3 * 1.25), instance=8)
    write_slice(tmp_path / "s" / "nopos.dcm", stored[3], position=(0, 0, 0), instance=9)
    no_position = pydicom.dcmread(tmp_path / "s" / "nopos.dcm")
    del no_position.ImagePositionPatient
    no_position.save_as(tmp_path / "s" / "nopos.dcm")
    for i in range(3):  # a smaller second series interleaved with the first
        write_slice(tmp_path / "s" / f"other{i}.dcm", stored[i] * 0, position=(-60, -45, 99.5 - i),
                    instance=i + 1, series="9.9.9")
    series = read_every_way(tmp_path / "s")
    assert series.hu.shape == (6, 40, 48) and np.array_equal(series.hu, stored.astype(np.int32) - 1024)
    assert series.files == paths  # the duplicate with the lower InstanceNumber (4.dcm) is kept
    text = "\n".join(series.warnings)
    assert len(series.warnings) == 6
    assert f"skipped {tmp_path / 's' / 'nopos.dcm'}: no ImagePositionPatient / ImageOrientationPatient" in text
    assert f"skipped {tmp_path / 's' / 'odd.dcm'}: size (40, 40) differs from the series' (40, 48)" in text
    assert f"skipped {tmp_path / 's' / 'dup.dcm'}: duplicate position" in text and "of 4.dcm, which is kept" in text
    assert text.count("SeriesInstanceUID 9.9.9 differs from the series' 1.2.3.4") == 3


def test_scan_series_reads_headers_only(tmp_path):
    write_series(tmp_path / "s", ramp(z=5), feet_first=True, syntax=UID.RLELossless)
    row = scan_series(tmp_path / "s")
    assert row["StudyInstanceUID"] == STUDY and row["slices"] == 5 and (row["rows"], row["cols"]) == (40, 48)
    assert row["dz"] == pytest.approx(1.25) and row["transfer_syntax"] == "RLE Lossless"
    assert row["instance_order"] == "inferior-first"


# ---------------------------------------------------------------------------------------------- masks
def las_nifti(labels: np.ndarray, series, path) -> None:
    """What dcm2niix / TotalSegmentator write for an axial series: i = column (towards patient left),
    j = reversed row (towards anterior), k = reversed slice (towards superior); affine in RAS."""
    dz, dy, dx = series.spacing
    x0, y0, _ = series.positions[0]
    z_low = series.positions[-1][2]
    height = labels.shape[1]
    affine = np.array([[-dx, 0, 0, -x0], [0, dy, 0, -(y0 + (height - 1) * dy)], [0, 0, dz, z_low], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels[::-1, ::-1, :].transpose(2, 1, 0)), affine), path)


def label_volume(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, shape).astype(np.uint8)


@pytest.mark.parametrize("feet_first", [False, True])
def test_read_mask_in_las_layout_lines_up(tmp_path, feet_first):
    write_series(tmp_path / "s", ramp(z=7, h=36, w=44), feet_first=feet_first)
    series = read_series(tmp_path / "s", workers=1)
    labels = label_volume(series.shape)
    las_nifti(labels, series, tmp_path / "m.nii")
    mask = read_mask(tmp_path / "m.nii", series)
    assert mask.dtype == np.uint8 and mask.shape == (7, 36, 44) and np.array_equal(mask, labels)


def test_read_mask_sagittal_storage_and_oblique_series(tmp_path):
    """Any layout the affine describes: here sagittal storage of an in-plane rotated (oblique) series."""
    angle = np.deg2rad(30)
    row_dir, col_dir = np.array([np.cos(angle), np.sin(angle), 0]), np.array([-np.sin(angle), np.cos(angle), 0])
    write_series(tmp_path / "s", ramp(z=5, h=32, w=40), orientation=(*row_dir, *col_dir))
    series = read_series(tmp_path / "s", workers=1)
    labels = label_volume(series.shape, seed=1)
    lps = series.affine_lps()  # (z, row, col) -> LPS; the stored array is (col, row, z) = sagittal-first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps[:, [2, 1, 0, 3]]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine), tmp_path / "m.nii")
    assert np.array_equal(read_mask(tmp_path / "m.nii", series), labels)


def test_read_mask_oblique_resampling_follows_physical_space(tmp_path):
    """An axis-aligned NIfTI (1 mm, label = 1 left of x = 0 else 2) sampled by a tilted series."""
    angle = np.deg2rad(20)
    orientation = (np.cos(angle), np.sin(angle), 0, -np.sin(angle), np.cos(angle), 0)
    write_series(tmp_path / "s", ramp(z=3, h=32, w=32), orientation=orientation, z0=1.0, dz=1.0)
    series = read_series(tmp_path / "s", workers=1)
    grid = np.zeros((100, 100, 5), np.uint8)
    x_ras = 30.0 + np.arange(100)  # RAS x of index i; LPS x = -RAS x; the series spans LPS x -68..-40
    grid[:] = np.where(-x_ras > -50, 1, 2)[:, None, None]
    nib.save(nib.Nifti1Image(grid, np.array([[1, 0, 0, 30], [0, 1, 0, 0], [0, 0, 1, -2.0], [0, 0, 0, 1]],
                                            dtype=float)), tmp_path / "m.nii")
    mask = read_mask(tmp_path / "m.nii", series)
    affine = series.affine_lps()
    z, r, c = np.meshgrid(*(np.arange(n) for n in series.shape), indexing="ij")
    x_lps = (affine @ np.stack([z, r, c, np.ones_like(z)]).reshape(4, -1))[0].reshape(series.shape)
    clear = np.abs(x_lps + 50) > 1.0  # away from the boundary, nearest neighbour is unambiguous
    assert clear.mean() > 0.8 and np.array_equal(mask[clear], np.where(x_lps > -50, 1, 2)[clear])
    assert {1, 2} <= set(np.unique(mask[clear]))


def test_read_mask_with_mismatched_geometry_raises(tmp_path):
    write_series(tmp_path / "s", ramp(z=6, h=32, w=40))
    series = read_series(tmp_path / "s", workers=1)
    labels = label_volume(series.shape)
    las_nifti(labels[1:], series, tmp_path / "short.nii")  # one slice missing
    with pytest.raises(DicomError, match=rf"study {STUDY}: segmentation .*short\.nii does not cover the series"):
        read_mask(tmp_path / "short.nii", series)
    las_nifti(labels, series, tmp_path / "aligned.nii")
    image = nib.load(tmp_path / "aligned.nii")
    affine = image.affine.copy()
    affine[0, 3] += 3 * series.spacing[2]  # 3 voxels off along x
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), tmp_path / "shifted.nii")
    with pytest.raises(DicomError, match=r"shifted\.nii does not cover .*shape \(40, 32, 6\)"):
        read_mask(tmp_path / "shifted.nii", series)


# ------------------------------------------------------------------------------------------ windowing
def test_window_and_channels():
    hu = np.array([[-1000, -500, 400, 1300, 3000]], np.int16)
    assert window(hu, 400, 1800).tolist() == [[0, 0, 128, 255, 255]]
    assert window(np.array([40 - 200, 40, 40 + 200]), 40, 400).tolist() == [0, 128, 255]
    both = window_channels(hu, ("bone", "soft"))
    assert both.shape == (1, 5, 2) and both.dtype == np.uint8 and both[0, 2].tolist() == [128, 255]
    volume = np.random.default_rng(0).integers(-2000, 3000, (70, 4, 5)).astype(np.int16)  # > one block
    blocks = window(volume, 400, 1800)
    assert blocks.shape == volume.shape and np.array_equal(blocks, np.stack([window(v, 400, 1800) for v in volume]))
    assert np.array_equal(blocks[volume <= -500], np.zeros((volume <= -500).sum())) and blocks.max() == 255
    with pytest.raises(ValueError, match="unknown window name.*'lung'.*available: bone, soft, brain"):
        window_channels(hu, ("lung",))


def test_resize_slices_any_size():
    volume = np.arange(2 * 6 * 10, dtype=np.int16).reshape(2, 6, 10)
    up = resize_slices(volume, 20)
    assert up.shape == (2, 20, 20) and up.dtype == np.int16
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[:, :4] = 7
    small = resize_slices(labels, 4, nearest=True)
    assert small.shape == (3, 4, 4) and set(np.unique(small)) == {0, 7} and (small[:, :2] == 7).all()
    assert resize_slices(volume, (6, 10)).tolist() == volume.tolist()
    assert resize_slices(np.full((1, 4, 4), 70000, np.int32), 2).tolist() == [[[70000] * 2] * 2]


def test_nearest_resize_keeps_a_mask_centred_on_its_image():
    """A mask resized with nearest neighbour lies where the area-resized image shows it, within 1/8 px at
    512 -> 128 (cv2's INTER_NEAREST picked each block's top-left pixel: 0.375 px off)."""

    def centroid(a):
        ys, xs = np.mgrid[:a.shape[0], :a.shape[1]]
        return np.array([(ys * a).sum(), (xs * a).sum()]) / a.sum()

    yy, xx = np.mgrid[:512, :512]
    shifts = []
    for phase in range(4):  # average over where the disc falls within the 4 x 4 blocks
        disc = ((yy - 200.5 - phase) ** 2 + (xx - 300.5 - phase) ** 2 <= 60 ** 2)
        image = resize_slices((disc * 255).astype(np.uint8)[None], 128)[0].astype(np.float64)
        mask = resize_slices(disc.astype(np.uint8)[None], 128, nearest=True)[0].astype(np.float64)
        shifts.append(centroid(mask) - centroid(image))
    assert np.abs(np.mean(shifts, axis=0)).max() <= 0.13
    # upsampling: each input pixel becomes a whole block
    up = resize_slices(np.array([[[1, 2], [3, 4]]], np.uint8), 4, nearest=True)[0]
    assert up.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
