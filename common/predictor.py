"""Prediction in one file, in the shape of Lightning's prediction loop: the reader (every image
decoded once, ahead of the device) -> a stage's predict step on a batch of decoded images -> the
writer, given each result with its index; and the skeleton both stages' predict commands run on.

The reader's loader worker processes read the files and decode them with PIL (`read_image`) into
pinned uint8 tensors; on CUDA with torchvision installed, JPEG files travel as bytes instead and
nvjpeg decodes a whole batch on the GPU. Any failure becomes an error naming the file: never a
crash, never a silent drop.

Stage 1's step (`stage1_lowres.predict.Coarse.predict`: probability and box) and stage 2's
(`stage2_fullres.predict.Cascade.predict`: the same, then tiles, refiner and blend) are the only
two; `stage1 predict`, `stage2 predict`, validation, `evaluate`, `cutout` and the benchmarks all
stream through `stream`, so validation predicts exactly the way the submission is made.

The writer thresholds on the device and copies only the boolean mask back (`to_host`, without a
device-wide sync); a writer thread makes the RLE strings and writes each chunk file atomically
(`ChunkWriter`) while the device works on the next batch.
"""
from __future__ import annotations

import functools
import io
import multiprocessing
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.boxes import Box
from common.config import Settings
from common.data import Chunk, ChunkStore
from common.errors import ConfigError, ImageReadError
from common.io import ORIENTATION, read_image
from common.log import log
from common.model import amp_dtype, autocast, pick_device, precision_name

# --- the reader

JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]  # encoded bytes -> uint8 (3, H, W)


LoadedFile = tuple[int, torch.Tensor | None, bool, str]  # index, pixels (H, W, 3) or JPEG bytes, encoded?, error


Decoded = tuple[int, torch.Tensor | None, str]  # index, uint8 (3, H, W) on the device, error


def for_nvjpeg(data: bytes) -> bool:
    """A whole JPEG (SOI ... EOI) stored as shown: a truncated one goes to PIL, which names the problem,
    and one with an EXIF orientation to PIL, which turns it (nvjpeg ignores the tag)."""
    if not (data[:2] == b"\xff\xd8" and b"\xff\xd9" in data[-16:]):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the headers only
            return im.getexif().get(ORIENTATION, 1) == 1
    except (OSError, SyntaxError, ValueError):
        return False


class ImageFiles(Dataset):
    """File i of `paths`: decoded pixels, or the raw bytes of a whole JPEG when `encoded`."""

    def __init__(self, paths: list[Path], encoded: bool = False):
        self.paths, self.encoded = paths, encoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> LoadedFile:
        path = Path(self.paths[i])
        try:
            if self.encoded:
                try:
                    data = path.read_bytes()
                except OSError:
                    data = b""  # read_image below says why
                if for_nvjpeg(data):
                    return i, torch.frombuffer(bytearray(data), dtype=torch.uint8), True, ""
            return i, torch.from_numpy(read_image(path)), False, ""
        except ImageReadError as e:
            return i, None, False, str(e)


def _as_list(items: list[LoadedFile]) -> list[LoadedFile]:
    return items  # images differ in size: no stacking


@functools.cache
def nvjpeg_decoder(device: torch.device) -> JpegDecoder | None:
    """torchvision's batched GPU JPEG decoder on CUDA, probed once per device on a small JPEG; None
    (the reader processes decode with PIL, said in one line) where it is missing or fails."""
    if device.type != "cuda":
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        log.info(f"reader: torchvision is not installed, so JPEGs are decoded by PIL in the reader processes, not by nvjpeg on "
                 f"{device} (pip install torchvision)")
        return None

    def decode(data: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
        # nvJPEG's hardware engine does not wait for the stream it is given, and its outputs come from the
        # caching allocator, which hands back blocks that kernels queued on this stream may still read
        # (torchvision PR #9606, torchcodec PR #1634): so no decode starts before this stream is idle.
        # Needs CUDA: not testable on the CPU (benchmarks/gpu_check.py checks it on a GPU).
        torch.cuda.current_stream(dev).synchronize()  # a sync point, once per batch
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    try:
        decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)
    except RuntimeError as e:
        log.info(f"reader: nvjpeg cannot decode on {device} ({e}); JPEGs are decoded by PIL in the reader processes")
        return None
    return decode


def to_device(items: list[LoadedFile], paths: list[Path], device: torch.device, decode: JpegDecoder | None) -> list[Decoded]:
    """Move a loader batch to the device: pixels by an async copy from pinned memory, JPEG bytes through `decode`."""
    out: dict[int, Decoded] = {}
    for i, data, encoded, error in items:
        if not encoded:
            out[i] = (i, None if data is None else data.to(device, non_blocking=True).permute(2, 0, 1), error)
    jpegs = [(i, data) for i, data, encoded, _ in items if encoded]
    if jpegs:
        try:
            decoded = decode([d for _, d in jpegs], device)
        except RuntimeError:  # one bad file fails the batch: decode one by one, PIL for the rest
            decoded = [_decode_one(decode, d, device, paths[i]) for i, d in jpegs]
        for (i, _), image in zip(jpegs, decoded):
            out[i] = (i, image, "") if isinstance(image, torch.Tensor) else (i, None, image)
    return [out[i] for i, *_ in items]


def _decode_one(decode: JpegDecoder, data: torch.Tensor, device: torch.device, path: Path) -> torch.Tensor | str:
    try:
        return decode([data], device)[0]
    except RuntimeError:
        try:  # nvjpeg cannot do every JPEG (e.g. CMYK); PIL can, or names the problem
            return torch.from_numpy(read_image(path)).to(device).permute(2, 0, 1)
        except ImageReadError as e:
            return str(e)


def read_batches(paths: list[Path], device: torch.device, batch_size: int, workers: int) -> Iterator[list[Decoded]]:
    """Batches of decoded images on `device`, in the order of `paths`, read `workers` processes ahead."""
    decode = nvjpeg_decoder(device)
    if multiprocessing.current_process().daemon:
        workers = 0  # a daemonic process (e.g. a Dask worker left at its default) may not start reader processes
    loader = DataLoader(ImageFiles(paths, encoded=decode is not None), batch_size=batch_size, num_workers=workers,
                        collate_fn=_as_list, pin_memory=device.type == "cuda",  # pinned: the copy to the GPU is async
                        prefetch_factor=4 if workers else None)
    for items in loader:
        yield to_device(items, paths, device, decode)


# --- the device step

def predict_dtype(device: torch.device) -> torch.dtype | None:
    """Prediction's precision on `device` (the one policy, `amp_dtype`, for inference)."""
    return amp_dtype("auto", device, training=False)


def probabilities(net: nn.Module, x: torch.Tensor, device: torch.device, flip: bool = False, pad_to: int = 0) -> torch.Tensor:
    """(n, H, W) float32 probabilities of the net's one output channel, in `predict_dtype`: the inputs
    padded with zeros to `pad_to` (one static shape for a compiled net); with flip TTA the mirrored
    inputs ride in the same pass and the two predictions are averaged (both stages' one TTA)."""
    n = len(x)
    if n < pad_to:
        x = torch.cat([x, x.new_zeros(pad_to - n, *x.shape[1:])])
    if flip:
        x = torch.cat([x, x.flip(-1)])
    with autocast(device, predict_dtype(device)):
        p = torch.sigmoid(net(x.contiguous(memory_format=torch.channels_last)).float())[:, 0]
    if flip:
        half = len(p) // 2
        p = (p[:half] + p[half:].flip(-1)) / 2
    return p[:n]


@dataclass
class Prediction:
    """One image's result; the maps are float32 (height, width) tensors on the device."""

    width: int
    height: int
    box: Box  # the region the refiner sees, full-resolution pixels, x1/y1 exclusive
    found: bool  # stage 1 saw a car (False: the box is the whole image)
    coarse: torch.Tensor | None  # stage-1 probability upsampled (None when neither box nor refiner needs stage 1)
    prob: torch.Tensor | None  # the cascade's probability, 0 outside the box (None from stage 1 alone)


# decoded uint8 (3, H, W) images on the device and their boxes (None: stage 1 finds it) ->
# a prediction per image, or the reason it cannot be predicted
Step = Callable[[list[torch.Tensor], list[Box | None]], list[Prediction | str]]


def stream(step: Step, paths: list[Path], boxes: list[Box | None] | None, device: torch.device, batch_size: int,
           workers: int, desc: str = "") -> Iterator[tuple[int, Prediction | str]]:
    """(index into `paths`, prediction or the reason it failed, naming the file), in order, reading
    `workers` processes ahead of the device. With `desc`, a progress bar (images/s, ETA) and a
    summary line with the measured rate."""
    boxes = boxes or [None] * len(paths)
    started, done = time.monotonic(), 0
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if desc else True, mininterval=1.0)
    for batch in read_batches(paths, device, max(batch_size, 1), workers):
        ok = [(i, image) for i, image, _ in batch if image is not None]
        preds = dict(zip([i for i, _ in ok], step([image for _, image in ok], [boxes[i] for i, _ in ok]))) if ok else {}
        for i, _, error in batch:
            pred = preds.get(i, error)
            yield i, f"{paths[i]}: {pred}" if i in preds and isinstance(pred, str) else pred  # a reason names its file
        done += len(batch)
        bar.update(len(batch))
    bar.close()
    if desc and done:
        seconds = time.monotonic() - started
        log.info(f"{desc}: {done} images in {seconds:.1f} s ({done / seconds:.1f} images/s on {device} in {precision_name(predict_dtype(device))})")


# --- the writer

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


# --- the predict commands' skeleton

def mask_threshold(cfg: Settings, strict: bool = True) -> float:
    """The cascade's mask threshold: `predict.threshold`, or with `auto` the one that gave the best
    mean validation Dice in the last `carvana evaluate` (report/threshold_sweep.csv). `strict=False`
    (training, evaluation itself) falls back to 0.5 while no sweep exists yet."""
    value = cfg.predict.threshold
    if value != "auto":
        return float(value)
    path = Path(cfg.output.dir) / "report" / "threshold_sweep.csv"
    if not path.is_file():
        if strict:
            raise ConfigError(f"predict.threshold=auto uses the best threshold of `carvana evaluate`, and {path} does not "
                              "exist yet: run `carvana evaluate` with the same config first, or set a number")
        return 0.5
    sweep = pd.read_csv(path)
    return float(sweep.threshold[sweep.dice_cascade.idxmax()])


@dataclass(frozen=True)
class Job:
    """A predict command's work, which `run_job` does here or as Dask tasks: it travels by pickle
    (settings, a chunk store, module-level functions), never as arrays or nets."""

    desc: str  # "stage 1 predict": the progress bar and the log lines
    cfg: Settings
    store: ChunkStore  # where the rows go; its key covers the checkpoints and the settings
    build: Callable[[Settings, torch.device], Any]  # the stage's predictor (Coarse, Cascade) on a device
    rows: Callable[[Any, list, "Job", str], Iterator[Callable[[], dict]]]
    # (predictor, items, this job, progress label) -> one row maker per item, in order; each runs in the writer thread
    noun: str = "images"  # what the items are, for the log


def run_job(job: Job, items: list) -> None:
    """Predict the chunks of `items` (the run's whole image order, each item's first field the image
    name) not finished yet: in this process, or one Dask task per chunk on `predict.cluster`."""
    chunks = job.store.todo(items)
    todo = sum(len(chunk) for _, chunk in chunks)
    log.info(f"{job.desc}: {todo} {job.noun} to do, {len(items) - todo} already done (key {job.store.key})")
    if chunks and job.cfg.predict.cluster:
        from common.cluster import run_chunks

        run_chunks(job.cfg.predict.cluster, predict_chunks, chunks, (job,), job.desc)
    elif chunks:
        predict_chunks(chunks, job, job.build(job.cfg, pick_device(job.cfg.device)))


def predict_chunks(chunks: list[Chunk], job: Job, predictor: Any = None) -> int:
    """The items of `chunks` predicted and each chunk's file written; returns the number of images.
    Without `predictor` (a Dask task), the worker builds it once and keeps it for its next tasks."""
    desc = job.desc if predictor is not None else ""  # on a Dask worker the client's bar reports the rate
    if predictor is None:
        from common.cluster import cached, worker_device

        predictor = cached(job.store.key, lambda: job.build(job.cfg, worker_device(job.cfg.device)))
    items = [item for _, chunk in chunks for item in chunk]
    with ChunkWriter(job.store, chunks) as writer:
        for make_row in job.rows(predictor, items, job, desc):
            writer.add(make_row)
    return len(items)
