"""File I/O: the one image reader, the one mask reader and the one atomic writer."""
from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import zlib
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from common.errors import ImageReadError, OutputError

Size = tuple[int, int]  # (width, height), PIL's order


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
        im.load()
        return im
    except FileNotFoundError:
        raise ImageReadError(f"{path}: {kind} file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "empty file" if path.stat().st_size == 0 else f"not a readable {kind} ({e})"
        raise ImageReadError(f"{path}: {reason}") from None


def read_image(path: str | os.PathLike, size: Size | None = None) -> np.ndarray:
    """Read an image as uint8 HWC RGB, optionally resized to `size` (w, h).

    For JPEGs shrunk by 2x or more the decoder downscales while decoding (`draft`), which is
    several times faster than decoding at full size and resizing.
    """
    path = Path(path)
    im = _open(path, "image", draft=size)
    if im.mode != "RGB":
        im = im.convert("RGB")
    if size is not None and im.size != tuple(size):
        im = im.resize(tuple(size), Image.BILINEAR)
    return np.array(im)  # writable, so torch can wrap it without a copy warning


def image_size(path: str | os.PathLike) -> Size:
    """(width, height) from the file header, without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
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
