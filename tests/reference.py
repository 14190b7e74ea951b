"""The old per-image prediction path, in numpy, kept as the reference the device code is tested
against (and timed against in benchmarks/bench_predict.py). Not used by the project itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data.images import read_image
from stage1_lowres.coarse import box_from_probability
from stage2_fullres.tiles import plan_tiles


def cut_tiles(image: np.ndarray, windows: list) -> np.ndarray:
    """(N, tile, tile, ...) crops of an (H, W, ...) array; reflect-padded where a window leaves it."""
    h, w = image.shape[:2]
    tile = windows[0][2] - windows[0][0]
    pad_y, pad_x = max(tile - h, 0), max(tile - w, 0)
    if pad_y or pad_x:
        image = np.pad(image, [(0, pad_y), (0, pad_x)] + [(0, 0)] * (image.ndim - 2), mode="reflect")
    return np.stack([image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows])


def blend_weights(tile: int, kind: str = "smooth") -> np.ndarray:
    if kind == "mean":
        return np.ones((tile, tile), np.float32)
    ramp = np.sin(np.pi * (np.arange(tile) + 0.5) / tile).astype(np.float32) + 1e-3
    return np.outer(ramp, ramp)


def stitch(tile_probs: np.ndarray, windows: list, box, width: int, height: int, weights: np.ndarray) -> np.ndarray:
    """The weighted mean of the tiles on a canvas big enough for every window, then cut to the box."""
    x0, y0, x1, y1 = box
    shape = (max(height, *(w[3] for w in windows)), max(width, *(w[2] for w in windows)))
    acc, total = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for prob, (wx0, wy0, wx1, wy1) in zip(tile_probs, windows, strict=True):
        acc[wy0:wy1, wx0:wx1] += prob * weights
        total[wy0:wy1, wx0:wx1] += weights
    canvas = np.zeros((height, width), np.float32)
    canvas[y0:y1, x0:x1] = acc[y0:y1, x0:x1] / total[y0:y1, x0:x1]
    return canvas


@torch.no_grad()
def _probs(model, x: np.ndarray, batch: int, flip: bool = False) -> np.ndarray:
    """uint8/float NHWC(+C) -> (N, H, W) probabilities, one batch at a time, on the model's device."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    t[:, :3] /= 255
    device = next(model.parameters()).device
    out = torch.cat([torch.sigmoid(model(t[i : i + batch].to(device)).float()).cpu() for i in range(0, len(t), batch)])
    if flip:
        mirrored = torch.cat(
            [torch.sigmoid(model(t[i : i + batch].flip(-1).to(device)).float()).cpu() for i in range(0, len(t), batch)]
        )
        out = (out + mirrored.flip(-1)) / 2
    return out[:, 0].numpy()


def old_predict(
    stage1,
    refiner,
    path: Path,
    size: int,
    box,
    tile: int = 1024,
    min_overlap: int = 64,
    blend: str = "smooth",
    batch: int = 2,
    flip: bool = False,
    margin: int = 32,
    threshold: float = 0.5,
    coarse: np.ndarray | None = None,
) -> dict:
    """One image as the project predicted before the streaming `Cascade`: a full decode for the tiles,
    a second, reduced-size (JPEG draft) decode for stage 1, tiles and stitching in numpy. `coarse`: the
    full-resolution stage-1 probability the refiner takes instead of this path's own (to compare the
    refine paths alone)."""
    image = read_image(path)
    height, width = image.shape[:2]
    small = _probs(stage1, read_image(path, size=(size, size))[None], 1)[0]
    if coarse is None:
        coarse = F.interpolate(
            torch.from_numpy(small)[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0].numpy()
    box = box or box_from_probability(small, width, height, margin, threshold) or (0, 0, width, height)
    out = {"image": image, "small": small, "coarse": coarse, "box": box, "prob": None}
    if refiner is not None:
        windows = plan_tiles(width, height, box, tile, min_overlap)
        x = np.concatenate([cut_tiles(image, windows), cut_tiles(coarse, windows)[..., None]], -1)
        out["prob"] = stitch(_probs(refiner, x, batch, flip), windows, box, width, height, blend_weights(tile, blend))
    return out
