"""Where a command's nets come from: a `ModelSource`, resolved once by the command line and handed to
every command, the server and each Dask task. Two kinds: the config's checkpoints (`Checkpoints`)
and a bundle (`common.bundle.Bundle`, `--model DIR`).

A source gives the nets (`net`), the content hash of each (`hash`: what cache keys and chunk keys
hash), the mask threshold and the settings it fixes. A net is loaded from the bytes it hashes; a
source that travels to a Dask worker carries the hashes its client took, so a worker whose files
changed since refuses its task, naming the file, instead of predicting with other nets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import pandas as pd
import torch
from torch import nn

from common.config import Settings
from common.errors import CheckpointError, ConfigError
from common.log import log
from common.model import checkpoint_paths, checkpoints_hash, load_nets, read_file

if TYPE_CHECKING:
    from common.bundle import Bundle

NetName = Literal["stage1", "refiner"]
STAGE = {"stage1": "stage1", "refiner": "stage2"}  # the training stage (and checkpoint setting) of each net


class ModelSource(Protocol):
    name: str  # the model's name on the server (/v2/models/{name})
    threshold: float  # the mask threshold of the cascade's probability
    synthetic: bool  # its nets learned synthetic cars only

    def has(self, net: NetName) -> bool:
        """Whether the source holds `net` (a run before its refiner's training has none)."""

    def hash(self, net: NetName) -> str:
        """The content hash of what runs `net`."""

    def net(self, which: NetName, device: torch.device) -> nn.Module:
        """`which` net on `device`, loaded from bytes that hash to `hash(which)`."""

    def settings(self, cfg: Settings) -> Settings:
        """`cfg` with the settings this source fixes (a bundle's box and mask settings)."""


def sweep_path(cfg: Settings) -> Path:
    """`carvana evaluate`'s threshold sweep (report/threshold_sweep.csv): where `predict.threshold: auto` looks."""
    return Path(cfg.output.dir) / "report" / "threshold_sweep.csv"


def mask_threshold(cfg: Settings, strict: bool = True) -> float:
    """The cascade's mask threshold: `predict.threshold`, or with `auto` the one that gave the best
    mean validation Dice in the last `carvana evaluate`. `strict=False` (training, evaluation itself)
    falls back to 0.5 while no sweep exists yet."""
    value = cfg.predict.threshold
    if value != "auto":
        return float(value)
    path = sweep_path(cfg)
    sweep = pd.read_csv(path) if path.is_file() else None
    if sweep is None or sweep.dice_cascade.isna().all():  # none yet, or one evaluate made before a refiner existed
        if strict:
            raise ConfigError(
                f"predict.threshold=auto uses the best threshold of `carvana evaluate`, and {path} holds no cascade's "
                "sweep yet: run `carvana evaluate` with the same config first (after stage 2), or set a number"
            )
        return 0.5
    return float(sweep.threshold[sweep.dice_cascade.idxmax()])


@dataclass
class Checkpoints:
    """The nets of the config's `stage1.checkpoint` and `stage2.checkpoint` (empty: the run's best.pt;
    a list: an ensemble). Each net's hash is taken on its first use and kept, so the hash a chunk key
    holds is the one every later load is checked against, here or on a Dask worker."""

    cfg: Settings
    threshold: float
    name: str = "carvana"
    synthetic: bool = False
    hashes: dict[str, str] = field(default_factory=dict)

    def paths(self, net: NetName) -> list[Path]:
        return checkpoint_paths(self.cfg, STAGE[net])

    def has(self, net: NetName) -> bool:
        return all(p.is_file() for p in self.paths(net))

    def hash(self, net: NetName) -> str:
        if net not in self.hashes:
            self.hashes[net] = checkpoints_hash([read_file(p) for p in self.paths(net)])
        return self.hashes[net]

    def net(self, which: NetName, device: torch.device) -> nn.Module:
        paths = self.paths(which)
        blobs = [read_file(p) for p in paths]
        content = checkpoints_hash(blobs)
        if self.hashes.setdefault(which, content) != content:
            raise CheckpointError(
                f"{', '.join(map(str, paths))}: changed since this run hashed it (another training wrote it?); rerun "
                "the command"
            )
        model, ckpts = load_nets(paths, device, blobs)
        if which == "stage1":
            for path, ckpt in zip(paths, ckpts, strict=True):
                size = ckpt["config"]["stage1"]["size"]
                if size != self.cfg.stage1.size:
                    raise CheckpointError(
                        f"{path} was trained at stage1.size={size}, the config says {self.cfg.stage1.size}"
                    )
        else:
            wants, has = 4 if self.cfg.stage2.coarse_channel else 3, ckpts[0]["model_args"]["in_channels"]
            if has != wants:
                raise CheckpointError(
                    f"{paths[0]} takes {has} input channels but stage2.coarse_channel={self.cfg.stage2.coarse_channel} "
                    f"needs {wants}; set it to match the checkpoint or retrain"
                )
        return model

    def settings(self, cfg: Settings) -> Settings:
        return cfg


def open_source(cfg: Settings, model: str | Path | None = None, strict: bool = True) -> ModelSource:
    """The nets a command predicts with: the bundle in the folder `model` (`--model`), else the
    config's checkpoints, with the mask threshold `mask_threshold` resolves (`strict=False`: training
    and evaluation, which may run before any threshold sweep). Checked before any work."""
    backend = cfg.predict.backend
    if model is not None:
        from common.bundle import read_bundle

        if backend == "onnxruntime" and cfg.predict.compile:
            raise ConfigError("predict.backend=onnxruntime runs the ONNX files as they are: set predict.compile=false")
        bundle = read_bundle(model, "torch" if backend == "auto" else backend)
        return replace(bundle, backend=faster_backend(bundle, cfg)) if backend == "auto" else bundle
    if backend == "onnxruntime":
        raise ConfigError(
            f"predict.backend={backend} runs the ONNX files of a bundle: make one with `carvana bundle --onnx` and "
            "predict with --model DIR (checkpoints run in torch)"
        )
    return Checkpoints(cfg, mask_threshold(cfg, strict))


ONNX_MARGIN = 0.9  # onnxruntime is chosen when it takes under 90% of PyTorch's time: timing noise rarely flips it


def faster_backend(bundle: Bundle, cfg: Settings, rounds: int = 2) -> str:
    """`predict.backend=auto`: on a CPU, with a bundle made with `--onnx` and no Dask cluster, whichever of
    PyTorch (as prediction runs it: channels_last, its precision) and onnxruntime runs the refiner faster
    on one tile's pixels (one tile, or the patches that hold as many) at the bundle's window size, the two
    alternating; else torch. Timed once, when the bundle loads; the choice is logged. The CPU decides it
    (docs/experiments/2026-12-06-band-refiner.md): on one 2-core Xeon onnxruntime took half PyTorch's time,
    on a 2-core EPYC with native bf16 more than PyTorch's. A timing that fails runs torch, saying why."""
    from common.model import pick_device, precision_name, prepare
    from common.prediction.step import predict_dtype, probabilities

    device = pick_device(cfg.device)
    onnx = "refiner.onnx" in bundle.manifest.files
    if device.type != "cpu" or cfg.predict.compile or cfg.predict.cluster or not onnx:
        return "torch"  # a cluster's workers are other machines (and may have GPUs)
    s = cfg.updated(bundle.manifest.prediction).stage2  # the window size the ONNX file was exported at
    n = max(1, (s.tile // s.window) ** 2)  # one tile's pixels
    x = torch.rand(n, bundle.manifest.nets["refiner"].args["in_channels"], s.window, s.window)
    seconds: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    try:
        nets = {
            "torch": prepare(bundle.net("refiner", device), device),
            "onnxruntime": replace(bundle, backend="onnxruntime").net("refiner", device),
        }
        with torch.no_grad():
            for _ in range(rounds + 1):  # the first round warms each up
                for name, net in nets.items():
                    t = time.perf_counter()
                    probabilities(net, x, device)
                    seconds[name].append(time.perf_counter() - t)
    except Exception as e:  # auto must not stop a command that torch can run (onnxruntime's errors have no one type)
        log.warning(f"predict.backend=auto: timing the refiner failed ({type(e).__name__}: {e}); running torch")
        return "torch"
    best = {name: min(times[1:]) for name, times in seconds.items()}
    choice = quicker(best)
    log.info(
        f"predict.backend=auto: the refiner on {n} window(s) of {s.window} px takes {best['torch'] * 1000:.0f} ms in "
        f"PyTorch ({precision_name(predict_dtype(device))}) and {best['onnxruntime'] * 1000:.0f} ms in onnxruntime on "
        f"this CPU; running {choice}"
    )
    return choice


def quicker(seconds: dict[str, float]) -> str:
    """The backend `auto` runs, from each one's seconds: onnxruntime only when clearly faster (ONNX_MARGIN)."""
    return "onnxruntime" if seconds["onnxruntime"] < ONNX_MARGIN * seconds["torch"] else "torch"
