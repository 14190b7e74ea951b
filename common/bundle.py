"""A trained cascade as one folder that leaves its run: both nets' weights in safetensors, the
settings that shape a mask, the mask threshold, the run's figures and what it was trained on, in
`bundle.json`, and a model card (`README.md`). `carvana bundle` writes it (pipelines/bundle.py);
every command that predicts reads it with `--model DIR` (a `ModelSource`, common/model_source.py)
and predicts the masks of the run it came from, byte for byte.

Reading checks everything before a net is built: the format version, every listed file's sha256, the
architecture's arguments and the settings against the bounds common/config.py declares, that the weights
fit them, and (for onnxruntime) that each ONNX file holds its weights itself; a net is then loaded from
the very bytes it hashes. Nothing is unpickled: safetensors holds tensors only. The format: docs/bundle.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from common.config import DEPENDS, Settings, setting_value, shown
from common.errors import CheckpointError, ConfigError
from common.io import atomic_path, write_text
from common.log import log
from common.model import NetArgs, UNet

FORMAT = 1
MANIFEST = "bundle.json"
# every setting a box or a mask depends on (the declarations say which), but where the data is read from and
# the mask threshold, which bundle.json holds on its own
FIXED = sorted(
    {
        k
        for output in ("boxes", "masks")
        for k in DEPENDS[output]
        if not k.startswith("data.") and k != "predict.threshold"
    }
)
INPUT = "RGB, uint8 divided by 255, no mean or std; the refiner also takes stage 1's probability when coarse_channel"
MAX_MANIFEST = 1 << 20  # bytes of bundle.json: a few kB are written


class NetSpec(BaseModel):
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
    nets: dict[str, NetSpec]  # stage1, refiner
    prediction: dict[str, Any]  # dotted setting -> value: every setting a box or mask depends on (FIXED)
    input: str  # the nets' input normalisation, in words
    threshold: float = Field(gt=0, lt=1)  # the mask threshold (`carvana evaluate`'s best, or predict.threshold)
    files: dict[str, str]  # file -> sha256, every file but bundle.json and README.md (a card may be edited)
    validation: dict[str, Any]  # the run's figures and where they come from
    training_data: dict[str, Any]  # kind (synthetic | photos), root, cars

    @property
    def synthetic(self) -> bool:
        """Trained on `carvana sample-data`'s synthetic cars only: for trying the commands, not for real photos."""
        return self.training_data.get("kind") == "synthetic"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def header(architecture: str, args: dict) -> dict[str, str]:
    """What a weight file's `__metadata__` says of its net, for a tool that reads only the header: the
    framework, the architecture and its arguments (strings, as safetensors keeps them)."""
    return {"format": "pt", "architecture": architecture, "args": json.dumps(dict(args), sort_keys=True)}


def save_net(net: nn.Module, path: Path) -> None:
    """The net's weights as safetensors, with `header` as its metadata, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header(type(net).__name__, net.args))


@dataclass(frozen=True)
class Bundle:
    """A bundle read back and checked, as a `ModelSource`: its nets, threshold and settings. `backend`
    says which of its files run the nets (the safetensors weights, or the ONNX files)."""

    folder: Path
    manifest: Manifest
    backend: str = "torch"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def threshold(self) -> float:
        return self.manifest.threshold

    @property
    def synthetic(self) -> bool:
        return self.manifest.synthetic

    def has(self, net: str) -> bool:
        return net in self.manifest.nets

    def file(self, net: str) -> str:
        """The file that runs `net`: its weights, or its ONNX file under onnxruntime."""
        if self.backend == "torch":
            return self.manifest.nets[net].file
        name = f"{net}.onnx"
        if name not in self.manifest.files:
            raise CheckpointError(
                f"{self.folder}: no {name}; predict.backend=onnxruntime needs a bundle made with `carvana bundle "
                "--onnx`"
            )
        return name

    def hash(self, net: str) -> str:
        """The sha256 of the file that runs `net`, from bundle.json (checked when the bundle was read)."""
        return self.manifest.files[self.file(net)]

    def settings(self, cfg: Settings) -> Settings:
        """`cfg` with the bundle's settings for every box and mask (they win; a differing value is said in one line)."""
        fixed = self.manifest.prediction
        default = Settings()
        differ = [
            f"{k}={v} (the config: {setting_value(cfg, k)})"
            for k, v in {**fixed, "predict.threshold": self.threshold}.items()
            if setting_value(cfg, k) not in (v, setting_value(default, k))
        ]  # set by the user, to another value
        if differ:
            log.info(f"{self.folder}: the bundle fixes {', '.join(differ)}")
        return cfg.updated(fixed)

    def net(self, which: str, device: torch.device) -> nn.Module:
        """The net rebuilt from its architecture's arguments and the bytes of its file, which must hash as
        bundle.json says (on a Dask worker: as the client read it); weights that do not fit are refused."""
        name = self.file(which)
        path = self.folder / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
        if hashlib.sha256(data).hexdigest() != self.manifest.files[name]:
            raise CheckpointError(f"{path}: changed since the bundle was read (sha256 differs from {MANIFEST})")
        if self.backend == "onnxruntime":
            if device.type != "cpu":
                raise ConfigError(
                    f"predict.backend=onnxruntime runs the ONNX files on the CPU: set device=cpu (now {device})"
                )
            from common.onnx_export import OnnxNet

            return OnnxNet(data, name=str(path))
        from safetensors.torch import load

        spec = self.manifest.nets[which]
        net = UNet(**spec.args)  # the arguments and the weights' shapes were checked by `read_bundle`
        net.load_state_dict(load(data), strict=True)
        return net.to(device).eval()


def read_bundle(folder: str | Path, backend: str = "torch") -> Bundle:
    """The bundle in `folder`, checked: its format, every file present with its sha256; one line naming
    the file at fault otherwise (CheckpointError: exit 2). `backend`: `predict.backend`."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --model takes a folder written by `carvana bundle`")
    if path.stat().st_size > MAX_MANIFEST:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, not a bundle.json (at most {MAX_MANIFEST})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise CheckpointError(
            f"{path}: bundle format {found!r}, this carvana reads format {FORMAT}; make the bundle again with this "
            "version (carvana bundle)"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    unknown = sorted(set(manifest.prediction) - set(FIXED))
    if unknown or set(manifest.nets) != {"stage1", "refiner"}:
        raise CheckpointError(
            f"{path}: unexpected {'settings ' + ', '.join(unknown) if unknown else 'nets ' + ', '.join(manifest.nets)}"
        )
    for name in [*manifest.files, *(net.file for net in manifest.nets.values())]:
        if Path(name).name != name:
            raise CheckpointError(f"{path}: {name!r} is not a file name in the bundle's folder")
    for which, net in manifest.nets.items():
        if net.architecture != "UNet":
            raise CheckpointError(f"{path}: {which} is a {shown(net.architecture)}; this carvana builds UNet nets only")
        try:  # the bounds first: nothing is built from arguments out of them, not even on the meta device
            NetArgs.model_validate(net.args)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise CheckpointError(
                f"{path}: nets.{which}.args.{where}={shown(first.get('input'))}: {first['msg']}"
            ) from None
    try:  # the settings it fixes, within the bounds their declarations give (stage2.tile sizes tensors)
        fixed = Settings().updated(manifest.prediction)
    except ConfigError as e:
        raise CheckpointError(f"{path}: prediction: {e}") from None
    channels = {"stage1": 3, "refiner": 4 if fixed.stage2.coarse_channel else 3}
    for which, net in manifest.nets.items():
        if net.args["in_channels"] != channels[which]:
            raise CheckpointError(
                f"{path}: nets.{which} takes {net.args['in_channels']} input channels, its settings give it "
                f"{channels[which]} (stage2.coarse_channel={fixed.stage2.coarse_channel})"
            )
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
    if backend == "onnxruntime":
        from common.onnx_export import self_contained

        for which in manifest.nets:
            if f"{which}.onnx" in manifest.files:
                self_contained((folder / f"{which}.onnx").read_bytes(), str(folder / f"{which}.onnx"))
    bundle = Bundle(folder, manifest, backend)
    bundle.hash("refiner")  # an ONNX backend without ONNX files is refused here, before any work
    return bundle


def _check_fit(path: Path, which: str, net: NetSpec) -> None:
    """The weights' names and shapes (from the file's header: nothing loaded) against the architecture's."""
    from safetensors import SafetensorError, safe_open

    with torch.device("meta"):  # shapes only: no memory, no initialisation work (the arguments: NetArgs's bounds)
        wanted = {k: tuple(v.shape) for k, v in UNet(**net.args).state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not safetensors ({e})") from None
    if found != wanted:
        odd = sorted(k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k))
        raise CheckpointError(
            f"{path}: the weights do not fit {which}'s architecture {net.args} ({len(odd)} tensors differ, e.g. "
            f"{odd[0]}: {found.get(odd[0])} in the file, {wanted.get(odd[0])} wanted)"
        )
    said = header(net.architecture, net.args)
    odd = next((k for k in said if meta.get(k) != said[k]), None)  # other keys a tool may add are let be
    if odd is not None:
        raise CheckpointError(
            f"{path}: its header's metadata says {odd}={shown(meta.get(odd))}, {MANIFEST} says {shown(said[odd])}; "
            "one of them was edited, or the bundle is older than this carvana: make it again with `carvana bundle`"
        )


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """bundle.json, written last: a folder with it is a whole bundle."""
    write_text(folder / MANIFEST, json.dumps(manifest.model_dump(), indent=2) + "\n")
