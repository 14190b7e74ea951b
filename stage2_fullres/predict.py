"""`carvana stage2 predict`: the cascade's submission. The test images stream through the `Cascade`
with the cached boxes; the masks are thresholded on the device, RLE strings and chunk files are made
in a writer thread. Each chunk is written atomically, so a killed run continues where it stopped and
ends with the same bytes as an uninterrupted one. With `predict.cluster`, the same chunks run as
Dask tasks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from common.boxes import Box
from common.config import Settings, depends, digest
from common.data.chunks import ChunkStore, finish_predictions
from common.data.kaggle import test_samples
from common.data.rle import rle_encode
from common.errors import DataError, Failure
from common.model_source import ModelSource
from common.prediction.jobs import Job, run_job
from common.prediction.step import Prediction
from common.prediction.writer import OnHostOutput, Output
from stage1_lowres.box_cache import INPUT_VERSION, cached_boxes
from stage2_fullres.cascade import Cascade, needs_stage1


@dataclass(frozen=True)
class MaskItem:
    img: str
    path: str
    box: Box | None  # from bboxes.csv; None: stage 1 wrote no box for this image


@dataclass(frozen=True)
class MaskRow:
    """A row of the cascade's prediction chunks: the image's mask as Kaggle RLE, or why it has none."""

    img: str
    rle_mask: str = ""
    error: str = ""

    COLUMNS: ClassVar[list[str]] = ["img", "rle_mask", "error"]

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class MaskJob(Job):
    """The cascade's mask of every test image, in submission order."""

    def build(self, device: torch.device) -> Cascade:
        return Cascade.load(self.source, self.cfg, device, need_stage1=False)  # the boxes come from the cache

    def outputs(self, cascade: Cascade, items: list[MaskItem], desc: str) -> Iterator[Output]:
        """An image without a box is a failure in its place; the others stream through the cascade."""
        known = [item for item in items if item.box is not None]
        results = cascade.run([Path(item.path) for item in known], [item.box for item in known], desc=desc)
        threshold = self.source.threshold
        for i, item in enumerate(items):
            if item.box is None:
                yield Output(i, Failure(item.path, "no stage-1 box in the cache", "stage1"))
                continue
            _, result = next(results)
            yield Output(i, result, result.mask(threshold) if isinstance(result, Prediction) else None)
        next(results, None)  # lets the predictor close its progress bar and print its rate

    def row(self, item: MaskItem, output: OnHostOutput) -> MaskRow:
        if isinstance(output.result, Failure):
            return MaskRow(item.img, error=str(output.result))
        return MaskRow(item.img, rle_encode(output.mask))


def chunk_key(cfg: Settings, source: ModelSource, boxes: dict[str, Box]) -> str:
    """The nets' content, the boxes, the mask threshold and every setting that changes a mask. Where the
    refiner reads stage 1's probability (a coarse channel, the band) stage 1 counts too; else stage 2
    needs no stage-1 net here, only the cached boxes."""
    stage1 = source.hash("stage1") if needs_stage1(cfg) else None
    return digest(
        {
            **depends(cfg, "masks"),
            "threshold": source.threshold,
            "stage1": stage1,
            "stage1_input": INPUT_VERSION,
            "stage2": source.hash("refiner"),
            "boxes": sorted(boxes.items()),
        }
    )


def main(cfg: Settings, source: ModelSource) -> int:
    """`stage2 predict` with the source's nets and mask threshold."""
    boxes = cached_boxes(cfg)
    test = test_samples(cfg)
    if not test:
        raise DataError(f"no test images under {cfg.data.root}: nothing to predict")
    store = ChunkStore(
        Path(cfg.output.dir) / "stage2_chunks",
        chunk_key(cfg, source, boxes),
        MaskRow.COLUMNS,
        cfg.predict.chunk,
        [x.img for x in test],
    )
    job = MaskJob(desc="stage 2 predict", cfg=cfg, source=source, store=store, noun="test images")
    run_job(job, [MaskItem(x.img, str(x.image), boxes.get(x.img)) for x in test])
    return finish_predictions(Path(cfg.output.dir), store, "stage2", "submission.csv.gz", [x.img for x in test])
