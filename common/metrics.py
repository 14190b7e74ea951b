"""Dice as Kaggle scored Carvana: per image, then the mean over images.

The counts are taken where the masks are (`dice_counts`, `sweep_counts`: tensors on the device) and
turned into scores on the host (`dice_of`, `sweep_dice`), so a loop over images reads the device
once for all of them instead of once per count.
"""

from __future__ import annotations

import numpy as np
import torch

from common.prediction.transfer import from_host


def dice_counts(pred: torch.Tensor, truth: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """(both, predicted, true) pixel counts of two boolean masks, int64 on their device; with `within`
    (a boolean mask of the same shape), of the pixels it marks only: masked sums, not boolean indexing,
    whose result size the host would have to read from the device."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(truth.shape)}")
    if within is not None:
        pred, truth = pred & within, truth & within
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
    counted once by how many thresholds lie below its probability. Fixed-size sums into T + 1 bins
    (`scatter_add_`): `bincount` and boolean indexing size their results on the host, a device read each."""
    # through pinned memory: an array given to the device directly is a copy from pageable memory, a sync
    bounds = from_host(np.asarray(thresholds, dtype=np.float32), prob.device).to(prob.dtype)
    bins = torch.bucketize(prob, bounds).flatten()  # thresholds strictly below each probability
    true = truth.flatten().long()

    def above(weights: torch.Tensor) -> torch.Tensor:  # the weights' sum over the pixels above each threshold
        sums = torch.zeros(len(bounds) + 1, dtype=torch.int64, device=prob.device).scatter_add_(0, bins, weights)
        return sums.flip(0).cumsum(0).flip(0)[1:]

    return torch.stack([above(torch.ones_like(bins)), above(true), true.sum().expand(len(bounds))])


def sweep_dice(counts: torch.Tensor) -> list[float]:
    """The Dice at each threshold from `sweep_counts` (on any device)."""
    predicted, hits, true = counts
    total = predicted + true
    return torch.where(total > 0, 2 * hits / total.clamp(min=1), 1.0).tolist()
