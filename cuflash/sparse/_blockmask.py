"""BlockMask: an immutable block-sparsity pattern for one attention problem.

The pattern is stored at block resolution as per-head CSR (key blocks of each query block) and its
transpose (query blocks of each key block), in the flat layout described in ``_csr``. Tile-level
copies for the kernels are derived from it on demand and cached on the instance.
"""

import numpy
import scipy.sparse

from . import _convert, _csr
from ._csr import TileCSR
from ._validate import ceil_div, picture_size, positive_int, positive_pair, problem_shape

_LEVELS = ("element", "block")


def _readonly(array):
    array = numpy.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def _rebuild(shape, block_size, num_heads, keys):
    return BlockMask._from_keys(keys, shape=shape, block_size=block_size, num_heads=num_heads)


class BlockMask:
    """Which ``bq × bk`` blocks of an ``(Nq, Nk)`` attention matrix are computed.

    Build one with :meth:`from_scipy` (any scipy.sparse pattern, at element or block resolution)
    or :meth:`from_dense` (a 0/1 block layout, as Triton's block-sparse kernels take). A mask
    holds either one pattern shared by all heads (``num_heads is None``) or one per head.

    Blocks are ``Nqb = ceil(Nq / bq)`` by ``Nkb = ceil(Nk / bk)``; when ``Nq`` or ``Nk`` is not a
    multiple of the block size the last block row/column is partial and covers only the real
    rows/columns. A kept block is computed in full (within the problem); the mask never hides
    part of a block. With ``causal=True`` the causal mask applies on top of the kept blocks.

    Masks are immutable and hashable; ``|`` and ``&`` combine two masks of the same problem and
    block size (a shared mask broadcasts against a per-head one), ``.T`` transposes.
    """

    __slots__ = ("_shape", "_block_size", "_num_heads", "_row_ptr", "_col_idx", "_col_ptr",
                 "_row_idx", "_cache", "_hash")

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "BlockMask is built with BlockMask.from_scipy(pattern, level=..., block_size=...) "
            "or BlockMask.from_dense(layout, block_size=...)")

    def __setattr__(self, name, value):
        raise AttributeError(f"BlockMask is immutable; cannot set {name!r}")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def _from_csr(cls, row_ptr, col_idx, col_ptr, row_idx, *, shape, block_size, num_heads):
        self = object.__new__(cls)
        for name, value in (("_shape", tuple(shape)), ("_block_size", tuple(block_size)),
                            ("_num_heads", num_heads), ("_row_ptr", _readonly(row_ptr)),
                            ("_col_idx", _readonly(col_idx)), ("_col_ptr", _readonly(col_ptr)),
                            ("_row_idx", _readonly(row_idx)), ("_cache", {}), ("_hash", None)):
            object.__setattr__(self, name, value)
        return self

    @classmethod
    def _from_keys(cls, keys, *, shape, block_size, num_heads):
        """From sorted unique keys ``(h * Nqb + i) * Nkb + j`` (see ``_csr``)."""
        nqb, nkb = ceil_div(shape[0], block_size[0]), ceil_div(shape[1], block_size[1])
        stored_heads = num_heads or 1
        row_ptr, col_idx = _csr.csr_from_keys(keys, stored_heads, nqb, nkb)
        col_ptr, row_idx = _csr.transpose(row_ptr, col_idx, nkb)
        return cls._from_csr(row_ptr, col_idx, col_ptr, row_idx, shape=shape,
                             block_size=block_size, num_heads=num_heads)

    @classmethod
    def from_scipy(cls, pattern, *, level, block_size=128, shape=None):
        """A mask from a scipy.sparse pattern (any format: csr, csc, coo, bsr, dok, lil, dia,
        as ``*_matrix`` or ``*_array``).

        Parameters
        ----------
        pattern : sparse matrix/array, 3-D sparse array, or sequence of sparse matrices/arrays
            A 2-D pattern is shared by all heads; a 3-D ``(H, ., .)`` array or a sequence of
            ``H`` 2-D patterns gives one pattern per head. An entry is set when its value is
            nonzero: explicitly stored zeros are ignored.
        level : {'element', 'block'}
            Required. ``'element'``: the pattern has shape ``(Nq, Nk)`` and is coarsened to
            blocks, a block being kept when any of its elements is set. ``'block'``: the pattern
            already has one entry per block, shape ``(ceil(Nq / bq), ceil(Nk / bk))``.
        block_size : int or (int, int)
            ``bq`` or ``(bq, bk)``; positive. The kernels need multiples of their tile sizes
            (64 and 128 always work).
        shape : (int, int), optional
            The problem ``(Nq, Nk)``. Taken from the pattern at ``level='element'`` (if given it
            must agree); required at ``level='block'``, where the pattern's shape does not
            determine the lengths of partial last blocks.
        """
        if level not in _LEVELS:
            raise ValueError(
                "level must be 'element' (a pattern of shape (Nq, Nk), coarsened to blocks) or "
                f"'block' (a pattern with one entry per block), got {level!r}")
        block_size = positive_pair("block_size", block_size)
        heads, per_head = _convert.sparse_heads(
            pattern, dense_hint="BlockMask.from_dense for a dense 0/1 block layout")
        pattern_shape = heads[0][0]
        if level == "element":
            if shape is not None and problem_shape("shape", shape) != tuple(pattern_shape):
                raise ValueError(
                    f"shape={tuple(shape)} disagrees with the element-level pattern's shape "
                    f"{tuple(pattern_shape)}; at level='element' the pattern is (Nq, Nk)")
            shape = problem_shape("pattern.shape", pattern_shape)
            scale = block_size
        else:
            if shape is None:
                raise ValueError(
                    "shape=(Nq, Nk) is required with level='block': a block-level pattern does "
                    "not say how long the sequences are")
            shape = problem_shape("shape", shape)
            _check_block_layout(pattern_shape, shape, block_size, "pattern")
            scale = (1, 1)
        nqb, nkb = ceil_div(shape[0], block_size[0]), ceil_div(shape[1], block_size[1])
        keys = [(h * nqb + rows // scale[0]) * nkb + cols // scale[1]
                for h, (_, rows, cols) in enumerate(heads)]
        keys = _csr.sorted_unique(numpy.concatenate(keys))
        return cls._from_keys(keys, shape=shape, block_size=block_size,
                              num_heads=len(heads) if per_head else None)

    @classmethod
    def from_dense(cls, array, *, block_size, shape=None):
        """A mask from a dense 0/1 block layout (bool or integer; NumPy or CuPy).

        ``array`` has shape ``(Nqb, Nkb)`` (shared by all heads) or ``(H, Nqb, Nkb)`` (one
        pattern per head), as Triton's block-sparse layouts. ``shape=(Nq, Nk)`` gives the
        problem size; by default it is ``(Nqb * bq, Nkb * bk)``, whole blocks.
        """
        block_size = positive_pair("block_size", block_size)
        layout = _convert.dense_layout(array, axes="(Nqb, Nkb) or (H, Nqb, Nkb)",
                                       scipy_reader="BlockMask.from_scipy")
        per_head = layout.ndim == 3
        layout = layout if per_head else layout[None]
        if shape is None:
            shape = (layout.shape[1] * block_size[0], layout.shape[2] * block_size[1])
        else:
            shape = problem_shape("shape", shape)
            _check_block_layout(layout.shape[1:], shape, block_size, "array")
        keys = numpy.flatnonzero(layout)
        return cls._from_keys(keys, shape=shape, block_size=block_size,
                              num_heads=layout.shape[0] if per_head else None)

    # -- what the back ends read (docs/internals.md) ---------------------------------------------

    @property
    def shape(self):
        """``(Nq, Nk)``: the problem the mask was built for."""
        return self._shape

    @property
    def block_size(self):
        """``(bq, bk)``."""
        return self._block_size

    @property
    def num_heads(self):
        """Number of per-head patterns, or ``None`` for one pattern shared by all heads."""
        return self._num_heads

    @property
    def nblocks(self):
        """``(Nqb, Nkb)`` = ``(ceil(Nq / bq), ceil(Nk / bk))``."""
        return self._row_ptr.shape[1] - 1, self._col_ptr.shape[1] - 1

    @property
    def _stored_heads(self):
        return self._row_ptr.shape[0]

    def check_compatible(self, Nq, Nk, Hq):
        """Raise ValueError unless the mask fits queries of length Nq, keys of length Nk and Hq
        query heads."""
        if (Nq, Nk) != self._shape:
            raise ValueError(
                f"block_mask was built for Nq={self._shape[0]}, Nk={self._shape[1]}, but the "
                f"inputs have Nq={Nq}, Nk={Nk}")
        if self._num_heads is not None and Hq != self._num_heads:
            raise ValueError(
                f"block_mask holds one pattern per head for {self._num_heads} heads, but the "
                f"query has Hq={Hq} heads (a mask shared by all heads has num_heads=None)")

    def to_dense(self):
        """NumPy bool array ``(H', Nqb, Nkb)`` of kept blocks, ``H'`` = ``num_heads`` or 1."""
        dense = numpy.zeros((self._stored_heads, *self.nblocks), dtype=bool)
        dense.reshape(-1)[self._keys()] = True
        return dense

    def tile_csr(self, tile_m, tile_n):
        """The pattern refined to ``tile_m × tile_n`` tiles, as int32 NumPy arrays.

        The host side of :meth:`device_csr` (same arrays, same layout); cached per tile size.
        """
        tile_m, tile_n = positive_int("tile_m", tile_m), positive_int("tile_n", tile_n)
        key = ("host", tile_m, tile_n)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._refine(tile_m, tile_n)
            self._cache[key] = cached
        return cached

    def device_csr(self, tile_m, tile_n):
        """:meth:`tile_csr` as int32 CuPy arrays on the current device, cached per (device, tile).

        ``row_ptr`` ``(H', Mt + 1)`` / ``col_idx``: key tiles of each query tile row;
        ``col_ptr`` ``(H', Nt + 1)`` / ``row_idx``: query tiles of each key tile column; offsets
        index the flat index arrays of all heads. ``Mt = ceil(Nq / tile_m)``,
        ``Nt = ceil(Nk / tile_n)``. Requires ``bq % tile_m == 0`` and ``bk % tile_n == 0``.
        """
        import cupy

        host = self.tile_csr(tile_m, tile_n)
        key = ("device", cupy.cuda.runtime.getDevice(), tile_m, tile_n)
        cached = self._cache.get(key)
        if cached is None:
            cached = TileCSR(*(cupy.asarray(array) for array in host))
            # The copies are ordered on the current stream only; finish them so that the cached
            # arrays are safe to read from any stream afterwards.
            cupy.cuda.get_current_stream().synchronize()
            self._cache[key] = cached
        return cached

    def _refine(self, tile_m, tile_n):
        (bq, bk), (nq, nk) = self._block_size, self._shape
        if bq % tile_m or bk % tile_n:
            raise ValueError(
                f"the block size (bq, bk)=({bq}, {bk}) must be a multiple of the tile size "
                f"(tile_m, tile_n)=({tile_m}, {tile_n}); build the mask with a block size that "
                "is a multiple of the kernel's tiles (64 and 128 work everywhere)")
        tiles_m, tiles_n = ceil_div(nq, tile_m), ceil_div(nk, tile_n)
        row_ptr, col_idx = _csr.refine(self._row_ptr, self._col_idx, row_ratio=bq // tile_m,
                                       col_ratio=bk // tile_n, out_rows=tiles_m, out_cols=tiles_n)
        col_ptr, row_idx = _csr.refine(self._col_ptr, self._row_idx, row_ratio=bk // tile_n,
                                       col_ratio=bq // tile_m, out_rows=tiles_n, out_cols=tiles_m)
        return TileCSR(*(_readonly(array) for array in (row_ptr, col_idx, col_ptr, row_idx)))

    # -- block-level storage ---------------------------------------------------------------------

    @property
    def row_ptr(self):
        """``(H', Nqb + 1)`` offsets into :attr:`col_idx` (read-only), as in ``device_csr``."""
        return self._row_ptr

    @property
    def col_idx(self):
        """Key blocks of each query block, ascending, all heads in one array (read-only)."""
        return self._col_idx

    @property
    def col_ptr(self):
        """``(H', Nkb + 1)`` offsets into :attr:`row_idx` (read-only)."""
        return self._col_ptr

    @property
    def row_idx(self):
        """Query blocks of each key block, ascending, all heads in one array (read-only)."""
        return self._row_idx

    def _keys(self, num_heads=None):
        """Sorted unique keys; a shared pattern is repeated for ``num_heads`` heads if given."""
        keys = _csr.keys_from_csr(self._row_ptr, self._col_idx, self.nblocks[1])
        if num_heads is not None and self._num_heads is None:
            per_head = self.nblocks[0] * self.nblocks[1]
            keys = (numpy.arange(num_heads)[:, None] * per_head + keys[None, :]).ravel()
        return keys

    # -- summaries -------------------------------------------------------------------------------

    @property
    def nnz_blocks(self):
        """Number of kept blocks, summed over the stored patterns."""
        return int(self._col_idx.size)

    @property
    def density(self):
        """Kept blocks / all blocks (``H' · Nqb · Nkb``); a partial block counts as one."""
        nqb, nkb = self.nblocks
        return self.nnz_blocks / (self._stored_heads * nqb * nkb)

    @property
    def element_density(self):
        """Fraction of the ``H' · Nq · Nk`` (query, key) pairs inside kept blocks.

        Partial last blocks count with their true size, so this is the fraction of the dense
        attention work that the mask keeps.
        """
        (nq, nk), (bq, bk) = self._shape, self._block_size
        nqb, nkb = self.nblocks
        heights = numpy.minimum(bq, nq - numpy.arange(nqb) * bq)
        widths = numpy.minimum(bk, nk - numpy.arange(nkb) * bk)
        columns_per_row = widths[self._col_idx.astype(numpy.int64)]
        row_of_entry = numpy.repeat(numpy.tile(numpy.arange(nqb), self._stored_heads),
                                    numpy.diff(self._row_ptr, axis=1).ravel())
        # in float64: exact below 2**53 pairs, where an int64 count would overflow past 2**63
        covered = numpy.dot(heights[row_of_entry].astype(numpy.float64),
                            columns_per_row.astype(numpy.float64))
        return float(covered) / (self._stored_heads * nq * nk)

    # -- conversions -----------------------------------------------------------------------------

    def to_scipy(self):
        """Block-level bool ``csr_array`` ``(Nqb, Nkb)``; a list of them for a per-head mask."""
        heads = []
        for h in range(self._stored_heads):
            start, stop = self._row_ptr[h, 0], self._row_ptr[h, -1]
            indices = self._col_idx[start:stop].copy()
            indptr = self._row_ptr[h] - start
            data = numpy.ones(indices.size, dtype=bool)
            heads.append(scipy.sparse.csr_array((data, indices, indptr), shape=self.nblocks))
        return heads if self._num_heads is not None else heads[0]

    def to_element_dense(self):
        """NumPy bool array ``(H', Nq, Nk)``: which (query, key) pairs lie in kept blocks.

        Allocates ``H' · Nq · Nk`` bytes: meant for small problems (tests, pictures).
        """
        (nq, nk), (bq, bk) = self._shape, self._block_size
        blocks = self.to_dense()
        return blocks.repeat(bq, axis=1).repeat(bk, axis=2)[:, :nq, :nk]

    def render(self, head=0, max_rows=64, max_cols=128):
        """A text picture of one head's blocks: '█' kept, '·' skipped, one line per row.

        Larger patterns are shrunk to ``max_rows × max_cols`` characters; a character is '█' when
        any block it stands for is kept.
        """
        head = _head_index(head, self._stored_heads, self._num_heads)
        max_rows, max_cols = picture_size(max_rows, max_cols)
        nqb, nkb = self.nblocks
        rows, cols = min(nqb, max_rows), min(nkb, max_cols)
        start, stop = self._row_ptr[head, 0], self._row_ptr[head, -1]
        block_rows = numpy.repeat(numpy.arange(nqb), numpy.diff(self._row_ptr[head]))
        block_cols = self._col_idx[start:stop].astype(numpy.int64)
        picture = numpy.zeros((rows, cols), dtype=bool)
        picture[block_rows * rows // nqb, block_cols * cols // nkb] = True
        glyphs = numpy.where(picture, "█", "·")
        return "\n".join("".join(line) for line in glyphs)

    # -- algebra ---------------------------------------------------------------------------------

    @property
    def T(self):
        """The transposed mask: the ``(Nk, Nq)`` problem with block size ``(bk, bq)``."""
        return BlockMask._from_csr(self._col_ptr, self._row_idx, self._row_ptr, self._col_idx,
                                   shape=self._shape[::-1], block_size=self._block_size[::-1],
                                   num_heads=self._num_heads)

    def _combine(self, other, set_operation, symbol):
        if not isinstance(other, BlockMask):
            return NotImplemented
        if self._shape != other._shape or self._block_size != other._block_size:
            raise ValueError(
                f"cannot combine masks with {symbol}: one has shape {self._shape} and block size "
                f"{self._block_size}, the other shape {other._shape} and block size "
                f"{other._block_size}; both must match")
        if None not in (self._num_heads, other._num_heads) and self._num_heads != other._num_heads:
            raise ValueError(
                f"cannot combine masks with {symbol}: they hold patterns for {self._num_heads} and "
                f"{other._num_heads} heads; the counts must match, or one mask must be shared "
                "(num_heads=None)")
        num_heads = self._num_heads if self._num_heads is not None else other._num_heads
        keys = set_operation(self._keys(num_heads), other._keys(num_heads))
        return BlockMask._from_keys(keys, shape=self._shape, block_size=self._block_size,
                                    num_heads=num_heads)

    def __or__(self, other):
        return self._combine(other, _union, "|")

    def __and__(self, other):
        return self._combine(other, _intersection, "&")

    def __eq__(self, other):
        if not isinstance(other, BlockMask):
            return NotImplemented
        return (self._shape == other._shape and self._block_size == other._block_size
                and self._num_heads == other._num_heads
                and numpy.array_equal(self._row_ptr, other._row_ptr)
                and numpy.array_equal(self._col_idx, other._col_idx))

    def __hash__(self):
        if self._hash is None:
            keys = self._keys().astype(numpy.int64).tobytes()
            value = hash((self._shape, self._block_size, self._num_heads, keys))
            object.__setattr__(self, "_hash", value)
        return self._hash

    def __reduce__(self):
        return _rebuild, (self._shape, self._block_size, self._num_heads, self._keys())

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        (nq, nk), (bq, bk), (nqb, nkb) = self._shape, self._block_size, self.nblocks
        return (f"BlockMask(shape=({nq}, {nk}), block_size=({bq}, {bk}), "
                f"num_heads={self._num_heads}, nblocks=({nqb}, {nkb}), "
                f"nnz_blocks={self.nnz_blocks}, density={self.density:.4g})")


def _union(keys, other_keys):
    return _csr.sorted_unique(numpy.concatenate((keys, other_keys)))


def _intersection(keys, other_keys):
    return numpy.intersect1d(keys, other_keys, assume_unique=True)


def _check_block_layout(layout_shape, shape, block_size, name):
    expected = (ceil_div(shape[0], block_size[0]), ceil_div(shape[1], block_size[1]))
    if tuple(layout_shape) != expected:
        raise ValueError(
            f"{name} has {tuple(layout_shape)} blocks, but shape={shape} with block_size="
            f"{block_size} needs (ceil(Nq / bq), ceil(Nk / bk)) = {expected}")


def _head_index(head, stored_heads, num_heads):
    if isinstance(head, bool) or not isinstance(head, (int, numpy.integer)):
        raise TypeError(f"head must be an integer, got {head!r}")
    if not 0 <= head < stored_heads:
        allowed = f"0 to {stored_heads - 1}" if num_heads is not None else "0 (the mask is shared)"
        raise ValueError(f"head must be {allowed}, got {head}")
    return int(head)
