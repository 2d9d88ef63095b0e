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


def test_cache_leftpad_is_passed_on(seed):
    """flash-attn's cache_leftpad: the keys before it are padding, left out of the attention."""
    q, k_cache, v_cache, _, _ = tensors(seed)
    leftpad = torch.tensor([2, 0, 1], dtype=torch.int32)[:q.shape[0]]
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, cache_leftpad=leftpad)
    for row in range(q.shape[0]):
        start = int(leftpad[row])
        alone = flash_attn_with_kvcache(q[row:row + 1], k_cache[row:row + 1, start:],
                                        v_cache[row:row + 1, start:], cache_seqlens=3 - start)
        torch.testing.assert_close(out[row:row + 1], alone, rtol=0, atol=0)
    with pytest.raises(TypeError, match="cache_leftpad must be a torch.Tensor"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, cache_leftpad=[0, 0, 0])


def test_errors_name_the_argument(seed):
    q, k_cache, v_cache, _, _ = tensors(seed)
    with pytest.raises(TypeError, match="k_cache must be a torch.Tensor"):
        flash_attn_with_kvcache(q, k_cache.numpy(), v_cache, cache_seqlens=3)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("value", [[4, 7, 1], (4, 7, 1), "3", 3.0, True,
                                   np.array([4, 7, 1], np.int32)])
def test_cache_seqlens_is_an_int_or_a_tensor(seed, value):
    """As in flash-attn: an int or an int32 tensor (B,); anything else (a list, a float, a NumPy
    array) is refused in torch terms, naming the argument."""
    q, k_cache, v_cache, k, v = tensors(seed)
    with pytest.raises(TypeError, match=r"^cache_seqlens must be an int or an int32 "
                                        r"torch\.Tensor of shape \(3,\)"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=value)
    np.testing.assert_array_equal(k_cache.numpy(), tensors(seed)[1].numpy())  # nothing written


@pytest.mark.parametrize("value", ["3", [4, 7, 1], np.array([4, 7, 1], np.int32)])
@pytest.mark.parametrize("wrong", ["k_cache", "k", "q"])
def test_cache_seqlens_of_another_type_is_checked_where_the_core_checks_it(seed, value, wrong):
    """The core checks cache_seqlens after q, the caches, k and v: a call wrong in one of those
    too names it, as the core does with the same arguments (a NumPy array, which the core takes,
    with its lengths)."""
    q, k_cache, v_cache, k, v = tensors(seed)
    arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    arguments[wrong] = arguments[wrong][..., :8] if wrong == "k" else arguments[wrong][0]
    core_seqlens = np.array([4, 7, 1], np.int32) if isinstance(value, (list, np.ndarray)) else value
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention_with_kvcache(**{name: x.numpy() for name, x in arguments.items()},
                                       cache_seqlens=core_seqlens)
    assert str(core.value).startswith(wrong + " ")
    with pytest.raises(type(core.value)) as adapter:
        flash_attn_with_kvcache(**arguments, cache_seqlens=value)
    assert str(adapter.value) == str(core.value)


@pytest.mark.parametrize("first, second", [("k", "v"), ("v", "k"),
                                           ("rotary_cos", "rotary_sin"),
                                           ("rotary_sin", "rotary_cos")])
def test_pairs_name_the_missing_half(seed, first, second):
    """k / v and rotary_cos / rotary_sin come in pairs: the refusal says which one is given and
    which is missing, in words that fit tensors as well as arrays."""
    q, k_cache, v_cache, k, v = tensors(seed)
    given = {"k": k, "v": v, "rotary_cos": torch.zeros(48, 4), "rotary_sin": torch.zeros(48, 4)}
    arguments = {first: given[first]}
    if first.startswith("rotary"):
        arguments.update(k=k, v=v)
    pair = " and ".join(sorted((first, second), key=list(given).index))
    # Without lengths too when k or v is missing: the refusal names the missing half, not the
    # lengths that an append (of both) needs.
    for lengths in [{"cache_seqlens": 3}] + ([{}] if first in ("k", "v") else []):
        with pytest.raises(ValueError, match=rf"^give {pair} together( or neither)?: {first} is "
                                             rf"given and {second} is None$"):
            flash_attn_with_kvcache(q, k_cache, v_cache, **lengths, **arguments)


def test_seqlens_default_with_malformed_shapes(seed):
    """cache_seqlens=None reads the capacity from the caches' and the table's shapes: shapes
    that have none are refused by the shape checks, naming the argument."""
    q, k_cache, v_cache, _, _ = tensors(seed, s_cache=16)
    table = torch.tensor([[0, 1], [2, 0], [1, 2]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^block_table must have shape \(3, max_pages\), "
                                         r"got \(3,\)"):
        flash_attn_with_kvcache(q, k_cache, v_cache, block_table=table[:, 0])
    with pytest.raises(ValueError, match=r"^block_table must have shape .*, got \(\)"):
        flash_attn_with_kvcache(q, k_cache, v_cache, block_table=table[0, 0])
    with pytest.raises(ValueError, match=r"^k_cache must have 4 dimensions .*, got shape \(16,\)"):
        flash_attn_with_kvcache(q, k_cache[0, :, 0, 0], v_cache)
    assert flash_attn_with_kvcache(q, k_cache, v_cache, block_table=table).shape == (3, 2, 4, 16)


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
@pytest.mark.parametrize("axis", [0, 2])
def test_expanded_caches_refused_for_appends(seed, which, axis):
    """An expanded cache holds several batch rows (or heads) in one slot: appending to it would
    write different keys into that slot, one row reading another's. Refused before anything is
    written, as torch refuses in-place writes to such tensors; reading one is fine."""
    q, k_cache, v_cache, k, v = tensors(seed, b=2, hkv=2)
    shared = {"k_cache": k_cache, "v_cache": v_cache}[which]
    one = shared[:1] if axis == 0 else shared[:, :, :1]
    caches = {"k_cache": k_cache, "v_cache": v_cache,
              which: one.clone().expand(shared.shape)}
    before = caches[which].clone()
    with pytest.raises(ValueError, match=rf"^{which} must not repeat memory along an axis"):
        flash_attn_with_kvcache(q, caches["k_cache"], caches["v_cache"], k, v, cache_seqlens=3)
    torch.testing.assert_close(caches[which], before, rtol=0, atol=0)
    flash_attn_with_kvcache(q, caches["k_cache"], caches["v_cache"], cache_seqlens=3)


def test_appends_count_as_in_place_changes_for_autograd(seed):
    """The appends write the caches behind torch's back (through views): the call bumps their
    version counters, as torch's own in-place operations do, so that a gradient saved from a
    cache before the append is refused by autograd instead of being computed, silently, from
    the appended values. A call that only reads the caches leaves them as they were."""
    q, k_cache, v_cache, k, v = tensors(seed)
    weight = torch.ones_like(k_cache, requires_grad=True)
    saved = (weight * k_cache).sum() + (weight * v_cache).sum()  # saves both caches
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3)
    saved.backward(retain_graph=True)  # nothing written: the saved caches are still valid
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    for cache in (k_cache, v_cache):  # each cache, alone, is seen as changed
        weight = torch.ones_like(cache, requires_grad=True)
        saved = (weight * cache).sum()
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=4)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()


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


@pytest.mark.parametrize("wrong", [
    dict(q="q"), dict(q=torch.zeros(1, 1, 2, 4)), dict(causal="False"), dict(softcap=-1.0),
    dict(num_splits=-1),
], ids=["q_type", "q_head_dim", "causal", "softcap", "num_splits"])
def test_return_softmax_lse_is_checked_where_the_core_checks_return_lse(wrong):
    """return_softmax_lse is checked where cuflash.attention_with_kvcache checks return_lse,
    after q, the caches and the options: a call wrong in both names the other argument, as the
    core does with the same arguments."""
    cache = torch.zeros(1, 16, 2, 8)
    options = dict(dict(q=torch.zeros(1, 1, 2, 8)), **wrong)
    q = options.pop("q")
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention_with_kvcache(q.numpy() if isinstance(q, torch.Tensor) else q,
                                       cache.numpy(), cache.numpy(), cache_seqlens=3,
                                       return_lse="False", **options)
    assert "return_lse" not in str(core.value)
    with pytest.raises(type(core.value)) as call:
        flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3, return_softmax_lse="False",
                                **options)
    assert "return_softmax_lse" not in str(call.value)
    assert str(call.value).split()[0] == str(core.value).split()[0]


# ----------------------------------------------------------------------------- float64 reference

def _rotated(x, cos, sin, positions, interleaved):
    """flash-attn's rotary embedding of x (B, S, H, D) to positions (B, S), in float64."""
    half = cos.shape[1]
    c, s = cos.double()[positions][:, :, None], sin.double()[positions][:, :, None]
    x = x.double().clone()
    if interleaved:
        x0, x1 = x[..., 0:2 * half:2].clone(), x[..., 1:2 * half:2].clone()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = x0 * c - x1 * s, x0 * s + x1 * c
    else:
        x0, x1 = x[..., :half].clone(), x[..., half:2 * half].clone()
        x[..., :half], x[..., half:2 * half] = x0 * c - x1 * s, x0 * s + x1 * c
    return x


def reference_kvcache(q, k_cache, v_cache, k, v, lengths, *, block_table=None, rows=None,
                      scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                      rotary=None):
    """flash_attn_with_kvcache's result in float64, written from its definition: the caches
    after the append, ``out`` (B, Sq, Hq, Dv) and ``lse`` (B, Hq, Sq)."""
    b, sq, hq, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    s_new = 0 if k is None else k.shape[1]
    k_cache, v_cache = k_cache.double().clone(), v_cache.double().clone()
    q = q.double()
    scale = d ** -0.5 if scale is None else scale
    lengths = [int(n) for n in lengths]
    if rotary is not None:
        cos, sin, interleaved = rotary
        new_pos = torch.tensor(lengths)[:, None] + torch.arange(s_new)
        q_pos = torch.tensor(lengths)[:, None] + (
            torch.arange(sq) if causal or window != (-1, -1) else torch.zeros(sq, dtype=torch.long))
        k = _rotated(k, cos, sin, new_pos, interleaved)
        q = _rotated(q, cos, sin, q_pos, interleaved)
    out = torch.zeros(b, sq, hq, dv, dtype=torch.float64)
    lse = torch.full((b, hq, sq), -torch.inf, dtype=torch.float64)
    for row in range(b):
        if block_table is None:
            r = row if rows is None else int(rows[row])
            slot = [(r, p) for p in range(k_cache.shape[1])]
        else:
            page = k_cache.shape[1]
            slot = [(int(block_table[row, p // page]), p % page)
                    for p in range(block_table.shape[1] * page)]
        n = lengths[row]
        for i in range(s_new):
            k_cache[slot[n + i]] = k[row, i].double()
            v_cache[slot[n + i]] = v[row, i].double()
        total = n + s_new
        keys = torch.stack([k_cache[slot[p]] for p in range(total)]) if total else None
        values = torch.stack([v_cache[slot[p]] for p in range(total)]) if total else None
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(sq):
                pos = i + total - sq  # bottom-right aligned
                allowed = [j for j in range(total)
                           if (not causal or j <= pos)
                           and (window[0] < 0 or j >= pos - window[0])
                           and (window[1] < 0 or j <= pos + window[1])]
                if not allowed:
                    continue
                scores = keys[allowed, g] @ q[row, i, h] * scale
                if softcap:
                    scores = softcap * torch.tanh(scores / softcap)
                if alibi is not None:
                    slope = float(alibi[h] if alibi.dim() == 1 else alibi[row, h])
                    scores = scores - slope * (pos - torch.tensor(allowed)).abs()
                lse[row, h, i] = torch.logsumexp(scores, 0)
                out[row, i, h] = torch.softmax(scores, 0) @ values[allowed, g]
    return k_cache, v_cache, out, lse


def _check_against_reference(seed, *, b=3, sq=1, hq=4, hkv=2, d=16, dv=16, s_new=1, pages=None,
                             page_size=16, s_cache=40, lengths, rows=None, rotary_dim=0,
                             interleaved=True, **options):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g)
    cache_rows = pages if pages is not None else (b if rows is None else max(rows) + 1)
    cache_len = page_size if pages is not None else s_cache
    k_cache = torch.randn(cache_rows, cache_len, hkv, d, generator=g)
    v_cache = torch.randn(cache_rows, cache_len, hkv, dv, generator=g)
    k = torch.randn(b, s_new, hkv, d, generator=g) if s_new else None
    v = torch.randn(b, s_new, hkv, dv, generator=g) if s_new else None
    table = None
    if pages is not None:
        table = torch.randperm(pages, generator=g)[:pages - pages % b].view(b, -1).int()
    batch_idx = None if rows is None else torch.tensor(rows, dtype=torch.int32)
    rotary = None
    if rotary_dim:
        capacity = cache_len * (1 if table is None else table.shape[1])
        angles = (torch.arange(capacity + sq, dtype=torch.float64)[:, None]
                  * 10000.0 ** (-torch.arange(0, rotary_dim, 2) / rotary_dim))
        rotary = (angles.cos().float(), angles.sin().float(), interleaved)
    want_k, want_v, want, want_lse = reference_kvcache(
        q, k_cache, v_cache, k, v, lengths, block_table=table, rows=rows,
        scale=options.get("softmax_scale"), causal=options.get("causal", False),
        window=options.get("window_size", (-1, -1)), softcap=options.get("softcap", 0.0),
        alibi=options.get("alibi_slopes"), rotary=rotary)
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v,
        rotary_cos=None if rotary is None else rotary[0],
        rotary_sin=None if rotary is None else rotary[1],
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32), cache_batch_idx=batch_idx,
        block_table=table, rotary_interleaved=interleaved, return_softmax_lse=True, **options)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache.double(), want_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_cache.double(), want_v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", [
    dict(lengths=[0, 7, 39]),                                           # contiguous, one append
    dict(lengths=[5, 0, 20], sq=3, s_new=3, causal=True),               # causal with Nq > 1
    dict(lengths=[4, 30, 11], sq=4, s_new=2, causal=True, hq=6, hkv=1),  # MQA, Sq > S_new
    dict(lengths=[3, 12, 9], rows=[2, 0, 3], s_new=2, sq=2, causal=True),  # cache_batch_idx
    dict(lengths=[17, 40, 2], s_new=0, sq=2, hq=8, hkv=2, dv=8),        # no append, GQA, Dv < D
    dict(lengths=[18, 3, 33], pages=9, s_new=3, sq=3, causal=True),     # paged, appends across pages
    dict(lengths=[31, 16, 0], pages=6, s_new=1, window_size=(5, 0), softcap=3.0),
    dict(lengths=[9, 1, 25], sq=2, s_new=2, window_size=(3, 1), softmax_scale=0.2),
    dict(lengths=[12, 6, 30], sq=2, s_new=1, causal=True,
         alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    dict(lengths=[6, 10, 2], pages=6, sq=2, s_new=2, causal=True, rotary_dim=8),
    dict(lengths=[6, 10, 2], sq=3, s_new=2, rotary_dim=16, interleaved=False),
])
def test_matches_a_float64_reference(seed, config):
    """The result, the lse and the caches after the append, against flash-attn's definition
    written out in float64 (bottom-right aligned masks per row, grouped heads, pages)."""
    _check_against_reference(seed, **config)


def test_meta_tensors_are_refused(seed):
    """No operator, so no fake implementation: meta tensors are refused by name, where the other
    functions give the results' shapes (docs/torch.md, "What is supported")."""
    q, k_cache, v_cache, k, v = (x.to("meta") for x in tensors(seed))
    with pytest.raises(ValueError, match="CUDA and CPU tensors, got a tensor on meta"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=5)


@pytest.mark.parametrize("inputs", ["fake tensors", "real tensors"])
def test_fake_tensor_mode_is_refused_by_name(seed, inputs):
    """No operator, so no fake implementation: under FakeTensorMode (torch.export traces with
    it) the call, which works on the tensors' memory and writes the caches in place, is
    refused by name, before anything is written, rather than failing inside torch
    (docs/torch.md, "KV cache")."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k_cache, v_cache, k, v = tensors(seed)
    caches = k_cache.clone(), v_cache.clone()
    versions = k_cache._version, v_cache._version
    lengths = torch.tensor([0, 7, 40], dtype=torch.int32)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args = (q, k_cache, v_cache, k, v, lengths)
        if inputs == "fake tensors":
            args = tuple(map(mode.from_tensor, args))
        with pytest.raises(ValueError, match="^flash_attn_with_kvcache cannot run on fake "
                                             "tensors .*caches in place"):
            flash_attn_with_kvcache(*args[:5], cache_seqlens=args[5], causal=True)
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
    assert (k_cache._version, v_cache._version) == versions


@pytest.mark.parametrize("transform", ["vmap", "grad", "jvp"])
def test_torch_func_transforms_are_refused_by_name(seed, transform):
    """Under a torch.func transform the tensors it wraps lend no memory to write the caches
    through: the call is refused by name, before anything is written, rather than failing
    inside torch; tensors the transform does not wrap still run."""
    q, k_cache, v_cache, k, v = tensors(seed)
    caches = k_cache.clone(), v_cache.clone()

    def step(q):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=5).sum()

    run = {"vmap": lambda: torch.func.vmap(step)(q[None]),
           "grad": lambda: torch.func.grad(step)(q),
           "jvp": lambda: torch.func.jvp(step, (q,), (q,))}[transform]
    with pytest.raises(ValueError, match="^flash_attn_with_kvcache cannot run on .*torch.func "
                                         "transform"):
        run()
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
    unwrapped = torch.func.vmap(lambda x: step(q) + x)(torch.zeros(2))
    assert torch.equal(unwrapped, step(q).expand(2))


def test_under_compile_it_runs_in_a_graph_break(seed):
    """flash_attn_with_kvcache is no operator: torch.compile runs it eagerly in a graph break
    (the caches written, the result the eager one), and fullgraph=True refuses it
    (docs/torch.md, "torch.compile and block masks")."""
    q, k_cache, v_cache, k, v = tensors(seed)

    def step(q, k_cache, v_cache, k, v):
        return flash_attn_with_kvcache(q * 2, k_cache, v_cache, k, v, cache_seqlens=5,
                                       causal=True) + 1

    caches = k_cache.clone(), v_cache.clone()
    expected = step(q, *caches, k, v)
    out = torch.compile(step, backend="aot_eager")(q, k_cache, v_cache, k, v)
    assert torch.equal(out, expected)
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
    assert torch.equal(k_cache[:, 5], k[:, 0])
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(step, backend="aot_eager", fullgraph=True)(q, k_cache, v_cache, k, v)


def _with_index(seed, name):
    """Arguments of a call that gives ``name`` (an index tensor, the slopes or the rotary
    tables) a valid value."""
    q, k_cache, v_cache, k, v = tensors(seed)
    arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=3)
    if name == "block_table":
        pages_k, pages_v = (cache.reshape(6, 24, 2, 16)[:, :16] for cache in (k_cache, v_cache))
        arguments.update(k_cache=pages_k, v_cache=pages_v,
                         block_table=torch.arange(6, dtype=torch.int32).view(3, 2))
    elif name == "rotary_cos":
        arguments.update(rotary_cos=torch.rand(48, 4), rotary_sin=torch.rand(48, 4))
    else:
        arguments[name] = {"cache_seqlens": torch.tensor([3, 0, 9], dtype=torch.int32),
                           "cache_batch_idx": torch.tensor([2, 0, 1], dtype=torch.int32),
                           "cache_leftpad": torch.zeros(3, dtype=torch.int32),
                           "alibi_slopes": torch.rand(4)}[name]
    return arguments


@pytest.mark.parametrize("wrong", ["device", "type"])
@pytest.mark.parametrize("name", ["cache_seqlens", "cache_batch_idx", "cache_leftpad",
                                  "block_table", "alibi_slopes", "rotary_cos"])
def test_index_tensors_are_checked_where_the_core_checks_them(seed, name, wrong):
    """The core checks q, the caches, k and v before the index arrays, the slopes and the rotary
    tables: a call wrong in q too names q, as the core does with the same arguments; with q
    right, the tensor on another device (or not a tensor) is refused by name."""
    arguments = _with_index(seed, name)
    given = arguments[name]
    arguments[name] = given.to("meta") if wrong == "device" else given.tolist()
    expected = ((ValueError, rf"^q and {name} must be on one device, got q on cpu and {name} "
                             rf"on meta") if wrong == "device" else
                (TypeError, rf"^{name} must be (a torch.Tensor|an int or an int32 torch.Tensor)"))
    with pytest.raises(expected[0], match=expected[1]):
        flash_attn_with_kvcache(**arguments)
    core_arguments = {key: x.numpy() if isinstance(x, torch.Tensor) else x
                      for key, x in _with_index(seed, name).items()}
    core_arguments["q"] = core_arguments["q"][0]
    with pytest.raises((TypeError, ValueError)) as core:
        cuflash.attention_with_kvcache(**core_arguments)
    assert str(core.value).startswith("q ")
    arguments["q"] = arguments["q"][0]
    with pytest.raises(type(core.value)) as adapter:
        flash_attn_with_kvcache(**arguments)
    assert str(adapter.value) == str(core.value)
    np.testing.assert_array_equal(arguments["k_cache"].numpy(),
                                  _with_index(seed, name)["k_cache"].numpy())  # nothing written


def test_cache_seqlens_required_with_k_and_v_where_the_core_checks_it(seed):
    """cache_seqlens=None takes the whole cache, but not with k and v, which it places: refused
    where the core checks cache_seqlens, after q, the caches, k and v."""
    q, k_cache, v_cache, k, v = tensors(seed)
    with pytest.raises(ValueError, match="^cache_seqlens is required when k and v are given"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v)
    with pytest.raises(ValueError) as core:
        cuflash.attention_with_kvcache(q[0].numpy(), k_cache.numpy(), v_cache.numpy(),
                                       k.numpy(), v.numpy(), cache_seqlens=3)
    with pytest.raises(ValueError) as adapter:
        flash_attn_with_kvcache(q[0], k_cache, v_cache, k, v)
    assert str(adapter.value) == str(core.value)
