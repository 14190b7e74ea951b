"""`carvana cutout`: any photos (names, sizes, portrait, PNG, EXIF-turned) -> mask, RGBA cutout with a
soft or hard edge, and composite, written atomically; unreadable photos listed and exit 1 after the
rest; a rerun skips finished photos."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import photos_of, tiny_nets
from PIL import Image

from common.data.images import ORIENTATION, image_size, read_image
from common.prediction.step import Prediction
from pipelines.cli import main as cli
from pipelines.matting import alpha as alpha_of
from pipelines.matting import foreground
from pipelines.picture import Cut


def test_cutout_of_any_photos(tiny_run, tmp_path, capsys):
    """A JPEG with an upper-case suffix, a portrait PNG in a folder below, the same pixels as a lossless
    WebP, and no photo: the masks, cutouts and composites of the three photos, the WebP's the PNG's; the
    soft edge in the car's own colour unless `cutout.clean_edges=false`; the broken file listed."""
    src = photos_of(tiny_run)
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    shutil.copy(src[0], photos / "My Car.JPG")
    Image.open(src[1]).rotate(90, expand=True).resize((600, 900)).save(photos / "more" / "portrait.png")  # portrait PNG
    portrait = Image.open(photos / "more" / "portrait.png")
    portrait.save(photos / "more" / "lossless.webp", lossless=True)  # the same pixels as WebP
    (photos / "broken.jpg").write_bytes(b"not a photo")
    out = tmp_path / "out"
    args = ["cutout", str(photos), "--out", str(out), "--composite", "white", *tiny_nets(tiny_run)]
    assert cli(args) == 1  # the broken photo, after finishing the others
    for stem, size in (("My Car", (1918, 1280)), ("portrait", (600, 900))):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        rgba = Image.open(out / f"{stem}.png")
        assert (
            Image.open(out / f"{stem}_mask.png").size
            == rgba.size
            == Image.open(out / f"{stem}_on_white.jpg").size
            == size
        )
        assert set(np.unique(mask)) == {0, 255} and rgba.mode == "RGBA"
        alpha = np.asarray(rgba)[..., 3]
        np.testing.assert_array_equal(alpha >= 128, mask == 255)  # the soft edge thresholds to the mask exactly
        assert 0 < np.mean((alpha > 0) & (alpha < 255)) < 0.05  # semi-transparent only along the edge
        photo = photos / ("My Car.JPG" if stem == "My Car" else "more/portrait.png")
        # straight alpha: the photo's own pixels, the soft edge in the car's own colour (clean edges)
        clean = foreground(torch.from_numpy(read_image(photo)), torch.from_numpy(alpha.copy())).numpy()
        np.testing.assert_array_equal(np.asarray(rgba)[..., :3], clean)
        solid = (alpha == 0) | (alpha == 255)
        np.testing.assert_array_equal(clean[solid], read_image(photo)[solid])
        assert (clean != read_image(photo))[~solid].any()  # the soft edge recoloured
    for name in ("{}.png", "{}_mask.png", "{}_on_white.jpg"):  # the WebP of portrait.png's pixels
        webp, png = (np.asarray(Image.open(out / name.format(stem))) for stem in ("lossless", "portrait"))
        np.testing.assert_array_equal(webp, png)
    errors = pd.read_csv(out / "errors.csv")
    assert errors.photo.str.endswith("broken.jpg").tolist() == [True] and "not a readable image" in errors.reason[0]
    assert errors.stage.tolist() == ["read"]
    assert not list(out.glob(".*.tmp"))
    capsys.readouterr()
    assert cli(args) == 1
    assert "1 photos to do, 3 already done" in capsys.readouterr().out
    hard = tmp_path / "hard"
    assert cli([*args[:1], str(photos / "My Car.JPG"), "--out", str(hard), "--alpha", "hard", *args[4:]]) == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(hard / "My Car.png"))[..., 3], np.asarray(Image.open(hard / "My Car_mask.png"))
    )
    portrait, plain = photos / "more" / "portrait.png", tmp_path / "plain"
    assert cli([*args[:1], str(portrait), "--out", str(plain), *args[4:], "cutout.clean_edges=false"]) == 0
    unclean = np.asarray(Image.open(plain / "portrait.png"))
    np.testing.assert_array_equal(unclean[..., :3], read_image(portrait))  # the photo's own colours, edge too
    np.testing.assert_array_equal(unclean[..., 3], np.asarray(Image.open(out / "portrait.png"))[..., 3])


def test_a_photo_the_tiles_cannot_cover_is_its_own_failure_and_the_others_are_cut_out(tiny_run, tmp_path, capsys):
    """64 px tiles overlapping by 32 would cut a 1918x1280 photo's car box into over a thousand tiles:
    that photo is a row of errors.csv naming the settings, the small photo beside it is cut out, the
    command exits 1 (a failure during the work), not 2 (the settings are fine for other photos)."""
    src = photos_of(tiny_run)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(src[0], photos / "large.jpg")
    Image.open(src[1]).resize((120, 80)).save(photos / "small.png")
    out = tmp_path / "out"
    tiles = ["stage2.tile=64", "stage2.min_overlap=32"]
    assert cli(["cutout", str(photos), "--out", str(out), *tiny_nets(tiny_run), *tiles]) == 1
    errors = pd.read_csv(out / "errors.csv")
    assert errors.photo.tolist() == [str(photos / "large.jpg")] and errors.stage.tolist() == ["stage2"]
    assert "stage2.tile=64 with stage2.min_overlap=32" in errors.reason[0] and "raise stage2.tile" in errors.reason[0]
    assert sorted(p.name for p in out.glob("*.png")) == ["small.png", "small_mask.png"]


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_soft_alpha_ramps_across_the_edge_and_thresholds_to_the_hard_mask(threshold):
    """On a synthetic car with a smooth edge: 255 inside, 0 outside, a monotone ramp across the edge,
    and alpha >= 128 exactly where the probability is above the threshold."""
    yy, xx = torch.meshgrid(torch.arange(120.0), torch.arange(160.0), indexing="ij")
    r = ((yy - 60) ** 2 + (xx - 80) ** 2).sqrt()
    prob = torch.sigmoid((40 - r) / 1.5)  # a disk of radius 40 with a soft rim
    prob[60, 20] = 0.7  # a speck in the background away from the car's edge stays transparent
    pred = Prediction(160, 120, (0, 0, 160, 120), True, None, prob)
    alpha = alpha_of(pred, threshold)
    assert alpha.dtype == torch.uint8
    assert (alpha[r < 30] == 255).all() and (alpha[(r > 50) & (prob < threshold)] == 0).all()
    assert torch.equal(alpha >= 128, pred.mask(threshold))
    cut = Cut(np.zeros((120, 160, 3), np.uint8), pred.mask(threshold).numpy(), alpha.numpy(), pred.box, True)
    assert np.array_equal(cut.alpha_of("hard") == 255, pred.mask(threshold).numpy())  # hard: the mask itself
    row = alpha[60, 80:].int()  # from the centre outwards
    assert (row[1:] <= row[:-1]).all() and len(set(row.tolist()) - {0, 255}) >= 2  # monotone, with a ramp


def test_photos_are_read_as_shown_with_their_exif_orientation(tiny_run, tmp_path):
    """A phone photo stored sideways (EXIF orientation 6) is read turned upright, in every reader, and
    cut out the same as the same pixels stored upright."""
    src = photos_of(tiny_run)[0]
    stored = Image.open(src).resize((400, 300))
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # the viewer turns it 90 degrees clockwise
    stored.save(tmp_path / "plain.jpg", quality=95)
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    shown = read_image(tmp_path / "phone.jpg")
    np.testing.assert_array_equal(shown, np.rot90(read_image(tmp_path / "plain.jpg"), -1))
    assert image_size(tmp_path / "phone.jpg") == (300, 400)
    Image.fromarray(shown).save(tmp_path / "upright.png")
    photos = [str(tmp_path / "phone.jpg"), str(tmp_path / "upright.png")]
    assert cli(["cutout", *photos, "--out", str(tmp_path / "out"), *tiny_nets(tiny_run)]) == 0
    phone, upright = (np.asarray(Image.open(tmp_path / "out" / f"{n}.png")) for n in ("phone", "upright"))
    assert phone.shape == (400, 300, 4)
    np.testing.assert_array_equal(phone, upright)


def test_report_keeps_ids_that_look_like_numbers(tmp_path):
    """Car ids such as 02159e548029 read back from metrics.csv stay strings, not 2.159e+551 or inf."""
    from common.config import load_config
    from common.io import write_csv
    from pipelines.report import write_report

    cfg = load_config(None, [f"output.dir={tmp_path}"])
    write_csv(
        tmp_path / "report" / "metrics.csv",
        pd.DataFrame(
            {"img": ["02159e548029_01.jpg"], "car": ["02159e548029"], "dice_stage1": [0.98], "dice_cascade": [0.99]}
        ),
    )
    page = write_report(cfg).read_text()
    assert "02159e548029" in page and "inf" not in page.split("<h2>Configuration")[0]
