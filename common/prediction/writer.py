"""The writer, in the shape of Lightning's `BasePredictionWriter`: given each image's result with
its index, it makes the image's row in a background thread (the mask's RLE string, while the device
works on the next batch) and writes each planned chunk atomically as soon as its rows are in.

Only the thresholded mask leaves the device, and its copy to the host is awaited by an event, not
a device-wide sync (`to_host`).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from common.data.chunks import Chunk, ChunkStore
from common.prediction.step import Prediction, Result

OnHost = Callable[[], np.ndarray]  # waits for a copy to the host, then gives the array


def to_host(tensor: torch.Tensor) -> OnHost:
    """Start copying a tensor (a bool mask, a batch of probabilities) to the host without stalling the
    device queue; the returned function waits for that copy alone (an event, not a device-wide sync)
    and gives the array."""
    wait = to_host_all([tensor])
    return lambda: wait()[0]


def to_host_all(tensors: list[torch.Tensor]) -> Callable[[], list[np.ndarray]]:
    """`to_host` for tensors on one device, all awaited at once: one host sync for a whole batch."""
    if not tensors or tensors[0].device.type != "cuda":
        return lambda: [tensor.cpu().numpy() for tensor in tensors]  # cpu(): a no-op on the CPU
    hosts = [torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) for tensor in tensors]
    for host, tensor in zip(hosts, tensors):
        host.copy_(tensor, non_blocking=True)  # queued on the current stream of the tensors' device
    done = torch.cuda.Event()
    # recorded on that same stream: a bare record() goes to the current device's stream, which is
    # another GPU's on a worker computing on cuda:1, and would not wait for these copies.
    # Needs CUDA: not testable on the CPU (benchmarks/gpu_check.py runs two devices where there are two).
    done.record(torch.cuda.current_stream(tensors[0].device))

    def wait() -> list[np.ndarray]:
        done.synchronize()
        return [host.numpy() for host in hosts]

    return wait


@dataclass(frozen=True)
class Output:
    """What the writer is given for item `index` of a job: its result and, for a prediction, the mask
    whose RLE goes into the row (a bool tensor on the device; the writer copies it to the host)."""

    index: int
    result: Result
    mask: torch.Tensor | None = None


# (item index, result, mask on the host) -> the chunk row; a Prediction reaches it without its full-resolution
# maps (`coarse`, `prob` None): a row is made of the box, the size and the mask
Row = Callable[[int, Result, np.ndarray | None], dict]


class ChunkWriter:
    """Rows made by `row` in one background thread, in the order the outputs come; each planned chunk
    is written as soon as its rows are in."""

    def __init__(self, store: ChunkStore, chunks: list[Chunk], row: Row):
        self.store, self.row, self.rows, self.next, self.broken = store, row, [], 0, False
        self.plan = deque((chunk.number, len(chunk.items)) for chunk in chunks)  # which chunk the next rows fill, and how many
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
        self.pending: deque[Future] = deque()

    def write(self, output: Output) -> None:
        """Queue the next item's row; its mask starts its way to the host here, the row is made in the writer thread."""
        if output.index != self.next:
            raise RuntimeError(f"{self.store.folder}: output {output.index} came when {self.next} was due")
        self.next += 1
        mask = None if output.mask is None else to_host(output.mask)
        result = output.result
        if isinstance(result, Prediction):  # a row uses the box and the size: the full-resolution maps are freed now
            result = replace(result, coarse=None, prob=None)
        self.pending.append(self.pool.submit(self._add, output.index, result, mask))
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # raise a writer error here, in the caller's thread
        while len(self.pending) > 8:  # bounded: each row waiting for the writer holds a full-resolution mask in host memory
            self.pending.popleft().result()

    def _add(self, index: int, result: Result, mask: OnHost | None) -> None:
        if self.broken:  # a row before this one failed: a chunk made of the rows after it would hold the wrong images
            return
        try:
            self.rows.append(self.row(index, result, None if mask is None else mask()))
            k, n = self.plan[0]
            if len(self.rows) == n:
                self.store.write(k, self.rows)
                self.plan.popleft()
                self.rows = []
        except BaseException:
            self.broken = True
            raise

    def close(self) -> None:
        """Wait for every queued row; every planned chunk must then be written."""
        try:
            while self.pending:
                self.pending.popleft().result()
        except BaseException:  # a failed row or Ctrl-C while waiting: nothing more is written
            self.stop()
            raise
        self.pool.shutdown()
        if self.plan:
            raise RuntimeError(f"{self.store.folder}: chunks {[k for k, _ in self.plan]} got fewer rows than planned")

    def stop(self) -> None:
        """Keep the whole chunks already written, drop the queued rows and the partial chunk."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # interrupted
            self.stop()
