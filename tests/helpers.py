"""What several test modules share (their fixtures live in conftest.py): the tiny nets' settings, the
trainer's small data set, servers run as `carvana serve` runs them (in this process or a process of their
own), their HTTP calls and held device step, and headless Chromium. Paths come from this file, never from
the working directory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from common.config import Settings, load_config, save_config
from common.model_source import ModelSource
from common.training.batches import TensorBatches

ROOT = Path(__file__).resolve().parents[1]  # the project

# ---- the tiny nets -----------------------------------------------------------------------------------------

TINY = [
    "data.val_cars=1",
    "stage1.size=64",
    "stage1.epochs=8",
    "stage1.lr=0.01",
    "stage1.depth=3",
    "stage1.width=4",
    "stage1.batch_size=8",
    "stage1.workers=1",
    "stage2.epochs=1",
    "stage2.depth=3",
    "stage2.width=4",
    "stage2.crop=128",
    "stage2.batch_size=4",
    "stage2.val_images=1",
    "stage2.workers=0",
    "predict.batch_size=2",
    "device=cpu",
    "stage2.tile=512",
    "stage2.min_overlap=32",
]  # stage 1 learns the cars' outline in a few seconds (held-out Dice about 0.9), so its boxes hug the car
# and 512 tiles cover a box in half the CPU time of 1024


def tiny_config(root, out, *more: str) -> Settings:
    """The tiny nets' settings on the data at `root`, writing to `out`."""
    return load_config(None, [f"data.root={root}", f"output.dir={out}", *TINY, *more])


def tiny_nets(run: Settings) -> list[str]:
    """The tiny run's nets as a command line names them: its checkpoints and the settings they need."""
    out = run.output.dir
    return [
        f"stage1.checkpoint={out}/stage1/best.pt",
        f"stage2.checkpoint={out}/stage2/best.pt",
        "stage1.size=64",
        "stage2.tile=512",
        "device=cpu",
    ]


def copy_run(cfg: Settings, out: Path) -> Settings:
    """A copy of a run folder and its config pointing at the copy: a test that writes into a run
    works on its own copy, never on a fixture other tests read."""
    shutil.copytree(cfg.output.dir, out)
    return cfg.updated({"output.dir": str(out)})


def photos_of(run: Settings) -> list[Path]:
    """The test photos of a run's data, by name."""
    return sorted(Path(run.data.root, "test").glob("*.jpg"))


# ---- the trainer's data --------------------------------------------------------------------------------------

CONFIG = load_config(None, ["output.dir=elsewhere"])  # what a checkpoint records


class Blobs(TensorBatches):
    """Bright squares on noise, as uint8 images; `tensors` is their float view, `truths` the validator's masks."""

    def __init__(self, n=16, size=32, seed=0, batch_size=4):
        g = torch.Generator().manual_seed(seed)
        y = torch.zeros(n, 1, size, size)
        for i in range(n):
            r, c = torch.randint(4, size - 12, (2,), generator=g)
            y[i, :, r : r + 10, c : c + 10] = 1
        x = ((torch.rand(n, 3, size, size, generator=g) * 0.3 + y * 0.5) * 255).round().byte()
        super().__init__(x, y.byte(), batch_size, torch.device("cpu"))
        self.truths, self.tensors = list(y[:, 0].bool()), (x.float() / 255, y)


def blob_settings(**kw):
    """Stage 1's training settings for a small net on Blobs, with `kw` changed."""
    s = {"depth": 3, "width": 8, "batch_size": 4, "workers": 0, "augment": "none", "lr": 3e-3} | kw
    return load_config(None).updated({f"stage1.{k}": v for k, v in s.items()}).stage1


def blob_validator(data: Blobs):
    """Stage 1's validation over these images: `Coarse` predicts, the shared validator scores."""
    from common.training.trainer import validator
    from stage1_lowres.train import coarse_predictions

    cfg = CONFIG.updated({"stage1.size": data.images.shape[-1], "predict.batch_size": 4})  # 16 images a batch
    return validator(coarse_predictions(data.images, cfg, torch.device("cpu")), data.truths, 0.5)


# ---- HTTP ----------------------------------------------------------------------------------------------------


def call(url: str, body: bytes | None = None, content_type: str = "", headers: dict | None = None):
    """(status, headers, body) of a GET (no body) or POST."""
    request = urllib.request.Request(
        url, data=body, headers={**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def multipart(field: str, data: bytes, name: str = "photo.jpg") -> tuple[bytes, str]:
    """A form upload of `data` in `field`: (the body, its Content-Type)."""
    boundary = "carvanaboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def upload_started(url: str, path: str, framing: str, start: bytes = b"", headers: dict | None = None) -> socket.socket:
    """A raw connection that has sent a photo upload's request head (`framing`: its Content-Length or
    Transfer-Encoding header) and the `start` of its body: the test sends the rest, or never does, and reads
    the answer with `read_answer`."""
    sock = socket.create_connection(("127.0.0.1", port_of(url)))
    more = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n{more}{framing}\r\n\r\n".encode()
        + start
    )
    return sock


CHUNK_UNENDED = b"10\r\n" + b"\0" * 16 + b"\r\n"  # a chunked body's first 16-byte chunk, and nothing after it


def read_answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers by their lower-case names, body) of an HTTP answer read from a raw socket (its body
    by Content-Length)."""
    sock.setblocking(True)
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed without an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-answer"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def until(condition: Callable[[], bool], seconds: float = 60) -> None:
    """Wait for `condition`; fails after `seconds` (a bound on a state the test waits for, not a speed)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server never reached the expected state"
        time.sleep(0.02)


def wait_healthy(url: str, seconds: float = 120) -> None:
    """Wait until /healthz says ok (a bound on start-up, not a measured speed)."""

    def healthy() -> bool:
        with contextlib.suppress(OSError):
            return call(url + "/healthz")[0] == 200
        return False

    until(healthy, seconds)


def metric(url: str, name: str) -> float:
    """A sample's value in /metrics (0 before the first), `name` with its labels as Prometheus writes it."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", call(url + "/metrics")[2].decode(), re.M)
    return float(found.group(1)) if found else 0.0


def busy(url: str) -> bool:
    """The server's first device step has begun."""
    return metric(url, "carvana_batch_size_count") == 1


def refused(url: str) -> bool:
    """A new connection to the server is refused."""
    try:
        call(url + "/v2/health/live")
        return False
    except OSError:
        return True


@contextlib.contextmanager
def running(cfg: Settings, source: ModelSource | None = None, healthy: bool = True):
    """`carvana serve` of `source` (the config's checkpoints when None) in this process, on uvicorn as
    the command configures it, on a port of its own (nothing else can take it); yields its base URL and
    the app once /healthz says ok (or at once, not `healthy`)."""
    import uvicorn

    from common.model_source import open_source
    from pipelines.serve import create_app, listen
    from pipelines.serve.app import server_config

    app, sock = create_app(cfg, source or open_source(cfg)), listen("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        if healthy:
            wait_healthy(url)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(60)


def serving_at(server: subprocess.Popen) -> str:
    """The address `carvana serve` says it listens on, in its first lines (with --port 0, the port it got)."""
    for line in server.stdout:
        found = re.search(rb"serve: (http://[^/\s]+)/", line)
        if found:
            return found[1].decode()
    raise AssertionError("the server ended before saying where it listens")


@contextlib.contextmanager
def serve_process(cfg: Settings, folder: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`carvana serve --port 0 --config <cfg> ARGS` in a process of its own, run from the project; yields
    (its URL, the process) once it is healthy, and kills it afterwards if it still runs."""
    save_config(cfg, folder / "serve.yaml")
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "serve", "--port", "0", "--config", str(folder / "serve.yaml"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = serving_at(server)
        wait_healthy(url)
        yield url, server
    finally:
        server.kill()
        server.wait(60)


@contextlib.contextmanager
def held_step(batcher) -> Iterator[threading.Event]:
    """The server's device steps held until the test sets the event it yields (as a slow device holds
    them); a step still held after a minute fails loudly. The real step is back afterwards."""
    release, real = threading.Event(), batcher._predict

    def held(*args):
        assert release.wait(60), "the test never released the device step"
        return real(*args)

    batcher._predict = held
    try:
        yield release
    finally:
        release.set()
        batcher._predict = real


def hold_warm_up(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Every server's warm-up held until the test sets the second event (the first says it has begun),
    as a compilation holds it for tens of seconds."""
    from pipelines.serve import Batcher

    warming, release = threading.Event(), threading.Event()
    real = Batcher.warm_up

    def held(self, cascade):
        warming.set()
        assert release.wait(120), "the test never released the warm-up"
        real(self, cascade)

    monkeypatch.setattr(Batcher, "warm_up", held)
    return warming, release


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A local TCP port bound by the test and not listening: a connection to it is refused, and nothing
    else can take it while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# ---- Chromium ------------------------------------------------------------------------------------------------

CHROMEDRIVER = shutil.which("chromedriver")
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMEDRIVER is None, reason="Chromium's driver is not installed (apt-get install chromium chromium-driver)"
)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900):
    """Headless Chromium driven by selenium, its window `width` x `height` CSS pixels."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    options = webdriver.ChromeOptions()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        browser.set_window_size(width, height)
        yield browser
    finally:
        browser.quit()
