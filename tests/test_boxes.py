import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common.boxes import expand_box, jitter_box, largest_component, mask_extent, scale_box
from stage1_lowres.coarse import box_from_probability


def test_extent_and_empty():
    m = np.zeros((10, 12), bool)
    assert mask_extent(m) is None
    m[2:5, 3:9] = True
    assert mask_extent(m) == (3, 2, 9, 5)


def test_largest_component_drops_stray_blobs():
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    m[0, 0] = m[19, 19] = True
    assert mask_extent(largest_component(m)) == (5, 5, 15, 15)


def test_box_from_probability_margin_and_clamp():
    prob = np.zeros((64, 64), np.float32)
    prob[20:40, 10:50] = 0.9
    prob[2, 2] = 0.9  # a stray blob stage 1 hallucinated on the wall
    # 64 -> 1918x1280: x scales by 29.97, y by 20
    assert box_from_probability(prob, 1918, 1280, margin=32, threshold=0.5) == (
        int(np.floor(10 * 1918 / 64)) - 32,
        20 * 20 - 32,
        int(np.ceil(50 * 1918 / 64)) + 32,
        40 * 20 + 32,
    )
    assert box_from_probability(np.zeros((64, 64)), 1918, 1280, 32, 0.5) is None


def test_car_touching_left_and_right_edges_is_clamped():
    prob = np.zeros((64, 64), np.float32)
    prob[20:40, 0:64] = 0.9
    assert box_from_probability(prob, 1918, 1280, margin=32, threshold=0.5) == (0, 368, 1918, 832)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_scaled_expanded_box_covers_the_object_and_stays_inside(w, h, data):
    x0 = data.draw(st.integers(0, w - 1))
    y0 = data.draw(st.integers(0, h - 1))
    x1 = data.draw(st.integers(x0 + 1, w))
    y1 = data.draw(st.integers(y0 + 1, h))
    W, H = data.draw(st.integers(w, 4 * w)), data.draw(st.integers(h, 4 * h))
    sx, sy = W / w, H / h
    bx0, by0, bx1, by1 = expand_box(scale_box((x0, y0, x1, y1), sx, sy), data.draw(st.integers(0, 50)), W, H)
    assert 0 <= bx0 <= x0 * sx and bx1 >= min(x1 * sx, W) - 1e-9 and bx1 <= W
    assert 0 <= by0 <= y0 * sy and by1 >= min(y1 * sy, H) - 1e-9 and by1 <= H


@given(st.lists(st.integers(0, 2000), min_size=4, max_size=4), st.lists(st.integers(0, 300), min_size=4, max_size=4))
def test_each_side_grows_by_its_own_margin_within_the_image(corners, margin):
    x0, x1 = sorted(corners[:2])
    y0, y1 = sorted(corners[2:])
    box = (x0, y0, x1 + 1, y1 + 1)
    left, top, right, bottom = margin
    assert expand_box(box, margin, 2100, 2100) == (
        max(x0 - left, 0),
        max(y0 - top, 0),
        min(x1 + 1 + right, 2100),
        min(y1 + 1 + bottom, 2100),
    )
    assert expand_box(box, left, 2100, 2100) == expand_box(box, [left] * 4, 2100, 2100)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(0, 2**32 - 1))
def test_a_jittered_box_moves_each_side_by_at_most_the_amount_and_stays_a_box_in_the_image(amount, seed):
    box = (10, 20, 60, 50)
    jittered = jitter_box(box, amount, np.random.default_rng(seed), 80, 70)
    x0, y0, x1, y1 = jittered
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 70
    assert all(abs(side - was) <= amount for side, was in zip(jittered, box, strict=True)), jittered


def test_a_jittered_box_moves_every_side_both_ways_and_no_jitter_keeps_it():
    """Over many draws each side takes every offset within the amount (as a uniform draw does); amount 0
    is the box itself."""
    rng = np.random.default_rng(0)
    box = (100, 200, 600, 500)
    offsets = np.array([jitter_box(box, 5, rng, 800, 700) for _ in range(2000)]) - box
    assert all(set(side) == set(range(-5, 6)) for side in offsets.T)
    assert jitter_box(box, 0, rng, 800, 700) == box


def test_windowed_upsample_equals_the_full_one():
    import torch

    from stage1_lowres.coarse import upsample

    prob = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))
    full = upsample(prob, 1918, 1280)
    for window in [(0, 0, 256, 256), (1662, 1024, 1918, 1280), (700, 300, 1084, 684)]:
        x0, y0, x1, y1 = window
        torch.testing.assert_close(upsample(prob, 1918, 1280, window), full[y0:y1, x0:x1], atol=1e-5, rtol=0)
