"""Settings as typed, frozen data: each declared once below, a YAML file on top, dotted overrides on top of that.

A declaration holds the type, the default, the allowed values or range, a one-line doc and the
outputs the setting changes (`affects`): the cache keys and pipeline fingerprints are derived from
it (`depends`), and docs/configuration.md is generated from it (`reference`). pydantic does the
typing and the checks; this module turns its errors into one line naming the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from annotated_types import Interval
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError
from common.io import write_text

# What an output is called in `affects`; "model" inside a stage section means that stage's net.
OUTPUTS = ("sample", "stage1.model", "boxes", "stage2.model", "masks", "test_rows")


def setting(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    affects: tuple[str, ...] = (),
    expect: str = "",
) -> Any:
    """One declaration; `expect` words the allowed values where the type alone does not (a pattern)."""
    return Field(default, description=doc, ge=ge, le=le, json_schema_extra={"affects": list(affects), "expect": expect})


def number_or_auto(kind: type, ge: float, le: float | None = None) -> Any:
    """A number in a range, or the word auto (the range binds the number only)."""
    return Union[Annotated[kind, Interval(ge=ge, le=le)], Literal["auto"]]


class Section(BaseModel):
    # strict: no "3" for 3 and no true for 1, as YAML would otherwise slip through; frozen: read, never edited
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Data(Section):
    root: str = setting(
        "data/sample", "the Kaggle-layout folder: train/, train_masks/, test/", affects=("sample", "stage1.model")
    )
    val_cars: Union[int, list[Union[str, int]], str] = setting(
        4,
        'validation cars: a list of car ids, a count (the first N cars), or "k/K" (fold k of K)',
        affects=("stage1.model",),
    )
    hq: bool = setting(False, "read train_hq/ and test_hq/", affects=("stage1.model", "boxes"))
    max_bad_share: float = setting(
        0.01,
        "training refuses to start if more pairs than this share are unreadable",
        ge=0,
        le=1,
        affects=("stage1.model",),
    )
    limit_test: int = setting(0, "predict on the first N test images only; 0 = all", ge=0, affects=("test_rows",))


class OutputFolder(Section):
    dir: str = setting("outputs/run", "the run folder: checkpoints, bboxes.csv, submissions, report")


class SampleData(Section):
    cars: int = setting(
        0,
        "`carvana run` generates this many synthetic training cars into data.root when it has no train/; 0 = real data",
        ge=0,
        affects=("sample",),
    )
    test_cars: int = setting(2, "synthetic test cars", ge=0, affects=("sample",))
    seed: int = setting(0, "seed of the synthetic data", affects=("sample",))


Precision = Literal["auto", "bf16", "fp16", "fp32"]


class Training(Section):
    """What both stages' training reads."""

    epochs: number_or_auto(int, ge=1) = setting(
        10,
        "epochs; auto: the second epoch's pace fixes the count so the schedule ends within max_minutes (recorded in "
        "history.csv and the checkpoints: a resume keeps it)",
        affects=("model",),
    )
    max_minutes: float = setting(
        0.0,
        "wall-clock budget per invocation, validation included; 0 = none: a safety stop that keeps the best "
        "checkpoint (changes the model only with epochs: auto)",
        ge=0,
    )
    batch_size: int = setting(4, "samples per step (stage 2: crops)", ge=1, le=1024, affects=("model",))
    accum: int = setting(1, "gradient accumulation steps", ge=1, affects=("model",))
    optimizer: Literal["adam", "sgd"] = setting("adam", "adam | sgd", affects=("model",))
    lr: float = setting(1e-3, "learning rate", ge=1e-12, affects=("model",))
    momentum: float = setting(
        0.9, "SGD only; the seed used 0.99 with lr 3e-4 and batch 1", ge=0, le=1, affects=("model",)
    )
    beta2: float = setting(
        0.999,
        "Adam only: decay of its squared-gradient average; lower follows the gradient scale faster",
        ge=0,
        le=0.9999,
        affects=("model",),
    )
    weight_decay: float = setting(0.0, "weight decay", ge=0, affects=("model",))
    schedule: Literal["constant", "step", "cosine"] = setting("cosine", "learning-rate schedule", affects=("model",))
    step_every: int = setting(10, "epochs between steps of schedule: step", ge=1, affects=("model",))
    edge_weight: float = setting(
        0.0, "extra BCE weight on pixels near the mask boundary; 0 = plain BCE", ge=0, affects=("model",)
    )
    depth: int = setting(5, "U-Net levels", ge=1, le=10, affects=("model",))
    width: int = setting(
        16, "channels of the first level, doubled per level (at most 512)", ge=1, le=256, affects=("model",)
    )
    dropout: float = setting(0.0, "dropout in the two deepest levels", ge=0, le=0.99, affects=("model",))
    augment: Literal["full", "flip", "none"] = setting(
        "full", "full (flip, scale/shift, brightness/contrast/hue) | flip | none", affects=("model",)
    )
    workers: int = setting(
        2,
        "threads reading every training pair once before training; stage 2 also uses this many data-loader processes",
        ge=0,
        le=64,
    )
    resume: bool = setting(
        False, "continue from last.pt of the run folder (`carvana run` sets it when a step was interrupted)"
    )
    precision: Precision = setting(
        "auto",
        "auto (CUDA: bf16 where the card has it, else fp16 with loss scaling; CPU: bf16 where native and timed >= "
        "10% faster than fp32 when training starts, else fp32) | bf16 | fp16 | fp32",
        affects=("model",),
    )
    compile: bool = setting(
        False,
        "torch.compile the training step: faster on a GPU after a compilation of a minute or so",
        affects=("model",),
    )
    sync_bn: bool = setting(
        False, "under torchrun: batch-norm statistics over the global batch (small per-GPU batches)", affects=("model",)
    )
    max_bad_steps: int = setting(
        20,
        "a step whose loss is not finite on any rank is skipped and counted in history.csv; this many in a row stop "
        "training with an error, and a NaN never becomes best.pt",
        ge=1,
        affects=("model",),
    )


Checkpoint = Union[str, list[str]]


class Stage1(Training):
    size: int = setting(256, "square input size of the whole image", ge=16, le=2048, affects=("model", "boxes"))
    margin: Union[int, list[int]] = setting(
        [32, 96, 32, 32],
        "pixels added around the box: one number or [left, top, right, bottom]; more on top for antennas",
        affects=("boxes",),
    )
    threshold: float = setting(
        0.5,
        "of the stage-1 probability, for its boxes and its baseline submission",
        ge=1e-6,
        le=1 - 1e-6,
        affects=("boxes",),
    )
    checkpoint: Checkpoint = setting(
        "", "a checkpoint or a list of them (an ensemble); empty = <output.dir>/stage1/best.pt"
    )


class Stage2(Training):
    tile: int = setting(1024, "side of the refiner's square tiles", ge=16, le=4096, affects=("model", "masks"))
    min_overlap: int = setting(
        64,
        "least overlap of neighbouring tiles, at most half a tile; an image whose box would need more than 256 tiles "
        "becomes an error row naming these settings",
        ge=0,
        affects=("model", "masks"),
    )
    refine: Literal["tiles", "band"] = setting(
        "tiles",
        "what the refiner sees: tiles = overlapping tiles over the whole car box; band = patches over the pixels "
        "near stage 1's outline and the uncertain ones (stage2.band, stage2.patch, stage2.context), training crops "
        "centred on the outlines (docs/experiments/2026-12-06-band-refiner.md)",
        affects=("model", "masks"),
    )
    band: int = setting(
        16,
        "refine=band: pixels either side of stage 1's 0.5 contour the refiner sees",
        ge=0,
        le=256,
        affects=("masks",),
    )
    patch: int = setting(96, "refine=band: side of the refiner's square patches", ge=16, le=4096, affects=("masks",))
    context: int = setting(
        8,
        "refine=band: pixels along each patch's edges that are context only; its centre, patch - 2 x context, is kept",
        ge=0,
        le=2048,
        affects=("masks",),
    )
    crop: int = setting(384, "training crop size", ge=16, le=4096, affects=("model",))
    crops_per_image: int = setting(
        1,
        "crops cut from each decoded training image (batch_size counts crops); more = less decoding per crop",
        ge=1,
        le=64,
        affects=("model",),
    )
    box_jitter: int = setting(32, "pixels of random box jitter in training", ge=0, affects=("model",))
    train_boxes: Literal["truth", "stage1"] = setting(
        "truth", "boxes training crops are centred in", affects=("model",)
    )
    coarse_channel: bool = setting(
        True, "feed the stage-1 probability as a 4th input channel", affects=("model", "masks")
    )
    prior_skip: bool = setting(
        True, "with coarse_channel: add its logit to the output, so the net learns a correction", affects=("model",)
    )
    blend: Literal["mean", "smooth"] = setting(
        "smooth", "how overlapping tiles are blended", affects=("model", "masks")
    )
    checkpoint: Checkpoint = setting(
        "", "a checkpoint or a list of them (an ensemble); empty = <output.dir>/stage2/best.pt"
    )
    val_images: int = setting(0, "validate on this many held-out images per epoch; 0 = all", ge=0, affects=("model",))

    @property
    def window(self) -> int:
        """Side of the refiner's square input: a patch of the band, else a tile (an ONNX file is exported at it)."""
        return self.patch if self.refine == "band" else self.tile


class Bboxes(Section):
    path: str = setting("", "a bboxes.csv from another run; empty = <output.dir>/bboxes.csv")


class Predict(Section):
    threshold: number_or_auto(float, ge=1e-6, le=1 - 1e-6) = setting(
        0.5,
        "of the cascade's probability; auto: the threshold with the best mean validation Dice in the last `carvana "
        "evaluate` sweep (report/threshold_sweep.csv; `carvana run` then evaluates before predicting)",
        affects=("masks",),
    )
    batch_size: int = setting(
        2, "tiles per forward pass, across images (mirrored copies ride along with tta_flip)", ge=1, le=256
    )
    tta_flip: bool = setting(False, "average with the prediction of the mirrored image", affects=("boxes", "masks"))
    chunk: int = setting(16, "images per resumable chunk of prediction results", ge=1)
    workers: number_or_auto(int, ge=0, le=64) = setting(
        "auto",
        "reader processes decoding ahead of the device; 0 = in the main process; auto: 0 on a CPU (the fastest "
        "there), on a GPU the cores but one, shared by the visible GPUs; at most 128 photos read ahead in all (a "
        "batch of 8: 16 processes), or one batch where a batch is larger",
    )
    decode: Literal["pil", "nvjpeg"] = setting(
        "pil",
        "where JPEGs are decoded: pil = in the reader processes (the tested path); nvjpeg = on the GPU with "
        "torchvision, for machines with too few cores to feed the GPU (unproven until benchmarks/gpu_check.py has "
        "passed on your card)",
    )
    compile: bool = setting(False, "torch.compile the nets: faster on a GPU after a compilation of a minute or so")
    backend: Literal["torch", "onnxruntime", "auto"] = setting(
        "torch",
        "what runs the nets: torch; onnxruntime = a bundle's ONNX files (carvana bundle --onnx, then --model) on the "
        "CPU; auto = with such a bundle on the CPU and no cluster, onnxruntime where it runs the refiner in under 90% "
        "of torch's time, timed when the bundle loads and logged (the CPU decides: docs/benchmarks.md); the backend "
        "is part of a prediction's chunk key, so name it for a long run you may resume; masks agreed with torch's on "
        "99.97% of the pixels or more (docs/experiments/2026-12-06-band-refiner.md)",
    )
    cluster: str = setting(
        "",
        '"" = this process; local:N = a Dask LocalCluster of N workers; tcp://host:8786 = a Dask scheduler',
        expect="empty, local:N or a scheduler address such as tcp://host:8786",
    )


class Serve(Section):
    """`carvana serve`: every limit a client can meet (docs/reliability.md, "Hostile input", says what each answers)."""

    max_batch: int = setting(8, "`carvana serve`: images predicted together in one device step", ge=1, le=64)
    max_wait_ms: int = setting(10, "how long a batch's first request waits for more to join it", ge=0)
    max_queue: int = setting(32, "photos waiting for the device at most; beyond it 503 with Retry-After", ge=1)
    max_bytes: int = setting(
        50_000_000,
        "largest photo, in bytes; a request body may add a third for base64 and its envelope (413 beyond, the "
        "upload not read further)",
        ge=1,
        le=2_000_000_000,
    )
    max_pixels: int = setting(
        40_000_000,
        "largest photo, width x height: an 8K frame is 33.2 M, a 12 MP phone photo 12 M (413 beyond it, from the "
        "header, before decoding)",
        ge=1,
    )
    max_pixels_in_flight: int = setting(
        120_000_000,
        "pixels of the photos decoded and not yet answered, all requests together; a photo that would go beyond "
        "gets 503 with Retry-After, before it is decoded",
        ge=1,
    )
    max_uploads: int = setting(
        16, "request bodies being received at once; beyond it 503 with Retry-After, before any byte is read", ge=1
    )
    read_timeout_s: int = setting(
        60,
        "a request's headers, and then its body, must each arrive within this many seconds (a body: 408; headers: "
        "the connection is closed)",
        ge=1,
    )
    timeout_s: int = setting(120, "a photo not cut out within this many seconds of joining the queue gets 504", ge=1)
    shutdown_timeout_s: int = setting(
        140,
        "after SIGTERM, the requests in flight get this many seconds to finish; then their connections are closed "
        "(give the orchestrator a longer grace period)",
        ge=1,
    )
    api_key_env: str = setting(
        "",
        "name of the environment variable holding the API key; with it, POST /v1/cutout, /v1/segment and "
        "/v2/models/NAME/infer need the key (X-API-Key or Authorization: Bearer); the page, the probes (/healthz, "
        "/v2/health/*), model metadata, /docs and /metrics stay open, for browsers, orchestrators and Prometheus. "
        "Empty = no key: bind beyond 127.0.0.1 only behind something that checks",
    )
    allowed_hosts: list[str] = setting(
        [],
        "Host headers the server answers (e.g. [cars.example.com, '*.example.com']); others get 400. Empty = any; "
        "set it where a browser could reach a server without a key (DNS rebinding)",
    )
    devices: list[str] = setting([], "one replica of the nets per device, e.g. [cuda:0, cuda:1]; empty = `device`")


class Cutout(Section):
    clean_edges: bool = setting(
        True,
        "`carvana cutout`: the soft edge in the car's own colour (blur fusion), not the photo's, which carries the "
        "old background; `carvana serve` takes clean_edges=false per request",
    )


class Settings(Section):
    data: Data = Data()
    output: OutputFolder = OutputFolder()
    sample: SampleData = SampleData()
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", expect="auto, cpu, cuda or cuda:N")
    seed: int = setting(0, "seed of weights, crops and splits", affects=("stage1.model", "stage2.model"))
    stage1: Stage1 = Stage1()
    stage2: Stage2 = Stage2()
    bboxes: Bboxes = Bboxes()
    predict: Predict = Predict()
    cutout: Cutout = Cutout()
    serve: Serve = Serve()

    def updated(self, changes: dict[str, Any]) -> Settings:
        """A copy with `{"dotted.key": value}` changed, checked as a loaded file is."""
        tree = self.model_dump()
        for key, value in changes.items():
            _set(tree, key, value)
        return _parse(tree)


# ---- declarations, walked ------------------------------------------------------------------------


def _fields(model: type[BaseModel] = Settings, prefix: str = "") -> dict[str, Any]:
    """Every leaf setting by dotted key, in declaration order."""
    out = {}
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
            out.update(_fields(f.annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = f
    return out


FIELDS = _fields()


def _affects(key: str) -> set[str]:
    section = key.split(".")[0]
    tags = FIELDS[key].json_schema_extra["affects"]
    return {f"{section}.{t}" if t == "model" else t for t in tags}


DEPENDS = {o: [k for k in FIELDS if o in _affects(k)] for o in OUTPUTS}  # output -> the dotted keys of its settings


def depends(cfg: Settings, output: str) -> dict[str, Any]:
    """The settings `output` (one of OUTPUTS) depends on, by name within their section: what its
    cache key or pipeline fingerprint hashes, so a new setting needs only its declaration. A stage's
    budget (`max_minutes`) changes its model only when it fixes the epoch count (`epochs: auto`)."""
    values = {
        k.rsplit(".", 1)[-1]: setting_value(cfg, k) for k in DEPENDS[output]
    }  # tests/test_config.py: names unique per output
    stage = output.removesuffix(".model")
    if stage in ("stage1", "stage2") and getattr(cfg, stage).epochs == "auto":
        values["max_minutes"] = getattr(cfg, stage).max_minutes
    return values


def digest(parts: Any, length: int = 16) -> str:
    """A short, stable hash of JSON-able parts (keys sorted): what cache keys and fingerprints are."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


def setting_value(cfg: Settings, key: str) -> Any:
    """The value of the dotted setting `key`: for code that handles settings by name (cache keys, bundles)."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _arms(annotation: Any) -> tuple:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def _words(annotation: Any) -> tuple[list[str], list[str]]:
    """(type names, literal values) of a declared type."""
    names, values = [], []
    for arg in _arms(annotation):
        if typing.get_origin(arg) is Annotated:
            arg = typing.get_args(arg)[0]
        if typing.get_origin(arg) is Literal:
            values += [str(v) for v in typing.get_args(arg)]
        else:
            names.append(getattr(typing.get_origin(arg) or arg, "__name__", str(arg)))
    return names, values


def _bounds(f: Any) -> str:
    marks = list(f.metadata) + [
        m for arm in _arms(f.annotation) if typing.get_origin(arm) is Annotated for m in arm.__metadata__
    ]
    lo = next((m.ge for m in marks if getattr(m, "ge", None) is not None), None)
    hi = next((m.le for m in marks if getattr(m, "le", None) is not None), None)
    if lo is None and hi is None:
        return ""
    return f">= {lo}" if hi is None else f"in [{lo}, {hi}]"


# ---- loading -------------------------------------------------------------------------------------

_RANGE_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}


def _message(errors: list[dict], tree: dict) -> str:
    """pydantic's first error, as one line naming the key and what it accepts."""
    loc = errors[0]["loc"]
    model, parts = Settings, []
    for part in loc:
        f = model.model_fields.get(part) if isinstance(part, str) else None
        if f is None:
            break
        parts.append(part)
        if not (isinstance(f.annotation, type) and issubclass(f.annotation, Section)):
            break
        model = f.annotation
    key = ".".join(parts)
    if errors[0]["type"] == "extra_forbidden" or key not in FIELDS and len(parts) < len(loc):
        return _unknown(".".join(str(p) for p in loc))
    value: Any = tree
    for part in parts:
        value = value.get(part) if isinstance(value, dict) else None
    if key not in FIELDS:  # a section given as something else than a mapping
        return f"config key '{key}' must be a mapping of settings, got {shown(value)}"
    f, mine = FIELDS[key], [e for e in errors if e["loc"][: len(parts)] == tuple(parts)]
    names, values = _words(f.annotation)
    if any(e["type"] in _RANGE_ERRORS for e in mine):
        return f"config key '{key}' must be {_bounds(f)}; got {shown(value)}"
    if f.json_schema_extra["expect"]:
        return f"config key '{key}' must be {f.json_schema_extra['expect']}; got {shown(value)}"
    if values == ["auto"]:
        return f"config key '{key}' must be a number or auto; got {shown(value)}"
    if values and not names and isinstance(value, str):
        return f"config key '{key}' must be one of {', '.join(values)}; got {shown(value)}"
    return f"config key '{key}' must be {' or '.join(names or ['str'])}, got {shown(value)}"


def _unknown(key: str) -> str:
    close = difflib.get_close_matches(key[:200], FIELDS, n=1, cutoff=0.6)
    return f"unknown config key {shown(key)}" + (f" (did you mean '{close[0]}'?)" if close else "")


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60


def shown(value: Any, limit: int = 100) -> str:
    """`value` as an error message quotes it: its repr, cut short, so that a long string or a YAML alias
    bomb (a few lines that expand to billions of items) gives one short line, not megabytes."""
    text = _SHOWN.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse(tree: dict, where: str = "") -> Settings:
    try:
        cfg = Settings.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(where + _message(e.errors(), tree)) from None
    _validate(cfg)
    return cfg


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(tree.get(p), dict):
            raise ConfigError(_unknown(key))
        tree = tree[p]
    tree[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Defaults <- YAML file <- `key=value` overrides (values parsed as YAML: 3, 0.5, true, [a, b])."""
    cfg = Settings()
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
        cfg = _parse(tree, f"{path}: ")
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like key=value")
        changes[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    return cfg.updated(changes) if changes else cfg


def _validate(cfg: Settings) -> None:
    """The checks that involve more than one setting, or more than a type and a range."""
    for stage in ("stage1", "stage2"):
        s = getattr(cfg, stage)
        if s.epochs == "auto" and not s.max_minutes:
            raise ConfigError(
                f"config key '{stage}.epochs' is auto, which fits the schedule to a budget: set {stage}.max_minutes too"
            )
        if isinstance(s.checkpoint, list) and not (s.checkpoint and all(s.checkpoint)):
            raise ConfigError(
                f"config key '{stage}.checkpoint' must be a path or a non-empty list of paths (an ensemble); got "
                f"{shown(s.checkpoint)}"
            )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N; got {shown(cfg.device)}")
    overlap, tile = cfg.stage2.min_overlap, cfg.stage2.tile
    if overlap > tile // 2:
        raise ConfigError(
            f"stage2.min_overlap={overlap} must be at most half of stage2.tile={tile} ({tile // 2}): tiles start every "
            "tile - min_overlap pixels, so a larger overlap refines each pixel more than twice per axis and "
            "multiplies the tiles (the blend needs only a few dozen pixels)"
        )
    patch, context = cfg.stage2.patch, cfg.stage2.context
    if patch - 2 * context < 8:
        raise ConfigError(
            f"stage2.context={context} leaves stage2.patch={patch} a centre of {patch - 2 * context} px; the centre, "
            "patch - 2 x context, is what a patch keeps: make it at least 8 px"
        )
    margin = cfg.stage1.margin
    sides = [margin] if isinstance(margin, int) else margin
    if len(sides) not in (1, 4) or not all(m >= 0 for m in sides):
        raise ConfigError(
            "config key 'stage1.margin' must be pixels >= 0, one number or [left, top, right, bottom]; got "
            f"{shown(margin)}"
        )
    if cfg.stage2.batch_size % cfg.stage2.crops_per_image:
        raise ConfigError(
            f"stage2.batch_size={cfg.stage2.batch_size} counts crops: make it a multiple of "
            f"stage2.crops_per_image={cfg.stage2.crops_per_image}"
        )
    serve = cfg.serve
    if serve.max_pixels > serve.max_pixels_in_flight:
        raise ConfigError(
            f"serve.max_pixels={serve.max_pixels} must be at most serve.max_pixels_in_flight="
            f"{serve.max_pixels_in_flight}: a photo of the largest size must fit in what the server holds at once"
        )
    cluster = cfg.predict.cluster
    if cluster and not (re.fullmatch(r"local:[1-9]\d*", cluster) or "://" in cluster):
        raise ConfigError(
            "config key 'predict.cluster' must be empty, local:N or a scheduler address such as tcp://host:8786; got "
            f"{shown(cluster)}"
        )


def as_yaml(cfg: Settings) -> str:
    """What `carvana config` prints: the settings a job would run with."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def save_config(cfg: Settings, path: str | Path) -> None:
    write_text(path, as_yaml(cfg))


def reference() -> str:
    """docs/configuration.md, generated from the declarations (a test keeps the file in step)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the declarations in `common/config.py` by `carvana config --reference`; do not edit by hand.",
        "",
        "Settings come from the defaults below, then a YAML file (`--config FILE`), then dotted overrides on the "
        "command line (`stage1.epochs=3`). `carvana config --config FILE [overrides]` prints what a job would run "
        "with. An unknown key, a value of the wrong type or out of range stops the command before any work, naming "
        "the key.",
        "",
        "`stage1` and `stage2` share the training settings; *affects* lists the outputs that are recomputed when the "
        "setting changes (the cache keys and the pipeline steps' fingerprints are derived from it).",
        "",
        "| setting | type | default | allowed | affects | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for key, f in FIELDS.items():
        names, values = _words(f.annotation)
        kind = " or ".join(names + (["auto"] if values == ["auto"] else []))
        allowed = f.json_schema_extra["expect"] or (", ".join(values) if values and not names else _bounds(f))
        default = yaml.safe_dump(f.default, default_flow_style=True).strip().removesuffix("...").strip() or '""'
        doc, allowed = f.description.replace("|", "/"), allowed.replace("|", "/")
        lines.append(
            f"| `{key}` | {kind or 'str'} | `{default}` | {allowed} | {', '.join(sorted(_affects(key)))} | {doc} |"
        )
    return "\n".join(lines) + "\n"
