"""``cuflash.check.verify`` without the command line: the counts behind a check's record."""

import pytest
import scipy.sparse

from cuflash.check import verify
from cuflash.sparse import BlockMask


def _one_block_mask(n, row, col, block_size):
    """A mask of an ``(n, n)`` problem keeping the single block ``(row, col)``."""
    bq, bk = block_size
    blocks = (-(-n // bq), -(-n // bk))
    pattern = scipy.sparse.csr_array(([True], ([row], [col])), shape=blocks)
    return BlockMask.from_scipy(pattern, level="block", block_size=block_size, shape=(n, n))


@pytest.mark.parametrize("n", [4 * 10**9, 2**33])
def test_attended_fraction_of_one_block_holding_a_long_problem_is_exact(n):
    # every pair with key <= query lies in the one block: all of them are attended
    mask = _one_block_mask(n, 0, 0, (n, n))
    assert verify.attended_fraction(mask, causal=True) == 1.0


def test_attended_fraction_of_a_corner_block_far_below_the_diagonal_is_exact():
    n, block_size = 2**40, (2**20, 2**24)
    mask = _one_block_mask(n, n // block_size[0] - 1, 0, block_size)
    # the block lies wholly below the diagonal: all of its pairs count
    expected = block_size[0] * block_size[1] / (n * (n + 1) / 2)
    assert verify.attended_fraction(mask, causal=True) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("count, shown", [(2.5, "2.5"), (3.0, "3.0"), (True, "True")])
def test_sample_rows_refuses_a_count_that_is_no_integer_naming_it(count, shown):
    # a float failed inside NumPy's sampling naming another number; True sampled one row
    with pytest.raises(TypeError, match=rf"^count must be a positive number of rows or None, "
                                        rf"got {shown}"):
        verify.sample_rows(10, count, seed=0)


# ----------------------------------------------------------------------- timing and peak memory

def _traced_runs_are_slow(traced):
    """A stand-in call: allocates 1 MiB, and takes 0.3 s more while tracemalloc traces it (as
    tracing slows NumPy's allocations). ``traced`` gets, per run, whether it was traced."""
    import time
    import tracemalloc

    import numpy as np

    def call():
        traced.append(tracemalloc.is_tracing())
        buffer = np.ones(2**20, dtype=np.uint8)
        if traced[-1]:
            time.sleep(0.3)
        return buffer.sum()

    return call


def test_cpu_check_times_a_run_that_tracemalloc_does_not_trace():
    """The CPU's peak memory comes from tracemalloc, which slows the run it traces: the time
    comes from a run of its own, untraced (it came from the traced run, 0.3 s here)."""
    from cuflash.bench.devices import CpuDevice

    traced = []
    result, phase = verify._measured(CpuDevice(), _traced_runs_are_slow(traced), repeats=10,
                                     inputs=(), flops=1.0)
    assert result == 2**20
    assert phase.seconds < 0.15
    assert phase.peak_bytes >= 2**20  # the memory run was traced, and counted the buffer
    assert True in traced and False in traced


class _CountingGpu:
    """As much of a GPU device as the measurement uses: it counts the calls it runs."""

    name = "gpu"

    def synchronize(self):
        pass

    def times(self, fn, *, warmup, repeats):
        for _ in range(warmup + repeats):
            fn()
        return [1e-3] * repeats

    def peak_bytes(self, fn):
        return fn(), 0


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_check_time_estimate_charges_every_call_the_check_makes(monkeypatch, device):
    """The estimate charged one call on the CPU, where the check makes two (one for the peak
    memory, one timed)."""
    import numpy as np

    from cuflash.bench.devices import CpuDevice

    target = CpuDevice() if device == "cpu" else _CountingGpu()
    made = []
    verify._measured(target, lambda: made.append(1), repeats=7, inputs=(), flops=1.0)
    charged = []
    monkeypatch.setattr(verify, "attention_seconds",
                        lambda *args, calls, **kwargs: charged.append(calls) or 0.0)
    verify.estimate_seconds(target, 256, 1, 64, np.float16, 4, backward=False, repeats=7)
    assert charged == [len(made)]


@pytest.mark.parametrize("backward, variants", [(False, 1), (True, 4)])
def test_check_time_estimate_on_a_gpu_charges_its_kernels_first_compile(backward, variants):
    """A check's calls compile their kernels first (the forward's, and the backward's three):
    seconds on a cold cache, which the estimate of a small check left out."""
    import numpy as np

    from cuflash.bench import estimate

    class Gpu(_CountingGpu):
        properties = {"major": 9, "minor": 0, "multiprocessors": 132, "clock_khz": 0}

    seconds = verify.estimate_seconds(Gpu(), 256, 1, 64, np.float16, 4, backward=backward)
    assert seconds >= variants * estimate.KERNEL_COMPILE_SECONDS
    assert seconds < (variants + 1) * estimate.KERNEL_COMPILE_SECONDS
