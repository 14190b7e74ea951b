"""`carvana stage1 predict`: coarse masks -> car boxes for train and test images (cached), and the
stage-1 submission (coarse masks upsampled to full size) as the baseline stage 2 must beat.

The cache key is the checkpoint's content hash plus every setting that changes a box; a second run
with the same key reuses `bboxes.csv` without loading the model. Images go through the same
streaming predictor as the cascade, without its refiner.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from common.config import Settings
from common.chunks import Chunk, ChunkStore, ChunkWriter, to_host
from common.cluster import cached, predict_chunks_anywhere, worker_device
from common.errors import DataError
from common.data import Sample, index_split
from common.io import write_csv
from common.rle import rle_encode
from common.submission import finish_predictions, test_samples
from common.checkpoints import pick_device
from common.log import log
from stage1_lowres.coarse import BOX_COLUMNS, Coarse, cache_key, load_boxes

COLUMNS = BOX_COLUMNS + ["rle_mask", "error"]
Item = tuple[str, str, str]  # img, path, split


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


def _store(cfg: Settings, key: str, names: list[str]) -> ChunkStore:
    return ChunkStore(Path(cfg.output.dir) / "stage1_chunks", key, COLUMNS, cfg.predict.chunk, names)


def predict_chunks(chunks: list[Chunk], cfg: Settings, key: str, names: list[str], coarse: Coarse | None = None) -> int:
    """Boxes (and, for test images, coarse masks) of the items of `chunks`, each chunk's file written;
    returns the number of images. Without `cascade` (a Dask worker), the net is loaded once per worker."""
    desc = "stage 1 predict" if coarse else ""  # on a Dask worker the client's bar reports the rate
    coarse = coarse or cached(key, lambda: Coarse.from_config(cfg, worker_device(cfg.device)))
    items: list[Item] = [item for _, chunk in chunks for item in chunk]
    threshold = cfg.stage1.threshold
    with ChunkWriter(_store(cfg, key, names), chunks) as writer:
        for i, pred in coarse.run([Path(path) for _, path, _ in items], desc=desc):
            img, path, split = items[i]
            row = dict.fromkeys(COLUMNS, "") | {"img": img, "split": split, "key": key}
            if isinstance(pred, str):
                writer.add(lambda row=row, error=pred: row | {"error": error})
                continue
            if not pred.found:
                warnings.warn(f"{path}: stage 1 found no car; using the whole image as its box", stacklevel=1)
            x0, y0, x1, y1 = pred.box
            row |= {"width": pred.width, "height": pred.height, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "found": int(pred.found)}
            mask = to_host(pred.coarse > threshold) if split == "test" else None
            writer.add(lambda row=row, mask=mask: row | {"rle_mask": rle_encode(mask()) if mask else ""})
    return len(items)


def main(cfg: Settings) -> int:
    s, out = cfg.stage1, Path(cfg.output.dir)
    train = index_split(cfg.data.root, "train", cfg.data.hq)
    test = test_samples(cfg)  # in submission order, so the submission streams from the chunks
    key = cache_key(cfg)
    if _cache_is_valid(out, key, {x.img for x in train + test}):
        log.info(f"stage 1: reusing {out / 'bboxes.csv'} (same checkpoint content, size {s.size}, margin {s.margin}); model not loaded")
        return 0
    items = [(x.img, str(x.image), "train") for x in train] + [(x.img, str(x.image), "test") for x in test]
    names = [img for img, _, _ in items]
    store = _store(cfg, key, names)
    chunks = store.todo(items)
    todo = sum(len(chunk) for _, chunk in chunks)
    log.info(f"stage 1 predict: {todo} images to do, {len(items) - todo} already done (key {key})")
    predict_chunks_anywhere(cfg, predict_chunks, chunks, (cfg, key, names),
                            lambda: Coarse.from_config(cfg, pick_device(cfg.device)), "stage 1 predict")
    return _finish(cfg, out, store, train, test)


def _finish(cfg: Settings, out: Path, store: ChunkStore, train: list[Sample], test: list[Sample]) -> int:
    frame = store.frame(BOX_COLUMNS + ["error"])
    good = frame[(frame["error"] == "") & frame["img"].isin({x.img for x in train + test})]
    write_csv(out / "bboxes.csv", good.sort_values("img")[BOX_COLUMNS])
    log.info(f"stage1: wrote {out / 'bboxes.csv'} ({len(good)} boxes)")
    return finish_predictions(out, store, train + test, test, "stage1", "stage1_submission.csv.gz")
