"""FlashAttention in NumPy: the readable statement of what the CUDA kernels do.

The score matrix is never formed. Query rows are processed in tiles of ``BLOCK_M`` and keys in
tiles of ``BLOCK_N`` (or in the blocks of a block mask); memory is O(N·D + tile²) per
(batch, head) pair. All (batch, head) pairs of one tile are processed together, with the query
heads of a grouped-query group laid along an extra axis so that they share their key/value
tile without a copy.

Precision is the kernels': inputs are upcast to float32 tile by tile, every product accumulates in
float32, and the operands the kernels feed to 16-bit tensor-core products (P before P·V; P and dS
in the backward pass) are rounded to the input dtype first.

Masks and score modifiers follow ``cuflash._mask`` (the twin of the kernels' ``mask.cuh`` and
``score_mod.cuh``): tiles that a window, causal, a block mask or an exact mask leaves empty are
never visited, an exact mask's partial tiles read their bits as the kernels do, and the logits
are formed in base 2 as the kernels form them.

Both entry points take the 4-D views described in docs/internals.md and an ``AttentionSpec``
(``cuflash._spec``), and write into the arrays they are given. The tiles are small matrices, for
which BLAS threads bring nothing but overhead: ``OPENBLAS_NUM_THREADS=1`` usually makes this
module faster.

Both entry points run under ``numpy.errstate`` with overflow, invalid and divide ignored
(``cuflash._warnings.quiet``): NumPy's own warnings would name an operation inside this module,
once per tile. ``cuflash._api`` checks the results instead and issues one
``CuflashNumericalWarning`` when finite inputs gave inf or NaN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _dropout, _mask
from ._warnings import quiet

BLOCK_M = 128  # query rows per tile
BLOCK_N = 128  # key rows per tile

LOG2E, LN2 = _mask.LOG2E, _mask.LN2

_F32 = np.float32


@quiet
def forward(q, k, v, out, lse, spec, *, first_batch=0):
    """Write ``attention(q, k, v)`` into ``out`` ``(B, Hq, Nq, Dv)`` and ``lse`` ``(B, Hq, Nq)``.

    Online softmax in base 2: ``S`` holds the logits times ``log2(e)`` (``q kᵀ · scale · log2(e)``
    without a score modifier); for each key tile the running row maximum ``m`` and running sum
    ``l`` are updated and the accumulator rescaled by ``exp2(m_old - m_new)``. At the end
    ``out = acc / l`` and ``lse = (m + log2 l) · ln 2``.

    With dropout (``spec.dropout_p > 0``) the dropped elements of each probability tile are
    zeroed before ``P·V`` (the kept ones are not scaled there), while ``l`` sums the undropped
    ``P``; the factor ``r = _dropout.rescale(p)`` (``1 / (1 − p)`` at the rate the mask really
    drops) is applied once at the end: ``out = acc / l · r``, all in float32. lse is that of the
    undropped softmax. The mask is ``_dropout.keep_mask`` of each element's own coordinates, so
    it does not depend on the tiles.

    A varlen spec (packed sequences: q ``(total_q, Hq, D)``, out ``(total_q, Hq, Dv)``, lse
    ``(Hq, total_q)``) runs this on each sequence in turn (``_sequences``).
    """
    if spec.varlen is not None:
        for b, seq, rows_q, rows_k in _sequences(spec):
            if seq.shapes.nq:
                forward(*(_batch_of(x, rows) for x, rows in ((q, rows_q), (k, rows_k),
                                                             (v, rows_k), (out, rows_q))),
                        lse[None, :, rows_q], seq, first_batch=b)
        return
    b, hq, nq, _ = q.shape
    hkv, nk, dv = v.shape[1], v.shape[2], v.shape[3]
    grid = _TileGrid(spec, nq, nk, hq, hkv)
    scores = _Scores(spec, hkv)
    dropout = _Dropout(spec, b, hq, hkv, first_batch)
    k_tiles = k[:, :, None]  # (B, Hkv, 1, Nk, D): one key/value head for a group of query heads
    v_tiles = v[:, :, None]

    for i in range(grid.row_tiles):
        rows = grid.rows(i)
        qi = _grouped(q[:, :, rows], hkv).astype(_F32)  # (B, Hkv, G, m, D)
        shape = qi.shape[:-1] + (1,)
        row_max = np.full(shape, -np.inf, _F32)
        row_sum = np.zeros(shape, _F32)
        acc = np.zeros(qi.shape[:-1] + (dv,), _F32)

        for j in grid.live_in_row(i):
            cols = grid.cols(j)
            s, _ = scores(qi @ k_tiles[..., cols, :].astype(_F32).swapaxes(-1, -2), rows, cols)
            keep = grid.keep(i, j)
            if keep is not None:  # only tiles that straddle the band's edge or mask some heads
                s = np.where(keep, s, -np.inf)
            new_max = np.maximum(row_max, s.max(axis=-1, keepdims=True))
            # A row that has seen only masked keys keeps max -inf; subtracting 0 instead makes
            # its probabilities exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
            safe_max = np.where(new_max == -np.inf, _F32(0), new_max)
            p = np.exp2(s - safe_max)
            correction = np.exp2(row_max - safe_max)
            row_sum = row_sum * correction + p.sum(axis=-1, keepdims=True)
            if dropout:
                p = dropout.drop(p, rows, cols)
            acc = acc * correction + _as_operand(p, v.dtype) @ v_tiles[..., cols, :].astype(_F32)
            row_max = new_max

        empty = row_sum == 0  # nothing attended: output 0, lse -inf
        safe_sum = np.where(empty, _F32(1), row_sum)
        result = acc / safe_sum
        if dropout:
            result = result * dropout.rescale
        out[:, :, rows] = result.reshape(b, hq, -1, dv).astype(out.dtype)
        row_lse = np.where(empty, -np.inf, (row_max + np.log2(safe_sum)) * _F32(LN2))
        lse[:, :, rows] = row_lse.reshape(b, hq, -1)


@quiet
def backward(dout, q, k, v, out, lse, dq, dk, dv, spec, *, first_batch=0):
    """Write the gradients of ``forward`` into ``dq``, ``dk``, ``dv``.

    For each key/value tile (outer loop) and each query tile that reaches it: recompute
    ``P = exp2(S − lse · log2 e)`` (``S`` the base-2 logits of ``forward``), then
    ``dV += Pᵀ dO``, ``dP = dO Vᵀ``, ``dS = P ∘ (dP − Δ) ∘ g`` with ``Δ = rowsum(dO ∘ O)`` and
    ``g`` the score modifier's ``dlogit / d(scale·s)`` (``1 − tanh²`` under softcap, else 1),
    ``dK += scale · dSᵀ Q`` and ``dQ += scale · dS K``. ``spec.deterministic`` changes nothing
    here: this loop always adds in the same order.

    With dropout the mask ``Z`` of the forward is regenerated per tile and, with
    ``r = _dropout.rescale(p)``: ``dV += (P ∘ Z)ᵀ dO`` (the tile's sum times ``r`` at the end,
    as the forward scales its output), ``dP = (dO Vᵀ) ∘ Z · r``, and ``dS = P ∘ (dP − Δ)`` with
    ``Δ = rowsum(dO ∘ O)`` of the dropped output ``O``.

    A varlen spec (packed ``(total, H, D)`` arrays, lse ``(Hq, total_q)``) runs this on each
    sequence in turn; keys of a sequence without queries get gradient 0.
    """
    if spec.varlen is not None:
        for b, seq, rows_q, rows_k in _sequences(spec):
            if seq.shapes.nq == 0:
                dk[rows_k] = 0
                dv[rows_k] = 0
                continue
            views = [_batch_of(x, rows) for x, rows in ((dout, rows_q), (q, rows_q), (k, rows_k),
                                                         (v, rows_k), (out, rows_q))]
            grads = [_batch_of(x, rows) for x, rows in ((dq, rows_q), (dk, rows_k), (dv, rows_k))]
            backward(*views, lse[None, :, rows_q], *grads, seq, first_batch=b)
        return
    hkv, nk = k.shape[1], k.shape[2]
    b, hq, nq, d = q.shape
    grid = _TileGrid(spec, nq, nk, hq, hkv)
    scores = _Scores(spec, hkv)
    dropout = _Dropout(spec, b, hq, hkv, first_batch)
    scale32 = _F32(spec.scale)

    # Per-row constants, (B, Hkv, G, Nq, 1).
    delta = _grouped((dout.astype(_F32) * out.astype(_F32)).sum(axis=-1)[..., None], hkv)
    # A fully masked row has lse -inf; +inf makes every P of that row exp2(-inf) = 0.
    lse_log2 = np.where(np.isneginf(lse), np.inf, lse * _F32(LOG2E)).astype(_F32)
    lse_log2 = _grouped(lse_log2[..., None], hkv)

    dq_acc = np.zeros((b, hkv, hq // hkv, nq, d), _F32)
    for j in range(grid.col_tiles):
        cols = grid.cols(j)
        kj = k[:, :, None, cols].astype(_F32)  # (B, Hkv, 1, n, D)
        vj = v[:, :, None, cols].astype(_F32)
        dk_acc = np.zeros(kj.shape, _F32)
        dv_acc = np.zeros(vj.shape, _F32)

        for i in grid.live_in_col(j):
            rows = grid.rows(i)
            qi = _grouped(q[:, :, rows], hkv).astype(_F32)  # (B, Hkv, G, m, D)
            doi = _grouped(dout[:, :, rows], hkv).astype(_F32)
            s, grad = scores(qi @ kj.swapaxes(-1, -2), rows, cols)
            keep = grid.keep(i, j)
            if keep is not None:
                s = np.where(keep, s, -np.inf)
            p = np.exp2(s - lse_log2[..., rows, :])
            kept = dropout.keep(rows, cols) if dropout else None
            p_out = p if kept is None else np.where(kept, p, _F32(0))  # what multiplied V
            # Sums over the group axis add the contributions of every query head of the group.
            dv_acc += (_as_operand(p_out, v.dtype).swapaxes(-1, -2) @ doi).sum(axis=2,
                                                                               keepdims=True)
            dp = doi @ vj.swapaxes(-1, -2)
            if kept is not None:
                dp = np.where(kept, dp * dropout.rescale, _F32(0))
            ds = p * (dp - delta[..., rows, :])
            if grad is not None:
                ds = ds * grad
            ds = _as_operand(ds, q.dtype)
            dk_acc += (ds.swapaxes(-1, -2) @ qi).sum(axis=2, keepdims=True) * scale32
            dq_acc[..., rows, :] += (ds @ kj) * scale32

        # Key tiles that no query reaches get zeros: the back end writes every element.
        if dropout:
            dv_acc = dv_acc * dropout.rescale
        dk[:, :, cols] = dk_acc[:, :, 0].astype(dk.dtype)
        dv[:, :, cols] = dv_acc[:, :, 0].astype(dv.dtype)
    dq[...] = dq_acc.reshape(b, hq, nq, d).astype(dq.dtype)


def _sequences(spec):
    """``(b, spec of sequence b, its query rows, its key rows)`` for each sequence of a varlen
    spec: a dense spec of one batch element with the sequence's own lengths (so causal, windows
    and ALiBi align to each sequence) and its row of ALiBi slopes; rows are slices of the packed
    axis. The dropout mask takes ``b`` as its batch index (``first_batch``), and the rows and
    keys within the sequence."""
    for b, rows_q, rows_k in spec.varlen.sequences():
        shapes = dataclasses.replace(spec.shapes, batch=(1,), nq=rows_q.stop - rows_q.start,
                                     nk=rows_k.stop - rows_k.start)
        alibi = None if spec.alibi is None else spec.alibi[b:b + 1]
        yield b, dataclasses.replace(spec, shapes=shapes, alibi=alibi, varlen=None), rows_q, rows_k


def _batch_of(x, rows):
    """Rows of a packed ``(total, H, D)`` array (or lse ``(H, total)``'s transpose) as the 4-D
    view ``(1, H, n, D)`` the dense entry points take; writes go through to ``x``."""
    return x[rows].transpose(1, 0, 2)[None]


class _Scores:
    """Raw float32 score tiles ``(B, Hkv, G, m, n)`` → base-2 logits and the softcap factor.

    ``_mask.logits`` with the kernels' constants: without a modifier this is
    ``s · float32(scale · log2 e)``, exactly what the unmodified kernels compute.
    """

    def __init__(self, spec, hkv):
        self.spec = spec
        # (B, Hkv, G): the slopes of each query head, laid out like the score tiles.
        self.slopes = None if spec.alibi is None else _grouped(np.asarray(spec.alibi), hkv)

    def __call__(self, s, rows, cols):
        spec = self.spec
        return _mask.logits(s, rows, cols, nq=spec.shapes.nq, nk=spec.shapes.nk,
                            scale=spec.scale, softcap=spec.softcap, slopes=self.slopes,
                            log2=True)


class _Dropout:
    """The dropout mask of a spec, tile by tile (falsy when the spec has no dropout).

    ``keep(rows, cols)`` is bool ``(B, Hkv, G, m, n)``: ``_dropout.keep_mask`` at each element's
    batch index (from ``first_batch``), query head ``h = kv_head · G + g``, row and key. ``rescale`` is the float32
    ``_dropout.rescale(p)``, ``1 / (1 − p)`` at the rate the mask really drops.
    """

    def __init__(self, spec, b, hq, hkv, first_batch=0):
        self.spec, self.hq = spec, hq
        self.batch = np.arange(first_batch, first_batch + b).reshape(b, 1, 1, 1, 1)
        self.heads = np.arange(hq).reshape(1, hkv, hq // hkv, 1, 1)
        self.rescale = _F32(_dropout.rescale(spec.dropout_p))

    def __bool__(self):
        return self.spec.has_dropout

    def keep(self, rows, cols):
        spec = self.spec
        return _dropout.keep_mask(spec.dropout_seed, spec.dropout_offset, spec.dropout_p,
                                  self.batch, self.heads, np.arange(rows.start, rows.stop)[:, None],
                                  np.arange(cols.start, cols.stop), hq=self.hq)

    def drop(self, p, rows, cols):
        """``p`` with the dropped elements of tile ``(rows, cols)`` set to 0."""
        return np.where(self.keep(rows, cols), p, _F32(0))


def _grouped(x, hkv):
    """View ``(B, Hq, ...)`` as ``(B, Hkv, G, ...)``: the query heads of one key/value head."""
    return x.reshape(x.shape[:1] + (hkv, x.shape[1] // hkv) + x.shape[2:])


def _as_operand(x, dtype):
    """``x`` rounded to ``dtype`` as the kernels round tensor-core operands; kept in float32."""
    if dtype == _F32:
        return x
    return x.astype(dtype).astype(_F32)


class _TileGrid:
    """Which (query tile, key tile) pairs hold work, and the element mask of each.

    Tiles are ``BLOCK_M × BLOCK_N``, or the block mask's blocks when one is given. A tile is
    skipped when every element is masked (by the band of causal and the window, or by the block
    or exact mask for every head); a ``keep`` mask is built only for tiles that are partly
    masked. An exact mask's tiles are classified and its partial tiles' bits read from
    ``ExactMask.tile_bits``, the arrays the kernels read.
    """

    def __init__(self, spec, nq, nk, hq, hkv):
        self.nq, self.nk, self.hq, self.hkv = nq, nk, hq, hkv
        self.banded = spec.banded
        self.left, self.right = spec.band()
        block_mask = spec.block_mask
        self.exact = None if spec.exact_mask is None else _ExactTiles(spec.exact_mask, BLOCK_M,
                                                                      BLOCK_N)
        if block_mask is None:
            self.bm, self.bn = BLOCK_M, BLOCK_N
            self.blocks = None
        else:
            self.bm, self.bn = (int(n) for n in block_mask.block_size)
            self.blocks = np.asarray(block_mask.to_dense(), dtype=bool)  # (H', Mt, Nt)
        self.row_tiles = -(-nq // self.bm)
        self.col_tiles = -(-nk // self.bn)

        row_start = np.arange(self.row_tiles)[:, None] * self.bm
        col_start = np.arange(self.col_tiles)[None, :] * self.bn
        live = _mask.blocks_visible(row_start, np.minimum(row_start + self.bm, nq),
                                    col_start, np.minimum(col_start + self.bn, nk),
                                    nq, nk, self.left, self.right)
        live = np.broadcast_to(live, (self.row_tiles, self.col_tiles))
        if self.blocks is not None:
            live = live & self.blocks.any(axis=0)
        if self.exact is not None:
            live = live & (self.exact.slot != _ExactTiles.EMPTY).any(axis=0)
        self.live = live

    def rows(self, i):
        return slice(i * self.bm, min((i + 1) * self.bm, self.nq))

    def cols(self, j):
        return slice(j * self.bn, min((j + 1) * self.bn, self.nk))

    def live_in_row(self, i):
        return np.flatnonzero(self.live[i])

    def live_in_col(self, j):
        return np.flatnonzero(self.live[:, j])

    def keep(self, i, j):
        """``None`` if the whole tile is attended, else a bool mask broadcastable to
        ``(B, Hkv, G, m, n)``."""
        rows, cols = self.rows(i), self.cols(j)
        keep = None
        if self.banded and _mask.partial(rows.start, rows.stop, cols.start, cols.stop,
                                         self.nq, self.nk, self.left, self.right):
            keep = _mask.visible(self.nq, self.nk, self.left, self.right, rows=rows, cols=cols)
        if self.blocks is not None:
            heads = self.blocks[:, i, j]
            if not heads.all():  # kept for some heads only: mask the others
                heads = heads.reshape(self.hkv, self.hq // self.hkv, 1, 1)
                keep = heads if keep is None else heads & keep
        if self.exact is not None:
            pairs = self.exact.keep(i, j, rows.stop - rows.start, cols.stop - cols.start)
            if pairs is not None:
                if pairs.shape[0] > 1:  # one pattern per query head
                    pairs = pairs.reshape(self.hkv, self.hq // self.hkv, *pairs.shape[1:])
                else:
                    pairs = pairs[0]
                keep = pairs if keep is None else pairs & keep
        return keep


class _ExactTiles:
    """An exact mask at ``tile_m × tile_n`` tiles: each tile's slot per stored head (``FULL``,
    ``EMPTY`` or the index of its bitmask) and the pairs a partial tile allows, decoded from the
    bits as ``csrc/mask.cuh`` reads them."""

    FULL, EMPTY = -1, -2

    def __init__(self, exact_mask, tile_m, tile_n):
        from .sparse._exactmask import bitmask_words_per_row  # loaded with the mask already

        self.tile_m, self.tile_n = tile_m, tile_n
        tiles = exact_mask.tile_bits(tile_m, tile_n)
        heads, tiles_m = tiles.row_ptr.shape[0], tiles.row_ptr.shape[1] - 1
        tiles_n = tiles.col_ptr.shape[1] - 1
        self.slot = np.full((heads, tiles_m, tiles_n), self.EMPTY, np.int64)
        counts = np.diff(tiles.row_ptr, axis=1).ravel()
        flat_rows = np.repeat(np.arange(heads * tiles_m), counts)
        self.slot[flat_rows // tiles_m, flat_rows % tiles_m, tiles.col_idx] = tiles.row_slot
        self.bits = tiles.bits.reshape(-1, tile_m, bitmask_words_per_row(tile_n))

    def keep(self, i, j, height, width):
        """``None`` when tile ``(i, j)`` is full for every head, else bool ``(H', height,
        width)``: the pairs each stored pattern allows."""
        slots = self.slot[:, i, j]
        if (slots == self.FULL).all():
            return None
        cols = np.arange(width)
        keep = np.empty((slots.size, height, width), dtype=bool)
        for h, slot in enumerate(slots):
            if slot < 0:
                keep[h] = slot == self.FULL
            else:
                words = self.bits[slot, :height, cols // 32]  # (width, height)
                keep[h] = ((words.T >> (cols % 32).astype(np.uint32)) & 1).astype(bool)
        return keep
