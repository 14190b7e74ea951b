"""The band refiner against the tiles, side by side (`stage2.refine: band | tiles`): both refiners trained
for the same minutes on the same data over one stage 1, then on the validation cars: each mode's cascade
Dice and stage 1's, the share of stage 1's wrong pixels inside the band, the pixels the refiner sees per
photo, stage 2's seconds per photo on this CPU in PyTorch and in onnxruntime, and the pixels of each photo's
mask the two backends disagree on.

    .venv/bin/python benchmarks/bench_refine.py DATA OUT [minutes=2.5] [rounds=3] [overrides...] [--also=P/C/B...]

DATA is a Kaggle-layout folder (`carvana sample-data`'s cars, or the real samples linked at their
512x512 scale); the overrides are dotted settings over pipelines/demo.yaml's, for both modes (e.g. the
512-scale tiles and band). Stage 1 trains once in OUT/stage1-run; each mode in OUT/tiles and OUT/band
(a rerun reuses what is there). `--also=PATCH/CONTEXT/BAND` adds a band variant run by the band's refiner
(those settings change prediction only). Dice is each mode's mean per photo at its mask threshold, on
the photos and boxes every mode shares; stage 2's seconds are the cascade's minus stage 1's, the modes
and backends alternating call by call, the median of `rounds`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch's first allocation, as every carvana command

import torch  # noqa: E402
from gpu_check import photos_per_s  # noqa: E402

from common.config import Settings, load_config, save_config  # noqa: E402
from common.data.images import read_image, read_mask  # noqa: E402
from common.data.kaggle import index_split, split_by_car  # noqa: E402
from common.metrics import dice  # noqa: E402
from common.model_source import open_source  # noqa: E402
from common.onnx_export import OnnxNet, export  # noqa: E402
from pipelines.cli import main as cli  # noqa: E402
from stage1_lowres.box_cache import cached_boxes  # noqa: E402
from stage1_lowres.coarse import Coarse  # noqa: E402
from stage2_fullres.band import band_of  # noqa: E402
from stage2_fullres.cascade import Cascade  # noqa: E402
from stage2_fullres.tiles import refined_pixels  # noqa: E402

CPU = torch.device("cpu")
DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"
MODES = ("tiles", "band")


def settings(data: Path, out: Path, minutes: float, overrides: list[str]) -> Settings:
    return load_config(
        DEMO,
        [
            f"data.root={data}",
            f"output.dir={out / 'stage1-run'}",
            f"stage1.max_minutes={minutes}",
            f"stage2.max_minutes={minutes}",
            "device=cpu",
            *overrides,
        ],
    )


def train(cfg: Settings, out: Path) -> dict[str, Settings]:
    """Stage 1 and its boxes once, then each mode's refiner over them, evaluated: each mode's settings.
    The commands run as a user runs them, each from the resolved settings written as its config file."""
    if not (Path(cfg.output.dir) / "bboxes.csv").is_file():
        for step in (["stage1", "train"], ["stage1", "predict"]):
            run_command(step, cfg)
    runs = {}
    for mode in MODES:
        run = cfg.updated({"output.dir": str(out / mode), "stage2.refine": mode})
        folder = Path(run.output.dir)
        if not (folder / "report" / "summary.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(cfg.output.dir) / "stage1", folder / "stage1", dirs_exist_ok=True)
            shutil.copy(Path(cfg.output.dir) / "bboxes.csv", folder / "bboxes.csv")
            for step in (["stage2", "train"], ["evaluate"]):
                run_command(step, run)
        runs[mode] = run
    return runs


def run_command(words: list[str], cfg: Settings) -> None:
    config = Path(cfg.output.dir).with_suffix(".yaml")
    save_config(cfg, config)
    if cli([*words, "--config", str(config)]) != 0:
        sys.exit(f"carvana {' '.join(words)} --config {config} failed")


def variants(runs: dict[str, Settings], also: list[str]) -> dict[str, Settings]:
    """The modes to measure: tiles, band, and each PATCH/CONTEXT/BAND of `also` run by the band's refiner
    (its training does not depend on them: they change what it sees at prediction only)."""
    out = dict(runs)
    for word in also:
        patch, context, band = (int(v) for v in word.split("/"))
        out[f"band {word}"] = runs["band"].updated(
            {"stage2.patch": patch, "stage2.context": context, "stage2.band": band}
        )
    return out


def measure(modes: dict[str, Settings], rounds: int) -> None:
    cfg = modes["tiles"]
    _, val = split_by_car(index_split(cfg.data.root), cfg.data.val_cars)
    boxes = cached_boxes(cfg)
    images = [torch.from_numpy(read_image(s.image)).permute(2, 0, 1) for s in val]
    truths = [torch.from_numpy(read_mask(s.mask)) for s in val]
    box = [boxes[s.img] for s in val]
    coarse = Coarse.load(open_source(cfg), cfg, CPU)
    preds = coarse.predict(images, box)  # stage 1's probability and boxes, shared by every mode
    wrong = [(p.coarse > 0.5) != t for p, t in zip(preds, truths, strict=True)]
    stage1_dice = statistics.mean(dice(p.coarse > 0.5, t) for p, t in zip(preds, truths, strict=True))
    cascades, pixels, scores, inside, differ = {}, {}, {}, {}, {}
    with torch.no_grad():
        for mode, run in modes.items():
            torch_cascade = Cascade.load(open_source(run), run, CPU)
            side = run.stage2.window
            onnx = Path(run.output.dir) / f"onnx-{side}"
            onnx.mkdir(exist_ok=True)
            export(torch_cascade.refiner, torch_cascade.refiner.args["in_channels"], side, onnx / "refiner.onnx")
            ort = Cascade(torch_cascade.coarse, OnnxNet(onnx / "refiner.onnx"), run, CPU)
            cascades[mode] = {"torch": torch_cascade, "onnxruntime": ort}
            results = [torch_cascade.predict([image], [b])[0] for image, b in zip(images, box, strict=True)]
            threshold = open_source(run).threshold
            differ[mode] = statistics.mean(  # each photo's pixels where onnxruntime's mask is not PyTorch's
                int((ort.predict([image], [b])[0].mask(threshold) != r.mask(threshold)).sum())
                for image, b, r in zip(images, box, results, strict=True)
            )
            pixels[mode] = statistics.mean(refined_pixels(r.windows) for r in results)
            scores[mode] = statistics.mean(dice(r.mask(threshold), t) for r, t in zip(results, truths, strict=True))
            if run.stage2.refine == "band":
                inside[mode] = statistics.mean(
                    int((w & band_of(p.coarse, p.box, run.stage2.band)).sum()) / max(int(w.sum()), 1)
                    for w, p in zip(wrong, preds, strict=True)
                )
    calls = [(m, b) for m in modes for b in ("torch", "onnxruntime")] + [("stage 1", "")]
    seconds: dict[tuple[str, str], list[float]] = {call: [] for call in calls}
    with torch.no_grad():
        for r in range(rounds):
            for mode, backend in calls[r % len(calls) :] + calls[: r % len(calls)]:  # the order rotated each round
                predictor = coarse if mode == "stage 1" else cascades[mode][backend]
                t = time.perf_counter()
                for image, b in zip(images, box, strict=True):
                    predictor.predict([image], [b])
                seconds[(mode, backend)].append((time.perf_counter() - t) / len(images))
    stage1 = statistics.median(seconds[("stage 1", "")])
    print(
        f"\n{len(val)} validation photos {images[0].shape[2]}x{images[0].shape[1]}; stage 1 alone: Dice "
        f"{stage1_dice:.4f}, {stage1 * 1000:.0f} ms a photo; each mode's stage 2 ms a photo is its cascade's less "
        "stage 1's"
    )
    head = (
        "refine",
        "Dice",
        "wrong px in band",
        "px refined",
        "stage 2 ms torch",
        "onnxruntime",
        "H100 photos/s (est.)",
        "px onnx != torch",
    )
    print(
        f"{head[0]:18} {head[1]:>7} {head[2]:>16} {head[3]:>11} {head[4]:>16} {head[5]:>12} {head[6]:>20} {head[7]:>16}"
    )
    base = {b: statistics.median(seconds[("tiles", b)]) - stage1 for b in ("torch", "onnxruntime")}
    for mode, run in modes.items():
        ms = {b: statistics.median(seconds[(mode, b)]) - stage1 for b in ("torch", "onnxruntime")}
        flip = 2 if run.predict.tta_flip else 1
        estimate = photos_per_s(False, flip * pixels[mode] / 1024**2)  # the refined pixels as 1024 tiles
        share = f"{inside[mode]:.1%}" if mode in inside else "-"
        print(
            f"{mode:18} {scores[mode]:7.4f} {share:>16} {pixels[mode]:11,.0f} {ms['torch'] * 1000:9.0f} "
            f"({ms['torch'] / base['torch']:4.0%}) {ms['onnxruntime'] * 1000:5.0f} "
            f"({ms['onnxruntime'] / base['onnxruntime']:4.0%}) {estimate:20.0f} {differ[mode]:16.1f}"
        )
    print("H100 photos/s: an estimate from the refined pixels at the refiner's measured tile rate, not a measurement")
    print("px onnx != torch: pixels where onnxruntime's mask differs from PyTorch's, the mean over photos")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    data, out = Path(argv[0]), Path(argv[1])
    minutes = float(argv[2]) if len(argv) > 2 and "=" not in argv[2] else 2.5
    rounds = int(argv[3]) if len(argv) > 3 and "=" not in argv[3] else 3
    overrides = [a for a in argv[2:] if "=" in a]
    also = [a.removeprefix("--also=") for a in argv[2:] if a.startswith("--also=")]
    overrides = [a for a in overrides if not a.startswith("--also=")]
    cfg = settings(data, out, minutes, overrides)
    measure(variants(train(cfg, out), also), rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
