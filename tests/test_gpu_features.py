"""Sliding windows, softcap and ALiBi on the GPU kernels against the float64 oracle, forward and
backward; the same cases run on the NumPy path.

Two grids: every dtype × head dimension (``D = Dv`` from 32 to 256, and ``Dv ≠ D``) with all
three features at once, and every dtype × feature (each window shape, windows that leave rows
empty, softcap 30 and 5, ALiBi per head and per batch element, and their combinations with
causal, grouped heads and a block mask) at ``D = 64``. Sizes are odd and around 100–700 tokens.
"""

import ml_dtypes
import numpy as np
import pytest
from oracle import check_forward_and_backward, random_array

from cuflash.sparse import BlockMask

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]
DTYPE_IDS = ["float16", "bfloat16", "float32"]


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """Each case runs on CuPy arrays (the CUDA kernels) and on NumPy arrays (cuflash.cpu)."""
    if request.param == "numpy":
        return np
    return request.getfixturevalue("xp_gpu")


def run_case(xp, rng, seed, *, dtype, b=2, hq=4, hkv=2, nq=257, nk=301, d=64, dv=None,
             causal=False, window=(-1, -1), softcap=0.0, alibi=None, block=None,
             deterministic=False):
    """Forward (into a NaN-poisoned ``out``) and backward of one case, each checked by the rule.

    ``alibi``: None, ``"heads"`` (slopes ``(Hq,)``) or ``"batch"`` (``(B, Hq)``); ``block``:
    None or the block size of a random block mask (one pattern per query head).
    """
    dv = dv or d
    q = random_array(rng, (b, hq, nq, d), dtype, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    v = random_array(rng, (b, hkv, nk, dv), dtype, xp=xp)
    slopes = None
    if alibi is not None:
        # ALiBi's geometric slopes 2^(-8h/Hq), times a random factor so heads differ per batch.
        base = 2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)
        shape = (hq,) if alibi == "heads" else (b, hq)
        slopes = xp.asarray((base * rng.uniform(0.5, 1.5, shape)).astype(np.float32))
    block_mask = None
    if block is not None:
        layout = rng.random((hq, -(-nq // block), -(-nk // block))) < 0.6
        layout[..., np.arange(min(layout.shape[1:])), np.arange(min(layout.shape[1:]))] = True
        block_mask = BlockMask.from_dense(layout, block_size=block, shape=(nq, nk))
    options = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes,
                   block_mask=block_mask)
    context = f"seed={seed}, {options | dict(alibi_slopes=alibi)}"
    return check_forward_and_backward(q, k, v, options, rng=rng, deterministic=deterministic,
                                      context=context)


# ----------------------------------------------------------------------------- dtype × head dim

HEAD_DIMS = [(32, 32), (64, 64), (96, 96), (128, 128), (256, 256), (64, 128), (128, 64)]


@pytest.mark.parametrize("d, dv", HEAD_DIMS, ids=[f"{d}-{dv}" for d, dv in HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_head_dims_with_every_feature(xp, rng, seed, dtype, d, dv):
    run_case(xp, rng, seed, dtype=dtype, d=d, dv=dv, nq=231, nk=303, window=(61, 17),
             softcap=30.0, alibi="heads")


# ----------------------------------------------------------------------------- dtype × feature

FEATURES = {
    "window-unbounded-left": dict(window=(-1, 37)),
    "window-unbounded-right": dict(window=(53, -1)),
    "window-left-only": dict(window=(53, 0)),
    "window-diagonal": dict(window=(0, 0), nq=301, nk=301),
    # Nq > Nk: rows i < Nq - Nk - right see no key (output 0, lse -inf, dq 0).
    "window-empty-rows": dict(window=(20, 5), nq=501, nk=203),
    "window-causal": dict(window=(7, 3), causal=True),
    "softcap-30": dict(softcap=30.0),
    "softcap-5": dict(softcap=5.0),
    "alibi-heads": dict(alibi="heads"),
    "alibi-batch": dict(alibi="batch"),
    "softcap-alibi-window": dict(softcap=5.0, alibi="batch", window=(128, 64)),
    "causal-softcap-alibi-mqa": dict(causal=True, softcap=30.0, alibi="heads", hkv=1,
                                     nq=333, nk=211),
    "block-mask-window": dict(block=64, window=(200, 0), nq=383, nk=447),
    "block-mask-softcap-alibi-causal": dict(block=128, softcap=5.0, alibi="batch", causal=True,
                                            nq=449, nk=383),
    "everything": dict(block=64, window=(150, 40), causal=True, softcap=30.0, alibi="batch",
                       hkv=1, nq=391, nk=257, d=64, dv=128),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_features(xp, rng, seed, dtype, feature):
    out, lse, grads = run_case(xp, rng, seed, dtype=dtype, **FEATURES[feature])
    if feature == "window-empty-rows":  # also checked by the oracle; spelled out here
        host = out.get() if xp is not np else out
        host_lse = lse.get() if xp is not np else lse
        dq = grads[0].get() if xp is not np else grads[0]
        empty = 501 - 203 - 5
        assert np.all(host[:, :, :empty].astype(np.float32) == 0)
        assert np.all(np.isneginf(host_lse[:, :, :empty]))
        assert np.all(dq[:, :, :empty].astype(np.float32) == 0)


@pytest.mark.parametrize("feature", ["window-left-only", "softcap-alibi-window"])
def test_long_sequences(xp, rng, seed, feature):
    run_case(xp, rng, seed, **{**FEATURES[feature], "dtype": ml_dtypes.bfloat16, "b": 1,
                               "nq": 701, "nk": 699, "d": 128})


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=DTYPE_IDS[:2])
def test_deterministic_backward_with_features(xp, seed, dtype):
    # The same inputs twice (a generator from the same seed): bit-identical gradients.
    options = dict(dtype=dtype, window=(90, 10), softcap=30.0, alibi="batch", causal=True,
                   deterministic=True)
    first = run_case(xp, np.random.default_rng(seed), seed, **options)[2]
    second = run_case(xp, np.random.default_rng(seed), seed, **options)[2]
    for a, b in zip(first, second):
        a, b = (x.get() if xp is not np else x for x in (a, b))
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
