"""The stage-2 fracture classifier: a timm CNN per slice -> 2-layer BiGRU -> attention pooling -> logits.

A vertebra is shown as T axial slices spread over its height, each slice as C channels (by default its
±2 neighbours and the vertebra's mask: 6). The CNN embeds every slice on its own, the bidirectional GRU
reads the slices from head to feet so each step sees its neighbours, and an attention layer pools the steps
into one vertebra embedding, whose linear head gives the vertebra's fracture logit. A second linear head
on each GRU step gives per-slice logits (the auxiliary target where fracture boxes exist), and the
attention weights say which slices the decision rests on (`kit explain`).

    model = create_model("cls_gru", in_channels=6, encoder="tf_efficientnetv2_b0")
    out = model(x, mask=mask, level=level)  # x (B, T, 6, H, W), mask (B, T) bool: True on real slices,
                                            # level (B,) 0..6 = C1..C7: adds that level's learnt logit offset
    out["logit"], out["slice_logits"], out["attention"]   # (B,), (B, T), (B, T)

`cls_patient_gru` runs the same path (shared weights) on all seven vertebrae of a study at once and adds a
`patient_overall` head that pools the seven vertebra embeddings.

Padding: slices and vertebrae marked False in the masks never reach the CNN (so they do not touch BatchNorm
statistics either), are left out of the GRU (packed sequences) and get zero attention; outputs on real
steps are the same as without them. Outputs at masked places carry no information (a head's bias) and are
for the loss to ignore.

Every model has the same split: `features(x, mask)` -> GRU states, `head(states, mask)` -> the output
dict, `forward` = both.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math

import timm
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..constants import TRAIN_PREVALENCE
from .imagenet import IMAGENET, InputNorm, check_input_scaling, load_imagenet
from .start import is_start, start_weights
from .registry import LoadReport, load_weights, match_fraction, read_state_dict, register_model

log = logging.getLogger("kit.models")


def create_backbone(encoder: str, in_channels: int, drop_path_rate: float = 0.0) -> nn.Module:
    """A timm model without its classifier (`num_classes=0`, pooled features out), never pretrained.

    Args:
        encoder: timm model name; a `tu-` prefix (the segmenter's spelling) is accepted and removed.
        in_channels: channels per slice.
        drop_path_rate: stochastic depth, passed to timm only when > 0.

    Raises:
        ValueError: `encoder` is not a timm model; close names are suggested.
    """
    name = encoder.removeprefix("tu-")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown encoder {encoder!r}: use a timm model name, e.g. resnet18d, "
                         f"tf_efficientnetv2_s, convnext_tiny (see timm.list_models()){hint}")
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {}
    return timm.create_model(name, pretrained=False, in_chans=in_channels, num_classes=0, **extra)


def backbone_width(backbone: nn.Module) -> int:
    """Width of a `num_classes=0` timm model's output (MobileNetV3 and a few others end in a wider conv
    head than `num_features`)."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def _set_prior(linear: nn.Linear, prior: float | None) -> None:
    if prior is not None:
        nn.init.constant_(linear.bias, math.log(prior / (1.0 - prior)))


class AttentionPool(nn.Module):
    """Additive attention over a sequence: weights = softmax(w2 tanh(W1 h)), masked steps weigh 0.

    Args:
        dim: width of each step.
        hidden: width of the scoring layer.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D), mask: (B, N) bool (True = real step) -> pooled (B, D), weights (B, N).

        Weights sum to 1 over the real steps of a row; a row without any real step gets all-zero weights
        and a zero vector (no NaN, in the forward pass or the gradients).
        """
        scores = self.score(x).squeeze(-1)
        if mask is None:
            weights = scores.softmax(-1)
        else:
            # a finite fill, not -inf: an all-masked row then softmaxes to uniform (zeroed below), not NaN
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = scores.softmax(-1) * mask
        return torch.einsum("bn,bnd->bd", weights.to(x.dtype), x), weights


class VertebraClassifier(nn.Module):
    """Per-slice timm CNN -> dropout -> BiGRU -> attention pooling -> one fracture logit per vertebra.

    Args:
        encoder: timm model name (ResNet, EfficientNet/V2, ConvNeXt, MobileNet, ... families).
        in_channels: channels per slice (5 neighbouring slices + the vertebra's mask = 6).
        hidden: width of each GRU direction; the GRU states and the vertebra embedding are 2 * hidden wide.
        gru_layers: stacked GRU layers.
        attention_hidden: width of the attention scoring layer.
        dropout: dropout on the CNN features before the GRU, and between GRU layers.
        drop_path_rate: stochastic depth inside the backbone (timm), 0 = off.
        head_prior: initial probability of every logit (the heads' biases are set to its logit); None
            keeps PyTorch's initialisation.
        chunk: run the CNN on at most this many slice images at a time (None = all B*T at once). Saves
            activation memory at inference; same result in eval mode (in train mode BatchNorm normalises
            each chunk with its own statistics).
        grad_checkpointing: recompute the backbone's activations in the backward pass (timm's
            `set_grad_checkpointing`) to train larger stacks in less memory.
        pretrained_weights: local state dict of the timm backbone (its first conv adapted to
            `in_channels`) or of a whole VertebraClassifier; or "imagenet": the encoder's packaged ImageNet
            weights (`kit.models.imagenet`), which need `input_mean` / `input_std`; or "kit:<name>": a whole
            classifier the kit ships as a starting point (`kit.models.start`).
        levels: vertebra levels (7: C1..C7). `level_bias` holds one logit offset per level, added to the
            vertebra logit when `forward` is given each vertebra's level: fractures are far more common at
            some levels (C2, C7) than others (C3), and a crop alone says little about its level. Zeros at
            first; `kit.tasks.ClsTask.init_model` starts them at the training folds' prevalence.
        input_mean: per-channel mean subtracted from every slice before the CNN, in_channels values; None (with
            input_std) leaves the input as it is. `kit.stage2.config.ClsConfig.model_spec` sets it for ImageNet
            weights: the weights' RGB statistics repeated over the image channels, and 0 for the mask channel
            (mean 0, std 1: the mask stays 0/1; `kit.models.imagenet_input_scaling`).
        input_std: per-channel divisor, in_channels positive values, or None.
        freeze_backbone: the CNN keeps its loaded weights and BatchNorm statistics (no gradients, eval mode even
            in training) and runs without autograd: only the GRU, attention and heads learn.
    """

    def __init__(
        self,
        encoder: str = "resnet18d",
        in_channels: int = 6,
        hidden: int = 256,
        gru_layers: int = 2,
        attention_hidden: int = 128,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        head_prior: float | None = None,
        chunk: int | None = None,
        grad_checkpointing: bool = False,
        pretrained_weights: str | None = None,
        levels: int = 7,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        check_input_scaling(pretrained_weights, input_mean, input_std, encoder)
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be a positive number of images or None; got {chunk}")
        self.encoder_name, self.in_channels, self.chunk = encoder, in_channels, chunk
        self.input_norm = InputNorm(in_channels, input_mean, input_std)
        self.cnn = create_backbone(encoder, in_channels, drop_path_rate)
        self.num_features = backbone_width(self.cnn)
        self.embed_dim, self.attention_hidden = 2 * hidden, attention_hidden
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(self.num_features, hidden, num_layers=gru_layers, batch_first=True, bidirectional=True,
                          dropout=dropout if gru_layers > 1 else 0.0)
        self.slice_head = nn.Linear(self.embed_dim, 1)
        self.pool = AttentionPool(self.embed_dim, attention_hidden)
        self.logit_head = nn.Linear(self.embed_dim, 1)
        for linear in (self.slice_head, self.logit_head):
            _set_prior(linear, head_prior)
        self.level_bias = nn.Parameter(torch.zeros(levels))
        # how to turn this model's vertebra probabilities into the 8 targets (`kit.evaluate.metrics.targets_from_vertebrae`):
        # the row-normalised metric's positive:negative odds per target, from the training labels
        # (`ClsTask.init_model`); the metric's nominal 2 until then. Saved with the weights.
        self.register_buffer("metric_odds", torch.full((levels + 1,), 2.0, dtype=torch.float64))
        # the training labels' prevalence of the 8 targets (`ClsTask.init_model`): what a vertebra with no crop is
        # worth (`kit.evaluate.metrics.fill_missing_vertebrae`) and the submission's fallback; the 2019 table until then
        self.register_buffer("train_prevalence", torch.tensor(TRAIN_PREVALENCE, dtype=torch.float64))
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        if pretrained_weights:
            self.load_pretrained(pretrained_weights)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.cnn.requires_grad_(False)
            self.cnn.eval()

    def train(self, mode: bool = True) -> VertebraClassifier:
        """As nn.Module.train; a frozen backbone stays in eval mode (its BatchNorm statistics as loaded)."""
        super().train(mode)
        if self.freeze_backbone:
            self.cnn.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved by an older kit: no level offsets (as they were trained), the metric's nominal odds
        defaults = {"level_bias": (torch.zeros_like(self.level_bias), "zero level offsets"),
                    "metric_odds": (torch.full_like(self.metric_odds, 2.0), "the nominal odds 2"),
                    "train_prevalence": (torch.tensor(TRAIN_PREVALENCE, dtype=torch.float64),
                                         "the 2019 training table's prevalence")}
        for name, (default, said) in defaults.items():
            if prefix + name not in state_dict:
                log.warning("%s: no %s in the weights (saved by an older kit); using %s", self.encoder_name,
                            prefix + name, said)
                state_dict[prefix + name] = default
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the backbone on or off (timm's method of the same name)."""
        if not hasattr(self.cnn, "set_grad_checkpointing"):
            raise ValueError(f"encoder {self.encoder_name!r} does not support gradient checkpointing")
        self.cnn.set_grad_checkpointing(enable)

    def load_pretrained(self, path: str) -> LoadReport:
        """Load a local state dict into the whole model or, when it fits the backbone better, the backbone;
        "imagenet": the encoder's packaged ImageNet weights into the backbone."""
        if path == IMAGENET:
            return _load_imagenet(self.cnn, self.encoder_name)
        if is_start(path):
            return _load_best_match(str(start_weights(path)), [("classifier", self)], self.encoder_name)
        return _load_best_match(path, [("classifier", self), ("backbone", self.cnn)], self.encoder_name)

    def slice_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The CNN on every real slice: x (B, T, C, H, W), mask (B, T) -> features (B, T, num_features).

        The slices are scaled by `input_norm` first. Masked slices are not computed; their features are zeros.
        """
        b, t = x.shape[:2]
        images = x.flatten(0, 1)
        keep = None if mask is None else mask.flatten()
        if keep is not None:
            images = images[keep]
        images = self.input_norm(images)
        # a frozen CNN builds no graph, unless the input asks for one (saliency: kit.evaluate.explain)
        with torch.no_grad() if self.freeze_backbone and not images.requires_grad else contextlib.nullcontext():
            if images.shape[0] == 0:
                feats = x.new_zeros((0, self.num_features))
            elif self.chunk is None or images.shape[0] <= self.chunk:
                feats = self.cnn(images)
            else:
                feats = torch.cat([self.cnn(part) for part in images.split(self.chunk)])
        if keep is not None:
            feats = feats.new_zeros((b * t, feats.shape[-1])).index_put((keep.nonzero().squeeze(1),), feats)
        return feats.view(b, t, -1)

    def _gru(self, feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """BiGRU over the real steps only: (B, T, F) -> (B, T, 2 * hidden), zeros at masked steps.

        The real steps of each row are moved to the front (in order), packed, run, and put back, so a
        mask need not be a prefix (a dropped slice in the middle is simply skipped).
        """
        if mask is None:
            return self.gru(feats)[0]
        t = feats.shape[1]
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # real steps first, in order
        front = feats.gather(1, order[..., None].expand_as(feats))
        lengths = mask.sum(1).clamp(min=1).cpu()  # an empty row runs one (zero) step, zeroed below
        packed = pack_padded_sequence(front, lengths, batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=t)[0]
        states = torch.zeros_like(out).scatter(1, order[..., None].expand_as(out), out)
        return states * mask[..., None].to(states.dtype)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C, H, W), mask: (B, T) bool or None -> GRU states (B, T, 2 * hidden), 0 where masked."""
        _check_input(x, 5, "(B, T, C, H, W)", self.in_channels)
        mask = _check_mask(mask, x.shape[:2], "mask", "(B, T)")
        return self._gru(self.drop(self.slice_features(x, mask)), mask)

    def from_slice_features(self, feats: torch.Tensor, mask: torch.Tensor | None = None,
                            level: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What `forward` does after the CNN: `slice_features` (B, T, F) -> the output dict of `forward` (folds that
        share one CNN share its features at inference: `kit.stage2.infer.classify_study`)."""
        return self.head(self._gru(self.drop(feats), mask), mask, level)

    def head(self, states: torch.Tensor, mask: torch.Tensor | None = None,
             level: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """GRU states (B, T, D), mask (B, T) or None, level (B,) or None -> the output dict of `forward`."""
        pooled, attention = self.pool(states, mask)
        logit = self.logit_head(pooled).squeeze(-1)
        if level is not None:
            logit = logit + self.level_bias[_check_level(level, logit, len(self.level_bias))]
        return {"logit": logit,
                "slice_logits": self.slice_head(states).squeeze(-1),
                "attention": attention,
                "embedding": pooled}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                level: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Fracture logits of B vertebrae.

        Args:
            x: (B, T, C, H, W) T slices of each vertebra, head to feet, C channels each.
            mask: (B, T) bool, True on real slices, False on padding; None = all real.
            level: (B,) integer level of each vertebra (0..6 = C1..C7): adds its `level_bias`; None adds none.

        Returns:
            logit: (B,) the vertebra's fracture logit.
            slice_logits: (B, T) per-slice fracture logits (from each GRU step).
            attention: (B, T) pooling weights, summing to 1 over the real slices, 0 on padding.
            embedding: (B, 2 * hidden) the attention-pooled vertebra embedding.
        """
        mask = _check_mask(mask, x.shape[:2], "mask", "(B, T)")
        return self.head(self.features(x, mask), mask, level)


class PatientClassifier(nn.Module):
    """All vertebrae of a study at once: the VertebraClassifier path per vertebra (shared weights), plus a
    `patient_overall` head over the attention-pooled vertebra embeddings (each tagged with its level).

    Args:
        vertebrae: vertebrae per study (7: C1..C7).
        patient_prior: initial probability of the patient logit; None keeps PyTorch's initialisation
            (`head_prior` sets the per-vertebra heads).
        pretrained_weights: local state dict of the timm backbone, of a VertebraClassifier (e.g. one
            trained first on single vertebrae), or of a whole PatientClassifier; or "imagenet" (see
            VertebraClassifier).
        **kwargs: VertebraClassifier arguments (encoder, in_channels, hidden, gru_layers, attention_hidden,
            dropout, drop_path_rate, head_prior, chunk, grad_checkpointing, input_mean, input_std).
    """

    def __init__(self, vertebrae: int = 7, patient_prior: float | None = None,
                 pretrained_weights: str | None = None, **kwargs) -> None:
        super().__init__()
        check_input_scaling(pretrained_weights, kwargs.get("input_mean"), kwargs.get("input_std"),
                            kwargs.get("encoder", "resnet18d"))
        self.vertebra = VertebraClassifier(levels=vertebrae, **kwargs)
        self.vertebrae = vertebrae
        dim = self.vertebra.embed_dim
        self.level_embed = nn.Parameter(torch.zeros(vertebrae, dim))
        self.patient_pool = AttentionPool(dim, self.vertebra.attention_hidden)
        self.patient_head = nn.Linear(dim, 1)
        _set_prior(self.patient_head, patient_prior)
        if pretrained_weights:
            self.load_pretrained(pretrained_weights)

    @property
    def num_features(self) -> int:
        return self.vertebra.num_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the backbone on or off."""
        self.vertebra.set_grad_checkpointing(enable)

    def load_pretrained(self, path: str) -> LoadReport:
        """Load a local state dict into whichever part it fits best: the whole model, the vertebra path,
        or the backbone; "imagenet": the encoder's packaged ImageNet weights into the backbone."""
        if path == IMAGENET:
            return _load_imagenet(self.vertebra.cnn, self.vertebra.encoder_name)
        parts = [("patient classifier", self), ("vertebra classifier", self.vertebra),
                 ("backbone", self.vertebra.cnn)]
        return _load_best_match(path, parts, self.vertebra.encoder_name)

    def _masks(self, shape: torch.Size, mask: torch.Tensor | None,
               vertebra_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One slice mask (B, V, T) with missing vertebrae folded in, and the vertebra mask (B, V)."""
        b, v, t = shape
        if v != self.vertebrae:
            raise ValueError(f"x holds {v} vertebrae per study; this model was built for {self.vertebrae}")
        mask = _check_mask(mask, (b, v, t), "mask", "(B, V, T)")
        vertebra_mask = _check_mask(vertebra_mask, (b, v), "vertebra_mask", "(B, V)")
        if vertebra_mask is not None:
            mask = vertebra_mask[..., None].expand(b, v, t) if mask is None else mask & vertebra_mask[..., None]
        return mask, None if mask is None else mask.any(-1)

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                 vertebra_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, V, T, C, H, W) -> GRU states (B, V, T, 2 * hidden), 0 at masked slices and vertebrae."""
        _check_input(x, 6, "(B, V, T, C, H, W)", self.vertebra.in_channels)
        mask, _ = self._masks(x.shape[:3], mask, vertebra_mask)
        flat_mask = None if mask is None else mask.flatten(0, 1)
        return self.vertebra.features(x.flatten(0, 1), flat_mask).unflatten(0, x.shape[:2])

    def head(self, states: torch.Tensor, mask: torch.Tensor | None = None,
             vertebra_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """GRU states (B, V, T, D) and the masks -> the output dict of `forward`."""
        b, v = states.shape[:2]
        mask, present = self._masks(states.shape[:3], mask, vertebra_mask)
        level = torch.arange(v, device=states.device).repeat(b)  # C1..C7 of each study: each its level offset
        out = self.vertebra.head(states.flatten(0, 1), None if mask is None else mask.flatten(0, 1), level)
        out = {key: value.unflatten(0, (b, v)) for key, value in out.items()}
        pooled, weights = self.patient_pool(out["embedding"] + self.level_embed, present)
        out["patient_logit"] = self.patient_head(pooled).squeeze(-1)
        out["patient_attention"] = weights
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                vertebra_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Fracture logits of the V vertebrae of B studies, and of the study as a whole.

        Args:
            x: (B, V, T, C, H, W) T slices of each of the V vertebrae (C1..C7 in order).
            mask: (B, V, T) bool, True on real slices; None = all real.
            vertebra_mask: (B, V) bool, False for vertebrae not found (all their slices count as padding,
                and they are left out of the patient pooling); None = all found. A vertebra whose slices
                are all masked counts as not found too.

        Returns:
            logit: (B, V) per-vertebra fracture logits (each with its level's `level_bias`).
            slice_logits: (B, V, T) per-slice logits.
            attention: (B, V, T) slice weights, summing to 1 per found vertebra (all 0 for a missing one).
            embedding: (B, V, 2 * hidden) pooled vertebra embeddings.
            patient_logit: (B,) the `patient_overall` logit.
            patient_attention: (B, V) vertebra weights of the patient pooling, 0 on missing vertebrae.
        """
        return self.head(self.features(x, mask, vertebra_mask), mask, vertebra_mask)


def _check_input(x: torch.Tensor, ndim: int, layout: str, in_channels: int) -> None:
    if x.ndim != ndim:
        raise ValueError(f"expected x of shape {layout}; got {tuple(x.shape)}")
    if x.shape[-3] != in_channels:
        raise ValueError(f"x has {x.shape[-3]} channels per slice; this model was built for "
                         f"in_channels={in_channels}")


def _check_mask(mask: torch.Tensor | None, shape: tuple[int, ...], name: str, layout: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}; got {tuple(mask.shape)}")
    return mask.bool()


def _check_level(level, logit: torch.Tensor, levels: int) -> torch.Tensor:
    """`level` as a long tensor on the logits' device, checked against their shape (B,) and 0..levels-1."""
    level = torch.as_tensor(level, device=logit.device).long()
    if tuple(level.shape) != tuple(logit.shape):
        raise ValueError(f"level must have shape (B,) = {tuple(logit.shape)}; got {tuple(level.shape)}")
    if len(level) and (int(level.min()) < 0 or int(level.max()) >= levels):
        raise ValueError(f"level must lie in 0..{levels - 1} (C1..C{levels}); got {level.tolist()}")
    return level


def _load_imagenet(backbone: nn.Module, encoder: str) -> LoadReport:
    report = load_imagenet(backbone, encoder)
    log.info("ImageNet weights of %s -> backbone: %s", encoder, report)
    return report


def _load_best_match(path: str, parts: list[tuple[str, nn.Module]], encoder: str) -> LoadReport:
    """Load `path` into the part (outermost first on ties) whose keys it matches best."""
    state = read_state_dict(path)
    label, target = max(parts, key=lambda part: match_fraction(part[1], state))  # max keeps the first of ties
    report = load_weights(target, state)
    if not report.loaded:
        raise ValueError(f"{path}: no tensor matches this classifier ({encoder}) or its backbone: {report}")
    log.info("%s -> %s: %s", path, label, report)
    return report


@register_model
def cls_gru(in_channels: int = 6, encoder: str = "resnet18d", **kwargs) -> VertebraClassifier:
    """One vertebra: x (B, T, in_channels, H, W), mask (B, T) -> logit (B,), slice_logits (B, T),
    attention (B, T), embedding (B, D). kwargs: see `VertebraClassifier`."""
    return VertebraClassifier(encoder=encoder, in_channels=in_channels, **kwargs)


@register_model
def cls_patient_gru(in_channels: int = 6, encoder: str = "resnet18d", vertebrae: int = 7,
                    **kwargs) -> PatientClassifier:
    """A whole study: x (B, 7, T, in_channels, H, W) -> logit (B, 7), slice_logits (B, 7, T),
    attention (B, 7, T), embedding (B, 7, D), patient_logit (B,), patient_attention (B, 7).
    kwargs: see `PatientClassifier` and `VertebraClassifier`."""
    return PatientClassifier(encoder=encoder, in_channels=in_channels, vertebrae=vertebrae, **kwargs)
