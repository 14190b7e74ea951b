"""`carvana serve`: background removal over HTTP, many clients on one device.

FastAPI on uvicorn (the `serve` extra): the ecosystem's standard, and the one the settings' pydantic
already belongs to. LitServe batches too, but adds a second framework and its own worker model for
what one asyncio task per device does here.

Requests are decoded in a thread pool (off the event loop) and queued; one batcher task per device
takes the first waiting photo, waits up to `serve.max_wait_ms` for more (up to `serve.max_batch`) and
runs them through the one predictor (`Cascade.predict`, as `stage2 predict` and `carvana cutout` do)
in one device step. The queue is bounded (`serve.max_queue`): when full, 503 with Retry-After, so
memory stays bounded. Bad input gets a 4xx with `{"error": ...}` naming the problem; nothing is
written to disk. SIGTERM (uvicorn's) stops accepting, lets the requests in flight finish, exits 0.
Every parameter, body, answer and error is declared to FastAPI, so `/openapi.json` (and `/docs`)
describe the API as it behaves. Beside /v1, the Open Inference Protocol (/v2, pipelines/oip.py) on
the same batcher.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import os
import re
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

import numpy as np
import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, ImageColor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from common.boxes import Box
from common.config import Settings
from common.data.images import decode_photo
from common.data.rle import rle_encode
from common.errors import ConfigError, Failure, ImageReadError, TooLarge, UnsupportedImage
from common.log import log
from common.model import pick_device, use_device
from common.prediction.reader import from_host
from common.prediction.step import Prediction
from common.prediction.writer import to_host_all
from pipelines import matting
from pipelines.bundle import open_cascade
from stage2_fullres.bundle import Bundle
from stage2_fullres.predict import Cascade

FORMATS = ("JPEG", "PNG", "WEBP")
try:
    # glibc keeps freed full-resolution buffers in the threads' malloc arenas, so a busy server's RSS climbs
    # (+20% over 200 requests on a CPU); malloc_trim after a step hands the free pages back and the RSS
    # stays flat (docs/experiments/2026-12-serve-memory.md). After the step that leaves the queue empty, so
    # an idle server holds no garbage; under load at most once a second, so a GPU's millisecond steps do not
    # each walk the heap. Absent outside glibc (macOS, musl): no trim.
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (AttributeError, OSError):
    _malloc_trim = None
MEDIA = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class Cut:
    """One photo's result on the host: its pixels, its mask (the submission's, `Prediction.mask`),
    the soft alpha (>= 128 exactly on the mask) and the box."""

    rgb: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray
    box: Box
    found: bool


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()  # one per app: tests run several in one process
        self.requests = Counter("carvana_requests", "requests answered", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("carvana_request_seconds", "time from request to answer", ["endpoint"], registry=self.registry)
        self.batch = Histogram("carvana_batch_size", "photos per device step", registry=self.registry,
                               buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch}))
        self.queue = Gauge("carvana_queue_depth", "photos accepted and not yet through the device", registry=self.registry)


class Batcher:
    """The bounded queue and one batching task per device replica of the nets."""

    def __init__(self, cfg: Settings, metrics: Metrics, bundle: Bundle | None = None):
        self.cfg, self.s, self.metrics, self.bundle = cfg, cfg.serve, metrics, bundle
        self.name = bundle.name if bundle is not None else "carvana"  # the model's name on /v2/models/{name}
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.s.max_queue)
        self.cascades: list[Cascade] = []
        self.ready = threading.Event()
        self.failed = ""
        self.stopping = threading.Event()  # SIGTERM during the start-up: no further warm-up, never ready
        self.tasks: list[asyncio.Task] = []
        # few, long-lived threads: each thread that allocates gets its own malloc arena, and a pool that
        # rotates through many of them makes the server's memory grow (rembg's server-mode complaint)
        self.host = ThreadPoolExecutor(2, thread_name_prefix="serve-host")  # decoding and encoding photos
        self.steps: list[ThreadPoolExecutor] = []
        self.trimmed = 0.0  # when the heap was last trimmed (the event loop's clock)

    async def on_host(self, fn, *args):
        """`fn(*args)` off the event loop, on the host threads."""
        return await asyncio.get_running_loop().run_in_executor(self.host, fn, *args)

    async def open(self) -> None:
        """Load and warm up the nets in a thread, while the server already answers (/healthz: 503,
        loading), then start a batching task per device."""
        await asyncio.to_thread(self.load)
        if self.ready.is_set():
            self.tasks = [asyncio.create_task(self._work(c, step)) for c, step in zip(self.cascades, self.steps)]

    def load(self) -> None:
        try:
            opened = [open_cascade(self.cfg, self.bundle, pick_device(name)) for name in self.s.devices or [self.cfg.device]]
            self.cascades, self.threshold = [cascade for cascade, _ in opened], opened[0][1]
            # a step thread per device, its current CUDA device set once (`use_device`)
            self.steps = [ThreadPoolExecutor(1, thread_name_prefix=f"serve-{c.device}", initializer=use_device, initargs=(c.device,))
                          for c in self.cascades]
            for cascade, step in zip(self.cascades, self.steps):  # one device at a time: torch.compile is not
                if self.stopping.is_set():  # promised to be safe compiling on several at once
                    break
                step.submit(self.warm_up, cascade).result()
            if self.stopping.is_set():  # stopped while loading: `stop` may have run before these pools existed
                for pool in self.steps:
                    pool.shutdown(wait=False, cancel_futures=True)
                return
            self.ready.set()
            log.info(f"serve: nets loaded and warmed up on {', '.join(str(c.device) for c in self.cascades)}")
        except Exception as e:  # the server keeps answering, /healthz says why
            self.failed = f"{type(e).__name__}: {e}"
            log.warning(f"serve: cannot load the nets: {self.failed}")

    def warm_up(self, cascade: Cascade) -> None:
        """One device step on a blank photo before the server says it is ready: it compiles the nets
        (predict.compile: tens of seconds) and lets cuDNN pick its kernels for the one padded shape of
        each net (`static_shapes`), so the first clients do not wait for it and time out."""
        log.info(f"serve: warming up on {cascade.device}")
        self._predict(cascade, [np.full((cascade.tile, cascade.tile, 3), 128, np.uint8)])

    def stop(self) -> None:
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        for pool in [self.host, *self.steps]:
            pool.shutdown(wait=False, cancel_futures=True)

    async def cut(self, rgb: np.ndarray) -> Cut | Failure:
        """The photo's cut, after it has waited its turn; QueueFull when the queue is full."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((rgb, future))
        self.metrics.queue.inc()
        try:
            return await future
        finally:
            self.metrics.queue.dec()

    async def _work(self, cascade: Cascade, step: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.s.max_wait_ms / 1000
            while len(batch) < self.s.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
                except asyncio.TimeoutError:
                    break
            batch = [(rgb, f) for rgb, f in batch if not f.done()]  # a timed-out request is not predicted
            if not batch:
                continue
            self.metrics.batch.observe(len(batch))
            try:
                cuts = await loop.run_in_executor(step, self._predict, cascade, [rgb for rgb, _ in batch])
            except Exception as e:  # a failed step fails its requests, not the server
                cuts = [e] * len(batch)
            for (_, future), cut in zip(batch, cuts):
                if not future.done():
                    future.set_exception(cut) if isinstance(cut, Exception) else future.set_result(cut)
            del batch, cuts  # the step's photos and alphas now live only in their requests
            if _malloc_trim is not None and (self.queue.empty() or loop.time() - self.trimmed >= 1):
                self.trimmed = loop.time()
                step.submit(_malloc_trim, 0)  # on the step's thread, ahead of the next step; the loop does not wait

    def _predict(self, cascade: Cascade, photos: list[np.ndarray]) -> list[Cut | Failure]:
        """One device step for the batch: the cascade's mask and soft alpha made on the device; only
        they come back, as bool and uint8, all in one copy awaited once (the step's one host sync
        besides stage 1's for the boxes)."""
        results = cascade.predict([from_host(rgb, cascade.device).permute(2, 0, 1) for rgb in photos], [None] * len(photos))
        done = [r for r in results if isinstance(r, Prediction)]
        planes = iter(to_host_all([plane for r in done for plane in (r.mask(self.threshold), matting.alpha(r, self.threshold))])())
        return [result.named("upload") if isinstance(result, Failure) else Cut(rgb, next(planes), next(planes), result.box, result.found)
                for rgb, result in zip(photos, results)]


def render(cut: Cut, output: matting.Picture, background: str, soft: bool, crop: bool, fmt: str, clean: bool = True) -> bytes:
    """The answer image of `/v1/cutout`'s query: rgba | mask | composite, soft or hard edge, clean or not, cropped to the box."""
    a = cut.alpha if soft else cut.mask.astype(np.uint8) * 255
    image = Image.fromarray(matting.picture(cut.rgb, a, output, ImageColor.getrgb(background), cut.box if crop else None, clean))
    buf = io.BytesIO()
    image.save(buf, format=fmt.upper(), **({"quality": 92} if fmt != "png" else {"compress_level": 1}))  # level 1: 3x faster
    return buf.getvalue()


# --- the API's contract, as /openapi.json shows it

class ErrorBody(BaseModel):
    error: str


class Segment(BaseModel):
    width: int
    height: int
    box: list[int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    found: bool  # stage 1 saw a car (else the box is the whole photo)
    rle_mask: str  # the Kaggle RLE of the car mask
    seconds: float


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    error: str = ""


WHY = {400: "not a photo, a truncated one, or a parameter out of its values", 401: "missing or wrong API key",
       413: "more bytes than serve.max_bytes or pixels than serve.max_pixels",
       415: "a Content-Type or an image format other than JPEG, PNG or WebP",
       422: "a photo the tile settings cannot cover", 500: "an unexpected failure of the server (its log has the traceback)",
       503: "the nets are not loaded yet, or the queue is full (see Retry-After)", 504: "not answered within serve.timeout_s"}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorBody, "description": WHY[code]} for code in codes}


BINARY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
UPLOAD = {"requestBody": {"required": True, "description": "the photo: the multipart field `image`, or the body itself",
                          "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                                                         "properties": {"image": BINARY["schema"]}}},
                                      **{kind: BINARY for kind in UPLOAD_TYPES}}}}
ANSWERS = _errors(400, 401, 413, 415, 422, 500, 503, 504)


async def _body(request: Request, max_bytes: int, room: int = 0) -> bytes:
    """The request body, kept up to `max_bytes` (serve.max_bytes) and the `room` of its envelope, but
    read to its end: a client is answered once it has sent everything, so it sees a 413, not a
    connection reset mid-upload."""
    limit = max_bytes + room
    if int(request.headers.get("content-length") or 0) > 20 * limit:  # not worth reading at all
        raise HTTPException(413, f"upload is larger than serve.max_bytes={max_bytes} allows")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise HTTPException(413, f"upload of {size} bytes is larger than serve.max_bytes={max_bytes} allows")
    return b"".join(chunks)


def form_parser(max_bytes: int) -> type[MultiPartParser]:
    """Starlette's multipart parser, keeping uploads up to the upload limit in memory (the class's own
    default spools files over 1 MB to disk): a subclass, so Starlette's class is left as it is."""
    return type("UploadParser", (MultiPartParser,), {"spool_max_size": max_bytes + 1})


async def _upload(request: Request, max_bytes: int) -> bytes:
    """The photo: the multipart field `image`, or the raw body with an image Content-Type."""
    kind = request.headers.get("content-type", "")
    if not (kind.startswith(("multipart/form-data", "image/")) or kind == "application/octet-stream"):
        raise HTTPException(415, "send the photo as the multipart field 'image', or as the body with an image/* Content-Type")
    body = await _body(request, max_bytes, 64 * 1024 if kind.startswith("multipart/") else 0)  # the envelope's room
    if not kind.startswith("multipart/"):
        return body

    async def once():
        yield body

    try:
        form = await request.app.state.form_parser(request.headers, once(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:  # a malformed envelope (what Starlette's request.form() turns into a 400 too)
        raise HTTPException(400, f"not a multipart form with the field 'image': {e.message}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "missing the multipart field 'image' (the photo file)")
    return await upload.read()


router = APIRouter()
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/cutout", "/v1/segment", "/v2", "/v2/health/live", "/v2/health/ready",
             "/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/infer")  # pipelines/oip.py: the /v2 ones
MODEL_PATH = re.compile(r"^/v2/models/[^/]+")  # counted as /v2/models/{name}, whatever the name


def create_app(cfg: Settings, bundle: Bundle | None = None) -> FastAPI:
    """The app, its nets (the bundle's, else the config's) loading in a thread at start-up; `carvana
    serve` runs it on uvicorn, the tests in process."""
    s = cfg.serve
    key = os.environ.get(s.api_key_env, "") if s.api_key_env else ""
    if s.api_key_env and not key:
        raise ConfigError(f"serve.api_key_env={s.api_key_env}, but that environment variable is empty or unset")
    batcher = Batcher(cfg, Metrics(s.max_batch), bundle)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        opening = asyncio.create_task(batcher.open())  # not awaited: the server answers (503) while the nets load
        yield
        opening.cancel()
        batcher.stop()  # uvicorn has let the requests in flight finish

    app = FastAPI(title="carvana serve", summary="Cut the car out of studio photos: the two-stage Carvana cascade",
                  lifespan=lifespan)
    app.state.batcher, app.state.key, app.state.form_parser = batcher, key, form_parser(s.max_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # FastAPI's HTTPException and the router's 404/405
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.state.draining = False  # set by Server.handle_exit: /v2/health/ready answers 503 from SIGTERM on
    app.middleware("http")(_count)
    app.include_router(router)
    from pipelines.oip import router as oip  # the Open Inference Protocol (/v2), which builds on this module

    app.include_router(oip)
    return app


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=e.headers)


async def _bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
    """A query parameter out of its values: 400, naming the parameter, what was sent and what it takes."""
    first = e.errors()[0]
    name = ".".join(str(part) for part in first["loc"][1:]) or str(first["loc"][0])
    return JSONResponse({"error": f"{name}={first.get('input')}: {first['msg']}"}, status_code=400)


async def _count(request: Request, call_next) -> Response:
    """The API key check, every answer counted by endpoint and status with its latency, and anything
    unexpected (a device step that failed, a bug) answered 500 with the error body, its traceback logged."""
    started, key, metrics = time.perf_counter(), request.app.state.key, request.app.state.batcher.metrics
    endpoint = MODEL_PATH.sub("/v2/models/{name}", request.url.path)
    endpoint = endpoint if endpoint in ENDPOINTS else "other"
    sent = (request.headers.get("x-api-key"), request.headers.get("authorization", "").removeprefix("Bearer "))
    if key and (endpoint.startswith("/v1/") or endpoint.endswith("/infer")) and key not in sent:
        response: Response = JSONResponse({"error": "missing or wrong API key (X-API-Key or Authorization: Bearer)"}, 401)
    else:
        try:
            response = await call_next(request)
        except Exception:  # the details (paths, memory figures) stay in the log, under an id the client can quote
            incident = uuid.uuid4().hex[:8]
            log.error(f"serve: {request.method} {request.url.path} failed (incident {incident})", exc_info=True)
            response = JSONResponse({"error": f"internal error {incident}; the server's log has the details"}, status_code=500)
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
    return response


def ensure_ready(batcher: Batcher) -> None:
    """503 with Retry-After until the nets are loaded and warmed up, naming why."""
    if not batcher.ready.is_set():
        raise HTTPException(503, f"the nets are not loaded{': ' + batcher.failed if batcher.failed else ' yet'}",
                            headers={"Retry-After": "5"})


async def _cut_of(request: Request) -> tuple[Cut, float]:
    """The uploaded photo decoded, queued and cut, and the seconds from the upload read to the cut."""
    batcher: Batcher = request.app.state.batcher
    ensure_ready(batcher)
    started = time.perf_counter()
    data = await _upload(request, batcher.s.max_bytes)
    return await cut_photo(batcher, data), time.perf_counter() - started


async def cut_photo(batcher: Batcher, data: bytes) -> Cut:
    """The photo's bytes decoded, queued and cut (/v1's upload, /v2's input); every way it can fail
    is an HTTP error naming it."""
    s = batcher.s
    if len(data) > s.max_bytes:  # a photo out of a multipart form or base64 JSON: its envelope had room beside it
        raise HTTPException(413, f"photo of {len(data)} bytes is larger than serve.max_bytes={s.max_bytes}")
    try:
        rgb = await batcher.on_host(decode_photo, data, "upload", FORMATS, s.max_pixels)
        cut = await asyncio.wait_for(batcher.cut(rgb), s.timeout_s)
    except UnsupportedImage as e:
        raise HTTPException(415, str(e)) from None
    except TooLarge as e:
        raise HTTPException(413, str(e)) from None
    except ImageReadError as e:
        raise HTTPException(400, str(e)) from None
    except asyncio.QueueFull:
        raise HTTPException(503, f"busy: {s.max_queue} photos are waiting (serve.max_queue)", headers={"Retry-After": "1"}) from None
    except asyncio.TimeoutError:
        raise HTTPException(504, f"not answered within serve.timeout_s={s.timeout_s} s") from None
    if isinstance(cut, Failure):  # e.g. a photo that needs more tiles than the settings allow
        raise HTTPException(422, str(cut))
    return cut


@router.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "loading, or the nets failed to load"}})
async def healthz(request: Request) -> JSONResponse:
    """Ready when the nets are loaded."""
    batcher: Batcher = request.app.state.batcher
    if batcher.ready.is_set():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "failed" if batcher.failed else "loading", "error": batcher.failed}, 503)


CUT_HEADERS = {"X-Car-Box": {"description": "x0,y0,x1,y1 of the car's box in the photo", "schema": {"type": "string"}},
               "X-Car-Found": {"description": "1 if stage 1 saw a car, else 0 (the box is the whole photo)", "schema": {"type": "string"}},
               "X-Seconds": {"description": "seconds from the upload read to the cut", "schema": {"type": "string"}}}


@router.post("/v1/cutout", response_class=Response, openapi_extra=UPLOAD,
             responses={200: {"description": "the picture", "content": {media: BINARY for media in MEDIA.values()},
                              "headers": CUT_HEADERS}, **ANSWERS})
async def cutout(request: Request,
                 output: matting.Picture = Query(
                     "rgba", description="rgba: the photo with the car's alpha; mask: the alpha alone; composite: the car on `background`"),
                 alpha: Literal["soft", "hard"] = Query("soft", description="soft: the edge follows the probability; hard: 0 or 255"),
                 fmt: Literal["png", "webp", "jpeg"] = Query("png", alias="format", description="jpeg has no alpha: not with output=rgba"),
                 crop: bool = Query(False, description="cut the picture to the car's box"),
                 clean_edges: bool = Query(True, description="the soft edge in the car's own colour, not the photo's (the old background)"),
                 background: str = Query("white", description="composite's colour: a name such as white, or #rrggbb")) -> Response:
    """The car cut out of the uploaded photo."""
    try:
        ImageColor.getrgb(background)
    except ValueError:
        raise HTTPException(400, f"background={background}: not a colour (a name such as white, or #rrggbb)") from None
    if fmt == "jpeg" and output == "rgba":
        raise HTTPException(400, "format=jpeg has no alpha channel: use output=composite or mask, or format=png or webp")
    cut, seconds = await _cut_of(request)
    body = await request.app.state.batcher.on_host(render, cut, output, background, alpha == "soft", crop, fmt, clean_edges)
    return Response(body, media_type=MEDIA[fmt], headers={"X-Car-Box": ",".join(map(str, cut.box)),
                                                          "X-Car-Found": str(int(cut.found)), "X-Seconds": f"{seconds:.3f}"})


@router.post("/v1/segment", response_model=Segment, openapi_extra=UPLOAD, responses=ANSWERS)
async def segment(request: Request) -> JSONResponse:
    """The car mask of the uploaded photo as Kaggle RLE, with its box."""
    cut, seconds = await _cut_of(request)
    height, width = cut.mask.shape
    rle = await request.app.state.batcher.on_host(rle_encode, cut.mask)
    return JSONResponse({"width": width, "height": height, "box": list(cut.box), "found": cut.found, "rle_mask": rle,
                         "seconds": round(seconds, 3)})


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus metrics", "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
async def prometheus(request: Request) -> Response:
    """Requests by endpoint and status, latencies, batch sizes and the queue's depth."""
    return Response(generate_latest(request.app.state.batcher.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse)
async def page() -> str:
    """A page to drop photos on (works offline)."""
    return PAGE


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that the log can say the port it got (`--port 0`: any free
    one); IPv4 or IPv6 as the host resolves (`--host ::` listens on both where the system allows)."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]  # "": all
        return socket.create_server((host, port), family=family, dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None


class Server(uvicorn.Server):
    """uvicorn's server, which marks its app draining when a signal stops it, so /v2/health/ready
    answers 503 while uvicorn lets the requests in flight finish. (uvicorn closes the listening socket
    at its next tick, within 0.1 s: after that a probe's connection is refused, not ready either.)"""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.config.app.state.draining = True
        super().handle_exit(sig, frame)


def serve(cfg: Settings, host: str, port: int, bundle: Bundle | None = None) -> int:
    app = create_app(cfg, bundle)
    sock = listen(host, port)
    address = f"[{host}]" if ":" in host else host or "0.0.0.0"
    log.info(f"serve: http://{address}:{sock.getsockname()[1]}/ (the page), POST /v1/cutout, /v1/segment; the Open Inference "
             "Protocol under /v2; GET /healthz, /metrics, /docs")
    # uvicorn drains on SIGTERM, then raises it again under the handler it found: this one, so a
    # drained server exits 0 instead of dying by the signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    log.info("serve: stopped; every request it accepted was answered")
    return 0


PAGE = (Path(__file__).with_name("serve_page.html")).read_text()
