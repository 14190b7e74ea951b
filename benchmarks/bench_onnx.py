"""onnxruntime against eager PyTorch on the CPU, for both nets of pipelines/pipeline.yaml: stage 1 at
stage1.size and the refiner on stage2.tile tiles with the coarse channel, untrained (weights do not
change the cost), exported with common/onnx_export.py. onnxruntime with default session options
(CPU execution provider, intra-op threads: one per physical core); eager as `probabilities` runs it
(channels_last, autocast) in fp32 and in the precision prediction picks on this CPU. Then the whole
`Cascade.predict` on real 1918x1280 photos (a car box of two tiles, pipeline.yaml's flip TTA) with
the PyTorch nets and with the onnxruntime ones (`OnnxNet` stands in for a net).

One process, the variants alternating call by call, their order rotated each round (this machine's
pace drifts); median ms per image or tile, and how far each variant's output is from the first's.

    .venv/bin/python benchmarks/bench_onnx.py [rounds=10] [batch=2] [photos=2]

batch: images or tiles per forward pass (the CPU's predict.batch_size); the cascade runs rounds // 2 rounds.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault(
    "THP_MEM_ALLOC_ENABLE", "1"
)  # before torch's first allocation, as every carvana command (pipelines/cli.py)

import torch  # noqa: E402
from bench_predict import BOX, REAL  # noqa: E402  the real test photos, a box of two 1024 tiles
from torch import nn  # noqa: E402

from common.config import load_config  # noqa: E402
from common.data.images import read_image  # noqa: E402
from common.model import UNet, autocast, precision_name, prepare  # noqa: E402
from common.onnx_export import OnnxNet, export  # noqa: E402
from common.prediction.step import predict_dtype  # noqa: E402
from stage1_lowres.coarse import Coarse  # noqa: E402
from stage2_fullres.cascade import Cascade  # noqa: E402

CPU = torch.device("cpu")
PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline.yaml"


def eager(net: nn.Module, dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The net's probabilities as `probabilities` computes them: channels_last, autocast to `dtype`."""
    net = prepare(net, CPU)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(CPU, dtype):
            return torch.sigmoid(net(x.contiguous(memory_format=torch.channels_last)).float())

    return run


def timings(runs: dict[str, Callable], arg, n: int, rounds: int) -> dict[str, float]:
    """name -> median seconds per item of `run(arg)` over `n` items, after one warm-up call each."""
    for run in runs.values():
        run(arg)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            runs[name](arg)
            seconds[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) / n for name, s in seconds.items()}


def nets_table(nets: dict[str, tuple[nn.Module, Path]], picked: torch.dtype | None, batch: int, rounds: int) -> None:
    print(f"{'net':26} {'variant':13} {'ms/item':>9} {'onnxruntime/this':>17} {'max |dp| vs fp32':>17}")
    for label, (net, path) in nets.items():
        session = OnnxNet(path)
        runs = {
            "eager fp32": eager(net, None),
            f"eager {precision_name(picked)}": eager(net, picked),  # one key where both are fp32
            "onnxruntime": lambda x, session=session: torch.sigmoid(session(x)),
        }
        c = net.args["in_channels"]
        size = session.session.get_inputs()[0].shape[-1]
        x = torch.rand(batch, c, size, size)
        fp32 = runs["eager fp32"](x)
        diffs = {name: (run(x) - fp32).abs().max().item() for name, run in runs.items()}
        seconds = timings(runs, x, batch, rounds)
        for name, t in seconds.items():
            print(f"{label:26} {name:13} {t * 1e3:9.1f} {seconds['onnxruntime'] / t:17.2f} {diffs[name]:17.1e}")


def cascade_table(
    cfg, nets: dict[str, tuple[nn.Module, Path]], picked: torch.dtype | None, photos: int, rounds: int
) -> None:
    (stage1, stage1_path), (refiner, refiner_path) = nets.values()
    images = [torch.from_numpy(read_image(p)).permute(2, 0, 1) for p in sorted(REAL.glob("*.jpg"))[:photos]]
    boxes = [BOX] * len(images)

    def cascade(s1: nn.Module, s2: nn.Module) -> Callable[[list[torch.Tensor]], list]:
        c = Cascade(Coarse(s1, cfg, CPU), s2, cfg, CPU)
        return lambda ims: c.predict(ims, boxes)

    runs = {
        f"PyTorch {precision_name(picked)}": cascade(prepare(stage1, CPU), prepare(refiner, CPU)),
        "onnxruntime": cascade(OnnxNet(stage1_path), OnnxNet(refiner_path)),
    }
    torch_prob, ort_prob = (torch.stack([p.prob for p in run(images)]) for run in runs.values())
    seconds = timings(runs, images, len(images), rounds)
    print(
        f"\nCascade.predict, {len(images)} real 1918x1280 photos per call, box {BOX} ({cfg.stage2.tile} tiles), "
        f"tta_flip={cfg.predict.tta_flip}, {cfg.predict.batch_size} tiles per pass, {rounds} rounds"
    )
    for name, t in seconds.items():
        print(f"{name:20} {t * 1e3:9.1f} ms/photo   onnxruntime/this {seconds['onnxruntime'] / t:5.2f}")
    same = ((torch_prob > 0.5) == (ort_prob > 0.5)).double().mean().item()
    print(f"max |dp| {(torch_prob - ort_prob).abs().max().item():.1e}, masks (> 0.5) agree on {same:.4%} of the pixels")


def main(rounds: int, batch: int, photos: int) -> None:
    cfg = load_config(PIPELINE, ["device=cpu", f"predict.batch_size={batch}"])
    s1, s2 = cfg.stage1, cfg.stage2
    channels = 4 if s2.coarse_channel else 3
    stage1, refiner = UNet(3, s1.depth, s1.width), UNet(channels, s2.depth, s2.width, prior_skip=s2.prior_skip)
    nn.init.normal_(
        refiner.head.weight, std=0.1
    )  # an untrained prior-skip refiner returns its prior exactly: no differences to see
    picked = predict_dtype(CPU)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, depth {s1.depth}/{s2.depth} width {s1.width}/{s2.width}, batch {batch}, "
        f"{rounds} rounds; prediction's precision here: {precision_name(picked)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        nets = {
            f"stage 1, {s1.size}x{s1.size} image": (stage1.eval(), Path(tmp, "stage1.onnx")),
            f"refiner, {s2.tile}x{s2.tile} tile": (refiner.eval(), Path(tmp, "refiner.onnx")),
        }
        for (net, path), size in zip(nets.values(), (s1.size, s2.tile), strict=True):
            export(net, net.args["in_channels"], size, path)
        nets_table(nets, picked, batch, rounds)
        cascade_table(cfg, nets, picked, photos, max(rounds // 2, 1))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]]
    main(*(args + [10, 2, 2][len(args) :]))
