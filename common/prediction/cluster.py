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
import re
import sys
import threading
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class WorkerPlace:
    """What a Dask worker can see of its place on its machine."""

    name: object  # an int on a LocalCluster, "NAME-K" from `dask worker --nworkers`, else its address
    address: str
    neighbours: tuple[str, ...]  # the addresses of the workers on this worker's host, itself included
    visible: str | None  # CUDA_VISIBLE_DEVICES as the worker's process sees it
    dask_cuda: bool  # started by dask-cuda, which lists each worker's own GPU first in CUDA_VISIBLE_DEVICES

    @classmethod
    def here(cls) -> WorkerPlace:
        """This Dask worker's place (in one of its tasks), the scheduler asked for its host's workers."""
        from distributed import get_client, get_worker

        worker = get_worker()
        workers = get_client().scheduler_info()["workers"]
        host = workers.get(worker.address, {}).get("host")
        return cls(
            worker.name,
            worker.address,
            tuple(sorted(a for a, info in workers.items() if info.get("host") == host)),
            os.environ.get("CUDA_VISIBLE_DEVICES"),
            "dask_cuda" in sys.modules,
        )


@dataclass(frozen=True)
class GpuChoice:
    index: int  # of the GPUs the worker sees
    reason: str
    sure: bool  # False: a guess that two workers could share a GPU, said in a warning


def worker_gpu(place: WorkerPlace, gpus: int) -> GpuChoice:
    """Which of the `gpus` a worker sees is its own, from the surest evidence it has: a single visible GPU
    (CUDA_VISIBLE_DEVICES naming one, as SLURM or `CUDA_VISIBLE_DEVICES=N dask worker` give it); dask-cuda's
    list, which puts the worker's own GPU first; the number in its name (a LocalCluster's workers are
    0..N-1, `dask worker --nworkers N` names them NAME-0..NAME-N-1); else its place among its host's
    workers by address, a guess (a worker joining later changes the order)."""
    if gpus == 1:
        return GpuChoice(0, "the one GPU it sees", True)
    if place.visible and place.dask_cuda:
        return GpuChoice(0, f"dask-cuda's CUDA_VISIBLE_DEVICES={place.visible} lists its own GPU first", True)
    number = place.name if isinstance(place.name, int) else None
    if isinstance(place.name, str) and (m := re.fullmatch(r"(?:.*-)?(\d+)", place.name)) and "://" not in place.name:
        number = int(m[1])
    if number is not None:
        fits = number < gpus
        why = f"worker number {number} of its name" + ("" if fits else f", more workers than its {gpus} GPUs")
        return GpuChoice(number % gpus, why, fits)
    if place.address in place.neighbours:
        k, n = place.neighbours.index(place.address), len(place.neighbours)
        why = f"its place {k + 1} of {n} among its host's workers by address"
        return GpuChoice(k % gpus, why, n == 1)
    return GpuChoice(0, "nothing tells its GPU", False)


def worker_device(name: str) -> torch.device:
    """`auto` on a Dask worker: its own GPU (`worker_gpu`), said in a warning where it is a guess; the
    worker's current CUDA device is set to it (`pick_device`)."""
    if name != "auto" or not torch.cuda.is_available():
        return pick_device(name)
    place = WorkerPlace.here()
    choice = worker_gpu(place, torch.cuda.device_count())
    if not choice.sure:
        log.warning(
            f"Dask worker {place.name}: cuda:{choice.index} chosen by {choice.reason}, which cannot rule out "
            "another worker on the same GPU; give each worker its GPU (CUDA_VISIBLE_DEVICES=N dask worker ..., "
            "or dask-cuda), or name one (device=cuda:N)"
        )
    return pick_device(f"cuda:{choice.index}")


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
