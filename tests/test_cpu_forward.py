"""cuflash.attention on NumPy arrays against the float64 oracle."""

import importlib
import subprocess
import sys
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from oracle import assert_forward_close, poisoned, random_array

import cuflash
from cuflash import _checks
from cuflash.sparse import BlockMask

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]
DTYPE_IDS = ["float16", "bfloat16", "float32"]


def qkv(rng, q_shape, k_shape, v_shape, dtype):
    return tuple(random_array(rng, shape, dtype) for shape in (q_shape, k_shape, v_shape))


def dense_block_mask(blocks, shape, block_size):
    """A BlockMask from a dense block pattern (H', Nqb, Nkb); H' = 1 is shared by all heads."""
    blocks = np.asarray(blocks, dtype=bool)
    layout = blocks[0] if blocks.shape[0] == 1 else blocks
    return BlockMask.from_dense(layout, block_size=block_size, shape=shape)


LENGTHS = [(1, 1), (17, 17), (127, 127), (1000, 1000), (17, 1000), (1000, 17), (127, 1)]


def batch_and_heads(nq, nk):
    """(B, Hq, Hkv): grouped heads, with fewer of them for long sequences to keep tests quick."""
    return (1, 2, 1) if nq * nk >= 10**5 else (2, 4, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq, nk", LENGTHS)
def test_matches_oracle(rng, seed, dtype, causal, nq, nk):
    b, hq, hkv = batch_and_heads(nq, nk)
    q, k, v = qkv(rng, (b, hq, nq, 64), (b, hkv, nk, 64), (b, hkv, nk, 64), dtype)
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (b, hq, nq, 64) and lse.shape == (b, hq, nq)
    assert_forward_close(out, lse, q, k, v, causal=causal, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hkv", [1, 2, 8], ids=["mqa", "gqa", "mha"])
def test_grouped_query_heads(rng, seed, dtype, hkv):
    q, k, v = qkv(rng, (2, 8, 65, 32), (2, hkv, 90, 32), (2, hkv, 90, 32), dtype)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert_forward_close(out, lse, q, k, v, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_value_dim_differs_from_key_dim(rng, seed, dtype):
    q, k, v = qkv(rng, (3, 2, 50, 40), (3, 2, 70, 40), (3, 2, 70, 24), dtype)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (3, 2, 50, 24)
    assert_forward_close(out, lse, q, k, v, causal=True, context=f"seed={seed}")


@pytest.mark.parametrize("d", [1, 3, 300])
def test_any_head_dim(rng, seed, d):
    q, k, v = qkv(rng, (2, 4, 33, d), (2, 4, 45, d), (2, 4, 45, d), np.float32)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert_forward_close(out, lse, q, k, v, causal=True, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_explicit_scale(rng, seed, dtype):
    q, k, v = qkv(rng, (2, 4, 100, 64), (2, 4, 100, 64), (2, 4, 100, 64), dtype)
    out, lse = cuflash.attention(q, k, v, scale=0.3, return_lse=True)
    assert_forward_close(out, lse, q, k, v, scale=0.3, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bnhd_buffers_through_transpose(rng, seed, dtype):
    # (B, N, H, D) buffers, as many frameworks store them, read as (B, H, N, D) views.
    qb, kb, vb = qkv(rng, (2, 70, 4, 64), (2, 90, 2, 64), (2, 90, 2, 64), dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (qb, kb, vb))
    assert np.shares_memory(_checks.as_4d(q, (2,), np), qb)  # read in place, not copied
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert_forward_close(out, lse, q, k, v, causal=True, context=f"seed={seed}")


def test_non_contiguous_last_axis_is_copied(rng, seed):
    qb, kb, vb = qkv(rng, (2, 4, 60, 128), (2, 4, 80, 128), (2, 4, 80, 64), np.float16)
    q, k, v = qb[..., ::2], kb[..., ::2], vb[:, :, ::-1]
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert_forward_close(out, lse, q, k, v, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_broadcast_leading_axes(rng, seed, dtype):
    q, k, v = qkv(rng, (2, 3, 4, 40, 32), (3, 2, 50, 32), (1, 1, 2, 50, 32), dtype)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 3, 4, 40, 32) and lse.shape == (2, 3, 4, 40)
    assert_forward_close(out, lse, q, k, v, context=f"seed={seed}")


def test_broadcast_query(rng, seed):
    q, k, v = qkv(rng, (4, 40, 32), (5, 4, 50, 32), (5, 4, 50, 32), np.float32)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (5, 4, 40, 32)
    assert_forward_close(out, lse, q, k, v, causal=True, context=f"seed={seed}")


def test_broadcast_batch_is_not_copied(rng):
    k = random_array(rng, (1, 2, 50, 32), np.float32)
    k4 = _checks.as_4d(k, (6,), np)
    assert k4.shape == (6, 2, 50, 32) and k4.strides[0] == 0


def test_unmergeable_leading_axes_are_copied(rng, seed):
    # The strides of q's two leading axes cannot merge into one: q is copied, results unchanged.
    q = random_array(rng, (3, 4, 2, 30, 16), np.float32)[:, :2]
    k = random_array(rng, (3, 2, 2, 30, 16), np.float32)
    v = random_array(rng, (3, 2, 2, 30, 16), np.float32)
    assert not np.shares_memory(_checks.as_4d(q, (3, 2), np), q)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert_forward_close(out, lse, q, k, v, context=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows_give_zero_and_minus_inf(rng, seed, dtype):
    # causal with Nq > Nk: the first Nq - Nk query rows see no key.
    q, k, v = qkv(rng, (2, 4, 300, 64), (2, 4, 130, 64), (2, 4, 130, 64), dtype)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert np.all(out[:, :, :170].astype(np.float32) == 0)
    assert np.all(np.isneginf(lse[:, :, :170]))
    assert np.isfinite(lse[:, :, 170:]).all()
    assert_forward_close(out, lse, q, k, v, causal=True, context=f"seed={seed}")


def test_causal_alignment_is_bottom_right(rng):
    # Nq = 2, Nk = 5: row 0 sees keys 0..3, row 1 sees all five (the docstring's drawing).
    q = random_array(rng, (1, 2, 8), np.float32)
    k = random_array(rng, (1, 5, 8), np.float32)
    v = random_array(rng, (1, 5, 8), np.float32)
    out = cuflash.attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[0, 0], cuflash.attention(q[:, :1], k[:, :4], v[:, :4])[0, 0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], cuflash.attention(q[:, 1:], k, v)[0, 0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_out_is_written_in_place(rng, seed, dtype):
    q, k, v = qkv(rng, (2, 4, 70, 32), (2, 4, 90, 32), (2, 4, 90, 48), dtype)
    out = poisoned((2, 4, 70, 48), dtype)
    result, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, out=out)
    assert result is out
    assert_forward_close(out, lse, q, k, v, causal=True, context=f"seed={seed}")


def test_out_with_bnhd_strides(rng, seed):
    q, k, v = qkv(rng, (2, 4, 70, 32), (2, 4, 90, 32), (2, 4, 90, 48), np.float16)
    buffer = poisoned((2, 70, 4, 48), np.float16)
    out = buffer.transpose(0, 2, 1, 3)
    assert cuflash.attention(q, k, v, out=out) is out
    assert_forward_close(out, None, q, k, v, context=f"seed={seed}")


def test_out_that_needs_a_write_back(rng, seed):
    # Neither a contiguous last axis nor mergeable leading axes: written through a temporary.
    q, k, v = qkv(rng, (3, 2, 2, 40, 16), (3, 2, 2, 50, 16), (3, 2, 2, 50, 16), np.float32)
    buffer = poisoned((3, 4, 2, 40, 32), np.float32)
    out = buffer[:, ::2, :, :, ::2]
    assert cuflash.attention(q, k, v, out=out) is out
    assert_forward_close(out, None, q, k, v, context=f"seed={seed}")
    assert np.isnan(buffer[:, 1::2]).all() and np.isnan(buffer[..., 1::2]).all()


def test_return_lse_false_returns_the_array_only(rng):
    q, k, v = qkv(rng, (1, 10, 8), (1, 10, 8), (1, 10, 8), np.float32)
    out = cuflash.attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.shape == (1, 10, 8)


def test_block_mask_skips_blocks(rng, seed):
    # Per-head block pattern with 32 x 48 blocks; one query head attends nothing in block row 1.
    nq, nk, hq = 100, 150, 4
    blocks = rng.random((hq, 4, 4)) < 0.5
    blocks[:, :, 0] = True
    blocks[2, 1] = False
    mask = dense_block_mask(blocks, (nq, nk), (32, 48))
    q, k, v = qkv(rng, (2, hq, nq, 32), (2, 2, nk, 32), (2, 2, nk, 32), np.float16)
    out, lse = cuflash.attention(q, k, v, block_mask=mask, return_lse=True)
    assert np.all(out[:, 2, 32:64].astype(np.float32) == 0)
    assert np.all(np.isneginf(lse[:, 2, 32:64]))
    assert_forward_close(out, lse, q, k, v, block_mask=mask, context=f"seed={seed}")


@pytest.mark.parametrize("nq, nk", [(130, 130), (90, 200), (200, 90)])
def test_block_mask_with_causal(rng, seed, nq, nk):
    blocks = rng.random((1, -(-nq // 64), -(-nk // 32))) < 0.6
    mask = dense_block_mask(blocks, (nq, nk), (64, 32))
    q, k, v = qkv(rng, (2, 4, nq, 32), (2, 4, nk, 32), (2, 4, nk, 32), ml_dtypes.bfloat16)
    out, lse = cuflash.attention(q, k, v, block_mask=mask, causal=True, return_lse=True)
    assert_forward_close(out, lse, q, k, v, block_mask=mask, causal=True,
                         context=f"seed={seed}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_4097_tokens(rng, seed, causal):
    q, k, v = qkv(rng, (1, 2, 4097, 64), (1, 1, 4097, 64), (1, 1, 4097, 64), ml_dtypes.bfloat16)
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    rows = np.concatenate([[0, 127, 128, 4095, 4096], rng.choice(4097, 250, replace=False)])
    assert_forward_close(out, lse, q, k, v, causal=causal, rows=rows, context=f"seed={seed}")


@pytest.mark.slow
def test_16k_tokens_in_bounded_memory(rng, seed):
    # The score matrix of one head would take 16384² · 4 bytes = 1 GiB.
    n = 16384
    q, k, v = qkv(rng, (1, n, 64), (1, n, 64), (1, n, 64), np.float16)
    tracemalloc.start()
    try:
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # O(N·D + tile²): a few MiB; far below the 1 GiB of one score matrix.
    assert peak < 64 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"
    rows = np.concatenate([[0, 1, n - 1], rng.choice(n, 61, replace=False)])
    assert_forward_close(out, lse, q, k, v, causal=True, rows=rows, context=f"seed={seed}")


def test_import_and_cpu_path_need_no_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"  # makes `import cupy` fail
            "import numpy as np, cuflash\n"
            "x = np.ones((1, 4, 8), np.float32)\n"
            "assert cuflash.attention(x, x, x).shape == (1, 4, 8)\n"
            "assert cuflash.__version__ == '0.1.0'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_loads_none_of_the_tools():
    """docs/design.md: the tools (cuflash.check, cuflash.bench, the command line) live in their
    own subpackages, and ``import cuflash`` loads none of them (nor Click)."""
    code = ("import sys, cuflash\n"
            "loaded = [m for m in ('cuflash.check', 'cuflash.bench', 'cuflash.cli', 'click')\n"
            "          if m in sys.modules]\n"
            "assert loaded == [], loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    assert sorted(cuflash.__all__) == ["CuflashNumericalWarning", "IndexDtypeError", "KVCachePlan",
                                       "KernelPlan", "__version__", "attention", "attention_backward",
                                       "attention_varlen", "attention_varlen_backward",
                                       "attention_varlen_vjp", "attention_vjp",
                                       "attention_with_kvcache", "kernel_plan", "kvcache_plan",
                                       "reference", "sparse"]
    assert cuflash.sparse is importlib.import_module("cuflash.sparse")
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        cuflash.nothing  # noqa: B018
