"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) beside /v1: what model servers' clients
(tritonclient, KServe's) and Kubernetes probes speak, on the same batcher as /v1.

One model, named as its source says (a bundle's name, else `carvana`). Its input `image` is the encoded
photo (BYTES, shape [1]); its outputs are `mask` (UINT8 [H, W], 1 on the car, 0 elsewhere:
`/v1/segment`'s mask) and, only when a request names it, `rgba` (BYTES [1]: the PNG `/v1/cutout` answers
by default, soft alpha). Tensors travel in JSON (a BYTES element as a base64 string) or with the binary
data extension. Every error is the protocol's `{"error": ...}` with the status /v1 gives the same fault.

A request is bounded before it costs anything: its JSON is counted (values) before it is parsed, and
parsed off the event loop into a closed schema (lengths capped, unknown keys dropped); the JSON part of
a binary request is small; a mask goes out as JSON numbers only for a photo of a few megapixels.
"""

from __future__ import annotations

import base64
import binascii
import functools
import struct
from importlib.metadata import version
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.picture import Cut, Picture, render
from pipelines.serve.batcher import Batcher
from pipelines.serve.http import (
    BINARY,
    Bytes,
    ErrorBody,
    cut_photo,
    ensure_ready,
    errors,
    open_upload,
    read_body,
    require_key,
)

TAGS = ["Open Inference Protocol (KServe v2)"]
open_routes = APIRouter(prefix="/v2", tags=TAGS)  # metadata and the probes
protected = APIRouter(prefix="/v2", tags=TAGS, dependencies=[Depends(require_key)])  # inference needs the API key

MAX_HEAD = 64 * 1024  # bytes of JSON before a binary request's data: tritonclient's are a few hundred
MAX_VALUES = 1000  # JSON values of a request: one input, two outputs and their parameters are a few dozen
JSON_MASK_PIXELS = 2048 * 2048  # a larger mask goes out as binary data only (as JSON, 2 bytes a pixel and a list)
MEDIA_TYPES = ("application/json", "application/octet-stream")  # none at all too: tritonclient sends none


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]  # -1: any length


INPUT_TENSORS = [TensorMetadata(name="image", datatype="BYTES", shape=[1])]
OUTPUT_TENSORS = [
    TensorMetadata(name="mask", datatype="UINT8", shape=[-1, -1]),
    TensorMetadata(name="rgba", datatype="BYTES", shape=[1]),
]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class _Strict(BaseModel):
    """Types as the protocol's JSON gives them: "1" is no integer, 1 no boolean; keys this server does not
    read (other parameters) are dropped, not kept."""

    model_config = ConfigDict(strict=True, extra="ignore")


class InputParameters(_Strict):
    binary_data_size: int | None = Field(None, ge=0)  # the binary data extension: the input's bytes after the JSON


class OutputParameters(_Strict):
    binary_data: bool | None = None  # this output as binary data (else as the request's binary_data_output says)


class RequestParameters(_Strict):
    binary_data_output: bool = False  # every output as binary data


class RequestInput(_Strict):
    name: str = Field(max_length=64)
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: InputParameters = Field(default_factory=InputParameters)
    data: list[str] | None = Field(None, max_length=1)  # the one BYTES element, as a base64 string


class RequestOutput(_Strict):
    name: str = Field(max_length=64)
    parameters: OutputParameters = Field(default_factory=OutputParameters)


class InferenceRequest(_Strict):
    id: str | None = Field(None, max_length=256)
    parameters: RequestParameters = Field(default_factory=RequestParameters)
    inputs: list[RequestInput] = Field(max_length=4)
    outputs: list[RequestOutput] | None = Field(None, max_length=4)  # none named: `mask` alone


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, int] | None = None  # binary_data_size, for an output sent as binary data
    data: list[Any] | None = None  # row-major; a BYTES element as a base64 string


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[ResponseOutput]


def _inlined(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its nested models written in place: a request body declared in
    /openapi.json cannot point into the schema's own `$defs`."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            return (
                inline(defs[node["$ref"].rsplit("/", 1)[1]])
                if "$ref" in node
                else {k: inline(v) for k, v in node.items()}
            )
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


NOT_READY = {
    "model": ErrorBody,
    "description": "the nets are not loaded and warmed up yet, or failed to load, or (server) draining",
}
UNKNOWN = {
    404: {
        "model": ErrorBody,
        "description": "no model of that name here (GET /v2/models/{name} of the served one answers 200)",
    }
}


def _model(request: Request, name: str) -> None:
    """404 unless `name` is the served model's."""
    served = request.app.state.batcher.name
    if name != served:
        raise HTTPException(404, f"unknown model '{name}': this server serves '{served}'")


@open_routes.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(name="carvana-cascade", version=version("carvana-cascade"), extensions=["binary_tensor_data"])


@open_routes.get("/health/live", response_model=Live)
async def server_live() -> Live:
    """Live while the process answers (Kubernetes' liveness probe)."""
    return Live(live=True)


@open_routes.get("/health/ready", response_model=Ready, responses={503: NOT_READY})
async def server_ready(request: Request) -> Ready:
    """Ready once the nets are loaded and warmed up, until SIGTERM (Kubernetes' readiness probe): not
    ready is 503, as KServe answers (the protocol says 4xx; clients and probes read any non-200 as not
    ready), with the reason in `{"error": ...}`."""
    if request.app.state.batcher.stopping.is_set():
        raise HTTPException(503, "draining: the server is stopping and finishing the requests in flight")
    ensure_ready(request.app.state.batcher)
    return Ready(ready=True)


@open_routes.get("/models/{name}", response_model=ModelMetadata, responses=UNKNOWN)
async def model_metadata(request: Request, name: str) -> ModelMetadata:
    """The model's input and outputs, with their datatypes and shapes."""
    _model(request, name)
    return ModelMetadata(name=name, platform="pytorch", inputs=INPUT_TENSORS, outputs=OUTPUT_TENSORS)


@open_routes.get("/models/{name}/ready", response_model=ModelReady, responses={**UNKNOWN, 503: NOT_READY})
async def model_ready(request: Request, name: str) -> ModelReady:
    """Ready once its nets are loaded and warmed up (draining or not: the requests in flight use them)."""
    _model(request, name)
    ensure_ready(request.app.state.batcher)
    return ModelReady(name=name, ready=True)


def _parsed(body: Bytes, header_length: int | None) -> tuple[InferenceRequest, Bytes, dict[str, bool]]:
    """The request read (on a host thread): the inference request, the encoded photo and the outputs wanted."""
    inference, binary = _request(body, header_length)
    return inference, _photo(inference, binary), _wanted(inference)


def _request(body: Bytes, header_length: int | None) -> tuple[InferenceRequest, Bytes]:
    """The inference request and the binary data after its JSON (with Inference-Header-Content-Length).
    The JSON's values are counted before it is parsed: a body of `[{},{},...]` would take tens of bytes
    of memory per byte to parse."""
    if header_length is not None and header_length > len(body):
        raise HTTPException(400, f"Inference-Header-Content-Length={header_length}, but the body has {len(body)} bytes")
    if header_length is not None and header_length > MAX_HEAD:
        raise HTTPException(
            413, f"Inference-Header-Content-Length={header_length}: the JSON of a binary request is at most {MAX_HEAD}"
        )
    view = memoryview(body)  # the binary part is a view of the body, not a copy
    head, binary = (body, b"") if header_length is None else (bytes(view[:header_length]), view[header_length:])
    if sum(head.count(c) for c in (b"{", b"[", b",")) > MAX_VALUES:  # base64 has none of them
        raise HTTPException(
            400, f"not an inference request of this model: more than {MAX_VALUES} JSON values (it has a few dozen)"
        )
    try:
        return InferenceRequest.model_validate_json(head), binary
    except ValidationError as e:
        first = e.errors()[0]
        raise HTTPException(
            400, f"not an inference request: {'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}"
        ) from None


def _photo(request: InferenceRequest, binary: Bytes) -> Bytes:
    """The encoded photo: the one input `image`, BYTES of shape [1], a base64 string in JSON or one
    binary element (its 4-byte little-endian length, then the bytes)."""
    names = [tensor.name for tensor in request.inputs]
    if names != ["image"]:
        raise HTTPException(400, f"inputs {names}: this model takes one input, 'image' (the encoded photo)")
    image = request.inputs[0]
    if image.datatype != "BYTES" or image.shape != [1]:
        raise HTTPException(
            400, f"input 'image' is {image.datatype} {image.shape}: it is BYTES [1] (the encoded photo)"
        )
    size = image.parameters.binary_data_size
    if size is None:
        if binary:
            raise HTTPException(400, f"{len(binary)} bytes of binary data, but input 'image' has no binary_data_size")
        if not (image.data and len(image.data) == 1 and isinstance(image.data[0], str)):
            raise HTTPException(
                400, "input 'image' needs its data: one base64 string, or binary_data_size and the binary data"
            )
        try:
            photo = base64.b64decode(image.data[0], validate=True)
        except binascii.Error as e:
            raise HTTPException(400, f"input 'image': its data is not base64 ({e})") from None
    else:
        if size != len(binary):
            raise HTTPException(
                400, f"input 'image' has binary_data_size={size}, but {len(binary)} bytes follow the JSON"
            )
        length = struct.unpack_from("<I", binary)[0] if size >= 4 else -1
        if length != size - 4:
            raise HTTPException(
                400,
                f"input 'image': its binary data ({size} bytes) is not one BYTES element (a 4-byte little-endian "
                "length, then that many bytes)",
            )
        photo = binary[4:]
    return photo  # open_upload checks its size against serve.max_bytes


def _wanted(request: InferenceRequest) -> dict[str, bool]:
    """The outputs to answer, each with whether it goes as binary data."""
    binary = request.parameters.binary_data_output
    asked = request.outputs or [RequestOutput(name="mask")]
    known = [tensor.name for tensor in OUTPUT_TENSORS]
    for output in asked:
        if output.name not in known:
            raise HTTPException(400, f"output '{output.name}': this model's outputs are {known}")
    return {
        output.name: binary if output.parameters.binary_data is None else output.parameters.binary_data
        for output in asked
    }


def _encoded(cut: Cut, name: str) -> tuple[str, list[int], bytes]:
    """An output's datatype, shape and bytes, as the binary data extension carries them."""
    if name == "mask":
        return (
            "UINT8",
            list(cut.mask.shape),
            cut.mask.view(np.uint8).tobytes(),
        )  # row-major, 1 on the car (bool as bytes, no copy)
    png = render(cut, Picture(), fast=True)  # /v1/cutout's default answer
    return "BYTES", [1], struct.pack("<I", len(png)) + png


def _answer(cut: Cut, wanted: dict[str, bool], model: str, request_id: str | None) -> Response:
    """The inference response: JSON, or its JSON followed by the outputs asked for as binary data."""
    outputs, blobs = [], []
    for name, binary in wanted.items():
        datatype, shape, raw = _encoded(cut, name)
        output = ResponseOutput.model_construct(
            name=name, datatype=datatype, shape=shape
        )  # not checked: millions of ints
        if binary:
            output.parameters = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            output.data = list(raw) if datatype == "UINT8" else [base64.b64encode(raw[4:]).decode()]
        outputs.append(output)
    head = (
        InferenceResponse(model_name=model, id=request_id, outputs=outputs).model_dump_json(exclude_none=True).encode()
    )
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "the inference request as JSON, or (binary data extension, with "
        "Inference-Header-Content-Length) its JSON followed by the binary data of its inputs",
        "content": {"application/json": {"schema": _inlined(InferenceRequest)}, "application/octet-stream": BINARY},
    }
}
HEADER_LENGTH = {
    "Inference-Header-Content-Length": {
        "description": "the bytes of JSON before the binary data",
        "schema": {"type": "string"},
    }
}
INFER_ANSWERS = {
    200: {
        "model": InferenceResponse,
        "description": "the outputs: JSON, or JSON then binary data",
        "content": {"application/octet-stream": BINARY},
        "headers": HEADER_LENGTH,
    },
    400: {"model": ErrorBody, "description": "not an inference request of this model, or not a photo"},
    **UNKNOWN,
    415: {
        "model": ErrorBody,
        "description": "a Content-Type other than JSON or octet-stream, an image format other than JPEG, PNG or "
        "WebP, or a Content-Encoding",
    },
    **errors(401, 408, 413, 422, 500, 503, 504),
}


@protected.post("/models/{name}/infer", response_class=Response, openapi_extra=INFER_BODY, responses=INFER_ANSWERS)
async def infer(
    request: Request,
    name: str,
    header_length: int | None = Header(
        None,
        alias="Inference-Header-Content-Length",
        ge=0,
        description="the binary data extension: the bytes of JSON before the binary data",
    ),
) -> Response:
    """The car's mask (and, when asked for, its cutout) of the photo in input `image`."""
    batcher: Batcher = request.app.state.batcher
    # read to its end first (within its limits), so that a client still sending sees the answer, not a
    # reset connection
    body = await read_body(request)
    _model(request, name)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in MEDIA_TYPES:  # a form or text/plain: what a web page may send without asking
        raise HTTPException(415, f"Content-Type {kind[:100]}: send application/json or application/octet-stream")
    ensure_ready(batcher)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise HTTPException(
            415, f"Content-Encoding {request.headers['content-encoding'][:100]}: send the request uncompressed"
        )
    inference, data, wanted = await batcher.on_host(_parsed, body, header_length)
    del body
    photo = await open_upload(batcher, data)
    if wanted.get("mask") is False and photo.width * photo.height > JSON_MASK_PIXELS:
        raise HTTPException(
            400,
            f"output 'mask' of a {photo.width}x{photo.height} photo as JSON would be {photo.width * photo.height} "
            f"numbers: ask for it as binary data (its parameters.binary_data: true), as JSON up to {JSON_MASK_PIXELS} "
            "pixels",
        )
    return await cut_photo(
        batcher, photo, functools.partial(_answer, wanted=wanted, model=name, request_id=inference.id)
    )
