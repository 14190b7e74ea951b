"""The writers, in the shape of Lightning's `BasePredictionWriter`: given each image's result with
its index, a writer starts the result's planes on their way to the host (an event, not a device-wide
sync: `to_host_all`) and does its work on them in one background thread, while the device works on
the next batch. The queue to that thread is bounded: each waiting item holds full-resolution planes
in host memory. `ChunkWriter` makes the predict commands' rows and writes each planned chunk
atomically as soon as its rows are in; `carvana cutout` writes its pictures with one of its own.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from common.data.chunks import Chunk, ChunkStore, Row
from common.prediction.step import Prediction, Result
from common.prediction.transfer import to_host_all

QUEUED = 8  # items waiting for the writer thread at most


@dataclass(frozen=True)
class Output:
    """What a writer is given for item `index`: its result and, for a prediction, the planes its
    writer needs (bool or uint8 tensors on the device: the mask, the alpha)."""

    index: int
    result: Result
    mask: torch.Tensor | None = None
    alpha: torch.Tensor | None = None


@dataclass(frozen=True)
class OnHostOutput:
    """An `Output` in the writer thread: the planes as host arrays. A Prediction arrives without its
    full-resolution maps (`coarse`, `prob` None): they are freed as soon as the item is queued."""

    index: int
    result: Result
    mask: np.ndarray | None
    alpha: np.ndarray | None


class PredictionWriter:
    """One background thread and a bounded queue to it; `write_on_host` is what a writer does with
    each item, in the order the items come. After a failed item nothing more is written: the items
    after it would land in the wrong places."""

    def __init__(self, name: str):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.pending: deque[Future] = deque()
        self.broken = False

    def write_on_host(self, output: OnHostOutput) -> None:
        raise NotImplementedError

    def write(self, output: Output) -> None:
        """Queue the next item; its planes start their way to the host here."""
        planes = [t for t in (output.mask, output.alpha) if t is not None]
        wait = to_host_all(planes) if planes else None
        if isinstance(output.result, Prediction):  # the queue keeps no full-resolution map alive
            output = replace(output, result=replace(output.result, coarse=None, prob=None))
        self.pending.append(self.pool.submit(self._on_host, output, wait))
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # raise a writer error here, in the caller's thread
        while len(self.pending) > QUEUED:
            self.pending.popleft().result()

    def _on_host(self, output: Output, wait: Callable[[], list[np.ndarray]] | None) -> None:
        if self.broken:
            return
        try:
            arrays = iter(wait() if wait is not None else [])
            mask = next(arrays) if output.mask is not None else None
            alpha = next(arrays) if output.alpha is not None else None
            self.write_on_host(OnHostOutput(output.index, output.result, mask, alpha))
        except BaseException:
            self.broken = True
            raise

    def close(self) -> None:
        """Wait for every queued item."""
        try:
            while self.pending:
                self.pending.popleft().result()
        except BaseException:  # a failed item or Ctrl-C while waiting: nothing more is written
            self.stop()
            raise
        self.pool.shutdown()

    def stop(self) -> None:
        """Keep what is written, drop the queued items."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # interrupted
            self.stop()


MakeRow = Callable[[OnHostOutput], Row]  # an item's row of a chunk file


class ChunkWriter(PredictionWriter):
    """Rows made by `row` in the writer thread; each planned chunk is written as soon as its rows are in."""

    def __init__(self, store: ChunkStore, chunks: list[Chunk], row: MakeRow):
        super().__init__("chunk-writer")
        self.store, self.row, self.rows, self.next = store, row, [], 0
        self.plan = deque(
            (chunk.number, len(chunk.items)) for chunk in chunks
        )  # which chunk the next rows fill, and how many

    def write(self, output: Output) -> None:
        if output.index != self.next:
            raise RuntimeError(f"{self.store.folder}: output {output.index} came when {self.next} was due")
        self.next += 1
        super().write(output)

    def write_on_host(self, output: OnHostOutput) -> None:
        self.rows.append(self.row(output))
        k, n = self.plan[0]
        if len(self.rows) == n:
            self.store.write(k, self.rows)
            self.plan.popleft()
            self.rows = []

    def close(self) -> None:
        """Wait for every queued row; every planned chunk must then be written."""
        super().close()
        if self.plan:
            raise RuntimeError(f"{self.store.folder}: chunks {[k for k, _ in self.plan]} got fewer rows than planned")
