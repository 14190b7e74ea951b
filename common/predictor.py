"""The streaming prediction loop both stages plug into, in the shape of Lightning's prediction loop:
reader (common/reader.py: images decoded once, ahead of the device) -> a stage's predict step on
a batch of decoded images -> the caller's writer, given each result with its index.

Stage 1's step (`stage1_lowres.coarse.Coarse.predict`: probability and box) and stage 2's
(`stage2_fullres.cascade.Cascade.predict`: the same, then tiles, refiner and blend) are the only
two; `stage1 predict`, `stage2 predict`, validation, `evaluate`, `cutout` and the benchmarks all
stream through `stream`, so validation predicts exactly the way the submission is made.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from common.boxes import Box
from common.reader import read_batches
from common.log import log


@dataclass
class Prediction:
    """One image's result; the maps are float32 (height, width) tensors on the device."""

    width: int
    height: int
    box: Box  # the region the refiner sees, full-resolution pixels, x1/y1 exclusive
    found: bool  # stage 1 saw a car (False: the box is the whole image)
    coarse: torch.Tensor | None  # stage-1 probability upsampled (None when neither box nor refiner needs stage 1)
    prob: torch.Tensor | None  # the cascade's probability, 0 outside the box (None from stage 1 alone)


# decoded uint8 (3, H, W) images on the device and their boxes (None: stage 1 finds it) ->
# a prediction per image, or the reason it cannot be predicted
Step = Callable[[list[torch.Tensor], list[Box | None]], list[Prediction | str]]


def stream(step: Step, paths: list[Path], boxes: list[Box | None] | None, device: torch.device, batch_size: int,
           workers: int, desc: str = "") -> Iterator[tuple[int, Prediction | str]]:
    """(index into `paths`, prediction or the reason it failed, naming the file), in order, reading
    `workers` processes ahead of the device. With `desc`, a progress bar (images/s, ETA) and a
    summary line with the measured rate."""
    boxes = boxes or [None] * len(paths)
    started, done = time.monotonic(), 0
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if desc else True, mininterval=1.0)
    for batch in read_batches(paths, device, max(batch_size, 1), workers):
        ok = [(i, image) for i, image, _ in batch if image is not None]
        preds = dict(zip([i for i, _ in ok], step([image for _, image in ok], [boxes[i] for i, _ in ok]))) if ok else {}
        for i, _, error in batch:
            pred = preds.get(i, error)
            yield i, f"{paths[i]}: {pred}" if i in preds and isinstance(pred, str) else pred  # a reason names its file
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    if desc and done:
        seconds = time.monotonic() - started
        log.info(f"{desc}: {done} images in {seconds:.1f} s ({done / seconds:.1f} images/s on {device})")
