"""ExactMask: an element-exact attention mask, computed at block-sparse cost.

A ``BlockMask`` is block-sparse attention: a kept block is computed in full, so an element pattern
coarsened to blocks attends to pairs the pattern leaves out. An ``ExactMask`` attends to exactly
the pairs of its pattern. The kernels still work tile by tile, and each tile of the pattern is one
of three kinds:

- empty: no pair of the tile is allowed; the tile is never visited;
- full: every pair of the tile (inside the problem) is allowed; it runs as in dense attention,
  with no per-element work;
- partial: some pairs are allowed; the kernel tests one bit per pair.

The tile classes and the bits depend on the kernel's tile shape, so they are built on the host for
each ``(tile_m, tile_n)`` asked for, once, and cached (``tile_bits``, ``device_tile_bits``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy
import scipy.sparse

from .._checks import query_rows
from . import _convert, _csr
from ._validate import ceil_div, picture_size, positive_int, problem_shape, tile_pair

WORD_BITS = 32


def bitmask_words_per_row(tile_n: int) -> int:
    """The 32-bit words each query row of a partial tile's bitmask takes (``tile_n`` keys)."""
    return ceil_div(tile_n, WORD_BITS)

# The tile shape of repr() and of the default picture: the Hopper forward kernel's at D = 128.
REPORT_TILE = (128, 128)


class TileBits(NamedTuple):
    """An ExactMask at one tile shape, in the layout the kernels read (docs/sparse.md).

    ``row_ptr`` ``(H', Mt + 1)`` / ``col_idx``: the non-empty key tiles of each query tile
    (as ``TileCSR``), ``col_ptr`` ``(H', Nt + 1)`` / ``row_idx``: the transpose. ``row_slot``
    (one int32 per ``col_idx`` entry) and ``col_slot`` (one per ``row_idx`` entry) give each
    non-empty tile's bitmask: ``-1`` for a full tile, else its index ``p`` among the partial
    tiles. ``bits`` (uint32) holds ``tile_m`` rows of ``words_per_row = ceil(tile_n / 32)`` words
    per partial tile: pair (query ``m0 + r``, key ``n0 + c``) of partial tile ``p`` (first query
    ``m0``, first key ``n0``) is allowed when bit ``c % 32`` of word
    ``(p · tile_m + r) · words_per_row + c // 32`` is set. Pairs outside the problem are clear.
    """

    row_ptr: object
    col_idx: object
    col_ptr: object
    row_idx: object
    row_slot: object
    col_slot: object
    bits: object


class TileCounts(NamedTuple):
    """How many tiles of ``tile_m × tile_n`` (summed over the stored patterns) are full, partial
    and empty, and the bytes of their bitmasks."""

    tile_m: int
    tile_n: int
    full: int
    partial: int
    empty: int
    bitmask_bytes: int

    def describe(self) -> str:
        return (f"{self.tile_m}x{self.tile_n} tiles: {self.full:,} full, {self.partial:,} "
                f"partial, {self.empty:,} empty; bitmasks {self.bitmask_bytes:,} bytes")


def _readonly(array):
    array = numpy.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def _rebuild(shape, num_heads, keys):
    return ExactMask._from_keys(keys, shape=shape, num_heads=num_heads)


class ExactMask:
    """Which (query, key) pairs of an ``(Nq, Nk)`` attention problem are attended, exactly.

    Build one with :meth:`from_scipy` (any scipy.sparse element pattern) or :meth:`from_dense`
    (a bool array), and pass it as ``cuflash.attention(..., mask=...)``. The result is the
    attention of exactly that pattern; see the module docstring for how the kernels keep it
    cheap. For block-sparse (approximate) attention, which computes every pair of a kept
    block, use ``BlockMask`` and ``block_mask=`` instead.

    A mask holds one pattern shared by all heads (``num_heads is None``) or one per query head.
    It is immutable and hashable; rows with no allowed key give output 0 and lse ``-inf``.
    """

    __slots__ = ("_shape", "_num_heads", "_row_ptr", "_col_idx", "_cache", "_hash")

    def __init__(self, *args, **kwargs):
        raise TypeError("ExactMask is built with ExactMask.from_scipy(pattern) or "
                        "ExactMask.from_dense(array)")

    def __setattr__(self, name, value):
        raise AttributeError(f"ExactMask is immutable; cannot set {name!r}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def _from_keys(cls, keys, *, shape, num_heads):
        """From sorted unique keys ``(h * Nq + i) * Nk + j``."""
        row_ptr, col_idx = _csr.csr_from_keys(keys, num_heads or 1, shape[0], shape[1])
        self = object.__new__(cls)
        for name, value in (("_shape", tuple(shape)), ("_num_heads", num_heads),
                            ("_row_ptr", _readonly(row_ptr)), ("_col_idx", _readonly(col_idx)),
                            ("_cache", {}), ("_hash", None)):
            object.__setattr__(self, name, value)
        return self

    @classmethod
    def from_scipy(cls, pattern, *, shape=None):
        """An exact mask from a scipy.sparse element pattern (any format, ``*_matrix`` or
        ``*_array``).

        Parameters
        ----------
        pattern : sparse matrix/array, 3-D sparse array, or sequence of sparse matrices/arrays
            Shape ``(Nq, Nk)``: entry ``(i, j)`` set (nonzero) when query ``i`` attends key
            ``j``; explicitly stored zeros are ignored. A 2-D pattern is shared by all heads; a
            3-D ``(H, Nq, Nk)`` array or a sequence of ``H`` 2-D patterns gives one pattern per
            query head.
        shape : (int, int), optional
            The problem ``(Nq, Nk)``; when given it must equal the pattern's shape.
        """
        heads, per_head = _convert.sparse_heads(
            pattern, dense_hint="ExactMask.from_dense for a dense bool array")
        pattern_shape = tuple(int(n) for n in heads[0][0])
        if shape is not None and problem_shape("shape", shape) != pattern_shape:
            raise ValueError(f"shape={tuple(shape)} disagrees with the pattern's shape "
                             f"{pattern_shape}; an exact mask's pattern is (Nq, Nk)")
        nq, nk = problem_shape("pattern.shape", pattern_shape)
        keys = [(h * nq + rows) * nk + cols for h, (_, rows, cols) in enumerate(heads)]
        keys = _csr.sorted_unique(numpy.concatenate(keys))
        return cls._from_keys(keys, shape=(nq, nk), num_heads=len(heads) if per_head else None)

    @classmethod
    def from_dense(cls, array):
        """An exact mask from a dense bool (or 0/1 integer) array, NumPy or CuPy: ``(Nq, Nk)``
        shared by all heads or ``(H, Nq, Nk)`` one per head; True where a query attends a key.
        Meant for small problems: large patterns are cheaper as scipy.sparse."""
        array = _convert.dense_layout(array, axes="(Nq, Nk) or (H, Nq, Nk)",
                                      scipy_reader="ExactMask.from_scipy")
        per_head = array.ndim == 3
        layout = array if per_head else array[None]
        return cls._from_keys(numpy.flatnonzero(layout), shape=layout.shape[1:],
                              num_heads=layout.shape[0] if per_head else None)

    # -- what the back ends read -----------------------------------------------------------------

    @property
    def shape(self):
        """``(Nq, Nk)``: the problem the mask was built for."""
        return self._shape

    @property
    def num_heads(self):
        """Number of per-head patterns, or ``None`` for one pattern shared by all heads."""
        return self._num_heads

    @property
    def _stored_heads(self):
        return self._row_ptr.shape[0]

    @property
    def nnz(self):
        """Allowed (query, key) pairs, summed over the stored patterns."""
        return int(self._col_idx.size)

    @property
    def density(self):
        """Allowed pairs / all pairs (``H' · Nq · Nk``)."""
        return self.nnz / (self._stored_heads * self._shape[0] * self._shape[1])

    def check_compatible(self, Nq, Nk, Hq):
        """Raise ValueError unless the mask fits queries of length Nq, keys of length Nk and Hq
        query heads."""
        if (Nq, Nk) != self._shape:
            raise ValueError(
                f"mask was built for Nq={self._shape[0]}, Nk={self._shape[1]} (its pattern's "
                f"shape), but the inputs have Nq={Nq}, Nk={Nk}")
        if self._num_heads is not None and Hq != self._num_heads:
            raise ValueError(
                f"mask holds one pattern per head for {self._num_heads} heads, but the query has "
                f"Hq={Hq} heads (a mask shared by all heads has num_heads=None)")

    def element_rows(self, rows=None):
        """NumPy bool ``(H', len(rows), Nk)``: the allowed keys of query ``rows`` (default all).
        Allocates ``H' · len(rows) · Nk`` bytes: for references and small problems."""
        nq, nk = self._shape
        rows = query_rows(rows, nq)
        dense = numpy.zeros((self._stored_heads, rows.size, nk), dtype=bool)
        for h in range(self._stored_heads):
            starts, stops = self._row_ptr[h, rows], self._row_ptr[h, rows + 1]
            counts = (stops - starts).astype(numpy.int64)
            flat = numpy.repeat(starts.astype(numpy.int64), counts) + _csr.ramp(counts)
            dense[h, numpy.repeat(numpy.arange(rows.size), counts), self._col_idx[flat]] = True
        return dense

    def to_element_dense(self):
        """NumPy bool ``(H', Nq, Nk)`` of allowed pairs (small problems only)."""
        return self.element_rows()

    def to_scipy(self):
        """Bool ``csr_array`` ``(Nq, Nk)``; a list of them for a per-head mask."""
        heads = []
        for h in range(self._stored_heads):
            start, stop = self._row_ptr[h, 0], self._row_ptr[h, -1]
            data = numpy.ones(int(stop - start), dtype=bool)
            heads.append(scipy.sparse.csr_array(
                (data, self._col_idx[start:stop].copy(), self._row_ptr[h] - start),
                shape=self._shape))
        return heads if self._num_heads is not None else heads[0]

    def to_block_mask(self, block_size):
        """The block-sparse coarsening: a ``BlockMask`` that keeps every block holding an allowed
        pair. Attention with it computes whole blocks, so it is *not* this mask; it is the
        block-sparse problem on the same non-empty blocks (for comparisons)."""
        from ._blockmask import BlockMask

        return BlockMask.from_scipy(self.to_scipy(), level="element", block_size=block_size)

    # -- tiles ------------------------------------------------------------------------------------

    def _coordinates(self):
        """``(head, row, col)`` int64 of every allowed pair, in row-major order per head."""
        nq = self._shape[0]
        counts = numpy.diff(self._row_ptr, axis=1).ravel()
        flat_rows = numpy.repeat(numpy.arange(self._stored_heads * nq, dtype=numpy.int64), counts)
        heads, rows = numpy.divmod(flat_rows, nq)
        return heads, rows, self._col_idx.astype(numpy.int64)

    def tile_bits(self, tile_m, tile_n):
        """The mask at ``tile_m × tile_n`` tiles as NumPy arrays (``TileBits``), cached."""
        tile_m, tile_n = positive_int("tile_m", tile_m), positive_int("tile_n", tile_n)
        key = ("host", tile_m, tile_n)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._build_tiles(tile_m, tile_n)
            self._cache[key] = cached
        return cached

    def device_tile_bits(self, tile_m, tile_n):
        """:meth:`tile_bits` as CuPy arrays on the current device, cached per (device, tile)."""
        import cupy

        host = self.tile_bits(tile_m, tile_n)
        key = ("device", cupy.cuda.runtime.getDevice(), tile_m, tile_n)
        cached = self._cache.get(key)
        if cached is None:
            cached = TileBits(*(cupy.asarray(array) for array in host))
            cupy.cuda.get_current_stream().synchronize()  # safe to read from any stream
            self._cache[key] = cached
        return cached

    def tile_counts(self, tile_m, tile_n) -> TileCounts:
        """Full, partial and empty ``tile_m × tile_n`` tiles and the bitmasks' bytes."""
        bits = self.tile_bits(tile_m, tile_n)
        nonempty = int(bits.row_slot.size)
        partial = int(numpy.count_nonzero(bits.row_slot >= 0))
        tiles_m, tiles_n = ceil_div(self._shape[0], tile_m), ceil_div(self._shape[1], tile_n)
        return TileCounts(tile_m, tile_n, nonempty - partial, partial,
                          self._stored_heads * tiles_m * tiles_n - nonempty, int(bits.bits.nbytes))

    def _build_tiles(self, tile_m, tile_n):
        nq, nk = self._shape
        tiles_m, tiles_n = ceil_div(nq, tile_m), ceil_div(nk, tile_n)
        heads, rows, cols = self._coordinates()
        tile_of_pair = (heads * tiles_m + rows // tile_m) * tiles_n + cols // tile_n
        tiles, pair_tile, pairs_in_tile = _group(tile_of_pair, self._stored_heads * tiles_m * tiles_n)
        # A tile is full when its allowed pairs are all its pairs inside the problem.
        tile_row, tile_col = (tiles // tiles_n) % tiles_m, tiles % tiles_n
        height = numpy.minimum(tile_m, nq - tile_row * tile_m)
        width = numpy.minimum(tile_n, nk - tile_col * tile_n)
        partial = pairs_in_tile < height * width
        slot = numpy.where(partial, numpy.cumsum(partial) - 1, -1).astype(numpy.int32)
        if tiles.size > _csr.INT32_MAX or int(partial.sum()) * tile_m > _csr.INT32_MAX:
            # A shared mask stores one pattern, whatever the heads of the call.
            fewer_heads = ", or fewer heads per call" if self._stored_heads > 1 else ""
            raise ValueError(f"the mask has too many {tile_m}x{tile_n} tiles for int32 indices; "
                             f"it needs fewer non-empty tiles: use shorter sequences{fewer_heads}")

        words_per_row = bitmask_words_per_row(tile_n)
        pair_slot = slot[pair_tile].astype(numpy.int64)
        in_partial = pair_slot >= 0
        bit = ((pair_slot[in_partial] * tile_m + rows[in_partial] % tile_m) * words_per_row
               * WORD_BITS + cols[in_partial] % tile_n)
        nwords = int(partial.sum()) * tile_m * words_per_row
        # Each bit is set once, so a weighted count sums distinct powers of two: exact in float64.
        words = numpy.bincount(bit >> 5, weights=numpy.left_shift(1, bit & 31).astype(numpy.float64),
                               minlength=nwords).astype(numpy.uint32)

        row_ptr, col_idx = _csr.csr_from_keys(tiles, self._stored_heads, tiles_m, tiles_n)
        by_key = (tiles // (tiles_m * tiles_n) * tiles_n + tile_col) * tiles_m + tile_row
        order = numpy.argsort(by_key, kind="stable")
        col_ptr, row_idx = _csr.csr_from_keys(by_key[order], self._stored_heads, tiles_n, tiles_m)
        arrays = (row_ptr, col_idx, col_ptr, row_idx, slot, slot[order], words)
        return TileBits(*(_readonly(a.astype(numpy.int32) if a is not words else a) for a in arrays))

    # -- pictures and summaries -------------------------------------------------------------------

    def render(self, head=0, tile=REPORT_TILE, max_rows=32, max_cols=64):
        """A text picture of one head's tiles: '█' full, '▒' partial, '·' empty.

        Larger patterns are shrunk to ``max_rows × max_cols`` characters; a character shows the
        most work among the tiles it stands for (partial counts as less than full).
        """
        from ._blockmask import _head_index

        head = _head_index(head, self._stored_heads, self._num_heads)
        max_rows, max_cols = picture_size(max_rows, max_cols)
        tile_m, tile_n = tile_pair("tile", tile)
        bits = self.tile_bits(tile_m, tile_n)
        tiles_m, tiles_n = bits.row_ptr.shape[1] - 1, bits.col_ptr.shape[1] - 1
        rows, cols = min(tiles_m, max_rows), min(tiles_n, max_cols)
        start, stop = bits.row_ptr[head, 0], bits.row_ptr[head, -1]
        tile_rows = numpy.repeat(numpy.arange(tiles_m), numpy.diff(bits.row_ptr[head]))
        tile_cols = bits.col_idx[start:stop].astype(numpy.int64)
        level = numpy.where(bits.row_slot[start:stop] >= 0, 1, 2)  # 0 empty, 1 partial, 2 full
        picture = numpy.zeros((rows, cols), dtype=numpy.int8)
        numpy.maximum.at(picture, (tile_rows * rows // tiles_m, tile_cols * cols // tiles_n), level)
        glyphs = numpy.array(["·", "▒", "█"])[picture]
        return "\n".join("".join(line) for line in glyphs)

    def _keys(self):
        return _csr.keys_from_csr(self._row_ptr, self._col_idx, self._shape[1])

    def __eq__(self, other):
        if not isinstance(other, ExactMask):
            return NotImplemented
        return (self._shape == other._shape and self._num_heads == other._num_heads
                and numpy.array_equal(self._row_ptr, other._row_ptr)
                and numpy.array_equal(self._col_idx, other._col_idx))

    def __hash__(self):
        if self._hash is None:
            value = hash((self._shape, self._num_heads, self._keys().tobytes()))
            object.__setattr__(self, "_hash", value)
        return self._hash

    def __reduce__(self):
        return _rebuild, (self._shape, self._num_heads, self._keys())

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        (nq, nk) = self._shape
        counts = self.tile_counts(*REPORT_TILE)
        return (f"ExactMask(shape=({nq}, {nk}), num_heads={self._num_heads}, nnz={self.nnz}, "
                f"density={self.density:.4g}, {counts.describe()})")


def _group(values, bound):
    """``(unique, inverse, counts)`` of non-negative int64 ``values`` below ``bound``: a count
    per possible value when there are few, a sort otherwise."""
    if bound <= max(1 << 22, 4 * values.size):
        counts = numpy.bincount(values, minlength=bound)
        unique = numpy.flatnonzero(counts)
        rank = numpy.cumsum(counts > 0) - 1
        return unique, rank[values], counts[unique]
    return numpy.unique(values, return_inverse=True, return_counts=True)
