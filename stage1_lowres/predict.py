"""`carvana stage1 predict`: coarse masks -> car boxes for train and test images (cached), and the
stage-1 submission (coarse masks upsampled to full size) as the baseline stage 2 must beat.

The cache key is the checkpoint's content hash plus every setting that changes a box; a second run
with the same key reuses `bboxes.csv` without loading the model.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from joblib import Parallel, delayed

from common.boxes import Box, expand_box, largest_component, mask_extent, scale_box
from common.chunks import ChunkStore
from common.data import DataError, Sample, index_split
from common.inference import predict_probs, to_input
from common.io import ImageReadError, image_size, read_image, write_csv
from common.submission import finish_predictions, test_samples
from common.rle import rle_encode
from common.trainer import load_model, pick_device

BOX_COLUMNS = ["img", "split", "width", "height", "x0", "y0", "x1", "y1", "found", "key"]


def checkpoint_path(cfg: dict) -> Path:
    return Path(cfg["stage1"]["checkpoint"] or Path(cfg["output"]["dir"]) / "stage1" / "best.pt")


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(cfg: dict) -> str:
    """Checkpoint content + the settings a box depends on."""
    s = cfg["stage1"]
    parts = {"checkpoint": file_hash(checkpoint_path(cfg)), "size": s["size"], "margin": s["margin"],
             "threshold": cfg["predict"]["threshold"], "hq": cfg["data"]["hq"]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def box_from_probability(prob: np.ndarray, width: int, height: int, margin: int, threshold: float) -> Box | None:
    """Largest component of the coarse mask -> full-resolution box with a margin, clamped to the image."""
    extent = mask_extent(largest_component(prob > threshold))
    if extent is None:
        return None
    small_h, small_w = prob.shape
    return expand_box(scale_box(extent, width / small_w, height / small_h), margin, width, height)


def upsample(prob: np.ndarray, width: int, height: int, window: Box | None = None) -> np.ndarray:
    """Low-resolution probability -> full-resolution probability (bilinear, half-pixel centres).

    With `window` (inside the image), only that part of the full-resolution map is computed: a
    training crop then costs its own pixels, not a whole 1918x1280 upsample.
    """
    x0, y0, x1, y1 = window or (0, 0, width, height)
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    if window is None:
        return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    gx = torch.arange(x0, x1, dtype=torch.float32).add_(0.5).mul_(2 / width).sub_(1)
    gy = torch.arange(y0, y1, dtype=torch.float32).add_(0.5).mul_(2 / height).sub_(1)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()


class CoarseModel:
    """The stage-1 net as a function: images -> low-resolution car probabilities."""

    def __init__(self, cfg: dict, device: torch.device):
        self.model, ckpt = load_model(checkpoint_path(cfg), device)
        self.size = ckpt["config"]["stage1"]["size"]
        if self.size != cfg["stage1"]["size"]:
            raise DataError(f"{checkpoint_path(cfg)} was trained at stage1.size={self.size}, the config says {cfg['stage1']['size']}")
        self.device, self.batch = device, cfg["predict"]["batch_size"] * 4

    def read(self, path: Path) -> np.ndarray:
        return read_image(path, size=(self.size, self.size))

    def probs(self, images: np.ndarray) -> np.ndarray:
        return predict_probs(self.model, to_input(images), self.device, self.batch)

    def full_res(self, path: Path, width: int, height: int) -> np.ndarray:
        """The coarse probability of one image, upsampled to its full size: stage 2's prior."""
        return upsample(self.probs(self.read(path)[None])[0], width, height)


def _try_read(coarse: CoarseModel, sample: Sample):
    try:
        return coarse.read(sample.image), image_size(sample.image)
    except ImageReadError as e:
        return str(e), None


def load_boxes(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"img": str, "split": str, "key": str}, keep_default_na=False)


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
    wanted = {x.img for x in train + test}
    if _cache_is_valid(out, key, wanted):
        print(f"stage 1: reusing {out / 'bboxes.csv'} (same checkpoint content, size {s['size']}, margin {s['margin']}); model not loaded")
        return 0
    device = pick_device(cfg["device"])
    coarse = CoarseModel(cfg, device)
    store = ChunkStore(out / "stage1_chunks", key, BOX_COLUMNS + ["rle_mask", "error"])
    done = store.done()
    todo = [(x, "train") for x in train if x.img not in done] + [(x, "test") for x in test if x.img not in done]
    print(f"stage 1 predict: {len(todo)} images to do, {len(done)} already done (key {key})")
    for start in range(0, len(todo), cfg["predict"]["chunk"]):
        chunk = todo[start : start + cfg["predict"]["chunk"]]
        read = Parallel(n_jobs=4, prefer="threads")(delayed(_try_read)(coarse, x) for x, _ in chunk)
        ok = [i for i, (img, _) in enumerate(read) if not isinstance(img, str)]
        probs = dict(zip(ok, coarse.probs(np.stack([read[i][0] for i in ok])))) if ok else {}
        rows = []
        for pos, ((sample, split), (img, size)) in enumerate(zip(chunk, read)):
            row = dict.fromkeys(BOX_COLUMNS + ["rle_mask", "error"], "") | {"img": sample.img, "split": split, "key": key}
            if isinstance(img, str):
                rows.append(row | {"error": img})
                continue
            prob = probs[pos]
            width, height = size
            box = box_from_probability(prob, width, height, s["margin"], cfg["predict"]["threshold"])
            if box is None:
                warnings.warn(f"{sample.image}: stage 1 found no car; using the whole image as its box", stacklevel=1)
            x0, y0, x1, y1 = box or (0, 0, width, height)
            row |= {"width": width, "height": height, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "found": int(box is not None)}
            if split == "test":
                row["rle_mask"] = rle_encode(upsample(prob, width, height) > cfg["predict"]["threshold"])
            rows.append(row)
        store.write(rows)
    return _finish(cfg, out, store, train, test)


def _finish(cfg: dict, out: Path, store: ChunkStore, train: list[Sample], test: list[Sample]) -> int:
    frame = store.frame(BOX_COLUMNS + ["error"])
    good = frame[(frame["error"] == "") & frame["img"].isin({x.img for x in train + test})]
    write_csv(out / "bboxes.csv", good.sort_values("img")[BOX_COLUMNS])
    print(f"stage1: wrote {out / 'bboxes.csv'} ({len(good)} boxes)")
    return finish_predictions(out, store, train + test, test, "stage1", "stage1_submission.csv.gz")
