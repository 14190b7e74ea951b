"""Tile planning, cutting, blending and stitching: pure functions on arrays, property-tested.

A window is (x0, y0, x1, y1) with x1 - x0 == y1 - y0 == tile. Along an axis at least as long as
the tile, windows lie inside the image; along a shorter axis the one window starts at 0 and the
image is reflect-padded to fill it.
"""
from __future__ import annotations

import math

import numpy as np

from common.boxes import Box

Window = tuple[int, int, int, int]


def plan_axis(lo: int, hi: int, length: int, tile: int, min_overlap: int) -> list[int]:
    """Fewest window starts covering [lo, hi) with consecutive overlaps of at least `min_overlap`."""
    if not 0 <= min_overlap < tile:
        raise ValueError(f"min_overlap must be in [0, tile), got {min_overlap} for tile {tile}")
    if length <= tile:
        return [0]
    span = hi - lo
    if span <= tile:
        return [min(max((lo + hi - tile) // 2, 0), length - tile)]
    n = 1 + math.ceil((span - tile) / (tile - min_overlap))
    return [lo + round(i * (span - tile) / (n - 1)) for i in range(n)]


def plan_tiles(width: int, height: int, box: Box, tile: int = 1024, min_overlap: int = 64) -> list[Window]:
    """Windows covering `box` in a width x height image, row by row."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {box} is empty or outside the {width}x{height} image")
    xs = plan_axis(x0, x1, width, tile, min_overlap)
    ys = plan_axis(y0, y1, height, tile, min_overlap)
    return [(x, y, x + tile, y + tile) for y in ys for x in xs]


def cut_tiles(image: np.ndarray, windows: list[Window]) -> np.ndarray:
    """(N, tile, tile, ...) crops of an (H, W, ...) array; reflect-padded where a window leaves it."""
    h, w = image.shape[:2]
    tile = windows[0][2] - windows[0][0]
    pad_y, pad_x = max(tile - h, 0), max(tile - w, 0)
    if pad_y or pad_x:
        image = np.pad(image, [(0, pad_y), (0, pad_x)] + [(0, 0)] * (image.ndim - 2), mode="reflect")
    return np.stack([image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows])


def blend_weights(tile: int, kind: str = "smooth") -> np.ndarray:
    """Per-pixel tile weights: `mean` (flat) or `smooth` (a sine window fading towards the edges)."""
    if kind == "mean":
        return np.ones((tile, tile), np.float32)
    if kind == "smooth":
        ramp = np.sin(np.pi * (np.arange(tile) + 0.5) / tile).astype(np.float32) + 1e-3
        return np.outer(ramp, ramp)
    raise ValueError(f"stage2.blend must be 'mean' or 'smooth', got {kind!r}")


def stitch(tile_probs: np.ndarray, windows: list[Window], box: Box, width: int, height: int,
           weights: np.ndarray) -> np.ndarray:
    """Blend tile predictions into a full (height, width) canvas; outside `box` is background (0)."""
    x0, y0, x1, y1 = box
    acc = np.zeros((y1 - y0, x1 - x0), np.float32)
    total = np.zeros_like(acc)
    for prob, (wx0, wy0, wx1, wy1) in zip(tile_probs, windows):
        # the part of this window that lies inside the box, in box and in tile coordinates
        bx0, by0, bx1, by1 = max(wx0, x0), max(wy0, y0), min(wx1, x1), min(wy1, y1)
        if bx0 >= bx1 or by0 >= by1:
            continue
        tile_part = (slice(by0 - wy0, by1 - wy0), slice(bx0 - wx0, bx1 - wx0))
        box_part = (slice(by0 - y0, by1 - y0), slice(bx0 - x0, bx1 - x0))
        acc[box_part] += prob[tile_part] * weights[tile_part]
        total[box_part] += weights[tile_part]
    if (total == 0).any():
        raise ValueError("the windows do not cover the box")
    canvas = np.zeros((height, width), np.float32)
    canvas[y0:y1, x0:x1] = acc / total
    return canvas
