"""`carvana cutout PHOTOS... --out DIR`: background removal for any photos with the trained cascade.

Photos are JPEG, PNG or WebP files of any name and size (folders are searched); stage 1 finds each
car's box on the fly (photos are no data set, so nothing is cached), the refiner works on tiles of
it. Photos are read as a viewer shows them (EXIF orientation applied). For each photo NAME:
`NAME_mask.png` (8-bit, 0/255, the photo's size), `NAME.png` (RGBA, the background transparent; with
`--alpha soft`, the default, the car's edge semi-transparent as the cascade's probability says, in the
car's own colour unless `cutout.clean_edges=false`) and with `--composite COLOUR` `NAME_on_COLOUR.jpg`.
Every file is written atomically; a photo that cannot be read or cut out goes to `DIR/errors.csv`
(photo, stage, reason) and the command exits 1 after finishing the rest.

Nothing is destroyed: an output that would be one of the photos, or two photos that would write the
same file, are refused before any work. `DIR/.carvana-cutout.json` records what made each photo's
files (the nets' hashes, the mask threshold, the settings a box or mask depends on, the pictures, the
photo's size and time); a rerun skips a photo whose files exist and whose record matches, and redoes
it when anything of that changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pandas as pd

from common.config import Settings, depends, digest
from common.errors import ConfigError, Failure
from common.io import write_bytes, write_csv, write_text
from common.log import log
from common.model_source import ModelSource
from pipelines.api import CutWriter, Model
from pipelines.picture import Cut, Picture, render

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
RECORD = ".carvana-cutout.json"  # in --out: what made each photo's files


def find_photos(inputs: list[str], out: Path) -> list[Path]:
    """Files as given, folders searched (recursively) for photos, leaving out `out` (--out) where it lies
    inside one; `out` being a searched folder itself is an error (its cutouts would be read as photos)."""
    photos, written = [], out.resolve()
    for item in map(Path, inputs):
        if item.is_dir():
            if item.resolve() == written:
                raise ConfigError(
                    f"--out {out} is the folder of photos {item}: its cutouts would be read as photos next time; "
                    "choose another --out"
                )
            photos += sorted(
                p
                for p in item.rglob("*")
                if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and written not in p.resolve().parents
            )
        elif item.exists() or item.suffix.lower() in SUFFIXES:
            photos.append(item)  # a missing or unreadable file becomes a row of errors.csv
        else:
            raise ConfigError(f"{item}: no such photo or folder")
    if not photos:
        raise ConfigError(f"no JPEG, PNG or WebP photos in {', '.join(inputs)}")
    return list(dict.fromkeys(photos))  # a photo named twice is cut out once


def check_outputs(photos: list[Path], out: Path, files: dict[str, Picture]) -> None:
    """Refuse (ConfigError, before any work) an output that is one of the photos (by its path, a link
    to it, or a hard link), and two photos that would write the same file (car.jpg and car.png both
    write car.png; car.jpg and car_mask.jpg both write car_mask.png)."""
    by_path = {p.resolve(): p for p in photos}
    by_inode = {(st.st_dev, st.st_ino): p for p in photos if (st := _stat(p))}
    claimed: dict[Path, Path] = {}
    for photo in photos:
        for suffix in files:
            target = out / f"{photo.stem}{suffix}"
            st = _stat(target)
            victim = by_path.get(target.resolve()) or (by_inode.get((st.st_dev, st.st_ino)) if st else None)
            if victim is not None:
                raise ConfigError(f"{target} would overwrite the photo {victim}; choose another --out")
            other = claimed.setdefault(target.resolve(), photo)
            if other != photo:
                raise ConfigError(f"{other} and {photo} would both write {target}; rename one")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


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


class CutoutWriter(CutWriter):
    """Each photo's pictures rendered and written (atomically) in the writer thread; its failure, a row
    for errors.csv."""

    def __init__(self, photos: list[Path], out: Path, files: dict[str, Picture]):
        super().__init__("cutout-writer", photos)
        self.out, self.files, self.errors = out, files, []

    def on_cut(self, index: int, photo: Path, result: Cut | Failure) -> None:
        if isinstance(result, Failure):
            self.errors.append({"photo": str(photo), "stage": result.stage, "reason": str(result)})
            return
        for suffix, picture in self.files.items():
            write_bytes(self.out / f"{photo.stem}{suffix}", render(result, picture))


def recipe(cfg: Settings, source: ModelSource, files: dict[str, Picture]) -> dict:
    """What makes a photo's files: the nets (their content hashes), the mask threshold, the settings a
    box or a mask depends on, and the pictures asked for."""
    return {
        "nets": {net: source.hash(net) for net in ("stage1", "refiner")},
        "threshold": source.threshold,
        "boxes": depends(cfg, "boxes"),
        "masks": depends(cfg, "masks"),
        "pictures": {suffix: dataclasses.asdict(picture) for suffix, picture in files.items()},
    }


def _made(photo: Path, made_by: dict) -> str:
    """The record of one photo's files: what made them, and the photo as it was (its path, size and
    modification time)."""
    st = _stat(photo)
    return digest([made_by, str(photo.resolve()), [st.st_size, st.st_mtime_ns] if st else None])


def _read_record(out: Path) -> dict[str, str]:
    """--out's record (the files' name, a photo's stem -> `_made`); none, or one that cannot be read, is
    empty: every photo is redone."""
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and all(isinstance(v, str) for v in record.values()) else {}


def cutout(inputs: list[str], out: str, cfg: Settings, source: ModelSource, files: dict[str, Picture]) -> int:
    """Cut out every photo of `inputs` into `out` whose files are missing or were made otherwise, with the
    source's nets, as `files` (`pictures`) says."""
    out = Path(out)
    photos = find_photos(inputs, out)
    check_outputs(photos, out, files)
    made_by = recipe(cfg, source, files)
    record, made = _read_record(out), {p: _made(p, made_by) for p in photos}
    todo = [
        p
        for p in photos
        if record.get(p.stem) != made[p] or not all((out / f"{p.stem}{suffix}").exists() for suffix in files)
    ]
    log.info(f"cutout: {len(todo)} photos to do, {len(photos) - len(todo)} already done")
    errors, seconds = [], 0.0
    if todo:  # their records go first: a run stopped midway leaves no record saying a half-redone photo is done
        redone = {p.stem for p in todo}
        record = {name: key for name, key in record.items() if name not in redone}
        write_text(out / RECORD, json.dumps(record, indent=1, sort_keys=True))
        model = Model(cfg, source)  # the cascade the Python API runs, its nets loaded here
        model.cascade  # noqa: B018
        started = time.monotonic()  # from here to the last file written
        with CutoutWriter(todo, out, files) as writer:
            for output in model.outputs(todo, desc="cutout"):  # made on the device; only the mask and the alpha travel
                writer.write(output)
        errors, seconds = writer.errors, time.monotonic() - started
        failed = {row["photo"] for row in errors}
        record.update({p.stem: made[p] for p in todo if str(p) not in failed})
        write_text(out / RECORD, json.dumps(record, indent=1, sort_keys=True))
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
