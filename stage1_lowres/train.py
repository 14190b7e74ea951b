"""`carvana stage1 train`: the U-Net on whole images squashed to stage1.size x stage1.size."""
from __future__ import annotations

import numpy as np
import torch

from common import distributed
from common.batches import Pair, TensorBatches, scan_pairs
from common.config import Settings
from common.data import index_split, split_by_car
from common.errors import DataError
from common.losses import bce_dice_loss
from common.metrics import dice
from common.model import autocast, build_model
from common.predictor import predict_dtype
from common.trainer import fit


def as_tensors(pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded pairs as uint8 (N, 3, H, W) images and (N, 1, H, W) masks: the whole training
    set in two tensors, which `TensorBatches` keeps on the device."""
    images = torch.from_numpy(np.stack([p.image for p in pairs])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([p.mask for p in pairs]))[:, None].to(torch.uint8)
    return images, masks


def low_res_validator(pairs: list[Pair], device: torch.device, batch_size: int):
    """Validation loss and mean per-image Dice at the training resolution."""
    images, masks = as_tensors(pairs)
    x, y = images.float().div_(255), masks.float()

    @torch.no_grad()
    def validate(model) -> dict:
        model.eval()
        losses, scores = [], []
        for i in range(0, len(x), batch_size):
            with autocast(device, predict_dtype(device)):  # in prediction's precision
                logits = model(x[i : i + batch_size].to(device)).float().cpu()
            target = y[i : i + len(logits)]
            losses.append(bce_dice_loss(logits, target).item() * len(logits))
            scores += [dice(p, t) for p, t in zip(logits[:, 0].numpy() > 0, target[:, 0].numpy() > 0.5)]
        return {"val_loss": sum(losses) / len(x), "val_dice": float(np.mean(scores))}

    return validate


def main(cfg: Settings) -> int:
    s, data = cfg.stage1, cfg.data
    ranks, device = distributed.init(cfg.device)
    samples = index_split(data.root, "train", data.hq)
    train_samples, val_samples = split_by_car(samples, data.val_cars)
    if not val_samples:
        raise DataError("stage 1 needs validation cars; set data.val_cars to a count, a list or k/K")
    size = (s.size, s.size)
    pairs, bad = scan_pairs(samples, size, keep=True, max_bad_share=data.max_bad_share, jobs=max(s.workers, 1))
    val_ids = {v.id for v in val_samples}
    train_pairs = [p for p in pairs if p.sample.id not in val_ids]
    val_pairs = [p for p in pairs if p.sample.id in val_ids]
    about = (f"{len(train_pairs)} training and {len(val_pairs)} validation images ({len({p.sample.car for p in val_pairs})} cars) "
             f"at {size[0]}x{size[1]}")
    model = build_model(s, in_channels=3, seed=cfg.seed)
    batches = TensorBatches(*as_tensors(train_pairs), s.batch_size, device, ranks, seed=cfg.seed)
    fit(cfg, "stage1", model, batches, low_res_validator(val_pairs, device, cfg.predict.batch_size * 4), bad, about, device, ranks)
    return 0
