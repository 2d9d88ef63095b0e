"""Checks results against the correctness rule of cuflash/check/rule.py, for NumPy and CuPy results.

A result passes when ``max|result − ref64| ≤ 2·max|naive − ref64| + 1e-5``, with ``ref64``
the float64 oracle and ``naive`` attention computed plainly in the input dtype
(``cuflash.reference``). Rows with nothing to attend to must give exactly 0 and ``lse = -inf``;
no result may hold NaN (outputs are poisoned with NaN before a call, so an unwritten element
fails).

References are computed with the inputs' own array module (so GPU tests check on the GPU) and
compared on the host in float64.

The rule compares maxima, so it is meaningful for results of at least a few hundred elements:
with a handful of elements the naive error is itself a noisy estimate. Tests keep enough batch,
heads and head dimension for that.

Usage (tests/ is on sys.path, see conftest.py)::

    from oracle import assert_forward_close, assert_backward_close, random_array, poisoned
"""

from __future__ import annotations

import contextlib

import numpy as np

from cuflash import reference
from cuflash.check.rule import FACTOR, SLACK, allowed


def to_host(x):
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if type(x).__module__.partition(".")[0] == "cupy" else np.asarray(x)


def _module(x):
    if type(x).__module__.partition(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def random_array(rng, shape, dtype, *, xp=np):
    """Standard-normal values in ``dtype`` (never all zeros), on ``xp``'s device."""
    host = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return host if xp is np else xp.asarray(host)


def poisoned(shape, dtype, *, xp=np):
    """An array filled with NaN, so that any element a call leaves unwritten fails the check."""
    return xp.full(shape, np.nan, dtype=dtype)


@contextlib.contextmanager
def poisoned_allocations(xp):
    """Inside, every CuPy allocation is filled with 0xFF bytes on the current stream before it
    is handed out (NaN in float16, bfloat16 and float32), so that outputs a call allocates
    itself (lse, gradients, ``out`` when none is given) fail the check where it leaves them
    unwritten, as a ``poisoned`` ``out=`` does; workspaces get the same bytes, which the kernels
    must not mistake for zeros. Nothing changes for NumPy."""
    if xp is np:
        yield
        return
    import cupy

    allocate = cupy.cuda.get_allocator()

    def poisoned_memory(size):
        memory = allocate(size)
        if size:
            cupy.cuda.runtime.memsetAsync(memory.ptr, 0xFF, size,
                                          cupy.cuda.get_current_stream().ptr)
        return memory

    with cupy.cuda.using_allocator(poisoned_memory):
        yield


def _combined_mask(xp, nq, nk, *, causal, mask, block_mask, rows=None, window=(-1, -1)):
    """The element mask (True = attended) of all the masks of a call, for query ``rows``."""
    keep = reference.keep_mask(nq, nk, causal=causal, window=window, block_mask=block_mask,
                               rows=rows, xp=xp)
    if mask is not None:
        mask = xp.asarray(mask, dtype=bool)
        if rows is not None and mask.shape[-2] != 1:
            mask = mask[..., xp.asarray(rows), :]
        keep = mask if keep is None else keep & mask
    return keep


def assert_forward_close(out, lse, q, k, v, *, causal=False, scale=None, window=(-1, -1),
                         softcap=0.0, alibi_slopes=None, mask=None, block_mask=None, rows=None,
                         dropout_p=0.0, dropout_seed=None, dropout_offset=0, context=""):
    """Check ``out`` (and ``lse`` unless it is None) of ``attention(q, k, v, ...)``.

    The options are those of ``cuflash.attention`` (dropout included: the references draw the
    same mask from ``cuflash._dropout``). ``mask`` is an element mask (True =
    attended) broadcastable to ``(..., Hq, Nq, Nk)``; every mask combines with the others.
    ``rows`` limits the check to those query rows (for sequences too long for a full float64
    reference). ``context`` (e.g. the random seed) is added to every failure message.
    """
    xp = _module(q)
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, mask=mask, block_mask=block_mask, rows=rows,
                   dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_offset=dropout_offset)
    assert out.dtype == q.dtype, f"out has dtype {out.dtype}, expected {q.dtype}; {context}"
    if lse is not None:
        assert lse.dtype == np.float32, f"lse has dtype {lse.dtype}, expected float32; {context}"
    if rows is not None:
        index = xp.asarray(rows)
        out = out[..., index, :]
        lse = None if lse is None else lse[..., index]
    ref_out, ref_lse = reference.attention(q, k, v, **options)
    naive_out, naive_lse = reference.naive_attention(q, k, v, **options)
    ref_lse = to_host(ref_lse)
    attended = np.isfinite(ref_lse)

    out = to_host(out).astype(np.float64)
    _check_shape("out", out, ref_out, context)
    _check_no_nan("out", out, context)
    _check_masked_rows_are_zero(out, attended, context)
    _check_rule("out", out, to_host(ref_out), to_host(naive_out), context)

    if lse is not None:
        lse = to_host(lse).astype(np.float64)
        _check_shape("lse", lse, ref_lse, context)
        _check_no_nan("lse", lse, context)
        if not np.all(np.isneginf(lse[~attended])):
            raise AssertionError(f"lse of fully masked rows must be -inf, got "
                                 f"{lse[~attended][~np.isneginf(lse[~attended])][:5]}; {context}")
        _check_rule("lse", lse[attended], ref_lse[attended],
                    to_host(naive_lse).astype(np.float64)[attended], context)


def assert_backward_close(grads, dout, q, k, v, *, causal=False, scale=None, window=(-1, -1),
                          softcap=0.0, alibi_slopes=None, mask=None, block_mask=None,
                          dropout_p=0.0, dropout_seed=None, dropout_offset=0, out=None,
                          context=""):
    """Check ``grads = (dq, dk, dv)`` of ``attention_backward(dout, q, k, v, ...)``; ``out``: the
    output that call received, for the naive baseline's row term (see
    ``reference.naive_attention_backward``)."""
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                   alibi_slopes=alibi_slopes, mask=mask, block_mask=block_mask,
                   dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_offset=dropout_offset)
    refs = reference.attention_backward(dout, q, k, v, **options)
    naives = reference.naive_attention_backward(dout, q, k, v, **options, out=out)
    for name, got, x, ref, naive in zip(("dq", "dk", "dv"), grads, (q, k, v), refs, naives):
        assert got.dtype == x.dtype, f"{name} has dtype {got.dtype}, expected {x.dtype}; {context}"
        got = to_host(got).astype(np.float64)
        _check_shape(name, got, x, context)
        _check_no_nan(name, got, context)
        ref = to_host(ref)
        _check_rule(name, got, ref, to_host(naive).astype(np.float64), context)


def _check_shape(name, got, expected, context):
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{name} has shape {tuple(got.shape)}, expected "
                             f"{tuple(expected.shape)}; {context}")


def _check_no_nan(name, got, context):
    if np.isnan(got).any():
        where = np.argwhere(np.isnan(got))
        raise AssertionError(f"{name} holds {len(where)} NaN (unwritten or invalid), first at "
                             f"{tuple(where[0])}; {context}")


def _check_masked_rows_are_zero(out, attended, context):
    masked_rows = out[~attended]
    if masked_rows.size and np.any(masked_rows != 0):
        raise AssertionError(f"fully masked rows must give output 0, got values up to "
                             f"{np.abs(masked_rows).max():.3g}; {context}")


def _check_rule(name, got, ref, naive, context):
    if got.size == 0:
        return
    error = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(error), error.shape)
    naive_error = np.abs(naive - ref).max()
    bound = allowed(naive_error)
    if not error[worst] <= bound:  # NaN fails
        raise AssertionError(
            f"{name}: max|result - ref64| = {error[worst]:.3g} at {tuple(map(int, worst))} "
            f"(result {got[worst]:.6g}, ref64 {ref[worst]:.6g}) exceeds "
            f"{FACTOR:g}·max|naive - ref64| + {SLACK:g} = {bound:.3g}; {context}")


def spec_for(q, k, v, **options):
    """The AttentionSpec cuflash.attention / attention_backward would build for these arguments
    (for tests that call a back end's entry points directly)."""
    from cuflash import _api

    return _api._spec(q, k, v, **options)[1]


# ----------------------------------------------------------------------------- packed sequences

def varlen_sequences(cu_q, cu_k):
    """``(b, query rows, key rows)`` of each sequence of packed offsets (NumPy or CuPy)."""
    host_q, host_k = to_host(cu_q).astype(np.int64), to_host(cu_k).astype(np.int64)
    for b in range(len(host_q) - 1):
        yield b, slice(int(host_q[b]), int(host_q[b + 1])), slice(int(host_k[b]),
                                                                  int(host_k[b + 1]))


def _heads_first(x, rows):
    """Rows of a packed ``(total, H, D)`` array as ``(H, n, D)`` (one sequence, dense form)."""
    return x[rows].transpose(1, 0, 2)


def _slopes_of(alibi_slopes, b):
    if alibi_slopes is None or alibi_slopes.ndim == 1:
        return alibi_slopes
    return alibi_slopes[b]


def _refuse_dropout(options):
    """The per-sequence oracle runs each sequence as batch element 0, where the library draws
    sequence b's dropout mask as batch element b: with dropout it would compare against the
    wrong mask (varlen dropout is checked against dense calls instead)."""
    if options.get("dropout_p"):
        raise TypeError("the varlen oracle draws no sequence's dropout mask as the library does: "
                        "check varlen dropout against dense calls of each sequence")


def _varlen_forward_refs(q, k, v, cu_q, cu_k, alibi_slopes, options):
    """Packed float64 oracle and same-precision naive results (host arrays): out and lse of
    each sequence in its rows; rows of sequences without keys stay 0 / -inf."""
    _refuse_dropout(options)
    total_q, hq, dv = q.shape[0], q.shape[1], v.shape[2]
    outs = [np.zeros((total_q, hq, dv)) for _ in range(2)]
    lses = [np.full((hq, total_q), -np.inf) for _ in range(2)]
    for b, rq, rk in varlen_sequences(cu_q, cu_k):
        if rq.stop == rq.start or rk.stop == rk.start:
            continue
        args = (_heads_first(q, rq), _heads_first(k, rk), _heads_first(v, rk))
        slopes = _slopes_of(alibi_slopes, b)
        for fn, out, lse in zip((reference.attention, reference.naive_attention), outs, lses):
            o, l = fn(*args, alibi_slopes=slopes, **options)
            out[rq] = to_host(o).astype(np.float64).transpose(1, 0, 2)
            lse[:, rq] = to_host(l)
    return outs, lses


def assert_varlen_forward_close(out, lse, q, k, v, cu_q, cu_k, *, alibi_slopes=None, context="",
                                **options):
    """Check ``out`` (and ``lse`` unless None) of ``attention_varlen(q, k, v, cu_q, cu_k, ...)``:
    every sequence against the oracle of that sequence alone (``attention`` on ``(H, n, D)``),
    the rule applied to the packed results as a whole. ``options``: ``attention``'s."""
    assert out.dtype == q.dtype, f"out has dtype {out.dtype}, expected {q.dtype}; {context}"
    (ref_out, naive_out), (ref_lse, naive_lse) = _varlen_forward_refs(q, k, v, cu_q, cu_k,
                                                                      alibi_slopes, options)
    attended = np.isfinite(ref_lse).T  # (total_q, Hq)
    out = to_host(out).astype(np.float64)
    _check_shape("out", out, ref_out, context)
    _check_no_nan("out", out, context)
    _check_masked_rows_are_zero(out, attended, context)
    _check_rule("out", out, ref_out, naive_out, context)
    if lse is not None:
        assert lse.dtype == np.float32, f"lse has dtype {lse.dtype}, expected float32; {context}"
        lse = to_host(lse).astype(np.float64)
        _check_shape("lse", lse, ref_lse, context)
        _check_no_nan("lse", lse, context)
        hidden = ~attended.T
        if not np.all(np.isneginf(lse[hidden])):
            raise AssertionError(f"lse of rows without keys must be -inf, got "
                                 f"{lse[hidden][~np.isneginf(lse[hidden])][:5]}; {context}")
        _check_rule("lse", lse[~hidden], ref_lse[~hidden], naive_lse[~hidden], context)


def assert_varlen_backward_close(grads, dout, q, k, v, cu_q, cu_k, *, alibi_slopes=None,
                                 context="", **options):
    """Check ``grads = (dq, dk, dv)`` of ``attention_varlen_backward``: each sequence's rows
    against the oracle of that sequence alone, the rule applied to the packed gradients as a
    whole (rows of sequences without keys or without queries are 0 in the reference)."""
    _refuse_dropout(options)
    xs = (q, k, v)
    refs = [np.zeros(x.shape) for x in xs]
    naives = [np.zeros(x.shape) for x in xs]
    for b, rq, rk in varlen_sequences(cu_q, cu_k):
        if rq.stop == rq.start or rk.stop == rk.start:
            continue
        args = (_heads_first(dout, rq), _heads_first(q, rq), _heads_first(k, rk),
                _heads_first(v, rk))
        slopes = _slopes_of(alibi_slopes, b)
        for fn, into in ((reference.attention_backward, refs),
                         (reference.naive_attention_backward, naives)):
            for g, rows, target in zip(fn(*args, alibi_slopes=slopes, **options), (rq, rk, rk),
                                       into):
                target[rows] = to_host(g).astype(np.float64).transpose(1, 0, 2)
    for name, got, x, ref, naive in zip(("dq", "dk", "dv"), grads, xs, refs, naives):
        assert got.dtype == x.dtype, f"{name} has dtype {got.dtype}, expected {x.dtype}; {context}"
        got = to_host(got).astype(np.float64)
        _check_shape(name, got, x, context)
        _check_no_nan(name, got, context)
        _check_rule(name, got, ref, naive, context)


def check_forward_and_backward(q, k, v, options: dict, *, rng, deterministic=False, context=""):
    """``cuflash.attention`` into a NaN-poisoned ``out`` (the result is ``out`` itself) and
    ``cuflash.attention_backward`` of a random ``dout``, each checked by the rule with the
    call's ``options``; returns ``(out, lse, grads)``."""
    import cuflash

    xp = _module(q)
    out = poisoned(q.shape[:-1] + v.shape[-1:], q.dtype, xp=xp)
    with poisoned_allocations(xp):  # lse
        got, lse = cuflash.attention(q, k, v, **options, return_lse=True, out=out)
    assert got is out, context
    assert_forward_close(out, lse, q, k, v, **options, context=context)
    dout = random_array(rng, out.shape, q.dtype, xp=xp)
    with poisoned_allocations(xp):  # the gradients
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **options,
                                           deterministic=deterministic)
    assert_backward_close(grads, dout, q, k, v, **options, context=context)
    return out, lse, grads
