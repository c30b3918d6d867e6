"""Training losses (torch). Models return logits; losses live here, never inside a model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------------


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per (sample, channel), averaged.

    Args:
        logits: (B, C, H, W) raw scores, one sigmoid channel per class (multilabel).
        target: (B, C, H, W) in {0, 1}.
        eps: smoothing added to numerator and denominator, so empty channels score 1 when predicted empty.
    """
    prob = torch.sigmoid(logits.float())
    target = target.float()
    dims = tuple(range(2, logits.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy plus `dice_weight` x soft Dice loss. Shapes as in `soft_dice_loss`."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce + dice_weight * soft_dice_loss(logits, target)
