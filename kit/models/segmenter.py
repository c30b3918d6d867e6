"""The 2.5D vertebra segmenter: an smp decoder on any timm (`tu-<name>`) or smp native encoder.

Input: 2k+1 adjacent axial slices as channels. Output: one sigmoid logit map per cervical vertebra
(C1..C7, multilabel) and optionally an 8th for "other vertebra" (thoracic, labels >= 8).
"""

from __future__ import annotations

import logging
import math

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from .imagenet import IMAGENET, InputNorm, check_input_scaling, load_imagenet
from .registry import load_weights, match_fraction, read_state_dict, register_model

log = logging.getLogger("kit.models")

ARCHS = {"unet": "Unet", "unetpp": "UnetPlusPlus", "fpn": "FPN"}


class Segmenter(nn.Module):
    """smp encoder-decoder, tensors in, tensors out.

    Inputs whose height or width is not a multiple of the encoder's stride are zero-padded (bottom/right)
    and the logits cropped back, so any slice size works.

    Args:
        arch: one of ARCHS ("unet", "unetpp", "fpn").
        encoder: "tu-<timm model name>" or an smp native encoder name (e.g. "resnet18").
        in_channels: 2k+1 stacked slices.
        classes: output channels (7 = C1..C7, 8 with the "other vertebra" channel).
        encoder_depth: encoder stages used (3..5).
        decoder_width: decoder channels at the widest stage (Unet/Unet++ halve it per stage, min 8;
            FPN uses it for the pyramid and half of it, a multiple of 32 and at least 32, for the
            segmentation branch).
        output_stride: 1, or 2 for a Unet whose last decoder block (full resolution, no skip connection:
            a learned upsampler) is left out; the head then works at stride 2 and its logits are upsampled
            bilinearly (centre-aligned). ~20 % less time an epoch of the CPU demo, but the vertebrae's tops
            were found half a slice later, so the demo keeps 1 (docs/benchmarks.md, Stage 1, "Tried and not taken").
        head_prior: initial probability of every output pixel (the head's bias is set to its logit), so
            training starts near the sparse truth instead of at 0.5; None keeps smp's initialisation.
        pretrained_weights: local state dict of a timm/smp backbone or of a whole segmenter; or "imagenet":
            the packaged ImageNet weights of a `tu-` encoder (`kit.models.imagenet`), which need
            `input_mean` / `input_std`.
        input_mean: per-channel mean subtracted from the input, in_channels values; None (with input_std)
            leaves the input as it is. `kit.stage1.config.SegConfig.model_spec` sets it for ImageNet weights: the
            weights' RGB statistics repeated over the slices, 0 for the level planes
            (`kit.models.imagenet_input_scaling`).
        input_std: per-channel divisor of the input, in_channels positive values, or None.
    """

    def __init__(
        self,
        arch: str = "unet",
        encoder: str = "tu-resnet18d",
        in_channels: int = 5,
        classes: int = 7,
        encoder_depth: int = 5,
        decoder_width: int = 256,
        output_stride: int = 1,
        head_prior: float | None = 0.02,
        pretrained_weights: str | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
    ) -> None:
        super().__init__()
        check_input_scaling(pretrained_weights, input_mean, input_std, encoder)
        if arch not in ARCHS:
            raise ValueError(f"unknown segmenter arch {arch!r}; available: {', '.join(ARCHS)}")
        if arch == "fpn" and encoder_depth < 3:
            raise ValueError(f"fpn needs encoder_depth >= 3; got {encoder_depth}")
        if output_stride not in (1, 2) or (output_stride == 2 and arch != "unet"):
            raise ValueError(f"output_stride must be 1, or 2 with arch 'unet'; got {output_stride} ({arch})")
        if arch == "fpn":
            decoder = {"decoder_pyramid_channels": decoder_width,
                       "decoder_segmentation_channels": max(32, decoder_width // 64 * 32),  # GroupNorm(32)
                       "upsampling": 2 ** (encoder_depth - 3)}  # its output stride: 2^(depth-3)
        else:
            decoder = {"decoder_channels": [max(decoder_width >> i, 8) for i in range(encoder_depth)]}
        try:
            self.net = smp.create_model(ARCHS[arch], encoder_name=encoder, encoder_weights=None,
                                        in_channels=in_channels, classes=classes, encoder_depth=encoder_depth,
                                        **decoder)
        except (KeyError, RuntimeError) as exc:
            if "nknown model" in str(exc) or "Wrong encoder" in str(exc):
                raise ValueError(f"unknown encoder {encoder!r}: use 'tu-<timm model name>' (see "
                                 "timm.list_models()) or an smp native encoder (see "
                                 "segmentation_models_pytorch.encoders.get_encoder_names())") from None
            raise
        if output_stride == 2:
            widths = decoder["decoder_channels"]
            self.net.decoder.blocks = self.net.decoder.blocks[:-1]
            self.net.segmentation_head = smp.base.SegmentationHead(widths[-2], classes, kernel_size=3)
        self.arch, self.encoder_name, self.output_stride = arch, encoder, output_stride
        self.in_channels, self.classes = in_channels, classes
        self.stride = 2 ** encoder_depth
        self.input_norm = InputNorm(in_channels, input_mean, input_std)
        self.pruned = self._prune_unused()
        if head_prior is not None:
            head = self.net.segmentation_head[0]
            nn.init.constant_(head.bias, math.log(head_prior / (1.0 - head_prior)))
        if pretrained_weights:
            self.load_pretrained(pretrained_weights)

    def _prune_unused(self) -> list[str]:
        """Replace encoder stages that never reach the output (smp and timm keep the stages past
        `encoder_depth`) by nn.Identity, so they neither cost memory nor break DDP's gradient reduction.

        Found structurally: one backward pass of a zero input in eval mode (no RNG drawn, no BatchNorm
        statistics touched); parameters left without a gradient are unused.
        """
        was_training = self.training
        self.eval()
        self(torch.zeros(1, self.in_channels, 2 * self.stride, 2 * self.stride)).sum().backward()
        unused = {name for name, p in self.named_parameters() if p.grad is None}
        self.zero_grad(set_to_none=True)
        self.train(was_training)
        pruned: list[str] = []
        for name, module in list(self.named_modules()):
            if not name or any(name.startswith(f"{done}.") for done in pruned):
                continue
            params = [f"{name}.{n}" for n, _ in module.named_parameters()]
            if params and all(p in unused for p in params):
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent) if parent else self, child, nn.Identity())
                pruned.append(name)
        return pruned

    def load_pretrained(self, path: str):
        """Load local weights: a whole-segmenter state dict, or a backbone's into the encoder; "imagenet": the
        encoder's packaged ImageNet weights into the encoder (`kit.models.imagenet.imagenet_weights`).

        The file is matched against the whole model first; when most of its keys fit the encoder instead
        (a timm / smp backbone checkpoint, classifier head included), it goes there.
        """
        encoder = self.net.encoder
        backbone = getattr(encoder, "model", encoder)  # TimmUniversalEncoder wraps the timm model
        if path == IMAGENET:
            report = load_imagenet(backbone, self.encoder_name)
            log.info("ImageNet weights of %s -> encoder: %s", self.encoder_name, report)
            return report
        state = read_state_dict(path)
        target = self if match_fraction(self, state) >= match_fraction(backbone, state) else backbone
        report = load_weights(target, state)
        if not report.loaded:
            raise ValueError(f"{path}: no tensor matches this segmenter ({self.encoder_name}): {report}")
        log.info("%s -> %s: %s", path, "segmenter" if target is self else "encoder", report)
        return report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) in [0, 1] -> logits (B, C, H, W). The input is scaled by `input_norm`
        after the zero padding (so padding stays the value 0 of the unscaled input)."""
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.stride, -w % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.net(self.input_norm(x))
        if self.output_stride > 1:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w] if pad_h or pad_w else logits


def _segmenter(arch: str, in_channels: int, classes: int, encoder: str, **kwargs) -> Segmenter:
    return Segmenter(arch=arch, encoder=encoder, in_channels=in_channels, classes=classes, **kwargs)


@register_model
def seg_unet(in_channels: int = 5, classes: int = 7, encoder: str = "tu-resnet18d", **kwargs) -> Segmenter:
    """2.5D Unet. x: (B, in_channels, H, W) -> logits (B, classes, H, W). kwargs: see `Segmenter`."""
    return _segmenter("unet", in_channels, classes, encoder, **kwargs)


@register_model
def seg_unetpp(in_channels: int = 5, classes: int = 7, encoder: str = "tu-resnet18d", **kwargs) -> Segmenter:
    """2.5D Unet++ (nested skips). x: (B, in_channels, H, W) -> logits (B, classes, H, W)."""
    return _segmenter("unetpp", in_channels, classes, encoder, **kwargs)


@register_model
def seg_fpn(in_channels: int = 5, classes: int = 7, encoder: str = "tu-resnet18d", **kwargs) -> Segmenter:
    """2.5D FPN (lighter decoder, logits upsampled from stride 4). x: (B, in_channels, H, W) -> (B, classes, H, W)."""
    return _segmenter("fpn", in_channels, classes, encoder, **kwargs)
