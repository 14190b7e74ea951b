"""RLE encoding of full-resolution (1280x1918) masks: project kernel vs the textbook numpy kernel."""

from __future__ import annotations

import time

import numpy as np
from skimage.draw import ellipse

from common.data.rle import rle_encode


def textbook(mask: np.ndarray) -> str:
    p = np.concatenate([[0], mask.ravel(), [0]])
    runs = np.where(p[1:] != p[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def masks() -> dict[str, np.ndarray]:
    car = np.zeros((1280, 1918), bool)
    rr, cc = ellipse(700, 959, 260, 780, shape=car.shape)
    car[rr, cc] = True
    ragged = car.copy()
    ragged[300:1000:5, 200:1700] ^= True  # many runs per row: a worst case for string building
    return {"car (1 run/row)": car, "ragged (many runs)": ragged, "empty": np.zeros_like(car)}


def best_of(fn, arg, repeat: int = 30) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


if __name__ == "__main__":
    print(f"{'mask':22} {'textbook ms':>12} {'project ms':>11} {'speed-up':>9}")
    for name, m in masks().items():
        assert rle_encode(m) == textbook(m)
        a, b = best_of(textbook, m), best_of(rle_encode, m)
        print(f"{name:22} {a:12.3f} {b:11.3f} {a / b:8.1f}x")
