"""Reading a 1918x1280 JPEG at stage-1 size: decoder downscaling (PIL draft) vs decode then resize."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.images import read_image

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "carvana_samples" / "test_fullres"


def decode_then_resize(path: Path, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(read_image(path)).resize(size, Image.BILINEAR))


def best_of(fn, *args, repeat: int = 10) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def sample_images() -> list[Path]:
    if REAL.is_dir():
        return sorted(REAL.glob("*.jpg"))[:4]
    from common.data.synth import car_params, draw_view

    tmp = Path(tempfile.mkdtemp())
    paths = []
    for angle in (1, 5):
        img, _ = draw_view(car_params(0, 0), angle, 0)
        Image.fromarray(img).save(tmp / f"{angle}.jpg", quality=92)
        paths.append(tmp / f"{angle}.jpg")
    return paths


if __name__ == "__main__":
    paths = sample_images()
    print(f"images: {len(paths)} from {paths[0].parent}", file=sys.stderr)
    print(f"{'target':>10} {'decode+resize ms':>17} {'draft ms':>9} {'speed-up':>9}")
    for size in [(256, 256), (512, 512), (1024, 1024)]:
        a = np.mean([best_of(decode_then_resize, p, size) for p in paths])
        b = np.mean([best_of(read_image, p, size) for p in paths])
        print(f"{size[0]}x{size[1]:<5} {a:17.1f} {b:9.1f} {a / b:8.1f}x")
