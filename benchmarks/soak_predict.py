"""Soak: `carvana stage2 predict` as a user runs it, over N test images (the real sample photos
linked under N distinct valid names, one in 250 of them broken), tiny nets, one 512 tile per image
(decode, stage 1, stitching into the full canvas and RLE at 1918x1280 stay). Not a CI test.

    .venv/bin/python benchmarks/soak_predict.py [N ...]        # default: 200 2000

For each N: an uninterrupted run (images/s, peak RSS of the whole process), then a run killed by
SIGKILL from outside once about half the chunks are on disk, and its rerun. Checked: every name
has a submission row or an errors.csv row, and the resumed submission is byte-identical to the
uninterrupted one. The last line compares the largest N with the smallest (flat: ratio <= 1.2).
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import make_run  # noqa: E402  links the real photos, writes untrained checkpoints and boxes

from common.config import save_config  # noqa: E402

CHUNK = 16
BOX = (700, 400, 1200, 900)  # one 512 tile: the soak is about the pipeline around the nets, so the refiner stays cheap


def carvana(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", "stage2", "predict", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit status and peak RSS (MiB) of that process alone."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def setup(root: Path, n: int) -> tuple[Path, list[str]]:
    cfg = make_run(
        root,
        n,
        3,
        4,
        64,
        [f"predict.chunk={CHUNK}", "predict.batch_size=4", "predict.workers=0", "device=cpu", "stage2.tile=512"],
        box=BOX,
    )
    test = Path(cfg.data.root) / "test"
    names = sorted(p.name for p in test.iterdir())
    for name in names[::250]:  # broken files among the good ones: they must become error rows, not stop the run
        target = (test / name).resolve().read_bytes()
        (test / name).unlink()
        (test / name).write_bytes(target[: len(target) // 3])
    config = root / "config.yaml"
    save_config(cfg, config)
    return config, names


def check(out: Path, names: list[str]) -> str:
    sub = pd.read_csv(gzip.open(out / "submission.csv.gz"), dtype=str, keep_default_na=False)
    errors = (
        pd.read_csv(out / "errors.csv", dtype=str) if (out / "errors.csv").is_file() else pd.DataFrame(columns=["img"])
    )
    covered = set(sub.img) | set(errors.img)
    missing = [n for n in names if n not in covered]
    if missing or len(sub) + len(errors) != len(names):
        return f"FAIL: {len(missing)} names without a row or an error"
    return f"{len(sub)} rows + {len(errors)} errors = {len(names)} names"


def soak(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, names = setup(root, n)
        out = root / "out"
        t = time.perf_counter()
        code, rss = wait(carvana(config))
        seconds = time.perf_counter() - t
        clean = (out / "submission.csv.gz").read_bytes()
        coverage = check(out, names)

        for folder in out.glob("stage2_chunks/*"):  # the same config again, from nothing
            for part in folder.iterdir():
                part.unlink()
        (out / "submission.csv.gz").unlink()
        proc = carvana(config)
        half = -(-n // CHUNK) // 2
        while len(list(out.glob("stage2_chunks/*/part-*.csv"))) < half and proc.poll() is None:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        wait(proc)
        done = len(list(out.glob("stage2_chunks/*/part-*.csv")))
        t = time.perf_counter()
        rerun_code, _ = wait(carvana(config))
        rerun_seconds = time.perf_counter() - t
        same = (out / "submission.csv.gz").read_bytes() == clean
        return {
            "n": n,
            "code": code,
            "seconds": seconds,
            "rss": rss,
            "coverage": coverage,
            "killed_after": done,
            "rerun_code": rerun_code,
            "rerun_seconds": rerun_seconds,
            "same": same,
            "rerun_coverage": check(out, names),
        }


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:]] or [200, 2000]
    print(f"{'images':>6} {'exit':>4} {'seconds':>8} {'images/s':>9} {'peak MiB':>9}  every name has a row or an error")
    results = []
    for n in sizes:
        r = soak(n)
        results.append(r)
        print(f"{n:6d} {r['code']:4d} {r['seconds']:8.1f} {n / r['seconds']:9.2f} {r['rss']:9.0f}  {r['coverage']}")
        print(
            f"{'':6} killed by SIGKILL after {r['killed_after']} of {-(-n // CHUNK)} chunks; rerun exit "
            f"{r['rerun_code']} in {r['rerun_seconds']:.1f} s, submission "
            f"{'byte-identical' if r['same'] else 'DIFFERENT'}; {r['rerun_coverage']}"
        )
    small, large = results[0], results[-1]
    print(
        f"\n{large['n']} vs {small['n']} images: peak RSS ratio {large['rss'] / small['rss']:.2f}, images/s ratio "
        f"{(large['n'] / large['seconds']) / (small['n'] / small['seconds']):.2f}"
    )
