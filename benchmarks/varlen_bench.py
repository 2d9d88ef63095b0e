"""Packed variable-length sequences: cuflash.attention_varlen against cuflash's dense kernels and
torch SDPA on the same documents, in one process on one GPU.

    python benchmarks/varlen_bench.py [--seed 0] [--no-torch]

Problem: bfloat16, D = 128, Hq = Hkv = 16 (hidden 2048), 16384 tokens packed from documents of
random lengths 128–4096 (fixed seed; the last document takes what is left of the 16K, so it may
be shorter than 128), causal and not, forward and forward+backward.

- **Useful FLOPs** of the varlen call: the sum over documents of the dense formula
  (``cuflash.bench.problems.forward_flops`` with B = 1, N = the document's length; halved when
  causal; forward+backward 3.5 times the forward). TFLOP/s = useful FLOPs / time.
- **Dense reference**: ``cuflash.attention`` on a dense batch of the same token count and about
  the same useful FLOPs: every sequence of the effective length ``L = Σ n² / Σ n`` (rounded to a
  multiple of 64), ``B = 16384 // L``; its TFLOP/s uses its own FLOPs. The ratio varlen / dense
  says what packing costs against a batch of equal-length sequences.
- **SDPA**: torch nested jagged tensors (``torch.nested.nested_tensor_from_jagged``, layout
  (B, j, H, D)) with the flash back end when torch runs them; otherwise (the table says so) the
  documents padded to the longest one with a boolean mask (SDPA's default back end choice).
- **Paged keys**: the same forward with k and v in a paged cache (``block_table``; pages of 16
  and 256 keys, shuffled, a few unused), which cuflash gathers into packed rows before the call:
  its time beside the packed call's, and the gather alone (host part included: the offsets and
  the table are read back, so these two are wall times of synchronised calls, medians).
- The varlen calls are timed with ``check_offsets=False``: the offsets are checked once before
  timing, and a per-call check (a device-to-host read, one synchronisation) would time the host.
  The "checked" column times the forward with the check, for the record.

Times are medians of CUDA-event timings after warm-up (``_harness.median_ms``,
``torch_events_ms``); ratios > 1 mean cuflash is faster.
"""

from __future__ import annotations

import argparse

import cupy
import numpy

from _harness import median_ms, torch_events_ms  # benchmarks/_harness.py; puts the repo on sys.path

import cuflash
from cuflash.bench.baselines import to_torch
from cuflash.bench.problems import forward_flops

TOKENS, HEADS, HEAD_DIM = 16384, 16, 128
SHORTEST, LONGEST = 128, 4096
BACKWARD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (docs/design.md)


def document_lengths(seed: int) -> list[int]:
    """Random lengths in [SHORTEST, LONGEST] until TOKENS are used; the last takes the rest."""
    rng = numpy.random.default_rng(seed)
    lengths = []
    while sum(lengths) < TOKENS:
        lengths.append(int(min(rng.integers(SHORTEST, LONGEST + 1), TOKENS - sum(lengths))))
    return lengths


def useful_flops(lengths, causal: bool, mode: str) -> float:
    fwd = sum(forward_flops(1, HEADS, n, n, HEAD_DIM, causal=causal) for n in lengths)
    return fwd * (1 + BACKWARD_FACTOR if mode == "fwd+bwd" else 1)


def dense_shape(lengths) -> tuple[int, int]:
    """(B, L): equal-length sequences with the documents' token count and useful FLOPs."""
    effective = sum(n * n for n in lengths) / sum(lengths)
    length = max(64, int(round(effective / 64)) * 64)
    return max(1, TOKENS // length), length


def randn(rng, shape):
    import ml_dtypes

    return cupy.asarray(rng.standard_normal(shape, dtype=numpy.float32)).astype(ml_dtypes.bfloat16)


def varlen_step(q, k, v, dout, cu, max_len, causal, mode, check):
    def run():
        out, lse = cuflash.attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal,
                                            return_lse=True, check_offsets=check)
        if mode == "fwd+bwd":
            cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, max_len, max_len,
                                              causal=causal, check_offsets=check)
    return run


def dense_step(q, k, v, dout, causal, mode):
    def run():
        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
        if mode == "fwd+bwd":
            cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
    return run


def sdpa_step(torch, q, k, v, dout, cu, lengths, causal, mode):
    """``(run, how)``: SDPA over the documents as nested jagged tensors with the flash back end,
    else padded with a boolean mask."""
    F = torch.nn.functional
    tq, tk, tv, tdo = (to_torch(torch, x) for x in (q, k, v, dout))
    offsets = to_torch(torch, cu).to(torch.int64)
    grad = mode == "fwd+bwd"

    def nested(x):
        x = x.detach().requires_grad_(grad)
        return x, torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2)

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        leaves, nts = zip(*(nested(x) for x in (tq, tk, tv)))
        do_nt = torch.nested.nested_tensor_from_jagged(tdo, offsets).transpose(1, 2)

        def run_nested():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(*nts, is_causal=causal)
                if grad:
                    torch.autograd.grad(out, leaves, do_nt, retain_graph=True)

        run_nested()
        torch.cuda.synchronize()
        return run_nested, "nested jagged, flash"
    except Exception as error:  # older torch, or no flash kernel for this call
        reason = f"{type(error).__name__}"

    b, longest = len(lengths), max(lengths)

    def padded(x):
        out = torch.zeros(b, longest, x.shape[1], x.shape[2], device=x.device, dtype=x.dtype)
        start = 0
        for i, n in enumerate(lengths):
            out[i, :n] = x[start:start + n]
            start += n
        return out.transpose(1, 2).detach().requires_grad_(grad)

    pq, pk, pv, pdo = (padded(x) for x in (tq, tk, tv, tdo))
    pdo = pdo.detach()
    index = torch.arange(longest, device=tq.device)
    valid = index[None, :] < torch.tensor(lengths, device=tq.device)[:, None]  # (B, L) keys
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & (index[None, :] <= index[:, None])[None, None]

    def run_padded():
        out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask)
        if grad:
            torch.autograd.grad(out, (pq, pk, pv), pdo)

    return run_padded, f"padded + bool mask (nested failed: {reason})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the SDPA column")
    args = parser.parse_args()

    lengths = document_lengths(args.seed)
    cu = cupy.asarray(numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(numpy.int32))
    max_len = max(lengths)
    rng = numpy.random.default_rng(args.seed)
    q, k, v, dout = (randn(rng, (TOKENS, HEADS, HEAD_DIM)) for _ in range(4))
    b_dense, n_dense = dense_shape(lengths)
    dq, dk, dv, ddo = (randn(rng, (b_dense, HEADS, n_dense, HEAD_DIM)) for _ in range(4))
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None

    print(f"documents ({len(lengths)}): {lengths}")
    print(f"dense reference: B = {b_dense}, N = {n_dense} (effective length Σn²/Σn)")
    print("\n| mode | causal | varlen TFLOP/s | checked fwd TFLOP/s | dense TFLOP/s | varlen / dense "
          "| SDPA TFLOP/s | varlen / SDPA | SDPA path |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            flops = useful_flops(lengths, causal, mode)
            # One checked call first: the offsets are right, so the timed calls may skip it.
            varlen_step(q, k, v, dout, cu, max_len, causal, mode, True)()
            t_varlen = median_ms(varlen_step(q, k, v, dout, cu, max_len, causal, mode, False))
            checked = "—"
            if mode == "fwd":
                t_checked = median_ms(varlen_step(q, k, v, dout, cu, max_len, causal, mode, True))
                checked = f"{flops / t_checked / 1e9:.0f}"
            dense_flops = forward_flops(b_dense, HEADS, n_dense, n_dense, HEAD_DIM, causal=causal)
            dense_flops *= (1 + BACKWARD_FACTOR) if mode == "fwd+bwd" else 1
            t_dense = median_ms(dense_step(dq, dk, dv, ddo, causal, mode))
            varlen_tf, dense_tf = flops / t_varlen / 1e9, dense_flops / t_dense / 1e9
            sdpa_tf, sdpa_ratio, how = "—", "—", "not run"
            if torch is not None:
                try:
                    run, how = sdpa_step(torch, q, k, v, dout, cu, lengths, causal, mode)
                    t_sdpa = torch_events_ms(torch, run)
                    sdpa_tf = f"{flops / t_sdpa / 1e9:.0f}"
                    sdpa_ratio = f"{t_sdpa / t_varlen:.2f}"
                except Exception as error:
                    how = f"failed: {type(error).__name__}: {str(error)[:80]}"
            print(f"| {mode} | {causal} | {varlen_tf:.0f} | {checked} | {dense_tf:.0f} | "
                  f"{varlen_tf / dense_tf:.2f} | {sdpa_tf} | {sdpa_ratio} | {how} |", flush=True)
    print("\nKeys and values in a paged cache (forward; wall ms of synchronised calls):\n")
    print("| page | causal | packed | paged | packed / paged | gather alone |")
    print("|---|---|---|---|---|---|")
    paged_rows(rng, q, k, v, cu, lengths, (16, 256))


def wall_ms(fn, reps=20) -> float:
    """Median wall time of a call that synchronises with the device, the device idle before it."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(reps):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def paged_rows(rng, q, k, v, cu, lengths, page_sizes):
    """Rows of the paged-keys table: the packed forward, the same with k and v in shuffled pages,
    and the gather alone; ms."""
    from cuflash import _varlen_pages

    max_len = max(lengths)
    for page in page_sizes:
        needed = [-(-n // page) for n in lengths]
        order = rng.permutation(sum(needed) + 8)
        table = numpy.zeros((len(lengths), max(needed)), numpy.int32)
        starts = numpy.concatenate([[0], numpy.cumsum(needed)])
        for b, n in enumerate(needed):
            table[b, :n] = order[starts[b]:starts[b + 1]]
        k_pages, v_pages = (cupy.empty((len(order), page) + x.shape[1:], x.dtype) for x in (k, v))
        rows = cupy.asarray(_varlen_pages.used_rows(cu.get().astype(numpy.int64), table, page))
        for pages, x in ((k_pages, k), (v_pages, v)):  # the packed keys, where the table puts them
            pages.reshape((-1,) + x.shape[1:])[rows] = x
        table = cupy.asarray(table)

        def gather():
            _varlen_pages.gather_pages(q, k_pages, v_pages, cu, cu, (max_len, max_len), table,
                                       True)

        t_gather = wall_ms(gather)
        for causal in (False, True):
            def packed():
                return cuflash.attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=causal)

            def paged():
                return cuflash.attention_varlen(q, k_pages, v_pages, cu, cu, max_len, max_len,
                                                causal=causal, block_table=table)

            assert bool((paged() == packed()).all()), "paged and packed outputs differ"
            t_packed, t_paged = wall_ms(packed), wall_ms(paged)
            print(f"| {page} | {causal} | {t_packed:.3f} | {t_paged:.3f} | "
                  f"{t_packed / t_paged:.2f} | {t_gather:.3f} |", flush=True)


if __name__ == "__main__":
    main()
