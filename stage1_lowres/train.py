"""`carvana stage1 train`: the U-Net on whole images squashed to stage1.size x stage1.size."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from common.config import Settings
from common.model import build_model
from common.training import distributed
from common.training.batches import Pair, TensorBatches, read_pairs
from common.training.trainer import Run, fit, validator
from stage1_lowres.coarse import Coarse


def as_tensors(pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded pairs as uint8 (N, 3, H, W) images and (N, 1, H, W) masks: the whole training
    set in two tensors, which `TensorBatches` keeps on the device."""
    images = torch.from_numpy(np.stack([p.image for p in pairs])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([p.mask for p in pairs]))[:, None].to(torch.uint8)
    return images, masks


def coarse_predictions(images: torch.Tensor, cfg: Settings, device: torch.device):
    """Validation's predictions: the decoded uint8 (N, 3, size, size) images through `Coarse`, stage 1's
    predict step (without flip TTA), four prediction batches at a time."""
    batch_size = min(cfg.predict.batch_size * 4, 256)  # as a setting too: on a GPU calls are split at its buckets
    cfg = cfg.updated({"predict.tta_flip": False, "predict.batch_size": batch_size})

    def predict(model) -> Iterator[tuple[int, torch.Tensor]]:
        coarse = Coarse(model, cfg, device)
        for i in range(0, len(images), batch_size):
            yield from enumerate(coarse.probs(list(images[i : i + batch_size].to(device))), i)

    return predict


def main(cfg: Settings) -> int:
    s = cfg.stage1
    ranks, device = distributed.init(cfg.device)
    pairs = read_pairs(cfg.data, (s.size, s.size), keep=True, workers=s.workers)
    about = (
        f"{len(pairs.train)} training and {len(pairs.val)} validation images ({len({p.sample.car for p in pairs.val})} "
        f"cars) at {s.size}x{s.size}"
    )
    model = build_model(s, in_channels=3, seed=cfg.seed)
    batches = TensorBatches(*as_tensors(pairs.train), s.batch_size, device, ranks, seed=cfg.seed)
    val_images, val_masks = as_tensors(pairs.val)
    # Dice at 0.5, whatever stage1.threshold says: that setting changes boxes, not which epoch is best.pt
    validate = validator(coarse_predictions(val_images, cfg, device), list(val_masks[:, 0].bool()), 0.5)
    fit(Run.of(cfg, "stage1", device, ranks), model, batches, validate, pairs, about)
    return 0
