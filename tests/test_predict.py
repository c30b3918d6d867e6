"""kit.submit.predictor (predict_study, kit submit) and kit.stage2.infer.classify_study on tiny runs trained here for one
epoch: a stage-1 segmenter on a `seg_fixtures` cache, classifiers (`demo_cls`, per vertebra and per study) on a
fake crop cache (`test_cls_task.write_crop_cache`), studies from the `synthetic_root` fixture (64 px).

One-epoch segmenters find no vertebra on the synthetic studies, so the tests that need found vertebrae take
stage 1 from the ground-truth segmentation (`seg=`, the way `kit crops` builds truth crops) or from `seg_c1`: the
trained segmenter with its head's biases set so that it claims every pixel as C1 (a real checkpoint loaded by
`load_run`, degenerate on purpose: C1 found, C2..C7 not).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kit import runs
from kit.stage1 import infer as stage1_infer
from kit.stage2 import infer
from kit.submit import predictor
from kit.config import load_config
from kit.constants import VERTEBRAE
from kit.stage2.recipe import ClsRecipe
from kit.stage1.postprocess import missing_vertebrae, vertebra_extents
from kit.io.dicom import read_mask, read_series, resize_slices
from kit.evaluate.metrics import scale_odds
from kit.runs import InferenceOptions
from kit.submit.predictor import load_runs, resolve_runs, submit
from kit.stage1.results import SegResult
from seg_fixtures import make_cache, tiny_overrides
from test_cls_task import tiny_config, write_crop_cache

torch.set_num_threads(1)
UID = "StudyInstanceUID"
TRUTH_GRID = 32  # prepared grid of the ground-truth labels: half the 64 px series, so crops map boxes x2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{"seg": run folder (folds 0, 1), "seg_c1": C1-everywhere run, "cls": demo_cls (folds 0, 1),
    "patient": cls_patient_gru (fold 0)}."""
    from kit.train import fit_fold

    base = tmp_path_factory.mktemp("predict_runs")
    cache = base / "seg_cache"
    _, folds_csv = make_cache(cache, n_studies=4, n_unsegmented=0, n_folds=2, z=16)
    for fold in (0, 1):
        fit_fold(load_config("demo_seg", **tiny_overrides(cache, folds_csv, base / "runs", n_folds=2,
                                                           **{"data.fold": fold, "train.epochs": 1})))
    seg = base / "runs" / "demo_seg"
    seg_c1 = base / "runs" / "seg_c1"
    (seg_c1 / "fold0").mkdir(parents=True)
    ckpt = torch.load(seg / "fold0" / "model.pt", weights_only=True)
    bias = ckpt["model"]["net.segmentation_head.0.bias"]
    bias[:] = -30.0
    bias[0] = 30.0  # C1 everywhere, every other vertebra nowhere
    torch.save(ckpt, seg_c1 / "fold0" / "model.pt")
    shutil.copy(seg / "fold0" / "config.yaml", seg_c1 / "fold0" / "config.yaml")

    crop_cache = write_crop_cache(base / "cls")
    for fold in (0, 1):
        fit_fold(tiny_config(crop_cache, base, **{"data.fold": fold, "train.epochs": 1, "train.ema": False}))
    fit_fold(tiny_config(crop_cache, base, **{"model.name": "cls_patient_gru", "name": "cls_patient",
                                              "train.epochs": 1, "train.batch_size": 4}))
    return {"seg": seg, "seg_c1": seg_c1, "cls": base / "runs" / "demo_cls", "patient": base / "runs" / "cls_patient"}


@pytest.fixture(scope="module")
def models(trained):
    return {name: runs.load_run(path) for name, path in trained.items()}


def truth_seg(root: Path, uid: str, series) -> SegResult:
    """Stage 1 from the ground truth, as `kit crops` builds it: C1..C7 labels resized (nearest) to the grid."""
    labels = read_mask(root / "segmentations" / f"{uid}.nii", series)
    labels = resize_slices(np.where((labels >= 0) & (labels <= 7), labels, 0).astype(np.uint8), TRUTH_GRID,
                           nearest=True)
    extents = vertebra_extents(labels)
    return SegResult(uid=uid, labels=labels, extents=extents, missing=missing_vertebrae(extents),
                     orig_hw=tuple(series.hu.shape[1:]))


@pytest.fixture(scope="module")
def segmented(synthetic_root):
    """(series, truth SegResult) of a synthetic training study with a segmentation showing C1..C7."""
    for nii in sorted((synthetic_root / "segmentations").glob("*.nii")):
        uid = nii.stem
        series = read_series(synthetic_root / "train_images" / uid)
        seg = truth_seg(synthetic_root, uid, series)
        if not seg.missing:
            return series, seg
    pytest.fail("no synthetic study whose segmentation shows all of C1..C7")


class Recorder(nn.Module):
    """A stand-in classifier that keeps its input; logit = mean of the left half minus the right half."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(4.0))
        self.seen: list[torch.Tensor] = []
        self.levels: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, mask=None, level=None) -> dict:
        self.seen.append(x.clone())
        self.levels.append(level)
        half = x.shape[-1] // 2
        return {"logit": self.scale * (x[..., :half].mean((1, 2, 3, 4)) - x[..., half:].mean((1, 2, 3, 4)))}


def recorder_model(config, path: Path) -> runs.LoadedModel:
    return runs.LoadedModel(model=Recorder().eval(), config=config, fold=0, path=path / "fold0" / "model.pt",
                             model_name="recorder")


def test_inference_crops_are_the_crop_cache_crops(models, segmented, tmp_path):
    series, seg = segmented
    config = models["cls"][0].config
    d = config.data
    # the call kit crops makes (kit.stage2.crop_cache.build_study), field by field from the same config
    recipe = ClsRecipe(n_slices=d.n_slices, n_neighbours=d.n_neighbours, neighbour_mm=d.neighbour_mm,
                       size=d.image_size, windows=tuple(d.windows), margin=d.margin, with_mask=d.with_mask)
    direct, found, _ = recipe.crop_study(series.hu, seg.labels, seg.extents, dz=float(series.spacing[0]),
                                         dropped=seg.dropped)
    assert found.all() and direct.shape == (7, d.n_slices, config.in_channels, d.image_size, d.image_size)
    stand_in = recorder_model(config, tmp_path / "rec")
    infer.classify_study(series.hu, seg, [stand_in], dz=float(series.spacing[0]))
    (seen,) = stand_in.model.seen
    # what the model sees: every found vertebra in one batch, as the crop dataset shows it (uint8 / 255)
    expected = torch.from_numpy(direct.astype(np.float32) / 255.0)
    assert seen.shape == expected.shape and torch.equal(seen, expected)
    assert torch.equal(stand_in.model.levels[0], torch.arange(7))  # each vertebra with its level (C1..C7 = 0..6)


def test_predict_study_gives_eight_probabilities(models, segmented):
    series, seg = segmented
    result = predictor.predict_study(series, [models["cls"]], seg=seg)
    p = result["probs"]
    assert p.shape == (8,) and np.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    assert result["found"].all() and result["patient_source"] == "the vertebrae found (targets_from_vertebrae)"
    for m, loaded in zip(result["models"], models["cls"]):  # each model's 8 targets from its own vertebrae
        odds = loaded.model.metric_odds.numpy()
        assert not np.allclose(odds, 2.0)  # set from the fold's training labels
        chance = scale_odds(m["probs"][1:], 1 / odds[1:])  # undo the vertebrae's odds: the chance of a fracture
        assert m["probs"][0] == pytest.approx(scale_odds(1 - np.prod(1 - chance), odds[0]), abs=1e-9)
    assert p[0] == pytest.approx(np.mean([m["probs"][0] for m in result["models"]]), abs=1e-12)
    assert set(result["timing"]) == {"read_s", "segment_s", "crop_s", "classify_s", "total_s"}

    patient = predictor.predict_study(series, [models["patient"]], seg=seg)
    assert patient["patient_source"] == "patient head" and np.isfinite(patient["probs"]).all()
    flipped = predictor.predict_study(series, [models["patient"]], seg=seg, options=InferenceOptions(tta_flip=True))  # a batch of 2 studies
    assert np.isfinite(flipped["probs"]).all() and not np.allclose(flipped["probs"], patient["probs"])
    assert abs(patient["probs"][0] - (1 - np.prod(1 - patient["probs"][1:]))) > 1e-6  # the head's own value


def test_predict_study_from_dicom_runs_both_stages(models, synthetic_root, monkeypatch):
    import kit.io.dicom

    study = sorted((synthetic_root / "test_images").iterdir())[0]
    reads = []
    read_series_once = kit.io.dicom.read_series
    monkeypatch.setattr(kit.io.dicom, "read_series", lambda *a, **k: reads.append(a) or read_series_once(*a, **k))
    # the trained one-epoch segmenter: whatever it finds, every value is an answer (missing ones by the rule)
    result = predictor.predict_study(study, [models["seg"], models["cls"]])
    assert len(reads) == 1  # one DICOM read serves stage 1's input and the full-resolution crops
    assert result["uid"] == study.name and result["probs"].shape == (8,)
    assert result["seg"].labels.shape[1:] == (64, 64)  # stage 1 at the segmenter's size (prepare_arrays)
    assert np.isfinite(result["probs"]).all()
    assert sorted(result["missing"]) == [v for v, f in zip(VERTEBRAE, result["found"]) if not f]
    # the C1-everywhere segmenter: C1 found (the whole volume), C2..C7 not: each model gives them its training
    # prevalence at its odds, and patient_overall counts them with C1
    c1 = predictor.predict_study(study, [models["seg_c1"], models["cls"]])
    assert c1["found"].tolist() == [True] + [False] * 6
    assert np.isfinite(c1["probs"]).all()
    for m, loaded in zip(c1["models"], models["cls"]):
        odds, prevalence = loaded.model.metric_odds.numpy(), loaded.model.train_prevalence.numpy()
        np.testing.assert_allclose(m["probs"][2:], scale_odds(prevalence[2:], odds[2:]))
        chance = np.r_[scale_odds(m["probs"][1], 1 / odds[1]), prevalence[2:]]
        assert m["probs"][0] == pytest.approx(scale_odds(1 - np.prod(1 - chance), odds[0]), abs=1e-9)
    assert c1["missing"]["C2"].startswith("not found")


def test_mean_of_logits_or_probabilities_and_weights(models, segmented):
    series, seg = segmented
    runs = [models["cls"], models["patient"]]
    probs = predictor.predict_study(series, runs, seg=seg, options=InferenceOptions(mean="prob"))
    logits = predictor.predict_study(series, runs, seg=seg, options=InferenceOptions(mean="logit"))
    per_model = np.stack([m["probs"] for m in probs["models"]])  # (3, 8): cls folds 0, 1, patient fold 0
    assert per_model.shape == (3, 8) and [m["fold"] for m in probs["models"]] == [0, 1, 0]
    np.testing.assert_allclose(np.stack([m["probs"] for m in logits["models"]]), per_model, atol=1e-12)
    # each run counts once (its folds share its weight): cls folds 1/4 each, the patient run 1/2
    w = np.array([0.25, 0.25, 0.5])[:, None]
    np.testing.assert_allclose(probs["probs"], (w * per_model).sum(0), atol=1e-12)
    x = np.log(per_model) - np.log1p(-per_model)
    np.testing.assert_allclose(logits["probs"], 1 / (1 + np.exp(-(w * x).sum(0))), atol=1e-12)
    spread = per_model.max(0) - per_model.min(0)
    assert (np.abs(probs["probs"] - logits["probs"]) > 0)[spread > 1e-3].all()  # they differ where models do
    # a run's own line is its folds' mean
    cls_key = str(Path(models["cls"][0].path).parent.parent)
    np.testing.assert_allclose(probs["runs"][cls_key], per_model[:2].mean(0), atol=1e-12)

    weighted = predictor.predict_study(series, runs, seg=seg, options=InferenceOptions(weights=[3.0, 1.0]))
    np.testing.assert_allclose(weighted["probs"], (np.array([3 / 8, 3 / 8, 1 / 4])[:, None] * per_model).sum(0),
                               atol=1e-12)
    by_name = predictor.predict_study(series, runs, seg=seg, options=InferenceOptions(weights={"demo_cls": 3.0}))
    np.testing.assert_allclose(by_name["probs"], weighted["probs"], atol=1e-12)
    with pytest.raises(ValueError, match="2 classifier runs"):
        predictor.predict_study(series, runs, seg=seg, options=InferenceOptions(weights=[1.0]))
    with pytest.raises(ValueError, match="mean must be one of"):
        InferenceOptions(mean="median")


def test_flip_tta_mirrors_the_crops_in_the_same_batch(models, segmented, tmp_path):
    series, seg = segmented
    stand_in = recorder_model(models["cls"][0].config, tmp_path / "rec")
    plain = infer.classify_study(series.hu, seg, [stand_in], dz=float(series.spacing[0]))
    flipped = infer.classify_study(series.hu, seg, [stand_in], dz=float(series.spacing[0]),
                                  options=InferenceOptions(tta_flip=True))
    first, both = stand_in.model.seen
    assert both.shape[0] == 2 * first.shape[0] == 14  # one forward pass: 7 vertebrae x 2 views
    assert torch.equal(both[:7], first) and torch.equal(both[7:], first.flip(-1))  # left-right: the W axis
    assert torch.equal(stand_in.model.levels[1], torch.arange(7).repeat(2))  # both views keep their levels
    logit = 4.0 * (first[..., :first.shape[-1] // 2].mean((1, 2, 3, 4)) - first[..., first.shape[-1] // 2:].mean(
        (1, 2, 3, 4))).double().numpy()
    p, q = 1 / (1 + np.exp(-logit)), 1 / (1 + np.exp(logit))  # the mirrored view swaps the halves
    np.testing.assert_allclose(plain["probs"][1:], p, atol=1e-6)
    np.testing.assert_allclose(flipped["probs"][1:], (p + q) / 2, atol=1e-6)  # = 0.5: this model is odd in x
    assert not np.allclose(plain["probs"][1:], flipped["probs"][1:])


def test_a_fold_folder_is_a_run(trained, models, segmented):
    series, seg = segmented
    runs = load_runs([trained["cls"] / "fold1", trained["seg"]])
    assert [[m.fold for m in run] for run in runs] == [[1], [0, 1]]
    assert [run[0].provides for run in runs] == ["fractures", "vertebra_probs"]
    both = predictor.predict_study(series, [models["cls"]], seg=seg)
    one = predictor.predict_study(series, runs, seg=seg)
    np.testing.assert_allclose(one["probs"], both["models"][1]["probs"], atol=1e-12)
    assert resolve_runs([trained["cls"] / "fold0", trained["cls"] / "fold1"]) == [(trained["cls"], [0, 1])]
    with pytest.raises(FileNotFoundError, match="no fold"):
        resolve_runs([trained["cls"].parent])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_runs([trained["cls"] / "fold7"])


def test_the_predictor_factory_pickles_and_predicts_like_predict_study(trained, models, synthetic_root):
    import pickle

    from kit.submit.predictor import PredictorFactory

    factory = PredictorFactory((str(trained["seg_c1"]), str(trained["cls"])),
                               InferenceOptions(weights={"demo_cls": 2.0}), threads=1)
    worker = pickle.loads(pickle.dumps(factory))("cpu")  # what each device worker does
    study = sorted((synthetic_root / "test_images").iterdir())[1]
    series = read_series(study)
    expected = predictor.predict_study(series, [models["seg_c1"], models["cls"]])["probs"]
    prediction = worker(study.name, series)
    np.testing.assert_array_equal(prediction.probs, expected)
    (reason, detail), = prediction.notes  # the vertebrae stage 1 did not find, for the log
    assert reason == "vertebrae not found" and detail.startswith("C2: not found") and "C7" in detail


def check_submission(path: Path, root: Path) -> pd.DataFrame:
    from kit.io.rsna import studies_to_predict

    sub = pd.read_csv(path, dtype={"row_id": str})
    _, rows = studies_to_predict(root)
    assert list(sub.columns) == ["row_id", "fractured"]
    assert sub["row_id"].tolist() == rows["row_id"].tolist()  # every row once, in order
    assert np.isfinite(sub["fractured"]).all() and sub["fractured"].between(1e-4, 1 - 1e-4).all()
    return sub


@pytest.mark.slow  # ~35 s: three spawned workers (and their prefetch readers) each import torch and load the runs
def test_kit_submit_end_to_end_and_cpu_cpu_equals_one_device(trained, synthetic_root, tmp_path, capsys):
    from kit.cli import main

    out = tmp_path / "one" / "submission.csv"
    main(["submit", "--data-root", str(synthetic_root), "--runs", str(trained["seg_c1"]), str(trained["cls"]),
          "--out", str(out), "--devices", "cpu", "--threads", "1"])
    printed = capsys.readouterr().out
    # C2..C7 not found: their values come from the rule validation follows (kit.evaluate.metrics.fill_missing_vertebrae),
    # not from the writer's fallback; the log names them
    assert "submission: 2 studies, 2 predicted, 0 with fallbacks" in printed
    one = check_submission(out, synthetic_root)
    log = pd.read_csv(out.with_name("submission_log.csv"))
    assert (log["reason"] == "vertebrae not found").sum() == 2 and (log["fallback_values"] == 0).all()
    assert log["detail"].str.contains("C2").all()

    # two CPU workers, the runs read back from a kit export folder (export/*: manifest.json among them)
    from kit.submit.export import export_runs

    export_runs([trained["seg_c1"], trained["cls"]], tmp_path / "export")
    two = tmp_path / "two" / "submission.csv"
    summary = submit(synthetic_root, sorted((tmp_path / "export").iterdir()), two, devices=["cpu", "cpu"],
                     progress=False, threads=1)
    assert summary["devices"] == ["cpu", "cpu"] and summary["studies"] == 2
    pd.testing.assert_frame_equal(check_submission(two, synthetic_root), one)
    assert two.read_bytes() == out.read_bytes()


def test_submit_needs_both_stages(trained, synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="lack a segmenter run"):
        submit(synthetic_root, [trained["cls"]], tmp_path / "s.csv", devices=["cpu"], progress=False)
    # a broken calibration stops the run before any study, naming the file
    run = tmp_path / "demo_cls"
    shutil.copytree(trained["cls"], run)
    (run / "calibration.json").write_text('{"targets": {"C1": {"a": 1, "b": 0}}}')
    with pytest.raises(ValueError, match="calibration.json: no finite a, b"):
        submit(synthetic_root, [trained["seg"], run], tmp_path / "s.csv", devices=["cpu"], progress=False)
    assert not (tmp_path / "s.csv").exists()


def test_a_calibrated_run_maps_its_fold_mean_before_the_runs_are_combined(trained, segmented, tmp_path):
    from kit.evaluate.calibration import apply_calibration, write_calibration
    from kit.constants import TARGETS

    series, seg = segmented
    run = tmp_path / "demo_cls"
    shutil.copytree(trained["cls"], run)
    plain = predictor.predict_study(series, load_runs([run, trained["patient"]]), seg=seg)
    assert plain["calibrated_runs"] == []
    calibration = {t: {"a": 0.5, "b": -1.0} for t in TARGETS}
    write_calibration(run, calibration)
    calibrated = predictor.predict_study(series, load_runs([run, trained["patient"]]), seg=seg)
    assert len(calibrated["calibrated_runs"]) == 1
    cls_key = calibrated["calibrated_runs"][0]
    assert Path(cls_key).name == "demo_cls"
    patient_key = next(k for k in calibrated["runs"] if k != cls_key)
    np.testing.assert_allclose(calibrated["runs"][cls_key], apply_calibration(plain["runs"][cls_key], calibration),
                               atol=1e-12)
    np.testing.assert_allclose(calibrated["runs"][patient_key], plain["runs"][patient_key], atol=1e-12)
    # the two runs weigh 1/2 each, as without calibration
    np.testing.assert_allclose(calibrated["probs"], (calibrated["runs"][cls_key] + plain["runs"][patient_key]) / 2,
                               atol=1e-12)


def real_dicom_root(root: Path) -> Path:
    """A competition-layout folder of five test studies made of the real CT files shipped with pydicom.

    1.2.3.1: CT5N (five 16 px axial slices, 2.5 mm) plus the two CT2N scouts of the same study, another series;
    1.2.3.2: CT5N alone; 1.2.3.3: CT_small (one slice); 1.2.3.4: 693_J2KI (one JPEG 2000 slice, 512 px);
    1.2.3.5: J2K_pixelrep_mismatch and CT_small, two series of two sizes with a slice each.
    """
    from pydicom.data import get_testdata_file

    from kit.constants import TARGETS

    ct5n = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001"
    studies = {"1.2.3.1": sorted(ct5n.glob("CT5N/*")) + sorted(ct5n.glob("CT2N/*")),
               "1.2.3.2": sorted(ct5n.glob("CT5N/*")),
               "1.2.3.3": [get_testdata_file("CT_small.dcm")],
               "1.2.3.4": [get_testdata_file("693_J2KI.dcm")],
               "1.2.3.5": [get_testdata_file("J2K_pixelrep_mismatch.dcm"), get_testdata_file("CT_small.dcm")]}
    assert len(studies["1.2.3.2"]) == 5
    for uid, files in studies.items():
        (root / "test_images" / uid).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(f, root / "test_images" / uid / f"{i}.dcm")
    rows = [(f"{uid}_{t}", uid, t) for uid in studies for t in TARGETS]
    pd.DataFrame(rows, columns=["row_id", UID, "prediction_type"]).to_csv(root / "test.csv", index=False)
    pd.DataFrame({"row_id": [r[0] for r in rows], "fractured": 0.5}).to_csv(root / "sample_submission.csv",
                                                                            index=False)
    return root


def test_kit_submit_on_real_ct_files(trained, models, tmp_path):
    """Real DICOM (pydicom's CT test files) through `kit submit`: the stage-1 input, the crops cut from the
    original 16 px grid and the classifier run; a second series in the folder is skipped and logged, one-slice
    studies get the runs' fallback (the best constant of their training labels) with the reason; every row is
    written."""
    from kit.submit.predictor import run_fallback
    from kit.submit.submission import fallback_probs

    root = real_dicom_root(tmp_path / "real")
    out = tmp_path / "sub" / "submission.csv"

    def tree(*folders):  # every file with its size and mtime: Kaggle's inputs are read-only
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in Path(f).rglob("*")}

    inputs = (root, trained["seg_c1"], trained["cls"])
    before = tree(*inputs)
    summary = submit(root, [trained["seg_c1"], trained["cls"]], out, devices=["cpu"], progress=False, threads=1,
                     prefetch=False)
    assert tree(*inputs) == before  # nothing written beside the data or the runs
    assert summary["studies"] == 5
    sub = check_submission(out, root).set_index("row_id")["fractured"]
    log = pd.read_csv(out.with_name("submission_log.csv"), dtype={UID: str})
    reasons = {uid: sorted(log.loc[log[UID] == uid, "reason"]) for uid in log[UID].unique()}
    # the C1-everywhere segmenter finds C1 in the five-slice series: C1 from the classifier, C2..C7 valued as in
    # validation (and named in the log); the scouts of 1.2.3.1 are skipped, so it is predicted exactly like 1.2.3.2
    assert reasons["1.2.3.2"] == ["vertebrae not found"]
    assert reasons["1.2.3.1"] == ["read warnings", "vertebrae not found"]
    warned = log.loc[(log[UID] == "1.2.3.1") & (log["reason"] == "read warnings"), "detail"].item()
    assert warned.startswith("2 warning(s)") and warned.count("SeriesInstanceUID") == 2
    first, second = (sub[[f"{uid}_{t}" for t in ("patient_overall", *VERTEBRAE)]].to_numpy()
                     for uid in ("1.2.3.1", "1.2.3.2"))
    np.testing.assert_array_equal(first, second)
    priors = [scale_odds(m.model.train_prevalence.numpy(), m.model.metric_odds.numpy()) for m in models["cls"]]
    np.testing.assert_allclose(first[2:], np.mean(priors, 0)[2:])  # each fold's prior for C2..C7, averaged
    fallback = np.clip(fallback_probs(None, run_fallback([trained["cls"]])), 1e-4, 1 - 1e-4)
    np.testing.assert_allclose(fallback, np.mean(priors, 0), rtol=1e-6)  # the runs' best constant
    assert summary["fallback_source"] == "the runs' training labels"
    assert first[1] != pytest.approx(fallback[1])  # C1 answered by the classifier
    for uid in ("1.2.3.3", "1.2.3.4", "1.2.3.5"):
        assert reasons[uid] == ["too few slices"]
        np.testing.assert_allclose(sub[[f"{uid}_{t}" for t in ("patient_overall", *VERTEBRAE)]], fallback)


@pytest.mark.slow  # ~45 s: efficientnet_b3 U-Net, efficientnet_b0 level model and tf_efficientnetv2_s on CPU
def test_the_full_scale_configs_train_and_submit_at_a_small_size(synthetic_root, tmp_path):
    """What a Kaggle user runs: seg_unet_effb3_384, level_effb0_128 and cls_effv2s_224 as packaged (their
    backbones, heads, losses, schedules, bf16 setting, workers), only the image sizes, slice counts, batch and
    epochs shrunk: each trains a fold on the synthetic set, the crops are cut with its stage-1 runs, and
    `kit submit` predicts the test studies with the three."""
    from kit.io.cache import prepare_studies
    from kit.stage2.crop_cache import build_crops
    from kit.train import fit_fold

    cache, runs = tmp_path / "cache", tmp_path / "runs"
    prepare_studies(synthetic_root, cache, size=64, workers=1, progress=False)
    shared = {"out_dir": str(runs), "data.data_root": str(synthetic_root), "data.n_folds": 2, "data.fold": 0,
              "data.folds_csv": str(tmp_path / "folds.csv"), "train.epochs": 1, "train.progress": False,
              "train.device": "cpu", "train.threads": 1, "data.num_workers": 1, "data.image_size": 64}
    fit_fold(load_config("level_effb0_128", **shared, **{"data.cache_dir": str(cache), "data.seq_len": 16,
                                                          "data.repeats": 1, "train.batch_size": 2}))
    fit_fold(load_config("seg_unet_effb3_384", **shared, **{"data.cache_dir": str(cache), "train.batch_size": 4}))
    stage1 = [runs / "seg_unet_effb3_384", runs / "level_effb0_128"]
    cls = load_config("cls_effv2s_224", **shared, **{"data.crop_dir": str(tmp_path / "crops"),
                                                    "data.true_masks": True, "data.seg_runs": [str(r) for r in stage1],
                                                    "data.n_slices": 5, "train.batch_size": 4})
    assert (cls.model.encoder, cls.train.amp, cls.data.n_neighbours) == ("tf_efficientnetv2_s", "auto", 2)
    build_crops(cls, progress=False, prefetch=False)
    fit_fold(cls)
    for run in (*stage1, runs / "cls_effv2s_224"):
        assert (run / "fold0" / "model.pt").is_file() and (run / "fold0" / "oof.csv").is_file()

    out = tmp_path / "sub" / "submission.csv"
    summary = submit(synthetic_root, [*stage1, runs / "cls_effv2s_224"], out, devices=["cpu"], progress=False,
                     threads=1, prefetch=False)
    assert summary["studies"] == 2
    check_submission(out, synthetic_root)
    log = pd.read_csv(out.with_name("submission_log.csv"))
    assert not log["reason"].isin(["exception", "bad output", "worker died"]).any(), log.to_string()


def test_a_gpu_worker_makes_its_gpu_the_current_device(monkeypatch):
    """`--devices cuda:0 cuda:1`: the cuda:1 worker sets cuda:1 as its current device before loading (no GPU
    here: set_device and the loading are recorded, not run)."""
    from kit.submit import predictor

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(predictor, "load_runs", lambda runs, device: calls.append(("load", device)) or [])
    monkeypatch.setattr(predictor, "_stages", lambda runs: {})
    predictor.PredictorFactory(runs=("runs/demo_cls",))("cuda:1")
    assert calls == [("set_device", "cuda:1"), ("load", "cuda:1")]
    calls.clear()
    predictor.PredictorFactory(runs=("runs/demo_cls",))("cpu")
    assert calls == [("load", "cpu")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inference_matches_float32(models, synthetic_root, monkeypatch, dtype):
    """The GPU path's autocast (fp16 on a T4, bf16 on newer GPUs), emulated by a CPU autocast: the segmenter, the
    level-free stage 1 and both classifiers run in it without a dtype error and give float32's answer."""
    study = sorted((synthetic_root / "test_images").iterdir())[0]
    runs = [models["seg_c1"], models["cls"], models["patient"]]
    full = predictor.predict_study(study, runs)
    for module in (stage1_infer, infer):
        monkeypatch.setattr(module, "autocast", lambda device, amp: torch.autocast("cpu", dtype=dtype))
    half = predictor.predict_study(study, runs, InferenceOptions(amp=True))
    assert half["found"].tolist() == full["found"].tolist() == [True] + [False] * 6
    np.testing.assert_allclose(half["probs"], full["probs"], atol=1e-2)
    assert not np.array_equal(half["probs"][:2], full["probs"][:2])  # it did run in half precision


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "tta_flip"])
def test_folds_that_share_a_cnn_run_it_once_with_the_same_answers(models, segmented, flip):
    """Two folds with one slice CNN (a frozen backbone) but their own GRU, heads and level offsets: the ensemble runs
    the CNN once per study and each fold's 8 values are those it gives alone; a third fold whose CNN differs by
    one weight runs its own."""
    import copy

    series, seg = segmented
    a = copy.deepcopy(models["cls"][0])
    a.config.data.tta_flip = flip
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.model.level_bias.add_(torch.linspace(-1.0, 1.0, 7))
        b.model.logit_head.weight.mul_(-2.0)
        for p in b.model.gru.parameters():
            p.mul_(0.5)
    c = copy.deepcopy(a)
    assert infer.cnn_digest(a.model) == infer.cnn_digest(b.model) == infer.cnn_digest(c.model)
    with torch.no_grad():
        next(c.model.cnn.parameters()).view(-1)[0] += 0.25
    assert infer.cnn_digest(c.model) != infer.cnn_digest(a.model)  # an in-place change is seen
    calls = {}
    for name, m in {"a": a, "b": b, "c": c}.items():
        m.model.cnn.register_forward_hook(lambda *_, name=name: calls.update({name: calls.get(name, 0) + 1}))
    dz = float(series.spacing[0])
    together = infer.classify_study(series.hu, seg, [a, b, c], dz=dz)
    assert calls == {"a": 1, "c": 1}  # b took a's features
    alone = [infer.classify_study(series.hu, seg, [m], dz=dz)["probs"] for m in (a, b, c)]
    for got, want in zip(together["models"], alone):
        np.testing.assert_allclose(got["probs"], want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(alone[0], alone[1], atol=1e-4)  # b is a different fold


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "tta_flip"])
@pytest.mark.parametrize("name", ["cls", "patient"])
def test_a_missing_vertebra_counts_the_same_in_validation_and_in_the_submission(models, segmented, name, flip):
    """C7 not found by stage 1: the fold's validation (`ClsTask.predict_study`, what the OOF table holds) and
    inference (`classify_study`, what the submission writes) give the same 8 values, C7 its training prevalence at
    the metric's odds and counted in patient_overall (a per-vertebra model) — one rule,
    `kit.evaluate.metrics.fill_missing_vertebrae`. (Inference used to leave C7 NaN and patient_overall without it.)
    With `data.tta_flip` both average the crops and their mirror alike."""
    import copy
    from contextlib import nullcontext

    from kit.tasks import ClsTask

    series, seg = segmented
    labels = np.where(seg.labels == 7, 0, seg.labels).astype(np.uint8)
    extents = vertebra_extents(labels)
    seg7 = SegResult(uid=seg.uid, labels=labels, extents=extents, missing=missing_vertebrae(extents),
                     orig_hw=seg.orig_hw)
    m = copy.deepcopy(models[name][0])
    m.config.data.tta_flip = flip
    prevalence = np.array([0.5, 0.1, 0.2, 0.05, 0.1, 0.1, 0.2, 0.3])  # as init_model would have set them
    odds = np.array([1.3, 1.2, 1.1, 1.0, 1.5, 1.2, 1.4, 1.25])
    vertebra = m.model.vertebra if name == "patient" else m.model
    vertebra.train_prevalence.copy_(torch.from_numpy(prevalence))
    vertebra.metric_odds.copy_(torch.from_numpy(odds))
    d = m.config.data
    stacks, found, _ = m.config.recipe().crop_study(series.hu, labels, extents, dz=float(series.spacing[0]))
    assert found[:6].all() and not found[6]
    sample = {"image": torch.from_numpy(stacks), "found": torch.from_numpy(found),
              "mask": torch.from_numpy(np.repeat(found[:, None], d.n_slices, 1)),
              "vertebra_mask": torch.from_numpy(found)}
    logits, _ = ClsTask(m.config).predict_study(m.model, sample, torch.device("cpu"), nullcontext)
    validation = torch.sigmoid(logits.double()).numpy()
    submission = infer.classify_study(series.hu, seg7, [m], dz=float(series.spacing[0]))["probs"]
    np.testing.assert_allclose(submission, validation, rtol=1e-5, atol=1e-6)
    assert np.isfinite(submission).all()
    if flip:  # the mirrored view counted: not the plain answer
        m.config.data.tta_flip = False
        plain = infer.classify_study(series.hu, seg7, [m], dz=float(series.spacing[0]))["probs"]
        assert not np.allclose(plain[1:7], submission[1:7], rtol=0, atol=1e-7)
    assert submission[7] == pytest.approx(scale_odds(prevalence[7], odds[7]))
    if name == "cls":  # patient_overall from the vertebrae, C7's prevalence in the product
        chance = scale_odds(submission[1:7], 1 / odds[1:7])
        assert submission[0] == pytest.approx(scale_odds(1 - np.prod(1 - chance) * (1 - prevalence[7]), odds[0]),
                                              rel=1e-6)
