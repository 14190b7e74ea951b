"""Stage 2 at prediction: the cascade (`Cascade`), stage 1's `Coarse` and then the refiner on the windows
of several images at once: overlapping tiles of the car box, blended and pasted into the full canvas
(`stage2.refine: tiles`), or patches over the band where stage 1 may be wrong, their centres pasted
over stage 1's probability (`band`, stage2_fullres/band.py). `stage2 predict`, stage-2 validation,
`carvana evaluate`, `carvana cutout` and `carvana serve` all go through `Cascade.predict`."""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from common.boxes import Box
from common.config import Settings
from common.errors import Failure
from common.model import batch_buckets, prepare
from common.model_source import ModelSource
from common.prediction.step import Prediction, Predictor, Result, probabilities
from common.prediction.transfer import to_host_all
from stage1_lowres.coarse import Coarse
from stage2_fullres import band
from stage2_fullres.tiles import TooManyTiles, Window, blend_weights, cut_tiles, plan_tiles, stitch


class Plan(NamedTuple):
    """What the refiner sees of one image: its windows; with the band, the centre each window keeps
    (`cores`) and the band's pixels, where the refined probability replaces stage 1's."""

    windows: list[Window]
    cores: list[tuple[Window, ...]] | None = None
    band: torch.Tensor | None = None


class Cascade(Predictor):
    """Stage 1 (optional when boxes are given, the refiner takes no coarse channel and refines tiles) +
    the refiner."""

    def __init__(self, coarse: Coarse | None, refiner: nn.Module, cfg: Settings, device: torch.device):
        super().__init__(cfg, device)
        s = cfg.stage2
        self.coarse, self.refiner = coarse, refiner
        self.tile, self.min_overlap, self.coarse_channel = s.tile, s.min_overlap, s.coarse_channel
        self.weights = blend_weights(self.tile, s.blend, device)
        self.refine_band, self.band, self.patch, self.context = s.refine == "band", s.band, s.patch, s.context
        if self.refine_band and coarse is None:
            raise ValueError("stage2.refine=band finds its band in stage 1's probability: give the cascade stage 1")
        # windows per forward pass: `predict.batch_size` tiles, or as many patches as hold their pixels
        self.per_pass = (
            band.patches_per_pass(self.batch_size, self.tile, self.patch) if self.refine_band else self.batch_size
        )
        self.buckets = batch_buckets(device, cfg.predict.compile, self.per_pass)  # the refiner's padded shapes

    @classmethod
    def load(cls, source: ModelSource, cfg: Settings, device: torch.device, need_stage1: bool = True) -> Cascade:
        """The source's nets ready for inference (channels_last, compiled if predict.compile); stage 1
        only where it is needed: boxes to find (`need_stage1`), a coarse channel or the band."""
        refiner = prepare(source.net("refiner", device), device, cfg.predict.compile)
        coarse = Coarse.load(source, cfg, device) if need_stage1 or needs_stage1(cfg) else None
        return cls(coarse, refiner, cfg, device)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Result]:
        """uint8 (3, H, W) images on the device and their boxes (None: from stage 1) -> predictions, or
        a `Failure` for an image the tile settings cannot cover (`TooManyTiles`) or whose band would need too
        many patches (`band.TooManyPatches`)."""
        if self.coarse is not None:
            preds = self.coarse.predict(images, boxes)
        else:  # every box given, no coarse channel: stage 1 is not needed
            preds = [
                Prediction(image.shape[-1], image.shape[-2], box, True, None)
                for image, box in zip(images, boxes, strict=True)
            ]
        plans = self._band_plans(preds) if self.refine_band else [self._tile_plan(p) for p in preds]
        ok = [k for k, plan in enumerate(plans) if not isinstance(plan, Failure)]
        probs = self._refine([images[k] for k in ok], [preds[k] for k in ok], [plans[k] for k in ok]) if ok else []
        refined = dict(zip(ok, probs, strict=True))
        return [
            replace(p, prob=refined[k], windows=tuple(plans[k].windows)) if k in refined else plans[k]
            for k, p in enumerate(preds)
        ]

    def _tile_plan(self, p: Prediction) -> Plan | Failure:
        try:
            return Plan(plan_tiles(p.width, p.height, p.box, self.tile, self.min_overlap))
        except TooManyTiles as e:
            return Failure(None, str(e), "stage2")

    def _band_plans(self, preds: list[Prediction]) -> list[Plan | Failure]:
        """Each image's band and the patches over it: the grid's occupied cells of the batch come to the
        host in one copy (the plan's one sync), the patches are planned there."""
        bands = [band.band_of(p.coarse, p.box, self.band) for p in preds]
        cell = band.core_of(self.patch, self.context)
        occupied = to_host_all([band.occupied_cells(b, cell) for b in bands])()
        plans: list[Plan | Failure] = []
        for p, pixels, cells in zip(preds, bands, occupied, strict=True):
            try:
                patches = band.plan_patches(cells, p.width, p.height, self.patch, self.context)
            except band.TooManyPatches as e:
                plans.append(Failure(None, str(e), "stage2"))
                continue
            plans.append(Plan([w for w, _ in patches], [cores for _, cores in patches], pixels))
        return plans

    def _refine(self, images: list[torch.Tensor], preds: list[Prediction], plans: list[Plan]) -> list[torch.Tensor]:
        """The windows of all images in one queue, `per_pass` per forward pass, then put together into
        each image's full-resolution probability."""
        rgb = [cut_tiles(image, plan.windows) for image, plan in zip(images, plans, strict=True) if plan.windows]
        if not rgb:  # no window anywhere: a band-refined batch with no outline in it
            return [self._put_together(p, plan, None) for p, plan in zip(preds, plans, strict=True)]
        rgb = torch.cat(rgb)  # uint8, on the device
        prior = (
            torch.cat(
                [cut_tiles(p.coarse[None], plan.windows) for p, plan in zip(preds, plans, strict=True) if plan.windows]
            )
            if self.coarse_channel
            else None
        )
        n = self.per_pass
        probs = torch.cat(
            [self.refine(rgb[i : i + n], None if prior is None else prior[i : i + n]) for i in range(0, len(rgb), n)]
        )
        starts = np.cumsum([0] + [len(plan.windows) for plan in plans]).tolist()
        return [
            self._put_together(p, plan, probs[a:b])
            for p, plan, a, b in zip(preds, plans, starts, starts[1:], strict=False)
        ]

    def _put_together(self, p: Prediction, plan: Plan, probs: torch.Tensor | None) -> torch.Tensor:
        """One image's probability from its windows' (0 outside the box): the tiles blended; or stage 1's
        probability with the patches' centres pasted over it where the band is."""
        if plan.band is None:
            return stitch(probs, plan.windows, p.box, p.width, p.height, self.weights)
        canvas = p.coarse.clone()
        for prob, (wx0, wy0, _, _), cores in zip(
            probs if probs is not None else [], plan.windows, plan.cores, strict=True
        ):
            for x0, y0, x1, y1 in cores:
                canvas[y0:y1, x0:x1] = prob[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
        out = torch.zeros_like(canvas)
        x0, y0, x1, y1 = p.box
        out[y0:y1, x0:x1] = torch.where(plan.band[y0:y1, x0:x1], canvas[y0:y1, x0:x1], p.coarse[y0:y1, x0:x1])
        return out

    def refine(self, rgb: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """(n, side, side) probabilities of n uint8 RGB windows (and their coarse prior); with `buckets` a
        partial batch is padded up to the next bucket, so the shapes a compiled net or cuDNN's tuning
        sees stay few."""
        x = rgb.float().div_(255)
        if prior is not None:
            x = torch.cat([x, prior], 1)
        return probabilities(self.refiner, x, self.device, self.flip, self.buckets)


def needs_stage1(cfg: Settings) -> bool:
    """Does the refiner need stage 1's probability, even where the boxes are cached: as an input
    channel, or to find the band?"""
    return cfg.stage2.coarse_channel or cfg.stage2.refine == "band"
