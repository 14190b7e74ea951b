"""The band: where stage 1 may be wrong, and the patches that cover it (`stage2.refine: band`).

Stage 1's mistakes sit at the car's outline (docs/experiments/2026-11-stage1-recipe-search.md: 90% of
its wrong pixels within 3 px of the true boundary at 512 px). So instead of two tiles over the whole
box, the refiner can look at the band alone: the pixels within `stage2.band` px of stage 1's 0.5
contour, and every pixel whose probability is uncertain. The image is cut into a grid of cells of
`stage2.patch - 2 * stage2.context` px; each cell holding a band pixel becomes one patch: the cell
(its centre region, whose prediction is kept) with `stage2.context` px of context around it, moved
inside the image where it would leave it. Planning is a pure function of the occupied cells
(property-tested); the band (from a summed-area table, whatever its width) and the cells are found on
the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from common.boxes import Box
from stage2_fullres.tiles import Window, clamp_start

UNCERTAIN = 0.1  # a probability within 0.5 +- (0.5 - UNCERTAIN) is in the band wherever it lies
# Patches planned for one image at most: a car's outline needs a few dozen at the defaults; thousands
# come from a stage 1 that sees noise everywhere, and would hold gigabytes of patches in memory
MAX_PATCHES = 2048


class TooManyPatches(ValueError):
    """The band of this image needs more than MAX_PATCHES patches; the message names the settings. The
    image's failure, not the settings' (they serve every other image): the cascade turns it into that
    image's `Failure`."""


def core_of(patch: int, context: int) -> int:
    """The side of a patch's centre region: the grid's cell."""
    return patch - 2 * context


def band_of(coarse: torch.Tensor, box: Box, band: int) -> torch.Tensor:
    """bool (H, W): the pixels of `box` within `band` px (Chebyshev distance) of the 0.5 contour of the
    full-resolution stage-1 probability `coarse` (a (2 band + 1)-square around the pixel holds both car and
    background), and those whose probability is uncertain; on `coarse`'s device."""
    x0, y0, x1, y1 = box
    inside = coarse[y0:y1, x0:x1]
    car = inside > 0.5
    cars, pixels = _square_sums(car, band)
    near = (cars > 0) & (cars < pixels)
    unsure = (inside > UNCERTAIN) & (inside < 1 - UNCERTAIN)
    out = torch.zeros_like(coarse, dtype=torch.bool)
    out[y0:y1, x0:x1] = near | unsure
    return out


def _square_sums(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pixel of a bool (H, W) map, the count of True pixels in the (2r+1)-square around it and
    the pixels of that square, clipped to the map: four reads of a summed-area table, whatever r (a
    max-pool of that size reads every pixel of the square)."""
    table = F.pad(x.cumsum(0).cumsum(1), (1, 0, 1, 0))  # table[i, j] = sum of x[:i, :j] (int64: cumsum's)
    h, w = x.shape
    top = (torch.arange(h, device=x.device) - r).clamp(0, h)
    bottom = (torch.arange(h, device=x.device) + r + 1).clamp(0, h)
    left = (torch.arange(w, device=x.device) - r).clamp(0, w)
    right = (torch.arange(w, device=x.device) + r + 1).clamp(0, w)
    rows_b, rows_t = table[bottom], table[top]
    counts = rows_b[:, right] - rows_t[:, right] - rows_b[:, left] + rows_t[:, left]
    return counts, (bottom - top)[:, None] * (right - left)[None, :]


def occupied_cells(band: torch.Tensor, cell: int) -> torch.Tensor:
    """bool (ceil(H / cell), ceil(W / cell)): which cells of the grid hold a band pixel."""
    h, w = band.shape
    padded = F.pad(band[None, None].float(), (0, -w % cell, 0, -h % cell))
    return F.max_pool2d(padded, cell)[0, 0] > 0


class Patch(NamedTuple):
    window: Window  # patch x patch: what the refiner sees
    cores: tuple[Window, ...]  # the cells inside it whose prediction is kept (several where windows met at an edge)


def plan_patches(occupied: np.ndarray, width: int, height: int, patch: int, context: int) -> list[Patch]:
    """The patches covering the occupied cells, row by row: each cell (clipped to the image) with `context`
    px around it, a patch x patch window moved inside the image where it would leave it (along an axis
    shorter than the patch it starts at 0 and the image is reflect-padded, as for tiles); cells whose
    windows would be the same share one patch. TooManyPatches beyond MAX_PATCHES."""
    cell = core_of(patch, context)
    cores: dict[Window, list[Window]] = {}
    for r, c in zip(*np.nonzero(occupied), strict=True):
        core = (int(c) * cell, int(r) * cell, min((int(c) + 1) * cell, width), min((int(r) + 1) * cell, height))
        x, y = clamp_start(core[0] - context, width, patch), clamp_start(core[1] - context, height, patch)
        cores.setdefault((x, y, x + patch, y + patch), []).append(core)
    if len(cores) > MAX_PATCHES:
        raise TooManyPatches(
            f"stage2.band with stage2.patch={patch} and stage2.context={context} needs {len(cores)} patches for this "
            f"{width}x{height} image, more than the {MAX_PATCHES} allowed per image (stage 1 sees no clear outline); "
            "raise stage2.patch or lower stage2.band"
        )
    return [Patch(window, tuple(kept)) for window, kept in cores.items()]


def patches_per_pass(batch_size: int, tile: int, patch: int) -> int:
    """Patches in one forward pass: `predict.batch_size` tiles' worth of pixels."""
    return max(1, batch_size * math.floor(tile / patch) ** 2)
