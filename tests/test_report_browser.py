"""`report/index.html` opened in a real browser (headless Chromium): every image loads and the page
has the Dice table. Skipped, with the reason, where Chromium is not installed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from helpers import copy_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.insertAdjacentHTML('beforeend', `<p id="probe">images ${ok}/${imgs.length}</p>`);
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium_with_every_image_and_the_dice_table(evaluated, tmp_path):
    from pipelines.report import write_report

    page = write_report(copy_run(evaluated[0], tmp_path / "run")).read_text()
    probe = tmp_path / "index.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    ok, total = map(int, re.search(r'id="probe">images (\d+)/(\d+)<', dom).groups())
    assert total >= 9 and ok == total  # threshold sweep, 2 learning curves, 6 overlays
    assert "<h2>Validation Dice</h2>" in dom and "stage 1 alone" in dom and "cascade" in dom
