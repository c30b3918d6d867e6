"""One registry, one factory: every model variant is a small registered function (the timm pattern).

    @register_model
    def seg_unet(in_channels: int = 5, classes: int = 7, **kwargs) -> nn.Module: ...

    model = create_model("seg_unet", in_channels=5, classes=7, encoder="tu-resnet10t")

Weights only ever come from local files (`load_weights`) or from a pip package that ships them
(`pretrained_weights="imagenet"`, `kit.models.imagenet`); nothing is downloaded.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .fastconv import fast_depthwise

log = logging.getLogger("kit.models")

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PREFIXES = ("module.", "model.", "_orig_mod.")  # DDP, Lightning/EMA wrappers, torch.compile


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model function under its own name."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from `list_models()`.
        **kwargs: the model function's plain arguments (e.g. in_channels, classes, encoder,
            pretrained_weights: a local file or "imagenet", input_mean / input_std).

    Its depthwise convolutions are switched to `kit.models.fastconv.DepthwiseConv2d` (the same module and
    state dict, a faster weight gradient on CPU).

    Raises:
        ValueError: unknown name; the available names are listed.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models()) or '(none)'}")
    model = _MODELS[name](**kwargs)
    fast_depthwise(model)
    return model


# ---------------------------------------------------------------------------------------------------------
# Local weights
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_weights` did: keys loaded, adapted (input conv resized), missing, unexpected, mismatched."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

        parts = [f"{len(self.loaded)} tensors loaded"]
        for label, keys in (("adapted", self.adapted), ("missing", self.missing),
                            ("unexpected", self.unexpected), ("shape mismatch", self.mismatched)):
            if keys:
                parts.append(f"{label}: {few(keys)}")
        return "; ".join(parts)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local `.pt/.pth/.bin` or `.safetensors` file.

    Accepts a bare state dict or one wrapped as {"model": ...} / {"state_dict": ...} / {"model_ema": ...}
    (kit checkpoints, timm train scripts, Lightning).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def match_fraction(module: nn.Module, state: dict[str, torch.Tensor]) -> float:
    """Share of `state`'s keys (prefixes stripped) that name a tensor of `module`."""
    target = {_strip(k) for k in module.state_dict()}
    return sum(_strip(k) in target for k in state) / max(len(state), 1)


def load_weights(module: nn.Module, state_or_path: dict | str | os.PathLike) -> LoadReport:
    """Copy matching tensors into `module`, tolerant of wrapper prefixes and a changed input depth.

    Keys are compared with "module." / "model." / "_orig_mod." prefixes stripped on both sides. A 4D
    first-conv weight whose only difference is the number of input channels (an RGB backbone under a
    2k+1-slice input) is adapted with timm's `adapt_input_conv`. Everything else that does not fit is
    reported, never silently dropped: the report is logged and returned.

    Args:
        module: the model or sub-module (e.g. a segmenter's encoder) to fill.
        state_or_path: a state dict, or a local file for `read_state_dict`.

    Returns:
        A LoadReport.
    """
    from timm.models import adapt_input_conv

    state = read_state_dict(state_or_path) if not isinstance(state_or_path, dict) else state_or_path
    source = {_strip(k): v for k, v in state.items()}
    own = module.state_dict()
    by_stripped = {_strip(k): k for k in own}
    report, new_state = LoadReport(), {}
    for skey, tensor in source.items():
        if skey not in by_stripped:
            report.unexpected.append(skey)
            continue
        key = by_stripped[skey]
        want = own[key]
        if tensor.shape == want.shape:
            new_state[key] = tensor
            report.loaded.append(key)
        elif tensor.ndim == 4 and want.ndim == 4 and tensor.shape[0] == want.shape[0] \
                and tensor.shape[2:] == want.shape[2:]:
            new_state[key] = adapt_input_conv(want.shape[1], tensor, base_chans=tensor.shape[1])
            report.loaded.append(key)
            report.adapted.append(key)
        else:
            report.mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(want.shape)}")
    report.missing = [k for k in own if k not in new_state]
    module.load_state_dict(new_state, strict=False)
    log.info("weights: %s", report)
    return report


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a kit `model.pt` and load its weights.

    Args:
        path: a checkpoint written by `kit.train.fit_fold`: {"model": state dict, "model_name": str,
            "model_kwargs": dict, "config": dict, "epoch": int, "metric": float, ...}.
        device: where the model goes.

    Returns:
        (model in eval mode, the checkpoint dict).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model", "model_name", "model_kwargs") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a kit model checkpoint: no {', '.join(missing)}")
    model = create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
