"""Prediction across GPUs and machines on Dask distributed (optional: `pip install '.[cluster]'`).

`predict.cluster` is empty (this process predicts), `local:N` (a LocalCluster of N worker
processes on this machine, one per GPU where there are GPUs) or a scheduler address such as
`tcp://host:8786` (a cluster the user runs: SSH, Kubernetes, SLURM through dask-jobqueue,
dask-cuda). The unit of work is one chunk of images: a task predicts it with the same code as a
local run and writes its chunk file atomically into the shared output folder, so a resumed or
retried run skips what is on disk and the final files do not depend on who finished first.
Checkpoints and boxes travel as paths and small tuples, never as arrays through the scheduler.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from common.data.chunks import Chunk
from common.errors import ClusterError, SetupError
from common.log import log
from common.model import pick_device

_LOADED: dict[str, Any] = {}  # per worker process: models loaded once, kept for all its tasks
_HELD = threading.Lock()


@contextlib.contextmanager
def cached(key: str, build: Callable[[], Any]) -> Iterator[Any]:
    """The worker's predictor for `key`, built once and held by one task at a time. A worker the user
    starts (`dask worker`, as many threads as cores) runs several tasks at once; one predictor's nets,
    CUDA stream and reader are not for concurrent use, and two tasks must not both build it."""
    with _HELD:
        if key not in _LOADED:
            _LOADED.clear()  # another checkpoint: drop the old nets first
            _LOADED[key] = build()
        yield _LOADED[key]


def worker_device(name: str) -> torch.device:
    """`auto` on a Dask worker of a LocalCluster: GPU number = worker number, so N workers use N GPUs;
    the worker's current CUDA device is set to it (`pick_device`)."""
    if name != "auto" or not torch.cuda.is_available():
        return pick_device(name)
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        index = 0
    return pick_device(f"cuda:{index % torch.cuda.device_count()}")


@contextlib.contextmanager
def connect(spec: str) -> Iterator[Any]:
    """A Dask client for `predict.cluster`, closed (and a LocalCluster with it) when the block ends,
    however it ends; an unreachable scheduler is one clear error, before any work."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SetupError(f"predict.cluster={spec} needs Dask distributed: pip install '.[cluster]'") from None
    if spec.startswith("local:"):
        # the scope ends after the cluster is closed: no nanny restarts a worker outside it
        with (
            local_cluster_scope(),
            LocalCluster(
                n_workers=int(spec[6:]), threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(spec, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise ClusterError(f"predict.cluster={spec}: cannot reach the Dask scheduler ({e})") from None
    with client:
        yield client


@contextlib.contextmanager
def local_cluster_scope() -> Iterator[None]:
    """What a LocalCluster changes in this process, for its lifetime only: its workers are not
    daemonic (they may start reader processes of their own), and the environment its nannies write
    here for each worker they (re)start (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...) is taken
    back afterwards, so that this process's later child processes run with its own settings."""
    import dask

    saved = dict(os.environ)
    try:
        with dask.config.set({"distributed.worker.daemon": False}):  # read by each nanny at each worker's (re)start
            yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


def run_chunks(spec: str, task: Callable[..., int], chunks: list[Chunk], args: tuple, desc: str) -> None:
    """task([chunk], *args) -> images done, for every chunk, on the cluster. Dask retries a task whose
    worker died; one bar over all chunks shows the rate across the cluster."""
    from distributed import as_completed

    with connect(spec) as client:
        workers = len(client.scheduler_info()["workers"])
        started, done = time.monotonic(), 0
        futures = [
            client.submit(task, [chunk], *args, key=f"{desc.replace(' ', '-')}-{chunk.number}", pure=False, retries=2)
            for chunk in chunks
        ]
        with tqdm(
            total=sum(len(chunk.items) for chunk in chunks),
            desc=f"{desc} ({workers} workers)",
            unit="img",
            disable=None,
        ) as bar:
            for future in as_completed(futures):
                n = future.result()
                done += n
                bar.update(n)
        seconds = time.monotonic() - started
        log.info(f"{desc}: {done} images in {seconds:.1f} s ({done / seconds:.1f} images/s on {workers} Dask workers)")
