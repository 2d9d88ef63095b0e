"""Does compute-sanitizer's racecheck see the ordering an mbarrier gives?

The warp-specialised Hopper backward (flash_bwd_sm90.cu, flash_bwd_sm90_dkdv_ws) hands each
query tile's lse2 and Delta rows (bulk copies) and scratch row (a plain store) from a producer
thread to the consumers through mbarriers: the producer waits on the stage's "empty" barrier
before it writes, the consumers wait on its "full" barrier before they read. racecheck reports
hazards between those writes and reads. This probe runs the same hand-over, with the same
helpers (csrc/arch/sm90_tma.cuh), in a kernel small enough to reason about, one case per
process:

  mbarrier    plain st.shared by the producer, arrive; consumers wait, read, arrive on
              "empty"; the producer waits on it and writes again. Ordered (PTX memory model:
              arrive releases, a completed wait acquires).
  bulk        the same with cp.async.bulk copies completing the "full" barrier's transaction
              count, as the kernel loads lse2 and Delta. Ordered.
  syncthreads the same hand-over through __syncthreads. Ordered; racecheck models it.
  unordered   consumers read without waiting: a real race, to show that racecheck reports one.

Run each case under the sanitizer:

    compute-sanitizer --tool racecheck --racecheck-report analysis \\
        python3 tools/racecheck_mbarrier_probe.py mbarrier

A report for ``mbarrier`` or ``bulk`` (ordered by construction) beside none for
``syncthreads`` means racecheck does not model mbarrier ordering, and its reports on the
warp-specialised kernels are of that kind. Without an argument the script runs every case once,
outside the sanitizer, and checks that the consumers read what the producer wrote.
"""

from __future__ import annotations

import sys

import numpy

import _probe  # tools/_probe.py, beside this script
from cuflash.kernels import _build

CASES = ("mbarrier", "bulk", "syncthreads", "unordered")
ROUNDS = 4  # hand-overs through the one buffer: each round reuses it (write after read)
WORDS = 64  # floats per round

KERNEL = r"""
#include "arch/sm90_tma.cuh"

// Thread 0 (warp 0) produces ROUNDS rounds of WORDS floats into one shared buffer; warp 1 sums
// each round. CASE: 0 mbarrier, 1 bulk, 2 syncthreads, 3 unordered.
template <int CASE, int ROUNDS, int WORDS>
__global__ void __launch_bounds__(64) probe(const float* src, float* sums) {
    __shared__ __align__(128) float buffer[WORDS];
    __shared__ __align__(8) u64 bars[2];
    const u32 full = smem_addr(&bars[0]), empty = smem_addr(&bars[1]);
    if (threadIdx.x == 0) {
        mbar_init(full, 1);
        mbar_init(empty, 1);
        mbar_init_fence();
    }
    __syncthreads();
    const bool producer = threadIdx.x == 0, consumer = threadIdx.x >= 32;
    for (int round = 0; round < ROUNDS; ++round) {
        const u32 parity = round & 1;
        if (producer) {
            if (CASE <= 1 && round > 0) mbar_wait(empty, parity ^ 1);
            if (CASE == 1) {
                mbar_arrive_expect_bytes(full, WORDS * 4);
                bulk_load(smem_addr(buffer), src + round * WORDS, WORDS * 4, full);
            } else {
                for (int i = 0; i < WORDS; ++i) buffer[i] = src[round * WORDS + i];
                if (CASE == 0) mbar_arrive(full);
            }
        }
        if (CASE == 2) __syncthreads();
        if (consumer) {
            if (CASE <= 1) mbar_wait(full, parity);
            float sum = 0.f;
            for (int i = threadIdx.x - 32; i < WORDS; i += 32) sum += buffer[i];
            for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
            if (threadIdx.x == 32) {
                sums[round] = sum;
                if (CASE <= 1) mbar_arrive(empty);
            }
        }
        if (CASE == 2) __syncthreads();
    }
}
"""


def program(case: str) -> tuple[str, tuple[str]]:
    """The source and the kernel of ``case``, for sm_90a."""
    code = _build.with_headers(KERNEL)
    return code, (_build.template_expression("probe", CASES.index(case), ROUNDS, WORDS),)


def run(case: str) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The consumers' sums of each round and the producer's (host) sums."""
    import cupy

    code, (expression,) = program(case)
    module = _probe.module(code, (expression,))
    src = cupy.arange(ROUNDS * WORDS, dtype=cupy.float32)
    sums = cupy.full(ROUNDS, numpy.nan, cupy.float32)
    module.get_function(expression)((1,), (64,), (src, sums))
    expected = src.reshape(ROUNDS, WORDS).sum(axis=1)
    return cupy.asnumpy(sums), cupy.asnumpy(expected)


def check(case: str) -> tuple[bool, str]:
    got, expected = run(case)
    ok = numpy.array_equal(got, expected)
    return ok, f"{case}: consumer sums {got.tolist()} {'==' if ok else '!='} {expected.tolist()}"


if __name__ == "__main__":
    sys.exit(_probe.main(sys.argv, CASES, "unordered", check))
