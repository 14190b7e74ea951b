"""One run per output folder: every command that writes `output.dir` holds `<dir>/.carvana.lock`.

The lock is the kernel's (flock), so a process killed by SIGKILL or a power cut releases it with
no help; the file's text names the holder (pid, host, command, start time) for the refusal
message. Text left behind by a holder that did not release it marks a stale lock: it is taken
over with a warning. The text is rewritten in place, under the lock, never renamed: a rename
would move the lock to a new file that the next process does not share.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator

from common.errors import ConfigError, FolderBusy

LOCK_NAME = ".carvana.lock"


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str) -> Iterator[None]:
    """Hold `folder` for this process, or refuse with FolderBusy naming the holder.

    Also the check, before any work, that the folder can be written. A folder this call created
    and that holds nothing else when the command ends is removed again: a refused or failed
    command leaves no trace. Under torchrun only rank 0 takes the lock.
    """
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: the other ranks write nothing; rank 0 holds the folder
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"output folder {folder} cannot be written: {e.strerror}; set output.dir to a writable place") from None
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            raise FolderBusy(f"output folder {folder} is in use by {_holder(text)}; wait for it to finish "
                             "or use another output.dir") from None
        except OSError as e:  # a file system without locks (rare): run unprotected, say so
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{path}: the file system does not support locks ({e.strerror}); "
                          "make sure no other run writes this folder", stacklevel=3)
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if stale:
            warnings.warn(f"{folder}: taking over the lock of {_holder(stale)}, which ended without releasing it "
                          "(killed?); its finished work is kept", stacklevel=3)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        if held:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released cleanly: no stale text for the next run
        os.close(fd)  # and the kernel lock with it
        if held and created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
