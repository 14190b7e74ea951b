"""Car boxes as (x0, y0, x1, y1) in pixels, x1/y1 exclusive; pure functions, property-tested."""

from __future__ import annotations

import math

import numpy as np
from skimage.measure import label

Box = tuple[int, int, int, int]


def mask_extent(mask: np.ndarray) -> Box | None:
    """The tight box around all True pixels, or None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component: stray blobs on the wall or floor do not widen the box."""
    labels = label(mask, connectivity=2)
    if labels.max() <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def scale_box(box: Box, sx: float, sy: float) -> Box:
    """Map a box between resolutions, rounding outwards so the scaled box still covers the object."""
    x0, y0, x1, y1 = box
    return math.floor(x0 * sx), math.floor(y0 * sy), math.ceil(x1 * sx), math.ceil(y1 * sy)


Margin = int | tuple[int, int, int, int] | list[int]  # one for every side, or (left, top, right, bottom)


def expand_box(box: Box, margin: Margin, width: int, height: int) -> Box:
    """Grow each side by its margin, clamped to the image."""
    left, top, right, bottom = (margin,) * 4 if isinstance(margin, int) else margin
    x0, y0, x1, y1 = box
    return max(x0 - left, 0), max(y0 - top, 0), min(x1 + right, width), min(y1 + bottom, height)


def jitter_box(box: Box, amount: int, rng: np.random.Generator, width: int, height: int) -> Box:
    """Move each side by up to `amount` pixels, as stage-1 boxes are off by in practice."""
    x0, y0, x1, y1 = (int(v) for v in np.asarray(box) + rng.integers(-amount, amount + 1, 4))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
