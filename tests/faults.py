"""Faults injected from outside the project, for the reliability tests: a `carvana` command whose
own process gets a signal at an exact point of its work, as a crash, a `kill` or a Ctrl-C would
arrive there, never by racing it. Nothing in the project knows about it.

    python tests/faults.py --at chunk:3 [--signal KILL] [--once MARKER] -- stage2 predict ...

--at chunk:K        just before chunk K of a prediction is written
--at STAGE.epoch:N  right after epoch N's checkpoints and history of STAGE's training are written
                    (stage1.epoch:2)
--signal NAME       KILL (the default), INT (Ctrl-C), STOP, ...
--once MARKER       only while the file MARKER does not exist, and create it: a retried task passes

As a Dask preload (`distributed.worker.preload: [tests/faults.py]`, or `dask worker --preload
tests/faults.py`) it arms the worker processes with the fault in CARVANA_FAULT ("chunk:2:KILL:MARKER").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def arm(at: str, sig: str = "KILL", once: str = "") -> None:
    """Patch the chunk writer or the trainer's epoch end of this process to send `sig` to itself at `at`."""
    event, n = at.rsplit(":", 1)

    def fire() -> None:
        if once and Path(once).exists():
            return
        if once:
            Path(once).touch()
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))

    if event == "chunk":
        from common.data.chunks import ChunkStore

        write = ChunkStore.write

        def write_or_fire(store, k, rows):
            if k == int(n):
                fire()
            write(store, k, rows)

        ChunkStore.write = write_or_fire
    else:
        from common.training import trainer

        stage = event.removesuffix(".epoch")
        save_epoch = trainer.save_epoch

        def save_then_fire(run_dir, model, opt, scaler, history, *rest):
            best = save_epoch(run_dir, model, opt, scaler, history, *rest)
            if Path(run_dir).name == stage and history[-1]["epoch"] == int(n):
                fire()
            return best

        trainer.save_epoch = save_then_fire


def dask_setup(worker) -> None:
    """Dask's preload hook: arm the worker process with CARVANA_FAULT."""
    at, sig, once = os.environ["CARVANA_FAULT"].rsplit(":", 2) if os.environ.get("CARVANA_FAULT") else ("", "", "")
    if at:
        arm(at, sig, once)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at", required=True)
    parser.add_argument("--signal", default="KILL")
    parser.add_argument("--once", default="")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    arm(args.at, args.signal, args.once)
    from pipelines.cli import main as carvana

    return carvana([word for word in args.command if word != "--"])


if __name__ == "__main__":
    sys.exit(main())
