"""Nets at inference time: the precision they run in (`autocast`), the low-resolution batch helper
stage-1 validation uses, and `prepare`, which puts a net in the layout the GPU runs fastest."""
from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch import nn


@functools.cache
def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Elsewhere oneDNN emulates it,
    slower than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast(device: torch.device) -> torch.autocast:
    """Inference precision: fp16 on CUDA (tensor cores), bf16 on CPUs with native bf16, else fp32."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()))


def probabilities(net: nn.Module, x: torch.Tensor, device: torch.device, flip: bool = False, pad_to: int = 0) -> torch.Tensor:
    """(n, H, W) float32 probabilities of the net's one output channel, under `autocast`: the inputs
    padded with zeros to `pad_to` (one static shape for a compiled net); with flip TTA the mirrored
    inputs ride in the same pass and the two predictions are averaged (both stages' one TTA)."""
    n = len(x)
    if n < pad_to:
        x = torch.cat([x, x.new_zeros(pad_to - n, *x.shape[1:])])
    if flip:
        x = torch.cat([x, x.flip(-1)])
    with autocast(device):
        p = torch.sigmoid(net(x.contiguous(memory_format=torch.channels_last)).float())[:, 0]
    if flip:
        half = len(p) // 2
        p = (p[:half] + p[half:].flip(-1)) / 2
    return p[:n]


@torch.no_grad()
def forward_batches(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """Logits (float32, on the CPU) for `x` in batches, under `autocast`."""
    model.eval()
    for i in range(0, len(x), batch_size):
        with autocast(device):
            yield model(x[i : i + batch_size].to(device)).float().cpu()


def prepare(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """Eval mode, channels_last weights (inputs are channels_last too: tensor-core convolutions
    without layout transposes on CUDA; measured 1.5-2x faster on the CPU as well, see the README),
    cudnn benchmark mode on CUDA (tile shapes are fixed, so the fastest kernels are picked once);
    optionally torch.compile, worth it for long runs (the first batches pay for the compilation)."""
    model = model.eval().to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.compile(model, dynamic=False) if compile else model
