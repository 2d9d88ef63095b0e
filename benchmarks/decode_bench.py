"""Decode attention against a KV cache: cuflash.attention_with_kvcache (contiguous and paged
cache) next to torch, in one process on one GPU, as effective memory bandwidth.

    python benchmarks/decode_bench.py [--batches 1,8,64] [--caches 4K,32K,128K] [--no-torch]

Problem: bfloat16, Hq = 32, Hkv = 8, D = Dv = 128, one new query per batch row (Sq = 1), every
batch row's cache full (cache_seqlens = cache length L), no append. The paged cache has pages of
256 keys in shuffled order (a random block table).

    effective bandwidth = bytes of K and V read / time = B · L · Hkv · (D + Dv) · 2 B / time

(q, out and lse add under 0.1 %). The ceiling is a device-to-device copy of a 4 GiB buffer
(cudaMemcpyAsync through CuPy), counted as bytes read + bytes written = 2 · 4 GiB / time.

Times are medians of CUDA-event timings of replayed CUDA graphs (GPU time without the host's
per-call work; the cuflash call is captured once, as a decode loop would), after warm-up. Where
torch cannot capture a back end in a graph its eager time is shown, marked "e". Columns:

- cuflash: contiguous cache, and paged; the decode kernel's split count for the contiguous call
  where the decode module reports it (``chosen_num_splits``), else n/a.
- SDPA flash / SDPA cuDNN: torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)
  restricted to one back end (torch.nn.attention.sdpa_kernel), on (B, H, L, D) views of the
  same cache memory.
- torch flash: torch.ops.aten._flash_attention_forward on the (B, L, H, D) cache directly
  (FlashAttention-2 with its split-KV heuristic), and on the paged cache through its
  block_table (varlen form).
- ratios: cuflash contiguous / cuDNN (time ratio, > 1 = cuflash faster), cuflash contiguous as
  % of the copy ceiling, paged / contiguous time.

Points whose caches would take more than 40 % of the free device memory are skipped.
"""

from __future__ import annotations

import argparse
import math

import cupy
import ml_dtypes
import numpy

from _harness import median_ms, short_error, stop_if_broken, to_torch, torch_events_ms, free_pool

import cuflash  # noqa: E402  (after _harness, which puts the repository on sys.path)

HQ, HKV, D = 32, 8, 128
PAGE = 256
BF16 = numpy.dtype(ml_dtypes.bfloat16)
COPY_BYTES = 4 * 2**30


def _size(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


# ----------------------------------------------------------------------------- timing

def copy_ceiling_bytes_per_s() -> float:
    src = cupy.empty(COPY_BYTES, numpy.uint8)
    dst = cupy.empty_like(src)
    src.fill(1)
    ms = median_ms(lambda: dst.data.copy_from_device_async(src.data, COPY_BYTES),
                   warmup=3, reps=20)
    return 2 * COPY_BYTES / (ms / 1e3)  # the buffers go back to the pool on return


def cupy_graph_us(fn) -> float:
    """Median µs of a replayed CuPy stream capture of ``fn`` (run once before capturing)."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        kept = fn()  # the captured call's outputs belong to the graph
        graph = stream.end_capture()
        us = median_ms(graph.launch, warmup=5, reps=15, batch=20) * 1e3
    del kept
    return us


def torch_us(torch, fn) -> tuple[float, str]:
    """``(µs, mark)``: a replayed torch CUDA graph of ``fn``, or eager calls ("e") where the
    capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return torch_events_ms(torch, graph.replay, reps=20, rounds=5) * 1e3, ""
    except Exception:
        torch.cuda.synchronize()
        return torch_events_ms(torch, fn, reps=20, rounds=5) * 1e3, "e"


# ----------------------------------------------------------------------------- inputs

def fill_random(x, rng) -> None:
    """Standard-normal bfloat16 values, a slab of about 256 MiB at a time (no full float32 copy)."""
    flat = x.reshape(-1)
    step = 2**26
    for start in range(0, flat.size, step):
        stop = min(start + step, flat.size)
        flat[start:stop] = rng.standard_normal(stop - start, dtype=cupy.float32).astype(BF16)


def contiguous_cache(rng, b, length):
    k = cupy.empty((b, length, HKV, D), BF16)
    v = cupy.empty_like(k)
    fill_random(k, rng)
    fill_random(v, rng)
    return k, v


def paged_view(k, v, b, length):
    """The same keys as a paged cache: the contiguous buffers cut into pages of PAGE keys, each
    batch row's pages listed in shuffled order (so consecutive keys of a row are not
    neighbours in memory)."""
    pages = b * length // PAGE
    order = numpy.random.default_rng(0).permutation(pages).astype(numpy.int32)
    table = cupy.asarray(order.reshape(b, length // PAGE))
    return k.reshape(pages, PAGE, HKV, D), v.reshape(pages, PAGE, HKV, D), table


def split_count(q, k, v, seqlens) -> str:
    try:
        from cuflash.kernels import decode
        chosen = getattr(decode, "chosen_num_splits", None)
        if chosen is None:
            return "n/a"
        return str(chosen(q, k, v, seqlens))
    except Exception as error:
        return f"n/a ({short_error(error, 60)})"


# ----------------------------------------------------------------------------- one point

def cuflash_us(q, k, v, seqlens, table=None):
    plan = cuflash.kvcache_plan(q, k, v, cache_seqlens=seqlens, block_table=table)
    if plan.route != "decode":
        return None, f"route {plan.route}: {plan.reason}"
    return cupy_graph_us(lambda: cuflash.attention_with_kvcache(
        q, k, v, cache_seqlens=seqlens, block_table=table)), ""


def torch_contiguous(torch, q, k, v, length) -> dict:
    """SDPA flash, SDPA cuDNN and torch's flash kernel on the contiguous cache."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv = (to_torch(torch, x) for x in (q, k, v))  # (B, L, H, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    bq, bk, bv = (t.transpose(1, 2) for t in (tq, tk, tv))  # (B, H, L, D) views
    scale = 1 / math.sqrt(D)
    results = {}
    for name, backend in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        chosen = getattr(SDPBackend, backend)

        def run(chosen=chosen):
            with sdpa_kernel(chosen):
                return sdpa(bq, bk, bv, enable_gqa=True)
        results[name] = _measured(torch, run)
    flash = torch.ops.aten._flash_attention_forward
    results["torch_flash"] = _measured(
        torch, lambda: flash(tq, tk, tv, None, None, 1, length, 0.0, False, False, scale=scale))
    return results


def torch_paged(torch, q, k, v, table, length) -> tuple:
    b = q.shape[0]
    tq = to_torch(torch, q).reshape(b, HQ, D)  # varlen: (total_q, H, D)
    tk, tv, tt = (to_torch(torch, x) for x in (k, v, table))
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=tq.device)
    cu_k = cu_q * length
    flash = torch.ops.aten._flash_attention_forward
    return _measured(torch, lambda: flash(tq, tk, tv, cu_q, cu_k, 1, length, 0.0, False, False,
                                          scale=1 / math.sqrt(D), block_table=tt))


def _measured(torch, fn):
    try:
        fn()
        torch.cuda.synchronize()
        return torch_us(torch, fn)
    except Exception as error:
        torch.cuda.synchronize()
        return None, f"n/a ({short_error(error, 80)})"


def run_point(torch, rng, b, length) -> dict:
    row = {"b": b, "length": length, "bytes": b * length * HKV * 2 * D * 2}
    q = cupy.empty((b, 1, HQ, D), BF16)
    fill_random(q, rng)
    seqlens = cupy.full(b, length, numpy.int32)
    k, v = contiguous_cache(rng, b, length)
    k_pages, v_pages, table = paged_view(k, v, b, length)
    # cuflash first, each result synchronised: a fault is then pinned on the engine that made it.
    row["contiguous"] = cuflash_us(q, k, v, seqlens)
    row["splits"] = split_count(q, k, v, seqlens)
    row["paged"] = cuflash_us(q, k_pages, v_pages, seqlens, table)
    if torch is not None:
        row.update(torch_contiguous(torch, q, k, v, length))
        row["torch_flash_paged"] = torch_paged(torch, q, k_pages, v_pages, table, length)
    del k, v, k_pages, v_pages, table
    free_pool()
    return row


# ----------------------------------------------------------------------------- the table

COLUMNS = (("cuflash contiguous", "contiguous"), ("cuflash paged", "paged"),
           ("SDPA flash", "sdpa_flash"), ("SDPA cuDNN", "sdpa_cudnn"),
           ("torch flash", "torch_flash"), ("torch flash paged", "torch_flash_paged"))


def cell(row, key):
    us, note = row.get(key, (None, "n/a (torch not used)"))
    if us is None:
        return note or "n/a"
    return f"{us:.1f} µs, {row['bytes'] / (us * 1e-6) / 1e12:.2f} TB/s{' e' if note == 'e' else ''}"


def ratio(a, b, fmt="{:.2f}"):
    return fmt.format(a / b) if a and b else "n/a"


def print_table(rows, ceiling) -> None:
    print(f"\ncopy ceiling: {ceiling / 1e12:.2f} TB/s (2 · 4 GiB / time of a device-to-device "
          f"copy)\n")
    head = ["B", "cache", "K+V"] + [name for name, _ in COLUMNS] + [
        "cuflash / cuDNN", "% of copy", "paged / contiguous", "splits"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        contiguous = row["contiguous"][0]
        cudnn = row.get("sdpa_cudnn", (None, ""))[0]
        percent = (f"{100 * row['bytes'] / (contiguous * 1e-6) / ceiling:.0f} %"
                   if contiguous else "n/a")
        cells = [str(row["b"]), f"{row['length'] // 1024}K", f"{row['bytes'] / 1e9:.2f} GB"]
        cells += [cell(row, key) for _, key in COLUMNS]
        cells += [ratio(cudnn, contiguous), percent, ratio(row["paged"][0], contiguous),
                  row["splits"]]
        print("| " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--caches", default="4K,32K,128K")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    torch = None
    if not args.no_torch:
        try:
            import torch
            import torch.nn.attention  # noqa: F401
        except Exception as error:
            print(f"torch not usable ({short_error(error, 120)}): torch columns read n/a")
            torch = None
    device = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(device.id)
    print(f"device: {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}, "
          f"CuPy {cupy.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print(f"bf16, Hq={HQ}, Hkv={HKV}, D={D}, Sq=1, pages of {PAGE} keys (shuffled)")
    ceiling = copy_ceiling_bytes_per_s()
    free_pool()
    rng = cupy.random.default_rng(0)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        for length in (_size(x) for x in args.caches.split(",")):
            kv_bytes = b * length * HKV * 2 * D * 2
            free, _ = cupy.cuda.runtime.memGetInfo()
            free += cupy.get_default_memory_pool().free_bytes()
            if kv_bytes > 0.4 * free:
                print(f"B={b} L={length}: skipped, K+V {kv_bytes / 1e9:.1f} GB > 40 % of "
                      f"{free / 1e9:.0f} GB free")
                continue
            try:
                row = run_point(torch, rng, b, length)
            except Exception as error:
                print(f"B={b} L={length}: FAIL {short_error(error, 300)}", flush=True)
                stop_if_broken(error, f"at B={b} L={length}")
                free_pool()
                continue
            rows.append(row)
            print(f"B={b} L={length}: " + "; ".join(f"{name} {cell(row, key)}"
                                                     for name, key in COLUMNS), flush=True)
    print_table(rows, ceiling)


if __name__ == "__main__":
    main()
