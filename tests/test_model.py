import pytest
import torch
import torch.nn.functional as F

from common.model import UNet
from common.training.losses import bce_dice_loss, edge_band


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 37, 90), (1, 4, 130, 70)])
def test_unet_keeps_any_spatial_size(shape):
    net = UNet(in_channels=shape[1], depth=4, width=4).eval()
    assert net(torch.rand(shape)).shape == (shape[0], 1, *shape[2:])


def test_prior_skip_starts_from_the_coarse_mask():
    net = UNet(in_channels=4, depth=3, width=4, prior_skip=True).eval()
    x = torch.rand(1, 4, 32, 32)
    x[:, 3] = (torch.rand(32, 32) > 0.5).float() * 0.98 + 0.01
    prob = torch.sigmoid(net(x))[0, 0]
    assert torch.allclose(prob, x[0, 3], atol=1e-4)


def test_edge_band_marks_the_boundary_only():
    t = torch.zeros(1, 1, 20, 20)
    t[..., 5:15, 5:15] = 1
    band = edge_band(t, radius=1)
    assert band[0, 0, 10, 10] == 0 and band[0, 0, 0, 0] == 0
    assert band[0, 0, 5, 10] == 1 and band[0, 0, 4, 10] == 1


@pytest.mark.parametrize("radius", [0, 1, 3, 5])
def test_edge_band_equals_the_square_max_pool_definition(radius):
    """The axis-by-axis window maximum gives the band a (2r+1)^2 max-pool gives, edges included."""
    g = torch.Generator().manual_seed(radius)
    for shape in [(2, 1, 37, 53), (1, 1, 4, 9)]:
        t = (torch.rand(*shape, generator=g) > 0.5).float()
        k = 2 * radius + 1
        square = F.max_pool2d(t, k, stride=1, padding=radius) + F.max_pool2d(-t, k, stride=1, padding=radius)
        assert torch.equal(edge_band(t, radius), square)


def test_loss_is_low_for_right_and_high_for_wrong_logits():
    t = torch.zeros(1, 1, 8, 8)
    t[..., 2:6, 2:6] = 1
    good, bad = (t * 2 - 1) * 10, (1 - 2 * t) * 10
    assert bce_dice_loss(good, t) < 0.01 < 5 < bce_dice_loss(bad, t)
    assert bce_dice_loss(bad, t, edge_weight=5) > bce_dice_loss(bad, t)


def test_augmentations_keep_mask_and_extra_channel_aligned():
    from common.training.augment import augment_batch

    y = torch.zeros(4, 1, 64, 64)
    y[:, :, 20:40, 5:30] = 1
    x = torch.cat([torch.rand(4, 3, 64, 64), y.clone()], 1)  # 4th channel = the mask itself
    gen = torch.Generator().manual_seed(0)
    xa, ya = augment_batch(x, y, gen, scale=0.2, shift=0.2)
    assert not torch.equal(ya, y)  # something moved
    agree = ((xa[:, 3:] > 0.5).float() == ya).float().mean()
    assert agree > 0.995  # geometry applied identically (bilinear edges aside)
    assert xa[:, :3].min() >= 0 and xa[:, :3].max() <= 1


def test_flip_augmentation_only_mirrors():
    """augment=flip moves no pixel off the grid: each image and its mask are both kept or both mirrored."""
    from common.training.augment import augment_batch

    x, y = torch.rand(16, 4, 8, 12), (torch.rand(16, 1, 8, 12) > 0.5).float()
    xa, ya = augment_batch(x, y, torch.Generator().manual_seed(0), "flip")
    mirrored = [bool(torch.equal(xa[i], x[i].flip(-1))) for i in range(16)]
    assert 0 < sum(mirrored) < 16
    for i in range(16):
        assert torch.equal(xa[i], x[i].flip(-1) if mirrored[i] else x[i])
        assert torch.equal(ya[i], y[i].flip(-1) if mirrored[i] else y[i])


def test_flip_tta_averages_with_the_mirrored_prediction():
    """Both stages: mirrored inputs ride in the same forward pass and are flipped back before averaging."""
    from common.config import load_config
    from stage1_lowres.coarse import Coarse
    from stage2_fullres.cascade import Cascade

    class Ramp(torch.nn.Module):  # predicts a left-to-right ramp whatever the input
        def forward(self, x):
            return torch.linspace(-3, 3, x.shape[-1]).expand(x.shape[0], 1, *x.shape[-2:])

    image = torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8)
    probs = {}
    for flip in (False, True):
        cfg = load_config(
            None, ["stage2.tile=32", "stage2.min_overlap=8", "stage2.coarse_channel=false", f"predict.tta_flip={flip}"]
        )
        probs[flip] = Cascade(None, Ramp(), cfg, torch.device("cpu")).predict([image], [(0, 0, 50, 40)])[0].prob
    assert probs[False][0, 0] < 0.1 and probs[False][0, -1] > 0.9  # the ramp, stitched over two tiles
    torch.testing.assert_close(probs[True], torch.full((40, 50), 0.5), atol=1e-6, rtol=0)
    coarse = {
        flip: Coarse(
            Ramp(), load_config(None, ["stage1.size=16", f"predict.tta_flip={flip}"]), torch.device("cpu")
        ).probs([image])[0]
        for flip in (False, True)
    }
    assert coarse[False][0, 0] < 0.1 and coarse[False][0, -1] > 0.9
    torch.testing.assert_close(coarse[True], torch.full((16, 16), 0.5), atol=1e-6, rtol=0)
