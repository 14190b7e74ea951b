import numpy as np
import pandas as pd

from common.data.images import read_image, read_mask
from common.data.kaggle import index_split
from common.data.rle import rle_decode
from common.data.synth import HEIGHT, WIDTH, car_params, draw_view


def test_sample_data_layout_and_files_decode(sample_root):
    train = index_split(sample_root, "train")
    test = index_split(sample_root, "test")
    assert len(train) == 3 * 16 and len(test) == 16
    assert len({s.car for s in train}) == 3 and not {s.car for s in train} & {s.car for s in test}
    rles = pd.read_csv(sample_root / "train_masks.csv").fillna("")
    assert list(rles.columns) == ["img", "rle_mask"] and len(rles) == 48
    sub = pd.read_csv(sample_root / "sample_submission.csv")
    assert list(sub.columns) == ["img", "rle_mask"] and sorted(sub.img) == sorted(s.img for s in test)
    meta = pd.read_csv(sample_root / "metadata.csv")
    assert set(meta.id) == {s.car for s in train} | {s.car for s in test}
    for s in train[:16:5]:
        img = read_image(s.image)
        mask = read_mask(s.mask, expect_size=(WIDTH, HEIGHT))
        assert img.shape == (HEIGHT, WIDTH, 3)
        row = rles.loc[rles.img == s.img, "rle_mask"].item()
        assert (rle_decode(row, (HEIGHT, WIDTH)) == mask).all()


def test_render_is_deterministic_and_views_differ():
    p = car_params(3, 0)
    a1, m1 = draw_view(p, 1, 3)
    a2, m2 = draw_view(p, 1, 3)
    assert (a1 == a2).all() and (m1 == m2).all()
    _, side = draw_view(p, 5, 3)

    def width(m):
        return np.ptp(np.flatnonzero(m.any(0)))

    assert width(side) > 1.8 * width(m1)  # wider from the side than from the front


def test_some_cars_reach_the_image_edge_and_none_the_top_or_bottom():
    touches = 0
    for i in range(5):
        p = car_params(0, i)
        _, m = draw_view(p, 5, 0)
        touches += bool(m[:, 0].any() or m[:, -1].any())
        assert not m[0].any() and not m[-1].any()
    assert touches >= 1


def test_thin_parts_exist_at_full_resolution():
    """An antenna a few px wide: a row above the roof with a short run of car pixels."""
    p = car_params(0, 1)
    _, m = draw_view(p, 5, 0)
    rows = np.flatnonzero(m.any(1))
    top_rows = m[rows[0] : rows[0] + 20]
    widths = top_rows.sum(1)
    assert widths.max() <= 8 and widths.min() >= 1
