import numpy as np
import pytest

from common.metrics import dice


def test_dice_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0  # empty vs empty
    b[0, 0] = True
    assert dice(a, b) == 0.0
    a[0, :2] = True
    assert dice(a, b) == pytest.approx(2 * 1 / 3)
    assert dice(b, b) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2), bool), np.zeros((3, 2), bool))


def test_dice_sweep_equals_dice_at_each_threshold():
    import torch

    from common.metrics import sweep_counts, sweep_dice

    def dice_sweep(prob, truth, thresholds):  # the counts on the device, the scores from them, as evaluate does
        return sweep_dice(sweep_counts(prob, truth, thresholds))

    g = torch.Generator().manual_seed(0)
    prob = torch.rand(60, 80, generator=g)
    prob[0, :4] = torch.tensor([0.1, 0.35, 0.5, 0.9])  # exactly on thresholds: strict >, as the masks use
    truth = torch.rand(60, 80, generator=g) > 0.5
    thresholds = [0.1, 0.35, 0.5, 0.9]
    assert dice_sweep(prob, truth, thresholds) == pytest.approx([dice(prob > t, truth) for t in thresholds], abs=1e-6)
    empty = torch.zeros(5, 5, dtype=torch.bool)
    assert dice_sweep(torch.zeros(5, 5), empty, thresholds) == [1.0] * 4  # nothing predicted, nothing true
