"""`carvana stage1 train`: the U-Net on whole images squashed to stage1.size x stage1.size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.config import save_config
from common.data import DataError, Pair, index_split, report_skipped, scan_pairs, split_by_car
from common.inference import forward_batches, to_input
from common.losses import bce_dice_loss
from common.metrics import dice
from common.trainer import build_model, pick_device, train


class LowResDataset(Dataset):
    """Images and masks already decoded at low resolution, held in memory: no loader can starve the net."""

    def __init__(self, pairs: list[Pair]):
        self.images = np.stack([p.image for p in pairs])
        self.masks = np.stack([p.mask for p in pairs])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_input(self.images[i : i + 1])[0], torch.from_numpy(self.masks[i : i + 1].astype(np.float32))


def low_res_validator(pairs: list[Pair], device: torch.device, batch_size: int):
    """Validation loss and mean per-image Dice at the training resolution."""
    data = LowResDataset(pairs)
    x, y = to_input(data.images), torch.from_numpy(data.masks[:, None].astype(np.float32))

    def validate(model) -> dict:
        losses, scores = [], []
        for k, logits in enumerate(forward_batches(model, x, device, batch_size)):
            target = y[k * batch_size : k * batch_size + len(logits)]
            losses.append(bce_dice_loss(logits, target).item() * len(logits))
            scores += [dice(p, t) for p, t in zip(logits[:, 0].numpy() > 0, target[:, 0].numpy() > 0.5)]
        return {"val_loss": sum(losses) / len(x), "val_dice": float(np.mean(scores))}

    return validate


def main(cfg: dict) -> int:
    s, data = cfg["stage1"], cfg["data"]
    run_dir = Path(cfg["output"]["dir"]) / "stage1"
    device = pick_device(cfg["device"])
    samples = index_split(data["root"], "train", data["hq"])
    train_samples, val_samples = split_by_car(samples, data["val_cars"])
    if not val_samples:
        raise DataError("stage 1 needs validation cars; set data.val_cars to a count, a list or k/K")
    size = (s["size"], s["size"])
    pairs, bad = scan_pairs(samples, size, keep=True, max_bad_share=data["max_bad_share"], jobs=max(s["workers"], 1))
    val_ids = {v.id for v in val_samples}
    train_pairs = [p for p in pairs if p.sample.id not in val_ids]
    val_pairs = [p for p in pairs if p.sample.id in val_ids]
    save_config(cfg, run_dir / "config.yaml")
    print(f"stage 1: {len(train_pairs)} training and {len(val_pairs)} validation images "
          f"({len({p.sample.car for p in val_pairs})} cars) at {size[0]}x{size[1]} on {device}")
    model = build_model(s, in_channels=3, seed=cfg["seed"])
    history = train(model, LowResDataset(train_pairs), low_res_validator(val_pairs, device, cfg["predict"]["batch_size"] * 4),
                 {**s, "workers": 0}, run_dir, cfg, device, seed=cfg["seed"])
    report_skipped(run_dir, bad)
    best = max((h["val_dice"] for h in history), default=float("nan"))
    print(f"stage 1 done: best val Dice {best:.4f}; checkpoints in {run_dir}")
    return 0
