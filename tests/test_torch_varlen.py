"""``cuflash.torch.flash_attn_varlen_func`` on CPU tensors: flash-attn's signature, values and
gradients of every sequence against ``cuflash.torch.flash_attn_func`` on that sequence alone and
against the float64 oracle (the correctness rule of oracle.py), the operators (opcheck, fake
shapes, ``torch.compile``), the refused options and the offset checks. The GPU twin of
``check_varlen`` is in test_torch_gpu.py.
"""

import inspect
import re
import shutil

import numpy as np
import pytest
from oracle import assert_varlen_backward_close, assert_varlen_forward_close

torch = pytest.importorskip("torch")

import cuflash.torch as ct  # noqa: E402
from cuflash import _dropout  # noqa: E402
from cuflash.torch._bridge import to_numpy  # noqa: E402
from test_torch import assert_fakes_refuse_as_the_call_does  # noqa: E402

# flash-attn 2's documented signature (flash_attn/flash_attn_interface.py), in its order.
FLASH_ATTN_VARLEN_SIGNATURE = (
    ("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty),
    ("v", inspect.Parameter.empty), ("cu_seqlens_q", inspect.Parameter.empty),
    ("cu_seqlens_k", inspect.Parameter.empty), ("max_seqlen_q", inspect.Parameter.empty),
    ("max_seqlen_k", inspect.Parameter.empty), ("dropout_p", 0.0), ("softmax_scale", None),
    ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
    ("deterministic", False), ("return_attn_probs", False), ("block_table", None),
)

# flash-attn 2's packed variants (flash_attn/flash_attn_interface.py): the same options from
# dropout_p on, without block_table.
_OPTIONS = FLASH_ATTN_VARLEN_SIGNATURE[7:-1]
FLASH_ATTN_VARLEN_PACKED_SIGNATURES = {
    "flash_attn_varlen_qkvpacked_func": (
        ("qkv", inspect.Parameter.empty), ("cu_seqlens", inspect.Parameter.empty),
        ("max_seqlen", inspect.Parameter.empty), *_OPTIONS),
    "flash_attn_varlen_kvpacked_func": (
        ("q", inspect.Parameter.empty), ("kv", inspect.Parameter.empty),
        *FLASH_ATTN_VARLEN_SIGNATURE[3:7], *_OPTIONS),
}

# Query and key lengths per sequence: unequal within a sequence, and empty on either side.
LENS_Q = [5, 0, 23, 9, 14]
LENS_K = [12, 4, 23, 3, 0]


def offsets(lengths, device="cpu"):
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32,
                        device=device)


def packed(lens_q, lens_k, *, hq=4, hkv=2, d=32, dv=None, dtype=torch.float32, device="cpu"):
    """Packed q, k, v leaves, a dout, and the call's offsets and max lengths."""
    dv = dv or d
    q = torch.randn(sum(lens_q), hq, d).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d).to(dtype)
    v = torch.randn(sum(lens_k), hkv, dv).to(dtype)
    dout = torch.randn(sum(lens_q), hq, dv).to(dtype)
    leaves = [x.to(device).requires_grad_(True) for x in (q, k, v)]
    layout = (offsets(lens_q, device), offsets(lens_k, device), max(lens_q), max(lens_k))
    return leaves, dout.to(device), layout


def check_varlen(dtype, device="cpu", *, lens_q=LENS_Q, lens_k=LENS_K, hq=4, hkv=2, d=32,
                 dv=None, alibi=None, same_as_dense=True, **options):
    """flash_attn_varlen_func's out and (dq, dk, dv): against the oracle of each sequence alone
    (the rule) and, with ``same_as_dense``, bit for bit against flash_attn_func on each sequence
    alone (the NumPy path computes both alike; the GPU's varlen and dense kernels need not).
    ``alibi``: None, ``"heads"`` (Hq,) or ``"sequences"`` (B, Hq) slopes; ``options``:
    flash-attn's keywords."""
    (q, k, v), dout, (cu_q, cu_k, max_q, max_k) = packed(lens_q, lens_k, hq=hq, hkv=hkv, d=d,
                                                         dv=dv, dtype=dtype, device=device)
    slopes = None
    if alibi is not None:
        slopes = (torch.rand((hq,) if alibi == "heads" else (len(lens_q), hq)) * 0.3).to(device)
    out = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes,
                                    **options)
    assert out.shape == (q.shape[0], hq, v.shape[2]) and out.dtype == dtype
    assert out.device == q.device
    grads = torch.autograd.grad(out, (q, k, v), dout)

    host = [to_numpy(x.detach().cpu()) for x in (q, k, v, cu_q, cu_k)]
    core = dict(causal=options.get("causal", False), scale=options.get("softmax_scale"),
                window=options.get("window_size", (-1, -1)), softcap=options.get("softcap", 0.0),
                alibi_slopes=None if slopes is None else slopes.cpu().numpy())
    assert_varlen_forward_close(to_numpy(out.detach().cpu()), None, *host, **core,
                                context=f"{dtype} {options} alibi={alibi}")
    assert_varlen_backward_close([to_numpy(g.cpu()) for g in grads], to_numpy(dout.cpu()),
                                 *host, **core, context=f"{dtype} {options} alibi={alibi}")

    # each sequence alone, through the dense drop-in
    for b in range(len(lens_q) if same_as_dense else 0):
        rq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        if rq.start == rq.stop or rk.start == rk.stop:
            continue
        alone = [x.detach()[rows][None].requires_grad_(True)
                 for x, rows in ((q, rq), (k, rk), (v, rk))]
        one_slopes = slopes if slopes is None or slopes.dim() == 1 else slopes[b:b + 1]
        expected = ct.flash_attn_func(*alone, alibi_slopes=one_slopes, **options)
        expected_grads = torch.autograd.grad(expected, alone, dout[rq][None])
        torch.testing.assert_close(out[rq], expected[0], rtol=0, atol=0)
        for g, e, rows in zip(grads, expected_grads, (rq, rk, rk)):
            torch.testing.assert_close(g[rows], e[0], rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _seed(seed):
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- signature

def test_signature_is_flash_attn():
    parameters = inspect.signature(ct.flash_attn_varlen_func).parameters.values()
    assert tuple((p.name, p.default) for p in parameters) == FLASH_ATTN_VARLEN_SIGNATURE


def test_positional_call_in_flash_attn_order():
    (q, k, v), _, (cu_q, cu_k, max_q, max_k) = packed(LENS_Q, LENS_K)
    out = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, 0.3, True, (7, 0),
                                    0.0, None, True, False, None)
    expected = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=0.3,
                                         causal=True, window_size=(7, 0), deterministic=True)
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- values, grads

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_each_sequence_alone(dtype, causal):
    check_varlen(dtype, causal=causal, softmax_scale=0.2)


def test_gqa_and_value_dim():
    check_varlen(torch.float32, hq=6, hkv=2, d=16, dv=24, causal=True)


@pytest.mark.parametrize("window", [(6, 2), (4, 0), (-1, 3)])
def test_window(window):
    check_varlen(torch.float32, window_size=window)


def test_causal_window_softcap():
    check_varlen(torch.bfloat16, causal=True, window_size=(10, 0), softcap=3.0)


@pytest.mark.parametrize("alibi", ["heads", "sequences"], ids=["(H,)", "(B,H)"])
def test_alibi(alibi):
    check_varlen(torch.float32, alibi=alibi, causal=True)


def test_deterministic_is_repeatable():
    (q, k, v), dout, layout = packed(LENS_Q, LENS_K)
    runs = [torch.autograd.grad(ct.flash_attn_varlen_func(q, k, v, *layout, deterministic=True),
                                (q, k, v), dout) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_noncontiguous_packed_inputs():
    """q, k, v as views of one fused projection ``(total, 3, H, D)``."""
    cu = offsets([7, 20, 5])
    qkv = torch.randn(32, 3, 4, 16, requires_grad=True)
    out = ct.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 20, 20, causal=True)
    expected = ct.flash_attn_varlen_func(*(x.contiguous() for x in qkv.detach().unbind(1)),
                                         cu, cu, 20, 20, causal=True)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_VARLEN_PACKED_SIGNATURES))
def test_packed_variants_have_flash_attn_signatures(name):
    parameters = inspect.signature(getattr(ct, name)).parameters.values()
    assert tuple((p.name, p.default) for p in parameters) == FLASH_ATTN_VARLEN_PACKED_SIGNATURES[name]


def test_qkvpacked_is_the_call_on_its_parts():
    cu = offsets([7, 0, 20, 5])
    qkv = torch.randn(32, 3, 4, 16, requires_grad=True)
    parts = [x.detach().clone().requires_grad_(True) for x in qkv.unbind(1)]
    dout = torch.randn(32, 4, 16)
    options = dict(softmax_scale=0.2, causal=True, window_size=(6, 0), softcap=2.0)
    out = ct.flash_attn_varlen_qkvpacked_func(qkv, cu, 20, **options)
    expected = ct.flash_attn_varlen_func(*parts, cu, cu, 20, 20, **options)
    assert torch.equal(out, expected)
    out.backward(dout)
    expected.backward(dout)
    assert torch.equal(qkv.grad, torch.stack([x.grad for x in parts], 1))


def test_kvpacked_is_the_call_on_its_parts():
    (q, k, v), dout, layout = packed(LENS_Q, LENS_K)
    kv = torch.stack([k.detach(), v.detach()], 1).requires_grad_(True)
    out = ct.flash_attn_varlen_kvpacked_func(q, kv, *layout, causal=True, deterministic=True)
    expected = ct.flash_attn_varlen_func(q, k, v, *layout, causal=True, deterministic=True)
    assert torch.equal(out, expected)
    (dkv,) = torch.autograd.grad(out, kv, dout)
    assert torch.equal(dkv, torch.stack(torch.autograd.grad(expected, (k, v), dout), 1))


@pytest.mark.parametrize("call", ["qkvpacked", "kvpacked"])
def test_packed_variants_check_the_packed_axis_and_refuse_what_varlen_does(call):
    (q, k, v), _, (cu_q, cu_k, max_q, max_k) = packed(LENS_Q, LENS_Q, hkv=4)
    if call == "qkvpacked":
        def run(packed_tensor, **options):
            return ct.flash_attn_varlen_qkvpacked_func(packed_tensor, cu_q, max_q, **options)
        good, bad, name = torch.stack([q, k, v], 1), torch.stack([q, k], 1), "qkv"
    else:
        def run(packed_tensor, **options):
            return ct.flash_attn_varlen_kvpacked_func(q, packed_tensor, cu_q, cu_k, max_q, max_k,
                                                      **options)
        good, bad, name = torch.stack([k, v], 1), torch.stack([k, v, v], 1), "kv"
    with pytest.raises(ValueError, match=rf"{name} must have shape \(total"):
        run(bad)
    with pytest.raises(ValueError, match=rf"{name} must have shape"):
        run(good[None])
    assert run(good, dropout_p=0.1).shape == q.shape
    out, lse, probs = run(good, return_attn_probs=True)
    assert torch.equal(out, run(good)) and lse.shape == (4, q.shape[0])
    assert probs.shape == (len(LENS_Q), 4, max_q, max_k)


@pytest.mark.parametrize("change, error, match", [
    (lambda qkv, cu, n: (qkv, cu.long(), n), TypeError,
     r"^cu_seqlens must have dtype int32 .* got int64$"),
    (lambda qkv, cu, n: (qkv, cu.tolist(), n), TypeError, r"^cu_seqlens must be a torch.Tensor"),
    (lambda qkv, cu, n: (qkv, cu.to("meta"), n), ValueError,
     r"^qkv\[:, 0\] and cu_seqlens must be on one device, got qkv\[:, 0\] on cpu and "
     r"cu_seqlens on meta$"),
    (lambda qkv, cu, n: (qkv, torch.tensor([0, 5, 3, 9], dtype=torch.int32), n), ValueError,
     r"^cu_seqlens must be non-decreasing .* got cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3$"),
    (lambda qkv, cu, n: (qkv, cu[:-1], n), ValueError,
     r"^the last entry of cu_seqlens must equal the rows of qkv\[:, 0\] \(9\), got 8$"),
    (lambda qkv, cu, n: (qkv, cu, n - 1), ValueError,
     r"^max_seqlen must be at least the longest sequence's length: sequence 1 has 5 rows in "
     r"cu_seqlens, max_seqlen is 4$"),
    (lambda qkv, cu, n: (qkv, cu, float(n)), TypeError, r"^max_seqlen must be an int"),
    (lambda qkv, cu, n: (qkv.double(), cu, n), TypeError, r"^qkv\[:, 0\] has dtype float64"),
])
def test_qkvpacked_errors_name_its_own_arguments(change, error, match):
    """flash_attn_varlen_qkvpacked_func's errors name cu_seqlens, max_seqlen and qkv, the
    arguments it takes, not those of the call it makes on qkv's parts."""
    qkv, cu = torch.randn(9, 3, 4, 8), offsets([3, 5, 1])
    with pytest.raises(error, match=match):
        ct.flash_attn_varlen_qkvpacked_func(*change(qkv, cu, 5))


def test_kvpacked_errors_name_kv():
    """flash_attn_varlen_kvpacked_func's errors name the halves of kv, which it takes, not k
    and v."""
    q, cu = torch.randn(9, 4, 8), offsets([3, 5, 1])
    with pytest.raises(ValueError, match=r"q and kv\[:, 0\] must have the same head dimension "
                                         r".* got q \(9, 4, 8\) and kv\[:, 0\] \(9, 2, 4\)$"):
        ct.flash_attn_varlen_kvpacked_func(q, torch.randn(9, 2, 2, 4), cu, cu, 5, 5)
    with pytest.raises(TypeError, match=r"^q and kv\[:, 0\] must have the same dtype, got q: "
                                        r"float32 and kv\[:, 0\]: float16$"):
        ct.flash_attn_varlen_kvpacked_func(q, torch.randn(9, 2, 2, 8).half(), cu, cu, 5, 5)
    with pytest.raises(ValueError, match=r"the rows of kv\[:, 0\] and kv\[:, 1\] \(8\)"):
        ct.flash_attn_varlen_kvpacked_func(q, torch.randn(8, 2, 2, 8), cu, cu, 5, 5)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_kvpacked_checks_q_before_kv_as_the_call_on_the_parts_does(varlen):
    """A kvpacked call whose q and kv both have the wrong number of axes names q, its first
    argument, as the call on q, k and v (flash_attn_func, flash_attn_varlen_func) does."""
    q, kv = torch.randn(9, 4, 8), torch.randn(9, 2, 2, 8)  # for varlen calls
    if varlen:
        cu = offsets([3, 5, 1])
        q, kv = q[None], kv[None]  # an axis too many each
        calls = (lambda: ct.flash_attn_varlen_func(q, kv[:, :, 0], kv[:, :, 1], cu, cu, 5, 5),
                 lambda: ct.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 5, 5))
    else:  # an axis too few each
        calls = (lambda: ct.flash_attn_func(q, kv[:, 0], kv[:, 1]),
                 lambda: ct.flash_attn_kvpacked_func(q, kv))
    errors = []
    for call in calls:
        with pytest.raises(ValueError) as error:
            call()
        errors.append(str(error.value))
    assert errors[0].startswith("q ")
    assert errors[1] == errors[0]


@pytest.mark.parametrize("alibi", [None, "sequences"])
def test_return_attn_probs_gives_each_sequence_s_softmax(alibi):
    """flash-attn's triple for packed sequences: the output is the call's, lse its log-sum-exp
    (Hq, total_q), and S_dmask (B, Hq, max_seqlen_q, max_seqlen_k) holds each sequence's softmax
    matrix in its top left corner (flash_attn_func's S_dmask of the sequence alone, rows of 1
    where the sequence has keys) and zeros elsewhere: its P · V is the output."""
    (q, k, v), _, (cu_q, cu_k, max_q, max_k) = packed(LENS_Q, LENS_K)
    slopes = None if alibi is None else torch.rand(len(LENS_Q), 4) * 0.3
    options = dict(causal=True, window_size=(9, 0), softcap=4.0, alibi_slopes=slopes)
    plain = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    out, lse, probs = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **options,
                                                return_attn_probs=True)
    assert torch.equal(out, plain) and not probs.requires_grad
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    assert probs.shape == (len(LENS_Q), 4, max_q, max_k) and probs.dtype == q.dtype
    for b, (nq, nk) in enumerate(zip(LENS_Q, LENS_K)):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        corner = probs[b, :, :nq, :nk]
        assert not probs[b, :, nq:].any() and not probs[b, :, :, nk:].any()
        if nq == 0 or nk == 0:
            continue
        one = dict(options, alibi_slopes=None if slopes is None else slopes[b:b + 1])
        _, one_lse, alone = ct.flash_attn_func(q[rq][None], k[rk][None], v[rk][None], **one,
                                               return_attn_probs=True)
        torch.testing.assert_close(corner, alone[0], rtol=0, atol=0)
        torch.testing.assert_close(lse[:, rq], one_lse[0], rtol=0, atol=0)
        seen = corner.sum(-1)
        assert torch.allclose(seen[seen > 0], torch.ones_like(seen[seen > 0]))
        by_probs = corner @ v[rk].detach().transpose(0, 1).repeat_interleave(2, dim=0)
        assert torch.allclose(out[rq].detach(), by_probs.transpose(0, 1), atol=1e-5)


# ----------------------------------------------------------------------------- refusals, errors

def paged(page_size, device="cpu", dtype=torch.float32, **case):
    """``test_varlen_pages.paged_case`` as torch tensors (the pages and q leaves), with a dout;
    drawn from the test's seed (torch's, which the ``_seed`` fixture sets), so that a failure
    replays."""
    from test_varlen_pages import paged_case

    rng = np.random.default_rng(torch.initial_seed())
    arrays = paged_case(rng, np, np.float32, LENS_Q, LENS_K, page_size, **case)
    q, k, v, k_pages, v_pages = (torch.from_numpy(x).to(device, dtype) for x in arrays[:5])
    table, cu_q, cu_k = (torch.from_numpy(x).to(device) for x in arrays[5:])
    leaves = [x.requires_grad_(True) for x in (q, k, v, k_pages, v_pages)]
    dout = torch.randn(q.shape[0], q.shape[1], v.shape[2], device=device).to(dtype)
    return leaves, table, (cu_q, cu_k, max(LENS_Q), max(LENS_K)), dout


def test_paged_cases_replay_from_the_seed():
    """The same torch seed gives the same paged case."""
    cases = []
    for _ in range(2):
        torch.manual_seed(5)
        leaves, table, layout, dout = paged(4)
        cases.append([*leaves, table, *layout[:2], dout])
    assert all(torch.equal(a, b) for a, b in zip(*cases))


def pages_gradient(packed_grad, pages, table, lens_k):
    """The gradient of paged keys from the gradient of the packed keys they were gathered into:
    each packed row's gradient added to its page row (a page two sequences share adds both), in
    float32."""
    grad = torch.zeros(pages.shape, dtype=torch.float32, device=pages.device)
    row = 0
    for b, n in enumerate(lens_k):
        for j in range(n):
            grad[table[b, j // pages.shape[1]], j % pages.shape[1]] += packed_grad[row].float()
            row += 1
    return grad


def check_paged(page_size, device="cpu", dtype=torch.float32, *, tolerance=None, **case):
    """flash-attn's paged form: the same output as the packed keys and values, and gradients
    that reach each page row a key was read from (deterministic backward: the packed call's
    bits)."""
    (q, k, v, k_pages, v_pages), table, layout, dout = paged(page_size, device, dtype, **case)
    options = dict(causal=True, deterministic=True)
    out = ct.flash_attn_varlen_func(q, k_pages, v_pages, *layout, block_table=table, **options)
    q2 = q.detach().clone().requires_grad_(True)
    want = ct.flash_attn_varlen_func(q2, k, v, *layout, **options)
    assert torch.equal(out, want)
    dq, dk_pages, dv_pages = torch.autograd.grad(out, (q, k_pages, v_pages), dout)
    dq2, dk, dv = torch.autograd.grad(want, (q2, k, v), dout)
    assert torch.equal(dq, dq2)
    tolerance = tolerance or {}
    torch.testing.assert_close(dk_pages.float(), pages_gradient(dk, k_pages, table, LENS_K),
                               **tolerance)
    torch.testing.assert_close(dv_pages.float(), pages_gradient(dv, v_pages, table, LENS_K),
                               **tolerance)


@pytest.mark.parametrize("page_size", [1, 5])
def test_block_table_reads_the_pages_and_its_gradients_reach_them(page_size):
    """A first page shared by every sequence, as a common prefix is."""
    check_paged(page_size, share_first_page=True)


def test_block_table_under_torch_compile():
    """The gather's host reads are a graph break (fullgraph=True refuses it); the compiled call
    gives the eager one's output and gradients."""
    (q, k, v, k_pages, v_pages), table, layout, dout = paged(3)

    def f(q, k_pages, v_pages):
        return ct.flash_attn_varlen_func(q, k_pages, v_pages, *layout, causal=True,
                                         block_table=table)

    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):  # docs/torch.md
        torch.compile(f, backend="eager", fullgraph=True)(q, k_pages, v_pages)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    expected = f(q, k_pages, v_pages)
    out = compiled(q, k_pages, v_pages)
    assert torch.equal(out, expected)
    for got, want in zip(torch.autograd.grad(out, (q, k_pages, v_pages), dout),
                         torch.autograd.grad(expected, (q, k_pages, v_pages), dout)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, error, message", [
    (dict(block_table=lambda t: t.long()), TypeError, "block_table must have dtype torch.int32"),
    (dict(block_table=lambda t: t[:, :1]), ValueError, "block_table has 1 page per sequence"),
    (dict(block_table=lambda t: t[:-1]), ValueError,
     "cu_seqlens_k must have one offset more than block_table has rows"),
    (dict(k=lambda k: k[:, 0]), ValueError,
     r"k must have shape \(num_blocks, page_block_size, nheads_k, headdim\)"),
    (dict(k=lambda k: k[..., :16]), ValueError,  # the pages as given, not the gathered rows
     r"same head dimension \(last axis\), got q \(\d+, 4, 32\) and k \(\d+, \d+, 2, 16\)"),
    (dict(k=lambda k: k[:, :, :0], v=lambda v: v[:, :, :0]), ValueError,
     r"k must not have an empty axis .* got shape \(\d+, 4, 0, 32\)"),
    (dict(v=lambda v: v[..., :0]), ValueError,
     r"v must not have an empty axis .* got shape \(\d+, 4, 2, 0\)"),
])
def test_block_table_errors_name_the_problem(change, error, message):
    (q, k, v, k_pages, v_pages), table, layout, _ = paged(4)
    args = dict(k=k_pages, v=v_pages, block_table=table)
    args.update({name: f(args[name]) for name, f in change.items()})
    with pytest.raises(error, match=message):
        ct.flash_attn_varlen_func(q, args["k"], args["v"], *layout,
                                  block_table=args["block_table"])


@pytest.mark.parametrize("option", [
    dict(window_size=(-2, 0)), dict(softcap=-1.0), dict(softmax_scale="0.5"),
    dict(causal="False"), dict(deterministic=1), dict(return_attn_probs="False"),
    dict(max_seqlen_q=-1), dict(dropout_p=1.5),
], ids=lambda option: next(iter(option)))
def test_block_table_options_are_refused_before_the_pages_are_read(monkeypatch, option):
    """A paged call refused for an option raises what the call on the packed keys raises, though
    its table lists a page k does not hold, and reads and gathers nothing."""
    from cuflash.torch import _api

    (q, k, v, k_pages, v_pages), table, (cu_q, cu_k, max_q, max_k), _ = paged(4)
    table = table.clone()
    table[0, 0] = k_pages.shape[0]  # no page of k
    options = dict(dict(max_seqlen_q=max_q), **option)
    max_q = options.pop("max_seqlen_q")
    with pytest.raises((TypeError, ValueError)) as packed:
        ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    monkeypatch.setattr(_api, "_page_rows", lambda *args: pytest.fail("pages read"))
    with pytest.raises(type(packed.value)) as paged_call:
        ct.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, max_q, max_k,
                                  block_table=table, **options)
    assert str(paged_call.value) == str(packed.value)


def _decreasing(cu):
    cu = cu.clone()
    cu[2] = cu[3] + 1
    return cu


@pytest.mark.parametrize("change", [
    dict(cu_seqlens_q=lambda cu: cu + 1),
    dict(cu_seqlens_q=lambda cu: torch.cat([cu[:-1], cu[-1:] + 1])),
    dict(cu_seqlens_q=_decreasing), dict(cu_seqlens_q=lambda cu: cu.long()),
    dict(cu_seqlens_q=lambda cu: cu[:-1]), dict(max_seqlen_q=lambda n: n - 1),
    dict(q=lambda q: q.double()),
    dict(alibi_slopes=lambda _: torch.ones(len(LENS_Q) + 1, 4)),
], ids=["first", "last", "decreasing", "dtype", "length", "max_seqlen_q", "q_dtype", "alibi"])
def test_block_table_query_offsets_are_refused_before_the_pages_are_read(monkeypatch, change):
    """The query offsets (and the core's other checks of the packed call) come before the key
    offsets and the table are read: a paged call wrong in them raises what the call on the
    packed keys raises, though its table lists a page k does not hold, and gathers nothing."""
    from cuflash.torch import _api

    (q, k, v, k_pages, v_pages), table, (cu_q, cu_k, max_q, max_k), _ = paged(4)
    table = table.clone()
    table[0, 0] = k_pages.shape[0]  # no page of k
    args = dict(q=q.detach(), cu_seqlens_q=cu_q, max_seqlen_q=max_q, alibi_slopes=None)
    args.update({name: f(args[name]) for name, f in change.items()})
    with pytest.raises((TypeError, ValueError)) as packed_call:
        ct.flash_attn_varlen_func(args["q"], k, v, args["cu_seqlens_q"], cu_k,
                                  args["max_seqlen_q"], max_k,
                                  alibi_slopes=args["alibi_slopes"])
    monkeypatch.setattr(_api, "_page_rows", lambda *args: pytest.fail("pages read"))
    with pytest.raises(type(packed_call.value)) as paged_call:
        ct.flash_attn_varlen_func(args["q"], k_pages, v_pages, args["cu_seqlens_q"], cu_k,
                                  args["max_seqlen_q"], max_k, block_table=table,
                                  alibi_slopes=args["alibi_slopes"])
    assert str(paged_call.value) == str(packed_call.value)


@pytest.mark.parametrize("index", [
    dict(cu_seqlens_k=lambda cu: cu.long()), dict(block_table=lambda table: table.long()),
    dict(block_table=lambda table: table[:-1]), dict(block_table=lambda table: table[0]),
], ids=["cu_seqlens_k_dtype", "table_dtype", "table_rows", "table_shape"])
@pytest.mark.parametrize("wrong", [
    dict(causal="False"), dict(softmax_scale="0.5"), dict(dropout_p=1.5), dict(max_seqlen_q=-1),
    dict(return_attn_probs="False"), dict(cu_seqlens_q=lambda cu: cu.long()),
], ids=lambda wrong: next(iter(wrong)))
def test_block_table_index_arrays_are_checked_after_the_call_s_other_arguments(wrong, index):
    """A paged call wrong in one of the call's other arguments and in cu_seqlens_k's dtype, or
    the table's dtype or shape, raises what the call on packed keys raises for the other
    argument: cuflash.attention_varlen checks the table after everything else, and the packed
    call checks cu_seqlens_k where it checks cu_seqlens_q."""
    (q, k, v, k_pages, v_pages), table, (cu_q, cu_k, max_q, max_k), _ = paged(4)
    args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_table=table, max_seqlen_q=max_q)
    options = {name: x for name, x in wrong.items() if not callable(x)}
    args.update({name: options.pop(name) for name in list(args) if name in options})
    args.update({name: f(args[name]) for name, f in {**wrong, **index}.items() if callable(f)})
    offsets = (args["cu_seqlens_q"], args["cu_seqlens_k"], args["max_seqlen_q"], max_k)
    with pytest.raises((TypeError, ValueError)) as packed_call:
        ct.flash_attn_varlen_func(q, k, v, *offsets, **options)
    with pytest.raises(type(packed_call.value)) as paged_call:
        ct.flash_attn_varlen_func(q, k_pages, v_pages, *offsets, block_table=args["block_table"],
                                  **options)
    assert str(paged_call.value) == str(packed_call.value)


@pytest.mark.parametrize("name", ["cu_seqlens_k", "block_table"])
def test_block_table_index_dtypes_raise_index_dtype_error(name):
    """An int64 cu_seqlens_k or block_table raises cuflash.IndexDtypeError, a ValueError as well
    as a TypeError, as the call without a block_table and the core do (docs/api.md, "Errors")."""
    from cuflash import IndexDtypeError

    (q, k, v, k_pages, v_pages), table, (cu_q, cu_k, max_q, max_k), _ = paged(4)
    args = dict(cu_seqlens_k=cu_k, block_table=table)
    args[name] = args[name].long()
    with pytest.raises(IndexDtypeError, match=f"{name} must have dtype"):
        ct.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, args["cu_seqlens_k"], max_q, max_k,
                                  block_table=args["block_table"])
    if name == "cu_seqlens_k":  # the unpaged call's error for the same offsets
        with pytest.raises(IndexDtypeError, match=f"{name} must have dtype"):
            ct.flash_attn_varlen_func(q, k, v, cu_q, args["cu_seqlens_k"], max_q, max_k)


def test_block_table_is_refused_under_capture(monkeypatch):
    """The gather reads cu_seqlens_k and block_table back to the host: under CUDA-graph capture
    the call is refused before it reads them, as return_attn_probs=True is, rather than a
    capture broken by the copy."""
    from cuflash.torch import _api, _ops

    (q, _, _, k_pages, v_pages), table, layout, _ = paged(4)
    monkeypatch.setattr(_ops, "graph_capturing", lambda device: True)
    monkeypatch.setattr(_api, "_page_rows", lambda *args: pytest.fail("read under capture"))
    with pytest.raises(RuntimeError, match="block_table cannot be captured in a CUDA graph"):
        ct.flash_attn_varlen_func(q, k_pages, v_pages, *layout, block_table=table)


def test_block_table_on_meta_tensors_is_refused_by_name():
    """Meta tensors give the other calls' shapes, but the gather needs the values of
    cu_seqlens_k and block_table, which they do not hold (docs/torch.md, "What is supported")."""
    (q, _, _, k_pages, v_pages), table, (cu_q, cu_k, max_q, max_k), _ = paged(4)
    meta = [x.detach().to("meta") for x in (q, k_pages, v_pages, cu_q, cu_k, table)]
    with pytest.raises(ValueError, match="block_table .* meta tensors"):
        ct.flash_attn_varlen_func(*meta[:5], max_q, max_k, block_table=meta[5])
    out = ct.flash_attn_varlen_func(*(x.to("meta") for x in (q, q, q)), *meta[3:5], max_q, max_q)
    assert out.is_meta and out.shape == q.shape  # the packed call still gives its shapes


def test_block_table_on_fake_tensors_is_refused_by_name():
    """Fake tensors (FakeTensorMode, as torch.export traces) hold no values either: the same
    ValueError as for meta tensors, not torch's error about .numpy() on a tensor subclass."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    (q, _, _, k_pages, v_pages), table, (cu_q, cu_k, max_q, max_k), _ = paged(4)
    real = [x.detach() for x in (q, k_pages, v_pages, cu_q, cu_k, table)]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in real]
        with pytest.raises(ValueError, match="block_table .* fake tensors"):
            ct.flash_attn_varlen_func(*fake[:5], max_q, max_k, block_table=fake[5])


def test_block_table_under_vmap_is_refused_by_name():
    """The gather reads cu_seqlens_k and block_table on the host, which the tensors a torch.func
    transform wraps do not lend: a ValueError naming block_table, as flash_attn_with_kvcache
    gives, not torch's "Cannot access data pointer"."""
    (q, _, _, k_pages, v_pages), table, (cu_q, cu_k, max_q, max_k), _ = paged(4)
    q, k_pages, v_pages = (x.detach() for x in (q, k_pages, v_pages))

    def call(table):
        return ct.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, max_q, max_k,
                                         block_table=table)

    with pytest.raises(ValueError, match=r"^flash_attn_varlen_func with a block_table cannot "
                                         r"run on the tensors of a torch.func transform "
                                         r".*\(block_table\b"):
        torch.func.vmap(call)(torch.stack([table, table]))
    assert torch.equal(torch.func.vmap(lambda x: call(table) + x)(torch.zeros(2))[0], call(table))


def test_dropout_over_packed_sequences_is_each_sequence_s_dense_mask():
    """dropout_p over packed sequences (CPU tensors): the seed comes from torch's generator as for
    flash_attn_func, and sequence b's output and gradients are, bit for bit, those of
    flash_attn_func on batch element b of the sequence repeated b + 1 times, with the same seed;
    the backward reuses the forward's mask. S_dmask negates the dropped entries."""
    (q, k, v), dout, (cu_q, cu_k, max_q, max_k) = packed(LENS_Q, LENS_K)
    options = dict(causal=True, softcap=4.0)
    torch.manual_seed(11)
    out = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, 0.3, **options)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.manual_seed(11)
    again, _, probs = ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, 0.3, **options,
                                                return_attn_probs=True)
    assert torch.equal(again, out)
    assert not torch.equal(out, ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **options))
    for b, (nq, nk) in enumerate(zip(LENS_Q, LENS_K)):
        if nq == 0 or nk == 0:
            continue
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        dense = [x.detach()[rows][None].expand(b + 1, -1, -1, -1).contiguous().requires_grad_(True)
                 for x, rows in ((q, rq), (k, rk), (v, rk))]
        torch.manual_seed(11)
        expected = ct.flash_attn_func(*dense, 0.3, **options)
        torch.testing.assert_close(out[rq], expected[b], rtol=0, atol=0)
        seen = torch.zeros_like(expected)
        seen[b] = dout[rq]
        for g, e, rows in zip(grads, torch.autograd.grad(expected, dense, seen), (rq, rk, rk)):
            torch.testing.assert_close(g[rows], e[b], rtol=0, atol=0)
        kept = probs[b, :, :nq, :nk].clamp(min=0) * _dropout.rescale(0.3)
        by_probs = kept @ v[rk].detach().transpose(0, 1).repeat_interleave(2, dim=0)
        assert torch.allclose(out[rq].detach(), by_probs.transpose(0, 1), atol=1e-5)
        assert (probs[b, :, :nq, :nk] < 0).any()  # some entries dropped
    with pytest.raises(ValueError, match="dropout_p must be"):  # the core's check of p
        ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=1.5)


@pytest.mark.parametrize("wrong", [
    dict(q="q"), dict(k=None), dict(causal="False"), dict(softmax_scale="0.5"),
    dict(window_size=(-2, 0)), dict(softcap=-1.0), dict(deterministic=1),
    dict(return_attn_probs="False"),
], ids=lambda wrong: next(iter(wrong)))
def test_dropout_p_is_checked_where_flash_attn_func_checks_it(wrong):
    """dropout_p is checked after the tensors and the other options, as flash_attn_func (and the
    core) check it: a call wrong in both raises what flash_attn_func raises, naming the other
    argument."""
    (q, k, v), _, (cu_q, cu_k, max_q, max_k) = packed(LENS_Q, LENS_K)
    options = dict(wrong, dropout_p=1.5)
    packed_tensors = [options.pop(name, x) for name, x in (("q", q), ("k", k), ("v", v))]
    dense_tensors = [x[None] if isinstance(x, torch.Tensor) else x for x in packed_tensors]
    with pytest.raises((TypeError, ValueError)) as dense:
        ct.flash_attn_func(*dense_tensors, **options)
    assert "dropout_p" not in str(dense.value)
    with pytest.raises(type(dense.value)) as varlen:
        ct.flash_attn_varlen_func(*packed_tensors, cu_q, cu_k, max_q, max_k, **options)
    assert str(varlen.value) == str(dense.value)


@pytest.mark.parametrize("change, error, match", [
    (lambda cu_q, cu_k: (cu_q.flip(0), cu_k), ValueError, "cu_seqlens_q must start at 0"),
    (lambda cu_q, cu_k: (cu_q, torch.tensor([0, 12, 10, 39, 42, 42], dtype=torch.int32)),
     ValueError, r"cu_seqlens_k must be non-decreasing .* cu_seqlens_k\[1\] = 12 > "),
    (lambda cu_q, cu_k: (cu_q[:-1], cu_k[:-1]), ValueError,
     r"the last entry of cu_seqlens_q must equal the rows of q \(51\), got 37"),
    (lambda cu_q, cu_k: (cu_q.long(), cu_k), TypeError,
     "cu_seqlens_q must have dtype int32 .* got int64"),
    (lambda cu_q, cu_k: (cu_q, cu_k[:-1]), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have the same length"),
])
def test_bad_offsets_name_the_problem(change, error, match):
    (q, k, v), _, (cu_q, cu_k, max_q, max_k) = packed(LENS_Q, LENS_K)
    with pytest.raises(error, match=match):
        ct.flash_attn_varlen_func(q, k, v, *change(cu_q, cu_k), max_q, max_k)


def test_bad_max_seqlen_and_tensors():
    (q, k, v), _, (cu_q, cu_k, max_q, max_k) = packed(LENS_Q, LENS_K)
    with pytest.raises(ValueError, match="max_seqlen_q must be at least the longest sequence's "
                                         "length: sequence 2 has 23 rows"):
        ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, max_k)
    with pytest.raises(TypeError,
                       match=r"max_seqlen_k must be an int, got tensor\(23\) of type torch.Tensor"):
        ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, torch.tensor(max_k))
    with pytest.raises(ValueError, match=r"q must have shape \(total, nheads, headdim\)"):
        ct.flash_attn_varlen_func(q[None], k, v, cu_q, cu_k, max_q, max_k)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a torch.Tensor"):
        ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k.tolist(), max_q, max_k)
    with pytest.raises(ValueError, match="one device"):
        ct.flash_attn_varlen_func(q, k, v, cu_q.to("meta"), cu_k, max_q, max_k)


# ----------------------------------------------------------------------------- operators

def _op_args(dtype=torch.float32):
    (q, k, v), dout, layout = packed(LENS_Q, LENS_K, dtype=dtype)
    return (q, k, v), dout, layout


def test_opcheck_forward():
    (q, k, v), _, layout = _op_args()
    torch.library.opcheck(torch.ops.cuflash.attention_varlen_forward.default,
                          (q, k, v, *layout, True, None, 8, 0, 0.0, torch.rand(4), False))


def test_opcheck_backward():
    (q, k, v), dout, layout = _op_args()
    q, k, v = (x.detach() for x in (q, k, v))
    options = (False, 0.5, -1, -1, 2.0, None, True)
    out, lse = torch.ops.cuflash.attention_varlen_forward(q, k, v, *layout, *options)
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.cuflash.attention_varlen_backward.default,
                          (dout, q, k, v, out, lse, *layout, *options))


def test_opcheck_with_dropout():
    """The operators with their dropout arguments: p, the seed as a CPU int64 scalar, the
    offset."""
    from cuflash.torch import _ops

    (q, k, v), dout, layout = _op_args()
    dropout = (0.25, _ops.seed_tensor(2**63 + 5), 7)
    options = (True, None, -1, -1, 0.0, None, False)
    torch.library.opcheck(torch.ops.cuflash.attention_varlen_forward.default,
                          (q, k, v, *layout, *options, *dropout))
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = torch.ops.cuflash.attention_varlen_forward(q, k, v, *layout, *options, *dropout)
    torch.library.opcheck(torch.ops.cuflash.attention_varlen_backward.default,
                          (dout, q, k, v, out, lse, *layout, *options, *dropout))


def test_fake_shapes_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode
    (q, k, v), dout, layout = packed(LENS_Q, LENS_K, dv=16)
    q, k, v = (x.detach() for x in (q, k, v))
    options = (True, None, -1, -1, 0.0, None, False)
    real = torch.ops.cuflash.attention_varlen_forward(q, k, v, *layout, *options)
    real_grads = torch.ops.cuflash.attention_varlen_backward(dout, q, k, v, *real, *layout,
                                                             *options)
    with FakeTensorMode() as mode:
        fq, fk, fv, fdout, fcq, fck = (mode.from_tensor(x) for x in (q, k, v, dout, *layout[:2]))
        fake = torch.ops.cuflash.attention_varlen_forward(fq, fk, fv, fcq, fck, *layout[2:],
                                                          *options)
        fake_grads = torch.ops.cuflash.attention_varlen_backward(fdout, fq, fk, fv, *fake, fcq,
                                                                 fck, *layout[2:], *options)
    for r, f in zip(real + real_grads, fake + fake_grads):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


# Packed calls the core refuses for their shapes or dtypes: (q, k, v) shapes and the offsets.
_REFUSED_PACKED_CALLS = {
    "head dims": (((8, 4, 16), (8, 4, 32), (8, 4, 16)), torch.tensor([0, 8], dtype=torch.int32)),
    "key and value rows": (((8, 4, 16), (8, 4, 16), (9, 4, 16)),
                           torch.tensor([0, 8], dtype=torch.int32)),
    "query head groups": (((8, 4, 16), (8, 3, 16), (8, 3, 16)),
                          torch.tensor([0, 8], dtype=torch.int32)),
    "offsets dtype": (((8, 4, 16),) * 3, torch.tensor([0, 8], dtype=torch.int64)),
    "offsets shape": (((8, 4, 16),) * 3, torch.tensor([[0, 8]], dtype=torch.int32)),
}


@pytest.mark.parametrize("case", list(_REFUSED_PACKED_CALLS))
def test_fake_implementation_refuses_what_the_call_refuses(case):
    """The varlen operator's fake implementation (meta tensors, FakeTensor, torch.compile's
    trace) applies the core's rules but those of the offsets' values: the same error as the
    call on real tensors, not an output shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes, cu_seqlens = _REFUSED_PACKED_CALLS[case]
    q, k, v = (torch.randn(*shape) for shape in shapes)

    def call(q, k, v, cu_seqlens):
        return ct.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 8, 8)

    with pytest.raises((TypeError, ValueError)) as refused:
        call(q, k, v, cu_seqlens)
    same = dict(expected_exception=type(refused.value),
                match=f"^{re.escape(str(refused.value))}$")
    with pytest.raises(**same):
        call(*(x.to("meta") for x in (q, k, v, cu_seqlens)))
    with FakeTensorMode() as mode, pytest.raises(**same):
        call(*map(mode.from_tensor, (q, k, v, cu_seqlens)))


# Arrays of a packed backward call that the core refuses: which one, and its shape and dtype in
# place of the forward's (q (total_q, 4, 16), out (total_q, 4, 8), lse (4, total_q)).
_TOTAL_Q = 14
_REFUSED_BACKWARD_ARRAYS = {
    "dout shape": ("dout", (_TOTAL_Q, 4, 16), torch.float32),
    "dout dtype": ("dout", (_TOTAL_Q, 4, 8), torch.float16),
    "out shape": ("out", (_TOTAL_Q - 1, 4, 8), torch.float32),
    "out dtype": ("out", (_TOTAL_Q, 4, 8), torch.float64),
    "lse shape": ("lse", (_TOTAL_Q, 4), torch.float32),
    "lse dtype": ("lse", (4, _TOTAL_Q), torch.float16),
    "k head dim": ("k", (_TOTAL_Q, 2, 32), torch.float32),
}


@pytest.mark.parametrize("case", list(_REFUSED_BACKWARD_ARRAYS))
def test_fake_backward_refuses_what_the_call_refuses(case):
    """The varlen backward operator's fake implementation (meta tensors, FakeTensor, opcheck)
    refuses a dout, out or lse of the wrong shape or dtype, or q, k and v that do not pair,
    with the core's error, as the call on real tensors does, rather than giving gradients'
    shapes."""
    name, shape, dtype = _REFUSED_BACKWARD_ARRAYS[case]
    (q, k, v), dout, layout = packed([5, 9], [6, 8], d=16, dv=8)
    q, k, v = (x.detach() for x in (q, k, v))
    options = (False, None, -1, -1, 0.0, None, False)
    out, lse = torch.ops.cuflash.attention_varlen_forward(q, k, v, *layout, *options)
    arrays = dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse, cu_q=layout[0], cu_k=layout[1])
    arrays[name] = torch.randn(*shape).to(dtype)

    def call(arrays):
        return torch.ops.cuflash.attention_varlen_backward(*arrays.values(), *layout[2:],
                                                           *options)

    assert_fakes_refuse_as_the_call_does(call, arrays)

@pytest.mark.parametrize("backend, dynamic", [("eager", None), ("aot_eager", None),
                                              ("aot_eager", True), ("inductor", None)])
def test_compile_fullgraph(backend, dynamic):
    """dynamic=True makes sizes and max_seqlen symbolic from the first call."""
    if backend == "inductor" and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("inductor needs a C compiler")
    slopes = torch.rand(4) * 0.2

    def f(q, k, v, cu_q, cu_k, max_q, max_k):
        return ct.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                         window_size=(8, 0), softcap=3.0, alibi_slopes=slopes)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=dynamic)
    # other lengths on the second call: Dynamo retraces with symbolic sizes and max_seqlen
    for lens_q, lens_k in ((LENS_Q, LENS_K), ([3, 30, 8], [9, 30, 1])):
        (q, k, v), dout, layout = packed(lens_q, lens_k)
        expected = f(q, k, v, *layout)
        expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
        out = compiled(q, k, v, *layout)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrong", [dict(dtype=torch.float64), dict(max_seqlen_q=4),
                                   dict(k_heads=3), dict(paged=True)],
                         ids=["q_dtype", "max_seqlen_q", "k_heads", "paged_q_dtype"])
@pytest.mark.parametrize("given", ["device", "type"])
@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"])
def test_offsets_and_slopes_are_checked_where_the_core_checks_them(name, given, wrong):
    """cuflash.attention_varlen checks q, k and v's dtype before the offsets, and the slopes
    last: a call wrong in another argument too, and in the offsets or the slopes (on another
    device than q, or not a tensor), names the argument the core names when that one is no
    array; the offsets' or the slopes' refusal, in torch terms, where that is theirs."""
    import cuflash
    wrong = dict(wrong)
    paged = wrong.pop("paged", False)
    dtype = wrong.pop("dtype", torch.float64 if paged else torch.float32)
    cu = offsets([3, 5])
    q = torch.randn(8, 4, 16, dtype=dtype)
    k = torch.randn(8, wrong.pop("k_heads", 2), 16, dtype=dtype)
    arguments = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, alibi_slopes=torch.rand(4))
    lengths = (wrong.pop("max_seqlen_q", 5), 5)
    core = {key: x.numpy() for key, x in arguments.items()}
    core[name] = arguments[name].tolist()  # no array: refused where the core checks it
    with pytest.raises((TypeError, ValueError)) as refused:
        cuflash.attention_varlen(q.numpy(), k.numpy(), k.numpy(), core["cu_seqlens_q"],
                                 core["cu_seqlens_k"], *lengths,
                                 alibi_slopes=core["alibi_slopes"])
    arguments[name] = arguments[name].to("meta") if given == "device" else arguments[name].tolist()
    if paged:  # the same keys as two pages of 8: refused as the call on them is
        k = k.view(1, 8, 2, 16).expand(2, 8, 2, 16).contiguous()
        arguments["block_table"] = torch.tensor([[0], [1]], dtype=torch.int32)
    expected = ((ValueError, f"q and {name} must be on one device, got q on cpu and {name} on "
                             f"meta") if given == "device" else
                (TypeError, f"{name} must be a torch.Tensor, got list"))
    with pytest.raises((TypeError, ValueError)) as adapter:
        ct.flash_attn_varlen_func(q, k, k, max_seqlen_q=lengths[0], max_seqlen_k=lengths[1],
                                  **arguments)
    if str(refused.value).startswith(name + " "):
        assert (type(adapter.value), str(adapter.value)) == expected
    else:
        assert (type(adapter.value), str(adapter.value)) == (type(refused.value),
                                                             str(refused.value))
    x = torch.randn(8, 4, 16)
    arguments.pop("block_table", None)
    with pytest.raises(expected[0], match="^" + re.escape(expected[1])):
        ct.flash_attn_varlen_func(x, x[:, :2], x[:, :2], max_seqlen_q=5, max_seqlen_k=5,
                                  **arguments)
