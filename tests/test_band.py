"""The band refiner's geometry (`stage2.refine: band`): where stage 1 may be wrong (the band), and the
patches that cover it, property-tested against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stage2_fullres.band import MAX_PATCHES, TooManyPatches, band_of, core_of, occupied_cells, plan_patches


def lower_bound(band: np.ndarray, cell: int) -> int:
    """A number of cell-sized squares no cover of `band` can do with fewer than: band pixels picked
    greedily at Chebyshev distance >= `cell` from each other, which no single square can hold two of.
    The grid's patches are at most FACTOR times it: every band pixel lies within `cell` of a picked one,
    so the band fits in squares of 2 * cell - 1 around them, each meeting at most 3 x 3 cells."""
    picked: list[tuple[int, int]] = []
    for y, x in zip(*np.nonzero(band), strict=True):
        if all(max(abs(y - py), abs(x - px)) >= cell for py, px in picked):
            picked.append((int(y), int(x)))
    return len(picked)


FACTOR = 9  # patches planned, at most, per square of `lower_bound`


@st.composite
def bands(draw):
    """A band mask of a small image, and patch settings (the patch may be larger than the image)."""
    height, width = draw(st.integers(8, 90)), draw(st.integers(8, 90))
    patch = draw(st.integers(6, 48))
    context = draw(st.integers(0, (patch - 2) // 2))
    density = draw(st.sampled_from([0.0, 0.002, 0.02, 0.2, 1.0]))
    band = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random((height, width)) < density
    return band, patch, context


@settings(max_examples=300, deadline=None)
@given(bands())
def test_patches_cover_the_band_with_their_centres_inside_the_image_each_once(case):
    band, patch, context = case
    height, width = band.shape
    cell = core_of(patch, context)
    occupied = occupied_cells(torch.from_numpy(band), cell).numpy()
    patches = plan_patches(occupied, width, height, patch, context)
    kept = np.zeros_like(band)
    for (x0, y0, x1, y1), cores in patches:
        assert x1 - x0 == y1 - y0 == patch
        for length, start in ((width, x0), (height, y0)):  # inside the image; at 0 along an axis shorter than the patch
            assert (0 <= start <= length - patch) if length >= patch else start == 0
        for cx0, cy0, cx1, cy1 in cores:
            assert x0 <= cx0 < cx1 <= x1 and y0 <= cy0 < cy1 <= y1  # the kept centre lies in what the refiner sees
            assert not kept[cy0:cy1, cx0:cx1].any()  # no pixel kept twice
            kept[cy0:cy1, cx0:cx1] = True
    assert not (band & ~kept).any()  # every band pixel lies in some patch's centre
    assert len({window for window, _ in patches}) == len(patches)  # no two patches alike
    assert len(patches) <= FACTOR * lower_bound(band, cell)  # and within FACTOR of what any cover needs


def test_occupied_cells_are_the_cells_that_hold_a_band_pixel():
    rng = np.random.default_rng(0)
    band = rng.random((37, 53)) > 0.97
    cells = occupied_cells(torch.from_numpy(band), 8).numpy()
    assert cells.shape == (5, 7)
    for r in range(5):
        for c in range(7):
            assert cells[r, c] == band[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].any()


def test_the_band_is_the_pixels_near_the_contour_and_the_uncertain_ones_inside_the_box():
    """Against a direct computation: a pixel is in the band when within `band` px (Chebyshev) of a pixel
    on the other side of the 0.5 contour, or when its probability lies in (0.1, 0.9); never outside the box."""
    rng = np.random.default_rng(1)
    prob = np.clip(rng.random((40, 60)) * 0.2 + (np.add.outer(np.arange(40), np.arange(60)) > 50), 0, 1).astype(
        np.float32
    )
    prob[30, 10] = 0.5  # uncertain, far from the contour
    box, r = (2, 3, 58, 37), 3
    got = band_of(torch.from_numpy(prob), box, r).numpy()
    car = prob > 0.5
    want = np.zeros_like(car)
    for y in range(box[1], box[3]):
        for x in range(box[0], box[2]):
            ys, xs = (
                slice(max(y - r, box[1]), min(y + r + 1, box[3])),
                slice(max(x - r, box[0]), min(x + r + 1, box[2])),
            )
            near = (car[ys, xs] != car[y, x]).any()
            want[y, x] = near or 0.1 < prob[y, x] < 0.9
    np.testing.assert_array_equal(got, want)
    assert got[30, 10] and not got[:3].any() and not got[:, :2].any()


def test_a_band_too_large_for_the_patch_settings_is_refused_naming_them():
    occupied = np.ones((50, 50), bool)  # 2500 cells
    assert 2500 > MAX_PATCHES
    with pytest.raises(TooManyPatches, match="stage2.patch=16 and stage2.context=4 needs 2500 patches"):
        plan_patches(occupied, 400, 400, 16, 4)


def _cascade(*more, stage1=None, refiner=None):
    from helpers import tiny_config

    from common.model import UNet
    from stage1_lowres.coarse import Coarse
    from stage2_fullres.cascade import Cascade

    cfg = tiny_config("unused", "unused", "stage1.size=32", "stage2.refine=band", *more)
    torch.manual_seed(0)
    stage1, refiner = stage1 or UNet(3, 2, 4).eval(), refiner or UNet(4, 3, 4, prior_skip=True).eval()
    return Cascade(Coarse(stage1, cfg, CPU), refiner, cfg, CPU)


CPU = torch.device("cpu")


def test_an_untrained_band_refiner_gives_back_stage_1_inside_the_box_and_nothing_outside():
    """The residual refiner starts at zero: on the band's patches it returns stage 1's probability, so
    the whole band path (band, cells, patches cut, refined, centres pasted) gives back stage 1 inside the
    box; outside the box nothing, as with tiles; the patches are the prediction's windows."""
    cascade = _cascade("stage2.band=4", "stage2.patch=32", "stage2.context=8")
    image = torch.randint(0, 256, (3, 90, 150), dtype=torch.uint8)
    box = (5, 10, 140, 85)
    pred = cascade.predict([image], [box])[0]
    x0, y0, x1, y1 = box
    torch.testing.assert_close(
        pred.prob[y0:y1, x0:x1], pred.coarse[y0:y1, x0:x1].clamp(1e-4, 1 - 1e-4), atol=1e-5, rtol=0
    )
    outside = torch.ones(90, 150, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert pred.prob[outside].eq(0).all()
    band = band_of(pred.coarse, box, 4)
    assert band.any() and pred.windows and all(w[2] - w[0] == 32 for w in pred.windows)


def test_the_refiners_probability_replaces_stage_1s_on_the_band_and_nowhere_else():
    """Stage 1 sure of a car in the middle, a refiner that says 0.7 everywhere: inside the box the answer
    is 0.7 exactly on the band's pixels and stage 1's probability on the others."""

    class Square(torch.nn.Module):  # stage 1: a car in the middle of its 32 px input
        args = {"in_channels": 3}

        def forward(self, x):
            logits = torch.full((len(x), 1, *x.shape[-2:]), -10.0)
            logits[..., 8:24, 8:24] = 10.0
            return logits

    class Says07(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 1, *x.shape[-2:]), math.log(0.7 / 0.3))

    cascade = _cascade("stage2.band=4", "stage2.patch=32", "stage2.context=8", stage1=Square(), refiner=Says07())
    image = torch.randint(0, 256, (3, 90, 150), dtype=torch.uint8)
    box = (5, 10, 140, 85)
    pred = cascade.predict([image], [box])[0]
    x0, y0, x1, y1 = box
    band = band_of(pred.coarse, box, 4)[y0:y1, x0:x1]
    inside, coarse = pred.prob[y0:y1, x0:x1], pred.coarse[y0:y1, x0:x1]
    assert band.any() and (~band).any()
    torch.testing.assert_close(inside[band], torch.full_like(inside[band], 0.7))
    torch.testing.assert_close(inside[~band], coarse[~band])


def test_a_photo_without_an_outline_is_stage_1s_answer_and_a_band_too_large_fails_that_photo_alone():
    from common.errors import Failure

    class Sure(torch.nn.Module):  # stage 1 sure of "no car" everywhere: no contour, nothing uncertain
        args = {"in_channels": 3}

        def forward(self, x):
            return torch.full((len(x), 1, *x.shape[-2:]), -20.0)

    cascade = _cascade()
    cascade.coarse.net = Sure()
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    pred = cascade.predict([image], [(0, 0, 80, 60)])[0]
    assert pred.windows == () and torch.equal(pred.prob, pred.coarse)

    noisy = _cascade("stage2.band=0", "stage2.patch=16", "stage2.context=4")  # 8 px cells: 4096 on a 512 px photo
    big = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)
    noisy.coarse.probs = lambda images: torch.full((len(images), 32, 32), 0.5)  # unsure everywhere: all band
    results = noisy.predict([big, image], [(0, 0, 512, 512), (0, 0, 80, 60)])
    assert isinstance(results[0], Failure) and "patches" in results[0].reason and results[0].stage == "stage2"
    assert results[1].prob.shape == (60, 80)


def test_band_training_crops_centre_on_the_outline_at_full_resolution_from_stage_1s_small_mask():
    """Training with the band centres crops on outline points; stage 1's come from its small mask, scaled:
    a rectangle at a quarter of the size gives points on the full-size rectangle's edges, as the full-size
    mask's own do."""
    from stage2_fullres.train import outline_points

    small = np.zeros((10, 12), bool)
    small[3:7, 2:9] = True
    big = np.kron(small, np.ones((4, 4), bool))  # rows 12..27, columns 8..35
    for points in (outline_points(small) * 4, outline_points(big)):
        y, x = points[:, 0], points[:, 1]
        on_row = np.isin(y, (12, 28)) & (x >= 8) & (x <= 36)
        on_column = np.isin(x, (8, 36)) & (y >= 12) & (y <= 28)
        assert (on_row | on_column).all()
        assert {12.0, 28.0} <= set(y) and {8.0, 36.0} <= set(x)  # all four sides


def test_band_training_spends_most_crops_on_the_outline(sample_root, tmp_path):
    """With the band, training crops centre on the car's outline three times in four, so most of them hold
    car and background; with tiles a crop centres anywhere in the box and fewer do."""
    from common.config import load_config
    from common.data.kaggle import index_split
    from common.training.batches import scan_pairs
    from stage2_fullres.train import CropDataset

    pairs, _ = scan_pairs(index_split(sample_root)[::4], keep=False)
    boxes = {p.sample.img: p.box for p in pairs}
    share = {}
    for mode in ("tiles", "band"):
        words = [f"stage2.refine={mode}", "stage2.crop=64", "stage2.crops_per_image=4", "stage2.coarse_channel=false"]
        s = load_config(None, words).stage2
        crops = CropDataset(pairs, boxes, s, None, tmp_path / mode)
        masks = torch.cat([crops[i, epoch][1] for i in range(len(pairs)) for epoch in range(4)])
        share[mode] = float(((masks.amax((1, 2, 3)) == 1) & (masks.amin((1, 2, 3)) == 0)).float().mean())
    # three in four on the outline, the rest as with tiles: about 0.75 + 0.25 x tiles' share
    assert len(pairs) >= 8 and share["band"] >= 0.75 and share["band"] - share["tiles"] >= 0.3, share


def test_the_servers_warm_up_runs_the_band_refiner_at_each_padded_patch_count():
    """A blank warm-up photo has no outline, so with the band the server warms the refiner up on its own,
    once for each patch count its calls are padded to (here 3, as on a GPU), with the coarse channel."""
    from types import SimpleNamespace

    from pipelines.serve.batcher import Batcher

    cascade = _cascade("stage2.band=4", "stage2.patch=32", "stage2.context=8")
    cascade.buckets = (3,)  # what batch_buckets gives on CUDA or when compiled; none on a CPU
    shapes, photos = [], []
    refiner = cascade.refiner
    cascade.refiner = lambda x: shapes.append(tuple(x.shape)) or refiner(x)
    batcher = SimpleNamespace(
        cfg=SimpleNamespace(predict=SimpleNamespace(compile=False)), _predict=lambda c, blank: photos.append(len(blank))
    )
    Batcher.warm_up(batcher, cascade)
    assert photos == [1] and shapes == [(3, 4, 32, 32)]
