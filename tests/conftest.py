"""Shared fixtures and the skip for tests marked ``gpu``.

- The ``gpu`` marker is declared in pyproject.toml. Tests carrying it are skipped, with the reason,
  when CuPy is missing or sees no CUDA device; ``python -m pytest -m gpu`` on a machine with a GPU
  runs them.
- pyproject.toml puts ``tests/`` on ``sys.path`` (``pythonpath = ["tests"]``), so any test module
  reaches the correctness rule with
  ``from oracle import assert_forward_close, assert_backward_close``.
- ``seed`` is fresh for every test (set ``CUFLASH_TEST_SEED`` to replay one); pass
  ``context=f"seed={seed}"`` to the oracle so that a failure names it.
"""

from __future__ import annotations

import os

# The NumPy path multiplies many small tiles; BLAS threads only spin on those (and slow the suite
# down badly on a busy machine). Set before NumPy loads its BLAS; an explicit setting wins.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import functools  # noqa: E402
import secrets  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a broken CUDA installation
        return f"CuPy cannot be imported ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None if count > 0 else "CuPy sees no device"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = cuda_unavailable_reason()
    if reason is not None:
        skip = pytest.mark.skip(reason=f"no CUDA device: {reason}")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("CUFLASH_TEST_SEED") or secrets.randbits(32))
    print(f"seed={value} (replay with CUFLASH_TEST_SEED={value})")
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def xp_gpu():
    """The ``cupy`` module, or a skip when no CUDA device is usable."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no CUDA device: {reason}")
    import cupy
    return cupy
