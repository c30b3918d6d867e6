"""kit.models: every registered model runs forward/backward on tiny inputs; the registry and local weights."""

from __future__ import annotations

import pytest
import timm
import torch

from kit.models import Segmenter, create_model, list_models, load_checkpoint, load_weights

torch.set_num_threads(1)

# Tiny settings per model family, so one shared test covers every registered model on CPU.
TINY = {"seg_": {"encoder": "tu-mobilenetv3_small_050", "encoder_depth": 3, "decoder_width": 16},
        "level_": {"encoder": "mobilenetv3_small_050", "hidden": 16}}


def tiny_kwargs(name: str) -> dict:
    for prefix, kwargs in TINY.items():
        if name.startswith(prefix):
            return dict(kwargs)
    raise AssertionError(f"add tiny settings for {name} to TINY")


def check_gradients(model) -> None:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert any(g.abs().sum() > 0 for g in grads[:3])  # the first conv sees the input


@pytest.mark.parametrize("name", list_models("level_*"))
def test_level_models_forward_backward(name):
    """Level models take whole studies (B, T, C, H, W) and give per-slice logits (B, T, 7); any T and size."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, classes=7, **tiny_kwargs(name))
    logits = model(torch.randn(2, 6, 3, 48, 48))
    assert logits.shape == (2, 6, 7)
    logits.square().mean().backward()
    check_gradients(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 11, 3, 40, 52)).shape == (1, 11, 7)
        # the GRU carries context: changing the last slice changes the first slice's output
        x = torch.randn(1, 5, 3, 48, 48)
        y = x.clone()
        y[0, -1] += 1.0
        assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])


@pytest.mark.parametrize("name", list_models("seg_*"))
@pytest.mark.parametrize("classes", [7, 8])
def test_forward_backward(name, classes):
    torch.manual_seed(0)
    model = create_model(name, in_channels=5, classes=classes, **tiny_kwargs(name))
    x = torch.randn(2, 5, 64, 64)
    logits = model(x)
    assert logits.shape == (2, classes, 64, 64)
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the first conv sees the input depth
    assert any(g.abs().sum() > 0 for g in grads[:3])
    # any size works: padded to the stride inside, cropped back
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 5, 40, 52)).shape == (1, classes, 40, 52)


def test_smp_native_encoder_and_other_archs():
    for name in ("seg_unet", "seg_fpn"):
        model = create_model(name, in_channels=3, classes=7, encoder="resnet18", encoder_depth=3, decoder_width=32)
        assert isinstance(model, Segmenter) and model(torch.randn(1, 3, 32, 32)).shape == (1, 7, 32, 32)


def test_unet_at_output_stride_2():
    """output_stride=2 leaves out the last decoder block; logits still come at the input's size, any size."""
    torch.manual_seed(0)
    full = create_model("seg_unet", in_channels=5, classes=8, **tiny_kwargs("seg_unet"))
    half = create_model("seg_unet", in_channels=5, classes=8, output_stride=2, **tiny_kwargs("seg_unet"))
    assert len(half.net.decoder.blocks) == len(full.net.decoder.blocks) - 1
    logits = half(torch.randn(2, 5, 64, 64))
    assert logits.shape == (2, 8, 64, 64)
    logits.square().mean().backward()
    check_gradients(half)
    half.eval()
    with torch.no_grad():
        assert half(torch.randn(1, 5, 40, 52)).shape == (1, 8, 40, 52)
        # the head works at stride 2 and its map is interpolated: a constant head output stays constant
        head = half.net.segmentation_head[0]
        head.weight.zero_(), head.bias.fill_(0.25)
        assert torch.allclose(half(torch.randn(1, 5, 40, 52)), torch.full((1, 8, 40, 52), 0.25))
    with pytest.raises(ValueError, match="output_stride must be 1, or 2 with arch 'unet'"):
        create_model("seg_fpn", in_channels=5, output_stride=2, **tiny_kwargs("seg_fpn"))


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'seg_nope'; available: .*seg_fpn, seg_unet"):
        create_model("seg_nope")
    with pytest.raises(ValueError, match="unknown encoder 'tu-no_such_net'"):
        create_model("seg_unet", encoder="tu-no_such_net")
    with pytest.raises(ValueError, match="unknown segmenter arch 'deeplab'; available: unet, unetpp, fpn"):
        Segmenter(arch="deeplab")
    assert list_models("seg_*") == [n for n in list_models() if n.startswith("seg_")]
    # cls_* are covered by test_classifier_models.py
    families = set(list_models("seg_*")) | set(list_models("level_*")) | set(list_models("cls_*"))
    assert set(list_models()) == families, "a model family untested"


def test_pretrained_whole_model_with_prefixes(tmp_path):
    kwargs = dict(in_channels=5, classes=7, **tiny_kwargs("seg_unet"))
    torch.manual_seed(1)
    source = create_model("seg_unet", **kwargs)
    # saved the way DDP / EMA wrappers save it: every key prefixed
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    torch.manual_seed(2)
    model = create_model("seg_unet", pretrained_weights=str(tmp_path / "w.pt"), **kwargs)
    for (k, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_pretrained_timm_backbone_into_encoder(tmp_path):
    torch.manual_seed(3)
    backbone = timm.create_model("mobilenetv3_small_050", pretrained=False)  # an RGB ImageNet-style checkpoint
    torch.save(backbone.state_dict(), tmp_path / "mobilenet.pth")
    model = create_model("seg_unet", in_channels=5, classes=7, pretrained_weights=str(tmp_path / "mobilenet.pth"),
                         **tiny_kwargs("seg_unet"))
    enc = model.net.encoder.model.state_dict()
    src = backbone.state_dict()
    shared = [k for k in enc if k in src and enc[k].shape == src[k].shape]
    assert len(shared) > 20
    for k in shared:
        assert torch.equal(enc[k], src[k]), k
    # the RGB stem was adapted to 5 slices (timm's adapt_input_conv: repeat and rescale by 3/5)
    stem = "conv_stem.weight"
    assert src[stem].shape[1] == 3 and enc[stem].shape[1] == 5
    torch.testing.assert_close(enc[stem][:, :3], src[stem] * 3 / 5)
    # the report names what did not fit: the classifier head is unexpected, decoder weights are untouched
    report = load_weights(model.net.encoder.model, tmp_path / "mobilenet.pth")
    assert stem in report.adapted and any(k.startswith("classifier") for k in report.unexpected)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        create_model("seg_unet", pretrained_weights=str(tmp_path / "missing.pth"), **tiny_kwargs("seg_unet"))


def test_load_checkpoint_rebuilds_the_model(tmp_path):
    kwargs = dict(in_channels=3, classes=8, **tiny_kwargs("seg_fpn"))
    model = create_model("seg_fpn", **kwargs).eval()
    torch.save({"model": model.state_dict(), "model_name": "seg_fpn", "model_kwargs": kwargs, "config": {},
                "epoch": 1, "metric": 0.5}, tmp_path / "model.pt")
    again, ckpt = load_checkpoint(tmp_path / "model.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert not again.training and ckpt["epoch"] == 1


def test_level_model_loads_a_local_timm_backbone(tmp_path):
    torch.manual_seed(3)
    backbone = timm.create_model("mobilenetv3_small_050", pretrained=False, in_chans=3)  # with its classifier
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    model = create_model("level_gru", pretrained_weights=str(tmp_path / "backbone.pth"), hidden=16)
    for key in ("conv_stem.weight", "blocks.1.0.conv_pw.weight"):
        assert torch.equal(model.cnn.state_dict()[key], backbone.state_dict()[key])


@pytest.mark.parametrize("stride, size, bias, channels_last", [(1, 2, True, True), (1, 4, False, False),
                                                               (2, 4, True, False), (2, 7, False, True),
                                                               (1, 9, True, True)])
def test_fast_depthwise_matches_conv2d(stride, size, bias, channels_last, monkeypatch):
    """kit.models.fastconv.DepthwiseConv2d: output and every gradient equal nn.Conv2d's (float rounding), on
    small maps (its own weight gradient) and larger ones (PyTorch's), strided or not, channels-last or not."""
    from kit.models import fastconv
    from kit.models.fastconv import SMALL, DepthwiseConv2d, fast_depthwise

    calls = []
    original = fastconv._DepthwiseFn.apply
    monkeypatch.setattr(fastconv._DepthwiseFn, "apply", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 6, 5, stride=stride, padding=2, groups=6, bias=bias)
    fast = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 5, stride=stride, padding=2, groups=6, bias=bias))
    fast[0].load_state_dict(ref.state_dict())
    assert fast_depthwise(fast) == 1 and type(fast[0]) is DepthwiseConv2d
    assert list(fast.state_dict()) == ["0." + k for k in ref.state_dict()]
    x = torch.randn(5, 6, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for module in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append([out.detach(), xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert len(calls) == ((size + 4 - 5) // stride + 1 <= SMALL)  # its own route on small outputs only


def test_create_model_switches_depthwise_convs_only():
    """create_model switches a MobileNet's depthwise convolutions and nothing else; the state dict's keys match
    a plain timm build (weights saved before the switch load after it)."""
    from kit.models.fastconv import DepthwiseConv2d

    model = create_model("level_gru", in_channels=3, classes=7, **tiny_kwargs("level_gru"))
    switched = [m for m in model.modules() if type(m) is DepthwiseConv2d]
    assert switched and all(m.groups == m.in_channels == m.out_channels > 1 for m in switched)
    assert all(m.groups == 1 for m in model.modules() if type(m) is torch.nn.Conv2d)
    plain = timm.create_model("mobilenetv3_small_050", pretrained=False, in_chans=3, num_classes=0)
    assert set(plain.state_dict()) == {k.removeprefix("cnn.") for k in model.state_dict() if k.startswith("cnn.")}


def test_fast_depthwise_leaves_autocast_and_inference_to_pytorch(monkeypatch):
    """Under CPU autocast (bf16) and without gradients the switched layer is plain nn.Conv2d: no dtype clash in
    the backward pass, the same output."""
    from kit.models import fastconv

    calls = []
    original = fastconv._DepthwiseFn.apply
    monkeypatch.setattr(fastconv._DepthwiseFn, "apply", lambda *a: calls.append(1) or original(*a))
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)
    fastconv.fast_depthwise(conv)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1, groups=4))
    assert calls == []
    conv(x).sum().backward()  # float32 training: its own route
    assert calls == [1]
