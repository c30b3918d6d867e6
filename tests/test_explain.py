"""kit.evaluate.explain: box mapping into crop pixels, Grad-CAM against an independent computation, attention, the plot and
`kit explain` on a tiny trained run over a fake crop cache (the `kit crops` format, tests/test_cls_task.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kit.constants import VERTEBRAE
from kit.stage2.crops import crop_box_original, crop_vertebra_stack
from kit.stage2.store import load_crops
from kit.stage1.postprocess import vertebra_extents
from kit.evaluate.explain import box_to_crop, explain_study, grad_cam, plot_explanation
from kit.runs import load_run
from test_cls_task import MISSING, S, T, tiny_config, write_crop_cache

torch.set_num_threads(1)
UID = "StudyInstanceUID"


# ------------------------------------------------------------------------------------------- pure pieces

def test_box_to_crop_hand_made():
    # crop box y 100..200, x 50..150 (100 px) shown at 50 px: half scale, shifted
    np.testing.assert_allclose(box_to_crop([[60, 120, 20, 10]], (100, 200, 50, 150), 50), [[5, 10, 15, 15]])
    # a box reaching past the image's top-left corner (y0, x0 < 0), shown at 2x; a non-square crop box
    np.testing.assert_allclose(box_to_crop([[0, 0, 10, 5]], (-20, 80, -10, 90), 200), [[20, 40, 40, 50]])
    np.testing.assert_allclose(box_to_crop([[10, 10, 10, 10]], (0, 40, 0, 20), 40), [[20, 10, 40, 20]])
    assert box_to_crop(np.zeros((0, 4)), (0, 10, 0, 10), 5).shape == (0, 4)
    with pytest.raises(ValueError, match="y1 > y0"):
        box_to_crop([[0, 0, 1, 1]], (10, 10, 0, 5), 8)


def test_box_to_crop_lands_on_the_boxed_pixels_of_a_real_crop():
    """A bright rectangle at a known place of the original grid, cut by the stage-2 crop code: the mapped box
    frames exactly the bright pixels of the crop."""
    hu = np.full((10, 96, 128), -1000.0, np.float32)
    x, y, w, h = 70, 40, 16, 10
    hu[3:7, y:y + h, x:x + w] = 1500.0
    labels = np.zeros((10, 24, 32), np.uint8)  # prepared grid: 4 original pixels a prepared pixel
    labels[2:8, 8:15, 15:24] = 1
    extent = vertebra_extents(labels)["C1"]
    size = 64
    stack = crop_vertebra_stack(hu, labels, extent, n_slices=6, n_neighbours=0, neighbour_mm=None, dz=1.0, size=size,
                                windows=("bone",), margin=0.15, with_mask=True)
    box = crop_box_original(extent, (4.0, 4.0), hu.shape[1:], 0.15)
    assert box[1] - box[0] != size  # a real resize, not the identity
    x0, y0, x1, y1 = box_to_crop([[x, y, w, h]], box, size)[0]
    plane = stack[3, 0]  # sampled slice 3 of z 2..7 is z 5: inside the rectangle
    rows, cols = np.nonzero(plane > 200)
    # the pixels whose centres lie inside the mapped box are the bright ones (one-pixel rim of blending)
    assert rows.min() >= np.floor(y0) and rows.max() <= np.ceil(y1) - 1
    assert cols.min() >= np.floor(x0) and cols.max() <= np.ceil(x1) - 1
    inner = plane[int(np.ceil(y0)) + 1:int(np.floor(y1)) - 1, int(np.ceil(x0)) + 1:int(np.floor(x1)) - 1]
    assert inner.size > 0 and (inner == 255).all()


def test_grad_cam_hand_made():
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    grads = torch.stack([torch.ones(2, 2), -torch.ones(2, 2)])[None]  # channel weights +1 and -1
    np.testing.assert_allclose(grad_cam(maps, grads, 2)[0].numpy(), [[0.0, 2.0], [3.0, 4.0]])  # relu(A0 - A1)
    up = grad_cam(maps, grads, 8)
    assert up.shape == (1, 8, 8) and float(up.min()) >= 0.0
    assert float(up[0, 0, 0]) == pytest.approx(0.0) and float(up[0, -1, -1]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"\(N, K, h, w\)"):
        grad_cam(maps[0], grads[0], 4)


# ------------------------------------------------------------------------------------------- a tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A fake crop cache (12 studies, 3 folds, S=32, T=4; study 0's C3 not found) and fold 0 of a tiny cls_gru
    run trained one epoch on it; studies of fold 0 are held out (listed in its oof.csv)."""
    root = tmp_path_factory.mktemp("explain")
    cache = write_crop_cache(root)
    cfg = tiny_config(cache, root, **{"train.epochs": 1})
    from kit.train import fit_fold

    fit_fold(cfg)
    return {**cache, "cfg": cfg, "run": cfg.run_dir.parent}


def _independent_cam(blocks: torch.nn.Module, logit, rows: slice) -> np.ndarray:
    """Grad-CAM by another route: a forward hook on the backbone's last block (`blocks`), `retain_grad` and one
    backward pass of the scalar `logit()`; the images `rows` of the CNN's batch -> (T, S, S), unscaled."""
    kept = []
    handle = blocks.register_forward_hook(lambda module, inputs, output: kept.append(output))
    try:
        with torch.enable_grad():
            value = logit()
            kept[0].retain_grad()
            value.backward()
    finally:
        handle.remove()
    a, g = kept[0].detach()[rows], kept[0].grad[rows]
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    return F.interpolate(cam, size=(S, S), mode="bilinear", align_corners=False)[:, 0].numpy()


def _flip_head(model: torch.nn.Module) -> None:
    """Negate a vertebra model's logit (its head and its level offsets): the raw Grad-CAM changes sign, so what
    the ReLU drops and keeps swaps."""
    with torch.no_grad():
        model.logit_head.weight.neg_()
        model.logit_head.bias.neg_()
        model.level_bias.neg_()


def test_explain_study_attention_saliency_and_prediction(tiny_run):
    uid = tiny_run["uids"][MISSING[0]]  # fold 0 holds study 0 out; its C3 is missing
    explanations = explain_study(tiny_run["run"], None, uid)
    found = [v for i, v in enumerate(VERTEBRAE) if i != MISSING[1]]
    assert [e.vertebra for e in explanations] == found
    arrays = load_crops(tiny_run["crop_dir"], uid)
    oof = pd.read_csv(tiny_run["run"] / "fold0" / "oof.csv", dtype={UID: str}).set_index(UID).loc[uid]
    labels = tiny_run["labels"].set_index(UID).loc[uid]
    for e in explanations:
        v = VERTEBRAE.index(e.vertebra)
        assert e.fold == 0 and e.held_out
        assert e.saliency.shape == (T, S, S) and e.saliency.dtype == np.float32
        assert np.isfinite(e.saliency).all() and e.saliency.min() >= 0.0
        assert e.saliency.max() == pytest.approx(1.0 if e.saliency_max > 0 else 0.0)
        assert e.attention.shape == (T,) and (e.attention >= 0).all()
        assert e.attention.sum() == pytest.approx(1.0, abs=1e-5)
        assert e.slice_logits.shape == (T,) and np.isfinite(e.slice_logits).all()
        assert e.prob == pytest.approx(oof[e.vertebra], abs=1e-5)  # what validation predicted for it
        assert e.label == int(labels[e.vertebra])
        np.testing.assert_array_equal(e.image, arrays["crops"][v, :, 2])  # bone+0 of 5 neighbours
        np.testing.assert_array_equal(e.mask, arrays["crops"][v, :, -1] > 127)
        np.testing.assert_array_equal(e.positions, arrays["positions"][v])
        np.testing.assert_array_equal(e.slice_numbers, arrays["instance_numbers"][arrays["positions"][v]])
        assert not e.box_slices.any() and e.boxes is None  # no box rows, and a cache without crop_boxes
    with pytest.raises(ValueError, match=rf"{VERTEBRAE[MISSING[1]]} not found"):
        explain_study(tiny_run["run"], None, uid, vertebrae=[VERTEBRAE[MISSING[1]]])
    with pytest.raises(ValueError, match="unknown vertebra"):
        explain_study(tiny_run["run"], None, uid, vertebrae=["T1"])


def test_saliency_matches_an_independent_grad_cam_for_either_sign(tiny_run):
    """Every vertebra explained in one batch gets the Grad-CAM of its own logit, computed alone by another route;
    with the head's sign flipped too, so that one of the two runs has maps that are not all 0."""
    uid = tiny_run["uids"][1]
    crops = torch.from_numpy(load_crops(tiny_run["crop_dir"], uid)["crops"]).float() / 255.0
    m = load_run(tiny_run["run"], folds=[0])[0]
    totals = []
    for flipped in (False, True):
        if flipped:
            _flip_head(m.model)
        explanations = explain_study([m], tiny_run["crop_dir"], uid)
        assert explanations[0].held_out is False  # fold 0 trained on study 1
        for e in explanations:
            v = VERTEBRAE.index(e.vertebra)
            expected = _independent_cam(m.model.cnn.blocks, lambda: m.model(crops[v:v + 1])["logit"][0], slice(None))
            np.testing.assert_allclose(e.saliency * e.saliency_max, expected, rtol=1e-4, atol=1e-6)
        totals.append(sum(e.saliency_max for e in explanations))
    assert max(totals) > 0


def test_a_frozen_backbone_is_explained_as_the_same_weights_unfrozen(tiny_run):
    """The demo's classifier runs with model.freeze_backbone (its CNN builds no graph in training): its saliency is
    the one the same weights give unfrozen, with the head's sign flipped too so that some maps are not all 0."""
    uid = tiny_run["uids"][1]
    m = load_run(tiny_run["run"], folds=[0])[0]
    totals = []
    for flipped in (False, True):
        if flipped:
            _flip_head(m.model)
        m.model.freeze_backbone = False
        m.model.cnn.requires_grad_(True)
        free = explain_study([m], tiny_run["crop_dir"], uid)
        m.model.freeze_backbone = True
        m.model.cnn.requires_grad_(False)
        frozen = explain_study([m], tiny_run["crop_dir"], uid)
        for a, b in zip(frozen, free):
            assert a.vertebra == b.vertebra and a.prob == pytest.approx(b.prob, abs=1e-6)
            np.testing.assert_allclose(a.saliency * a.saliency_max, b.saliency * b.saliency_max, rtol=1e-5, atol=1e-7)
        totals.append(sum(e.saliency_max for e in frozen))
    assert max(totals) > 0


def test_flip_tta_run_explains_the_probability_its_validation_gave(tiny_run, tmp_path):
    """A run with data.tta_flip: the explained probability is the mean over the crops and their mirror, the one
    its OOF table holds; logit, attention and saliency stay those of the crops as they are."""
    from kit.train import fit_fold

    cfg = tiny_config(tiny_run, tmp_path, **{"train.epochs": 1, "data.tta_flip": True, "name": "cls_flip"})
    fit_fold(cfg)
    uid = tiny_run["uids"][MISSING[0]]
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str}).set_index(UID).loc[uid]
    m = load_run(cfg.run_dir.parent, folds=[0])[0]
    flipped = explain_study([m], None, uid)
    m.config.data.tta_flip = False
    plain = explain_study([m], None, uid)
    for e, p in zip(flipped, plain):
        assert e.prob == pytest.approx(oof[e.vertebra], abs=1e-5)
        assert e.logit == p.logit and np.array_equal(e.saliency, p.saliency)
    assert not np.allclose([e.prob for e in flipped], [p.prob for p in plain], rtol=0, atol=1e-7)


def test_patient_model_explained_on_the_whole_study(tiny_run, tmp_path):
    """cls_patient_gru sees all seven vertebrae at once: each asked vertebra still gets its own logit's Grad-CAM
    (checked as above, for either sign of the head), its attention sums to 1, and its probability is the one
    validation wrote."""
    from kit.train import fit_fold

    cfg = tiny_config(tiny_run, tmp_path, **{"model.name": "cls_patient_gru", "train.epochs": 1,
                                             "train.batch_size": 4, "name": "cls_patient"})
    fit_fold(cfg)
    uid = tiny_run["uids"][MISSING[0]]
    oof = pd.read_csv(cfg.run_dir / "oof.csv", dtype={UID: str}).set_index(UID).loc[uid]
    m = load_run(cfg.run_dir.parent, folds=[0])[0]
    crops = torch.from_numpy(load_crops(tiny_run["crop_dir"], uid)["crops"]).float()[None] / 255.0
    found = torch.ones(1, 7, dtype=torch.bool)
    found[0, MISSING[1]] = False
    totals = []
    for flipped in (False, True):
        if flipped:
            _flip_head(m.model.vertebra)
        explanations = explain_study([m], None, uid, vertebrae=["C2", "C7"])
        assert [e.vertebra for e in explanations] == ["C2", "C7"]
        for e in explanations:
            v = VERTEBRAE.index(e.vertebra)
            assert e.held_out and e.attention.sum() == pytest.approx(1.0, abs=1e-5)
            assert e.prob == pytest.approx(oof[e.vertebra] if not flipped else 1 - oof[e.vertebra], abs=1e-5)
            assert e.saliency.shape == (T, S, S) and np.isfinite(e.saliency).all() and e.saliency.min() >= 0.0
            start = (v - int(v > MISSING[1])) * T  # the CNN ran on the found vertebrae's slices only
            expected = _independent_cam(m.model.vertebra.cnn.blocks,
                                        lambda: m.model(crops, vertebra_mask=found)["logit"][0, v],
                                        slice(start, start + T))
            np.testing.assert_allclose(e.saliency * e.saliency_max, expected, rtol=1e-4, atol=1e-6)
        totals.append(sum(e.saliency_max for e in explanations))
    assert max(totals) > 0


def test_fracture_boxes_on_sampled_slices_are_mapped_into_the_crop(tiny_run, tmp_path):
    """A copy of a study's crops with the crop boxes stored and C2's slice targets set to its slice t2; box rows on
    C2's sampled slices t1 and t2, one on a slice no vertebra samples, one of another study."""
    uid = tiny_run["uids"][3]
    arrays = load_crops(tiny_run["crop_dir"], uid)
    crop_boxes = np.tile(np.array([[8, 56, 4, 52]], np.int32), (7, 1))  # 48 original px shown at S=32
    arrays["slice_targets"][1] = [0, 0, 1, 0]  # kit crops gave the t2 box to C2, the t1 box to another vertebra
    np.savez(tmp_path / f"{uid}.npz", **arrays, crop_boxes=crop_boxes)
    c2 = arrays["positions"][1]
    t1, t2 = (int(arrays["instance_numbers"][c2[t]]) for t in (1, 2))
    boxes = pd.DataFrame({UID: [uid, uid, uid, "1.2.3"], "x": [16.0, 30.0, 10.0, 0.0], "y": [20.0, 30.0, 10.0, 0.0],
                          "width": [12.0, 4.0, 5.0, 5.0], "height": [6.0, 4.0, 5.0, 5.0],
                          "slice_number": [t2, t1, 79, t2]})
    (e,) = explain_study(tiny_run["run"], tmp_path, uid, vertebrae=["C2"], boxes=boxes)
    assert e.box_slices.tolist() == [False, True, True, False]
    assert [len(b) for b in e.boxes] == [0, 1, 1, 0]
    np.testing.assert_allclose(e.boxes[2], [[(16 - 4) * 32 / 48, (20 - 8) * 32 / 48, (28 - 4) * 32 / 48,
                                             (26 - 8) * 32 / 48]])
    np.testing.assert_allclose(e.boxes[1], [[(30 - 4) * 32 / 48, (30 - 8) * 32 / 48, (34 - 4) * 32 / 48,
                                             (34 - 8) * 32 / 48]])
    axes = plot_explanation(e).axes
    red, orange = (1.0, 0.0, 0.0), (1.0, 0.6470588235294118, 0.0)
    for t, colour in ((1, orange), (2, red)):
        (patch,) = axes[t].patches
        assert patch.get_edgecolor()[:3] == pytest.approx(colour)
        assert axes[t].spines["top"].get_edgecolor()[:3] == pytest.approx(colour)
    assert not axes[0].patches and not axes[3].patches
    # the older cache (no crop_boxes): the slices are still marked, the boxes cannot be placed
    (old,) = explain_study(tiny_run["run"], None, uid, vertebrae=["C2"], boxes=boxes)
    assert old.boxes is None and old.box_slices.tolist() == e.box_slices.tolist()


def test_plot_explanation_one_row_per_vertebra(tiny_run):
    explanations = explain_study(tiny_run["run"], None, tiny_run["uids"][0], vertebrae=["C1", "C2"])
    fig = plot_explanation(explanations)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2 * T and all(len(ax.images) == 2 for ax in axes)  # slice + saliency
    for e, row in zip(explanations, (axes[:T], axes[T:])):
        for t, ax in enumerate(row):
            assert f"a {e.attention[t]:.2f}" in ax.get_title()
            assert ax.get_title(loc="center").startswith(f"t{t} z{e.positions[t]}")
    for e, first in zip(explanations, (axes[0], axes[T])):  # the row title above the first panel
        assert first.texts[0].get_text().startswith(f"{e.uid} {e.vertebra}: p = {e.prob:.3f} (true {e.label})")


def test_cli_explain_writes_the_most_likely_vertebra(tiny_run, tmp_path, capsys):
    import matplotlib.image

    from kit.cli import main

    uid = tiny_run["uids"][0]
    main(["explain", str(tiny_run["run"]), "--uid", uid, "--out", str(tmp_path)])
    best = max(explain_study(tiny_run["run"], None, uid), key=lambda e: e.prob)
    png = tmp_path / f"{uid}_{best.vertebra}.png"
    assert sorted(os.listdir(tmp_path)) == [png.name]
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    printed = capsys.readouterr().out
    assert f"{uid} {best.vertebra}: p={best.prob:.3f}" in printed and str(png) in printed
    main(["explain", str(tiny_run["run"]), "--uid", uid, "--vertebra", "C7", "C1", "--fold", "0"])
    written = sorted(p.name for p in (Path(tiny_run["run"]) / "explain").iterdir())
    assert written == [f"{uid}_C1.png", f"{uid}_C7.png"]


@pytest.mark.parametrize("encoder", ["resnet18d", "efficientnet_b0", "tf_efficientnetv2_b0", "convnext_atto",
                                     "mobilenetv3_small_050"])
def test_feature_maps_are_captured_for_every_backbone_family(encoder):
    """The saliency's hook sees one (N, K, h, w) map per CNN call in each family the classifier supports (chunked
    calls too), changes no output, and leaves the backbone as it was."""
    from kit.evaluate.explain import capture_feature_maps
    from kit.models import create_model

    torch.manual_seed(0)
    model = create_model("cls_gru", in_channels=6, encoder=encoder, hidden=8, chunk=3).eval()
    x = torch.rand(1, 5, 6, 64, 64)
    with torch.no_grad():
        plain = model(x)["logit"]
        with capture_feature_maps(model.cnn) as maps:
            hooked = model(x)["logit"]
    assert [m.shape[0] for m in maps] == [3, 2] and all(m.ndim == 4 and m.shape[-1] >= 1 for m in maps)
    assert torch.equal(plain, hooked) and "forward_features" not in vars(model.cnn)
