"""What the server's routes share: the error body and the answers the API declares, the body read
within its limits, the API key (a dependency of the protected routers), crash handling (a middleware
that answers 500 with an incident id), and a photo's way from bytes to a `Cut`."""

from __future__ import annotations

import asyncio
import hmac
import uuid

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.data.images import decode_photo
from common.errors import Failure, ImageReadError, TooLarge, UnsupportedImage
from common.log import log
from pipelines.picture import Cut
from pipelines.serve.batcher import Batcher

FORMATS = ("JPEG", "PNG", "WEBP")


class ErrorBody(BaseModel):
    error: str


WHY = {
    400: "not a photo, a truncated one, or a parameter out of its values",
    401: "missing or wrong API key",
    413: "more bytes than serve.max_bytes or pixels than serve.max_pixels",
    415: "a Content-Type or an image format other than JPEG, PNG or WebP",
    422: "a photo the tile settings cannot cover",
    500: "an unexpected failure of the server (its log has the traceback)",
    503: "the nets are not loaded yet, or the queue is full (see Retry-After)",
    504: "not answered within serve.timeout_s",
}
BINARY = {"schema": {"type": "string", "format": "binary"}}


def errors(*codes: int) -> dict:
    """The declared answers of these status codes, each with the error body."""
    return {code: {"model": ErrorBody, "description": WHY[code]} for code in codes}


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error (FastAPI's HTTPException and the router's 404/405) as `{"error": ...}`."""
    return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=e.headers)


async def bad_request(request: Request, e: RequestValidationError) -> JSONResponse:
    """A parameter out of its values: 400, naming the parameter, what was sent and what it takes."""
    first = e.errors()[0]
    name = ".".join(str(part) for part in first["loc"][1:]) or str(first["loc"][0])
    return JSONResponse({"error": f"{name}={first.get('input')}: {first['msg']}"}, status_code=400)


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


async def read_body(request: Request, max_bytes: int, room: int = 0) -> bytes:
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


def ensure_ready(batcher: Batcher) -> None:
    """503 with Retry-After until the nets are loaded and warmed up, naming why."""
    if not batcher.ready.is_set():
        raise HTTPException(
            503,
            f"the nets are not loaded{': ' + batcher.failed if batcher.failed else ' yet'}",
            headers={"Retry-After": "5"},
        )


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
        raise HTTPException(
            503, f"busy: {s.max_queue} photos are waiting (serve.max_queue)", headers={"Retry-After": "1"}
        ) from None
    except asyncio.TimeoutError:
        raise HTTPException(504, f"not answered within serve.timeout_s={s.timeout_s} s") from None
    if isinstance(cut, Failure):  # e.g. a photo that needs more tiles than the settings allow
        raise HTTPException(422, str(cut))
    return cut
