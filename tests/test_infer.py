"""kit.runs and kit.stage1.infer: checkpoints -> load_run -> segment_study / segment_studies, on tiny models and volumes (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kit import runs
from kit.stage1 import infer
from kit.stage1.results import SegResult, load_seg_result, save_seg_result
from kit.stage1.runner import segment_studies
from kit.constants import LEVELS, VERTEBRAE
from kit.models import create_model


class TinySeg(nn.Module):
    """Stand-in 2.5D segmenter: x (B, 2k+1, H, W) -> logits (B, C, H, W), one 3x3 conv."""

    def __init__(self, in_chans: int = 3, classes: int = 8, pretrained: bool = False):
        super().__init__()
        assert not pretrained, "inference must build models with pretrained weights off"
        self.conv = nn.Conv2d(in_chans, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * 8.0 - 4.0)


# stage-1 probabilities are stored as uint8 in steps of 1/255 (kit.stage1.infer.predict_vertebra_probs)
HALF_STEP = 0.5 / 255 + 1e-4  # a stored probability against the exact one: rounding, plus float noise
ONE_STEP = 1 / 255 + 1e-4  # two stored ones whose float inputs differ by noise may round to neighbouring steps

def tiny_create_model(name: str, **kwargs) -> nn.Module:
    if name.startswith("level_"):  # real level models: small enough as they are
        return create_model(name, **kwargs)
    if name != "tiny_seg":
        raise ValueError(f"unknown model {name!r}; available: tiny_seg")
    return TinySeg(**kwargs)


@pytest.fixture
def registry(monkeypatch):
    """Point kit.models.create_model at the stand-in (so these tests do not depend on smp sizes)."""
    import kit.models

    monkeypatch.setattr(kit.models, "create_model", tiny_create_model)


def write_checkpoint(run_dir, fold: int, *, seed: int, offsets_mm=(-1.0, 0.0, 1.0), size: int = 32,
                     nan: bool = False, level_input: bool = False, level_margin_mm: float = 0.0):
    torch.manual_seed(seed)
    channels = len(offsets_mm) + 7 * level_input
    model = TinySeg(channels, 8)
    state = model.state_dict()
    if nan:
        state["conv.weight"][0, 0, 0, 0] = float("nan")
    config = {"name": run_dir.name, "data": {"image_size": size, "fold": fold, "slice_offsets_mm": list(offsets_mm),
                                             "level_input": level_input, "level_margin_mm": level_margin_mm},
              "model": {"name": "tiny_seg"}}
    path = run_dir / f"fold{fold}" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "model_name": "tiny_seg",
                "model_kwargs": {"in_chans": channels, "classes": 8, "pretrained": True},
                "config": config, "epoch": 3, "metric": 0.5 + fold}, path)
    return path


def cached(vol: np.ndarray, dz: float = 1.0) -> dict:
    """A prepared volume in the cache's form, with its slice spacing."""
    return {"image": vol, "spacing": np.array([dz, 1.0, 1.0], dtype=np.float32)}


def toy_volume(z: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (Z, S, S): smooth noise plus a bright column, so a conv gives varied probabilities."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(0, 60, size=(z, size, size)).astype(np.uint8)
    vol[:, 10:20, 12:22] += 150
    return vol


def sigmoid_at(model: nn.Module, vol: np.ndarray, z: int, k: int, step: int = 1, offsets=None) -> np.ndarray:
    offsets = np.arange(-k * step, k * step + 1, step) if offsets is None else np.asarray(offsets)
    idx = np.clip(z + offsets, 0, vol.shape[0] - 1)
    x = torch.from_numpy(vol[idx]).float()[None] / 255.0
    with torch.no_grad():
        return torch.sigmoid(model(x))[0, :7].numpy()  # (7, S, S)


def test_load_run_round_trip(registry, tmp_path):
    run = tmp_path / "runs" / "tiny"
    write_checkpoint(run, 0, seed=0)
    write_checkpoint(run, 1, seed=1)
    models = runs.load_run(run)
    assert [m.fold for m in models] == [0, 1]
    m = models[0]
    assert not m.model.training and m.image_size == 32 and m.recipe.offsets(1.0).tolist() == [-1, 0, 1]
    assert m.window == "bone" and m.config.data.fold == 0 and m.provides == "vertebra_probs"
    assert (m.epoch, m.metric, m.model_name) == (3, 0.5, "tiny_seg")
    saved = torch.load(run / "fold0" / "model.pt", weights_only=True)["model"]
    for key, value in m.model.state_dict().items():
        assert torch.equal(value, saved[key])
    assert [m.fold for m in runs.load_run(run, folds=[1])] == [1]


def test_real_segmenter_checkpoint_round_trip(tmp_path):
    """A checkpoint of a registry segmenter with a config from kit.config: load_run + segment_study."""
    from kit.config import config_from_dict, config_to_dict
    from kit.models import create_model

    cfg = config_from_dict({"name": "tiny_unet", "data": {"image_size": 32, "slice_offsets_mm": [-1, 0, 1]}})
    kwargs = {"in_channels": 3, "classes": 8, "encoder": "tu-resnet10t", "encoder_depth": 3,
              "decoder_width": 16, "pretrained_weights": None}
    torch.manual_seed(0)
    model = create_model("seg_unet", **kwargs)
    path = tmp_path / cfg.name / "fold0" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_name": "seg_unet", "model_kwargs": kwargs,
                "config": config_to_dict(cfg), "epoch": 1, "metric": 0.1}, path)
    (loaded,) = runs.load_run(tmp_path / cfg.name)
    assert (loaded.image_size, loaded.fold) == (32, 0) and not loaded.model.training
    assert loaded.config == cfg  # the typed config comes back
    vol = toy_volume(z=6)
    result = infer.segment_study(cached(vol), [loaded], batch_size=4, keep_probs=True)
    model.eval()
    np.testing.assert_allclose(infer.probs_to_float(result.probs[:, 3]), sigmoid_at(model, vol, 3, 1), atol=HALF_STEP)
    assert result.labels.shape == (6, 32, 32)


def test_load_run_errors_name_the_file(registry, tmp_path):
    run = tmp_path / "tiny"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.load_run(run)
    write_checkpoint(run, 0, seed=0)
    with pytest.raises(FileNotFoundError, match=r"fold3[/\\]model\.pt"):
        runs.load_run(run, folds=[0, 3])
    bad = run / "fold1" / "model.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"fold1[/\\]model\.pt"):
        runs.load_run(run)
    torch.save({"model": {}}, bad)
    with pytest.raises(RuntimeError, match="lacks"):
        runs.load_run(run, folds=[1])
    ckpt = torch.load(run / "fold0" / "model.pt", weights_only=True)
    torch.save({**ckpt, "model_name": "nope"}, bad)
    with pytest.raises(RuntimeError, match=r"fold1[/\\]model\.pt: cannot rebuild nope"):
        runs.load_run(run, folds=[1])
    del ckpt["model"]["conv.bias"]
    torch.save(ckpt, bad)
    with pytest.raises(RuntimeError, match="conv.bias"):
        runs.load_run(run, folds=[1])


def test_segment_study_ensemble_and_batching(registry, tmp_path):
    run = tmp_path / "tiny"
    write_checkpoint(run, 0, seed=0)
    write_checkpoint(run, 1, seed=1, offsets_mm=(-2.0, -1.0, 0.0, 1.0, 2.0))  # folds may differ in their slices
    models = runs.load_run(run)
    vol = toy_volume()
    result = infer.segment_study(cached(vol), models, batch_size=5, keep_probs=True, uid="s1")
    assert result.uid == "s1" and result.labels.shape == vol.shape and result.labels.dtype == np.uint8
    assert result.probs.shape == (7, *vol.shape) and result.probs.dtype == np.uint8
    assert set(result.extents) | set(result.missing) == set(VERTEBRAE)
    assert set(np.unique(result.labels)) <= set(range(8))
    assert result.timing["slices_per_s"] > 0 and result.timing["forward_s"] > 0
    # Ensemble = mean of the two folds' sigmoids, with stacks clamped at both ends of the volume.
    for z in (0, 1, 12, 23):
        expected = (sigmoid_at(models[0].model, vol, z, 1) + sigmoid_at(models[1].model, vol, z, 2)) / 2
        np.testing.assert_allclose(infer.probs_to_float(result.probs[:, z]), expected, atol=HALF_STEP)
    spread = infer.probs_to_float(result.probs)
    assert spread.min() < 0.4 and spread.max() > 0.6  # not a constant output
    # Batch size does not change the result.
    other = infer.segment_study(cached(vol), models, batch_size=24, keep_probs=True)
    np.testing.assert_allclose(infer.probs_to_float(other.probs), infer.probs_to_float(result.probs), atol=ONE_STEP)
    assert (other.labels != result.labels).mean() < 1e-3


def test_folds_with_one_recipe_share_each_batch_input(registry, tmp_path, monkeypatch):
    from kit.stage1.recipe import SegRecipe

    run = tmp_path / "tiny"
    for fold in (0, 1, 2):
        write_checkpoint(run, fold, seed=fold, offsets_mm=(-2.0, 0.0, 2.0) if fold == 2 else (-1.0, 0.0, 1.0))
    models = runs.load_run(run)
    vol = toy_volume()
    built = []
    inputs = SegRecipe.inputs
    monkeypatch.setattr(SegRecipe, "inputs", lambda self, *a, **k: built.append(self) or inputs(self, *a, **k))
    probs = infer.probs_to_float(infer.predict_vertebra_probs(vol, models, batch_size=10, dz=1.0))
    assert len(built) == 3 * 2  # 3 batches x 2 recipes, not x 3 models
    for z in (0, 11, 23):
        expected = (sigmoid_at(models[0].model, vol, z, 1) + sigmoid_at(models[1].model, vol, z, 1)
                    + sigmoid_at(models[2].model, vol, z, 1, step=2)) / 3
        np.testing.assert_allclose(probs[:, z], expected, atol=HALF_STEP)


def test_segment_study_input_size_and_nan(registry, tmp_path):
    run = tmp_path / "tiny"
    write_checkpoint(run, 0, seed=0, size=32)
    models = runs.load_run(run)
    study = {"image": toy_volume(z=10, size=64), "instance_numbers": np.arange(10, 0, -1),
             "orig_hw": np.array([128, 128]), "spacing": np.array([1.0, 0.5, 0.5])}
    result = infer.segment_study(study, models)  # 64 px cache, 32 px model: resized in-plane
    assert result.labels.shape == (10, 32, 32) and result.scale == (4.0, 4.0)
    assert result.spacing == (1.0, 1.0, 1.0)
    nan_run = tmp_path / "nan"
    write_checkpoint(nan_run, 0, seed=0, nan=True)
    with pytest.raises(infer.SegmentationError, match="study bad-study: NaN"):
        infer.segment_study(cached(toy_volume()), runs.load_run(nan_run), uid="bad-study")
    with pytest.raises(ValueError, match="uint8"):
        infer.segment_study(toy_volume().astype(np.float32), models)
    with pytest.raises(ValueError, match="slice spacing is needed"):
        infer.segment_study(toy_volume(), models)  # a bare array: no spacing for the offsets in mm


def test_save_and_load_seg_result(tmp_path):
    labels = np.zeros((12, 16, 16), np.uint8)
    labels[2:5, 4:8, 6:10] = 1
    labels[6:10, 5:9, 6:11] = 2
    from kit.stage1.postprocess import vertebra_extents

    extents = vertebra_extents(labels, (1.0, 2.0, 2.0))
    result = SegResult(uid="u1", labels=labels, extents=extents, missing=list(VERTEBRAE[2:]),
                             dropped={"C5": "centroid z=1.0 out of head-to-feet order"},
                             timing={"total_s": 0.1}, orig_hw=(64, 64),
                             instance_numbers=np.arange(101, 113), spacing=(1.0, 2.0, 2.0))
    json_path = save_seg_result(result, tmp_path / "u1")
    info = json.loads(json_path.read_text())
    c2 = info["vertebrae"]["C2"]
    assert (c2["z_first"], c2["z_last"], c2["box"]) == (6, 9, [5, 9, 6, 11])
    assert c2["box_original"] == [20, 36, 24, 44] and c2["instance_numbers"] == [107, 110]
    assert info["vertebrae"]["C3"] == {"found": False} and info["scale"] == [4.0, 4.0]
    back = load_seg_result(tmp_path / "u1.json")
    np.testing.assert_array_equal(back.labels, labels)
    assert back.missing == result.missing and back.dropped == result.dropped
    for name, e in extents.items():
        b = back.extents[name]
        assert (b.z_first, b.z_last, b.y0, b.y1, b.x0, b.x1, b.voxels) == (
            e.z_first, e.z_last, e.y0, e.y1, e.x0, e.x1, e.voxels)
        np.testing.assert_array_equal(b.slice_voxels, e.slice_voxels)
    table = back.table()
    assert list(table.index) == list(VERTEBRAE) and table.loc["C1", "found"] and not table.loc["C7", "found"]


def test_segment_studies_is_resumable_and_reports_failures(registry, tmp_path):
    run = tmp_path / "tiny"
    write_checkpoint(run, 0, seed=0)
    cache = tmp_path / "cache"
    cache.mkdir()
    for i in range(3):
        np.savez_compressed(cache / f"1.2.{i}.npz", image=toy_volume(z=8 + i, seed=i),
                            instance_numbers=np.arange(1, 9 + i), orig_hw=np.array([32, 32]),
                            spacing=np.array([1.0, 1.0, 1.0]))
    (cache / "1.2.9.npz").write_bytes(b"corrupt")
    out = tmp_path / "seg"
    first = segment_studies(cache, [run], out, progress=False)
    assert (first["segmented"], first["skipped"], first["failed"]) == (3, 0, 1)
    assert list(first["failures"]) == ["1.2.9"]
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert list(failures["StudyInstanceUID"]) == ["1.2.9"] and failures["error"].str.len().min() > 0
    summary = pd.read_csv(out / "summary.csv", dtype={"StudyInstanceUID": str})
    assert list(summary["StudyInstanceUID"]) == ["1.2.0", "1.2.1", "1.2.2"]
    assert list(summary["slices"]) == [8, 9, 10]
    if first["missing"]:
        missing = pd.read_csv(out / "missing.csv", dtype=str)
        assert set(missing["StudyInstanceUID"]) == set(first["missing"])
    assert load_seg_result(out / "1.2.1").labels.shape == (9, 32, 32)
    second = segment_studies(cache, [run], out, progress=False)
    assert (second["segmented"], second["skipped"], second["failed"]) == (0, 3, 1)
    # Fix the broken study: it is segmented and leaves failures.csv.
    np.savez_compressed(cache / "1.2.9.npz", image=toy_volume(z=6), spacing=np.array([1.0, 1.0, 1.0]))
    third = segment_studies(cache, run, out, progress=False, prefetch=False)
    assert (third["segmented"], third["skipped"], third["failed"]) == (1, 3, 0)
    assert pd.read_csv(out / "failures.csv").empty


def test_segment_studies_from_dicom_matches_prepared_arrays(registry, synthetic_root, tmp_path):
    """A data root in RSNA layout is read with kit.io.dicom, windowed and resized as the cache does."""
    from kit.io.cache import prepare_study
    from kit.io.dicom import read_series

    run = tmp_path / "tiny"
    write_checkpoint(run, 0, seed=0, size=32)
    out = tmp_path / "seg"
    summary = segment_studies(synthetic_root, run, out, split="test", progress=False)
    uids = sorted(p.name for p in (synthetic_root / "test_images").iterdir())
    assert (summary["segmented"], summary["failed"]) == (len(uids), 0)
    uid = uids[0]
    series = read_series(synthetic_root / "test_images" / uid)
    saved = load_seg_result(out / uid)
    assert saved.uid == uid and saved.labels.shape == (series.hu.shape[0], 32, 32)
    assert saved.scale == (series.hu.shape[1] / 32, series.hu.shape[2] / 32)
    np.testing.assert_array_equal(saved.instance_numbers, series.instance_numbers)
    prepare_study(synthetic_root / "test_images" / uid, tmp_path / "cache" / f"{uid}.npz", size=32)
    cached = np.load(tmp_path / "cache" / f"{uid}.npz")
    from_cache = infer.segment_study({"image": cached["image"], "spacing": cached["spacing"]}, runs.load_run(run))
    np.testing.assert_array_equal(from_cache.labels, saved.labels)


def test_bench_seg_table(capsys):
    from kit.tools.bench import bench_seg

    result = bench_seg(("demo_seg",), (2, 4, 6), device="cpu", batch_size=4)
    rows = result["rows"]
    assert [r["slices"] for r in rows] == [2, 4, 6] and [r["slices_ratio"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["slices_per_s"] > 0 and r["image_size"] == 128 for r in rows)
    assert "random" in result["weights"] and "slices/s" in capsys.readouterr().out


def test_segment_study_uses_the_training_offsets_in_mm(registry, tmp_path):
    """A model sees the offsets in mm it was trained with, rounded to the study's slices."""
    run = tmp_path / "offsets"
    write_checkpoint(run, 0, seed=2, offsets_mm=(-6.0, -1.0, 0.0, 1.0, 6.0))
    models = runs.load_run(run)
    assert models[0].recipe.offsets(0.5).tolist() == [-12, -2, 0, 2, 12]
    assert models[0].recipe.offsets(1.0).tolist() == [-6, -1, 0, 1, 6]
    assert models[0].recipe.offsets(2.5).tolist() == [-2, -1, 0, 1, 2]  # small offsets keep at least one slice
    vol = toy_volume()
    result = infer.segment_study(cached(vol, 0.5), models, keep_probs=True, uid="offsets")
    for z in (0, 3, 12, 23):
        expected = sigmoid_at(models[0].model, vol, z, 0, offsets=[-12, -2, 0, 2, 12])
        np.testing.assert_allclose(infer.probs_to_float(result.probs[:, z]), expected, atol=HALF_STEP)


def test_old_configs_fail_with_the_new_key_named(registry, tmp_path):
    path = write_checkpoint(tmp_path / "old", 0, seed=0)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["data"]["context"] = 2
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="data.context.*replaced by data.slice_offsets_mm"):
        runs.load_run(tmp_path / "old")


def write_level_checkpoint(run_dir, fold: int = 0, *, slice_mm: float = 2.0, size: int = 32) -> None:
    torch.manual_seed(5)
    kwargs = {"in_channels": 3, "classes": 7, "encoder": "mobilenetv3_small_050", "hidden": 8}
    model = create_model("level_gru", **kwargs)
    config = {"name": run_dir.name, "task": "level",
              "data": {"image_size": size, "slice_mm": slice_mm, "neighbours": 1, "fold": fold, "window": "bone"}}
    path = run_dir / f"fold{fold}" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_name": "level_gru", "model_kwargs": kwargs, "config": config,
                "epoch": 1, "metric": 0.5}, path)


def test_fuse_levels_lets_the_level_model_name_the_vertebra():
    probs = np.zeros((7, 3, 1, 2), np.float32)
    levels = np.zeros((7, 3), np.float32)
    probs[2:4, 0, 0, 0] = 0.8  # slice 0, pixel 0: the segmenter calls it C3 and C4 alike ...
    levels[3, 0] = 0.9  # ... and the level model finds only C4 in slice 0
    probs[2, 0, 0, 1] = 0.7  # pixel 1: only C3 claims it: kept whatever the level model says
    probs[[0, 1], 1, 0, 0] = [0.6, 0.2]  # slice 1: the level model says nothing (L = 0 everywhere)
    probs[4:6, 2, 0, 0] = [0.9, 0.3]  # slice 2: both present per the level model, 1:1
    levels[4:6, 2] = 1.0
    out = infer.fuse_levels(torch.from_numpy(probs), torch.from_numpy(levels)).numpy()
    assert out.shape == probs.shape and out.dtype == np.float32
    # C4 takes the foreground 0.8: 0.8 x 0.8*0.9 / (0.8*0.9 + 0.8*0.001)
    np.testing.assert_allclose(out[3, 0, 0, 0], 0.8 * 0.72 / (0.72 + 0.0008), atol=1e-3)
    assert out[2, 0, 0, 0] < 0.01
    np.testing.assert_allclose(out[2, 0, 0, 1], 0.7, atol=1e-3)
    np.testing.assert_allclose(out[:2, 1, 0, 0], [0.6 * 0.6 / 0.8, 0.6 * 0.2 / 0.8], atol=1e-3)
    np.testing.assert_allclose(out[4:6, 2, 0, 0], [0.9 * 0.9 / 1.2, 0.9 * 0.3 / 1.2], atol=1e-3)
    assert out[6].sum() == 0 and out[:, :, 0, 1][[0, 1, 3, 4, 5, 6]].sum() == 0  # nothing appears from nowhere


def test_fuse_levels_works_slice_by_slice_in_the_tensors_dtype():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.random((7, 9, 16, 16), dtype=np.float32))
    levels = torch.from_numpy(rng.random((7, 9)).astype(np.float32))
    # the formula, written out for one pixel
    p, lv = probs[:, 4, 3, 5].numpy(), np.clip(levels[:, 4].numpy(), 1e-3, 1.0)
    np.testing.assert_allclose(infer.fuse_levels(probs, levels)[:, 4, 3, 5].numpy(), p.max() * p * lv / (p * lv).sum(),
                               rtol=1e-6)
    # each slice depends on its own presence only, so batches of any size give the same values
    whole = infer.fuse_levels(probs, levels)
    parts = torch.cat([infer.fuse_levels(probs[:, z:z + 2], levels[:, z:z + 2]) for z in range(0, 9, 2)], dim=1)
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    assert infer.fuse_levels(probs.half(), levels).dtype == torch.float16


def test_stage1_batch_size_bounds_cpu_pixels_and_probs_to_float():
    assert infer.stage1_batch_size(384, "cpu") == 4  # ~0.3 GB of Unet activations, not ~1.1 GB at 16
    assert infer.stage1_batch_size(128, None) == 32  # capped
    assert infer.stage1_batch_size(2048, "cpu") == 1
    assert infer.stage1_batch_size(384, "cuda:0") == infer.GPU_BATCH_SIZE
    stored = np.array([0, 127, 128, 255], np.uint8)
    np.testing.assert_allclose(infer.probs_to_float(stored), [0, 127 / 255, 128 / 255, 1])
    assert infer.probs_to_float(np.array([0.25], np.float16)).dtype == np.float32


def test_segment_study_fuses_the_level_model(registry, tmp_path):
    write_checkpoint(tmp_path / "seg", 0, seed=0)
    write_level_checkpoint(tmp_path / "level", slice_mm=2.0)
    seg, levels = runs.load_run(tmp_path / "seg"), runs.load_run(tmp_path / "level")
    vol = toy_volume()
    study = cached(vol)
    presence = infer.predict_levels(vol, 1.0, levels)
    assert presence.shape == (7, len(vol)) and ((presence > 0) & (presence < 1)).all()
    # at the model's own steps (every 2nd slice) the presence is the model's sigmoid on the stacked steps, the
    # mean of the study's and its left-right mirror's (data.tta_flip, on by default)
    assert levels[0].provides == LEVELS and levels[0].recipe.tta_flip
    grid = np.arange(0, len(vol), 2)
    steps = np.clip(np.arange(len(grid))[:, None] + np.arange(-1, 2), 0, len(grid) - 1)
    with torch.no_grad():
        x = torch.from_numpy(vol[grid[steps]]).float()[None] / 255.0
        direct = torch.sigmoid(levels[0].model(x))[0].numpy()
        mirrored = torch.sigmoid(levels[0].model(x.flip(-1)))[0].numpy()
    assert np.abs(direct - mirrored).max() > 1e-4  # the toy model is not symmetric: the mirror matters
    np.testing.assert_allclose(presence[:, grid], ((direct + mirrored) / 2).T, atol=1e-5)
    unflipped = runs.load_run(tmp_path / "level")
    unflipped[0].config.data.tta_flip = False
    np.testing.assert_allclose(infer.predict_levels(vol, 1.0, unflipped)[:, grid], direct.T, atol=1e-5)
    plain = infer.segment_study(study, seg, keep_probs=True, uid="plain")
    fused = infer.segment_study(study, seg, keep_probs=True, uid="fused", levels=levels)
    reference = infer.fuse_levels(torch.from_numpy(infer.probs_to_float(plain.probs)), torch.from_numpy(presence))
    np.testing.assert_allclose(infer.probs_to_float(fused.probs), reference.numpy(), atol=ONE_STEP)
    # fused batch by batch: the batch size does not change the result
    small = infer.segment_study(study, seg, keep_probs=True, uid="fused", levels=levels, batch_size=3)
    np.testing.assert_array_equal(small.probs, fused.probs)
    with pytest.raises(ValueError, match="fuse=True needs levels"):
        infer.predict_vertebra_probs(vol, seg, dz=1.0, fuse=True)
    with pytest.raises(ValueError, match="slice spacing"):
        infer.predict_levels(vol, None, levels)


def test_level_conditioned_segmenter_gets_the_level_planes(registry, tmp_path):
    """data.level_input: the level model's presence, made into planes by the run's recipe (as training makes them
    from the true ranges), goes in as 7 constant planes after the slices."""
    write_checkpoint(tmp_path / "seg", 0, seed=3, level_input=True)
    write_level_checkpoint(tmp_path / "level", slice_mm=2.0)
    seg, levels = runs.load_run(tmp_path / "seg"), runs.load_run(tmp_path / "level")
    assert seg[0].recipe.level_input and levels[0].provides == LEVELS
    vol = toy_volume()
    study = cached(vol)
    presence = infer.predict_levels(vol, 1.0, levels)
    probs = infer.probs_to_float(infer.predict_vertebra_probs(vol, seg, dz=1.0, levels=presence))
    planes = seg[0].recipe.planes(presence, 1.0)
    for z in (0, 7, 23):
        x = np.concatenate([vol[np.clip(z + np.arange(-1, 2), 0, len(vol) - 1)] / 255.0,
                            np.broadcast_to(planes[:, z, None, None], (7, *vol.shape[1:]))])
        with torch.no_grad():
            expected = torch.sigmoid(seg[0].model(torch.from_numpy(x).float()[None]))[0, :7].numpy()
        np.testing.assert_allclose(probs[:, z], expected, atol=HALF_STEP)
    # the planes matter: other presences, other probabilities
    other = infer.probs_to_float(infer.predict_vertebra_probs(vol, seg, dz=1.0, levels=presence[::-1].copy()))
    assert np.abs(other - probs).max() > 1e-3
    with pytest.raises(ValueError, match="conditioned on the level model"):
        infer.predict_vertebra_probs(vol, seg, dz=1.0)
    with pytest.raises(ValueError, match="levels"):
        infer.predict_vertebra_probs(vol, seg, dz=1.0, levels=presence[:, :5])
    with pytest.raises(ValueError, match="conditioned on the level model"):
        infer.segment_study(study, seg, uid="no-levels")
    # segment_study: the level run's presence goes in; no fusion on top by default (fuse=True adds it)
    result = infer.segment_study(study, [seg, levels], keep_probs=True, uid="with-levels")
    np.testing.assert_allclose(infer.probs_to_float(result.probs), probs, atol=ONE_STEP)
    fused = infer.segment_study(study, seg, levels=levels, fuse=True, keep_probs=True, uid="fused")
    np.testing.assert_allclose(infer.probs_to_float(fused.probs),
                               infer.fuse_levels(torch.from_numpy(probs), torch.from_numpy(presence)).numpy(),
                               atol=ONE_STEP)
    # or a presence array in place of level models, e.g. the true ranges
    given = infer.segment_study(study, seg, levels=presence, keep_probs=True, uid="given")
    np.testing.assert_allclose(infer.probs_to_float(given.probs), probs, atol=ONE_STEP)


def test_a_run_trained_with_checkpointing_loads_without_it(tmp_path):
    """grad_checkpointing is a training-time memory trade: `load_run` rebuilds the model with it off."""
    from kit.config import config_to_dict, load_config, save_config
    from kit.models import create_model

    cfg = load_config("demo_cls", **{"model.grad_checkpointing": True, "out_dir": str(tmp_path)})
    name, kwargs = cfg.model_spec()
    model = create_model(name, **kwargs)
    assert model.cnn.grad_checkpointing
    (tmp_path / "demo_cls" / "fold0").mkdir(parents=True)
    save_config(cfg, tmp_path / "demo_cls" / "fold0" / "config.yaml")
    torch.save({"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs,
                "config": config_to_dict(cfg), "epoch": 1, "metric": 0.0}, tmp_path / "demo_cls" / "fold0" / "model.pt")
    loaded = runs.load_run(tmp_path / "demo_cls")[0]
    assert not loaded.model.cnn.grad_checkpointing
    x = torch.rand(1, cfg.data.n_slices, cfg.in_channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)["logit"], model.eval()(x)["logit"])
