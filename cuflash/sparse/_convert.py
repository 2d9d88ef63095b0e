"""Reading patterns given as scipy.sparse matrices/arrays or dense 0/1 arrays.

The result of each reader is a list of ``(rows, cols)`` pairs, one per head, holding the
coordinates of the entries that are *set*: a stored entry counts only when its value, after
duplicates are summed as scipy.sparse defines the matrix, is nonzero. Explicit zeros are ignored.
"""

import numpy
import scipy.sparse

from .. import _mask
from .._checks import refuse_masked_array


def _set_coordinates(pattern):
    """Coordinates (one array per axis) of the nonzero entries of a sparse matrix/array."""
    # copy=True: summing duplicates below must not rewrite the caller's matrix.
    coo = pattern.tocoo(copy=True)
    coo.sum_duplicates()
    keep = coo.data != 0
    coords = getattr(coo, "coords", None) or (coo.row, coo.col)
    return tuple(numpy.asarray(axis, dtype=numpy.int64)[keep] for axis in coords)


def _describe(value):
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _check_head_shape(shape, described):
    """One head's pattern of a per-head pattern must have pairs; a shared 2-D pattern's shape is
    checked by its reader, which names ``pattern.shape``."""
    if 0 in shape:
        raise ValueError(f"{described} must have M >= 1 and N >= 1")


def sparse_heads(pattern, *, dense_hint):
    """``(heads, per_head)``: ``[(shape, rows, cols), ...]`` and whether one was given per head.

    Accepts one 2-D scipy.sparse matrix/array (shared by all heads), a 3-D sparse array
    ``(H, M, N)`` or a non-empty sequence of 2-D ones (one pattern per head). ``dense_hint``
    names the caller's own reader of dense arrays, for the error a dense array gets: the other
    class's reader would build a different kind of mask.
    """
    if scipy.sparse.issparse(pattern):
        if pattern.ndim == 2:
            return [(pattern.shape, *_set_coordinates(pattern))], False
        if pattern.ndim == 3 and pattern.shape[0] > 0:
            shape = pattern.shape[1:]
            _check_head_shape(shape, f"pattern has shape {pattern.shape}: each head's pattern "
                                     f"(M, N) = {shape}")
            heads, rows, cols = _set_coordinates(pattern)
            return [(shape, rows[heads == h], cols[heads == h])
                    for h in range(pattern.shape[0])], True
        raise ValueError(
            "pattern must be 2-D (M, N), or 3-D (H, M, N) with H >= 1 for one pattern per "
            f"head; got a {pattern.ndim}-D sparse array of shape {pattern.shape}")
    if isinstance(pattern, (list, tuple)):
        if not pattern:
            raise ValueError("pattern is an empty sequence; give at least one head's pattern")
        heads = []
        for h, head in enumerate(pattern):
            if not scipy.sparse.issparse(head) or head.ndim != 2:
                dimensions = f" with {head.ndim} dimensions" if scipy.sparse.issparse(head) else ""
                raise TypeError(f"pattern[{h}] must be a 2-D scipy.sparse matrix or array, "
                                f"got {_describe(head)}{dimensions}")
            _check_head_shape(head.shape, f"pattern[{h}] has shape {head.shape}: each head's "
                                          "pattern (M, N)")
            heads.append((head.shape, *_set_coordinates(head)))
        shapes = {shape for shape, _, _ in heads}
        if len(shapes) > 1:
            raise ValueError(
                f"the per-head patterns must share one shape, got shapes {sorted(shapes)}")
        return heads, True
    hint = _mask_hint(pattern)
    if not hint and isinstance(pattern, numpy.ndarray) and pattern.dtype == object:
        hint = " (a NumPy array of objects: pass the per-head patterns as a list)"
    elif not hint and hasattr(pattern, "shape"):
        hint = f" (use {dense_hint})"
    raise TypeError(
        "pattern must be a scipy.sparse matrix or array, or a sequence of them (one per head); "
        f"got {_describe(pattern)}{hint}")


def _mask_hint(value):
    """How to get a pattern from a mask, for a mask given where a pattern is read ("" for
    anything else): a mask has a shape, but no dense reader takes one."""
    from ._blockmask import BlockMask  # the masks' modules read patterns through this one
    from ._exactmask import ExactMask

    if isinstance(value, ExactMask):
        return (" (an ExactMask: mask.to_scipy() is its pattern, and "
                "mask.to_block_mask(block_size) coarsens it to a BlockMask)")
    if isinstance(value, BlockMask):
        return (" (a BlockMask: mask.to_scipy() is its block-level pattern, and "
                "expand_blocks(pattern, block_size=mask.block_size, shape=mask.shape) the "
                "element pattern of its blocks)")
    return ""


def dense_layout(array, *, axes, scipy_reader):
    """A dense 0/1 array (NumPy or CuPy), or a sequence of per-head ones, as a NumPy bool array
    of 2 or 3 non-empty dimensions, validated. ``axes`` names them (``"(Nqb, Nkb) or (H, Nqb,
    Nkb)"``) and ``scipy_reader`` the caller's reader of sparse patterns, for the errors."""
    if isinstance(array, (list, tuple)):
        items = [_dense_item(item, f"array[{h}]", scipy_reader) for h, item in enumerate(array)]
        try:
            array = numpy.asarray(items)
        except ValueError:  # numpy's "inhomogeneous shape" names neither argument nor heads
            shapes = sorted({_shape(item) for item in items}, key=str)
            raise ValueError(f"array's items (one array per head, or the rows of nested lists) "
                             f"must share one shape, got shapes {shapes}") from None
    else:
        array = numpy.asarray(_dense_item(array, "array", scipy_reader))
    if array.dtype == object:  # None, or items that are no numbers
        given = _describe(array.item()) if array.ndim == 0 else "an array of Python objects"
        raise TypeError(f"array must be an array of bools or integer 0/1 values, got {given}")
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise ValueError(f"array must be non-empty, of shape {axes}; got shape {array.shape}")
    return zero_one(array)


def _dense_item(item, name, scipy_reader):
    """One dense array as NumPy, refusing what reading it as an array would misread."""
    if type(item).__module__.split(".")[0] == "cupy":
        return item.get()
    if scipy.sparse.issparse(item):
        raise TypeError(f"{name} is a scipy.sparse pattern; use {scipy_reader} for it (it also "
                        "takes a sequence of per-head patterns)")
    refuse_masked_array(item, name)
    return item


def _shape(item):
    try:
        return numpy.shape(item)
    except ValueError:  # itself ragged
        return "ragged"


def zero_one(array, name="array"):
    """A NumPy or CuPy bool, or integer 0/1, array as bool; other dtypes and values are refused
    (a mask's 2 or -1 is no pair's answer, where truthiness would read it as one)."""
    if array.dtype == numpy.bool_:
        return array
    if not numpy.issubdtype(array.dtype, numpy.integer):
        raise TypeError(f"{name} must hold bool or integer 0/1 values, got dtype {array.dtype}")
    stray = (array != 0) & (array != 1)
    if stray.any():
        bad = _mask._module(array).unique(array[stray])[:5]
        raise ValueError(f"{name} must hold only 0 and 1, got values such as {bad.tolist()}")
    return array.astype(bool)
