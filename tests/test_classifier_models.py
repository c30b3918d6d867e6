"""kit.models.classifier: every registered classifier (cls_*) through one set of tests on tiny inputs."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from kit.models import PatientClassifier, VertebraClassifier, create_model, list_models

torch.set_num_threads(1)

CLASSIFIERS = list_models("cls_*")
TINY = {"encoder": "test_resnet", "hidden": 8, "attention_hidden": 8}  # timm's tiny ResNet: ~0.4 M weights
C, S = 6, 32  # channels per slice, slice size


def build(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, in_channels=C, **{**TINY, **kwargs})


def lead_shape(model: torch.nn.Module, b: int, t: int) -> tuple[int, ...]:
    """(B, T) for a vertebra model, (B, V, T) for a patient model."""
    return (b, model.vertebrae, t) if isinstance(model, PatientClassifier) else (b, t)


def run(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
        vertebra_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if isinstance(model, PatientClassifier):
        return model(x, mask=mask, vertebra_mask=vertebra_mask)
    return model(x, mask=mask)


def check_gradients(model: torch.nn.Module) -> None:
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    stem = next(n for n, p in model.named_parameters() if p.ndim == 4)  # the backbone's first conv
    assert grads[stem] is not None and grads[stem].abs().sum() > 0, "the first conv gets no gradient"
    gru = [g for n, g in grads.items() if ".gru." in f".{n}"]
    assert gru and all(g is not None and g.abs().sum() > 0 for g in gru)


def test_every_classifier_is_tested_and_registered():
    assert CLASSIFIERS == ["cls_gru", "cls_patient_gru"]
    assert isinstance(build("cls_gru"), VertebraClassifier) and isinstance(build("cls_patient_gru"), PatientClassifier)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_backward_shapes_and_attention(name):
    """Every output has its documented shape; attention sums to 1 over real slices and is 0 on padding."""
    model = build(name)
    b, t = 2, 4
    lead = lead_shape(model, b, t)
    x = torch.randn(*lead, C, S, S)
    mask = torch.ones(lead, dtype=torch.bool)
    mask[0, ..., 3] = False  # the first item's last slice is padding (every vertebra of it, for the patient)
    mask[1, ..., 1] = False  # a hole in the middle of the second
    vertebra_mask = None
    if isinstance(model, PatientClassifier):
        vertebra_mask = torch.ones(b, 7, dtype=torch.bool)
        vertebra_mask[0, 2] = False  # C3 not found in the first study
    out = run(model, x, mask, vertebra_mask)

    dim = model.vertebra.embed_dim if isinstance(model, PatientClassifier) else model.embed_dim
    assert out["logit"].shape == lead[:-1]
    assert out["slice_logits"].shape == lead and out["attention"].shape == lead
    assert out["embedding"].shape == (*lead[:-1], dim) and dim == 2 * TINY["hidden"]
    assert all(torch.isfinite(v).all() for v in out.values())
    attention = out["attention"]
    real = mask if vertebra_mask is None else mask & vertebra_mask[..., None]
    assert torch.all(attention[~real] == 0)
    assert torch.all(attention >= 0)
    found = real.any(-1)
    torch.testing.assert_close(attention.sum(-1)[found], torch.ones(int(found.sum())))
    if isinstance(model, PatientClassifier):
        assert set(out) == {"logit", "slice_logits", "attention", "embedding", "patient_logit", "patient_attention"}
        assert out["patient_logit"].shape == (b,) and out["patient_attention"].shape == (b, 7)
        assert torch.all(attention[0, 2] == 0) and out["patient_attention"][0, 2] == 0
        torch.testing.assert_close(out["patient_attention"].sum(-1), torch.ones(b))
    else:
        assert set(out) == {"logit", "slice_logits", "attention", "embedding"}

    loss = out["logit"].sum() + out["slice_logits"][real].square().mean()
    if "patient_logit" in out:
        loss = loss + out["patient_logit"].sum()
    loss.backward()
    check_gradients(model)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_bigru_carries_context_both_ways(name):
    """Changing the last slice changes the first slice's logit and vice versa (a bidirectional GRU)."""
    model = build(name).eval()
    x = torch.randn(*lead_shape(model, 1, 4), C, S, S)
    for changed, watched in ((-1, 0), (0, -1)):
        y = x.clone()
        y[..., changed, :, :, :] += 1.0
        with torch.no_grad():
            a, b = run(model, x)["slice_logits"], run(model, y)["slice_logits"]
        assert not torch.allclose(a[..., watched], b[..., watched])


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("training", [False, True])
def test_padding_does_not_change_real_steps(name, training):
    """Padded slices (at the end and in the middle) leave every output on real slices as it was.

    Holds in train mode too (dropout 0): padded slices never reach the CNN, so BatchNorm sees the same batch.
    """
    model = build(name).train(training)
    t = 4
    x = torch.randn(*lead_shape(model, 2, t), C, S, S)
    junk = torch.randn(*lead_shape(model, 2, 3), C, S, S) * 5
    # real slices at 0, 1, 3, 4; junk at 2 (a dropped slice) and 5, 6 (padding to a longer stack)
    padded = torch.cat([x[..., :2, :, :, :], junk[..., :1, :, :, :], x[..., 2:, :, :, :], junk[..., 1:, :, :, :]],
                       dim=len(lead_shape(model, 2, t)) - 1)
    real = torch.tensor([True, True, False, True, True, False, False])
    mask = real.expand(*lead_shape(model, 2, 7)).clone()
    with torch.no_grad():
        plain, pad = run(model, x), run(model, padded, mask)
    for key in ("logit", "embedding", "patient_logit", "patient_attention"):
        if key in plain:
            torch.testing.assert_close(pad[key], plain[key], rtol=1e-5, atol=1e-5)
    for key in ("slice_logits", "attention"):
        torch.testing.assert_close(pad[key][..., real], plain[key], rtol=1e-5, atol=1e-5)
    assert torch.all(pad["attention"][..., ~real] == 0)


def test_missing_vertebra_does_not_change_the_others():
    """A vertebra marked not found: its pixels are never used and it is left out of the patient pooling."""
    model = build("cls_patient_gru").eval()
    x = torch.randn(1, 7, 3, C, S, S)
    y = x.clone()
    y[0, 4] = torch.randn(3, C, S, S) * 10  # whatever sits in C5's place
    vertebra_mask = torch.tensor([[True, True, True, True, False, True, True]])
    with torch.no_grad():
        a, b = model(x, vertebra_mask=vertebra_mask), model(y, vertebra_mask=vertebra_mask)
        full = model(x)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the six found vertebrae come out as without the mask; only the patient pooling changes
    keep = vertebra_mask[0]
    torch.testing.assert_close(a["logit"][:, keep], full["logit"][:, keep], rtol=1e-5, atol=1e-5)
    assert a["patient_attention"][0, 4] == 0 and full["patient_attention"][0, 4] > 0
    assert not torch.allclose(a["patient_logit"], full["patient_logit"])
    # a vertebra whose slices are all masked counts as not found
    mask = torch.ones(1, 7, 3, dtype=torch.bool)
    mask[0, 4] = False
    with torch.no_grad():
        torch.testing.assert_close(model(y, mask=mask)["patient_logit"], a["patient_logit"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("encoder", ["resnet10t", "tf_efficientnetv2_b0", "efficientnet_b0", "convnext_atto",
                                     "mobilenetv3_small_050"])
def test_backbone_families_build_and_run(encoder):
    """ResNet, EfficientNetV2, EfficientNet, ConvNeXt and MobileNetV3 backbones (timm names) all fit; the GRU
    is sized from the backbone's real output width (MobileNetV3's is its conv head, not num_features)."""
    torch.manual_seed(0)
    model = create_model("cls_gru", in_channels=C, encoder=encoder, hidden=8, attention_hidden=8)
    x = torch.randn(1, 2, C, S, S)
    assert model.cnn(x[0]).shape == (2, model.num_features) and model.gru.input_size == model.num_features
    out = model(x)
    assert out["logit"].shape == (1,) and out["slice_logits"].shape == (1, 2) and out["attention"].shape == (1, 2)
    (out["logit"].sum() + out["slice_logits"].sum()).backward()
    check_gradients(model)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_unknown_encoder_is_named(name):
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet10'.*close names: .*resnet10t"):
        create_model(name, encoder="resnet10")
    with pytest.raises(ValueError, match="unknown encoder 'tu-no_such_net'"):
        create_model(name, encoder="tu-no_such_net")
    assert create_model(name, encoder="tu-test_resnet", hidden=8).num_features == 96  # the tu- spelling works


def test_wrong_inputs_say_what_was_expected():
    model = build("cls_gru")
    with pytest.raises(ValueError, match=r"x has 5 channels per slice; this model was built for in_channels=6"):
        model(torch.randn(1, 2, 5, S, S))
    with pytest.raises(ValueError, match=r"expected x of shape \(B, T, C, H, W\); got \(2, 6, 32, 32\)"):
        model(torch.randn(2, C, S, S))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) = \(1, 2\); got \(1, 3\)"):
        model(torch.randn(1, 2, C, S, S), mask=torch.ones(1, 3, dtype=torch.bool))
    patient = build("cls_patient_gru")
    with pytest.raises(ValueError, match="x holds 6 vertebrae per study; this model was built for 7"):
        patient(torch.randn(1, 6, 2, C, S, S))
    with pytest.raises(ValueError, match="chunk must be a positive number"):
        build("cls_gru", chunk=0)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_chunked_cnn_gives_the_same_output(name):
    """chunk=k runs the CNN on k slice images at a time (counted), with the same outputs in eval mode."""
    model = build(name).eval()
    chunked = build(name, seed=1, chunk=4).eval()
    chunked.load_state_dict(model.state_dict())
    lead = lead_shape(model, 2, 3)
    x = torch.randn(*lead, C, S, S)
    mask = torch.ones(lead, dtype=torch.bool)
    mask[1, ..., 2] = False
    n_images = int(mask.sum())
    cnn = chunked.vertebra.cnn if isinstance(chunked, PatientClassifier) else chunked.cnn
    calls = []
    cnn.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        a, b = run(model, x, mask), run(chunked, x, mask)
    assert calls == [4] * (n_images // 4) + ([n_images % 4] if n_images % 4 else [])
    assert len(calls) == math.ceil(n_images / 4) > 1
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build("cls_gru")
    checkpointed = build("cls_gru", seed=1, grad_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    assert checkpointed.cnn.grad_checkpointing and not model.cnn.grad_checkpointing
    x = torch.randn(2, 3, C, S, S)
    for m in (model, checkpointed):
        m(x)["logit"].sum().backward()
    for (key, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=key)


def test_head_prior_sets_the_starting_probability():
    model = build("cls_patient_gru", head_prior=0.1, patient_prior=0.3)
    for head, prior in ((model.vertebra.logit_head, 0.1), (model.vertebra.slice_head, 0.1),
                        (model.patient_head, 0.3)):
        torch.testing.assert_close(torch.sigmoid(head.bias), torch.tensor([prior]))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_pretrained_timm_backbone_file(tmp_path, name):
    """A local RGB timm checkpoint fills the backbone (first conv adapted to 6 channels); nothing else moves."""
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False)  # with its classifier, 3 input channels
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = build(name, seed=5, pretrained_weights=str(tmp_path / "backbone.pth"))
    fresh = build(name, seed=5)
    cnn = model.vertebra.cnn if isinstance(model, PatientClassifier) else model.cnn
    mine, src = cnn.state_dict(), source.state_dict()
    same_shape = [k for k in mine if k in src and mine[k].shape == src[k].shape]
    assert len(same_shape) == len(mine) - 1  # all but the stem
    for k in same_shape:
        assert torch.equal(mine[k], src[k]), k
    stem = "conv1.0.weight"
    assert src[stem].shape[1] == 3 and mine[stem].shape[1] == C
    torch.testing.assert_close(mine[stem][:, :3], src[stem] * 3 / C)  # timm's adapt_input_conv: repeat, rescale
    for (key, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if ".cnn." not in f".{key}":
            assert torch.equal(a, b), f"{key} changed by a backbone file"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_pretrained_whole_model_file(tmp_path, name):
    """A whole classifier's state dict (saved under a DDP prefix) loads into the whole model."""
    source = build(name, seed=1).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    model = build(name, seed=2, pretrained_weights=str(tmp_path / "w.pt")).eval()
    for (key, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key
    x = torch.randn(*lead_shape(model, 1, 2), C, S, S)
    with torch.no_grad():
        torch.testing.assert_close(run(model, x)["logit"], run(source, x)["logit"], rtol=0, atol=0)


def test_patient_model_starts_from_a_vertebra_model(tmp_path):
    """A trained cls_gru's file fills the patient model's shared vertebra path; the patient head stays new."""
    vertebra = build("cls_gru", seed=1)
    torch.save({"model": vertebra.state_dict()}, tmp_path / "vertebra.pt")
    patient = build("cls_patient_gru", seed=2, pretrained_weights=str(tmp_path / "vertebra.pt"))
    fresh = build("cls_patient_gru", seed=2)
    for (key, a), b in zip(vertebra.state_dict().items(), patient.vertebra.state_dict().values()):
        assert torch.equal(a, b), key
    assert torch.equal(patient.patient_head.weight, fresh.patient_head.weight)
    with pytest.raises(ValueError, match="no tensor matches this classifier"):
        torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pt")
        build("cls_gru", pretrained_weights=str(tmp_path / "other.pt"))


def test_level_offsets_add_to_the_vertebra_logit(tmp_path, caplog):
    """`level` adds each vertebra's `level_bias` to its logit and to nothing else; a patient model adds C1..C7's
    to its seven rows; weights from before the offsets load with zeros (and say so); bad levels are named."""
    torch.manual_seed(1)
    x = torch.rand(3, 4, C, S, S)
    model = build("cls_gru").eval()
    with torch.no_grad():
        model.level_bias.copy_(torch.arange(7, dtype=torch.float32) - 3.0)
        plain, tagged = model(x), model(x, None, torch.tensor([0, 6, 6]))
    torch.testing.assert_close(tagged["logit"] - plain["logit"], torch.tensor([-3.0, 3.0, 3.0]))
    torch.testing.assert_close(tagged["slice_logits"], plain["slice_logits"])
    torch.testing.assert_close(tagged["attention"], plain["attention"])
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 7])):
        with pytest.raises(ValueError, match="level must"):
            model(x, None, bad)

    patient = build("cls_patient_gru").eval()
    with torch.no_grad():
        patient.vertebra.level_bias.copy_(torch.linspace(-1, 1, 7))
        xs = x[:1, None].expand(1, 7, *x.shape[1:])  # the same stack at every level
        logits = patient(xs)["logit"][0]
    torch.testing.assert_close(logits - logits[0], torch.linspace(-1, 1, 7) + 1)

    old = {k: v for k, v in model.state_dict().items() if k != "level_bias"}
    fresh = build("cls_gru", seed=5)
    with caplog.at_level("WARNING", logger="kit.models"):
        fresh.load_state_dict(old)
    assert torch.equal(fresh.level_bias, torch.zeros(7)) and "zero level offsets" in caplog.text
    torch.testing.assert_close(fresh.eval()(x)["logit"], plain["logit"])
