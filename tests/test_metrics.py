import numpy as np
import pytest

from common.metrics import dice, mean_dice


def test_dice_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0  # empty vs empty
    b[0, 0] = True
    assert dice(a, b) == 0.0
    a[0, :2] = True
    assert dice(a, b) == pytest.approx(2 * 1 / 3)
    assert dice(b, b) == 1.0


def test_mean_is_over_images_not_pixels():
    big = np.ones((10, 10), bool)
    small_pred = np.zeros((10, 10), bool)
    small_truth = np.zeros((10, 10), bool)
    small_truth[0, 0] = True
    assert mean_dice([(big, big), (small_pred, small_truth)]) == pytest.approx(0.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2), bool), np.zeros((3, 2), bool))
