"""The one predictor of the project: decoded images -> stage-1 probability -> box -> tiles ->
refiner -> blended full-resolution probability, batched across images, on the device.

`stage2 predict`, stage-2 validation, `carvana evaluate`, `stage1 predict` (without a refiner) and
benchmarks/bench_predict.py all go through `Cascade.run`, so validation predicts exactly the way the
submission is made. Its shape is Lightning's prediction loop: reader (common/reader.py, decoding
ahead of the device) -> `predict` on a batch of images -> the caller's writer, given each result
with its index.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from common.boxes import Box
from common.checkpoints import checkpoint_paths, load_models
from common.chunks import to_host
from common.config import ConfigError
from common.inference import autocast, prepare
from common.reader import read_batches
from stage1_lowres.coarse import Coarse, box_from_probability, upsample
from stage2_fullres.tiles import TooManyTiles, Window, blend_weights, cut_tiles, plan_tiles, stitch


@dataclass
class Prediction:
    """One image's result; the maps are float32 (height, width) tensors on the device."""

    width: int
    height: int
    box: Box  # the region the refiner saw, full-resolution pixels, x1/y1 exclusive
    found: bool  # stage 1 saw a car (False: the box is the whole image)
    coarse: torch.Tensor | None  # stage-1 probability upsampled (None when neither box nor refiner needs stage 1)
    prob: torch.Tensor | None  # the cascade's probability, 0 outside the box (None without a refiner)

    @property
    def final(self) -> torch.Tensor:
        return self.coarse if self.prob is None else self.prob


def load_refiner(cfg: dict, device: torch.device) -> nn.Module:
    paths = checkpoint_paths(cfg, "stage2")
    model, ckpts = load_models(paths, device)
    wants = 4 if cfg["stage2"]["coarse_channel"] else 3
    if ckpts[0]["model_args"]["in_channels"] != wants:
        raise ConfigError(f"{paths[0]} takes {ckpts[0]['model_args']['in_channels']} input channels but stage2.coarse_channel="
                          f"{cfg['stage2']['coarse_channel']} needs {wants}; set it to match the checkpoint or retrain")
    return model


class Cascade:
    """Stage 1 (optional when boxes are given and the refiner takes no coarse channel) + refiner (optional)."""

    def __init__(self, coarse: Coarse | None, refiner: nn.Module | None, cfg: dict, device: torch.device):
        s, p = cfg["stage2"], cfg["predict"]
        self.coarse, self.refiner, self.device = coarse, refiner, device
        self.tile, self.min_overlap, self.coarse_channel = s["tile"], s["min_overlap"], s["coarse_channel"]
        self.margin, self.box_threshold = cfg["stage1"]["margin"], cfg["stage1"]["threshold"]
        self.batch_size, self.flip, self.compiled, self.workers = p["batch_size"], p["tta_flip"], p["compile"], p["workers"]
        self.weights = blend_weights(self.tile, s["blend"], device)

    @classmethod
    def from_config(cls, cfg: dict, device: torch.device, refiner: bool = True, need_stage1: bool = True) -> "Cascade":
        """The nets the config names, ready for inference (channels_last on CUDA, compiled if predict.compile)."""
        net = load_refiner(cfg, device) if refiner else None
        need_stage1 = need_stage1 or net is None or cfg["stage2"]["coarse_channel"]
        coarse = Coarse.from_config(cfg, device) if need_stage1 else None
        if coarse is not None:
            coarse.model = prepare(coarse.model, device, cfg["predict"]["compile"])
        return cls(coarse, None if net is None else prepare(net, device, cfg["predict"]["compile"]), cfg, device)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Prediction | str]:
        """uint8 (3, H, W) images on the device and their boxes (None: from stage 1) -> predictions, or
        for an image the tile settings cannot cover (`TooManyTiles`) the reason."""
        small = self.coarse.probs(images) if self.coarse is not None else None
        need = [k for k, box in enumerate(boxes) if box is None]  # boxes stage 1 must find
        host = to_host(small[need]) if need else None  # one copy for the batch, started before the upsampling is queued
        sizes = [(image.shape[-1], image.shape[-2]) for image in images]  # (width, height)
        coarse = [None if small is None else upsample(small[k], w, h) for k, (w, h) in enumerate(sizes)]
        on_host = dict(zip(need, host())) if need else {}  # waits for that copy alone, while the device upsamples
        preds = []
        for k, (width, height) in enumerate(sizes):
            box = boxes[k] if k not in on_host else box_from_probability(on_host[k], width, height, self.margin, self.box_threshold)
            preds.append(Prediction(width, height, box or (0, 0, width, height), box is not None, coarse[k], None))
        return self._refine(images, preds) if self.refiner is not None else preds

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
        probs = torch.cat([self._forward(rgb[i : i + self.batch_size], None if prior is None else prior[i : i + self.batch_size])
                           for i in range(0, len(rgb), self.batch_size)])
        start = 0
        for p, windows in zip(preds, plans):
            p.prob = stitch(probs[start : start + len(windows)], windows, p.box, p.width, p.height, self.weights)
            start += len(windows)

    def _forward(self, rgb: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """(n, tile, tile) probabilities of n tiles; with flip TTA the mirrored tiles ride in the same pass."""
        x = rgb.float().div_(255)
        if prior is not None:
            x = torch.cat([x, prior], 1)
        n = len(x)
        if self.compiled and n < self.batch_size:  # one static shape: a partial batch would recompile
            x = torch.cat([x, x.new_zeros(self.batch_size - n, *x.shape[1:])])
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            out = torch.sigmoid(self.refiner(x).float())[:, 0]
        if self.flip:
            half = len(out) // 2
            out = (out[:half] + out[half:].flip(-1)) / 2
        return out[:n]

    def run(self, paths: list[Path], boxes: list[Box | None] | None = None, desc: str = "") -> Iterator[tuple[int, Prediction | str]]:
        """(index into `paths`, prediction or the reason it failed), in order, reading ahead of the device.

        With `desc`, a progress bar (images/s, ETA) and a summary line with the measured rate.
        """
        boxes = boxes or [None] * len(paths)
        started, done = time.monotonic(), 0
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if desc else True, mininterval=1.0)
        for batch in read_batches(paths, self.device, max(self.batch_size, 1), self.workers):
            ok = [(i, image) for i, image, _ in batch if image is not None]
            preds = dict(zip([i for i, _ in ok], self.predict([image for _, image in ok], [boxes[i] for i, _ in ok]))) if ok else {}
            for i, _, error in batch:
                pred = preds.get(i, error)
                yield i, f"{paths[i]}: {pred}" if i in preds and isinstance(pred, str) else pred  # a reason names its file
            done += len(batch)
            bar.update(len(batch))
        bar.close()
        if desc and done:
            seconds = time.monotonic() - started
            print(f"{desc}: {done} images in {seconds:.1f} s ({done / seconds:.1f} images/s on {self.device})")
