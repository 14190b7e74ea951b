"""`carvana serve` under load: K concurrent clients over loopback on the real test photos, against the
same photos through `carvana cutout` one by one (the baseline), in the same run. Not a CI test.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--requests 1000] [--minutes 10]
        [--depth 6 --width 16] [--device auto] [--batch1]

Untrained nets of pipeline.yaml's shape, the same for every row (so the boxes stage 1 finds, and the tiles they
need, are the same; their weights change nothing else of the cost). Prints one row
per server (throughput, p50/p95/p99 latency, mean batch from /metrics, failed requests, the server's
RSS after a warm-up at full concurrency and at the end) and the ratios: concurrent against one by one (run
before and after the servers, their mean), and with
--batch1 the batching server against the same server with serve.max_batch=1 (the GPU goal is >= 4x).
"""
from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import REAL, make_run  # noqa: E402  links the real photos, writes untrained checkpoints

from common.config import save_config  # noqa: E402


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text)[1]) / 1024


def post(url: str, data: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            answer.read()
            status = answer.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    return status, time.perf_counter() - started


def mean_batch(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    value = {m[0]: float(m[1]) for m in re.findall(r"^(carvana_batch_size_(?:sum|count)) (\S+)$", text, re.M)}
    return value["carvana_batch_size_sum"] / max(value["carvana_batch_size_count"], 1)


def load(config: Path, photos: list[bytes], clients: int, requests: int, minutes: float, extra: list[str]) -> dict:
    """A real `carvana serve` process, driven by `clients` threads until `requests` or `minutes`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipelines", "serve", "--port", str(port), "--config", str(config), *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=5)
                break
            except OSError:
                assert server.poll() is None, "the server died at start"
                time.sleep(0.2)
        with ThreadPoolExecutor(clients) as pool:  # warm-up at full concurrency (the largest batches), not counted
            list(pool.map(lambda k: post(url + "/v1/cutout", photos[k % len(photos)]), range(2 * clients)))
        rss_start = rss_mib(server.pid)
        stop = time.monotonic() + minutes * 60
        started = time.perf_counter()

        def client(k: int) -> list[tuple[int, float]]:
            out = []
            for i in range(k, requests, clients):
                if time.monotonic() > stop:
                    break
                out.append(post(url + "/v1/cutout", photos[i % len(photos)]))
            return out

        with ThreadPoolExecutor(clients) as pool:
            parts = [pool.submit(client, k) for k in range(clients)]
            samples = []  # the server's RSS every second: a plateau or a leak
            while not all(p.done() for p in parts):
                samples.append(rss_mib(server.pid))
                time.sleep(1)
            results = [r for p in parts for r in p.result()]
        seconds = time.perf_counter() - started
        latencies = np.array([t for status, t in results if status == 200])
        return {"requests": len(results), "failed": sum(status != 200 for status, _ in results), "seconds": seconds,
                "rate": len(latencies) / seconds, **{f"p{q}": float(np.percentile(latencies, q)) for q in (50, 95, 99)},
                "batch": mean_batch(url), "rss_start": rss_start, "rss_mid": samples[len(samples) // 2] if samples else rss_start,
                "rss_end": rss_mib(server.pid)}
    finally:
        server.terminate()
        server.wait(120)


def one_by_one(config: Path, paths: list[Path], out: Path) -> float:
    """`carvana cutout` over the photos with batches of one: its own rate line, from the nets loaded to the
    last file written (the server's rate, too, includes encoding every answer)."""
    run = subprocess.run([sys.executable, "-m", "pipelines", "cutout", *map(str, paths), "--out", str(out), "--config", str(config),
                          "predict.batch_size=1"], capture_output=True, text=True, check=True)
    return float(re.search(r"cutout: \d+ photos cut out into .* in [\d.]+ s \(([\d.]+) photos/s", run.stdout)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch1", action="store_true", help="also run the server with serve.max_batch=1")
    args = ap.parse_args()
    paths = sorted(REAL.glob("*.jpg"))
    if not paths:
        sys.exit(f"needs the real test photos in {REAL}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_run(Path(tmp), len(paths), args.depth, args.width, 256, [f"device={args.device}", "predict.batch_size=4"])
        save_config(cfg, Path(tmp) / "bench.yaml")
        config, photos = Path(tmp) / "bench.yaml", [p.read_bytes() for p in paths]
        before = one_by_one(config, paths, Path(tmp) / "cut")
        rows = {f"serve, max_batch {args.max_batch}": load(config, photos, args.clients, args.requests, args.minutes,
                                                           [f"serve.max_batch={args.max_batch}"])}
        if args.batch1:
            rows["serve, max_batch 1"] = load(config, photos, args.clients, args.requests, args.minutes, ["serve.max_batch=1"])
        after = one_by_one(config, paths, Path(tmp) / "cut-again")
    # the baseline before and after the servers, and the ratio to their mean: a shared machine's pace drifts
    # over minutes (2x seen on the 2-core CPU), which one baseline run would put into the ratio
    baseline = (before + after) / 2
    print(f"{len(paths)} real photos, nets depth {args.depth} width {args.width}, {args.clients} clients, device {args.device}")
    print(f"carvana cutout one by one: {before:.2f} photos/s before the servers, {after:.2f} after")
    print(f"{'server':24} {'requests':>8} {'failed':>6} {'photos/s':>9} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6} "
          f"{'RSS MiB start->half->end':>26} {'growth':>7}")
    for name, r in rows.items():
        print(f"{name:24} {r['requests']:8d} {r['failed']:6d} {r['rate']:9.2f} {r['p50']:7.2f} {r['p95']:7.2f} {r['p99']:7.2f} "
              f"{r['batch']:6.2f} {r['rss_start']:8.0f}->{r['rss_mid']:.0f}->{r['rss_end']:<7.0f} "
              f"{r['rss_end'] / r['rss_start'] - 1:7.1%}")
    first = next(iter(rows.values()))
    print(f"concurrent / one by one (their mean): {first['rate'] / baseline:.2f}x")
    if args.batch1:
        print(f"max_batch {args.max_batch} / max_batch 1: {first['rate'] / rows['serve, max_batch 1']['rate']:.2f}x")


if __name__ == "__main__":
    main()
