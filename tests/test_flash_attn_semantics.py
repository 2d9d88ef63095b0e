"""cuflash against flash-attn's documented semantics: the NumPy path, and the kernels for the
dense, packed and KV-cache calls (tests marked ``gpu``, float16 inputs); the NumPy path's dense
gradients too, against the chain rule of the same definitions.

The oracle here is written from flash-attn's README and the docstrings of
``flash_attn_interface.py`` alone, one query row and one key at a time, in float64, without
``cuflash._mask`` or ``cuflash.reference`` (which the rest of the suite checks against and which
share cuflash's own statement of the rules):

- q ``(B, Sq, Hq, D)``; query head ``h`` reads key/value head ``h // (Hq // Hkv)``;
- query ``i`` sees key ``j`` when ``i + Sk − Sq − left ≤ j ≤ i + Sk − Sq + right``, a side of
  ``-1`` unbounded; ``causal=True`` is the window ``(left, 0)``;
- the logit is ``scale · q·k``, then ``softcap · tanh(x / softcap)``, then
  ``− slope · |i + Sk − Sq − j|`` (slopes ``(H,)`` or ``(B, H)``);
- a row that sees no key gives output 0; its lse is ``-inf`` here, cuflash's documented choice
  where flash-attn writes ``+inf`` (docs/api.md, "Where cuflash differs from flash-attn");
- packed sequences apply all of it per sequence; a KV-cache call first writes the new keys at
  ``cache_seqlens[b]`` (through ``block_table`` when paged, into row ``cache_batch_idx[b]``
  otherwise), then its queries are the last ``Sq`` positions of the row's keys at positions
  ``cache_leftpad[b]`` (default 0: the positions before it are padding) to
  ``cache_seqlens[b] + S_new − 1``.
"""

import inspect
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cuflash

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SIDES = st.one_of(st.just(-1), st.integers(0, 12))


# ----------------------------------------------------------------------------- the oracle

def _sees(i, j, sq, sk, causal, window):
    left, right = window
    if causal:
        right = 0
    shift = sk - sq
    return (left < 0 or j >= i + shift - left) and (right < 0 or j <= i + shift + right)


def _row_logits(q, k, i, *, scale, causal, window, softcap, slope):
    """The keys query row ``i`` sees, their logits (``scale · q·k``, soft-capped, then ALiBi's
    bias), and each logit's derivative with respect to its scaled score (``1 − tanh²`` under
    soft-capping, else 1)."""
    sq, sk = len(q), len(k)
    keys = [j for j in range(sk) if _sees(i, j, sq, sk, causal, window)]
    s = np.array([scale * float(q[i] @ k[j]) for j in keys])
    x, x_of_s = s, np.ones_like(s)
    if softcap > 0:
        x = softcap * np.tanh(s / softcap)
        x_of_s = 1 - np.tanh(s / softcap) ** 2
    if slope is not None:
        x = x - slope * np.abs(i + sk - sq - np.array(keys))
    return keys, x, x_of_s


def _one_head(q, k, v, *, scale, causal, window, softcap, slope):
    """q (Sq, D), k (Sk, D), v (Sk, Dv) float64: out (Sq, Dv), lse (Sq,)."""
    sq = len(q)
    out, lse = np.zeros((sq, v.shape[1])), np.full(sq, -np.inf)
    for i in range(sq):
        keys, x, _ = _row_logits(q, k, i, scale=scale, causal=causal, window=window,
                                 softcap=softcap, slope=slope)
        if not keys:
            continue
        top = x.max()
        p = np.exp(x - top)
        lse[i] = top + math.log(p.sum())
        out[i] = (p / p.sum()) @ v[keys]
    return out, lse


def _one_head_grads(q, k, v, dout, *, scale, causal, window, softcap, slope):
    """dq, dk, dv of ``_one_head``'s output for the output gradient ``dout`` (Sq, Dv), float64,
    by the chain rule written out: ``dv = Pᵀ dout``; ``dS = P ∘ (dP − rowsum(dP ∘ P))`` with
    ``dP = dout vᵀ``; soft-capping multiplies dS by ``1 − tanh²(x / softcap)``; ALiBi's bias is
    a constant; ``dq = scale · dS k``, ``dk = scale · dSᵀ q``. Rows that see no key add
    nothing."""
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for i in range(len(q)):
        keys, x, x_of_s = _row_logits(q, k, i, scale=scale, causal=causal, window=window,
                                      softcap=softcap, slope=slope)
        if not keys:
            continue
        p = np.exp(x - x.max())
        p /= p.sum()
        dv[keys] += np.outer(p, dout[i])
        dp = v[keys] @ dout[i]
        ds = p * (dp - p @ dp) * x_of_s
        dq[i] = scale * ds @ k[keys]
        dk[keys] += scale * np.outer(ds, q[i])
    return dq, dk, dv


def _slope(alibi_slopes, n, h):
    """Query head ``h``'s ALiBi slope in batch element ``n`` (slopes ``(H,)`` or ``(B, H)``), or
    ``None`` without ALiBi."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes, np.float64)
    return slopes[h] if slopes.ndim == 1 else slopes[n, h]


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None):
    """(B, Sq, Hq, D) in; out (B, Sq, Hq, Dv) and lse (B, Hq, Sq) float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, sq, hq, d = q.shape
    group = hq // k.shape[2]
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    out, lse = np.zeros((b, sq, hq, v.shape[3])), np.zeros((b, hq, sq))
    for n in range(b):
        for h in range(hq):
            slope = _slope(alibi_slopes, n, h)
            out[n, :, h], lse[n, h] = _one_head(
                q[n, :, h], k[n, :, h // group], v[n, :, h // group], scale=scale, causal=causal,
                window=window_size, softcap=softcap, slope=slope)
    return out, lse


def flash_attn_grads(q, k, v, dout, softmax_scale=None, causal=False, window_size=(-1, -1),
                     softcap=0.0, alibi_slopes=None):
    """dq, dk, dv (float64) of ``flash_attn_func``'s output for ``dout``, all ``(B, S, H, D)``:
    a key/value head's gradients sum over the query heads of its group."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, sq, hq, d = q.shape
    group = hq // k.shape[2]
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for n in range(b):
        for h in range(hq):
            slope = _slope(alibi_slopes, n, h)
            gq, gk, gv = _one_head_grads(
                q[n, :, h], k[n, :, h // group], v[n, :, h // group], dout[n, :, h], scale=scale,
                causal=causal, window=window_size, softcap=softcap, slope=slope)
            dq[n, :, h] = gq
            dk[n, :, h // group] += gk
            dv[n, :, h // group] += gv
    return dq, dk, dv


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
    """(total, H, D) in; out (total_q, Hq, Dv) and lse (Hq, total_q)."""
    slopes = options.pop("alibi_slopes", None)
    out = np.zeros(q.shape[:2] + v.shape[2:])
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for n in range(len(cu_seqlens_q) - 1):
        rows = slice(cu_seqlens_q[n], cu_seqlens_q[n + 1])
        keys = slice(cu_seqlens_k[n], cu_seqlens_k[n + 1])
        seq_slopes = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[n:n + 1])
        o, s = flash_attn_func(q[None, rows], k[None, keys], v[None, keys],
                               alibi_slopes=seq_slopes, **options)
        out[rows], lse[:, rows] = o[0], s[0]
    return out, lse


def flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx,
                            block_table, cache_leftpad=None, **options):
    """Appends to (copies of) the caches as flash-attn does; returns out, lse (B, Hq, Sq) and
    the caches after the call."""
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    b = q.shape[0]
    s_new = 0 if k is None else k.shape[1]
    lengths = np.broadcast_to(np.asarray(cache_seqlens), (b,))
    slopes = options.pop("alibi_slopes", None)

    def slot(n, position):
        if block_table is not None:
            page = k_cache.shape[1]
            return block_table[n, position // page], position % page
        return (n if cache_batch_idx is None else cache_batch_idx[n]), position

    for n in range(b):
        for t in range(s_new):
            k_cache[slot(n, lengths[n] + t)] = k[n, t]
            v_cache[slot(n, lengths[n] + t)] = v[n, t]
    outs, lses = [], []
    for n in range(b):
        first = 0 if cache_leftpad is None else int(cache_leftpad[n])
        positions = range(first, int(lengths[n]) + s_new)
        keys = np.array([k_cache[slot(n, p)] for p in positions]).reshape(
            (-1,) + k_cache.shape[2:])
        values = np.array([v_cache[slot(n, p)] for p in positions]).reshape(
            (-1,) + v_cache.shape[2:])
        row_slopes = None if slopes is None else (slopes if slopes.ndim == 1 else slopes[n:n + 1])
        o, s = flash_attn_func(q[n:n + 1], keys[None], values[None], alibi_slopes=row_slopes,
                               **options)
        outs.append(o[0])
        lses.append(s[0])
    return np.stack(outs), np.stack(lses), k_cache, v_cache


def assert_matches(out, lse, want, want_lse):
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-4)
    # Rows without keys: lse -inf (flash-attn: +inf, a documented difference) and output 0.
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    seen = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[seen], want_lse[seen], atol=2e-5, rtol=1e-5)


def slopes_of(rng, kind, b, hq):
    if kind == "H":
        return rng.uniform(0, 1, hq).astype(np.float32)
    if kind == "BH":
        return rng.uniform(0, 1, (b, hq)).astype(np.float32)
    return None


def normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- the devices

class Device:
    """Where a case runs: the NumPy path in float32, or the kernels in float16 on CuPy arrays.

    The oracle reads the values the call was given (float32, or float16 widened), so it differs
    from the kernels only by their rounding: P and the output in float16, well within ``atol``
    for these small rows (about 3e-3 at most), where a key seen or missed moves the output by a
    softmax weight times a value's distance from the mean."""

    def __init__(self, xp=None):
        self.xp = xp

    def inputs(self, *arrays):
        """The arrays as the oracle reads them, and as the call takes them."""
        if self.xp is None:
            return arrays, arrays
        held = tuple(None if x is None else x.astype(np.float16) for x in arrays)
        return (tuple(None if x is None else x.astype(np.float32) for x in held),
                tuple(None if x is None else self.xp.asarray(x) for x in held))

    def index(self, x):
        """An index or slope array (or an int, a length known on the host) for the call."""
        if self.xp is None or x is None or isinstance(x, int):
            return x
        return self.xp.asarray(x)

    def host(self, x):
        return x if self.xp is None else self.xp.asnumpy(x)

    def assert_matches(self, out, lse, want, want_lse):
        out, lse = self.host(out), self.host(lse)
        if self.xp is None:
            assert_matches(out, lse, want, want_lse)
            return
        assert not np.isnan(out).any()
        np.testing.assert_allclose(out.astype(np.float64), want, atol=1e-2, rtol=0)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
        seen = np.isfinite(want_lse)
        np.testing.assert_allclose(lse[seen], want_lse[seen], atol=2e-3, rtol=0)


GPU_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- dense

ATTENTION_CASES = dict(
    b=st.integers(1, 2), sq=st.integers(1, 9), sk=st.integers(1, 9), hkv=st.integers(1, 2),
    group=st.integers(1, 3), d=st.sampled_from([4, 8]), dv=st.sampled_from([4, 8]),
    causal=st.booleans(), window=st.tuples(SIDES, SIDES), softcap=st.sampled_from([0.0, 0.7, 5.0]),
    alibi=st.sampled_from([None, "H", "BH"]), scale=st.sampled_from([None, 0.9]),
    seed=st.integers(0, 2**32 - 1))


def check_attention(device, b, sq, sk, hkv, group, d, dv, causal, window, softcap, alibi, scale,
                    seed):
    """``cuflash.attention`` on ``(B, S, H, D)`` arrays viewed as ``(B, H, S, D)``."""
    rng = np.random.default_rng(seed)
    hq = hkv * group
    (q, k, v), given = device.inputs(normal(rng, (b, sq, hq, d)), normal(rng, (b, sk, hkv, d)),
                                     normal(rng, (b, sk, hkv, dv)))
    slopes = slopes_of(rng, alibi, b, hq)
    want, want_lse = flash_attn_func(q, k, v, scale, causal, window, softcap, slopes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cuflash.CuflashNumericalWarning)
        out, lse = cuflash.attention(*(x.transpose(0, 2, 1, 3) for x in given),
                                     causal=causal, scale=scale, window=window, softcap=softcap,
                                     alibi_slopes=device.index(slopes), return_lse=True)
    device.assert_matches(out.transpose(0, 2, 1, 3), lse, want, want_lse)


@SETTINGS
@given(**ATTENTION_CASES)
def test_attention(**case):
    check_attention(Device(), **case)


@pytest.mark.gpu
@GPU_SETTINGS
@given(**ATTENTION_CASES)
def test_attention_kernels(xp_gpu, **case):
    check_attention(Device(xp_gpu), **case)


@SETTINGS
@given(**ATTENTION_CASES)
def test_attention_gradients(b, sq, sk, hkv, group, d, dv, causal, window, softcap, alibi, scale,
                             seed):
    """The NumPy path's ``attention_backward`` against the chain rule of the definitions above
    (``flash_attn_grads``), in float32 on ``(B, S, H, D)`` arrays viewed as ``(B, H, S, D)``."""
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q, k = normal(rng, (b, sq, hq, d)), normal(rng, (b, sk, hkv, d))
    v, dout = normal(rng, (b, sk, hkv, dv)), normal(rng, (b, sq, hq, dv))
    slopes = slopes_of(rng, alibi, b, hq)
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=slopes)
    heads_first = [x.transpose(0, 2, 1, 3) for x in (q, k, v, dout)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cuflash.CuflashNumericalWarning)
        out, lse = cuflash.attention(*heads_first[:3], return_lse=True, **options)
        grads = cuflash.attention_backward(heads_first[3], *heads_first[:3], out, lse, **options)
    want = flash_attn_grads(q, k, v, dout, scale, causal, window, softcap, slopes)
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want):
        np.testing.assert_allclose(got.transpose(0, 2, 1, 3), expected, atol=5e-5, rtol=5e-4,
                                   err_msg=name)


# ----------------------------------------------------------------------------- packed sequences

VARLEN_CASES = dict(
    lengths=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=4),
    hkv=st.integers(1, 2), group=st.integers(1, 2), causal=st.booleans(),
    window=st.tuples(SIDES, SIDES), softcap=st.sampled_from([0.0, 0.7]),
    alibi=st.sampled_from([None, "H", "BH"]), spare=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1))


def check_attention_varlen(device, lengths, hkv, group, causal, window, softcap, alibi, spare,
                           seed):
    """Empty sequences on either side, more queries than keys and the reverse, per sequence."""
    rng = np.random.default_rng(seed)
    hq, d = hkv * group, 8
    cu_q = np.cumsum([0] + [n for n, _ in lengths]).astype(np.int32)
    cu_k = np.cumsum([0] + [n for _, n in lengths]).astype(np.int32)
    (q, k, v), given = device.inputs(normal(rng, (cu_q[-1], hq, d)), normal(rng, (cu_k[-1], hkv, d)),
                                     normal(rng, (cu_k[-1], hkv, d)))
    slopes = slopes_of(rng, alibi, len(lengths), hq)
    want, want_lse = flash_attn_varlen_func(q, k, v, cu_q, cu_k, causal=causal,
                                            window_size=window, softcap=softcap,
                                            alibi_slopes=slopes)
    longest_q = max(n for n, _ in lengths) + spare  # larger max lengths change nothing
    longest_k = max(n for _, n in lengths) + spare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cuflash.CuflashNumericalWarning)
        out, lse = cuflash.attention_varlen(*given, device.index(cu_q), device.index(cu_k),
                                            longest_q, longest_k, causal=causal, window=window,
                                            softcap=softcap, alibi_slopes=device.index(slopes),
                                            return_lse=True)
    device.assert_matches(out, lse, want, want_lse)


@SETTINGS
@given(**VARLEN_CASES)
def test_attention_varlen(**case):
    check_attention_varlen(Device(), **case)


@pytest.mark.gpu
@GPU_SETTINGS
@given(**VARLEN_CASES)
def test_attention_varlen_kernels(xp_gpu, **case):
    check_attention_varlen(Device(xp_gpu), **case)


# ----------------------------------------------------------------------------- KV cache

KVCACHE_CASES = dict(
    b=st.integers(1, 3), sq=st.integers(1, 5), s_new=st.integers(0, 4), hkv=st.integers(1, 2),
    group=st.integers(1, 2), causal=st.booleans(),
    window=st.tuples(st.one_of(st.just(-1), st.integers(0, 40)),
                     st.one_of(st.just(-1), st.integers(0, 40))),
    softcap=st.sampled_from([0.0, 0.7]), alibi=st.sampled_from([None, "H", "BH"]),
    layout=st.sampled_from(["contiguous", "cache_batch_idx", "paged"]),
    fill=st.sampled_from(["random", "empty", "full", "int"]), leftpad=st.booleans(),
    seed=st.integers(0, 2**32 - 1))


def check_attention_with_kvcache(device, b, sq, s_new, hkv, group, causal, window, softcap, alibi,
                                 layout, fill, leftpad, seed):
    """Contiguous caches (with and without ``cache_batch_idx``, with and without left padding)
    and paged ones, lengths from 0 to the whole capacity, with and without new keys."""
    rng = np.random.default_rng(seed)
    hq, d = hkv * group, 8
    q = normal(rng, (b, sq, hq, d))
    k = v = None
    if s_new:
        k, v = normal(rng, (b, s_new, hkv, d)), normal(rng, (b, s_new, hkv, d))
    block_table = cache_batch_idx = None
    if layout == "paged":
        pages = 2 * b + 1  # one page no row lists
        k_cache = normal(rng, (pages, 16, hkv, d))
        block_table = rng.permutation(pages)[:2 * b].reshape(b, 2).astype(np.int32)
        capacity = 32
    else:
        rows = b + (2 if layout == "cache_batch_idx" else 0)  # rows past the batch: untouched
        k_cache = normal(rng, (rows, 20, hkv, d))
        if layout == "cache_batch_idx":
            cache_batch_idx = rng.permutation(rows)[:b].astype(np.int32)
        capacity = 20
    v_cache = normal(rng, k_cache.shape)
    lengths = {"random": lambda: rng.integers(0, capacity - s_new + 1, b).astype(np.int32),
               "empty": lambda: np.zeros(b, np.int32),
               "full": lambda: np.full(b, capacity - s_new, np.int32),
               "int": lambda: int(rng.integers(0, capacity - s_new + 1))}[fill]()
    slopes = slopes_of(rng, alibi, b, hq)
    cache_leftpad = None
    if leftpad and layout != "paged":  # flash-attn pads contiguous caches only
        cache_leftpad = rng.integers(0, np.broadcast_to(lengths, (b,)) + 1).astype(np.int32)
    (q, k_cache, v_cache, k, v), given = device.inputs(q, k_cache, v_cache, k, v)
    want, want_lse, want_k, want_v = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, lengths, cache_batch_idx, block_table, cache_leftpad,
        causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cuflash.CuflashNumericalWarning)
        out, lse = cuflash.attention_with_kvcache(
            *given, cache_seqlens=device.index(lengths), block_table=device.index(block_table),
            cache_batch_idx=device.index(cache_batch_idx), cache_leftpad=device.index(cache_leftpad),
            causal=causal, window=window, softcap=softcap, alibi_slopes=device.index(slopes),
            return_lse=True)
    # The appends are copies: the caches' values exactly (float16 values, widened, on the GPU).
    np.testing.assert_array_equal(device.host(given[1]), want_k.astype(given[1].dtype))
    np.testing.assert_array_equal(device.host(given[2]), want_v.astype(given[2].dtype))
    device.assert_matches(out, lse, want, want_lse)


@SETTINGS
@given(**KVCACHE_CASES)
def test_attention_with_kvcache(**case):
    check_attention_with_kvcache(Device(), **case)


@pytest.mark.gpu
@GPU_SETTINGS
@given(**KVCACHE_CASES)
def test_attention_with_kvcache_kernels(xp_gpu, **case):
    check_attention_with_kvcache(Device(xp_gpu), **case)


def _rotated(x, cos, sin, positions, interleaved):
    """flash-attn's rotary embedding of ``x`` (S, H, D), token ``t`` at ``positions[t]``."""
    x = x.astype(np.float64)
    half = cos.shape[1]
    for t, position in enumerate(positions):
        for i in range(half):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            c, s = float(cos[position, i]), float(sin[position, i])
            x[t, :, a], x[t, :, b] = (x[t, :, a] * c - x[t, :, b] * s,
                                      x[t, :, a] * s + x[t, :, b] * c)
    return x


@SETTINGS
@given(b=st.integers(1, 3), sq=st.integers(1, 3), s_new=st.integers(1, 3), causal=st.booleans(),
       window=st.tuples(st.one_of(st.just(-1), st.integers(0, 25)),
                        st.one_of(st.just(-1), st.integers(0, 25))),
       interleaved=st.booleans(), rotary_dim=st.sampled_from([2, 4, 8]),
       seed=st.integers(0, 2**32 - 1))
def test_rotary_positions(b, sq, s_new, causal, window, interleaved, rotary_dim, seed):
    """New key ``t`` turns to ``cache_seqlens + t``; query ``i`` to ``cache_seqlens + i`` when the
    call is causal or local, else to ``cache_seqlens`` (flash-attn's docstring; a window side of
    at least the cache's capacity counts as none, as its kernel drops it)."""
    rng = np.random.default_rng(seed)
    hq, hkv, d, capacity = 2, 1, 8, 20
    q = normal(rng, (b, sq, hq, d))
    k, v = normal(rng, (b, s_new, hkv, d)), normal(rng, (b, s_new, hkv, d))
    k_cache, v_cache = normal(rng, (b, capacity, hkv, d)), normal(rng, (b, capacity, hkv, d))
    lengths = rng.integers(0, capacity - s_new + 1, b).astype(np.int32)
    angles = rng.uniform(0, 2 * np.pi, (capacity + 4, rotary_dim // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    local = causal or any(0 <= side < capacity for side in window)
    # The tables end before the last query's position: cuflash refuses such a call.
    assume(not (local and int(lengths.max()) + sq > len(cos)))
    q_turned = np.stack([_rotated(q[n], cos, sin, lengths[n] + np.arange(sq) * local,
                                  interleaved) for n in range(b)]).astype(np.float32)
    k_turned = np.stack([_rotated(k[n], cos, sin, lengths[n] + np.arange(s_new), interleaved)
                         for n in range(b)]).astype(np.float32)
    want, _, want_k, _ = flash_attn_with_kvcache(q_turned, k_cache, v_cache, k_turned, v, lengths,
                                                 None, None, causal=causal, window_size=window)
    out = cuflash.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                         causal=causal, window=window, rotary_cos=cos,
                                         rotary_sin=sin, rotary_interleaved=interleaved)
    np.testing.assert_allclose(k_cache, want_k, atol=1e-6)
    np.testing.assert_allclose(out, want, atol=3e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- cuflash.torch

FLASH_ATTN_OPTIONS = ("dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                      "softcap=0.0, alibi_slopes=None, deterministic=False, "
                      "return_attn_probs=False")
FLASH_ATTN_SIGNATURES = {  # flash-attn 2's flash_attn_interface.py, names, order and defaults
    "flash_attn_func": f"(q, k, v, {FLASH_ATTN_OPTIONS})",
    "flash_attn_qkvpacked_func": f"(qkv, {FLASH_ATTN_OPTIONS})",
    "flash_attn_kvpacked_func": f"(q, kv, {FLASH_ATTN_OPTIONS})",
    "flash_attn_varlen_func": ("(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "
                               f"{FLASH_ATTN_OPTIONS}, block_table=None)"),
    "flash_attn_varlen_qkvpacked_func": f"(qkv, cu_seqlens, max_seqlen, {FLASH_ATTN_OPTIONS})",
    "flash_attn_varlen_kvpacked_func": ("(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, "
                                        f"max_seqlen_k, {FLASH_ATTN_OPTIONS})"),
    "flash_attn_with_kvcache": (
        "(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, "
        "cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, "
        "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
        "rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False)"),
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_torch_signatures_are_flash_attns(name):
    """Ported code passes these positionally and by name: every name, position and default."""
    pytest.importorskip("torch")
    import cuflash.torch
    signature = inspect.signature(getattr(cuflash.torch, name))
    assert str(signature).replace(" ", "") == FLASH_ATTN_SIGNATURES[name].replace(" ", "")


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(sq=st.integers(1, 7), sk=st.integers(1, 7), group=st.integers(1, 2), causal=st.booleans(),
       window=st.tuples(SIDES, SIDES), softcap=st.sampled_from([0.0, 0.7]),
       alibi=st.sampled_from([None, "H", "BH"]), seed=st.integers(0, 2**32 - 1))
def test_torch_flash_attn_func(sq, sk, group, causal, window, softcap, alibi, seed):
    """Positional flash-attn arguments; ``return_attn_probs`` gives the lse in flash-attn's
    ``(B, Hq, Sq)`` layout."""
    torch = pytest.importorskip("torch")
    from cuflash.torch import flash_attn_func as torch_flash_attn_func
    rng = np.random.default_rng(seed)
    b, hkv, d = 2, 2, 8
    hq = hkv * group
    q = normal(rng, (b, sq, hq, d))
    k, v = normal(rng, (b, sk, hkv, d)), normal(rng, (b, sk, hkv, d))
    slopes = slopes_of(rng, alibi, b, hq)
    want, want_lse = flash_attn_func(q, k, v, None, causal, window, softcap, slopes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cuflash.CuflashNumericalWarning)
        out, lse, _ = torch_flash_attn_func(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), 0.0, None, causal,
            window, softcap, None if slopes is None else torch.from_numpy(slopes), False, True)
    assert_matches(out.numpy(), lse.numpy(), want, want_lse)
