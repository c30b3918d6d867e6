"""kit.io.cache: prepared arrays match the reader, resume skips done studies, broken studies are reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd

from kit.io.cache import load_cached, prepare_arrays, prepare_studies, read_manifest
from kit.io.jobs import merge_csv
from kit.constants import WINDOWS
from kit.io.dicom import read_mask, read_series, resize_slices, window


def test_prepare_matches_reader_and_resumes(synthetic_root, tmp_path):
    cache = tmp_path / "cache"
    uids = sorted(p.name for p in (synthetic_root / "train_images").iterdir())
    first = prepare_studies(synthetic_root, cache, size=48, workers=2, progress=False)
    assert (first["prepared"], first["skipped"], first["failed"]) == (len(uids), 0, 0)

    seg_uids = {p.stem for p in (synthetic_root / "segmentations").glob("*.nii")}
    assert seg_uids, "fixture should have segmentations"
    for uid in uids:
        arrays = load_cached(cache, uid)
        series = read_series(synthetic_root / "train_images" / uid)
        z, h, w = series.hu.shape
        assert arrays["image"].shape == (z, 48, 48) and arrays["image"].dtype == np.uint8
        np.testing.assert_array_equal(arrays["image"], resize_slices(window(series.hu, *WINDOWS["bone"]), 48))
        np.testing.assert_allclose(arrays["spacing"], [series.spacing[0], series.spacing[1] * h / 48,
                                                       series.spacing[2] * w / 48], rtol=1e-5)
        np.testing.assert_array_equal(arrays["instance_numbers"], series.instance_numbers)
        assert ("mask" in arrays) == (uid in seg_uids)
        if uid in seg_uids:
            labels = read_mask(synthetic_root / "segmentations" / f"{uid}.nii", series)
            np.testing.assert_array_equal(arrays["mask"], resize_slices(labels.astype(np.uint8), 48, nearest=True))
            assert set(np.unique(arrays["mask"])) >= {0, 3, 4}

    manifest = read_manifest(cache)
    assert sorted(manifest["StudyInstanceUID"]) == uids
    assert manifest.set_index("StudyInstanceUID").loc[sorted(seg_uids), "has_mask"].all()

    again = prepare_studies(synthetic_root, cache, size=48, workers=1, progress=False)
    assert (again["prepared"], again["skipped"], again["failed"]) == (0, len(uids), 0)


def test_broken_study_is_skipped_and_reported(synthetic_root, tmp_path):
    root = tmp_path / "rsna"
    shutil.copytree(synthetic_root, root)
    uids = sorted(p.name for p in (root / "train_images").iterdir())
    broken, empty = uids[0], uids[1]
    for f in (root / "train_images" / broken).iterdir():
        f.write_bytes(b"not a dicom file")
    for f in (root / "train_images" / empty).iterdir():
        f.unlink()
    result = prepare_studies(root, tmp_path / "cache", size=32, workers=1, progress=False)
    assert result["prepared"] == len(uids) - 2 and result["failed"] == 2
    assert broken in result["failures"][broken] and empty in result["failures"][empty]
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv", dtype=str)
    assert sorted(failures["StudyInstanceUID"]) == sorted([broken, empty])
    assert not (tmp_path / "cache" / f"{broken}.npz").exists()

    # Mend one study: the next run prepares it and drops it from failures.csv.
    shutil.rmtree(root / "train_images" / broken)
    shutil.copytree(synthetic_root / "train_images" / broken, root / "train_images" / broken)
    mended = prepare_studies(root, tmp_path / "cache", size=32, workers=1, progress=False)
    assert (mended["prepared"], mended["failed"]) == (1, 1)
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv", dtype=str)
    assert list(failures["StudyInstanceUID"]) == [empty]


def test_a_listed_study_without_a_folder_is_reported(synthetic_root, tmp_path):
    """train.csv names a study whose folder is gone: failures.csv names it and why; the others are prepared; once
    the folder is back, the next run prepares it and drops it from failures.csv."""
    root = tmp_path / "rsna"
    shutil.copytree(synthetic_root, root)
    uids = sorted(p.name for p in (root / "train_images").iterdir())
    gone = uids[2]
    shutil.move(root / "train_images" / gone, tmp_path / gone)
    result = prepare_studies(root, tmp_path / "cache", size=32, workers=1, progress=False)
    assert (result["prepared"], result["failed"]) == (len(uids) - 1, 1)
    assert "listed in" in result["failures"][gone] and "train.csv" in result["failures"][gone]
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv", dtype=str)
    assert list(failures["StudyInstanceUID"]) == [gone]
    assert f"no folder {root / 'train_images' / gone}" in failures["error"].iloc[0]

    shutil.move(tmp_path / gone, root / "train_images" / gone)
    again = prepare_studies(root, tmp_path / "cache", size=32, workers=1, progress=False)
    assert (again["prepared"], again["skipped"], again["failed"]) == (1, len(uids) - 1, 0)
    assert pd.read_csv(tmp_path / "cache" / "failures.csv", dtype=str).empty


def test_merge_csv_replaces_rows_drops_keys_and_keeps_integer_columns(tmp_path):
    path = tmp_path / "table.csv"
    merge_csv(path, pd.DataFrame({"StudyInstanceUID": ["b", "a"], "slices": [178, 200]}))
    assert path.read_text().splitlines() == ["StudyInstanceUID,slices", "a,200", "b,178"]  # no 178.0
    merge_csv(path, pd.DataFrame({"StudyInstanceUID": ["b", "c"], "slices": [5, 7]}), drop=["a"])
    table = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    assert table.to_dict("list") == {"StudyInstanceUID": ["b", "c"], "slices": [5, 7]}
    merge_csv(path, pd.DataFrame(), drop=["b", "c"])  # emptied: the header stays
    assert path.read_text().splitlines() == ["StudyInstanceUID,slices"]
    merge_csv(tmp_path / "never.csv", pd.DataFrame())  # nothing to write, no file made
    assert not (tmp_path / "never.csv").exists()


def test_a_corrupt_segmentation_keeps_the_image_and_reports_the_mask(synthetic_root, tmp_path):
    root = tmp_path / "rsna"
    shutil.copytree(synthetic_root, root)
    nii = sorted((root / "segmentations").glob("*.nii"))[0]
    uid = nii.stem
    nii.write_bytes(b"not a NIfTI file")
    result = prepare_studies(root, tmp_path / "cache", size=32, workers=1, progress=False)
    arrays = load_cached(tmp_path / "cache", uid)
    assert "image" in arrays and "mask" not in arrays  # the image is cached all the same
    manifest = read_manifest(tmp_path / "cache").set_index("StudyInstanceUID")
    assert not manifest.loc[uid, "has_mask"] and nii.name in manifest.loc[uid, "mask_error"]
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv", dtype=str)
    assert list(failures["StudyInstanceUID"]) == [uid] and failures["error"][0].startswith("segmentation:")
    assert uid in result["failures"] and result["prepared"] == len(list((root / "train_images").iterdir()))


def test_segmented_only_prepares_what_stage_1_trains_on(synthetic_root, tmp_path):
    """`segmented_only`: the studies with a segmentation, `.nii` or gzipped `.nii.gz` (the mask read from either),
    and none of the others; a segmentation whose study folder is missing is listed in failures.csv."""
    import gzip

    from kit.cli import main
    from kit.io.rsna import segmented_studies
    from kit.io.folds import study_strata

    root = tmp_path / "rsna"
    shutil.copytree(synthetic_root, root)
    niis = sorted((root / "segmentations").glob("*.nii"))
    assert len(niis) >= 3
    gz = root / "segmentations" / f"{niis[0].name}.gz"  # <uid>.nii.gz
    gz.write_bytes(gzip.compress(niis[0].read_bytes()))
    niis[0].unlink()
    orphan = niis[1].stem
    shutil.rmtree(root / "train_images" / orphan)
    segmented = {p.name.split(".nii")[0] for p in (root / "segmentations").iterdir()}
    assert segmented_studies(root / "segmentations") == segmented
    assert study_strata(root, sorted(segmented))["has_segmentation"].all()

    main(["prepare", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--size", "32",
          "--workers", "1", "--segmented-only"])
    manifest = read_manifest(tmp_path / "cache")
    assert sorted(manifest["StudyInstanceUID"]) == sorted(segmented - {orphan})
    assert manifest["has_mask"].all() and manifest["mask_error"].isna().all()
    gz_uid = niis[0].stem
    series = read_series(root / "train_images" / gz_uid)
    np.testing.assert_array_equal(load_cached(tmp_path / "cache", gz_uid)["mask"],
                                  resize_slices(read_mask(gz, series).astype(np.uint8), 32, nearest=True))
    failures = pd.read_csv(tmp_path / "cache" / "failures.csv", dtype=str)
    assert list(failures["StudyInstanceUID"]) == [orphan]
    assert "segmented, but there is no folder" in failures["error"][0]


CRASH_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import kit.io.cache as cache
    from kit.io.dicom import fork_is_safe

    root, out, always, with_dicomsdl = sys.argv[1:5]
    real = cache.prepare_study

    def crashing(study_dir, out_path, **kw):  # what a native decoder's segfault does to its process
        name = Path(study_dir).name
        if name == always or (name == with_dicomsdl and kw["backend"] != "pydicom"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(study_dir, out_path, **kw)

    cache.prepare_study = crashing  # forked workers inherit it
    assert fork_is_safe()
    result = cache.prepare_studies(root, out, size=32, workers=2, progress=False)
    print(json.dumps(result))
""")


def test_a_study_that_kills_its_reading_process_costs_only_itself(synthetic_root, tmp_path):
    """A native decoder can segfault on a corrupt file (dicomsdl does on some: found by fuzzing), which broke the
    whole process pool and stopped `kit prepare`. Run in a fresh interpreter without torch, so that the pool forks
    and its workers inherit the crashing stand-in."""
    uids = sorted(p.name for p in (synthetic_root / "train_images").iterdir())
    always, with_dicomsdl = uids[0], uids[1]
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(synthetic_root), str(cache), always,
                           with_dicomsdl], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the study that crashes whatever the decoder: reported; the one that crashes only dicomsdl: read with pydicom
    assert (result["prepared"], result["failed"]) == (len(uids) - 1, 1)
    assert "its reading process died, also with pydicom alone" in result["failures"][always]
    assert str(synthetic_root / "train_images" / always) in result["failures"][always]
    manifest = read_manifest(cache).set_index("StudyInstanceUID")
    assert sorted(manifest.index) == sorted(set(uids) - {always})
    assert manifest.loc[with_dicomsdl, "warnings"].startswith("read again alone with pydicom")
    np.testing.assert_array_equal(load_cached(cache, with_dicomsdl)["image"],
                                  prepare_arrays(read_series(synthetic_root / "train_images" / with_dicomsdl), 32,
                                                 "bone")["image"])
    failures = pd.read_csv(cache / "failures.csv", dtype=str)
    assert list(failures["StudyInstanceUID"]) == [always]
