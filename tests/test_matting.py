"""Clean edges: in the soft band of the alpha the cutout carries the car's own colour, not the studio's
it was photographed on; the alpha, the opaque car and the transparent studio are the photo's."""

from __future__ import annotations

import numpy as np
import torch

from common.prediction.step import Prediction
from pipelines.matting import alpha as alpha_of
from pipelines.matting import foreground
from pipelines.picture import Cut, Picture


def _studio_shot() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A red, shaded car of known colour with a soft rim (the cascade's alpha of it), composited on a
    grey studio with a gradient: (photo, alpha, the car's true colour), uint8 / float (H, W, 3)."""
    yy, xx = torch.meshgrid(torch.arange(240.0), torch.arange(320.0), indexing="ij")
    r = (((yy - 120) / 80) ** 2 + ((xx - 160) / 120) ** 2).sqrt() * 80
    alpha = alpha_of(Prediction(320, 240, (0, 0, 320, 240), True, None, torch.sigmoid((80 - r) / 1.5)), 0.5)
    car = torch.stack([150 + 40 * torch.sin(xx / 17), 30 + 20 * torch.cos(yy / 23), torch.full_like(xx, 40)], -1)
    studio = (190 + 10 * yy / 240)[..., None].expand(-1, -1, 3)
    a = alpha.float()[..., None] / 255
    return (a * car + (1 - a) * studio).round().to(torch.uint8), alpha, car


def _cut(photo: torch.Tensor, alpha: torch.Tensor, box=(0, 0, 320, 240)) -> Cut:
    return Cut(photo.numpy(), alpha.numpy() >= 128, alpha.numpy(), box, True)


def test_the_soft_edge_gets_the_cars_colour_and_nothing_else_changes():
    photo, alpha, car = _studio_shot()
    clean = foreground(photo, alpha)
    band = (alpha > 0) & (alpha < 255)
    assert band.sum() > 1000
    naive = (photo.float() - car)[band].abs().mean()  # the photo's pixels: the studio mixed in
    assert (clean.float() - car)[band].abs().mean() < naive / 10  # measured: 0.024 of it
    assert torch.equal(clean[~band], photo[~band])  # opaque car and transparent studio: the photo's own pixels
    rgba = _cut(photo, alpha).pixels(Picture("rgba"))
    np.testing.assert_array_equal(rgba[..., 3], alpha.numpy())
    np.testing.assert_array_equal(rgba[..., :3], clean.numpy())
    np.testing.assert_array_equal(_cut(photo, alpha).pixels(Picture("rgba", clean_edges=False))[..., :3], photo.numpy())


def test_a_composite_on_white_shows_no_grey_fringe():
    photo, alpha, car = _studio_shot()
    a = alpha.numpy()[..., None] / 255
    truth = a * car.numpy() + (1 - a) * 255  # the car photographed on white
    band = (alpha > 0) & (alpha < 255)
    for clean, most in ((False, 10.0), (True, 1.0)):  # levels of mean error in the band
        on_white = _cut(photo, alpha).pixels(Picture("composite", clean_edges=clean, background="white")).astype(float)
        error = np.abs(on_white - truth)[band.numpy()].mean()
        assert (error > most) if not clean else (error < most), (clean, error)


def test_a_crop_is_the_crop_of_the_whole_picture_and_a_hard_alpha_changes_nothing():
    photo, alpha, _ = _studio_shot()
    box = (40, 30, 290, 210)
    whole = _cut(photo, alpha, box).pixels(Picture("rgba"))
    np.testing.assert_array_equal(_cut(photo, alpha, box).pixels(Picture("rgba", crop=True)), whole[30:210, 40:290])
    hard = (alpha >= 128).to(torch.uint8) * 255
    assert foreground(photo, hard) is photo
