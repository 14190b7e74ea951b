"""The reader: every image of a prediction decoded once, in reader processes ahead of the device.

The DataLoader's worker processes read the files and decode them with PIL (`read_image`) into
pinned uint8 tensors, copied to the device without blocking (the path the CPU tests run, the
default on every device). With `predict.decode=nvjpeg` on CUDA (torchvision installed), JPEG
files travel as bytes instead and nvjpeg decodes a whole batch on the GPU: for a machine with
too few cores for its GPU. Any failure becomes a `Failure` naming the file in the image's place:
never a crash, never a silent drop.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from common.data.images import ORIENTATION, read_image
from common.errors import Failure, ImageReadError
from common.log import log
from common.prediction.transfer import from_host

JpegDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]  # encoded bytes -> uint8 (3, H, W)


class Loaded(NamedTuple):  # a NamedTuple, so that the DataLoader pins its tensor
    index: int  # into the run's paths
    data: torch.Tensor | Failure  # pixels (H, W, 3), or the bytes of a whole JPEG when `encoded`
    encoded: bool


class Decoded(NamedTuple):
    index: int
    image: torch.Tensor | Failure  # uint8 (3, H, W) on the device


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

    def __getitem__(self, i: int) -> Loaded:
        path = Path(self.paths[i])
        try:
            if self.encoded:
                try:
                    data = path.read_bytes()
                except OSError:
                    data = b""  # read_image below says why
                if for_nvjpeg(data):
                    return Loaded(i, torch.frombuffer(bytearray(data), dtype=torch.uint8), True)
            return Loaded(i, torch.from_numpy(read_image(path)), False)
        except ImageReadError as e:
            return Loaded(i, Failure.of(e), False)


def _as_list(items: list[Loaded]) -> list[Loaded]:
    return items  # images differ in size: no stacking


def reader_processes(setting: int | Literal["auto"], device: torch.device) -> int:
    """`predict.workers`, resolved: auto is 0 on a CPU (decoding in the main process is fastest where
    the cores also run the nets); on a GPU the cores but one (the main process queues the device's
    work), shared by the visible GPUs (docs/benchmarks.md, "Cores per GPU")."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, (cores - 1) // max(torch.cuda.device_count(), 1))


@functools.cache
def nvjpeg_decoder(device: torch.device) -> JpegDecoder | None:
    """torchvision's batched GPU JPEG decoder on CUDA, probed once per device on a small JPEG; None
    (the reader processes decode with PIL, said in one line) where it is missing or fails."""
    if device.type != "cuda":
        return None
    instead = "JPEGs are decoded by PIL in the reader processes instead"
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        log.warning(f"reader: predict.decode=nvjpeg needs torchvision (pip install torchvision); {instead}")
        return None
    except Exception as e:  # a torchvision built for another torch fails in its own ways (RuntimeError, ...)
        log.warning(f"reader: torchvision cannot be imported ({_first_line(e)}); {instead}")
        return None
    side = torch.cuda.Stream(device)

    def decode(data: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
        # a stream of its own: nvJPEG does not wait for the stream it is given (docs/architecture.md, "The device
        # path"); the compute stream waits on the device, not the host. Needs CUDA (benchmarks/gpu_check.py)
        compute = torch.cuda.current_stream(dev)
        with torch.cuda.stream(side):
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
        compute.wait_stream(side)
        for image in images:
            image.record_stream(compute)  # its block is not reused before the compute stream is done with it
        return images

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    try:
        decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)
    except Exception as e:  # any: a torchvision without its image ops raises AttributeError, not RuntimeError
        log.warning(f"reader: nvjpeg cannot decode on {device} ({_first_line(e)}); {instead}")
        return None
    return decode


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def to_device(
    items: list[Loaded], paths: list[Path], device: torch.device, decode: JpegDecoder | None
) -> list[Decoded]:
    """Move a loader batch to the device: pixels by an async copy from pinned memory, JPEG bytes through `decode`."""
    out: dict[int, Decoded] = {}
    for item in items:
        if not item.encoded:
            image = (
                item.data
                if isinstance(item.data, Failure)
                else item.data.to(device, non_blocking=True).permute(2, 0, 1)
            )
            out[item.index] = Decoded(item.index, image)
    jpegs = [item for item in items if item.encoded]
    if jpegs:
        try:
            decoded = decode([item.data for item in jpegs], device)
        except RuntimeError:  # one bad file fails the batch: decode one by one, PIL for the rest
            decoded = [_decode_one(decode, item.data, device, paths[item.index]) for item in jpegs]
        for item, image in zip(jpegs, decoded, strict=True):
            out[item.index] = Decoded(item.index, image)
    return [out[item.index] for item in items]


def _decode_one(decode: JpegDecoder, data: torch.Tensor, device: torch.device, path: Path) -> torch.Tensor | Failure:
    try:
        return decode([data], device)[0]
    except RuntimeError as e:
        try:  # nvjpeg cannot do every JPEG (e.g. CMYK); PIL can, or names the problem
            image = from_host(read_image(path), device).permute(2, 0, 1)
        except ImageReadError as bad:
            return Failure.of(bad)
        log.warning(
            f"reader: nvjpeg cannot decode {path} ({str(e).splitlines()[0]}); decoded by PIL in the main process"
        )
        return image


# Photos decoded ahead of the device at most (reader processes x batches each prepares ahead x batch size).
# On CUDA each is pinned, and the caching host allocator keeps page-locked blocks for reuse, never handing
# them back: 128 Carvana photos (1918x1280x3) are 0.9 GiB, where 15 processes 4 batches of 8 ahead pinned
# 3.5 GB. 128 still lets 15 processes each prepare a batch of 8: the decoding that the fastest row of
# docs/benchmarks.md's "Cores per GPU" asks for.
PINNED_PHOTOS = 128


def read_ahead(batch_size: int, workers: int) -> tuple[int, int | None]:
    """(reader processes, batches each prepares ahead): PyTorch's default 2 batches a process where
    the photos ahead stay within PINNED_PHOTOS, else 1, else fewer processes (at least one batch of
    one process)."""
    if workers == 0:
        return 0, None
    batches = max(PINNED_PHOTOS // batch_size, 1)
    workers = min(workers, batches)
    return workers, min(2, batches // workers)


def loader_for(
    paths: list[Path], device: torch.device, batch_size: int, workers: int, nvjpeg: JpegDecoder | None
) -> DataLoader:
    """The DataLoader of `read_batches`: reader processes and their read-ahead within PINNED_PHOTOS."""
    if multiprocessing.current_process().daemon:
        workers = 0  # a daemonic process (e.g. a Dask worker left at its default) may not start reader processes
    workers, ahead = read_ahead(batch_size, workers)
    return DataLoader(
        ImageFiles(paths, encoded=nvjpeg is not None),
        batch_size=batch_size,
        num_workers=workers,
        # pinned: the copy to the GPU is async. JPEG bytes for nvjpeg stay pageable: torchvision hands
        # their pointers to nvJPEG, and no event keeps a pinned block from reuse while it reads them
        collate_fn=_as_list,
        pin_memory=device.type == "cuda" and nvjpeg is None,
        prefetch_factor=ahead,
    )


def read_batches(
    paths: list[Path], device: torch.device, batch_size: int, workers: int, decode: Literal["pil", "nvjpeg"] = "pil"
) -> Iterator[list[Decoded]]:
    """Batches of decoded images on `device`, in the order of `paths`, read `workers` processes ahead."""
    nvjpeg = nvjpeg_decoder(device) if decode == "nvjpeg" else None
    for items in loader_for(paths, device, batch_size, workers, nvjpeg):
        yield to_device(items, paths, device, nvjpeg)
