"""The nets as ONNX files (`export`, for `carvana bundle --onnx`) and those files run in onnxruntime
(`OnnxNet`, which stands in for a PyTorch net).

A file holds one net with its fp32 weights inside, at opset 18 (the PyTorch exporter's own, which
onnxruntime has run since 1.14). Input `x`: float32 (batch, channels, size, size), NCHW, values as the
net is fed in prediction (RGB in [0, 1], then stage 1's probability for a refiner with a coarse channel);
the batch axis is free, height and width are fixed at export. Output `logits`: float32 (batch, 1, size,
size), what `net(x)` returns; the probability is its sigmoid.

`OnnxNet` is the net of the onnxruntime backend for prediction on the CPU, faster than PyTorch on some
CPUs (docs/experiments/2026-12-03-onnx.md).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import SetupError
from common.io import atomic_path

OPSET = 18
INPUT, OUTPUT = "x", "logits"


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SetupError(f"ONNX needs the onnx extra ({module} is missing): pip install '.[onnx]'")


def export(net: nn.Module, in_channels: int, size: int, path: Path) -> None:
    """Write `net` to `path` as ONNX (see the module's docstring), atomically: a reader never sees a
    half-written file. The net is exported from a copy on the CPU in eval mode, fp32 and contiguous
    (ONNX has no memory format; a net `prepare`d for prediction holds channels_last weights), so the
    caller's net is left as it was. The example batch has 2 images: torch.export fixes a dimension
    of size 1, which would pin the batch axis."""
    _need("onnxscript")
    net = copy.deepcopy(net).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    example = torch.rand(2, in_channels, size, size)
    # quiet: the exporter warns that torchvision's detection ops are missing, and trips torch's own deprecations
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)  # one file: external weights would name the temporary file


class OnnxNet(nn.Module):
    """An exported net in an onnxruntime session on the CPU, a stand-in for the PyTorch net wherever
    one runs (`probabilities`, `Coarse`, `Cascade`): called on a float32 NCHW batch (a torch tensor in
    any memory format, or numpy) it returns the logits as a CPU torch tensor, as the net would.
    `model`: the file, or its bytes; `threads`: the session's intra-op threads, 0 for onnxruntime's
    default (one per physical core)."""

    def __init__(self, model: Path | bytes, threads: int = 0):
        super().__init__()
        _need("onnxruntime")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            model if isinstance(model, bytes) else str(model), options, providers=["CPUExecutionProvider"]
        )

    def forward(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        logits = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return torch.from_numpy(logits)
