"""Matting: what a background-removal user gets from a cascade's prediction. The alpha (hard: the
mask; soft: the car's edge semi-transparent as the probability says), and the picture: the cutout
(RGBA), the alpha alone or the photo composited on a flat colour, optionally cropped to the car's
box. `carvana cutout` and `carvana serve` both make their pictures here."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from common.boxes import Box
from common.prediction.step import Prediction

Picture = Literal["rgba", "mask", "composite"]

EDGE_BAND = 2  # pixels either side of the mask's boundary where a soft alpha follows the probability


def alpha(pred: Prediction, threshold: float, soft: bool = True, band: int = EDGE_BAND) -> torch.Tensor:
    """uint8 (H, W) alpha of a prediction, on its device: 255 on the mask (`Prediction.mask`), 0 off it.
    Soft: within `band` pixels of the mask's boundary it ramps with the probability, 128-255 on the
    mask and 0-127 off it, so alpha >= 128 is exactly the mask; away from the band noise in the
    probability never makes the body or the studio see-through."""
    mask = pred.mask(threshold)
    m = mask[None, None].float()
    if not soft:
        return m[0, 0].to(torch.uint8) * 255
    grown = F.max_pool2d(m, 2 * band + 1, stride=1, padding=band)[0, 0] > 0
    shrunk = -F.max_pool2d(-m, 2 * band + 1, stride=1, padding=band)[0, 0] > 0  # erosion; the border pads ignored
    p = pred.prob.float().clamp(0, 1)
    ramp = torch.where(mask, 128 + torch.floor(127 * (p - threshold) / max(1 - threshold, 1e-6)),
                       torch.floor(127 * p / max(threshold, 1e-6))).clamp(0, 255)
    return torch.where(grown & ~shrunk, ramp, m[0, 0] * 255).to(torch.uint8)


def composite_on(rgb: np.ndarray, alpha: np.ndarray, colour: tuple) -> np.ndarray:
    """The photo over a flat colour: straight (not premultiplied) alpha, so edge pixels keep the
    photo's colour mixed with the new background, never darkened."""
    a = alpha[..., None].astype(np.float32) / 255
    return np.rint(rgb * a + np.array(colour[:3], np.float32) * (1 - a)).astype(np.uint8)


def picture(rgb: np.ndarray, alpha: np.ndarray, kind: Picture, colour: tuple = (255, 255, 255), box: Box | None = None) -> np.ndarray:
    """rgba: the photo's pixels with the alpha as a fourth channel (the cutout); mask: the alpha alone;
    composite: the photo over `colour`. With `box`, cropped to it."""
    if box is not None:
        x0, y0, x1, y1 = box
        rgb, alpha = rgb[y0:y1, x0:x1], alpha[y0:y1, x0:x1]
    if kind == "mask":
        return alpha
    return composite_on(rgb, alpha, colour) if kind == "composite" else np.dstack([rgb, alpha])
