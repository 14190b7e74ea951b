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
from pathlib import Path

import pandas as pd

from common.config import Settings
from common.data.images import read_image
from common.errors import ConfigError, Failure
from common.io import write_bytes, write_csv
from common.log import log
from common.model import pick_device
from common.model_source import ModelSource
from common.prediction.writer import OnHostOutput, Output, PredictionWriter
from pipelines.picture import Cut, Picture, cut_planes, render
from stage2_fullres.cascade import Cascade

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


def pictures(alpha: str = "soft", clean_edges: bool = True, composite: str | None = None) -> dict[str, Picture]:
    """The files a photo NAME gets, by what follows NAME in their names: the mask, the cutout and,
    with `composite` (a colour), the car on it."""
    files = {"_mask.png": Picture("mask", "hard"), ".png": Picture("rgba", alpha, clean_edges)}
    if composite:
        try:
            files[f"_on_{composite.lstrip('#')}.jpg"] = Picture(
                "composite", alpha, clean_edges, composite, format="jpeg"
            )
        except ConfigError:
            raise ConfigError(f"--composite {composite}: not a colour (a name such as white, or #rrggbb)") from None
    return files


class CutoutWriter(PredictionWriter):
    """Each photo's pictures, rendered and written (atomically) in the writer thread. The photo is
    decoded again there, on the host, instead of copying the decoded image back from the device."""

    def __init__(self, photos: list[Path], out: Path, files: dict[str, Picture]):
        super().__init__("cutout-writer")
        self.photos, self.out, self.files = photos, out, files

    def write_on_host(self, output: OnHostOutput) -> None:
        photo, result = self.photos[output.index], output.result
        cut = Cut(read_image(photo), output.mask, output.alpha, result.box, result.found)
        for suffix, picture in self.files.items():
            write_bytes(self.out / f"{photo.stem}{suffix}", render(cut, picture))


def cutout(inputs: list[str], out: str, cfg: Settings, source: ModelSource, files: dict[str, Picture]) -> int:
    """Cut out every photo of `inputs` not done yet into `out`, with the source's nets, as `files`
    (`pictures`) says."""
    out = Path(out)
    photos = find_photos(inputs)
    todo = [p for p in photos if not all((out / f"{p.stem}{suffix}").exists() for suffix in files)]
    log.info(f"cutout: {len(todo)} photos to do, {len(photos) - len(todo)} already done")
    errors, seconds = [], 0.0
    if todo:
        cascade = Cascade.load(source, cfg, pick_device(cfg.device))
        started = time.monotonic()  # the nets loaded: from here to the last file written
        with CutoutWriter(todo, out, files) as writer:
            for i, result in cascade.run(todo, desc="cutout"):
                if isinstance(result, Failure):
                    errors.append({"photo": str(todo[i]), "stage": result.stage, "reason": str(result)})
                else:  # made on the device; only the bool mask and the uint8 alpha travel
                    writer.write(Output(i, result, *cut_planes(result, source.threshold)))
        seconds = time.monotonic() - started
    if errors or (out / "errors.csv").exists():
        write_csv(out / "errors.csv", pd.DataFrame(errors, columns=["photo", "stage", "reason"]))
    done = len(todo) - len(errors)
    log.info(
        f"cutout: {done} photos cut out into {out}"
        + (f" in {seconds:.1f} s ({done / seconds:.2f} photos/s, files written)" if done else "")
    )
    if errors:
        log.info(f"cutout: {len(errors)} photo(s) could not be cut out, listed in {out / 'errors.csv'}")
        return 1
    return 0
