"""Shared fixtures, the skip for tests marked ``gpu`` and the ``compile`` group.

- The ``gpu`` marker is declared in pyproject.toml. Tests carrying it are skipped, with the reason
  ``cuflash.kernels.availability()`` gives (no CuPy, no NVIDIA driver, no device, a device older
  than sm_80); ``python -m pytest -m gpu`` on a machine with a GPU runs them.
- Every test of ``test_kernel_compile.py`` gets the ``compile`` marker here: they compile each
  kernel variant through NVRTC (minutes on a small machine), so pyproject.toml leaves them out of
  the default run (``-m "not compile"``); ``python -m pytest -m compile`` runs them, as CI does.
- pyproject.toml puts ``tests/`` on ``sys.path`` (``pythonpath = ["tests"]``), so any test module
  applies the correctness rule (``cuflash/check/rule.py``) with
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
    """Why GPU tests cannot run here (in the library's words: "no NVIDIA driver found", ...),
    or None when they can."""
    try:
        from cuflash import kernels
        usable, reason = kernels.availability()
    except Exception as error:  # a broken CUDA installation
        return f"{type(error).__name__}: {error}"
    return None if usable else reason


COMPILE_MODULES = ("test_kernel_compile.py",)


@pytest.hookimpl(tryfirst=True)  # before -m selects, so that the marker counts
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in COMPILE_MODULES:
            item.add_marker(pytest.mark.compile)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = cuda_unavailable_reason()
    if reason is not None:
        skip = pytest.mark.skip(reason=f"GPU kernels cannot run here: {reason}")
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
        pytest.skip(f"GPU kernels cannot run here: {reason}")
    import cupy
    return cupy
