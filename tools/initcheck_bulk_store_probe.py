"""Does compute-sanitizer's initcheck count a bulk copy to global memory as initialising it?

Where the warp-specialised Hopper backward stores each dQ tile's first part (ordered adds, and
claimed tiles under a band: ``stores_first_parts`` in cuflash/kernels/sm90_backward.py), the
float32 dQ accumulator is not zeroed: the first writer of each dQ tile stores its part with a
bulk copy (``bulk_store``: cp.async.bulk, shared to global, done by the TMA unit), and the others
add theirs with bulk reduce-adds. The cast that follows (flash_bwd_dq_convert) then reads memory
that no thread ever stored to. If initcheck tracks only the threads' own stores, it reports every
one of those reads. This probe asks that question in a kernel small enough to reason about, one
case per process:

  plain     fresh memory written by ordinary stores, then read by another kernel: initialised;
  bulk      the same memory written by one ``bulk_store`` of the same bytes: initialised by
            the PTX semantics; a report here means initcheck does not see bulk-copy writes;
  unwritten read without being written: a real uninitialised read, to show that initcheck
            reports one.

Run each case under the sanitizer:

    compute-sanitizer --tool initcheck python3 tools/initcheck_bulk_store_probe.py bulk

A report for ``bulk`` beside none for ``plain`` means initcheck does not model bulk-copy writes,
and its reports on the cast after the first-part stores are of that kind (tools/sanitize.sh runs
initcheck with the accumulator zeroed for that reason: tools/sanitize_driver.py,
``write_dq_zeros``). Without an argument the script runs ``plain`` and ``bulk`` once, outside the
sanitizer, and checks that the reading kernel saw what was written.
"""

from __future__ import annotations

import sys

import _probe  # tools/_probe.py, beside this script
from cuflash.kernels import _build

CASES = ("plain", "bulk", "unwritten")
WORDS = 1024  # floats written, then read

KERNELS = r"""
#include "arch/sm90_tma.cuh"

// Writes dst[i] = i, i < WORDS: by ordinary stores (CASE 0), by one bulk copy from shared
// memory (CASE 1), or not at all (CASE 2).
template <int CASE, int WORDS>
__global__ void __launch_bounds__(128) write_words(float* dst) {
    __shared__ __align__(128) float staged[WORDS];
    if (CASE == 0)
        for (int i = threadIdx.x; i < WORDS; i += blockDim.x) dst[i] = (float)i;
    if (CASE != 1) return;
    for (int i = threadIdx.x; i < WORDS; i += blockDim.x) staged[i] = (float)i;
    fence_proxy_async_shared();  // the generic stores, before the async proxy reads them
    __syncthreads();
    if (threadIdx.x == 0) {
        bulk_store(dst, smem_addr(staged), WORDS * 4);
        bulk_commit();
        bulk_wait();
    }
}

template <int WORDS>
__global__ void __launch_bounds__(128) sum_words(const float* src, float* sum) {
    float part = 0.f;
    for (int i = threadIdx.x; i < WORDS; i += blockDim.x) part += src[i];
    atomicAdd(sum, part);
}
"""


def program(case: str) -> tuple[str, tuple[str, str]]:
    """The source and the (writer, reader) kernels of ``case``, for sm_90a."""
    code = _build.with_headers(KERNELS)
    return code, (_build.template_expression("write_words", CASES.index(case), WORDS),
                  _build.template_expression("sum_words", WORDS))


def run(case: str) -> tuple[float, float]:
    """The reading kernel's sum after ``case`` wrote (or did not write) fresh memory, and the
    sum of what a write puts there."""
    import cupy

    code, (writer, reader) = program(case)
    module = _probe.module(code, (writer, reader))
    words = cupy.empty(WORDS, cupy.float32)  # fresh from the pool: never written on the device
    total = cupy.zeros(1, cupy.float32)
    module.get_function(writer)((1,), (128,), (words,))
    module.get_function(reader)((1,), (128,), (words, total))
    return float(total[0]), WORDS * (WORDS - 1) / 2


def check(case: str) -> tuple[bool, str]:
    got, expected = run(case)
    ok = got == expected
    return ok, f"{case}: read back a sum of {got} {'==' if ok else '!='} {expected}"


if __name__ == "__main__":
    sys.exit(_probe.main(sys.argv, CASES, "unwritten", check))
