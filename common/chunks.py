"""Resumable prediction results: rows written in small atomic chunk files under a keyed folder.

A run killed at any point leaves only whole chunks; the rerun skips the images they hold and the
final files are assembled from all chunks in a fixed order, so they are byte-identical to those of
an uninterrupted run. A folder for another key (checkpoint, settings) is never read.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from common.io import write_csv


class ChunkStore:
    def __init__(self, root: str | Path, key: str, columns: list[str]):
        self.folder = Path(root) / key
        self.columns = columns
        self.folder.mkdir(parents=True, exist_ok=True)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.csv"))

    def parts(self) -> Iterator[pd.DataFrame]:
        """The chunks one at a time, in the order they were written."""
        for path in self._parts():
            yield pd.read_csv(path, dtype=str, keep_default_na=False)

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All chunks as one frame; pass `columns` to leave out large ones (RLE strings)."""
        parts = [p[columns] if columns else p for p in self.parts()]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns or self.columns, dtype=str)

    def done(self) -> set[str]:
        return set(self.frame(["img"])["img"])

    def write(self, rows: list[dict]) -> None:
        if rows:
            n = len(self._parts())
            write_csv(self.folder / f"part-{n:06d}.csv", pd.DataFrame(rows, columns=self.columns))


class ChunkWriter:
    """The prediction writer: rows built in one background thread (RLE strings from masks already
    on their way to the host) while the device works on the next batch, written `chunk` rows at a
    time. One thread keeps the rows in the order they were added, which is submission order.
    """

    def __init__(self, store: ChunkStore, chunk: int):
        self.store, self.chunk, self.rows = store, chunk, []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
        self.pending: deque[Future] = deque()

    def add(self, make_row: Callable[[], dict]) -> None:
        """Queue one row; `make_row` runs in the writer thread."""
        self.pending.append(self.pool.submit(self._add, make_row))
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # raise a writer error here, in the caller's thread
        if len(self.pending) > 4 * self.chunk:  # bounded: results waiting for the writer hold device memory
            self.pending.popleft().result()

    def _add(self, make_row: Callable[[], dict]) -> None:
        self.rows.append(make_row())
        if len(self.rows) >= self.chunk:
            self.store.write(self.rows)
            self.rows = []

    def close(self) -> None:
        """Wait for every queued row and write the last, partial chunk."""
        while self.pending:
            self.pending.popleft().result()
        self.pool.submit(lambda: self.store.write(self.rows)).result()
        self.rows = []
        self.pool.shutdown()

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # interrupted: keep the whole chunks already written, drop the partial one
            self.pool.shutdown(wait=True, cancel_futures=True)


def mask_to_host(mask: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start copying a bool mask to the host without stalling the device queue; the returned
    function waits for that copy alone (an event, not a device-wide sync) and gives the array."""
    if mask.device.type != "cuda":
        return mask.numpy
    host = torch.empty(mask.shape, dtype=torch.bool, pin_memory=True)
    host.copy_(mask, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> np.ndarray:
        done.synchronize()
        return host.numpy()

    return wait
