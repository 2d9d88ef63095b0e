"""KV-cache cases and their float64 oracle, for tests/test_kvcache_cpu.py and tests/test_kvcache.py.

The oracle is built independently of cuflash's rules: each batch row's keys are taken from a copy
of the cache made before the call (through the block table or ``cache_batch_idx``), with the
appended keys placed after them by hand, and attended to densely in float64 with the
bottom-right rule written out here. The tolerance is the correctness rule of
``cuflash/check/rule.py``: ``2·max|naive − ref64| + 1e-5``, with ``naive`` the same-precision
attention of ``cuflash.reference.naive_attention`` on each row's keys.

Usage: ``case = make_case(rng, xp, ...)``, call ``cuflash.attention_with_kvcache(*case.args,
**case.kwargs)``, then ``assert_kvcache_close(case, out, lse)`` and
``assert_cache_appended(case)``. With rotary tables: ``rotated, rotary = rotary_case(case, cos,
sin, interleaved)`` (the case rotated independently in float64) and
``call_and_check_rotated(case, rotated, rotary, context)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

import cuflash
from cuflash import reference
from cuflash.check.rule import FACTOR, SLACK, allowed


def _module(x):
    if type(x).__module__.partition(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def to_host(x):
    return x.get() if _module(x) is not np else np.asarray(x)


@dataclass
class Case:
    """One call's inputs, the copies the oracle reads, and its options."""

    xp: Any
    q: Any
    k_cache: Any
    v_cache: Any
    k: Any
    v: Any
    lengths: np.ndarray            # int64 (B,): cache lengths before the append
    seqlens: Any                   # what is passed as cache_seqlens
    block_table: Any = None
    cache_batch_idx: Any = None
    options: dict = field(default_factory=dict)  # causal, scale, window, softcap, alibi_slopes
    k_cache_before: Any = None     # copies, same module
    v_cache_before: Any = None

    @property
    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.k, self.v)

    @property
    def kwargs(self):
        return dict(cache_seqlens=self.seqlens, block_table=self.block_table,
                    cache_batch_idx=self.cache_batch_idx, **self.options)

    @property
    def s_new(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def capacity(self) -> int:
        """Keys a batch row's cache holds."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.page_size
        return self.k_cache.shape[1]

    def slots(self, row, start, stop):
        """Index of keys ``start … stop − 1`` of batch ``row`` into the cache (host ints)."""
        positions = np.arange(start, stop)
        if self.block_table is not None:
            table = to_host(self.block_table)
            return (table[row, positions // self.page_size].astype(np.int64),
                    positions % self.page_size)
        cache_row = row if self.cache_batch_idx is None else int(to_host(self.cache_batch_idx)[row])
        return (np.full(positions.shape, cache_row), positions)

    def row_keys(self, row):
        """Keys and values batch ``row`` attends to, ``(L, Hkv, D)``, from the copies made before
        the call and the appended keys."""
        xp = self.xp
        n = int(self.lengths[row])
        rows, cols = (xp.asarray(i) for i in self.slots(row, 0, n))
        keys, values = self.k_cache_before[rows, cols], self.v_cache_before[rows, cols]
        if self.k is not None:
            keys = xp.concatenate([keys, self.k[row]], axis=0)
            values = xp.concatenate([values, self.v[row]], axis=0)
        return keys, values


def random_array(rng, shape, dtype, xp):
    host = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return host if xp is np else xp.asarray(host)


def make_case(rng, xp, *, dtype, b, sq, hq, hkv, d, dv=None, lengths, capacity,
              page_size=None, s_new=0, batch_idx=False, seqlens_as="array", causal=False,
              scale=None, window=(-1, -1), softcap=0.0, alibi=None, spare_rows=0) -> Case:
    """A random case. ``lengths``: cache lengths before the append (one per batch row);
    ``capacity``: keys a row's cache holds (a multiple of ``page_size`` when paged);
    ``page_size``: paged cache with a random block table over shuffled pages; ``batch_idx``:
    a contiguous cache with ``B + spare_rows`` rows picked in random order; ``seqlens_as``:
    ``"array"`` (int32 of ``xp``) or ``"int"`` (all lengths equal); ``alibi``: None, ``"heads"``
    or ``"batch"``."""
    dv = dv or d
    lengths = np.asarray(lengths, dtype=np.int64)
    assert lengths.shape == (b,)
    if page_size is None:
        rows = b + (spare_rows if batch_idx else 0)
        cache_shape = (rows, capacity, hkv)
        block_table = None
        cache_batch_idx = (rng.permutation(rows)[:b].astype(np.int32) if batch_idx else None)
    else:
        assert capacity % page_size == 0
        max_pages = capacity // page_size
        num_pages = b * max_pages + spare_rows
        cache_shape = (num_pages, page_size, hkv)
        block_table = rng.permutation(num_pages)[:b * max_pages].reshape(b, max_pages)
        block_table = block_table.astype(np.int32)
        cache_batch_idx = None
    k_cache = random_array(rng, cache_shape + (d,), dtype, xp)
    v_cache = random_array(rng, cache_shape + (dv,), dtype, xp)
    q = random_array(rng, (b, sq, hq, d), dtype, xp)
    k = v = None
    if s_new:
        k = random_array(rng, (b, s_new, hkv, d), dtype, xp)
        v = random_array(rng, (b, s_new, hkv, dv), dtype, xp)
    if seqlens_as == "int":
        assert (lengths == lengths[0]).all()
        seqlens = int(lengths[0])
    else:
        seqlens = xp.asarray(lengths.astype(np.int32))
    slopes = None
    if alibi is not None:
        base = 2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)
        shape = (hq,) if alibi == "heads" else (b, hq)
        slopes = xp.asarray((base * rng.uniform(0.5, 1.5, shape)).astype(np.float32))
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=slopes)
    to_xp = (lambda a: None if a is None else xp.asarray(a))
    return Case(xp, q, k_cache, v_cache, k, v, lengths, seqlens, to_xp(block_table),
                to_xp(cache_batch_idx), options, k_cache.copy(), v_cache.copy())


# ----------------------------------------------------------------------------- the oracle

def oracle_row(q, keys, values, *, causal, scale, window, softcap, slopes):
    """Float64 attention of one batch row: q ``(Sq, Hq, D)``, keys/values ``(L, Hkv, ·)``;
    returns out ``(Sq, Hq, Dv)`` and lse ``(Hq, Sq)``. The rules, written out: with
    ``shift = L − Sq``, query ``i`` sees key ``j`` when ``j ≥ i + shift − left`` (left ≥ 0)
    and ``j ≤ i + shift + right`` (right ≥ 0; causal makes right at most 0); the logit is
    ``scale·s``, then ``c·tanh(·/c)``, then ``− slope·|i + shift − j|``."""
    xp = _module(q)
    sq, hq, d = q.shape
    n, hkv, dv = values.shape
    if n == 0:
        return xp.zeros((sq, hq, dv)), xp.full((hq, sq), -np.inf)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    group = hq // hkv
    q64 = q.astype(xp.float64).transpose(1, 0, 2)                          # (Hq, Sq, D)
    k64 = xp.repeat(keys.astype(xp.float64).transpose(1, 0, 2), group, axis=0)
    v64 = xp.repeat(values.astype(xp.float64).transpose(1, 0, 2), group, axis=0)
    s = (q64 @ k64.transpose(0, 2, 1)) * scale                             # (Hq, Sq, L)
    if softcap:
        s = softcap * xp.tanh(s / softcap)
    i = xp.arange(sq)[:, None]
    j = xp.arange(n)[None, :]
    shift = n - sq
    if slopes is not None:
        s = s - xp.asarray(slopes, dtype=xp.float64)[:, None, None] * xp.abs(i + shift - j)
    left, right = window
    if causal:
        right = 0 if right == -1 else min(right, 0)
    keep = xp.ones((sq, n), dtype=bool)
    if left != -1:
        keep &= j >= i + shift - left
    if right != -1:
        keep &= j <= i + shift + right
    s = xp.where(keep, s, -np.inf)
    peak = s.max(axis=-1, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    total = xp.exp(s - peak).sum(axis=-1, keepdims=True)
    seen = total > 0
    lse = xp.where(seen, xp.log(xp.where(seen, total, 1.0)) + peak, -np.inf)
    p = xp.where(seen, xp.exp(s - xp.where(seen, lse, 0.0)), 0.0)
    out = p @ v64                                                          # (Hq, Sq, Dv)
    return out.transpose(1, 0, 2), lse[..., 0]


def _row_slopes(case, row):
    slopes = case.options.get("alibi_slopes")
    if slopes is None:
        return None
    return slopes if slopes.ndim == 1 else slopes[row]


def expected(case):
    """Float64 ``(out (B, Sq, Hq, Dv), lse (B, Hq, Sq))`` and the naive same-precision error of
    each row (``None`` for rows without keys), all on the host."""
    opts = {key: case.options.get(key) for key in ("causal", "scale", "window", "softcap")}
    opts["causal"] = bool(opts["causal"])
    opts["softcap"] = opts["softcap"] or 0.0
    outs, lses, naive_errors = [], [], []
    for row in range(case.q.shape[0]):
        keys, values = case.row_keys(row)
        slopes = _row_slopes(case, row)
        out, lse = oracle_row(case.q[row], keys, values, slopes=slopes, **opts)
        out, lse = to_host(out), to_host(lse)
        outs.append(out)
        lses.append(lse)
        if keys.shape[0] == 0:
            naive_errors.append(None)
            continue
        naive, naive_lse = reference.naive_attention(
            case.q[row].transpose(1, 0, 2), keys.transpose(1, 0, 2), values.transpose(1, 0, 2),
            alibi_slopes=slopes, **opts)
        naive = to_host(naive).astype(np.float64).transpose(1, 0, 2)
        naive_lse = to_host(naive_lse).astype(np.float64)
        finite = np.isfinite(lse)
        naive_errors.append((np.abs(naive - out).max(),
                             np.abs(naive_lse[finite] - lse[finite]).max() if finite.any()
                             else 0.0))
    return np.stack(outs), np.stack(lses), naive_errors


def assert_kvcache_close(case, out, lse, context=""):
    """``out`` (and ``lse`` unless None) against the oracle, by the correctness rule."""
    assert out.dtype == case.q.dtype, f"out has dtype {out.dtype}; {context}"
    ref_out, ref_lse, naive_errors = expected(case)
    got = to_host(out).astype(np.float64)
    assert got.shape == ref_out.shape, f"out shape {got.shape} != {ref_out.shape}; {context}"
    assert not np.isnan(got).any(), f"out holds NaN at {np.argwhere(np.isnan(got))[:3]}; {context}"
    attended = np.isfinite(ref_lse)                                    # (B, Hq, Sq)
    empty = ~attended.transpose(0, 2, 1)                               # (B, Sq, Hq)
    assert (got[empty] == 0).all(), f"rows that see no key must give 0; {context}"
    errors = [e for e in naive_errors if e is not None]
    naive_out = max((e[0] for e in errors), default=0.0)
    error = np.abs(got - ref_out).max()
    assert error <= allowed(naive_out), (
        f"out: max|result - ref64| = {error:.3g} exceeds {FACTOR:g}·{naive_out:.3g} + "
        f"{SLACK:g}; {context}")
    if lse is None:
        return
    assert lse.dtype == np.float32, f"lse has dtype {lse.dtype}; {context}"
    got = to_host(lse).astype(np.float64)
    assert got.shape == ref_lse.shape, f"lse shape {got.shape} != {ref_lse.shape}; {context}"
    assert not np.isnan(got).any(), f"lse holds NaN; {context}"
    assert np.isneginf(got[~attended]).all(), f"lse of rows that see no key must be -inf; {context}"
    naive_lse = max((e[1] for e in errors), default=0.0)
    if attended.any():
        error = np.abs(got[attended] - ref_lse[attended]).max()
        assert error <= allowed(naive_lse), (
            f"lse: max|result - ref64| = {error:.3g} exceeds {FACTOR:g}·{naive_lse:.3g} + "
            f"{SLACK:g}; {context}")


def assert_cache_appended(case, context=""):
    """The caches hold the appended keys where they belong and are unchanged, bit for bit,
    everywhere else."""
    for name, cache, before, new in (("k_cache", case.k_cache, case.k_cache_before, case.k),
                                     ("v_cache", case.v_cache, case.v_cache_before, case.v)):
        want = to_host(before).copy()
        if new is not None:
            new = to_host(new)
            for row in range(new.shape[0]):
                start = int(case.lengths[row])
                want[case.slots(row, start, start + case.s_new)] = new[row]
        got = to_host(cache)
        same = got.view(np.uint8 if got.itemsize == 1 else f"u{got.itemsize}") == \
            want.view(f"u{want.itemsize}")
        assert same.all(), (f"{name} differs from the expected cache at "
                            f"{np.argwhere(~same)[:3].tolist()}; {context}")


# ----------------------------------------------------------------------------- rotary embedding

def rotary_tables(seqlen_ro, rotary_dim, dtype, xp=np, base=10000.0):
    """The usual RoPE tables ``(seqlen_ro, rotary_dim / 2)``: angle ``p · base^(−2i/rotary_dim)``,
    rounded to ``dtype``."""
    angles = np.arange(seqlen_ro)[:, None] * base ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    return tuple(xp.asarray(f(angles).astype(dtype)) for f in (np.cos, np.sin))


def rotate64(x, cos, sin, positions, interleaved):
    """``x`` ``(B, S, H, D)`` rotated at ``positions`` ``(B, S)``, written independently of
    cuflash: each pair as a complex number times ``cos + i·sin``, in float64, then rounded to
    ``x``'s dtype. Host arrays."""
    x, cos, sin = to_host(x), to_host(cos), to_host(sin)
    half = cos.shape[1]
    pairs = np.arange(half)
    first, second = (2 * pairs, 2 * pairs + 1) if interleaved else (pairs, pairs + half)
    x64 = x.astype(np.float64)
    turn = (cos.astype(np.float64) + 1j * sin.astype(np.float64))[positions][:, :, None, :]
    z = (x64[..., first] + 1j * x64[..., second]) * turn
    x64[..., first], x64[..., second] = z.real, z.imag
    return x64.astype(x.dtype)


def rotary_case(case: Case, cos, sin, interleaved: bool) -> tuple[Case, dict]:
    """The case the oracle reads for a call of ``case`` with these tables — q and k rotated by
    ``rotate64`` at flash-attn's positions (new keys at ``L_b + i``; queries there too when causal
    or windowed, else all at ``L_b``) — and the call's rotary keywords. As flash-attn, a window
    side of at least the capacity is no window."""
    xp, lengths = case.xp, case.lengths
    window = [side for side in case.options.get("window", (-1, -1)) if side < case.capacity]
    ordered = case.options.get("causal") or any(side >= 0 for side in window)
    sq = case.q.shape[1]
    q_positions = lengths[:, None] + (np.arange(sq) if ordered else np.zeros(sq, np.int64))
    k_positions = lengths[:, None] + np.arange(case.s_new)
    rotated = dataclasses.replace(
        case, q=xp.asarray(rotate64(case.q, cos, sin, q_positions, interleaved)),
        k=xp.asarray(rotate64(case.k, cos, sin, k_positions, interleaved)))
    return rotated, dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)


def assert_cache_appended_rotated(case: Case, rotated: Case, context=""):
    """As ``assert_cache_appended``, the appended keys being ``rotated.k`` up to rounding:
    cuflash rotates in float32 and ``rotate64`` in float64, and both round once to the dtype, so
    they may differ by one rounding of the dtype plus a few of float32's (relative to the
    largest key, since a turned pair may cancel)."""
    cache = to_host(case.k_cache)
    held = np.stack([cache[case.slots(row, int(n), int(n) + case.s_new)]
                     for row, n in enumerate(case.lengths)])
    want = to_host(rotated.k).astype(np.float64)
    error = np.abs(held.astype(np.float64) - want)
    bound = (ml_dtypes.finfo(case.q.dtype).eps * np.abs(want)
             + 4 * np.finfo(np.float32).eps * np.abs(want).max())
    assert (error <= bound).all(), (
        f"the appended keys differ from the rotated keys by up to {error.max():.3g}; {context}")
    # Everything else (and v_cache) bit for bit: the case whose appended keys are those held.
    assert_cache_appended(dataclasses.replace(case, k=case.xp.asarray(held)), context)


def poisoned_out(case, xp=None):
    xp = xp or case.xp
    b, sq, hq, _ = case.q.shape
    return xp.full((b, sq, hq, case.v_cache.shape[3]), np.nan, dtype=case.q.dtype)


def call_and_check(case: Case, context: str, **extra):
    """``attention_with_kvcache`` into a NaN-poisoned ``out``: the result is ``out`` itself and
    passes the rule, and the caches were appended to exactly; returns ``(out, lse)``."""
    out = poisoned_out(case)
    got, lse = cuflash.attention_with_kvcache(*case.args, **case.kwargs, return_lse=True,
                                              out=out, **extra)
    assert got is out
    assert_kvcache_close(case, out, lse, context)
    assert_cache_appended(case, context)
    return out, lse


def call_and_check_rotated(case: Case, rotated: Case, rotary: dict, context: str):
    """``call_and_check`` with the rotary keywords of ``rotary_case``: the result against the
    oracle of the rotated case, the rotated keys appended, q and k themselves unchanged."""
    q, k = case.q.copy(), case.k.copy()
    out = poisoned_out(case)
    got, lse = cuflash.attention_with_kvcache(*case.args, **case.kwargs, **rotary,
                                              return_lse=True, out=out)
    assert got is out
    assert_kvcache_close(rotated, out, lse, context)
    assert_cache_appended_rotated(case, rotated, context)
    assert (to_host(case.q) == to_host(q)).all() and (to_host(case.k) == to_host(k)).all(), (
        f"q and k must not be rotated in place; {context}")

