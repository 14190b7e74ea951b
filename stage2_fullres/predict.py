"""`carvana stage2 predict`: the cascade's submission.

Test images stream through in chunks of predict.chunk: read, stage-1 probability, tiles of the cached box,
refiner, blend, paste, threshold, RLE. Each chunk is written atomically, so a killed run continues
where it stopped and ends with the same bytes as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from joblib import Parallel, delayed

from common.chunks import ChunkStore
from common.config import ConfigError
from common.data import DataError
from common.io import ImageReadError, read_image
from common.rle import rle_encode
from common.submission import finish_predictions, test_samples
from common.trainer import load_model, pick_device
from stage1_lowres.predict import CoarseModel, file_hash
from stage2_fullres.boxes import stage1_boxes
from stage2_fullres.refine import refine



def checkpoint_path(cfg: dict) -> Path:
    return Path(cfg["stage2"]["checkpoint"] or Path(cfg["output"]["dir"]) / "stage2" / "best.pt")


def load_refiner(cfg: dict, device: torch.device):
    """The stage-2 net, plus the stage-1 net when it takes the coarse channel."""
    path = checkpoint_path(cfg)
    model, ckpt = load_model(path, device)
    wants = 4 if cfg["stage2"]["coarse_channel"] else 3
    if ckpt["model_args"]["in_channels"] != wants:
        raise ConfigError(f"{path} takes {ckpt['model_args']['in_channels']} input channels but stage2.coarse_channel="
                          f"{cfg['stage2']['coarse_channel']} needs {wants}; set it to match the checkpoint or retrain")
    return model, CoarseModel(cfg, device) if wants == 4 else None


def _read(sample):
    try:
        return read_image(sample.image)
    except ImageReadError as e:
        return str(e)


def main(cfg: dict) -> int:
    s, out = cfg["stage2"], Path(cfg["output"]["dir"])
    boxes = stage1_boxes(cfg)
    device = pick_device(cfg["device"])
    model, coarse = load_refiner(cfg, device)
    settings = {k: s[k] for k in ("tile", "min_overlap", "blend", "coarse_channel")}
    key = hashlib.sha256(json.dumps({"stage2": file_hash(checkpoint_path(cfg)), "boxes": sorted(boxes.items()), **settings,
                                     "threshold": cfg["predict"]["threshold"], "tta": cfg["predict"]["tta_flip"]},
                                    sort_keys=True).encode()).hexdigest()[:16]
    store = ChunkStore(out / "stage2_chunks", key, ["img", "rle_mask", "error"])
    test = test_samples(cfg)
    if not test:
        raise DataError(f"no test images under {cfg['data']['root']}: nothing to predict")
    done = store.done()
    todo = [x for x in test if x.img not in done]
    print(f"stage 2 predict: {len(todo)} test images to do, {len(test) - len(todo)} already done (key {key})")
    for start in range(0, len(todo), cfg["predict"]["chunk"]):
        chunk = todo[start : start + cfg["predict"]["chunk"]]
        images = Parallel(n_jobs=4, prefer="threads")(delayed(_read)(x) for x in chunk)
        rows = []
        for sample, image in zip(chunk, images):
            if isinstance(image, str):
                rows.append({"img": sample.img, "rle_mask": "", "error": image})
                continue
            if sample.img not in boxes:
                rows.append({"img": sample.img, "rle_mask": "", "error": f"{sample.image}: no stage-1 box in the cache"})
                continue
            height, width = image.shape[:2]
            prior = None if coarse is None else coarse.full_res(sample.image, width, height)
            prob = refine(model, image, prior, boxes[sample.img], s, device, cfg["predict"]["batch_size"], cfg["predict"]["tta_flip"])
            rows.append({"img": sample.img, "rle_mask": rle_encode(prob > cfg["predict"]["threshold"]), "error": ""})
        store.write(rows)
    return finish_predictions(out, store, test, test, "stage2", "submission.csv.gz")
