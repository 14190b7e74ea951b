"""Index over a Kaggle-layout Carvana data root, and the split by car.

<root>/train/<car>_<angle>.jpg, <root>/train_masks/<car>_<angle>_mask.gif (or .png),
<root>/test/<car>_<angle>.jpg; train_hq/ and test_hq/ when `hq` is set.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from PIL import Image

from common.boxes import Box, mask_extent
from common.errors import DataError, ImageReadError
from common.io import Size, image_size, read_image, read_mask, write_csv
from common.log import log

NAME = re.compile(r"^(?P<car>[0-9a-zA-Z]{12})_(?P<angle>\d{2})\.jpg$")
MASK_SUFFIXES = ("_mask.gif", "_mask.png")


@dataclass(frozen=True)
class Sample:
    id: str  # file stem, e.g. 0cdf5b5d0ce1_01
    car: str
    angle: int
    image: Path
    mask: Path | None = None

    @property
    def img(self) -> str:
        """The name the submission uses."""
        return self.image.name


def index_split(root: str | Path, split: str = "train", hq: bool = False) -> list[Sample]:
    """List the samples of `split` (train or test), sorted by id.

    Stray files (real downloads contain copies like `fa613ac8eac5_01(1).jpg`) are skipped with one
    warning listing them; a training image without a mask is an error naming the images.
    """
    root = Path(root)
    folder = root / (f"{split}_hq" if hq else split)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder} (set data.root to a Kaggle-layout folder)")
    samples, stray = [], []
    for path in sorted(folder.iterdir()):
        m = NAME.match(path.name)
        if not m:
            if not path.name.startswith("."):
                stray.append(path.name)
            continue
        samples.append(Sample(path.stem, m["car"], int(m["angle"]), path))
    if stray:
        shown = ", ".join(stray[:10]) + (f" and {len(stray) - 10} more" if len(stray) > 10 else "")
        warnings.warn(f"{folder}: skipped {len(stray)} file(s) not named <car>_<angle>.jpg: {shown}", stacklevel=2)
    if not samples:
        raise DataError(f"no images named <car>_<angle>.jpg in {folder}")
    if split == "train":
        samples = _attach_masks(samples, root / "train_masks")
    return samples


def _attach_masks(samples: list[Sample], mask_dir: Path) -> list[Sample]:
    present = {p.name for p in mask_dir.iterdir()} if mask_dir.is_dir() else set()
    out, missing = [], []
    for s in samples:
        name = next((s.id + suf for suf in MASK_SUFFIXES if s.id + suf in present), None)
        if name is None:
            missing.append(s.image.name)
        else:
            out.append(Sample(s.id, s.car, s.angle, s.image, mask_dir / name))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} training image(s) have no mask in {mask_dir}: {shown}")
    return out


def split_by_car(samples: list[Sample], val_cars: int | str | list) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val) by car, never by image.

    val_cars: a list of car ids; an int N (the first N cars in sorted order, as the seed did);
    or "k/K" (fold k of K, 1-based, cars assigned round-robin in sorted order).
    """
    cars = sorted({s.car for s in samples})
    if isinstance(val_cars, list):
        unknown = sorted(set(val_cars) - set(cars))
        if unknown:
            raise DataError(f"data.val_cars names cars not in the data: {', '.join(unknown[:5])}")
        chosen = set(val_cars)
    elif isinstance(val_cars, int):
        if not 0 <= val_cars < len(cars):
            raise DataError(f"data.val_cars={val_cars} but the data has {len(cars)} cars; keep at least one for training")
        chosen = set(cars[:val_cars])
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(val_cars))
        if not m or not 1 <= int(m[1]) <= int(m[2]) or int(m[2]) > len(cars):
            raise DataError(f"data.val_cars='{val_cars}' must be a list, a count, or 'k/K' with 1 <= k <= K <= {len(cars)}")
        k, n = int(m[1]), int(m[2])
        chosen = {c for i, c in enumerate(cars) if i % n == k - 1}
    return [s for s in samples if s.car not in chosen], [s for s in samples if s.car in chosen]


@dataclass
class Pair:
    """A readable training pair; `box` is the true car box at full resolution (None: no car)."""

    sample: Sample
    width: int
    height: int
    box: Box | None
    image: np.ndarray | None = None  # uint8 HWC at the scan size, when kept
    mask: np.ndarray | None = None  # bool HW at the scan size, when kept


def _scan_one(sample: Sample, size: Size | None, keep: bool) -> Pair | str:
    try:
        width, height = image_size(sample.image)
        full = read_mask(sample.mask, expect_size=(width, height))
        image = read_image(sample.image, size=size or (256, 256))  # decodes the whole file: catches truncation
    except ImageReadError as e:
        return str(e)
    if not keep:
        return Pair(sample, width, height, mask_extent(full))
    mask = full if size is None else np.asarray(Image.fromarray(full.view(np.uint8) * 255).resize(size, Image.BILINEAR)) >= 128
    return Pair(sample, width, height, mask_extent(full), image, mask)


def scan_pairs(samples: list[Sample], size: Size | None = None, keep: bool = True, max_bad_share: float = 0.01,
               jobs: int = 4) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Read every training pair once, before training starts.

    Unreadable or inconsistent pairs are skipped with a warning naming the file and the reason; if
    more than `max_bad_share` of them are bad, nothing trains and the error lists them. With `keep`,
    images and masks at `size` (w, h) stay in memory, which is what stage 1 trains from.
    """
    results = Parallel(n_jobs=jobs, prefer="threads")(delayed(_scan_one)(s, size, keep) for s in samples)
    pairs = [r for r in results if isinstance(r, Pair)]
    bad = [(s.img, r) for s, r in zip(samples, results) if isinstance(r, str)]
    if samples and len(bad) / len(samples) > max_bad_share:
        listing = "\n  ".join(reason for _, reason in bad[:20])
        raise DataError(f"{len(bad)} of {len(samples)} training pairs are unreadable, more than "
                        f"data.max_bad_share={max_bad_share}; fix or remove them:\n  {listing}")
    for _, reason in bad:
        warnings.warn(f"skipping training pair: {reason}", stacklevel=2)
    return pairs, bad


def report_skipped(run_dir: Path, bad: list[tuple[str, str]]) -> None:
    """The run summary's list of skipped pairs, also kept as `<run_dir>/skipped.csv`."""
    if not bad:
        return
    write_csv(run_dir / "skipped.csv", pd.DataFrame(bad, columns=["img", "reason"]))
    log.info(f"skipped {len(bad)} unreadable pair(s), listed in {run_dir / 'skipped.csv'}:")
    for _, reason in bad:
        log.info(f"  {reason}")
