"""Configuration as plain data: defaults below, a YAML file on top, dotted overrides on top of that.

Every key a user can set is in DEFAULTS; an unknown key or a value of the wrong type fails at
start-up with the key's name (and, for a typo, the closest valid key).
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError
from common.io import write_text

_TRAIN = {
    "epochs": 10,  # or "auto": fixed from the second epoch's pace so the schedule fits max_minutes
    "max_minutes": 0.0,  # wall-clock budget; 0 = none
    "batch_size": 4,
    "accum": 1,  # gradient accumulation steps
    "optimizer": "adam",  # adam | sgd
    "lr": 1e-3,
    "momentum": 0.9,  # SGD only; the seed used 0.99 with lr 3e-4 and batch 1
    "beta2": 0.999,  # Adam only: decay of its squared-gradient average; lower (demo.yaml: 0.9) follows the gradient scale faster
    "weight_decay": 0.0,
    "schedule": "cosine",  # constant | step | cosine
    "step_every": 10,  # epochs, for schedule=step
    "edge_weight": 0.0,  # extra BCE weight on pixels near the mask boundary; 0 = plain BCE
    "depth": 5,  # U-Net levels
    "width": 16,  # channels of the first level, doubled per level
    "dropout": 0.0,  # in the two deepest levels
    "augment": "full",  # full (flip, scale/shift, brightness/contrast/hue) | flip | none
    "workers": 2,  # data-loader processes
    "resume": False,
    "precision": "auto",  # auto (CUDA: bf16 on cards that have it, else fp16 + loss scaling; CPU: where bf16 is native, bf16 if timed >= 10% faster than fp32 when training starts; else fp32) | bf16 | fp16 | fp32
    "compile": False,  # torch.compile the training step: faster on a GPU after a compilation of a minute or so
    "sync_bn": False,  # under torchrun: batch-norm statistics over the global batch (small per-GPU batches)
    "max_bad_steps": 20,  # this many optimizer steps in a row with a non-finite loss stop training with an error
}

DEFAULTS: dict[str, Any] = {
    "data": {
        "root": "data/sample",
        "val_cars": 4,  # a list of car ids, a count (the first N cars), or "k/K" (fold k of K)
        "hq": False,  # read train_hq/ and test_hq/
        "max_bad_share": 0.01,  # training refuses to start if more pairs than this are unreadable
        "limit_test": 0,  # predict on the first N test images only; 0 = all
    },
    "output": {"dir": "outputs/run"},
    # `carvana run` generates synthetic data into data.root when it holds no train/ folder and cars > 0
    "sample": {"cars": 0, "test_cars": 2, "seed": 0},
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "seed": 0,
    # margin: pixels added around the stage-1 box, one number or [left, top, right, bottom]; more on top for antennas
    # threshold: of the stage-1 probability, for its boxes and its baseline submission
    "stage1": {**_TRAIN, "size": 256, "margin": [32, 96, 32, 32], "threshold": 0.5, "checkpoint": ""},
    "stage2": {
        **_TRAIN,
        "tile": 1024,
        "min_overlap": 64,
        "crop": 384,  # training crop size
        "crops_per_image": 1,  # crops cut from each decoded training image (batch_size counts crops); more = less decoding per crop
        "box_jitter": 32,  # pixels of random box jitter in training
        "train_boxes": "truth",  # truth | stage1
        "coarse_channel": True,  # feed the stage-1 probability as a 4th input channel
        "prior_skip": True,  # with coarse_channel: add its logit to the output, so the net learns a correction
        "blend": "smooth",  # mean | smooth
        "checkpoint": "",
        "val_images": 0,  # validate on this many held-out images per epoch; 0 = all
    },
    "bboxes": {"path": ""},  # a bboxes.csv from another run; empty = <output.dir>/bboxes.csv
    "predict": {
        "threshold": 0.5,  # of the cascade's probability; "auto": the best of the last `carvana evaluate` sweep
        "batch_size": 2,  # tiles per forward pass, across images (mirrored copies ride along with tta_flip)
        "tta_flip": False,
        "chunk": 16,  # images per resumable chunk of prediction results
        "workers": 0,  # reader processes decoding ahead of the device; 0 = in the main process (fastest on a CPU-only machine)
        "compile": False,  # torch.compile the nets: faster on a GPU after a compilation of a minute or so
        "cluster": "",  # "" = this process; "local:N" = a Dask LocalCluster of N workers; "tcp://host:8786" = a Dask scheduler
    },
}

# Keys whose value may take more than the default's type.
_ALTERNATIVES: dict[str, tuple[type, ...]] = {"data.val_cars": (int, list, str), "stage1.margin": (int, list),
                                              "stage1.epochs": (int, str), "stage2.epochs": (int, str),
                                              "predict.threshold": (float, str), "stage1.checkpoint": (str, list),
                                              "stage2.checkpoint": (str, list)}

# Allowed values, checked when the config loads (a name: one of these; a pair: lo <= value, or lo <= value <= hi).
_CHOICES = {"optimizer": ("adam", "sgd"), "schedule": ("constant", "step", "cosine"),
            "stage2.blend": ("mean", "smooth"), "augment": ("full", "flip", "none"), "precision": ("auto", "bf16", "fp16", "fp32"), "stage2.train_boxes": ("truth", "stage1")}
_RANGES = {"epochs": (1, None), "batch_size": (1, None), "accum": (1, None), "step_every": (1, None), "depth": (1, None),
           "width": (1, None), "workers": (0, None), "lr": (1e-12, None), "momentum": (0, 1), "beta2": (0, 0.9999), "weight_decay": (0, None),
           "edge_weight": (0, None), "dropout": (0, 0.99), "max_minutes": (0, None), "stage1.size": (16, None),
           "stage2.tile": (16, None), "stage2.min_overlap": (0, None), "stage2.crop": (16, None),
           "stage2.box_jitter": (0, None), "stage2.crops_per_image": (1, None), "max_bad_steps": (1, None), "stage2.val_images": (0, None), "data.max_bad_share": (0, 1),
           "data.limit_test": (0, None), "predict.threshold": (1e-6, 1 - 1e-6), "stage1.threshold": (1e-6, 1 - 1e-6), "predict.batch_size": (1, None),
           "predict.chunk": (1, None), "predict.workers": (0, None), "sample.cars": (0, None), "sample.test_cars": (0, None)}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


_VALID = _flatten(DEFAULTS)


def _check(key: str, value: Any) -> Any:
    if key not in _VALID:
        close = difflib.get_close_matches(key, _VALID, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
    default = _VALID[key]
    allowed = _ALTERNATIVES.get(key, (type(default),))
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
    return value


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Defaults <- YAML file <- `key=value` overrides (values parsed as YAML: 3, 0.5, true, [a, b])."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        for key, value in _flatten(tree).items():
            try:
                _set(cfg, key, _check(key, value))
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like key=value")
        _set(cfg, key.strip(), _check(key.strip(), yaml.safe_load(text) if text.strip() else ""))
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    """Every setting with a fixed set of values or a range, checked before any work starts."""
    for key, value in _flatten(cfg).items():
        short = key.split(".", 1)[-1] if key.startswith(("stage1.", "stage2.")) else key
        choices = _CHOICES.get(key) or _CHOICES.get(short)
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
        if key == "predict.threshold" and value == "auto":
            continue
        if short == "epochs" and value == "auto":
            if not cfg[key.split(".")[0]]["max_minutes"]:
                raise ConfigError(f"config key '{key}' is auto, which fits the schedule to a budget: set {key.split('.')[0]}.max_minutes too")
            continue
        bounds = _RANGES.get(key) or _RANGES.get(short)
        if isinstance(value, str) and bounds:
            auto = " or auto" if short == "epochs" or key == "predict.threshold" else ""
            raise ConfigError(f"config key '{key}' must be a number{auto}; got {value!r}")
        if bounds and not (bounds[0] <= value and (bounds[1] is None or value <= bounds[1])):
            where = f">= {bounds[0]}" if bounds[1] is None else f"in [{bounds[0]}, {bounds[1]}]"
            raise ConfigError(f"config key '{key}' must be {where}; got {value!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg["device"]):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N; got {cfg['device']!r}")
    overlap, tile = cfg["stage2"]["min_overlap"], cfg["stage2"]["tile"]
    if overlap > tile // 2:
        raise ConfigError(f"stage2.min_overlap={overlap} must be at most half of stage2.tile={tile} ({tile // 2}): tiles start "
                          "every tile - min_overlap pixels, so a larger overlap refines each pixel more than twice per axis "
                          "and multiplies the tiles (the blend needs only a few dozen pixels)")
    for stage in ("stage1", "stage2"):
        value = cfg[stage]["checkpoint"]
        if isinstance(value, list) and not (value and all(isinstance(v, str) and v for v in value)):
            raise ConfigError(f"config key '{stage}.checkpoint' must be a path or a non-empty list of paths (an ensemble); got {value!r}")
    margin = cfg["stage1"]["margin"]
    sides = [margin] if isinstance(margin, int) else margin
    if len(sides) not in (1, 4) or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in sides):
        raise ConfigError(f"config key 'stage1.margin' must be pixels >= 0, one number or [left, top, right, bottom]; got {margin!r}")
    if cfg["stage2"]["batch_size"] % cfg["stage2"]["crops_per_image"]:
        raise ConfigError(f"stage2.batch_size={cfg['stage2']['batch_size']} counts crops: make it a multiple of "
                          f"stage2.crops_per_image={cfg['stage2']['crops_per_image']}")
    cluster = cfg["predict"]["cluster"]
    if cluster and not (re.fullmatch(r"local:[1-9]\d*", cluster) or "://" in cluster):
        raise ConfigError(f"config key 'predict.cluster' must be empty, local:N or a scheduler address such as tcp://host:8786; got {cluster!r}")


def save_config(cfg: dict, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg, sort_keys=False))

