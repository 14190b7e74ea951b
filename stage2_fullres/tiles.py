"""Tiles: a car box cut into overlapping full-resolution windows, and the refiner's predictions
of them blended back into the full canvas. Planning is pure functions (property-tested); cutting
and stitching run wherever their tensors are (the GPU in prediction, the CPU in the tests and
data loaders).

A window is (x0, y0, x1, y1) with x1 - x0 == y1 - y0 == tile. Along an axis at least as long as
the tile, windows lie inside the image; along a shorter axis the one window starts at 0 and the
image is reflect-padded to fill it.
"""

from __future__ import annotations

import math

import torch

from common.boxes import Box

Window = tuple[int, int, int, int]  # x0, y0, x1, y1; x1/y1 exclusive


# Windows planned for one image at most: a real photo needs 1-6 and a 12000x8000 one 117; more comes from
# settings no one means and would hold gigabytes of tiles in memory.
MAX_TILES = 256


class TooManyTiles(ValueError):
    """The tile settings would cut this image into more than MAX_TILES windows; the message names the
    settings. The image's failure, not the settings' (they cover every other image): the cascade
    turns it into that image's `Failure`."""


def clamp_start(want: int, length: int, side: int) -> int:
    """Where a window of `side` px that wants to start at `want` starts: inside [0, length) where it fits,
    else at 0 (the image is reflect-padded to it)."""
    return min(max(want, 0), max(length - side, 0))


def refined_pixels(windows: list[Window] | tuple[Window, ...]) -> int:
    """The refiner's work for one image, in pixels: what its windows hold."""
    return sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in windows)


def plan_axis(lo: int, hi: int, length: int, tile: int, min_overlap: int) -> list[int]:
    """Fewest window starts covering [lo, hi) with consecutive overlaps of at least `min_overlap`."""
    if not 0 <= min_overlap < tile:
        raise ValueError(f"min_overlap must be in [0, tile), got {min_overlap} for tile {tile}")
    if length <= tile:
        return [0]
    span = hi - lo
    if span <= tile:
        return [clamp_start((lo + hi - tile) // 2, length, tile)]
    n = 1 + math.ceil((span - tile) / (tile - min_overlap))
    return [lo + round(i * (span - tile) / (n - 1)) for i in range(n)]


def plan_tiles(width: int, height: int, box: Box, tile: int = 1024, min_overlap: int = 64) -> list[Window]:
    """Windows covering `box` in a width x height image, row by row."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {box} is empty or outside the {width}x{height} image")
    xs = plan_axis(x0, x1, width, tile, min_overlap)
    ys = plan_axis(y0, y1, height, tile, min_overlap)
    if len(xs) * len(ys) > MAX_TILES:
        raise TooManyTiles(
            f"stage2.tile={tile} with stage2.min_overlap={min_overlap} cuts the {x1 - x0}x{y1 - y0} car box of this "
            f"{width}x{height} image into {len(xs) * len(ys)} tiles, more than the {MAX_TILES} allowed per image; "
            "raise stage2.tile or lower stage2.min_overlap"
        )
    return [(x, y, x + tile, y + tile) for y in ys for x in xs]


def _reflect(n: int, length: int, device: torch.device) -> torch.Tensor:
    """Indices 0..length-1 folded into [0, n) by mirror reflection without repeating the edge (numpy's 'reflect')."""
    i = torch.arange(length, device=device)
    if n == 1:
        return torch.zeros_like(i)
    i = i % (2 * (n - 1))
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def cut_tiles(image: torch.Tensor, windows: list[Window]) -> torch.Tensor:
    """(N, C, tile, tile) crops of a (C, H, W) tensor; reflect-padded where a window leaves it."""
    h, w = image.shape[-2:]
    tile = windows[0][2] - windows[0][0]
    if h < tile:
        image = image.index_select(-2, _reflect(h, tile, image.device))
    if w < tile:
        image = image.index_select(-1, _reflect(w, tile, image.device))
    return torch.stack([image[..., y0:y1, x0:x1] for x0, y0, x1, y1 in windows])


def blend_weights(tile: int, kind: str = "smooth", device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-pixel tile weights: `mean` (flat) or `smooth` (a sine window fading towards the edges)."""
    if kind == "mean":
        return torch.ones(tile, tile, device=device)
    if kind == "smooth":
        ramp = torch.sin(math.pi * (torch.arange(tile, device=device, dtype=torch.float64) + 0.5) / tile).float() + 1e-3
        return torch.outer(ramp, ramp)
    raise ValueError(f"stage2.blend must be 'mean' or 'smooth', got {kind!r}")


def stitch(
    tile_probs: torch.Tensor, windows: list[Window], box: Box, width: int, height: int, weights: torch.Tensor
) -> torch.Tensor:
    """Blend (N, tile, tile) predictions into a full (height, width) canvas; outside `box` is background (0)."""
    x0, y0, x1, y1 = box
    acc = tile_probs.new_zeros((y1 - y0, x1 - x0), dtype=torch.float32)
    total = torch.zeros_like(acc)
    for prob, (wx0, wy0, wx1, wy1) in zip(tile_probs, windows, strict=True):
        # the part of this window that lies inside the box, in box and in tile coordinates
        bx0, by0, bx1, by1 = max(wx0, x0), max(wy0, y0), min(wx1, x1), min(wy1, y1)
        if bx0 >= bx1 or by0 >= by1:
            continue
        tile_part = (slice(by0 - wy0, by1 - wy0), slice(bx0 - wx0, bx1 - wx0))
        box_part = (slice(by0 - y0, by1 - y0), slice(bx0 - x0, bx1 - x0))
        acc[box_part] += prob[tile_part] * weights[tile_part]
        total[box_part] += weights[tile_part]
    canvas = acc.new_zeros((height, width))
    canvas[y0:y1, x0:x1] = acc / total  # plan_tiles covers the box, so total > 0 (no device sync to check it)
    return canvas
