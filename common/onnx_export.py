"""The nets as ONNX files (`export`, for `carvana bundle --onnx`) and those files run in onnxruntime
(`OnnxNet`, which stands in for a PyTorch net).

A file holds one net with its fp32 weights inside, at opset 18 (the PyTorch exporter's own, which
onnxruntime has run since 1.14). Input `x`: float32 (batch, channels, size, size), NCHW, values as the
net is fed in prediction (RGB in [0, 1], then stage 1's probability for a refiner with a coarse channel);
the batch axis is free, height and width are fixed at export. Output `logits`: float32 (batch, 1, size,
size), what `net(x)` returns; the probability is its sigmoid.

`OnnxNet` is the net of the onnxruntime backend for prediction on the CPU, faster than PyTorch on some
CPUs (docs/experiments/2026-12-03-onnx.md). It runs the bytes it was given and nothing else: a file whose
weights live in other files (ONNX's external data) is refused, as those files are not what was hashed.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from common.errors import CheckpointError, SetupError
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


def self_contained(data: bytes, name: str) -> None:
    """Refuse (CheckpointError naming `name`) ONNX bytes that are not a model, or whose tensors point
    into other files (external data): onnxruntime would read those, and they are not the bytes that were
    hashed and checked."""
    _need("onnx")
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{name}: not an ONNX model ({type(e).__name__})") from None
    outside = [t.name for t in _tensors(model) if uses_external_data(t)]
    if outside:
        raise CheckpointError(
            f"{name}: {len(outside)} tensor(s) (e.g. {outside[0]!r}) are kept in files beside it (ONNX external data); "
            "only self-contained ONNX files are run: export it again with carvana bundle --onnx"
        )


def _tensors(model) -> Iterator:
    """Every tensor an ONNX model holds: initializers, sparse ones, and those in node attributes, in
    subgraphs (If, Loop) and in functions too."""

    def of_nodes(nodes) -> Iterator:
        for node in nodes:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else [])
                yield from attr.tensors
                for sparse in [attr.sparse_tensor] * attr.HasField("sparse_tensor") + list(attr.sparse_tensors):
                    yield from (sparse.values, sparse.indices)
                for graph in [attr.g] * attr.HasField("g") + list(attr.graphs):
                    yield from of_graph(graph)

    def of_graph(graph) -> Iterator:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)


class OnnxNet(nn.Module):
    """An exported net in an onnxruntime session on the CPU, a stand-in for the PyTorch net wherever
    one runs (`probabilities`, `Coarse`, `Cascade`): called on a float32 NCHW batch (a torch tensor in
    any memory format, or numpy) it returns the logits as a CPU torch tensor, as the net would.
    `model`: the file, or its bytes (`name` names them in errors), checked `self_contained` and run from
    that one read; `threads`: the session's intra-op threads, 0 for onnxruntime's default (one per
    physical core)."""

    def __init__(self, model: Path | bytes, threads: int = 0, name: str = "ONNX model"):
        super().__init__()
        _need("onnxruntime")
        import onnxruntime

        if not isinstance(model, bytes):
            model, name = Path(model).read_bytes(), str(model)
        self_contained(model, name)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def forward(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        logits = self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return torch.from_numpy(logits)
