"""The server's own API: `POST /v1/cutout` (the picture a query asks for) and `POST /v1/segment` (the
mask as Kaggle RLE, with the box), behind the API key; the page (`/`), `/healthz` and `/metrics`, open.
Every parameter, body, answer and error is declared, so `/openapi.json` (and `/docs`) describe the
API as it behaves."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.formparsers import MultiPartException, MultiPartParser

from common.data.rle import rle_encode
from common.errors import ConfigError
from pipelines.picture import MEDIA, Cut, Picture, render
from pipelines.serve.batcher import Batcher
from pipelines.serve.http import BINARY, Bytes, cut_photo, ensure_ready, errors, open_upload, read_body, require_key

open_routes = APIRouter()
protected = APIRouter(dependencies=[Depends(require_key)])  # every route added here needs the API key

PAGE = Path(__file__).with_name("page.html").read_text()
T = TypeVar("T")


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


UPLOAD_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
UPLOAD = {
    "requestBody": {
        "required": True,
        "description": "the photo: the multipart field `image`, or the body itself",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"], "properties": {"image": BINARY["schema"]}}
            },
            **{kind: BINARY for kind in UPLOAD_TYPES},
        },
    }
}
ANSWERS = errors(400, 401, 408, 413, 415, 422, 500, 503, 504)
CUT_HEADERS = {
    "X-Car-Box": {"description": "x0,y0,x1,y1 of the car's box in the photo", "schema": {"type": "string"}},
    "X-Car-Found": {
        "description": "1 if stage 1 saw a car, else 0 (the box is the whole photo)",
        "schema": {"type": "string"},
    },
    "X-Seconds": {"description": "seconds from the upload read to the answer", "schema": {"type": "string"}},
}


@functools.cache
def form_parser(max_bytes: int) -> type[MultiPartParser]:
    """Starlette's multipart parser, keeping uploads up to the upload limit in memory (the class's own
    default spools files over 1 MB to disk): a subclass, so Starlette's class is left as it is."""
    return type("UploadParser", (MultiPartParser,), {"spool_max_size": max_bytes + 1})


async def read_upload(request: Request, max_bytes: int) -> Bytes:
    """The photo: the multipart field `image`, or the raw body with an image Content-Type."""
    kind = request.headers.get("content-type", "")
    if not (kind.startswith(("multipart/form-data", "image/")) or kind == "application/octet-stream"):
        raise HTTPException(
            415, "send the photo as the multipart field 'image', or as the body with an image/* Content-Type"
        )
    body = await read_body(request)
    if not kind.startswith("multipart/"):
        return body

    async def once():
        yield body

    try:
        form = await form_parser(max_bytes)(request.headers, once(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:  # a malformed envelope (what Starlette's request.form() turns into a 400 too)
        raise HTTPException(400, f"not a multipart form with the field 'image': {e.message}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "missing the multipart field 'image' (the photo file)")
    return await upload.read()


async def cut_upload(request: Request, answer: Callable[[Cut], T]) -> tuple[T, float]:
    """`answer` of the uploaded photo's cut, and the seconds from the upload read to the answer."""
    batcher: Batcher = request.app.state.batcher
    ensure_ready(batcher)
    started = time.perf_counter()
    photo = await open_upload(batcher, await read_upload(request, batcher.s.max_bytes))
    return await cut_photo(batcher, photo, answer), time.perf_counter() - started


@protected.post(
    "/v1/cutout",
    response_class=Response,
    openapi_extra=UPLOAD,
    responses={
        200: {
            "description": "the picture",
            "content": {media: BINARY for media in MEDIA.values()},
            "headers": CUT_HEADERS,
        },
        **ANSWERS,
    },
)
async def cutout(
    request: Request,
    output: Literal["rgba", "mask", "composite"] = Query(
        "rgba",
        description="rgba: the photo with the car's alpha; mask: the alpha alone; composite: the car on `background`",
    ),
    alpha: Literal["soft", "hard"] = Query(
        "soft", description="soft: the edge follows the probability; hard: 0 or 255"
    ),
    fmt: Literal["png", "webp", "jpeg"] = Query(
        "png", alias="format", description="jpeg has no alpha: not with output=rgba"
    ),
    crop: bool = Query(False, description="cut the picture to the car's box"),
    clean_edges: bool = Query(
        True, description="the soft edge in the car's own colour, not the photo's (the old background)"
    ),
    background: str = Query("white", description="composite's colour: a name such as white, or #rrggbb"),
) -> Response:
    """The car cut out of the uploaded photo."""
    try:
        picture = Picture(output, alpha, clean_edges, background, crop, fmt)
    except ConfigError as e:
        raise HTTPException(400, str(e)) from None
    (body, box, found), seconds = await cut_upload(
        request, lambda cut: (render(cut, picture, True), cut.box, cut.found)
    )
    return Response(
        body,
        media_type=picture.media_type,
        headers={"X-Car-Box": ",".join(map(str, box)), "X-Car-Found": str(int(found)), "X-Seconds": f"{seconds:.3f}"},
    )


@protected.post("/v1/segment", response_model=Segment, openapi_extra=UPLOAD, responses=ANSWERS)
async def segment(request: Request) -> JSONResponse:
    """The car mask of the uploaded photo as Kaggle RLE, with its box."""
    (rle, (height, width), box, found), seconds = await cut_upload(
        request, lambda cut: (rle_encode(cut.mask), cut.mask.shape, cut.box, cut.found)
    )
    return JSONResponse(
        {
            "width": width,
            "height": height,
            "box": list(box),
            "found": found,
            "rle_mask": rle,
            "seconds": round(seconds, 3),
        }
    )


@open_routes.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "loading, or the nets failed to load"}},
)
async def healthz(request: Request) -> JSONResponse:
    """Ready when the nets are loaded."""
    batcher: Batcher = request.app.state.batcher
    if batcher.ready.is_set():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "failed" if batcher.failed else "loading", "error": batcher.failed}, 503)


@open_routes.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus metrics",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
async def prometheus(request: Request) -> Response:
    """Requests by endpoint and status, latencies, batch sizes and the queue's depth."""
    return Response(generate_latest(request.app.state.batcher.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@open_routes.get("/", response_class=HTMLResponse)
async def page() -> str:
    """A page to drop photos on (works offline)."""
    return PAGE
