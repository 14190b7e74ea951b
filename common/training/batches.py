"""Training data: the pairs read once before training (bad ones skipped with reasons), and
batches that keep up with the device, one epoch at a time, sharded over torchrun ranks.

Two sources with one interface (`len` = steps per epoch, `epoch(e)` -> (x, y) float batches on
the device):
- `TensorBatches` (stage 1): the whole decoded set as one uint8 tensor, on the device when it fits
  (else in pinned host memory); a batch is an index into it, converted on the device. No loader,
  no collate, no per-item Python.
- `LoaderBatches` (stage 2): a Dataset read by DataLoader worker processes that stay ahead of the
  device; an item may hold several crops of one decoded image (flattened into the batch here).
Both draw the epoch's order from DistributedSampler: seeded by (seed, epoch), so a resumed run
sees the same order without saved generator state, and each rank gets its own shard of equal length.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from common.boxes import Box, mask_extent
from common.config import Data
from common.data.images import Size, image_size, read_image, read_mask
from common.data.kaggle import Sample, index_split, split_by_car
from common.errors import DataError, Failure, ImageReadError
from common.io import write_csv
from common.log import log
from common.training.distributed import Ranks

Batch = tuple[torch.Tensor, torch.Tensor]


def _sampler(n: int, ranks: Ranks, seed: int) -> DistributedSampler:
    # drop_last: every rank takes the same number of steps (DDP needs that), at most world-1 items dropped
    return DistributedSampler(
        range(n), num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed, drop_last=ranks.on
    )


class TensorBatches:
    def __init__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        batch_size: int,
        device: torch.device,
        ranks: Ranks = Ranks(),
        seed: int = 0,
    ):
        """images: uint8 (N, C, H, W); masks: bool or uint8 (N, 1, H, W)."""
        self.sampler, self.batch_size, self.device = _sampler(len(images), ranks, seed), batch_size, device
        nbytes = images.nbytes + masks.nbytes
        if device.type == "cuda" and nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]:
            images, masks = images.to(device), masks.to(device)  # the set lives on the device: a batch is a gather
        self.images, self.masks = images, masks.to(torch.uint8)

    def __len__(self) -> int:
        return max(len(self.sampler) // self.batch_size, 1)

    def epoch(self, e: int) -> Iterator[Batch]:
        self.sampler.set_epoch(e)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size].to(self.images.device, non_blocking=True)
            x, y = self.images[idx], self.masks[idx]
            if x.device.type != self.device.type:  # needs CUDA: not testable on the CPU
                # the set is too big for the device: a gather on the host makes a new, pageable tensor,
                # whose copy would hold the host; pinned, the copy is queued and the host goes on
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(self.device, non_blocking=True).float().div_(255), y.to(self.device, non_blocking=True).float()


class _Keys(Sampler):
    """The shard's indices as (index, epoch) keys: the dataset seeds an item's randomness from its
    key, so crops do not depend on which worker reads them, and a resumed run draws the same ones."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, self.sampler.epoch) for i in self.sampler)


class LoaderBatches:
    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        workers: int,
        device: torch.device,
        ranks: Ranks = Ranks(),
        seed: int = 0,
        per_item: int = 1,
    ):
        """`dataset[(index, epoch)]` -> (x, y); `per_item`: samples in one item (crops of one decoded image),
        `batch_size` counts samples."""
        self.sampler, self.device = _sampler(len(dataset), ranks, seed), device
        items = max(batch_size // per_item, 1)
        self.loader = DataLoader(
            dataset,
            batch_size=items,
            sampler=_Keys(self.sampler),
            drop_last=len(self.sampler) > items,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, e: int) -> Iterator[Batch]:
        self.sampler.set_epoch(e)
        for x, y in self.loader:
            if x.dim() == 5:  # (items, crops, C, H, W): several crops per decoded image
                x, y = x.flatten(0, 1), y.flatten(0, 1)
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
            )  # async copy from pinned memory

    def close(self) -> None:
        """Stop the persistent workers now: a loop that stops early (a time limit, a benchmark) would
        otherwise leave them prefetching, and writing the mask cache, until the process exits."""
        if self.loader._iterator is not None:  # DataLoader keeps its persistent iterator here; no public way to stop it
            self.loader._iterator._shutdown_workers()
            self.loader._iterator = None

    def __enter__(self) -> "LoaderBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the training pairs, read once before training


@dataclass
class Pair:
    """A readable training pair; `box` is the true car box at full resolution (None: no car)."""

    sample: Sample
    width: int
    height: int
    box: Box | None
    image: np.ndarray | None = None  # uint8 HWC at the scan size, when kept
    mask: np.ndarray | None = None  # bool HW at the scan size, when kept


def _scan_one(sample: Sample, size: Size | None, keep: bool) -> Pair | Failure:
    try:
        width, height = image_size(sample.image)
        full = read_mask(sample.mask, expect_size=(width, height))
        image = read_image(sample.image, size=size or (256, 256))  # decodes the whole file: catches truncation
    except ImageReadError as e:
        return Failure.of(e)
    if not keep:
        return Pair(sample, width, height, mask_extent(full))
    mask = (
        full
        if size is None
        else np.asarray(Image.fromarray(full.view(np.uint8) * 255).resize(size, Image.BILINEAR)) >= 128
    )
    return Pair(sample, width, height, mask_extent(full), image, mask)


def scan_pairs(
    samples: list[Sample], size: Size | None = None, keep: bool = True, max_bad_share: float = 0.01, jobs: int = 4
) -> tuple[list[Pair], dict[str, Failure]]:
    """Read every training pair once, before training starts: the readable pairs, and img -> why
    for the others.

    Unreadable or inconsistent pairs are skipped with a warning naming the file and the reason; if
    more than `max_bad_share` of them are bad, nothing trains and the error lists them. With `keep`,
    images and masks at `size` (w, h) stay in memory, which is what stage 1 trains from.
    """
    results = Parallel(n_jobs=jobs, prefer="threads")(delayed(_scan_one)(s, size, keep) for s in samples)
    pairs = [r for r in results if isinstance(r, Pair)]
    bad = {s.img: r for s, r in zip(samples, results, strict=True) if isinstance(r, Failure)}
    if samples and len(bad) / len(samples) > max_bad_share:
        listing = "\n  ".join(map(str, list(bad.values())[:20]))
        raise DataError(
            f"{len(bad)} of {len(samples)} training pairs are unreadable, more than "
            f"data.max_bad_share={max_bad_share}; fix or remove them:\n  {listing}"
        )
    for failure in bad.values():
        warnings.warn(f"skipping training pair: {failure}", stacklevel=2)
    return pairs, bad


@dataclass
class TrainingPairs:
    """A training run's pairs, read once and split by car."""

    train: list[Pair]
    val: list[Pair]
    skipped: dict[str, Failure]  # img -> why it could not be read


def read_pairs(data: Data, size: Size, keep: bool, workers: int) -> TrainingPairs:
    """Every training pair of `data.root` read once (`scan_pairs` at `size`, by `workers` threads),
    split into training and validation pairs by `data.val_cars`."""
    samples = index_split(data.root, "train", data.hq)
    _, val_samples = split_by_car(samples, data.val_cars)
    if not val_samples:
        raise DataError("training needs validation cars; set data.val_cars to a count, a list or k/K")
    pairs, bad = scan_pairs(samples, size, keep=keep, max_bad_share=data.max_bad_share, jobs=max(workers, 1))
    val_ids = {v.id for v in val_samples}
    return TrainingPairs(
        [p for p in pairs if p.sample.id not in val_ids], [p for p in pairs if p.sample.id in val_ids], bad
    )


def report_skipped(run_dir: Path, skipped: dict[str, Failure]) -> None:
    """The run summary's list of skipped pairs, also kept as `<run_dir>/skipped.csv`."""
    if not skipped:
        return
    write_csv(
        run_dir / "skipped.csv", pd.DataFrame([(img, str(f)) for img, f in skipped.items()], columns=["img", "reason"])
    )
    log.info(f"skipped {len(skipped)} unreadable pair(s), listed in {run_dir / 'skipped.csv'}:")
    for failure in skipped.values():
        log.info(f"  {failure}")
