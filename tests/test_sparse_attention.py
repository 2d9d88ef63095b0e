"""Block-sparse attention against the float64 oracle with the equivalent element mask, on the
NumPy path and on the GPU (the same cases through both back ends)."""

import ml_dtypes
import numpy as np
import pytest
import scipy.sparse as sp

import cuflash
from cuflash.sparse import BlockMask, butterfly, image_local, sliding_window
from oracle import assert_backward_close, assert_forward_close, poisoned, random_array



@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """Each case runs on NumPy arrays (cuflash.cpu) and on CuPy arrays (the CUDA kernels)."""
    if request.param == "numpy":
        return np
    return request.getfixturevalue("xp_gpu")


def random_block_mask(rng, nq, nk, block, *, density, heads=None, keep_diagonal=True):
    nqb, nkb = -(-nq // block), -(-nk // block)
    shape = (nqb, nkb) if heads is None else (heads, nqb, nkb)
    dense = rng.random(shape) < density
    if keep_diagonal:
        diag = np.arange(min(nqb, nkb))
        dense[..., diag, diag] = True
    return BlockMask.from_dense(dense, block_size=block, shape=(nq, nk))


def run_both(xp, rng, seed, mask, *, b=1, hq=2, hkv=None, nq, nk, d=64, dtype=ml_dtypes.bfloat16,
             causal=False, backward=True, deterministic=False):
    hkv = hkv or hq
    q = random_array(rng, (b, hq, nq, d), dtype, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    v = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    out = poisoned((b, hq, nq, d), dtype, xp=xp)
    _, lse = cuflash.attention(q, k, v, causal=causal, block_mask=mask, return_lse=True, out=out)
    assert_forward_close(out, lse, q, k, v, causal=causal, block_mask=mask, context=f"seed={seed}")
    if backward:
        dout = random_array(rng, out.shape, dtype, xp=xp)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, block_mask=mask,
                                           deterministic=deterministic)
        assert_backward_close(grads, dout, q, k, v, causal=causal, block_mask=mask,
                              context=f"seed={seed}")


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_random_masks(xp, rng, seed, density, block, dtype):
    mask = random_block_mask(rng, 1000, 1000, block, density=density)
    run_both(xp, rng, seed, mask, nq=1000, nk=1000, dtype=dtype)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_and_causal(xp, rng, seed, d, causal):
    mask = random_block_mask(rng, 700, 900, 128, density=0.4)
    run_both(xp, rng, seed, mask, nq=700, nk=900, d=d, causal=causal)


def test_rows_without_blocks_give_zero_and_minus_inf(xp, rng, seed):
    dense = np.zeros((4, 4), bool)
    dense[0, 0] = dense[2, 1] = dense[2, 3] = True  # query blocks 1 and 3 see nothing
    mask = BlockMask.from_dense(dense, block_size=64, shape=(250, 256))
    run_both(xp, rng, seed, mask, nq=250, nk=256)


def test_per_head_masks_with_grouped_heads(xp, rng, seed):
    mask = random_block_mask(rng, 512, 512, 128, density=0.3, heads=4)
    run_both(xp, rng, seed, mask, hq=4, hkv=2, nq=512, nk=512, deterministic=True)


@pytest.mark.parametrize("builder", ["butterfly", "sliding_window", "image_local"])
def test_pattern_builders(xp, rng, seed, builder):
    if builder == "image_local":
        n = 32 * 32
        pattern = image_local(32, 32, radius=3, block_size=128)
    elif builder == "butterfly":
        n = 1024
        pattern = butterfly(n, block_size=128)
    else:
        n = 1024
        pattern = sliding_window(n, window=200, block_size=128)
    mask = BlockMask.from_scipy(pattern, level="block", block_size=128, shape=(n, n))
    run_both(xp, rng, seed, mask, nq=n, nk=n, causal=builder == "sliding_window")


def test_element_pattern_coarsened_from_any_scipy_format(xp, rng, seed):
    n = 600
    rows, cols = rng.integers(0, n, size=(2, 700))
    element = sp.coo_array((np.ones(700, bool), (rows, cols)), shape=(n, n))
    for fmt in ("csr", "csc", "lil"):
        mask = BlockMask.from_scipy(element.asformat(fmt), level="element", block_size=64)
        run_both(xp, rng, seed, mask, nq=n, nk=n, backward=fmt == "csr")
