"""Synthetic Carvana-like data: the embedded default, written in the Kaggle layout.

Each car is a few parametric 3-D-ish parts (body, cabin with windows, wheels, mirrors, antenna)
seen from 16 turntable angles in front of a studio background (bright wall with a large dark
logo, grey turntable floor, soft shadow). Thin parts (a 2-4 px antenna, a few-pixel gap between
mirror and cabin) are deliberately below what a 256-px model can resolve, and some cars run off
the left/right image edge, as 2.3% of real ones do.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from PIL import Image
from skimage.draw import ellipse, polygon

from common.io import atomic_path, write_csv
from common.rle import rle_encode

WIDTH, HEIGHT = 1918, 1280
ANGLES = 16
COLOURS = [(20, 20, 24), (235, 235, 238), (170, 172, 178), (150, 20, 25), (25, 45, 120), (95, 98, 105), (30, 70, 45), (200, 160, 60)]


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
            shapes = [([top, top, bottom, bottom], [x0, x0 + step * 0.7, x0 + step * 0.7, x0]),
                      ([top + 30, top + 30, bottom - 30, bottom - 30], [x0 + 28, x0 + step * 0.7, x0 + step * 0.7, x0 + 28])]
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
    img[y0:y1, x0:x1] *= (1 - 0.55 * np.exp(-(xx**2) ** 2 - yy**2))[..., None]


def render(p: dict, angle: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One view of one car: (uint8 HxWx3 image, bool HxW mask)."""
    rng = np.random.default_rng([seed, int(p["id"], 16) % 2**31, angle])
    theta = 2 * math.pi * (angle - 1) / ANGLES
    s, c = math.sin(theta), math.cos(theta)
    L, Wd = p["length"], p["width"]
    w = L * abs(s) + Wd * abs(c)
    cx = WIDTH / 2 + p["shift"] * abs(s)
    ground = p["ground"]
    body_bottom = ground - p["clearance"] * p["wheel_r"]
    shoulder = body_bottom - p["body_h"]
    roof = shoulder - p["cabin_h"]
    shape = (HEIGHT, WIDTH)
    img = _background(rng)
    _soft_shadow(img, cx, ground, 0.55 * w, 28)
    mask = np.zeros(shape, bool)
    colour = p["colour"].astype(np.float32)

    def paint(rr, cc, rgb, in_mask=True):
        img[rr, cc] = rgb
        if in_mask:
            mask[rr, cc] = True

    # body: a rounded box, hood lower towards the front in side views
    x0, x1 = cx - w / 2, cx + w / 2
    r = 0.35 * p["body_h"]
    front = np.sign(s) if abs(s) > 0.2 else 0  # which end is the hood in this view
    hood_drop = 0.25 * p["body_h"] * abs(s)
    top_l = shoulder + (hood_drop if front < 0 else 0)
    top_r = shoulder + (hood_drop if front > 0 else 0)
    mid = cx + front * 0.12 * L * abs(s)  # where the hood starts to drop
    ys = [body_bottom, body_bottom, body_bottom - r, top_r + r * 0.5, top_r, shoulder, top_l, top_l + r * 0.5, body_bottom - r]
    xs = [x0 + r, x1 - r, x1, x1, x1 - r, mid, x0 + r, x0, x0]
    rr, cc = polygon(ys, xs, shape=shape)
    paint(rr, cc, colour)
    # shading: bright highlight band along the shoulder, darker sills reflecting the floor
    band = (rr > shoulder + 0.15 * p["body_h"]) & (rr < shoulder + 0.3 * p["body_h"])
    img[rr[band], cc[band]] = np.clip(colour * 1.25 + 50, 0, 255)
    sill = rr > body_bottom - 0.22 * p["body_h"]
    img[rr[sill], cc[sill]] = colour * 0.6 + 30
    # wheels in their arches
    wheel_r = p["wheel_r"]
    for along in (-0.33, 0.33):
        for side in (-1, 1):
            wx = cx + along * L * s + side * 0.42 * Wd * c
            if side * c * s > 0.15:  # far side, hidden behind the body
                continue
            rx = max(wheel_r * abs(s), 0.35 * wheel_r)
            rr, cc = ellipse(ground - wheel_r, wx, 1.12 * wheel_r, 1.12 * rx, shape=shape)
            arch = rr < body_bottom
            paint(rr[arch], cc[arch], colour * 0.35)
            rr, cc = ellipse(ground - wheel_r, wx, wheel_r, rx, shape=shape)
            paint(rr, cc, np.float32([28, 28, 30]))
            rr, cc = ellipse(ground - wheel_r, wx, 0.55 * wheel_r, 0.55 * rx, shape=shape)
            paint(rr, cc, np.float32([150, 152, 158]))
    # lights in front/back views
    if abs(c) > 0.5:
        light = np.float32([250, 245, 220]) if c > 0 else np.float32([200, 30, 30])
        for side in (-1, 1):
            lx = cx + side * 0.36 * Wd * abs(c)
            rr, cc = ellipse(shoulder + 0.35 * p["body_h"], lx, 18, 0.09 * Wd * abs(c), shape=shape)
            paint(rr, cc, light)
    # cabin (trapezoid) with windows
    offset = -0.06 * L * s
    cw = p["cabin_len"] * L * abs(s) + 0.86 * Wd * abs(c)
    ccx = cx + offset
    top_w = cw * (0.72 if abs(s) < 0.5 else 0.6)
    cab_y = [shoulder + 2, shoulder + 2, roof, roof]
    cab_x = [ccx - cw / 2, ccx + cw / 2, ccx + top_w / 2, ccx - top_w / 2]
    rr, cc = polygon(cab_y, cab_x, shape=shape)
    paint(rr, cc, colour * 0.9)
    glass = np.float32([40, 48, 58]) + rng.uniform(-8, 8)
    inset = 14
    win_y = [shoulder - 6, shoulder - 6, roof + inset, roof + inset]
    win_x = [ccx - cw / 2 + 2 * inset, ccx + cw / 2 - 2 * inset, ccx + top_w / 2 - inset, ccx - top_w / 2 + inset]
    rr, cc = polygon(win_y, win_x, shape=shape)
    paint(rr, cc, glass)
    refl = (cc - rr * 0.6) % 180 < 25  # diagonal reflections on the glass
    img[rr[refl], cc[refl]] = glass + 70
    if abs(s) > 0.5:  # B-pillar
        rr, cc = polygon([shoulder, shoulder, roof, roof], [ccx - 8, ccx + 8, ccx + 6, ccx - 6], shape=shape)
        paint(rr, cc, colour * 0.9)
    # mirrors: a few pixels of background between mirror and cabin, joined by a thin stalk
    gap, my = p["mirror_gap"], shoulder - 22
    mirror_w, mirror_h = 34, 22
    if abs(c) > 0.38:
        sides = [(-1, ccx - cw / 2 + 6), (1, ccx + cw / 2 - 6)]
    else:
        fx = ccx + front * (cw / 2 - 0.1 * cw)
        sides = [(int(front), fx + front * 4)]
    for side, edge_x in sides:
        mx = edge_x + side * (gap + mirror_w)
        rr, cc = ellipse(my, mx, mirror_h, mirror_w, shape=shape)
        keep = side * (cc - edge_x) > gap  # keep the gap clear
        paint(rr[keep], cc[keep], colour * 0.8)
        stalk_x = sorted([edge_x, edge_x + side * (gap + 2)])
        rr, cc = polygon([my + 8, my + 8, my + 11, my + 11], [stalk_x[0], stalk_x[1], stalk_x[1], stalk_x[0]], shape=shape)
        paint(rr, cc, colour * 0.8)
    # antenna: 2-4 px wide, near the rear of the roof, slanted backwards
    back = -front if front else 1
    ax = ccx + back * 0.3 * top_w
    aw, ah = p["antenna_w"], p["antenna_h"]
    tip = ax + back * 0.4 * ah
    rr, cc = polygon([roof + 2, roof + 2, roof - ah, roof - ah], [ax, ax + aw, tip + aw, tip], shape=shape)
    paint(rr, cc, np.float32([25, 25, 25]))
    img += rng.normal(0, 2.5, (HEIGHT, WIDTH, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _write_view(p: dict, angle: int, seed: int, image_dir: Path, mask_dir: Path | None) -> tuple[str, str]:
    img, mask = render(p, angle, seed)
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
    meta = [{"id": p["id"], "year": 2010 + i % 8, "make": makes[i % 4], "model": f"Model {i % 3 + 1}", "trim1": "", "trim2": ""}
            for i, p in enumerate(train_cars + test)]
    write_csv(out / "metadata.csv", pd.DataFrame(meta))
    return out
