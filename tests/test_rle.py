import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.data.rle import rle_decode, rle_encode


def reference_encode(mask):
    """The textbook kernel, as an independent oracle."""
    p = np.concatenate([[0], mask.ravel().astype(np.int8), [0]])
    runs = np.where(p[1:] != p[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(map(str, runs))


def test_readme_example():
    m = np.zeros((4, 4), bool)
    m.flat[[6, 7, 10, 11]] = True
    assert rle_encode(m) == "7 2 11 2"
    assert (rle_decode("7 2 11 2", (4, 4)) == m).all()


@pytest.mark.parametrize("name", ["empty", "full", "first", "last", "singles", "first_and_last"])
def test_edge_cases_round_trip(name):
    m = np.zeros((5, 7), bool)
    if name == "full":
        m[:] = True
    elif name == "first":
        m.flat[0] = True
    elif name == "last":
        m.flat[-1] = True
    elif name == "singles":
        m.flat[::2] = True
    elif name == "first_and_last":
        m.flat[[0, -1]] = True
    s = rle_encode(m)
    assert s == reference_encode(m)
    assert (rle_decode(s, m.shape) == m).all()


def test_known_encodings():
    m = np.zeros((2, 3), bool)
    assert rle_encode(m) == ""
    m.flat[0] = True
    assert rle_encode(m) == "1 1"
    m[:] = True
    assert rle_encode(m) == "1 6"
    m[:] = False
    m.flat[-1] = True
    assert rle_encode(m) == "6 1"


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_random_round_trip(m):
    s = rle_encode(m)
    assert s == reference_encode(m)
    assert (rle_decode(s, m.shape) == m).all()


def test_full_resolution_round_trip():
    rng = np.random.default_rng(0)
    m = rng.random((1280, 1918)) > 0.5
    assert (rle_decode(rle_encode(m), m.shape) == m).all()


@pytest.mark.parametrize("bad", ["1", "0 3", "5 100", "1 -2"])
def test_decode_rejects_malformed(bad):
    with pytest.raises(ValueError):
        rle_decode(bad, (3, 3))
