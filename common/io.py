"""Files: the one image reader, the one mask reader and the one atomic writer; the output folder's
lock (one run per folder); and the test-only fault points that stop a run at an exact place.

The lock is the kernel's (flock), so a process killed by SIGKILL or a power cut releases it with
no help; the lock file's text names the holder (pid, host, command, start time) for the refusal
message. Text left behind by a holder that did not release it marks a stale lock: it is taken
over with a warning. The text is rewritten in place, under the lock, never renamed: a rename
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
import signal
import socket
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from common.errors import ConfigError, FolderBusy, ImageReadError, OutputError, TooLarge, UnsupportedImage

Size = tuple[int, int]  # (width, height), PIL's order
ORIENTATION = 0x0112  # the EXIF tag of how a camera stored the pixels (1: as shown; 5-8: turned by 90 degrees)


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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, OutputError) or e.errno not in PLACE_ERRORS | {errno.EEXIST}:
            raise
        cause = "a file is in the way of its folder" if e.errno in (errno.EEXIST, errno.ENOTDIR) else os.strerror(e.errno)
        raise OutputError(e.errno, f"cannot write {path}: {cause}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


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


def _open(path: Path, kind: str, draft: Size | None = None) -> Image.Image:
    """Open and decode, turning every decoder failure into one ImageReadError naming the file."""
    try:
        im = Image.open(path)
        if draft is not None and im.format == "JPEG":
            im.draft("RGB", draft)
        return _load(im, kind)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: {kind} file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "empty file" if path.stat().st_size == 0 else f"not a readable {kind} ({e})"
        raise ImageReadError(f"{path}: {reason}") from None


def _load(im: Image.Image, kind: str) -> Image.Image:
    im.load()
    if kind == "image":  # a phone photo stored sideways is turned as a viewer shows it
        ImageOps.exif_transpose(im, in_place=True)
    return im


def _rgb(im: Image.Image) -> Image.Image:
    return im if im.mode == "RGB" else im.convert("RGB")


def read_image(path: str | os.PathLike, size: Size | None = None) -> np.ndarray:
    """Read an image as uint8 HWC RGB, optionally resized to `size` (w, h).

    For JPEGs shrunk by 2x or more the decoder downscales while decoding (`draft`), which is
    several times faster than decoding at full size and resizing.
    """
    path = Path(path)
    im = _rgb(_open(path, "image", draft=size))
    if size is not None and im.size != tuple(size):
        im = im.resize(tuple(size), Image.BILINEAR)
    return np.array(im)  # writable, so torch can wrap it without a copy warning


def decode_photo(data: bytes, name: str, formats: tuple[str, ...], max_pixels: int) -> np.ndarray:
    """An uploaded photo as uint8 HWC RGB, as `read_image` reads a file. ImageReadError naming `name`
    for anything but a whole image of `formats`; TooLarge, before any pixel is decoded, for one of
    more than `max_pixels` (a decompression bomb: a blank 12000x12000 PNG is 140 kB)."""
    if not data:
        raise ImageReadError(f"{name}: empty upload")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise TooLarge(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{name}: not an image ({e})") from None
    if im.format not in formats:
        raise UnsupportedImage(f"{name}: {im.format} is not supported; send {', '.join(formats)}")
    if im.width * im.height > max_pixels:
        raise TooLarge(f"{name}: {im.width}x{im.height} is more than serve.max_pixels={max_pixels} pixels")
    try:
        return np.array(_rgb(_load(im, "image")))
    except Image.DecompressionBombError as e:
        raise TooLarge(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{name}: not a readable image ({e})") from None


def image_size(path: str | os.PathLike) -> Size:
    """(width, height) as `read_image` gives the image (EXIF orientation applied), from the file
    header, without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size[::-1] if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8) else im.size
    except (OSError, SyntaxError, ValueError):
        return _open(path, "image").size  # decodes, so the error names the reason


def read_mask(path: str | os.PathLike, expect_size: Size | None = None) -> np.ndarray:
    """Read a Kaggle mask (GIF or PNG, values {0,1} or {0,255}) as bool HW.

    `expect_size` is the size of the matching image; a mask of another size is an error.
    """
    path = Path(path)
    im = _open(path, "mask")
    if expect_size is not None and im.size != tuple(expect_size):
        raise ImageReadError(f"{path}: mask is {im.size[0]}x{im.size[1]}, image is {expect_size[0]}x{expect_size[1]}")
    if im.mode not in ("P", "L", "1"):
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.dtype == bool:
        values = np.flatnonzero(np.bincount(arr.ravel().view(np.uint8), minlength=2))
    else:
        values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    if values.size and not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        raise ImageReadError(f"{path}: mask values {values[:6].tolist()} are not {{0,1}} or {{0,255}}")
    return arr > 0


def read_mask_cached(path: str | os.PathLike, cache: str | os.PathLike) -> np.ndarray:
    """`read_mask`, kept after the first read as a compact file in `cache` (bits, deflated: a few kB
    for a Kaggle GIF that takes ~10 ms to decode). The cache file's name holds the mask's size and
    modification time, so an edited mask is read again; it is written atomically, so concurrent
    loader workers and killed runs leave only whole files."""
    path = Path(path)
    st = path.stat()
    cached = Path(cache) / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}.bits"
    if cached.is_file():
        data = cached.read_bytes()
        height, width = np.frombuffer(data[:8], dtype="<u4")
        bits = np.frombuffer(zlib.decompress(data[8:]), dtype=np.uint8)
        return np.unpackbits(bits, count=int(height) * int(width)).reshape(int(height), int(width)).view(bool)
    mask = read_mask(path)
    header = np.array(mask.shape, dtype="<u4").tobytes()
    write_bytes(cached, header + zlib.compress(np.packbits(mask).tobytes(), 1))
    return mask


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


# --- fault points, for tests
#
# CARVANA_TEST_KILL_AT=EVENT:N[:MARKER] sends the process a signal (CARVANA_TEST_KILL_SIGNAL: KILL by
# default, or INT, STOP, ...) when `kill_point(EVENT, N)` runs: "chunk:3" just before chunk 3 of a
# prediction is written, "stage2.epoch:1" right after epoch 1's checkpoints and history of the
# stage-2 training run are written. With MARKER it fires only while the file MARKER does not
# exist, and creates it (so a retried task passes). Unset, it costs one dictionary lookup: tests
# stop a run at an exact point, never by racing it.

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
