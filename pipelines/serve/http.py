"""What the server's routes share: the error body and the answers the API declares, the body read
within its limits, the API key (a dependency of the protected routers), crash handling (a middleware
that answers 500 with an incident id), and a photo's way from bytes to an answer.

Every limit is met before the work it guards: an upload's size as it arrives (413, the rest not read),
its time (408), the uploads being received at once (503), a photo's pixels from its header (413) and the
pixels in flight (503) before it is decoded. docs/reliability.md lists them with what a client sees."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from typing import Callable, Iterator, TypeVar, Union

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import Serve, shown
from common.data.images import PHOTO_FORMATS, address_free, decoded, open_photo
from common.errors import Failure, ImageReadError, TooLarge, UnsupportedImage
from common.log import log
from pipelines.picture import Cut
from pipelines.serve.batcher import Batcher, Busy

ENVELOPE = 64 * 1024  # bytes a request may add around a photo: a multipart form's headers, the JSON of /v2
CLOSE = {"Connection": "close"}  # an answer given before the body was read: the rest of it is not read either
T = TypeVar("T")
Bytes = Union[bytes, bytearray, memoryview]  # a body as read, or a part of it (no copy)


class ErrorBody(BaseModel):
    error: str


WHY = {
    400: "not a photo, a truncated one, or a parameter out of its values",
    401: "missing or wrong API key",
    408: "the upload did not arrive within serve.read_timeout_s (the connection is closed)",
    413: "more bytes than serve.max_bytes (the upload is not read further, the connection closed) or pixels than "
    "serve.max_pixels",
    415: "a Content-Type or an image format other than JPEG, PNG or WebP",
    422: "a photo the tile settings cannot cover",
    500: "an unexpected failure of the server (its log has the traceback)",
    503: "the nets are not loaded yet, or the server is full: serve.max_queue photos waiting, serve.max_uploads "
    "uploads arriving, or serve.max_pixels_in_flight pixels at work (see Retry-After)",
    504: "not answered within serve.timeout_s",
}
BINARY = {"schema": {"type": "string", "format": "binary"}}


def errors(*codes: int) -> dict:
    """The declared answers of these status codes, each with the error body."""
    return {code: {"model": ErrorBody, "description": WHY[code]} for code in codes}


def said(text: str, limit: int = 500) -> str:
    """An error message as a client gets it: no object address (a library's repr of an in-memory file)
    and no more than `limit` characters."""
    text = address_free(text, "an object")
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error (FastAPI's HTTPException and the router's 404/405) as `{"error": ...}`."""
    return JSONResponse({"error": said(e.detail)}, status_code=e.status_code, headers=e.headers)


async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
    """A parameter out of its values: 400, naming the parameter, what was sent (cut short) and what it takes."""
    first = e.errors()[0]
    name = ".".join(str(part) for part in first["loc"][1:]) or str(first["loc"][0])
    sent = first.get("input")
    sent = said(sent, 100) if isinstance(sent, str) else shown(sent)
    return JSONResponse({"error": said(f"{name}={sent}: {first['msg']}")}, status_code=400)


async def require_key(request: Request) -> None:
    """The dependency of the protected routers: the API key (`serve.api_key_env`), as X-API-Key or
    `Authorization: Bearer`, compared in constant time; nothing to check where none is set."""
    key = request.app.state.api_key
    if not key:
        return
    sent = [request.headers.get("x-api-key", ""), request.headers.get("authorization", "").removeprefix("Bearer ")]
    if not any(hmac.compare_digest(s.encode(), key.encode()) for s in sent):
        raise HTTPException(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)")


class CrashGuard:
    """ASGI middleware: anything unexpected (a device step that failed, a bug) is answered 500 with the
    error body and an incident id the client can quote; the traceback, paths and figures stay in the log."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if scope["type"] != "http" or started:
                raise
            incident = uuid.uuid4().hex[:8]
            log.error(f"serve: {scope['method']} {scope['path']} failed (incident {incident})", exc_info=True)
            answer = JSONResponse(
                {"error": f"internal error {incident}; the server's log has the details"}, status_code=500
            )
            await answer(scope, receive, send)


def body_limit(s: Serve) -> int:
    """The most bytes a request body may have: a photo of serve.max_bytes in base64, and its envelope."""
    return 4 * -(-s.max_bytes // 3) + ENVELOPE


async def read_body(request: Request) -> bytearray:
    """The request body, received within serve.read_timeout_s and `body_limit`: a body declared or found
    larger is answered 413 and not read further, a late one 408, both closing the connection; 503 before
    any byte is read while serve.max_uploads others are being received. (FastAPI's own `max_body_size`
    answers a declared length over it in plain text, in place of the API's error body.)"""
    state, batcher = request.app.state, request.app.state.batcher
    s, limit = batcher.s, body_limit(batcher.s)
    too_large = HTTPException(
        413,
        f"upload larger than the server takes: {limit} bytes, a photo of serve.max_bytes={s.max_bytes} in base64 "
        "and its envelope",
        CLOSE,
    )
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    if state.uploads >= s.max_uploads:
        raise HTTPException(
            503,
            f"busy: serve.max_uploads={s.max_uploads} uploads are arriving; retry",
            headers={"Retry-After": "1", **CLOSE},
        )

    async def receive() -> bytearray:
        body = bytearray()  # grown in place: no second copy of the whole body
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:  # a chunked upload, or one longer than it said: not read further
                raise too_large
            body += chunk
        return body

    state.uploads += 1
    batcher.metrics.uploads.inc()
    try:
        return await asyncio.wait_for(receive(), s.read_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(
            408, f"the upload did not arrive within serve.read_timeout_s={s.read_timeout_s}", CLOSE
        ) from None
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before its upload arrived") from None
    finally:
        state.uploads -= 1
        batcher.metrics.uploads.dec()


def ensure_ready(batcher: Batcher) -> None:
    """503 with Retry-After until the nets are loaded and warmed up, naming why."""
    if not batcher.ready.is_set():
        raise HTTPException(
            503,
            f"the nets are not loaded{': ' + batcher.failed if batcher.failed else ' yet'}",
            headers={"Retry-After": "5"},
        )


@contextlib.contextmanager
def _as_http() -> Iterator[None]:
    """A photo's faults as the HTTP errors the API declares."""
    try:
        yield
    except UnsupportedImage as e:
        raise HTTPException(415, str(e)) from None
    except TooLarge as e:
        raise HTTPException(413, str(e)) from None
    except ImageReadError as e:
        raise HTTPException(400, str(e)) from None


async def open_upload(batcher: Batcher, data: Bytes) -> Image.Image:
    """The photo's bytes opened and its header checked (format, pixels), nothing decoded yet (/v1's
    upload, /v2's input)."""
    s = batcher.s
    if len(data) > s.max_bytes:  # a photo out of a multipart form or base64 JSON: its envelope had room beside it
        raise HTTPException(413, f"photo of {len(data)} bytes is larger than serve.max_bytes={s.max_bytes}")
    with _as_http():
        return await batcher.on_host(open_photo, data, "upload", PHOTO_FORMATS, s.max_pixels)


async def cut_photo(batcher: Batcher, photo: Image.Image, answer: Callable[[Cut], T]) -> T:
    """The opened photo's pixels counted in flight (503 beyond serve.max_pixels_in_flight, before
    decoding), decoded, queued, cut and made into `answer(cut)` on a host thread; every way it can fail
    is an HTTP error naming it."""
    s = batcher.s
    try:
        with batcher.holding(photo.width * photo.height):
            with _as_http():
                rgb = await batcher.on_host(decoded, photo, "upload")
            del photo
            cut = await asyncio.wait_for(batcher.cut(rgb), s.timeout_s)
            if isinstance(cut, Failure):  # e.g. a photo that needs more tiles than the settings allow
                raise HTTPException(422, str(cut))
            return await batcher.on_host(answer, cut)
    except Busy as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
    except asyncio.QueueFull:
        raise HTTPException(
            503, f"busy: {s.max_queue} photos are waiting (serve.max_queue)", headers={"Retry-After": "1"}
        ) from None
    except asyncio.TimeoutError:
        raise HTTPException(504, f"not answered within serve.timeout_s={s.timeout_s} s") from None
