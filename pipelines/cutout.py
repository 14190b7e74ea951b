"""`carvana cutout PHOTOS... --out DIR`: background removal for any photos with the trained cascade.

Photos are JPEG, PNG or WebP files of any name and size (folders are searched); stage 1 finds each
car's box on the fly (photos are no data set, so nothing is cached), the refiner works on tiles of
it. Photos are read as a viewer shows them (EXIF orientation applied). For each photo NAME:
`NAME_mask.png` (8-bit, 0/255, the photo's size), `NAME.png` (RGBA, the background transparent; with
`--alpha soft`, the default, the car's edge semi-transparent as the cascade's probability says) and
with `--composite COLOUR` `NAME_on_COLOUR.jpg`. Every file is written atomically; a photo whose
outputs all exist is skipped; an unreadable photo goes to `DIR/errors.csv` and the command exits 1
after finishing the rest.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor

from common.config import Settings
from common.errors import ConfigError
from common.io import atomic_path, read_image, write_csv
from common.log import log
from common.model import pick_device
from common.predictor import mask_threshold, to_host
from stage2_fullres.predict import Cascade

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
EDGE_BAND = 2  # pixels either side of the mask's boundary where a soft alpha follows the probability


def soft_alpha(prob: torch.Tensor, threshold: float, band: int = EDGE_BAND) -> torch.Tensor:
    """uint8 (H, W) alpha of a full-resolution probability, on its device. Within `band` pixels of the
    hard mask's boundary it ramps with the probability: 128-255 above the threshold, 0-127 at or below
    it, so alpha >= 128 is exactly the hard mask (prob > threshold); away from the band it is 255
    inside and 0 outside, so noise in the probability never makes the body or the studio see-through."""
    mask = prob > threshold
    m = mask[None, None].float()
    grown = F.max_pool2d(m, 2 * band + 1, stride=1, padding=band)[0, 0] > 0
    shrunk = -F.max_pool2d(-m, 2 * band + 1, stride=1, padding=band)[0, 0] > 0  # erosion; the border pads ignored
    p = prob.float().clamp(0, 1)
    ramp = torch.where(mask, 128 + torch.floor(127 * (p - threshold) / max(1 - threshold, 1e-6)),
                       torch.floor(127 * p / max(threshold, 1e-6))).clamp(0, 255)
    return torch.where(grown & ~shrunk, ramp, m[0, 0] * 255).to(torch.uint8)


def hard_alpha(prob: torch.Tensor, threshold: float) -> torch.Tensor:
    return (prob > threshold).to(torch.uint8) * 255


def find_photos(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched (recursively) for photos; two photos of one name are an error."""
    photos = []
    for item in map(Path, inputs):
        if item.is_dir():
            photos += sorted(p for p in item.rglob("*") if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        elif item.exists() or item.suffix.lower() in SUFFIXES:
            photos.append(item)  # a missing or unreadable file becomes a row of errors.csv
        else:
            raise ConfigError(f"{item}: no such photo or folder")
    stems: dict[str, Path] = {}
    for p in photos:
        if p.stem in stems and stems[p.stem] != p:
            raise ConfigError(f"{stems[p.stem]} and {p} would write the same outputs ({p.stem}.png); rename one")
        stems[p.stem] = p
    if not photos:
        raise ConfigError(f"no JPEG, PNG or WebP photos in {', '.join(inputs)}")
    return list(stems.values())


def outputs(out: Path, photo: Path, composite: str | None) -> list[Path]:
    names = [f"{photo.stem}_mask.png", f"{photo.stem}.png"] + ([f"{photo.stem}_on_{composite}.jpg"] if composite else [])
    return [out / name for name in names]


def _save(image: Image.Image, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def composite_on(rgb: np.ndarray, alpha: np.ndarray, colour: tuple) -> np.ndarray:
    """The photo over a flat colour: straight (not premultiplied) alpha, so edge pixels keep the
    photo's colour mixed with the new background, never darkened."""
    a = alpha[..., None].astype(np.float32) / 255
    return np.rint(rgb * a + np.array(colour[:3], np.float32) * (1 - a)).astype(np.uint8)


def _write(photo: Path, alpha: Callable[[], np.ndarray], paths: list[Path], colour: tuple | None) -> None:
    """In the writer thread: the photo's pixels are decoded again here, on the host, instead of
    copying the decoded image back from the device."""
    a = alpha()
    rgb = read_image(photo)
    _save(Image.fromarray((a >= 128).astype(np.uint8) * 255), paths[0], "PNG")  # the hard mask at the threshold
    _save(Image.fromarray(np.dstack([rgb, a])), paths[1], "PNG")
    if colour is not None:
        _save(Image.fromarray(composite_on(rgb, a, colour)), paths[2], "JPEG")


def cutout(inputs: list[str], out: str, cfg: Settings, composite: str | None = None, alpha: str = "soft") -> int:
    try:
        colour = ImageColor.getrgb(composite) if composite else None
    except ValueError:
        raise ConfigError(f"--composite {composite}: not a colour (a name such as white, or #rrggbb)") from None
    tag = composite.lstrip("#") if composite else None
    out = Path(out)
    photos = find_photos(inputs)
    todo = [p for p in photos if not all(path.exists() for path in outputs(out, p, tag))]
    log.info(f"cutout: {len(todo)} photos to do, {len(photos) - len(todo)} already done")
    errors, pending, seconds = [], [], 0.0
    if todo:
        cascade = Cascade.from_config(cfg, pick_device(cfg.device))
        threshold = mask_threshold(cfg)
        started = time.monotonic()  # the nets loaded: from here to the last file written
        make_alpha = soft_alpha if alpha == "soft" else hard_alpha
        with ThreadPoolExecutor(1, thread_name_prefix="cutout-writer") as pool:
            for i, pred in cascade.run(todo, desc="cutout"):
                if isinstance(pred, str):
                    errors.append({"photo": str(todo[i]), "reason": pred})
                    continue
                alpha_on_host = to_host(make_alpha(pred.prob, threshold))  # made on the device; only uint8 travels
                pending.append(pool.submit(_write, todo[i], alpha_on_host, outputs(out, todo[i], tag), colour))
                _drain(pending, keep=8)
            _drain(pending, keep=0)
        seconds = time.monotonic() - started
    if errors or (out / "errors.csv").exists():
        write_csv(out / "errors.csv", pd.DataFrame(errors, columns=["photo", "reason"]))
    done = len(todo) - len(errors)
    log.info(f"cutout: {done} photos cut out into {out}" + (f" in {seconds:.1f} s ({done / seconds:.2f} photos/s, files written)" if done else ""))
    if errors:
        log.info(f"cutout: {len(errors)} photo(s) could not be read, listed in {out / 'errors.csv'}")
        return 1
    return 0


def _drain(pending: list[Future], keep: int) -> None:
    """Wait until at most `keep` photos are being written (bounded memory), raising a writer's error."""
    while len(pending) > keep:
        pending.pop(0).result()
