"""The predict commands' skeleton: a command says what it predicts as a `Job` (the shape of a
LightningModule's predict step with its prediction writer) and `run_job` does the rest, for both
stages: the chunks not finished yet, here or as Dask tasks (`predict.cluster`), the predictor
streamed over the images, each output handed to the `ChunkWriter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from common.config import Settings
from common.data.chunks import Chunk, ChunkStore, Row
from common.log import log
from common.model import pick_device, use_device
from common.model_source import ModelSource
from common.prediction.step import Predictor
from common.prediction.writer import ChunkWriter, OnHostOutput, Output


@dataclass(frozen=True, kw_only=True)
class Job:
    """A predict command's work over a list of items (one per image, in the run's order). It travels
    to Dask workers by pickle (settings, the model source with its hashes, a chunk store), never as
    arrays or nets."""

    desc: str  # "stage 1 predict": the progress bar and the log lines
    cfg: Settings
    source: ModelSource  # the nets; a worker's loads are checked against the hashes the chunk key holds
    store: ChunkStore  # where the rows go; its key covers the checkpoints and every setting that changes them
    noun: str = "images"  # what the items are, for the log

    def build(self, device: torch.device) -> Predictor:
        """The stage's predictor on `device`, its nets loaded."""
        raise NotImplementedError

    def outputs(self, predictor: Predictor, items: list, desc: str) -> Iterator[Output]:
        """Every item's output, in order (`desc`: the progress bar's label, empty for none)."""
        raise NotImplementedError

    def row(self, item: Any, output: OnHostOutput) -> Row:
        """The item's row of the chunk file, made in the writer thread from its output on the host."""
        raise NotImplementedError


def run_job(job: Job, items: list) -> None:
    """Predict the chunks of `items` (the run's whole image order) not finished yet: in this
    process, or one Dask task per chunk on `predict.cluster`."""
    chunks = job.store.todo(items)
    todo = sum(len(chunk.items) for chunk in chunks)
    log.info(f"{job.desc}: {todo} {job.noun} to do, {len(items) - todo} already done (key {job.store.key})")
    if chunks and job.cfg.predict.cluster:
        from common.prediction.cluster import run_chunks

        run_chunks(job.cfg.predict.cluster, predict_chunks, chunks, (job,), job.desc)
    elif chunks:
        predict_chunks(chunks, job, job.build(pick_device(job.cfg.device)))


def predict_chunks(chunks: list[Chunk], job: Job, predictor: Predictor | None = None) -> int:
    """The items of `chunks` predicted and each chunk's file written; returns the number of images.
    Without `predictor` (a Dask task), the worker builds it once and keeps it for its next tasks."""
    if predictor is not None:
        return _predict(chunks, job, predictor, job.desc)
    from common.prediction.cluster import cached, worker_device

    with cached(job.store.key, lambda: _build_on_worker(job, worker_device(job.cfg.device))) as predictor:
        use_device(predictor.device)  # this task's thread may not be the one that built it
        return _predict(chunks, job, predictor, "")  # on a Dask worker the client's bar reports the rate


def _build_on_worker(job: Job, device: torch.device) -> Predictor:
    predictor = job.build(device)
    log.info(f"{job.desc}: nets loaded on {device}, kept for this worker's next tasks")
    return predictor


def _predict(chunks: list[Chunk], job: Job, predictor: Predictor, desc: str) -> int:
    items = [item for chunk in chunks for item in chunk.items]
    with ChunkWriter(job.store, chunks, lambda output: job.row(items[output.index], output)) as writer:
        for output in job.outputs(predictor, items, desc):
            writer.write(output)
    return len(items)
