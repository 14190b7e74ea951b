"""The one image reader and the one mask reader: files (and uploads) decoded by PIL, read as a
viewer shows them (EXIF orientation applied); every decoder failure becomes an ImageReadError
naming the file and the reason."""

from __future__ import annotations

import io
import os
import re
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.errors import ImageReadError, TooLarge, UnsupportedImage
from common.io import write_bytes

Size = tuple[int, int]  # (width, height), PIL's order
ORIENTATION = 0x0112  # the EXIF tag of how a camera stored the pixels (1: as shown; 5-8: turned by 90 degrees)


def _open(path: Path, kind: str, draft: Size | None = None) -> Image.Image:
    """Open and decode, turning every decoder failure into one ImageReadError naming the file."""
    try:
        im = Image.open(path)
        if draft is not None and im.format == "JPEG":
            im.draft("RGB", draft)
        return _load(im, kind)
    except FileNotFoundError:
        raise ImageReadError(path, f"{kind} file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(
            path, "empty file" if path.stat().st_size == 0 else f"not a readable {kind} ({e})"
        ) from None


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


# a phone's MPO is a JPEG with more pictures after the first (depth maps, previews): its first is the photo
SAME_AS = {"MPO": "JPEG"}
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP")  # what an uploaded photo (or one given as bytes) may be


def open_photo(
    data: bytes | bytearray | memoryview, name: str, formats: tuple[str, ...], max_pixels: int
) -> Image.Image:
    """An uploaded photo opened, its header read and checked, no pixel decoded yet (`decoded` decodes it):
    ImageReadError naming `name` for anything but an image of `formats`; TooLarge for one of more than
    `max_pixels` (a decompression bomb: a blank 12000x12000 PNG is 140 kB). The messages quote nothing
    of the process (PIL's own name the in-memory file by its address)."""
    if not data:
        raise ImageReadError(name, "empty upload")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise TooLarge(name, "more pixels than PIL decodes (a decompression bomb)") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageReadError(name, f"not an image (send {', '.join(formats)})") from None
    kind = SAME_AS.get(im.format, im.format)
    if kind not in formats:
        raise UnsupportedImage(name, f"{im.format} is not supported; send {', '.join(formats)}")
    if im.width * im.height > max_pixels:
        raise TooLarge(name, f"{im.width}x{im.height} is more than serve.max_pixels={max_pixels} pixels")
    return im


def decoded(im: Image.Image, name: str) -> np.ndarray:
    """An image `open_photo` opened, decoded as `read_image` reads a file: uint8 HWC RGB, EXIF
    orientation applied; ImageReadError naming `name` if its data is broken."""
    try:
        return np.array(_rgb(_load(im, "image")))
    except Image.DecompressionBombError:
        raise TooLarge(name, "more pixels than PIL decodes (a decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(name, f"not a readable image ({address_free(e)})") from None


def decode_photo(data: bytes, name: str, formats: tuple[str, ...], max_pixels: int) -> np.ndarray:
    """An uploaded photo as uint8 HWC RGB: `open_photo`, then `decoded`."""
    return decoded(open_photo(data, name, formats, max_pixels), name)


def address_free(text: object, instead: str = "the upload") -> str:
    """A message without the repr of an in-memory object (`<_io.BytesIO object at 0x...>`): no address
    reaches a client."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", instead, str(text))


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
        raise ImageReadError(path, f"mask is {im.size[0]}x{im.size[1]}, image is {expect_size[0]}x{expect_size[1]}")
    if im.mode not in ("P", "L", "1"):
        im = im.convert("L")
    arr = np.asarray(im)
    if arr.dtype == bool:
        values = np.flatnonzero(np.bincount(arr.ravel().view(np.uint8), minlength=2))
    else:
        values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    if values.size and not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        raise ImageReadError(path, f"mask values {values[:6].tolist()} are not {{0,1}} or {{0,255}}")
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
