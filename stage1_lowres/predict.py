"""`carvana stage1 predict`: the box of every train and test image (`bboxes.csv`, the box cache) and
the stage-1 submission (coarse masks upsampled to full size), the baseline stage 2 must beat. A
second run with the same key reuses `bboxes.csv` without loading a net."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from common.config import Settings
from common.data.chunks import ChunkStore, finish_predictions
from common.data.kaggle import index_split, test_samples
from common.data.rle import rle_encode
from common.errors import DataError, Failure
from common.log import log
from common.model_source import ModelSource
from common.prediction.jobs import Job, run_job
from common.prediction.step import Prediction
from common.prediction.writer import OnHostOutput, Output
from stage1_lowres.box_cache import COLUMNS as BOX_COLUMNS
from stage1_lowres.box_cache import BoxRow, box_rows, cache_key, load_boxes, write_boxes
from stage1_lowres.coarse import Coarse


@dataclass(frozen=True)
class BoxItem:
    img: str
    path: str
    split: str  # train | test: a test image's row also holds the RLE of its coarse mask


@dataclass(frozen=True)
class CoarseRow:
    """A row of stage 1's prediction chunks: the image's box row and the RLE of its coarse mask (test
    images), or why the image failed (`box` None)."""

    img: str
    split: str
    key: str
    box: BoxRow | None
    rle_mask: str = ""
    error: str = ""

    COLUMNS: ClassVar[list[str]] = [*BOX_COLUMNS, "rle_mask", "error"]

    def record(self) -> dict:
        """The row as the chunk file holds it: a failed image's box columns empty."""
        boxed = (
            vars(self.box)
            if self.box is not None
            else dict.fromkeys(BOX_COLUMNS, "") | {"img": self.img, "split": self.split, "key": self.key}
        )
        return boxed | {"rle_mask": self.rle_mask, "error": self.error}


@dataclass(frozen=True, kw_only=True)
class BoxJob(Job):
    """A box for every train and test image, and the coarse mask of every test image."""

    def build(self, device: torch.device) -> Coarse:
        return Coarse.load(self.source, self.cfg, device)

    def outputs(self, coarse: Coarse, items: list[BoxItem], desc: str) -> Iterator[Output]:
        threshold = self.cfg.stage1.threshold
        for i, result in coarse.run([Path(item.path) for item in items], desc=desc):
            if isinstance(result, Prediction) and not result.found:
                warnings.warn(f"{items[i].path}: stage 1 found no car; using the whole image as its box", stacklevel=1)
            test = isinstance(result, Prediction) and items[i].split == "test"
            yield Output(i, result, result.coarse > threshold if test else None)

    def row(self, item: BoxItem, output: OnHostOutput) -> CoarseRow:
        result, key = output.result, self.store.key
        if isinstance(result, Failure):
            return CoarseRow(item.img, item.split, key, None, error=str(result))
        box = BoxRow(item.img, item.split, result.width, result.height, *result.box, int(result.found), key)
        return CoarseRow(item.img, item.split, key, box, "" if output.mask is None else rle_encode(output.mask))


def _cache_is_valid(out: Path, key: str, wanted: set[str]) -> bool:
    boxes, sub = out / "bboxes.csv", out / "stage1_submission.csv.gz"
    if not (boxes.is_file() and sub.is_file()):
        return False
    try:
        rows = load_boxes(boxes)
    except DataError as e:
        warnings.warn(f"{e}; making a new one", stacklevel=2)
        return False
    return {row.key for row in rows} == {key} and wanted <= {row.img for row in rows}


def main(cfg: Settings, source: ModelSource) -> int:
    s, out = cfg.stage1, Path(cfg.output.dir)
    train = index_split(cfg.data.root, "train", cfg.data.hq)
    test = test_samples(cfg)  # in submission order, so the submission streams from the chunks
    key = cache_key(cfg, source)
    if _cache_is_valid(out, key, {x.img for x in train + test}):
        log.info(
            f"stage 1: reusing {out / 'bboxes.csv'} (same net content, size {s.size}, margin {s.margin}); net not "
            "loaded"
        )
        return 0
    items = [BoxItem(x.img, str(x.image), "train") for x in train] + [
        BoxItem(x.img, str(x.image), "test") for x in test
    ]
    store = ChunkStore(out / "stage1_chunks", key, CoarseRow.COLUMNS, cfg.predict.chunk, [item.img for item in items])
    run_job(BoxJob(desc="stage 1 predict", cfg=cfg, source=source, store=store), items)
    frame = store.frame(BOX_COLUMNS + ["error"])
    boxes = box_rows(frame[frame.error == ""], str(store.folder))
    write_boxes(out / "bboxes.csv", boxes)
    log.info(f"stage1: wrote {out / 'bboxes.csv'} ({len(boxes)} boxes)")
    return finish_predictions(out, store, "stage1", "stage1_submission.csv.gz", [x.img for x in test])
