"""cuflash.torch on CUDA tensors: values, zero copy, torch's stream and allocator, CUDA graphs,
torch.compile, attention dropout and a short training run. Skipped without torch or a CUDA device.

Run: ``python -m pytest -m gpu tests/test_torch_gpu.py``.
"""

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from test_torch import (DTYPE_IDS, DTYPES, TinyAttention, _flash_attn_dropout,  # noqa: E402
                        check_against_reference, needs_core, randn)
from test_torch_varlen import check_paged, check_varlen  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")]

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


@pytest.fixture(autouse=True)
def _seed(seed):
    torch.manual_seed(seed)


def cuda(*shape, dtype=torch.float16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


@pytest.fixture
def record_core(monkeypatch):
    """Record what the core receives on the road through CuPy views: the CuPy arrays, CuPy's
    current stream, and what it returns. The operators take that road for a signature's first
    call (``_calls.prepared_forward`` / ``prepared_backward``, recorded as ``attention`` /
    ``attention_backward`` calls) and for calls their cache does not serve (``cuflash.attention``
    / ``attention_backward``); the cache is emptied first, so every signature starts there."""
    import cupy
    from cuflash import _calls
    from cuflash.torch import _cached
    _cached.clear()
    calls = []

    def record(name, args, kwargs, result):
        calls.append(dict(name=name, args=args, kwargs=kwargs, result=result,
                          stream=cupy.cuda.get_current_stream().ptr))

    def wrap(name):
        original = getattr(cuflash, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            record(name, args, kwargs, result)
            return result
        monkeypatch.setattr(cuflash, name, wrapper)

    wrap("attention")
    wrap("attention_backward")
    prepared_forward, prepared_backward = _calls.prepared_forward, _calls.prepared_backward

    def forward(q, k, v, out, options):
        result, lse, entry = prepared_forward(q, k, v, out, options)
        record("attention", (q, k, v), dict(options, out=out), (result, lse))
        return result, lse, entry

    def backward(dout, q, k, v, out, lse, options, grads):
        result, entry = prepared_backward(dout, q, k, v, out, lse, options, grads)
        dq, dk, dv = grads
        record("attention_backward", (dout, q, k, v, out, lse), dict(options, dq=dq, dk=dk, dv=dv),
               result)
        return result, entry

    monkeypatch.setattr(_calls, "prepared_forward", forward)
    monkeypatch.setattr(_calls, "prepared_backward", backward)
    return calls


@pytest.fixture
def record_launches(monkeypatch):
    """Record every kernel launch of the core, on either road: its pointers and the stream it
    ran on (``KernelLaunch.__call__``, which every prepared and validated launch ends in)."""
    from cuflash.kernels import _launch
    launches = []
    original = _launch.KernelLaunch.__call__

    def wrapper(self, pointers, stream=None):
        launches.append(dict(pointers=tuple(pointers),
                             stream=_launch.current_stream() if stream is None else stream))
        return original(self, pointers, stream)
    monkeypatch.setattr(_launch.KernelLaunch, "__call__", wrapper)
    return launches


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 96])
def test_matches_sdpa_cuda(dtype, causal, d):
    q, k, v = randn(2, 4, 300, d), randn(2, 2, 300, d), randn(2, 2, 300, d)
    check_against_reference(dtype, q, k, v, lambda *x: ct.attention(*x, causal=causal),
                            device="cuda", causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_flash_attn_func_cuda(dtype):
    q, k, v = randn(2, 200, 8, 64), randn(2, 260, 2, 64), randn(2, 260, 2, 64)
    check_against_reference(
        dtype, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        lambda *x: ct.flash_attn_func(*(t.transpose(1, 2) for t in x),
                                      causal=True).transpose(1, 2),
        device="cuda", causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=True, window_size=(70, 0),
                                                             softcap=5.0, alibi="sequences")],
                         ids=["causal", "options"])
def test_flash_attn_varlen_func_cuda(dtype, options):
    """test_torch_varlen.check_varlen on CUDA tensors (the GPU's varlen kernels, offsets not
    read back): every sequence against the oracle of that sequence alone."""
    check_varlen(dtype, "cuda", lens_q=[130, 0, 257, 64, 1], lens_k=[300, 17, 257, 5, 0], hq=8,
                 hkv=2, d=64, same_as_dense=False, **options)


@pytest.mark.parametrize("page_size", [3, 16])
def test_flash_attn_varlen_func_block_table_cuda(page_size):
    """flash-attn's paged keys and values on CUDA tensors (bfloat16): the packed call's output and
    dQ bit for bit, and the pages' gradients to the dtype's rounding (a shared first page adds
    two sequences' gradients)."""
    check_paged(page_size, "cuda", torch.bfloat16, tolerance=dict(rtol=2e-2, atol=2e-2), d=64,
                share_first_page=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_flash_attn_varlen_func_dropout_cuda(dtype):
    """Dropout over packed sequences on CUDA tensors: with the same torch seed, the kernels drop
    what the CPU path drops (the outputs and gradients agree to the dtype's rounding, where a
    different mask would move them by the dropped probabilities), the backward with the
    forward's mask."""
    from test_torch_varlen import packed

    (q, k, v), dout, layout = packed([130, 0, 257, 64, 1], [300, 17, 257, 5, 0], hq=8, hkv=2,
                                     d=64, dtype=dtype)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [x.detach().to(device).requires_grad_(True) for x in (q, k, v)]
        cu_q, cu_k = (x.to(device) for x in layout[:2])
        torch.manual_seed(5)
        out = ct.flash_attn_varlen_func(*leaves, cu_q, cu_k, *layout[2:], 0.2, causal=True)
        results.append([out, *torch.autograd.grad(out, leaves, dout.to(device))])
    for name, cpu, gpu in zip(("out", "dq", "dk", "dv"), *results):
        scale = float(cpu.detach().abs().max())
        torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=0, atol=2e-2 * scale,
                                   msg=name)


def test_sdpa_matches_torch_cuda():
    q, k, v = cuda(2, 8, 500, 64), cuda(2, 8, 500, 64), cuda(2, 8, 500, 64)
    out = ct.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out.float() - expected.float()).abs().max() < 1e-2


@needs_core("window")
@needs_core("softcap")
@needs_core("alibi_slopes")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["float16", "bfloat16", "float32"])
def test_options_cuda(dtype):
    q, k, v = randn(2, 4, 300, 64) * 2, randn(2, 2, 350, 64), randn(2, 2, 350, 64)
    slopes = torch.rand(4, device="cuda") * 0.1
    check_against_reference(
        dtype, q, k, v,
        lambda *x: ct.attention(*x, causal=True, window=(100, 0), softcap=5.0,
                                alibi_slopes=slopes),
        device="cuda", causal=True, window=(100, 0), softcap=5.0, alibi_slopes=slopes.cpu())


def test_block_mask_cuda():
    import numpy as np
    from cuflash.sparse import BlockMask
    layout = np.tril(np.ones((4, 4), dtype=bool))
    layout[2, 0] = False
    mask = BlockMask.from_dense(layout, block_size=128)
    q, k, v = cuda(1, 4, 512, 64), cuda(1, 4, 512, 64), cuda(1, 4, 512, 64)
    out = ct.attention(q, k, v, block_mask=mask)
    import cupy
    expected = cuflash.attention(*(cupy.from_dlpack(x) for x in (q, k, v)), block_mask=mask)
    assert torch.equal(out.cpu(), torch.from_numpy(cupy.asnumpy(expected)))


def test_deterministic_gradients_are_bitwise_repeatable():
    q, k, v = (cuda(2, 8, 1000, 96).requires_grad_() for _ in range(3))
    dout = cuda(2, 8, 1000, 96)
    runs = []
    for _ in range(3):
        runs.append(torch.autograd.grad(ct.attention(q, k, v, deterministic=True), (q, k, v),
                                        dout))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


# ----------------------------------------------------------------------------- zero copy

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["float16", "bfloat16", "float32"])
def test_zero_copy_flash_attn_layout(record_core, dtype):
    qkv = cuda(2, 300, 3, 4, 64, dtype=dtype).requires_grad_()
    q, k, v = qkv.unbind(2)
    out = ct.flash_attn_func(q, k, v, causal=True)
    fwd = record_core[-1]
    cq, ck, cv = fwd["args"]
    # the core read the very memory of q, k, v: (B, H, S, D) views of the packed tensor
    for tensor, array in ((q, cq), (k, ck), (v, cv)):
        assert array.data.ptr == tensor.data_ptr()
        assert array.strides == tuple(s * tensor.element_size()
                                      for s in tensor.transpose(1, 2).stride())
    # and wrote the result in place into the tensor returned, a contiguous (B, S, H, D)
    assert fwd["kwargs"]["out"].data.ptr == out.data_ptr() and out.is_contiguous()
    # the log-sum-exp the core returned is the tensor saved for the backward (no copy)
    lse = fwd["result"][1]
    out.backward(torch.ones_like(out))
    bwd = record_core[-1]
    assert bwd["args"][5].data.ptr == lse.data.ptr
    assert bwd["args"][1].data.ptr == q.data_ptr()
    assert qkv.grad is not None and torch.isfinite(qkv.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64,
                                   torch.uint8], ids=str)
def test_cupy_views_share_memory_shape_and_strides(dtype):
    """``to_cupy`` of contiguous, sliced, transposed and empty tensors: the same pointer, shape,
    strides and values (dtypes without a direct view go through DLPack)."""
    import cupy
    from cuflash.torch import _bridge

    base = (torch.arange(2 * 3 * 40 * 8, device="cuda") % 251).to(dtype).view(2, 3, 40, 8)
    views = [base, base[:, 1:, 5:37:2, :6], base.transpose(1, 2), base[:, :, :0]]
    with _bridge.cuda_scope(base.device):
        for t in views:
            a = _bridge.to_cupy(t)
            assert a.data.ptr == t.data_ptr() and a.shape == tuple(t.shape)
            assert a.strides == tuple(s * t.element_size() for s in t.stride())
            host = cupy.asnumpy(a)
            expected = t.cpu()
            if dtype == torch.bfloat16:
                expected = expected.view(torch.int16).numpy().view(host.dtype)
            else:
                expected = expected.numpy()
            assert (host == expected).all()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_allocations_come_back_as_views_of_their_buffers(dtype):
    """``to_torch`` of arrays CuPy allocated through torch (any scope's allocator): sliced,
    transposed and empty views keep their pointer, shape, strides and values, and the tensor
    keeps the memory alive after CuPy lets go of it; CuPy's own arrays come back through DLPack,
    still without a copy."""
    import cupy
    from cuflash.torch import _bridge

    device = torch.device("cuda", torch.cuda.current_device())
    with _bridge.cuda_scope(device):
        a = cupy.arange(4 * 6, dtype=dtype).reshape(4, 6)
    foreign = cupy.arange(10, dtype=dtype)  # CuPy's pool, outside any scope
    with _bridge.cuda_scope(device) as allocator:
        for view in (a, a[1:, ::2], a.T, a[:0], foreign[3:]):
            t = allocator.to_torch(view)
            assert t.shape == view.shape and t.dtype == _bridge.torch_dtype(view.dtype)
            assert t.stride() == tuple(s // view.itemsize for s in view.strides)
            if view.size:
                assert t.data_ptr() == view.data.ptr
            assert (t.cpu().numpy() == cupy.asnumpy(view)).all()
        kept = allocator.to_torch(cupy.full((1000,), 7, dtype=dtype)[::3])
        others = [cupy.full((1000,), -1, dtype=dtype) for _ in range(8)]  # may reuse freed memory
    torch.cuda.synchronize()
    assert (kept == 7).all() and len(others) == 8


def test_zero_copy_gradients(record_core):
    q, k, v = (cuda(2, 4, 256, 64).requires_grad_() for _ in range(3))
    dq, dk, dv = torch.autograd.grad(ct.attention(q, k, v), (q, k, v), cuda(2, 4, 256, 64))
    core_grads = record_core[-1]["result"]
    for tensor, array in zip((dq, dk, dv), core_grads):
        assert tensor.data_ptr() == array.data.ptr


def test_memory_comes_from_torch():
    """Nothing is allocated from CuPy's pool; torch's allocator sees the outputs and scratch, and
    no copy of an input."""
    import cupy
    pool = cupy.get_default_memory_pool()
    b, h, n, d = 4, 16, 4096, 64                        # 32 MiB per float16 tensor
    q, k, v, dout = (cuda(b, h, n, d) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    ct.attention(q, k, v).backward(dout)                  # compile the kernels first
    for x in (q, k, v):
        x.grad = None
    pool.free_all_blocks()
    pool_before = pool.total_bytes()
    tensor_bytes = q.numel() * q.element_size()
    lse_bytes = b * h * n * 4

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ct.attention(q, k, v)
    torch.cuda.synchronize()
    forward_peak = torch.cuda.max_memory_allocated() - base
    assert tensor_bytes + lse_bytes <= forward_peak <= tensor_bytes + lse_bytes + 8 * MIB

    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(dout)
    torch.cuda.synchronize()
    backward_peak = torch.cuda.max_memory_allocated() - base
    grads = 3 * tensor_bytes
    scratch = q.numel() * 4 + 2 * b * h * (n + 128) * 4  # float32 dq accumulator, lse2, delta
    assert grads <= backward_peak <= grads + scratch + 16 * MIB
    assert pool.total_bytes() == pool_before


# ----------------------------------------------------------------------------- streams

def test_runs_on_torch_current_stream(record_core, record_launches):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q, k, v = (cuda(2, 8, 2048, 64).requires_grad_() for _ in range(3))
        for _ in range(2):  # the core's road, then the operators' cache
            out = ct.attention(q, k, v, causal=True)
            out.backward(torch.ones_like(out))
        assert record_core[0]["stream"] == side.cuda_stream
        assert record_core[1]["stream"] == side.cuda_stream
        assert len(record_core) == 2 and len(record_launches) > 2
        assert all(launch["stream"] == side.cuda_stream for launch in record_launches)
    torch.cuda.current_stream().wait_stream(side)
    launched = len(record_launches)
    expected = ct.attention(q.detach(), k.detach(), v.detach(), causal=True)
    assert len(record_core) == 2 and len(record_launches) == launched + 1  # served by the cache
    assert record_launches[-1]["stream"] == torch.cuda.current_stream().cuda_stream
    assert torch.equal(out, expected)


def test_default_stream_is_followed(record_core, record_launches):
    q = cuda(1, 2, 128, 64)
    for _ in range(2):
        ct.attention(q, q, q)
        assert record_launches[-1]["stream"] == torch.cuda.current_stream().cuda_stream
    assert record_core[-1]["stream"] == torch.cuda.current_stream().cuda_stream


# ----------------------------------------------------------------------------- CUDA graphs

def test_cuda_graph_capture_forward():
    static = [cuda(2, 8, 1024, 64) for _ in range(3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):                                # warm up: compile, upload
            ct.attention(*static, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = ct.attention(*static, causal=True, return_lse=True)
    for _ in range(2):
        fresh = [cuda(2, 8, 1024, 64) for _ in range(3)]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        out, lse = ct.attention(*fresh, causal=True, return_lse=True)
        assert torch.equal(static_out, out) and torch.equal(static_lse, lse)


def test_cuda_graph_make_graphed_callables_forward_backward():
    torch.manual_seed(0)
    model = TinyAttention("flash_attn").cuda().half()
    eager_model = TinyAttention("flash_attn").cuda().half()
    eager_model.load_state_dict(model.state_dict())
    x = torch.randn(4, 256, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    for _ in range(2):
        data = torch.randn_like(x).requires_grad_()
        data_eager = data.detach().clone().requires_grad_()
        out = graphed(data)
        out.float().square().sum().backward()
        expected = eager_model(data_eager)
        expected.float().square().sum().backward()
        assert torch.equal(out, expected)
        # dq may be accumulated with atomics (head dim 8 runs the portable kernels)
        assert torch.allclose(data.grad, data_eager.grad, rtol=1e-3, atol=1e-3)
        for p, e in zip(model.parameters(), eager_model.parameters()):
            assert torch.allclose(p.grad, e.grad, rtol=1e-3, atol=1e-3)
            p.grad = e.grad = None


def _recorded_device_draws(monkeypatch):
    """The (seed, offset) pairs that ``_ops.draw_device_seed`` draws, kept, so that a test reads
    what a replay drew into one (held here, its memory goes to no later allocation)."""
    from cuflash.torch import _ops

    drawn, draw = [], _ops.draw_device_seed

    def recording(device, offset=0):
        drawn.append(draw(device, offset))
        return drawn[-1]

    monkeypatch.setattr(_ops, "draw_device_seed", recording)
    return drawn


def _pair_values(pair):
    """The (seed, offset) a pair holds, as the kernels read them (uint64)."""
    return tuple(x % 2**64 for x in pair.tolist())


def _core_dropout_step(q, k, v, dout, p, seed, offset):
    """(out, dq, dk, dv) of the core itself on CuPy views of flash-attn-layout ``(B, S, H, D)``
    tensors, causal and deterministic, with a CuPy seed array holding ``(seed, offset)``: the
    eager call a captured one must equal. Out and gradients are written into tensors laid out as
    the operators lay out theirs."""
    import cupy

    def view(x):  # (B, H, S, D) over (B, S, H, D) memory, as flash_attn_func hands the core
        return cupy.from_dlpack(x.detach()).transpose(0, 2, 1, 3)

    seed_array = cupy.array([seed, offset], dtype=cupy.uint64)
    results = [torch.empty_like(x) for x in (q, q, k, v)]
    out, dq, dk, dv = map(view, results)
    dropout = dict(causal=True, dropout_p=p, dropout_seed=seed_array)
    _, lse = cuflash.attention(view(q), view(k), view(v), return_lse=True, out=out, **dropout)
    cuflash.attention_backward(view(dout), view(q), view(k), view(v), out, lse, dq=dq, dk=dk,
                               dv=dv, deterministic=True, **dropout)
    cupy.cuda.get_current_stream().synchronize()
    return results


def test_cuda_graph_dropout_draws_a_new_mask_per_replay(monkeypatch):
    """flash_attn_func with dropout, captured with its backward by torch.cuda.graph: the seed is
    drawn on the device by torch's CUDA generator, so each replay applies a new mask, and each
    replay's out and gradients are bit for bit the core's (CuPy) given the (seed, offset) that
    replay drew, read back after it. The capture leaves torch's CPU generator alone; outside
    it, the seed still comes from there."""
    from cuflash.torch import _ops

    p = 0.2
    q, k, v = (cuda(2, 256, 4, 64).requires_grad_() for _ in range(3))
    dout = cuda(2, 256, 4, 64)

    def step():
        out = ct.flash_attn_func(q, k, v, p, causal=True, deterministic=True)
        return [out, *torch.autograd.grad(out, (q, k, v), dout)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: compile (eager calls, seeds from the CPU)
            step()
        _ops.draw_device_seed(q.device)  # and the draw's own kernels
    torch.cuda.current_stream().wait_stream(side)
    drawn = _recorded_device_draws(monkeypatch)
    cpu_state = torch.get_rng_state()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    assert torch.equal(torch.get_rng_state(), cpu_state)
    (pair,) = drawn
    assert pair.shape == (2,) and pair.dtype == torch.int64 and pair.device == q.device

    replays = []
    for _ in range(2):
        graph.replay()
        seed, offset = _pair_values(pair)
        assert seed < 2**63 - 1 and offset == 0
        replays.append(([x.clone() for x in static], seed))
    assert replays[0][1] != replays[1][1]
    assert not torch.equal(replays[0][0][0], replays[1][0][0])  # a new mask
    for results, seed in replays:
        for name, got, want in zip(("out", "dq", "dk", "dv"), results,
                                   _core_dropout_step(q, k, v, dout, p, seed, 0)):
            assert torch.equal(got, want), name

    torch.manual_seed(9)  # outside the capture: as before
    eager = step()
    torch.manual_seed(9)
    expected = _core_dropout_step(q, k, v, dout, p, int(_ops.draw_seed()), 0)
    for name, got, want in zip(("out", "dq", "dk", "dv"), eager, expected):
        assert torch.equal(got, want), name
    assert len(drawn) == 1


def test_make_graphed_callables_dropout_backward_reads_the_forward_s_pair(monkeypatch):
    """make_graphed_callables captures the forward and the backward as two graphs: the backward
    graph reads the pair that the forward graph's replay drew (saved by the autograd context),
    so each call's gradients are the core's with the mask of its out, and each call draws a new
    one."""
    from cuflash.torch import _ops

    p = 0.2

    def f(q, k, v):
        return ct.flash_attn_func(q, k, v, p, causal=True, deterministic=True)

    sample = [cuda(2, 256, 4, 64).requires_grad_() for _ in range(3)]
    _ops.draw_device_seed(sample[0].device)  # warm up the draw's kernels
    drawn = _recorded_device_draws(monkeypatch)
    graphed = torch.cuda.make_graphed_callables(f, tuple(sample))
    (pair,) = drawn  # the warm-up iterations ran outside the capture
    seeds = []
    for _ in range(2):
        inputs = [cuda(2, 256, 4, 64).requires_grad_() for _ in range(3)]
        dout = cuda(2, 256, 4, 64)
        out = graphed(*inputs)
        seed, offset = _pair_values(pair)
        grads = torch.autograd.grad(out, inputs, dout)
        expected = _core_dropout_step(*inputs, dout, p, seed, offset)
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
            assert torch.equal(got, want), name
        seeds.append(seed)
    assert seeds[0] != seeds[1]


# ----------------------------------------------------------------------------- the operators' cache

CACHED_CASES = {
    "bf16-d64-causal": (torch.bfloat16, (2, 4, 300, 64), (2, 4, 300, 64), dict(causal=True)),
    "f16-d128-window-softcap": (torch.float16, (1, 3, 257, 128), (1, 3, 257, 128),
                                dict(window=(70, 20), softcap=10.0)),
    "bf16-d96-gqa-nq-ne-nk": (torch.bfloat16, (2, 8, 200, 96), (2, 2, 333, 96), dict(causal=True)),
    "bf16-d32": (torch.bfloat16, (3, 2, 150, 32), (3, 2, 150, 32), dict(scale=0.3)),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("case", CACHED_CASES)
def test_cached_calls_meet_the_oracle(case, deterministic):
    """A signature's second call is served by the operators' cache (torch's pointers, stream and
    allocations, no CuPy views) and meets the float64 oracle like the first."""
    from cuflash.torch import _cached
    dtype, q_shape, kv_shape, options = CACHED_CASES[case]
    _cached.clear()
    call = lambda q, k, v: ct.attention(q, k, v, deterministic=deterministic, **options)  # noqa: E731
    for served in (False, True):
        before = _cached.stats()
        q, k, v = (randn(*shape) for shape in (q_shape, kv_shape, kv_shape))
        check_against_reference(dtype, q, k, v, call, device="cuda", **options)
        after = _cached.stats()
        assert after["hits"] - before["hits"] == (2 if served else 0)
        assert after["builds"] - before["builds"] == (0 if served else 2)


def _poison_torch_memory(*tensors):
    """Hand NaN-filled blocks of these tensors' sizes back to torch's caching allocator, so that
    the next allocations of those sizes likely start as NaN."""
    filled = [torch.full_like(t, float("nan")) for t in tensors]
    del filled


@pytest.mark.parametrize("mask_kind", ["block", "exact", "none"])
def test_cached_calls_equal_the_core_road_with_masks(mask_kind):
    """With block-sparse and exact masks on strided (B, S, H, D) inputs, and through
    flash_attn_func (its output laid out (B, S, H, D)), the cache's calls give the very bits of
    the core's road, written into memory that held NaN."""
    import numpy as np
    from cuflash.sparse import BlockMask, ExactMask
    from cuflash.torch import _cached
    n = 384
    rng = np.random.default_rng(0)
    if mask_kind == "block":
        layout = np.tril(rng.random((3, 3)) < 0.7) | np.eye(3, dtype=bool)
        options = dict(block_mask=BlockMask.from_dense(layout, block_size=128))
    elif mask_kind == "exact":
        options = dict(mask=ExactMask.from_dense((rng.random((n, n)) < 0.2) | np.eye(n, dtype=bool)))
    else:
        options = dict(causal=True)
    qkv = cuda(2, n, 3, 4, 64, dtype=torch.bfloat16).requires_grad_()
    dout = cuda(2, n, 4, 64, dtype=torch.bfloat16)

    def call(q, k, v):
        if mask_kind == "none":
            return ct.flash_attn_func(q, k, v, deterministic=True, **options)
        heads_first = (x.transpose(1, 2) for x in (q, k, v))
        return ct.attention(*heads_first, deterministic=True, **options).transpose(1, 2)

    runs = []
    _cached.clear()
    for served in (False, True, True):
        before = _cached.stats()["hits"]
        if runs:
            _poison_torch_memory(dout, qkv, qkv)
        out = call(*qkv.unbind(2))
        grad, = torch.autograd.grad(out, qkv, dout)
        assert _cached.stats()["hits"] - before == (2 if served else 0)
        runs.append((out, grad))
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])
        assert not out.isnan().any() and not grad.isnan().any()


def test_calls_the_cache_does_not_serve(monkeypatch):
    """ALiBi slopes, dropout and float32 (which the core does not cache) take the core's road
    every time; a change of the kernel switches builds a new entry."""
    from cuflash import kernels
    from cuflash.torch import _cached
    q, k, v = (cuda(1, 4, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    slopes = torch.linspace(0.1, 0.5, 4, device="cuda")
    _cached.clear()
    before = _cached.stats()
    for _ in range(2):
        ct.attention(q, k, v, alibi_slopes=slopes)
        ct.attention(q, k, v, dropout_p=0.1, dropout_seed=3)
        ct.attention(q.float(), k.float(), v.float())
    after = _cached.stats()
    assert after["hits"] == before["hits"]
    assert after["builds"] == before["builds"] + 1 and after["entries"] == 1  # float32, uncached
    first = ct.attention(q, k, v, causal=True)
    builds = _cached.stats()["builds"]
    monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "1")
    other = ct.attention(q, k, v, causal=True)
    assert _cached.stats()["builds"] == builds + 1
    monkeypatch.delenv(kernels.DISABLE_HOPPER_ENV)
    assert torch.allclose(first.float(), other.float(), atol=2e-2)
    hits = _cached.stats()["hits"]
    assert torch.equal(ct.attention(q, k, v, causal=True), first)
    assert _cached.stats()["hits"] == hits + 1


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("api", ["attention", "flash_attn", "sdpa"])
def test_compile_fullgraph_cuda(backend, api):
    model = TinyAttention(api).cuda()
    x = torch.randn(2, 128, 32, device="cuda")
    # float32 inputs run the float32 kernels; compare compiled and eager
    expected = model(x)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    out.square().sum().backward()
    assert torch.allclose(out, expected, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_dropout_cuda_against_float64_with_the_same_mask(dtype):
    q, k, v = randn(2, 4, 300, 64), randn(2, 2, 350, 64), randn(2, 2, 350, 64)
    drop_seed = 2**63 + 12345
    check_against_reference(
        dtype, q, k, v,
        lambda *x: ct.attention(*x, causal=True, dropout_p=0.17, dropout_seed=drop_seed,
                                dropout_offset=5),
        device="cuda", causal=True, dropout=(0.17, drop_seed, 5))


def test_return_attn_probs_on_cuda_tensors():
    """S_dmask of a CUDA call: on q's device, in q's dtype, its signs the mask the kernels
    applied (its kept part times the rescale, applied to v, is the kernels' output)."""
    from cuflash import _dropout

    q, k, v = (cuda(2, 150, 4, 64) for _ in range(3))
    out, lse, probs = ct.flash_attn_func(q, k, v, 0.25, causal=True, return_attn_probs=True)
    assert probs.device == q.device and probs.dtype == q.dtype and probs.shape == (2, 4, 150, 150)
    kept = probs.float().clamp(min=0) * _dropout.rescale(0.25)
    expected = (kept @ v.float().transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(out.float(), expected, atol=2e-2)
    assert lse.shape == (2, 4, 150) and lse.dtype == torch.float32


def test_dropout_cuda_seed_from_torch_generator():
    """flash_attn_func without a seed draws it from torch's CPU generator: after the same
    torch.manual_seed it equals the explicit call with that seed (deterministic gradients, so
    bit for bit)."""
    from cuflash.torch import _ops

    q, k, v = (cuda(2, 200, 4, 64).requires_grad_() for _ in range(3))
    torch.manual_seed(9)
    out = ct.flash_attn_func(q, k, v, 0.1, causal=True, deterministic=True)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    torch.manual_seed(9)
    drop_seed = int(_ops.draw_seed())
    expected = ct.attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=True,
                            dropout_p=0.1, dropout_seed=drop_seed,
                            deterministic=True).transpose(1, 2)
    assert torch.equal(out, expected)
    for g, e in zip(grads, torch.autograd.grad(expected.float().square().sum(), (q, k, v))):
        assert torch.equal(g, e)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dropout_cuda_compile_fullgraph(backend):
    """The CPU seed tensor next to CUDA tensors compiles without graph breaks; with inductor's
    fallback_random the compiled call draws eager's seed."""
    from torch._inductor import config as inductor_config

    q, k, v = (cuda(2, 128, 4, 64).requires_grad_() for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(_flash_attn_dropout, backend=backend, fullgraph=True)
    results = []
    with inductor_config.patch(fallback_random=True):
        for f in (compiled, _flash_attn_dropout):
            torch.manual_seed(21)
            results.append(f(q, k, v))
    assert torch.equal(*results)


# ----------------------------------------------------------------------------- training

def _example():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import train_tiny_lm
    finally:
        sys.path.pop(0)
    return train_tiny_lm


def test_train_tiny_lm_matches_sdpa():
    ours, theirs = _example().run(device="cuda", dtype="bfloat16", steps=50)
    assert ours[-1] < 0.6 * ours[0], ours
    assert ours[0] == pytest.approx(math.log(64), abs=0.5)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst <= 0.1, list(zip(ours, theirs))


@pytest.mark.slow
def test_train_tiny_lm_compiled():
    ours, theirs = _example().run(device="cuda", dtype="bfloat16", steps=20, compile=True)
    assert ours[-1] < 0.8 * ours[0], ours
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 0.1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_call_the_kernel_choice_refuses_registers_no_mask(compiled):
    """A block mask of 4 x 4 blocks passes the core's checks, but no GPU kernel's tiles divide
    its blocks: the call is refused by the kernel choice, after the mask was registered for it,
    and takes it out again. Compiled, the refusal comes when the graph runs: the graph holds
    the handle its trace was accepted with, so the mask stays."""
    from cuflash.torch import _ops
    from test_torch import _new_mask
    mask = _new_mask("block_mask", 64)
    q = cuda(1, 2, 64, 16)
    registered = len(_ops._masks)
    call = lambda q: ct.attention(q, q, q, block_mask=mask)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="no GPU kernel runs this forward pass"):
        call(q)
    assert _ops.is_registered(mask) == compiled
    assert len(_ops._masks) == registered + compiled
    torch._dynamo.reset()


def test_index_tensors_and_slopes_on_the_cpu_are_refused_by_name():
    """A CPU tensor beside CUDA q, k and v (slopes, offsets, cache lengths: a common slip) is
    refused naming it, where the core checks it (the core's checks run on stand-ins of the
    CUDA tensors); with q's dtype wrong too, q is named, as the core names it."""
    q = cuda(1, 2, 64, 16)
    slopes = torch.rand(2)
    message = "^q and {0} must be on one device, got q on cuda:0 and {0} on cpu"
    with pytest.raises(ValueError, match=message.format("alibi_slopes")):
        ct.attention(q, q, q, alibi_slopes=slopes)
    with pytest.raises(TypeError, match="^q has dtype float64"):
        ct.attention(q.double(), q.double(), q.double(), alibi_slopes=slopes)
    packed = cuda(64, 2, 16)
    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match=message.format("cu_seqlens_q")):
        ct.flash_attn_varlen_func(packed, packed, packed, cu, cu.cuda(), 34, 34)
    with pytest.raises(TypeError, match="^q has dtype float64"):
        ct.flash_attn_varlen_func(packed.double(), packed.double(), packed.double(), cu,
                                  cu.cuda(), 34, 34)
    cache = cuda(1, 64, 2, 16)
    with pytest.raises(ValueError, match=message.format("cache_seqlens")):
        ct.flash_attn_with_kvcache(q.transpose(1, 2), cache, cache,
                                   cache_seqlens=torch.tensor([3], dtype=torch.int32))
