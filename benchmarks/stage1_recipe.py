"""Stage-1 quality on the real samples (`../shared/carvana_samples/train_512`, first 4 cars held out):
the baseline a user would write, and any checkpoint scored the way prediction sees it.

    .venv/bin/python benchmarks/stage1_recipe.py plain [minutes=8]
        the plain loop on the same split: U-Net depth 5 width 16, Adam 1e-3 constant,
        batch 4, BCE + soft Dice, horizontal flip only, 256 px, in the precision the trainer's
        `auto` picks on this CPU (bf16 or fp32, timed); prints its held-out Dice at 256
    .venv/bin/python benchmarks/stage1_recipe.py score CHECKPOINT...
        held-out Dice of each checkpoint through `Coarse` (antialiased resize, autocast, bilinear
        upsample) against the 512x512 masks, without and with flip TTA, and where its wrong pixels
        are (share within 1 and 3 px of the true boundary, with TTA)

Compare with `carvana stage1 train --config pipelines/demo.yaml data.root=../shared/carvana_samples/train_512
data.val_cars=4 stage1.max_minutes=8 device=cpu output.dir=OUT` (README, "Stage 1 on real photos").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.config import load_config
from common.data.kaggle import index_split, split_by_car
from common.metrics import dice
from common.model import UNet, amp_dtype, autocast, load_net, prepare
from common.training.batches import Pair, scan_pairs
from common.training.distributed import Ranks
from common.training.losses import bce_dice_loss, edge_band
from common.training.trainer import faster_cpu_dtype
from stage1_lowres.coarse import Coarse, upsample
from stage1_lowres.train import as_tensors

ROOT = Path(__file__).resolve().parents[2] / "shared" / "carvana_samples" / "train_512"
CPU = torch.device("cpu")


def split(size: tuple[int, int] | None) -> tuple[list[Pair], list[Pair]]:
    """Training and held-out pairs, decoded at `size` (None: as stored)."""
    samples = index_split(ROOT, "train", False)
    held_out = {s.id for s in split_by_car(samples, 4)[1]}
    pairs, _ = scan_pairs(samples, size, keep=True, max_bad_share=0.0, jobs=2)
    return [p for p in pairs if p.sample.id not in held_out], [p for p in pairs if p.sample.id in held_out]


def plain(minutes: float) -> None:
    train, val = split((256, 256))
    (xt, yt), (xv, yv) = as_tensors(train), as_tensors(val)
    xt, yt, xv, yv = xt.float() / 255, yt.float(), xv.float() / 255, yv.float()
    torch.manual_seed(0)
    model = UNet(3, 5, 16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    recipe = load_config(None, ["stage1.size=256", "stage1.batch_size=4"]).stage1
    dtype = faster_cpu_dtype(model, recipe, [], Ranks()) if amp_dtype("auto", CPU) else None
    t0, steps = time.monotonic(), 0
    while time.monotonic() - t0 < minutes * 60:
        for idx in torch.randperm(len(xt)).split(4):
            x, y = xt[idx].clone(), yt[idx].clone()
            mirror = torch.rand(len(idx)) < 0.5
            x[mirror], y[mirror] = x[mirror].flip(-1), y[mirror].flip(-1)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = bce_dice_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.monotonic() - t0 > minutes * 60:
                break
    model.eval()
    scores = []
    with torch.no_grad(), autocast(CPU):
        for i in range(0, len(xv), 16):
            logits = model(xv[i : i + 16]).float()
            scores += [
                dice(p, t) for p, t in zip(logits[:, 0].numpy() > 0, yv[i : i + 16, 0].numpy() > 0.5, strict=True)
            ]
    print(
        f"plain loop: {steps} steps in {time.monotonic() - t0:.0f} s, held-out Dice at 256 {np.mean(scores):.4f} "
        f"(worst {np.min(scores):.4f}, {len(scores)} images)"
    )


def score(paths: list[str]) -> None:
    _, val = split(None)
    print(
        "| checkpoint | size | held-out Dice at 512 | with flip TTA | wrong px within 1 / 3 px of the boundary "
        "|\n|---|---|---|---|---|"
    )
    for path in paths:
        model, ckpt = load_net(path, CPU)
        size = ckpt["config"]["stage1"]["size"]
        means, wrong, near = [], 0, [0, 0]
        for flip in (False, True):
            cfg = load_config(None, [f"stage1.size={size}", f"predict.tta_flip={flip}"])
            coarse, scores = Coarse(prepare(model, CPU), cfg, CPU), []
            for i in range(0, len(val), 8):
                batch = val[i : i + 8]
                probs = coarse.probs([torch.from_numpy(p.image).permute(2, 0, 1) for p in batch])
                for prob, p in zip(probs, batch, strict=True):
                    pred = upsample(prob, *p.mask.shape[::-1]) > 0.5
                    truth = torch.from_numpy(p.mask)
                    scores.append(dice(pred.numpy(), p.mask))
                    if flip:
                        miss = pred != truth
                        wrong += int(miss.sum())
                        for k, r in enumerate((1, 3)):
                            near[k] += int((miss & (edge_band(truth[None, None].float(), r)[0, 0] > 0)).sum())
            means.append(np.mean(scores))
        print(
            f"| {path} | {size} | {means[0]:.4f} | {means[1]:.4f} ({means[1] - means[0]:+.4f}) | "
            f"{near[0] / max(wrong, 1):.2f} / {near[1] / max(wrong, 1):.2f} |"
        )


if __name__ == "__main__":
    if not ROOT.is_dir():
        sys.exit(f"{ROOT} not found: this benchmark needs the real samples beside the project")
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        plain(float(sys.argv[2]) if len(sys.argv) > 2 else 8.0)
    elif len(sys.argv) > 2 and sys.argv[1] == "score":
        score(sys.argv[2:])
    else:
        sys.exit(__doc__)
