"""Matting: the pixels a background-removal user gets from a cascade's prediction. The alpha (hard:
the mask; soft: the car's edge semi-transparent as the probability says), the car's own colour in that
soft edge (`foreground`) and the composite on a flat colour. pipelines/picture.py puts them together
into the picture a user asked for."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.prediction.step import Prediction

EDGE_BAND = 2  # pixels either side of the mask's boundary where a soft alpha follows the probability
# blur fusion's windows (Forte and Pitie 2021 use 90 and 6 px): the wide one holds car and studio for a
# rough mean of each; the narrow one reaches the opaque car and the open studio from every pixel of the soft
# band (EDGE_BAND either side of the boundary; alpha 255 starts up to 3 px inside it)
WIDE, NARROW = 91, 9
STRIDE = 8  # the wide pass reads every 8th pixel each way: its means change little over 8 px
TILE = 16  # the narrow pass works on the 16x16 tiles that hold soft pixels, not on the whole photo


def alpha(pred: Prediction, threshold: float, band: int = EDGE_BAND) -> torch.Tensor:
    """uint8 (H, W) soft alpha of a prediction, on its device: 255 on the mask (`Prediction.mask`), 0 off it;
    within `band` pixels of the mask's boundary it ramps with the probability, 128-255 on the
    mask and 0-127 off it, so alpha >= 128 is exactly the mask; away from the band noise in the
    probability never makes the body or the studio see-through."""
    mask = pred.mask(threshold)
    m = mask[None, None].float()
    grown = F.max_pool2d(m, 2 * band + 1, stride=1, padding=band)[0, 0] > 0
    shrunk = -F.max_pool2d(-m, 2 * band + 1, stride=1, padding=band)[0, 0] > 0  # erosion; the border pads ignored
    p = pred.prob.float().clamp(0, 1)
    ramp = torch.where(
        mask,
        128 + torch.floor(127 * (p - threshold) / max(1 - threshold, 1e-6)),
        torch.floor(127 * p / max(threshold, 1e-6)),
    ).clamp(0, 255)
    return torch.where(grown & ~shrunk, ramp, m[0, 0] * 255).to(torch.uint8)


def _box_sums(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sums of x (..., H, W) over every whole size x size window in it: (..., H - size + 1, W - size + 1)."""
    return x.unfold(-1, size, 1).sum(-1).unfold(-2, size, 1).sum(-1)


def _means(
    fg: torch.Tensor, bg: torch.Tensor, wf: torch.Tensor, wb: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The car's and the studio's colour over each size x size window: fg weighted by wf, bg by wb."""
    s = _box_sums(torch.cat([wf * fg, wf, wb * bg, wb], -3), size)
    return s[..., :3, :, :] / s[..., 3:4, :, :].clamp_min(1e-6), s[..., 4:7, :, :] / s[..., 7:, :, :].clamp_min(1e-6)


def foreground(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3): the car's own colour where the alpha is soft (0 < alpha < 255), the photo's
    pixels everywhere else. A photo's edge pixel mixes the car with the studio behind it: kept as it is,
    a composite on another background shows a fringe of the old one. Blur fusion (Forte and Pitie,
    "Approximate fast foreground colour estimation", ICIP 2021), in torch on the tensors' device: a wide
    pass gives the car's and the studio's mean colour around each tile of the soft band, a narrow pass
    refines both from the pixels nearby that are known car (alpha 255) or known studio (alpha 0), the
    wide means standing in where a window has none; a soft pixel's colour is then the one that, blended
    with that studio colour by its alpha, gives the photo's pixel."""
    ky, kx = ((alpha - 1) < 254).nonzero(as_tuple=True)  # uint8: 0 wraps to 255
    if not len(ky):
        return rgb
    h, w = alpha.shape
    columns = -(-w // TILE)
    tiles, which = torch.unique(ky // TILE * columns + kx // TILE, return_inverse=True)
    ty, tx = tiles // columns * TILE, tiles % columns * TILE
    half = WIDE // STRIDE // 2
    image, a = rgb[::STRIDE, ::STRIDE].permute(2, 0, 1).float() / 255, alpha[::STRIDE, ::STRIDE].float()[None] / 255
    image, a, inside = (F.pad(t, (half,) * 4) for t in (image, a, torch.ones_like(a)))
    fbar, bbar = _means(image, image, a, inside - a, 2 * half + 1)  # the padding weighs nothing
    cy = ((ty + TILE // 2) // STRIDE).clamp(max=fbar.shape[1] - 1)
    cx = ((tx + TILE // 2) // STRIDE).clamp(max=fbar.shape[2] - 1)
    fbar, bbar = (m[:, cy, cx].T[:, :, None, None] for m in (fbar, bbar))  # (tiles, 3, 1, 1): at each tile's centre
    span = torch.arange(TILE + NARROW - 1, device=rgb.device) - NARROW // 2
    y, x = (ty[:, None] + span).clamp(0, h - 1)[:, :, None], (tx[:, None] + span).clamp(0, w - 1)[:, None, :]
    image, known = rgb[y, x].permute(0, 3, 1, 2).float() / 255, alpha[y, x][:, None]  # each tile and its margin
    a = known.float() / 255
    rest = image - a * fbar - (1 - a) * bbar  # what the two means do not explain, shared by their weights
    fbar, bbar = _means(
        (fbar + a * rest).clamp(0, 1),
        (bbar + (1 - a) * rest).clamp(0, 1),
        (known == 255).float() + 1e-3 * a,
        (known == 0).float() + 1e-3 * (1 - a),
        NARROW,
    )
    inner = slice(NARROW // 2, NARROW // 2 + TILE)
    image, a = image[:, :, inner, inner], a[:, :, inner, inner]
    car = (fbar + a * (image - a * fbar - (1 - a) * bbar)).clamp(0, 1)
    out = rgb.clone()
    out[ky, kx] = (255 * car[which, :, ky - ty[which], kx - tx[which]]).round().to(torch.uint8)
    return out


def composite_on(rgb: np.ndarray, alpha: np.ndarray, colour: tuple) -> np.ndarray:
    """The picture over a flat colour: straight (not premultiplied) alpha, so edge pixels keep their
    colour mixed with the new background, never darkened."""
    a = alpha[..., None].astype(np.float32) / 255
    return np.rint(rgb * a + np.array(colour[:3], np.float32) * (1 - a)).astype(np.uint8)
