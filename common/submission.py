"""Test-image order, the submission file and errors.csv, shared by both stages' predict."""
from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import pandas as pd

from common.config import Settings
from common.chunks import ChunkStore
from common.errors import ConfigError, DataError
from common.data import Sample, index_split
from common.io import atomic_path, write_csv
from common.log import log


def test_samples(cfg: Settings) -> list[Sample]:
    """Test images in sample_submission.csv order when the data has that file (else by name), limited by data.limit_test.

    A data root without a test folder (training data only, e.g. for `evaluate`) has none.
    """
    folder = Path(cfg.data.root) / ("test_hq" if cfg.data.hq else "test")
    if not folder.is_dir():
        warnings.warn(f"{folder} not found: no test images, so no submission", stacklevel=2)
        return []
    samples = index_split(cfg.data.root, "test", cfg.data.hq)
    path = Path(cfg.data.root) / "sample_submission.csv"
    if path.is_file():
        try:
            names = pd.read_csv(path, usecols=["img"], dtype=str)["img"]
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
            raise DataError(f"{path}: needs an 'img' column of test image names, as Kaggle's file has ({e})") from None
        order = {name: i for i, name in enumerate(names)}
        samples.sort(key=lambda s: (order.get(s.img, len(order)), s.img))
    limit = cfg.data.limit_test
    return samples[:limit] if limit else samples


def mask_threshold(cfg: Settings, strict: bool = True) -> float:
    """The cascade's mask threshold: `predict.threshold`, or with `auto` the one that gave the best
    mean validation Dice in the last `carvana evaluate` (report/threshold_sweep.csv). `strict=False`
    (training, evaluation itself) falls back to 0.5 while no sweep exists yet."""
    value = cfg.predict.threshold
    if value != "auto":
        return float(value)
    path = Path(cfg.output.dir) / "report" / "threshold_sweep.csv"
    if not path.is_file():
        if strict:
            raise ConfigError(f"predict.threshold=auto uses the best threshold of `carvana evaluate`, and {path} does not "
                              "exist yet: run `carvana evaluate` with the same config first, or set a number")
        return 0.5
    sweep = pd.read_csv(path)
    return float(sweep.threshold[sweep.dice_cascade.idxmax()])


def write_submission(path: Path, store: ChunkStore, order: list[str]) -> int:
    """Stream the rows of `store` (img, rle_mask, error) into a gzipped submission in `order`.

    Chunks hold images in processing order, which is `order`, so this reads one chunk at a time:
    memory does not grow with the number of test images. Returns the number of rows written.
    """
    position = pd.Index(order)  # its hash table is built once: a lookup per chunk costs the chunk, not the whole order
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(b"img,rle_mask\n")
        for part in store.parts():
            part = part.assign(pos=position.get_indexer(part["img"]))
            rows = part[(part["error"] == "") & (part["pos"] >= 0)].sort_values("pos")
            if len(rows) and rows["pos"].iloc[0] < written:
                raise RuntimeError(f"{store.folder}: chunks are not in submission order; delete the folder and rerun")
            gz.write(rows[["img", "rle_mask"]].to_csv(index=False, header=False).encode())
            written += len(rows)
    return written


def write_errors(out: Path, errors: pd.DataFrame, stage: str) -> None:
    """Put this stage's unreadable images (img, reason) into `<out>/errors.csv`, keeping other stages' rows."""
    path = out / "errors.csv"
    old = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame(columns=["img", "stage", "reason"])
    merged = pd.concat([old[old["stage"] != stage], errors.assign(stage=stage)[["img", "stage", "reason"]]], ignore_index=True)
    if len(merged) or path.is_file():
        write_csv(path, merged.sort_values(["stage", "img"]))


def finish_predictions(out: Path, store: ChunkStore, images: list[Sample], test: list[Sample], stage: str, submission: str) -> int:
    """Write the submission and errors.csv from the chunks; exit status 1 if any image failed, so scripts notice."""
    frame = store.frame(["img", "error"])
    errors = frame[(frame["error"] != "") & frame["img"].isin({x.img for x in images})].rename(columns={"error": "reason"})
    rows = write_submission(out / submission, store, [x.img for x in test])
    write_errors(out, errors, stage)
    log.info(f"{stage}: wrote {out / submission} ({rows} rows)")
    if len(errors):
        log.warning(f"{stage}: {len(errors)} of {len(images)} image(s) failed, listed in {out / 'errors.csv'}")
        return 1
    return 0
