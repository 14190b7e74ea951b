"""BCE + (1 - soft Dice), with optional extra BCE weight on a band around the mask boundary."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def edge_band(target: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """1 where a (2r+1)-pixel window holds both car and background: the pixels near the boundary."""
    k = 2 * radius + 1
    grown = F.max_pool2d(target, k, stride=1, padding=radius)
    shrunk = -F.max_pool2d(-target, k, stride=1, padding=radius)
    return grown - shrunk


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over images of the soft Dice, matching the per-image metric."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return ((2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, edge_weight: float = 0.0) -> torch.Tensor:
    logits, target = logits.float(), target.float()
    weight = 1.0 + edge_weight * edge_band(target) if edge_weight else None
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight) + 1.0 - soft_dice(logits, target)
