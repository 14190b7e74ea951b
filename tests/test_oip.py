"""`carvana serve`'s Open Inference Protocol (/v2), spoken by a real client of it, tritonclient: the
server and its model described, the mask /v1/segment's, the cutout's alpha the mask, malformed requests
400 with the protocol's error body, an unknown model 404, the API key, ready only from the warm-up to
the drain."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import busy, call, held_step, hold_warm_up, metric, photos_of, refused, running, until, wait_healthy
from PIL import Image

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install '.[test]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")

from tritonclient.utils import InferenceServerException  # noqa: E402

from common.data.rle import rle_decode  # noqa: E402
from common.model_source import open_source  # noqa: E402
from pipelines.serve import Server, create_app, listen  # noqa: E402
from pipelines.serve.app import server_config  # noqa: E402

INFER = "/v2/models/carvana/infer"


@pytest.fixture(scope="module")
def served(tiny_run):
    """One server for the checks that leave it as it was."""
    with running(tiny_run) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def photo(tiny_run) -> bytes:
    return photos_of(tiny_run)[0].read_bytes()


def _client(url: str):
    return httpclient.InferenceServerClient(url.removeprefix("http://"))


def _image(data: bytes, name: str = "image", count: int = 1):
    """The input tensor of `count` copies of the photo's bytes, as binary data."""
    tensor = httpclient.InferInput(name, [count], "BYTES")
    tensor.set_data_from_numpy(np.array([data] * count, dtype=np.object_), binary_data=True)
    return tensor


def _json_request(data: bytes, **more) -> bytes:
    """An inference request in plain JSON: the photo as a base64 string."""
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}
    return json.dumps({"inputs": [image], **more}).encode()


def _asgi_status(app, path: str) -> int:
    """The app's status for GET `path`, asked directly as uvicorn asks it: for when no connection can reach it."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(
        app(
            {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [],
                "client": ("127.0.0.1", 1),
                "server": ("127.0.0.1", 80),
            },
            receive,
            send,
        )
    )
    return sent[0]["status"]


def test_a_triton_client_sees_the_server_live_and_ready_and_the_model_described(served):
    url, _ = served
    client = _client(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("carvana")
    server = client.get_server_metadata()
    assert server["name"] == "carvana-cascade" and server["version"] and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("carvana")
    assert model["name"] == "carvana" and model["platform"] == "pytorch"
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]} == {
        "mask": ("UINT8", [-1, -1]),
        "rgba": ("BYTES", [1]),
    }
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("bicycle")
    assert e.value.status() == "404" and "unknown model 'bicycle'" in e.value.message()
    assert not client.is_model_ready("bicycle")


def test_the_mask_is_v1_segments_and_the_cutouts_alpha_is_the_mask(served, photo):
    """The same photo through /v1/segment, the binary data extension (tritonclient) and plain JSON:
    one mask, 0/1; the rgba output a PNG whose alpha >= 128 is that mask."""
    url, _ = served
    status, _, answer = call(url + "/v1/segment", photo, "image/jpeg")
    segment = json.loads(answer)
    assert status == 200
    truth = rle_decode(segment["rle_mask"], (segment["height"], segment["width"]))

    result = _client(url).infer(
        "carvana",
        [_image(photo)],
        request_id="car-1",
        outputs=[httpclient.InferRequestedOutput(name, binary_data=True) for name in ("mask", "rgba")],
    )
    mask = result.as_numpy("mask")
    assert (
        mask.dtype == np.uint8
        and np.array_equal(mask, truth.astype(np.uint8))
        and result.get_response()["id"] == "car-1"
    )
    png = result.as_numpy("rgba")[0]
    cutout = Image.open(io.BytesIO(png))
    assert cutout.format == "PNG" and cutout.mode == "RGBA" and cutout.size == (segment["width"], segment["height"])
    assert np.array_equal(np.asarray(cutout)[..., 3] >= 128, truth)

    status, headers, answer = call(
        url + INFER, _json_request(photo, outputs=[{"name": "mask"}, {"name": "rgba"}]), "application/json"
    )
    outputs = {output["name"]: output for output in json.loads(answer)["outputs"]}
    assert (
        status == 200
        and headers["Content-Type"] == "application/json"
        and "Inference-Header-Content-Length" not in headers
    )
    assert outputs["mask"]["shape"] == list(truth.shape) and np.array_equal(outputs["mask"]["data"], mask.ravel())
    assert base64.b64decode(outputs["rgba"]["data"][0]) == png


def test_malformed_requests_get_400_with_the_protocols_error_body_and_the_server_keeps_serving(served, photo):
    url, _ = served
    client = _client(url)
    before = {
        status: _infer_count(url, status) for status in ("400", "404")
    }  # the module's server: other tests' requests too
    wrong_type = httpclient.InferInput("image", [1], "UINT8")
    wrong_type.set_data_from_numpy(np.array([1], dtype=np.uint8), binary_data=True)
    for inputs, status, words in [
        ([_image(photo, "photo")], "400", "one input, 'image'"),
        ([wrong_type], "400", "is UINT8 [1]: it is BYTES [1]"),
        ([_image(photo, count=2)], "400", "is BYTES [2]"),
        ([_image(b"this is not a photo")], "400", "not an image"),
    ]:
        with pytest.raises(InferenceServerException) as e:
            client.infer("carvana", inputs)
        assert (e.value.status(), words in e.value.message()) == (status, True), e.value.message()
    with pytest.raises(InferenceServerException) as e:  # tritonclient's compression: not taken
        client.infer("carvana", [_image(photo)], request_compression_algorithm="gzip")
    assert e.value.status() == "415" and "Content-Encoding" in e.value.message()

    head = json.dumps(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 100}}]}
    ).encode()
    for body, headers, words in [
        (b"{not json", {}, "Invalid JSON"),
        (json.dumps({"inputs": {"name": "image"}}).encode(), {}, "inputs: Input should be a valid array"),
        (_json_request(b"", outputs=[{"name": "depth"}]), {}, "output 'depth'"),
        (_json_request(b"", parameters={"binary_data_output": "yes"}), {}, "binary_data_output"),
        (
            json.dumps(
                {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["*** not base64 ***"]}]}
            ).encode(),
            {},
            "not base64",
        ),
        (
            head,
            {"Inference-Header-Content-Length": str(len(head))},
            "binary_data_size=100, but 0 bytes follow",
        ),  # the binary part missing
        (head + b"\x00" * 100, {"Inference-Header-Content-Length": str(len(head))}, "not one BYTES element"),
        (head, {"Inference-Header-Content-Length": str(len(head) + 1)}, "but the body has"),
        (head, {"Inference-Header-Content-Length": "many"}, "Inference-Header-Content-Length=many"),
    ]:
        status, _, answer = call(url + INFER, body, "application/json", headers)
        assert (status, words in json.loads(answer)["error"]) == (400, True), answer
    status, _, answer = call(url + "/v2/models/bicycle/infer", _json_request(photo), "application/json")
    assert status == 404 and "unknown model 'bicycle'" in json.loads(answer)["error"]
    assert (
        client.infer("carvana", [_image(photo)]).as_numpy("mask").ndim == 2
    )  # still serving; no outputs named: the mask
    assert _infer_count(url, "400") - before["400"] == 13 and _infer_count(url, "404") - before["404"] == 1


def _infer_count(url: str, status: str) -> float:
    """/metrics' count of /v2 inference requests answered with `status` (0 before the first)."""
    return metric(url, 'carvana_requests_total{endpoint="/v2/models/{name}/infer",status="%s"}' % status)


def test_infer_needs_the_api_key_and_the_probes_do_not(tiny_run, monkeypatch):
    monkeypatch.setenv("CARVANA_TEST_KEY", "s3cret")
    with running(tiny_run.updated({"serve.api_key_env": "CARVANA_TEST_KEY"})) as (url, _):
        client = _client(url)
        assert client.is_server_ready() and client.is_model_ready("carvana") and client.get_model_metadata("carvana")
        with pytest.raises(InferenceServerException) as e:
            client.infer("carvana", [_image(b"not a photo")])
        assert e.value.status() == "401" and "API key" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.infer("carvana", [_image(b"not a photo")], headers={"Authorization": "Bearer s3cret"})
        assert e.value.status() == "400"  # past the key


def test_ready_only_from_the_warm_up_to_the_drain(tiny_run, photo, monkeypatch):
    """Not ready while the nets warm up (held here, as a compilation holds it), then ready; then, from
    SIGTERM (`Server.handle_exit`, what uvicorn's signal handler is) not ready while the request in
    flight, held in its device step, is answered 200. uvicorn closes the listening socket at its next
    tick, so no probe can connect after that; the app, asked directly, says 503."""
    warming, warm = hold_warm_up(monkeypatch)
    cfg = tiny_run.updated({"serve.max_wait_ms": 0})
    app, sock = create_app(cfg, open_source(cfg)), listen("127.0.0.1", 0)
    server = Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url, client = f"http://127.0.0.1:{sock.getsockname()[1]}", _client(f"127.0.0.1:{sock.getsockname()[1]}")
    try:
        assert warming.wait(120)
        assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("carvana")
        status, headers, answer = call(url + "/v2/health/ready")
        assert status == 503 and "not loaded yet" in json.loads(answer)["error"]
        status, headers, answer = call(url + INFER, _json_request(photo), "application/json")
        assert status == 503 and headers["Retry-After"] and "not loaded yet" in json.loads(answer)["error"]
        warm.set()
        wait_healthy(url)
        assert client.is_server_ready()

        with held_step(app.state.batcher) as release, ThreadPoolExecutor(1) as pool:
            flight = pool.submit(call, url + INFER, _json_request(photo), "application/json")
            until(lambda: busy(url))  # in the device step
            server.handle_exit(signal.SIGTERM, None)
            assert _asgi_status(app, "/v2/health/ready") == 503 and _asgi_status(app, "/v2/health/live") == 200
            until(lambda: refused(url))
            release.set()
            status, _, answer = flight.result()
        outputs = json.loads(answer)["outputs"]
        assert status == 200 and [output["name"] for output in outputs] == ["mask"]  # no outputs named: the mask alone
        assert set(outputs[0]["data"]) <= {0, 1} and len(outputs[0]["data"]) == np.prod(outputs[0]["shape"])
        thread.join(60)
        assert not thread.is_alive()
    finally:
        warm.set()
        server.should_exit = True
        thread.join(60)
