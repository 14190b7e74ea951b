"""Chunk bookkeeping at the scale of the real test set: 100,064 rows, no model (generated rows).

    python benchmarks/bench_chunks.py [ROWS] [CHUNK]

Every row carries the RLE string of a car-sized ellipse at 1918x1280 (about 7.5 kB, as real
submissions do). Each phase runs in its own process, so its peak RSS is its own. Baselines, in the
same run: what the bookkeeping did before (a glob of the whole folder at every chunk write; a
resume that parsed every column, RLE strings included).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.draw import ellipse

from common.data.chunks import ChunkStore, write_submission
from common.data.rle import rle_encode

COLUMNS = ["img", "rle_mask", "error"]


def _names(rows: int) -> list[str]:
    return [f"{i // 16:012x}_{i % 16 + 1:02d}.jpg" for i in range(rows)]


def _store(root: str, rows: int, chunk: int) -> ChunkStore:
    return ChunkStore(root, "bench", COLUMNS, chunk, _names(rows))


def _write(root: str, rows: int, chunk: int) -> dict:
    car = np.zeros((1280, 1918), bool)
    car[ellipse(700, 959, 260, 780, shape=car.shape)] = True
    rle = rle_encode(car)
    store, names = _store(root, rows, chunk), _names(rows)
    chunks = -(-rows // chunk)
    times = []
    for k in range(chunks):
        part = [{"img": n, "rle_mask": rle, "error": ""} for n in names[k * chunk : (k + 1) * chunk]]
        t = time.perf_counter()
        store.write(k, part)
        times.append(time.perf_counter() - t)
    glob = []  # the old write's extra cost: a listing of the whole folder, now that it holds every chunk
    for _ in range(50):
        t = time.perf_counter()
        sorted(store.folder.glob("part-*.csv"))
        glob.append(time.perf_counter() - t)
    n = min(500, chunks)
    return {
        "chunks": chunks,
        "first_ms": 1e3 * np.median(times[:n]),
        "last_ms": 1e3 * np.median(times[-n:]),
        "total_s": sum(times),
        "glob_ms": 1e3 * np.median(glob),
        "mb": sum(p.stat().st_size for p in store.folder.iterdir()) / 2**20,
    }


def _resume(root: str, rows: int, chunk: int) -> dict:
    store = _store(root, rows, chunk)
    t = time.perf_counter()
    todo = store.todo(list(range(rows)))
    return {"seconds": time.perf_counter() - t, "todo": len(todo)}


def _errors(root: str, rows: int, chunk: int) -> dict:
    t = time.perf_counter()
    frame = _store(root, rows, chunk).frame(["img", "error"])
    return {"seconds": time.perf_counter() - t, "rows": len(frame)}


def _everything(root: str, rows: int, chunk: int) -> dict:
    t = time.perf_counter()
    frame = _store(root, rows, chunk).frame()
    return {"seconds": time.perf_counter() - t, "rows": len(frame)}


def _submission(root: str, rows: int, chunk: int) -> dict:
    t = time.perf_counter()
    written = write_submission(Path(root) / "submission.csv.gz", _store(root, rows, chunk), _names(rows))
    return {"seconds": time.perf_counter() - t, "rows": written}


def _child(fn, args, queue) -> None:
    result = fn(*args)
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def measure(fn, *args) -> dict:
    """Run `fn` in a fresh process: its result plus that process's peak RSS."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


if __name__ == "__main__":
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_064
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    with tempfile.TemporaryDirectory() as root:
        w = measure(_write, root, rows, chunk)
        print(
            f"{rows} rows in {w['chunks']} chunks of {chunk} ({w['mb']:.0f} MiB of CSV), written in {w['total_s']:.1f} "
            f"s, peak RSS {w['peak_mib']:.0f} MiB"
        )
        print(
            f"one chunk write: {w['first_ms']:.2f} ms (median of the first 500), {w['last_ms']:.2f} ms (last 500); "
            f"ratio {w['last_ms'] / w['first_ms']:.2f}"
        )
        print(
            f"baseline: the folder glob the old write did each time costs {w['glob_ms']:.2f} ms at {w['chunks']} "
            f"chunks ({w['glob_ms'] / w['last_ms']:.1f}x a whole write now)\n"
        )
        print(f"{'phase':44} {'seconds':>8} {'peak MiB':>9}")
        r = measure(_resume, root, rows, chunk)
        print(f"{'resume: which chunks are done (file names)':44} {r['seconds']:8.3f} {r['peak_mib']:9.0f}")
        e = measure(_errors, root, rows, chunk)
        a = measure(_everything, root, rows, chunk)
        print(f"{'finish: img + error columns of every chunk':44} {e['seconds']:8.2f} {e['peak_mib']:9.0f}")
        print(f"{'baseline: every column (RLE strings too)':44} {a['seconds']:8.2f} {a['peak_mib']:9.0f}")
        s = measure(_submission, root, rows, chunk)
        print(f"{'submission.csv.gz, streamed chunk by chunk':44} {s['seconds']:8.2f} {s['peak_mib']:9.0f}")
        print(
            f"\nfinish vs baseline: {a['seconds'] / e['seconds']:.1f}x faster, {a['peak_mib'] / e['peak_mib']:.1f}x "
            "less memory"
        )
