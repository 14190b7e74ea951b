"""Proof of the device path on this machine: correctness checks and speed rows, one command.

    .venv/bin/python benchmarks/gpu_check.py [--quick] [--out FILE] [--samples DIR] [--work DIR]

It trains small checkpoints on the real samples (train_512: the 512x512 pairs; test_fullres: the
1918x1280 photos, linked under many names for the speed rows), then checks, each true or false
(a check this machine cannot run is listed under `skipped` with the reason):

  environment         torch, CUDA, cuDNN, torchvision with a working nvjpeg, bf16 (on a CPU: torch alone)
  async_equals_sync   `stage2 predict`'s submission.csv.gz is byte-identical to the same run with
                      CUDA_LAUNCH_BLOCKING=1 (every kernel waited for: no stream can race another)
  device_matches_cpu  the same checkpoints on the device and on the CPU: per-image Dice >= 0.9995
  nvjpeg_matches_pil  GPU and PIL decodes of the photos: mean absolute pixel difference <= 2
  compile_static      predict.compile: no new graph compiled after the warm-up pass (partial batches included)
  train_one_sync      the training loop syncs the host at most once per optimizer step (CUDA sync debug mode)
  dask_two_devices    `predict.cluster=local:2` on two GPUs agrees with one process (Dice >= 0.9995)
  sanitizer           a short prediction under TORCH_CUDA_SANITIZER=1 reports no unsynchronized access

Speed rows: `stage2 predict` end to end with pipeline.yaml's nets (depth 6, width 16, untrained:
weights do not change the cost) on a few hundred linked photos, plain and compiled, with each
step's share; the training loop against the net alone (bench_train.py) for both stages, plain
and compiled. Targets on one H100/H200-class card: >= 150 images/s, training loops >= 80%.

--quick: tiny nets, a few images and no flip TTA, so that it also runs on a CPU (tests/test_gpu_check.py runs
it there); compiled speed rows are left out. Exit status 1 if any check is false.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest.mock
import warnings
from pathlib import Path

import bench_predict
import bench_train
import numpy as np
import pandas as pd
import torch

from common.config import Settings, load_config, save_config
from common.data.images import read_image
from common.data.rle import rle_decode
from common.errors import Failure
from common.metrics import dice
from common.model import UNet, amp_dtype
from common.prediction.reader import nvjpeg_decoder
from common.training.batches import TensorBatches
from common.training.trainer import Clock, Loop, build_optimizer, train_one_epoch
from pipelines.evaluate import mask_threshold
from stage1_lowres import predict as s1_predict
from stage1_lowres import train as s1_train
from stage2_fullres import train as s2_train
from stage2_fullres.predict import Cascade

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "carvana_samples"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
AGREE = 0.9995  # per-image Dice between two ways of predicting the same checkpoints


def settings(quick: bool) -> list[str]:
    """The checkpoints' recipe: seconds of training, confident enough masks to compare paths on."""
    workers = 0 if not CUDA else min(12, len(os.sched_getaffinity(0)) - 1)
    if quick:
        return ["stage1.size=64", "stage1.depth=3", "stage1.width=4", "stage1.epochs=2", "stage1.batch_size=8",
                "stage2.depth=3", "stage2.width=4", "stage2.epochs=1", "stage2.crop=128", "stage2.batch_size=4",
                "stage2.tile=512", "stage2.min_overlap=32", "stage2.val_images=2", "predict.batch_size=2",
                "stage1.workers=1", "stage2.workers=0", f"predict.workers={workers}", "predict.tta_flip=false"]
    return ["stage1.size=256", "stage1.depth=5", "stage1.width=16", "stage1.epochs=8", "stage1.batch_size=16", "stage1.lr=0.005",
            "stage2.depth=5", "stage2.width=16", "stage2.epochs=4", "stage2.crop=256", "stage2.batch_size=16",
            "stage2.crops_per_image=4", "stage2.val_images=8", "predict.batch_size=8", f"stage1.workers={max(workers, 1)}",
            f"stage2.workers={workers}", f"predict.workers={workers}", "predict.tta_flip=true"]


def link_data(samples: Path, root: Path, cars: int, tests: int) -> Path:
    """A Kaggle-layout data root of links: `cars` training cars (16 angles each) and `tests` photos."""
    train = sorted((samples / "train_512" / "train").glob("*.jpg"))
    chosen = sorted({p.name[:12] for p in train})[:cars]
    for folder in ("train", "train_masks", "test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for p in train:
        if p.name[:12] in chosen:
            (root / "train" / p.name).symlink_to(p)
            mask = samples / "train_512" / "train_masks" / f"{p.stem}_mask.gif"
            (root / "train_masks" / mask.name).symlink_to(mask)
    for p in sorted((samples / "test_fullres").glob("*.jpg"))[:tests]:
        (root / "test" / p.name).symlink_to(p)
    return root


def train_checkpoints(work: Path, samples: Path, quick: bool) -> tuple[dict, Path]:
    """Both stages trained briefly, boxes cached; returns the config and its YAML file."""
    root = link_data(samples, work / "data", 3 if quick else 20, 3 if quick else 32)
    cfg = load_config(None, [f"data.root={root}", f"output.dir={work / 'run'}", "data.val_cars=1" if quick else "data.val_cars=2",
                             *settings(quick)])
    s1_train.main(cfg)
    s1_predict.main(cfg)
    s2_train.main(cfg, mask_threshold(cfg, strict=False))
    path = work / "run.yaml"
    save_config(cfg, path)
    return cfg, path


def predict_command(config: Path, out: Path, *more: str, env: dict | None = None) -> tuple[int, str]:
    """`carvana stage2 predict` in a fresh process on the trained checkpoints, writing into `out`."""
    run = config.parent / "run"
    args = [sys.executable, "-m", "pipelines", "stage2", "predict", "--config", str(config), f"output.dir={out}",
            f"stage1.checkpoint={run}/stage1/best.pt", f"stage2.checkpoint={run}/stage2/best.pt", f"bboxes.path={run}/bboxes.csv", *more]
    done = subprocess.run(args, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    return done.returncode, done.stdout + done.stderr


def masks_of(submission: Path) -> dict[str, np.ndarray]:
    frame = pd.read_csv(submission, dtype=str, keep_default_na=False)
    return {r.img: rle_decode(r.rle_mask, (1280, 1918)) for r in frame.itertuples()}


def environment() -> tuple[bool, dict]:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if CUDA else "cpu"}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if not CUDA:
        return True, info | {"note": "no CUDA here: only torch is required"}
    info |= {"cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported(),
             "nvjpeg": nvjpeg_decoder(DEVICE) is not None}
    return bool(info["cudnn"] and info["torchvision"] and info["nvjpeg"] and info["bf16"]), info


def async_equals_sync(config: Path, work: Path, images: int) -> tuple[bool, dict]:
    runs = {}
    for name, env in (("async", {}), ("sync", {"CUDA_LAUNCH_BLOCKING": "1"})):
        code, log = predict_command(config, work / name, f"data.limit_test={images}", env=env)
        if code:
            return False, {name: f"exit {code}: {log[-2000:]}"}
        runs[name] = (work / name / "submission.csv.gz").read_bytes()
    rows = len(gzip.decompress(runs["async"]).splitlines()) - 1
    return runs["async"] == runs["sync"], {"rows": rows, "bytes": len(runs["async"])}


def device_matches_cpu(cfg: Settings, images: int) -> tuple[bool, dict]:
    boxes = pd.read_csv(Path(cfg.output.dir) / "bboxes.csv", dtype={"img": str})
    test = boxes[boxes["split"] == "test"].head(images)
    paths = [Path(cfg.data.root) / "test" / img for img in test["img"]]
    box = [(r.x0, r.y0, r.x1, r.y1) for r in test.itertuples()]
    masks = {}
    for device in (DEVICE, torch.device("cpu")):
        cascade = Cascade.from_config(cfg, device)
        results = [result for _, result in cascade.run(paths, box)]
        failed = [str(r) for r in results if isinstance(r, Failure)]
        if failed:
            return False, {"failed": failed}
        masks[device.type] = [r.mask(0.5).cpu().numpy() for r in results]
    scores = [dice(a, b) for a, b in zip(masks[DEVICE.type], masks["cpu"])]
    return min(scores) >= AGREE, {"images": len(scores), "min_dice": round(min(scores), 6),
                                  **({"note": "the device is the CPU: compared with itself"} if not CUDA else {})}


def nvjpeg_matches_pil(paths: list[Path]) -> tuple[bool, dict]:
    decode = nvjpeg_decoder(DEVICE)
    if decode is None:
        return False, {"error": "nvjpeg cannot decode here (see the reader's line above)"}
    diffs = []
    for path in paths:
        gpu = decode([torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)], DEVICE)[0]
        pil = torch.from_numpy(read_image(path)).permute(2, 0, 1)
        diffs.append(float((gpu.cpu().float() - pil.float()).abs().mean()))
    return max(diffs) <= 2, {"images": len(diffs), "max_mean_abs_diff": round(max(diffs), 3)}


def compile_static(cfg: Settings, images: int, quick: bool) -> tuple[bool, dict]:
    from torch._dynamo.utils import counters

    compiled = cfg.updated({"predict.compile": True})
    paths = sorted(Path(cfg.data.root, "test").glob("*.jpg"))[:images]  # not a multiple of the batch: a partial one
    boxes = [None] * len(paths)  # stage 1 finds them: both nets run
    # Dynamo's guards decide what recompiles, whatever the backend: on a CPU in --quick the eager
    # backend stands in for inductor, whose C++ code generation takes minutes on two cores
    backend = "eager" if quick and not CUDA else "inductor"
    with unittest.mock.patch("torch.compile", functools.partial(torch.compile, backend=backend)):
        cascade = Cascade.from_config(compiled, DEVICE)
    for _ in cascade.run(paths, boxes):  # warm-up: compiles each net once
        pass
    graphs = counters["stats"]["unique_graphs"]
    for _ in cascade.run(paths, boxes):
        pass
    new = counters["stats"]["unique_graphs"] - graphs
    return new == 0 and graphs > 0, {"backend": backend, "graphs_after_warm_up": graphs, "new_graphs": new,
                                     "images": len(paths), "batch": cfg.predict.batch_size}


def train_one_sync(steps: int) -> tuple[bool, dict]:
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


def dask_two_devices(config: Path, work: Path, images: int) -> tuple[bool, dict]:
    code, log = predict_command(config, work / "dask", f"data.limit_test={images}", "predict.cluster=local:2", "device=auto")
    if code:
        return False, {"error": f"exit {code}: {log[-2000:]}"}
    one, two = masks_of(work / "async" / "submission.csv.gz"), masks_of(work / "dask" / "submission.csv.gz")
    scores = [dice(one[k], two[k]) for k in one]
    return set(one) == set(two) and min(scores) >= AGREE, {"images": len(scores), "min_dice": round(min(scores), 6)}


def sanitizer(config: Path, work: Path) -> tuple[bool, dict]:
    code, log = predict_command(config, work / "sanitized", "data.limit_test=4", env={"TORCH_CUDA_SANITIZER": "1"})
    races = log.count("CSAN detected")
    return code == 0 and races == 0, {"exit": code, "races": races, **({"log": log[-2000:]} if code or races else {})}


def predict_speed(samples: Path, work: Path, quick: bool, compile: bool) -> dict:
    """`stage2 predict` with pipeline.yaml's nets and prediction settings on linked real photos."""
    pipeline = load_config(ROOT / "pipelines" / "pipeline.yaml")
    s1, s2, p = pipeline.stage1, pipeline.stage2, pipeline.predict
    depth, width, size = (3, 4, 64) if quick else (s2.depth, s2.width, s1.size)
    n, batch = (2, 2) if quick else (320, p.batch_size)
    workers = 0 if not CUDA else min(p.workers, len(os.sched_getaffinity(0)) - 1)
    root = work / f"speed{'-compiled' if compile else ''}"
    cfg = bench_predict.make_run(root, n, depth, width, size, [
        f"predict.batch_size={batch}", f"predict.tta_flip={p.tta_flip and not quick}", f"predict.workers={workers}", "predict.chunk=64",
        f"predict.compile={compile}", f"stage2.tile={s2.tile if not quick else 512}", f"stage2.min_overlap={s2.min_overlap}"],
        real=samples / "test_fullres")
    seconds = bench_predict.end_to_end(cfg, DEVICE)
    steps = bench_predict.stage_seconds(cfg, Cascade.from_config(cfg, DEVICE), DEVICE, batch)
    total = sum(steps.values())
    return {"images": n, "images_per_s": round(n / seconds, 2), "nets": f"depth {depth}, width {width}, stage 1 at {size}",
            "shares": {k: round(v / total, 4) for k, v in steps.items()}}


def train_speed(samples: Path, data: Path, quick: bool, compile: bool) -> dict:
    """Both training loops against their nets; in --quick stage 1 reads the 48 linked photos, not all 320."""
    steps, depth, width = (3, 3, 4) if quick else (20, 6, 16)
    rows = bench_train.stage1(steps, depth, width, compile, real=data if quick else samples / "train_512", size=64 if quick else 0)
    rows += bench_train.stage2(steps, depth, width, compile, crop=128 if quick else 384, per_item=(4,), cars=1 if quick else 2)
    return {name: {"net_alone_per_s": round(ceiling, 2), "loop_per_s": round(rate, 2), "ratio": round(rate / ceiling, 3),
                   "data_wait": round(wait, 3)} for name, ceiling, rate, wait in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny nets, a few images: runs on a CPU too")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--samples", type=Path, default=SAMPLES, help="the real samples (train_512/, test_fullres/)")
    parser.add_argument("--work", type=Path, help="keep the runs in this folder (default: a temporary one)")
    args = parser.parse_args()
    if not (args.samples / "train_512" / "train").is_dir():
        sys.exit(f"gpu_check needs the real samples in {args.samples} (train_512/, test_fullres/); pass --samples DIR")
    started = time.monotonic()
    checks, skipped, details, speed = {}, {}, {}, {}

    def check(name: str, fn, *fn_args, needs: str | None = None) -> None:
        if needs:
            skipped[name] = needs
            return
        t = time.monotonic()
        try:
            checks[name], details[name] = fn(*fn_args)
        except Exception as e:  # a check that crashes has failed; the others still run
            checks[name], details[name] = False, {"error": f"{type(e).__name__}: {e}"}
        details[name]["seconds"] = round(time.monotonic() - t, 1)
        print(f"check {name}: {'ok' if checks[name] else 'FAILED'} {json.dumps(details[name])}", flush=True)

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        work.mkdir(parents=True, exist_ok=True)
        check("environment", environment)
        cfg, config = train_checkpoints(work, args.samples, args.quick)
        photos = sorted(Path(cfg.data.root, "test").glob("*.jpg"))
        no_cuda = None if CUDA else "needs CUDA: this machine has none"
        tests = 2 if args.quick else len(photos)
        check("async_equals_sync", async_equals_sync, config, work, tests)
        check("device_matches_cpu", device_matches_cpu, cfg, 2 if args.quick else 6)
        check("nvjpeg_matches_pil", nvjpeg_matches_pil, photos[:8], needs=no_cuda)
        check("compile_static", compile_static, cfg, 3 if args.quick else 11, args.quick)
        check("train_one_sync", train_one_sync, 6, needs=no_cuda)
        gpus = torch.cuda.device_count() if CUDA else 0
        check("dask_two_devices", dask_two_devices, config, work, tests,
              needs=None if gpus >= 2 else f"needs two GPUs: this machine has {gpus}")
        check("sanitizer", sanitizer, config, work, needs=no_cuda)
        for compile in (False, True):
            if compile and args.quick:
                continue  # compiling full training steps takes minutes on a CPU
            key = "compiled" if compile else "plain"
            speed[f"predict_{key}"] = predict_speed(args.samples, work, args.quick, compile)
            speed[f"train_{key}"] = train_speed(args.samples, Path(cfg.data.root), args.quick, compile)

    plain = speed["train_plain"]
    result = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu", "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
        "torch": torch.__version__, "seconds": round(time.monotonic() - started, 1),
        "predict_images_per_s": speed["predict_plain"]["images_per_s"],
        "predict_compiled_images_per_s": speed.get("predict_compiled", {}).get("images_per_s"),
        "stage1_train_ratio": next(v["ratio"] for k, v in plain.items() if k.startswith("stage 1")),
        "stage2_train_ratio": next(v["ratio"] for k, v in plain.items() if k.startswith("stage 2")),
        "checks": checks, "skipped": skipped, "details": details, "speed": speed,
    }
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if all(checks.values()) else 1


def print_table(r: dict) -> None:
    print(f"\ngpu_check on {r['device']} ({r['date']}, torch {r['torch']}{', quick' if r['quick'] else ''}), {r['seconds']:.0f} s")
    print(f"{'check':22} result")
    for name, ok in r["checks"].items():
        print(f"{name:22} {'ok' if ok else 'FAILED'}")
    for name, why in r["skipped"].items():
        print(f"{name:22} skipped: {why}")
    print(f"\n{'speed':60} {'value':>10} {'target':>8}")
    for key, row in r["speed"].items():
        if key.startswith("predict"):
            print(f"{'stage2 predict end to end, ' + key[8:] + ', ' + row['nets'] + ' (images/s)':60} {row['images_per_s']:10.1f} {'150':>8}")
            for step, share in row["shares"].items():
                print(f"{'  ' + step + ' (share)':60} {share:10.1%}")
        else:
            for name, v in row.items():
                print(f"{name[:52] + ' (loop/net)':60} {v['ratio']:10.2f} {'0.80':>8}")


if __name__ == "__main__":
    sys.exit(main())
