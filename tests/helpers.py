"""What several test modules share: a server run as `carvana serve` runs it, and headless Chromium."""

from __future__ import annotations

import contextlib
import shutil
import threading
from typing import Iterator

import pytest

from common.config import Settings
from common.model_source import ModelSource

CHROMEDRIVER = shutil.which("chromedriver")
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMEDRIVER is None, reason="Chromium's driver is not installed (apt-get install chromium chromium-driver)"
)


@contextlib.contextmanager
def serving(cfg: Settings, source: ModelSource) -> Iterator[str]:
    """`carvana serve` of `source` with `cfg`, on a port of its own (nothing else can take it), once its
    nets are warmed up; yields the base URL."""
    import uvicorn

    from pipelines.serve import create_app, listen

    app, sock = create_app(cfg, source), listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        batcher = app.state.batcher
        assert batcher.ready.wait(300), batcher.failed or "the server did not warm up"  # a bound, not a speed
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900):
    """Headless Chromium driven by selenium, its window `width` x `height` CSS pixels."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    options = webdriver.ChromeOptions()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        browser.set_window_size(width, height)
        yield browser
    finally:
        browser.quit()
