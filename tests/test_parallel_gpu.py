"""cuflash.parallel on GPUs.

- On any single GPU: the simulated ring (``LocalRing``) on CuPy arrays, against
  single-GPU ``cuflash.attention`` and the float64 oracle.
- With at least 2 GPUs: real processes, one per GPU, started by
  ``python -m cuflash.parallel.launch`` and joined by NCCL (``NcclComm``): the communicator's
  operations, ``check_sharded`` in processes mode (ring results gathered and compared with one
  GPU and float64), a rank that stops communicating (timeout, not a hang), and ``TorchComm``
  with torch's NCCL back end when torch has CUDA.

Run with ``python -m pytest -m gpu tests/test_parallel_gpu.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from oracle import assert_backward_close, assert_forward_close, random_array

import cuflash
from cuflash.parallel import (LocalRing, ring_attention, ring_attention_backward, shard,
                              ulysses_attention, unshard)

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpus() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001
        return 0


needs_two = pytest.mark.skipif(_gpus() < 2, reason=f"needs 2 GPUs, {_gpus()} visible")


# ----------------------------------------------------------------------------- one GPU

@pytest.mark.parametrize("size, layout, causal, window, dtype", [
    (2, "zigzag", True, (-1, -1), BF16),
    (4, "zigzag", True, (-1, -1), BF16),
    (3, "contiguous", False, (-1, -1), np.dtype(np.float16)),
    (4, "zigzag", False, (300, 100), BF16),
    (2, "contiguous", True, (-1, -1), np.dtype(np.float32)),
])
def test_simulated_ring_on_one_gpu(xp_gpu, size, layout, causal, window, dtype, seed, rng):
    cupy = xp_gpu
    n = 1536
    q = random_array(rng, (1, 8, n, 64), dtype, xp=cupy)
    k = random_array(rng, (1, 2, n, 64), dtype, xp=cupy)  # grouped-query
    v = random_array(rng, (1, 2, n, 64), dtype, xp=cupy)
    dout = random_array(rng, q.shape, dtype, xp=cupy)
    options = dict(causal=causal, window=window)

    def rank(comm, q, k, v, dout):
        out, lse = ring_attention(q, k, v, comm=comm, layout=layout, return_lse=True, **options)
        grads = ring_attention_backward(dout, q, k, v, out, lse, comm=comm, layout=layout,
                                        **options)
        return out, lse, grads

    parts = [[shard(x, r, size, layout) for r in range(size)] for x in (q, k, v, dout)]
    results = LocalRing(size).run(rank, *parts)
    out = unshard([r[0] for r in results], layout)
    lse = unshard([r[1] for r in results], layout, axis=-1)
    grads = tuple(unshard([r[2][i] for r in results], layout) for i in range(3))
    context = f"seed={seed} P={size} {layout} {options} {dtype}"
    assert_forward_close(out, lse, q, k, v, context=context, **options)
    assert_backward_close(grads, dout, q, k, v, context=context, **options)
    ref_out, ref_lse = cuflash.attention(q, k, v, return_lse=True, **options)
    tol = 2e-5 if dtype == np.float32 else 2e-2
    assert float(abs(out.astype(np.float32) - ref_out.astype(np.float32)).max()) <= tol
    seen = cupy.isfinite(ref_lse)
    assert bool((cupy.isfinite(lse) == seen).all())
    assert float(abs(cupy.where(seen, lse - ref_lse, 0)).max()) <= tol


def test_simulated_ulysses_on_one_gpu(xp_gpu, rng):
    cupy = xp_gpu
    q, k, v = (random_array(rng, (1, 4, 1024, 64), BF16, xp=cupy) for _ in range(3))
    parts = [[shard(x, r, 2, "contiguous") for r in range(2)] for x in (q, k, v)]
    results = LocalRing(2).run(
        lambda comm, q, k, v: ulysses_attention(q, k, v, comm=comm, causal=True), *parts)
    out = unshard(results, "contiguous")
    ref = cuflash.attention(q, k, v, causal=True)
    assert float(abs(out.astype(np.float32) - ref.astype(np.float32)).max()) <= 2e-2


@needs_two
def test_simulated_ring_and_ulysses_on_arrays_of_a_gpu_that_is_not_current(xp_gpu, rng):
    """Ring attention made its float32 accumulators (and Ulysses its pieces) on the current
    GPU, not on the arrays' one: arrays of GPU 1 in threads whose current GPU is 0 (as a
    LocalRing's are) mixed devices. The work now runs on the arrays' GPU."""
    cupy = xp_gpu
    with cupy.cuda.Device(1):
        q, k, v, dout = (random_array(rng, (1, 4, 512, 64), BF16, xp=cupy) for _ in range(4))
        ref_out = cuflash.attention(q, k, v, causal=True)
        parts = [[shard(x, r, 2, "zigzag") for r in range(2)] for x in (q, k, v, dout)]

    def rank(comm, q, k, v, dout):
        assert cupy.cuda.runtime.getDevice() == 0  # a new thread's current GPU
        out, lse = ring_attention(q, k, v, comm=comm, causal=True, return_lse=True)
        grads = ring_attention_backward(dout, q, k, v, out, lse, comm=comm, causal=True)
        heads = ulysses_attention(q, k, v, comm=comm, causal=True, layout="zigzag")
        return out, grads, heads

    results = LocalRing(2).run(rank, *parts)
    with cupy.cuda.Device(1):
        for r, (out, grads, heads) in enumerate(results):
            assert out.device.id == heads.device.id == 1
            assert all(g.device.id == 1 for g in grads)
        for got in (unshard([r[0] for r in results], "zigzag"),
                    unshard([r[2] for r in results], "zigzag")):
            difference = abs(got.astype(np.float32) - ref_out.astype(np.float32)).max()
            assert float(difference) <= 2e-2


def test_check_sharded_simulated_on_one_gpu(xp_gpu):
    from cuflash.parallel import check_sharded
    result = check_sharded(ranks=2, device="gpu", mode="simulated", seq_len=4096, heads=4,
                           head_dim=64, rows=128)
    assert result.passed, result.report()


# ----------------------------------------------------------------------------- 2 GPUs, NCCL

def _launch(tmp_path, body, gpus=2, *, timeout=300, comm_timeout=None):
    """Run ``body`` in ``gpus`` processes through the launcher; returns (code, output)."""
    script = tmp_path / "rank_script.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "cuflash.parallel.launch", "--gpus", str(gpus)]
    if comm_timeout is not None:
        command += ["--timeout", str(comm_timeout)]
    result = subprocess.run(command + [str(script)], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    return result.returncode, result.stdout + result.stderr


@needs_two
def test_nccl_comm_operations(tmp_path):
    code, output = _launch(tmp_path, """
        import cupy, numpy as np
        from cuflash.parallel import NcclComm
        comm = NcclComm.from_env()
        r, p = comm.rank, comm.size
        assert cupy.cuda.Device().id == r
        x = cupy.full((3, 5), r + 1, dtype=cupy.float32)
        y = cupy.full((7,), 10 * (r + 1), dtype=cupy.int64)
        got = comm.shift([x, y]).wait()
        left = (r - 1) % p
        assert bool((got[0] == left + 1).all()) and bool((got[1] == 10 * (left + 1)).all())
        parts = comm.all_gather(np.array([r, 2 * r]))
        assert [list(map(int, a)) for a in parts] == [[s, 2 * s] for s in range(p)], parts
        parts = comm.all_gather(cupy.array([r]))
        assert [int(a[0]) for a in parts] == list(range(p))
        moved = comm.all_to_all([cupy.full((4,), 10 * r + j) for j in range(p)])
        assert [int(m[0]) for m in moved] == [10 * s + r for s in range(p)]
        assert float(comm.all_reduce(np.array([1.0]))[0]) == p
        comm.barrier()
        comm.close()
        print("rank", r, "ok")
        """)
    assert code == 0, output
    assert "rank 0 ok" in output and "rank 1 ok" in output


@needs_two
def test_nccl_refusals_and_all_to_all_of_other_shapes_reach_every_rank(tmp_path):
    """Under NCCL a rank that refused its arguments alone left the others waiting in the
    comparison's all-gather until the timeout, and an all_to_all of arrays of other shapes
    left NCCL waiting for bytes that never came: every rank now raises at once, and the
    all-to-all delivers each array whole."""
    code, output = _launch(tmp_path, """
        import cupy
        from cuflash.parallel import NcclComm, ring_attention, ulysses_attention
        comm = NcclComm.from_env()
        r = comm.rank
        moved = comm.all_to_all([cupy.full((r + 1, 2), 10 * r + j, cupy.float32)
                                 for j in range(2)])
        assert [m.shape for m in moved] == [(1, 2), (2, 2)], moved
        assert all(bool((m == 10 * s + r).all()) for s, m in enumerate(moved))
        q = cupy.zeros((1, 2, 64, 64), cupy.float16)
        for call in (ring_attention, ulysses_attention):
            try:
                call(q, q, q, comm=comm, causal="yes" if r == 1 else True)
            except TypeError as error:
                print("rank", r, call.__name__, "refused:", error, flush=True)
            else:
                raise SystemExit(f"rank {r}: {call.__name__} was not refused")
        comm.barrier()
        comm.close()
        print("rank", r, "ok", flush=True)
        """, comm_timeout=60, timeout=240)
    assert code == 0, output
    assert "rank 0 ok" in output and "rank 1 ok" in output
    for name, what in (("ring_attention", "ring attention"),
                       ("ulysses_attention", "ulysses attention")):
        assert (f"rank 0 {name} refused: {what}: rank 1 refused its arguments (TypeError: "
                f"causal must be True or False" in output), output


@needs_two
@pytest.mark.parametrize("options", [
    dict(causal=True, layout="zigzag"),
    dict(causal=False, layout="contiguous", kv_heads=2),
    dict(causal=True, layout="zigzag", window=(1000, -1), dtype="float16"),
    dict(causal=False, layout="zigzag", window=(700, 300), dtype="float32", seq_len=2048),
])
def test_check_sharded_two_gpus(options):
    from cuflash.parallel import check_sharded
    config = dict(ranks=2, device="gpu", mode="processes", seq_len=8192, heads=4,
                  head_dim=64, rows=128, repeats=2, timeout=120)
    config.update(options)
    result = check_sharded(**config)
    print(result.report())
    assert result.passed, result.report()
    assert result.times["ring_forward"] > 0 and result.times["ring_backward"] > 0
    for phase in ("forward", "backward"):
        assert len(result.times[f"ring_{phase}_per_rank"]) == 2
        assert all(t > 0 for t in result.times[f"ring_{phase}_transfers_per_rank"])


@needs_two
def test_a_rank_that_stops_communicating_times_out(tmp_path):
    """Rank 1 leaves after one exchange; rank 0's next wait fails within the timeout (and
    the launcher reports the failure) instead of hanging."""
    code, output = _launch(tmp_path, """
        import sys, cupy
        from cuflash.parallel import NcclComm, CommError
        comm = NcclComm.from_env()
        x = cupy.ones(1024, cupy.float32)
        comm.shift([x]).wait()
        cupy.cuda.Device().synchronize()
        if comm.rank == 1:
            sys.exit(0)
        try:
            comm.shift([x]).wait()
            cupy.cuda.Device().synchronize()
        except CommError as error:
            print("rank 0 failed as expected:", type(error).__name__, error, flush=True)
            sys.exit(7)
        print("rank 0 was not stopped", flush=True)
        """, comm_timeout=10, timeout=240)
    assert code == 7, output
    assert "failed as expected" in output


@needs_two
def test_torch_comm_with_nccl(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    code, output = _launch(tmp_path, """
        import datetime, os, torch, torch.distributed as dist
        import cuflash.torch
        from cuflash.parallel import TorchComm, shard, torch_ring_attention
        rank = int(os.environ["RANK"]); torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
        comm = TorchComm()
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(1, 4, 4096, 64, generator=g).to("cuda", torch.bfloat16)
                       for _ in range(4))
        leaves = [shard(x, rank, 2, "zigzag").clone().requires_grad_() for x in (q, k, v)]
        out = torch_ring_attention(*leaves, comm=comm, causal=True)
        out.backward(shard(do, rank, 2, "zigzag"))
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = cuflash.torch.attention(*full, causal=True)
        ref.backward(do)
        def rel(a, b):  # largest difference relative to the largest value
            return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        err = rel(out, shard(ref, rank, 2, "zigzag"))
        gerr = max(rel(a.grad, shard(b.grad, rank, 2, "zigzag")) for a, b in zip(leaves, full))
        print("rank", rank, "out", err, "grads", gerr, flush=True)
        assert err < 2e-2 and gerr < 2e-2, (err, gerr)
        dist.destroy_process_group()
        """)
    assert code == 0, output
