"""Every invalid call raises TypeError/ValueError naming what was given and what is allowed."""

import math
import re

import ml_dtypes
import numpy as np
import pytest

import cuflash


def arrays(*shapes, dtype=np.float32):
    rng = np.random.default_rng()
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)


Q, K, V = arrays((2, 4, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))


def forward_and_backward(**kwargs):
    """Run forward and backward with these options, so both validate them."""
    out, lse = cuflash.attention(Q, K, V, return_lse=True, **kwargs)
    cuflash.attention_backward(out, Q, K, V, out, lse, **kwargs)


# ----------------------------------------------------------------------------- array types

@pytest.mark.parametrize("bad", [[[[1.0]]], 3.0, "q", None])
def test_not_an_array(bad):
    with pytest.raises(TypeError, match=rf"q must be a numpy.ndarray or cupy.ndarray, got "
                                        rf"{type(bad).__name__}"):
        cuflash.attention(bad, K, V)
    with pytest.raises(TypeError, match=rf"v must be a numpy.ndarray or cupy.ndarray, got "
                                        rf"{type(bad).__name__}"):
        cuflash.attention(Q, K, bad)


# ----------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.complex64, np.bool_,
                                   ml_dtypes.float8_e4m3fn])
def test_unsupported_dtype(dtype):
    q, k, v = (x.astype(dtype) for x in (Q, K, V))
    name = np.dtype(dtype).name
    with pytest.raises(TypeError, match=rf"q has dtype {name}; supported dtypes are float16, "
                                        r"bfloat16 \(ml_dtypes.bfloat16\) or float32"):
        cuflash.attention(q, k, v)


def test_mixed_dtypes():
    with pytest.raises(TypeError, match="q and v must have the same dtype, got q: float32 and "
                                        "v: float16"):
        cuflash.attention(Q, K, V.astype(np.float16))
    with pytest.raises(TypeError, match="q and k must have the same dtype, got q: float32 and "
                                        "k: bfloat16"):
        cuflash.attention(Q, K.astype(ml_dtypes.bfloat16), V)


# ----------------------------------------------------------------------------- shapes

def test_rank_below_three_suggests_a_head_axis():
    with pytest.raises(ValueError, match=r"k must have at least 3 dimensions .* got shape "
                                         r"\(24, 8\); for a single head use k\[None\]"):
        cuflash.attention(Q[0], K[0, 0], V[0, 0][None])


@pytest.mark.parametrize("name, shapes", [
    ("q", ((2, 4, 0, 8), (2, 2, 24, 8), (2, 2, 24, 8))),
    ("k", ((2, 4, 16, 8), (2, 2, 0, 8), (2, 2, 0, 8))),
    ("q", ((2, 4, 16, 0), (2, 2, 24, 0), (2, 2, 24, 8))),
    ("v", ((2, 4, 16, 8), (2, 2, 24, 8), (2, 2, 24, 0))),
    ("q", ((2, 0, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))),
    ("k", ((2, 4, 16, 8), (2, 0, 24, 8), (2, 0, 24, 8))),
    ("q", ((0, 4, 16, 8), (2, 4, 24, 8), (2, 4, 24, 8))),
])
def test_empty_axes(name, shapes):
    with pytest.raises(ValueError, match=rf"{name} must not have an empty axis, got shape"):
        cuflash.attention(*arrays(*shapes))


def test_head_dim_mismatch():
    q, k, v = arrays((2, 4, 16, 8), (2, 2, 24, 16), (2, 2, 24, 16))
    with pytest.raises(ValueError, match=r"q and k must have the same head dimension .* got q "
                                         r"\(2, 4, 16, 8\) and k \(2, 2, 24, 16\)"):
        cuflash.attention(q, k, v)


@pytest.mark.parametrize("v_shape", [(2, 2, 23, 8), (2, 1, 24, 8)])
def test_key_value_mismatch(v_shape):
    q, k, v = arrays((2, 4, 16, 8), (2, 2, 24, 8), v_shape)
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads and keys"):
        cuflash.attention(q, k, v)


def test_query_heads_not_a_multiple():
    q, k, v = arrays((2, 3, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))
    with pytest.raises(ValueError, match=r"multiple of the number of key/value heads, got 3 "
                                         r"query heads .* and 2 key/value heads"):
        cuflash.attention(q, k, v)


def test_leading_axes_do_not_broadcast():
    q, k, v = arrays((3, 4, 16, 8), (2, 2, 24, 8), (2, 2, 24, 8))
    with pytest.raises(ValueError, match=r"leading axes of q, k and v must broadcast together, "
                                         r"got q \(3, 4, 16, 8\)"):
        cuflash.attention(q, k, v)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("scale", [True, np.bool_(False), "0.1", 1j, [0.1], np.array([0.1])])
def test_scale_not_a_real_number(scale):
    with pytest.raises(TypeError, match=r"scale must be a real number or None, got"):
        forward_and_backward(scale=scale)


@pytest.mark.parametrize("scale", [0, 0.0, -0.5, math.inf, -math.inf, math.nan, np.float32("nan")])
def test_scale_not_finite_positive(scale):
    with pytest.raises(ValueError,
                       match=re.escape(f"scale must be finite and positive, got {scale!r}")):
        forward_and_backward(scale=scale)


@pytest.mark.parametrize("scale", [1, 0.25, np.float16(0.5), np.int64(2), np.float64(0.1)])
def test_scale_accepts_real_numbers(scale):
    forward_and_backward(scale=scale)


@pytest.mark.parametrize("option", ["causal", "return_lse"])
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_forward_flags_must_be_bool(option, value):
    with pytest.raises(TypeError, match=rf"{option} must be True or False, got {value!r}"):
        cuflash.attention(Q, K, V, **{option: value})


@pytest.mark.parametrize("value", [1, "yes", None])
def test_deterministic_must_be_bool(value):
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    with pytest.raises(TypeError, match=rf"deterministic must be True or False, got {value!r}"):
        cuflash.attention_backward(out, Q, K, V, out, lse, deterministic=value)
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        cuflash.attention_vjp(Q, K, V, deterministic=value)


def test_causal_accepts_numpy_bool():
    cuflash.attention(Q, K, V, causal=np.bool_(True))


@pytest.mark.parametrize("mask", [np.ones((1, 1, 1), bool), "causal", object()])
def test_block_mask_type(mask):
    with pytest.raises(TypeError, match=r"block_mask must be a cuflash.sparse.BlockMask or None, "
                                        r"got"):
        forward_and_backward(block_mask=mask)


def test_block_mask_checks_its_own_sizes():
    calls = []

    class IncompatibleMask:
        shape, block_size = (99, 99), (16, 16)

        def check_compatible(self, Nq, Nk, Hq):
            calls.append((Nq, Nk, Hq))
            raise ValueError(f"block mask is for (99, 99), got ({Nq}, {Nk})")

        def to_dense(self):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"block mask is for \(99, 99\), got \(16, 24\)"):
        forward_and_backward(block_mask=IncompatibleMask())
    assert calls == [(16, 24, 4)]


# ----------------------------------------------------------------------------- out=

def test_out_wrong_shape():
    with pytest.raises(ValueError,
                       match=r"out must have shape \(2, 4, 16, 8\), got \(2, 4, 16, 9\)"):
        cuflash.attention(Q, K, V, out=np.empty((2, 4, 16, 9), np.float32))


def test_out_wrong_dtype():
    with pytest.raises(TypeError, match=r"out must have dtype float32, got float16"):
        cuflash.attention(Q, K, V, out=np.empty((2, 4, 16, 8), np.float16))


def test_out_not_an_array():
    with pytest.raises(TypeError, match=r"out must be a numpy.ndarray like q, got list"):
        cuflash.attention(Q, K, V, out=[0.0] * 8)


def test_out_read_only():
    out = np.empty((2, 4, 16, 8), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable, got a read-only array"):
        cuflash.attention(Q, K, V, out=out)


def test_out_with_overlapping_elements():
    out = np.lib.stride_tricks.as_strided(np.empty(8, np.float32), (2, 4, 16, 8), (0, 0, 0, 4))
    with pytest.raises(ValueError, match=r"out must not have overlapping elements, got strides "
                                         r"\(0, 0, 0, 4\)"):
        cuflash.attention(Q, K, V, out=out)


def test_out_overlapping_an_input():
    q, k, v = arrays((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))
    with pytest.raises(ValueError, match="out must not share memory with q"):
        cuflash.attention(q, k, v, out=q)
    buffer = np.empty((2, 4, 16, 16), np.float32)
    buffer[..., 8:] = v
    with pytest.raises(ValueError, match="out must not share memory with v"):
        cuflash.attention(q, k, buffer[..., 8:], out=buffer[..., 7:15])


def test_out_next_to_an_input_is_fine():
    q, k, v = arrays((2, 4, 16, 8), (2, 4, 16, 8), (2, 4, 16, 8))
    buffer = np.empty((2, 4, 16, 16), np.float32)
    buffer[..., :8] = q
    cuflash.attention(buffer[..., :8], k, v, out=buffer[..., 8:])


# ----------------------------------------------------------------------------- backward inputs

def test_backward_arguments():
    out, lse = cuflash.attention(Q, K, V, return_lse=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4, 16, 8\), got \(2, 4, 8\)"):
        cuflash.attention_backward(out[:, :, :8, 0], Q, K, V, out, lse)
    with pytest.raises(TypeError, match=r"out must have dtype float32, got float16"):
        cuflash.attention_backward(out, Q, K, V, out.astype(np.float16), lse)
    with pytest.raises(TypeError, match=r"lse must have dtype float32, got float64"):
        cuflash.attention_backward(out, Q, K, V, out, lse.astype(np.float64))
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 16\), got \(2, 4, 16, 1\)"):
        cuflash.attention_backward(out, Q, K, V, out, lse[..., None])
    with pytest.raises(TypeError, match=r"dout must be a numpy.ndarray like q, got list"):
        cuflash.attention_backward(out.tolist(), Q, K, V, out, lse)


# ----------------------------------------------------------------------------- CuPy specifics

@pytest.mark.gpu
def test_mixed_numpy_and_cupy(xp_gpu):
    with pytest.raises(TypeError, match=r"q and k must both be NumPy arrays or both be CuPy "
                                        r"arrays, got q: numpy.ndarray and k: cupy.ndarray"):
        cuflash.attention(Q, xp_gpu.asarray(K), V)
    q, k, v = (xp_gpu.asarray(x.astype(np.float16)) for x in (Q, K, V))
    with pytest.raises(TypeError, match=r"out must be a cupy.ndarray like q, got numpy.ndarray"):
        cuflash.attention(q, k, v, out=np.empty((2, 4, 16, 8), np.float16))


@pytest.mark.gpu
def test_arrays_on_different_devices(xp_gpu):
    if xp_gpu.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    with xp_gpu.cuda.Device(0):
        q, k = (xp_gpu.asarray(x.astype(np.float16)) for x in (Q, K))
    with xp_gpu.cuda.Device(1):
        v = xp_gpu.asarray(V.astype(np.float16))
    with pytest.raises(ValueError, match=r"all arrays must be on one CUDA device, got q on "
                                         r"device 0 and v on device 1"):
        cuflash.attention(q, k, v)
