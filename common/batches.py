"""Training batches that keep up with the device, one epoch at a time, sharded over torchrun ranks.

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

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from common.distributed import Ranks

Batch = tuple[torch.Tensor, torch.Tensor]


def _sampler(n: int, ranks: Ranks, seed: int) -> DistributedSampler:
    # drop_last: every rank takes the same number of steps (DDP needs that), at most world-1 items dropped
    return DistributedSampler(range(n), num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed, drop_last=ranks.on)


class TensorBatches:
    def __init__(self, images: torch.Tensor, masks: torch.Tensor, batch_size: int, device: torch.device,
                 ranks: Ranks = Ranks(), seed: int = 0):
        """images: uint8 (N, C, H, W); masks: bool or uint8 (N, 1, H, W)."""
        self.sampler, self.batch_size, self.device = _sampler(len(images), ranks, seed), batch_size, device
        nbytes = images.nbytes + masks.nbytes
        if device.type == "cuda" and nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]:
            images, masks = images.to(device), masks.to(device)  # the set lives on the device: a batch is a gather
        elif device.type == "cuda":
            images, masks = images.pin_memory(), masks.pin_memory()  # too big: async copies from pinned memory
        self.images, self.masks = images, masks.to(torch.uint8)

    def __len__(self) -> int:
        return max(len(self.sampler) // self.batch_size, 1)

    def epoch(self, e: int) -> Iterator[Batch]:
        self.sampler.set_epoch(e)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size].to(self.images.device, non_blocking=True)
            x = self.images[idx].to(self.device, non_blocking=True).float().div_(255)
            y = self.masks[idx].to(self.device, non_blocking=True).float()
            yield x, y


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
    def __init__(self, dataset: Dataset, batch_size: int, workers: int, device: torch.device, ranks: Ranks = Ranks(),
                 seed: int = 0, per_item: int = 1):
        """`dataset[(index, epoch)]` -> (x, y); `per_item`: samples in one item (crops of one decoded image),
        `batch_size` counts samples."""
        self.sampler, self.device = _sampler(len(dataset), ranks, seed), device
        items = max(batch_size // per_item, 1)
        self.loader = DataLoader(dataset, batch_size=items, sampler=_Keys(self.sampler), drop_last=len(self.sampler) > items,
                                 num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers else None)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, e: int) -> Iterator[Batch]:
        self.sampler.set_epoch(e)
        for x, y in self.loader:
            if x.dim() == 5:  # (items, crops, C, H, W): several crops per decoded image
                x, y = x.flatten(0, 1), y.flatten(0, 1)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)  # async copy from pinned memory

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
