"""Dice as Kaggle scored Carvana: per image, then the mean over images."""
from __future__ import annotations

import numpy as np
import torch


def dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """Dice of two boolean masks (arrays, or tensors on any device); two empty masks agree perfectly (1.0)."""
    if not isinstance(pred, torch.Tensor):
        pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((pred & truth).sum()) / total


def dice_sweep(prob: torch.Tensor, truth: torch.Tensor, thresholds) -> list[float]:
    """Dice of `prob > t` against `truth` for every t, in one pass over the pixels (not one per
    threshold): count each pixel once by how many thresholds lie below its probability."""
    bounds = torch.as_tensor(thresholds, dtype=prob.dtype, device=prob.device)
    bins = torch.bucketize(prob, bounds)  # thresholds strictly below each probability
    above = lambda b: torch.bincount(b, minlength=len(bounds) + 1).flip(0).cumsum(0).flip(0)[1:]  # noqa: E731
    predicted, hits = above(bins.flatten()), above(bins[truth])
    total = predicted + int(truth.sum())
    return torch.where(total > 0, 2 * hits / total.clamp(min=1), 1.0).tolist()
