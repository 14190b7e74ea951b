"""The device step and the loop around it: a stage's `Predictor` turns a batch of decoded images
into one `Prediction` or `Failure` each (`predict`), and `run` streams it over image files, the
reader decoding ahead of the device.

Stage 1's step (`stage1_lowres.coarse.Coarse`: probability and box) and stage 2's
(`stage2_fullres.cascade.Cascade`: the same, then tiles, refiner and blend) are the only two;
`stage1 predict`, `stage2 predict`, validation, `evaluate`, `cutout`, `serve` and the benchmarks
all run them, so validation predicts exactly the way the submission is made.
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
from common.config import Settings
from common.errors import Failure
from common.log import log
from common.model import amp_dtype, autocast, batch_buckets, padded_size, precision_name
from common.prediction.reader import read_batches, reader_processes


@dataclass(frozen=True)
class Prediction:
    """One image's result; the maps are float32 (height, width) tensors on the device."""

    width: int
    height: int
    box: Box  # the region the refiner sees, full-resolution pixels, x1/y1 exclusive
    found: bool  # stage 1 saw a car (False: the box is the whole image)
    coarse: torch.Tensor | None  # stage-1 probability upsampled (None when neither box nor refiner needs stage 1)
    prob: torch.Tensor | None = None  # the cascade's probability, 0 outside the box (None from stage 1 alone)
    windows: tuple[Box, ...] = ()  # what the refiner saw: tiles or band patches (the report draws them)

    def mask(self, threshold: float) -> torch.Tensor:
        """The car mask: the cascade's probability above the mask threshold. The one definition, which
        the submission, evaluation, `cutout` and `serve` all use."""
        return self.prob > threshold


Result = Prediction | Failure


def predict_dtype(device: torch.device) -> torch.dtype | None:
    """Prediction's precision on `device` (the one policy, `amp_dtype`, for inference)."""
    return amp_dtype("auto", device, training=False)


def probabilities(
    net: nn.Module, x: torch.Tensor, device: torch.device, flip: bool = False, buckets: tuple[int, ...] = ()
) -> torch.Tensor:
    """(n, H, W) float32 probabilities of the net's one output channel, in `predict_dtype`: the inputs
    padded with zeros up to the smallest of `buckets` that holds them (`batch_buckets`: a few shapes for
    cuDNN's tuning, one for a compiled net); with flip TTA the mirrored inputs ride in the same pass and
    the two predictions are averaged (both stages' one TTA)."""
    n = len(x)
    size = padded_size(n, buckets)
    if n < size:
        x = torch.cat([x, x.new_zeros(size - n, *x.shape[1:])])
    if flip:
        x = torch.cat([x, x.flip(-1)])
    with autocast(device, predict_dtype(device)):
        p = torch.sigmoid(net(x.contiguous(memory_format=torch.channels_last)).float())[:, 0]
    if flip:
        half = len(p) // 2
        p = (p[:half] + p[half:].flip(-1)) / 2
    return p[:n]


class Predictor:
    """What the stages' predictors share: `predict`, their device step, and `run`, that step streamed
    over image files with `batch_size` images per step, `workers` reader processes and JPEGs decoded
    as `decode` says (`predict.decode`). `buckets`: the batch sizes a net call is padded up to (none: no
    padding), from `batch_buckets`."""

    def __init__(self, cfg: Settings, device: torch.device):
        p = cfg.predict
        self.device, self.batch_size, self.flip, self.decode = device, p.batch_size, p.tta_flip, p.decode
        self.workers = reader_processes(p.workers, device)
        self.buckets = batch_buckets(device, p.compile, p.batch_size)

    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Result]:
        """Decoded uint8 (3, H, W) images on the device and their boxes (None: stage 1 finds it) -> a result each."""
        raise NotImplementedError

    def run(
        self, paths: list[Path], boxes: list[Box | None] | None = None, desc: str = ""
    ) -> Iterator[tuple[int, Result]]:
        """(index into `paths`, its result), in order, reading `workers` processes ahead of the device.
        With `desc`, a progress bar (images/s, ETA) and a summary line with the measured rate."""
        boxes = boxes or [None] * len(paths)
        started, done = time.monotonic(), 0
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if desc else True, mininterval=1.0)
        for batch in read_batches(paths, self.device, max(self.batch_size, 1), self.workers, self.decode):
            read = [d for d in batch if not isinstance(d.image, Failure)]
            results = (
                dict(
                    zip(
                        [d.index for d in read],
                        self.predict([d.image for d in read], [boxes[d.index] for d in read]),
                        strict=True,
                    )
                )
                if read
                else {}
            )
            for d in batch:
                result = d.image if isinstance(d.image, Failure) else results[d.index]
                yield d.index, result.named(str(paths[d.index])) if isinstance(result, Failure) else result
            done += len(batch)
            bar.update(len(batch))
        bar.close()
        if desc and done:
            seconds = time.monotonic() - started
            log.info(
                f"{desc}: {done} images in {seconds:.1f} s ({done / seconds:.1f} images/s on {self.device} in "
                f"{precision_name(predict_dtype(self.device))})"
            )
