import warnings

import numpy as np
import pytest
from PIL import Image

from common.data.images import read_image, read_mask
from common.data.kaggle import index_split, split_by_car
from common.errors import DataError, ImageReadError


def _layout(tmp_path, names, masks):
    for d in ("train", "train_masks", "test"):
        (tmp_path / d).mkdir()
    for n in names:
        Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "train" / n, format="JPEG")
    for n in masks:
        Image.new("L", (8, 6), 0).save(tmp_path / "train_masks" / n)
    return tmp_path


def test_index_parses_ids_and_skips_strays_with_one_warning(tmp_path):
    root = _layout(
        tmp_path,
        ["abcdef123456_01.jpg", "abcdef123456_02.jpg", "fa613ac8eac5_01(1).jpg", "notes.txt"],
        ["abcdef123456_01_mask.gif", "abcdef123456_02_mask.png"],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = index_split(root, "train")
    assert (
        len(caught) == 1
        and "fa613ac8eac5_01(1).jpg" in str(caught[0].message)
        and "notes.txt" in str(caught[0].message)
    )
    assert [(s.id, s.car, s.angle) for s in samples] == [
        ("abcdef123456_01", "abcdef123456", 1),
        ("abcdef123456_02", "abcdef123456", 2),
    ]
    assert samples[1].mask.name == "abcdef123456_02_mask.png"
    assert samples[0].img == "abcdef123456_01.jpg"


def test_missing_mask_is_an_error_naming_the_image(tmp_path):
    root = _layout(tmp_path, ["abcdef123456_01.jpg", "abcdef123456_02.jpg"], ["abcdef123456_01_mask.gif"])
    with pytest.raises(DataError, match="abcdef123456_02.jpg"):
        index_split(root, "train")


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        index_split(tmp_path, "test")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no images"):
        index_split(tmp_path, "test")


def test_hq_folders_are_selectable(tmp_path):
    (tmp_path / "test_hq").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "test_hq" / "abcdef123456_03.jpg")
    assert [s.angle for s in index_split(tmp_path, "test", hq=True)] == [3]


def _fake_samples(n_cars):
    from pathlib import Path

    from common.data.kaggle import Sample

    return [
        Sample(f"car{c:09d}_{a:02d}", f"car{c:09d}", a, Path(f"car{c:09d}_{a:02d}.jpg"))
        for c in range(n_cars)
        for a in range(1, 17)
    ]


def test_split_by_car_never_splits_a_car():
    samples = _fake_samples(10)
    for val in (3, "2/5", ["car000000004", "car000000007"]):
        train, val_set = split_by_car(samples, val)
        assert not {s.car for s in train} & {s.car for s in val_set}
        assert len(train) + len(val_set) == len(samples)
    assert {s.car for s in split_by_car(samples, 3)[1]} == {"car000000000", "car000000001", "car000000002"}
    assert {s.car for s in split_by_car(samples, "2/5")[1]} == {"car000000001", "car000000006"}
    folds = [{s.car for s in split_by_car(samples, f"{k}/5")[1]} for k in range(1, 6)]
    assert set().union(*folds) == {s.car for s in samples} and sum(map(len, folds)) == 10


@pytest.mark.parametrize("val", [10, -1, "0/5", "6/5", "x", ["nope"]])
def test_split_rejects_bad_values(val):
    with pytest.raises(DataError, match="val_cars"):
        split_by_car(_fake_samples(10), val)


def test_read_image_converts_modes(tmp_path):
    Image.new("L", (10, 8), 77).save(tmp_path / "g.jpg")
    Image.new("RGBA", (10, 8), (1, 2, 3, 4)).save(tmp_path / "a.png")
    g = read_image(tmp_path / "g.jpg")
    assert g.shape == (8, 10, 3) and g.dtype == np.uint8 and abs(int(g[0, 0, 0]) - 77) <= 2
    assert read_image(tmp_path / "a.png")[0, 0].tolist() == [1, 2, 3]
    assert read_image(tmp_path / "g.jpg", size=(5, 4)).shape == (4, 5, 3)


def test_reduced_read_matches_resize_of_full_read(tmp_path):
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (10, 15, 3)), np.ones((128, 128, 1))).astype(np.uint8)  # 1280x1920 blocks
    Image.fromarray(base).save(tmp_path / "x.jpg", quality=95)
    small = read_image(tmp_path / "x.jpg", size=(240, 160)).astype(int)
    ref = np.asarray(Image.fromarray(read_image(tmp_path / "x.jpg")).resize((240, 160), Image.BILINEAR)).astype(int)
    assert small.shape == (160, 240, 3)
    assert np.abs(small - ref).mean() < 4  # worst case: saturated colour blocks


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"hello, not an image", "not a readable image")])
def test_unreadable_images_name_file_and_reason(tmp_path, content, reason):
    p = tmp_path / "abcdef123456_01.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=f"abcdef123456_01.jpg.*{reason}"):
        read_image(p)


def test_truncated_jpeg_is_an_error(tmp_path):
    p = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="t.jpg"):
        read_image(p)


def test_mask_conventions(tmp_path):
    m = np.zeros((6, 8), np.uint8)
    m[2:4, 3:6] = 1
    Image.fromarray(m, "L").convert("P").save(tmp_path / "a.gif")
    Image.fromarray(m * 255).save(tmp_path / "b.png")
    Image.fromarray(m * 7).save(tmp_path / "c.png")
    assert (read_mask(tmp_path / "a.gif") == m.astype(bool)).all()
    assert (read_mask(tmp_path / "b.png", expect_size=(8, 6)) == m.astype(bool)).all()
    with pytest.raises(ImageReadError, match=r"c.png.*values"):
        read_mask(tmp_path / "c.png")
    with pytest.raises(ImageReadError, match=r"b.png.*mask is 8x6, image is 9x6"):
        read_mask(tmp_path / "b.png", expect_size=(9, 6))


def test_index_on_real_samples(real_samples):
    samples = index_split(real_samples / "train_512", "train")
    assert len(samples) == 320 and len({s.car for s in samples}) == 20
    assert all(s.mask.name == f"{s.id}_mask.gif" for s in samples)
    train, val = split_by_car(samples, 4)
    assert len(val) == 64 and len(train) == 256
    img = read_image(samples[0].image)
    mask = read_mask(samples[0].mask, expect_size=(img.shape[1], img.shape[0]))
    assert img.shape == (512, 512, 3) and mask.dtype == bool and 0.05 < mask.mean() < 0.6


def test_index_on_real_test_images(real_samples, tmp_path):
    (tmp_path / "test").symlink_to(real_samples / "test_fullres")
    samples = index_split(tmp_path, "test")
    assert len(samples) == 32
    assert read_image(samples[0].image).shape == (1280, 1918, 3)
    small = read_image(samples[0].image, size=(256, 256)).astype(int)
    ref = np.asarray(Image.fromarray(read_image(samples[0].image)).resize((256, 256), Image.BILINEAR)).astype(int)
    assert small.shape == (256, 256, 3) and np.abs(small - ref).mean() < 2
