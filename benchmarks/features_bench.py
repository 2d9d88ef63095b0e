"""Sliding windows, softcap and ALiBi: cuflash against its own dense time, compiled FlexAttention
and SDPA, in one process on one GPU (bfloat16, D = 128, hidden 2048).

    python benchmarks/features_bench.py [--quick]

Sliding window (Mistral's 4096 keys: window=(4095, 0), causal) at N = 16K and 32K, forward and
forward+backward:
  target 1  time ≤ 1.1 × (band area / causal area) × dense causal time
  target 2  ≥ 1.3× FlexAttention compiled with the same sliding-window mask_mod
  context   SDPA given the equivalent boolean mask
Softcap 30 and ALiBi (non-causal) at N = 4K and 16K (16K tokens per call):
  target 3  ≤ 10% over plain attention
  target 4  ≥ 1.3× FlexAttention with the equivalent score_mod
Times are medians of CUDA-event timings after warm-up; ratios > 1 mean cuflash is faster.
"""

from __future__ import annotations

import argparse

import cupy
import numpy

from _harness import cuflash_step, median_ms, torch_events_ms  # benchmarks/_harness.py

WINDOW = 4096
HEAD_DIM, HIDDEN = 128, 2048


def _tensors(torch, b, h, n, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]


def _torch_step(torch, fn, q, k, v, dout, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def run():
        out = fn(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), dout)
    return run


def _band_area(n, left):
    rows = numpy.arange(n, dtype=numpy.float64)
    return float(numpy.minimum(rows + 1, left + 1).sum())


def _line(name, values):
    print(f"{name:44}" + "".join(f"{v:>14}" for v in values), flush=True)


def sliding_window(torch, flex, create_block_mask, seq_lens):
    print("\n== sliding window 4096 (causal), bf16, D = 128, B = 1, H = 16 (ms)")
    _line("", ["dense causal", "cuflash", "limit 1.1x", "flex", "sdpa+mask", "vs flex"])
    left = WINDOW - 1
    for n in seq_lens:
        q, k, v, dout = _tensors(torch, 1, HIDDEN // HEAD_DIM, n, HEAD_DIM)
        cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, dout))

        def sliding(b, h, qi, ki):
            return (qi >= ki) & (qi - ki <= left)
        block_mask = create_block_mask(sliding, None, None, n, n, device="cuda")
        flex_fn = lambda a, b_, c: flex(a, b_, c, block_mask=block_mask)  # noqa: E731
        rows = torch.arange(n, device="cuda")
        bool_mask = (rows[:, None] >= rows[None, :]) & (rows[:, None] - rows[None, :] <= left)
        sdpa_fn = lambda a, b_, c: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            a, b_, c, attn_mask=bool_mask)
        fraction = _band_area(n, left) / _band_area(n, n)
        for mode in ("fwd", "fwd+bwd"):
            dense = median_ms(cuflash_step(cq, ck, cv, cdo, mode, causal=True), reps=3, batch=10)
            ours = median_ms(cuflash_step(cq, ck, cv, cdo, mode, causal=True, window=(left, 0)), reps=3, batch=10)
            t_flex = torch_events_ms(torch, _torch_step(torch, flex_fn, q, k, v, dout, mode))
            try:
                t_sdpa = torch_events_ms(torch, _torch_step(torch, sdpa_fn, q, k, v, dout, mode), reps=3)
            except RuntimeError as error:  # a full N×N mask can exhaust memory at long N
                t_sdpa = float("nan")
                print(f"  sdpa failed: {str(error)[:120]}")
            limit = 1.1 * fraction * dense
            _line(f"N={n} {mode} (band/causal area {fraction:.3f})",
                  [f"{dense:.3f}", f"{ours:.3f}", f"{limit:.3f} {'ok' if ours <= limit else 'MISS'}",
                   f"{t_flex:.3f}", f"{t_sdpa:.3f}", f"{t_flex / ours:.2f}x"])
        torch.cuda.empty_cache()


def score_mods(torch, flex, seq_lens):
    print("\n== softcap 30 and ALiBi (non-causal), bf16, D = 128, 16K tokens, H = 16 (ms)")
    _line("", ["plain", "cuflash", "overhead", "flex", "vs flex"])
    heads = HIDDEN // HEAD_DIM
    slopes_t = torch.tensor([2 ** (-8 * (i + 1) / heads) for i in range(heads)], device="cuda",
                            dtype=torch.float32)
    slopes = cupy.from_dlpack(slopes_t)

    def softcap_mod(score, b, h, qi, ki):
        return 30.0 * torch.tanh(score / 30.0)

    def alibi_mod(score, b, h, qi, ki):
        return score - slopes_t[h] * (qi - ki).abs()
    cases = (("softcap 30", {"softcap": 30.0}, softcap_mod),
             ("alibi", {"alibi_slopes": slopes}, alibi_mod))
    for n in seq_lens:
        b = 16384 // n
        q, k, v, dout = _tensors(torch, b, heads, n, HEAD_DIM)
        cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, dout))
        for mode in ("fwd", "fwd+bwd"):
            plain = median_ms(cuflash_step(cq, ck, cv, cdo, mode), reps=3, batch=10)
            for name, options, score_mod in cases:
                ours = median_ms(cuflash_step(cq, ck, cv, cdo, mode, **options), reps=3, batch=10)
                flex_fn = lambda a, b_, c, m=score_mod: flex(a, b_, c, score_mod=m)  # noqa: E731
                t_flex = torch_events_ms(torch, _torch_step(torch, flex_fn, q, k, v, dout, mode))
                over = ours / plain - 1
                _line(f"N={n} B={b} {mode} {name}",
                      [f"{plain:.3f}", f"{ours:.3f}", f"{over:+.1%} {'ok' if over <= 0.10 else 'MISS'}",
                       f"{t_flex:.3f}", f"{t_flex / ours:.2f}x"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 16K only")
    args = parser.parse_args()
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compiled graph per (shape, mask or score_mod, grad mode): more than the default limit.
    torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cupy {cupy.__version__}")
    sliding_window(torch, flex, create_block_mask, (16384,) if args.quick else (16384, 32768))
    score_mods(torch, flex, (16384,) if args.quick else (4096, 16384))


if __name__ == "__main__":
    main()
