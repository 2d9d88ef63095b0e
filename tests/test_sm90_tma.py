"""The host side of the warp-specialised Hopper forward (cuflash/kernels/sm90_tma_forward.py and
_tma.py): which tile shape a call gets and which views TMA can describe. No GPU needed; the
kernel itself is checked in the GPU suites and compiled in the compile group."""

from __future__ import annotations

import types

import numpy as np
import pytest
import scipy.sparse

import dataclasses

from cuflash.kernels import _tma, sm90_tma_forward
from cuflash.kernels._variants import _Slopes, _varlen, exact_mask_stand_in, spec_of
from cuflash.sparse import BlockMask, ExactMask


def _long(spec, n=8192):
    """The spec with n queries and keys (spec_of's have 1024)."""
    return dataclasses.replace(spec, shapes=dataclasses.replace(spec.shapes, nq=n, nk=n))


def _view(shape, strides_elems, ptr=1 << 20, itemsize=2):
    """What why_not_expressible reads of a CuPy view: shape, strides, base pointer."""
    return types.SimpleNamespace(shape=shape, ndim=len(shape), itemsize=itemsize,
                                 strides=tuple(s * itemsize for s in strides_elems),
                                 data=types.SimpleNamespace(ptr=ptr))


def test_contiguous_and_strided_views_are_expressible():
    assert _tma.why_not_expressible(_view((2, 4, 100, 64), (4 * 100 * 64, 100 * 64, 64, 1))) is None
    # (B, N, H, D) storage seen as (B, H, N, D): rows 4·64 elements apart
    assert _tma.why_not_expressible(_view((2, 4, 100, 64), (100 * 4 * 64, 64, 4 * 64, 1))) is None
    # size-1 axes may carry any stride
    assert _tma.why_not_expressible(_view((1, 1, 100, 64), (0, 3, 64, 1))) is None


@pytest.mark.parametrize("view, words", [
    (_view((2, 4, 100, 64), (0, 6400, 64, 1)), "no broadcast axes"),
    (_view((2, 4, 100, 64), (25600, 6400, 65, 1)), "16-byte units"),
    (_view((2, 4, 100, 64), (25600, 6400, 64, 1), ptr=(1 << 20) + 2), "16-byte aligned base"),
    (_view((2, 4, 100, 64), (25600, 6400, 128, 2)), "contiguous last axis"),
    (_view((1, 4, 0, 64), (0, 64, 256, 1)), "empty axis"),  # a packed call without keys, say
])
def test_views_tma_cannot_describe_are_refused_with_the_reason(view, words):
    assert words in _tma.why_not_expressible(view)


def test_tile_choice_follows_head_dims_and_masks():
    plain64 = sm90_tma_forward.tiles_for(spec_of("bfloat16", 64))
    assert (plain64.consumers, plain64.pingpong, plain64.block_n) == (3, True, 128)
    assert plain64.block_m == 192 and plain64.threads == 512
    assert sm90_tma_forward.tiles_for(_long(spec_of("bfloat16", 128), 8193)).block_n == 176
    assert sm90_tma_forward.tiles_for(_long(spec_of("bfloat16", 128), 8192)).block_n == 128  # two Q buffers
    dropout = dict(dropout_p=0.1, dropout_seed=1)  # 128 keys measured faster with dropout
    assert sm90_tma_forward.tiles_for(_long(spec_of("bfloat16", 128, **dropout))).block_n == 128
    assert sm90_tma_forward.tiles_for(spec_of("bfloat16", 128)).block_n == 128  # short rows
    assert sm90_tma_forward.tiles_for(_long(spec_of("bfloat16", 128, causal=True))).block_n == 128
    assert sm90_tma_forward.tiles_for(spec_of("bfloat16", 256)).block_n == 80
    # three consumers only unmasked and unmodified: they are compiled within 128 registers
    mask = BlockMask.from_dense(np.ones((8, 8), bool), block_size=128)
    for options in (dict(softcap=30.0), dict(causal=True, softcap=30.0), dict(block_mask=mask, softcap=30.0)):
        tiles = sm90_tma_forward.tiles_for(spec_of("bfloat16", 64, **options))
        assert tiles.consumers == 2 and tiles.block_m == 128, options
    # a band alone over short dense rows: two consumers, two stages, persistent; over long rows,
    # three ping-pong consumers when the band is bounded on the right alone (causal), else two (a
    # window's left edge spills beside three)
    for options, long_consumers in ((dict(causal=True), 3), (dict(window=(-1, 16)), 3),
                                    (dict(window=(64, 0)), 2), (dict(window=(64, -1)), 2)):
        short = sm90_tma_forward.tiles_for(spec_of("bfloat16", 64, **options))
        assert (short.consumers, short.block_m, short.stages, short.pingpong, short.persistent) == \
            (2, 128, 2, False, True), options
        tiles = sm90_tma_forward.tiles_for(_long(spec_of("bfloat16", 64, **options)))
        assert (tiles.consumers, tiles.pingpong) == (long_consumers, long_consumers == 3), options
    # packed short sequences under a band keep one consumer, two blocks per SM, on the persistent
    # grid (of the packed grid's tiles, ranked longest first)
    packed = sm90_tma_forward.tiles_for(_varlen(spec_of("bfloat16", 64, causal=True)))
    assert (packed.consumers, packed.persistent) == (1, True)
    # long causal rows with anything else keep two consumers; so do wider head dims
    dropout = dict(dropout_p=0.1, dropout_seed=1)
    for spec in (_long(spec_of("bfloat16", 64, causal=True, softcap=30.0)),
                 _long(spec_of("bfloat16", 32, causal=True, **dropout)),
                 _long(spec_of("bfloat16", 128, causal=True))):
        assert sm90_tma_forward.tiles_for(spec).consumers == 2, spec.describe()
    assert sm90_tma_forward.tiles_for(_long(spec_of("bfloat16", 32, causal=True))).consumers == 3
    # ALiBi alone fits beside three consumers at D = Dv = 64 (dense rows): unmasked and long
    # causal rows take them; short causal rows, packed sequences, dropout (slower there), softcap
    # and D = 32 keep two
    alibi = dict(alibi=_Slopes())
    for spec, consumers in ((spec_of("bfloat16", 64, **dropout), 2),
                            (_long(spec_of("bfloat16", 64, causal=True, **dropout)), 2),
                            (spec_of("bfloat16", 64, causal=True, **alibi), 2),
                            (_varlen(spec_of("bfloat16", 64, **alibi)), 2),
                            (spec_of("bfloat16", 32, **alibi), 2),
                            (spec_of("bfloat16", 64, **alibi), 3),
                            (_long(spec_of("bfloat16", 64, causal=True, **alibi)), 3),
                            (spec_of("bfloat16", 64, **alibi, **dropout), 2),
                            (spec_of("bfloat16", 64, softcap=30.0, **alibi), 2)):
        tiles = sm90_tma_forward.tiles_for(spec)
        assert (tiles.consumers, tiles.pingpong) == (consumers, consumers == 3), spec.describe()


def test_masks_keeping_few_keys_per_row_take_one_consumer():
    """A block or exact mask that keeps at most 2K keys per query row on average (here all 1K,
    or a tenth of 16K) runs the one-consumer tile; one that keeps more (all of 8K) runs two."""
    rng = np.random.default_rng(0)
    few = BlockMask.from_dense(np.ones((8, 8), bool), block_size=128)
    sparse = BlockMask.from_dense(rng.random((128, 128)) < 0.1, block_size=128)
    many = BlockMask.from_dense(np.ones((64, 64), bool), block_size=128)
    for mask, consumers in ((few, 1), (sparse, 1), (many, 2)):
        spec = _long(spec_of("bfloat16", 64, block_mask=mask), mask.shape[0])
        assert sm90_tma_forward.tiles_for(spec).consumers == consumers, mask
    # An exact mask: by the pairs it keeps per row, 0.3 of 1K keys, or (read as the same
    # density over 8K keys: tiles_for looks at the density and the shapes only) of 8K.
    exact = ExactMask.from_dense(rng.random((1024, 1024)) < 0.3)
    assert sm90_tma_forward.tiles_for(spec_of("bfloat16", 64, exact_mask=exact)).consumers == 1
    assert sm90_tma_forward.tiles_for(_long(spec_of("bfloat16", 64, exact_mask=exact))).consumers == 2
    # a score modifier keeps two consumers (one would spill)
    assert sm90_tma_forward.tiles_for(spec_of("bfloat16", 64, exact_mask=exact, softcap=5.0)).consumers == 2


def test_one_consumer_tiles_leave_room_for_a_second_block():
    """The one-consumer tile is chosen so that two blocks share an SM: both must fit its 228 KB
    of shared memory (each block also holds 1 KB the GPU reserves)."""
    mask = BlockMask.from_dense(np.ones((8, 8), bool), block_size=128)
    tiles = sm90_tma_forward.tiles_for(spec_of("bfloat16", 64, causal=True, block_mask=mask))
    assert tiles.consumers == 1
    assert 2 * (tiles.shared_bytes(64, 64) + 1024) <= 228 * 1024


def test_persistent_grid_for_short_dense_rows_and_masks_with_wide_key_tiles():
    tiles_for = sm90_tma_forward.tiles_for
    for options in (dict(), dict(causal=True), dict(window=(100, 0), softcap=5.0)):
        for d in (64, 96, 128):
            assert tiles_for(spec_of("bfloat16", d, **options)).persistent, (d, options)  # 1K keys
    assert tiles_for(_long(spec_of("bfloat16", 128), 8192)).persistent
    assert not tiles_for(_long(spec_of("bfloat16", 128), 8193)).persistent
    assert tiles_for(_long(spec_of("bfloat16", 128, causal=True), 4096)).persistent  # under a band
    assert not tiles_for(_long(spec_of("bfloat16", 128, causal=True), 4097)).persistent
    assert not tiles_for(_long(spec_of("bfloat16", 64, causal=True))).persistent
    # 80-key tiles with one Q buffer (D above 192) stage O in the last key tile's K and V buffers:
    # persistent without a band
    for d in (256, 224):
        assert tiles_for(spec_of("bfloat16", d)).persistent, d
        assert tiles_for(spec_of("bfloat16", d)).o_in_kv(d, d), d
        assert tiles_for(_long(spec_of("bfloat16", d), 8192)).persistent, d
        assert not tiles_for(_long(spec_of("bfloat16", d), 8193)).persistent, d
        assert not tiles_for(spec_of("bfloat16", d, causal=True)).persistent, d
    # ... and with two Q buffers (D ≤ 192) O in each tile's own: persistent under a band too
    for d in (160, 192):
        for options in (dict(), dict(causal=True)):
            tiles = tiles_for(spec_of("bfloat16", d, **options))
            assert tiles.block_n == 80 and tiles.q_buffers == 2 and tiles.persistent, (d, options)
    # Masks at any length: their query tiles visit few key tiles, so a block's fixed cost weighs.
    for n in (1024, 16384):
        mask = BlockMask.from_dense(np.ones((n // 128, n // 128), bool), block_size=128)
        exact = ExactMask.from_scipy(scipy.sparse.eye_array(n, dtype=bool, format="csr"))
        for d in (64, 128):
            assert tiles_for(_long(spec_of("bfloat16", d, block_mask=mask), n)).persistent, (n, d)
            assert tiles_for(_long(spec_of("bfloat16", d, exact_mask=exact), n)).persistent, (n, d)
    assert not tiles_for(_long(spec_of("bfloat16", 256, block_mask=mask), n)).persistent  # 64-key tiles


def test_o_is_staged_in_its_own_q_buffer_where_there_are_two():
    """Where O is staged decides the Q buffers' size (TmaForwardLayout::O_IN_V and Q_BYTES): a V
    buffer with one Q buffer and key tiles as tall as the query tile, else the Q buffer, which
    then holds the wider of Q and O."""
    T = sm90_tma_forward.TmaTiles
    assert T(128, 2, consumers=2).o_in_v and not T(128, 2, consumers=2, q_buffers=2).o_in_v
    assert not T(128, 2, consumers=3).o_in_v and not T(80, 2, consumers=2).o_in_v
    rings = 2 * 128 * (64 + 128) * 2 + 1024
    assert T(128, 2, consumers=2).shared_bytes(64, 128) == 64 * 128 * 2 + rings  # O in a V buffer
    assert T(128, 2, consumers=2, q_buffers=2).shared_bytes(64, 128) == 2 * 128 * 128 * 2 + rings


def test_a_second_q_buffer_where_shared_memory_holds_it():
    """128-key tiles at D <= 128 hold a second Q buffer beside their rings (with two blocks per
    SM where one consumer runs, and beside an exact mask's records); 176-key tiles at D = 128 and
    the 80-key tiles of wider heads do not."""
    F = sm90_tma_forward
    exact = exact_mask_stand_in()
    for d in (32, 64, 96, 128):
        for options in (dict(), dict(causal=True), dict(exact_mask=exact)):
            spec = spec_of("bfloat16", d, **options)  # 1K keys
            tiles = F.tiles_for(spec)
            assert tiles.q_buffers == 2 and F.fits_shared_memory(spec, tiles), (d, options, tiles)
            reserved = 1024 + F.STATIC_BARRIERS + (tiles.exact_record_bytes() if "exact_mask" in options else 0)
            assert tiles.blocks_per_sm * (tiles.shared_bytes(d, d) + reserved) <= F.SM_SHARED, (d, options)
    assert F.tiles_for(_long(spec_of("bfloat16", 128), 8193)).q_buffers == 1  # 176-key tiles
    assert F.tiles_for(spec_of("bfloat16", 256)).q_buffers == 1
    assert F.tiles_for(spec_of("bfloat16", 192, 128)).q_buffers == 1


@pytest.mark.parametrize("d, dv", [(32, 32), (64, 64), (96, 96), (128, 128), (160, 160), (192, 128), (256, 256),
                                   (256, 64), (64, 256)])
def test_every_chosen_shape_fits_shared_memory(d, dv):
    for causal in (False, True):
        tiles = sm90_tma_forward.tiles_for(spec_of("bfloat16", d, dv, causal=causal))
        assert tiles.shared_bytes(d, dv) <= sm90_tma_forward.MAX_SHARED


def test_mask_blocks_no_tile_shape_divides_are_refused_by_name():
    mask = BlockMask.from_dense(np.ones((16, 16), bool), block_size=64, shape=(1024, 1024))
    spec = spec_of("bfloat16", 128, block_mask=mask)
    assert sm90_tma_forward.tiles_for(spec) is None


def test_exact_mask_tiles_leave_room_for_the_records_beside_k():
    """An exact mask's forward keeps, beside each K buffer, the tile's index, bitmask slot and bits
    in static shared memory (ExactStage): the tile shape chosen must fit with them."""
    F = sm90_tma_forward
    assert F.TmaTiles(block_n=80, stages=2, consumers=2).exact_record_bytes() == 2 * (16 + 128 * 3 * 4)
    assert F.TmaTiles(block_n=128, stages=3, consumers=2).exact_record_bytes() == 3 * (16 + 128 * 4 * 4)
    for d, dv in ((32, 32), (64, 64), (96, 96), (128, 128), (192, 128), (256, 256), (64, 256)):
        for causal in (False, True):
            spec = spec_of("bfloat16", d, dv, causal=causal, exact_mask=exact_mask_stand_in())
            tiles = F.tiles_for(spec)
            assert tiles.shared_bytes(d, dv) + tiles.exact_record_bytes() <= F.MAX_SHARED, (d, dv, tiles)
