"""Every training loss (torch). Models return logits; losses live here, never inside a model or a task."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .constants import NEGATIVE_WEIGHTS, POSITIVE_WEIGHTS, TARGETS

# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


def seg_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, *, exclusive: bool = False,
             eps: float = 1.0) -> torch.Tensor:
    """Pixel loss + dice_weight x (1 - soft Dice), the Dice taken per channel over the whole batch and averaged
    over the channels that have a positive pixel in the batch (smp's DiceLoss does the same).

    Pixel loss: per-channel BCE; with `exclusive`, the cross-entropy of softmax([0, logits]) against the
    integer label instead (a background logit fixed at 0 in front of the C channels). True labels never
    overlap, so this makes neighbouring levels compete for a pixel. The sigmoid of each channel still reads
    as its probability against background: where a channel wins the softmax, its sigmoid is above 0.5.

    Why not Dice per (slice, channel): a slice shows at most one or two of the 7 vertebrae,
    so per (slice, channel) Dice is dominated by empty channels that reward predicting nothing, and the
    network collapses to all-background. Nor Dice over absent channels: a batch without C1 would push C1
    to zero everywhere.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, C, H, W) in {0, 1}; at most one channel set per pixel when `exclusive`.
    """
    logits, target = logits.float(), target.float()
    if exclusive:  # cross-entropy of softmax([0, logits]) written out (faster on CPU than F.pad + F.cross_entropy)
        top = logits.amax(1, keepdim=True).clamp(min=0.0)
        lse = top[:, 0] + torch.log(torch.exp(-top[:, 0]) + torch.exp(logits - top).sum(1))
        pixel = (lse - (logits * target).sum(1)).mean()
    else:
        pixel = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dims = (0, *range(2, logits.ndim))
    truth = target.sum(dims)
    dice = (2.0 * (prob * target).sum(dims) + eps) / (prob.sum(dims) + truth + eps)
    present = truth > 0
    if not present.any():
        return pixel
    return pixel + dice_weight * (1.0 - dice[present]).mean()


def level_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE of per-step presence logits (..., T, 7) against 0/1 targets, averaged over unpadded steps."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").mean(-1)
    return (bce * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------
# Competition (fracture classification)
# ---------------------------------------------------------------------------------------------------------
# Column order everywhere: TARGETS = [patient_overall, C1, ..., C7]. The metric weights come from
# kit.constants, the same numbers kit.evaluate.metrics.competition_score uses.

LOSS_NORMALISE = ("row", "global")


def competition_loss(logits: torch.Tensor, targets: torch.Tensor, *, normalise: str = "row") -> torch.Tensor:
    """The competition's weighted multi-label log loss as a training loss on logits.

    Equals `kit.evaluate.metrics.competition_score(targets, sigmoid(logits), normalise=normalise)` (to ~1e-12 in
    float64) wherever the metric's clipping of probabilities to [1e-15, 1 - 1e-15] does not bite, i.e. for
    |logit| < log((1 - 1e-15) / 1e-15) ~ 34.5. Beyond that the metric caps each loss at -log(1e-15) ~ 34.5
    while this loss keeps growing (and keeps its gradient); it is computed with log-sigmoid, so it never
    overflows or returns inf/NaN.

    Args:
        logits: (B, 8) raw scores in TARGETS order.
        targets: (B, 8) labels in [0, 1]; soft labels get linearly interpolated weights.
        normalise: "row" (per study sum(w * loss) / sum(w), mean over the batch) or "global"
            (sum over the batch / total weight), as in `competition_score`.

    Returns:
        Scalar tensor.
    """
    if normalise not in LOSS_NORMALISE:
        raise ValueError(f"normalise must be one of {LOSS_NORMALISE}; got {normalise!r}")
    if logits.ndim != 2 or logits.shape[1] != len(TARGETS) or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (B, {len(TARGETS)}) in order {list(TARGETS)}; "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    y = targets.to(x.dtype)
    pos = torch.as_tensor(POSITIVE_WEIGHTS, dtype=x.dtype, device=x.device)
    neg = torch.as_tensor(NEGATIVE_WEIGHTS, dtype=x.dtype, device=x.device)
    loss = -(y * F.logsigmoid(x) + (1.0 - y) * F.logsigmoid(-x))  # = BCE, (B, 8)
    w = y * pos + (1.0 - y) * neg
    if normalise == "row":
        return ((w * loss).sum(1) / w.sum(1)).mean()
    return (w * loss).sum() / w.sum()


def patient_logit_from_vertebrae(vertebra_logits: torch.Tensor) -> torch.Tensor:
    """The logit of P(any vertebra fractured) = 1 - prod(1 - p_v), treating vertebrae as independent.

    Computed in log space: with s = sum_v log(1 - p_v) = sum_v logsigmoid(-x_v), the logit is
    log(1 - e^s) - s, where log(1 - e^s) uses expm1/log1p by range, so large or tiny logits stay finite.

    Args:
        vertebra_logits: (B, 7) in C1..C7 order.

    Returns:
        (B, 1) logits.
    """
    s = F.logsigmoid(-vertebra_logits).sum(1, keepdim=True)  # log P(no fracture) <= 0
    s = s.clamp(max=-torch.finfo(s.dtype).tiny)  # all vertebrae ~certainly intact: keep log(1 - e^s) finite
    # log(1 - e^s): expm1 near 0, log1p far from it. Each branch sees only its own range, so the branch
    # torch.where discards cannot produce inf and poison the gradient with NaN.
    near = s > -math.log(2.0)
    s_near = torch.where(near, s, torch.full_like(s, -math.log(2.0)))
    s_far = torch.where(near, torch.full_like(s, -math.log(2.0)), s)
    log1mexp = torch.where(near, torch.log(-torch.expm1(s_near)), torch.log1p(-torch.exp(s_far)))
    return log1mexp - s


def combine_logits(vertebra_logits: torch.Tensor, patient_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Build the (B, 8) [patient_overall, C1..C7] logits the competition loss takes.

    Args:
        vertebra_logits: (B, 7) in C1..C7 order.
        patient_logits: (B, 1) or (B,) from a separate patient head; None derives it from the vertebrae with
            `patient_logit_from_vertebrae` (1 - prod(1 - p_v)).

    Returns:
        (B, 8) logits in TARGETS order.
    """
    if vertebra_logits.ndim != 2 or vertebra_logits.shape[1] != len(TARGETS) - 1:
        raise ValueError(f"vertebra_logits must be (B, {len(TARGETS) - 1}) in C1..C7 order; "
                         f"got {tuple(vertebra_logits.shape)}")
    if patient_logits is None:
        patient_logits = patient_logit_from_vertebrae(vertebra_logits)
    patient_logits = patient_logits.reshape(-1, 1) if patient_logits.ndim == 1 else patient_logits
    if patient_logits.shape != (vertebra_logits.shape[0], 1):
        raise ValueError(f"patient_logits must be (B, 1) with B={vertebra_logits.shape[0]}; "
                         f"got {tuple(patient_logits.shape)}")
    return torch.cat([patient_logits.to(vertebra_logits.dtype), vertebra_logits], dim=1)


def vertebra_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The competition's weighted log loss on single vertebrae, for per-vertebra models (a batch mixes
    vertebrae of different studies, so no study's 8 columns are there to normalise by).

    `sum(w * BCE) / sum(w)` over the batch, with the metric's vertebra weights: 1 for a negative label, 2 for
    a positive one (`kit.constants`, columns C1..C7). On all seven vertebrae of a set of studies it is the
    vertebra part of the metric's "global" form, renormalised to the vertebra weights:
    `competition_score(y, p, normalise="global", per_target=True)[C1..C7].sum() * W / W_vertebrae`
    (W: all weights, W_vertebrae: those of C1..C7).

    Args:
        logits: (B,) vertebra fracture logits.
        targets: (B,) labels in [0, 1].

    Returns:
        Scalar tensor.
    """
    if logits.shape != targets.shape or logits.ndim != 1:
        raise ValueError(f"logits and targets must both be (B,); got {tuple(logits.shape)} and {tuple(targets.shape)}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    y = targets.to(x.dtype)
    neg, pos = NEGATIVE_WEIGHTS[1], POSITIVE_WEIGHTS[1]
    w = y * pos + (1.0 - y) * neg
    loss = -(y * F.logsigmoid(x) + (1.0 - y) * F.logsigmoid(-x))
    return (w * loss).sum() / w.sum()


def slice_bce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    pos_weight: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy over per-slice logits, averaged over the real (unpadded) slices.

    Args:
        logits: (B, T) per-slice scores, or (B, T, C) with one channel per vertebra.
        labels: same shape as `logits`, in [0, 1].
        mask: (B, T) true for real slices, false for padding; None counts every slice.
        pos_weight: weight of the positive term (scalar or (C,)), as in `F.binary_cross_entropy_with_logits`.

    Returns:
        Scalar tensor; 0 (with a gradient path) when the mask selects nothing.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must have the same shape")
    x = logits if logits.dtype == torch.float64 else logits.float()
    pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=x.dtype, device=x.device)
    loss = F.binary_cross_entropy_with_logits(x, labels.to(x.dtype), pos_weight=pw, reduction="none")
    if mask is None:
        return loss.mean()
    if tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"mask must be (B, T) = {tuple(logits.shape[:2])}; got {tuple(mask.shape)}")
    m = mask.to(x.dtype)
    m = m.reshape(*m.shape, *([1] * (loss.ndim - 2))).expand_as(loss)
    return (loss * m).sum() / m.sum().clamp(min=1.0)
