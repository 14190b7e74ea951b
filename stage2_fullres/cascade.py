"""Stage 2 at prediction: the cascade (`Cascade`), stage 1's `Coarse` and then the refiner on the tiles
of several images at once, blended and pasted into the full canvas. `stage2 predict`, stage-2
validation, `carvana evaluate`, `carvana cutout` and `carvana serve` all go through `Cascade.predict`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from common.boxes import Box
from common.config import Settings
from common.errors import Failure
from common.model import prepare
from common.model_source import ModelSource
from common.prediction.step import Prediction, Predictor, Result, probabilities
from stage1_lowres.coarse import Coarse
from stage2_fullres.tiles import TooManyTiles, Window, blend_weights, cut_tiles, plan_tiles, stitch


class Cascade(Predictor):
    """Stage 1 (optional when boxes are given and the refiner takes no coarse channel) + the refiner."""

    def __init__(self, coarse: Coarse | None, refiner: nn.Module, cfg: Settings, device: torch.device):
        super().__init__(cfg, device)
        s = cfg.stage2
        self.coarse, self.refiner = coarse, refiner
        self.tile, self.min_overlap, self.coarse_channel = s.tile, s.min_overlap, s.coarse_channel
        self.weights = blend_weights(self.tile, s.blend, device)

    @classmethod
    def load(cls, source: ModelSource, cfg: Settings, device: torch.device, need_stage1: bool = True) -> Cascade:
        """The source's nets ready for inference (channels_last, compiled if predict.compile); stage 1
        only where it is needed: boxes to find (`need_stage1`) or a coarse channel."""
        refiner = prepare(source.net("refiner", device), device, cfg.predict.compile)
        coarse = Coarse.load(source, cfg, device) if need_stage1 or cfg.stage2.coarse_channel else None
        return cls(coarse, refiner, cfg, device)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Result]:
        """uint8 (3, H, W) images on the device and their boxes (None: from stage 1) -> predictions, or
        a `Failure` for an image the tile settings cannot cover (`TooManyTiles`)."""
        if self.coarse is not None:
            preds = self.coarse.predict(images, boxes)
        else:  # every box given, no coarse channel: stage 1 is not needed
            preds = [
                Prediction(image.shape[-1], image.shape[-2], box, True, None)
                for image, box in zip(images, boxes, strict=True)
            ]
        plans = [self._plan(p) for p in preds]
        ok = [k for k, plan in enumerate(plans) if not isinstance(plan, Failure)]
        probs = self._refine([images[k] for k in ok], [preds[k] for k in ok], [plans[k] for k in ok]) if ok else []
        refined = dict(zip(ok, probs, strict=True))
        return [replace(p, prob=refined[k]) if k in refined else plans[k] for k, p in enumerate(preds)]

    def _plan(self, p: Prediction) -> list[Window] | Failure:
        try:
            return plan_tiles(p.width, p.height, p.box, self.tile, self.min_overlap)
        except TooManyTiles as e:
            return Failure(None, str(e), "stage2")

    def _refine(
        self, images: list[torch.Tensor], preds: list[Prediction], plans: list[list[Window]]
    ) -> list[torch.Tensor]:
        """Tiles of all images in one queue, `predict.batch_size` tiles per forward pass, then stitched
        into each image's full-resolution probability."""
        rgb = torch.cat(
            [cut_tiles(image, windows) for image, windows in zip(images, plans, strict=True)]
        )  # uint8, on the device
        prior = (
            torch.cat([cut_tiles(p.coarse[None], windows) for p, windows in zip(preds, plans, strict=True)])
            if self.coarse_channel
            else None
        )
        probs = torch.cat(
            [
                self.refine(rgb[i : i + self.batch_size], None if prior is None else prior[i : i + self.batch_size])
                for i in range(0, len(rgb), self.batch_size)
            ]
        )
        starts = np.cumsum([0] + [len(windows) for windows in plans]).tolist()
        return [
            stitch(probs[a:b], windows, p.box, p.width, p.height, self.weights)
            for p, windows, a, b in zip(preds, plans, starts, starts[1:], strict=False)
        ]

    def refine(self, rgb: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """(n, tile, tile) probabilities of n uint8 RGB tiles (and their coarse prior); with `buckets` a
        partial batch is padded up to the next bucket, so the shapes a compiled net or cuDNN's tuning
        sees stay few."""
        x = rgb.float().div_(255)
        if prior is not None:
            x = torch.cat([x, prior], 1)
        return probabilities(self.refiner, x, self.device, self.flip, self.buckets)
