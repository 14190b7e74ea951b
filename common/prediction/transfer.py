"""Moving arrays between the host and the device without stalling the device's queue: a copy to the
device goes through pinned memory (`from_host`), a copy back is awaited by an event recorded on the
tensors' own stream, not by a device-wide sync (`to_host`, `to_host_all`)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

OnHost = Callable[[], np.ndarray]  # waits for a copy to the host, then gives the array


def from_host(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """An array made on the host (decoded pixels, a mask) as a tensor on the device: on CUDA through
    pinned memory, so the copy is queued and does not hold the host."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # needs CUDA: not testable on the CPU
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def to_host(tensor: torch.Tensor) -> OnHost:
    """Start copying a tensor (a bool mask, a batch of probabilities) to the host; the returned
    function waits for that copy alone and gives the array."""
    wait = to_host_all([tensor])
    return lambda: wait()[0]


def to_host_all(tensors: list[torch.Tensor]) -> Callable[[], list[np.ndarray]]:
    """`to_host` for tensors on one device, all awaited at once: one host sync for a whole batch."""
    if not tensors or tensors[0].device.type != "cuda":
        return lambda: [tensor.cpu().numpy() for tensor in tensors]  # cpu(): a no-op on the CPU
    hosts = [torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) for tensor in tensors]
    for host, tensor in zip(hosts, tensors, strict=True):
        host.copy_(tensor, non_blocking=True)  # queued on the current stream of the tensors' device
    done = torch.cuda.Event()
    # recorded on that same stream: a bare record() goes to the current device's stream, which is another
    # GPU's on a worker computing on cuda:1. Needs CUDA: not testable on the CPU (benchmarks/gpu_check.py).
    done.record(torch.cuda.current_stream(tensors[0].device))

    def wait() -> list[np.ndarray]:
        done.synchronize()
        return [host.numpy() for host in hosts]

    return wait
