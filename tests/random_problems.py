"""Random attention problems for the property tests: shapes with broadcast leading axes and
grouped heads, and whether the correctness rule is a steady test of a 16-bit result."""

import math

import numpy as np
from hypothesis import strategies as st

from cuflash import _mask


@st.composite
def grouped_shapes(draw, head_dims, max_length):
    """``dict(q_shape=, k_shape=, v_shape=)``: up to two batch axes, each of which an input may
    drop or broadcast; 1-3 key/value heads with 1-3 query heads each; lengths 1 to
    ``max_length``; D and Dv drawn from ``head_dims``."""
    batch = draw(st.lists(st.integers(1, 3), max_size=2))

    def leading():  # each input drops or broadcasts some of the batch axes
        kept = batch[draw(st.integers(0, len(batch))):]
        return tuple(n if draw(st.booleans()) else 1 for n in kept)

    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, max_length)), draw(st.integers(1, max_length))
    d, dv = draw(head_dims), draw(head_dims)
    return dict(q_shape=leading() + (hq, nq, d), k_shape=leading() + (hkv, nk, d),
                v_shape=leading() + (hkv, nk, dv))


def rows_attending(nq, nk, window=(-1, -1), causal=False):
    """How many of the ``nq`` query rows see at least one key."""
    left, right = _mask.band(window, causal)
    begin, end = _mask.key_range(np.arange(nq), nq, nk, left, right)
    return int((end > begin).sum())


def stable_for_16_bits(q_shape, k_shape, v_shape, *, causal, window=(-1, -1), elements=1024):
    """Whether the rule is a steady test of a 16-bit result of these shapes.

    The rule compares the maxima of two sets of rounding errors, which is a steady statistic only
    over enough attended rows, keys and elements (``elements``: of the output, counted over the
    broadcast batch); smaller problems run in float32, where the 1e-5 term dominates.
    """
    (hq, nq, d), (hkv, nk, dv) = q_shape[-3:], v_shape[-3:]
    rows = rows_attending(nq, nk, window, causal)
    batch = math.prod(np.broadcast_shapes(q_shape[:-3], k_shape[:-3], v_shape[:-3]))
    width = min(d, dv)
    return (min(nq, nk, d, dv) >= 16
            and batch * hq * rows * width >= elements
            and math.prod(q_shape[:-3]) * hq * rows * d >= 1024
            and math.prod(k_shape[:-3]) * hkv * nk * width >= 1024)
