"""`carvana cutout PHOTOS... --out DIR`: background removal for any photos with the trained cascade.

Photos are JPEG, PNG or WebP files of any name and size (folders are searched); stage 1 finds each
car's box on the fly (photos are no data set, so nothing is cached), the refiner works on tiles of
it. Photos are read as a viewer shows them (EXIF orientation applied). For each photo NAME:
`NAME_mask.png` (8-bit, 0/255, the photo's size), `NAME.png` (RGBA, the background transparent; with
`--alpha soft`, the default, the car's edge semi-transparent as the cascade's probability says, in the
car's own colour unless `cutout.clean_edges=false`) and with `--composite COLOUR` `NAME_on_COLOUR.jpg`.
Every file is written atomically; a photo whose outputs all exist is skipped; a photo that cannot be
read or cut out goes to `DIR/errors.csv` (photo, stage, reason) and the command exits 1 after
finishing the rest.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageColor

from common.config import Settings
from common.data.images import read_image
from common.errors import ConfigError, Failure
from common.io import atomic_path, write_csv
from common.log import log
from common.model import pick_device
from common.prediction.writer import OnHost, to_host
from pipelines.bundle import open_cascade
from pipelines.matting import alpha, foreground, picture
from stage2_fullres.bundle import Bundle

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


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


def _write(photo: Path, mask: OnHost, edge: OnHost, paths: list[Path], colour: tuple | None, clean: bool) -> None:
    """In the writer thread (`mask`, `edge`: the mask and the alpha on their way to the host): the
    photo's pixels are decoded again here, on the host, instead of copying the decoded image back
    from the device."""
    a = edge()
    rgb = read_image(photo)
    _save(Image.fromarray(mask().astype(np.uint8) * 255), paths[0], "PNG")
    if clean:
        rgb = foreground(torch.from_numpy(rgb), torch.from_numpy(a)).numpy()  # once for both pictures
    _save(Image.fromarray(picture(rgb, a, "rgba", clean=False)), paths[1], "PNG")
    if colour is not None:
        _save(Image.fromarray(picture(rgb, a, "composite", colour, clean=False)), paths[2], "JPEG")


def cutout(inputs: list[str], out: str, cfg: Settings, composite: str | None = None, edge: str = "soft",
           bundle: Bundle | None = None) -> int:
    """Cut out every photo of `inputs` not done yet into `out`, with the bundle's nets (`--model`) or the config's."""
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
        cascade, threshold = open_cascade(cfg, bundle, pick_device(cfg.device))
        started = time.monotonic()  # the nets loaded: from here to the last file written
        with ThreadPoolExecutor(1, thread_name_prefix="cutout-writer") as pool:
            for i, result in cascade.run(todo, desc="cutout"):
                if isinstance(result, Failure):
                    errors.append({"photo": str(todo[i]), "stage": result.stage, "reason": str(result)})
                    continue
                # made on the device; only the bool mask and the uint8 alpha travel
                mask, a = to_host(result.mask(threshold)), to_host(alpha(result, threshold, soft=edge == "soft"))
                pending.append(pool.submit(_write, todo[i], mask, a, outputs(out, todo[i], tag), colour, cfg.cutout.clean_edges))
                _drain(pending, keep=8)
            _drain(pending, keep=0)
        seconds = time.monotonic() - started
    if errors or (out / "errors.csv").exists():
        write_csv(out / "errors.csv", pd.DataFrame(errors, columns=["photo", "stage", "reason"]))
    done = len(todo) - len(errors)
    log.info(f"cutout: {done} photos cut out into {out}" + (f" in {seconds:.1f} s ({done / seconds:.2f} photos/s, files written)" if done else ""))
    if errors:
        log.info(f"cutout: {len(errors)} photo(s) could not be cut out, listed in {out / 'errors.csv'}")
        return 1
    return 0


def _drain(pending: list[Future], keep: int) -> None:
    """Wait until at most `keep` photos are being written (bounded memory), raising a writer's error."""
    while len(pending) > keep:
        pending.pop(0).result()
