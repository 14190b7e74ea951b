"""Synthetic Carvana-like data: the embedded default, written in the Kaggle layout.

Each car is a few parametric 3-D-ish parts (body, cabin with windows, wheels, mirrors, antenna)
seen from 16 turntable angles in front of a studio background (bright wall with a large dark
logo, grey turntable floor, soft shadow). Thin parts (a 2-4 px antenna, a few-pixel gap between
mirror and cabin) are deliberately below what a 256-px model can resolve, and some cars run off
the left/right image edge, as 2.3% of real ones do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from PIL import Image
from skimage.draw import ellipse, polygon

from common.data.rle import rle_encode
from common.io import atomic_path, write_csv, write_text

WIDTH, HEIGHT = 1918, 1280
ANGLES = 16
COLOURS = [
    (20, 20, 24),
    (235, 235, 238),
    (170, 172, 178),
    (150, 20, 25),
    (25, 45, 120),
    (95, 98, 105),
    (30, 70, 45),
    (200, 160, 60),
]


def car_params(seed: int, index: int) -> dict:
    rng = np.random.default_rng([seed, index])
    edge = index % 5 == 2  # some cars reach the image edge in side views
    base = np.array(COLOURS[rng.integers(len(COLOURS))], float)
    return {
        "id": f"{int(rng.integers(16**12)):012x}",
        "colour": np.clip(base + rng.normal(0, 8, 3), 0, 255),
        "length": rng.uniform(1880, 1990) if edge else rng.uniform(1300, 1720),
        "width": rng.uniform(540, 690),
        "body_h": rng.uniform(190, 250),
        "cabin_h": rng.uniform(150, 200),
        "cabin_len": rng.uniform(0.45, 0.6),
        "wheel_r": rng.uniform(72, 98),
        "clearance": rng.uniform(0.55, 0.8),  # body bottom above ground, in wheel radii
        "ground": rng.uniform(960, 1020),
        "shift": (rng.choice([-1, 1]) * rng.uniform(40, 90)) if edge else rng.uniform(-40, 40),
        "antenna_w": int(rng.integers(2, 5)),
        "antenna_h": rng.uniform(50, 110),
        "mirror_gap": int(rng.integers(3, 7)),
    }


def _background(rng: np.random.Generator) -> np.ndarray:
    y = np.arange(HEIGHT, dtype=np.float32)[:, None, None]
    x = np.arange(WIDTH, dtype=np.float32)[None, :, None]
    horizon = 0.30 * HEIGHT
    wall = 246 - 14 * np.abs(x - WIDTH / 2) / WIDTH - 10 * (y / horizon)
    floor = 188 + 18 * (y - horizon) / (HEIGHT - horizon) + np.zeros_like(x)
    img = np.where(y < horizon, wall, floor) * np.ones(3, np.float32)
    tint = rng.uniform(-4, 4, 3).astype(np.float32)
    img += tint
    # turntable: a slightly darker ellipse with a bright rim
    rr, cc = ellipse(0.62 * HEIGHT, WIDTH / 2, 0.31 * HEIGHT, 0.49 * WIDTH, shape=(HEIGHT, WIDTH))
    img[rr, cc] -= 10
    # logo: big dark letter-like blocks on the wall
    grey = np.array([92, 92, 98], np.float32) + rng.uniform(-6, 6)
    top, bottom, step = 0.07 * HEIGHT, 0.27 * HEIGHT, WIDTH / 7.4
    for k in range(7):
        x0 = 0.02 * WIDTH + k * step
        if k % 2:  # an "A": triangle with a hole
            shapes = [([bottom, top, bottom], [x0, x0 + step * 0.4, x0 + step * 0.8])]
        else:  # a thick "C"/"R"-like block with a notch
            shapes = [
                ([top, top, bottom, bottom], [x0, x0 + step * 0.7, x0 + step * 0.7, x0]),
                ([top + 30, top + 30, bottom - 30, bottom - 30], [x0 + 28, x0 + step * 0.7, x0 + step * 0.7, x0 + 28]),
            ]
        rr, cc = polygon(*shapes[0], shape=(HEIGHT, WIDTH))
        img[rr, cc] = grey
        if len(shapes) > 1:
            rr, cc = polygon(*shapes[1], shape=(HEIGHT, WIDTH))
            img[rr, cc] = 240
    return img


def _soft_shadow(img: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> None:
    y0, y1 = int(max(cy - 3 * ry, 0)), int(min(cy + 3 * ry, HEIGHT))
    x0, x1 = int(max(cx - 1.3 * rx, 0)), int(min(cx + 1.3 * rx, WIDTH))
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
    img[y0:y1, x0:x1] *= (1 - 0.55 * np.exp(-((xx**2) ** 2) - yy**2))[..., None]


class _Canvas:
    """The image being drawn and its mask; a part painted out of the mask (a wheel arch) still shows."""

    def __init__(self, img: np.ndarray):
        self.img, self.mask = img, np.zeros((HEIGHT, WIDTH), bool)

    def paint(self, rr, cc, rgb, in_mask: bool = True) -> None:
        self.img[rr, cc] = rgb
        if in_mask:
            self.mask[rr, cc] = True


class _View:
    """Where one car's parts fall in one view: s, c are the sine and cosine of the view angle."""

    def __init__(self, p: dict, angle: int):
        theta = 2 * math.pi * (angle - 1) / ANGLES
        self.s, self.c = math.sin(theta), math.cos(theta)
        self.w = p["length"] * abs(self.s) + p["width"] * abs(self.c)
        self.cx = WIDTH / 2 + p["shift"] * abs(self.s)
        self.ground = p["ground"]
        self.body_bottom = self.ground - p["clearance"] * p["wheel_r"]
        self.shoulder = self.body_bottom - p["body_h"]
        self.roof = self.shoulder - p["cabin_h"]
        self.front = np.sign(self.s) if abs(self.s) > 0.2 else 0  # which end is the hood in this view


def draw_view(p: dict, angle: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One view of one car: (uint8 HxWx3 image, bool HxW mask)."""
    rng = np.random.default_rng([seed, int(p["id"], 16) % 2**31, angle])
    v = _View(p, angle)
    canvas = _Canvas(_background(rng))
    _soft_shadow(canvas.img, v.cx, v.ground, 0.55 * v.w, 28)
    colour = p["colour"].astype(np.float32)
    _body(canvas, p, v, colour)
    _wheels(canvas, p, v, colour)
    _lights(canvas, p, v)
    ccx, cw, top_w = _cabin(canvas, p, v, colour, rng)
    _mirrors(canvas, p, v, colour, ccx, cw)
    _antenna(canvas, p, v, ccx, top_w)
    canvas.img += rng.normal(0, 2.5, (HEIGHT, WIDTH, 1)).astype(np.float32)
    return np.clip(canvas.img, 0, 255).astype(np.uint8), canvas.mask


def _body(canvas: _Canvas, p: dict, v: _View, colour: np.ndarray) -> None:
    """A rounded box, the hood lower towards the front in side views, with a highlight band and dark sills."""
    x0, x1 = v.cx - v.w / 2, v.cx + v.w / 2
    r = 0.35 * p["body_h"]
    hood_drop = 0.25 * p["body_h"] * abs(v.s)
    top_l = v.shoulder + (hood_drop if v.front < 0 else 0)
    top_r = v.shoulder + (hood_drop if v.front > 0 else 0)
    mid = v.cx + v.front * 0.12 * p["length"] * abs(v.s)  # where the hood starts to drop
    ys = [
        v.body_bottom,
        v.body_bottom,
        v.body_bottom - r,
        top_r + r * 0.5,
        top_r,
        v.shoulder,
        top_l,
        top_l + r * 0.5,
        v.body_bottom - r,
    ]
    xs = [x0 + r, x1 - r, x1, x1, x1 - r, mid, x0 + r, x0, x0]
    rr, cc = polygon(ys, xs, shape=(HEIGHT, WIDTH))
    canvas.paint(rr, cc, colour)
    band = (rr > v.shoulder + 0.15 * p["body_h"]) & (rr < v.shoulder + 0.3 * p["body_h"])
    canvas.img[rr[band], cc[band]] = np.clip(colour * 1.25 + 50, 0, 255)
    sill = rr > v.body_bottom - 0.22 * p["body_h"]
    canvas.img[rr[sill], cc[sill]] = colour * 0.6 + 30


def _wheels(canvas: _Canvas, p: dict, v: _View, colour: np.ndarray) -> None:
    """The near-side wheels in their arches: tyre and rim as ellipses squashed by the view."""
    wheel_r, shape = p["wheel_r"], (HEIGHT, WIDTH)
    for along in (-0.33, 0.33):
        for side in (-1, 1):
            wx = v.cx + along * p["length"] * v.s + side * 0.42 * p["width"] * v.c
            if side * v.c * v.s > 0.15:  # far side, hidden behind the body
                continue
            rx = max(wheel_r * abs(v.s), 0.35 * wheel_r)
            rr, cc = ellipse(v.ground - wheel_r, wx, 1.12 * wheel_r, 1.12 * rx, shape=shape)
            arch = rr < v.body_bottom
            canvas.paint(rr[arch], cc[arch], colour * 0.35)
            rr, cc = ellipse(v.ground - wheel_r, wx, wheel_r, rx, shape=shape)
            canvas.paint(rr, cc, np.float32([28, 28, 30]))
            rr, cc = ellipse(v.ground - wheel_r, wx, 0.55 * wheel_r, 0.55 * rx, shape=shape)
            canvas.paint(rr, cc, np.float32([150, 152, 158]))


def _lights(canvas: _Canvas, p: dict, v: _View) -> None:
    """Head or tail lights in front and back views."""
    if abs(v.c) <= 0.5:
        return
    light = np.float32([250, 245, 220]) if v.c > 0 else np.float32([200, 30, 30])
    for side in (-1, 1):
        lx = v.cx + side * 0.36 * p["width"] * abs(v.c)
        rr, cc = ellipse(v.shoulder + 0.35 * p["body_h"], lx, 18, 0.09 * p["width"] * abs(v.c), shape=(HEIGHT, WIDTH))
        canvas.paint(rr, cc, light)


def _cabin(
    canvas: _Canvas, p: dict, v: _View, colour: np.ndarray, rng: np.random.Generator
) -> tuple[float, float, float]:
    """A trapezoid with windows (diagonal reflections) and a B-pillar; returns its centre, base and top widths."""
    shape, L, Wd = (HEIGHT, WIDTH), p["length"], p["width"]
    cw = p["cabin_len"] * L * abs(v.s) + 0.86 * Wd * abs(v.c)
    ccx = v.cx - 0.06 * L * v.s
    top_w = cw * (0.72 if abs(v.s) < 0.5 else 0.6)
    rr, cc = polygon(
        [v.shoulder + 2, v.shoulder + 2, v.roof, v.roof],
        [ccx - cw / 2, ccx + cw / 2, ccx + top_w / 2, ccx - top_w / 2],
        shape=shape,
    )
    canvas.paint(rr, cc, colour * 0.9)
    glass = np.float32([40, 48, 58]) + rng.uniform(-8, 8)
    inset = 14
    win_y = [v.shoulder - 6, v.shoulder - 6, v.roof + inset, v.roof + inset]
    win_x = [ccx - cw / 2 + 2 * inset, ccx + cw / 2 - 2 * inset, ccx + top_w / 2 - inset, ccx - top_w / 2 + inset]
    rr, cc = polygon(win_y, win_x, shape=shape)
    canvas.paint(rr, cc, glass)
    refl = (cc - rr * 0.6) % 180 < 25  # diagonal reflections on the glass
    canvas.img[rr[refl], cc[refl]] = glass + 70
    if abs(v.s) > 0.5:  # B-pillar
        rr, cc = polygon([v.shoulder, v.shoulder, v.roof, v.roof], [ccx - 8, ccx + 8, ccx + 6, ccx - 6], shape=shape)
        canvas.paint(rr, cc, colour * 0.9)
    return ccx, cw, top_w


def _mirrors(canvas: _Canvas, p: dict, v: _View, colour: np.ndarray, ccx: float, cw: float) -> None:
    """A few pixels of background between mirror and cabin, joined by a thin stalk: a thin part to keep."""
    gap, my, shape = p["mirror_gap"], v.shoulder - 22, (HEIGHT, WIDTH)
    mirror_w, mirror_h = 34, 22
    if abs(v.c) > 0.38:
        sides = [(-1, ccx - cw / 2 + 6), (1, ccx + cw / 2 - 6)]
    else:
        fx = ccx + v.front * (cw / 2 - 0.1 * cw)
        sides = [(int(v.front), fx + v.front * 4)]
    for side, edge_x in sides:
        mx = edge_x + side * (gap + mirror_w)
        rr, cc = ellipse(my, mx, mirror_h, mirror_w, shape=shape)
        keep = side * (cc - edge_x) > gap  # keep the gap clear
        canvas.paint(rr[keep], cc[keep], colour * 0.8)
        stalk_x = sorted([edge_x, edge_x + side * (gap + 2)])
        rr, cc = polygon(
            [my + 8, my + 8, my + 11, my + 11], [stalk_x[0], stalk_x[1], stalk_x[1], stalk_x[0]], shape=shape
        )
        canvas.paint(rr, cc, colour * 0.8)


def _antenna(canvas: _Canvas, p: dict, v: _View, ccx: float, top_w: float) -> None:
    """2-4 px wide, near the rear of the roof, slanted backwards."""
    back = -v.front if v.front else 1
    ax = ccx + back * 0.3 * top_w
    aw, ah = p["antenna_w"], p["antenna_h"]
    tip = ax + back * 0.4 * ah
    rr, cc = polygon(
        [v.roof + 2, v.roof + 2, v.roof - ah, v.roof - ah], [ax, ax + aw, tip + aw, tip], shape=(HEIGHT, WIDTH)
    )
    canvas.paint(rr, cc, np.float32([25, 25, 25]))


def _write_view(p: dict, angle: int, seed: int, image_dir: Path, mask_dir: Path | None) -> tuple[str, str]:
    img, mask = draw_view(p, angle, seed)
    name = f"{p['id']}_{angle:02d}"
    with atomic_path(image_dir / f"{name}.jpg") as tmp:
        Image.fromarray(img).save(tmp, format="JPEG", quality=92)
    if mask_dir is not None:
        gif = Image.fromarray(mask.view(np.uint8), mode="L").convert("P")
        with atomic_path(mask_dir / f"{name}_mask.gif") as tmp:
            gif.save(tmp, format="GIF")
    return f"{name}.jpg", rle_encode(mask)


def write_sample_data(out: str | Path, cars: int = 6, test_cars: int = 2, seed: int = 0, jobs: int = -1) -> Path:
    """Write a complete Kaggle-layout data set to `out`; returns `out`."""
    out = Path(out)
    train_cars = [car_params(seed, i) for i in range(cars)]
    test = [car_params(seed, cars + i) for i in range(test_cars)]
    jobs_list = [(p, a, out / "train", out / "train_masks") for p in train_cars for a in range(1, ANGLES + 1)]
    jobs_list += [(p, a, out / "test", None) for p in test for a in range(1, ANGLES + 1)]
    for folder in ("train", "train_masks", "test"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = Parallel(n_jobs=jobs)(delayed(_write_view)(p, a, seed, i, m) for p, a, i, m in jobs_list)
    n_train = len(train_cars) * ANGLES
    write_csv(out / "train_masks.csv", pd.DataFrame(rows[:n_train], columns=["img", "rle_mask"]))
    write_csv(out / "sample_submission.csv", pd.DataFrame({"img": [r[0] for r in rows[n_train:]], "rle_mask": "1 1"}))
    makes = ["Acme", "Borealis", "Cirrus", "Dynamo"]
    meta = [
        {
            "id": p["id"],
            "year": 2010 + i % 8,
            "make": makes[i % 4],
            "model": f"Model {i % 3 + 1}",
            "trim1": "",
            "trim2": "",
        }
        for i, p in enumerate(train_cars + test)
    ]
    write_csv(out / "metadata.csv", pd.DataFrame(meta))
    # what a bundle's model card reads to say its nets learned synthetic cars only
    write_text(
        out / "synthetic.json",
        json.dumps({"generator": "carvana sample-data", "cars": cars, "test_cars": test_cars, "seed": seed}),
    )
    return out
