"""Training speed: the real training loop (`train_one_epoch` over the stage's batches, augmentation
included) against the same net's forward + backward + optimizer step on tensors already on the
device, in one process, as a ratio. The goal on a GPU is >= 80% of the net's own rate.

    .venv/bin/python benchmarks/bench_train.py [stage1|stage2|both] [steps=20] [depth=6] [width=16]
        (benchmarks/gpu_check.py runs the same rows with and without torch.compile)
    .venv/bin/python benchmarks/bench_train.py precision [steps] [depth] [width] [batch=4]
        the net's step at stage-1 size in fp32 against bf16, same process (on a CPU with native bf16,
        `precision: auto` times the same two when training starts and takes bf16 if >= 10% faster)

Stage 1: the real 512x512 training photos (../shared/carvana_samples/train_512) at stage1.size
(512 on CUDA, 256 on the CPU), in a device-resident uint8 tensor. Stage 2: synthetic full-resolution
pairs (1918x1280 JPEG + GIF, generated once), 384 crops, with 1 and 4 crops per decoded image.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.boxes import expand_box
from common.config import load_config
from common.data.kaggle import index_split
from common.model import UNet, amp_dtype
from common.training.batches import LoaderBatches, TensorBatches, scan_pairs
from common.training.losses import bce_dice_loss
from common.training.trainer import Clock, Loop, build_optimizer, train_one_epoch
from stage1_lowres.train import as_tensors
from stage2_fullres.train import CropDataset

REAL = Path(__file__).resolve().parents[2] / "shared" / "carvana_samples" / "train_512"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


class Limited:
    """The first `steps` batches of an epoch: the real source, cut short."""

    def __init__(self, data, steps: int):
        self.data, self.steps = data, steps

    def __len__(self) -> int:
        return min(len(self.data), self.steps)

    def epoch(self, e: int):
        return itertools.islice(self.data.epoch(e), self.steps)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def net_rate(model: torch.nn.Module, s: dict, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Samples/s of forward + backward + step on one batch already on the device: the ceiling
    (torch.compile'd when `s.compile`, as the trainer does)."""
    opt, dtype = build_optimizer(model, s), amp_dtype(s.precision, DEVICE)
    net = torch.compile(model) if s.compile else model
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    for i in range(steps + 3):
        if i == 3:  # warm-up done: cudnn benchmark, allocator
            sync()
            t = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = bce_dice_loss(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    sync()
    return steps * len(x) / (time.perf_counter() - t)


def loop_rate(model: torch.nn.Module, s: dict, data, steps: int) -> tuple[float, float]:
    """Samples/s of the real loop over `steps` batches (after one warm-up epoch of the same length),
    and the share of its time spent waiting for data."""
    opt, dtype = build_optimizer(model, s), amp_dtype(s.precision, DEVICE)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    limited = Limited(data, steps)
    loop = Loop(torch.compile(model) if s.compile else model, opt, scaler, s, DEVICE, dtype, Clock(0))
    train_one_epoch(loop, limited, 0)  # warm-up, mask cache filled
    sync()
    t = time.perf_counter()
    stats = train_one_epoch(loop, limited, 1)
    sync()
    seconds = time.perf_counter() - t
    return stats.images / seconds, stats.data_seconds / seconds


def stage1(steps: int, depth: int, width: int, compile: bool = False, real: Path = REAL, size: int = 0) -> list[tuple]:
    size = size or (512 if CUDA else 256)
    cfg = load_config(
        None,
        [
            f"stage1.size={size}",
            f"stage1.depth={depth}",
            f"stage1.width={width}",
            f"stage1.batch_size={32 if CUDA else 4}",
            f"stage1.compile={compile}",
        ],
    )
    s = cfg.stage1
    pairs, _ = scan_pairs(index_split(real, "train"), (size, size), jobs=os.cpu_count() or 1)
    images, masks = as_tensors(pairs)
    data = TensorBatches(images, masks, s.batch_size, DEVICE)
    x = images[: s.batch_size].to(DEVICE).float().div_(255)
    y = masks[: s.batch_size].to(DEVICE).float()
    torch.manual_seed(0)
    ceiling = net_rate(UNet(3, depth, width).to(DEVICE).to(memory_format=torch.channels_last), s, x, y, steps)
    torch.manual_seed(0)
    rate, wait = loop_rate(UNet(3, depth, width).to(DEVICE).to(memory_format=torch.channels_last), s, data, steps)
    return [
        (
            f"stage 1, {size}px, batch {s.batch_size}, {len(pairs)} real photos on the {DEVICE.type}"
            + (", compiled" if compile else ""),
            ceiling,
            rate,
            wait,
        )
    ]


def stage2(
    steps: int,
    depth: int,
    width: int,
    compile: bool = False,
    crop: int = 384,
    per_item: tuple[int, ...] = (1, 4),
    cars: int = 2,
) -> list[tuple]:
    from common.data.synth import write_sample_data

    rows = []
    batch = 16 if CUDA else 4
    workers = min(12, (os.cpu_count() or 2) - 1) if CUDA else 1
    with tempfile.TemporaryDirectory() as tmp:
        root = write_sample_data(Path(tmp) / "data", cars=cars, test_cars=0, seed=0, jobs=os.cpu_count() or 1)
        pairs, _ = scan_pairs(index_split(root, "train"), (64, 64), keep=False, jobs=os.cpu_count() or 1)
        boxes = {p.sample.img: expand_box(p.box, 32, p.width, p.height) for p in pairs}
        ceiling = None
        for per in per_item:
            cfg = load_config(
                None,
                [
                    f"stage2.depth={depth}",
                    f"stage2.width={width}",
                    f"stage2.batch_size={batch}",
                    f"stage2.crop={crop}",
                    f"stage2.crops_per_image={per}",
                    "stage2.coarse_channel=false",
                    f"stage2.workers={workers}",
                    f"stage2.compile={compile}",
                ],
            )
            s = cfg.stage2
            crops = CropDataset(pairs, boxes, s, None, Path(tmp) / f"masks{per}")
            with LoaderBatches(
                crops, batch, workers, DEVICE, per_item=per
            ) as data:  # workers stopped before the folder goes
                if ceiling is None:
                    x, y = next(data.epoch(0))
                    torch.manual_seed(0)
                    ceiling = net_rate(
                        UNet(3, depth, width).to(DEVICE).to(memory_format=torch.channels_last), s, x, y, steps
                    )
                torch.manual_seed(0)
                rate, wait = loop_rate(
                    UNet(3, depth, width).to(DEVICE).to(memory_format=torch.channels_last),
                    s,
                    data,
                    min(steps, len(data)),
                )
            rows.append(
                (
                    f"stage 2, {crop}px crops, batch {batch}, {per} crop(s) per decode, {workers} workers"
                    + (", compiled" if compile else ""),
                    ceiling,
                    rate,
                    wait,
                )
            )
    return rows


def precision(steps: int, depth: int, width: int, batch: int) -> None:
    size = 512 if CUDA else 256
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(DEVICE)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float().to(DEVICE)
    rates = {}
    for name in ("fp32", "bf16"):
        s = load_config(None, [f"stage1.precision={name}"]).stage1
        torch.manual_seed(0)
        rates[name] = net_rate(UNet(3, depth, width).to(DEVICE).to(memory_format=torch.channels_last), s, x, y, steps)
    native = amp_dtype("bf16", DEVICE) is not None
    print(
        f"U-Net depth {depth} width {width}, {size}px, batch {batch}, {steps} timed steps on the {DEVICE.type}: fp32 "
        f"{rates['fp32']:.1f} images/s, bf16 {rates['bf16']:.1f}{'' if native else ' (not native here: ran in fp32)'}, "
        f"ratio {rates['bf16'] / rates['fp32']:.2f}"
    )


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "both"
    if which == "precision":
        args = [int(a) for a in sys.argv[2:6]]
        precision(*(args + [20, 6, 16, 4][len(args) :]))
        sys.exit(0)
    steps, depth, width = (int(a) for a in (sys.argv[2:5] + ["20", "6", "16"][len(sys.argv[2:5]) :]))
    if which in ("stage1", "both") and not REAL.is_dir():
        sys.exit(f"stage 1 needs the real samples in {REAL}")
    rows = (stage1(steps, depth, width) if which in ("stage1", "both") else []) + (
        stage2(steps, depth, width) if which in ("stage2", "both") else []
    )
    print(f"\nU-Net depth {depth} width {width}, {steps} timed steps, {torch.get_num_threads()} threads")
    print(f"{'what':72} {'net alone/s':>11} {'loop/s':>8} {'ratio':>6} {'data wait':>9}")
    for name, ceiling, rate, wait in rows:
        print(f"{name:72} {ceiling:11.1f} {rate:8.1f} {rate / ceiling:6.2f} {wait:9.0%}")
