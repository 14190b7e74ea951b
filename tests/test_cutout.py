"""`carvana cutout`: any photos (names, sizes, portrait, PNG) -> mask, RGBA cutout and composite,
written atomically; unreadable photos listed and exit 1 after the rest; a rerun skips finished photos."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipelines.cli import main as cli


def test_cutout_of_any_photos(tiny_run, tmp_path, capsys):
    src = sorted(Path(tiny_run.data.root, "test").glob("*.jpg"))
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    shutil.copy(src[0], photos / "My Car.JPG")
    Image.open(src[1]).rotate(90, expand=True).resize((600, 900)).save(photos / "more" / "portrait.png")  # portrait PNG
    (photos / "broken.jpg").write_bytes(b"not a photo")
    out = tmp_path / "out"
    run = tiny_run.output.dir
    args = ["cutout", str(photos), "--out", str(out), "--composite", "white", f"stage1.checkpoint={run}/stage1/best.pt",
            f"stage2.checkpoint={run}/stage2/best.pt", "stage1.size=64", "stage2.tile=512", "device=cpu"]
    assert cli(args) == 1  # the broken photo, after finishing the others
    for stem, size in (("My Car", (1918, 1280)), ("portrait", (600, 900))):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        rgba = Image.open(out / f"{stem}.png")
        assert Image.open(out / f"{stem}_mask.png").size == rgba.size == Image.open(out / f"{stem}_on_white.jpg").size == size
        assert set(np.unique(mask)) <= {0, 255} and rgba.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(rgba)[..., 3], mask)  # transparent exactly where the mask is background
    errors = pd.read_csv(out / "errors.csv")
    assert errors.photo.str.endswith("broken.jpg").tolist() == [True] and "not a readable image" in errors.reason[0]
    assert not list(out.glob(".*.tmp"))
    capsys.readouterr()
    assert cli(args) == 1
    assert "1 photos to do, 2 already done" in capsys.readouterr().out


def test_report_keeps_ids_that_look_like_numbers(tmp_path):
    """Car ids such as 02159e548029 read back from metrics.csv stay strings, not 2.159e+551 or inf."""
    from common.config import load_config
    from common.io import write_csv
    from pipelines.report import write_report

    cfg = load_config(None, [f"output.dir={tmp_path}"])
    write_csv(tmp_path / "report" / "metrics.csv", pd.DataFrame(
        {"img": ["02159e548029_01.jpg"], "car": ["02159e548029"], "dice_stage1": [0.98], "dice_cascade": [0.99]}))
    page = write_report(cfg).read_text()
    assert "02159e548029" in page and "inf" not in page.split("<h2>Configuration")[0]
