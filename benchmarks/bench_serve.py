"""`carvana serve` under load: K concurrent clients over loopback on the real test photos, against the
same photos through `carvana cutout` one by one (the baseline), in the same run. Not a CI test.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--requests 1000] [--rounds 8] [--minutes 10]
        [--depth 6 --width 16] [--device auto] [--batch1]

Untrained nets of pipeline.yaml's shape, the same for every row (so the boxes stage 1 finds, and the tiles they
need, are the same; their weights change nothing else of the cost). The servers stay up for the whole run;
their requests come in `--rounds` bursts, and `carvana cutout` runs one by one over the photos before every
burst and after the last, so both sample the machine's pace over the same minutes (a shared machine's pace
drifts: 2-4x seen on the 2-core CPU, which a baseline run once before and once after would put into the
ratio). Prints one row per server (throughput over its bursts, p50/p95/p99 latency, mean batch from /metrics,
failed requests, the server's RSS after a warm-up at full concurrency, halfway and at the end, and idle after
each round) and the ratios: concurrent against one by one, and with --batch1 the batching server against the
same server with serve.max_batch=1 (the GPU goal is >= 4x).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
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


class Server:
    """A real `carvana serve` process, driven in bursts of concurrent requests; it idles between them."""

    def __init__(self, config: Path, extra: list[str], photos: list[bytes], clients: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "serve", "--port", "0", "--config", str(config), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        address = next(
            (m[1] for line in self.process.stdout if (m := re.search(r"serve: (http://[^/\s]+)/", line))), None
        )
        assert address, "the server died at start"
        threading.Thread(
            target=self.process.stdout.read, daemon=True
        ).start()  # the rest is drained: a full pipe would block it
        self.url, self.photos, self.clients = address, photos, clients
        self.results: list[tuple[int, float]] = []
        self.seconds, self.sent, self.rss, self.rss_rounds = 0.0, 0, [], []
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=5)
                break
            except OSError:
                assert self.process.poll() is None, "the server died at start"
                time.sleep(0.2)
        with ThreadPoolExecutor(clients) as pool:  # warm-up at full concurrency (the largest batches), not counted
            list(pool.map(lambda k: post(self.url + "/v1/cutout", photos[k % len(photos)]), range(2 * clients)))
        self.rss_start = rss_mib(self.process.pid)

    def burst(self, count: int) -> None:
        """`count` requests from `clients` threads, each sending its next photo once its last is answered."""
        first, self.sent = self.sent, self.sent + count
        started = time.perf_counter()

        def client(k: int) -> list[tuple[int, float]]:
            return [
                post(self.url + "/v1/cutout", self.photos[i % len(self.photos)])
                for i in range(first + k, first + count, self.clients)
            ]

        with ThreadPoolExecutor(self.clients) as pool:
            parts = [pool.submit(client, k) for k in range(self.clients)]
            while not all(p.done() for p in parts):  # the server's RSS every second: a plateau or a leak
                self.rss.append(rss_mib(self.process.pid))
                time.sleep(1)
            self.results += [r for p in parts for r in p.result()]
        self.seconds += time.perf_counter() - started
        time.sleep(1)  # the last step's heap trim
        self.rss_rounds.append(rss_mib(self.process.pid))

    def row(self) -> dict:
        text = urllib.request.urlopen(self.url + "/metrics").read().decode()
        value = {m[0]: float(m[1]) for m in re.findall(r"^(carvana_batch_size_(?:sum|count)) (\S+)$", text, re.M)}
        latencies = np.array([t for status, t in self.results if status == 200])
        return {
            "requests": len(self.results),
            "failed": sum(status != 200 for status, _ in self.results),
            "rate": len(latencies) / self.seconds,
            **{f"p{q}": float(np.percentile(latencies, q)) for q in (50, 95, 99)},
            "batch": value["carvana_batch_size_sum"] / max(value["carvana_batch_size_count"], 1),
            "rss_start": self.rss_start,
            "rss_mid": self.rss[len(self.rss) // 2] if self.rss else self.rss_start,
            "rss_end": rss_mib(self.process.pid),
        }

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(120)


def one_by_one(config: Path, paths: list[Path], out: Path) -> tuple[int, float]:
    """`carvana cutout` over the photos with batches of one: photos and seconds from its own rate line,
    from the nets loaded to the last file written (the server's rate, too, includes encoding every answer)."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "cutout",
            *map(str, paths),
            "--out",
            str(out),
            "--config",
            str(config),
            "predict.batch_size=1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    done = re.search(r"cutout: (\d+) photos cut out into .* in ([\d.]+) s \(", run.stdout)
    return int(done[1]), float(done[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000, help="per server, over all its bursts")
    ap.add_argument(
        "--rounds", type=int, default=8, help="bursts per server, with the baseline before each and after the last"
    )
    ap.add_argument("--minutes", type=float, default=10, help="no round starts after this")
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
        cfg = make_run(
            Path(tmp), len(paths), args.depth, args.width, 256, [f"device={args.device}", "predict.batch_size=4"]
        )
        save_config(cfg, Path(tmp) / "bench.yaml")
        config, photos = Path(tmp) / "bench.yaml", [p.read_bytes() for p in paths]
        settings = {f"serve, max_batch {args.max_batch}": [f"serve.max_batch={args.max_batch}"]}
        if args.batch1:
            settings["serve, max_batch 1"] = ["serve.max_batch=1"]
        servers = {name: Server(config, extra, photos, args.clients) for name, extra in settings.items()}
        try:
            stop, baseline = time.monotonic() + args.minutes * 60, []
            for k in range(args.rounds):  # at least one round, so every server has a row
                baseline.append(one_by_one(config, paths, Path(tmp) / f"cut{k}"))
                for server in servers.values():
                    server.burst(args.requests * (k + 1) // args.rounds - args.requests * k // args.rounds)
                if time.monotonic() > stop:
                    break
            baseline.append(one_by_one(config, paths, Path(tmp) / "cut-last"))
            rows = {name: server.row() for name, server in servers.items()}
        finally:
            for server in servers.values():
                server.close()
    rate = sum(n for n, _ in baseline) / sum(s for _, s in baseline)
    rates = [n / s for n, s in baseline]
    print(
        f"{len(paths)} real photos, nets depth {args.depth} width {args.width}, {args.clients} clients, device "
        f"{args.device}"
    )
    print(
        f"carvana cutout one by one, {len(baseline)} runs between the bursts: {rate:.2f} photos/s (runs "
        f"{min(rates):.2f} to {max(rates):.2f})"
    )
    print(
        f"{'server':24} {'requests':>8} {'failed':>6} {'photos/s':>9} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
        f"{'batch':>6} {'RSS MiB start->half->end':>26} {'growth':>7}"
    )
    for name, r in rows.items():
        print(
            f"{name:24} {r['requests']:8d} {r['failed']:6d} {r['rate']:9.2f} {r['p50']:7.2f} {r['p95']:7.2f} "
            f"{r['p99']:7.2f} {r['batch']:6.2f} {r['rss_start']:8.0f}->{r['rss_mid']:.0f}->{r['rss_end']:<7.0f} "
            f"{r['rss_end'] / r['rss_start'] - 1:7.1%}"
        )
    for name, server in servers.items():  # idle after each round: a plateau, or growth with the requests
        print(f"{name}: RSS MiB after each round: {' '.join(f'{m:.0f}' for m in server.rss_rounds)}")
    first = next(iter(rows.values()))
    print(f"concurrent / one by one: {first['rate'] / rate:.2f}x")
    if args.batch1:
        print(f"max_batch {args.max_batch} / max_batch 1: {first['rate'] / rows['serve, max_batch 1']['rate']:.2f}x")


if __name__ == "__main__":
    main()
