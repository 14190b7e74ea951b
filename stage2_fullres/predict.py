"""`carvana stage2 predict`: the cascade's submission.

Test images stream through the `Cascade`: decoded ahead of the device, stage-1 probability, tiles of
the cached box, refiner, blend, paste, threshold on the device; RLE strings and chunk files are made
in a writer thread. Each chunk is written atomically, so a killed run continues where it stopped
and ends with the same bytes as an uninterrupted one. With `predict.cluster`, the same
`predict_chunks` runs as Dask tasks, one chunk each (common/cluster.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.chunks import Chunk, ChunkStore, ChunkWriter, to_host
from common.cluster import cached, predict_chunks_anywhere, worker_device
from common.errors import DataError
from common.rle import rle_encode
from common.submission import finish_predictions, mask_threshold, test_samples
from common.checkpoints import checkpoint_paths, checkpoints_hash, pick_device
from common.config import Settings, depends
from common.log import log
from stage1_lowres.coarse import INPUT_VERSION, cached_boxes
from stage2_fullres.cascade import Cascade

COLUMNS = ["img", "rle_mask", "error"]
Item = tuple[str, str, tuple | None]  # img, path, cached box (None: stage 1 wrote no box for it)


def _store(cfg: Settings, key: str, names: list[str]) -> ChunkStore:
    return ChunkStore(Path(cfg.output.dir) / "stage2_chunks", key, COLUMNS, cfg.predict.chunk, names)


def predict_chunks(chunks: list[Chunk], cfg: Settings, key: str, names: list[str], cascade: Cascade | None = None) -> int:
    """Predict the items of `chunks` and write each chunk's file; returns the number of images.
    Without `cascade` (a Dask worker), the nets are loaded once per worker process and kept."""
    desc = "stage 2 predict" if cascade else ""  # on a Dask worker the client's bar reports the rate
    cascade = cascade or cached(key, lambda: Cascade.from_config(cfg, worker_device(cfg.device), need_stage1=False))
    items: list[Item] = [item for _, chunk in chunks for item in chunk]
    known = [(path, box) for _, path, box in items if box is not None]
    results = cascade.run([Path(p) for p, _ in known], [b for _, b in known], desc=desc)
    threshold = mask_threshold(cfg)
    with ChunkWriter(_store(cfg, key, names), chunks) as writer:
        for img, path, box in items:  # in submission order; an image without a box is an error row in its place
            pred = next(results)[1] if box is not None else f"{path}: no stage-1 box in the cache"
            if isinstance(pred, str):
                writer.add(lambda img=img, error=pred: {"img": img, "rle_mask": "", "error": error})
            else:
                mask = to_host(pred.prob > threshold)  # thresholded on the device; only the bool mask travels
                writer.add(lambda img=img, mask=mask: {"img": img, "rle_mask": rle_encode(mask()), "error": ""})
        next(results, None)  # lets the predictor close its progress bar and print its rate
    return len(items)


def main(cfg: Settings) -> int:
    s, out = cfg.stage2, Path(cfg.output.dir)
    boxes = cached_boxes(cfg)
    test = test_samples(cfg)
    if not test:
        raise DataError(f"no test images under {cfg.data.root}: nothing to predict")
    # with a coarse channel stage 1 counts too (its probability is a refiner input); without one,
    # stage 2 needs no stage-1 checkpoint here, only the cached boxes
    stage1 = checkpoints_hash(checkpoint_paths(cfg, "stage1")) if s.coarse_channel else None
    key = hashlib.sha256(json.dumps({**depends(cfg, "masks"), "threshold": mask_threshold(cfg), "stage1": stage1,
                                     "stage2": checkpoints_hash(checkpoint_paths(cfg, "stage2")), "boxes": sorted(boxes.items()),
                                     "stage1_input": INPUT_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    names = [x.img for x in test]
    store = _store(cfg, key, names)
    chunks = store.todo([(x.img, str(x.image), boxes.get(x.img)) for x in test])
    todo = sum(len(items) for _, items in chunks)
    log.info(f"stage 2 predict: {todo} test images to do, {len(test) - todo} already done (key {key})")
    predict_chunks_anywhere(cfg, predict_chunks, chunks, (cfg, key, names),
                            lambda: Cascade.from_config(cfg, pick_device(cfg.device), need_stage1=False), "stage 2 predict")
    return finish_predictions(out, store, test, test, "stage2", "submission.csv.gz")
