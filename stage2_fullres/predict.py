"""Stage 2 at prediction: the car box cut into overlapping full-resolution tiles, the refiner on
the tiles of several images at once, the tiles blended and pasted into the full canvas (`Cascade`,
after stage 1's `Coarse`); and the `stage2 predict` command, the cascade's submission.

Tiles: a window is (x0, y0, x1, y1) with x1 - x0 == y1 - y0 == tile. Along an axis at least as long
as the tile, windows lie inside the image; along a shorter axis the one window starts at 0 and the
image is reflect-padded to fill it. Planning is pure functions (property-tested); cutting and
stitching run wherever their tensors are (the GPU in prediction, the CPU in the tests and data
loaders); tests/reference.py holds numpy references.

The command streams the test images through the `Cascade` with the cached boxes; the masks are
thresholded on the device, RLE strings and chunk files are made in a writer thread. Each chunk is
written atomically, so a killed run continues where it stopped and ends with the same bytes as an
uninterrupted one. With `predict.cluster`, the same chunks run as Dask tasks (common/cluster.py).
`stage2 predict`, stage-2 validation, `carvana evaluate` and `carvana cutout` all go through
`Cascade.run`, the stream of common/predictor.py with `Cascade.predict` as its step.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from common.boxes import Box
from common.config import Settings, depends
from common.data import ChunkStore, finish_predictions, rle_encode, test_samples
from common.errors import CheckpointError, ConfigError, DataError
from common.model import checkpoint_paths, checkpoints_hash, load_models, prepare
from common.predictor import Job, Prediction, mask_threshold, probabilities, run_job, stream, to_host
from stage1_lowres.predict import INPUT_VERSION, Coarse, cached_boxes

# --- tiles

Window = tuple[int, int, int, int]


# Windows planned for one image at most. Real photos need 1-6 (1024 tiles on a 1918x1280 car box),
# a 12000x8000 photo 117; more comes from settings no one means (an overlap close to the tile, a
# tiny tile on a large photo) and would hold gigabytes of tiles in memory.
MAX_TILES = 256


class TooManyTiles(ConfigError):
    """The tile settings would cut one image into more than MAX_TILES windows; the message names them."""


def plan_axis(lo: int, hi: int, length: int, tile: int, min_overlap: int) -> list[int]:
    """Fewest window starts covering [lo, hi) with consecutive overlaps of at least `min_overlap`."""
    if not 0 <= min_overlap < tile:
        raise ValueError(f"min_overlap must be in [0, tile), got {min_overlap} for tile {tile}")
    if length <= tile:
        return [0]
    span = hi - lo
    if span <= tile:
        return [min(max((lo + hi - tile) // 2, 0), length - tile)]
    n = 1 + math.ceil((span - tile) / (tile - min_overlap))
    return [lo + round(i * (span - tile) / (n - 1)) for i in range(n)]


def plan_tiles(width: int, height: int, box: Box, tile: int = 1024, min_overlap: int = 64) -> list[Window]:
    """Windows covering `box` in a width x height image, row by row."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {box} is empty or outside the {width}x{height} image")
    xs = plan_axis(x0, x1, width, tile, min_overlap)
    ys = plan_axis(y0, y1, height, tile, min_overlap)
    if len(xs) * len(ys) > MAX_TILES:
        raise TooManyTiles(f"stage2.tile={tile} with stage2.min_overlap={min_overlap} cuts the {x1 - x0}x{y1 - y0} car box of "
                           f"this {width}x{height} image into {len(xs) * len(ys)} tiles, more than the {MAX_TILES} allowed "
                           "per image; raise stage2.tile or lower stage2.min_overlap")
    return [(x, y, x + tile, y + tile) for y in ys for x in xs]


def _reflect(n: int, length: int, device: torch.device) -> torch.Tensor:
    """Indices 0..length-1 folded into [0, n) by mirror reflection without repeating the edge (numpy's 'reflect')."""
    i = torch.arange(length, device=device)
    if n == 1:
        return torch.zeros_like(i)
    i = i % (2 * (n - 1))
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def cut_tiles(image: torch.Tensor, windows: list[Window]) -> torch.Tensor:
    """(N, C, tile, tile) crops of a (C, H, W) tensor; reflect-padded where a window leaves it."""
    h, w = image.shape[-2:]
    tile = windows[0][2] - windows[0][0]
    if h < tile:
        image = image.index_select(-2, _reflect(h, tile, image.device))
    if w < tile:
        image = image.index_select(-1, _reflect(w, tile, image.device))
    return torch.stack([image[..., y0:y1, x0:x1] for x0, y0, x1, y1 in windows])


def blend_weights(tile: int, kind: str = "smooth", device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-pixel tile weights: `mean` (flat) or `smooth` (a sine window fading towards the edges)."""
    if kind == "mean":
        return torch.ones(tile, tile, device=device)
    if kind == "smooth":
        ramp = torch.sin(math.pi * (torch.arange(tile, device=device, dtype=torch.float64) + 0.5) / tile).float() + 1e-3
        return torch.outer(ramp, ramp)
    raise ValueError(f"stage2.blend must be 'mean' or 'smooth', got {kind!r}")


def stitch(tile_probs: torch.Tensor, windows: list[Window], box: Box, width: int, height: int,
           weights: torch.Tensor) -> torch.Tensor:
    """Blend (N, tile, tile) predictions into a full (height, width) canvas; outside `box` is background (0)."""
    x0, y0, x1, y1 = box
    acc = tile_probs.new_zeros((y1 - y0, x1 - x0), dtype=torch.float32)
    total = torch.zeros_like(acc)
    for prob, (wx0, wy0, wx1, wy1) in zip(tile_probs, windows):
        # the part of this window that lies inside the box, in box and in tile coordinates
        bx0, by0, bx1, by1 = max(wx0, x0), max(wy0, y0), min(wx1, x1), min(wy1, y1)
        if bx0 >= bx1 or by0 >= by1:
            continue
        tile_part = (slice(by0 - wy0, by1 - wy0), slice(bx0 - wx0, bx1 - wx0))
        box_part = (slice(by0 - y0, by1 - y0), slice(bx0 - x0, bx1 - x0))
        acc[box_part] += prob[tile_part] * weights[tile_part]
        total[box_part] += weights[tile_part]
    canvas = acc.new_zeros((height, width))
    canvas[y0:y1, x0:x1] = acc / total  # plan_tiles covers the box, so total > 0 (no device sync to check it)
    return canvas


# --- the cascade

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


# --- the `stage2 predict` command

COLUMNS = ["img", "rle_mask", "error"]
ImageToRefine = tuple[str, str, Box | None]  # img, path, cached box (None: stage 1 wrote no box for it)


def _cascade(cfg: Settings, device: torch.device) -> Cascade:
    return Cascade.from_config(cfg, device, need_stage1=False)  # the boxes come from the cache


def _rows(cascade: Cascade, items: list[ImageToRefine], job: Job, desc: str) -> Iterator[Callable[[], dict]]:
    """A row with the mask's RLE for every image, in submission order; an image without a box is an
    error row in its place."""
    known = [(path, box) for _, path, box in items if box is not None]
    results = cascade.run([Path(p) for p, _ in known], [b for _, b in known], desc=desc)
    threshold = mask_threshold(job.cfg)
    for img, path, box in items:
        pred = next(results)[1] if box is not None else f"{path}: no stage-1 box in the cache"
        if isinstance(pred, str):
            yield lambda img=img, error=pred: {"img": img, "rle_mask": "", "error": error}
        else:
            mask = to_host(pred.prob > threshold)  # thresholded on the device; only the bool mask travels
            yield lambda img=img, mask=mask: {"img": img, "rle_mask": rle_encode(mask()), "error": ""}
    next(results, None)  # lets the predictor close its progress bar and print its rate


def chunk_key(cfg: Settings, boxes: dict[str, Box]) -> str:
    """The checkpoints' content, the boxes and every setting that changes a mask."""
    # with a coarse channel stage 1 counts too (its probability is a refiner input); without one,
    # stage 2 needs no stage-1 checkpoint here, only the cached boxes
    stage1 = checkpoints_hash(checkpoint_paths(cfg, "stage1")) if cfg.stage2.coarse_channel else None
    parts = {**depends(cfg, "masks"), "threshold": mask_threshold(cfg), "stage1": stage1, "stage1_input": INPUT_VERSION,
             "stage2": checkpoints_hash(checkpoint_paths(cfg, "stage2")), "boxes": sorted(boxes.items())}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def main(cfg: Settings) -> int:
    boxes = cached_boxes(cfg)
    test = test_samples(cfg)
    if not test:
        raise DataError(f"no test images under {cfg.data.root}: nothing to predict")
    store = ChunkStore(Path(cfg.output.dir) / "stage2_chunks", chunk_key(cfg, boxes), COLUMNS, cfg.predict.chunk,
                       [x.img for x in test])
    run_job(Job("stage 2 predict", cfg, store, _cascade, _rows, "test images"), [(x.img, str(x.image), boxes.get(x.img)) for x in test])
    return finish_predictions(Path(cfg.output.dir), store, test, test, "stage2", "submission.csv.gz")
