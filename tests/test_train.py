"""kit.train: a complete run, resume after an interruption, early stopping, 2-process DDP on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from seg_fixtures import make_cache, tiny_overrides

from kit.config import load_config, save_config
from kit.models import load_checkpoint
from kit.losses import seg_loss
from kit.tasks import SegTask
from kit.train import amp_dtype, fit_fold, loader_workers

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """6 segmented studies + 1 without a mask, 3 folds: fold 0 holds out 2 segmented studies."""
    root = tmp_path_factory.mktemp("segcache")
    uids, folds_csv = make_cache(root / "cache", n_studies=6, n_unsegmented=1, n_folds=3, z=24, size=64)
    return root / "cache", folds_csv, uids


def tiny_cfg(cache, out_dir, **extra):
    cache_dir, folds_csv, _ = cache
    return load_config("demo_seg", **tiny_overrides(cache_dir, folds_csv, out_dir, **extra))


def tiny_level_cfg(cache_dir, folds_csv, out_dir, **extra):
    """demo_level as a seconds-long CPU run on a `make_cache` cache: 32 px, windows of 8 steps, one epoch."""
    return load_config("demo_level", **{"data.cache_dir": str(cache_dir), "data.folds_csv": str(folds_csv),
                                        "data.n_folds": 3, "data.image_size": 32, "data.seq_len": 8,
                                        "data.slice_mm": 2.0, "data.repeats": 2, "model.hidden": 16,
                                        "train.epochs": 1, "train.batch_size": 2, "train.threads": 1,
                                        "train.progress": False, "out_dir": str(out_dir), **extra})


def read_log(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "log.csv")


def test_fit_fold_writes_a_complete_run(cache, tmp_path):
    cfg = tiny_cfg(cache, tmp_path / "runs")
    summary = fit_fold(cfg)
    run = tmp_path / "runs" / "demo_seg" / "fold0"
    assert summary["run_dir"] == str(run) and summary["finished"] and summary["epochs_done"] == 2
    for name in ("config.yaml", "model.pt", "last.pt", "log.csv", "log.json", "oof.csv", "oof_summary.json"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg

    log = read_log(run)
    assert log["epoch"].tolist() == [1, 2]
    assert list(log.columns) == ["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds"]
    assert np.isfinite(log[["train_loss", "val_loss", "lr"]].to_numpy()).all()
    assert log["val_dice"].between(0, 1).all() and (log["lr"] > 0).all()
    assert json.loads((run / "log.json").read_text())[1]["epoch"] == 2

    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"model", "model_name", "model_kwargs", "config", "epoch", "metric"}
    assert ckpt["model_name"] == "seg_unet" and ckpt["model_kwargs"]["in_channels"] == 3
    assert ckpt["model_kwargs"]["classes"] == 7 and ckpt["config"]["name"] == "demo_seg"
    best = int(log["val_dice"].idxmax())
    assert ckpt["epoch"] == log["epoch"][best] == summary["best_epoch"]
    assert ckpt["metric"] == pytest.approx(log["val_dice"][best]) == pytest.approx(summary["best_dice"])
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert set(last) >= {"model", "ema", "optimizer", "scaler", "epoch", "step", "best_metric", "history"}

    # OOF: every held-out segmented study once, scored by the weights in model.pt
    oof = pd.read_csv(run / "oof.csv", dtype={"StudyInstanceUID": str})
    _, folds_csv, uids = cache
    assert sorted(oof["StudyInstanceUID"]) == [uids[0], uids[3]]
    assert (oof["fold"] == 0).all() and (oof["epoch"] == ckpt["epoch"]).all()
    oof_summary = json.loads((run / "oof_summary.json").read_text())
    assert oof_summary["n_studies"] == 2
    assert oof_summary["mean_dice"] == pytest.approx(oof["dice_mean"].mean(), abs=1e-6) == pytest.approx(ckpt["metric"])
    zcols = [f"zerr_{v}" for v in ("C1", "C2", "C3", "C4", "C5", "C6", "C7")]
    assert (oof[zcols].to_numpy() >= 0).all() and (oof["zerr_max"] == oof[zcols].max(axis=1)).all()
    model, _ = load_checkpoint(run / "model.pt")
    task = SegTask(cfg)
    task.build()
    again = task.evaluate(model, list(oof["StudyInstanceUID"]), torch.device("cpu"),
                          lambda: torch.autocast("cpu", enabled=False))
    redo = pd.DataFrame(again.rows).set_index("StudyInstanceUID").loc[oof["StudyInstanceUID"]]
    dcols = [f"dice_{v}" for v in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "mean")] + zcols
    np.testing.assert_allclose(redo[dcols].to_numpy(dtype=float), oof[dcols].to_numpy(dtype=float), atol=1e-6)

    # a finished run returns at once and changes nothing
    stamp = (run / "last.pt").stat().st_mtime_ns
    again = fit_fold(cfg)
    assert again["finished"] and again["epochs_done"] == 2 and again["best_epoch"] == summary["best_epoch"]
    assert (run / "last.pt").stat().st_mtime_ns == stamp and len(read_log(run)) == 2


class CrashingTask(SegTask):
    """Raises after `crash_after` training batches, like a killed session."""

    def __init__(self, cfg, crash_after: int) -> None:
        super().__init__(cfg)
        self.calls, self.crash_after = 0, crash_after

    def loss(self, model, batch):
        self.calls += 1
        if self.calls > self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        return super().loss(model, batch)


def test_exclusive_seg_loss_is_softmax_cross_entropy_against_a_zero_background_logit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g) * 3
    label = torch.randint(0, 4, (2, 4, 5), generator=g)  # 0 background, 1..3 the channels
    target = torch.stack([(label == c + 1).float() for c in range(3)], dim=1)
    # by hand: log(1 + sum exp(l)) - l_label, with l_0 = 0 for background
    chosen = torch.where(label > 0, logits.gather(1, (label - 1).clamp(min=0)[:, None])[:, 0], torch.zeros(()))
    ce = (torch.log1p(logits.exp().sum(1)) - chosen).mean()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    dice_term = seg_loss(logits, target) - bce  # the Dice part does not depend on the pixel loss
    torch.testing.assert_close(seg_loss(logits, target, exclusive=True), ce + dice_term)
    torch.testing.assert_close(seg_loss(logits, target, dice_weight=0.0, exclusive=True), ce)


def test_channels_last_run_reloads_with_the_same_outputs(cache, tmp_path):
    from kit.runs import load_run

    cfg = tiny_cfg(cache, tmp_path / "runs", **{"train.epochs": 1, "train.channels_last": True,
                                                "train.exclusive": True})
    assert fit_fold(cfg)["finished"]
    loaded = load_run(tmp_path / "runs" / "demo_seg")[0]
    conv = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain, _ = load_checkpoint(tmp_path / "runs" / "demo_seg" / "fold0" / "model.pt")
    plain_conv = next(m for m in plain.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert not plain_conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), plain(x), atol=1e-4, rtol=1e-4)


def test_level_conditioned_segmenter_trains_and_segments(cache, tmp_path):
    """data.level_input: 7 more input channels; validation gives the true ranges; inference needs levels."""
    from kit.io.cache import load_cached
    from kit.stage1.infer import segment_study
    from kit.runs import load_run
    from kit.stage1.recipe import true_presence

    cache_dir, _, uids = cache
    cfg = tiny_cfg(cache, tmp_path / "runs", **{"train.epochs": 1, "data.level_input": True,
                                                "data.augment.crop": 48})
    summary = fit_fold(cfg)
    assert summary["finished"] and 0 <= summary["best_dice"] <= 1
    seg = load_run(tmp_path / "runs" / "demo_seg")
    assert seg[0].recipe.level_input and seg[0].model.in_channels == 3 + 7
    oof = pd.read_csv(tmp_path / "runs" / "demo_seg" / "fold0" / "oof.csv", dtype={"StudyInstanceUID": str})
    study = load_cached(cache_dir, oof.StudyInstanceUID.iloc[0])
    with pytest.raises(ValueError, match="conditioned on the level model"):
        segment_study(study, seg)
    result = segment_study(study, seg, levels=true_presence(study["mask"]), keep_probs=True)
    assert result.labels.shape == study["mask"].shape and result.probs.shape == (7, *study["mask"].shape)
    # every labelled voxel (a 1-epoch model may label none) is above the threshold in its stored probability
    winner = np.take_along_axis(result.probs, np.clip(result.labels.astype(np.int64) - 1, 0, 6)[None], 0)[0]
    assert (winner[result.labels > 0] > 127).all()


def test_level_task_trains_and_scores_held_out_studies(cache, tmp_path):
    cache_dir, folds_csv, _ = cache
    cfg = tiny_level_cfg(cache_dir, folds_csv, tmp_path, **{"train.epochs": 2, "train.val_every": 1})
    summary = fit_fold(cfg)
    run = tmp_path / "demo_level" / "fold0"
    assert summary["finished"] and (run / "model.pt").is_file()
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 2 and oof["iou_mean"].between(0, 1).all() and set(oof.columns) >= {"iou_C1", "iou_C7", "steps"}
    assert not set(oof.columns) & {"C1", "C7", "mean"}  # nothing a classifier report would read as probabilities
    log = read_log(run)
    assert list(log.columns) == ["epoch", "train_loss", "val_loss", "val_iou", "lr", "seconds"]
    assert np.isfinite(log[["train_loss", "val_loss"]].to_numpy()).all()


def test_resume_after_interruption_matches_an_uninterrupted_run(cache, tmp_path):
    full = fit_fold(tiny_cfg(cache, tmp_path / "full"))
    assert full["epochs_done"] == 2

    cfg = tiny_cfg(cache, tmp_path / "cut")
    run = cfg.run_dir
    first = fit_fold(tiny_cfg(cache, tmp_path / "cut", **{"train.stop_after_epochs": 1}))
    assert not first["finished"] and first["epochs_done"] == 1 and read_log(run)["epoch"].tolist() == [1]

    # killed in the middle of epoch 2: last.pt and the logs still describe epoch 1
    n_batches = torch.load(run / "last.pt", weights_only=True)["step"]  # steps of epoch 1 (accum_steps=1)
    with pytest.raises(KeyboardInterrupt):
        fit_fold(cfg, CrashingTask(cfg, crash_after=2))  # resumes at epoch 2, dies at its 3rd batch
    assert read_log(run)["epoch"].tolist() == [1]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1

    resumed = fit_fold(cfg)  # the same command again
    assert resumed["finished"] and resumed["epochs_done"] == 2
    log, ref = read_log(run), read_log(Path(full["run_dir"]))
    assert log["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(log[["train_loss", "val_loss", "val_dice", "lr"]].to_numpy(),
                               ref[["train_loss", "val_loss", "val_dice", "lr"]].to_numpy(), rtol=1e-6)
    a = torch.load(Path(full["run_dir"]) / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * n_batches
    for part in ("model", "ema"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=1e-6, atol=1e-7, msg=f"{part}.{key}")


class FallingMetricTask(SegTask):
    """Scores each validation lower than the one before, so early stopping must trigger."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.validations, self.built = 0, False

    def build(self):
        self.built = True
        return super().build()

    def score(self, rows):
        self.validations += 1
        return 1.0 - 0.1 * self.validations


def test_early_stopping_and_gradient_accumulation(cache, tmp_path):
    cfg = tiny_cfg(cache, tmp_path / "runs", **{"train.epochs": 6, "train.patience": 2, "train.accum_steps": 3,
                                                "train.ema": False})
    task = FallingMetricTask(cfg)
    summary = fit_fold(cfg, task)
    assert summary["early_stopped"] and summary["finished"] and summary["epochs_done"] == 3
    assert summary["best_epoch"] == 1 and summary["best_dice"] == pytest.approx(0.9)
    log = read_log(cfg.run_dir)
    assert log["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(log["val_dice"], [0.9, 0.8, 0.7])
    assert torch.load(cfg.run_dir / "model.pt", weights_only=True)["epoch"] == 1
    last = torch.load(cfg.run_dir / "last.pt", weights_only=True)
    batches = len(task.build()[0]) // cfg.train.batch_size  # drop_last
    assert last["step"] == 3 * -(-batches // 3)  # one optimizer step per 3 batches, the last group may be short
    assert last["ema"] is None
    # an early-stopped run is finished: re-running builds nothing
    again = FallingMetricTask(cfg)
    assert fit_fold(cfg, again)["early_stopped"] and not again.built


def test_amp_choice_by_device():
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        amp_dtype("fp16", cpu)


@pytest.mark.parametrize("capability, name, native", [((7, 5), "Tesla T4", False), ((6, 0), "Tesla P100", False),
                                                      ((8, 0), "A100", True), ((9, 0), "H100", True)])
def test_half_precision_by_gpu_kind(monkeypatch, caplog, capability, name, native):
    """auto (training) and inference autocast: bf16 only where the GPU has it in hardware. torch's own
    is_bf16_supported() says True on a T4 (emulation), which would run Kaggle's GPUs in a slow emulated bf16."""
    from kit import devices
    from kit.devices import has_native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch answers on a T4 too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.version, "hip", None)
    gpu = torch.device("cuda:0")
    half = torch.bfloat16 if native else torch.float16
    assert has_native_bf16(gpu) is native and not has_native_bf16("cpu")
    assert amp_dtype("auto", gpu) is half and amp_dtype("fp16", gpu) is torch.float16
    with caplog.at_level("WARNING", logger="kit.train"):
        assert amp_dtype("bf16", gpu) is torch.bfloat16  # forced: kept, with a warning where it is emulated
    assert ("only emulates bfloat16" in caplog.text) is not native
    assert devices.autocast(gpu, True).fast_dtype is half


def test_two_process_ddp_on_cpu(cache, tmp_path):
    cfg = tiny_cfg(cache, tmp_path / "runs", **{"train.batch_size": 4})
    cfg_path = save_config(cfg, tmp_path / "ddp.yaml")
    out = tmp_path / "probe"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "ddp_worker.py"), str(cfg_path), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_done"] == 2 and summary["finished"]

    _, _, uids = cache
    for e in (1, 2):
        r0 = torch.load(out / f"rank0_eval{e}.pt", weights_only=True)
        r1 = torch.load(out / f"rank1_eval{e}.pt", weights_only=True)
        # each rank validated its own share of the held-out studies, together all of them once
        assert sorted(r0["uids"] + r1["uids"]) == sorted([uids[0], uids[3]]) and not set(r0["uids"]) & set(r1["uids"])
        # DDP kept the replicas' weights identical
        for key, value in r0["params"].items():
            assert torch.equal(value, r1["params"][key]), key
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={"StudyInstanceUID": str})
    assert sorted(oof["StudyInstanceUID"]) == sorted([uids[0], uids[3]])
    assert len(read_log(cfg.run_dir)) == 2

    # the checkpoint loads in one process and reproduces what rank 0 computed when it saved it
    model, ckpt = load_checkpoint(cfg.run_dir / "model.pt")
    saved = torch.load(out / f"rank0_eval{ckpt['epoch']}.pt", weights_only=True)
    with torch.no_grad():
        logits = model(saved["probe"])
    assert logits.shape == (2, 7, 64, 64)
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# One input recipe: training, validation and inference give the model the same bits
# ---------------------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Wraps a model and keeps every input it is given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x, *args):
        self.inputs.append(x.detach().cpu().clone())
        return self.model(x, *args)


def test_training_validation_and_inference_feed_identical_inputs(cache, tmp_path):
    """The same study and slice through the training dataset (augmentation off), validation and inference."""
    from kit.io.cache import load_cached
    from kit.stage1.infer import predict_vertebra_probs
    from kit.runs import load_run
    from kit.stage1.recipe import true_presence

    cache_dir, _, uids = cache
    cfg = tiny_cfg(cache, tmp_path / "runs", **{"train.epochs": 1, "data.level_input": True,
                                                "data.level_margin_mm": 2.5, "data.augment.enabled": False,
                                                "data.slice_offsets_mm": [-2.0, 0.0, 3.0],
                                                "data.background_fraction": 1.0})
    fit_fold(cfg)
    (loaded,) = load_run(cfg.run_dir.parent)
    task = SegTask(cfg)
    train_ds, held_out = task.build()
    uid = held_out[0]
    # the training dataset over the held-out study itself, augmentation off
    from kit.stage1.data import SegSliceDataset
    ds = SegSliceDataset({uid: task.held_out[uid]}, task.recipe, background_fraction=1.0, augment=None)
    by_z = {ds[i]["z"]: ds[i]["image"] for i in range(len(ds))}

    rec = Recorder(loaded.model)
    task.evaluate(rec, [uid], torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    validation = torch.cat(rec.inputs)

    cached = load_cached(cache_dir, uid)
    rec.inputs.clear()
    loaded.model = rec
    predict_vertebra_probs(cached["image"], [loaded], batch_size=5, dz=float(cached["spacing"][0]),
                           levels=true_presence(cached["mask"]))
    inference = torch.cat(rec.inputs)
    assert validation.shape == inference.shape == (24, 3 + 7, 64, 64)
    assert torch.equal(validation, inference)  # bit for bit
    for z, image in by_z.items():
        assert torch.equal(image, inference[z]), f"slice {z}"
    assert len(by_z) == 24


def test_level_model_outputs_on_real_steps_ignore_padding():
    from kit.models import create_model

    torch.manual_seed(0)
    model = create_model("level_gru", in_channels=3, classes=7, encoder="mobilenetv3_small_050", hidden=16)
    x = torch.rand(1, 6, 3, 32, 32)
    padded = torch.cat([x, torch.zeros(1, 4, 3, 32, 32)], dim=1)
    mask = torch.tensor([[1.0] * 6 + [0.0] * 4])
    model.eval()
    with torch.no_grad():
        alone = model(x)
        with_pad = model(padded, mask)
    torch.testing.assert_close(with_pad[:, :6], alone, atol=1e-6, rtol=1e-5)
    assert (with_pad[:, 6:] == 0).all()
    # in training mode too: BatchNorm statistics come from the real steps only
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(padded, mask)[:, :6]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a batch of two studies of different lengths: each as if alone (the train-mode calls moved BatchNorm's
    # running statistics, so compare with a fresh eval-mode run)
    model.eval()
    y = torch.rand(1, 10, 3, 32, 32)
    with torch.no_grad():
        alone = model(x)
        both = model(torch.cat([padded, y]), torch.cat([mask, torch.ones(1, 10)]))
        torch.testing.assert_close(both[0, :6], alone[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(both[1], model(y)[0], atol=1e-6, rtol=1e-5)


def test_nan_validation_never_blocks_a_checkpoint(cache, tmp_path):
    from kit.train import improved

    assert improved(0.5, float("-inf"), -1) and not improved(float("nan"), float("-inf"), -1)
    assert improved(0.1, float("nan"), 1) and not improved(0.1, 0.2, 1)

    class NanFirst(SegTask):
        calls = 0

        def score(self, rows):
            NanFirst.calls += 1
            return float("nan") if NanFirst.calls == 1 else 0.1 * NanFirst.calls

    cfg = tiny_cfg(cache, tmp_path / "runs", **{"train.epochs": 3})
    summary = fit_fold(cfg, NanFirst(cfg))
    log = read_log(cfg.run_dir)
    assert np.isnan(log["val_dice"][0]) and summary["best_epoch"] == 3
    assert torch.load(cfg.run_dir / "model.pt", weights_only=True)["epoch"] == 3


def test_a_batch_with_a_non_finite_loss_adds_no_gradient_and_is_named(cache, tmp_path):
    """Every other batch gives a NaN loss (a bad study, a diverging step): those batches change no weight, the
    epoch's loss is the mean of the others, and their studies are logged in skipped_batches.csv."""
    class NanEveryOther(SegTask):
        calls = 0

        def loss(self, net, batch):
            NanEveryOther.calls += 1
            loss = super().loss(net, batch)
            return loss * float("nan") if NanEveryOther.calls % 2 == 1 else loss

    cfg = tiny_cfg(cache, tmp_path / "runs", **{"train.epochs": 3})
    fit_fold(cfg, NanEveryOther(cfg))
    assert NanEveryOther.calls >= 3
    last = torch.load(cfg.run_dir / "last.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    log = read_log(cfg.run_dir)
    assert np.isfinite(log["train_loss"]).all() and np.isfinite(log["val_dice"].iloc[-1])
    skipped = pd.read_csv(cfg.run_dir / "skipped_batches.csv", dtype={"StudyInstanceUID": str})
    assert 1 in set(skipped["epoch"]) and (skipped["samples"] > 0).all()
    assert set(skipped["StudyInstanceUID"]) <= set(cache[2])


def test_a_group_without_a_finite_batch_moves_nothing():
    from kit.train import _no_gradient, group_step

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    plain = torch.amp.GradScaler("cpu", enabled=False)
    model(torch.ones(2, 3)).sum().backward()
    assert group_step(model, opt, plain, None, finite_batches=1) is True  # a real step: AdamW now has momentum
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _no_gradient(model).backward()  # the stand-in for a NaN loss: zero gradients
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert group_step(model, opt, plain, None, finite_batches=0) is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # neither momentum nor weight decay moved it
    assert all(p.grad is None for p in model.parameters())
    _no_gradient(model).backward()  # zero here, but another DDP rank's gradient arrived (finite_batches counts
    model.weight.grad += 1.0        # this rank's own batches only): the group steps
    assert group_step(model, opt, plain, None, finite_batches=0) is True
    assert not torch.equal(model.weight, before["weight"])


def test_skipped_fp16_steps_move_neither_schedule_nor_ema():
    from kit.train import optimizer_step

    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler.scale(model(torch.ones(2, 3)).sum() * float("inf")).backward()  # inf gradients: the scaler skips it
    assert optimizer_step(model, opt, scaler, clip_grad=1.0) is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert scaler.get_scale() == 2.0 ** 7
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    assert optimizer_step(model, opt, scaler, clip_grad=None) is True
    assert not torch.equal(model.weight, before["weight"])
    plain = torch.amp.GradScaler("cpu", enabled=False)  # no scaler: every step counts
    model(torch.ones(2, 3)).sum().backward()
    assert optimizer_step(model, opt, plain, clip_grad=None) is True


def test_loader_workers_are_capped_at_the_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert loader_workers(8) == 4 and loader_workers(2) == 2 and loader_workers(0) == 0
    assert loader_workers(8, world_size=2) == 2 and loader_workers(8, world_size=8) == 0


@pytest.mark.parametrize("config", ["demo_seg", "demo_level"])
def test_unreadable_cache_files_are_left_out_and_listed(cache, tmp_path, config):
    """A cached study that cannot be read (a zero-byte file, garbage) does not stop stage-1 training: it is left
    out with a warning and listed in the fold's skipped_studies.csv; the other held-out study is validated."""
    import shutil

    from kit.stage1.data import split_segmentation_studies

    cache_dir, folds_csv, _ = cache
    broken = tmp_path / "cache"
    shutil.copytree(cache_dir, broken)
    if config == "demo_seg":
        cfg = load_config(config, **tiny_overrides(broken, folds_csv, tmp_path / "runs", **{"train.epochs": 1}))
    else:
        cfg = tiny_level_cfg(broken, folds_csv, tmp_path / "runs")
    train_uids, held_out = split_segmentation_studies(cfg.data)
    (broken / f"{train_uids[0]}.npz").write_bytes(b"")
    (broken / f"{held_out[0]}.npz").write_bytes(b"not a zip file")
    summary = fit_fold(cfg)
    listed = pd.read_csv(cfg.run_dir / "skipped_studies.csv", dtype=str)
    assert sorted(listed["StudyInstanceUID"]) == sorted([train_uids[0], held_out[0]])
    assert all(f"{u}.npz" in r and "kit prepare" in r for u, r in zip(listed["StudyInstanceUID"], listed["reason"]))
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={"StudyInstanceUID": str})
    assert oof["StudyInstanceUID"].tolist() == held_out[1:] and summary["finished"] and summary["best_epoch"] == 1


def test_stage_1_training_under_autocast(cache, tmp_path):
    """train.amp=bf16 on CPU (the GPU path's autocast, fp16 on a T4): segmenter and level model train a fold with
    finite losses."""
    seg = tiny_cfg(cache, tmp_path / "seg", **{"train.epochs": 1, "train.amp": "bf16"})
    cache_dir, folds_csv, _ = cache
    level = tiny_level_cfg(cache_dir, folds_csv, tmp_path / "level", **{"train.amp": "bf16"})
    for cfg in (seg, level):
        assert fit_fold(cfg)["finished"]
        log = read_log(cfg.run_dir)
        assert np.isfinite(log[["train_loss", "val_loss"]].to_numpy()).all()


def test_a_run_of_other_studies_is_set_aside_not_resumed(cache, tmp_path):
    """The same run folder, asked to train on another cache (another dataset, e.g. `kit demo --seed 2` after
    `--seed 1` in one folder): the finished run is not taken for this one; it is moved aside whole and the run
    trains afresh on the studies it was given."""
    import shutil

    cache_dir, folds_csv, uids = cache
    first = fit_fold(tiny_cfg(cache, tmp_path))
    other = tmp_path / "other_cache"
    shutil.copytree(cache_dir, other)
    cfg = tiny_cfg((other, folds_csv, uids), tmp_path)
    second = fit_fold(cfg)
    aside = [p for p in cfg.run_dir.parent.iterdir() if p.name.startswith("set-aside-fold0-")]
    assert len(aside) == 1 and (aside[0] / "last.pt").is_file() and (aside[0] / "model.pt").is_file()
    assert [p.name for p in cfg.run_dir.parent.glob("fold*")] == ["fold0"]  # what the reports and loaders glob
    assert second["finished"] and second["epochs_done"] == first["epochs_done"]
    assert load_config(cfg.run_dir / "config.yaml").data.cache_dir == str(other)
    assert read_log(cfg.run_dir)["epoch"].tolist() == list(range(1, second["epochs_done"] + 1))
    assert fit_fold(cfg)["epochs_done"] == second["epochs_done"]  # the same studies again: resumed, nothing moved
    assert len([p for p in cfg.run_dir.parent.iterdir() if p.name.startswith("set-aside-fold0-")]) == 1
