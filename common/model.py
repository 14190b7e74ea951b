"""The one U-Net both stages use, and everything about running it: the device, the precision
policy for training and prediction, the inference layout, and checkpoints (read, rebuilt into
nets, hashed for cache keys, averaged as an ensemble)."""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from common.config import Settings, Training
from common.errors import CheckpointError, SetupError


def block(c_in: int, c_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """`depth` levels, `width` channels at the top level, doubling per level (capped at 512).

    Any input size works: the input is padded to a multiple of 2**(depth-1) and the output cropped
    back, so whole 1918x1280 images and 1024 tiles go through the same net.

    With `prior_skip`, the last input channel is a probability (stage 1's coarse mask) and its logit
    is added to the output: the net learns only the correction, so an untrained refiner already
    reproduces the coarse mask and training starts from stage-1 quality.
    """

    def __init__(
        self, in_channels: int = 3, depth: int = 5, width: int = 16, dropout: float = 0.0, prior_skip: bool = False
    ):
        super().__init__()
        self.args = {
            "in_channels": in_channels,
            "depth": depth,
            "width": width,
            "dropout": dropout,
            "prior_skip": prior_skip,
        }
        chans = [min(width * 2**i, 512) for i in range(depth)]
        drops = [dropout if i >= depth - 2 else 0.0 for i in range(depth)]
        self.encoder = nn.ModuleList(
            block(c_in, c, d) for c_in, c, d in zip([in_channels] + chans[:-1], chans, drops, strict=True)
        )
        self.decoder = nn.ModuleList(block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(chans[0], 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if prior_skip:
            nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, 1, H, W)."""
        h, w = x.shape[-2:]
        prior = torch.logit(x[:, -1:].float().clamp(1e-4, 1 - 1e-4)) if self.args["prior_skip"] else None
        m = 2 ** (len(self.encoder) - 1)
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")
        skips = []
        for i, enc in enumerate(self.encoder):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for dec, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], 1))
        out = self.head(x)[..., :h, :w]
        return out if prior is None else out + prior


def _as_declared(name: str) -> Any:
    """A UNet argument typed and bounded as the training setting of the same name (common/config.py)."""
    f = Training.model_fields[name]
    return Annotated[(f.annotation, *f.metadata)]


Depth, Width, Dropout = (_as_declared(name) for name in ("depth", "width", "dropout"))


class NetArgs(BaseModel):
    """A UNet's constructor arguments as a bundle or a checkpoint gives them, checked before any net is built
    (`depth: 1000000` would take hours to build before any other check)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    in_channels: Literal[3, 4]  # RGB, and stage 1's probability for a refiner with coarse_channel
    depth: Depth
    width: Width
    dropout: Dropout
    prior_skip: bool


def build_model(settings: Training, in_channels: int, prior_skip: bool = False, seed: int = 0) -> nn.Module:
    """A fresh U-Net whose initial weights depend only on `seed`."""
    torch.manual_seed(seed)
    return UNet(in_channels, settings.depth, settings.width, settings.dropout, prior_skip)


# --- where and in what precision nets run


def pick_device(name: str) -> torch.device:
    """The device of `name` (auto | cpu | cuda | cuda:N), made the calling thread's current CUDA
    device (`use_device`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    device = torch.device(name)
    use_device(device)
    return device


def use_device(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device, so that streams, events and allocations
    without an explicit device land on it. CUDA keeps it per thread: every thread that queues work for
    cuda:1 (a server's step thread, a Dask task's) sets it, or its events go to cuda:0's stream and its
    copies sync across devices. Needs CUDA: not testable on the CPU."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@functools.cache
def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX)? Elsewhere oneDNN emulates it,
    slower than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def amp_dtype(precision: str, device: torch.device, training: bool = True) -> torch.dtype | None:
    """The one precision policy: the autocast type for `precision` (auto | bf16 | fp16 | fp32) on
    `device`, None for fp32. CUDA: training in bf16 on cards that have it (no loss scaling, no fp16
    overflow of gradients), fp16 with a GradScaler on older cards; prediction in fp16 (no gradients
    to overflow, three more mantissa bits than bf16). CPU: bf16 where the CPU has native bf16, else
    fp32 (emulated bf16 is slower); for training with `auto` that bf16 is only a candidate, which the
    trainer times against fp32 and records in history.csv (`faster_cpu_dtype`). fp16 is for CUDA
    only and means fp32 on the CPU."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if precision in ("auto", "bf16") and device.type == "cpu" and cpu_has_bf16() else None
    if precision == "auto":
        return torch.bfloat16 if training and torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device`; None runs in fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def prepare(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """Eval mode, channels_last weights (inputs are channels_last too: tensor-core convolutions
    without layout transposes on CUDA; measured 1.5-2x faster on the CPU as well, docs/benchmarks.md),
    cudnn benchmark mode on CUDA (the predictors feed a few batch shapes, `batch_buckets`, so the
    fastest kernels are picked once per shape); optionally torch.compile, worth it for long runs (the
    first batches pay for the compilation)."""
    model = model.eval().to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return torch.compile(model, dynamic=False) if compile else model


def batch_buckets(device: torch.device, compile: bool, batch_size: int) -> tuple[int, ...]:
    """The batch sizes a predictor pads each net call up to, smallest first (empty: none, a call runs
    as it comes). Compiled: the full batch alone, as a compiled net recompiles for every new shape.
    Eager CUDA: the powers of two below the batch and the batch itself, so cudnn.benchmark tunes each
    shape once while a lone photo runs as its own tiles, not as a full batch of padding. CPU: none
    (padding would be work for nothing)."""
    if compile:
        return (batch_size,)
    if device.type == "cuda":
        return tuple(sorted({1 << k for k in range(batch_size.bit_length()) if 1 << k < batch_size} | {batch_size}))
    return ()


def padded_size(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `n` items; `n` itself without buckets or past the largest."""
    return next((b for b in buckets if b >= n), n)


# --- checkpoints


def read_file(path: str | Path) -> bytes:
    """A checkpoint's bytes: hashed and loaded from the same read, so what runs is what was hashed."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint not found: {path} (train first, or set the stage's checkpoint key)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None


def load_checkpoint(
    path: str | Path, device: torch.device, expect: dict | None = None, data: bytes | None = None
) -> dict:
    """Read a checkpoint (`data`: its bytes, when already read); `expect` (model args) must match the
    net it holds, if given."""
    data = read_file(path) if data is None else data
    try:
        # weights_only: tensors, numbers, strings, lists and dicts, which is all a checkpoint of ours holds;
        # a pickle that would build anything else (run code) is refused, not executed
        ckpt = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        args = ckpt["model_args"]
    except pickle.UnpicklingError as e:  # garbage, or a pickle of more than weights: neither is run
        why = re.search(r"Unsupported [^\n]*", str(e))
        raise CheckpointError(
            f"{path}: not a checkpoint of this project: it holds more than tensors, numbers and text "
            f"({why[0].split(' was ')[0] if why else e}), and is "
            "not loaded, as it could run code"
        ) from None
    except Exception as e:  # a torn or foreign file: name it, do not dump a traceback
        raise CheckpointError(f"{path}: not a checkpoint of this project ({type(e).__name__}: {e})") from None
    if expect is not None and args != expect:
        raise CheckpointError(
            f"{path} was trained with {args}, the config asks for {expect}; change the config or retrain"
        )
    return ckpt


def load_net(
    path: str | Path, device: torch.device, expect: dict | None = None, data: bytes | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild the net a checkpoint was trained with, in eval mode."""
    ckpt = load_checkpoint(path, device, expect, data)
    try:  # bounded before building: a hand-made `depth: 1000000` would build for hours
        NetArgs.model_validate(ckpt["model_args"])
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(
            f"{path}: its net's {'.'.join(map(str, first['loc']))} is out of what this project builds ({first['msg']})"
        ) from None
    model = UNet(**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def checkpoint_paths(cfg: Settings, stage: str) -> list[Path]:
    """`<stage>.checkpoint`: empty = `<output.dir>/<stage>/best.pt`; one path; or a list of paths,
    an ensemble (e.g. the K folds of `carvana folds`)."""
    value = getattr(cfg, stage).checkpoint
    if not value:
        return [Path(cfg.output.dir) / stage / "best.pt"]
    return [Path(v) for v in (value if isinstance(value, list) else [value])]


def checkpoints_hash(blobs: list[bytes]) -> str:
    """Content hash of every checkpoint of an ensemble, in order: cache keys cover them all."""
    h = hashlib.sha256()
    for data in blobs:
        h.update(data)
        h.update(b"|")
    return h.hexdigest()


class Ensemble(nn.Module):
    """Nets whose probabilities are averaged, as the competition's winners averaged their folds.
    Returns the logit of the mean probability, so it stands in for one net everywhere."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.args = models[0].args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(m(x).float()) for m in self.models]).mean(0)
        return torch.logit(prob, eps=1e-6)


def load_nets(paths: list[Path], device: torch.device, blobs: list[bytes]) -> tuple[nn.Module, list[dict]]:
    """One net, or the ensemble of several with the same inputs, from the checkpoints' bytes; and their checkpoints."""
    loaded = [load_net(p, device, data=data) for p, data in zip(paths, blobs, strict=True)]
    first = loaded[0][1]
    for path, (_, ckpt) in zip(paths[1:], loaded[1:], strict=True):
        if ckpt["model_args"]["in_channels"] != first["model_args"]["in_channels"]:
            raise CheckpointError(
                f"{path} takes {ckpt['model_args']['in_channels']} input channels, {paths[0]} "
                f"{first['model_args']['in_channels']}: an ensemble's nets must take the same inputs"
            )
    return (loaded[0][0] if len(loaded) == 1 else Ensemble([m for m, _ in loaded]).eval()), [c for _, c in loaded]
