"""``attention_with_kvcache`` on NumPy arrays against a float64 statement of flash-attn's
``flash_attn_with_kvcache``, written from its documentation alone (not from cuflash's code nor
from ``tests/kvcache_cases.py``), over hypothesis-drawn calls that combine every option.

Where cuflash documents a difference (docs/api.md: the window's formula with more queries than
keys, the lse of a row without keys, ALiBi's distance on flash-attn's causal path, the refusal of
appends into slots another row appends to or reads), the statement follows cuflash's
documentation. The rotary positions with ``cache_leftpad`` are flash-attn's kernel's (absolute:
``cache_seqlens[b] + i``, the padding counted), as its docstring does not say.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
# (out, lse) tolerances per dtype: the rotated q and k are rounded to the dtype as the reference
# rounds them; what remains is the rounding of P and of the output
TOLERANCE = {np.float32: (2e-4, 2e-5), np.float16: (4e-3, 4e-3),
             ml_dtypes.bfloat16: (3e-2, 3e-2)}


def _rotate64(x, cos, sin, positions, interleaved):
    """``x`` ``(S, H, D)`` rotated at ``positions`` ``(S,)`` in float64 (RoFormer pairs)."""
    half = cos.shape[1]
    x = x.astype(np.float64).copy()
    c = cos.astype(np.float64)[positions][:, None, :]
    s = sin.astype(np.float64)[positions][:, None, :]
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = x1 * c - x2 * s, x1 * s + x2 * c
    else:
        x1, x2 = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half], x[..., half:2 * half] = x1 * c - x2 * s, x1 * s + x2 * c
    return x


def _reference(call):
    """``(out, lse, k_cache, v_cache)`` in float64 as flash-attn documents the call."""
    q_dtype = call["q"].dtype
    q, kc, vc = (call[name].astype(np.float64) for name in ("q", "k_cache", "v_cache"))
    kc, vc = kc.copy(), vc.copy()
    b, sq, hq, d = q.shape
    hkv, dv = kc.shape[2], vc.shape[3]
    k, v = call["k"], call["v"]
    s_new = 0 if k is None else k.shape[1]
    lengths = np.broadcast_to(np.asarray(call["cache_seqlens"], np.int64), (b,))
    table, rows, pad = call["block_table"], call["cache_batch_idx"], call["cache_leftpad"]
    capacity = table.shape[1] * kc.shape[1] if table is not None else kc.shape[1]
    causal, (left, right) = call["causal"], call["window"]
    # flash-attn drops a window side of at least the cache's capacity (seqlen_k) before
    # choosing how the rotary embedding turns the queries; causal makes the right side 0.
    local = any(0 <= side < capacity for side in (left, right))
    scale = call["scale"] if call["scale"] is not None else d ** -0.5

    def slot(row, position):
        if table is not None:
            page_size = kc.shape[1]
            return table[row, position // page_size], position % page_size
        return (row if rows is None else rows[row]), position

    cos, sin = call["rotary_cos"], call["rotary_sin"]
    for row in range(b):
        if k is None:
            continue
        new_k = k[row].astype(np.float64)
        positions = lengths[row] + np.arange(s_new)
        if cos is not None:
            new_k = _rotate64(k[row], cos, sin, positions, call["rotary_interleaved"])
            # the cache holds the rotated keys in its own dtype
            new_k = new_k.astype(k.dtype).astype(np.float64)
        for i, position in enumerate(positions):
            kc[slot(row, position)] = new_k[i]
            vc[slot(row, position)] = v[row, i]

    out = np.zeros((b, sq, hq, dv))
    lse = np.full((b, hq, sq), -np.inf)
    slopes = call["alibi_slopes"]
    for row in range(b):
        first = 0 if pad is None else int(pad[row])
        end = int(lengths[row]) + s_new
        keys = np.array([kc[slot(row, p)] for p in range(first, end)]).reshape(-1, hkv, d)
        values = np.array([vc[slot(row, p)] for p in range(first, end)]).reshape(-1, hkv, dv)
        n = end - first
        qr = q[row]
        if cos is not None:
            start = lengths[row]
            qpos = start + (np.arange(sq) if causal or local else np.zeros(sq, np.int64))
            qr = _rotate64(call["q"][row], cos, sin, qpos, call["rotary_interleaved"])
            qr = qr.astype(q_dtype).astype(np.float64)
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(sq):
                seen = []
                for j in range(n):
                    diag = i + n - sq
                    if causal and j > diag:
                        continue
                    if left >= 0 and j < diag - left:
                        continue
                    if right >= 0 and j > diag + right:
                        continue
                    x = scale * float(qr[i, h] @ keys[j, kv])
                    if call["softcap"]:
                        x = call["softcap"] * np.tanh(x / call["softcap"])
                    if slopes is not None:
                        slope = slopes[h] if slopes.ndim == 1 else slopes[row, h]
                        x -= float(slope) * abs(diag - j)
                    seen.append((x, j))
                if not seen:
                    continue
                logits = np.array([x for x, _ in seen])
                top = logits.max()
                weights = np.exp(logits - top)
                total = weights.sum()
                lse[row, h, i] = top + np.log(total)
                out[row, i, h] = (weights / total) @ values[[j for _, j in seen], kv]
    return out, lse, kc, vc


@st.composite
def calls(draw):
    """One call's arguments (NumPy float32), every option drawn."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dtype = draw(st.sampled_from(DTYPES))

    def array(shape, strided):
        """Normal values of ``dtype``; ``strided``: a view of every other head of a larger
        buffer (returned too, so that what lies between the heads can be checked)."""
        if not strided:
            x = rng.standard_normal(shape).astype(dtype)
            return x, x
        parent = rng.standard_normal((*shape[:2], 2 * shape[2], shape[3])).astype(dtype)
        return parent[:, :, ::2], parent

    b = draw(st.integers(1, 3))
    sq = draw(st.integers(1, 6))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([8, 16]))
    dv = draw(st.sampled_from([4, 8, 16]))
    s_new = draw(st.integers(0, 3))
    paged = draw(st.booleans())
    if paged:
        page_size = draw(st.sampled_from([16, 32]))
        max_pages = draw(st.integers(1, 3))
        capacity = page_size * max_pages
        num_pages = b * max_pages + draw(st.integers(0, 2))
        if draw(st.booleans()):  # rows of their own
            table = rng.permutation(num_pages)[:b * max_pages].reshape(b, max_pages)
        else:  # pages shared between rows or listed twice: some appends are refused
            table = rng.integers(0, num_pages, (b, max_pages))
        table = table.astype(np.int32)
        cache_shape = (num_pages, page_size)
        rows = pad = None
    else:
        capacity = draw(st.integers(max(s_new, 1), 24))
        table = None
        b_cache = b + draw(st.integers(0, 2))
        cache_shape = (b_cache, capacity)
        rows = draw(st.sampled_from([None, "distinct", "any"]))
        if rows is not None:  # "any": cache rows shared between batch rows
            rows = (rng.permutation(b_cache)[:b] if rows == "distinct"
                    else rng.integers(0, b_cache, b)).astype(np.int32)
    lengths = np.array([draw(st.integers(0, capacity - s_new)) for _ in range(b)], np.int32)
    if not paged and draw(st.booleans()):
        pad = np.array([draw(st.integers(0, int(n))) for n in lengths], np.int32)
    elif not paged:
        pad = None
    strided = draw(st.booleans())
    k_cache, k_parent = array((*cache_shape, hkv, d), strided)
    v_cache, v_parent = array((*cache_shape, hkv, dv), strided)
    q, _ = array((b, sq, hq, d), draw(st.booleans()))
    k = v = None
    if s_new:
        k, _ = array((b, s_new, hkv, d), draw(st.booleans()))
        v, _ = array((b, s_new, hkv, dv), draw(st.booleans()))
    side = st.one_of(st.just(-1), st.integers(0, capacity + 2))
    window = draw(st.one_of(st.just((-1, -1)), st.tuples(side, side)))
    cos = sin = None
    interleaved = draw(st.booleans())
    if s_new and draw(st.booleans()):
        half = draw(st.integers(1, d // 2))
        seqlen_ro = capacity + sq + draw(st.integers(0, 3))
        angles = rng.uniform(0, 2 * np.pi, (seqlen_ro, half))
        cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    alibi = draw(st.sampled_from([None, "heads", "batch"]))
    slopes = None if alibi is None else rng.uniform(0.05, 0.5, (hq,) if alibi == "heads"
                                                    else (b, hq)).astype(np.float32)
    same = draw(st.booleans())
    parents = (k_parent, v_parent) if strided else None
    out = None
    if draw(st.booleans()):  # a given out, strided: heads last but one
        out = np.full((b, hq, sq, dv), np.nan, dtype).transpose(0, 2, 1, 3)
    return parents, dict(out=out, q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                cache_seqlens=int(lengths[0]) if same and np.all(lengths == lengths[0])
                else lengths,
                block_table=table, cache_batch_idx=rows, cache_leftpad=pad,
                causal=draw(st.booleans()), window=window,
                scale=draw(st.sampled_from([None, 0.3])),
                softcap=draw(st.sampled_from([0.0, 2.5])), alibi_slopes=slopes,
                rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)


def _append_clash(call) -> bool:
    """Whether an appended key would land in a slot that another appended key targets or that
    some batch row reads as cached (docs/api.md, "Append": such a call is refused)."""
    if call["k"] is None:
        return False
    b, s_new = call["q"].shape[0], call["k"].shape[1]
    lengths = np.broadcast_to(np.asarray(call["cache_seqlens"], np.int64), (b,))
    table, rows, pad = call["block_table"], call["cache_batch_idx"], call["cache_leftpad"]
    if table is None and rows is None:
        return False

    def slot(row, position):
        if table is not None:
            page_size = call["k_cache"].shape[1]
            return int(table[row, position // page_size]), position % page_size
        return int(rows[row]), position

    appended = [slot(row, int(lengths[row]) + i) for row in range(b) for i in range(s_new)]
    held = {slot(row, p) for row in range(b)
            for p in range(0 if pad is None else int(pad[row]), int(lengths[row]))}
    return len(set(appended)) < len(appended) or bool(held & set(appended))


def _kwargs(call):
    kwargs = {name: value for name, value in call.items()
              if name not in ("q", "k_cache", "v_cache", "k", "v")}
    return kwargs


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(calls())
def test_numpy_route_matches_flash_attn_semantics(drawn):
    parents, call = drawn
    expected_out, expected_lse, expected_k, expected_v = _reference(call)
    if parents is not None:  # the heads the views skip must not be written either
        skipped = [np.array(parent[:, :, 1::2], copy=True) for parent in parents]
    before = {name: np.array(x, copy=True) for name, x in call.items()
              if isinstance(x, np.ndarray) and name not in ("k_cache", "v_cache", "out")}
    if _append_clash(call):
        k_before = np.array(call["k_cache"], copy=True)
        with pytest.raises(ValueError, match="both name"):
            cuflash.attention_with_kvcache(
                call["q"], call["k_cache"], call["v_cache"], call["k"], call["v"],
                **_kwargs(call))
        np.testing.assert_array_equal(call["k_cache"], k_before)  # refused before any write
        return
    out, lse = cuflash.attention_with_kvcache(
        call["q"], call["k_cache"], call["v_cache"], call["k"], call["v"], return_lse=True,
        **_kwargs(call))
    # the caches: the appended slots hold the new (rotated) keys, nothing else moved
    # (a rotated key may differ from the float64 rotation by one rounding)
    dtype = call["q"].dtype.type
    ulp = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(call["k_cache"].astype(np.float64), expected_k, rtol=ulp,
                               atol=ulp)
    np.testing.assert_array_equal(call["v_cache"].astype(np.float64), expected_v)
    if parents is not None:
        for parent, before_call in zip(parents, skipped):
            np.testing.assert_array_equal(parent[:, :, 1::2], before_call)
    for name, x in before.items():  # inputs the call must not modify
        np.testing.assert_array_equal(call[name], x, err_msg=name)
    assert out.dtype == dtype and lse.dtype == np.float32
    assert call["out"] is None or out is call["out"]
    rtol, atol = TOLERANCE[dtype]
    np.testing.assert_allclose(out.astype(np.float64), expected_out, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], rtol=rtol, atol=atol)
