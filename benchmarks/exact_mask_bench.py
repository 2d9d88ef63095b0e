"""Exact masks (attention's mask=): cuflash against compiled FlexAttention with the equivalent
mask_mod and against cuflash's own block-sparse kernel on the same non-empty blocks, in one
process on one GPU (bfloat16, D = 64 and 128, N = 16K, B = 1, hidden 2048).

    python benchmarks/exact_mask_bench.py [--quick] [--seed S]

Patterns:
  document  16 documents of random lengths packed into N tokens, causal within each
  graph     a clustered random graph adjacency of about 5% density: 32 clusters of N / 32 nodes,
            each linked to itself and 3 random other clusters, a pair of linked clusters joined
            by an edge with probability 0.4 (so the blocks on its links are partial)
Targets (forward and forward+backward):
  target 1  ≥ 1.3× FlexAttention compiled with the same mask_mod (create_block_mask)
  target 2  ≥ 0.9× cuflash block-sparse (block_mask=) on the same non-empty 128 × 128 blocks
  target 3  bitmask memory ≤ 1 bit per pair of the partial tiles
Times are medians of CUDA-event timings after warm-up; ratios > 1 mean the exact mask is faster.
FlexAttention is skipped when torch is missing.
"""

from __future__ import annotations

import argparse

import cupy
import numpy
import scipy.sparse

from _harness import cuflash_step, median_ms, torch_events_ms  # benchmarks/_harness.py
from cuflash.bench.sweeps import random_document_lengths
from cuflash.sparse import ExactMask, document

N = 16384
HIDDEN = 2048
BLOCK = 128  # block size of the block-sparse comparison


# ----------------------------------------------------------------------------- patterns

def clustered_graph(rng, n, clusters=32, links=3, p=0.4):
    """A bool scipy adjacency ``(n, n)``: cluster ``c`` (nodes ``c·n/clusters ...``) is linked
    to itself and ``links`` random other clusters; linked clusters' node pairs are edges with
    probability ``p``."""
    size = n // clusters
    rows, cols = [], []
    for c in range(clusters):
        others = rng.choice(numpy.delete(numpy.arange(clusters), c), size=links, replace=False)
        for d in (c, *others):
            r, k = numpy.nonzero(rng.random((size, size)) < p)
            rows.append(r + c * size)
            cols.append(k + d * size)
    rows, cols = numpy.concatenate(rows), numpy.concatenate(cols)
    data = numpy.ones(rows.size, dtype=bool)
    return scipy.sparse.csr_array((data, (rows, cols)), shape=(n, n))


# ----------------------------------------------------------------------------- timing

def _line(name, values):
    print(f"{name:34}" + "".join(f"{v:>13}" for v in values), flush=True)


def _flex_step(torch, flex, block_mask, q, k, v, dout, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                flex(q, k, v, block_mask=block_mask)
        return run
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def run():
        out = flex(qg, kg, vg, block_mask=block_mask)
        torch.autograd.grad(out, (qg, kg, vg), dout)
    return run


def _bits_report(exact, head_dim):
    """The forward kernel's tiles on Hopper (what the bitmask costs there)."""
    from cuflash.kernels import sm90_forward

    tiles = sm90_forward.default_tiles(head_dim)
    counts = exact.tile_counts(tiles.block_m, tiles.block_n)
    pairs = counts.partial * tiles.block_m * tiles.block_n
    per_pair = 8 * counts.bitmask_bytes / pairs if pairs else 0.0
    verdict = "ok" if per_pair <= 1.0 else "MISS"
    return (f"{counts.describe()}; {per_pair:.2f} bit per pair of the partial tiles "
            f"(target 3: <= 1) {verdict}")


def bench_pattern(name, exact, mask_mod, head_dims, torch, flex, create_block_mask):
    blocks = exact.to_block_mask(BLOCK)
    print(f"\n== {name}: {exact.nnz:,} pairs, density {exact.density:.4f}; block-sparse on "
          f"{blocks.nnz_blocks:,} blocks of {BLOCK} ({100 * blocks.element_density:.1f}% of "
          "dense)")
    flex_mask = None
    if torch is not None:
        flex_mask = create_block_mask(mask_mod, None, None, N, N, device="cuda")
    _line("", ["exact", "block-sparse", "vs blocks", "flex", "vs flex"])
    for d in head_dims:
        heads = HIDDEN // d
        print(f"D = {d}, H = {heads}: {_bits_report(exact, d)}")
        if torch is not None:
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, dout = (torch.randn(1, heads, N, d, device="cuda", dtype=torch.bfloat16,
                                         generator=g) for _ in range(4))
            cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, dout))
        else:
            from cuflash.bench import DTYPES
            rng = cupy.random.default_rng(0)
            cq, ck, cv, cdo = (rng.standard_normal((1, heads, N, d), dtype=cupy.float32)
                               .astype(DTYPES["bfloat16"]) for _ in range(4))
        for mode in ("fwd", "fwd+bwd"):
            ours = median_ms(cuflash_step(cq, ck, cv, cdo, mode, mask=exact), reps=3, batch=10)
            theirs_blocks = median_ms(cuflash_step(cq, ck, cv, cdo, mode, block_mask=blocks), reps=3, batch=10)
            vs_blocks = theirs_blocks / ours
            cells = [f"{ours:.3f}", f"{theirs_blocks:.3f}",
                     f"{vs_blocks:.2f}x {'ok' if vs_blocks >= 0.9 else 'MISS'}"]
            if torch is not None:
                t_flex = torch_events_ms(torch, _flex_step(torch, flex, flex_mask, q, k, v, dout, mode))
                vs_flex = t_flex / ours
                cells += [f"{t_flex:.3f}", f"{vs_flex:.2f}x {'ok' if vs_flex >= 1.3 else 'MISS'}"]
            else:
                cells += ["-", "-"]
            _line(f"{mode} (ms)", cells)
        if torch is not None:
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D = 128 only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        torch._dynamo.config.recompile_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
        versions = f"torch {torch.__version__}"
    except ImportError as error:
        torch = flex = create_block_mask = None
        versions = f"no torch ({error}): FlexAttention skipped"
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"cupy {cupy.__version__}, {versions}")
    rng = numpy.random.default_rng(args.seed)
    head_dims = (128,) if args.quick else (64, 128)

    lengths = random_document_lengths(rng, N)
    doc_exact = ExactMask.from_scipy(document(lengths, causal=True))
    doc_mod = None
    if torch is not None:
        doc_id = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                         torch.as_tensor(lengths, device="cuda"))
        doc_mod = lambda b, h, qi, ki: (doc_id[qi] == doc_id[ki]) & (qi >= ki)  # noqa: E731
    bench_pattern(f"document mask, 16 causal documents (lengths {lengths.min()}..{lengths.max()})",
                  doc_exact, doc_mod, head_dims, torch, flex, create_block_mask)

    graph = clustered_graph(rng, N)
    graph_exact = ExactMask.from_scipy(graph)
    graph_mod = None
    if torch is not None:
        adjacency = torch.as_tensor(graph.toarray(), device="cuda")
        graph_mod = lambda b, h, qi, ki: adjacency[qi, ki]  # noqa: E731
    bench_pattern("clustered random graph", graph_exact, graph_mod, head_dims, torch, flex,
                  create_block_mask)


if __name__ == "__main__":
    main()
