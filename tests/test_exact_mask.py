"""Exact masks (cuflash.sparse.ExactMask, attention's ``mask=``): the builders, the tile layout the
kernels read, bad input, and attention against the float64 oracle on the NumPy path and on every
GPU kernel family (sm80, sm90 with CUFLASH_DISABLE_SM90 toggled, float32), forward and backward,
combined with causal, windows, softcap, ALiBi and grouped heads.
"""

import ml_dtypes
import numpy as np
import pytest
import scipy.sparse
from click.testing import CliRunner
from oracle import assert_forward_close, check_forward_and_backward, random_array, to_host

import cuflash
from cuflash import kernels
from cuflash.kernels import _launch
from cuflash.cli import main
from cuflash.sparse import (BlockMask, ExactMask, causal, document, expand_blocks, prefix_lm,
                            sliding_window)

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]
DTYPE_IDS = ["float16", "bfloat16", "float32"]


def mixed_pattern(rng, nq, nk, *, heads=None, density=0.03):
    """A pattern with full, partial and empty tiles at every kernel's tile shape (for problems
    of about 300 × 300): documents (dense squares on the diagonal, cut at odd places), scattered
    pairs, an allowed bottom-left corner, an empty top-right corner and a row that sees no key.
    ``heads``: one pattern per head, else one shared."""
    count = heads or 1
    dense = np.zeros((count, nq, nk), dtype=bool)
    for h in range(count):
        cuts = np.sort(rng.choice(np.arange(1, min(nq, nk)), size=3, replace=False))
        edges = [0, *cuts, min(nq, nk)]
        for start, stop in zip(edges[:-1], edges[1:]):
            dense[h, start:stop, start:stop] = True
        dense[h] |= rng.random((nq, nk)) < density
        dense[h, nq - 128:, :128] = True
        dense[h, :128, nk - 128:] = False
        dense[h, nq // 2] = False
    return ExactMask.from_dense(dense if heads else dense[0])


# ----------------------------------------------------------------------------- builders

def brute_document(lengths, causal_):
    n = sum(lengths)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    keep = doc[:, None] == doc[None, :]
    if causal_:
        keep &= np.arange(n)[None, :] <= np.arange(n)[:, None]
    return keep


@pytest.mark.parametrize("causal_", [False, True])
def test_document_masks_match_their_definition(causal_):
    lengths = [5, 1, 17, 9, 3]
    expected = brute_document(lengths, causal_)
    np.testing.assert_array_equal(document(lengths, causal=causal_).toarray(), expected)
    # Block level: a block is set when any of its pairs is.
    blocks = document(lengths, causal=causal_, block_size=4).toarray()
    padded = np.zeros((36, 36), bool)
    padded[:35, :35] = expected
    np.testing.assert_array_equal(blocks, padded.reshape(9, 4, 9, 4).any(axis=(1, 3)))


@pytest.mark.parametrize("flag", ["no", 1, 0.0, None])
def test_document_takes_causal_as_a_bool_only(flag):
    # A string or a number is no answer to "causal?": "no" must not give the causal pattern.
    with pytest.raises(TypeError, match="causal must be True or False"):
        document([3, 4], causal=flag)
    np.testing.assert_array_equal(document([3, 4], causal=np.bool_(True)).toarray(),
                                  brute_document([3, 4], True))


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.int8, np.uint8])
@pytest.mark.parametrize("block_size", [None, 3])
def test_document_takes_lengths_of_any_integer_dtype(rng, dtype, block_size):
    # Lengths from numpy.diff of unsigned offsets, or a small dtype whose sum overflows it.
    lengths = rng.integers(1, 100, size=int(rng.integers(2, 6)))
    causal_ = bool(rng.integers(2))
    expected = document(lengths.tolist(), causal=causal_, block_size=block_size).toarray()
    got = document(lengths.astype(dtype), causal=causal_, block_size=block_size)
    np.testing.assert_array_equal(got.toarray(), expected)
    if block_size is None:
        np.testing.assert_array_equal(got.toarray(), brute_document(lengths.tolist(), causal_))


@pytest.mark.parametrize("call, name", [
    (lambda lengths: document(lengths), "lengths"),
    (lambda positions: cuflash.sparse.longformer(9, window=1, global_tokens=positions),
     "global_tokens")])
@pytest.mark.parametrize("given", [[True, 3], (2, np.True_), [4, False, 2]])
def test_integer_sequences_refuse_bools(call, name, given):
    # numpy.asarray([True, 3]) is [1, 3]: a bool must not pass as the integer 1.
    with pytest.raises(TypeError, match=name):
        call(given)


def test_prefix_lm_sees_the_prefix_then_causally():
    got = prefix_lm(7, prefix=3).toarray()
    i, j = np.indices((7, 7))
    np.testing.assert_array_equal(got, (j < 3) | (j <= i))
    got = prefix_lm(4, 7, prefix=2).toarray()  # bottom-right aligned as causal
    i, j = np.indices((4, 7))
    np.testing.assert_array_equal(got, (j < 2) | (j <= i + 3))


def test_expand_blocks_gives_every_pair_of_a_set_block():
    blocks = scipy.sparse.csr_array(np.array([[1, 0], [1, 1]], bool))
    got = expand_blocks(blocks, block_size=4, shape=(6, 7)).toarray()
    expected = np.zeros((6, 7), bool)
    expected[:4, :4] = expected[4:, :] = True
    np.testing.assert_array_equal(got, expected)


def test_expand_blocks_sets_only_the_pairs_of_set_blocks(rng):
    # Blocks stored with value 0 (an explicit zero, or duplicates that cancel) are not set:
    # the element pattern holds no entry for their pairs, so its nnz counts allowed pairs.
    nqb, nkb, bq, bk = 3, 4, 5, 3
    layout = rng.random((nqb, nkb)) < 0.5
    rows, cols = np.indices((nqb, nkb)).reshape(2, -1)
    values = np.where(layout.ravel(), rng.integers(1, 5, rows.size), 0)
    blocks = scipy.sparse.coo_array((np.concatenate([values, [1, -1]]),
                                     (np.concatenate([rows, [0, 0]]),
                                      np.concatenate([cols, [0, 0]]))), shape=(nqb, nkb))
    shape = (nqb * bq - 2, nkb * bk - 1)
    got = expand_blocks(blocks, block_size=(bq, bk), shape=shape)
    expected = np.kron(layout, np.ones((bq, bk), bool))[:shape[0], :shape[1]]
    np.testing.assert_array_equal(got.toarray(), expected)
    assert got.nnz == expected.sum() and got.dtype == bool


def test_expand_blocks_of_a_pattern_with_no_set_block_is_bool():
    # A pattern with no set block (no entry, or only stored zeros) is still a bool pattern, as
    # every builder's result is.
    for blocks in (scipy.sparse.csr_array((2, 3), dtype=bool),
                   scipy.sparse.coo_array((np.array([0]), (np.array([1]), np.array([2]))),
                                          shape=(2, 3))):
        got = expand_blocks(blocks, block_size=4, shape=(7, 12))
        assert got.dtype == bool and got.shape == (7, 12) and got.nnz == 0


@pytest.mark.parametrize("container", [scipy.sparse.csr_array, scipy.sparse.csr_matrix,
                                       scipy.sparse.csc_array])
def test_expand_blocks_sums_the_duplicates_a_compressed_pattern_stores(container):
    # Compressed formats keep duplicate entries as given; block (0, 1) is stored as 1 and -1,
    # which sum to 0: the pattern's value there is 0, so the block is not set.
    data, indices, indptr = [1, -1, 1, 2], [1, 1, 0, 1], [0, 2, 4]
    blocks = container((np.array(data), np.array(indices), np.array(indptr)), shape=(2, 2))
    layout = blocks.toarray() != 0
    got = expand_blocks(blocks, block_size=3, shape=(5, 6))
    np.testing.assert_array_equal(got.toarray(), np.kron(layout, np.ones((3, 3), bool))[:5, :6])
    assert not layout.all()


@pytest.mark.parametrize("pattern", [[[1, 0], [1, 1]], np.eye(2, dtype=bool), None,
                                     scipy.sparse.coo_array(np.ones((1, 2, 2), bool))])
def test_expand_blocks_names_a_pattern_that_is_not_scipy_sparse(pattern):
    with pytest.raises(TypeError, match="pattern must be a 2-D scipy.sparse"):
        expand_blocks(pattern, block_size=4, shape=(8, 8))


@pytest.mark.parametrize("builder", [
    lambda: causal(200), lambda: sliding_window(200, window=(30, 5)),
    lambda: document([70, 50, 80], causal=True), lambda: prefix_lm(200, prefix=50)])
def test_element_builders_make_exact_masks(builder):
    pattern = builder()
    mask = ExactMask.from_scipy(pattern)
    np.testing.assert_array_equal(mask.to_element_dense()[0], pattern.toarray())
    assert mask.nnz == pattern.nnz and mask.num_heads is None


# ----------------------------------------------------------------------------- the tile layout

def decode(tiles, tile_m, tile_n, heads, nq, nk):
    """The pairs a TileBits allows, read as the kernels read it (docs/sparse.md)."""
    words_per_row = -(-tile_n // 32)
    got = np.zeros((heads, nq, nk), bool)
    for h in range(heads):
        for i in range(tiles.row_ptr.shape[1] - 1):
            for e in range(tiles.row_ptr[h, i], tiles.row_ptr[h, i + 1]):
                j, slot = tiles.col_idx[e], tiles.row_slot[e]
                rows = slice(i * tile_m, min((i + 1) * tile_m, nq))
                cols = slice(j * tile_n, min((j + 1) * tile_n, nk))
                if slot < 0:
                    got[h, rows, cols] = True
                    continue
                words = tiles.bits[slot * tile_m * words_per_row:][:tile_m * words_per_row]
                words = words.reshape(tile_m, words_per_row)
                c = np.arange(cols.stop - cols.start)
                bits = (words[:rows.stop - rows.start, c // 32] >> (c % 32).astype(np.uint32)) & 1
                got[h, rows, cols] = bits.astype(bool)
    return got


@pytest.mark.parametrize("tile", [(128, 64), (64, 128), (64, 64), (128, 128), (128, 32),
                                  (64, 32), (32, 64), (16, 16)])
def test_tile_bits_hold_exactly_the_pattern(rng, tile):
    nq, nk = 301, 283
    mask = mixed_pattern(rng, nq, nk, heads=3)
    tile_m, tile_n = tile
    tiles = mask.tile_bits(tile_m, tile_n)
    np.testing.assert_array_equal(decode(tiles, tile_m, tile_n, 3, nq, nk),
                                  mask.to_element_dense())
    # The key-major walk sees the same tiles with the same slots.
    for h in range(3):
        for j in range(tiles.col_ptr.shape[1] - 1):
            for e in range(tiles.col_ptr[h, j], tiles.col_ptr[h, j + 1]):
                i = tiles.row_idx[e]
                row = tiles.col_idx[tiles.row_ptr[h, i]:tiles.row_ptr[h, i + 1]]
                position = tiles.row_ptr[h, i] + int(np.flatnonzero(row == j)[0])
                assert tiles.col_slot[e] == tiles.row_slot[position]
    counts = mask.tile_counts(tile_m, tile_n)
    tiles_m, tiles_n = -(-nq // tile_m), -(-nk // tile_n)
    assert counts.full + counts.partial + counts.empty == 3 * tiles_m * tiles_n
    assert counts.full and counts.partial and counts.empty
    # At most one bit per pair of the partial tiles (rows padded to whole 32-bit words).
    assert counts.bitmask_bytes == counts.partial * tile_m * (-(-tile_n // 32) * 32) // 8
    if tile_n % 32 == 0:
        assert counts.bitmask_bytes * 8 <= counts.partial * tile_m * tile_n


def test_tiles_are_cached_per_shape(rng):
    mask = mixed_pattern(rng, 200, 200)
    assert mask.tile_bits(64, 64) is mask.tile_bits(64, 64)
    assert mask.tile_bits(64, 64) is not mask.tile_bits(128, 64)


def test_construction_round_trips(rng):
    dense = rng.random((2, 90, 70)) < 0.2
    mask = ExactMask.from_dense(dense)
    assert mask == ExactMask.from_scipy([scipy.sparse.coo_array(d) for d in dense])
    assert hash(mask) == hash(ExactMask.from_dense(dense))
    np.testing.assert_array_equal(mask.element_rows([5, 80])[:, :, :], dense[:, [5, 80]])
    np.testing.assert_array_equal(np.stack([m.toarray() for m in mask.to_scipy()]), dense)
    import pickle
    assert pickle.loads(pickle.dumps(mask)) == mask
    with pytest.raises(AttributeError):
        mask._shape = (1, 1)


def test_repr_and_render_report_full_partial_and_empty_tiles(rng):
    mask = ExactMask.from_scipy(document([300, 212], causal=True))
    text = repr(mask)
    counts = mask.tile_counts(128, 128)
    assert text.startswith("ExactMask(shape=(512, 512), num_heads=None")
    assert (f"{counts.full:,} full, {counts.partial:,} partial, {counts.empty:,} empty; "
            f"bitmasks {counts.bitmask_bytes:,} bytes") in text
    assert counts.full and counts.partial and counts.empty
    picture = mask.render().splitlines()
    assert len(picture) == 4 and all(len(line) == 4 for line in picture)
    assert picture[0] == "▒···" and picture[1][0] == "█" and picture[3] == "··▒▒"


def test_cli_mask_show_exact_counts_tiles_and_bitmask_bytes():
    runner = CliRunner()
    args = ["mask", "show", "sliding-window", "--seq-len", "2K", "--window", "100", "--exact"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "exact" in lines[0] and "allowed pairs" in lines[1]
    assert any("sm90 forward" in line and "partial" in line and "bitmasks" in line
               for line in lines)
    assert set("".join(lines[-16:])) <= {"█", "▒", "·"}
    import json
    record = json.loads(runner.invoke(main, args + ["--json"]).output)
    expected = ExactMask.from_scipy(sliding_window(2048, window=100))
    assert record["allowed_pairs"] == expected.nnz
    for row in record["tiles"]:
        counts = expected.tile_counts(*row["tile"])
        assert (row["full"], row["partial"], row["empty"], row["bitmask_bytes"]) == (
            counts.full, counts.partial, counts.empty, counts.bitmask_bytes)


def test_cli_mask_show_exact_reports_the_tiles_the_kernels_pick_for_the_mask():
    """At D = 64 the Hopper forward's tile depends on the mask (one consumer where rows keep few
    keys): the report counts the tile its own selection returns for a call with that mask."""
    import json

    from cuflash.kernels import sm90_tma_forward
    from cuflash.kernels._variants import spec_of

    args = ["mask", "show", "sliding-window", "--seq-len", "2K", "--window", "200", "--exact",
            "--json"]
    record = json.loads(CliRunner().invoke(main, args).output)
    mask = ExactMask.from_scipy(sliding_window(2048, window=200))
    spec = spec_of("bfloat16", 64, nq=2048, nk=2048, exact_mask=mask)
    assert sm90_tma_forward.few_keys(spec)
    tiles = sm90_tma_forward.tiles_for(spec)
    (row,) = [row for row in record["tiles"]
              if row["head_dim"] == 64 and "sm90 forward" in row["kernels"]]
    assert row["tile"] == [tiles.block_m, tiles.block_n] == [64, 128]
    counts = mask.tile_counts(tiles.block_m, tiles.block_n)
    assert (row["full"], row["partial"], row["empty"], row["bitmask_bytes"]) == (
        counts.full, counts.partial, counts.empty, counts.bitmask_bytes)
    # The backward keeps its 128-row dK/dV tile there: a shape of its own in the report.
    (dkdv,) = [row for row in record["tiles"]
               if row["head_dim"] == 64 and "sm90 dK/dV" in row["kernels"]]
    assert dkdv["tile"] == [128, 128] and "sm90 forward" not in dkdv["kernels"]


@pytest.mark.parametrize("pattern, build", [
    ("document", lambda lengths: document(lengths)),
    ("causal-document", lambda lengths: document(lengths, causal=True)),
    ("prefix-lm", lambda lengths: prefix_lm(2000, prefix=300))])
def test_cli_mask_show_draws_the_document_and_prefix_lm_builders(pattern, build):
    """``mask show`` builds the document patterns from --documents lengths drawn by --seed (the
    draw of benchmarks/exact_mask_bench.py), and prefix-LM from --prefix: exactly the builders'
    patterns, at element level (--exact) and at block level (the blocks holding an allowed pair)."""
    import json

    from cuflash.bench.sweeps import random_document_lengths

    runner = CliRunner()
    args = ["mask", "show", pattern, "--seq-len", "2000", "--json",
            *(["--prefix", "300"] if pattern == "prefix-lm"
              else ["--documents", "5", "--seed", "7"])]
    lengths = random_document_lengths(np.random.default_rng(7), 2000, 5)
    assert lengths.size == 5 and lengths.sum() == 2000 and (lengths > 0).all()
    expected = build(lengths)
    record = json.loads(runner.invoke(main, args + ["--exact"]).output)
    assert record["allowed_pairs"] == expected.nnz
    counts = ExactMask.from_scipy(expected).tile_counts(*record["tiles"][0]["tile"])
    assert (record["tiles"][0]["full"], record["tiles"][0]["partial"]) == (counts.full, counts.partial)
    padded = np.zeros((2048, 2048), bool)  # 32 blocks of 64 a side, the last one cut
    padded[:2000, :2000] = expected.toarray()
    kept = padded.reshape(32, 64, 32, 64).any(axis=(1, 3))  # the blocks holding an allowed pair
    record = json.loads(runner.invoke(main, args + ["--block-size", "64"]).output)
    assert record["kept_blocks"] == int(kept.sum())


# ----------------------------------------------------------------------------- bad input

def qkv(shape_q=(1, 4, 100, 32), nk=120, hkv=4):
    q = np.zeros(shape_q, np.float32)
    k = np.zeros(shape_q[:-3] + (hkv, nk, shape_q[-1]), np.float32)
    return q, k, k


def test_a_pattern_of_the_wrong_shape_is_refused_naming_mask():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask was built for Nq=100, Nk=100.*Nk=120"):
        cuflash.attention(q, k, v, mask=ExactMask.from_scipy(causal(100)))
    with pytest.raises(ValueError, match="shape=.*disagrees with the pattern's shape"):
        ExactMask.from_scipy(causal(100, 120), shape=(100, 100))


def test_the_wrong_number_of_heads_is_refused():
    q, k, v = qkv()
    mask = ExactMask.from_scipy([causal(100, 120)] * 3)
    with pytest.raises(ValueError, match="mask holds one pattern per head for 3 heads.*Hq=4"):
        cuflash.attention(q, k, v, mask=mask)
    with pytest.raises(ValueError, match="mask holds"):
        cuflash.attention_backward(q, q, k, v, q, np.zeros((1, 4, 100), np.float32), mask=mask)


@pytest.mark.parametrize("given, words", [
    (lambda: BlockMask.from_dense(np.ones((1, 1), bool), block_size=128, shape=(100, 120)),
     "a BlockMask is block-sparse: pass it as block_mask="),
    (lambda: causal(100, 120), "ExactMask.from_scipy"),
    (lambda: np.ones((100, 120), bool), "ExactMask.from_dense"),
    (lambda: [causal(100, 120)] * 4, r"per-head patterns with cuflash\.sparse\.ExactMask\.from_scipy"),
    (lambda: [np.ones((100, 120), bool)] * 4, r"ExactMask\.from_dense of the \(H, Nq, Nk\) array"),
    (lambda: "causal", "mask must be a cuflash.sparse.ExactMask or None"),
])
def test_mask_of_the_wrong_type_is_a_type_error(given, words):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=words):
        cuflash.attention(q, k, v, mask=given())


def test_an_exact_mask_is_never_taken_as_a_block_mask():
    q, k, v = qkv()
    exact = ExactMask.from_scipy(causal(100, 120))
    with pytest.raises(TypeError, match="is not coarsened to blocks: pass it as mask="):
        cuflash.attention(q, k, v, block_mask=exact)
    blocks = exact.to_block_mask(64)
    with pytest.raises(ValueError, match="not both"):
        cuflash.attention(q, k, v, mask=exact, block_mask=blocks)


@pytest.mark.parametrize("array, error", [
    (np.ones(5, bool), ValueError), (np.ones((2, 0, 3), bool), ValueError),
    (np.ones((4, 4), np.float32), TypeError), (scipy.sparse.eye(4), TypeError)])
def test_from_dense_refuses_what_is_not_a_bool_pattern(array, error):
    with pytest.raises(error, match="array"):
        ExactMask.from_dense(array)


@pytest.mark.parametrize("reader", [
    ExactMask.from_dense, lambda layout: BlockMask.from_dense(layout, block_size=16)])
def test_from_dense_refuses_a_masked_array(rng, reader):
    # Its mask would be dropped: the hidden values under it would be read as the pattern.
    data = rng.random((int(rng.integers(1, 4)), 5, 7)) < 0.5
    masked = np.ma.array(data, mask=rng.random(data.shape) < 0.3)
    with pytest.raises(TypeError, match=r"array is a numpy.ma.MaskedArray: its mask would be "
                                        r"ignored; pass a plain array \(array.filled"):
        reader(masked)
    assert reader(masked.filled(False)) == reader(data & ~np.ma.getmaskarray(masked))


@pytest.mark.parametrize("reader", [
    ExactMask.from_dense, lambda layout: BlockMask.from_dense(layout, block_size=16)])
def test_from_dense_of_per_head_arrays_names_what_is_wrong(reader):
    """A sequence of per-head arrays is read as one (H, ., .) array: arrays of unequal shapes got
    numpy's 'inhomogeneous shape' error, a scipy pattern among them 'got shape (1,)', and a
    masked array among them was read without its mask."""
    heads = [np.ones((3, 4), bool), np.eye(3, 4, dtype=int)]
    assert reader(heads) == reader(np.stack(heads).astype(bool))
    with pytest.raises(ValueError, match=r"array's items \(one array per head, or the rows of "
                                         r"nested lists\) must share one shape, got shapes "
                                         r"\[\(3, 4\), \(3, 5\)\]"):
        reader([np.ones((3, 4), bool), np.ones((3, 5), bool)])
    with pytest.raises(TypeError, match=r"array\[1\] is a scipy.sparse pattern; use "
                                        r"(Exact|Block)Mask\.from_scipy for it"):
        reader([heads[0], scipy.sparse.csr_array(heads[1])])
    with pytest.raises(TypeError, match=r"array\[1\] is a numpy.ma.MaskedArray: its mask would "
                                        r"be ignored"):
        reader([heads[0], np.ma.array(heads[1], mask=np.ones((3, 4), bool))])
    with pytest.raises(TypeError, match=r"array must be an array of bools or integer 0/1 "
                                        r"values, got builtins.NoneType"):
        reader(None)


@pytest.mark.parametrize("array", [np.eye(4, dtype=int) * 2, -np.eye(4, dtype=int)])
def test_from_dense_refuses_integers_other_than_0_and_1(array):
    with pytest.raises(ValueError, match="array must hold only 0 and 1"):
        ExactMask.from_dense(array)
    assert ExactMask.from_dense(np.eye(4, dtype=int)) == ExactMask.from_dense(np.eye(4, dtype=bool))


def test_from_scipy_points_an_array_of_patterns_to_a_list():
    """An object array of per-head patterns was told to use from_dense, which takes no scipy
    patterns."""
    heads = np.empty(2, dtype=object)
    heads[:] = [scipy.sparse.eye_array(4, format="csr"), scipy.sparse.eye_array(4, format="csr")]
    for reader in (ExactMask.from_scipy, lambda p: BlockMask.from_scipy(p, level="element")):
        with pytest.raises(TypeError, match=r"got numpy.ndarray \(a NumPy array of objects: "
                                            r"pass the per-head patterns as a list\)"):
            reader(heads)
    assert ExactMask.from_scipy(list(heads)).num_heads == 2


def test_from_scipy_points_a_mask_to_its_pattern_not_to_a_dense_reader():
    """A mask has a shape, but no dense reader takes one: the hint names the conversions that
    work, and following them builds the mask."""
    exact = ExactMask.from_dense(np.eye(8, dtype=bool))
    blocks = exact.to_block_mask(4)
    with pytest.raises(TypeError, match=r"got cuflash.sparse._exactmask.ExactMask \(an "
                                        r"ExactMask: .*to_block_mask\(block_size\)"):
        BlockMask.from_scipy(exact, level="element", block_size=4)
    with pytest.raises(TypeError, match=r"got cuflash.sparse._blockmask.BlockMask \(a "
                                        r"BlockMask: .*expand_blocks"):
        ExactMask.from_scipy(blocks)
    for reader in (ExactMask.from_scipy, lambda p: BlockMask.from_scipy(p, level="element")):
        for mask in (exact, blocks):
            with pytest.raises(TypeError) as refused:
                reader(mask)
            assert "from_dense" not in str(refused.value)
    assert exact.to_block_mask(4) == blocks
    assert ExactMask.from_scipy(expand_blocks(blocks.to_scipy(), block_size=blocks.block_size,
                                              shape=blocks.shape)).nnz == 32


def test_from_scipy_points_a_dense_array_to_its_own_dense_reader():
    """Following the hint must not switch a user to block-sparse attention."""
    with pytest.raises(TypeError, match=r"use ExactMask\.from_dense") as error:
        ExactMask.from_scipy(np.eye(8, dtype=bool))
    assert "BlockMask" not in str(error.value)
    with pytest.raises(TypeError, match=r"use BlockMask\.from_dense"):
        BlockMask.from_scipy(np.eye(8, dtype=bool), level="element")


@pytest.mark.parametrize("pattern, words", [
    (scipy.sparse.coo_array((2, 0, 5)), r"pattern has shape \(2, 0, 5\): each head's pattern "
                                         r"\(M, N\) = \(0, 5\) must have M >= 1 and N >= 1"),
    ([scipy.sparse.csr_array((3, 0))] * 2, r"pattern\[0\] has shape \(3, 0\): each head's "
                                           r"pattern \(M, N\) must have M >= 1 and N >= 1")])
def test_from_scipy_names_the_empty_axis_of_per_head_patterns(pattern, words):
    # pattern.shape[0] of the 3-D array is 2 heads, and a list has no shape: the error must
    # name what is empty.
    with pytest.raises(ValueError, match=words):
        ExactMask.from_scipy(pattern)
    with pytest.raises(ValueError, match=words):
        BlockMask.from_scipy(pattern, level="element", block_size=4)


@pytest.mark.parametrize("options, error, words", [
    (dict(max_rows=0), ValueError, "max_rows must be a positive integer"),
    (dict(max_cols=-1), ValueError, "max_cols must be a positive integer"),
    (dict(max_cols=1.5), TypeError, "max_cols must be an integer"),
    (dict(tile=64), ValueError, r"tile must be a pair \(tile_m, tile_n\)"),
    (dict(tile=(64,)), ValueError, r"tile must be a pair \(tile_m, tile_n\)"),
    (dict(tile=(0, 64)), ValueError, "tile_m must be a positive integer")])
def test_render_names_a_bad_picture_size(options, error, words):
    with pytest.raises(error, match=words):
        ExactMask.from_dense(np.eye(40, dtype=bool)).render(**options)


def test_render_takes_the_tile_as_a_numpy_pair():
    """A tile given as a 1-D NumPy array of two (``numpy.array(x.shape[-2:])``) is the pair,
    as every other pair of cuflash.sparse (shape, block_size, window) reads one."""
    mask = ExactMask.from_dense(np.eye(40, dtype=bool))
    assert mask.render(tile=np.array([16, 8])) == mask.render(tile=(16, 8))
    with pytest.raises(ValueError, match=r"tile must be a pair \(tile_m, tile_n\)"):
        mask.render(tile=np.array([16, 8, 4]))


@pytest.mark.parametrize("rows", [[-1], [-2], [3], [[0, 1]]])
def test_element_rows_refuses_rows_outside_the_problem(rows):
    """A negative row is not counted from the end: it is refused, as a row past the last is,
    instead of reading another row's keys."""
    mask = ExactMask.from_dense(np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=bool))
    with pytest.raises(ValueError, match=r"rows must be a 1-D sequence of query rows in \[0, 3\)"):
        mask.element_rows(rows)


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_document_skips_empty_documents(causal, block_size):
    """Lengths from packed offsets hold zeros for empty sequences: such a document has no token,
    and the pattern is that of the others."""
    got = document([0, 3, 0, 0, 5, 0], causal=causal, block_size=block_size)
    want = document([3, 5], causal=causal, block_size=block_size)
    assert got.shape == want.shape and (got != want).nnz == 0


@pytest.mark.parametrize("lengths", [[], (), np.diff(np.array([0], dtype=np.int32))])
def test_document_of_no_documents_is_a_value_error(lengths):
    """No documents (an empty list, or the lengths of packed offsets holding no sequence) is a
    sequence of integers with no token in it: the value is wrong, as for all-empty documents,
    not the type."""
    with pytest.raises(ValueError, match="lengths must be 0 or more, at least one of them"):
        document(lengths)
    with pytest.raises(ValueError, match="lengths"):
        document([0, 0])


@pytest.mark.parametrize("per_head", [False, True])
def test_too_many_tiles_for_int32_names_a_remedy_that_fits_the_mask(monkeypatch, per_head):
    """A mask shared by all heads stores one pattern whatever the head count: fewer heads per
    call leaves its tiles as many as they were."""
    from cuflash.sparse import _csr

    pattern = causal(64, 64)
    mask = ExactMask.from_scipy([pattern] * 3 if per_head else pattern)
    monkeypatch.setattr(_csr, "INT32_MAX", 10)
    with pytest.raises(ValueError, match="too many 8x8 tiles for int32 indices") as error:
        mask.tile_bits(8, 8)
    assert ("fewer heads" in str(error.value)) == per_head
    assert "shorter sequences" in str(error.value)


@pytest.mark.parametrize("lengths", [
    [2**62] * 4 + [5],  # wraps round to 5 tokens in int64
    [2**63 - 1, 1],
    np.array([2**63], dtype=np.uint64),  # one length past int64 on its own
    np.array([2**63 - 1, 2**63 - 1], dtype=np.uint64),
    [2**64, 1],  # past uint64: NumPy holds Python ints
    [3, 2**63]])  # NumPy reads these as float64
def test_document_of_more_tokens_than_int64_holds_names_lengths(lengths):
    with pytest.raises(ValueError, match=r"lengths must sum to at most 2\*\*63 - 1"):
        document(lengths, block_size=2**62)


def test_builders_refuse_bad_arguments():
    with pytest.raises(TypeError, match="lengths"):
        document([1.5, 2])
    with pytest.raises(ValueError, match="lengths must be 0 or more"):
        document([3, -1])
    with pytest.raises(ValueError, match="at least one of them positive"):
        document([0, 0])
    with pytest.raises(ValueError, match="prefix=9 exceeds"):
        prefix_lm(5, 8, prefix=9)
    with pytest.raises(ValueError, match="block_size"):
        expand_blocks(scipy.sparse.eye(2), block_size=4, shape=(20, 8))


@pytest.mark.parametrize("shape, error, words", [
    (8, ValueError, r"shape must be a pair \(Nq, Nk\)"),
    ((8, 8, 8), ValueError, r"shape must be a pair \(Nq, Nk\)"),
    ((8, 0), ValueError, r"shape\[1\] must be a positive integer"),
    ((8.0, 8), TypeError, r"shape\[0\] must be an integer")])
def test_expand_blocks_names_a_bad_shape(shape, error, words):
    with pytest.raises(error, match=words):
        expand_blocks(scipy.sparse.eye(2), block_size=4, shape=shape)


# ----------------------------------------------------------------------------- attention

@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    if request.param == "numpy":
        return np
    return request.getfixturevalue("xp_gpu")


@pytest.fixture(params=["sm90", "portable"])
def hopper(request, monkeypatch):
    """Runs a GPU case with the Hopper kernels allowed and with them disabled."""
    if request.param == "portable":
        monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "1")
    else:
        monkeypatch.delenv(kernels.DISABLE_HOPPER_ENV, raising=False)
    return request.param


DROPOUT_P = 0.17  # the dropout cases' rate


def run_case(xp, rng, seed, *, dtype, b=2, hq=4, hkv=2, nq=333, nk=301, d=64, per_head=False,
             causal=False, window=(-1, -1), softcap=0.0, alibi=False, dropout=False,
             deterministic=False, density=0.03):
    """Forward into a NaN-poisoned ``out`` and backward of one exact-mask case, each checked by
    the rule against the float64 oracle given the same pattern (and the same dropout mask)."""
    q = random_array(rng, (b, hq, nq, d), dtype, xp=xp)
    k = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    v = random_array(rng, (b, hkv, nk, d), dtype, xp=xp)
    mask = mixed_pattern(rng, nq, nk, heads=hq if per_head else None, density=density)
    slopes = None
    if alibi:
        slopes = xp.asarray((2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)).astype(np.float32))
    options = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes, mask=mask)
    if dropout:
        options |= dict(dropout_p=DROPOUT_P, dropout_seed=int(rng.integers(2**63)),
                        dropout_offset=int(rng.integers(2**32)))
    context = f"seed={seed}, per_head={per_head}, {options | dict(alibi_slopes=alibi, mask=mask)}"
    out, lse, grads = check_forward_and_backward(q, k, v, options, rng=rng,
                                                 deterministic=deterministic, context=context)
    empty_row = nq // 2  # sees no key: output 0, lse -inf, dq 0
    assert np.all(to_host(out)[:, :, empty_row].astype(np.float32) == 0)
    assert np.all(np.isneginf(to_host(lse)[:, :, empty_row]))
    assert np.all(to_host(grads[0])[:, :, empty_row].astype(np.float32) == 0)
    return mask, (q, k, v), out, grads


FEATURES = {
    "plain": dict(),
    "per-head": dict(per_head=True),
    "causal": dict(causal=True),
    "window": dict(window=(90, 20)),
    "softcap-alibi-gqa": dict(softcap=20.0, alibi=True, hkv=1),
    "everything-per-head": dict(per_head=True, causal=True, window=(150, 0), softcap=30.0,
                                alibi=True, hkv=2, nq=257, nk=391),
    "dropout": dict(dropout=True),
    "dropout-causal-per-head": dict(dropout=True, causal=True, per_head=True, nq=391, nk=257),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exact_mask_on_the_numpy_path(rng, seed, dtype, feature):
    run_case(np, rng, seed, dtype=dtype, **FEATURES[feature])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exact_mask_on_every_gpu_family(xp_gpu, hopper, rng, seed, dtype, feature, d):
    if hopper == "sm90" and dtype is np.float32:
        pytest.skip("float32 has one family")
    case = dict(FEATURES[feature], d=d)
    dropout = case.get("dropout", False)
    if dropout and dtype is np.float32:
        pytest.skip("the float32 kernels draw no dropout mask")
    mask, (q, k, v), _, _ = run_case(xp_gpu, rng, seed, dtype=dtype, **case)
    drawn = dict(dropout_p=DROPOUT_P, dropout_seed=1) if dropout else {}
    plan = cuflash.kernel_plan(q, k, v, mask=mask, causal=case.get("causal", False), **drawn)
    families = (plan.forward.family.name, plan.backward.family.name)
    if dtype is np.float32:
        assert families == ("float32", "float32")
    elif hopper == "portable" or _launch.on_hopper(q) is False:
        assert families == ("sm80-mma", "sm80-mma")
    else:
        assert families == ("sm90-tma", "sm90-wgmma")
        if dropout:  # at D = 64 too, where its 64-row tiles form dQ by turns
            assert "warp-specialised" in plan.backward.detail, plan.backward.detail


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=DTYPE_IDS[:2])
def test_deterministic_backward_with_an_exact_mask(xp_gpu, hopper, seed, dtype):
    options = dict(dtype=dtype, per_head=True, causal=True, softcap=30.0, deterministic=True)
    first = run_case(xp_gpu, np.random.default_rng(seed), seed, **options)[3]
    second = run_case(xp_gpu, np.random.default_rng(seed), seed, **options)[3]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(to_host(a).view(np.uint16), to_host(b).view(np.uint16))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32], ids=["bfloat16", "float32"])
def test_exact_differs_from_its_block_sparse_coarsening(xp, rng, dtype):
    """The same pattern as a BlockMask computes whole blocks: different rows, where a block holds
    pairs the pattern leaves out; the exact mask is what the oracle computes."""
    n, d = 256, 64
    q, k, v = (random_array(rng, (1, 2, n, d), dtype, xp=xp) for _ in range(3))
    pattern = sliding_window(n, window=(40, 0))
    exact = ExactMask.from_scipy(pattern)
    out_exact = to_host(cuflash.attention(q, k, v, mask=exact)).astype(np.float64)
    out_blocks = to_host(cuflash.attention(q, k, v, block_mask=exact.to_block_mask(64)))
    assert_forward_close(xp.asarray(out_exact.astype(dtype)), None, q, k, v, mask=exact)
    differs = np.abs(out_exact - out_blocks.astype(np.float64)).max(axis=(0, 1, 3)) > 1e-2
    assert differs[100:].all()  # every row past the first window loses keys to the blocks


def test_cli_mask_show_exact_refuses_huge_patterns_and_pictures():
    runner = CliRunner()
    result = runner.invoke(main, ["mask", "show", "causal", "--seq-len", "16K", "--exact"])
    assert result.exit_code == 3 and "--force" in result.output
    result = runner.invoke(main, ["mask", "show", "causal", "--seq-len", "1K", "--exact",
                                  "--png", "x.png"])
    assert result.exit_code == 2 and "--exact" in result.output


def test_cli_mask_show_exact_out_of_memory_exits_3(monkeypatch):
    # --force builds what the estimate refuses; memory running out then is reported as the
    # block masks' builds report it (exit status 3 and the reason), not as a traceback.
    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 4.00 TiB")

    monkeypatch.setattr(ExactMask, "from_scipy", no_memory)
    result = CliRunner().invoke(main, ["mask", "show", "causal", "--seq-len", "1K", "--exact",
                                       "--force"])
    assert result.exit_code == 3, result.output
    assert "cannot build pattern 'causal' at 1,024 tokens: Unable to allocate" in result.output
    assert "--seq-len" in result.output


# ----------------------------------------------------------------------------- scipy's own pattern

def oracle64(q, k, v, dout, allowed, *, causal=False, window=(-1, -1), softcap=0.0, slopes=None):
    """Masked attention in float64 from a dense bool ``allowed`` ``(H', Nq, Nk)``, stated here
    without cuflash: ``(out, lse, dq, dk, dv)``; rows with no allowed key give 0 and -inf."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    nq, nk, group = q.shape[-2], k.shape[-2], q.shape[-3] // k.shape[-3]
    scale = q.shape[-1] ** -0.5
    kr, vr = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    i = np.arange(nq)[:, None] + (nk - nq)
    j = np.arange(nk)[None, :]
    x = q @ np.swapaxes(kr, -1, -2) * scale
    tanh = None
    if softcap:
        tanh = np.tanh(x / softcap)
        x = softcap * tanh
    if slopes is not None:
        x = x - np.asarray(slopes, np.float64)[:, None, None] * np.abs(i - j)
    seen = allowed.copy()
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    x = np.where(seen, x, -np.inf)
    top = x.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(x - top)
    total = e.sum(axis=-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)
    out = p @ vr
    lse = np.where(total[..., 0] > 0, np.log(np.where(total > 0, total, 1.0))[..., 0] + top[..., 0],
                   -np.inf)
    ds = p * (dout @ np.swapaxes(vr, -1, -2) - (dout * out).sum(axis=-1, keepdims=True))
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)

    def per_kv_head(g):
        return g.reshape(g.shape[:-3] + (k.shape[-3], group) + g.shape[-2:]).sum(axis=-3)

    return (out, lse, ds @ kr * scale, per_kv_head(np.swapaxes(ds, -1, -2) @ q) * scale,
            per_kv_head(np.swapaxes(p, -1, -2) @ dout))


def stored(allowed, rng):
    """COO parts of ``allowed`` with the traps a stored pattern may hold: allowed pairs as two
    duplicate entries that sum to a nonzero value, and disallowed pairs stored as explicit zeros
    or as duplicates that cancel."""
    rows, cols = np.nonzero(allowed)
    off_rows, off_cols = np.nonzero(~allowed & (rng.random(allowed.shape) < 0.2))
    half = off_rows.size // 2
    rows = np.concatenate([rows, rows, off_rows, off_rows[half:]]).astype(np.int64)
    cols = np.concatenate([cols, cols, off_cols, off_cols[half:]]).astype(np.int64)
    values = np.concatenate([np.full(allowed.sum(), 3.0), np.full(allowed.sum(), -1.0),
                             np.zeros(half), np.full(off_rows.size - half, 2.0),
                             np.full(off_rows.size - half, -2.0)])
    return values, (rows, cols)


def scipy_forms(allowed, rng):
    """``allowed`` in every scipy.sparse format, as matrices and arrays, with stored zeros,
    duplicates that cancel, int64 indices, bool and numeric data."""
    values, (rows, cols) = stored(allowed, rng)
    shape = allowed.shape
    numeric = scipy.sparse.coo_array((values, (rows, cols)), shape=shape)
    # CSR as given, duplicates and zeros kept in place (the constructor from COO would sum them).
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
    csr = scipy.sparse.csr_matrix((values[order], cols[order], indptr), shape=shape)
    csr.indices, csr.indptr = cols[order], indptr.astype(np.int64)  # kept int64, as given
    on, off = np.nonzero(allowed), np.nonzero(~allowed)
    flags = scipy.sparse.coo_matrix((np.ones(2 * on[0].size, bool), tuple(np.tile(c, 2) for c in on)),
                                    shape=shape)
    with_false = scipy.sparse.csr_array(
        (np.arange(on[0].size + off[0].size) < on[0].size,
         (np.concatenate([on[0], off[0]]), np.concatenate([on[1], off[1]]))), shape=shape)
    exact = scipy.sparse.csr_array(allowed.astype(np.float32))
    return {"coo numeric duplicates": numeric, "csr int64 with zeros and duplicates": csr,
            "coo bool duplicates": flags, "csr bool with stored False": with_false,
            "csc": exact.tocsc(), "lil": scipy.sparse.lil_matrix(exact), "dok": exact.todok(),
            "bsr": scipy.sparse.bsr_array(allowed.astype(np.int8), blocksize=(5, 1)),
            "dia": scipy.sparse.dia_matrix(exact)}


OPTION_SETS = [dict(), dict(causal=True), dict(window=(40, 7), softcap=8.0, alibi=True)]


def check_against_oracle64(pattern, expected, rng, options, *, hq=4, hkv=2):
    """Attention and its gradients on the NumPy path with ``ExactMask.from_scipy(pattern)``,
    against oracle64 of ``expected`` (H', Nq, Nk), scipy's own dense form of the pattern."""
    nq, nk = expected.shape[1:]
    q = rng.standard_normal((1, hq, nq, 16), dtype=np.float32)
    k, v = (rng.standard_normal((1, hkv, nk, 16), dtype=np.float32) for _ in range(2))
    dout = rng.standard_normal((1, hq, nq, 16), dtype=np.float32)
    options = dict(options)
    slopes = rng.random(hq).astype(np.float32) if options.pop("alibi", False) else None
    mask = ExactMask.from_scipy(pattern)
    out, lse = cuflash.attention(q, k, v, mask=mask, alibi_slopes=slopes, return_lse=True,
                                 **options)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, mask=mask, alibi_slopes=slopes,
                                       **options)
    want = oracle64(q, k, v, dout, expected, slopes=slopes, **options)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want[1]))
    finite = np.isfinite(want[1])
    np.testing.assert_allclose(lse[finite], want[1][finite], rtol=0, atol=1e-5)
    for got, ref, name in zip((out, *grads), (want[0], *want[2:]), ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max()),
                                   err_msg=name)


@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")  # dia of random data
@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "causal", "window-softcap-alibi"])
def test_every_scipy_form_gives_the_attention_of_its_dense_pattern(rng, options):
    """Each format (stored zeros, cancelling duplicates, int64 indices, bool or numeric data)
    attends exactly the pairs scipy's own ``toarray() != 0`` holds, on Nq != Nk not multiples of
    the NumPy path's 128-row tiles, a row with no allowed key among them."""
    nq, nk = 150, 131
    allowed = rng.random((nq, nk)) < 0.3
    allowed[nq - 3] = False
    for name, pattern in scipy_forms(allowed, rng).items():
        expected = pattern.toarray() != 0
        np.testing.assert_array_equal(expected, allowed, err_msg=name)  # the form holds allowed
        check_against_oracle64(pattern, expected[None], rng, options)


@pytest.mark.parametrize("options", OPTION_SETS, ids=["plain", "causal", "window-softcap-alibi"])
def test_empty_full_and_per_head_patterns_give_the_attention_of_their_dense_patterns(rng, options):
    nq, nk = 150, 131
    for pattern in (scipy.sparse.csr_array((nq, nk), dtype=bool),
                    scipy.sparse.coo_matrix(np.ones((nq, nk)))):
        check_against_oracle64(pattern, pattern.toarray()[None] != 0, rng, options)
    heads = rng.random((4, nq, nk)) < rng.random((4, 1, 1))
    heads[1] = False
    heads[2, :, : nk // 2] = True
    per_head = [scipy.sparse.coo_array((values, coords), shape=(nq, nk))
                for values, coords in (stored(h, rng) for h in heads)]
    per_head[3] = per_head[3].tocsc()
    for pattern in (per_head, scipy.sparse.coo_array(heads)):
        expected = (np.stack([p.toarray() for p in pattern]) if isinstance(pattern, list)
                    else pattern.toarray()) != 0
        np.testing.assert_array_equal(expected, heads)
        check_against_oracle64(pattern, expected, rng, options)
