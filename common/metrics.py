"""Dice as Kaggle scored Carvana: per image, then the mean over images.

The counts are taken where the masks are (`dice_counts`, `sweep_counts`: tensors on the device) and
turned into scores on the host (`dice_of`, `sweep_dice`), so a loop over images reads the device
once for all of them instead of once per count.
"""

from __future__ import annotations

import numpy as np
import torch


def dice_counts(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(both, predicted, true) pixel counts of two boolean masks, int64 on their device."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(truth.shape)}")
    return torch.stack([(pred & truth).sum(), pred.sum(), truth.sum()])


def dice_of(both: int, predicted: int, true: int) -> float:
    """Dice from the counts; two empty masks agree perfectly (1.0)."""
    total = predicted + true
    return 1.0 if total == 0 else 2.0 * both / total


def dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Dice of two boolean masks (arrays, or tensors on any device: one read of the device)."""
    if isinstance(pred, torch.Tensor):
        return dice_of(*dice_counts(pred, truth).tolist())
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    return dice_of(int((pred & truth).sum()), int(pred.sum()), int(truth.sum()))


def sweep_counts(prob: torch.Tensor, truth: torch.Tensor, thresholds) -> torch.Tensor:
    """(3, T) counts for the Dice of `prob > t` against `truth` at every t: pixels predicted, hits, and
    the true pixels (repeated), in one pass over the pixels (not one per threshold): each pixel
    counted once by how many thresholds lie below its probability."""
    bounds = torch.as_tensor(thresholds, dtype=prob.dtype, device=prob.device)
    bins = torch.bucketize(prob, bounds)  # thresholds strictly below each probability
    above = lambda b: torch.bincount(b, minlength=len(bounds) + 1).flip(0).cumsum(0).flip(0)[1:]  # noqa: E731
    return torch.stack([above(bins.flatten()), above(bins[truth]), truth.sum().expand(len(bounds))])


def sweep_dice(counts: torch.Tensor) -> list[float]:
    """The Dice at each threshold from `sweep_counts` (on any device)."""
    predicted, hits, true = counts
    total = predicted + true
    return torch.where(total > 0, 2 * hits / total.clamp(min=1), 1.0).tolist()
