"""`carvana stage1 predict`: coarse masks -> car boxes for train and test images (cached), and the
stage-1 submission (coarse masks upsampled to full size) as the baseline stage 2 must beat.

The cache key is the checkpoint's content hash plus every setting that changes a box; a second run
with the same key reuses `bboxes.csv` without loading the model. Images go through the same
streaming predictor as the cascade, without its refiner.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from common.chunks import ChunkStore, ChunkWriter, mask_to_host
from common.data import Sample, index_split
from common.io import write_csv
from common.rle import rle_encode
from common.submission import finish_predictions, test_samples
from common.trainer import pick_device
from stage1_lowres.coarse import BOX_COLUMNS, cache_key, load_boxes
from stage2_fullres.cascade import Cascade


def _cache_is_valid(out: Path, key: str, wanted: set[str]) -> bool:
    boxes, sub = out / "bboxes.csv", out / "stage1_submission.csv.gz"
    if not (boxes.is_file() and sub.is_file()):
        return False
    frame = load_boxes(boxes)
    return set(frame["key"]) == {key} and wanted <= set(frame["img"])


def main(cfg: dict) -> int:
    s, out = cfg["stage1"], Path(cfg["output"]["dir"])
    train = index_split(cfg["data"]["root"], "train", cfg["data"]["hq"])
    test = test_samples(cfg)  # in submission order, so the submission streams from the chunks
    key = cache_key(cfg)
    if _cache_is_valid(out, key, {x.img for x in train + test}):
        print(f"stage 1: reusing {out / 'bboxes.csv'} (same checkpoint content, size {s['size']}, margin {s['margin']}); model not loaded")
        return 0
    cascade = Cascade.from_config(cfg, pick_device(cfg["device"]), refiner=False)
    store = ChunkStore(out / "stage1_chunks", key, BOX_COLUMNS + ["rle_mask", "error"])
    done = store.done()
    todo = [(x, "train") for x in train if x.img not in done] + [(x, "test") for x in test if x.img not in done]
    print(f"stage 1 predict: {len(todo)} images to do, {len(done)} already done (key {key})")
    threshold = cfg["predict"]["threshold"]
    with ChunkWriter(store, cfg["predict"]["chunk"]) as writer:
        for i, pred in cascade.run([x.image for x, _ in todo], desc="stage 1 predict"):
            sample, split = todo[i]
            row = dict.fromkeys(BOX_COLUMNS + ["rle_mask", "error"], "") | {"img": sample.img, "split": split, "key": key}
            if isinstance(pred, str):
                writer.add(lambda row=row, error=pred: row | {"error": error})
                continue
            if not pred.found:
                warnings.warn(f"{sample.image}: stage 1 found no car; using the whole image as its box", stacklevel=1)
            x0, y0, x1, y1 = pred.box
            row |= {"width": pred.width, "height": pred.height, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "found": int(pred.found)}
            mask = mask_to_host(pred.coarse > threshold) if split == "test" else None
            writer.add(lambda row=row, mask=mask: row | {"rle_mask": rle_encode(mask()) if mask else ""})
    return _finish(cfg, out, store, train, test)


def _finish(cfg: dict, out: Path, store: ChunkStore, train: list[Sample], test: list[Sample]) -> int:
    frame = store.frame(BOX_COLUMNS + ["error"])
    good = frame[(frame["error"] == "") & frame["img"].isin({x.img for x in train + test})]
    write_csv(out / "bboxes.csv", good.sort_values("img")[BOX_COLUMNS])
    print(f"stage1: wrote {out / 'bboxes.csv'} ({len(good)} boxes)")
    return finish_predictions(out, store, train + test, test, "stage1", "stage1_submission.csv.gz")
