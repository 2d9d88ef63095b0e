"""cuflash.torch on CPU tensors (the NumPy path): values and gradients against torch's own
attention, the custom operators (opcheck, torch.compile), the drop-in signatures and what they
refuse, and attention dropout (against the core with the same seed; the seed rule; the seed drawn
on the device under a CUDA-graph capture, stood in for). GPU behaviour (zero copy, streams,
allocator, graphs, training) is in test_torch_gpu.py.

Correctness rule (as in oracle.py): ``max|result − ref64| ≤ 2·max|naive − ref64| + 1e-5``, with
``ref64`` torch's ``scaled_dot_product_attention`` (or plain attention with the options) in
float64 and ``naive`` plain attention computed in the inputs' dtype.
"""

import contextlib
import gc
import inspect
import math
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from cuflash import _dropout  # noqa: E402
from cuflash.torch import _bridge, _ops  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["float16", "bfloat16", "float32"]
FACTOR, SLACK = 2.0, 1e-5
REPO = Path(__file__).resolve().parents[1]


def core_has(name):
    return name in inspect.signature(cuflash.attention).parameters


def needs_core(name):
    return pytest.mark.skipif(
        not core_has(name),
        reason=f"cuflash.attention has no {name!r} argument in this version of the core")


# ----------------------------------------------------------------------------- references

def plain_attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                    alibi_slopes=None, dropout=None):
    """softmax(logits) v computed plainly in q's dtype, (..., H, N, D) layout, GQA by repeat.

    Masks follow cuflash (and flash-attn): aligned to the bottom-right corner; a row with nothing
    to attend to gives 0. ``dropout`` is ``(p, seed, offset)``: cuflash's mask
    (``cuflash._dropout``) applied to the probabilities.
    """
    hq, nq, nk = q.shape[-3], q.shape[-2], k.shape[-2]
    group = hq // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq, device=s.device)[:, None]
    j = torch.arange(nk, device=s.device)[None, :]
    if alibi_slopes is not None:
        distance = (i + nk - nq - j).abs().to(s.dtype)
        s = s - alibi_slopes.to(s.device, s.dtype)[..., None, None] * distance
    keep = torch.ones(nq, nk, dtype=torch.bool, device=s.device)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        keep &= j <= i + nk - nq + right
    if left >= 0:
        keep &= j >= i + nk - nq - left
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if dropout is not None:
        rate, seed, offset = dropout
        keep = _dropout.dense_keep(seed, offset, rate, tuple(p.shape[:-3]), hq, np.arange(nq), nk)
        p = p * torch.from_numpy(keep).to(p.device) * _dropout.rescale(rate)
    return p @ v


def assert_close(result, ref64, naive, what=""):
    error = (result.double() - ref64).abs().max().item()
    allowed = FACTOR * (naive.double() - ref64).abs().max().item() + SLACK
    assert not torch.isnan(result).any(), f"{what}: NaN in result"
    assert error <= allowed, f"{what}: max|error| {error:.3e} > allowed {allowed:.3e}"


def leaf(x, dtype=None):
    return x.to(dtype or x.dtype).detach().requires_grad_(True)


def grads_of(fn, inputs, dout):
    out = fn(*inputs)
    (out.float() * dout.float()).sum().backward()
    return out.detach(), [x.grad for x in inputs]


def check_against_reference(dtype, q, k, v, fn, device="cpu", **options):
    """fn(q, k, v) (the cuflash call) against plain attention with ``options``: out and grads.

    q, k, v are float32 CPU tensors; they are rounded to ``dtype`` and moved to ``device`` for
    ``fn`` and the naive attention; the float64 reference runs on the CPU.
    """
    q, k, v = (x.to(dtype) for x in (q, k, v))
    ins = [leaf(x.to(device)) for x in (q, k, v)]
    ins64 = [leaf(x, torch.float64) for x in (q, k, v)]
    ins_naive = [leaf(x.to(device)) for x in (q, k, v)]
    alibi = options.pop("alibi_slopes", None)

    def reference(*qkv):
        return plain_attention(*qkv, alibi_slopes=alibi, **options)

    with torch.no_grad():
        shape = reference(*(x.double() for x in (q, k, v))).shape
    dout = torch.randn(shape).to(dtype)
    out, grads = grads_of(fn, ins, dout.to(device))
    out64, grads64 = grads_of(reference, ins64, dout.double())
    naive, grads_naive = grads_of(reference, ins_naive, dout.to(device))
    assert out.dtype == dtype and out.shape == out64.shape and out.device == ins[0].device
    assert_close(out.cpu(), out64, naive.cpu(), "out")
    for name, g, g64, gn, x in zip("qkv", grads, grads64, grads_naive, ins):
        assert g.shape == x.shape and g.dtype == dtype, f"d{name}: {g.shape} {g.dtype}"
        assert_close(g.cpu(), g64, gn.cpu(), f"d{name}")


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float32)


@pytest.fixture(autouse=True)
def _seed(seed):
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- values, grads

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_sdpa(dtype, causal):
    q, k, v = randn(2, 4, 96, 32), randn(2, 4, 96, 32), randn(2, 4, 96, 32)
    check_against_reference(dtype, q, k, v, lambda *x: ct.attention(*x, causal=causal),
                            causal=causal)
    # the float64 reference itself is torch's SDPA
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    assert torch.allclose(plain_attention(q.double(), k.double(), v.double(), causal=causal),
                          ref, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_and_unequal_lengths(causal):
    q, k, v = randn(2, 4, 40, 32), randn(2, 2, 130, 32), randn(2, 2, 130, 16)
    check_against_reference(torch.float32, q, k, v,
                            lambda *x: ct.attention(*x, causal=causal, scale=0.3),
                            causal=causal, scale=0.3)


def test_broadcast_leading_axes_sum_gradients():
    q, k, v = randn(3, 2, 50, 16), randn(1, 2, 60, 16), randn(1, 2, 60, 16)
    check_against_reference(torch.float32, q, k, v, ct.attention)


def test_return_lse_is_logsumexp_and_not_differentiable():
    q, k, v = (leaf(randn(2, 3, 70, 32)) for _ in range(3))
    out, lse = ct.attention(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (2, 3, 70) and lse.dtype == torch.float32
    assert out.requires_grad and not lse.requires_grad
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(torch.ones(70, 70, dtype=torch.bool).triu(1), -math.inf)
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), atol=1e-5)


def test_noncontiguous_inputs():
    base = randn(2, 50, 3, 4, 32)  # (B, N, 3, H, D), as a fused projection gives
    q, k, v = (x.transpose(1, 2) for x in base.unbind(2))
    check_against_reference(torch.float32, q, k, v, ct.attention)


def test_deterministic_is_accepted_and_repeatable():
    q, k, v = (leaf(randn(1, 2, 64, 32)) for _ in range(3))
    runs = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        ct.attention(q, k, v, deterministic=True).square().sum().backward()
        runs.append([x.grad.clone() for x in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_two_dimensional_inputs():
    q, k, v = randn(40, 16), randn(50, 16), randn(50, 8)
    out, lse = ct.attention(q, k, v, return_lse=True)
    assert out.shape == (40, 8) and lse.shape == (40,)
    assert torch.allclose(out, F.scaled_dot_product_attention(q[None], k[None], v[None])[0],
                          atol=1e-5)


# ----------------------------------------------------------------------------- options

@needs_core("window")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_window(causal):
    q, k, v = randn(2, 2, 80, 32), randn(2, 2, 100, 32), randn(2, 2, 100, 32)
    check_against_reference(torch.float16, q, k, v,
                            lambda *x: ct.attention(*x, causal=causal, window=(17, 5)),
                            causal=causal, window=(17, 5))


@needs_core("softcap")
def test_softcap():
    q, k, v = (randn(2, 2, 80, 32) * 3 for _ in range(3))
    check_against_reference(torch.bfloat16, q, k, v, lambda *x: ct.attention(*x, softcap=2.5),
                            softcap=2.5)


@needs_core("alibi_slopes")
@pytest.mark.parametrize("per_batch", [False, True], ids=["(H,)", "(B,H)"])
def test_alibi(per_batch):
    q, k, v = randn(2, 4, 60, 32), randn(2, 2, 90, 32), randn(2, 2, 90, 32)
    slopes = torch.rand((2, 4) if per_batch else (4,), dtype=torch.float32) * 0.3
    check_against_reference(
        torch.float32, q, k, v, lambda *x: ct.attention(*x, causal=True, alibi_slopes=slopes),
        causal=True, alibi_slopes=slopes)


@needs_core("window")
@needs_core("softcap")
@needs_core("alibi_slopes")
def test_flash_attn_options_match_attention():
    q, k, v = randn(2, 64, 4, 32), randn(2, 64, 2, 32), randn(2, 64, 2, 32)
    slopes = torch.rand(4) * 0.2
    out = ct.flash_attn_func(q, k, v, softmax_scale=0.2, causal=True, window_size=(9, 3),
                             softcap=4.0, alibi_slopes=slopes, deterministic=True)
    expected = ct.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.2,
                            causal=True, window=(9, 3), softcap=4.0, alibi_slopes=slopes)
    assert torch.equal(out, expected.transpose(1, 2))


@needs_core("window")
def test_flash_attn_func_results_that_differ_from_flash_attn():
    """What docs/torch.md, "Where it differs", lists. With more queries than keys a window with
    one unbounded side keeps it unbounded: query i sees keys from i + Sk - Sq - left on
    (flash-attn bounds the other side at Sk, so that its row 0 here would see no key). A row
    that sees no key has lse -inf (flash-attn: +inf)."""
    q, k, v = randn(2, 13, 2, 16), randn(2, 6, 2, 16), randn(2, 6, 2, 16)
    qkv64 = [x.transpose(1, 2).double() for x in (q, k, v)]
    out, lse, probs = ct.flash_attn_func(q, k, v, window_size=(3, -1), return_attn_probs=True)
    expected = plain_attention(*qkv64, window=(3, -1))
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, rtol=0, atol=1e-5)
    assert (probs[:, :, 0] > 0).all() and torch.isfinite(lse).all()  # row 0 sees every key
    out, lse, _ = ct.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    unseen = 13 - 6  # rows i < Sq - Sk see no key under the causal mask
    assert torch.equal(lse[..., :unseen], torch.full_like(lse[..., :unseen], -math.inf))
    assert torch.isfinite(lse[..., unseen:]).all()
    assert torch.equal(out[:, :unseen], torch.zeros_like(out[:, :unseen]))


@pytest.mark.parametrize("name, value", [("window", (4, 4)), ("softcap", 1.0),
                                         ("alibi_slopes", "tensor"), ("dropout_p", 0.1)])
def test_option_missing_from_core_raises(monkeypatch, name, value):
    monkeypatch.setattr(_ops, "core_supports", lambda *names: False)
    q = randn(1, 2, 16, 8)
    value = torch.ones(2) if value == "tensor" else value
    with pytest.raises(NotImplementedError, match=name):
        ct.attention(q, q, q, **{name: value})
    ct.attention(q, q, q)  # defaults are never passed on


def _varlen(**options):
    """flash_attn_varlen_func on two packed sequences of 3 and 5 rows (inputs drawn from no
    generator)."""
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    x = torch.linspace(-1, 1, 8 * 2 * 8).reshape(8, 2, 8)
    return ct.flash_attn_varlen_func(x, x, x, cu, cu, 5, 5, **options)


# Values the core refuses, which a conversion to bool, int or float would let through: each call
# must raise the core's error, naming the argument as that signature names it.
BAD_OPTION_VALUES = [
    ("causal", "False", TypeError), ("causal", 1, TypeError),
    ("window", (1.9, 0), TypeError), ("window", (-2, 0), ValueError),
    ("scale", True, TypeError), ("scale", "0.5", TypeError), ("scale", -1.0, ValueError),
    ("softcap", "1.0", TypeError), ("softcap", -1.0, ValueError),
    ("deterministic", "False", TypeError),
]
BAD_OPTION_IDS = [f"{name}={value!r}" for name, value, _ in BAD_OPTION_VALUES]
FLASH_ATTN_NAMES = {"scale": "softmax_scale", "window": "window_size"}


def _core_call(q, **options):
    """The core's call that checks ``options``: its backward for ``deterministic``."""
    x = q.numpy()
    if "deterministic" not in options:
        return cuflash.attention(x, x, x, **options)
    out, lse = cuflash.attention(x, x, x, return_lse=True)
    return cuflash.attention_backward(out, x, x, x, out, lse, **options)


@pytest.mark.parametrize("name, value, error", BAD_OPTION_VALUES, ids=BAD_OPTION_IDS)
def test_attention_refuses_option_values_with_the_cores_error(name, value, error):
    q = randn(1, 2, 8, 8)
    with pytest.raises(error) as core:
        _core_call(q, **{name: value})
    with pytest.raises(error) as adapter:
        ct.attention(q, q, q, **{name: value})
    assert str(adapter.value) == str(core.value)
    assert str(adapter.value).startswith(f"{name} ")


@pytest.mark.parametrize("through", ["eager", "operators"])
@pytest.mark.parametrize("name, value, error", BAD_OPTION_VALUES, ids=BAD_OPTION_IDS)
def test_flash_attn_refuses_option_values_by_their_names(monkeypatch, name, value, error,
                                                         through):
    """The checks come before the operators' schemas (bool, float, int), so the operators'
    path raises the same errors."""
    if through == "operators":
        _operators_only(monkeypatch)
    own = FLASH_ATTN_NAMES.get(name, name)
    x = randn(1, 8, 2, 8)
    for call in (lambda: ct.flash_attn_func(x, x, x, **{own: value}),
                 lambda: _varlen(**{own: value})):
        with pytest.raises(error, match=f"^{own} "):
            call()


def test_attention_refuses_return_lse_with_the_cores_error():
    """return_lse="False" is not read as True: a tuple where the core raises."""
    q = randn(1, 2, 8, 8)
    for value in ("False", 0):
        with pytest.raises(TypeError) as core:
            _core_call(q, return_lse=value)
        with pytest.raises(TypeError) as adapter:
            ct.attention(q, q, q, return_lse=value)
        assert str(adapter.value) == str(core.value)
        assert str(adapter.value).startswith("return_lse ")


@pytest.mark.parametrize("wrong", [
    dict(q="q"), dict(causal="False"), dict(scale="0.5"), dict(window=(-2, 0)),
    dict(softcap=-1.0), dict(dropout_p=1.5), dict(dropout_p=0.5, dropout_offset=-1),
], ids=lambda wrong: "_".join(wrong))
def test_attention_checks_return_lse_where_the_core_does(wrong):
    """return_lse is checked after q, k, v, the options and dropout, where cuflash.attention
    checks it: a call wrong in both names the other argument, as the core does."""
    x = randn(1, 2, 8, 8)
    options = dict(dict(q=x), **wrong)
    q = options.pop("q")
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention(q.numpy() if isinstance(q, torch.Tensor) else q, x.numpy(), x.numpy(),
                          dropout_seed=3, return_lse="False", **options)
    assert not str(core.value).startswith("return_lse")
    with pytest.raises(type(core.value)) as adapter:
        ct.attention(q, x, x, dropout_seed=3, return_lse="False", **options)
    assert str(adapter.value).split()[0] == str(core.value).split()[0]


@pytest.mark.parametrize("mask", [dict(block_mask="x"), dict(mask=10**9), dict(block_mask=10**9)],
                         ids=["not_a_mask", "unknown_handle", "unknown_block_handle"])
@pytest.mark.parametrize("wrong", [
    dict(q="q"), dict(causal="False"), dict(scale="0.5"), dict(window=(-2, 0)),
    dict(softcap=-1.0),
], ids=lambda wrong: next(iter(wrong)))
def test_attention_checks_its_mask_after_q_and_the_options_as_the_core_does(wrong, mask):
    """The mask (or its handle) is checked after q, k, v and the score options, where
    cuflash.attention checks its masks: a call wrong in both names the other argument, as the
    core does with the same arguments."""
    x = randn(1, 2, 8, 8)
    options = dict(dict(q=x), **wrong)
    q = options.pop("q")
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention(q.numpy() if isinstance(q, torch.Tensor) else q, x.numpy(), x.numpy(),
                          block_mask="x", **options)
    assert not str(core.value).startswith("block_mask")
    with pytest.raises(type(core.value)) as adapter:
        ct.attention(q, x, x, **options, **mask)
    assert str(adapter.value).split()[0] == str(core.value).split()[0]


def _new_mask(kind, n, shape=None):
    """A mask never registered before (its pattern drawn at random), ``n`` x ``n`` elements."""
    from cuflash.sparse import BlockMask, ExactMask
    while True:
        dense = np.random.default_rng().random((n, n)) < 0.5
        np.fill_diagonal(dense, True)
        mask = (ExactMask.from_dense(dense) if kind == "mask" else
                BlockMask.from_dense(dense[::4, ::4], block_size=4, shape=shape))
        if mask not in _ops._mask_ids:
            return mask


@pytest.mark.parametrize("mask", [
    lambda: dict(block_mask="x"), lambda: dict(mask=10**9), lambda: dict(block_mask=10**9),
    lambda: dict(block_mask=_new_mask("block_mask", 48)),
], ids=["not_a_mask", "unknown_handle", "unknown_block_handle", "wrong_shape"])
def test_attention_checks_its_mask_before_deterministic_as_the_core_does(mask):
    """attention_backward checks its masks before deterministic: a call wrong in both names the
    mask, in the core and in the adapter (whose backward the flag is for)."""
    x = randn(1, 2, 8, 8)
    arrays = [x.numpy()] * 3
    out, lse = cuflash.attention(*arrays, return_lse=True)
    mask = mask()
    core_mask = {name: "x" if isinstance(value, int) else value for name, value in mask.items()}
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention_backward(out, *arrays, out, lse, deterministic="False", **core_mask)
    assert not str(core.value).startswith("deterministic")
    with pytest.raises((TypeError, ValueError)) as adapter:
        ct.attention(x, x, x, deterministic="False", **mask)
    assert str(adapter.value).split()[0] == str(core.value).split()[0]


@pytest.mark.parametrize("kind", ["block_mask", "mask"])
@pytest.mark.parametrize("wrong", [
    dict(mask_size=48), dict(k=(1, 2, 40, 8)), dict(q=(1, 3, 32, 8)),
    dict(dropout_p=1.5), dict(dropout_p=0.5, dropout_offset=-1), dict(alibi_slopes=(3,)),
], ids=lambda wrong: next(iter(wrong)))
def test_a_refused_call_registers_no_mask(kind, wrong):
    """The registry keeps its masks for the life of the process: a call the core refuses (the
    mask against q and k, or anything else it checks) registers nothing, and raises what the core
    raises."""
    wrong = dict(wrong)
    n = wrong.pop("mask_size", 32)
    mask = _new_mask(kind, n)
    shapes = dict(q=(1, 2, 32, 8), k=(1, 2, 32, 8))
    shapes.update((name, wrong.pop(name)) for name in ("q", "k") if name in wrong)
    q, k = (randn(*shapes[name]) for name in ("q", "k"))
    if "alibi_slopes" in wrong:
        wrong["alibi_slopes"] = torch.ones(wrong["alibi_slopes"])
    core_options = {name: x.numpy() if isinstance(x, torch.Tensor) else x
                    for name, x in wrong.items()}
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention(q.numpy(), k.numpy(), k.numpy(), dropout_seed=3, **core_options,
                          **{kind: mask})
    registered = len(_ops._masks)
    with pytest.raises(type(core.value)) as adapter:
        ct.attention(q, k, k, dropout_seed=3, **wrong, **{kind: mask})
    assert str(adapter.value).split()[0] == str(core.value).split()[0]
    assert len(_ops._masks) == registered and mask not in _ops._mask_ids
    good = randn(1, 2, n, 8)
    ct.attention(good, good, good, **{kind: mask})
    assert mask in _ops._mask_ids  # registers it


@pytest.mark.parametrize("kind", ["block_mask", "mask"])
@pytest.mark.parametrize("refusal", ["kernel_choice", "tangent"])
def test_a_call_refused_after_the_checks_leaves_the_registry_as_it_found_it(kind, refusal,
                                                                             monkeypatch):
    """A new mask is registered for its call, which the core's checks on stand-ins accept; a
    refusal that comes after them takes it out again: the kernel choice on a GPU (stood in for
    here by the core's call refusing as it does there), or a q carrying a forward-mode
    tangent. A handle is never given out twice: the next mask gets a new one."""
    from torch.autograd import forward_ad
    mask = _new_mask(kind, 32)
    x = randn(1, 2, 32, 8)
    registered = len(_ops._masks)
    q = x
    with contextlib.ExitStack() as stack:
        if refusal == "kernel_choice":
            def refuse(*args, **kwargs):
                raise ValueError("no GPU kernel runs this forward pass")
            monkeypatch.setattr(cuflash, "attention", refuse)
            error = ValueError
        else:
            stack.enter_context(forward_ad.dual_level())
            q = forward_ad.make_dual(x, torch.ones_like(x))
            error = NotImplementedError
        with pytest.raises(error):
            ct.attention(q, x, x, **{kind: mask})
    monkeypatch.undo()
    assert not _ops.is_registered(mask) and len(_ops._masks) == registered
    handles = set(_ops._masks)
    ct.attention(x, x, x, **{kind: mask})
    assert _ops.is_registered(mask) and len(_ops._masks) == registered + 1
    (handle,) = set(_ops._masks) - handles
    assert handle == ct.block_mask_handle(mask) and handle >= max(handles | {-1}) + 2


@pytest.mark.parametrize("kind", ["block_mask", "mask"])
def test_a_call_refused_under_compile_leaves_the_registry_as_it_found_it(kind):
    """Under torch.compile a new mask is registered while the call is traced, and the
    operator's fake implementation checks the call: a trace it refuses (the mask against q and
    k) takes the mask out again; one it accepts keeps it, the graph holding its handle."""
    mask = _new_mask(kind, 48)
    x, y = randn(1, 2, 32, 8), randn(1, 2, 48, 8)
    registered = len(_ops._masks)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: ct.attention(q, q, q, **{kind: mask}),
                             backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=rf"ValueError\(.{kind} was built for Nq=48"):
        compiled(x)
    assert not _ops.is_registered(mask) and len(_ops._masks) == registered
    torch._dynamo.reset()
    assert torch.equal(compiled(y), ct.attention(y, y, y, **{kind: mask}))
    assert _ops.is_registered(mask) and len(_ops._masks) == registered + 1
    torch._dynamo.reset()


def _graph_break_before_the_operator(monkeypatch):
    """A graph break between the handle a trace takes and the operator call (none is there
    today: one stands in for whatever would break the graph there)."""
    from cuflash.torch import _api
    run = _api._run_with_dropout

    def breaking(*args):
        torch._dynamo.graph_break()
        return run(*args)

    monkeypatch.setattr(_api, "_run_with_dropout", breaking)


@pytest.mark.parametrize("kind", ["block_mask", "mask"])
@pytest.mark.parametrize("nested", [False, pytest.param(True, marks=pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "nested_graph_breaks"),
    reason="this torch has no nested graph breaks"))], ids=["frames", "nested_graph_breaks"])
def test_a_graph_break_before_the_operator_leaves_the_registry_as_it_found_it(kind, nested,
                                                                              monkeypatch):
    """After a graph break Dynamo traces a call again (the frame anew, or the call as a frame
    of its own), each trace taking the mask's handle: they make one claim, which the
    operator's fake implementation settles. A refused call takes the mask out again; one it
    accepts keeps it, and nothing is left under way on it."""
    _graph_break_before_the_operator(monkeypatch)
    with torch._dynamo.config.patch(nested_graph_breaks=nested):
        _check_a_graph_break_before_the_operator(kind)


def _check_a_graph_break_before_the_operator(kind):
    mask = _new_mask(kind, 48)
    x, y = randn(1, 2, 32, 8), randn(1, 2, 48, 8)
    registered, under_way = len(_ops._masks), (set(_ops._pending), set(_ops._traced))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: ct.attention(q, q, q, **{kind: mask}),
                             backend="aot_eager")
    with pytest.raises(RuntimeError, match=rf"ValueError\(.{kind} was built for Nq=48"):
        compiled(x)
    assert not _ops.is_registered(mask) and len(_ops._masks) == registered
    assert (set(_ops._pending), set(_ops._traced)) == under_way
    torch._dynamo.reset()
    assert torch.equal(compiled(y), ct.attention(y, y, y, **{kind: mask}))
    handle = ct.block_mask_handle(mask)
    assert len(_ops._masks) == registered + 1 and handle not in _ops._pending
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["block_mask", "mask"])
def test_a_trace_that_never_reaches_the_operator_leaves_its_claim_to_the_next_trace(kind,
                                                                                    monkeypatch):
    """A trace that fails between the handle and the operator (fullgraph=True refusing a graph
    break) leaves the mask registered with its claim under way: nothing tells a trace dropped
    from one whose call a graph break hands to code compiled later. The next trace of a call
    on the mask takes that claim over, and settles it: refused, the mask is taken out."""
    with monkeypatch.context() as patches:
        _graph_break_before_the_operator(patches)
        torch._dynamo.reset()
        mask = _new_mask(kind, 48)
        x = randn(1, 2, 32, 8)
        registered = len(_ops._masks)
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(lambda q: ct.attention(q, q, q, **{kind: mask}),
                          backend="aot_eager", fullgraph=True)(x)
    handle = _ops._mask_ids[mask]
    assert handle in _ops._pending and handle in _ops._traced
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=rf"ValueError\(.{kind} was built for Nq=48"):
        torch.compile(lambda q: ct.attention(q, q, q, **{kind: mask}), backend="aot_eager",
                      fullgraph=True)(x)
    assert not _ops.is_registered(mask) and len(_ops._masks) == registered
    torch._dynamo.reset()


def test_a_compiled_graph_that_its_call_refuses_keeps_its_mask(monkeypatch):
    """A graph holds the handle that its trace took and the fake implementation accepted: a run
    of it that the call refuses (the kernel choice on a GPU, stood in for here, refusing a head
    dim) keeps the mask, since the same graph may run the call later, at another size that
    dynamic shapes let through without a new trace, and must find its mask then."""
    mask = _new_mask("block_mask", 32)
    real = cuflash.attention

    def kernel_choice(q, *args, **kwargs):
        if q.shape[-1] == 8:
            raise ValueError("no GPU kernel runs this forward pass")
        return real(q, *args, **kwargs)

    monkeypatch.setattr(cuflash, "attention", kernel_choice)
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: ct.attention(q, q, q, block_mask=mask), backend=counter,
                             dynamic=True, fullgraph=True)
    with pytest.raises(ValueError, match="no GPU kernel"):
        compiled(randn(1, 2, 32, 8))
    handle, compiles = _ops._mask_ids[mask], counter.frame_count
    assert handle not in _ops._pending  # kept for good
    x = randn(1, 2, 32, 16)
    assert torch.equal(compiled(x), ct.attention(x, x, x, block_mask=handle))
    assert counter.frame_count == compiles  # the same graph
    torch._dynamo.reset()


def test_a_compiled_graph_keeps_the_mask_object_its_guard_names_alive():
    """A graph guards on the identity of the mask object it was traced with: one equal to a
    held mask, which the registry does not keep, stays alive with it, or another mask built at
    its freed address would pass the guard and run with the first one's handle."""
    mask = _new_mask("block_mask", 32)
    held = ct.block_mask_handle(mask)
    twin = pickle.loads(pickle.dumps(mask))
    assert twin == mask and twin is not mask
    x = randn(1, 2, 32, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, m: ct.attention(q, q, q, block_mask=m),
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, twin), ct.attention(x, x, x, block_mask=held))
    address = id(twin)
    del twin
    gc.collect()
    (alive,) = (o for o in gc.get_objects() if id(o) == address)
    assert alive == mask and alive is not mask and _ops.lookup_block_mask(held) is mask
    torch._dynamo.reset()


def test_a_mask_stays_registered_while_a_call_on_it_may_still_run():
    """Calls under way on one new mask (threads): the last one refused takes it out; one that
    runs, or block_mask_handle asked for it, keeps it for good whatever the others do."""
    mask = _new_mask("block_mask", 32)
    (handle, first), (again, second) = _ops.claim_mask(mask), _ops.claim_mask(mask)
    assert first and second and again == handle
    _ops.release_mask(handle, ran=False)
    assert _ops.is_registered(mask)  # the second call may still run
    _ops.release_mask(handle, ran=False)
    assert not _ops.is_registered(mask) and handle not in _ops._masks

    mask = _new_mask("block_mask", 32)
    (handle, _), _ = _ops.claim_mask(mask), _ops.claim_mask(mask)
    _ops.release_mask(handle, ran=True)
    _ops.release_mask(handle, ran=False)
    assert _ops.is_registered(mask) and _ops.claim_mask(mask) == (handle, False)

    mask = _new_mask("block_mask", 32)
    handle, _ = _ops.claim_mask(mask)
    assert ct.block_mask_handle(mask) == handle
    _ops.release_mask(handle, ran=False)
    assert _ops.is_registered(mask) and _ops.lookup_block_mask(handle) is mask

    mask = _new_mask("block_mask", 32)  # a trace, and an eager call on the same new mask
    handle = _ops.trace_mask_handle(id(mask))
    assert _ops.claim_mask(mask) == (handle, True)
    _ops.release_traced_mask(handle, ran=False)  # the fake implementation refused the trace
    assert _ops.is_registered(mask)
    _ops.release_traced_mask(handle, ran=False)  # no trace left: the eager call settles itself
    assert _ops.is_registered(mask)
    _ops.release_mask(handle, ran=False)
    assert not _ops.is_registered(mask)


def test_a_held_mask_is_not_checked_again_before_each_call(monkeypatch):
    """The check a new mask gets before it is registered (the core's validation on stand-ins,
    about 70 µs) runs once: a mask the registry holds, or its handle, goes straight to the
    operator, which checks it against the call as it does every call."""
    mask = _new_mask("block_mask", 32)
    x = randn(1, 2, 32, 8)
    checks = []
    real = _ops.check_call_on_stand_ins
    monkeypatch.setattr(_ops, "check_call_on_stand_ins", lambda *a: checks.append(1) or real(*a))
    first = ct.attention(x, x, x, block_mask=mask)
    assert checks == [1]
    for held in (mask, _ops.block_mask_handle(mask)):
        assert torch.equal(ct.attention(x, x, x, block_mask=held), first)
    assert checks == [1]
    with pytest.raises(ValueError, match="block_mask"):  # still checked, by the operator
        ct.attention(randn(1, 2, 48, 8), randn(1, 2, 48, 8), randn(1, 2, 48, 8), block_mask=mask)


@pytest.mark.parametrize("value", ["False", 0, None])
def test_flash_attn_signatures_refuse_return_attn_probs_that_is_not_a_bool(value):
    """return_attn_probs="False" is not read as True (a triple, and S_dmask formed on the host)
    in any flash-attn signature; refused before a dropout seed is drawn."""
    x = randn(2, 8, 2, 8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    calls = [lambda **o: ct.flash_attn_func(x, x, x, **o),
             lambda **o: ct.flash_attn_qkvpacked_func(torch.stack([x] * 3, 2), **o),
             lambda **o: ct.flash_attn_kvpacked_func(x, torch.stack([x] * 2, 2), **o),
             lambda **o: _varlen(**o),
             lambda **o: ct.flash_attn_varlen_qkvpacked_func(torch.stack([x[0]] * 3, 1), cu, 5,
                                                             **o),
             lambda **o: ct.flash_attn_varlen_kvpacked_func(x[0], torch.stack([x[0]] * 2, 1),
                                                            cu, cu, 5, 5, **o)]
    for call in calls:
        state = torch.get_rng_state()
        with pytest.raises(TypeError, match="^return_attn_probs must be True or False"):
            call(dropout_p=0.25, return_attn_probs=value)
        assert torch.equal(torch.get_rng_state(), state)


def test_sdpa_refuses_is_causal_that_is_not_a_bool():
    q = randn(1, 2, 8, 8)
    for kv in (q, randn(1, 2, 6, 8)):  # L != S too: "False" is not is_causal=True
        with pytest.raises(TypeError, match="^is_causal must be True or False"):
            ct.scaled_dot_product_attention(q, kv, kv, is_causal="False")


def test_sdpa_refuses_enable_gqa_that_is_not_a_bool():
    """As torch does: enable_gqa="False" is not read as True, with equal head counts too."""
    q = randn(1, 4, 8, 8)
    for kv in (randn(1, 2, 8, 8), q):
        for value in ("False", 1, None):
            with pytest.raises(TypeError, match="^enable_gqa must be True or False"):
                ct.scaled_dot_product_attention(q, kv, kv, enable_gqa=value)


# ----------------------------------------------------------------------------- block masks

def test_block_mask_object_and_handle():
    from cuflash.sparse import BlockMask
    layout = np.tril(np.ones((4, 4), dtype=bool))
    layout[3, 0] = False
    mask = BlockMask.from_dense(layout, block_size=16)
    q, k, v = randn(2, 2, 64, 16), randn(2, 2, 64, 16), randn(2, 2, 64, 16)
    expected = cuflash.attention(q.numpy(), k.numpy(), v.numpy(), block_mask=mask)
    handle = ct.block_mask_handle(mask)
    assert ct.block_mask_handle(BlockMask.from_dense(layout, block_size=16)) == handle
    for given in (mask, handle):
        out = ct.attention(q, k, v, block_mask=given)
        assert np.array_equal(out.numpy(), expected)
    with pytest.raises(ValueError, match="handle"):
        ct.attention(q, k, v, block_mask=10**9)
    qs = [leaf(x) for x in (q, k, v)]
    ct.attention(*qs, block_mask=mask).sum().backward()
    dq, dk, dv = cuflash.attention_backward(
        np.ones_like(expected), q.numpy(), k.numpy(), v.numpy(), expected,
        cuflash.attention(q.numpy(), k.numpy(), v.numpy(), block_mask=mask, return_lse=True)[1],
        block_mask=mask)
    for x, g in zip(qs, (dq, dk, dv)):
        assert np.array_equal(x.grad.numpy(), g)


def test_exact_mask_object_and_handle():
    """mask= carries an ExactMask to the core's mask= (the exact pattern, not its blocks)."""
    from cuflash.sparse import ExactMask, document
    mask = ExactMask.from_scipy(document([20, 27, 17], causal=True))
    q, k, v = randn(2, 2, 64, 16), randn(2, 2, 64, 16), randn(2, 2, 64, 16)
    expected, lse = cuflash.attention(q.numpy(), k.numpy(), v.numpy(), mask=mask, return_lse=True)
    for given in (mask, ct.block_mask_handle(mask)):
        out = ct.attention(q, k, v, mask=given)
        assert np.array_equal(out.numpy(), expected)
    qs = [leaf(x) for x in (q, k, v)]
    ct.attention(*qs, mask=mask).sum().backward()
    grads = cuflash.attention_backward(np.ones_like(expected), q.numpy(), k.numpy(), v.numpy(),
                                       expected, lse, mask=mask)
    for x, g in zip(qs, grads):
        assert np.array_equal(x.grad.numpy(), g)


@pytest.mark.parametrize("value", ["causal", 1.0, True, [1, 2], np.ones((4, 4), dtype=bool)])
def test_block_mask_handle_refuses_what_is_not_a_mask(value):
    """Only masks are registered: anything else is a TypeError naming what it takes, not a handle
    that fails later (or an unhashable-type error), and the registry does not grow."""
    registered = len(_ops._masks)
    with pytest.raises(TypeError, match="^block_mask_handle takes a cuflash.sparse.BlockMask"):
        ct.block_mask_handle(value)
    assert len(_ops._masks) == registered


@pytest.mark.parametrize("name", ["block_mask", "mask"])
@pytest.mark.parametrize("handle", [-2, 10**6])
def test_an_unknown_handle_is_refused_by_its_argument_s_name(name, handle):
    q = randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=rf"^{name} = {handle} is not a mask handle from "
                                         r"cuflash.torch.block_mask_handle$"):
        ct.attention(q, q, q, **{name: handle})
    with pytest.raises(ValueError, match=rf"^block_mask = {handle} is not a mask handle"):
        ct.block_mask_handle(handle)


def test_the_handle_of_no_mask_is_the_call_without_a_mask():
    from cuflash.sparse import ExactMask
    q = randn(1, 2, 24, 8)
    plain = ct.attention(q, q, q, causal=True)
    no_mask = ct.block_mask_handle(None)
    assert no_mask == -1
    exact = ExactMask.from_dense(np.tril(np.ones((24, 24), dtype=bool)))
    for options in (dict(block_mask=no_mask), dict(mask=no_mask),
                    dict(block_mask=no_mask, mask=no_mask)):
        assert torch.equal(ct.attention(q, q, q, causal=True, **options), plain)
    # beside a mask in the other slot, it is that mask's call
    assert torch.equal(ct.attention(q, q, q, block_mask=no_mask, mask=exact),
                       ct.attention(q, q, q, mask=exact))


def test_masks_in_the_wrong_slot_or_both_are_refused():
    from cuflash.sparse import BlockMask, ExactMask
    exact = ExactMask.from_dense(np.tril(np.ones((64, 64), dtype=bool)))
    blocks = BlockMask.from_dense(np.tril(np.ones((4, 4), dtype=bool)), block_size=16)
    q = randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="not both"):
        ct.attention(q, q, q, block_mask=blocks, mask=exact)
    with pytest.raises(TypeError, match="ExactMask"):
        ct.attention(q, q, q, mask=blocks)
    with pytest.raises(TypeError, match="BlockMask"):
        ct.attention(q, q, q, block_mask=ct.block_mask_handle(exact))


def test_block_mask_under_compile_recompiles_per_mask():
    from cuflash.sparse import BlockMask
    masks = [BlockMask.from_dense(np.tril(np.ones((4, 4), dtype=bool)), block_size=16),
             BlockMask.from_dense(np.eye(4, dtype=bool), block_size=16)]
    q, k, v = randn(1, 2, 64, 16), randn(1, 2, 64, 16), randn(1, 2, 64, 16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, m: ct.attention(q, k, v, block_mask=m),
                             backend="aot_eager", fullgraph=True)
    for mask in masks + masks[:1]:
        assert torch.equal(compiled(q, k, v, mask), ct.attention(q, k, v, block_mask=mask))


def test_cache_keys_a_call_by_its_layout_options_and_switches(monkeypatch):
    """The operators' cache of CUDA calls (``_cached``), its keying on the CPU: a launch stands
    in for the kernels. A signature has no entry until one is kept; then a call with the same
    layout, options and kernel switches launches it with its own pointers and a new lse; other
    options (a scale of another type too), a switch, a view 4 bytes off 16-byte alignment or a new
    shape miss; a signature kept as uncached answers that it takes the core's road."""
    from cuflash import kernels
    from cuflash.torch import _cached
    launched = []
    monkeypatch.setattr(_cached, "_run", lambda launch, pointers, device: launched.append(pointers))

    class Entry:
        lse_shape = (2, 4, 8)
        launch = None

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    out = torch.empty(2, 4, 8, 16)
    options = (bool, True, float, 0.5, -1, -1, 0.0, -1)
    _cached.clear()
    lse, key = _cached.forward(q, k, v, out, options)
    assert lse is None and key is not None and not launched
    _cached._remember(key, Entry())
    lse, again = _cached.forward(q, k, v, out, options)
    assert again is None and lse.shape == (2, 4, 8) and lse.dtype == torch.float32
    assert launched[-1] == (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                            lse.data_ptr(), 0, 0, 0)
    misses = [(q, k, v, out, (bool, True, int, 1, -1, -1, 0.0, -1)),   # scale 1, not 0.5
              (q, k, v, out, (bool, False, float, 0.5, -1, -1, 0.0, -1)),
              (torch.randn(2, 4, 9, 16), k, v, torch.empty(2, 4, 9, 16), options),
              (torch.randn(2 * 4 * 8 * 16 + 1)[1:].view(2, 4, 8, 16), k, v, out, options)]
    for call in misses:
        assert _cached.forward(*call)[1] not in (None, key)
    monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "1")
    assert _cached.forward(q, k, v, out, options)[1] not in (None, key)
    monkeypatch.delenv(kernels.DISABLE_HOPPER_ENV)
    assert len(launched) == 1
    _cached._remember(key, None)
    assert _cached.forward(q, k, v, out, options) == (None, None)
    assert _cached.stats()["hits"] >= 1
    _cached.clear()


# ----------------------------------------------------------------------------- custom ops

def _schema_words(schema: str) -> str:
    """A schema as docs/torch.md writes it: one space between words, ``int`` for ``SymInt``,
    the results named or not."""
    schema = re.sub(r"\s+", " ", schema).replace("( ", "(").replace("SymInt", "int").strip()
    head, results = schema.split(" -> ")
    return head + " -> " + re.sub(r"Tensor \w+", "Tensor", results)


def test_documented_operator_schemas_are_the_registered_ones():
    text = (REPO / "docs" / "torch.md").read_text()
    section = text.split("\n## The operators\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for entry in re.split(r"\n(?=cuflash::)", block.strip()):
            documented[entry.split("(", 1)[0]] = _schema_words(entry)
    names = ["attention_forward", "attention_backward", "attention_varlen_forward",
             "attention_varlen_backward"]
    assert sorted(documented) == sorted("cuflash::" + name for name in names)
    for name in names:
        schema = str(getattr(torch.ops.cuflash, name).default._schema)
        assert documented["cuflash::" + name] == _schema_words(schema), name


@pytest.mark.parametrize("seq_major", [False, True], ids=["hnd", "nhd"])
def test_opcheck_forward(seq_major):
    q, k, v = (leaf(randn(2, 4, 48, 16)) for _ in range(3))
    torch.library.opcheck(torch.ops.cuflash.attention_forward.default,
                          (q, k, v, True, None, -1, -1, 0.0, None, -1, seq_major, False))


def test_opcheck_backward():
    q, k, v = (randn(2, 4, 48, 16) for _ in range(3))
    out, lse = torch.ops.cuflash.attention_forward(q, k, v, False, 0.5, -1, -1, 0.0, None, -1,
                                                   False, False)
    torch.library.opcheck(torch.ops.cuflash.attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, False, 0.5, -1, -1, 0.0,
                           None, -1, False))


@needs_core("alibi_slopes")
@needs_core("window")
def test_opcheck_with_options():
    q, k, v = (leaf(randn(2, 4, 48, 16)) for _ in range(3))
    slopes = torch.rand(4)
    torch.library.opcheck(torch.ops.cuflash.attention_forward.default,
                          (q, k, v, False, None, 8, 2, 0.0, slopes, -1, True, False))


def test_fake_shapes_and_strides_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = randn(2, 50, 4, 16).transpose(1, 2), randn(2, 2, 60, 16), randn(2, 2, 60, 8)
    real = torch.ops.cuflash.attention_forward(q, k, v, False, None, -1, -1, 0.0, None, -1,
                                               True, False)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fake = torch.ops.cuflash.attention_forward(fq, fk, fv, False, None, -1, -1, 0.0, None,
                                                   -1, True, False)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


# ----------------------------------------------------------------------------- eager calls

def _operators_only(monkeypatch):
    """Every call through the operators, as under torch.compile."""
    monkeypatch.setattr(_ops, "_runs_eagerly", lambda *tensors: False)


def _forward_backward(fn, inputs, dout):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, dout))


@pytest.mark.parametrize("api", ["attention", "varlen"])
def test_eager_calls_equal_the_operators(monkeypatch, api):
    """Eager calls skip the dispatcher for the operators' bodies: the same bits, values and
    gradients, as through the operators."""
    if api == "attention":
        q, k, v = leaf(randn(2, 4, 37, 16)), leaf(randn(2, 4, 37, 16)), leaf(randn(2, 4, 37, 8))
        slopes = torch.rand(4)

        def fn(q, k, v):
            return ct.attention(q, k, v, causal=True, window=(9, -1), softcap=3.0,
                                alibi_slopes=slopes, dropout_p=0.25, dropout_seed=11)
    else:
        q, k, v = (leaf(randn(53, 4, 16)) for _ in range(3))
        offsets = torch.tensor([0, 20, 53], dtype=torch.int32)

        def fn(q, k, v):
            return ct.flash_attn_varlen_func(q, k, v, offsets, offsets, 33, 33, causal=True)
    dout = randn(*fn(q, k, v).shape)
    eager = _forward_backward(fn, (q, k, v), dout)
    _operators_only(monkeypatch)
    through_operators = _forward_backward(fn, (q, k, v), dout)
    for a, b in zip(eager, through_operators):
        assert torch.equal(a, b)


def test_eager_calls_do_not_dispatch(monkeypatch):
    def refuse(*args):
        raise AssertionError("an eager call reached the operator")

    for name in ("attention_forward", "attention_backward"):
        monkeypatch.setattr(_ops, name, refuse)
    q, k, v = (leaf(randn(1, 2, 16, 8)) for _ in range(3))
    ct.attention(q, k, v, causal=True).sum().backward()
    assert all(x.grad is not None for x in (q, k, v))


def test_modes_transforms_and_subclasses_meet_the_operators():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (randn(1, 2, 16, 8) for _ in range(3))
    with Seen() as seen:
        ct.attention(q, k, v)
    assert "cuflash.attention_forward.default" in seen.ops
    with FakeTensorMode() as mode:  # fake tensors reach the operator's fake implementation
        out = ct.attention(*(mode.from_tensor(x) for x in (q, k, v)))
    assert out.shape == q.shape and type(out).__name__ == "FakeTensor"
    with torch.device("cpu"):  # a function mode
        assert not _ops._runs_eagerly(q)
    under_transform = []
    torch.func.grad(lambda x: under_transform.append(_ops._runs_eagerly(x)) or x.sum())(q)
    assert under_transform == [False]
    assert _ops._runs_eagerly(q, None, torch.nn.Parameter(q))
    traced = torch.jit.trace(lambda q, k, v: ct.attention(q, k, v, causal=True), (q, k, v),
                             check_trace=False)
    assert "cuflash::attention_forward" in str(traced.graph)  # the operator is what a trace records
    assert torch.equal(traced(q, k, v), ct.attention(q, k, v, causal=True))


def test_meta_tensors_meet_the_operators():
    """Meta tensors (shape inference without memory) take the operators' fake implementations,
    as they would through the dispatcher, forward and backward: the eager road would hand them
    to the core, which has no meta device."""
    meta = torch.device("meta")
    q, k, v = (leaf(randn(2, 4, 9, 8).to(meta)) for _ in range(3))
    assert not _ops._runs_eagerly(q, k, v)
    out = ct.attention(q, k[:, :2], v[:, :2, :, :6], causal=True)
    assert out.device == meta and out.shape == (2, 4, 9, 6)
    out.sum().backward()
    assert q.grad.device == meta and q.grad.shape == q.shape
    out = ct.flash_attn_func(q, k, v, dropout_p=0.25)
    assert out.device == meta and out.shape == (2, 4, 9, 8) and out.is_contiguous()
    out = ct.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert out.device == meta and out.shape == (2, 4, 9, 8)
    packed = randn(10, 3, 2, 8).to(meta).requires_grad_()
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=meta)
    out = ct.flash_attn_varlen_qkvpacked_func(packed, cu_seqlens, 6, causal=True)
    assert out.device == meta and out.shape == (10, 2, 8)
    out.sum().backward()
    assert packed.grad.device == meta and packed.grad.shape == packed.shape


# Calls the core refuses for their shapes, dtypes or slopes: the (shape, dtype) of q, k and v,
# and the keywords of cuflash.torch.attention.
_F32, _F16, _F64 = torch.float32, torch.float16, torch.float64
_REFUSED_CALLS = {
    "head dims": ((((2, 4, 8, 16), _F32), ((2, 4, 8, 32), _F32), ((2, 4, 8, 16), _F32)), {}),
    "key and value lengths": ((((2, 4, 8, 16), _F32), ((2, 4, 8, 16), _F32),
                               ((2, 4, 9, 16), _F32)), {}),
    "query head groups": ((((2, 4, 8, 16), _F32), ((2, 3, 8, 16), _F32),
                           ((2, 3, 8, 16), _F32)), {}),
    "batch axes": ((((3, 4, 8, 16), _F32), ((2, 4, 8, 16), _F32), ((2, 4, 8, 16), _F32)), {}),
    "empty axis": ((((2, 4, 0, 16), _F32), ((2, 4, 8, 16), _F32), ((2, 4, 8, 16), _F32)), {}),
    "2-D query, 3-D keys": ((((8, 16), _F32), ((2, 8, 16), _F32), ((2, 8, 16), _F32)), {}),
    "mixed dtypes": ((((2, 4, 8, 16), _F32), ((2, 4, 8, 16), _F16), ((2, 4, 8, 16), _F32)), {}),
    "float64": ((((2, 4, 8, 16), _F64),) * 3, {}),
    "slopes": ((((2, 4, 8, 16), _F32),) * 3, {"alibi_slopes": (3,)}),
}


def _refused_call(case, device):
    """The tensors and keywords of one of ``_REFUSED_CALLS`` on ``device``."""
    specs, options = _REFUSED_CALLS[case]
    tensors = [randn(*shape).to(device=device, dtype=dtype) for shape, dtype in specs]
    return tensors, {name: torch.rand(shape).to(device) for name, shape in options.items()}


@pytest.mark.parametrize("case", list(_REFUSED_CALLS))
def test_fake_implementation_refuses_what_the_call_refuses(case):
    """The operators' fake implementations (meta tensors, FakeTensor, torch.compile's trace)
    apply the core's rules: a call refused on real tensors is refused with the same error on
    shapes alone, not given an output shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tensors, options = _refused_call(case, "cpu")
    with pytest.raises((TypeError, ValueError)) as refused:
        ct.attention(*tensors, **options)
    same = dict(expected_exception=type(refused.value),
                match=f"^{re.escape(str(refused.value))}$")
    meta_tensors, meta_options = _refused_call(case, "meta")
    with pytest.raises(**same):
        ct.attention(*meta_tensors, **meta_options)
    with FakeTensorMode() as mode, pytest.raises(**same):
        ct.attention(*map(mode.from_tensor, tensors),
                     **{name: mode.from_tensor(x) for name, x in options.items()})


# Arrays of a backward call that the core refuses: which one, and its shape and dtype in place
# of the forward's.
_REFUSED_BACKWARD_ARRAYS = {
    "dout shape": ("dout", (2, 4, 9, 6), _F32),
    "dout dtype": ("dout", (2, 4, 9, 8), _F16),
    "out shape": ("out", (2, 4, 8, 8), _F32),
    "out dtype": ("out", (2, 4, 9, 8), _F64),
    "lse shape": ("lse", (2, 4, 9, 1), _F32),
    "lse dtype": ("lse", (2, 4, 9), _F16),
    "k head dim": ("k", (2, 4, 9, 16), _F32),
}


@pytest.mark.parametrize("case", list(_REFUSED_BACKWARD_ARRAYS))
def test_fake_backward_refuses_what_the_call_refuses(case):
    """The backward operator's fake implementation (meta tensors, FakeTensor, opcheck) refuses a
    dout, out or lse of the wrong shape or dtype, or q, k and v that do not pair, with the
    core's error, as the call on real tensors does, rather than giving gradients' shapes."""
    name, shape, dtype = _REFUSED_BACKWARD_ARRAYS[case]
    q, k, v = (randn(2, 4, 9, 8) for _ in range(3))
    out, lse = torch.ops.cuflash.attention_forward(q, k, v, False, None, -1, -1, 0.0, None, -1,
                                                   False, False)
    arrays = dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse)
    arrays[name] = randn(*shape).to(dtype)

    def call(arrays):
        return torch.ops.cuflash.attention_backward(*arrays.values(), False, None, -1, -1, 0.0,
                                                    None, -1, False)

    assert_fakes_refuse_as_the_call_does(call, arrays)


def assert_fakes_refuse_as_the_call_does(call, arrays: dict):
    """``call(arrays)`` is refused, and refused with the same error and message on meta tensors
    and under FakeTensorMode, where the operators' fake implementations run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises((TypeError, ValueError)) as refused:
        call(arrays)
    same = dict(expected_exception=type(refused.value),
                match=f"^{re.escape(str(refused.value))}$")
    with pytest.raises(**same):
        call({key: x.to("meta") for key, x in arrays.items()})
    with FakeTensorMode() as mode, pytest.raises(**same):
        call({key: mode.from_tensor(x) for key, x in arrays.items()})


def test_meta_tensors_draw_no_dropout_seed():
    """A call on meta tensors computes shapes only: with dropout it draws no seed, so torch's
    CPU generator, which real calls draw from, is where it was (as after torch's own SDPA on
    meta tensors); the backward gets its gradients' shapes as without dropout."""
    meta = torch.device("meta")
    q, k, v = (leaf(randn(2, 9, 4, 8).to(meta)) for _ in range(3))
    packed = randn(10, 3, 2, 8).to(meta)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=meta)
    state = torch.get_rng_state()
    out = ct.flash_attn_func(q, k, v, dropout_p=0.25)
    out.sum().backward()
    ct.attention(q, k, v, dropout_p=0.25)
    ct.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    ct.flash_attn_varlen_qkvpacked_func(packed, cu_seqlens, 6, dropout_p=0.25)
    assert torch.equal(torch.get_rng_state(), state)
    assert out.shape == (2, 9, 4, 8) and q.grad.shape == q.shape and q.grad.device == meta


def test_return_attn_probs_on_meta_tensors_is_refused_by_name():
    """S_dmask is formed on the CPU from the values of q, k and v, which meta tensors do not
    hold: a ValueError naming it before the forward runs (docs/torch.md), not torch's
    NotImplementedError about copying out of a meta tensor after it."""
    meta = torch.device("meta")
    q, k, v = (randn(2, 9, 4, 8).to(meta) for _ in range(3))
    with pytest.raises(ValueError, match="^return_attn_probs=True: .* meta tensors"):
        ct.flash_attn_func(q, k, v, return_attn_probs=True)
    packed = randn(10, 3, 2, 8).to(meta)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=meta)
    with pytest.raises(ValueError, match="^return_attn_probs=True: .* meta tensors"):
        ct.flash_attn_varlen_qkvpacked_func(packed, cu_seqlens, 6, return_attn_probs=True)


def test_return_attn_probs_on_fake_tensors_is_refused_by_name():
    """Fake tensors (FakeTensorMode, as torch.export traces) hold no values either: the same
    ValueError as for meta tensors, not torch's error about .numpy() on a tensor subclass."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = randn(2, 9, 4, 8)
    packed = randn(10, 3, 2, 8)
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
    with FakeTensorMode() as mode:
        fq, fpacked, fcu = map(mode.from_tensor, (q, packed, cu_seqlens))
        with pytest.raises(ValueError, match="^return_attn_probs=True: .* fake tensors"):
            ct.flash_attn_func(fq, fq, fq, return_attn_probs=True)
        with pytest.raises(ValueError, match="^return_attn_probs=True: .* fake tensors"):
            ct.flash_attn_varlen_qkvpacked_func(fpacked, fcu, 6, return_attn_probs=True)


@pytest.mark.parametrize("over", ["q", "k"])
def test_return_attn_probs_under_vmap_is_refused_by_name(over):
    """S_dmask is formed on the CPU from the values of q, k and v, which the tensors a
    torch.func transform wraps do not lend: a ValueError naming the wrapped tensor, as
    flash_attn_with_kvcache gives, not torch's "Cannot access data pointer" after the forward."""
    q, k = randn(3, 1, 9, 2, 8), randn(3, 1, 9, 2, 8)

    def probs(q, k):
        return ct.flash_attn_func(q, k, k, return_attn_probs=True)[2]

    batched, args = {"q": ((0, None), (q, k[0])), "k": ((None, 0), (q[0], k))}[over]
    with pytest.raises(ValueError, match=rf"^return_attn_probs=True cannot run on the tensors "
                                         rf"of a torch.func transform .*\({over}\b"):
        torch.func.vmap(probs, in_dims=batched)(*args)
    cu_seqlens = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^return_attn_probs=True cannot run .*\(qkv\b"):
        torch.func.vmap(lambda qkv: ct.flash_attn_varlen_qkvpacked_func(
            qkv, cu_seqlens, 5, return_attn_probs=True)[2])(randn(2, 9, 3, 2, 8))
    unwrapped = torch.func.vmap(lambda x: probs(q[0], k[0]) + x)(torch.zeros(2))
    assert torch.equal(unwrapped[1], probs(q[0], k[0]))  # tensors it does not wrap still run


@pytest.mark.parametrize("path", ["eager", "operators"])
def test_second_derivative_is_refused(monkeypatch, path):
    """No double backward, eager or through the operators: a gradient recorded with
    create_graph=True raises when differentiated, rather than silently not depending on q."""
    if path == "operators":
        _operators_only(monkeypatch)
    q, k, v = (leaf(randn(1, 2, 16, 8)) for _ in range(3))
    (dq,) = torch.autograd.grad(ct.attention(q, k, v).sum(), q, create_graph=True)
    assert dq.requires_grad
    with pytest.raises(RuntimeError):
        dq.square().sum().backward()


@pytest.mark.parametrize("path", ["eager", "operators"])
@pytest.mark.parametrize("api", ["attention", "varlen"])
@pytest.mark.parametrize("through", ["q", "dout"])
def test_second_derivative_along_one_path_is_refused(monkeypatch, path, api, through):
    """A gradient taken with create_graph=True, differentiated with respect to one tensor only
    (``torch.autograd.grad(..., w)``): the path from the gradient to ``w`` runs through the
    attention's backward, through q (``q = x @ w``) or through the incoming gradient
    (``loss = (out * w).sum()``), so it must raise, not return the terms that avoid it alone."""
    if path == "operators":
        _operators_only(monkeypatch)
    x = leaf(randn(5, 3, 8))
    w = leaf(randn(8, 8) if through == "q" else randn(5, 3, 8))
    k, v = randn(7, 3, 8), randn(7, 3, 8)
    q = x @ w if through == "q" else x
    if api == "attention":
        out = ct.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                           causal=True).transpose(0, 1)
    else:
        offsets = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 7],
                                                                          dtype=torch.int32)
        out = ct.flash_attn_varlen_func(q, k, v, *offsets, 3, 4, causal=True)
    weight = w if through == "dout" else torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (dx,) = torch.autograd.grad((out * weight).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):  # allow_unused: an unconnected w is not the refusal
        torch.autograd.grad(dx.square().sum(), w, allow_unused=True)


def test_torch_func_vmap_runs_and_grad_is_refused():
    """torch.func transforms meet the operators: vmap runs them (the per-element results), the
    reverse-mode transforms are refused by torch's custom operators (docs/torch.md, "Eager calls
    skip the dispatcher")."""
    q = randn(3, 2, 5, 8)
    batched = torch.func.vmap(lambda x: ct.attention(x, x, x, causal=True))(q)
    assert torch.equal(batched, torch.stack([ct.attention(x, x, x, causal=True) for x in q]))
    for transform in (torch.func.grad, torch.func.jacrev):
        with pytest.raises(RuntimeError, match="functorch transforms"):
            transform(lambda x: ct.attention(x, x, x).sum())(q)


@pytest.mark.parametrize("path", ["eager", "operators"])
@pytest.mark.parametrize("api", ["attention", "varlen"])
@pytest.mark.parametrize("mode", ["dual tensors", "torch.func.jvp"])
def test_forward_mode_derivatives_are_refused(monkeypatch, path, api, mode):
    """Neither road has a forward-mode derivative: a tangent on q, k or v raises, where the
    result used to come back without one (torch.func.jvp gave a tangent of 0)."""
    if path == "operators":
        _operators_only(monkeypatch)
    k, v = randn(7, 2, 8), randn(7, 2, 8)
    offsets = torch.tensor([0, 3, 7], dtype=torch.int32)

    def call(q):
        if api == "attention":
            return ct.attention(q, k, v, causal=True)
        return ct.flash_attn_varlen_func(q, k, v, offsets, offsets, 4, 4)

    q, tangent = randn(7, 2, 8), randn(7, 2, 8)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        if mode == "dual tensors":
            with torch.autograd.forward_ad.dual_level():
                call(torch.autograd.forward_ad.make_dual(q, tangent))
        else:
            torch.func.jvp(call, (q,), (tangent,))
    with torch.autograd.forward_ad.dual_level():  # an open level alone changes nothing
        assert torch.equal(call(q), call(q.clone()))


class TinyAttention(torch.nn.Module):
    def __init__(self, api):
        super().__init__()
        self.api = api
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).unbind(2)
        if self.api == "flash_attn":
            return ct.flash_attn_func(q, k, v, causal=True).reshape(b, n, 32)
        if self.api == "sdpa":
            out = ct.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True)
            return out.transpose(1, 2).reshape(b, n, 32)
        return ct.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            causal=True).transpose(1, 2).reshape(b, n, 32)


def _c_compiler_reason():
    return None if shutil.which("cc") or shutil.which("gcc") else "inductor needs a C compiler"


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("api", ["attention", "flash_attn", "sdpa"])
def test_compile_fullgraph(backend, api):
    if backend == "inductor" and _c_compiler_reason():
        pytest.skip(_c_compiler_reason())
    model = TinyAttention(api)
    x = randn(2, 40, 32)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    assert torch.allclose(out, eager_out, atol=1e-6)
    for g, e in zip((p.grad for p in model.parameters()), eager_grads):
        assert torch.allclose(g, e, atol=1e-5)


@needs_core("window")
@needs_core("softcap")
@needs_core("alibi_slopes")
def test_compile_fullgraph_with_options():
    slopes = torch.rand(4) * 0.2

    def f(q, k, v):
        return ct.flash_attn_func(q, k, v, causal=True, window_size=(8, 0), softcap=3.0,
                                  alibi_slopes=slopes, deterministic=True)

    q, k, v = (leaf(randn(2, 40, 4, 16)) for _ in range(3))
    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = f(q, k, v)
    assert torch.equal(out, expected)
    for g, e in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))):
        assert torch.equal(g, e)


class FloatOptions(torch.nn.Module):
    """Attention whose float options are module attributes, or left at their defaults."""

    def __init__(self, api, scale=None, softcap=0.0):
        super().__init__()
        self.api, self.scale, self.softcap = api, scale, softcap

    def forward(self, q, k, v):
        if self.api == "flash_attn":
            if self.scale is None and not self.softcap:
                return ct.flash_attn_func(q, k, v, causal=True)
            return ct.flash_attn_func(q, k, v, softmax_scale=self.scale, causal=True,
                                      softcap=self.softcap)
        if self.scale is None and not self.softcap:
            return ct.attention(q, k, v, causal=True)
        return ct.attention(q, k, v, causal=True, scale=self.scale, softcap=self.softcap)


@needs_core("softcap")
@pytest.mark.parametrize("api", ["attention", "flash_attn"])
@pytest.mark.parametrize("scale, softcap", [(None, 0.0), (None, 30.0), (0.3, 0.0), (0.3, 5.0)],
                         ids=["defaults", "softcap", "scale", "both"])
def test_compile_dynamic_with_float_options(api, scale, softcap):
    """dynamic=True makes the float options symbolic (the defaults and module attributes):
    their checks still trace with fullgraph=True, and the values are the eager ones."""
    model = FloatOptions(api, scale, softcap)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (9, 13):
        q, k, v = (leaf(randn(2, 2, n, 8)) for _ in range(3))
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected = model(q, k, v)
        assert torch.equal(out, expected)
        for g, e in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))):
            assert torch.equal(g, e)


# ----------------------------------------------------------------------------- drop-ins

def test_flash_attn_func_layout_and_grads():
    q, k, v = randn(2, 70, 4, 32), randn(2, 90, 2, 32), randn(2, 90, 2, 16)
    ins = [leaf(x) for x in (q, k, v)]
    out = ct.flash_attn_func(*ins, causal=True)
    assert out.shape == (2, 70, 4, 16) and out.is_contiguous()
    out.square().sum().backward()
    ins2 = [leaf(x.transpose(1, 2)) for x in (q, k, v)]
    expected = ct.attention(*ins2, causal=True)
    assert torch.equal(out, expected.transpose(1, 2))
    expected.square().sum().backward()
    for a, b in zip(ins, ins2):
        assert torch.equal(a.grad, b.grad.transpose(1, 2))


def test_flash_attn_func_values():
    q, k, v = randn(2, 64, 4, 32), randn(2, 64, 4, 32), randn(2, 64, 4, 32)
    check_against_reference(
        torch.float16, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        lambda *x: ct.flash_attn_func(*(t.transpose(1, 2) for t in x), causal=True,
                                      softmax_scale=0.25).transpose(1, 2),
        causal=True, scale=0.25)


def test_packed_variants_match_unpacked():
    qkv = leaf(randn(2, 50, 3, 4, 16))
    out = ct.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = (leaf(x) for x in qkv.detach().unbind(2))
    expected = ct.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))
    kv = randn(2, 60, 2, 2, 16)
    q = randn(2, 50, 4, 16)
    assert torch.equal(ct.flash_attn_kvpacked_func(q, kv, softmax_scale=0.1),
                       ct.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], softmax_scale=0.1))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_return_attn_probs_gives_the_call_s_softmax_and_mask(p):
    """flash-attn's triple: the output is the call's (same seed as without the option), lse its
    log-sum-exp, and S_dmask the softmax matrix with the dropped entries negated, so that
    (S_dmask ∘ Z) · rescale @ v is the output."""
    q, k, v = randn(2, 37, 4, 16), randn(2, 45, 2, 16), randn(2, 45, 2, 16)
    options = dict(causal=True, window_size=(20, 3), softcap=5.0)
    torch.manual_seed(7)
    plain = ct.flash_attn_func(q, k, v, p, **options)
    torch.manual_seed(7)
    out, lse, probs = ct.flash_attn_func(q, k, v, p, **options, return_attn_probs=True)
    assert torch.equal(out, plain)
    assert probs.shape == (2, 4, 37, 45) and probs.dtype == q.dtype and lse.shape == (2, 4, 37)
    assert torch.allclose(probs.abs().sum(-1), torch.ones(2, 4, 37))
    kept = probs.clamp(min=0) * _dropout.rescale(p)
    expected = kept @ v.transpose(1, 2).repeat_interleave(2, dim=1)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
    dropped = ((probs < 0).sum() / (probs != 0).sum()).item()  # among the keys a row sees
    assert (dropped == 0.0) if p == 0 else abs(dropped - p) < 0.1
    packed = ct.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), p, **options,
                                         return_attn_probs=True)
    assert len(packed) == 3 and packed[2].shape == probs.shape


@pytest.mark.parametrize("api", ["dense", "varlen"])
def test_return_attn_probs_under_compile_runs_in_a_graph_break(api):
    """S_dmask is formed in NumPy from the inputs' values: torch.compile runs it eagerly in a
    graph break (tracing it crashed inside the dropout generator) with the seed the compiled
    forward drew, and fullgraph=True refuses it (docs/torch.md, "torch.compile and block
    masks")."""
    q, k, v = randn(1, 9, 2, 16), randn(1, 9, 2, 16), randn(1, 9, 2, 16)
    offsets = torch.tensor([0, 4, 9], dtype=torch.int32)

    def call(q, k, v):
        if api == "dense":
            return ct.flash_attn_func(q, k, v, 0.25, causal=True, return_attn_probs=True)
        return ct.flash_attn_varlen_func(q[0], k[0], v[0], offsets, offsets, 5, 5, 0.25,
                                         causal=True, return_attn_probs=True)

    torch._dynamo.reset()
    torch.manual_seed(3)
    expected = call(q, k, v)
    torch.manual_seed(3)
    for result, wanted in zip(torch.compile(call, backend="aot_eager")(q, k, v), expected):
        assert torch.equal(result, wanted)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(call, backend="aot_eager", fullgraph=True)(q, k, v)


@pytest.mark.parametrize("call, option", [
    (lambda q: ct.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=bool)),
     "attn_mask"),
    (lambda q: ct.scaled_dot_product_attention(q, q[:, :, :4], q[:, :, :4], is_causal=True),
     "is_causal"),
])
def test_unsupported_options_raise(call, option):
    with pytest.raises(NotImplementedError, match=option):
        call(randn(1, 2, 8, 8))


def test_sdpa_matches_torch():
    q, k, v = randn(2, 4, 70, 32), randn(2, 2, 70, 32), randn(2, 2, 70, 32)
    out = ct.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2,
                                              enable_gqa=True)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="enable_gqa"):
        ct.scaled_dot_product_attention(q, k, v)
    # unequal lengths without a causal mask are fine
    out = ct.scaled_dot_product_attention(q, k[:, :, :30], v[:, :, :30], enable_gqa=True)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k[:, :, :30], v[:, :, :30],
                                                              enable_gqa=True), atol=1e-5)


def test_sdpa_broadcasts_one_key_value_head_as_torch_does():
    """torch's SDPA broadcasts a key/value head axis of size 1 against the query's heads without
    enable_gqa (multi-query attention written as broadcasting); other unequal counts need
    enable_gqa=True in both."""
    q, k, v = randn(2, 4, 9, 16), randn(2, 1, 11, 16), randn(2, 1, 11, 16)
    check_against_reference(torch.float32, q, k, v,
                            lambda *x: ct.scaled_dot_product_attention(*x, scale=0.3),
                            scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(ct.scaled_dot_product_attention(q, k, v, scale=0.3), expected)
    with pytest.raises(ValueError, match="enable_gqa"):
        ct.scaled_dot_product_attention(q, k.expand(2, 2, 11, 16), v.expand(2, 2, 11, 16))


def test_sdpa_broadcasts_one_query_head_as_torch_does():
    """torch's SDPA broadcasts a query head axis of size 1 against several key/value heads
    without enable_gqa (it used to be refused, suggesting enable_gqa=True, which torch refuses
    for it too); the query's gradient is the sum over the heads it was broadcast to."""
    q, k, v = (leaf(x) for x in (randn(2, 1, 9, 16), randn(2, 4, 11, 16), randn(2, 4, 11, 8)))
    out = ct.scaled_dot_product_attention(q, k, v, scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert out.shape == expected.shape == (2, 4, 9, 8) and out.is_contiguous()
    torch.testing.assert_close(out, expected)
    dout = randn(2, 4, 9, 8)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout),
                         torch.autograd.grad(expected, (q, k, v), dout)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        ct.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # as torch's RuntimeError


@pytest.mark.parametrize("heads", [(4, 1, 4), (4, 4, 1), (1, 1, 4), (1, 4, 1), (4, 1, 2),
                                   (4, 2, 1), (4, 2, 2), (2, 4, 4)], ids=str)
@pytest.mark.parametrize("enable_gqa", [False, True])
def test_sdpa_key_and_value_heads_of_one_broadcast_as_torch_does(heads, enable_gqa):
    """torch's SDPA broadcasts a key or value head axis of 1 against the other's heads too (and
    then the query's as above): the same results and gradients where torch runs the call, a
    ValueError where it raises. A key and value of different head counts used to be refused."""
    ins = [leaf(randn(2, h, 9 if i == 0 else 11, 16)) for i, h in enumerate(heads)]
    try:
        expected = F.scaled_dot_product_attention(*ins, scale=0.3, enable_gqa=enable_gqa)
    except RuntimeError:
        with pytest.raises(ValueError):
            ct.scaled_dot_product_attention(*ins, scale=0.3, enable_gqa=enable_gqa)
        return
    out = ct.scaled_dot_product_attention(*ins, scale=0.3, enable_gqa=enable_gqa)
    torch.testing.assert_close(out, expected)
    dout = randn(*out.shape)
    for got, want in zip(torch.autograd.grad(out, ins, dout),
                         torch.autograd.grad(expected, ins, dout)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shapes", [
    ((8, 16), (10, 16), (10, 12)), ((8, 16), (2, 3, 10, 16), (2, 3, 10, 16)),
    ((2, 3, 8, 16), (10, 16), (10, 16)), ((3, 8, 16), (10, 16), (10, 16))],
    ids=["all 2-D", "2-D query", "2-D key and value", "3-D query"])
def test_sdpa_takes_two_dimensional_tensors_as_torch_does(shapes):
    """torch's SDPA takes (L, E) tensors, one head each, on their own or broadcast against
    others; they used to be refused (at least 3 dimensions)."""
    ins = [leaf(randn(*shape)) for shape in shapes]
    out = ct.scaled_dot_product_attention(*ins, scale=0.3)
    expected = F.scaled_dot_product_attention(*ins, scale=0.3)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    dout = randn(*out.shape)
    for got, want in zip(torch.autograd.grad(out, ins, dout),
                         torch.autograd.grad(expected, ins, dout)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"^query must have at least 2 dimensions"):
        ct.scaled_dot_product_attention(randn(16), *ins[1:])


def test_sdpa_runs_in_the_autocast_dtype_as_torch_does():
    """Under torch.autocast, torch's SDPA casts query, key and value to the autocast dtype (one
    of its lower-precision operators), so float32 inputs, or a float32 key beside a bfloat16
    query (a layer norm's output under autocast), run in bfloat16; the drop-in does the same,
    and the gradients reach the float32 inputs in float32."""
    q, k, v = (leaf(randn(2, 4, 9, 16)) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mixed = ct.scaled_dot_product_attention(q.bfloat16(), k, v)
    assert out.dtype == expected.dtype == mixed.dtype == torch.bfloat16
    bf16 = [x.detach().bfloat16() for x in (q, k, v)]
    assert torch.equal(out, ct.scaled_dot_product_attention(*bf16, is_causal=True))
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert ct.scaled_dot_product_attention(q, k, v).dtype == torch.float32


def test_sdpa_output_memory_follows_query():
    x = randn(2, 30, 3, 4, 16)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))  # (B, H, N, D) views of (B, N, H, D)
    out = ct.scaled_dot_product_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    out = ct.scaled_dot_product_attention(q.contiguous(), k, v)
    assert out.is_contiguous()


def test_flash_attn_signatures_refuse_unequal_batch_sizes():
    """flash-attn takes one batch size; only attention broadcasts leading axes."""
    q, kv = randn(1, 8, 2, 8), randn(3, 8, 2, 8)
    with pytest.raises(ValueError, match=r"^q, k and v must have the same batch size .*"
                                         r"q \(1, 8, 2, 8\), k \(3, 8, 2, 8\), v \(3, 8, 2, 8\)"):
        ct.flash_attn_func(q, kv, kv)
    with pytest.raises(ValueError, match=r"q, k and v .* v \(1, 8, 2, 8\)"):
        ct.flash_attn_func(kv, kv, q)
    with pytest.raises(ValueError, match=r"^q and kv must have the same batch size .*"
                                         r"q \(1, 8, 2, 8\), kv \(3, 8, 2, 2, 8\)"):
        ct.flash_attn_kvpacked_func(q, torch.stack([kv, kv], 2))
    assert ct.attention(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2)).shape[0] == 3


@pytest.mark.parametrize("shapes, match", [
    (((2, 5, 3, 8), (2, 6, 2, 8), (2, 6, 2, 8)),
     r"3 query heads \(q \(2, 5, 3, 8\)\) and 2 key/value heads \(k \(2, 6, 2, 8\)\)"),
    (((2, 5, 4, 8), (2, 6, 2, 4), (2, 6, 2, 8)),
     r"same head dimension .* got q \(2, 5, 4, 8\) and k \(2, 6, 2, 4\)"),
    (((2, 5, 4, 8), (2, 6, 2, 8), (2, 7, 2, 8)),
     r"k and v must have the same .*\(axes 1, 2\), got k \(2, 6, 2, 8\) and v \(2, 7, 2, 8\)"),
    (((2, 5, 4, 8), (2, 6, 2, 8), (2, 6, 1, 8)),
     r"k and v must have the same .*\(axes 1, 2\), got k \(2, 6, 2, 8\) and v \(2, 6, 1, 8\)"),
    (((2, 0, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8)), r"q must not have an empty axis, got shape "
                                                 r"\(2, 0, 4, 8\)"),
])
def test_flash_attn_shape_errors_show_the_tensors_as_given(shapes, match):
    """flash-attn's (B, S, H, D) tensors are described as the caller passed them, not as the
    (B, H, S, D) views the core is given."""
    with pytest.raises(ValueError, match=match):
        ct.flash_attn_func(*(randn(*shape) for shape in shapes))


def test_dense_packed_errors_name_the_packed_tensors():
    """flash_attn_qkvpacked_func and flash_attn_kvpacked_func name the parts of qkv and kv they
    take, not the q, k and v of the call they make on them."""
    with pytest.raises(TypeError, match=r"^qkv\[:, :, 0\] has dtype float64"):
        ct.flash_attn_qkvpacked_func(randn(2, 5, 3, 4, 8).double())
    q = randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match=r"3 query heads \(q \(2, 5, 3, 8\)\) and 2 key/value "
                                         r"heads \(kv\[:, :, 0\] \(2, 6, 2, 8\)\)$"):
        ct.flash_attn_kvpacked_func(q, randn(2, 6, 2, 2, 8))
    with pytest.raises(TypeError, match=r"^q and kv\[:, :, 0\] must have the same dtype"):
        ct.flash_attn_kvpacked_func(q, randn(2, 6, 2, 3, 8).half())


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_meet_the_cores_dtype_rule(dtype):
    """float8 tensors, which NumPy knows only through ml_dtypes, are refused by the core's dtype
    rule naming the argument, as float64 ones are, not by torch's 'Got unsupported ScalarType'
    when they cross to NumPy."""
    x = torch.zeros(2, 5, 4, 8, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=rf"^q has dtype {name}; supported dtypes are"):
        ct.attention(x, x, x)
    with pytest.raises(TypeError, match=rf"^qkv\[:, :, 0\] has dtype {name}"):
        ct.flash_attn_qkvpacked_func(torch.zeros(2, 5, 3, 4, 8, dtype=dtype))
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match=rf"^q has dtype {name}"):
        ct.flash_attn_varlen_func(x[0], x[0], x[0], offsets, offsets, 5, 5)
    with pytest.raises(TypeError, match=rf"^q has dtype {name}"):
        ct.flash_attn_with_kvcache(x, x, x)


@pytest.mark.parametrize("shapes, match", [
    (((2, 4, 5, 8), (3, 4, 6, 8), (3, 4, 6, 8)),
     r"^the leading axes of q, k and v must broadcast together, got q \(2, 4, 5, 8\), "
     r"k \(3, 4, 6, 8\), v \(3, 4, 6, 8\)$"),
    (((2, 4, 5, 8), (2, 4, 6, 8), (3, 4, 6, 8)), r"^the leading axes of q, k and v must"),
    (((8,), (6, 8), (6, 8)), r"^q must have at least 2 dimensions .* got shape \(8,\)$"),
    (((), (6, 8), (6, 8)), r"^q must have at least 2 dimensions .* got shape \(\)$"),
    (((5, 8), (6, 8), (8,)), r"^v must have at least 2 dimensions .* got shape \(8,\)$"),
])
def test_attention_shape_errors_are_the_cores(shapes, match):
    """Shapes the core refuses raise its ValueError, also those the output's shape is read
    from before the core sees them (leading axes that do not broadcast, a q without rows)."""
    tensors = [torch.randn(shape) for shape in shapes]
    with pytest.raises(ValueError, match=match):
        cuflash.attention(*(x.numpy() for x in tensors))
    with pytest.raises(ValueError, match=match):
        ct.attention(*tensors)
    with pytest.raises(ValueError, match=match):
        ct.attention(*(x.requires_grad_() for x in tensors))
    if len(shapes[0]) == 4:
        with pytest.raises(ValueError, match=r"^the leading axes of query, key and value must "
                                             r"broadcast together, got query \(2, 4, 5, 8\), "):
            ct.scaled_dot_product_attention(*tensors)


def test_sdpa_errors_name_query_key_and_value():
    """scaled_dot_product_attention's refusals name its arguments query, key and value, not the
    q, k and v of the core it calls."""
    q, k = randn(2, 4, 5, 8), randn(2, 2, 7, 8)
    with pytest.raises(TypeError, match=r"^query and key must have the same dtype, got query: "
                                        r"float32 and key: float16$"):
        ct.scaled_dot_product_attention(q, k.half(), k, enable_gqa=True)
    with pytest.raises(TypeError, match=r"^query has dtype float64"):
        ct.scaled_dot_product_attention(q.double(), k.double(), k.double(), enable_gqa=True)
    with pytest.raises(ValueError, match=r"^key and value must have the same number of heads and "
                                         r"keys .* got key \(2, 2, 7, 8\) and value \(2, 2, 6, "
                                         r"8\)$"):
        ct.scaled_dot_product_attention(q, k, randn(2, 2, 6, 8), enable_gqa=True)
    with pytest.raises(ValueError, match=r"3 key/value heads \(key \(2, 3, 7, 8\)\)$"):
        ct.scaled_dot_product_attention(q, randn(2, 3, 7, 8), randn(2, 3, 7, 8), enable_gqa=True)
    with pytest.raises(ValueError, match=r"^query must not have an empty axis, got shape "
                                         r"\(0, 4, 5, 8\)$"):
        ct.scaled_dot_product_attention(randn(0, 4, 5, 8), k[:0], k[:0], enable_gqa=True)
    with pytest.raises(TypeError, match=r"^is_causal must be True or False"):
        ct.scaled_dot_product_attention(q, q, q, is_causal="yes")


@pytest.mark.parametrize("scale", [0.0, -0.5, 1e-39])
def test_scales_torch_takes_and_cuflash_refuses(scale):
    """torch's SDPA takes any float scale; cuflash refuses one that is not a positive normal
    float32 with a ValueError naming it, as docs/torch.md's table of refusals says."""
    q = randn(1, 2, 5, 8)
    assert F.scaled_dot_product_attention(q, q, q, scale=scale).shape == q.shape
    with pytest.raises(ValueError, match=r"^scale must be finite and positive"):
        ct.scaled_dot_product_attention(q, q, q, scale=scale)
    with pytest.raises(ValueError, match=r"^softmax_scale must be finite and positive"):
        ct.flash_attn_func(q, q, q, softmax_scale=scale)


def test_renamed_errors_show_the_values_as_given():
    """Errors renamed to the caller's names (query for q, qkv[:, :, 0] for q, ...) keep the
    values they show as the caller gave them, a string "q" or "v" included."""
    q = randn(2, 4, 5, 8)
    with pytest.raises(TypeError, match=r"^scale must be a real number or None, got 'v' of "):
        ct.scaled_dot_product_attention(q, q, q, scale="v")
    with pytest.raises(TypeError, match=r"^dropout_p must be .* got 'k' of type str$"):
        ct.scaled_dot_product_attention(q, q, q, dropout_p="k")
    qkv = randn(2, 5, 3, 4, 8)
    with pytest.raises(TypeError, match=r"^softmax_scale must be .* got 'q' of type str$"):
        ct.flash_attn_qkvpacked_func(qkv, softmax_scale="q")
    with pytest.raises(TypeError, match=r"^window_size must be .* got \('k', 1\)"):
        ct.flash_attn_qkvpacked_func(qkv, window_size=("k", 1))


def test_rejects_non_tensors():
    q = randn(1, 2, 8, 8)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ct.attention(q, q.numpy(), q)
    with pytest.raises(ValueError, match="one device"):
        ct.attention(q, q, q.to("meta"))
    with pytest.raises(ValueError, match="batch, seqlen, nheads, headdim"):
        ct.flash_attn_func(q[0], q[0], q[0])


# ----------------------------------------------------------------------------- dropout

def numpy_of(*tensors):
    return [_bridge.to_numpy(x) for x in tensors]  # bfloat16 too


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("drop_seed", [12345, 2**64 - 3], ids=["seed", "seed>=2**63"])
def test_dropout_equals_the_core_with_the_same_seed(dtype, drop_seed):
    """Forward and gradients bit for bit those of cuflash.attention / attention_backward on the
    same arrays, seed and offset (GQA, Nq != Nk, causal); a seed of 2**63 or more crosses the
    int64 seed tensor intact."""
    q, k, v = (leaf(x.to(dtype)) for x in (randn(2, 4, 40, 16), randn(2, 2, 56, 16),
                                           randn(2, 2, 56, 8)))
    dropout = dict(dropout_p=0.3, dropout_seed=drop_seed, dropout_offset=9)
    out = ct.attention(q, k, v, causal=True, **dropout)
    dout = torch.randn(out.shape).to(dtype)
    out.backward(dout)
    arrays = numpy_of(q, k, v)
    expected, lse = cuflash.attention(*arrays, causal=True, return_lse=True, **dropout)
    assert np.array_equal(numpy_of(out)[0], expected)
    grads = cuflash.attention_backward(*numpy_of(dout), *arrays, expected, lse, causal=True,
                                       **dropout)
    for x, g in zip((q, k, v), grads):
        assert np.array_equal(numpy_of(x.grad)[0], g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_dropout_against_float64_attention_with_the_same_mask(dtype):
    """Out and gradients against torch autograd through plain float64 attention with cuflash's
    mask (the correctness rule of this file)."""
    q, k, v = randn(2, 4, 48, 32), randn(2, 2, 64, 32), randn(2, 2, 64, 32)
    drop_seed = 2**40 + 7
    check_against_reference(
        dtype, q, k, v,
        lambda *x: ct.attention(*x, causal=True, dropout_p=0.2, dropout_seed=drop_seed,
                                dropout_offset=3),
        causal=True, dropout=(0.2, drop_seed, 3))


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_dropout_gradcheck():
    """torch.autograd.gradcheck with a fixed seed (float32, the widest dtype cuflash takes, so
    with finite-difference steps and tolerances to match)."""
    q, k, v = (leaf(randn(1, 2, 6, 4)) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda *x: ct.attention(*x, dropout_p=0.3, dropout_seed=11, dropout_offset=2),
        (q, k, v), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_zero_dropout_is_the_call_without_dropout():
    """dropout_p = 0 is bit-identical to no dropout (a seed changes nothing) and draws no seed."""
    q, k, v = (leaf(randn(2, 2, 40, 16)) for _ in range(3))
    plain = ct.attention(q, k, v, causal=True)
    state = torch.get_rng_state()
    for extra in (dict(dropout_p=0.0), dict(dropout_p=0.0, dropout_seed=5, dropout_offset=1)):
        assert torch.equal(ct.attention(q, k, v, causal=True, **extra), plain)
    assert torch.equal(ct.flash_attn_func(q, k, v, 0.0), ct.flash_attn_func(q, k, v))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_refused_dropout_call_draws_no_seed():
    """Every check comes before the seed is drawn: a refused call leaves torch's generator
    where it was."""
    x = randn(1, 8, 2, 8)
    refused = [
        lambda: ct.flash_attn_func(x, x, x, 0.25, window_size=(1.9, 0)),
        lambda: ct.attention(x, x, x, dropout_p=0.25, softcap="1.0"),
        lambda: ct.scaled_dot_product_attention(x, x, x, dropout_p=0.25, scale="0.5"),
        lambda: _varlen(dropout_p=0.25, causal="False"),
        lambda: _varlen(dropout_p=0.25, block_table=torch.zeros(2, 1, dtype=torch.int32)),
        lambda: ct.flash_attn_varlen_func(x, x, x, torch.tensor([0, 8], dtype=torch.int32),
                                          torch.tensor([0, 8], dtype=torch.int32), 8, 8, 0.25),
    ]
    for call in refused:
        state = torch.get_rng_state()
        with pytest.raises((TypeError, ValueError, NotImplementedError)):
            call()
        assert torch.equal(torch.get_rng_state(), state)


def test_a_dropout_call_the_core_refuses_draws_no_seed():
    """The core's own checks (shapes, slopes, offsets) run after the seed is drawn, inside the
    operator: a call they refuse puts torch's generator back where it was, as flash-attn's checks
    come before its draw; the next call draws the seed it would have drawn."""
    q, kv = randn(1, 8, 3, 8), randn(1, 8, 2, 8)
    x = torch.linspace(-1, 1, 8 * 2 * 8).reshape(8, 2, 8)
    cu, short = (torch.tensor(c, dtype=torch.int32) for c in ([0, 3, 8], [0, 3, 7]))
    refused = [
        lambda: ct.flash_attn_func(q, kv, kv, 0.25),  # 3 query heads over 2
        lambda: ct.attention(q, q, q, dropout_p=0.25, alibi_slopes=torch.ones(5)),
        lambda: ct.scaled_dot_product_attention(q.transpose(1, 2), kv.transpose(1, 2),
                                                kv.transpose(1, 2), dropout_p=0.25,
                                                enable_gqa=True),
        lambda: ct.flash_attn_varlen_func(x, x, x, cu, short, 5, 5, 0.25),
        lambda: _varlen(dropout_p=0.25, alibi_slopes=torch.ones(3)),
    ]
    for call in refused:
        state = torch.get_rng_state()
        with pytest.raises(ValueError):
            call()
        assert torch.equal(torch.get_rng_state(), state)


def dropout_calls():
    """Each torch entry point with dropout_p = 0.25 and no seed, on (B, H, N, D) tensors."""
    def bshd(f):
        return lambda q, k, v: f(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)

    return {
        "attention": lambda q, k, v: ct.attention(q, k, v, dropout_p=0.25),
        "flash_attn_func": bshd(lambda q, k, v: ct.flash_attn_func(q, k, v, 0.25)),
        "qkvpacked": bshd(lambda q, k, v: ct.flash_attn_qkvpacked_func(
            torch.stack([q, k, v], 2), dropout_p=0.25)),
        "kvpacked": bshd(lambda q, k, v: ct.flash_attn_kvpacked_func(
            q, torch.stack([k, v], 2), 0.25)),
        "sdpa": lambda q, k, v: ct.scaled_dot_product_attention(q, k, v, dropout_p=0.25),
    }


@pytest.mark.parametrize("name", list(dropout_calls()))
def test_dropout_seed_comes_from_torch_default_generator(name):
    """Without a seed, each entry point draws one with _ops.draw_seed (torch's CPU generator):
    after the same torch.manual_seed, its out and gradients are those of an explicit call with
    that seed; another manual_seed gives another mask."""
    call = dropout_calls()[name]
    q, k, v = (leaf(randn(2, 2, 40, 16)) for _ in range(3))
    torch.manual_seed(1234)
    out = call(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.manual_seed(1234)
    drop_seed = int(_ops.draw_seed())
    expected = ct.attention(q, k, v, dropout_p=0.25, dropout_seed=drop_seed)
    assert torch.equal(out, expected)
    for g, e in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        assert torch.equal(g, e)
    torch.manual_seed(1234)
    assert torch.equal(call(q, k, v), out)
    torch.manual_seed(4321)
    assert not torch.equal(call(q, k, v), out)


@pytest.mark.parametrize("name", list(dropout_calls()) + ["explicit seed"])
@pytest.mark.parametrize("default", ["meta", "cpu"])
def test_dropout_seed_lives_on_the_cpu_whatever_the_default_device(name, default):
    """The seed is drawn from (or made as) a CPU tensor under torch.set_default_device too: a
    seed made on a meta default device sent the call to the operators' fake implementation,
    which returned uninitialised memory."""
    call = dropout_calls().get(name, lambda q, k, v: ct.attention(q, k, v, dropout_p=0.25,
                                                                      dropout_seed=2**64 - 5))
    q, k, v = (randn(2, 2, 40, 16) for _ in range(3))
    torch.manual_seed(1234)
    expected = call(q, k, v)
    with torch.device(default):
        torch.manual_seed(1234)
        out = call(q, k, v)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", list(dropout_calls()))
def test_dropout_keep_rate_is_one_minus_p(name):
    """With q = 0 every key has probability 1/Nk, and v = identity makes out[..., i, j] that
    element's (Z / (1 - p)) / Nk: the zeros are the dropped elements, within 5 binomial standard
    deviations of p = 0.25, and the kept ones are scaled by 1 / (1 - p)."""
    n, p = 64, 0.25
    q = torch.zeros(2, 4, n, n)
    k = randn(2, 4, n, n)
    v = torch.eye(n).expand(2, 4, n, n)
    out = dropout_calls()[name](q, k, v)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / out.numel())
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / ((1 - p) * n)))


def test_dropout_offset_changes_the_mask():
    q, k, v = (randn(1, 2, 40, 16) for _ in range(3))
    a, b = (ct.attention(q, k, v, dropout_p=0.3, dropout_seed=7, dropout_offset=offset)
            for offset in (0, 1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("options, error, match", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a real number in \[0, 1\)"),
    (dict(dropout_p=0.1, dropout_seed=-1), ValueError, "dropout_seed must be an int"),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed must be an int"),
    (dict(dropout_p=0.1, dropout_offset=2**32), ValueError, "dropout_offset must be an int"),
])
def test_invalid_dropout_options_are_the_cores_errors(options, error, match):
    q = randn(1, 2, 8, 8)
    with pytest.raises(error, match=match):
        ct.attention(q, q, q, **options)


@pytest.mark.parametrize("dropout", [
    (0.2, _ops.seed_tensor(2**63 + 5), 4),
    (0.2, torch.tensor([2**62 + 5, 4]), 0),
], ids=["scalar", "pair"])
def test_opcheck_with_dropout(dropout):
    """Both forms of the seed: the CPU scalar, and the (seed, offset) pair drawn on the device
    under CUDA-graph capture (here in host memory, which the core reads as a NumPy seed array)."""
    q, k, v = (leaf(randn(2, 4, 48, 16)) for _ in range(3))
    torch.library.opcheck(torch.ops.cuflash.attention_forward.default,
                          (q, k, v, True, None, -1, -1, 0.0, None, -1, True, False, *dropout))
    out, lse = torch.ops.cuflash.attention_forward(q, k, v, True, None, -1, -1, 0.0, None, -1,
                                                   False, False, *dropout)
    torch.library.opcheck(torch.ops.cuflash.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse, True, None, -1, -1, 0.0, None, -1, False,
                           *dropout))


@pytest.mark.parametrize("operator", ["attention_forward", "attention_varlen_forward"])
def test_fake_implementation_refuses_dropout_without_a_seed(operator):
    """An operator given ``dropout_p > 0`` and no seed is refused by the core (the backward
    could not draw the forward's mask): its fake implementation refuses it with the same
    error, rather than tracing a call that cannot run."""
    q = randn(8, 2, 16)
    if operator == "attention_forward":
        args = (q, q, q, False, None, -1, -1, 0.0, None, -1, False, False, 0.5)
    else:
        offsets = torch.tensor([0, 8], dtype=torch.int32)
        args = (q, q, q, offsets, offsets, 8, 8, False, None, -1, -1, 0.0, None, False, 0.5)
    call = getattr(torch.ops.cuflash, operator)
    with pytest.raises(ValueError) as refused:
        call(*args)
    with pytest.raises(ValueError, match=f"^{re.escape(str(refused.value))}$"):
        call(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in args))


# Seeds the operators refuse: a scalar seed is an integer tensor; a (seed, offset) pair is int64
# (2,), with the offset left at 0.
_REFUSED_SEED_PAIRS = {
    "a float scalar": (torch.tensor(1.5), 0),
    "a bool scalar": (torch.tensor(True), 0),
    "three elements": (torch.tensor([5, 0, 1]), 0),
    "int32": (torch.tensor([5, 0], dtype=torch.int32), 0),
    "an offset beside it": (torch.tensor([5, 0]), 3),
}


@pytest.mark.parametrize("operator", ["attention_forward", "attention_backward",
                                      "attention_varlen_forward", "attention_varlen_backward"])
@pytest.mark.parametrize("pair", list(_REFUSED_SEED_PAIRS))
def test_fake_implementation_refuses_a_seed_pair_the_call_refuses(operator, pair):
    """A dropout seed given as a (seed, offset) pair is checked by the fake implementations as
    the operators check it (an int64 tensor of shape (2,), dropout_offset 0): the same error on
    meta tensors as on real ones, rather than shapes for a call that cannot run."""
    q = randn(8, 2, 16)
    dropout = (0.5, *_REFUSED_SEED_PAIRS[pair])
    options = (False, None, -1, -1, 0.0, None)
    if operator == "attention_forward":
        args = (q, q, q, *options, -1, False, False, *dropout)
    elif operator == "attention_backward":
        out, lse = torch.ops.cuflash.attention_forward(q, q, q, *options, -1, False, False)
        args = (out, q, q, q, out, lse, *options, -1, False, *dropout)
    else:
        offsets = torch.tensor([0, 8], dtype=torch.int32)
        args = (q, q, q, offsets, offsets, 8, 8, *options, False, *dropout)
        if operator == "attention_varlen_backward":
            out, lse = torch.ops.cuflash.attention_varlen_forward(*args[:-3])
            args = (out, *args[:3], out, lse, *args[3:])
    call = getattr(torch.ops.cuflash, operator)
    with pytest.raises((TypeError, ValueError)) as refused:
        call(*args)
    on_meta = str(refused.value).replace("cpu", "meta")  # where the message names the device
    with pytest.raises(type(refused.value), match=f"^{re.escape(on_meta)}$"):
        call(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in args))

def _flash_attn_dropout(q, k, v):
    return ct.flash_attn_func(q, k, v, 0.2, causal=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dropout_compile_fullgraph(backend):
    """The seed is drawn inside the graph (no graph break). inductor draws it with its own
    generator, also seeded by torch.manual_seed; ``fallback_random`` makes it draw eager's, so
    the compiled out and gradients equal the eager ones with either back end."""
    if backend == "inductor" and _c_compiler_reason():
        pytest.skip(_c_compiler_reason())
    from torch._inductor import config as inductor_config
    q, k, v = (leaf(randn(2, 40, 4, 16)) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(_flash_attn_dropout, backend=backend, fullgraph=True)
    results = []
    with inductor_config.patch(fallback_random=True):
        for f in (compiled, _flash_attn_dropout):
            torch.manual_seed(77)
            out = f(q, k, v)
            results.append((out,) + torch.autograd.grad(out.square().sum(), (q, k, v)))
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


def test_dropout_inductor_generator_follows_manual_seed():
    """Without fallback_random, inductor's own draw of the seed is repeatable under
    torch.manual_seed, and another seed gives another mask."""
    if _c_compiler_reason():
        pytest.skip(_c_compiler_reason())
    q, k, v = (randn(2, 40, 4, 16) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(_flash_attn_dropout, backend="inductor", fullgraph=True)
    outs = []
    for manual_seed in (5, 5, 6):
        torch.manual_seed(manual_seed)
        outs.append(compiled(q, k, v))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], ct.flash_attn_func(q, k, v, causal=True))  # dropout is on


def test_dropout_under_activation_checkpointing():
    """torch.utils.checkpoint restores the CPU generator before recomputing the forward, so the
    recomputation draws the same seed: the gradients are those without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    q, k, v = (leaf(randn(2, 40, 4, 16)) for _ in range(3))
    runs = []
    for wrap in (lambda f, *x: f(*x), lambda f, *x: checkpoint(f, *x, use_reentrant=False)):
        torch.manual_seed(3)
        out = wrap(_flash_attn_dropout, q, k, v)
        runs.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for got, expected in zip(*runs):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- captured dropout
#
# No CUDA here: a capture is stood in for (torch.cuda.is_current_stream_capturing, or
# _ops.graph_capturing), CUDA tensors by fake ones (FakeTensorMode) or by a pair in host memory
# that shows itself as one (CudaLikePair). test_torch_gpu.py captures and replays real graphs.

def capture_calls():
    """``dropout_calls``, and flash_attn_varlen_func on the same sequences packed."""
    def varlen(q, k, v):
        b, h, n, _ = q.shape
        cu = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=q.device)
        packed = (x.transpose(1, 2).reshape(b * n, h, x.shape[-1]) for x in (q, k, v))
        return ct.flash_attn_varlen_func(*packed, cu, cu, n, n, 0.25)

    return {**dropout_calls(), "varlen": varlen}


def _out_and_grads(call, q, k, v):
    out = call(q, k, v)
    return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))


def _refuse(*_args, **_kwargs):
    raise AssertionError("called where it must not be")


def test_graph_capturing_needs_cuda_tensors_a_capture_and_no_trace(monkeypatch):
    cuda = torch.device("cuda", 0)
    for capturing in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda c=capturing: c)
        assert _ops.graph_capturing(cuda) is capturing
        assert not _ops.graph_capturing(torch.device("cpu"))
    # A trace never asks (it draws on the CPU, as before), and does not break the graph.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", _refuse)
    torch._dynamo.reset()
    traced = torch.compile(lambda x: x + 1 if _ops.graph_capturing(cuda) else x - 1,
                           backend="eager", fullgraph=True)
    assert torch.equal(traced(torch.zeros(2)), -torch.ones(2))


@pytest.mark.parametrize("name", list(capture_calls()))
def test_cpu_tensors_draw_on_the_cpu_while_a_stream_captures(monkeypatch, name):
    """A capture on the current CUDA stream changes nothing for CPU tensors: the seed comes from
    torch's CPU generator, the results are those without the capture."""
    call = capture_calls()[name]
    q, k, v = (randn(2, 2, 40, 16) for _ in range(3))
    torch.manual_seed(8)
    expected = call(q, k, v)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(_ops, "draw_device_seed", _refuse)
    torch.manual_seed(8)
    assert torch.equal(call(q, k, v), expected)


@pytest.mark.parametrize("name", list(capture_calls()))
def test_a_captured_call_carries_a_device_drawn_pair(monkeypatch, name):
    """Under capture each entry point draws its seed with _ops.draw_device_seed (stood in for:
    a pair in host memory) rather than from the CPU generator; the forward and the backward
    receive the pair (the backward the forward's very memory) with offset 0, and give the out
    and gradients of the same call with that seed drawn on the CPU."""
    call = capture_calls()[name]
    q, k, v = (leaf(randn(2, 2, 40, 16)) for _ in range(3))
    drop_seed = 2**62 + 12345
    monkeypatch.setattr(_ops, "draw_seed", lambda: _ops.seed_tensor(drop_seed))
    expected = _out_and_grads(call, q, k, v)

    drawn, received = [], []
    dropout_options = _ops._dropout_options

    def draw_device_seed(device, offset=0):
        drawn.append((device, offset))
        return torch.tensor([drop_seed, offset])

    def recording(dropout_p, dropout_seed, dropout_offset, device, to_core):
        received.append((dropout_seed, dropout_offset))
        return dropout_options(dropout_p, dropout_seed, dropout_offset, device, to_core)

    monkeypatch.setattr(_ops, "draw_seed", _refuse)
    monkeypatch.setattr(_ops, "graph_capturing", lambda device: True)
    monkeypatch.setattr(_ops, "draw_device_seed", draw_device_seed)
    monkeypatch.setattr(_ops, "_dropout_options", recording)
    state = torch.get_rng_state()
    got = _out_and_grads(call, q, k, v)
    assert torch.equal(torch.get_rng_state(), state)
    assert drawn == [(q.device, 0)]
    assert len(received) == 2  # the forward, the backward
    for pair, offset in received:
        assert pair.shape == (2,) and pair.dtype == torch.int64 and offset == 0
    assert received[0][0].data_ptr() == received[1][0].data_ptr()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_under_capture_given_seeds_and_offsets_are_kept(monkeypatch):
    """An explicit seed is used as given, captured or not (no draw); a drawn pair carries the
    call's dropout_offset, so the call is that of the drawn seed with that offset."""
    q, k, v = (randn(1, 2, 40, 16) for _ in range(3))
    explicit = ct.attention(q, k, v, dropout_p=0.3, dropout_seed=2**64 - 3, dropout_offset=6)
    monkeypatch.setattr(_ops, "graph_capturing", lambda device: True)
    monkeypatch.setattr(_ops, "draw_seed", _refuse)
    monkeypatch.setattr(_ops, "draw_device_seed", _refuse)
    assert torch.equal(
        ct.attention(q, k, v, dropout_p=0.3, dropout_seed=2**64 - 3, dropout_offset=6), explicit)
    monkeypatch.setattr(_ops, "draw_device_seed",
                        lambda device, offset=0: torch.tensor([2**64 - 3 - 2**64, offset]))
    assert torch.equal(ct.attention(q, k, v, dropout_p=0.3, dropout_offset=6), explicit)


def test_draw_device_seed_is_a_pair_from_the_device_generator():
    """The pair: a seed in [0, 2**63 - 1) from the generator of the tensor's device (the CPU one
    here, so torch.manual_seed repeats it), then the offset as given."""
    torch.manual_seed(3)
    pair = _ops.draw_device_seed(torch.device("cpu"), 9)
    assert pair.shape == (2,) and pair.dtype == torch.int64
    assert 0 <= int(pair[0]) < 2**63 - 1 and int(pair[1]) == 9
    torch.manual_seed(3)
    assert torch.equal(_ops.draw_device_seed(torch.device("cpu"), 9), pair)


class CudaLikePair:
    """An int64 (seed, offset) pair in host memory that shows itself as a tensor on CUDA device
    0, with only what ``_bridge.to_cupy`` builds a view from: no item, int, cpu, tolist or
    numpy, so that any read of its values on the host fails."""

    device = torch.device("cuda", 0)

    def __init__(self, seed, offset):
        self._memory = torch.tensor([seed, offset], dtype=torch.int64)
        self.shape, self.dtype = self._memory.shape, self._memory.dtype

    def dim(self):
        return 1

    def numel(self):
        return 2

    def is_contiguous(self):
        return True

    def data_ptr(self):
        return self._memory.data_ptr()

    def get_device(self):
        return 0


def test_a_device_pair_becomes_a_seed_array_view():
    """The operators hand the core a CUDA pair as a CuPy uint64 view of its memory, never read
    on the host: a seed array the core takes (the kernels read it when they run), which holds
    the pair alive. The CPU scalar still becomes an int."""
    cupy = pytest.importorskip("cupy")
    from cuflash import _checks

    pair = CudaLikePair(2**63 - 9, 0)
    options = _ops._dropout_options(0.2, pair, 0, pair.device, _bridge.to_cupy)
    view = options.pop("dropout_seed")
    assert options == dict(dropout_p=0.2, dropout_offset=0)
    assert isinstance(view, cupy.ndarray) and _checks.is_seed_array(view)
    assert view.dtype == np.uint64 and view.shape == (2,) and view.flags.c_contiguous
    assert view.data.ptr == pair.data_ptr() and view.data.mem._owner is pair
    assert _checks.check_seed_array(view, 0, cupy, view) is view
    assert _ops._dropout_options(0.2, _ops.seed_tensor(2**64 - 3), 4, torch.device("cpu"),
                                 _bridge.to_numpy) == dict(dropout_p=0.2,
                                                           dropout_seed=2**64 - 3,
                                                           dropout_offset=4)


@pytest.mark.parametrize("pair", [torch.zeros(2), torch.zeros(3, dtype=torch.int64),
                                  torch.zeros(1, 2, dtype=torch.int64)],
                         ids=["float", "three", "2-d"])
def test_a_pair_must_be_int64_of_shape_2_on_the_inputs_device(pair):
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="pair must be an int64 tensor of shape"):
            _ops.seed_array(pair, device, _bridge.to_numpy)
    # host memory handed to CUDA inputs would be read by the kernels as a device address
    with pytest.raises(ValueError, match=r"on the inputs' device \(cuda:0\)"):
        _ops.seed_array(torch.zeros(2, dtype=torch.int64), torch.device("cuda", 0),
                        _bridge.to_numpy)


def test_fake_implementations_take_a_device_pair(monkeypatch):
    """With fake CUDA tensors under a stood-in capture, every entry point draws its pair on the
    device (the real draw, on fake tensors) and the forward operators receive it: an int64
    (2,) tensor on the inputs' device; the fake forwards and backwards take it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seeds(TorchDispatchMode):
        """The int64 tensors each cuflash operator receives (cu_seqlens are int32)."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("cuflash."):
                self.seen.append((str(func), [x for x in args if isinstance(x, torch.Tensor)
                                              and x.dtype == torch.int64]))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cuda = torch.device("cuda", 0)
    with FakeTensorMode(), Seeds() as seeds:
        q, k, v = (torch.empty(2, 2, 40, 16, device=cuda, dtype=torch.float16)
                   for _ in range(3))
        for name, call in capture_calls().items():
            out = call(q, k, v)
            assert out.device == cuda, name
        ct.attention(q, k, v, dropout_p=0.25, dropout_offset=3)
        pair = _ops.draw_device_seed(cuda)
        out, lse = torch.ops.cuflash.attention_forward(q, k, v, True, None, -1, -1, 0.0, None,
                                                       -1, False, False, 0.25, pair, 0)
        grads = torch.ops.cuflash.attention_backward(out, q, k, v, out, lse, True, None, -1, -1,
                                                     0.0, None, -1, False, 0.25, pair, 0)
        assert all(g.shape == x.shape and g.device == cuda for g, x in zip(grads, (q, k, v)))
        x = torch.empty(80, 2, 16, device=cuda, dtype=torch.float16)
        cu = torch.empty(3, device=cuda, dtype=torch.int32)
        out, lse = torch.ops.cuflash.attention_varlen_forward(
            x, x, x, cu, cu, 40, 40, True, None, -1, -1, 0.0, None, False, 0.25, pair, 0)
        grads = torch.ops.cuflash.attention_varlen_backward(
            out, x, x, x, out, lse, cu, cu, 40, 40, True, None, -1, -1, 0.0, None, False, 0.25,
            pair, 0)
        assert all(g.shape == x.shape and g.device == cuda for g in grads)
    forwards = [seen for name, seen in seeds.seen if "forward" in name]
    assert len(forwards) == len(capture_calls()) + 3
    for seen in forwards:
        assert [(s.shape, s.device) for s in seen] == [((2,), cuda)]


@pytest.mark.parametrize("call", [
    lambda x, cu: ct.flash_attn_func(x, x, x, 0.25, return_attn_probs=True),
    lambda x, cu: ct.flash_attn_varlen_func(x[0], x[0], x[0], cu, cu, 8, 8, 0.25,
                                            return_attn_probs=True),
], ids=["flash_attn_func", "varlen"])
def test_return_attn_probs_is_refused_under_capture(monkeypatch, call):
    """S_dmask reads the inputs and the seed back to the host: under capture the call is refused
    before it draws a seed or runs the forward."""
    monkeypatch.setattr(_ops, "graph_capturing", lambda device: True)
    for name in ("draw_seed", "draw_device_seed", "call_forward", "call_varlen_forward"):
        monkeypatch.setattr(_ops, name, _refuse)
    with pytest.raises(RuntimeError, match="return_attn_probs=True cannot be captured"):
        call(randn(1, 8, 2, 8), torch.tensor([0, 8], dtype=torch.int32))


# ----------------------------------------------------------------------------- packaging

def test_core_import_does_not_import_torch():
    code = "import sys, cuflash; cuflash.attention; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow
def test_train_tiny_lm_example_cpu():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train_tiny_lm
    finally:
        sys.path.pop(0)
    ours, theirs = train_tiny_lm.run(device="cpu", dtype="float32", steps=4, batch=2,
                                     seq_len=32, dim=32, heads=2)
    assert ours[-1] < ours[0]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3


@pytest.mark.parametrize("wrong", [
    dict(q=(1, 2, 8, 8), dtype=torch.float64), dict(k=(1, 3, 8, 8)), dict(causal="False"),
    dict(dropout_p=1.5), dict(mask_size=48),
], ids=["q_dtype", "k_heads", "causal", "dropout_p", "mask"])
@pytest.mark.parametrize("slopes", ["device", "type"])
def test_alibi_slopes_are_checked_where_the_core_checks_them(wrong, slopes):
    """The core checks the ALiBi slopes last, after q, k, v, the options and the masks: a call
    wrong in one of those too names it, as the core does with the same arguments, also where
    the slopes are on another device than q or not a tensor; with the rest right, the slopes
    are refused by name."""
    wrong = dict(wrong)
    dtype = wrong.pop("dtype", torch.float32)
    shapes = dict(q=(1, 2, 8, 8), k=(1, 2, 8, 8))
    shapes.update((name, wrong.pop(name)) for name in ("q", "k") if name in wrong)
    q, k = (randn(*shapes[name]).to(dtype) for name in ("q", "k"))
    if "mask_size" in wrong:
        wrong["block_mask"] = _new_mask("block_mask", wrong.pop("mask_size"))
    good = torch.rand(2)
    given = good.to("meta") if slopes == "device" else good.tolist()
    core_options = dict(wrong, alibi_slopes=good.numpy(), dropout_seed=3)
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention(q.numpy(), k.numpy(), k.numpy(), **core_options)
    assert not str(core.value).startswith("alibi_slopes")
    with pytest.raises(type(core.value)) as adapter:
        ct.attention(q, k, k, alibi_slopes=given, dropout_seed=3, **wrong)
    assert str(adapter.value) == str(core.value)
    x = randn(1, 2, 8, 8)
    expected = ((ValueError, "^q and alibi_slopes must be on one device, got q on cpu and "
                             "alibi_slopes on meta") if slopes == "device" else
                (TypeError, "^alibi_slopes must be a torch.Tensor, got list"))
    for call in (lambda: ct.attention(x, x, x, alibi_slopes=given),
                 lambda: ct.attention(x, x, x, alibi_slopes=given,
                                      block_mask=_new_mask("block_mask", 8))):
        with pytest.raises(expected[0], match=expected[1]):
            call()
    xs = x.transpose(1, 2)
    with pytest.raises(expected[0], match=expected[1]):
        ct.flash_attn_func(xs, xs, xs, alibi_slopes=given)
