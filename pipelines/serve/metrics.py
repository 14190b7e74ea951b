"""What `/metrics` shows (Prometheus): requests by route and status with their latency, photos per
device step, the queue's depth, the uploads arriving and the pixels in flight. `CountRequests` counts
every answer, whatever answered it."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()  # one per app: tests run several in one process
        self.requests = Counter("carvana_requests", "requests answered", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "carvana_request_seconds", "time from request to answer", ["endpoint"], registry=self.registry
        )
        self.batch = Histogram(
            "carvana_batch_size",
            "photos per device step",
            registry=self.registry,
            buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch}),
        )
        self.queue = Gauge(
            "carvana_queue_depth", "photos accepted and not yet through the device", registry=self.registry
        )
        self.uploads = Gauge("carvana_uploads_arriving", "request bodies being received", registry=self.registry)
        self.cut_off = 0  # requests cancelled unanswered: the drain after SIGTERM ran out (serve.shutdown_timeout_s)
        self.pixels = Gauge(
            "carvana_pixels_in_flight", "pixels of the photos decoded and not yet answered", registry=self.registry
        )


class CountRequests:
    """ASGI middleware: each answer counted under its route's path template (`/v2/models/{name}/infer`,
    whatever the name; `other` where no route matched) and its status, with its latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            self.metrics.cut_off += 1
            raise
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")  # set by the router on the scope it was given
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
