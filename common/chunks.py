"""Resumable prediction results: rows written in small atomic chunk files on a fixed grid.

Chunk k holds the rows of images [k * size, (k + 1) * size) of the run's image order, in a file
named for k. A run killed at any point leaves only whole chunks; the rerun skips the chunks whose
files exist (one directory listing), whoever wrote them and in whatever order they were finished
(Dask workers on other machines included), and the final files read the chunks in k order, so
they are byte-identical to those of an uninterrupted run. The folder's name holds the key
(checkpoint, settings), the chunk size and a hash of the image list: another run's chunks are
never read.
"""
from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from common.faults import kill_point
from common.io import write_csv

Chunk = tuple[int, list]  # chunk number, its items in order


class ChunkStore:
    def __init__(self, root: str | Path, key: str, columns: list[str], size: int, names: Sequence[str]):
        listing = hashlib.sha256("\n".join(names).encode()).hexdigest()[:8]
        self.folder = Path(root) / f"{key}-{size}-{listing}"  # created by the first write: nothing on disk before work
        self.columns, self.size = columns, size

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


class ChunkWriter:
    """The prediction writer: rows built in one background thread (RLE strings from masks already
    on their way to the host) while the device works on the next batch; each planned chunk is
    written as soon as its rows are in. One thread keeps the rows in the order they were added.
    """

    def __init__(self, store: ChunkStore, chunks: list[Chunk]):
        self.store, self.rows = store, []
        self.plan = deque((k, len(items)) for k, items in chunks)  # which chunk the next rows fill, and how many
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
        self.pending: deque[Future] = deque()

    def add(self, make_row: Callable[[], dict]) -> None:
        """Queue the next row of the planned chunks; `make_row` runs in the writer thread."""
        self.pending.append(self.pool.submit(self._add, make_row))
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # raise a writer error here, in the caller's thread
        while len(self.pending) > 8:  # bounded: each row waiting for the writer holds a full-resolution mask in host memory
            self.pending.popleft().result()

    def _add(self, make_row: Callable[[], dict]) -> None:
        self.rows.append(make_row())
        k, n = self.plan[0]
        if len(self.rows) == n:
            self.store.write(k, self.rows)
            self.plan.popleft()
            self.rows = []

    def close(self) -> None:
        """Wait for every queued row; every planned chunk must then be written."""
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown()
        if self.plan:
            raise RuntimeError(f"{self.store.folder}: chunks {[k for k, _ in self.plan]} got fewer rows than planned")

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # interrupted: keep the whole chunks already written, drop the partial one
            self.pool.shutdown(wait=True, cancel_futures=True)


def to_host(tensor: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start copying a tensor (a bool mask, a batch of probabilities) to the host without stalling the
    device queue; the returned function waits for that copy alone (an event, not a device-wide sync)
    and gives the array."""
    if tensor.device.type != "cuda":
        return tensor.numpy
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)  # queued on the current stream of the tensor's device
    done = torch.cuda.Event()
    # recorded on that same stream: a bare record() goes to the current device's stream, which is
    # another GPU's on a worker computing on cuda:1, and would not wait for this copy.
    # Needs CUDA: not testable on the CPU (benchmarks/gpu_check.py runs two devices where there are two).
    done.record(torch.cuda.current_stream(tensor.device))

    def wait() -> np.ndarray:
        done.synchronize()
        return host.numpy()

    return wait
