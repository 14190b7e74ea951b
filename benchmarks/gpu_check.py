"""Proof of the device path on a CUDA card, in parts: correctness checks, then speed rows, then the parts
that compile.

    .venv/bin/python benchmarks/gpu_check.py [--quick] [--only PARTS] [--out FILE] [--samples DIR|generated]
        [--work DIR] [--budget S]
    .venv/bin/python benchmarks/gpu_check.py --list-samples     # the sample files a run reads, one a line

benchmarks/gpu_prepare.sh copies those samples and the missing wheels into .gpu/ and prints the one
command for a lent card. The script prints its plan first (each part's estimate, its limit and the
total), then each part's estimate as it starts and its result as it ends. With --out the JSON is
written (atomically) before anything that can fail, with what is known of the machine, and again after
every part, so a killed run keeps every finished result. Every part runs within a limit derived from its
estimate (and, with --budget S, within S seconds from the start): a part past it is stopped, its child
processes killed, and it is a failed part whose reason says so; the parts after it still run. --only
takes part names and the groups `checks`, `speed`, `compile` and `all`; the default is
`checks,speed,compile` without train_compiled. --samples: the real samples (train_512/, test_fullres/ as in
../shared/carvana_samples, the default where it exists), or `generated`: cars drawn by
common/data/synth.py, so that the script runs on any clone (the JSON says which).

Checks, each true or false (one this machine cannot run is listed under `skipped` with the reason):

  environment          torch, CUDA, cuDNN, torchvision with a working nvjpeg, bf16 (on a CPU: torch alone)
  nvjpeg_matches_pil   nvjpeg and PIL decodes of the photos: mean absolute difference under 2 levels each
  train_one_sync       the training loop syncs the host at most once per optimizer step (CUDA sync debug mode)
  async_equals_sync    `stage2 predict`'s submission.csv.gz is byte-identical to the same run with
                       CUDA_LAUNCH_BLOCKING=1 (every kernel waited for: no stream can race another), for
                       each decode (pil; nvjpeg where the setting exists); both runs in deterministic cuDNN
  nvjpeg_predict_matches_pil  the submissions with predict.decode=nvjpeg and pil: per-image Dice >= 0.995
  device_matches_cpu   the same checkpoints on the device (fp16) and on the CPU (fp32): per-image Dice >= 0.997
  dask_two_devices     `predict.cluster=local:2` on two GPUs agrees with one process (Dice >= 0.997)
  sanitizer            TORCH_CUDA_SANITIZER=1 first reports a planted race (a tensor written on the default
                       stream, then on a side stream that did not wait), then none in a short prediction, run
                       in one process (predict.workers=0: a reader process forked under the sanitizer fails)

Speed rows, with pipeline.yaml's nets (depth 6, width 16, untrained: weights do not change the cost), each
the steady state of `stage2 predict`'s loop over 1,024 linked photos with a cascade built once and warmed
up; the start-up (nets loaded, the warm-up pass, the reader's start and first batch) is timed apart:

  predict_pil          PIL decoding in reader processes, and each Cascade step timed alone (its share)
  predict_nvjpeg       the same with predict.decode=nvjpeg
  train_plain          both training loops against the net alone (bench_train.py)

Compiling, last (tens of seconds of inductor each):

  compile_static       predict.compile: no new graph compiled after the warm-up pass (partial batches included)
  predict_compiled     the speed row compiled (PIL decode; inductor's cache from compile_static)
  train_compiled       both training loops compiled: two nets' forward and backward graphs (only when named)

Targets on one H100/H200-class card: >= 150 images/s end to end, training loops >= 80% of the net.

--quick: tiny nets, a few images and no flip TTA, so that it also runs on a CPU (tests/test_gpu_check.py
runs it there, on generated cars); the compiled speed rows are left out. Exit status 1 if any check is
false or any part failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import unittest.mock
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import bench_predict
import bench_train
import numpy as np
import pandas as pd
import torch

from common.config import FIELDS, Settings, load_config, save_config
from common.data.images import read_image
from common.data.rle import rle_decode
from common.errors import Failure
from common.io import write_text
from common.metrics import dice
from common.model import UNet, amp_dtype, precision_name
from common.model_source import open_source
from common.prediction import step
from common.prediction.reader import nvjpeg_decoder, reader_processes
from common.training.batches import TensorBatches
from common.training.trainer import Clock, Loop, build_optimizer, train_one_epoch
from stage1_lowres import predict as s1_predict
from stage1_lowres import train as s1_train
from stage2_fullres import train as s2_train
from stage2_fullres.cascade import Cascade
from stage2_fullres.tiles import refined_pixels

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "carvana_samples"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DECODE = "predict.decode" in FIELDS  # the setting that picks PIL or nvjpeg; before it existed, CUDA took nvjpeg itself
CARS, TESTS = 10, 16  # training cars (16 angles each, 2 held out) and full-resolution photos a full run reads
CARS_TRAIN = CARS - 2
QUICK_CARS, QUICK_TESTS = 3, 2
QUICK_BOX = (
    700,
    400,
    1200,
    900,
)  # --quick's speed rows: one 512 tile a photo (the full run's: bench_predict.BOX, two 1024 tiles)
EPOCHS = (24, 6)  # the checkpoints' training epochs, stage 1 and stage 2
SPEED_IMAGES = 1024  # the speed rows' photos, TESTS real ones linked under that many names
QUICK_SPEED_IMAGES = 8
# timed steps of each training row (bench_train: the net alone after 3 warm-up steps; the loop after an epoch as long)
TRAIN_STEPS = 20

# Per-image Dice bounds, from a measurement on a 2-core CPU (docs/benchmarks.md, "The bounds"): nets of this
# check's size where it counts (refiner depth 5, width 16 on 1024 tiles, flip TTA; stage 1 at 128, depth 4,
# width 8), briefly trained on the same 8 cars (validation Dice 0.97 and 0.95), 8 of the 16 photos. The CPU's
# bf16 prediction against its fp32 one agreed at 0.99923 for the worst image (mean 0.99946). The card predicts
# in fp16, whose 3 more mantissa bits round 8x finer than bf16's, against the CPU's fp32: 0.997 leaves the bf16
# disagreement 4x over, while a wrong kernel, a lost tile or a raced buffer costs whole regions (well under 0.99).
AGREE = 0.997
# nvjpeg against PIL, both on the card: the inputs differ by the decoders' rounding (PIXEL_LEVELS). The fp32
# prediction with +-2 levels of uniform noise added to every pixel against the plain one agreed at 0.99892 for
# the worst image (+-1 level: 0.99951); 0.995 leaves the +-2 disagreement 4.6x over.
AGREE_DECODE = 0.995
# JPEG decoders round the IDCT and the chroma upsampling differently: torchvision's own test of its nvjpeg decode
# against its CPU one (libjpeg-turbo, as PIL's) allows a mean absolute difference under 2 levels (test/test_image.py,
# test_decode_jpeg_cuda). A wrong colour order, a shifted or a half-written image differs by tens.
PIXEL_LEVELS = 2.0

# What the estimates rest on. Measured on one H100 elsewhere (docs/benchmarks.md), pipeline.yaml's nets:
TILES_PER_S = 394  # refiner inference on 1024 tiles, fp16, channels_last
TILES_PER_S_COMPILED = 840  # the same under torch.compile
S1_TRAIN_PER_S = (
    570  # stage-1 forward + backward at 512, images/s; 384 crops at the pixels' ratio, 256 at only 2x (small batches)
)
PIL_PER_S_CORE = 32  # 1918x1280 JPEG decodes by PIL per core
NVJPEG_PER_S = 3685
# Guesses, to be replaced by the seconds the first run on a card records (its JSON has each part's):
# what a fresh process adds on a card (CUDA context, cuDNN and cuBLAS handles), or a net's new shapes (cuDNN's tuning)
CUDA_S = 5
RUN_S = 3  # one more `stage2 predict` in a process already started: reader processes, chunks, the submission
EPOCH_S = (0.5, 3)  # an epoch's fixed cost on a card: stage 1 (images in memory), stage 2 (loader, validation)
COMPILE_S = 40  # inductor compiling one net for inference ("tens of seconds")
COMPILE_TRAIN_S = 90  # inductor compiling one net's forward and backward graphs
COMPILE_CACHED_S = 10  # the same graph again: Dynamo traces, inductor's on-disk cache has the code
CSAN = 3  # the sanitizer's Python hook records a stack trace at every kernel launch: a prediction a few times slower
# a photo's device work besides the refiner, a guess: stage 1 at 512 with flip TTA (an eighth of the refiner's
# pixels: 1.3 ms at its rate) and the full-resolution upsampling, tile cutting, stitching, threshold and copies (1 ms)
REST_MS = 2.5
CPU_TILE_S = (
    3.4 / 6
)  # a 1024 tile through the checks' refiner in fp32 on the CPU: 3.4 s measured on 2 cores; 16 cores 6x faster
# Seconds of each part in --quick on a 2-core CPU (2026-12-03, the least loaded of three runs; tiny nets, no TTA):
# process starts, reader processes, Python, the fixed costs a full run pays too; the estimates add what grows
# with the nets and the images
QUICK_CPU = {
    "checkpoints": 11,
    "environment": 1,
    "async_equals_sync": 7,
    "device_matches_cpu": 1,
    "compile_static": 7,
    "predict_pil": 5,
    "band_vs_tiles": 4,  # a guess (added 2026-12-06, not measured with the others)
    "train_plain": 6,
}
QUICK_EPOCHS = (2, 1)
# A part's limit: its estimate 3x over, at least a minute more than it. In --quick (a CPU that may be busy
# with other work: the tests run it) 10x over, at least 5 minutes: a limit there guards against a hang, not
# a slow machine. --budget caps every limit at the budget's end.
LIMIT = (3, 60)
QUICK_LIMIT = (10, 300)
# What a full run may hold up for the JSON to come back in the documented call (docs/benchmarks.md): the
# default plan must fit in it, the call's 600 s leaving the rest for the pip install and the start.
DEFAULT_PLAN_S = 420


def settings(quick: bool) -> list[str]:
    """The checkpoints' recipe: seconds of training, confident enough masks to compare paths on."""
    workers = reader_processes("auto", DEVICE)
    if quick:
        return [
            "stage1.size=64",
            "stage1.depth=3",
            "stage1.width=4",
            f"stage1.epochs={QUICK_EPOCHS[0]}",
            "stage1.batch_size=8",
            "stage2.depth=3",
            "stage2.width=4",
            f"stage2.epochs={QUICK_EPOCHS[1]}",
            "stage2.crop=128",
            "stage2.batch_size=4",
            "stage2.tile=512",
            "stage2.min_overlap=32",
            "stage2.val_images=2",
            "predict.batch_size=2",
            "stage1.workers=1",
            "stage2.workers=0",
            f"predict.workers={workers}",
            "predict.tta_flip=false",
        ]
    # stage 1: demo.yaml's batch and learning rate, which reached val Dice 0.98 within 400 steps on 16 real cars
    # (docs/experiments/2026-11-stage1-recipe-search.md); here 16 steps an epoch on 8 cars
    return [
        "stage1.size=256",
        "stage1.depth=5",
        "stage1.width=16",
        f"stage1.epochs={EPOCHS[0]}",
        "stage1.batch_size=8",
        "stage1.lr=0.003",
        "stage2.depth=5",
        "stage2.width=16",
        f"stage2.epochs={EPOCHS[1]}",
        "stage2.crop=256",
        "stage2.batch_size=16",
        "stage2.crops_per_image=4",
        "stage2.val_images=8",
        "predict.batch_size=8",
        f"stage1.workers={max(workers, 1)}",
        f"stage2.workers={workers}",
        f"predict.workers={min(workers, 4)}",
        "predict.tta_flip=true",
    ]


def sample_files(samples: Path, cars: int, tests: int) -> tuple[list[Path], list[Path]]:
    """The training photos of the first `cars` cars (masks beside them) and the first `tests` full-resolution photos."""
    train = sorted((samples / "train_512" / "train").glob("*.jpg"))
    chosen = sorted({p.name[:12] for p in train})[:cars]
    return [p for p in train if p.name[:12] in chosen], sorted((samples / "test_fullres").glob("*.jpg"))[:tests]


def mask_of(samples: Path, photo: Path) -> Path:
    return samples / "train_512" / "train_masks" / f"{photo.stem}_mask.gif"


def link_data(samples: Path, root: Path, cars: int, tests: int) -> Path:
    """A Kaggle-layout data root of links: `cars` training cars (16 angles each) and `tests` photos."""
    train, test = sample_files(samples, cars, tests)
    for folder in ("train", "train_masks", "test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for p in train:
        (root / "train" / p.name).symlink_to(p)
        (root / "train_masks" / mask_of(samples, p).name).symlink_to(mask_of(samples, p))
    for p in test:
        (root / "test" / p.name).symlink_to(p)
    return root


def generated_samples(folder: Path, cars: int) -> Path:
    """Cars drawn by common/data/synth.py in the samples' layout (train_512/ of full-size photos with their
    masks, test_fullres/ the 16 photos of one more car): for a clone without the real samples."""
    from common.data.synth import write_sample_data

    drawn = write_sample_data(folder / "drawn", cars=cars, test_cars=1, seed=0, jobs=min(os.cpu_count() or 1, 8))
    (folder / "train_512").mkdir(parents=True, exist_ok=True)
    for name, source in (
        ("train_512/train", "train"),
        ("train_512/train_masks", "train_masks"),
        ("test_fullres", "test"),
    ):
        (folder / name).symlink_to(drawn / source, target_is_directory=True)
    return folder


def has_samples(folder: Path) -> bool:
    return (folder / "train_512" / "train").is_dir() and (folder / "test_fullres").is_dir()


class PartTimeout(Exception):
    """A part ran past its limit."""


def child(argv: list[str], ctx: Context, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A child process of the running part, within the part's limit: past it, the child and its own children
    (reader processes) are killed and the part fails with the reason."""
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own: killed with its children
    )
    try:
        out, err = proc.communicate(timeout=max(ctx.deadline - time.monotonic(), 0))
    except (subprocess.TimeoutExpired, PartTimeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise PartTimeout(f"{ctx.limit_reason}; its child process ({what}) was killed") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@dataclass
class Context:
    """What the parts share: the options, the work folder, and what is made once on first need."""

    quick: bool
    given: Path | None  # the real samples; None: cars drawn on first need (`samples`)
    work: Path
    nvjpeg: bool  # torchvision's nvjpeg decodes on this device
    seconds: dict = field(default_factory=dict)  # of each part run, and of the checkpoints' training
    runs: dict = field(default_factory=dict)  # (mode, decode) -> the submission of that `stage2 predict`
    planned: set = field(
        default_factory=set
    )  # the parts this run will run: a later one reuses what an earlier one made
    deadline: float = float("inf")  # the running part's end (time.monotonic), from its limit
    limit_reason: str = ""  # what a part stopped at its deadline says
    _trained: tuple | None = None
    _untrainable: str = ""  # why training failed: the parts after the first that needs it fail at once

    @functools.cached_property
    def samples(self) -> Path:
        return self.given or generated_samples(self.work / "generated", QUICK_CARS if self.quick else CARS)

    @functools.cached_property
    def data(self) -> Path:
        cars, tests = (QUICK_CARS, QUICK_TESTS) if self.quick else (CARS, TESTS)
        return link_data(self.samples, self.work / "data", cars, tests)

    @property
    def photos(self) -> list[Path]:
        return sorted((self.data / "test").glob("*.jpg"))

    def checkpoints(self) -> tuple[Settings, Path]:
        """Both stages trained briefly, boxes cached (once); the config and its YAML file."""
        if self._untrainable:
            raise RuntimeError(f"no checkpoints: {self._untrainable}")
        if self._trained is None:
            t = time.monotonic()
            print(f"checkpoints: training both stages (estimate {estimate('checkpoints', self):.0f} s)", flush=True)
            cfg = load_config(
                None,
                [
                    f"data.root={self.data}",
                    f"output.dir={self.work / 'run'}",
                    f"data.val_cars={1 if self.quick else 2}",
                    *settings(self.quick),
                ],
            )
            try:
                s1_train.main(cfg)
                s1_predict.main(cfg, open_source(cfg))
                s2_train.main(cfg, open_source(cfg))
            except Exception as e:
                self._untrainable = f"training failed: {type(e).__name__}: {e}"
                raise
            path = self.work / "run.yaml"
            save_config(cfg, path)
            self._trained = cfg, path
            self.seconds["checkpoints"] = round(time.monotonic() - t, 1)
        return self._trained

    def decodes(self) -> list[str]:
        """The decodes `stage2 predict` can be asked for here; `default` where the setting does not exist yet."""
        return (["pil", "nvjpeg"] if self.nvjpeg else ["pil"]) if DECODE else ["default"]


# --- `stage2 predict` in fresh processes

# Runs `carvana stage2 predict` once per argument list in one process. With "deterministic", cuDNN
# takes deterministic kernels and its benchmark mode stays off (`prepare` would turn it on): kernels
# chosen by timing can differ between two processes, and so can the last bits of their sums.
RUNNER = """
import json, sys, torch
from pipelines.cli import main
job = json.loads(sys.argv[1])
if job["deterministic"]:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    type(torch.backends.cudnn).benchmark = property(lambda m: False, lambda m, v: None)
for argv in job["runs"]:
    print("gpu_check run", json.dumps([argv[-1], main(argv)]), flush=True)
"""


def predict_args(config: Path, out: Path, *more: str) -> list[str]:
    """`carvana stage2 predict`'s arguments on the trained checkpoints, writing into `out` (named last)."""
    run = config.parent / "run"
    return [
        "stage2",
        "predict",
        "--config",
        str(config),
        f"stage1.checkpoint={run}/stage1/best.pt",
        f"stage2.checkpoint={run}/stage2/best.pt",
        f"bboxes.path={run}/bboxes.csv",
        *more,
        f"output.dir={out}",
    ]


def predict_process(
    ctx: Context, runs: list[list[str]], env: dict | None = None, deterministic: bool = False
) -> dict[str, tuple[int, str]]:
    """The runs in one fresh process; each one's output folder -> (exit status, the process's log)."""
    job = json.dumps({"deterministic": deterministic, "runs": runs})
    done = child([sys.executable, "-c", RUNNER, job], ctx, f"{len(runs)} stage2 predict run(s)", env)
    log = done.stdout + done.stderr
    codes = dict(
        json.loads(line[len("gpu_check run ") :])
        for line in done.stdout.splitlines()
        if line.startswith("gpu_check run ")
    )
    return {argv[-1].split("=", 1)[1]: (codes.get(argv[-1], done.returncode or 1), log) for argv in runs}


def decode_setting(decode: str) -> list[str]:
    return [f"predict.decode={decode}"] if DECODE and decode != "default" else []


def submissions(ctx: Context, mode: str, decodes: list[str]) -> dict[str, Path]:
    """The submission of `stage2 predict` over the check photos for each decode, `mode` async or sync
    (CUDA_LAUNCH_BLOCKING=1), in deterministic cuDNN; the runs not made yet run in one fresh process."""
    _, config = ctx.checkpoints()
    todo = [d for d in decodes if (mode, d) not in ctx.runs]
    if todo:
        outs = {d: ctx.work / f"predict-{mode}-{d}" for d in todo}
        done = predict_process(
            ctx,
            [predict_args(config, outs[d], *decode_setting(d)) for d in todo],
            env={"CUDA_LAUNCH_BLOCKING": "1"} if mode == "sync" else {},
            deterministic=True,
        )
        for d in todo:
            code, log = done[str(outs[d])]
            if code:
                raise RuntimeError(f"stage2 predict ({mode}, decode={d}) exited {code}: {log[-2000:]}")
            ctx.runs[mode, d] = outs[d] / "submission.csv.gz"
    return {d: ctx.runs[mode, d] for d in decodes}


def masks_of(submission: Path) -> dict[str, np.ndarray]:
    frame = pd.read_csv(submission, dtype=str, keep_default_na=False)
    return {r.img: rle_decode(r.rle_mask, (1280, 1918)) for r in frame.itertuples()}


def agreement(a: Path, b: Path) -> tuple[list[str], list[float]]:
    """The images of two submissions, and each one's Dice between them (0 for one missing on a side)."""
    one, two = masks_of(a), masks_of(b)
    return sorted(one | two), [dice(one[k], two[k]) if k in one and k in two else 0.0 for k in sorted(one | two)]


# --- the checks: each returns (passed, details)


def environment(ctx: Context) -> tuple[bool, dict]:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device_name(), "decode_setting": DECODE}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if not CUDA:
        return True, info | {"note": "no CUDA here: only torch is required"}
    info |= {"cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported(), "nvjpeg": ctx.nvjpeg}
    return bool(info["cudnn"] and info["torchvision"] and info["nvjpeg"] and info["bf16"]), info


def nvjpeg_matches_pil(ctx: Context) -> tuple[bool, dict]:
    decode = nvjpeg_decoder(DEVICE)
    if decode is None:
        return False, {"error": "nvjpeg cannot decode here (see the reader's line above)"}
    diffs, worst = [], 0.0
    for path in ctx.photos:
        gpu = decode([torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)], DEVICE)[0]
        pil = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        diff = (gpu.cpu().float() - pil.float()).abs()
        diffs.append(float(diff.mean()))
        worst = max(worst, float((diff > 16).float().mean()))
    return max(diffs) < PIXEL_LEVELS, {
        "images": len(diffs),
        "max_mean_abs_diff": round(max(diffs), 3),
        "bound": PIXEL_LEVELS,
        "max_share_over_16_levels": round(worst, 5),
    }


def train_one_sync(ctx: Context, steps: int = 6) -> tuple[bool, dict]:
    s = load_config(None, ["stage1.augment=full", "stage1.batch_size=4"]).stage1
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(steps * 4, 3, 128, 128, generator=g) * 255).to(torch.uint8)
    data = TensorBatches(images, images[:, :1] > 127, 4, DEVICE)
    model = UNet(3, 4, 8).to(DEVICE).to(memory_format=torch.channels_last)
    opt, dtype = build_optimizer(model, s), amp_dtype(s.precision, DEVICE)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    loop = Loop(model, opt, scaler, s, DEVICE, dtype, Clock(0))
    train_one_epoch(loop, data, 0)  # warm-up: cudnn, allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(loop, data, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    # one per optimizer step, and two reads of the epoch's sums at its end
    return len(syncs) <= len(data) + 2, {"steps": len(data), "syncs": len(syncs), "first": syncs[:3]}


def async_equals_sync(ctx: Context) -> tuple[bool, dict]:
    runs = {mode: submissions(ctx, mode, ctx.decodes()) for mode in ("async", "sync")}
    same = {d: runs["async"][d].read_bytes() == runs["sync"][d].read_bytes() for d in ctx.decodes()}
    rows = len(gzip.decompress(runs["async"][ctx.decodes()[0]].read_bytes()).splitlines()) - 1
    return all(same.values()) and rows == len(ctx.photos), {
        "rows": rows,
        "identical": same,
        "deterministic_cudnn": True,
    }


def nvjpeg_predict_matches_pil(ctx: Context) -> tuple[bool, dict]:
    runs = submissions(ctx, "async", ["pil", "nvjpeg"])
    images, scores = agreement(runs["pil"], runs["nvjpeg"])
    return len(images) == len(ctx.photos) and min(scores) >= AGREE_DECODE, {
        "images": len(images),
        "min_dice": round(min(scores), 6),
        "bound": AGREE_DECODE,
        "identical": runs["pil"].read_bytes() == runs["nvjpeg"].read_bytes(),
    }


def device_matches_cpu(ctx: Context) -> tuple[bool, dict]:
    """The device's prediction (fp16 on CUDA) against the CPU's in fp32, the reference: on the same
    photos, boxes and checkpoints, per-image Dice >= AGREE."""
    cfg, _ = ctx.checkpoints()
    boxes = pd.read_csv(Path(cfg.output.dir) / "bboxes.csv", dtype={"img": str})
    test = boxes[boxes["split"] == "test"]
    n = 1 if ctx.quick else 4  # angles of the car: the CPU's fp32 is the slow side
    test = test.iloc[:: max(1, len(test) // n)].head(n)
    paths = [Path(cfg.data.root) / "test" / img for img in test["img"]]
    box = [(r.x0, r.y0, r.x1, r.y1) for r in test.itertuples()]
    masks = {}
    dtype = step.predict_dtype
    for name, device in (("device", DEVICE), ("cpu_fp32", torch.device("cpu"))):
        fp32 = unittest.mock.patch.object(step, "predict_dtype", lambda d: None if d.type == "cpu" else dtype(d))
        with fp32 if name == "cpu_fp32" else contextlib.nullcontext():
            cascade = Cascade.load(open_source(cfg), cfg, device)
            results = [result for _, result in cascade.run(paths, box)]
        failed = [str(r) for r in results if isinstance(r, Failure)]
        if failed:
            return False, {"failed": failed}
        masks[name] = [r.mask(0.5).cpu().numpy() for r in results]
    scores = [dice(a, b) for a, b in zip(masks["device"], masks["cpu_fp32"], strict=True)]
    precision = precision_name(dtype(DEVICE))
    return min(scores) >= AGREE, {
        "images": len(scores),
        "min_dice": round(min(scores), 6),
        "bound": AGREE,
        "device_precision": precision,
        "reference": "cpu, fp32",
    }


def dask_two_devices(ctx: Context) -> tuple[bool, dict]:
    _, config = ctx.checkpoints()
    decode = ctx.decodes()[0]
    one = submissions(ctx, "async", [decode])[decode]
    out = ctx.work / "dask"
    ((code, log),) = predict_process(
        ctx, [predict_args(config, out, *decode_setting(decode), "predict.cluster=local:2", "device=auto")]
    ).values()
    if code:
        return False, {"error": f"exit {code}: {log[-2000:]}"}
    images, scores = agreement(one, out / "submission.csv.gz")
    return len(images) == len(ctx.photos) and min(scores) >= AGREE, {
        "images": len(images),
        "min_dice": round(min(scores), 6),
        "bound": AGREE,
    }


# The sanitizer's own example of a race: `a` written on the default stream, then on a side stream
# that did not wait for it. A sanitizer that reports nothing here would prove nothing below.
PLANTED_RACE = """
import torch
a = torch.rand(4, 2, device="cuda")
with torch.cuda.stream(torch.cuda.Stream()):
    torch.mul(a, 5, out=a)
torch.cuda.synchronize()
"""


def sanitizer(ctx: Context) -> tuple[bool, dict]:
    env = {"TORCH_CUDA_SANITIZER": "1"}
    planted = child([sys.executable, "-c", PLANTED_RACE], ctx, "the planted race", env)
    found = (planted.stdout + planted.stderr).count("CSAN detected")
    if not found:
        return False, {
            "error": "the sanitizer did not report the planted race",
            "log": (planted.stdout + planted.stderr)[-2000:],
        }
    _, config = ctx.checkpoints()
    # one process: the sanitizer's dispatch mode is inherited by forked reader processes, whose first tensor
    # operation then initialises CUDA in a forked child and fails, a harness failure with no race found
    runs = [
        predict_args(config, ctx.work / f"sanitized-{d}", "data.limit_test=4", "predict.workers=0", *decode_setting(d))
        for d in ctx.decodes()
    ]
    done = predict_process(ctx, runs, env=env)
    log = next(iter(done.values()))[1]
    races = log.count("CSAN detected")
    codes = {Path(out).name: code for out, (code, _) in done.items()}
    return races == 0 and not any(codes.values()), {
        "planted_race_reports": found,
        "exit": codes,
        "races": races,
        "reader_processes": 0,
        **({"log": log[-2000:]} if races or any(codes.values()) else {}),
    }


def compile_static(ctx: Context) -> tuple[bool, dict]:
    """pipeline.yaml's nets compiled (the speed row predict_compiled then finds them in inductor's cache),
    run twice over a number of photos that is not a multiple of the batch: a partial batch."""
    from torch._dynamo.utils import counters

    n = 3 if ctx.quick else 11
    cfg = speed_run(ctx, f"compile-static-{n}", n, compile=True, decode="pil")
    paths = sorted(Path(cfg.data.root, "test").glob("*.jpg"))
    boxes = [speed_box(ctx)] * len(paths)  # given boxes: the coarse channel still runs stage 1, so both nets run
    # Dynamo's guards decide what recompiles, whatever the backend: on a CPU in --quick the eager
    # backend stands in for inductor, whose C++ code generation takes minutes on two cores
    backend = "eager" if ctx.quick and not CUDA else "inductor"
    with unittest.mock.patch("torch.compile", functools.partial(torch.compile, backend=backend)):
        cascade = Cascade.load(open_source(cfg), cfg, DEVICE)
    for _ in cascade.run(paths, boxes):  # warm-up: compiles each net once
        pass
    graphs = counters["stats"]["unique_graphs"]
    for _ in cascade.run(paths, boxes):
        pass
    new = counters["stats"]["unique_graphs"] - graphs
    return new == 0 and graphs > 0, {
        "backend": backend,
        "graphs_after_warm_up": graphs,
        "new_graphs": new,
        "images": len(paths),
        "batch": cfg.predict.batch_size,
    }


# --- the speed rows: each returns its figures


def speed_run(ctx: Context, name: str, n: int, compile: bool, decode: str) -> Settings:
    """A run folder of `n` linked photos with pipeline.yaml's nets and prediction settings (untrained checkpoints)."""
    pipeline = load_config(ROOT / "pipelines" / "pipeline.yaml")
    s1, s2, p = pipeline.stage1, pipeline.stage2, pipeline.predict
    depth, width, size = (3, 4, 64) if ctx.quick else (s2.depth, s2.width, s1.size)
    workers = reader_processes(p.workers, DEVICE)  # 0 on a CPU
    return bench_predict.make_run(
        ctx.work / name,
        n,
        depth,
        width,
        size,
        [
            f"predict.batch_size={2 if ctx.quick else p.batch_size}",
            f"predict.tta_flip={p.tta_flip and not ctx.quick}",
            f"predict.workers={workers}",
            "predict.chunk=64",
            f"predict.compile={compile}",
            *decode_setting(decode),
            f"stage2.tile={512 if ctx.quick else s2.tile}",
            f"stage2.min_overlap={s2.min_overlap}",
        ],
        real=ctx.data / "test",
        box=speed_box(ctx),
    )


def speed_box(ctx: Context) -> tuple:
    return QUICK_BOX if ctx.quick else bench_predict.BOX


def predict_speed(ctx: Context, decode: str = "pil", compile: bool = False) -> dict:
    """The steady state of `stage2 predict`'s loop on a warm cascade, its start-up apart; for the plain PIL
    row, each Cascade step timed alone too (on the same warm cascade)."""
    n = QUICK_SPEED_IMAGES if ctx.quick else SPEED_IMAGES
    cfg = speed_run(ctx, f"speed-{decode}{'-compiled' if compile else ''}", n, compile, decode)
    steady, cascade = bench_predict.steady_state(cfg, DEVICE, warm=2 * cfg.predict.batch_size)
    row = asdict(steady) | {
        "decode": decode,
        "compiled": compile,
        "nets": f"depth {cfg.stage2.depth}, width {cfg.stage2.width}, stage 1 at {cfg.stage1.size}",
        "batch": cfg.predict.batch_size,
        "tta_flip": cfg.predict.tta_flip,
        "reader_processes": cascade.workers,
    }
    if decode == "pil" and not compile:
        with unittest.mock.patch.object(bench_predict, "BOX", speed_box(ctx)):  # the box the run's bboxes.csv has
            steps = bench_predict.stage_seconds(cfg, cascade, DEVICE, cfg.predict.batch_size)
        row["shares"] = {k: round(v / sum(steps.values()), 4) for k, v in steps.items()}
    return row


def band_speed(ctx: Context) -> dict:
    """`stage2.refine: band` against the tiles on the trained checkpoints' nets (a refiner trained on tiles:
    the speed and the refined pixels are the figures, not the Dice): each mode's device seconds per photo
    over the test photos, decoded once and on the device, after a first pass that tunes cuDNN."""
    cfg, _ = ctx.checkpoints()
    boxes = pd.read_csv(Path(cfg.output.dir) / "bboxes.csv", dtype={"img": str}).set_index("img")
    paths = ctx.photos
    box = [tuple(int(v) for v in boxes.loc[p.name, ["x0", "y0", "x1", "y1"]]) for p in paths]
    images = [torch.from_numpy(read_image(p)).permute(2, 0, 1).to(DEVICE) for p in paths]
    row = {}
    for refine in ("tiles", "band"):
        mode = cfg.updated({"stage2.refine": refine})
        cascade = Cascade.load(open_source(mode), mode, DEVICE)
        n = mode.predict.batch_size

        def once(cascade: Cascade = cascade, n: int = n) -> list:
            return [r for i in range(0, len(images), n) for r in cascade.predict(images[i : i + n], box[i : i + n])]

        once()
        results, seconds = bench_predict.timed(DEVICE, once)
        done = [r for r in results if not isinstance(r, Failure)]
        pixels = [refined_pixels(r.windows) for r in done]
        row[refine] = {
            "ms_per_photo": round(1000 * seconds / len(images), 2),
            "refined_pixels_per_photo": int(np.mean(pixels)) if pixels else 0,
            "failed": len(results) - len(done),
        }
    row["band_time_share"] = round(row["band"]["ms_per_photo"] / row["tiles"]["ms_per_photo"], 3)
    row["settings"] = {k: getattr(cfg.stage2, k) for k in ("tile", "band", "patch", "context")} | {
        "tta_flip": cfg.predict.tta_flip,
        "batch": cfg.predict.batch_size,
    }
    return row


def train_speed(ctx: Context, compile: bool = False) -> dict:
    """Both training loops against their nets; stage 1 reads the linked training photos."""
    steps, depth, width = (3, 3, 4) if ctx.quick else (TRAIN_STEPS, 6, 16)
    rows = bench_train.stage1(steps, depth, width, compile, real=ctx.data, size=64 if ctx.quick else 0)
    rows += bench_train.stage2(
        steps, depth, width, compile, crop=128 if ctx.quick else 384, per_item=(4,), cars=1 if ctx.quick else 2
    )
    return {
        name: {
            "net_alone_per_s": round(ceiling, 2),
            "loop_per_s": round(rate, 2),
            "ratio": round(rate / ceiling, 3),
            "data_wait": round(wait, 3),
        }
        for name, ceiling, rate, wait in rows
    }


# --- the parts, their estimates and what they need


def photos_per_s(compiled: bool, tiles: float = 4) -> float:
    """Estimated photos/s of `stage2 predict` on one H100: a photo's `tiles` 1024x1024 refiner inputs (with
    pipeline.yaml's settings two tiles, four with flip TTA) at the refiner's measured rate, plus REST_MS of
    other device work. Eager 4/394 s = 10.2 ms + 2.5: 79/s, the refiner 80% of the device's time; compiled
    4/840 s = 4.8 ms + 2.5: 138/s (150/s if the rest, stage 1 included, compiles as much faster)."""
    return 1000 / (1000 * tiles / (TILES_PER_S_COMPILED if compiled else TILES_PER_S) + REST_MS)


def estimate(name: str, ctx: Context) -> float:
    """Seconds the part should take on one H100/H200-class card with 16 cores (--quick: on a 2-core CPU):
    its --quick seconds, plus what the card's rates say the full part's nets and images take."""
    q = QUICK_CPU
    if ctx.quick:
        return q.get(name, 2)
    decodes, tiles = len(ctx.decodes()), 2 * 2  # a photo's two 1024 tiles, each twice with flip TTA
    process = q["async_equals_sync"] / 2 + CUDA_S  # a fresh process running one `stage2 predict`
    s2_train_per_s = S1_TRAIN_PER_S * (512 / 384) ** 2  # stage 2's 384 crops
    return {
        "checkpoints": q["checkpoints"]
        + sum((e - e0) * s for e, e0, s in zip(EPOCHS, QUICK_EPOCHS, EPOCH_S, strict=True))
        + (EPOCHS[0] * CARS_TRAIN * 16 + EPOCHS[1] * CARS_TRAIN * 16 * 4)
        / (2 * S1_TRAIN_PER_S),  # 256 px: 2x the 512 rate
        "environment": q["environment"] + 1,
        "nvjpeg_matches_pil": 1 + TESTS / PIL_PER_S_CORE,
        "train_one_sync": 8,
        "async_equals_sync": 2 * process + 2 * (decodes - 1) * RUN_S + 2 * decodes * TESTS * tiles / TILES_PER_S,
        "nvjpeg_predict_matches_pil": 1 if "async_equals_sync" in ctx.planned else process + RUN_S,
        "device_matches_cpu": q["device_matches_cpu"] + 4 * tiles * CPU_TILE_S,
        "dask_two_devices": 3 * process + (0 if "async_equals_sync" in ctx.planned else process),
        "sanitizer": 2 * process + decodes * CSAN * RUN_S,  # the planted race, then the prediction
        "compile_static": q["compile_static"] + 2 * COMPILE_S,
        # nets loaded and cuDNN's tuning, the steady state, then each step alone on 4 batches
        "predict_pil": q["predict_pil"] + CUDA_S + SPEED_IMAGES / photos_per_s(False) + 32 / PIL_PER_S_CORE,
        "predict_nvjpeg": q["predict_pil"] + CUDA_S + SPEED_IMAGES / photos_per_s(False),
        "band_vs_tiles": q["band_vs_tiles"] + 2 * CUDA_S + 4 * TESTS / photos_per_s(False),  # both modes, twice
        "predict_compiled": q["predict_pil"]
        + 2 * (COMPILE_CACHED_S if "compile_static" in ctx.planned else COMPILE_S)
        + SPEED_IMAGES / photos_per_s(True),
        "train_plain": q["train_plain"]
        + 2 * CUDA_S
        + (3 * TRAIN_STEPS + 3) * (32 / S1_TRAIN_PER_S + 16 / s2_train_per_s),
        "train_compiled": q["train_plain"]
        + 2 * CUDA_S
        + 2 * COMPILE_TRAIN_S
        + 2 * COMPILE_CACHED_S
        + (3 * TRAIN_STEPS + 3) * (32 / S1_TRAIN_PER_S + 16 / s2_train_per_s),
    }[name]


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context], tuple[bool, dict] | dict]
    check: bool  # a check (true or false) or a speed row (figures)
    needs: Callable[[Context], str | None] = lambda ctx: None  # why it cannot run here, or None
    checkpoints: bool = False  # it predicts with the trained checkpoints
    compiles: bool = False  # it runs torch.compile: last
    default: bool = True  # in the default run


def needs_cuda(ctx: Context) -> str | None:
    return None if CUDA else "needs CUDA: this machine has none"


def needs_nvjpeg(ctx: Context) -> str | None:
    if not DECODE:
        return "needs the setting predict.decode, which common/config.py does not have yet"
    return needs_cuda(ctx) or (
        None if ctx.nvjpeg else "needs nvjpeg: torchvision cannot decode on this card (environment says why)"
    )


def needs_two_gpus(ctx: Context) -> str | None:
    gpus = torch.cuda.device_count() if CUDA else 0
    return None if gpus >= 2 else f"needs two GPUs: this machine has {gpus}"


def not_quick(ctx: Context) -> str | None:
    return "needs a full run: compiling on a CPU takes minutes" if ctx.quick else None


PARTS = [  # in the order they run: correctness first, speed next, compiling (slow, the least sure) last
    Part("environment", environment, True),
    Part("nvjpeg_matches_pil", nvjpeg_matches_pil, True, needs_nvjpeg),
    Part("train_one_sync", train_one_sync, True, needs_cuda),
    Part("async_equals_sync", async_equals_sync, True, checkpoints=True),
    Part("nvjpeg_predict_matches_pil", nvjpeg_predict_matches_pil, True, needs_nvjpeg, checkpoints=True),
    Part("device_matches_cpu", device_matches_cpu, True, checkpoints=True),
    Part("dask_two_devices", dask_two_devices, True, needs_two_gpus, checkpoints=True),
    Part("sanitizer", sanitizer, True, needs_cuda, checkpoints=True),
    Part("predict_pil", predict_speed, False),
    Part("predict_nvjpeg", functools.partial(predict_speed, decode="nvjpeg"), False, needs_nvjpeg),
    Part("band_vs_tiles", band_speed, False, checkpoints=True),
    Part("train_plain", train_speed, False),
    Part("compile_static", compile_static, True, compiles=True),
    Part("predict_compiled", functools.partial(predict_speed, compile=True), False, not_quick, compiles=True),
    Part(
        "train_compiled",
        functools.partial(train_speed, compile=True),
        False,
        not_quick,
        compiles=True,
        default=False,
    ),
]
GROUPS = {
    "checks": [p.name for p in PARTS if p.check and not p.compiles],
    "speed": [p.name for p in PARTS if not p.check and not p.compiles],
    "compile": [p.name for p in PARTS if p.compiles and p.default],
    "all": [p.name for p in PARTS],
}
DEFAULT_PARTS = "checks,speed,compile"


def chosen(only: str) -> list[Part]:
    names = {n for word in only.split(",") if word.strip() for n in GROUPS.get(word.strip(), [word.strip()])}
    unknown = names - {p.name for p in PARTS}
    if unknown:
        sys.exit(
            f"gpu_check: no part named {', '.join(sorted(unknown))}; parts: {', '.join(p.name for p in PARTS)}; "
            f"groups: {', '.join(GROUPS)}"
        )
    return [p for p in PARTS if p.name in names]


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def summary(result: dict) -> None:
    """The headline figures, from the speed rows run so far (None for one not run)."""
    speed = result["speed"]
    plain = speed.get("train_plain", {})
    result |= {
        "predict_images_per_s": speed.get("predict_pil", {}).get("images_per_s"),
        "predict_nvjpeg_images_per_s": speed.get("predict_nvjpeg", {}).get("images_per_s"),
        "predict_compiled_images_per_s": speed.get("predict_compiled", {}).get("images_per_s"),
        "stage1_train_ratio": next((v["ratio"] for k, v in plain.items() if k.startswith("stage 1")), None),
        "stage2_train_ratio": next((v["ratio"] for k, v in plain.items() if k.startswith("stage 2")), None),
    }


def plan_estimates(ctx: Context, parts: list[Part]) -> dict[str, int]:
    """Each part's estimate in seconds, the checkpoints' training first where a part needs it; the parts
    this machine cannot run left out."""
    runs = [p for p in parts if p.needs(ctx) is None]
    ctx.planned = {p.name for p in runs}
    names = [*(["checkpoints"] if any(p.checkpoints for p in runs) else []), *(p.name for p in runs)]
    return {name: round(estimate(name, ctx)) for name in names}


def plan_limits(estimates: dict[str, int], plan: list[tuple[Part, str | None]], quick: bool) -> dict[str, int]:
    """Each part's limit as the run will set it: from its estimate, and for the first part that needs the
    checkpoints from theirs too (it trains them)."""
    first = next((p.name for p, why in plan if why is None and p.checkpoints), None)
    return {
        p.name: round(limit_of(estimates[p.name] + (estimates.get("checkpoints", 0) if p.name == first else 0), quick))
        for p, why in plan
        if why is None
    }


def limit_of(seconds: float, quick: bool) -> float:
    """A part's limit from its estimate (LIMIT, QUICK_LIMIT)."""
    times, more = QUICK_LIMIT if quick else LIMIT
    return max(times * seconds, seconds + more)


def probe(result: dict, name: str, fn: Callable[[], object], failed: object) -> object:
    """A start-up probe: its value, or `failed` with the exception recorded under `probes`."""
    try:
        return fn()
    except Exception as e:  # any: a broken driver or a torchvision built for another torch fails in its own ways
        result["probes"][name] = f"{type(e).__name__}: {e}"
        print(f"gpu_check: probe {name} failed: {type(e).__name__}: {e}", flush=True)
        return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny nets, a few images: runs on a CPU too")
    parser.add_argument(
        "--only", default=DEFAULT_PARTS, help="parts or groups (checks, speed, compile, all), comma-separated"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here, after every part")
    parser.add_argument(
        "--samples",
        help="the real samples (train_512/, test_fullres/), or `generated`; default: ../shared/carvana_samples "
        "where it exists, else generated",
    )
    parser.add_argument("--work", type=Path, help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--budget", type=float, help="no part starts or runs past this many seconds from the start")
    parser.add_argument(
        "--list-samples", action="store_true", help="print the sample files a full run reads, relative to --samples"
    )
    args = parser.parse_args()
    started = time.monotonic()
    given = None if args.samples in (None, "generated") else Path(args.samples).resolve()  # linked: no relative path
    if args.list_samples:
        samples = given or SAMPLES
        train, test = sample_files(samples, CARS, TESTS)
        for p in [*train, *(mask_of(samples, p) for p in train), *test]:
            print(p.relative_to(samples))
        return 0
    parts = chosen(args.only)
    if args.samples is None and has_samples(SAMPLES):
        given = SAMPLES
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": args.quick,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cores": len(os.sched_getaffinity(0)),
        "decode_setting": DECODE,
        "samples": str(given)
        if given
        else f"generated by common/data/synth.py ({QUICK_CARS if args.quick else CARS} cars)",
        "parts": [p.name for p in parts],
        "finished": False,
        "seconds": 0.0,
        "probes": {},
        "estimates": {},
        "limits": {},
        "checks": {},
        "skipped": {},
        "details": {},
        "speed": {},
        "part_seconds": {},
    }

    def save() -> None:
        result["seconds"] = round(time.monotonic() - started, 1)
        summary(result)
        if args.out:
            write_text(args.out, json.dumps(result, indent=2) + "\n")

    save()  # before anything that can fail: the JSON says at least what ran where
    if given is not None and not has_samples(given):
        result["error"] = f"no samples in {given} (train_512/, test_fullres/); pass --samples DIR or generated"
        save()
        print(f"gpu_check: {result['error']}", file=sys.stderr)
        return 2
    result["device"] = probe(result, "device", device_name, "unknown")
    result["cudnn"] = probe(result, "cudnn", lambda: torch.backends.cudnn.version() if CUDA else None, None)
    nvjpeg = probe(result, "nvjpeg", lambda: nvjpeg_decoder(DEVICE) is not None, False)
    save()

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args.quick, given, work, nvjpeg=bool(nvjpeg), seconds=result["part_seconds"])
        plan = [(p, p.needs(ctx)) for p in parts]
        result["estimates"] = plan_estimates(ctx, parts)
        result["limits"] = plan_limits(result["estimates"], plan, args.quick)
        where = "this CPU (--quick)" if args.quick else "one H100/H200-class card"
        print(f"gpu_check plan on {result['device']}, estimates for {where} (seconds):", flush=True)
        print(f"  {'part':28} {'estimate':>8} {'limit':>6}", flush=True)
        for name, seconds in result["estimates"].items():
            limit = result["limits"].get(name, "")  # the checkpoints': within the first part that needs them
            print(f"  {name:28} {seconds:8d} {limit:>6}", flush=True)
        for p, why in plan:
            if why:
                print(f"  {p.name:28}  skipped: {why}", flush=True)
        total = sum(result["estimates"].values())
        print(f"  {'total':28} {total:8d}", flush=True)
        if not args.quick and total > DEFAULT_PLAN_S:
            print(f"  (over the {DEFAULT_PLAN_S} s the documented call's --budget leaves: the last parts may not run)")
        save()
        for p, why in plan:
            ahead = result["estimates"].get(p.name, 0) + (
                result["estimates"].get("checkpoints", 0) if p.checkpoints and ctx._trained is None else 0
            )
            elapsed = time.monotonic() - started
            if why is None and args.budget is not None and elapsed + ahead > args.budget:
                why = f"not started: its estimate ({ahead} s) would end past --budget {args.budget:.0f} s"
            if why:
                result["skipped"][p.name] = why
            else:
                limit = limit_of(ahead, args.quick)
                ctx.limit_reason = f"stopped at its limit of {limit:.0f} s (from its estimate, {ahead} s)"
                if args.budget is not None and elapsed + limit > args.budget:
                    limit = args.budget - elapsed
                    ctx.limit_reason = f"stopped at --budget {args.budget:.0f} s, {limit:.0f} s after it started"
                ctx.deadline = time.monotonic() + limit
                print(f"{p.name}: running (estimate {result['estimates'][p.name]} s, limit {limit:.0f} s)", flush=True)
                run_part(p, ctx, result)
            save()
            if os.environ.get("GPU_CHECK_KILL_AFTER") == p.name:  # for the tests: a run killed mid-way
                os.kill(os.getpid(), signal.SIGKILL)
        result["finished"] = True
        save()
    print_table(result)
    failed = [name for name, row in result["speed"].items() if "error" in row]
    return 0 if all(result["checks"].values()) and not failed else 1


def run_part(p: Part, ctx: Context, result: dict) -> None:
    """Run one part within its deadline (`ctx.deadline`: an alarm raises PartTimeout in it, again every 5 s
    should something inside catch it; its child processes are killed by `child`); a part that crashes or
    runs out of time is a failed check (or a speed row holding the error), and the others still run."""
    t, trained = time.monotonic(), "checkpoints" in ctx.seconds

    def expired(signum, frame):
        raise PartTimeout(ctx.limit_reason)

    before = signal.signal(signal.SIGALRM, expired)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, max(ctx.deadline - time.monotonic(), 0.01), 5)
            out = p.run(ctx)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        ok, details = out if p.check else (True, out)
    except Exception as e:
        ok, details = False, {"error": f"{type(e).__name__}: {e}"}
    finally:
        signal.signal(signal.SIGALRM, before)
    # the checkpoints' training, if this part asked for it first, is counted apart
    details["seconds"] = round(time.monotonic() - t - (0 if trained else ctx.seconds.get("checkpoints", 0)), 1)
    ctx.seconds[p.name] = details["seconds"]
    if p.check:
        result["checks"][p.name], result["details"][p.name] = ok, details
        print(f"check {p.name}: {'ok' if ok else 'FAILED'} {json.dumps(details)}", flush=True)
    else:
        result["speed"][p.name] = details
        print(f"speed {p.name}: {json.dumps(details)}", flush=True)


def print_table(r: dict) -> None:
    print(
        f"\ngpu_check on {r['device']} ({r['date']}, torch {r['torch']}{', quick' if r['quick'] else ''}), "
        f"{r['seconds']:.0f} s"
    )
    print(f"{'part':28} {'result':8} {'seconds':>7} {'estimate':>8}")
    for name, ok in r["checks"].items():
        print(f"{name:28} {'ok' if ok else 'FAILED':8} {r['part_seconds'][name]:7.0f} {r['estimates'][name]:8d}")
    for name, why in r["skipped"].items():
        print(f"{name:28} skipped: {why}")
    print(f"\n{'speed':68} {'value':>8} {'target':>7} {'seconds':>7} {'estimate':>8}")
    for key, row in r["speed"].items():
        took = f"{r['part_seconds'][key]:7.0f} {r['estimates'][key]:8d}"
        if "error" in row:
            print(f"{key:68} {'error':>8} {'':7} {took}  {row['error'][:200]}")
        elif key == "band_vs_tiles":
            for mode in ("tiles", "band"):
                label = f"stage2.refine={mode}: device ms a photo, {row[mode]['refined_pixels_per_photo']:,} px refined"
                print(f"{label:68} {row[mode]['ms_per_photo']:8.1f} {'':7} {took if mode == 'tiles' else ''}")
            print(f"{'  the band in the tiles time (share)':68} {row['band_time_share']:8.1%} {'0.40':>7}")
        elif key.startswith("predict"):
            label = f"stage2 predict, steady state, {key[8:]}, {row['nets']} (images/s)"
            print(f"{label:68} {row['images_per_s']:8.1f} {'150':>7} {took}")
            for name, seconds in row["startup_s"].items():
                print(f"{'  start-up, not in the rate: ' + name + ' (s)':68} {seconds:8.1f}")
            for name, share in row.get("shares", {}).items():
                print(f"{'  ' + name + ' (share)':68} {share:8.1%}")
        else:
            for i, (name, v) in enumerate((k, v) for k, v in row.items() if k != "seconds"):
                print(f"{name[:56] + ' (loop/net)':68} {v['ratio']:8.2f} {'0.80':>7} {took if i == 0 else ''}")
    if "checkpoints" in r["part_seconds"]:
        print(
            f"\ncheckpoints trained in {r['part_seconds']['checkpoints']:.0f} s (estimate "
            f"{r['estimates']['checkpoints']} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
