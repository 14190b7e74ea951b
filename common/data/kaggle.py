"""The Kaggle layout of a data root: the index of its images, the split by car, and the test
images in submission order.

<root>/train/<car>_<angle>.jpg, <root>/train_masks/<car>_<angle>_mask.gif (or .png),
<root>/test/<car>_<angle>.jpg; train_hq/ and test_hq/ when `hq` is set.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.config import Settings
from common.errors import DataError

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


def _listing(names: list[str]) -> str:
    """The first ten names, and how many more: for messages about many files."""
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


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
        warnings.warn(
            f"{folder}: skipped {len(stray)} file(s) not named <car>_<angle>.jpg: {_listing(stray)}", stacklevel=2
        )
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
        raise DataError(f"{len(missing)} training image(s) have no mask in {mask_dir}: {_listing(missing)}")
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
            raise DataError(
                f"data.val_cars={val_cars} but the data has {len(cars)} cars; keep at least one for training"
            )
        chosen = set(cars[:val_cars])
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(val_cars))
        if not m or not 1 <= int(m[1]) <= int(m[2]) or int(m[2]) > len(cars):
            raise DataError(
                f"data.val_cars='{val_cars}' must be a list, a count, or 'k/K' with 1 <= k <= K <= {len(cars)}"
            )
        k, n = int(m[1]), int(m[2])
        chosen = {c for i, c in enumerate(cars) if i % n == k - 1}
    return [s for s in samples if s.car not in chosen], [s for s in samples if s.car in chosen]


def test_samples(cfg: Settings) -> list[Sample]:
    """Test images in sample_submission.csv order when the data has that file (else by name), limited by
    data.limit_test.

    A data root without a test folder (training data only, e.g. for `evaluate`) has none.
    """
    folder = Path(cfg.data.root) / ("test_hq" if cfg.data.hq else "test")
    if not folder.is_dir():
        warnings.warn(f"{folder} not found: no test images, so no submission", stacklevel=2)
        return []
    samples = index_split(cfg.data.root, "test", cfg.data.hq)
    path = Path(cfg.data.root) / "sample_submission.csv"
    if path.is_file():
        try:
            names = pd.read_csv(path, usecols=["img"], dtype=str)["img"]
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
            raise DataError(f"{path}: needs an 'img' column of test image names, as Kaggle's file has ({e})") from None
        order = {name: i for i, name in enumerate(names)}
        samples.sort(key=lambda s: (order.get(s.img, len(order)), s.img))
    limit = cfg.data.limit_test
    return samples[:limit] if limit else samples
