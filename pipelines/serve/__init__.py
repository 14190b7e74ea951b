"""`carvana serve`: background removal over HTTP, many clients on one device, in parts:

- `batcher`: the bounded queue and one batching task per device replica of the nets (warm-up, readiness);
- `http`: what the routes share: the error body, the body read within its limits, the API key
  dependency, the crash guard, a photo's way from bytes to a cut;
- `metrics`: Prometheus metrics and the middleware that counts every answer;
- `v1`: the server's own API (`/v1/cutout`, `/v1/segment`), the page, `/healthz`, `/metrics`;
- `v2`: the Open Inference Protocol (KServe v2), on the same batcher;
- `app`: the app put together, and uvicorn running it.

FastAPI on uvicorn (the `serve` extra): the ecosystem's standard, and the one the settings' pydantic
already belongs to. LitServe batches too, but adds a second framework and its own worker model for
what one asyncio task per device does here. Requests are decoded in a thread pool (off the event
loop) and queued. Every request is bounded before the work it costs: its body in size and time, the
uploads arriving at once, a photo's pixels and the pixels at work, the photos waiting (503 with
Retry-After when the server is full); docs/reliability.md, "Hostile input", lists the limits. Bad
input gets a 4xx with `{"error": ...}` naming the problem; nothing is written to disk. SIGTERM
(uvicorn's) stops accepting, lets the requests in flight finish within serve.shutdown_timeout_s, exits 0.
"""

from pipelines.serve.app import Server, create_app, listen, serve
from pipelines.serve.batcher import Batcher

__all__ = ["Batcher", "Server", "create_app", "listen", "serve"]
