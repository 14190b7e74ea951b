"""The Kaggle run-length encoding of a mask: 1-based (start, length) pairs over the row-major
pixels; the empty mask is the empty string."""

from __future__ import annotations

import numpy as np


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask; the empty mask is the empty string.

    Works on the bytes of the mask (uint8 comparison, then flatnonzero): about three times
    faster than the textbook pad/diff/where kernel (see benchmarks/bench_rle.py).
    """
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1).view(np.uint8)
    if flat.size == 0:
        return ""
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        edges = np.concatenate(([0], edges))
    if flat[-1]:
        edges = np.concatenate((edges, [flat.size]))
    edges[1::2] -= edges[::2]
    edges[::2] += 1
    return " ".join(map(str, edges.tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode to a bool mask of `shape` (height, width); raises ValueError on malformed runs."""
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    if not isinstance(rle, str) or not rle.strip():
        return mask.reshape(shape)
    numbers = np.array(rle.split(), dtype=np.int64)
    if numbers.size % 2:
        raise ValueError(f"RLE has an odd number of values ({numbers.size})")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > mask.size).any():
        raise ValueError(f"RLE runs fall outside a mask of shape {shape}")
    for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        mask[s : s + n] = True
    return mask.reshape(shape)
