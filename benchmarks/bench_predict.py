"""Where the time of one stage-2 prediction goes, per 1918x1280 image, with an untrained refiner of
the given size (weights do not change the cost). Ratios are against the whole per-image time
measured in the same process.

    .venv/bin/python benchmarks/bench_predict.py [depth width]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.inference import predict_probs, to_input
from common.io import read_image
from common.model import UNet
from common.rle import rle_encode
from stage1_lowres.predict import upsample
from stage2_fullres.tiles import blend_weights, cut_tiles, plan_tiles, stitch

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "carvana_samples" / "test_fullres"


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main(depth: int = 5, width: int = 16) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = sorted(REAL.glob("*.jpg"))[:6] if REAL.is_dir() else []
    if not paths:
        sys.exit(f"needs the real test photos in {REAL}")
    stage1 = UNet(3, depth, width).to(device).eval()
    refiner = UNet(4, depth, width, prior_skip=True).to(device).eval()
    box = (60, 300, 1860, 1100)  # a wide car: two 1024 tiles
    steps: dict[str, list[float]] = {}
    for i, path in enumerate(paths):
        image, t_read = timed(read_image, path)
        small, t_small = timed(read_image, path, (256, 256))
        prob, t_s1 = timed(predict_probs, stage1, to_input(small[None]), device, 1)
        prior, t_up = timed(upsample, prob[0], 1918, 1280)
        windows = plan_tiles(1918, 1280, box, 1024, 64)
        x, t_cut = timed(lambda: to_input(cut_tiles(image, windows), cut_tiles(prior, windows)))
        tiles, t_net = timed(predict_probs, refiner, x, device, 2)
        full, t_stitch = timed(stitch, tiles, windows, box, 1918, 1280, blend_weights(1024))
        _, t_rle = timed(rle_encode, full > 0.5)
        if i == 0:
            continue  # warm-up
        for name, t in [("read full JPEG", t_read), ("read at 256 (draft)", t_small), ("stage-1 net", t_s1),
                        ("upsample prior", t_up), ("cut tiles", t_cut), ("refiner, 2 tiles", t_net),
                        ("stitch + blend", t_stitch), ("threshold + RLE", t_rle)]:
            steps.setdefault(name, []).append(t)
    total = sum(np.mean(v) for v in steps.values())
    print(f"device {device}, U-Net depth {depth} width {width}, {len(paths) - 1} images after warm-up")
    print(f"{'step':22} {'ms/image':>9} {'share':>7}")
    for name, v in steps.items():
        print(f"{name:22} {np.mean(v) * 1e3:9.1f} {np.mean(v) / total:7.1%}")
    print(f"{'total':22} {total * 1e3:9.1f} {1:7.1%}   -> {100_064 * total / 3600:.1f} h for the 100,064 real test images")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
