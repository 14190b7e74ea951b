"""The app and its server: `create_app` puts the parts together (the batcher, the routers of /v1 and
/v2, the middleware and the error handlers), `serve` runs it on uvicorn (`server_config`: every read
with a deadline, a bounded drain on SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.config import Settings
from common.errors import ConfigError
from common.log import log
from common.model_source import ModelSource
from pipelines.serve.batcher import Batcher
from pipelines.serve.http import CrashGuard, bad_request, http_error
from pipelines.serve.metrics import CountRequests, Metrics
from pipelines.serve.v1 import open_routes as v1_open
from pipelines.serve.v1 import protected as v1_protected
from pipelines.serve.v2 import open_routes as v2_open
from pipelines.serve.v2 import protected as v2_protected


def create_app(cfg: Settings, source: ModelSource) -> FastAPI:
    """The app, the source's nets loading in a thread at start-up; `carvana serve` runs it on uvicorn,
    the tests in process."""
    s = cfg.serve
    key = os.environ.get(s.api_key_env, "") if s.api_key_env else ""
    if s.api_key_env and not key:
        raise ConfigError(f"serve.api_key_env={s.api_key_env}, but that environment variable is empty or unset")
    batcher = Batcher(cfg, source, Metrics(s.max_batch))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        opening = asyncio.create_task(batcher.open())  # not awaited: the server answers (503) while the nets load
        yield
        opening.cancel()
        batcher.stop()  # uvicorn has let the requests in flight finish

    app = FastAPI(
        title="carvana serve",
        summary="Cut the car out of studio photos: the two-stage Carvana cascade",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.api_key, app.state.uploads = batcher, key, 0
    app.add_exception_handler(StarletteHTTPException, http_error)  # FastAPI's HTTPException and the router's 404/405
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_middleware(CrashGuard)
    if s.allowed_hosts:  # against DNS rebinding: a page whose name comes to point at this server
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=s.allowed_hosts)
    app.add_middleware(
        CountRequests, metrics=batcher.metrics
    )  # added last, so outermost: it counts the crash guard's 500s
    for router in (v1_open, v1_protected, v2_open, v2_protected):
        app.include_router(router)
    return app


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that the log can say the port it got (`--port 0`: any free
    one); IPv4 or IPv6 as the host resolves (`--host ::` listens on both where the system allows)."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][
            0
        ]  # "": all
        return socket.create_server(
            (host, port), family=family, dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6()
        )
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None


class HeadersDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on the headers: a connection whose next request's
    headers have not arrived within `seconds` of its opening (or of its last answer), or that still
    sends the body of a request already answered, is closed. uvicorn bounds the idle wait between
    requests (timeout_keep_alive) but not a request's headers sent a byte at a time; a body the app
    reads has the app's own deadline (`read_body`)."""

    seconds: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and not self.cycle.response_complete:  # a request's headers arrived
            self.headers_timer.cancel()

    def on_response_complete(self) -> None:
        self._deadline()  # first: the base class may start reading a pipelined request at once
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.headers_timer.cancel()
        super().connection_lost(exc)

    def _deadline(self) -> None:
        if getattr(self, "headers_timer", None) is not None:
            self.headers_timer.cancel()
        self.headers_timer = self.loop.call_later(self.seconds, self._expire)

    def _expire(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def server_config(app: FastAPI) -> uvicorn.Config:
    """uvicorn's settings for the app: its HTTP/1.1 protocol with a deadline on headers
    (serve.read_timeout_s) and the drain after SIGTERM bounded (serve.shutdown_timeout_s)."""
    s = app.state.batcher.s
    protocol = type("HeadersDeadline", (HeadersDeadline,), {"seconds": float(s.read_timeout_s)})
    return uvicorn.Config(app, log_level="warning", http=protocol, timeout_graceful_shutdown=s.shutdown_timeout_s)


def on_loopback(sock: socket.socket) -> bool:
    """Whether the server's socket takes connections from this machine only."""
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


class Server(uvicorn.Server):
    """uvicorn's server, which tells its app's batcher to stop when a signal stops it, so
    /v2/health/ready answers 503 while uvicorn lets the requests in flight finish. (uvicorn closes the
    listening socket at its next tick, within 0.1 s: after that a probe's connection is refused, not
    ready either.)"""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.config.app.state.batcher.stopping.set()
        super().handle_exit(sig, frame)


def serve(cfg: Settings, source: ModelSource, host: str, port: int) -> int:
    app = create_app(cfg, source)
    sock = listen(host, port)
    if not app.state.api_key and not on_loopback(sock):
        log.warning(
            f"serve: listening on {host or 'every interface'} without an API key: whoever reaches this port can use "
            "the nets; set serve.api_key_env (docs/reliability.md, Hostile input)"
        )
    address = f"[{host}]" if ":" in host else host or "0.0.0.0"
    log.info(
        f"serve: http://{address}:{sock.getsockname()[1]}/ (the page), POST /v1/cutout, /v1/segment; the Open "
        "Inference Protocol under /v2; GET /healthz, /metrics, /docs"
    )
    # uvicorn drains on SIGTERM, then raises it again under the handler it found: this one, so a
    # drained server exits 0 instead of dying by the signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(server_config(app)).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    cut_off = app.state.batcher.metrics.cut_off
    if cut_off:
        log.warning(f"serve: stopped; {cut_off} request(s) unanswered after serve.shutdown_timeout_s were cut off")
    else:
        log.info("serve: stopped; every request it accepted was answered")
    return 0
