"""``cuflash.torch.flash_attn_with_kvcache`` on CPU tensors: flash-attn's signature and results,
the caches written in place through zero-copy views, and the refused options. The numbers
themselves are those of ``cuflash.attention_with_kvcache`` (tests/test_kvcache_cpu.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cuflash  # noqa: E402
from cuflash.torch import flash_attn_with_kvcache  # noqa: E402


def tensors(seed, *, b=3, s_cache=48, hq=4, hkv=2, d=16, s_new=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 2, hq, d, generator=g).to(dtype)
    k_cache = torch.randn(b, s_cache, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(b, s_cache, hkv, d, generator=g).to(dtype)
    k = torch.randn(b, s_new, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, s_new, hkv, d, generator=g).to(dtype)
    return q, k_cache, v_cache, k, v


def test_matches_the_core_and_appends_in_place(seed):
    q, k_cache, v_cache, k, v = tensors(seed)
    lengths = torch.tensor([0, 7, 40], dtype=torch.int32)
    expected_k, expected_v = k_cache.numpy().copy(), v_cache.numpy().copy()
    want, want_lse = cuflash.attention_with_kvcache(
        q.numpy(), expected_k, expected_v, k.numpy(), v.numpy(), cache_seqlens=lengths.numpy(),
        causal=True, scale=0.3, window=(20, 0), softcap=7.0, return_lse=True)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                       softmax_scale=0.3, causal=True, window_size=(20, 0),
                                       softcap=7.0, return_softmax_lse=True)
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    assert out.shape == (3, 2, 4, 16) and lse.shape == (3, 4, 2) and lse.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(lse.numpy(), want_lse)
    np.testing.assert_array_equal(k_cache.numpy(), expected_k)  # written in place, like the core
    np.testing.assert_array_equal(v_cache.numpy(), expected_v)
    np.testing.assert_array_equal(k_cache[1, 7].numpy(), k[1, 0].numpy())
    np.testing.assert_array_equal(lengths.numpy(), [0, 7, 40])  # not advanced


def test_positional_order_and_paged_cache(seed):
    """flash-attn's positional order; a paged cache through block_table; alibi (B, Hq)."""
    q, k_cache, v_cache, k, v = tensors(seed, b=2, s_cache=16, dtype=torch.bfloat16)
    pages_k, pages_v = k_cache.repeat(3, 1, 1, 1), v_cache.repeat(3, 1, 1, 1)  # 6 pages of 16
    table = torch.tensor([[4, 1, 5], [0, 3, 2]], dtype=torch.int32)
    slopes = torch.rand(2, 4, dtype=torch.float32)
    lengths = torch.tensor([20, 33], dtype=torch.int32)
    core_k, core_v = pages_k.clone(), pages_v.clone()
    out = flash_attn_with_kvcache(q, pages_k, pages_v, k, v, None, None, lengths, None, None,
                                  table, None, True, (-1, -1), 0.0, True, slopes, 0, False)
    from cuflash.torch._bridge import to_numpy
    want = cuflash.attention_with_kvcache(
        to_numpy(q), to_numpy(core_k), to_numpy(core_v), to_numpy(k), to_numpy(v),
        cache_seqlens=lengths.numpy(), block_table=table.numpy(), causal=True,
        alibi_slopes=slopes.numpy())
    assert out.dtype == torch.bfloat16
    np.testing.assert_array_equal(to_numpy(out), want)
    np.testing.assert_array_equal(to_numpy(pages_k), to_numpy(core_k))


def test_seqlens_default_is_the_whole_cache(seed):
    q, k_cache, v_cache, _, _ = tensors(seed)
    out = flash_attn_with_kvcache(q, k_cache, v_cache)
    want = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=48)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cache_seqlens is required when k and v are given"):
        flash_attn_with_kvcache(q, k_cache, v_cache, *tensors(seed)[3:])


def test_int_seqlens_and_cache_batch_idx(seed):
    q, k_cache, v_cache, k, v = tensors(seed)
    rows = torch.tensor([2, 0, 1], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=5,
                                  cache_batch_idx=rows)
    assert out.shape == (3, 2, 4, 16)
    np.testing.assert_array_equal(k_cache[2, 5].numpy(), k[0, 0].numpy())


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_is_the_core_s(seed, interleaved):
    """flash-attn's rotary arguments, in its positional order, reach the core's rotation."""
    q, k_cache, v_cache, k, v = tensors(seed)
    angles = torch.arange(48.0)[:, None] * 10000.0 ** (-torch.arange(0, 12, 2) / 12)
    cos, sin = angles.cos(), angles.sin()
    lengths = torch.tensor([0, 7, 40], dtype=torch.int32)
    expected_k = k_cache.numpy().copy()
    want = cuflash.attention_with_kvcache(
        q.numpy(), expected_k, v_cache.numpy().copy(), k.numpy(), v.numpy(),
        cache_seqlens=lengths.numpy(), causal=True, rotary_cos=cos.numpy(),
        rotary_sin=sin.numpy(), rotary_interleaved=interleaved)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, lengths, causal=True,
                                  rotary_interleaved=interleaved)
    np.testing.assert_array_equal(out.numpy(), want)
    np.testing.assert_array_equal(k_cache.numpy(), expected_k)  # the rotated keys appended


def test_unsupported_options(seed):
    q, k_cache, v_cache, _, _ = tensors(seed)
    with pytest.raises(NotImplementedError, match="cache_leftpad is not supported"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3,
                                cache_leftpad=torch.zeros(3, dtype=torch.int32))


def test_errors_name_the_argument(seed):
    q, k_cache, v_cache, _, _ = tensors(seed)
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        flash_attn_with_kvcache(q, k_cache.numpy(), v_cache, cache_seqlens=3)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 2, 3]))


@pytest.mark.gpu
def test_cuda_tensors_in_place(seed, xp_gpu):
    """CUDA tensors: the caches are written through zero-copy views and the result agrees with
    the CPU path (bfloat16; the decode kernel or the generic route, whichever the call takes)."""
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    cpu = tensors(seed, b=2, s_cache=256, hq=8, hkv=2, d=64, dtype=torch.bfloat16)
    gpu = [t.cuda() for t in cpu]
    lengths = torch.tensor([3, 200], dtype=torch.int32)
    want = flash_attn_with_kvcache(*cpu, cache_seqlens=lengths, causal=True)
    got = flash_attn_with_kvcache(*gpu, cache_seqlens=lengths.cuda(), causal=True)
    assert got.is_cuda and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=3e-2)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=0)  # the same appends


@pytest.mark.parametrize("option, value, error, name", [
    ("window_size", (1.5, 0), TypeError, "window_size must be a pair"),
    ("softmax_scale", -1.0, ValueError, "softmax_scale must be finite and positive"),
])
def test_errors_name_flash_attn_arguments(option, value, error, name):
    q = torch.zeros(1, 1, 2, 8)
    cache = torch.zeros(1, 16, 2, 8)
    with pytest.raises(error, match=name):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3, **{option: value})


@pytest.mark.parametrize("value", ["False", 0, None])
def test_return_softmax_lse_must_be_a_bool(value):
    """return_softmax_lse="False" is not read as True (a pair where one tensor was asked for)."""
    q = torch.zeros(1, 1, 2, 8)
    cache = torch.zeros(1, 16, 2, 8)
    with pytest.raises(TypeError, match="^return_softmax_lse must be True or False"):
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3, return_softmax_lse=value)
