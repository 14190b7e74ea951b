"""Augmentations on a batch, on the training device, keeping masks aligned with images.

Two levels: "flip" mirrors half the images, moving no pixel off the grid; "full" adds a small
scale/shift (bilinear resampling, so a mask edge moves by up to half a pixel against its photo) and
brightness/contrast/hue. Geometric changes apply to every input channel and the mask; photometric
ones to the RGB channels only, so a coarse-mask channel stays a mask.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def augment_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    level: str = "full",
    scale: float = 0.1,
    shift: float = 0.06,
    colour: float = 0.15,
    hue_deg: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, C, H, W) in [0, 1] with RGB first; y: (N, 1, H, W) in {0, 1}; level "flip" or "full"."""
    n = x.shape[0]
    # the step's random numbers in one draw on the host (the CPU generator keeps runs reproducible
    # on any device) and one asynchronous copy: no host sync before the forward pass is queued
    r = torch.rand(1 if level == "flip" else 7, n, generator=gen)
    # needs CUDA: not testable on the CPU (benchmarks/gpu_check.py counts the training loop's host syncs)
    r = r.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else r
    if level == "flip":
        mirror = (r[0] < 0.5)[:, None, None, None]
        return torch.where(mirror, x.flip(-1), x), torch.where(mirror, y.flip(-1), y)
    flip_r, scale_r, tx_r, ty_r, bright_r, contrast_r, hue_r = r
    flip = torch.where(flip_r < 0.5, -1.0, 1.0)
    s = 1 + (scale_r * 2 - 1) * scale
    tx, ty = (tx_r * 2 - 1) * shift, (ty_r * 2 - 1) * shift
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = flip / s, 1 / s
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="border", align_corners=False) > 0.5).to(y.dtype)

    rgb = x[:, :3]
    bright = 1 + (bright_r[:, None, None, None] * 2 - 1) * colour
    contrast = 1 + (contrast_r[:, None, None, None] * 2 - 1) * colour
    mean = rgb.mean((1, 2, 3), keepdim=True)
    rgb = (rgb - mean) * contrast + mean * bright
    rgb = _rotate_hue(rgb, (hue_r * 2 - 1) * math.radians(hue_deg))
    return torch.cat([rgb.clamp(0, 1), x[:, 3:]], 1), y


@functools.cache
def _yiq(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB -> YIQ and back, computed on the CPU once and copied to `device` once (an inverse on the
    GPU would be a host sync every step)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    return to_yiq.to(device), torch.linalg.inv(to_yiq).to(device)


def _rotate_hue(rgb: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate chroma in YIQ space by `angle` radians per image."""
    to_yiq, to_rgb = _yiq(rgb.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(angle), 3, 3, device=rgb.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = to_rgb @ rot @ to_yiq  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, rgb)
