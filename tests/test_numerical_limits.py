"""The numerical limits of docs/api.md ("Numerical limits"), on the NumPy path.

- A NaN or inf in ``v`` at a masked key reaches the rows of every query tile that visits its key
  tile (``0 · NaN = NaN`` in ``P·V``), and every row in the float64 oracle; one in ``k`` stays out
  of the forward but reaches ``dq`` through ``dS·k`` in the same way.
- float16 backward: ``dS = P·dO·(v − o)`` is rounded to float16 before ``dq``/``dk``, so it turns
  into ``inf`` once it reaches 65520; bfloat16 and float32 do not overflow there.
- NumPy's own RuntimeWarnings never escape; an overflow with finite inputs gives exactly one
  ``CuflashNumericalWarning`` at the caller's line.
- ``cuflash bench`` stopped by Ctrl-C prints the rows it measured.
"""

import contextlib
import warnings

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from oracle import assert_backward_close

import cuflash
from cuflash import reference
from cuflash._warnings import CuflashNumericalWarning


@contextlib.contextmanager
def numpy_warnings_fail():
    """Record warnings: any RuntimeWarning other than cuflash's raises; cuflash's are kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("always", CuflashNumericalWarning)  # first in the list: wins
        yield caught


def cuflash_warnings(caught):
    return [w for w in caught if issubclass(w.category, CuflashNumericalWarning)]


# ----------------------------------------------------------------------------- masked NaN

N, NAN_KEY, NAN_COL = 256, 200, 1  # causal: rows 200-255 attend to key 200, rows 0-199 do not


def causal_problem(dtype, value=np.nan):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((3, N, 8), dtype=np.float32).astype(dtype) for _ in range(3))
    v[:, NAN_KEY, NAN_COL] = value
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_nan_in_v_at_a_masked_key_reaches_the_rows_of_the_tiles_that_visit_it(dtype):
    q, k, v = causal_problem(dtype)
    with numpy_warnings_fail() as caught:
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert not caught  # NaN came with the inputs: nothing to warn about
    nan = np.isnan(out.astype(np.float32))
    # Rows 0-127: their tile never visits keys 128-255 (all masked), so it stays finite.
    assert not nan[:, :128].any()
    # Rows 128-255 share the tile of keys 128-255: NaN in column 1, rows 128-199 included,
    # although key 200 is masked for them (P = 0 there, and 0 · NaN = NaN).
    assert nan[:, 128:, NAN_COL].all()
    assert not np.delete(nan, NAN_COL, axis=-1).any()
    assert np.isfinite(lse).all()  # lse does not read v

    ref_out, _ = reference.attention(q, k, v, causal=True)  # the full P·V: every row
    assert np.isnan(ref_out[..., NAN_COL]).all()
    assert not np.isnan(np.delete(ref_out, NAN_COL, axis=-1)).any()


def test_inf_in_v_at_a_masked_key_gives_nan_in_rows_that_do_not_see_it():
    q, k, v = causal_problem(np.float32, value=np.inf)
    with numpy_warnings_fail() as caught:  # 0 · inf in a matmul: no "invalid value" warning
        out = cuflash.attention(q, k, v, causal=True)
    assert not caught
    assert np.isfinite(out[:, :128]).all()
    assert np.isnan(out[:, 128:NAN_KEY, NAN_COL]).all()  # masked for them: 0 · inf
    assert not np.isfinite(out[:, NAN_KEY:, NAN_COL]).any()  # they attend to it


def test_nan_at_a_masked_key_spreads_further_in_the_backward_pass():
    q, k, v = causal_problem(np.float32)
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    dout = np.ones_like(out)
    with numpy_warnings_fail() as caught:
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert not caught
    assert np.isfinite(dq[:, :128]).all() and np.isnan(dq[:, 128:]).all()  # Δ = rowsum(dO∘O)
    assert np.isnan(dk).all()  # every key is visited by rows 128-255
    assert np.isfinite(dv).all()  # Pᵀ·dO reads no v


def test_nan_in_k_at_a_masked_key_does_not_leak():
    q, k, v = causal_problem(np.float32, value=0.0)
    k[:, N - 1] = np.nan  # the last key: attended by the last row only
    with numpy_warnings_fail():
        out = cuflash.attention(q, k, v, causal=True)
    assert np.isfinite(out[:, :-1]).all() and np.isnan(out[:, -1]).all()


def test_nan_in_k_at_a_masked_key_reaches_the_backward():
    """The docs' caveat: the masked entries' dS = 0 still multiplies the masked key in
    dq += dS·k, so rows of the key's tile that never see it get NaN in dq."""
    q, k, v = causal_problem(np.float32, value=0.0)
    k[:, N - 1] = np.nan  # the last key: attended by the last row only
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    with numpy_warnings_fail():
        dq, dk, dv = cuflash.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
    assert np.isfinite(dq[:, :128]).all()  # their tile never visits keys 128-255
    assert np.isnan(dq[:, 128:N - 1]).all()  # masked for them: 0 · NaN


# ----------------------------------------------------------------------------- float16 backward

def two_keys(a, dtype=np.float16, d=64):
    """P = 1/2 exactly, o = 0, dout all ones: dS = ±P·dO·v_j = ±(d/2)·a."""
    q = np.zeros((2, 4, d), dtype)
    k = (0.1 * np.random.default_rng(1).standard_normal((2, 2, d))).astype(dtype)
    v = np.empty((2, 2, d), dtype)
    v[:, 0], v[:, 1] = a, -a
    dout = np.ones((2, 4, d), dtype)
    return dout, q, k, v


def test_float16_ds_just_below_65504_is_finite():
    dout, q, k, v = two_keys(2000.0)  # dS = ±64000
    with numpy_warnings_fail() as caught:
        out, lse = cuflash.attention(q, k, v, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse)
    assert not caught
    assert all(np.isfinite(g).all() for g in grads)
    ref = reference.attention_backward(dout, q, k, v)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g.astype(np.float64), r, rtol=2e-3, atol=2e-3 * abs(r).max())


def test_float16_ds_from_65520_overflows_with_one_cuflash_warning():
    dout, q, k, v = two_keys(2048.0)  # dS = ±65536: inf in float16
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert np.isfinite(out).all() and (out == 0).all()
    with numpy_warnings_fail() as caught:
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse)
    assert not np.isfinite(dq).any() and not np.isfinite(dk).any()
    assert np.isfinite(dv).all()
    (warning,) = caught
    assert warning.category is CuflashNumericalWarning
    assert issubclass(CuflashNumericalWarning, RuntimeWarning)
    assert warning.filename == __file__  # the caller's line, not cuflash's
    text = str(warning.message)
    for words in ("cuflash.attention_backward", "dq and dk", "float16", "65504",
                  "bfloat16 or float32", "Numerical limits"):
        assert words in text


def test_float16_ds_overflow_with_float32_gradients_names_only_ds():
    """With grad_dtype=float32 the gradients cannot pass float16's range: the warning names
    dS's rounding to float16, not a gradient above 65504."""
    dout, q, k, v = two_keys(2048.0)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    with numpy_warnings_fail() as caught:
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, grad_dtype=np.float32)
    assert dq.dtype == np.float32 and not np.isfinite(dq).any()
    (warning,) = caught
    text = str(warning.message)
    assert "dS = P∘(dP − Δ), rounded to float16" in text and "65520" in text
    assert "65504" not in text


def large_v_problem(dtype):
    """The docs' example: v = ±3e4, q, k and dout standard normal, D = 64, N = 32."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 32, 64)).astype(dtype)
    v = (3e4 * rng.choice([-1, 1], size=(1, 32, 64))).astype(dtype)
    dout = rng.standard_normal((1, 32, 64)).astype(dtype)
    return dout, q, k, v


def exact_ds(dout, q, k, v):
    """dS = P ∘ (dP − Δ) in float64, and dP = dO·vᵀ."""
    q, k, v, dout = (x.astype(np.float64)[0] for x in (q, k, v, dout))
    s = q @ k.T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = dout @ v.T
    return p * (dp - (dout * (p @ v)).sum(axis=-1, keepdims=True)), dp


def test_float16_backward_with_large_v_overflows_and_warns_once():
    dout, q, k, v = large_v_problem(np.float16)
    ds, dp = exact_ds(dout, q, k, v)
    assert abs(ds).max() >= 65520 and abs(dp).max() > 5e5  # the condition of the docs
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert np.isfinite(out).all()
    with numpy_warnings_fail() as caught:
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse)
    assert np.isinf(dq).any() and np.isinf(dk).any()
    assert np.isfinite(dv).all()
    assert len(caught) == 1 and caught[0].category is CuflashNumericalWarning


def test_attention_vjp_warns_once_too():
    dout, q, k, v = large_v_problem(np.float16)
    out, vjp = cuflash.attention_vjp(q, k, v)
    with numpy_warnings_fail() as caught:
        vjp(dout)
    assert [w.category for w in caught] == [CuflashNumericalWarning]
    assert caught[0].filename == __file__


def test_vjp_functions_warn_under_the_names_of_their_passes():
    x = np.full((4, 8), 1e20, np.float32)  # q·k = 8e40: beyond float32
    with numpy_warnings_fail() as caught:
        cuflash.attention_vjp(x, x, x)
    assert [str(w.message).split(": ")[0] for w in caught] == ["cuflash.attention"]
    dout, q, k, v = large_v_problem(np.float16)
    _, vjp = cuflash.attention_vjp(q, k, v)
    with numpy_warnings_fail() as caught:
        vjp(dout)
    assert [str(w.message).split(": ")[0] for w in caught] == ["cuflash.attention_backward"]

    cu = np.array([0, 4], np.int32)
    with numpy_warnings_fail() as caught:
        cuflash.attention_varlen_vjp(x[:, None], x[:, None], x[:, None], cu, cu, 4, 4)
    assert [str(w.message).split(": ")[0] for w in caught] == ["cuflash.attention_varlen"]
    packed = [a[0][:, None] for a in (dout, q, k, v)]  # (N, 1, D): one sequence
    cu = np.array([0, 32], np.int32)
    _, vjp = cuflash.attention_varlen_vjp(*packed[1:], cu, cu, 32, 32)
    with numpy_warnings_fail() as caught:
        vjp(packed[0])
    assert ([str(w.message).split(": ")[0] for w in caught]
            == ["cuflash.attention_varlen_backward"])
    assert all(w.filename == __file__ for w in caught)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32], ids=["bfloat16", "float32"])
def test_bfloat16_and_float32_do_not_overflow_there(dtype):
    dout, q, k, v = large_v_problem(dtype)
    with numpy_warnings_fail() as caught:
        out, lse = cuflash.attention(q, k, v, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse)
    assert not caught
    assert_backward_close(grads, dout, q, k, v)


def test_a_caller_seterr_raise_does_not_raise_inside_cuflash():
    dout, q, k, v = two_keys(2048.0)
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    before = np.geterr()
    with np.errstate(all="raise"), numpy_warnings_fail() as caught:
        cuflash.attention_backward(dout, q, k, v, out, lse)
    assert [w.category for w in caught] == [CuflashNumericalWarning]
    assert np.geterr() == before


# ----------------------------------------------------------------------------- float32 forward

def test_float32_logits_overflow_warns_from_the_forward_pass():
    x = np.full((4, 8), 1e20, np.float32)  # q·k = 8e40: beyond float32
    with numpy_warnings_fail() as caught:
        out = cuflash.attention(x, x, x)
    assert not np.isfinite(out).all()
    (warning,) = caught
    assert warning.filename == __file__
    assert "cuflash.attention:" in str(warning.message) and "logits" in str(warning.message)


@pytest.mark.parametrize("scale", [None, 1e36])
def test_float32_logits_that_overflow_to_minus_inf_warn_too(scale):
    """Logits below -3.4e38 in every key of a row become -inf: the row reads as one that sees
    no key (output 0, lse -inf) although it sees three keys, and in exact arithmetic attends to
    the two whose logits are largest: (v[0] + v[2]) / 2. That is an overflow, and it warns as
    one."""
    q = np.full((2, 8), 1e20 if scale is None else 10.0, np.float32)
    k = -q[:1] * np.array([[1.0], [2.0], [1.0]], np.float32)  # logits -c, -2c, -c
    v = np.arange(3 * 8, dtype=np.float32).reshape(3, 8)
    with numpy_warnings_fail() as caught:
        out, lse = cuflash.attention(q, k, v, scale=scale, return_lse=True)
    assert np.isneginf(lse).all() and not out.any()  # what a row of overflowed logits gives
    (warning,) = caught
    assert warning.filename == __file__
    assert "cuflash.attention:" in str(warning.message) and "logits" in str(warning.message)


def test_logits_that_overflow_to_minus_inf_are_named_by_the_result_they_spoil():
    """Such rows get output 0, which is finite: the warning names lse, the result that holds
    the -inf, not the output."""
    q = np.full((2, 8), 1e20, np.float32)
    k = -q[:1]
    with numpy_warnings_fail() as caught:
        out, lse = cuflash.attention(q, k, k, return_lse=True)
    assert np.isfinite(out).all() and np.isneginf(lse).all()
    (warning,) = caught
    text = str(warning.message)
    assert "the output holds" not in text
    assert "lse is -inf in rows that see keys" in text and "logits" in text


def test_packed_logits_that_overflow_to_minus_inf_warn():
    """As for dense calls, in sequences with keys; a sequence without keys is no overflow."""
    cu = np.array([0, 2, 4, 6], np.int32)  # two query rows per sequence
    ck = np.array([0, 1, 1, 2], np.int32)  # one key, none, one
    q = np.full((6, 1, 8), 1e20, np.float32)
    k = -q[:2]
    with numpy_warnings_fail() as caught:
        out, lse = cuflash.attention_varlen(q, k, k, cu, ck, 2, 2, return_lse=True)
    assert np.isneginf(lse).all()
    (warning,) = caught
    assert str(warning.message).startswith("cuflash.attention_varlen: ")
    q, k = q / 1e20, k / 1e20  # the same shapes, ordinary logits: only sequence 1 sees no key
    with numpy_warnings_fail() as caught:
        out, lse = cuflash.attention_varlen(q, k, k, cu, ck, 2, 2, return_lse=True)
    assert np.isneginf(lse[:, 2:4]).all() and np.isfinite(np.delete(lse, [2, 3], axis=1)).all()
    assert not caught


def test_kvcache_rows_that_overflow_warn_once_under_its_name():
    b, n, h, d = 3, 6, 2, 8
    q = np.full((b, 1, h, d), 1e20, np.float32)  # q·k = 8e40 in every row: beyond float32
    k_cache, v_cache = (np.full((b, n, h, d), 1e20, np.float32) for _ in range(2))
    with numpy_warnings_fail() as caught:
        out = cuflash.attention_with_kvcache(q, k_cache, v_cache,
                                             cache_seqlens=np.full(b, n, np.int32))
    assert not np.isfinite(out).any()
    (warning,) = caught
    assert warning.filename == __file__
    text = str(warning.message)
    assert text.startswith("cuflash.attention_with_kvcache: ") and "logits" in text


def test_packed_calls_that_overflow_warn_under_their_names():
    """attention_varlen and attention_varlen_backward warn once under their own names, at the
    caller's line: the name of the function called, not of cuflash.attention that runs inside."""
    cu = np.array([0, 3, 3, 8], np.int32)  # sequences of 3, 0 and 5 rows
    x = np.full((8, 2, 8), 1e20, np.float32)  # q·k = 8e40 in every sequence: beyond float32
    with numpy_warnings_fail() as caught:
        out = cuflash.attention_varlen(x, x, x, cu, cu, 5, 5)
    assert not np.isfinite(out).any()
    (warning,) = caught
    assert warning.filename == __file__
    text = str(warning.message)
    assert text.startswith("cuflash.attention_varlen: ") and "logits" in text

    dout, q, k, v = large_v_problem(np.float16)  # dS overflows float16 in the backward
    packed = [a[0][:, None] for a in (dout, q, k, v)]  # (N, 1, D): one sequence
    cu = np.array([0, 32], np.int32)
    out, lse = cuflash.attention_varlen(*packed[1:], cu, cu, 32, 32, return_lse=True)
    with numpy_warnings_fail() as caught:
        grads = cuflash.attention_varlen_backward(packed[0], *packed[1:], out, lse, cu, cu, 32, 32)
    assert np.isinf(grads[0]).any()
    (warning,) = caught
    assert warning.filename == __file__
    assert str(warning.message).startswith("cuflash.attention_varlen_backward: ")


def test_warnings_held_for_one_call_do_not_outlive_it():
    x = np.full((4, 8), 1e20, np.float32)
    with numpy_warnings_fail() as caught:
        cuflash.attention_with_kvcache(x[None, :1, None], x[None, :, None], x[None, :, None],
                                       cache_seqlens=np.array([4], np.int32))
        cuflash.attention(x, x, x)  # after the KV cache call: warns at once, as its own
    assert [str(w.message).split(":")[0] for w in caught] == [
        "cuflash.attention_with_kvcache", "cuflash.attention"]


def test_finite_results_give_no_warning():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 2, 200, 32)).astype(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        cuflash.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)


def test_an_empty_row_is_not_an_overflow():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)  # rows 0-2 see nothing
        cuflash.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
        _, windowed = cuflash.attention(q, k, v, window=(-1, 1), return_lse=True)  # rows 0, 1
    assert np.isneginf(lse[:3]).all()
    assert np.isneginf(windowed[:2]).all() and np.isfinite(windowed[2:]).all()


# ----------------------------------------------------------------------------- bench: Ctrl-C

BENCH = ["bench", "--device", "cpu", "--smoke", "--no-torch", "--repeats", "1", "--warmup", "0",
         "--mode", "fwd", "--total-tokens", "256", "--hidden", "64", "--causal", "no",
         "--seq-lens", "64,128"]


def run_bench(monkeypatch, stop_at, *extra):
    """``cuflash bench`` whose cuflash.attention raises KeyboardInterrupt from ``stop_at``
    tokens on."""
    from cuflash.cli import main
    attention = cuflash.attention

    def interrupted(q, *args, **kwargs):
        if q.shape[-2] >= stop_at:
            raise KeyboardInterrupt
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(cuflash, "attention", interrupted)
    try:
        runner = CliRunner(mix_stderr=False)  # Click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [*BENCH, *extra])


def test_bench_ctrl_c_prints_the_rows_measured(monkeypatch):
    result = run_bench(monkeypatch, 128)
    assert result.exit_code == 130
    lines = result.stdout.splitlines()
    assert "TFLOP/s" in result.stdout
    assert any(line.split()[:4] == ["fwd", "no", "64", "64"] for line in lines)
    assert not any(line.split()[3:4] == ["128"] for line in lines)
    assert "interrupted by Ctrl-C after 1 of 2 rows" in result.stdout
    assert "the table above" in result.stderr and "Traceback" not in result.output


def test_bench_ctrl_c_with_json_keeps_the_rows_measured(monkeypatch):
    import json
    result = run_bench(monkeypatch, 128, "--json")
    assert result.exit_code == 130
    record = json.loads(result.stdout)
    assert [r["seq_len"] for r in record["results"]] == [64]
    assert record["stopped"] == "interrupted by Ctrl-C after 1 of 2 rows"


def test_bench_ctrl_c_before_any_row(monkeypatch):
    result = run_bench(monkeypatch, 1)
    assert result.exit_code == 130
    assert result.stdout == ""
    assert "interrupted by Ctrl-C; no table was printed" in result.stderr


# ------------------------------------------------------------------------- numpy.seterr and torch

@pytest.mark.parametrize("dtype, size",
                         [(np.float16, 3), (np.float32, 30), (ml_dtypes.bfloat16, 30)],
                         ids=["float16", "float32", "bfloat16"])
def test_a_caller_seterr_raise_does_not_reach_underflows_inside(dtype, size):
    """exp2 of very negative logits and casts of tiny values underflow by design."""
    rng = np.random.default_rng(0)
    q = (rng.standard_normal((1, 64, 64)) * size).astype(dtype)
    with np.errstate(all="raise"):
        out, vjp = cuflash.attention_vjp(q, q, q)
        grads = vjp(np.ones_like(out))
    assert np.isfinite(out.astype(np.float32)).all()
    assert all(np.isfinite(g.astype(np.float32)).all() for g in grads)


def test_float16_dropout_output_overflow_is_named_as_such():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 4)).astype(np.float16)
    v = np.full((1, 8, 4), 6e4, np.float16)
    with numpy_warnings_fail() as caught:
        out = cuflash.attention(q, q, v, dropout_p=0.5, dropout_seed=1)
    assert np.isinf(out).any()
    (warning,) = cuflash_warnings(caught)
    assert warning.filename == __file__
    text = str(warning.message)
    assert "65504" in text and "1 / (1 − p)" in text and "float32 (|x|" not in text


def test_a_warning_through_cuflash_torch_is_at_the_caller_s_line():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    dout, q, k, v = (torch.from_numpy(x) for x in large_v_problem(np.float16))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with numpy_warnings_fail() as caught:
        out = ct.attention(q, k, v)
        out.backward(dout)
    assert [w.filename for w in cuflash_warnings(caught)] == [__file__]
