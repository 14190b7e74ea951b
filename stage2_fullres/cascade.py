"""Stage 2's predictor: decoded images -> stage-1 probability and box (`Coarse.predict`) -> tiles
-> refiner -> blended full-resolution probability, batched across images, on the device.

`stage2 predict`, stage-2 validation, `carvana evaluate` and `carvana cutout` go through
`Cascade.run`, the stream of common/predictor.py with `Cascade.predict` as its step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from common.config import Settings
from common.boxes import Box
from common.checkpoints import checkpoint_paths, load_models
from common.errors import CheckpointError
from common.inference import prepare, probabilities
from common.predictor import Prediction, stream
from stage1_lowres.coarse import Coarse
from stage2_fullres.tiles import TooManyTiles, Window, blend_weights, cut_tiles, plan_tiles, stitch


def load_refiner(cfg: Settings, device: torch.device) -> nn.Module:
    paths = checkpoint_paths(cfg, "stage2")
    model, ckpts = load_models(paths, device)
    wants = 4 if cfg.stage2.coarse_channel else 3
    if ckpts[0]["model_args"]["in_channels"] != wants:
        raise CheckpointError(f"{paths[0]} takes {ckpts[0]['model_args']['in_channels']} input channels but stage2.coarse_channel="
                          f"{cfg.stage2.coarse_channel} needs {wants}; set it to match the checkpoint or retrain")
    return model


class Cascade:
    """Stage 1 (optional when boxes are given and the refiner takes no coarse channel) + the refiner."""

    def __init__(self, coarse: Coarse | None, refiner: nn.Module, cfg: Settings, device: torch.device):
        s, p = cfg.stage2, cfg.predict
        self.coarse, self.refiner, self.device = coarse, refiner, device
        self.tile, self.min_overlap, self.coarse_channel = s.tile, s.min_overlap, s.coarse_channel
        self.batch_size, self.flip, self.compiled, self.workers = p.batch_size, p.tta_flip, p.compile, p.workers
        self.weights = blend_weights(self.tile, s.blend, device)

    @classmethod
    def from_config(cls, cfg: Settings, device: torch.device, need_stage1: bool = True) -> "Cascade":
        """The nets the config names, ready for inference (channels_last, compiled if predict.compile);
        stage 1 only where it is needed: boxes to find (`need_stage1`) or a coarse channel."""
        refiner = prepare(load_refiner(cfg, device), device, cfg.predict.compile)
        coarse = Coarse.from_config(cfg, device) if need_stage1 or cfg.stage2.coarse_channel else None
        return cls(coarse, refiner, cfg, device)

    def run(self, paths: list[Path], boxes: list[Box | None] | None = None, desc: str = "") -> Iterator[tuple[int, Prediction | str]]:
        """`predict` over image files, streamed (common/predictor.py)."""
        return stream(self.predict, paths, boxes, self.device, self.batch_size, self.workers, desc)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Prediction | str]:
        """uint8 (3, H, W) images on the device and their boxes (None: from stage 1) -> predictions, or
        for an image the tile settings cannot cover (`TooManyTiles`) the reason."""
        if self.coarse is not None:
            preds = self.coarse.predict(images, boxes)
        else:  # every box given, no coarse channel: stage 1 is not needed
            preds = [Prediction(image.shape[-1], image.shape[-2], box, True, None, None) for image, box in zip(images, boxes)]
        return self._refine(images, preds)

    def _refine(self, images: list[torch.Tensor], preds: list[Prediction]) -> list[Prediction | str]:
        """The refiner's probability for each image whose tiles can be planned; the reason for the others."""
        plans = [self._plan(p) for p in preds]
        ok = [k for k, plan in enumerate(plans) if not isinstance(plan, str)]
        if ok:
            self._refine_planned([images[k] for k in ok], [preds[k] for k in ok], [plans[k] for k in ok])
        return [plan if isinstance(plan, str) else p for p, plan in zip(preds, plans)]

    def _plan(self, p: Prediction) -> list[Window] | str:
        try:
            return plan_tiles(p.width, p.height, p.box, self.tile, self.min_overlap)
        except TooManyTiles as e:
            return str(e)

    def _refine_planned(self, images: list[torch.Tensor], preds: list[Prediction], plans: list[list[Window]]) -> None:
        """Tiles of all images in one queue, `predict.batch_size` tiles per forward pass, then stitched per image."""
        rgb = torch.cat([cut_tiles(image, windows) for image, windows in zip(images, plans)])  # uint8, cut on the device
        prior = torch.cat([cut_tiles(p.coarse[None], windows) for p, windows in zip(preds, plans)]) if self.coarse_channel else None
        probs = torch.cat([self.refine(rgb[i : i + self.batch_size], None if prior is None else prior[i : i + self.batch_size])
                           for i in range(0, len(rgb), self.batch_size)])
        start = 0
        for p, windows in zip(preds, plans):
            p.prob = stitch(probs[start : start + len(windows)], windows, p.box, p.width, p.height, self.weights)
            start += len(windows)

    def refine(self, rgb: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """(n, tile, tile) probabilities of n uint8 RGB tiles (and their coarse prior); compiled, a
        partial batch is padded to one static shape, which would otherwise recompile."""
        x = rgb.float().div_(255)
        if prior is not None:
            x = torch.cat([x, prior], 1)
        return probabilities(self.refiner, x, self.device, self.flip, pad_to=self.batch_size if self.compiled else 0)
