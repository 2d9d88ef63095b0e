"""The float32 CUDA-core kernels (cuflash/kernels/flash_f32.cu) against the float64 oracle.

float32 is the exact path: no TF32, no 16-bit operands, so the correctness rule (cuflash/check/rule.py) compares these
kernels with a plain float32 implementation. Forward and backward run end to end through the
public API; the cases are chosen so that few kernel variants are compiled (head dims 17 and 32
share the padded dim 32, 100 and 128 share 128).
"""

import numpy as np
import pytest

import cuflash
from oracle import (assert_backward_close, assert_forward_close, poisoned, poisoned_allocations,
                    random_array, spec_for, to_host)

pytestmark = pytest.mark.gpu

F32 = np.float32


def inputs(xp, rng, *, b=2, hq=2, hkv=None, nq=128, nk=None, d=64, dv=None):
    hkv, nk, dv = hkv or hq, nk or nq, dv or d
    q = random_array(rng, (b, hq, nq, d), F32, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), F32, xp=xp)
    v = random_array(rng, (b, hkv, nk, dv), F32, xp=xp)
    return q, k, v


def forward_backward(xp, rng, seed, q, k, v, *, causal=False, scale=None, block_mask=None):
    """attention into a NaN-poisoned `out`, then attention_backward from its out and lse; both
    checked against the oracle."""
    context = f"seed={seed}"
    out = poisoned(q.shape[:-1] + v.shape[-1:], F32, xp=xp)
    with poisoned_allocations(xp):  # lse
        got, lse = cuflash.attention(q, k, v, causal=causal, scale=scale, block_mask=block_mask,
                                     return_lse=True, out=out)
    assert got is out
    assert_forward_close(out, lse, q, k, v, causal=causal, scale=scale, block_mask=block_mask,
                         context=context)
    dout = random_array(rng, out.shape, F32, xp=xp)
    with poisoned_allocations(xp):
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                                           block_mask=block_mask)
    assert_backward_close(grads, dout, q, k, v, causal=causal, scale=scale,
                          block_mask=block_mask, context=context)
    return out, lse, grads


def bits(x):
    return to_host(x).view(np.uint32)


def block_mask_class():
    from cuflash.sparse import BlockMask

    return BlockMask


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("d,nq,nk,causal", [
    (17, 127, 1000, False),   # padded to 32; rows of 17 floats: the unaligned (scalar) loads
    (32, 1000, 127, True),    # causal with nq > nk: the first 873 rows attend to nothing
    (64, 17, 1000, True),
    (100, 1, 127, True),      # padded to 128
    (128, 1000, 1000, True),
    (256, 127, 17, False),
])
def test_head_dims_and_lengths(xp_gpu, rng, seed, d, nq, nk, causal):
    q, k, v = inputs(xp_gpu, rng, nq=nq, nk=nk, d=d)
    forward_backward(xp_gpu, rng, seed, q, k, v, causal=causal)


@pytest.mark.parametrize("n", [1, 17, 127, 1000])
def test_odd_square_lengths(xp_gpu, rng, seed, n):
    q, k, v = inputs(xp_gpu, rng, b=1, hq=4, nq=n, d=64)
    forward_backward(xp_gpu, rng, seed, q, k, v, causal=True)


def test_value_dim_differs(xp_gpu, rng, seed):
    q, k, v = inputs(xp_gpu, rng, nq=150, nk=170, d=72, dv=20)
    forward_backward(xp_gpu, rng, seed, q, k, v)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)])
def test_grouped_heads_and_scale(xp_gpu, rng, seed, hq, hkv):
    # dk/dv sum over the query heads of each group; a scale other than 1/sqrt(D) checks that
    # it reaches P, dq and dk.
    q, k, v = inputs(xp_gpu, rng, b=1, hq=hq, hkv=hkv, nq=300, nk=260, d=64)
    forward_backward(xp_gpu, rng, seed, q, k, v, causal=True, scale=0.3)


# ----------------------------------------------------------------------------- layouts

def test_strided_and_broadcast_inputs(xp_gpu, rng, seed):
    xp = xp_gpu
    b, n, h, d = 2, 333, 4, 64
    qkv = random_array(rng, (b, n, 3, h, d), F32, xp=xp)  # interleaved (B, N, 3, H, D) buffer
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    forward_backward(xp, rng, seed, q, k, v, causal=True)
    # one K/V shared by a (2, 3) batch of queries: batch stride 0 inside the kernels
    q2 = random_array(rng, (2, 3, h, 77, d), F32, xp=xp)
    out, _, (dq, dk, dv) = forward_backward(xp, rng, seed, q2, k[0], v[0], causal=True)
    assert out.shape == (2, 3, h, 77, d) and dk.shape == k[0].shape and dv.shape == v[0].shape


def test_unaligned_views(xp_gpu, rng, seed):
    # odd element offsets: no 16-byte copies are legal, the kernels take the scalar loads
    base = random_array(rng, (2, 3, 250, 24), F32, xp=xp_gpu)
    q, k, v = base[..., 1:18], base[..., 3:20], base[..., 5:22]
    forward_backward(xp_gpu, rng, seed, q, k, v)


# ----------------------------------------------------------------------------- masks

def test_block_mask_per_head_grouped_causal(xp_gpu, rng, seed):
    # 32 x 64 blocks are smaller than the preferred 64 x 64 tiles: the kernels fall back to
    # tiles that divide them. Per-head patterns with grouped heads make dk/dv sum over heads
    # whose patterns differ; empty block rows and columns give rows that attend to nothing and
    # keys that nothing attends to.
    BlockMask = block_mask_class()
    nq, nk, hq, hkv = 300, 350, 4, 2
    nqb, nkb = -(-nq // 32), -(-nk // 64)
    dense = rng.random((hq, nqb, nkb)) < 0.4
    dense[:, 2, :] = False
    dense[:, :, 1] = False
    mask = BlockMask.from_dense(dense, block_size=(32, 64), shape=(nq, nk))
    q, k, v = inputs(xp_gpu, rng, b=1, hq=hq, hkv=hkv, nq=nq, nk=nk, d=64)
    _, lse, (dq, dk, dv) = forward_backward(xp_gpu, rng, seed, q, k, v, causal=True,
                                            block_mask=mask)
    assert np.isneginf(to_host(lse)[:, :, 64:96]).all()
    assert not to_host(dq)[:, :, 64:96].any()
    assert not to_host(dk)[:, :, 64:128].any() and not to_host(dv)[:, :, 64:128].any()


# ----------------------------------------------------------------------------- outputs

def test_every_output_element_is_written(xp_gpu, rng, seed):
    # The kernels' own entry points with NaN-filled outputs: rows and key tiles without work
    # must be written too (zeros), never left as they were.
    from cuflash.kernels import backward, forward

    xp = xp_gpu
    b, hq, hkv, nq, nk, d = 1, 4, 2, 200, 90, 64  # causal, nq > nk: rows 0..109 see nothing
    q, k, v = inputs(xp, rng, b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d)
    out = poisoned((b, hq, nq, d), F32, xp=xp)
    lse = poisoned((b, hq, nq), F32, xp=xp)
    spec = spec_for(q, k, v, causal=True)
    forward(q, k, v, out, lse, spec)
    dout = random_array(rng, out.shape, F32, xp=xp)
    grads = tuple(poisoned(x.shape, F32, xp=xp) for x in (q, k, v))
    backward(dout, q, k, v, out, lse, *grads, spec)
    assert_forward_close(out, lse, q, k, v, causal=True, context=f"seed={seed}")
    assert_backward_close(grads, dout, q, k, v, causal=True, context=f"seed={seed}")
    assert not to_host(out)[:, :, :nq - nk].any()
    assert not to_host(grads[0])[:, :, :nq - nk].any()


def test_repeated_calls_are_bit_identical(xp_gpu, rng, seed):
    # No atomics anywhere: forward and backward give the same bits every time, and
    # `deterministic` changes nothing for float32.
    q, k, v = inputs(xp_gpu, rng, b=1, hq=4, hkv=1, nq=500, nk=500, d=64)
    runs = []
    for deterministic in (False, False, True):
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        if not runs:
            dout = random_array(rng, out.shape, F32, xp=xp_gpu)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True,
                                           deterministic=deterministic)
        runs.append([bits(x) for x in (out, lse, *grads)])
    for other in runs[1:]:
        for name, first, again in zip(("out", "lse", "dq", "dk", "dv"), runs[0], other):
            assert np.array_equal(first, again), f"{name} differs between calls; seed={seed}"


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_finite_differences(xp_gpu, rng, seed, causal):
    """Elements of the float32 kernel's gradients against central differences of the float64
    loss sum(dout · attention) at the same (float32-valued) inputs: a check that does not go
    through any backward formula."""
    from cuflash import reference

    q, k, v = inputs(xp_gpu, rng, b=1, hq=2, hkv=1, nq=9, nk=11, d=8, dv=5)
    dout = random_array(rng, (1, 2, 9, 5), F32, xp=xp_gpu)
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    grads = [to_host(g).astype(np.float64)
             for g in cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)]
    x64 = [to_host(x).astype(np.float64) for x in (q, k, v)]
    do64 = to_host(dout).astype(np.float64)

    def loss(*xs):
        return float((reference.attention(*xs, causal=causal)[0] * do64).sum())

    eps = 1e-5
    for which, grad in enumerate(grads):
        for index in zip(*(rng.integers(0, n, 5) for n in x64[which].shape)):
            plus = [x.copy() for x in x64]
            minus = [x.copy() for x in x64]
            plus[which][index] += eps
            minus[which][index] -= eps
            numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
            # float32 arithmetic over a dozen terms: a few 1e-7 relative; a wrong term is O(0.1).
            assert abs(grad[index] - numeric) <= 1e-4 * (1 + abs(numeric)), (
                "dq dk dv".split()[which], index, grad[index], numeric, f"seed={seed}")
