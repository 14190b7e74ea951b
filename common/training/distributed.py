"""Many GPUs or machines: PyTorch DDP as torchrun launches it, nothing home-made.

    torchrun --nproc_per_node=8 -m stage1_lowres train --config pipelines/pipeline.yaml

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process and every helper
is a no-op. NCCL on CUDA, gloo on the CPU (which is how the tests run two ranks for real).
Rank 0 alone prints, writes checkpoints, history, plots and pipeline state.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import ConfigError
from common.model import pick_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def ranks() -> Ranks:
    """This process's place in a torchrun job (0 of 1 outside one)."""
    return Ranks(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def init(device_name: str) -> tuple[Ranks, torch.device]:
    """Join the torchrun job (once per process) and pick this rank's device: cuda:LOCAL_RANK on a
    GPU machine, the CPU otherwise."""
    r = ranks()
    device = pick_device(device_name)
    if not r.on:
        return r, device
    if device.type == "cuda":
        if device_name not in ("auto", "cuda"):
            raise ConfigError(f"device={device_name} under torchrun: use device=auto (each rank takes cuda:LOCAL_RANK)")
        device = torch.device("cuda", r.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # long timeout: under `carvana run` the other ranks wait while rank 0 alone predicts and evaluates
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=12))
        # ended when the process exits, whichever command joined it (`carvana run` joins once for all its
        # steps): a group left to its destructor makes NCCL warn at exit and may drop its queued work
        atexit.register(end)
    return r, device


def end() -> None:
    """Leave the torchrun job: the process group destroyed (a no-op outside one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def step_agreement(
    finite: torch.Tensor, late: bool, total: torch.Tensor, seen: torch.Tensor
) -> tuple[bool, bool, tuple[float, float]]:
    """One optimizer step's decisions, in one collective and one host read (the step's only sync
    point): was the loss finite on every rank, does rank 0's clock say stop (every rank then stops
    after the same step), and the running loss sum and image count over all ranks (progress bar)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    decides = not dist.is_initialized() or dist.get_rank() == 0
    flags = torch.stack(
        [finite.to(total.dtype), total.new_full((), float(late and decides)), total, seen]
    )  # no host copy
    if dist.is_initialized():
        dist.all_reduce(flags)
    ok, stop, loss_sum, images = flags.tolist()  # a sync point, once per optimizer step
    return ok == world, stop > 0, (loss_sum, images)


def total(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over the ranks (epoch loss sums and counts)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def from_main(value):
    """Rank 0's value of a small picklable object, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
