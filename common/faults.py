"""Test-only fault injection: stop the process at an exact point of a run, never by racing it.

CARVANA_TEST_KILL_AT=EVENT:N[:MARKER] sends the process a signal (CARVANA_TEST_KILL_SIGNAL: KILL by
default, or INT, STOP, ...) when `kill_point(EVENT, N)` runs: "chunk:3" just before chunk 3 of a
prediction is written, "stage2.epoch:1" right after epoch 1's checkpoints and history of the
stage-2 training run are written. With MARKER it
fires only while the file MARKER does not exist, and creates it (so a retried task passes).
Unset, it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_point(event: str, n: int) -> None:
    spec = os.environ.get("CARVANA_TEST_KILL_AT")
    if not spec:
        return
    at_event, at, *marker = spec.split(":", 2)
    if at_event != event or int(at) != n or (marker and Path(marker[0]).exists()):
        return
    if marker:
        Path(marker[0]).touch()
    os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("CARVANA_TEST_KILL_SIGNAL", "KILL")))
