"""The batcher: the bounded queue of decoded photos and one batching task per device replica of the
nets. A task takes the first waiting photo, waits up to `serve.max_wait_ms` for more (up to
`serve.max_batch`) and runs them through `Cascade.predict`, as `stage2 predict` and `carvana cutout`
do, in one device step on that device's own thread. The nets load and warm up in a thread while the
server already answers (503 until ready). The work is bounded twice: photos waiting (`serve.max_queue`)
and pixels in flight, from decoding to the answer (`serve.max_pixels_in_flight`, counted before decoding)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch

from common.config import Settings
from common.errors import Failure
from common.log import log
from common.model import batch_buckets, pick_device, use_device
from common.model_source import ModelSource
from pipelines.picture import Cut, cut_photos
from pipelines.serve.metrics import Metrics
from stage2_fullres.cascade import Cascade

try:
    # glibc keeps freed full-resolution buffers in the threads' malloc arenas, so a busy server's RSS climbs;
    # malloc_trim after a step hands the free pages back (docs/experiments/2026-12-serve-memory.md). Absent
    # outside glibc (macOS, musl): no trim.
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError):
    _malloc_trim = None


class Busy(Exception):
    """The server holds all the work it may (serve.max_pixels_in_flight): the client retries later (503)."""


class Batcher:
    """The bounded queue and one batching task per device replica of the source's nets."""

    def __init__(self, cfg: Settings, source: ModelSource, metrics: Metrics):
        self.cfg, self.s, self.source, self.metrics = cfg, cfg.serve, source, metrics
        self.name, self.threshold = source.name, source.threshold  # the model's name on /v2/models/{name}
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.s.max_queue)
        self.cascades: list[Cascade] = []  # one per device of serve.devices
        self.steps: list[ThreadPoolExecutor] = []  # a device step thread per replica
        self.tasks: list[asyncio.Task] = []
        self.ready = threading.Event()  # the nets are loaded and warmed up
        self.failed = ""  # why the nets could not be loaded, as a client may read it (the log has the details)
        self.pixels = 0  # of the photos decoded (or being decoded) and not yet answered
        self.stopping = threading.Event()  # SIGTERM: no further warm-up, not ready, the requests in flight finish
        # few, long-lived threads: each thread that allocates gets its own malloc arena, and a pool that
        # rotates through many of them makes the server's memory grow (rembg's server-mode complaint)
        self.host = ThreadPoolExecutor(2, thread_name_prefix="serve-host")  # decoding and encoding photos
        self.trimmed = 0.0  # when the heap was last trimmed (the event loop's clock)

    async def on_host(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` off the event loop, on the host threads."""
        return await asyncio.get_running_loop().run_in_executor(self.host, fn, *args)

    async def open(self) -> None:
        """Load and warm up the nets in a thread, while the server already answers (/healthz: 503,
        loading), then start a batching task per device."""
        await asyncio.to_thread(self.load)
        if self.ready.is_set():
            self.tasks = [
                asyncio.create_task(self._work(c, step)) for c, step in zip(self.cascades, self.steps, strict=True)
            ]

    def load(self) -> None:
        try:
            self.cascades = [
                Cascade.load(self.source, self.cfg, pick_device(name)) for name in self.s.devices or [self.cfg.device]
            ]
            # a step thread per device, its current CUDA device set once (`use_device`)
            self.steps = [
                ThreadPoolExecutor(
                    1, thread_name_prefix=f"serve-{c.device}", initializer=use_device, initargs=(c.device,)
                )
                for c in self.cascades
            ]
            for cascade, step in zip(self.cascades, self.steps, strict=True):  # one device at a time: torch.compile
                if self.stopping.is_set():  # is not promised to be safe compiling on several at once
                    break
                step.submit(self.warm_up, cascade).result()
            if self.stopping.is_set():  # stopped while loading: `stop` may have run before these pools existed
                for pool in self.steps:
                    pool.shutdown(wait=False, cancel_futures=True)
                return
            self.ready.set()
            log.info(f"serve: nets loaded and warmed up on {', '.join(str(c.device) for c in self.cascades)}")
        except Exception as e:  # the server keeps answering, /healthz says that it failed; the log says why
            self.failed = f"{type(e).__name__} (the server's log says why)"
            log.warning(f"serve: cannot load the nets: {type(e).__name__}: {e}")

    def warm_up(self, cascade: Cascade) -> None:
        """A device step on blank photos for each batch size the nets are padded to (`batch_buckets`: one
        tile a photo) before the server says it is ready: it compiles the nets (predict.compile: tens of
        seconds) and lets cuDNN pick its kernels for each padded shape, so the first clients do not wait
        for it and time out. A blank photo has no outline: with the band, the refiner's patch shapes
        (`Cascade.buckets`) are warmed up on their own."""
        log.info(f"serve: warming up on {cascade.device}")
        blank = np.full((cascade.tile, cascade.tile, 3), 128, np.uint8)
        for photos in batch_buckets(cascade.device, self.cfg.predict.compile, cascade.batch_size) or (1,):
            self._predict(cascade, [blank] * photos)
        if cascade.refine_band:
            for n in cascade.buckets:  # empty on a CPU: nothing is padded there
                side = cascade.patch
                rgb = torch.zeros(n, 3, side, side, dtype=torch.uint8, device=cascade.device)
                prior = torch.zeros(n, 1, side, side, device=cascade.device) if cascade.coarse_channel else None
                with torch.no_grad():
                    cascade.refine(rgb, prior)

    def stop(self) -> None:
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        for pool in [self.host, *self.steps]:
            pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def holding(self, pixels: int) -> Iterator[None]:
        """A photo's `pixels` counted in flight while the block decodes, cuts and answers it; Busy, before
        any of that, when they would take the server past serve.max_pixels_in_flight."""
        if self.pixels + pixels > self.s.max_pixels_in_flight:
            raise Busy(
                f"busy: {self.pixels} pixels are at work and this photo's {pixels} would pass "
                f"serve.max_pixels_in_flight={self.s.max_pixels_in_flight}; retry"
            )
        self.pixels += pixels
        self.metrics.pixels.set(self.pixels)
        try:
            yield
        finally:
            self.pixels -= pixels
            self.metrics.pixels.set(self.pixels)

    async def cut(self, rgb: np.ndarray) -> Cut | Failure:
        """The photo's cut, after it has waited its turn; QueueFull when the queue is full."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((rgb, future))
        self.metrics.queue.inc()
        try:
            return await future
        finally:
            self.metrics.queue.dec()

    async def _work(self, cascade: Cascade, step: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.s.max_wait_ms / 1000
            while len(batch) < self.s.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
                except asyncio.TimeoutError:
                    break
            batch = [(rgb, f) for rgb, f in batch if not f.done()]  # a timed-out request is not predicted
            if not batch:
                continue
            self.metrics.batch.observe(len(batch))
            try:
                cuts = await loop.run_in_executor(step, self._predict, cascade, [rgb for rgb, _ in batch])
            except Exception as e:  # a failed step fails its requests, not the server
                cuts = [e] * len(batch)
            for (_, future), cut in zip(batch, cuts, strict=True):
                if not future.done():
                    future.set_exception(cut) if isinstance(cut, Exception) else future.set_result(cut)
            del batch, cuts  # the step's photos and alphas now live only in their requests
            # after the step that leaves the queue empty, so an idle server holds no garbage; under load at most
            # once a second, so a GPU's millisecond steps do not each walk the heap
            if _malloc_trim is not None and (self.queue.empty() or loop.time() - self.trimmed >= 1):
                self.trimmed = loop.time()
                step.submit(_malloc_trim, 0)  # on the step's thread, ahead of the next step; the loop does not wait

    def _predict(self, cascade: Cascade, photos: list[np.ndarray]) -> list[Cut | Failure]:
        """One device step for the batch (`cut_photos`), a failure named as the upload it is."""
        return [
            cut.named("upload") if isinstance(cut, Failure) else cut
            for cut in cut_photos(cascade, photos, self.threshold)
        ]
