"""Per-head compressed sparse rows in NumPy: the storage behind BlockMask.

All heads share one flat index array. ``row_ptr`` has shape ``(H, M + 1)`` and holds offsets into
that flat array, so head ``h``'s row ``i`` is ``col_idx[row_ptr[h, i] : row_ptr[h, i + 1]]`` and
``row_ptr[h, M] == row_ptr[h + 1, 0]``. This is the layout the kernels read, which is why the
block-level storage uses it too: refining it to tiles and copying it to a device is then a pure
array transformation.

A pattern is also written as sorted unique int64 *keys* ``(h * M + i) * N + j``; set operations
and transposition work on keys, and ``csr_from_keys`` turns them back into rows.
"""

from typing import NamedTuple

import numpy

INT32_MAX = numpy.iinfo(numpy.int32).max


class TileCSR(NamedTuple):
    """A pattern at tile resolution, in both orientations (see docs/internals.md).

    ``row_ptr`` ``(H', Mt + 1)`` and ``col_idx``: key tiles of each query tile row, ascending.
    ``col_ptr`` ``(H', Nt + 1)`` and ``row_idx``: query tiles of each key tile column, ascending.
    """

    row_ptr: object
    col_idx: object
    col_ptr: object
    row_idx: object


def index_dtype(maxval):
    """int32 when every index and offset fits, int64 otherwise (as scipy.sparse chooses)."""
    return numpy.int32 if maxval <= INT32_MAX else numpy.int64


def sorted_unique(values):
    """``numpy.unique`` for int64 keys: a plain sort and a neighbour test, which is faster."""
    values = numpy.sort(numpy.asarray(values, dtype=numpy.int64))
    if values.size < 2:
        return values
    keep = numpy.empty(values.size, dtype=bool)
    keep[0] = True
    numpy.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def ramp(counts):
    """``concatenate([arange(c) for c in counts])`` without a Python loop."""
    counts = numpy.asarray(counts, dtype=numpy.int64)
    total = int(counts.sum())
    starts = numpy.cumsum(counts) - counts
    return numpy.arange(total, dtype=numpy.int64) - numpy.repeat(starts, counts)


def _head_offsets(flat_ptr, num_heads, nrows):
    """Cut the flat ``(H * M + 1,)`` offsets into overlapping ``(H, M + 1)`` rows."""
    index = numpy.arange(num_heads)[:, None] * nrows + numpy.arange(nrows + 1)[None, :]
    return flat_ptr[index]


def csr_from_keys(keys, num_heads, nrows, ncols):
    """``(row_ptr, col_idx)`` from sorted unique keys ``(h * nrows + i) * ncols + j``."""
    keys = numpy.asarray(keys, dtype=numpy.int64)
    dtype = index_dtype(max(keys.size, ncols))
    rows, cols = numpy.divmod(keys, ncols)
    counts = numpy.bincount(rows, minlength=num_heads * nrows)
    flat_ptr = numpy.zeros(num_heads * nrows + 1, dtype=dtype)
    numpy.cumsum(counts, out=flat_ptr[1:])
    return _head_offsets(flat_ptr, num_heads, nrows), cols.astype(dtype)


def keys_from_csr(row_ptr, col_idx, ncols):
    """The sorted unique keys of a per-head CSR (inverse of ``csr_from_keys``)."""
    num_heads, nrows = row_ptr.shape[0], row_ptr.shape[1] - 1
    counts = numpy.diff(row_ptr, axis=1).ravel()
    rows = numpy.repeat(numpy.arange(num_heads * nrows, dtype=numpy.int64), counts)
    return rows * ncols + col_idx.astype(numpy.int64, copy=False)


def transpose(row_ptr, col_idx, ncols):
    """``(col_ptr, row_idx)``: the same per-head pattern stored by columns."""
    num_heads, nrows = row_ptr.shape[0], row_ptr.shape[1] - 1
    counts = numpy.diff(row_ptr, axis=1).ravel()
    flat_rows = numpy.repeat(numpy.arange(num_heads * nrows, dtype=numpy.int64), counts)
    heads, rows = numpy.divmod(flat_rows, nrows)
    transposed_keys = (heads * ncols + col_idx.astype(numpy.int64, copy=False)) * nrows + rows
    return csr_from_keys(numpy.sort(transposed_keys), num_heads, ncols, nrows)


def refine(row_ptr, col_idx, *, row_ratio, col_ratio, out_rows, out_cols):
    """Refine a per-head block CSR to a finer grid of tiles, as int32 arrays.

    Each block row becomes ``row_ratio`` tile rows and each block column ``col_ratio`` tile
    columns; a tile is kept when its block is. Tiles at or beyond ``out_rows`` / ``out_cols``
    (the tail of a ragged last block) are dropped, so the result describes exactly
    ``ceil(N / tile)`` tiles per axis. Returns ``(tile_row_ptr (H, out_rows + 1), tile_col_idx)``.
    """
    num_heads, nrows = row_ptr.shape[0], row_ptr.shape[1] - 1
    if not (nrows - 1) * row_ratio < out_rows <= nrows * row_ratio:
        raise ValueError(
            f"{out_rows} tile rows cannot come from {nrows} blocks of {row_ratio} tiles each")
    # Expand every stored block column into its run of tile columns, clipped at out_cols.
    first_tile = col_idx.astype(numpy.int64) * col_ratio
    tiles_per_block = numpy.minimum(col_ratio, out_cols - first_tile)
    if tiles_per_block.size and tiles_per_block.min() < 1:
        raise ValueError(f"a block column lies beyond the {out_cols} tile columns")
    expanded = numpy.repeat(first_tile, tiles_per_block) + ramp(tiles_per_block)
    expanded_ptr = numpy.zeros(tiles_per_block.size + 1, dtype=numpy.int64)
    numpy.cumsum(tiles_per_block, out=expanded_ptr[1:])
    # Block row i of head h owns expanded[expanded_ptr[row_ptr[h, i]]:expanded_ptr[row_ptr[h, i+1]]]
    segment_start = expanded_ptr[row_ptr[:, :-1]]
    segment_length = expanded_ptr[row_ptr[:, 1:]] - segment_start
    # Every tile row repeats the segment of the block row it lies in.
    block_of_tile_row = numpy.arange(out_rows) // row_ratio
    source_start = segment_start[:, block_of_tile_row].ravel()
    source_length = segment_length[:, block_of_tile_row].ravel()
    total = int(source_length.sum())
    if total > INT32_MAX:
        raise ValueError(
            f"the pattern has {total} tiles at this tile size, more than int32 offsets can "
            "address; use a larger block size or fewer heads per mask")
    flat_ptr = numpy.zeros(num_heads * out_rows + 1, dtype=numpy.int64)
    numpy.cumsum(source_length, out=flat_ptr[1:])
    gather = numpy.repeat(source_start - flat_ptr[:-1], source_length) + numpy.arange(total)
    tile_col_idx = expanded[gather].astype(numpy.int32)
    tile_row_ptr = _head_offsets(flat_ptr.astype(numpy.int32), num_heads, out_rows)
    return tile_row_ptr, tile_col_idx
