"""CUDA kernels for CuPy arrays, compiled at run time through CuPy's RawModule (NVRTC).

Entry points take the 4-D (B, H, N, D) views described in docs/internals.md. float16 and
bfloat16 run the tensor-core kernels (float32 accumulation): on compute capability 9.0 the forward
and backward use wgmma (sm_90a) for D = Dv in {64, 128}, everywhere else mma.sync (sm_80+); float32 runs a
CUDA-core kernel that keeps full float32 precision end to end.
"""

from __future__ import annotations

import os

import numpy

# Set to 1 to run the portable mma.sync kernels on Hopper too (comparison, debugging).
DISABLE_HOPPER_ENV = "CUFLASH_DISABLE_SM90"


def _hopper_allowed() -> bool:
    return os.environ.get(DISABLE_HOPPER_ENV, "") in ("", "0")


def availability() -> tuple[bool, str]:
    """Whether the GPU kernels can run in this process, and why not when they cannot."""
    try:
        import cupy
    except ImportError as error:
        return False, f"CuPy is not installed ({error}); install cuflash[cuda13] or cuflash[cuda12]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # the driver's own message says what is wrong
        return False, f"no usable CUDA driver: {error}"
    if count == 0:
        return False, "no CUDA device is visible"
    major = cupy.cuda.Device().compute_capability
    if int(major) < 80:
        return False, f"the kernels need compute capability 8.0 or newer; device 0 has {major}"
    return True, f"{count} CUDA device(s)"


def _is_float32(x) -> bool:
    return numpy.dtype(x.dtype) == numpy.float32


def forward(q, k, v, out, lse, *, scale, causal, block_mask=None):
    """out, lse ← attention(q, k, v); see docs/internals.md for shapes and strides."""
    with q.device:
        if _is_float32(q):
            from .float32 import forward as run
        else:
            from . import sm90_forward
            if _hopper_allowed() and sm90_forward.supports(q, k, v, out, block_mask):
                run = sm90_forward.forward
            else:
                from .mma_forward import forward as run
        run(q, k, v, out, lse, scale=float(scale), causal=bool(causal), block_mask=block_mask)


def backward(dout, q, k, v, out, lse, dq, dk, dv, *, scale, causal, block_mask=None,
             deterministic=False):
    """dq, dk, dv ← gradients of attention; dk/dv summed over each GQA group."""
    with q.device:
        if _is_float32(q):
            from .float32 import backward as run
        else:
            from . import sm90_backward
            if _hopper_allowed() and sm90_backward.supports(q, k, v, dout, block_mask,
                                                                grads=(dq, dk, dv)):
                run = sm90_backward.backward
            else:
                from .mma_backward import backward as run
        run(dout, q, k, v, out, lse, dq, dk, dv, scale=float(scale), causal=bool(causal),
            block_mask=block_mask, deterministic=bool(deterministic))
