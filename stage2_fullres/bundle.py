"""A trained cascade as one folder that leaves its run: both nets' weights in safetensors, the
settings that shape a mask, the mask threshold, the run's figures and what it was trained on, in
`bundle.json`, and a model card (`README.md`). `carvana bundle` writes it (pipelines/bundle.py);
`carvana cutout`, `carvana serve` and `stage2 predict` read it with `--model DIR` and predict the
masks of the run it came from, byte for byte.

Reading checks everything before a net is built: the format version, every listed file's sha256,
the architecture's arguments and that the weights fit them. Nothing is unpickled: safetensors
holds tensors only. The format: docs/bundle.md.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from common.config import DEPENDS, Settings, setting_value
from common.errors import CheckpointError, ConfigError
from common.io import atomic_path, write_text
from common.log import log
from common.model import UNet, prepare
from stage1_lowres.predict import Coarse
from stage2_fullres.predict import Cascade

FORMAT = 1
MANIFEST = "bundle.json"
# every setting a box or a mask depends on (the declarations say which), but where the data is read from
FIXED = sorted({k for output in ("boxes", "masks") for k in DEPENDS[output] if not k.startswith("data.")})
INPUT = "RGB, uint8 divided by 255, no mean or std; the refiner also takes stage 1's probability when coarse_channel"


class Net(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str  # safetensors, beside bundle.json
    architecture: str  # "UNet", common/model.py
    args: dict[str, Any]  # its constructor's arguments


class Manifest(BaseModel):
    """bundle.json, as written and as read back (anything else in it is refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format: int
    name: str  # the model's name on the server (`/v2/models/{name}`)
    created: str  # ISO date
    nets: dict[str, Net]  # stage1, refiner
    prediction: dict[str, Any]  # dotted setting -> value: every setting a box or mask depends on (FIXED)
    input: str  # the nets' input normalisation, in words
    threshold: float  # the mask threshold (`carvana evaluate`'s best, or predict.threshold)
    files: dict[str, str]  # file -> sha256, every file but bundle.json and README.md (a card may be edited)
    validation: dict[str, Any]  # the run's figures and where they come from
    training_data: dict[str, Any]  # kind (synthetic | photos), root, cars


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_net(net: nn.Module, path: Path) -> None:
    """The net's weights as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


@dataclass(frozen=True)
class Bundle:
    folder: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def threshold(self) -> float:
        return self.manifest.threshold

    @property
    def synthetic(self) -> bool:
        """Trained on `carvana sample-data`'s synthetic cars only: for trying the commands, not for real photos."""
        return self.manifest.training_data.get("kind") == "synthetic"

    def hash(self, net: str, backend: str = "torch") -> str:
        """The sha256 of the file that runs a net (its weights, or its ONNX file under onnxruntime):
        what cache keys hash instead of a checkpoint's content."""
        return self.manifest.files[self.manifest.nets[net].file if backend == "torch" else self._onnx(net)]

    def _onnx(self, net: str) -> str:
        name = f"{net}.onnx"
        if name not in self.manifest.files:
            raise CheckpointError(f"{self.folder}: no {name}; predict.backend=onnxruntime needs a bundle made with `carvana bundle --onnx`")
        return name

    def settings(self, cfg: Settings) -> Settings:
        """`cfg` with the bundle's settings for every box and mask (they win; a differing value is said in one line)."""
        fixed = self.manifest.prediction | {"predict.threshold": self.threshold}
        default = Settings()
        differ = [f"{k}={v} (the config: {setting_value(cfg, k)})" for k, v in fixed.items()
                  if setting_value(cfg, k) not in (v, setting_value(default, k))]  # set by the user, to another value
        if differ:
            log.info(f"{self.folder}: the bundle fixes {', '.join(differ)}")
        return cfg.updated(fixed)

    def net(self, which: str, device: torch.device) -> nn.Module:
        """A net rebuilt from its architecture's arguments and its weights; weights that do not fit are refused."""
        from safetensors.torch import load_file

        spec = self.manifest.nets[which]
        net = UNet(**spec.args)  # the arguments and the weights' shapes were checked by `read_bundle`
        net.load_state_dict(load_file(str(self.folder / spec.file)), strict=True)
        return net.to(device).eval()

    def cascade(self, cfg: Settings, device: torch.device, need_stage1: bool = True) -> Cascade:
        """The cascade ready for inference, as `Cascade.from_config` makes it from checkpoints; `cfg`
        from `settings` (the bundle's box and mask settings, the user's device, batch and reader settings)."""
        if cfg.predict.backend == "onnxruntime":
            if device.type != "cpu" or cfg.predict.compile:
                raise ConfigError(f"predict.backend=onnxruntime runs the ONNX files on the CPU, uncompiled: set device=cpu and "
                                  f"predict.compile=false (now device={device}, predict.compile={cfg.predict.compile})")
            from common.onnx_export import OnnxNet

            load = lambda which: OnnxNet(self.folder / self._onnx(which))  # noqa: E731
        else:
            load = lambda which: self.net(which, device)  # noqa: E731
        refiner = prepare(load("refiner"), device, cfg.predict.compile)
        coarse = Coarse.from_net(load("stage1"), cfg, device) if need_stage1 or cfg.stage2.coarse_channel else None
        return Cascade(coarse, refiner, cfg, device)


def read_bundle(folder: str | Path) -> Bundle:
    """The bundle in `folder`, checked: its format, every file present with its sha256; one line naming
    the file at fault otherwise (CheckpointError: exit 2)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --model takes a folder written by `carvana bundle`")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise CheckpointError(f"{path}: bundle format {found!r}, this carvana reads format {FORMAT}; "
                              "make the bundle again with this version (carvana bundle)")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    unknown = sorted(set(manifest.prediction) - set(FIXED))
    if unknown or set(manifest.nets) != {"stage1", "refiner"}:
        raise CheckpointError(f"{path}: unexpected {'settings ' + ', '.join(unknown) if unknown else 'nets ' + ', '.join(manifest.nets)}")
    for name in [*manifest.files, *(net.file for net in manifest.nets.values())]:
        if Path(name).name != name:
            raise CheckpointError(f"{path}: {name!r} is not a file name in the bundle's folder")
    for which, net in manifest.nets.items():
        if net.architecture != "UNet":
            raise CheckpointError(f"{path}: {which} is a {net.architecture!r}; this carvana builds UNet nets only")
    for name, digest in manifest.files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the bundle")
        if sha256(file) != digest:
            raise CheckpointError(f"{file}: changed since the bundle was made (sha256 differs from {MANIFEST})")
    for which, net in manifest.nets.items():
        if net.file not in manifest.files:
            raise CheckpointError(f"{path}: {net.file} has no sha256 under files")
        _check_fit(folder / net.file, which, net)
    return Bundle(folder, manifest)


def _check_fit(path: Path, which: str, net: Net) -> None:
    """The weights' names and shapes (from the file's header: nothing loaded) against the architecture's."""
    from safetensors import SafetensorError, safe_open

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation work
            wanted = {k: tuple(v.shape) for k, v in UNet(**net.args).state_dict().items()}
    except Exception as e:  # wrong names (TypeError) or values (ValueError, RuntimeError) alike
        raise CheckpointError(f"{path.parent / MANIFEST}: {which}'s arguments {net.args} are not a UNet's ({e})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not safetensors ({e})") from None
    if found != wanted:
        odd = sorted(k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k))
        raise CheckpointError(f"{path}: the weights do not fit {which}'s architecture {net.args} "
                              f"({len(odd)} tensors differ, e.g. {odd[0]}: {found.get(odd[0])} in the file, {wanted.get(odd[0])} wanted)")


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """bundle.json, written last: a folder with it is a whole bundle."""
    write_text(folder / MANIFEST, json.dumps(manifest.model_dump(), indent=2) + "\n")

