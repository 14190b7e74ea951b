"""Stage 1 as a predictor (`Coarse`): the coarse net on the whole image at stage1.size, its
probability upsampled to full resolution, and the car box from it.

Prediction feeds stage 1 from the one full-resolution decode of each image, resized on the device
(antialiased bilinear). Training decodes at reduced size with the JPEG decoder (`read_image` with a
size); the two differ a little (the more, the smaller stage1.size), and tests/test_cascade.py measures
how well their masks agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.boxes import Box, Margin, expand_box, largest_component, mask_extent, scale_box
from common.config import Settings
from common.model import prepare
from common.model_source import ModelSource
from common.prediction.step import Prediction, Predictor, probabilities
from common.prediction.transfer import to_host


def box_from_probability(prob: np.ndarray, width: int, height: int, margin: Margin, threshold: float) -> Box | None:
    """Largest component of the coarse mask -> full-resolution box with a margin, clamped to the image."""
    extent = mask_extent(largest_component(prob > threshold))
    if extent is None:
        return None
    small_h, small_w = prob.shape
    return expand_box(scale_box(extent, width / small_w, height / small_h), margin, width, height)


def upsample(prob: torch.Tensor, width: int, height: int, window: Box | None = None) -> torch.Tensor:
    """Low-resolution probability (h, w) -> full-resolution (height, width): bilinear, half-pixel centres.

    With `window` (inside the image), only that part of the full-resolution map is computed: a
    training crop then costs its own pixels, not a whole 1918x1280 upsample.
    """
    t = prob.float()[None, None]
    if window is None:
        return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    x0, y0, x1, y1 = window
    gx = torch.arange(x0, x1, dtype=torch.float32, device=t.device).add_(0.5).mul_(2 / width).sub_(1)
    gy = torch.arange(y0, y1, dtype=torch.float32, device=t.device).add_(0.5).mul_(2 / height).sub_(1)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]


def to_stage1_input(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes -> float (N, 3, size, size) in [0, 1], on their device.

    Antialiased, so a 1918x1280 photo squashed to 256 averages its pixels as the JPEG draft
    decoding used in training does, instead of sampling them.
    """
    return torch.cat(
        [
            F.interpolate(
                im[None].float().div_(255), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            for im in images
        ]
    )


class Coarse(Predictor):
    """Stage 1 as a predictor: decoded images -> low-resolution car probability -> full-resolution
    probability and car box (`predict`, the step `run` streams images through). Built from a net and
    the settings, as `Cascade` is; `load` takes the net from a model source."""

    def __init__(self, net: nn.Module, cfg: Settings, device: torch.device):
        super().__init__(cfg, device)
        self.net, self.size, self.margin, self.threshold = net, cfg.stage1.size, cfg.stage1.margin, cfg.stage1.threshold

    @classmethod
    def load(cls, source: ModelSource, cfg: Settings, device: torch.device) -> Coarse:
        """The source's stage-1 net ready for inference (`prepare`: channels_last, compiled if predict.compile)."""
        return cls(prepare(source.net("stage1", device), device, cfg.predict.compile), cfg, device)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Prediction]:
        """uint8 (3, H, W) images on the device and their boxes (None: found here) -> predictions
        with the upsampled probability and the box."""
        small = self.probs(images)
        need = [k for k, box in enumerate(boxes) if box is None]
        # the whole batch in one copy to the host, started before the upsampling is queued, and the rows picked
        # there: picking them on the device by a Python list would copy that list from pageable memory, a sync
        host = to_host(small) if need else None
        sizes = [(image.shape[-1], image.shape[-2]) for image in images]  # (width, height)
        coarse = [upsample(small[k], w, h) for k, (w, h) in enumerate(sizes)]
        rows = host() if need else None  # waits for that copy alone, while the device upsamples
        on_host = {k: rows[k] for k in need}
        preds = []
        for k, (width, height) in enumerate(sizes):
            box = (
                boxes[k]
                if k not in on_host
                else box_from_probability(on_host[k], width, height, self.margin, self.threshold)
            )
            preds.append(Prediction(width, height, box or (0, 0, width, height), box is not None, coarse[k]))
        return preds

    @torch.no_grad()
    def probs(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, size, size) probabilities, float32 on the device, computed under `autocast`; with
        flip TTA the mirrored images ride in the same pass and the two predictions are averaged."""
        x = to_stage1_input(images, self.size)
        step = self.buckets[-1] if self.buckets else len(x)  # with buckets, at most the largest per call
        return torch.cat(
            [
                probabilities(self.net, x[i : i + step], self.device, self.flip, self.buckets)
                for i in range(0, len(x), step)
            ]
        )
