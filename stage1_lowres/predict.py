"""Stage 1 at prediction: the coarse net on decoded images (`Coarse`), its probability at full
resolution, the car box, the box cache (`bboxes.csv`) with its key, and the `stage1 predict`
command: boxes for train and test images, and the stage-1 submission (coarse masks upsampled to
full size) as the baseline stage 2 must beat.

The cache key is the checkpoints' content hash plus every setting that changes a box; a second run
with the same key reuses `bboxes.csv` without loading the model. Prediction feeds stage 1 from the
one full-resolution decode of each image, resized on the device (antialiased bilinear). Training
decodes at reduced size with the JPEG decoder (`read_image` with a size); the two differ by less
than JPEG noise, and tests/test_cascade.py measures that boxes and masks agree.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from common.boxes import Box, Margin, expand_box, largest_component, mask_extent, scale_box
from common.config import Settings, depends, digest
from common.data.chunks import ChunkStore, finish_predictions
from common.data.kaggle import index_split, test_samples
from common.data.rle import rle_encode
from common.errors import CheckpointError, ConfigError, DataError, Failure
from common.io import write_csv
from common.log import log
from common.model import checkpoint_paths, checkpoints_hash, load_models, prepare, static_shapes
from common.prediction.jobs import Job, run_job
from common.prediction.reader import reader_processes
from common.prediction.step import Prediction, Predictor, Result, probabilities
from common.prediction.writer import Output, to_host

BOX_COLUMNS = ["img", "split", "width", "height", "x0", "y0", "x1", "y1", "found", "key"]


INPUT_VERSION = "full-decode, antialiased bilinear on the device"  # part of the cache key: changes how boxes are made


def cache_key(cfg: Settings) -> str:
    """Checkpoint content + the settings a box depends on."""
    return digest({"checkpoint": checkpoints_hash(checkpoint_paths(cfg, "stage1")), "input": INPUT_VERSION, **depends(cfg, "boxes")})


def boxes_path(cfg: Settings) -> Path:
    given = cfg.bboxes.path
    return Path(given) if given else Path(cfg.output.dir) / "bboxes.csv"


def load_boxes(path: Path) -> pd.DataFrame:
    """Read a bboxes.csv, refusing one that would crop the wrong pixels: DataError naming the file,
    the first bad row and what is wrong."""
    try:
        frame = pd.read_csv(path, dtype={"img": str, "split": str, "key": str}, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in BOX_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(BOX_COLUMNS)} "
                        "(written by `carvana stage1 predict`)")
    numbers = frame[["width", "height", "x0", "y0", "x1", "y1"]].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1) | ~((0 <= numbers.x0) & (numbers.x0 < numbers.x1) & (numbers.x1 <= numbers.width)
                                         & (0 <= numbers.y0) & (numbers.y0 < numbers.y1) & (numbers.y1 <= numbers.height))
    if bad.any():
        r = frame[bad].iloc[0]
        raise DataError(f"{path}: {bad.sum()} box(es) not inside their image, e.g. {r.img}: x0={r.x0} y0={r.y0} x1={r.x1} "
                        f"y1={r.y1} in {r.width}x{r.height}; rerun `carvana stage1 predict` to rebuild it")
    return frame


def cached_boxes(cfg: Settings) -> dict[str, Box]:
    """img -> box from `bboxes.path` (else `<output.dir>/bboxes.csv`), written by `stage1 predict`."""
    path = boxes_path(cfg)
    if not path.is_file():
        if cfg.bboxes.path:
            raise DataError(f"bboxes.path={cfg.bboxes.path} does not exist")
        raise DataError(f"{path} not found: run `carvana stage1 predict` with the same config first "
                          "(or set bboxes.path to the bboxes.csv of another run)")
    frame = load_boxes(path)
    return {r.img: (int(r.x0), int(r.y0), int(r.x1), int(r.y1)) for r in frame.itertuples()}


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
    return torch.cat([F.interpolate(im[None].float().div_(255), size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False) for im in images])


def torch_only(cfg: Settings) -> None:
    """Checkpoints run in PyTorch: onnxruntime runs a bundle's ONNX files (`--model`)."""
    if cfg.predict.backend != "torch":
        raise ConfigError(f"predict.backend={cfg.predict.backend} runs the ONNX files of a bundle: make one with "
                          "`carvana bundle --onnx` and predict with --model DIR (checkpoints run in torch)")


class Coarse(Predictor):
    """Stage 1 as a predictor: decoded images -> low-resolution car probability -> full-resolution
    probability and car box (`predict`, the step `run` streams images through).

    `static_batch` (on CUDA and under predict.compile, `static_shapes`): the net sees batches of
    exactly that many images, a partial batch padded, since every new shape recompiles (and after 8,
    torch falls back to eager) and re-tunes cuDNN."""

    def __init__(self, model: nn.Module, size: int, device: torch.device, flip: bool = False, static_batch: int = 0,
                 margin: Margin = 32, threshold: float = 0.5, batch_size: int = 2, workers: int = 0,
                 decode: Literal["pil", "nvjpeg"] = "pil"):
        self.model, self.size, self.device, self.flip, self.static_batch = model, size, device, flip, static_batch
        self.margin, self.threshold, self.batch_size, self.workers, self.decode = margin, threshold, batch_size, workers, decode

    @classmethod
    def from_config(cls, cfg: Settings, device: torch.device) -> "Coarse":
        """The stage-1 net(s) the config names, ready for inference (`prepare`: channels_last, compiled if predict.compile)."""
        torch_only(cfg)
        paths = checkpoint_paths(cfg, "stage1")
        model, ckpts = load_models(paths, device)
        for path, ckpt in zip(paths, ckpts):
            size = ckpt["config"]["stage1"]["size"]
            if size != cfg.stage1.size:
                raise CheckpointError(f"{path} was trained at stage1.size={size}, the config says {cfg.stage1.size}")
        return cls.from_net(model, cfg, device)

    @classmethod
    def from_net(cls, model: nn.Module, cfg: Settings, device: torch.device) -> "Coarse":
        """A stage-1 net (from checkpoints, or a bundle's weights) with the config's settings."""
        s, p = cfg.stage1, cfg.predict
        return cls(prepare(model, device, p.compile), s.size, device, flip=p.tta_flip,
                   static_batch=p.batch_size if static_shapes(device, p.compile) else 0, margin=s.margin, threshold=s.threshold,
                   batch_size=p.batch_size, workers=reader_processes(p.workers, device), decode=p.decode)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Prediction]:
        """uint8 (3, H, W) images on the device and their boxes (None: found here) -> predictions
        with the upsampled probability and the box."""
        small = self.probs(images)
        need = [k for k, box in enumerate(boxes) if box is None]
        host = to_host(small[need]) if need else None  # one copy for the batch, started before the upsampling is queued
        sizes = [(image.shape[-1], image.shape[-2]) for image in images]  # (width, height)
        coarse = [upsample(small[k], w, h) for k, (w, h) in enumerate(sizes)]
        on_host = dict(zip(need, host())) if need else {}  # waits for that copy alone, while the device upsamples
        preds = []
        for k, (width, height) in enumerate(sizes):
            box = boxes[k] if k not in on_host else box_from_probability(on_host[k], width, height, self.margin, self.threshold)
            preds.append(Prediction(width, height, box or (0, 0, width, height), box is not None, coarse[k]))
        return preds

    @torch.no_grad()
    def probs(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, size, size) probabilities, float32 on the device, computed under `autocast`; with
        flip TTA the mirrored images ride in the same pass and the two predictions are averaged."""
        x = to_stage1_input(images, self.size)
        step = self.static_batch or len(x)
        # padded only under static_batch: one shape for the compiled net and for cuDNN's tuning
        return torch.cat([probabilities(self.model, x[i : i + step], self.device, self.flip, pad_to=self.static_batch)
                          for i in range(0, len(x), step)])


# --- the `stage1 predict` command

COLUMNS = BOX_COLUMNS + ["rle_mask", "error"]


@dataclass(frozen=True)
class BoxItem:
    img: str
    path: str
    split: str  # train | test: a test image's row also holds the RLE of its coarse mask


@dataclass(frozen=True, kw_only=True)
class BoxJob(Job):
    """A box for every train and test image, and the coarse mask of every test image."""

    def build(self, device: torch.device) -> Coarse:
        return Coarse.from_config(self.cfg, device)

    def outputs(self, coarse: Coarse, items: list[BoxItem], desc: str) -> Iterator[Output]:
        threshold = self.cfg.stage1.threshold
        for i, result in coarse.run([Path(item.path) for item in items], desc=desc):
            if isinstance(result, Prediction) and not result.found:
                warnings.warn(f"{items[i].path}: stage 1 found no car; using the whole image as its box", stacklevel=1)
            test = isinstance(result, Prediction) and items[i].split == "test"
            yield Output(i, result, result.coarse > threshold if test else None)

    def row(self, item: BoxItem, result: Result, mask: np.ndarray | None) -> dict:
        row = dict.fromkeys(COLUMNS, "") | {"img": item.img, "split": item.split, "key": self.store.key}
        if isinstance(result, Failure):
            return row | {"error": str(result)}
        x0, y0, x1, y1 = result.box
        return row | {"width": result.width, "height": result.height, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
                      "found": int(result.found), "rle_mask": "" if mask is None else rle_encode(mask)}


def _cache_is_valid(out: Path, key: str, wanted: set[str]) -> bool:
    boxes, sub = out / "bboxes.csv", out / "stage1_submission.csv.gz"
    if not (boxes.is_file() and sub.is_file()):
        return False
    try:
        frame = load_boxes(boxes)
    except DataError as e:
        warnings.warn(f"{e}; making a new one", stacklevel=2)
        return False
    return set(frame["key"]) == {key} and wanted <= set(frame["img"])


def main(cfg: Settings) -> int:
    s, out = cfg.stage1, Path(cfg.output.dir)
    train = index_split(cfg.data.root, "train", cfg.data.hq)
    test = test_samples(cfg)  # in submission order, so the submission streams from the chunks
    key = cache_key(cfg)
    if _cache_is_valid(out, key, {x.img for x in train + test}):
        log.info(f"stage 1: reusing {out / 'bboxes.csv'} (same checkpoint content, size {s.size}, margin {s.margin}); model not loaded")
        return 0
    items = [BoxItem(x.img, str(x.image), "train") for x in train] + [BoxItem(x.img, str(x.image), "test") for x in test]
    store = ChunkStore(out / "stage1_chunks", key, COLUMNS, cfg.predict.chunk, [item.img for item in items])
    run_job(BoxJob(desc="stage 1 predict", cfg=cfg, store=store), items)
    frame = store.frame(BOX_COLUMNS + ["error"])
    good = frame[(frame["error"] == "") & frame["img"].isin({x.img for x in train + test})]
    write_csv(out / "bboxes.csv", good.sort_values("img")[BOX_COLUMNS])
    log.info(f"stage1: wrote {out / 'bboxes.csv'} ({len(good)} boxes)")
    return finish_predictions(out, store, train + test, test, "stage1", "stage1_submission.csv.gz")
