"""Resumable prediction results: rows written in small atomic chunk files under a keyed folder.

A run killed at any point leaves only whole chunks; the rerun skips the images they hold and the
final files are assembled from all chunks in a fixed order, so they are byte-identical to those of
an uninterrupted run. A folder for another key (checkpoint, settings) is never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pandas as pd

from common.io import write_csv


class ChunkStore:
    def __init__(self, root: str | Path, key: str, columns: list[str]):
        self.folder = Path(root) / key
        self.columns = columns
        self.folder.mkdir(parents=True, exist_ok=True)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.csv"))

    def parts(self) -> Iterator[pd.DataFrame]:
        """The chunks one at a time, in the order they were written."""
        for path in self._parts():
            yield pd.read_csv(path, dtype=str, keep_default_na=False)

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """All chunks as one frame; pass `columns` to leave out large ones (RLE strings)."""
        parts = [p[columns] if columns else p for p in self.parts()]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns or self.columns, dtype=str)

    def done(self) -> set[str]:
        return set(self.frame(["img"])["img"])

    def write(self, rows: list[dict]) -> None:
        if rows:
            n = len(self._parts())
            write_csv(self.folder / f"part-{n:06d}.csv", pd.DataFrame(rows, columns=self.columns))
