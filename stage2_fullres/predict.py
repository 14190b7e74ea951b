"""`carvana stage2 predict`: the cascade's submission.

Test images stream through the `Cascade`: decoded ahead of the device, stage-1 probability, tiles of
the cached box, refiner, blend, paste, threshold on the device; RLE strings and chunk files are made
in a writer thread. Each chunk is written atomically, so a killed run continues where it stopped
and ends with the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.chunks import ChunkStore, ChunkWriter, mask_to_host
from common.data import DataError
from common.rle import rle_encode
from common.submission import finish_predictions, test_samples
from common.trainer import pick_device
from stage1_lowres.coarse import INPUT_VERSION, cached_boxes, file_hash
from stage2_fullres.cascade import Cascade, checkpoint_path


def main(cfg: dict) -> int:
    s, out = cfg["stage2"], Path(cfg["output"]["dir"])
    boxes = cached_boxes(cfg)
    test = test_samples(cfg)
    if not test:
        raise DataError(f"no test images under {cfg['data']['root']}: nothing to predict")
    cascade = Cascade.from_config(cfg, pick_device(cfg["device"]), need_stage1=False)
    settings = {k: s[k] for k in ("tile", "min_overlap", "blend", "coarse_channel")}
    key = hashlib.sha256(json.dumps({"stage2": file_hash(checkpoint_path(cfg)), "boxes": sorted(boxes.items()), **settings,
                                     "threshold": cfg["predict"]["threshold"], "tta": cfg["predict"]["tta_flip"],
                                     "stage1_input": INPUT_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    store = ChunkStore(out / "stage2_chunks", key, ["img", "rle_mask", "error"])
    done = store.done()
    todo = [x for x in test if x.img not in done]
    print(f"stage 2 predict: {len(todo)} test images to do, {len(test) - len(todo)} already done (key {key})")
    threshold = cfg["predict"]["threshold"]
    with ChunkWriter(store, cfg["predict"]["chunk"]) as writer:
        known = [x for x in todo if x.img in boxes]
        results = cascade.run([x.image for x in known], [boxes[x.img] for x in known], desc="stage 2 predict")
        for sample in todo:  # in submission order; an image without a box is an error row in its place
            pred = next(results)[1] if sample.img in boxes else f"{sample.image}: no stage-1 box in the cache"
            if isinstance(pred, str):
                writer.add(lambda img=sample.img, error=pred: {"img": img, "rle_mask": "", "error": error})
            else:
                mask = mask_to_host(pred.prob > threshold)  # thresholded on the device; only the bool mask travels
                writer.add(lambda img=sample.img, mask=mask: {"img": img, "rle_mask": rle_encode(mask()), "error": ""})
        next(results, None)  # lets the predictor close its progress bar and print its rate
    return finish_predictions(out, store, test, test, "stage2", "submission.csv.gz")
