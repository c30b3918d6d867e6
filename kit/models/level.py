"""The level model: which vertebrae each slice of a whole study shows, read from the whole study at once.

A 2.5D segmenter sees a few slices around the one it segments. C3 to C6 look alike, so telling them apart
means counting down from C2 or up from C7/T1, which can lie beyond that window; a short CPU training run
then sometimes learns two neighbouring levels as one (C3 with C4, C5 with C6). This model reads the whole
study at low resolution and coarse slice spacing: a small CNN embeds each slice (with its two neighbours
as channels), a bidirectional GRU runs over the slices from head to feet, and a linear head gives, per
slice, a logit for each of C1..C7 being present. A level-conditioned segmenter (`data.level_input`) takes
these as 7 input planes; for one without them `kit.stage1.infer.fuse_levels` multiplies them into its per-pixel
odds. Either way the segmenter draws the outlines and this model names the level.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from .imagenet import IMAGENET, InputNorm, check_input_scaling, load_imagenet
from .registry import load_weights, read_state_dict, register_model


class LevelNet(nn.Module):
    """Per-slice CNN embedding -> BiGRU over the study -> per-slice logits.

    Args:
        encoder: timm model name (without the `tu-` prefix), built without its classifier.
        in_channels: slices per step (the slice and its neighbours at the level spacing).
        classes: outputs per slice (7: C1..C7 present).
        hidden: width of the slice embedding and of each GRU direction.
        pretrained_weights: local state dict of the timm backbone or of a whole LevelNet; or "imagenet": the
            encoder's packaged ImageNet weights (`kit.models.imagenet`), which need `input_mean` / `input_std`.
        input_mean: per-channel mean subtracted from every slice, in_channels values; None (with input_std)
            leaves the input as it is. `kit.stage1.config.LevelConfig.model_spec` sets it for ImageNet weights (the
            weights' RGB statistics repeated over the channels, `kit.models.imagenet_input_scaling`).
        input_std: per-channel divisor, in_channels positive values, or None.
    """

    def __init__(self, encoder: str = "mobilenetv3_small_050", in_channels: int = 3, classes: int = 7,
                 hidden: int = 64, pretrained_weights: str | None = None, input_mean: list[float] | None = None,
                 input_std: list[float] | None = None) -> None:
        super().__init__()
        encoder = encoder.removeprefix("tu-")
        check_input_scaling(pretrained_weights, input_mean, input_std, encoder)
        try:
            self.cnn = timm.create_model(encoder, pretrained=False, in_chans=in_channels, num_classes=0)
        except RuntimeError as exc:
            raise ValueError(f"unknown encoder {encoder!r}: a timm model name (see timm.list_models())") from exc
        self.in_channels, self.classes = in_channels, classes
        self.input_norm = InputNorm(in_channels, input_mean, input_std)
        width = getattr(self.cnn, "head_hidden_size", None) or self.cnn.num_features  # MobileNetV3: conv_head
        self.embed = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)
        if pretrained_weights == IMAGENET:
            load_imagenet(self.cnn, encoder)
        elif pretrained_weights:
            state = read_state_dict(pretrained_weights)
            whole = sum(k in self.state_dict() for k in state) >= sum(k in self.cnn.state_dict() for k in state)
            load_weights(self if whole else self.cnn, state)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C, H, W) slices of B studies in [0, 1] (scaled by `input_norm` here), mask: (B, T) 1 on
        real steps, 0 on padding at the end of a shorter study (None: all real) -> logits (B, T, classes), 0 on
        padded steps.

        Padded steps never reach the CNN (nor its BatchNorm statistics) or the GRU (packed sequences), so the
        logits of real steps are those the study gets alone, unpadded, at inference.
        """
        b, t = x.shape[:2]
        x = self.input_norm(x)
        real = None if mask is None else mask.bool()
        if real is None or bool(real.all()):  # no padding: no boolean indexing (a copy) or packing
            features = self.embed(self.cnn(x.flatten(0, 1))).view(b, t, -1)
            return self.head(self.gru(features)[0])
        lengths = real.sum(1)
        if not torch.equal(real, torch.arange(t, device=x.device)[None, :] < lengths[:, None]):
            raise ValueError("mask must mark a run of real steps at the start of each sequence, padding after it")
        flat = self.embed(self.cnn(x[real]))  # (sum of lengths, hidden)
        features = flat.new_zeros(b, t, flat.shape[-1])
        features[real] = flat
        packed = nn.utils.rnn.pack_padded_sequence(features, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=t)
        return self.head(out) * real[..., None]


def level_presence_probs(model: nn.Module, x: torch.Tensor, tta_flip: bool) -> torch.Tensor:
    """Per-step presence probabilities of a level model on unpadded studies x (B, T, C, H, W) -> (B, T, classes),
    float32: the sigmoid of its logits, with `tta_flip` the mean of that and of the left-right mirrored input's.
    Validation (`kit.tasks.LevelTask`) and inference (`kit.stage1.infer.predict_levels`) both call this."""
    probs = torch.sigmoid(model(x).float())
    if tta_flip:
        probs = (probs + torch.sigmoid(model(x.flip(-1)).float())) / 2
    return probs


@register_model
def level_gru(in_channels: int = 3, classes: int = 7, encoder: str = "mobilenetv3_small_050", **kwargs) -> LevelNet:
    """Per-slice level logits for a whole study: x (B, T, in_channels, H, W), optional mask (B, T) -> (B, T, classes)."""
    return LevelNet(encoder=encoder, in_channels=in_channels, classes=classes, **kwargs)
