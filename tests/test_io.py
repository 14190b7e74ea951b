import gzip
import os
import stat

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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    """A submission, a checkpoint or a cutout is readable by whoever the user's umask lets read a new
    file (0644 under the usual 022), as any program's output; not 0600 whatever the umask."""
    old = os.umask(umask)
    try:
        write_csv(tmp_path / "submission.csv.gz", pd.DataFrame({"img": ["a.jpg"], "rle_mask": ["1 2"]}))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "submission.csv.gz").stat().st_mode) == 0o666 & ~umask
