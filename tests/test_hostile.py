"""Everything from outside is hostile until checked: a checkpoint that would run code, requests made to
exhaust the server's memory, time or connections, bundles that would build huge nets or read weights
from elsewhere, cutouts that would overwrite their photos, keys, messages that would leak the machine,
a planted lock link, a config that expands to billions of items. Each case is refused, answered within
its limits and leaves nothing behind, and the server keeps answering its probes meanwhile."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    CHUNK_UNENDED,
    ROOT,
    TINY,
    busy,
    call,
    held_step,
    photos_of,
    port_of,
    read_answer,
    running,
    serve_process,
    tiny_nets,
    until,
    upload_started,
)
from PIL import Image

from common.config import load_config
from common.errors import CheckpointError, ConfigError
from pipelines.cli import main as cli

KEY_ENV = "CARVANA_HOSTILE_KEY"
KEY = {"X-API-Key": "hostile-test-key"}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- checkpoints -------------------------------------------------------------------------------------------


class _CreatesFile:
    """A pickle that, when unpickled, creates a file: what any code in a checkpoint could do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("command", ["stage1 predict", "bundle", "stage1 train (resume)"])
def test_hostile_checkpoint_that_would_run_code_is_refused_and_never_runs(tiny_run, tmp_path, capsys, command):
    """A checkpoint that would create a file when unpickled, where each command reads one (the stage-1
    checkpoint, the best.pt `carvana bundle` packs, the last.pt a resumed training continues from):
    refused in one line naming it, exit 2, and the file never appears."""
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model_args": {}, "model": {}, "payload": _CreatesFile(marker)}, evil)
    out = tmp_path / "run"
    base = [f"data.root={tiny_run.data.root}", f"output.dir={out}", "device=cpu", "stage1.size=64"]
    if command == "stage1 predict":
        args = ["stage1", "predict", *base, f"stage1.checkpoint={evil}"]
    elif command == "bundle":
        args = [
            "bundle",
            "--out",
            str(tmp_path / "bundle"),
            *base,
            *tiny_nets(tiny_run)[:2],
            f"stage1.checkpoint={evil}",
        ]
    else:
        (out / "stage1").mkdir(parents=True)
        shutil.copy(evil, out / "stage1" / "last.pt")
        evil = out / "stage1" / "last.pt"
        args = ["stage1", "train", *TINY, *base, "stage1.resume=true"]
    assert cli(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(evil) in line and "could run code" in line, line
    assert not marker.exists()


# ---- the server: one real process, its memory measured -------------------------------------------------------


def _memory(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in bytes."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def _peak_reset(pid: int) -> int:
    """Reset the process's peak resident memory (VmHWM) to its present size, and return that size."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as e:
        pytest.skip(f"the peak memory of a process cannot be reset here ({e.strerror}): Linux's /proc is needed")
    return _memory(pid)["VmHWM"]


def _peak_growth(pid: int, since: int) -> int:
    """Bytes by which the process's peak resident memory passed `since` (what `_peak_reset` returned)."""
    return _memory(pid)["VmHWM"] - since


class Prober:
    """GET /v2/health/live again and again from a thread of its own while a block runs: how long the
    slowest probe waited for its answer, and how many were answered."""

    def __init__(self, url: str):
        self.url, self.slowest, self.answered, self.stop = url, 0.0, 0, threading.Event()

    def __enter__(self) -> Prober:
        self.thread = threading.Thread(target=self._probe, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)

    def _probe(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            status = call(self.url + "/v2/health/live")[0]
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.answered += status == 200
            time.sleep(0.02)


@pytest.fixture(scope="module")
def process(tiny_run, tmp_path_factory):
    """One real server with the default limits, for the tests that measure its memory."""
    with serve_process(tiny_run, tmp_path_factory.mktemp("hostile-server")) as served:
        yield served


def _chunked_upload(url: str, path: str, most: int) -> tuple[int, tuple[int, dict, bytes]]:
    """A chunked upload with no length, sent 1 MB at a time until the server answers (or `most` bytes):
    the bytes sent by then, and the answer."""
    piece = b"100000\r\n" + b"\0" * 0x100000 + b"\r\n"
    with upload_started(url, path, "Transfer-Encoding: chunked") as sock:
        sock.setblocking(False)
        sent, pending = 0, memoryview(b"")
        while sent < most:
            readable, writable, _ = select.select([sock], [sock], [], 60)
            if readable:
                break
            assert writable, "the server neither read the upload nor answered for 60 s"
            if not pending:
                pending = memoryview(piece)
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent, pending = sent + n, pending[n:]
        return sent, read_answer(sock)


def test_hostile_v2_body_of_empty_objects_is_refused_while_the_server_stays_live_and_small(process):
    """A /v2 body of `{"inputs": [{},{},...]}` just under the largest body the server takes (about 60 MB):
    parsed as it was, tens of bytes of memory per byte and seconds on the event loop. It is refused (400)
    from a count of its JSON values; meanwhile every liveness probe is answered within a second, and the
    server's peak memory grows by little more than the body's own copies."""

    url, server = process
    body = b'{"inputs": [' + b"{}," * 20_000_000 + b"{}]}"
    before = _peak_reset(server.pid)
    with Prober(url) as prober:
        status, _, answer = call(url + "/v2/models/carvana/infer", body, "application/json")
    assert status == 400 and "JSON values" in json.loads(answer)["error"], answer
    assert prober.answered >= 1 and prober.slowest < 1.0, (prober.answered, prober.slowest)
    assert _peak_growth(server.pid, before) < 2 * len(body), _peak_growth(server.pid, before)


def test_hostile_chunked_upload_with_no_length_is_cut_at_the_limit(process):
    """An upload with no length (chunked) that never ends: the server stops reading at its body limit
    (a photo of serve.max_bytes and the third base64 adds, 66.7 MB by default) and answers 413 with
    `Connection: close`, while the probes are answered and its memory grows by about the limit."""
    url, server = process
    max_bytes = load_config().serve.max_bytes
    before = _peak_reset(server.pid)
    with Prober(url) as prober:
        sent, (status, headers, answer) = _chunked_upload(url, "/v1/cutout", most=20 * max_bytes)
    assert status == 413 and headers["connection"] == "close" and "serve.max_bytes" in json.loads(answer)["error"]
    assert sent < 2 * max_bytes  # the limit and what was in flight in the sockets' buffers when it answered
    assert prober.answered >= 1 and prober.slowest < 1.0, (prober.answered, prober.slowest)
    assert _peak_growth(server.pid, before) < 2 * max_bytes, _peak_growth(server.pid, before)


def test_hostile_sigterm_does_not_wait_for_a_stuck_upload_past_the_drain_timeout(tiny_run, tmp_path):
    """A client that starts an upload and never finishes it holds a request open; SIGTERM lets it run
    for serve.shutdown_timeout_s, then the server closes it, says so and exits 0 (it waited forever)."""

    with serve_process(tiny_run, tmp_path, "serve.shutdown_timeout_s=1", "serve.read_timeout_s=600") as (url, server):
        with upload_started(url, "/v1/cutout", "Transfer-Encoding: chunked", CHUNK_UNENDED):
            until(lambda: "carvana_uploads_arriving 1.0" in call(url + "/metrics")[2].decode())
            server.send_signal(signal.SIGTERM)
            assert server.wait(60) == 0
        assert "cut off" in server.stdout.read().decode()


# ---- the server in this process: limits, keys, hosts, messages -----------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_run):
    """A server with a key, allowed hosts, short reads and one upload at a time: (its URL, the app)."""

    os.environ[KEY_ENV] = KEY["X-API-Key"]
    cfg = tiny_run.updated(
        {
            "serve.api_key_env": KEY_ENV,
            "serve.allowed_hosts": ["127.0.0.1", "localhost"],
            "serve.read_timeout_s": 2,
            "serve.max_uploads": 1,
        }
    )
    try:
        with running(cfg) as served:
            yield served
    finally:
        del os.environ[KEY_ENV]


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails if it is still open after `seconds`
    (a bound on a deadline of a few seconds, not a measured speed)."""
    sock.settimeout(seconds)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_hostile_headers_sent_a_byte_at_a_time_do_not_hold_a_connection(guarded):
    """A client that never finishes its request's headers (slowloris) is cut off after
    serve.read_timeout_s (2 s here); uvicorn alone waits for them forever."""
    url, _ = guarded
    with socket.create_connection(("127.0.0.1", port_of(url))) as sock:
        sock.sendall(b"POST /v2/models/carvana/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert _closed_within(sock, 60) == b""


def test_hostile_an_upload_that_stops_arriving_gets_408_and_frees_its_place(guarded, tiny_run):
    """A chunked upload that stops midway: 408 with `Connection: close` after serve.read_timeout_s, and
    the one upload place (serve.max_uploads=1) is free again."""

    url, _ = guarded
    with upload_started(url, "/v1/segment", "Transfer-Encoding: chunked", CHUNK_UNENDED, KEY) as sock:
        status, headers, answer = read_answer(sock)
    assert status == 408 and headers["connection"] == "close" and "serve.read_timeout_s=2" in answer.decode()
    assert call(url + "/v1/segment", photos_of(tiny_run)[0].read_bytes(), "image/jpeg", KEY)[0] == 200


def test_hostile_uploads_beyond_the_limit_get_503_before_a_byte_is_read(guarded, tiny_run):
    """While serve.max_uploads (1 here) uploads are arriving, another gets 503 with Retry-After and
    `Connection: close` at once, the probes still answer, and once the first is done the next is taken."""

    url, app = guarded
    batcher = app.state.batcher
    short = batcher.s
    batcher.s = short.model_copy(update={"read_timeout_s": 600})  # the held upload stays held while the test looks
    try:
        with upload_started(url, "/v1/segment", "Content-Length: 1000", b"\0" * 10, KEY) as held:
            until(lambda: "carvana_uploads_arriving 1.0" in call(url + "/metrics")[2].decode())
            # a small body, sent with the headers in one write: the answer comes before any of it is read
            status, headers, answer = call(url + "/v1/segment", b"\0" * 100, "image/jpeg", KEY)
            assert status == 503 and headers["Retry-After"] == "1" and headers["Connection"] == "close"
            assert "serve.max_uploads=1" in json.loads(answer)["error"]
            assert call(url + "/v2/health/live")[0] == 200
            held.sendall(b"\0" * 990)
            assert read_answer(held)[0] == 400  # not a photo: but it was read
    finally:
        batcher.s = short
    assert call(url + "/v1/segment", photos_of(tiny_run)[0].read_bytes(), "image/jpeg", KEY)[0] == 200


def test_hostile_every_route_that_takes_a_photo_needs_the_key_and_the_docs_say_which(guarded):
    """Each POST operation the API declares (those of the protected routers, wherever they are added)
    answers 401 without the key; the probes, metadata, metrics and the page answer without it; the key's
    setting names every protected route (it named /v1 only, while /v2's infer was protected too)."""

    from common.config import FIELDS

    url, app = guarded
    posts = [path for path, operations in app.openapi()["paths"].items() if "post" in operations]
    assert {"/v1/cutout", "/v1/segment", "/v2/models/{name}/infer"} <= set(posts)
    doc = FIELDS["serve.api_key_env"].description
    for path in posts:
        status, _, answer = call(url + path.replace("{name}", "carvana"), b"\0", "application/octet-stream")
        assert status == 401 and "API key" in json.loads(answer)["error"], path
        assert path.replace("{name}", "NAME") in doc, path
    for path in ("/", "/healthz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/carvana"):
        assert call(url + path)[0] == 200, path
    assert all(probe in doc for probe in ("/healthz", "/v2/health", "/metrics"))


def test_hostile_binding_beyond_loopback_without_a_key_warns(tiny_run, monkeypatch, caplog):
    """`carvana serve --host 0.0.0.0` without a key says in one line that anyone who reaches it can use
    it; on 127.0.0.1, or with a key, nothing is said."""
    from common.model_source import open_source
    from pipelines.serve import app as serve_app

    monkeypatch.setattr(serve_app.Server, "run", lambda self, sockets: None)  # everything but the serving
    source = open_source(tiny_run)
    warned = {}
    for host, key in (("0.0.0.0", ""), ("127.0.0.1", ""), ("0.0.0.0", "s3cret")):
        monkeypatch.setenv(KEY_ENV, key)
        cfg = tiny_run.updated({"serve.api_key_env": KEY_ENV}) if key else tiny_run
        caplog.clear()
        assert serve_app.serve(cfg, source, host, 0) == 0
        warned[host, key] = [r.message for r in caplog.records if "without an API key" in r.message]
    assert len(warned["0.0.0.0", ""]) == 1 and "serve.api_key_env" in warned["0.0.0.0", ""][0]
    assert warned["127.0.0.1", ""] == warned["0.0.0.0", "s3cret"] == []


def test_hostile_a_host_not_allowed_is_refused(guarded):
    """With serve.allowed_hosts, a request whose Host header names another (a page's name rebound to this
    server's address) gets 400; an allowed name is answered."""

    url, _ = guarded
    assert call(url + "/v2/health/live", headers={"Host": "attacker.example"})[0] == 400
    assert call(url + "/v2/health/live", headers={"Host": "localhost"})[0] == 200


def test_hostile_v2_refuses_a_content_type_a_web_page_can_send_unasked(guarded, tiny_run):
    """A form or text/plain (what a page may POST to another origin without a preflight) gets 415;
    JSON is answered."""

    url, _ = guarded
    request = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(photos_of(tiny_run)[0].read_bytes()).decode()],
                }
            ]
        }
    ).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, answer = call(url + "/v2/models/carvana/infer", request, kind, KEY)
        assert status == 415 and "application/json" in json.loads(answer)["error"], kind
    assert call(url + "/v2/models/carvana/infer", request, "application/json; charset=utf-8", KEY)[0] == 200


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_hostile_the_default_pixel_limit_takes_real_photos_and_refuses_a_blank_giant(guarded):
    """serve.max_pixels (40 M by default) passes an 8K frame (33.2 M) and a 12 MP phone photo by their
    headers; a blank 10000x10000 PNG (100 M pixels in a few kB, 300 MB decoded) is 413 before decoding."""

    from common.data.images import PHOTO_FORMATS as FORMATS
    from common.data.images import open_photo

    limit = load_config().serve.max_pixels
    url, _ = guarded
    status, _, answer = call(url + "/v1/cutout", _png(10000, 10000), "image/png", KEY)
    assert status == 413 and f"serve.max_pixels={limit}" in json.loads(answer)["error"], answer
    for width, height in ((7680, 4320), (4000, 3000)):
        assert open_photo(_png(width, height), "upload", FORMATS, limit).size == (width, height)


def test_hostile_a_large_mask_goes_out_as_binary_data_only(guarded):
    """/v2's mask as JSON is a number per pixel: for a photo over 2048 x 2048 pixels it is refused (400,
    before decoding) naming the binary data extension."""

    url, _ = guarded
    buf = io.BytesIO()
    Image.new("RGB", (2100, 2100)).save(buf, format="JPEG")
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(buf.getvalue()).decode()]}
    request = json.dumps({"inputs": [image], "outputs": [{"name": "mask"}]}).encode()
    status, _, answer = call(url + "/v2/models/carvana/infer", request, "application/json", KEY)
    assert status == 400 and "binary_data" in json.loads(answer)["error"], answer


def test_hostile_a_phone_photo_in_mpo_is_taken_like_any_jpeg(guarded, tiny_run):
    """Phones save JPEGs with more pictures after the photo (MPO): the server cuts them out as `cutout`
    does (it answered 415)."""

    photo = Image.open(photos_of(tiny_run)[0]).resize((480, 320))
    buf = io.BytesIO()
    photo.save(buf, format="MPO", save_all=True, append_images=[photo.resize((120, 80))])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    url, _ = guarded
    status, _, answer = call(url + "/v1/segment", buf.getvalue(), "image/jpeg", KEY)
    assert status == 200 and (json.loads(answer)["width"], json.loads(answer)["height"]) == (480, 320), answer


def _no_leak(answer: bytes, tmp: Path) -> None:
    """An answer that quotes nothing of the machine: no path under the test's folders, no object address,
    no traceback."""
    text = answer.decode(errors="replace")
    assert str(tmp) not in text and not re.search(r"0x[0-9a-f]{6,}", text) and "Traceback" not in text, text


def test_hostile_answers_carry_no_path_stack_or_address(tiny_run, tmp_path, monkeypatch, guarded):
    """Nets that failed to load (here with a path in the error) are 503 on /healthz, the probes and a
    request, saying so without the path; a photo PIL cannot identify is 400 without PIL's
    `<_io.BytesIO object at 0x...>`; a long query value is echoed cut short."""

    from pipelines.serve import batcher

    url, _ = guarded
    status, _, answer = call(url + "/v1/cutout", b"GIF89a and then nothing", "image/jpeg", KEY)
    assert status == 400 and "not an image" in json.loads(answer)["error"]
    _no_leak(answer, tmp_path)
    status, _, answer = call(url + "/v1/cutout?output=" + "x" * 5000, b"\0", "image/jpeg", KEY)
    assert status == 400 and len(answer) < 400, answer

    def broken(*args):
        raise CheckpointError(f"{tmp_path}/stage2/best.pt: not a checkpoint of this project (at 0x7f3a2b1c4d50)")

    monkeypatch.setattr(batcher.Cascade, "load", broken)
    with running(tiny_run, healthy=False) as (url, _):
        until(lambda: call(url + "/healthz")[0] == 503 and b"failed" in call(url + "/healthz")[2])
        for path, body in (("/healthz", None), ("/v2/health/ready", None), ("/v1/segment", b"\0")):
            status, _, answer = call(url + path, body, "image/jpeg" if body else "")
            assert status == 503 and "CheckpointError" in answer.decode(), answer
            _no_leak(answer, tmp_path)


def test_hostile_pixels_in_flight_are_bounded_before_decoding(tiny_run, monkeypatch):
    """With the device step held on one photo and serve.max_pixels_in_flight room for one, a second photo
    gets 503 with Retry-After from its header alone: it is never decoded. The first is then answered."""

    from pipelines.serve import http

    decoded = []
    real_decoded = http.decoded
    monkeypatch.setattr(http, "decoded", lambda *a: decoded.append(1) or real_decoded(*a))
    data = photos_of(tiny_run)[0].read_bytes()
    room = 3_000_000  # one 1918x1280 photo (2.5 M pixels), not two
    cfg = tiny_run.updated({"serve.max_pixels": room, "serve.max_pixels_in_flight": room, "serve.max_wait_ms": 0})
    with running(cfg) as (url, app), held_step(app.state.batcher) as release, ThreadPoolExecutor(1) as pool:
        first = pool.submit(call, url + "/v1/segment", data, "image/jpeg")
        until(lambda: busy(url))
        status, headers, answer = call(url + "/v1/segment", data, "image/jpeg")
        assert status == 503 and headers["Retry-After"] == "1", answer
        assert "serve.max_pixels_in_flight=3000000" in json.loads(answer)["error"]
        assert len(decoded) == 1  # the first photo only
        release.set()
        assert first.result()[0] == 200


# ---- bundles -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_bundle(tiny_run, tmp_path_factory) -> Path:
    """A bundle of the tiny run, without ONNX files (quick to make)."""
    folder = tmp_path_factory.mktemp("hostile-bundle") / "bundle"
    assert (
        cli(
            [
                "bundle",
                "--out",
                str(folder),
                *TINY,
                f"data.root={tiny_run.data.root}",
                f"output.dir={tiny_run.output.dir}",
            ]
        )
        == 0
    )
    return folder


def _spoilt(bundle: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    change(manifest, copy)
    (copy / "bundle.json").write_text(json.dumps(manifest))
    return copy


def _cutout_with(bundle: Path, tiny_run, tmp_path: Path, *more: str) -> int:
    return cli(
        [
            "cutout",
            str(photos_of(tiny_run)[0]),
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(bundle),
            "device=cpu",
            *more,
        ]
    )


def test_hostile_bundle_net_arguments_out_of_bounds_are_refused_before_any_net_is_built(
    plain_bundle, tiny_run, tmp_path, capsys, monkeypatch
):
    """`depth: 1000000` would take hours to build (even on the meta device) before the weights are
    compared: the arguments are checked against the training settings' bounds first, in one line."""
    from common import bundle as bundle_module

    def deep(manifest, folder):
        manifest["nets"]["refiner"]["args"]["depth"] = 1_000_000

    spoilt = _spoilt(plain_bundle, tmp_path, deep)
    monkeypatch.setattr(bundle_module, "UNet", lambda **args: pytest.fail(f"a UNet was built of {args}"))
    assert _cutout_with(spoilt, tiny_run, tmp_path) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(spoilt / "bundle.json") in line and "nets.refiner.args.depth=1000000" in line and "10" in line, line


def test_hostile_bundle_settings_that_size_tensors_are_bounded(plain_bundle, tiny_run, tmp_path, capsys):
    """`stage2.tile: 10000000` in a bundle (the warm-up would allocate such a tile) is refused at read,
    naming the bound the setting's declaration gives; so is the same value as a setting."""

    def huge(manifest, folder):
        manifest["prediction"]["stage2.tile"] = 10_000_000

    spoilt = _spoilt(plain_bundle, tmp_path, huge)
    assert _cutout_with(spoilt, tiny_run, tmp_path) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(spoilt / "bundle.json") in line and "'stage2.tile' must be in [16, 4096]" in line, line
    with pytest.raises(ConfigError, match=re.escape("'stage2.tile' must be in [16, 4096]; got 10000000")):
        load_config(None, ["stage2.tile=10000000"])


def test_hostile_onnx_with_weights_in_another_file_is_refused(plain_bundle, tiny_run, tmp_path, capsys):
    """An ONNX file whose tensors live in a file beside it (external data) passes its sha256 while what it
    runs is elsewhere: refused under onnxruntime, in one line naming the file, exit 2."""
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install '.[onnx]')")
    from onnx import TensorProto, helper, numpy_helper

    from common.bundle import sha256

    def with_onnx(manifest, folder):
        for which in ("stage1", "refiner"):
            weights = numpy_helper.from_array(np.ones((1,), np.float32), "w")
            graph = helper.make_graph(
                [helper.make_node("Mul", ["x", "w"], ["logits"])],
                which,
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])],
                [weights],
            )
            external = which == "refiner"
            onnx.save_model(
                helper.make_model(graph),
                folder / f"{which}.onnx",
                save_as_external_data=external,
                location=f"{which}.weights" if external else None,
                size_threshold=0,
            )
            manifest["files"][f"{which}.onnx"] = sha256(folder / f"{which}.onnx")

    spoilt = _spoilt(plain_bundle, tmp_path, with_onnx)
    assert (spoilt / "refiner.weights").is_file()
    assert _cutout_with(spoilt, tiny_run, tmp_path, "predict.backend=onnxruntime") == 2
    line = _one_line(capsys.readouterr().err)
    assert str(spoilt / "refiner.onnx") in line and "external data" in line, line


# ---- cutout --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_photos(tiny_run, tmp_path) -> Path:
    """A folder of two small photos of test cars: car.jpg and other.png."""
    folder = tmp_path / "photos"
    folder.mkdir()
    src = photos_of(tiny_run)
    Image.open(src[0]).resize((320, 214)).save(folder / "car.jpg")
    Image.open(src[-1]).resize((320, 214)).save(folder / "other.png")
    return folder


def test_hostile_cutout_never_overwrites_a_photo(tiny_run, small_photos, capsys):
    """--out where a photo lies, so that an output would be the photo (other.png's cutout is other.png),
    or --out the very folder searched: refused in one line, exit 2, every photo as it was."""
    before = {p: p.read_bytes() for p in small_photos.glob("*.*g")}
    for photos in ([str(small_photos / "other.png")], [str(small_photos)]):
        assert cli(["cutout", *photos, "--out", str(small_photos), *tiny_nets(tiny_run)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "other.png would overwrite the photo" in line or "is the folder of photos" in line, line
        assert {p: p.read_bytes() for p in small_photos.glob("*.*g")} == before


def test_hostile_cutout_refuses_two_photos_that_would_write_one_file(tiny_run, small_photos, tmp_path, capsys):
    """car.jpg writes car_mask.png (its mask) and car_mask.jpg writes car_mask.png (its cutout): refused
    in one line naming both, before anything is written."""
    shutil.copy(small_photos / "car.jpg", small_photos / "car_mask.jpg")
    out = tmp_path / "out"
    assert cli(["cutout", str(small_photos), "--out", str(out), *tiny_nets(tiny_run)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "car.jpg" in line and "car_mask.jpg" in line and "car_mask.png" in line, line
    assert not out.exists() or not list(out.glob("*.png"))


def test_hostile_cutout_redoes_files_made_by_other_nets_or_settings(tiny_run, small_photos, tmp_path, capsys):
    """A rerun into the same --out with another --alpha, or other nets (another checkpoint file), redoes
    the files it made before instead of keeping them; the same command again does nothing."""
    out = tmp_path / "out"
    base = ["cutout", str(small_photos / "car.jpg"), "--out", str(out)]

    def run(*more: str) -> str:
        capsys.readouterr()
        assert cli([*base, *more]) == 0
        return capsys.readouterr().out

    assert "1 photos to do" in run(*tiny_nets(tiny_run))
    soft = np.asarray(Image.open(out / "car.png"))[..., 3]
    assert "0 photos to do" in run(*tiny_nets(tiny_run))
    assert "1 photos to do" in run(*tiny_nets(tiny_run), "--alpha", "hard")
    hard = np.asarray(Image.open(out / "car.png"))[..., 3]
    assert set(np.unique(hard)) <= {0, 255} and not np.array_equal(soft, hard)
    other = tmp_path / "other.pt"  # the same weights in another file: other nets as far as anyone can tell
    checkpoint = torch.load(Path(tiny_run.output.dir, "stage2", "best.pt"), weights_only=True)
    torch.save({**checkpoint, "note": "copied"}, other)
    nets = [*tiny_nets(tiny_run)[:1], f"stage2.checkpoint={other}", *tiny_nets(tiny_run)[2:]]
    assert "1 photos to do" in run(*nets, "--alpha", "hard")
    assert "0 photos to do" in run(*nets, "--alpha", "hard")


# ---- files and settings --------------------------------------------------------------------------------------


def test_hostile_a_lock_planted_as_a_link_is_never_followed(tiny_run, tmp_path, capsys):
    """An output folder whose `.carvana.lock` is a link to another file: the command refuses in one line
    (exit 2) and the other file is left as it was (taking the lock through the link truncated it)."""
    victim = tmp_path / "precious.txt"
    victim.write_text("years of work")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".carvana.lock").symlink_to(victim)
    assert cli(["stage1", "predict", f"data.root={tiny_run.data.root}", f"output.dir={out}", "device=cpu"]) == 2
    assert "symbolic link" in _one_line(capsys.readouterr().err)
    assert victim.read_text() == "years of work"


def test_hostile_a_yaml_alias_bomb_gives_a_short_error_naming_the_key(tmp_path, capsys):
    """Eight lines of YAML whose aliases expand to half a million strings under `stage1.margin`: the
    error names the key in one short line (quoting the whole value, it was megabytes)."""
    lines = ["stage1:", "  margin:", "    - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    - &{name} [{', '.join(['*' + below] * 9)}]" for name, below in zip("bcdef", "abcde", strict=True)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert cli(["config", "--config", str(bomb)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "'stage1.margin'" in line and str(bomb) in line and len(line) < 300 + len(str(bomb)), line


def test_hostile_the_dask_docs_say_who_can_run_code_on_the_workers():
    """docs/distributed.md shows a scheduler any machine can reach: it says that whoever reaches it can
    run code on the workers, and how to close that (TLS, a trusted network)."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    assert "run code on" in text and "TLS" in text and "trusted network" in text


def test_hostile_checkpoint_of_an_absurd_net_is_refused_before_it_is_built(tiny_run, tmp_path, capsys):
    """A hand-made checkpoint whose net has a million levels: refused from its arguments in one line, exit
    2, before anything is built (building it would take hours)."""
    torch.save({"model_args": {"in_channels": 3, "depth": 1_000_000, "width": 16, "dropout": 0.0, "prior_skip": False},
                "model": {}, "config": {"stage1": {"size": 64}}}, tmp_path / "absurd.pt")  # fmt: skip
    args = ["stage1", "predict", f"data.root={tiny_run.data.root}", f"output.dir={tmp_path / 'out'}", "device=cpu"]
    assert cli([*args, "stage1.size=64", f"stage1.checkpoint={tmp_path / 'absurd.pt'}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(tmp_path / "absurd.pt") in line and "depth" in line, line
