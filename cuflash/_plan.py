"""Which kernels a call would run, and why the faster ones were passed over."""

from __future__ import annotations

from dataclasses import dataclass

import numpy


@dataclass(frozen=True)
class KernelPlan:
    """The family of each pass for one call (``cuflash.kernel_plan``); ``str()`` reads well."""

    spec: object
    forward: object   # cuflash.kernels.Plan, or None on the NumPy path
    backward: object

    @property
    def on_gpu(self) -> bool:
        return self.forward is not None

    def __str__(self) -> str:
        head = f"call: {self.spec.describe()}"
        if not self.on_gpu:
            return head + "\nforward: numpy (cuflash.cpu)\nbackward: numpy (cuflash.cpu)"
        return "\n".join((head, self.forward.describe(), self.backward.describe()))


def kernel_plan(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                alibi_slopes=None, block_mask=None, mask=None, dropout_p=0.0, dropout_seed=None,
                dropout_offset=0, deterministic=False, grad_dtype=None) -> KernelPlan:
    """Which kernel family ``attention`` and ``attention_backward`` would run for these
    arguments, and, for each faster family in the registry, why it was passed over.

    Takes the arguments of ``cuflash.attention`` but ``return_lse`` and ``out``, and
    ``attention_backward``'s ``deterministic`` and ``grad_dtype`` (validated the same way), and
    runs nothing. Outputs and gradients are assumed freshly allocated (an ``out=`` or gradient
    buffer with unusual strides can send a pass to a slower family), the gradients in
    ``grad_dtype`` (the inputs' dtype by default; float32 also where an input is broadcast along
    the batch, as ``attention_backward`` runs it).

    >>> import numpy as np, cuflash
    >>> q = np.zeros((1, 2, 8, 64), np.float32)
    >>> print(cuflash.kernel_plan(q, q, q).forward)
    None
    """
    from . import _api, _checks

    xp, spec = _api._spec(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                          alibi_slopes=alibi_slopes, block_mask=block_mask, mask=mask,
                          dropout_p=dropout_p, dropout_seed=dropout_seed,
                          dropout_offset=dropout_offset, deterministic=deterministic,
                          grad_dtype=grad_dtype)
    if xp is numpy:
        return KernelPlan(spec, None, None)
    from . import kernels

    s = spec.shapes
    with _checks.device_context(q):
        # Inputs the call would copy first are stood in for by arrays of the copies' layout.
        q4, k4, v4 = (_checks.as_4d(x, s.batch, xp, copy=False) for x in (q, k, v))
        # One-row stand-ins with the layout of freshly allocated outputs and gradients; the
        # backward runs the spec attention_backward would (float32 gradients where summed).
        backward_spec = _api._spec_rounding_sums_once(spec, (q, k, v))
        out = xp.empty((1, 1, 1, s.dv), spec.dtype)
        dq, dk = (xp.empty((1, 1, 1, s.d), backward_spec.grad_dtype) for _ in range(2))
        dv = xp.empty((1, 1, 1, s.dv), backward_spec.grad_dtype)
        forward = kernels.plan("forward", spec, (q4, k4, v4, out))
        backward = kernels.plan("backward", backward_spec, (q4, k4, v4, out, out, dq, dk, dv))
    return KernelPlan(spec, forward, backward)
