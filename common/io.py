"""Files: the one atomic writer (bytes, text, CSV, checkpoints, figures) and the output folder's
lock (one run per folder).

The lock is the kernel's (flock), so a process killed by SIGKILL or a power cut releases it with
no help; the lock file's text names the holder (pid, host, command, start time) for the refusal
message. Text left behind by a holder that did not release it marks a stale lock: it is taken
over with a warning. The lock file is opened without following a symbolic link, and must be a
regular file. The text is rewritten in place, under the lock, never renamed: a rename
would move the lock to a new file that the next process does not share.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import io
import json
import os
import secrets
import socket
import stat
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from common.errors import ConfigError, FolderBusy, OutputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# Failures of the place, not of the program: reported as one line naming the file, no traceback.
PLACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EFBIG}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    A reader (or the next pipeline step) then never sees a half-written file, even after SIGKILL;
    a write that fails (full disk) leaves no file at `path` and no temporary one, and raises
    OutputError naming `path` and the cause.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_file(path.parent, f".{path.name}.", ".tmp")
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, OutputError) or e.errno not in PLACE_ERRORS | {errno.EEXIST}:
            raise
        cause = (
            "a file is in the way of its folder" if e.errno in (errno.EEXIST, errno.ENOTDIR) else os.strerror(e.errno)
        )
        raise OutputError(e.errno, f"cannot write {path}: {cause}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file of a name no other writer has, with the permissions the umask gives any new
    file (0644 under the usual 022; `tempfile.mkstemp` would make every output 0600, unreadable to a
    group that shares the results)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue  # another writer drew the same name: draw again


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a DataFrame as CSV; `.gz` paths are gzipped with a fixed header so reruns are byte-identical."""
    text = frame.to_csv(index=False).encode()
    if str(path).endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
            gz.write(text)
        text = buf.getvalue()
    write_bytes(path, text)


def save_torch(path: str | os.PathLike, obj) -> None:
    """torch.save, atomically. Serialised in memory first: torch's own file writer turns a full
    disk into a RuntimeError without the cause, a Python write keeps the OSError."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """A matplotlib figure as a PNG, atomically. Figures are made with `matplotlib.figure.Figure`,
    never pyplot: no backend, no global state, safe in any thread."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")


# --- the output folder's lock

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
        # never through a link: a lock planted as a link to another file would have that file truncated
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; the lock is never taken through one: remove it") from None
        raise ConfigError(
            f"output folder {folder} cannot be written: {e.strerror}; set output.dir to a writable place"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is not a regular file; the lock is taken on a file only: remove it")
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            raise FolderBusy(
                f"output folder {folder} is in use by {_holder(text)}; wait for it to finish or use another output.dir"
            ) from None
        except OSError as e:  # a file system without locks (rare): run unprotected, say so
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(
                f"{path}: the file system does not support locks ({e.strerror}); make sure no other run writes this "
                "folder",
                stacklevel=3,
            )
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if stale:
            warnings.warn(
                f"{folder}: taking over the lock of {_holder(stale)}, which ended without releasing it (killed?); its "
                "finished work is kept",
                stacklevel=3,
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
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
