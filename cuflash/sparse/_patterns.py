"""Sparse attention patterns as scipy.sparse bool ``csr_array``.

Conventions shared by every builder:

- Each pattern is defined on tokens: entry ``(i, j)`` says whether query ``i`` attends key ``j``.
  Lengths, windows, strides and radii are in tokens.
- ``block_size=None`` returns that element-level pattern, shape ``(nq, nk)``. With
  ``block_size=b`` or ``(bq, bk)`` the result is the same pattern coarsened to blocks, shape
  ``(ceil(nq / bq), ceil(nk / bk))``: block ``(I, J)`` is set exactly when some element in it is
  (partial last blocks included). It is computed without listing elements, so it is the cheap
  form for long sequences; pass it on with ``BlockMask.from_scipy(p, level="block", ...)``.
  Element-level patterns store every pair and are meant for short sequences, tests, and
  combining patterns element-wise before coarsening.
- ``nk`` defaults to ``nq``. When they differ, the sequences are aligned at their ends, as
  ``causal=True`` is: query ``i`` sits at key position ``i + nk - nq``.
- Only ``causal``, ``prefix_lm`` and ``document(..., causal=True)`` cut keys after the query's
  position; for causal variants of the others pass ``causal=True`` to the attention call (or
  ``.multiply(causal(...))`` element-wise).
"""

import numbers

import numpy

from .._checks import check_bool, integer_sequence
from ._convert import _describe, _set_coordinates
from ._csr import ramp, sorted_unique
from ._intervals import Grid, every_unit_attends, union
from ._validate import (nonnegative_int, nonnegative_pair, positive_int, positive_pair,
                        problem_shape)

_INT64_MAX = 2**63 - 1


def causal(nq, nk=None, *, block_size=None):
    """Query ``i`` attends keys ``j <= i + nk - nq`` (bottom-right aligned causal mask)."""
    grid = Grid(nq, nk, block_size)
    units, _, last = grid.query_ranges()
    return grid.to_sparse(grid.keys(units, numpy.zeros_like(last), last + grid.offset))


def sliding_window(nq, nk=None, *, window, block_size=None):
    """Local attention: query ``i`` attends keys within ``window`` tokens of its position.

    ``window`` is an int ``w`` (keys ``i' - w .. i' + w``) or a pair ``(left, right)`` (keys
    ``i' - left .. i' + right``, as flash-attn's ``window_size``), ``i' = i + nk - nq``. Each
    side is 0 or more: flash-attn's -1 (unbounded) is not taken; a side of ``nq + nk`` or more is
    unbounded here.
    """
    grid = Grid(nq, nk, block_size)
    left, right = nonnegative_pair("window", window)
    return grid.to_sparse(grid.keys(*_band(grid, left, right)))


def strided(nq, nk=None, *, stride, window=None, block_size=None):
    """The Sparse Transformer's strided pattern (Child et al. 2019), without the causal cut.

    Query ``i`` attends key ``j`` when ``|i' - j| <= window`` (local part) or when ``i' - j`` is
    a multiple of ``stride`` (strided part), ``i' = i + nk - nq``. ``window`` defaults to
    ``stride``, the paper's choice; it may be a pair ``(left, right)``.

    At block level the strided part keeps every block crossed by the diagonals ``i' - j = m ·
    stride``: it is sparse only when ``stride`` is well above the block size.
    """
    grid = Grid(nq, nk, block_size)
    stride = positive_int("stride", stride)
    left, right = nonnegative_pair("window", stride if window is None else window)
    # |i' - j| < nq + nk: a longer stride has the main diagonal alone, as nq + nk has.
    stride = min(stride, grid.reach)
    units, first, last = grid.query_ranges()
    first, last = first + grid.offset, last + grid.offset
    # Key j = i' - m * stride lies in 0..nk-1 for m in [m_lo, m_hi] for some i' in the unit.
    m_lo = -((grid.nk - 1 - first) // stride)
    m_hi = last // stride
    counts = numpy.maximum(m_hi - m_lo + 1, 0)
    m = numpy.repeat(m_lo, counts) + ramp(counts)
    diagonals = (numpy.repeat(units, counts), numpy.repeat(first, counts) - m * stride,
                 numpy.repeat(last, counts) - m * stride)
    return grid.to_sparse(grid.keys(*union(_band(grid, left, right), diagonals)))


def fixed(nq, nk=None, *, stride, summary=1, block_size=None):
    """The Sparse Transformer's fixed pattern (Child et al. 2019), without the causal cut.

    Keys are cut into segments of ``stride`` tokens. Query ``i`` attends every key of its own
    segment (``j // stride == i' // stride``, ``i' = i + nk - nq``) and the last ``summary``
    keys of every segment (``j % stride >= stride - summary``), which all queries see.
    """
    grid = Grid(nq, nk, block_size)
    stride = positive_int("stride", stride)
    summary = positive_int("summary", summary)
    if summary > stride:
        raise ValueError(f"summary must be at most stride={stride}, got {summary}")
    if stride > grid.reach:
        # Every position lies in the first segment (or before the keys): the same pattern with
        # segments of nq + nk tokens and the summary keys j >= stride - summary.
        summary, stride = max(summary - (stride - grid.reach), 0), grid.reach
    units, first, last = grid.query_ranges()
    segment_first = (first + grid.offset) // stride * stride
    segment_last = (last + grid.offset) // stride * stride + stride - 1
    summary_keys = [numpy.arange(first_key, grid.nk, stride)
                    for first_key in range(stride - summary, stride)]
    summary_units = grid.key_units(numpy.concatenate(summary_keys or [[]]))
    intervals = union((units, segment_first, segment_last), every_unit_attends(grid, summary_units))
    return grid.to_sparse(grid.keys(*intervals))


def butterfly(nq, nk=None, *, block_size=None):
    """The flat butterfly pattern: query ``i`` attends key ``j`` when ``i' XOR j`` is 0 or a
    power of two (``i' = i + nk - nq``).

    This is the union of the supports of all butterfly factors (the "flat block butterfly" of
    Pixelated Butterfly, used with FlashAttention's block-sparse attention). For square blocks
    whose size is a power of two the block-level pattern is the same rule applied to block
    indices: block ``(I, J)`` is kept when ``I XOR J`` is 0 or a power of two.
    """
    grid = Grid(nq, nk, block_size)
    bits = (grid.nk - 1).bit_length()  # flipping a higher bit lands past the last key
    units, first, last = grid.query_ranges()
    # Queries before the first key (nq > nk) align to negative positions; flipping a low bit
    # keeps them negative, so they attend nothing.
    lo, hi = numpy.maximum(first + grid.offset, 0), last + grid.offset
    seen = lo <= hi
    units, lo, hi = units[seen], lo[seen], hi[seen]
    # Units per chunk: about 2^16 intervals at a time keeps memory bounded for long sequences,
    # and whole units per chunk keep the chunks' sorted keys in order.
    step = max(1, (1 << 16) // (5 * bits + 1))
    chunks = [grid.keys(*union((units[s:s + step], lo[s:s + step], hi[s:s + step]),
                               *_flipped(units[s:s + step], lo[s:s + step], hi[s:s + step], bits)))
              for s in range(0, units.size, step)]
    return grid.to_sparse(numpy.concatenate(chunks) if chunks else numpy.zeros(0, numpy.int64))


def longformer(nq, nk=None, *, window, global_tokens=0, block_size=None):
    """Longformer's pattern (Beltagy et al. 2020): a sliding window plus global tokens.

    ``window`` is as in :func:`sliding_window`. ``global_tokens`` is a count ``g`` (the first
    ``g`` tokens) or a sequence of key positions. Every query attends the global keys, and the
    global tokens' queries (query ``t - nk + nq`` for key position ``t``) attend every key.
    """
    grid = Grid(nq, nk, block_size)
    left, right = nonnegative_pair("window", window)
    intervals = union(_band(grid, left, right), *_global(grid, global_tokens))
    return grid.to_sparse(grid.keys(*intervals))


def bigbird(nq, nk=None, *, block_size, window, num_random, global_tokens=0, seed=0):
    """BigBird's block pattern (Zaheer et al. 2020): window, global tokens and random blocks.

    The window and global part is :func:`longformer` at block level. On top of it every query
    block attends ``num_random`` more key blocks, drawn uniformly without replacement from the
    blocks it does not already attend (all of them if fewer are left), using
    ``numpy.random.default_rng(seed)``: the same arguments always give the same pattern. Give
    each head its own ``seed`` for per-head patterns.

    BigBird is defined on blocks, so ``block_size`` is required and the result is block-level.
    """
    if block_size is None:
        raise ValueError("block_size is required: BigBird's random part is drawn per block")
    base = longformer(nq, nk, window=window, global_tokens=global_tokens, block_size=block_size)
    num_random = nonnegative_int("num_random", num_random)
    rng = numpy.random.default_rng(_seed(seed))
    nqb, nkb = base.shape
    random_keys = []
    for row in range(nqb):
        taken = base.indices[base.indptr[row]:base.indptr[row + 1]].astype(numpy.int64)
        free = nkb - taken.size
        ranks = rng.choice(free, size=min(num_random, free), replace=False)
        # The k-th free column is k plus the number of taken columns before it.
        free_before_taken = taken - numpy.arange(taken.size)
        columns = ranks + numpy.searchsorted(free_before_taken, ranks, side="right")
        random_keys.append(row * nkb + columns)
    grid = Grid(nq, nk, block_size)
    base_keys = numpy.repeat(numpy.arange(nqb, dtype=numpy.int64), numpy.diff(base.indptr)) * nkb
    base_keys += base.indices
    return grid.to_sparse(sorted_unique(numpy.concatenate([base_keys, *random_keys])))


def image_local(height, width, *, radius, block_size=None):
    """2-D neighbourhood attention over an image flattened row-major (``n = height · width``).

    Pixel ``(r, c)`` at sequence position ``r · width + c`` attends the pixels ``(r', c')`` with
    ``max(|r - r'|, |c - c'|) <= radius`` (a square of side ``2 · radius + 1``, clipped at the
    image border). At block level, a block of consecutive pixels attends another block when any
    pixel pair between them is that close.
    """
    height, width = positive_int("height", height), positive_int("width", width)
    # A radius of max(height, width) already reaches every pixel.
    radius = min(nonnegative_int("radius", radius), max(height, width))
    grid = Grid(height * width, None, block_size, nq_name="height * width")
    units, first, last = grid.query_ranges()
    # Split each unit's run of pixels into its pieces on each image row.
    first_row, last_row = first // width, last // width
    pieces = last_row - first_row + 1
    unit = numpy.repeat(units, pieces)
    row = numpy.repeat(first_row, pieces) + ramp(pieces)
    col_first = numpy.maximum(numpy.repeat(first, pieces) - row * width, 0)
    col_last = numpy.minimum(numpy.repeat(last, pieces) - row * width, width - 1)
    # Each piece reaches the rows within the radius, widened by the radius on each side.
    shifts = numpy.arange(-radius, radius + 1)
    key_row = (row[:, None] + shifts[None, :]).ravel()
    unit = numpy.repeat(unit, shifts.size)
    lo = numpy.repeat(numpy.maximum(col_first - radius, 0), shifts.size)
    hi = numpy.repeat(numpy.minimum(col_last + radius, width - 1), shifts.size)
    inside = (key_row >= 0) & (key_row < height)
    key_row, unit, lo, hi = key_row[inside], unit[inside], lo[inside], hi[inside]
    return grid.to_sparse(grid.keys(unit, key_row * width + lo, key_row * width + hi))


def document(lengths, *, causal=False, block_size=None):
    """Packed sequences (document masking): tokens attend only within their own document.

    ``lengths`` are the documents' lengths in tokens, in order; the problem is
    ``n = sum(lengths)`` queries and keys. Query ``i`` of the document ``[s, e)`` attends keys
    ``s <= j < e``, or with ``causal=True`` keys ``s <= j <= i``. At block level a block is kept
    when any of its pairs is (blocks straddling two documents hold parts of both). Documents of
    0 tokens hold nothing (as empty sequences of packed offsets, ``numpy.diff(cu_seqlens)``); at
    least one document must have tokens.
    """
    causal = check_bool(causal, "causal")
    # No documents is a sequence of integers without a token: a value refused below, as
    # documents that are all empty are.
    lengths = integer_sequence("lengths", lengths, "a 1-D sequence of integers")
    if (lengths < 0).any() or not lengths.any():
        raise ValueError(f"lengths must be 0 or more, at least one of them positive, got "
                         f"{lengths[lengths < 0][:5].tolist() or lengths[:5].tolist()}")
    # The positions below are int64: a longer problem would wrap round to another one.
    total = sum(lengths.tolist())  # Python ints: exact
    if total > _INT64_MAX:
        raise ValueError(f"lengths must sum to at most 2**63 - 1 tokens, got a sum of {total}")
    # int64 throughout: unsigned lengths would turn the arithmetic below into float64. Empty
    # documents hold no token: the intervals below are those of the others.
    lengths = lengths[lengths > 0].astype(numpy.int64)
    ends = numpy.cumsum(lengths)
    starts = ends - lengths
    grid = Grid(int(ends[-1]), None, block_size, nq_name="sum(lengths)")
    # Every (query unit, document) pair that overlaps, as one key interval each.
    first_unit, last_unit = starts // grid.bq, (ends - 1) // grid.bq
    counts = last_unit - first_unit + 1
    doc = numpy.repeat(numpy.arange(lengths.size), counts)
    units = numpy.repeat(first_unit, counts) + ramp(counts)
    lo = starts[doc]
    hi = ends[doc] - 1
    if causal:
        last_query = numpy.minimum((units + 1) * grid.bq, ends[doc]) - 1
        hi = numpy.minimum(hi, last_query)
    return grid.to_sparse(grid.keys(units, lo, hi))


def prefix_lm(nq, nk=None, *, prefix, block_size=None):
    """Prefix language modelling: every query attends the first ``prefix`` keys (bidirectional
    within the prefix) and, after it, causally: query ``i`` attends key ``j`` when
    ``j < prefix`` or ``j <= i'`` (``i' = i + nk - nq``)."""
    grid = Grid(nq, nk, block_size)
    prefix = nonnegative_int("prefix", prefix)
    if prefix > grid.nk:
        raise ValueError(f"prefix={prefix} exceeds the key length nk={grid.nk}")
    units, _, last = grid.query_ranges()
    return grid.to_sparse(grid.keys(units, numpy.zeros_like(last),
                                    numpy.maximum(last + grid.offset, prefix - 1)))


def expand_blocks(pattern, *, block_size, shape):
    """A block-level scipy.sparse pattern (one entry per ``bq × bk`` block, e.g. from
    :func:`bigbird`; a block is set when its entry is nonzero) as the element-level pattern of
    shape ``shape = (nq, nk)`` that sets every pair of a set block: for
    ``ExactMask.from_scipy``. Partial last blocks are cut at the problem's edge."""
    import scipy.sparse

    if not scipy.sparse.issparse(pattern) or pattern.ndim != 2:
        if scipy.sparse.issparse(pattern):
            hint = f" with {pattern.ndim} dimensions"
        elif hasattr(pattern, "shape"):
            hint = " (scipy.sparse.csr_array(layout) takes a dense layout)"
        else:
            hint = ""
        raise TypeError(f"pattern must be a 2-D scipy.sparse matrix or array of blocks, got "
                        f"{_describe(pattern)}{hint}")
    bq, bk = positive_pair("block_size", block_size)
    nq, nk = problem_shape("shape", shape)
    expected = (-(-nq // bq), -(-nk // bk))
    if tuple(pattern.shape) != expected:
        raise ValueError(f"pattern has shape {tuple(pattern.shape)}, but shape={(nq, nk)} with "
                         f"block_size=({bq}, {bk}) has {expected} blocks")
    # Blocks whose value is 0 (stored zeros, duplicates that cancel) are not set: no entries.
    rows, cols = _set_coordinates(pattern)
    blocks = scipy.sparse.csr_array((numpy.ones(rows.size, dtype=bool), (rows, cols)),
                                    shape=pattern.shape)
    elements = scipy.sparse.kron(blocks, numpy.ones((bq, bk), dtype=bool), format="csr")
    # kron gives float64 when no block is set: the result is bool, as every builder's is.
    return scipy.sparse.csr_array(elements[:nq, :nk], dtype=bool)


# -- helpers ----------------------------------------------------------------------------------


def _band(grid, left, right):
    """Keys ``i' - left .. i' + right`` for every query ``i`` of each unit, as one interval.
    Sides are cut to ``grid.reach``, which already reaches every key."""
    left, right = min(left, grid.reach), min(right, grid.reach)
    units, first, last = grid.query_ranges()
    return units, first + grid.offset - left, last + grid.offset + right


def _flipped(units, lo, hi, bits):
    """Intervals holding ``{i XOR 2^k : lo <= i <= hi}`` exactly, per unit, for each ``k < bits``.

    XOR 2^k swaps the two halves of every aligned run of 2^(k+1) positions, so it moves each
    aligned run of 2^k positions onto its neighbour, keeping offsets. The part of ``lo..hi`` in
    its first run and the part in its last run each move as one interval. Whole runs between
    move in pairs onto themselves, but for a lone odd first one (onto the run before it) and a
    lone even last one (onto the run after it): at most five intervals, whatever the length.
    """
    parts = []
    for k in range(bits):
        flip = 1 << k
        first_run, last_run = lo >> k, hi >> k
        one_run = first_run == last_run
        head_hi = numpy.where(one_run, hi, ((first_run + 1) << k) - 1)
        parts.append((units, lo ^ flip, head_hi ^ flip))
        tail = ~one_run
        parts.append((units[tail], (last_run[tail] << k) ^ flip, hi[tail] ^ flip))
        q0, q1 = first_run + 1, last_run - 1  # the whole runs between
        odd_first = (q0 <= q1) & (q0 % 2 == 1)
        even_last = (q0 <= q1) & (q1 % 2 == 0)
        pairs_lo, pairs_hi = q0 + odd_first, q1 - even_last
        parts.append((units[odd_first], (q0[odd_first] - 1) << k, (q0[odd_first] << k) - 1))
        parts.append((units[even_last], (q1[even_last] + 1) << k,
                      ((q1[even_last] + 2) << k) - 1))
        paired = pairs_lo <= pairs_hi
        parts.append((units[paired], pairs_lo[paired] << k, ((pairs_hi[paired] + 1) << k) - 1))
    return parts


def _global(grid, global_tokens):
    """Intervals for global tokens: all queries see their keys, their queries see all keys."""
    positions = _global_positions(global_tokens, grid.nk)
    columns = every_unit_attends(grid, grid.key_units(positions))
    query_positions = positions - grid.offset
    query_positions = query_positions[(query_positions >= 0) & (query_positions < grid.nq)]
    row_units = grid.query_units(query_positions)
    full = numpy.full(row_units.size, grid.nk - 1, dtype=numpy.int64)
    return columns, (row_units, numpy.zeros_like(full), full)


def _global_positions(global_tokens, nk):
    if isinstance(global_tokens, numbers.Integral) and not isinstance(global_tokens, bool):
        count = nonnegative_int("global_tokens", global_tokens)
        if count > nk:
            raise ValueError(f"global_tokens={count} exceeds the sequence length nk={nk}")
        return numpy.arange(count, dtype=numpy.int64)
    positions = integer_sequence("global_tokens", global_tokens,
                                 "a count or a 1-D sequence of integer key positions")
    # Checked before the cast to int64, which would wrap positions past it round into range.
    outside = positions[(positions < 0) | (positions >= nk)]
    if outside.size:
        raise ValueError(
            f"global_tokens must be key positions in 0..{nk - 1}, got {outside[:5].tolist()}")
    return numpy.unique(positions.astype(numpy.int64))


def _seed(seed):
    if isinstance(seed, numpy.random.Generator):
        raise TypeError("seed must be an integer (a Generator would make the pattern depend on "
                        "its state); got a numpy.random.Generator")
    return nonnegative_int("seed", seed)
