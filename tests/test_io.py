import gzip

import pandas as pd
import pytest

from common.io import atomic_path, write_csv


def test_atomic_path_leaves_no_partial_file_on_error(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_gz_csv_is_byte_identical_across_writes(tmp_path):
    frame = pd.DataFrame({"img": ["a.jpg"], "rle_mask": ["1 2"]})
    write_csv(tmp_path / "a.csv.gz", frame)
    first = (tmp_path / "a.csv.gz").read_bytes()
    write_csv(tmp_path / "a.csv.gz", frame)
    assert (tmp_path / "a.csv.gz").read_bytes() == first
    assert gzip.decompress(first).decode().splitlines() == ["img,rle_mask", "a.jpg,1 2"]
