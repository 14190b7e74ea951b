"""The Kaggle data set on disk, in and out: the index of a Kaggle-layout data root, the split by
car and the test images in submission order; the Kaggle RLE; prediction results in resumable chunk
files; the submission and errors.csv made from them.

<root>/train/<car>_<angle>.jpg, <root>/train_masks/<car>_<angle>_mask.gif (or .png),
<root>/test/<car>_<angle>.jpg; train_hq/ and test_hq/ when `hq` is set.

Chunk k of a prediction holds the rows of images [k * size, (k + 1) * size) of the run's image
order, in a file named for k. A run killed at any point leaves only whole chunks; the rerun skips
the chunks whose files exist (one directory listing), whoever wrote them and in whatever order they
were finished (Dask workers on other machines included), and the final files read the chunks in k
order, so they are byte-identical to those of an uninterrupted run. The chunk folder's name holds
the key (checkpoints, settings), the chunk size and a hash of the image list: another run's chunks
are never read.
"""
from __future__ import annotations

import gzip
import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from common.config import Settings
from common.errors import DataError
from common.io import atomic_path, kill_point, write_csv
from common.log import log

NAME = re.compile(r"^(?P<car>[0-9a-zA-Z]{12})_(?P<angle>\d{2})\.jpg$")
MASK_SUFFIXES = ("_mask.gif", "_mask.png")


@dataclass(frozen=True)
class Sample:
    id: str  # file stem, e.g. 0cdf5b5d0ce1_01
    car: str
    angle: int
    image: Path
    mask: Path | None = None

    @property
    def img(self) -> str:
        """The name the submission uses."""
        return self.image.name


def index_split(root: str | Path, split: str = "train", hq: bool = False) -> list[Sample]:
    """List the samples of `split` (train or test), sorted by id.

    Stray files (real downloads contain copies like `fa613ac8eac5_01(1).jpg`) are skipped with one
    warning listing them; a training image without a mask is an error naming the images.
    """
    root = Path(root)
    folder = root / (f"{split}_hq" if hq else split)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder} (set data.root to a Kaggle-layout folder)")
    samples, stray = [], []
    for path in sorted(folder.iterdir()):
        m = NAME.match(path.name)
        if not m:
            if not path.name.startswith("."):
                stray.append(path.name)
            continue
        samples.append(Sample(path.stem, m["car"], int(m["angle"]), path))
    if stray:
        shown = ", ".join(stray[:10]) + (f" and {len(stray) - 10} more" if len(stray) > 10 else "")
        warnings.warn(f"{folder}: skipped {len(stray)} file(s) not named <car>_<angle>.jpg: {shown}", stacklevel=2)
    if not samples:
        raise DataError(f"no images named <car>_<angle>.jpg in {folder}")
    if split == "train":
        samples = _attach_masks(samples, root / "train_masks")
    return samples


def _attach_masks(samples: list[Sample], mask_dir: Path) -> list[Sample]:
    present = {p.name for p in mask_dir.iterdir()} if mask_dir.is_dir() else set()
    out, missing = [], []
    for s in samples:
        name = next((s.id + suf for suf in MASK_SUFFIXES if s.id + suf in present), None)
        if name is None:
            missing.append(s.image.name)
        else:
            out.append(Sample(s.id, s.car, s.angle, s.image, mask_dir / name))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} training image(s) have no mask in {mask_dir}: {shown}")
    return out


def split_by_car(samples: list[Sample], val_cars: int | str | list) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val) by car, never by image.

    val_cars: a list of car ids; an int N (the first N cars in sorted order, as the seed did);
    or "k/K" (fold k of K, 1-based, cars assigned round-robin in sorted order).
    """
    cars = sorted({s.car for s in samples})
    if isinstance(val_cars, list):
        unknown = sorted(set(val_cars) - set(cars))
        if unknown:
            raise DataError(f"data.val_cars names cars not in the data: {', '.join(unknown[:5])}")
        chosen = set(val_cars)
    elif isinstance(val_cars, int):
        if not 0 <= val_cars < len(cars):
            raise DataError(f"data.val_cars={val_cars} but the data has {len(cars)} cars; keep at least one for training")
        chosen = set(cars[:val_cars])
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(val_cars))
        if not m or not 1 <= int(m[1]) <= int(m[2]) or int(m[2]) > len(cars):
            raise DataError(f"data.val_cars='{val_cars}' must be a list, a count, or 'k/K' with 1 <= k <= K <= {len(cars)}")
        k, n = int(m[1]), int(m[2])
        chosen = {c for i, c in enumerate(cars) if i % n == k - 1}
    return [s for s in samples if s.car not in chosen], [s for s in samples if s.car in chosen]


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


# --- the submission

def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask; the empty mask is the empty string.

    Works on the bytes of the mask (uint8 comparison, then flatnonzero): about three times
    faster than the textbook pad/diff/where kernel (see benchmarks/bench_rle.py).
    """
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1).view(np.uint8)
    if flat.size == 0:
        return ""
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        edges = np.concatenate(([0], edges))
    if flat[-1]:
        edges = np.concatenate((edges, [flat.size]))
    edges[1::2] -= edges[::2]
    edges[::2] += 1
    return " ".join(map(str, edges.tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode to a bool mask of `shape` (height, width); raises ValueError on malformed runs."""
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    if not isinstance(rle, str) or not rle.strip():
        return mask.reshape(shape)
    numbers = np.array(rle.split(), dtype=np.int64)
    if numbers.size % 2:
        raise ValueError(f"RLE has an odd number of values ({numbers.size})")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > mask.size).any():
        raise ValueError(f"RLE runs fall outside a mask of shape {shape}")
    for s, n in zip(starts.tolist(), lengths.tolist()):
        mask[s : s + n] = True
    return mask.reshape(shape)


Chunk = tuple[int, list]  # chunk number, its items in order


class ChunkStore:
    def __init__(self, root: str | Path, key: str, columns: list[str], size: int, names: Sequence[str]):
        listing = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
        self.folder = Path(root) / f"{key}-{size}-{listing}"  # created by the first write: nothing on disk before work
        self.key, self.columns, self.size = key, columns, size

    def path(self, k: int) -> Path:
        return self.folder / f"part-{k:06d}.csv"

    def done(self) -> set[int]:
        """Numbers of the finished chunks, from the file names alone."""
        return {int(p.name[5:11]) for p in self.folder.glob("part-*.csv")} if self.folder.is_dir() else set()

    def todo(self, items: list) -> list[Chunk]:
        """The chunks of `items` (the run's whole image order) not yet written."""
        done = self.done()
        return [(k, items[k * self.size : (k + 1) * self.size]) for k in range(-(-len(items) // self.size)) if k not in done]

    def parts(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """The chunks one at a time, in chunk order; `columns` reads only those (not the RLE strings)."""
        for path in sorted(self.folder.glob("part-*.csv")) if self.folder.is_dir() else []:
            yield pd.read_csv(path, dtype=str, keep_default_na=False, usecols=columns)

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        parts = list(self.parts(columns))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns or self.columns, dtype=str)

    def write(self, k: int, rows: list[dict]) -> None:
        kill_point("chunk", k)
        write_csv(self.path(k), pd.DataFrame(rows, columns=self.columns))


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
