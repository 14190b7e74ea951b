import numpy as np
import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stage2_fullres.tiles import MAX_TILES, TooManyTiles, blend_weights, cut_tiles, plan_axis, plan_tiles, stitch


@st.composite
def image_and_box(draw, tiles=(64, 256, 1024), max_width=5000, max_height=3000):
    """A case a user can configure: an overlap of at most half the tile (the config refuses more) and
    an image the planner cuts into at most 15 x 11 = 165 tiles (within MAX_TILES), so that no draw
    costs more than a few MB of tiles."""
    tile = draw(st.sampled_from(tiles))
    overlap = draw(st.integers(0, tile // 2))
    w, h = draw(st.integers(16, min(max_width, 8 * tile))), draw(st.integers(16, min(max_height, 6 * tile)))
    x0, y0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    x1, y1 = draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))
    return w, h, (x0, y0, x1, y1), tile, overlap


def fewest_windows(lo: int, hi: int, length: int, tile: int, overlap: int) -> int:
    """The oracle, by brute force: the fewest windows of `tile` pixels inside [0, length) that cover
    [lo, hi), each overlapping the next by at least `overlap`: a breadth-first search over the
    windows' starts, k windows at step k."""
    last = length - tile  # the last start inside the image
    reached = {s for s in range(last + 1) if s <= lo}  # where a first window that reaches back to lo can start
    seen, count = set(reached), 1
    while reached:
        if any(s + tile >= hi for s in reached):
            return count
        reached = {t for s in reached for t in range(s + 1, min(s + tile - overlap, last) + 1)} - seen
        seen |= reached
        count += 1
    raise AssertionError("no chain of windows covers the span")


@settings(max_examples=500, deadline=None)
@given(image_and_box())
def test_planner_invariants(case):
    """Every window is tile x tile and inside the image (or at 0, padded, along an axis shorter than
    the tile); together they cover the box; neighbours overlap by at least min_overlap."""
    w, h, box, tile, overlap = case
    windows = plan_tiles(w, h, box, tile, overlap)
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in windows:
        assert x1 - x0 == tile and y1 - y0 == tile
        assert (0 <= x0 and x1 <= w) if w >= tile else x0 == 0
        assert (0 <= y0 and y1 <= h) if h >= tile else y0 == 0
        covered[y0:y1, x0:x1] = True
    bx0, by0, bx1, by1 = box
    assert covered[by0:by1, bx0:bx1].all()
    xs, ys = sorted({x0 for x0, _, _, _ in windows}), sorted({y0 for _, y0, _, _ in windows})
    for starts in (xs, ys):
        assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    assert windows == [(x, y, x + tile, y + tile) for y in ys for x in xs]  # a grid, row by row


@settings(max_examples=300, deadline=None)
@given(st.integers(8, 24), st.data())
def test_each_axis_gets_the_fewest_windows_a_brute_force_search_finds(tile, data):
    overlap = data.draw(st.integers(0, tile // 2))
    length = data.draw(st.integers(tile, 8 * tile))
    lo = data.draw(st.integers(0, length - 1))
    hi = data.draw(st.integers(lo + 1, length))
    starts = plan_axis(lo, hi, length, tile, overlap)
    assert len(starts) == fewest_windows(lo, hi, length, tile, overlap)
    assert starts[0] <= lo and starts[-1] + tile >= hi and all(0 <= s <= length - tile for s in starts)


def test_real_sized_boxes_need_at_most_two_tiles():
    # widths from the real data: 543..1918 px, heights 428..1018
    for width in (543, 1024, 1236, 1778, 1918):
        x0 = (1918 - width) // 2
        windows = plan_tiles(1918, 1280, (x0, 200, x0 + width, 1218), 1024, 64)
        assert len(windows) == (1 if width <= 1024 else 2)
    assert len(plan_axis(0, 3000, 3000, 1024, 64)) == 4  # wider than 2T - overlap: 3 or more


@settings(max_examples=300, deadline=None)
@given(st.integers(16, 1024), st.data())
def test_planner_refuses_more_tiles_than_the_limit_and_names_the_settings(tile, data):
    """Any overlap below the tile, any image: the planner returns the windows, or refuses when they
    would be more than MAX_TILES (it never builds them), naming the settings and the count."""
    overlap = data.draw(st.integers(0, tile - 1))
    w, h = data.draw(st.integers(16, 5000)), data.draw(st.integers(16, 3000))
    x0, y0 = data.draw(st.integers(0, w - 1)), data.draw(st.integers(0, h - 1))
    box = (x0, y0, data.draw(st.integers(x0 + 1, w)), data.draw(st.integers(y0 + 1, h)))
    count = len(plan_axis(box[0], box[2], w, tile, overlap)) * len(plan_axis(box[1], box[3], h, tile, overlap))
    if count <= MAX_TILES:
        assert len(plan_tiles(w, h, box, tile, overlap)) == count
    else:
        with pytest.raises(
            TooManyTiles, match=rf"stage2.tile={tile} with stage2.min_overlap={overlap} .* into {count} tiles"
        ):
            plan_tiles(w, h, box, tile, overlap)


def test_an_overlap_next_to_the_tile_is_refused_not_planned():
    """The cases that once allocated gigabytes: one new window per pixel."""
    with pytest.raises(TooManyTiles, match="109025 tiles, more than the 256 allowed"):
        plan_tiles(700, 500, (0, 0, 700, 500), 256, 255)
    with pytest.raises(TooManyTiles, match="raise stage2.tile or lower stage2.min_overlap"):
        plan_tiles(1918, 1280, (0, 0, 1918, 1280), 1024, 1023)
    assert len(plan_tiles(1918, 1280, (0, 0, 1918, 1280), 1024, 512)) == 6  # the most overlap the config allows


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_tiles(100, 100, (10, 10, 10, 20), 64, 8)
    with pytest.raises(ValueError):
        plan_axis(0, 10, 100, 64, 64)


@settings(max_examples=60, deadline=None)
@given(image_and_box(max_width=1500, max_height=1000), st.sampled_from(["mean", "smooth"]))
def test_identity_model_stitches_back_exactly(case, blend):
    w, h, box, tile, overlap = case
    prob = torch.rand(h, w, generator=torch.Generator().manual_seed(0))
    windows = plan_tiles(w, h, box, tile, overlap)
    tiles = cut_tiles(prob[None], windows)[:, 0]  # the "model" returns its input channel
    out = stitch(tiles, windows, box, w, h, blend_weights(tile, blend))
    x0, y0, x1, y1 = box
    torch.testing.assert_close(out[y0:y1, x0:x1], prob[y0:y1, x0:x1], rtol=1e-5, atol=1e-6)
    outside = torch.ones(h, w, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert (out[outside] == 0).all()


@settings(max_examples=80, deadline=None)
@given(image_and_box(tiles=(64, 128, 256), max_width=700, max_height=500), st.sampled_from(["mean", "smooth"]))
def test_device_tiles_match_the_numpy_reference(case, blend):
    """Cutting (reflect padding at the edges of images smaller than a tile included), blending and
    stitching on tensors give what the numpy reference gives."""
    w, h, box, tile, overlap = case
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    windows = plan_tiles(w, h, box, tile, overlap)
    cut = cut_tiles(torch.from_numpy(image).permute(2, 0, 1), windows)
    np.testing.assert_array_equal(cut.permute(0, 2, 3, 1).numpy(), reference.cut_tiles(image, windows))
    np.testing.assert_allclose(blend_weights(tile, blend).numpy(), reference.blend_weights(tile, blend), rtol=1e-6)
    probs = rng.random((len(windows), tile, tile), dtype=np.float32)
    got = stitch(torch.from_numpy(probs), windows, box, w, h, blend_weights(tile, blend)).numpy()
    np.testing.assert_allclose(
        got, reference.stitch(probs, windows, box, w, h, reference.blend_weights(tile, blend)), atol=1e-6
    )


def test_blending_weights_sum_correctly_in_overlaps():
    """Two tiles predicting constants a and b: the overlap gets their weighted mean."""
    w, h, tile = 300, 100, 100
    box = (0, 0, 180, 100)
    windows = plan_tiles(w, h, box, tile, 20)
    assert len(windows) == 2
    tiles = torch.stack([torch.full((tile, tile), 0.2), torch.full((tile, tile), 0.8)])
    mean = stitch(tiles, windows, box, w, h, blend_weights(tile, "mean")).numpy()
    overlap_cols = range(windows[1][0], windows[0][2])
    assert np.allclose(mean[:, overlap_cols], 0.5) and np.allclose(mean[:, : windows[1][0]], 0.2)
    smooth = stitch(tiles, windows, box, w, h, blend_weights(tile, "smooth")).numpy()
    row = smooth[50, overlap_cols]
    assert (np.diff(row) >= -1e-6).all() and 0.2 < row[0] < row[-1] < 0.8  # fades from one tile to the other
    assert np.allclose(smooth[:, : windows[1][0]], 0.2)


def test_image_smaller_than_tile_is_reflect_padded():
    img = torch.arange(30 * 40, dtype=torch.float32).reshape(30, 40)
    windows = plan_tiles(40, 30, (0, 0, 40, 30), 64, 8)
    assert windows == [(0, 0, 64, 64)]
    tile = cut_tiles(img[None], windows)[0, 0]
    assert tile.shape == (64, 64) and (tile[:30, :40] == img).all() and tile[30, 0] == img[28, 0]
    out = stitch(tile[None], windows, (0, 0, 40, 30), 40, 30, blend_weights(64))
    torch.testing.assert_close(out, img)


def test_real_photo_round_trips_through_tiles(real_samples):
    """A real 1918x1280 test photo cut into the planned tiles and stitched back is unchanged inside the box."""
    from common.data.images import read_image

    image = torch.from_numpy(read_image(sorted((real_samples / "test_fullres").glob("*.jpg"))[4])).permute(2, 0, 1)
    assert image.shape == (3, 1280, 1918)
    box = (60, 300, 1860, 1100)  # a wide side view: two tiles
    windows = plan_tiles(1918, 1280, box, 1024, 64)
    assert len(windows) == 2
    tiles = cut_tiles(image.float(), windows)
    for channel in range(3):
        out = stitch(tiles[:, channel], windows, box, 1918, 1280, blend_weights(1024, "smooth"))
        torch.testing.assert_close(out[300:1100, 60:1860], image[channel, 300:1100, 60:1860].float(), atol=1e-3, rtol=0)
