"""The box cache: `bboxes.csv`, stage 1's car box of every train and test image, keyed on the stage-1
net's content and every setting a box depends on. `stage1 predict` writes it; stage 2 reads it
(`cached_boxes`) and never runs stage 1 for a box; a second `stage1 predict` with the same key
reuses it without loading a net."""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from pathlib import Path

import pandas as pd

from common.boxes import Box
from common.config import Settings, depends, digest
from common.errors import DataError
from common.io import write_csv
from common.model_source import ModelSource

INPUT_VERSION = "full-decode, antialiased bilinear on the device"  # part of the key: changes how boxes are made


@dataclass(frozen=True)
class BoxRow:
    """One line of bboxes.csv: an image's box in full-resolution pixels, x1/y1 exclusive; `found`:
    stage 1 saw a car (else the box is the whole image); `key`: the cache key it was made under."""

    img: str
    split: str  # train | test
    width: int
    height: int
    x0: int
    y0: int
    x1: int
    y1: int
    found: int  # 1 | 0
    key: str

    @property
    def box(self) -> Box:
        return self.x0, self.y0, self.x1, self.y1


COLUMNS = [f.name for f in fields(BoxRow)]
NUMBERS = COLUMNS[2:9]  # width ... found


def cache_key(cfg: Settings, source: ModelSource) -> str:
    """The stage-1 net's content + the settings a box depends on."""
    return digest({"checkpoint": source.hash("stage1"), "input": INPUT_VERSION, **depends(cfg, "boxes")})


def boxes_path(cfg: Settings) -> Path:
    given = cfg.bboxes.path
    return Path(given) if given else Path(cfg.output.dir) / "bboxes.csv"


def write_boxes(path: Path, rows: list[BoxRow]) -> None:
    """bboxes.csv, sorted by image name."""
    write_csv(path, pd.DataFrame([astuple(r) for r in sorted(rows, key=lambda r: r.img)], columns=COLUMNS))


def load_boxes(path: Path) -> list[BoxRow]:
    """Read a bboxes.csv, refusing one that would crop the wrong pixels (`box_rows`)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    return box_rows(frame, str(path))


def box_rows(frame: pd.DataFrame, where: str) -> list[BoxRow]:
    """The rows of a frame of box columns (as read, strings), checked: DataError naming `where`, the
    first bad row and what is wrong."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)} (written by `carvana "
            "stage1 predict`)"
        )
    numbers = frame[NUMBERS].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1) | ~(
        (0 <= numbers.x0)
        & (numbers.x0 < numbers.x1)
        & (numbers.x1 <= numbers.width)
        & (0 <= numbers.y0)
        & (numbers.y0 < numbers.y1)
        & (numbers.y1 <= numbers.height)
    )
    if bad.any():
        r = frame[bad].iloc[0]
        raise DataError(
            f"{where}: {bad.sum()} box(es) not inside their image, e.g. {r.img}: x0={r.x0} y0={r.y0} x1={r.x1} "
            f"y1={r.y1} in {r.width}x{r.height}; rerun `carvana stage1 predict` to rebuild it"
        )
    numbers = numbers.astype(int)
    return [
        BoxRow(img, split, *values, key)
        for img, split, key, values in zip(
            frame.img, frame.split, frame.key, numbers.itertuples(index=False, name=None), strict=True
        )
    ]


def cached_boxes(cfg: Settings) -> dict[str, Box]:
    """img -> box from `bboxes.path` (else `<output.dir>/bboxes.csv`), written by `stage1 predict`."""
    path = boxes_path(cfg)
    if not path.is_file():
        if cfg.bboxes.path:
            raise DataError(f"bboxes.path={cfg.bboxes.path} does not exist")
        raise DataError(
            f"{path} not found: run `carvana stage1 predict` with the same config first (or set bboxes.path to the "
            "bboxes.csv of another run)"
        )
    return {row.img: row.box for row in load_boxes(path)}
