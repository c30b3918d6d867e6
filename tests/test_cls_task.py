"""Stage 2 training: the crop dataset (layouts, augmentation), the classifier loss against the metric, and a
tiny fit_fold whose OOF `kit report` reads. Fake crop caches are written here in the `kit crops` format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kit.config import load_config
from kit.sections import AugmentConfig
from kit.constants import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS, TARGETS, VERTEBRAE
from kit.data import adjust_intensity, random_affine, warp
from kit.stage2.store import load_crops
from kit.stage2.data import NO_INTENSITY, CropDataset, augment_stack, crop_uids, crops_nbytes, stack_input
from kit.losses import competition_loss, vertebra_loss
from kit.evaluate.metrics import competition_score, effective_odds, scale_odds
from kit.tasks import ClsTask, make_task

torch.set_num_threads(1)
UID = "StudyInstanceUID"
N_STUDIES, T, S, C, N_FOLDS = 12, 4, 32, 6, 3
MISSING = (0, 2)  # study 0's C3 is not found by the segmenter


def write_crop_cache(root: Path, n: int = N_STUDIES, seed: int = 0) -> dict:
    """A data root (train.csv), a folds CSV and a crop cache of n studies in the `kit crops` format.

    Fractured vertebrae show a bright square on the slices their slice targets mark; study 0's C3 is not
    found; even studies have no box rows (slice targets NaN). Studies 0, 3, 6, ... are written in the per-vertebra
    file layout `kit crops` writes (`crop_file_arrays`), the others with one `crops` member (older caches).
    """
    from kit.stage2.store import crop_file_arrays

    rng = np.random.default_rng(seed)
    uids = [f"1.2.826.0.1.3680043.{500 + i}" for i in range(n)]
    y = (rng.random((n, 7)) < 0.3).astype(np.int64)
    y[1, :2], y[2, :] = 1, 0  # both classes in every fold's training part
    table = pd.DataFrame(np.c_[y.max(1), y], columns=list(TARGETS))
    table.insert(0, UID, uids)
    (root / "data").mkdir(parents=True)
    table.to_csv(root / "data" / "train.csv", index=False)
    pd.DataFrame({UID: uids, "fold": np.arange(n) % N_FOLDS}).to_csv(root / "folds.csv", index=False)
    crop_dir = root / "crops"
    crop_dir.mkdir()
    yy, xx = np.mgrid[:S, :S]
    disk = ((yy - S / 2) ** 2 + (xx - S / 2) ** 2 < (S / 3) ** 2).astype(np.uint8) * 255
    for i, uid in enumerate(uids):
        crops = (rng.random((7, T, C, S, S)) * 60).astype(np.uint8)
        crops[:, :, -1] = disk
        found = np.ones(7, bool)
        positions = np.tile(np.arange(T, dtype=np.int32), (7, 1)) + 10 * np.arange(7, dtype=np.int32)[:, None]
        targets = np.zeros((7, T), np.float32)
        for v in range(7):
            if y[i, v]:
                z = rng.integers(0, T - 1)
                crops[v, z:z + 2, :-1, 10:20, 10:20] = 220
                targets[v, z:z + 2] = 1.0
        if i == MISSING[0]:
            found[MISSING[1]] = False
            crops[MISSING[1]] = 0
            positions[MISSING[1]] = -1
        if i % 2 == 0:
            targets[:] = np.nan
        tmp = crop_dir / f"{uid}.tmp.npz"
        arrays = dict(crops=crops, found=found, positions=positions, slice_targets=targets,
                      instance_numbers=np.arange(1, 80, dtype=np.int32), spacing=np.ones(3, np.float32),
                      orig_hw=np.array([64, 64], np.int32))
        np.savez(tmp, **(crop_file_arrays(arrays) if i % 3 == 0 else arrays))
        os.replace(tmp, crop_dir / f"{uid}.npz")
    pd.DataFrame({UID: uids, "split": "train", "found": [" ".join(VERTEBRAE)] * n, "missing": "",
                  "mask_source": "truth", "n_boxes": 0, "unmatched_boxes": 0, "seconds": 0.1}
                 ).to_csv(crop_dir / "manifest.csv", index=False)
    return {"root": root, "crop_dir": crop_dir, "labels": table, "uids": uids}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_crop_cache(tmp_path_factory.mktemp("cls"))


NO_AUG = AugmentConfig(p_affine=0.0, hflip=0.0, brightness=0.0, contrast=0.0)


def test_crop_dataset_layouts(cache):
    uids, labels = cache["uids"], cache["labels"]
    assert crop_uids(cache["crop_dir"]) == uids
    per_vertebra = CropDataset(cache["crop_dir"], uids, labels)
    assert len(per_vertebra) == 7 * N_STUDIES - 1  # the vertebra not found is left out
    s = per_vertebra[3]  # study 0, C5 (C3 skipped)
    assert s["image"].shape == (T, C, S, S) and s["image"].dtype == torch.uint8  # the cache's, as it is
    assert s["intensity"].tolist() == list(NO_INTENSITY)  # not augmented
    x = stack_input(s["image"], s["intensity"])
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(torch.unique(x[:, -1]).tolist()) == {0.0, 1.0}  # the mask channel, 0/255 -> 0/1
    assert s["uid"] == uids[0] and s["vertebra"] == 4 and s["found"]
    assert float(s["label"]) == labels.loc[0, "C5"]
    assert s["mask"].all() and not s["slice_known"].any()  # study 0 has no box rows: targets unknown
    odd = per_vertebra[7 * 1 - 1 + 0]  # study 1, C1: fractured, targets known
    assert odd["uid"] == uids[1] and odd["vertebra"] == 0 and odd["slice_known"].all()
    assert float(odd["slice_target"].sum()) == 2.0 and float(odd["label"]) == 1.0

    assert per_vertebra.cache is not None
    assert crops_nbytes(cache["crop_dir"] / f"{uids[0]}.npz") == crops_nbytes(cache["crop_dir"] / f"{uids[1]}.npz") \
        == 7 * T * C * S * S  # per-vertebra and single-member files alike
    from_disk = CropDataset(cache["crop_dir"], uids, labels, in_memory=False)
    assert from_disk.cache is None and len(from_disk) == len(per_vertebra)
    for i in range(len(from_disk)):  # a sample read from its file (one vertebra's stack, either layout) = in memory
        a, b = from_disk[i], per_vertebra[i]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "intensity", "mask", "label", "slice_target",
                                                       "slice_known"))
        assert (a["uid"], a["vertebra"], a["found"]) == (b["uid"], b["vertebra"], b["found"])

    kept = CropDataset(cache["crop_dir"], uids, labels, skip_missing=False)
    assert len(kept) == 7 * N_STUDIES and not kept[MISSING[1]]["found"] and not kept[MISSING[1]]["mask"].any()

    per_study = CropDataset(cache["crop_dir"], uids, labels, per_study=True)
    s = per_study[0]
    assert len(per_study) == N_STUDIES and s["image"].shape == (7, T, C, S, S) and s["intensity"].shape == (7, 2)
    assert s["vertebra_mask"].tolist() == [v != MISSING[1] for v in range(7)]
    assert s["mask"].shape == (7, T) and not s["mask"][MISSING[1]].any() and s["mask"].sum() == 6 * T
    np.testing.assert_array_equal(s["label"].numpy(), labels.loc[0, list(TARGETS)].to_numpy(np.float32))
    raw = load_crops(cache["crop_dir"], uids[0])["crops"]
    np.testing.assert_array_equal(per_study.study(uids[0])["image"].numpy(), raw)
    np.testing.assert_array_equal(stack_input(per_study.study(uids[0])["image"]).numpy(), raw.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="have no labels"):
        CropDataset(cache["crop_dir"], uids, labels.iloc[1:])


def test_a_vertebra_read_alone_equals_the_whole_file(cache):
    from kit.stage2.store import load_vertebra_crops

    for uid in cache["uids"][:2]:  # per-vertebra layout, then a single `crops` member
        whole = load_crops(cache["crop_dir"], uid)
        assert whole["crops"].shape == (7, T, C, S, S)
        for v in range(7):
            one = load_vertebra_crops(cache["crop_dir"], uid, v)
            np.testing.assert_array_equal(one["crops"], whole["crops"][v])
            for key in ("found", "positions", "slice_targets"):
                np.testing.assert_array_equal(one[key], whole[key])


def test_the_loader_ships_uint8_and_stack_input_augments_as_floats_would(cache):
    """The loader warps the cache's uint8 and ships it with the stack's (brightness, contrast); `stack_input` scales
    and applies them where the batch is. Against warping floats and changing their intensity in numpy: exactly
    without a warp, within a grey level (the uint8 warp's rounding) with one; the mask channel stays 0/1; batches
    (and per-study layouts) broadcast each stack's own intensity."""
    raw = load_crops(cache["crop_dir"], cache["uids"][1])["crops"][0]
    intensity = AugmentConfig(p_affine=0.0, hflip=0.0, brightness=0.2, contrast=0.2)
    warped = AugmentConfig(p_affine=1.0, rotate_deg=20.0, scale=0.1, shift=0.1, hflip=0.5, brightness=0.2,
                           contrast=0.2)
    for aug, atol in ((intensity, 0.0), (warped, 1.01 / 255)):
        images, changes, expected = [], [], []
        for seed in range(4):
            image, change = augment_stack(raw, np.random.default_rng(seed), aug)
            assert image.dtype == np.uint8 and image.flags.c_contiguous and change.dtype == np.float32
            rng = np.random.default_rng(seed)  # the float way: the same draws, in the same order
            matrix = random_affine(rng, S, S, aug)
            floats = raw.astype(np.float32) / 255
            if matrix is not None:  # each plane on its own, the mask channel with nearest neighbour
                floats = np.array([[warp(plane, matrix, nearest=j == C - 1) for j, plane in enumerate(planes)]
                                   for planes in floats])
            brightness, contrast = rng.uniform(-0.2, 0.2), 1.0 + rng.uniform(-0.2, 0.2)
            assert change.tolist() == pytest.approx([brightness, contrast])
            floats[:, :-1] = adjust_intensity(floats[:, :-1], brightness, contrast)
            x = stack_input(torch.from_numpy(image), torch.from_numpy(change)).numpy()
            np.testing.assert_allclose(x, floats, rtol=0, atol=atol)
            assert set(np.unique(x[:, -1])) <= {0.0, 1.0}
            images.append(image), changes.append(change), expected.append(x)
        batch = stack_input(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(changes)))
        np.testing.assert_array_equal(batch.numpy(), np.stack(expected))  # each stack its own intensity
        study = stack_input(torch.from_numpy(np.stack(images))[None], torch.from_numpy(np.stack(changes))[None])
        np.testing.assert_array_equal(study[0].numpy(), np.stack(expected))
    with pytest.raises(TypeError, match="uint8"):
        stack_input(torch.zeros(T, C, S, S))
    with pytest.raises(ValueError, match="does not match"):
        stack_input(torch.zeros(2, T, C, S, S, dtype=torch.uint8), torch.zeros(3, 2))


def test_augmentation_is_deterministic_and_keeps_the_mask_binary(cache):
    aug = AugmentConfig(p_affine=1.0, rotate_deg=20.0, scale=0.1, shift=0.1, hflip=0.5, brightness=0.2,
                        contrast=0.2)
    ds = CropDataset(cache["crop_dir"], cache["uids"], cache["labels"], augment=aug, reverse_slices=0.5,
                     n_neighbours=2, seed=3)
    first = ds[5]["image"]
    assert torch.equal(first, ds[5]["image"])  # same (seed, epoch, index): same draw
    ds.set_epoch(1)
    assert not torch.equal(first, ds[5]["image"])
    ds.set_epoch(0)
    assert torch.equal(first, ds[5]["image"])  # epochs replay exactly (resume)
    from_files = CropDataset(cache["crop_dir"], cache["uids"], cache["labels"], augment=aug, reverse_slices=0.5,
                             n_neighbours=2, seed=3, in_memory=False)
    assert all(torch.equal(ds[i]["image"], from_files[i]["image"]) for i in range(0, len(ds), 5))
    plain = CropDataset(cache["crop_dir"], cache["uids"], cache["labels"])[5]["image"]
    assert not torch.equal(first, plain)
    for i in range(6):
        mask = ds[i]["image"][:, -1]
        assert set(torch.unique(mask).tolist()) <= {0, 255}  # nearest neighbour: still a mask
        assert 0 < mask.float().mean() < float(plain[:, -1].float().mean()) * 1.6

    stack = plain.numpy()
    rng = np.random.default_rng(0)
    bright = stack_input(*map(torch.from_numpy, augment_stack(stack, rng, AugmentConfig(p_affine=0.0, brightness=0.3,
                                                                                        contrast=0.0)))).numpy()
    np.testing.assert_array_equal(bright[:, -1], stack[:, -1] / np.float32(255))  # intensity never touches the mask
    assert not np.allclose(bright[:, :-1], stack[:, :-1] / np.float32(255))
    flipped, _ = augment_stack(stack, rng, AugmentConfig(p_affine=1.0, rotate_deg=0.0, scale=0.0, shift=0.0,
                                                         hflip=1.0, brightness=0.0, contrast=0.0))
    np.testing.assert_array_equal(flipped, stack[..., ::-1])  # every slice and channel alike

    reverse = CropDataset(cache["crop_dir"], cache["uids"], cache["labels"], augment=NO_AUG, reverse_slices=1.0,
                          n_neighbours=2)
    normal = CropDataset(cache["crop_dir"], cache["uids"], cache["labels"])
    a, b = reverse[7], normal[7]  # study 1, C2 (boxes known)
    assert torch.equal(a["image"], b["image"].flip(0)[:, [4, 3, 2, 1, 0, 5]])  # slices and neighbours, mask last
    assert torch.equal(a["slice_target"], b["slice_target"].flip(0))
    with pytest.raises(ValueError, match="n_neighbours"):
        CropDataset(cache["crop_dir"], cache["uids"], cache["labels"], augment=NO_AUG, reverse_slices=0.5)


def test_a_reversed_stack_is_the_stack_of_the_mirrored_volume():
    """reverse_stack mirrors along z: each slice's neighbour channels are reversed with the slice order (they
    used to stay head-to-feet inside a feet-to-head stack), each window alike, the mask channel in place."""
    from kit.stage2.data import reverse_stack

    n, t, positions = 1, 4, np.array([10, 12, 14, 16])
    volume_z = lambda z: z  # noqa: E731 - a slice's value is its z: stack[t, window w, offset j] = z_t + j - n (+100 w)
    stack = np.zeros((t, 2 * (2 * n + 1) + 1, 1, 1), np.int64)
    for i, z in enumerate(positions):
        for w in range(2):
            for j in range(2 * n + 1):
                stack[i, w * (2 * n + 1) + j] = volume_z(z + j - n) + 100 * w
        stack[i, -1] = -i  # the mask
    out = reverse_stack(stack, n, mask_channel=True)
    mirrored = -positions[::-1]  # the z-mirrored volume: z -> -z; its stack runs over -16, -14, ... head to feet
    for i, z in enumerate(mirrored):
        for w in range(2):
            for j in range(2 * n + 1):
                assert out[i, w * (2 * n + 1) + j, 0, 0] == -(z + j - n) + 100 * w  # value of original slice -(...)
        assert out[i, -1, 0, 0] == -(t - 1 - i)
    with pytest.raises(ValueError, match="windows of 3"):
        reverse_stack(stack[:, :6], n, mask_channel=True)


class FixedLogits(nn.Module):
    """A stand-in model whose outputs are given logits (for the loss wiring)."""

    def __init__(self, out: dict) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args) -> dict:
        return self.out


def test_losses_equal_the_metric():
    rng = np.random.default_rng(0)
    y = (rng.random((16, 8)) < 0.4).astype(np.float64)
    y[:, 0] = y[:, 1:].max(1)
    x = rng.normal(0, 2, (16, 8))
    p = 1 / (1 + np.exp(-x))
    for normalise in ("row", "global"):
        loss = competition_loss(torch.from_numpy(x), torch.from_numpy(y), normalise=normalise)
        assert float(loss) == pytest.approx(competition_score(y, p, normalise=normalise), abs=1e-6)
    # per vertebra: the vertebra part of the global metric, renormalised to the vertebra weights
    w = y * np.array(POSITIVE_WEIGHTS) + (1 - y) * np.array(NEGATIVE_WEIGHTS)
    parts = competition_score(y, p, normalise="global", per_target=True)
    expected = parts[list(VERTEBRAE)].sum() * w.sum() / w[:, 1:].sum()
    got = vertebra_loss(torch.from_numpy(x[:, 1:].ravel()), torch.from_numpy(y[:, 1:].ravel()))
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(vertebra_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]))) == pytest.approx(np.log(2))

    # the task's per-study loss on a batch of whole studies is the metric on the same predictions
    cfg = load_config("demo_cls", **{"model.name": "cls_patient_gru", "loss.slice_weight": 0.0})
    task = ClsTask(cfg)
    model = FixedLogits({"logit": torch.from_numpy(x[:, 1:]).float(),
                         "patient_logit": torch.from_numpy(x[:, 0]).float(), "slice_logits": torch.zeros(16, 7, T)})
    batch = {"image": torch.zeros(16, 7, T, C, S, S, dtype=torch.uint8),
             "intensity": torch.tensor(NO_INTENSITY).repeat(16, 7, 1), "mask": None, "vertebra_mask": None,
             "label": torch.from_numpy(y).float(),
             "slice_target": torch.zeros(16, 7, T), "slice_known": torch.zeros(16, 7, T, dtype=torch.bool)}
    assert float(task.loss(model, batch)) == pytest.approx(competition_score(y, p), abs=1e-5)
    # the slice term adds slice_weight x BCE over the known slices only
    task.cfg.loss.slice_weight = 0.5
    batch["slice_known"][0, 0, :2] = True
    batch["slice_target"][0, 0, 0] = 1.0  # logit 0: BCE ln 2 whatever the target
    assert float(task.loss(model, batch)) == pytest.approx(competition_score(y, p) + 0.5 * np.log(2), abs=1e-5)


def tiny_config(cache, tmp_path, **overrides):
    root = cache["root"]
    values = {"data.data_root": str(root / "data"), "data.crop_dir": str(cache["crop_dir"]),
              "data.folds_csv": str(root / "folds.csv"), "data.n_folds": N_FOLDS, "data.fold": 0,
              "data.image_size": S, "data.n_slices": T, "model.encoder": "mobilenetv3_small_050",
              "model.pretrained_weights": None, "model.freeze_backbone": False,
              "model.hidden": 16, "train.epochs": 2, "train.val_every": 1, "train.batch_size": 8,
              "train.threads": 1, "train.progress": False, "train.ema": False, "out_dir": str(tmp_path / "runs"),
              "data.tta_flip": False,  # demo_cls's flip TTA: on only in the tests that ask for it
              **overrides}
    return load_config("demo_cls", **values)


def test_zero_epochs_validates_the_starting_weights_as_they_are(cache, tmp_path):
    """train.epochs=0 with starting weights: nothing is trained; the weights, with the fold's level offsets and
    priors, are validated and saved as the fold's model (a resumed call has nothing to do); without starting
    weights 0 epochs is refused."""
    from kit.sections import ConfigError
    from kit.models import create_model
    from kit.train import fit_fold

    name, kwargs = tiny_config(cache, tmp_path).model_spec()
    torch.manual_seed(3)
    start = create_model(name, **kwargs)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    cfg = tiny_config(cache, tmp_path, **{"train.epochs": 0, "model.pretrained_weights": str(tmp_path / "start.pt"),
                                          "train.ema": True})
    summary = fit_fold(cfg)
    assert summary["finished"] and summary["epochs_done"] == 0
    saved = torch.load(cfg.run_dir / "model.pt", weights_only=False)
    assert saved["epoch"] == 0
    for key, value in start.state_dict().items():
        if key not in ("level_bias", "metric_odds", "train_prevalence"):  # set from the training folds
            assert torch.equal(saved["model"][key], value), key
    assert not torch.equal(saved["model"]["level_bias"], start.level_bias)
    held_out = [u for i, u in enumerate(cache["uids"]) if i % N_FOLDS == 0]
    assert sorted(pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str})[UID]) == held_out
    assert fit_fold(cfg)["epochs_done"] == 0  # finished: nothing to do
    with pytest.raises(ValueError, match="train.epochs=0 validates starting weights"):
        fit_fold(tiny_config(cache, tmp_path, **{"train.epochs": 0, "name": "no_start"}))
    with pytest.raises(ConfigError, match="train.epochs must be >= 0"):
        tiny_config(cache, tmp_path, **{"train.epochs": -1})


def test_fit_fold_writes_the_oof_contract_and_report_reads_it(cache, tmp_path):
    from kit.evaluate.report import run_report
    from kit.train import fit_fold

    cfg = tiny_config(cache, tmp_path)
    summary = fit_fold(cfg)
    assert summary["finished"] and summary["epochs_done"] == 2
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str})
    held_out = [u for i, u in enumerate(cache["uids"]) if i % N_FOLDS == 0]
    assert sorted(oof[UID]) == held_out and (oof["fold"] == 0).all()
    for column in (*TARGETS, *(f"{t}_true" for t in TARGETS), "patient_overall_from_vertebrae",
                   *(f"attn_peak_{v}" for v in VERTEBRAE), *(f"found_{v}" for v in VERTEBRAE)):
        assert column in oof.columns, column
    p = oof[list(TARGETS)].to_numpy()
    assert ((p > 0) & (p < 1)).all()
    truth = cache["labels"].set_index(UID).loc[oof[UID], list(TARGETS)].to_numpy()
    np.testing.assert_array_equal(oof[[f"{t}_true" for t in TARGETS]].to_numpy(), truth)
    # no patient head: the 8 targets come from the vertebrae (targets_from_vertebrae with the odds the
    # row-normalised metric gives each target on the training folds' labels), patient_overall in both columns
    train = cache["labels"][[i % N_FOLDS != 0 for i in range(N_STUDIES)]]
    prevalence = train[list(TARGETS)].to_numpy(np.float64).mean(0)
    odds = effective_odds(train[list(TARGETS)].to_numpy(np.float64))
    chance = scale_odds(p[:, 1:], 1 / odds[1:])
    np.testing.assert_allclose(oof["patient_overall"], scale_odds(1 - np.prod(1 - chance, axis=1), odds[0]), atol=1e-6)
    np.testing.assert_allclose(oof["patient_overall"], oof["patient_overall_from_vertebrae"], atol=1e-9)
    # the vertebra not found gets the training folds' prevalence (at the metric's odds), and no attention peak
    row = oof.set_index(UID).loc[cache["uids"][MISSING[0]]]
    assert row[VERTEBRAE[MISSING[1]]] == pytest.approx(scale_odds(prevalence, odds)[1 + MISSING[1]], abs=1e-6)
    assert row[f"found_{VERTEBRAE[MISSING[1]]}"] == 0 and row[f"attn_peak_{VERTEBRAE[MISSING[1]]}"] == -1
    peaks = oof[[f"attn_peak_{v}" for v in VERTEBRAE]].to_numpy()
    assert ((peaks >= -1) & (peaks < T)).all() and (peaks >= 0).sum() == 7 * len(oof) - 1

    stored = json.loads((cfg.run_dir / "oof_summary.json").read_text())
    y = truth.astype(np.float64)
    assert stored["score"] == pytest.approx(competition_score(y, p), abs=1e-6)
    assert stored["baseline_score"] == pytest.approx(competition_score(y, prevalence), abs=1e-9)
    assert stored["train_prevalence"]["C1"] == pytest.approx(prevalence[1])
    assert set(stored["per_target"]) == set(TARGETS) and set(stored["auc"]) == set(TARGETS)
    assert sum(stored["per_target"].values()) == pytest.approx(stored["score"], abs=1e-9)
    assert stored["vertebrae_not_found"] == 1
    log = pd.read_csv(cfg.run_dir / "log.csv")
    assert "val_neg_score" in log.columns and len(log) == 2

    (result,) = run_report(cfg.run_dir.parent)
    assert result["kind"] == "cls" and result["n_studies"] == len(held_out)
    assert result["scores"][cfg.name]["row"] == pytest.approx(stored["score"], abs=1e-6)
    assert result["baseline_from_train_folds"]["score_row"] == pytest.approx(stored["baseline_score"], abs=1e-9)


def test_patient_model_trains_on_whole_studies(cache, tmp_path):
    from kit.train import fit_fold

    cfg = tiny_config(cache, tmp_path, **{"model.name": "cls_patient_gru", "train.epochs": 1,
                                          "train.batch_size": 4, "name": "cls_patient"})
    task = make_task(cfg)
    assert task.per_study
    fit_fold(cfg, task)
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str})
    p = oof[list(TARGETS)].to_numpy()
    from_vertebrae = 1 - np.prod(1 - p[:, 1:], axis=1)
    np.testing.assert_allclose(oof["patient_overall_from_vertebrae"], from_vertebrae, atol=1e-6)
    assert not np.allclose(oof["patient_overall"], from_vertebrae, atol=1e-3)  # the patient head's own output
    stored = json.loads((cfg.run_dir / "oof_summary.json").read_text())
    assert stored["patient_overall_source"] == "patient head"
    y = oof[[f"{t}_true" for t in TARGETS]].to_numpy(np.float64)
    assert stored["score_patient_from_vertebrae"] == pytest.approx(
        competition_score(y, np.c_[from_vertebrae, p[:, 1:]]), abs=1e-6)


def test_level_offsets_start_at_the_training_prevalence_and_reach_the_predictions(cache, tmp_path):
    """A fresh fold starts each vertebra's logit offset so that logit head + offset is the weighted optimum of
    the training folds' prevalence, q = 2p / (1 + p); training batches and validation pass each vertebra's level."""
    from kit.models import create_model

    cfg = tiny_config(cache, tmp_path)
    task = make_task(cfg)
    task.build()
    name, kwargs = cfg.model_spec()
    model = create_model(name, **kwargs)
    task.init_model(model)
    p = np.clip(task.train_prevalence[1:], 1e-4, 1 - 1e-4)
    q = 2 * p / (1 + p)
    start = (model.level_bias + model.logit_head.bias).detach().numpy()
    np.testing.assert_allclose(start, np.log(q / (1 - q)), atol=1e-5)
    np.testing.assert_allclose(model.metric_odds.numpy(), effective_odds(task.train_labels))
    # a per-study model trains on the row-normalised loss: its offsets start at the metric's own odds
    patient_cfg = tiny_config(cache, tmp_path, **{"model.name": "cls_patient_gru", "name": "cls_patient"})
    patient_task = make_task(patient_cfg)
    patient_task.build()
    patient = create_model(*patient_cfg.model_spec()[:1], **patient_cfg.model_spec()[1])
    patient_task.init_model(patient)
    row_q = scale_odds(p, effective_odds(patient_task.train_labels)[1:])
    start = (patient.vertebra.level_bias + patient.vertebra.logit_head.bias).detach().numpy()
    np.testing.assert_allclose(start, np.log(row_q / (1 - row_q)), atol=1e-5)

    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[2] if len(args) > 2 else None))
    vertebrae = CropDataset(cfg.data.crop_dir, cache["uids"][1:3], cache["labels"], skip_missing=True)
    batch = next(iter(torch.utils.data.DataLoader(vertebrae, batch_size=5)))
    task.loss(model, batch)
    assert torch.equal(seen[-1], batch["vertebra"]) and len(set(batch["vertebra"].tolist())) > 1
    sample = task.held_out.study(cache["uids"][0])
    task.predict_study(model.eval(), sample, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    assert torch.equal(seen[-1], torch.arange(7)[sample["found"]])


def test_unreadable_crop_files_are_left_out_and_listed(cache, tmp_path):
    """A crop file that cannot be read (truncated: its zip directory gone; garbage; a member's damaged deflate
    stream) does not stop the classifier's training: the study is left out, listed in skipped_studies.csv, and the
    held-out rest gets its OOF rows."""
    import shutil
    import zipfile

    from kit.train import fit_fold

    crops = tmp_path / "crops"
    shutil.copytree(cache["crop_dir"], crops)
    held_out = [u for i, u in enumerate(cache["uids"]) if i % N_FOLDS == 0]
    trained = [u for i, u in enumerate(cache["uids"]) if i % N_FOLDS != 0]
    truncated = crops / f"{trained[0]}.npz"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (crops / f"{held_out[1]}.npz").write_bytes(b"garbage")
    damaged = crops / f"{trained[1]}.npz"  # a member's deflate stream damaged: zlib.error, found by fuzzing
    with np.load(damaged) as members:
        np.savez_compressed(damaged, **dict(members))  # compressed, as kit crops writes them
    header = next(i for i in zipfile.ZipFile(damaged).infolist() if i.filename.startswith("crops")).header_offset
    data = bytearray(damaged.read_bytes())
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") \
        + int.from_bytes(data[header + 28:header + 30], "little")
    data[start] = 0xFF  # its first deflate block: final, of the reserved type 3
    damaged.write_bytes(bytes(data))
    cfg = tiny_config(cache, tmp_path, **{"data.crop_dir": str(crops), "train.epochs": 1})
    assert fit_fold(cfg)["finished"]
    listed = pd.read_csv(cfg.run_dir / "skipped_studies.csv", dtype=str)
    assert sorted(listed[UID]) == sorted([trained[0], trained[1], held_out[1]])
    assert "while decompressing data" in listed.set_index(UID).loc[trained[1], "reason"]
    assert listed["reason"].str.contains("kit crops").all()
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str})
    assert sorted(oof[UID]) == sorted(set(held_out) - {held_out[1]})
    # no held-out study readable: the run stops, naming the list it wrote
    for uid in held_out:
        (crops / f"{uid}.npz").write_bytes(b"garbage")
    cfg = tiny_config(cache, tmp_path / "all", **{"data.crop_dir": str(crops), "train.epochs": 1})
    with pytest.raises(ValueError, match="no held-out study left"):
        fit_fold(cfg)
    assert set(held_out) <= set(pd.read_csv(cfg.run_dir / "skipped_studies.csv", dtype=str)[UID])


@pytest.mark.parametrize("model", ["cls_gru", "cls_patient_gru"])
def test_training_under_autocast(cache, tmp_path, model):
    """train.amp=bf16 on CPU: the autocast the GPU path trains in (fp16 on a T4), through the classifier's loss,
    slice loss, EMA and OOF writer; finite losses, a complete run."""
    from kit.train import fit_fold

    extra = {"model.name": model, "train.batch_size": 4, "name": model} if model != "cls_gru" else {}
    cfg = tiny_config(cache, tmp_path, **{"train.amp": "bf16", "train.epochs": 1, "train.ema": True, **extra})
    assert fit_fold(cfg)["finished"]
    log = pd.read_csv(cfg.run_dir / "log.csv")
    assert np.isfinite(log[["train_loss", "val_loss"]].to_numpy()).all()
    assert (cfg.run_dir / "oof.csv").is_file()
