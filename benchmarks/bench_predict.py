"""Prediction speed: the real `stage2 predict` (streaming `Cascade`: reader -> device -> writer)
against its two nets alone on decoded tensors (the ceiling) in the same process, on real 1918x1280
photos linked under N names, with untrained nets of the given size (weights do not change the cost).
Then what each stage of the Cascade costs alone, and peak memory of whole runs at two sizes.

    .venv/bin/python benchmarks/bench_predict.py [images=64] [depth=6] [width=16] [batch]

batch (tiles per forward pass) defaults to 8 on CUDA and 2 on the CPU, where 2 measured fastest.
    .venv/bin/python benchmarks/bench_predict.py memory      # peak RSS at 32 and 320 images, tiny nets
    .venv/bin/python benchmarks/bench_predict.py against DIR [images=32] [rounds=3]
        # end to end in this tree against another checkout (git worktree add DIR COMMIT), alternating
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from common.config import Settings, load_config
from common.data.chunks import ChunkStore
from common.data.kaggle import test_samples
from common.data.rle import rle_encode
from common.model import UNet
from common.model_source import open_source
from common.prediction.jobs import predict_chunks
from common.prediction.reader import read_batches, reader_processes
from common.prediction.writer import Output
from stage1_lowres.box_cache import cached_boxes
from stage1_lowres.coarse import upsample
from stage2_fullres import predict as s2_predict
from stage2_fullres.cascade import Cascade
from stage2_fullres.predict import MaskItem, MaskJob, MaskRow
from stage2_fullres.tiles import cut_tiles, plan_tiles, stitch

REAL = Path(__file__).resolve().parents[2] / "shared" / "carvana_samples" / "test_fullres"
BOX = (60, 300, 1860, 1100)  # a wide car: two 1024 tiles, as 69% of real cars need


def make_run(
    root: Path, n: int, depth: int, width: int, size: int, extra: list[str], box: tuple = BOX, real: Path = REAL
) -> dict:
    """A data root of n test images (links to the real photos in `real`), untrained checkpoints, cached boxes."""
    photos = sorted(real.glob("*.jpg"))
    if not photos:
        sys.exit(f"needs the real test photos in {real}")
    (root / "data" / "test").mkdir(parents=True)
    names = [f"{k:012x}_{k % 16 + 1:02d}.jpg" for k in range(n)]
    for k, name in enumerate(names):
        (root / "data" / "test" / name).symlink_to(photos[k % len(photos)])
    out = root / "out"
    cfg = load_config(
        None,
        [
            f"data.root={root / 'data'}",
            f"output.dir={out}",
            f"stage1.size={size}",
            f"stage1.depth={depth}",
            f"stage1.width={width}",
            f"stage2.depth={depth}",
            f"stage2.width={width}",
            *extra,
        ],
    )
    for stage, net in (("stage1", UNet(3, depth, width)), ("stage2", UNet(4, depth, width, prior_skip=True))):
        (out / stage).mkdir(parents=True)
        torch.save(
            {"model": net.state_dict(), "model_args": net.args, "config": cfg.model_dump()}, out / stage / "best.pt"
        )
    rows = "\n".join(f"{name},test,1918,1280,{box[0]},{box[1]},{box[2]},{box[3]},1,bench" for name in names)
    (out / "bboxes.csv").write_text("img,split,width,height,x0,y0,x1,y1,found,key\n" + rows + "\n")
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # timings must include the queued device work


@torch.no_grad()
def timed(device, fn, *args):
    sync(device)
    t = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - t


def end_to_end(cfg: Settings, device: torch.device) -> float:
    """Seconds of a whole `stage2 predict` over the run's test images, after a 2-image warm-up
    (cudnn benchmark, allocator, page cache) whose chunks are then deleted."""
    s2_predict.main(cfg.updated({"data.limit_test": 2}), open_source(cfg))
    for part in Path(cfg.output.dir, "stage2_chunks").glob("*/*"):
        part.unlink()
    return timed(device, s2_predict.main, cfg, open_source(cfg))[1]


@dataclass(frozen=True, kw_only=True)
class FirstTimed(MaskJob):
    """`stage2 predict`'s job, noting when its first output comes (the reader started, a batch predicted)."""

    first: list = field(default_factory=list)

    def outputs(self, cascade: Cascade, items: list[MaskItem], desc: str) -> Iterator[Output]:
        for output in super().outputs(cascade, items, desc):
            if not self.first:
                self.first.append(time.perf_counter())
            yield output


STEADY_INCLUDES = (
    "the steady state of stage2 predict's loop, from its first mask to its last chunk file: reading and decoding "
    "(reader processes, or nvjpeg), Cascade.predict on the cached boxes, the threshold, the copies to the host, "
    "RLE and chunk files in the writer thread; not in it, timed apart (startup_s): loading the nets, a warm-up "
    "pass (cuDNN tuning, compilation), the reader's start and first batch; nor the submission's assembly"
)


@dataclass(frozen=True)
class Steady:
    """A speed row of `stage2 predict`'s steady state, and the start-up seconds it leaves out."""

    images: int
    images_per_s: float  # after the first reader batch, from the first mask to the last chunk file
    startup_s: dict[str, float]
    timed_run_s: float  # the timed run whole: its reader's start and first batch too
    includes: str = STEADY_INCLUDES


def steady_state(cfg: Settings, device: torch.device, warm: int) -> tuple[Steady, Cascade]:
    """`stage2 predict`'s work over the run's test images with a cascade built once and warmed up on `warm`
    photos (every padded shape of a full batch tuned, a compiled net compiled); and that cascade."""
    source, boxes, test = open_source(cfg), cached_boxes(cfg), test_samples(cfg)
    items = [MaskItem(x.img, str(x.image), boxes.get(x.img)) for x in test]
    cascade, loaded = timed(device, Cascade.load, source, cfg, device, False)

    def job(name: str, chosen: list[MaskItem]) -> FirstTimed:
        names = [item.img for item in chosen]
        store = ChunkStore(Path(cfg.output.dir) / name, "bench", MaskRow.COLUMNS, cfg.predict.chunk, names)
        return FirstTimed(desc=f"stage 2 predict ({name})", cfg=cfg, source=source, store=store)

    warm_up = job("warm-up", items[:warm])
    _, warming = timed(device, predict_chunks, warm_up.store.todo(items[:warm]), warm_up, cascade)
    run = job("timed", items)
    t0 = time.perf_counter()
    timed(device, predict_chunks, run.store.todo(items), run, cascade)
    end, first = time.perf_counter(), run.first[0]
    steady = len(items) - min(cascade.batch_size, len(items))  # the images after the first reader batch
    startup = {
        "nets_loaded": round(loaded, 2),
        f"warm_up_{warm}_photos": round(warming, 2),
        "reader_start_and_first_batch": round(first - t0, 2),
    }
    return Steady(len(items), round(steady / (end - first), 2), startup, round(end - t0, 2)), cascade


def stage_seconds(cfg: Settings, cascade: Cascade, device: torch.device, batch: int) -> dict[str, float]:
    """Seconds per image of each step of the Cascade timed alone, on one reader batch of decoded images
    (read from the first 4 batches' photos)."""
    paths = sorted(Path(cfg.data.root, "test").glob("*.jpg"))[: 4 * batch]
    steps: dict[str, float] = {}
    batches, t_read = timed(device, lambda: [b for b in read_batches(paths, device, batch, cascade.workers)])
    steps["read + decode (workers, overlapped)"] = t_read / len(paths)
    images = [d.image for d in batches[0]]
    k = len(images)
    small, t = timed(device, cascade.coarse.probs, images)
    steps["stage-1 net (resize on device)"] = t / k
    windows = plan_tiles(1918, 1280, BOX, cfg.stage2.tile, cfg.stage2.min_overlap)
    coarse, t = timed(device, lambda: [upsample(p, 1918, 1280) for p in small])
    steps["upsample prior"] = t / k
    tiles, t = timed(
        device,
        lambda: (
            torch.cat([cut_tiles(im, windows) for im in images]),
            torch.cat([cut_tiles(c[None], windows) for c in coarse]),
        ),
    )
    steps["cut tiles"] = t / k
    probs, t = timed(
        device,
        lambda: torch.cat(
            [cascade.refine(tiles[0][i : i + batch], tiles[1][i : i + batch]) for i in range(0, len(tiles[0]), batch)]
        ),
    )
    steps[f"refiner, {len(windows)} tiles"] = t / k
    n = len(windows)
    full, t = timed(
        device, lambda: [stitch(probs[n * j : n * j + n], windows, BOX, 1918, 1280, cascade.weights) for j in range(k)]
    )
    steps["stitch + blend"] = t / k
    masks, t = timed(device, lambda: [(f > 0.5).cpu().numpy() for f in full])
    steps["threshold + copy to host"] = t / k
    _, t = timed(device, lambda: [rle_encode(m) for m in masks])
    steps["RLE (writer thread)"] = t / k
    return steps


def print_shares(steps: dict[str, float]) -> None:
    total = sum(steps.values())
    print(f"{'Cascade stage, timed alone':44} {'ms/image':>9} {'share':>7}")
    for name, t in steps.items():
        print(f"{name:44} {t * 1e3:9.1f} {t / total:7.1%}")


NETS = ("stage-1 net (resize on device)", "refiner")


def run_settings(device: torch.device, batch: int) -> list[str]:
    return [f"predict.batch_size={batch}", "predict.chunk=64", f"predict.workers={reader_processes('auto', device)}"]


def compare(n: int, depth: int, width: int, batch: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_run(Path(tmp), n, depth, width, 512, run_settings(device, batch))
        new_s = end_to_end(cfg, device)
        paths = sorted(Path(cfg.data.root, "test").glob("*.jpg"))
        cascade = Cascade.load(open_source(cfg), cfg, device)
        steps = stage_seconds(cfg, cascade, device, batch)
    nets = sum(t for name, t in steps.items() if name.startswith(NETS))  # seconds per image of the nets alone

    print(
        f"\ndevice {device}, U-Net depth {depth} width {width}, 1918x1280 real photos, box of two 1024 tiles, batch "
        f"{batch} tiles"
    )
    print(f"{'path':44} {'images':>6} {'ms/image':>9} {'images/s':>9}")
    print(f"{'the two nets alone on decoded tensors':44} {len(paths[:batch]):6d} {nets * 1e3:9.1f} {1 / nets:9.2f}")
    print(f"{'stage2 predict (Cascade), end to end':44} {n:6d} {new_s / n * 1e3:9.1f} {n / new_s:9.2f}")
    print(
        f"end to end at {nets / (new_s / n):.0%} of the nets' own rate; 100,064 test images: "
        f"{100_064 * new_s / n / 3600:.2f} h\n"
    )
    print_shares(steps)


TREE = Path(__file__).resolve().parents[1]


def in_fresh_process(body: str, tree: Path = TREE) -> list[float]:
    """Run `body` in a new interpreter on `tree`'s code, `b` being that tree's bench_predict, `pathlib`,
    `tempfile` and `torch` imported: the numbers it prints after RESULT."""
    code = (
        f"import sys, pathlib, tempfile, torch; sys.path[:0] = [{str(tree)!r}, {str(tree / 'benchmarks')!r}]; import "
        f"bench_predict as b, common; assert common.__file__.startswith({str(tree) + os.sep!r}), common.__file__; "
        f"{body}"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"a run on {tree} failed:\n{out.stderr[-3000:]}")
    return [float(v) for v in out.stdout.rsplit("RESULT", 1)[1].split()]


def memory() -> None:
    """Peak RSS of a whole `stage2 predict` process at 32 and 320 images (tiny nets): flat if nothing
    grows with the number of images."""
    print(f"{'images':>6} {'seconds':>8} {'peak RSS MiB':>13}")
    for n in (32, 320):
        seconds, rss = in_fresh_process(
            "import resource, time; from stage2_fullres import predict as p; from common.model_source import "
            f"open_source; d = tempfile.mkdtemp(); cfg = b.make_run(pathlib.Path(d), {n}, 3, 4, 64, "
            "['predict.batch_size=4', 'predict.chunk=16', 'predict.workers=0']); t = time.perf_counter(); p.main(cfg, "
            "open_source(cfg)); print('RESULT', time.perf_counter() - t, "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
        )
        print(f"{n:6d} {seconds:8.1f} {rss:13.0f}")


def against(baseline: Path, n: int, rounds: int, depth: int = 6, width: int = 16, batch: int = 2) -> None:
    """End-to-end `stage2 predict` in this tree and in another checkout, each round a fresh process
    per tree, which goes first alternating from round to round, so both see the same machine load;
    the baseline's own make_run and end_to_end run its own code."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = run_settings(torch.device(device), batch)
    trees = {"baseline": baseline.resolve(), "this tree": TREE}
    seconds: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(rounds):
        for name, tree in list(trees.items())[:: 1 if r % 2 == 0 else -1]:
            seconds[name] += in_fresh_process(
                f"d = tempfile.TemporaryDirectory(); cfg = b.make_run(pathlib.Path(d.name), {n}, {depth}, {width}, "
                f"512, {settings!r}, real=pathlib.Path({str(REAL)!r})); print('RESULT', b.end_to_end(cfg, "
                f"torch.device({device!r}))); d.cleanup()",
                tree,
            )
            print(f"round {r + 1} {name:10} {seconds[name][-1]:7.1f} s  load {os.getloadavg()[0]:.1f}", flush=True)
    base = statistics.median(seconds["baseline"])
    print(
        f"\ndevice {device}, U-Net depth {depth} width {width}, {n} real 1918x1280 photos, batch {batch} tiles, median "
        f"of {rounds} rounds\n{'tree':44} {'ms/image':>9} {'images/s':>9} {'speed':>6}"
    )
    for name, tree in trees.items():
        s = statistics.median(seconds[name])
        print(f"{name + ' ' + tree.name:44} {s / n * 1e3:9.1f} {n / s:9.2f} {base / s:6.2f}")
    ratios = [b / t for b, t in zip(seconds["baseline"], seconds["this tree"], strict=True)]  # each round's speed ratio
    spread = f", standard error {statistics.stdev(ratios) / len(ratios) ** 0.5:.3f}" if len(ratios) > 1 else ""
    print(
        f"speed ratio per round: median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f}{spread}, "
        f"from {min(ratios):.3f} to {max(ratios):.3f}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory"]:
        memory()
    elif sys.argv[1:2] == ["against"]:
        if len(sys.argv) < 3 or not Path(sys.argv[2], "common").is_dir():
            sys.exit(
                "usage: bench_predict.py against DIR [IMAGES ROUNDS], DIR a checkout of this project (git worktree "
                "add DIR COMMIT)"
            )
        images, rounds = [int(a) for a in sys.argv[3:5]] + [32, 3][len(sys.argv[3:5]) :]
        against(Path(sys.argv[2]), images, max(rounds, 1))
    else:
        args = [int(a) for a in sys.argv[1:5]]
        compare(*(args + [64, 6, 16, 8 if torch.cuda.is_available() else 2][len(args) :]))
