"""Clean edges (`matting.foreground`) on the real samples: how far the soft edge's colour leans toward
the studio the car was photographed in, before (the photo's own pixels, `clean=False`) and after, and
what it costs per photo, against the naive picture measured in the same process.

Fringe: the 512x512 real pairs of ../shared/carvana_samples/train_512 (every `every`-th). Their alpha is
`matting.alpha` of a soft probability made from the true mask (a 3x3 box blur of it: a real photo's
boundary with the band `carvana cutout` draws). For each soft pixel (0 < alpha < 255) whose 15x15 window
holds known car (alpha 255) and known studio (alpha 0) at least 30 levels apart: f and b, their mean
colours in the photo; the lean of the cutout's colour C, t = (C - f).(b - f) / |b - f|^2 (0: the car's
colour, 1: the studio's); the visible fringe, alpha * t * |b - f|: levels of the old studio a composite
shows there. Printed: the means over all such pixels. With --pymatting, pymatting's
estimate_foreground_ml on the same band too (not a dependency: install it to compare).

Cost: the 32 full-resolution (1918x1280) photos of test_fullres. No true masks exist for them, so each
gets the true mask of the same angle of a train_512 car scaled to 1918x1280: a car-shaped band of
full-resolution length (the cost follows the band, not its fit). Median and best ms per photo over
`rounds`, the variants alternating photo by photo, with torch's threads as in the commands unless given (on a shared
machine other processes' spinning threads can slow torch's small parallel ops many times over: the best
is the cost undisturbed).

    .venv/bin/python benchmarks/bench_matting.py [every=4] [rounds=3] [torch threads] [--pymatting]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault(
    "THP_MEM_ALLOC_ENABLE", "1"
)  # before torch's first allocation, as every carvana command (pipelines/cli.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from common.data.images import read_image, read_mask  # noqa: E402
from common.prediction.step import Prediction  # noqa: E402
from pipelines.matting import alpha, foreground  # noqa: E402
from pipelines.picture import Cut, Picture, render  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "carvana_samples"
WINDOW, CONTRAST = 15, 30  # the fringe's neighbourhood and the least car-studio difference, in levels

Clean = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (photo, alpha) -> the cutout's colours


def soft_alpha(mask: np.ndarray) -> np.ndarray:
    """The band `carvana cutout` draws, on a true boundary: matting.alpha of the mask blurred 3x3."""
    prob = F.avg_pool2d(torch.from_numpy(mask).float()[None, None], 3, stride=1, padding=1, count_include_pad=False)[
        0, 0
    ]
    h, w = mask.shape
    return alpha(Prediction(w, h, (0, 0, w, h), True, None, prob), 0.5).numpy()


def _box_mean(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x[None], WINDOW, stride=1, padding=WINDOW // 2, count_include_pad=False)[0]


def fringe(colours: np.ndarray, photo: np.ndarray, a: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per measured soft pixel: the lean t toward the studio and the visible fringe in levels (see above)."""
    image, c = (torch.from_numpy(x).permute(2, 0, 1).float() for x in (photo, colours))
    a = torch.from_numpy(a).float()[None]
    car, studio = (a == 255).float(), (a == 0).float()
    ncar, nstudio = _box_mean(car), _box_mean(studio)
    f, b = _box_mean(image * car) / ncar.clamp_min(1e-9), _box_mean(image * studio) / nstudio.clamp_min(1e-9)
    d = b - f
    length = d.norm(dim=0)
    t = ((c - f) * d).sum(0) / length.clamp_min(1e-9) ** 2
    soft = ((a > 0) & (a < 255))[0] & (ncar[0] > 0) & (nstudio[0] > 0) & (length >= CONTRAST)
    return t[soft], (a[0] / 255 * t * length)[soft]


def ours(photo: np.ndarray, a: np.ndarray) -> np.ndarray:
    return foreground(torch.from_numpy(photo), torch.from_numpy(a)).numpy()


def pymatting() -> Clean:
    from pymatting import estimate_foreground_ml

    def clean(photo: np.ndarray, a: np.ndarray) -> np.ndarray:
        soft = (a > 0) & (a < 255)
        out = photo.copy()
        out[soft] = np.rint(255 * estimate_foreground_ml(photo / 255.0, a / 255.0).clip(0, 1))[soft].astype(np.uint8)
        return out  # the same pixels changed as ours: only the band

    return clean


def quality(every: int, methods: dict[str, Clean]) -> None:
    photos = sorted((SAMPLES / "train_512" / "train").glob("*.jpg"))[::every]
    leans: dict[str, list] = {name: [] for name in methods}
    fringes: dict[str, list] = {name: [] for name in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for path in photos:
        photo = read_image(path)
        a = soft_alpha(read_mask(SAMPLES / "train_512" / "train_masks" / f"{path.stem}_mask.gif"))
        for name, clean in methods.items():
            started = time.perf_counter()
            colours = clean(photo, a)
            seconds[name] += time.perf_counter() - started
            t, v = fringe(colours, photo, a)
            leans[name].append(t)
            fringes[name].append(v)
    print(f"fringe: {len(photos)} real 512x512 photos, {len(torch.cat(leans['naive']))} soft pixels measured")
    print(f"{'method':12} {'lean':>6} {'|lean|':>7} {'visible fringe':>15} {'ms/photo':>9}")
    base = torch.cat(fringes["naive"]).mean()
    for name in methods:
        t, v = torch.cat(leans[name]), torch.cat(fringes[name])
        print(
            f"{name:12} {t.mean():6.3f} {t.abs().mean():7.3f} {v.mean():8.2f} levels "
            f"{1000 * seconds[name] / len(photos):9.1f}   fringe x{v.mean() / base:.2f} of naive"
        )


def cost(rounds: int) -> None:
    photos = sorted((SAMPLES / "test_fullres").glob("*.jpg"))
    masks = sorted((SAMPLES / "train_512" / "train_masks").glob("*.gif"))
    work = []
    for path in photos:
        rgb = read_image(path)
        angle = path.stem.split("_")[1]
        mask = next(m for m in masks if m.stem.split("_")[1] == angle)
        big = np.array(Image.fromarray(read_mask(mask)).resize(rgb.shape[1::-1], Image.NEAREST))
        work.append((rgb, soft_alpha(big)))

    def cut(
        rgb: np.ndarray, a: np.ndarray
    ) -> Cut:  # a new cut each call: a cut keeps its clean edge for its next picture
        return Cut(rgb, a >= 128, a, (0, 0, rgb.shape[1], rgb.shape[0]), True)

    def png(rgb: np.ndarray, a: np.ndarray) -> None:
        render(cut(rgb, a), Picture("rgba", clean_edges=False), fast=True)

    variants: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
        "rgba naive": lambda rgb, a: cut(rgb, a).pixels(Picture("rgba", clean_edges=False)),
        "rgba clean": lambda rgb, a: cut(rgb, a).pixels(Picture("rgba")),
        "composite naive": lambda rgb, a: cut(rgb, a).pixels(Picture("composite", clean_edges=False)),
        "composite clean": lambda rgb, a: cut(rgb, a).pixels(Picture("composite")),
        "foreground alone": ours,
        "rgba naive + PNG encode (level 1)": png,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        names = (
            list(variants)[r % len(variants) :] + list(variants)[: r % len(variants)]
        )  # the order rotated each round
        for rgb, a in work:
            for name in names:
                started = time.perf_counter()
                variants[name](rgb, a)
                times[name].append(time.perf_counter() - started)
    soft = np.mean([((a > 0) & (a < 255)).sum() for _, a in work])
    print(
        f"\ncost: {len(work)} photos 1918x1280, {soft:.0f} soft pixels each on average, {rounds} rounds, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'picture':22} {'median ms':>10} {'vs naive':>9} {'best ms':>8} {'vs naive':>9}")
    for name, t in times.items():
        naive = times[name.replace("clean", "naive")] if name.endswith("clean") else None
        row = f"{name:22}"
        for stat in (statistics.median, min):
            ms = 1000 * stat(t)
            row += (
                f" {ms:{10 if stat is statistics.median else 8}.1f} "
                f"{f'{ms / (1000 * stat(naive)):.2f}x' if naive else '':>9}"
            )
        print(row)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    every, rounds = (int(args[0]) if args else 4), (int(args[1]) if len(args) > 1 else 3)
    if len(args) > 2:
        torch.set_num_threads(int(args[2]))
    methods: dict[str, Clean] = {"naive": lambda photo, a: photo, "clean": ours}
    if "--pymatting" in sys.argv:
        methods["pymatting"] = pymatting()
    quality(every, methods)
    cost(rounds)
