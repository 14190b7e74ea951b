"""The project's one logger, set up once: progress lines go to stdout from rank 0 only (as torchvision's
`setup_for_distributed` silences the other ranks), warnings and errors to stderr from every rank.

Under torchrun the rank is in the environment before Python starts, so the filter is fixed at import.
"""

from __future__ import annotations

import logging
import os
import sys


class _Console(logging.Handler):
    """Writes to the current sys.stdout / sys.stderr (not the ones at import: redirects and pytest's capture see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        stream.write(self.format(record) + "\n")
        stream.flush()  # a killed run has printed what it finished


_RANK = int(os.environ.get("RANK", "0"))


def _rank_zero(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or _RANK == 0


log = logging.getLogger("carvana")
if not log.handlers:
    _handler = _Console()
    _handler.addFilter(_rank_zero)
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False
