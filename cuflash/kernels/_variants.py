"""The specs whose kernel variants CI compiles (for every architecture, rejecting register spills).

Each launcher's ``main_variants()`` turns ``spec_grid(...)`` into its own template expressions, so
one list says which option combinations must always build: every dtype and head dim dense and
causal, exact masks (alone and with causal) at every head dim in one dtype, plus each mask policy
and score modifier (and all of them together) at one head dim; packed sequences and dropout in
grids of their own.
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from .._checks import Shapes
from .._spec import AttentionSpec

_FEATURE_HEAD_DIM = 128
_N = 1024


def _block_mask():
    from ..sparse import BlockMask

    return BlockMask.from_dense(numpy.ones((_N // 128, _N // 128), bool), block_size=128)


def exact_mask_stand_in():
    """An exact mask (the identity pattern at 1024 × 1024) for specs that are only compiled."""
    from ..sparse import ExactMask

    return ExactMask.from_dense(numpy.eye(_N, dtype=bool))


class _Slopes:
    """Stands for an ALiBi slope array in a spec that is only compiled, never launched."""
    data = None


def spec_of(dtype, d: int, dv: int | None = None, *, nq: int = _N, nk: int | None = None,
            **options) -> AttentionSpec:
    """A spec for a (1, 1, Nq, D) problem against Nk keys (both 1024 unless given) with these
    options."""
    dv = d if dv is None else dv
    shapes = Shapes((1,), 1, 1, nq, nq if nk is None else nk, d, dv)
    return AttentionSpec(shapes=shapes, dtype=numpy.dtype(dtype), scale=1 / math.sqrt(d), **options)


def spec_grid(head_dims, dtypes=("float16", "bfloat16"), *, features=True):
    """Dense and causal for every (dtype, head dim); with ``features``, an exact mask alone and
    with causal for every head dim in the last dtype (its extra registers matter most where the
    tiles are largest), then each mask policy and score modifier alone and all together in that
    dtype at D = 128 (if listed)."""
    specs = [spec_of(dtype, d, causal=causal)
             for dtype in dtypes for d in head_dims for causal in (False, True)]
    if features:
        specs += [spec_of(dtypes[-1], d, causal=causal, exact_mask=exact_mask_stand_in())
                  for d in head_dims for causal in (False, True)]
    if features and _FEATURE_HEAD_DIM in head_dims:
        specs += feature_specs(_FEATURE_HEAD_DIM, dtypes[-1])
    return specs


def feature_specs(d: int, dtype="bfloat16"):
    """Each mask policy and score modifier alone, and all of them together, at head dim d."""
    return [
        spec_of(dtype, d, block_mask=_block_mask()),
        spec_of(dtype, d, causal=True, block_mask=_block_mask()),
        spec_of(dtype, d, window=(256, 0)),
        spec_of(dtype, d, window=(256, -1)),  # a band bounded on the left alone
        spec_of(dtype, d, window=(256, -1), block_mask=_block_mask()),
        spec_of(dtype, d, window=(256, -1), exact_mask=exact_mask_stand_in()),
        spec_of(dtype, d, softcap=30.0),
        spec_of(dtype, d, causal=True, alibi=_Slopes()),
        spec_of(dtype, d, causal=True, window=(256, 0), softcap=30.0, alibi=_Slopes(),
                block_mask=_block_mask()),
        spec_of(dtype, d, window=(256, 64), softcap=30.0, alibi=_Slopes(),
                exact_mask=exact_mask_stand_in()),
    ]


def float32_grads_specs(head_dims):
    """Backward passes that store float32 gradients (``grad_dtype=float32``): causal at every
    head dim in bfloat16. Only the gradient stores differ from the 16-bit variants."""
    return [spec_of("bfloat16", d, causal=True, float32_grads=True) for d in head_dims]


def dropout_spec_grid(head_dims):
    """Dropout (the DROPOUT variants of the kernels that draw the mask): alone and with causal at
    every head dim in bfloat16, once in float16, with ``Dv ≠ D``, and with every mask policy and
    score modifier at D = 128 (if listed)."""
    drop = dict(dropout_p=0.1, dropout_seed=1)
    specs = [spec_of("bfloat16", d, causal=causal, **drop)
             for d in head_dims for causal in (False, True)]
    specs += [spec_of("float16", head_dims[-1], **drop),
              spec_of("bfloat16", 64, 128, causal=True, **drop)]
    if _FEATURE_HEAD_DIM in head_dims:
        d = _FEATURE_HEAD_DIM
        specs += [
            spec_of("bfloat16", d, causal=True, window=(256, 0), softcap=30.0, alibi=_Slopes(),
                    block_mask=_block_mask(), **drop),
            spec_of("bfloat16", d, window=(256, 64), softcap=30.0, alibi=_Slopes(),
                    exact_mask=exact_mask_stand_in(), **drop),
        ]
    return specs


def varlen_spec_grid():
    """Packed variable-length sequences (``attention_varlen``): dense and causal for both dtypes
    at every head dim the sm80 kernels tile differently (64, 96, 128, 256), ``Dv ≠ D``, and every
    mask policy and score modifier together at D = 128 (what varlen calls can combine)."""
    specs = [_varlen(spec_of(dtype, d, causal=causal))
             for dtype in ("float16", "bfloat16") for d in (64, 96, 128, 256)
             for causal in (False, True)]
    specs += [_varlen(spec_of("bfloat16", 128, 64, causal=True)),
              _varlen(spec_of("bfloat16", 128, window=(256, 64), softcap=30.0, alibi=_Slopes())),
              _varlen(spec_of("bfloat16", 128, causal=True, window=(256, 0), softcap=30.0,
                              alibi=_Slopes()))]
    # With dropout, whose mask takes the sequence as its batch index.
    specs += [_varlen(spec_of(dtype, d, causal=causal, dropout_p=0.1, dropout_seed=1))
              for dtype, d in (("bfloat16", 64), ("float16", 128)) for causal in (False, True)]
    return specs


def _varlen(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` as one packed sequence (only compiled, never launched: no offsets)."""
    from .._spec import VarlenLayout

    n = spec.shapes.nq
    layout = VarlenLayout(cu_q=None, cu_k=None, total_q=n, total_k=n, max_q=n, max_k=n)
    return dataclasses.replace(spec, varlen=layout)
