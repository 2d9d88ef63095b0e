"""Rotary position embedding (RoFormer, Su et al. 2021) as flash-attn's ``flash_attn_with_kvcache``
applies it: ``rotate`` is the one statement of the rotation, for NumPy and CuPy arrays alike.

The first ``rotary_dim`` dimensions of each vector form ``rotary_dim / 2`` pairs ``(x1, x2)``; at
position ``p`` pair ``i`` turns by the angle whose cosine and sine are ``cos[p, i]`` and
``sin[p, i]``: ``(x1·c − x2·s, x1·s + x2·c)``. ``interleaved`` pairs dimensions ``2i`` and
``2i + 1``; otherwise ``i`` and ``i + rotary_dim / 2`` (GPT-NeoX style). The other dimensions are
copied. The arithmetic is float32 and the result is rounded once to the input's dtype, as
flash-attn's kernel does.
"""

from __future__ import annotations

import numpy

from ._checks import array_module


def rotate(x, cos, sin, positions, *, interleaved: bool):
    """``x`` ``(B, S, H, D)`` rotated at ``positions`` (ints ``(B, S)``, each a row of ``cos``
    and ``sin``, ``(seqlen_ro, rotary_dim / 2)``): a new array of ``x``'s dtype and module."""
    xp = array_module(x)
    half = cos.shape[1]
    c = cos[positions].astype(numpy.float32)[:, :, None, :]   # (B, S, 1, rotary_dim / 2)
    s = sin[positions].astype(numpy.float32)[:, :, None, :]
    head = x[..., :2 * half].astype(numpy.float32)
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
    else:
        x1, x2 = head[..., :half], head[..., half:]
    turned = (x1 * c - x2 * s, x1 * s + x2 * c)
    if interleaved:
        head = xp.stack(turned, axis=-1).reshape(head.shape)
    else:
        head = xp.concatenate(turned, axis=-1)
    result = x.copy()
    result[..., :2 * half] = head.astype(x.dtype)
    return result
