"""Prediction results in resumable chunk files, and the submission and errors.csv made from them.

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
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol, Sequence

import pandas as pd

from common.io import atomic_path, write_csv
from common.log import log


class Row(Protocol):
    """A row of a chunk file: a small dataclass of its command's (`CoarseRow`, `MaskRow`)."""

    def record(self) -> dict:
        """The row as the file holds it, column by column."""


class Chunk(NamedTuple):
    number: int  # k: the chunk holds items [k * size, (k + 1) * size) of the run's order
    items: list  # in order


class ChunkStore:
    def __init__(self, root: str | Path, key: str, columns: list[str], size: int, names: Sequence[str]):
        listing = hashlib.sha256("\n".join(names).encode()).hexdigest()[
            :8
        ]  # not `digest`: the folder names of runs stay
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
        return [
            Chunk(k, items[k * self.size : (k + 1) * self.size])
            for k in range(-(-len(items) // self.size))
            if k not in done
        ]

    def parts(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """The chunks one at a time, in chunk order; `columns` reads only those (not the RLE strings)."""
        for path in sorted(self.folder.glob("part-*.csv")) if self.folder.is_dir() else []:
            yield pd.read_csv(path, dtype=str, keep_default_na=False, usecols=columns)

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        parts = list(self.parts(columns))
        return (
            pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns or self.columns, dtype=str)
        )

    def write(self, k: int, rows: list[Row]) -> None:
        write_csv(self.path(k), pd.DataFrame([row.record() for row in rows], columns=self.columns))


def write_submission(path: Path, store: ChunkStore, order: list[str]) -> int:
    """Stream the rows of `store` (img, rle_mask, error) into a gzipped submission in `order`.

    Chunks hold images in processing order, which is `order`, so this reads one chunk at a time:
    memory does not grow with the number of test images. Returns the number of rows written.
    """
    position = pd.Index(order)  # its hash table is built once: a lookup per chunk costs the chunk, not the whole order
    written = 0
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
    ):
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
    """Put the images this stage's command could not read or predict (img, reason) into `<out>/errors.csv`,
    keeping other stages' rows."""
    path = out / "errors.csv"
    old = (
        pd.read_csv(path, dtype=str, keep_default_na=False)
        if path.is_file()
        else pd.DataFrame(columns=["img", "stage", "reason"])
    )
    merged = pd.concat(
        [old[old["stage"] != stage], errors.assign(stage=stage)[["img", "stage", "reason"]]], ignore_index=True
    )
    if len(merged) or path.is_file():
        write_csv(path, merged.sort_values(["stage", "img"]))


def finish_predictions(out: Path, store: ChunkStore, stage: str, submission: str, order: list[str]) -> int:
    """Write the submission (the test images of `order`) and errors.csv from the chunks; exit status 1
    if any image failed, so scripts notice."""
    frame = store.frame(["img", "error"])
    errors = frame[frame["error"] != ""].rename(columns={"error": "reason"})
    rows = write_submission(out / submission, store, order)
    write_errors(out, errors, stage)
    log.info(f"{stage}: wrote {out / submission} ({rows} rows)")
    if len(errors):
        log.warning(f"{stage}: {len(errors)} of {len(frame)} image(s) failed, listed in {out / 'errors.csv'}")
        return 1
    return 0
