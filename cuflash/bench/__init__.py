"""Measuring attention: devices, timers, peak memory, and the benchmark sweeps.

``cuflash bench`` and ``benchmarks/bench_attention.py`` are thin over this package; ``cuflash
check`` and ``cuflash memory`` use its devices. The protocol is the one in docs/design.md:

- FLOPs as in the FlashAttention papers (:mod:`cuflash.bench.problems`).
- GPU times come from CUDA events around each run, after warm-up runs; the median is reported.
- torch's ``scaled_dot_product_attention`` (flash and cuDNN back ends) and compiled FlexAttention
  run side by side in the same process, on the same data handed over through DLPack
  (:mod:`cuflash.bench.baselines`). torch is imported only when asked for.

Modules: ``devices`` (CPU and GPU: timers, peak memory, free memory), ``problems`` (FLOPs, the
dense grid, inputs), ``baselines`` (torch), ``sweeps`` (the timed sweeps), ``tables`` (text
output), ``estimate`` (time and memory a request needs, before it runs).
"""

from cuflash.bench.devices import (CpuDevice, GpuDevice, Unavailable, device_properties,
                                   format_bytes, select_device)
from cuflash.bench.problems import (BACKWARD_FLOP_FACTOR, DTYPES, SPARSE_DENSITIES,
                                    SPARSE_HEAD_DIM, SPARSE_HEADS, SPARSE_SEQ_LEN, Inputs,
                                    Problem, dense_problems, forward_flops)
from cuflash.bench.sweeps import (BASELINES, IMPLEMENTATIONS, SPARSE_IMPLEMENTATIONS,
                                  random_block_layout, run_dense, run_sparse, sparse_masks)
from cuflash.bench.tables import format_dense_table, format_sparse_table

__all__ = [
    "BACKWARD_FLOP_FACTOR", "BASELINES", "DTYPES", "IMPLEMENTATIONS", "SPARSE_DENSITIES",
    "SPARSE_HEAD_DIM", "SPARSE_HEADS", "SPARSE_IMPLEMENTATIONS", "SPARSE_SEQ_LEN", "CpuDevice",
    "GpuDevice", "Inputs", "Problem", "Unavailable", "dense_problems", "device_properties",
    "format_bytes", "format_dense_table", "format_sparse_table", "forward_flops",
    "random_block_layout", "run_dense", "run_sparse", "select_device", "sparse_masks",
]
