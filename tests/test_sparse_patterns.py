"""Pattern builders against dense NumPy statements of the same patterns, at both resolutions."""

import numpy
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from cuflash import sparse
from cuflash.sparse import BlockMask, _intervals

SIZES = [(1, 1), (17, 17), (37, 23), (23, 37), (100, 100), (127, 64)]
BLOCK_SIZES = [1, 3, 8, (5, 7), 16, 64]


def coarsen(dense, block_size):
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nk = dense.shape
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    padded = numpy.zeros((nqb * bq, nkb * bk), dtype=bool)
    padded[:nq, :nk] = dense
    return padded.reshape(nqb, bq, nkb, bk).any(axis=(1, 3))


def grid(nq, nk):
    """Query positions aligned to key positions (i' = i + nk - nq) and key positions, broadcast."""
    i = numpy.arange(nq)[:, None] + (nk - nq)
    j = numpy.arange(nk)[None, :]
    return i, j


def causal_ref(nq, nk):
    i, j = grid(nq, nk)
    return j <= i


def window_ref(nq, nk, left, right):
    i, j = grid(nq, nk)
    return (j >= i - left) & (j <= i + right)


def strided_ref(nq, nk, stride, left, right):
    i, j = grid(nq, nk)
    return window_ref(nq, nk, left, right) | ((i - j) % stride == 0)


def fixed_ref(nq, nk, stride, summary):
    i, j = grid(nq, nk)
    return (j // stride == i // stride) | (j % stride >= stride - summary)


def butterfly_ref(nq, nk):
    i, j = grid(nq, nk)
    x = numpy.bitwise_xor(numpy.maximum(i, 0), j)
    return (i >= 0) & ((x == 0) | ((x & (x - 1)) == 0))


def longformer_ref(nq, nk, left, right, global_positions):
    i, j = grid(nq, nk)
    g = numpy.asarray(global_positions, dtype=int)
    return window_ref(nq, nk, left, right) | numpy.isin(j, g) | numpy.isin(i, g)


def image_ref(height, width, radius):
    pixel = numpy.arange(height * width)
    r, c = pixel // width, pixel % width
    return ((abs(r[:, None] - r[None, :]) <= radius) & (abs(c[:, None] - c[None, :]) <= radius))


def check(build, reference, block_sizes=BLOCK_SIZES):
    """The element-level pattern equals the reference; each block level equals its coarsening."""
    element = build(None)
    assert isinstance(element, scipy.sparse.csr_array) and element.dtype == bool
    assert element.has_canonical_format
    numpy.testing.assert_array_equal(element.toarray(), reference)
    for block_size in block_sizes:
        blocks = build(block_size)
        assert isinstance(blocks, scipy.sparse.csr_array) and blocks.dtype == bool
        assert blocks.has_canonical_format
        numpy.testing.assert_array_equal(blocks.toarray(), coarsen(reference, block_size),
                                         err_msg=f"block_size={block_size}")


@pytest.mark.parametrize("nq, nk", SIZES)
def test_causal(nq, nk):
    check(lambda b: sparse.causal(nq, nk, block_size=b), causal_ref(nq, nk))


def test_causal_defaults_to_square():
    numpy.testing.assert_array_equal(sparse.causal(5).toarray(), numpy.tril(numpy.ones((5, 5))))


@pytest.mark.parametrize("nq, nk", SIZES)
@pytest.mark.parametrize("window", [0, 3, 50, (0, 0), (5, 0), (0, 9), (2, 31)])
def test_sliding_window(nq, nk, window):
    left, right = (window, window) if isinstance(window, int) else window
    check(lambda b: sparse.sliding_window(nq, nk, window=window, block_size=b),
          window_ref(nq, nk, left, right))


@pytest.mark.parametrize("nq, nk", SIZES)
@pytest.mark.parametrize("stride, window", [(1, 0), (4, None), (7, 2), (16, (3, 0)), (40, 5)])
def test_strided(nq, nk, stride, window):
    left, right = ((stride, stride) if window is None else
                   (window, window) if isinstance(window, int) else window)
    check(lambda b: sparse.strided(nq, nk, stride=stride, window=window, block_size=b),
          strided_ref(nq, nk, stride, left, right))


@pytest.mark.parametrize("nq, nk", SIZES)
@pytest.mark.parametrize("stride, summary", [(1, 1), (4, 1), (7, 3), (16, 16), (32, 2)])
def test_fixed(nq, nk, stride, summary):
    check(lambda b: sparse.fixed(nq, nk, stride=stride, summary=summary, block_size=b),
          fixed_ref(nq, nk, stride, summary))


@pytest.mark.parametrize("nq, nk", SIZES + [(64, 64), (130, 129), (40, 90)])
def test_butterfly(nq, nk):
    check(lambda b: sparse.butterfly(nq, nk, block_size=b), butterfly_ref(nq, nk))


@pytest.mark.parametrize("n, block_size", [(1024, 64), (1000, 128), (512, 16)])
def test_butterfly_blocks_follow_the_xor_rule_for_power_of_two_blocks(n, block_size):
    nb = -(-n // block_size)
    i, j = numpy.arange(nb)[:, None], numpy.arange(nb)[None, :]
    x = i ^ j
    expected = (x & (x - 1)) == 0  # 0 or a power of two
    numpy.testing.assert_array_equal(sparse.butterfly(n, block_size=block_size).toarray(), expected)


@pytest.mark.parametrize("nq, nk", SIZES)
@pytest.mark.parametrize("window, global_tokens", [(0, 0), (2, 1), ((4, 1), 3), (6, [0, 5, 16]),
                                                   (1, [22])])
def test_longformer(nq, nk, window, global_tokens):
    left, right = (window, window) if isinstance(window, int) else window
    positions = range(global_tokens) if isinstance(global_tokens, int) else global_tokens
    positions = [p for p in positions if p < nk]
    tokens = global_tokens if isinstance(global_tokens, int) else positions
    if isinstance(tokens, int):
        tokens = min(tokens, nk)
    check(lambda b: sparse.longformer(nq, nk, window=window, global_tokens=tokens, block_size=b),
          longformer_ref(nq, nk, left, right, positions))


@pytest.mark.parametrize("height, width", [(1, 1), (5, 7), (8, 8), (13, 3), (2, 40)])
@pytest.mark.parametrize("radius", [0, 1, 3])
def test_image_local(height, width, radius):
    check(lambda b: sparse.image_local(height, width, radius=radius, block_size=b),
          image_ref(height, width, radius), block_sizes=BLOCK_SIZES + [(16, 4), 100])


HUGE = [2**63 - 1, 10**30]  # sys.maxsize (a common "unbounded"), and past int64


@pytest.mark.parametrize("nq, nk", [(1, 1), (17, 17), (37, 23), (23, 37)])
@pytest.mark.parametrize("huge", HUGE)
def test_distances_longer_than_the_sequences(nq, nk, huge):
    """Windows, strides, segments and radii longer than the problem reach every key they can:
    the pattern of a distance of nq + nk, at every resolution (not an int64 overflow)."""
    reach = nq + nk
    check(lambda b: sparse.sliding_window(nq, nk, window=huge, block_size=b),
          window_ref(nq, nk, reach, reach))
    check(lambda b: sparse.sliding_window(nq, nk, window=(2, huge), block_size=b),
          window_ref(nq, nk, 2, reach))
    check(lambda b: sparse.strided(nq, nk, stride=huge, window=1, block_size=b),
          strided_ref(nq, nk, reach, 1, 1))
    check(lambda b: sparse.strided(nq, nk, stride=3, window=(huge, 0), block_size=b),
          strided_ref(nq, nk, 3, reach, 0))
    check(lambda b: sparse.longformer(nq, nk, window=(0, huge), global_tokens=1, block_size=b),
          longformer_ref(nq, nk, 0, reach, [0]))
    i, j = grid(nq, nk)
    for first_summary_key in (huge - 1, 2, 0):  # summary keys: none, keys 2.., every key
        check(lambda b: sparse.fixed(nq, nk, stride=huge, summary=huge - first_summary_key,
                                     block_size=b),
              (i >= 0) | (j >= first_summary_key))  # one segment holds every key


@pytest.mark.parametrize("huge", HUGE)
def test_image_radius_longer_than_the_image(huge):
    check(lambda b: sparse.image_local(5, 7, radius=huge, block_size=b), image_ref(5, 7, 7))


@settings(max_examples=40, deadline=None)
@given(nq=st.integers(1, 90), nk=st.integers(1, 90), bq=st.integers(1, 33), bk=st.integers(1, 33),
       left=st.integers(0, 40), right=st.integers(0, 40), stride=st.integers(1, 30))
def test_random_sizes_block_level_is_the_coarsened_element_level(nq, nk, bq, bk, left, right,
                                                                 stride):
    summary, count = 1 + left % stride, min(right % 4, nk)
    cases = [
        (lambda b: sparse.causal(nq, nk, block_size=b), causal_ref(nq, nk)),
        (lambda b: sparse.sliding_window(nq, nk, window=(left, right), block_size=b),
         window_ref(nq, nk, left, right)),
        (lambda b: sparse.strided(nq, nk, stride=stride, window=(left, right), block_size=b),
         strided_ref(nq, nk, stride, left, right)),
        (lambda b: sparse.fixed(nq, nk, stride=stride, summary=summary, block_size=b),
         fixed_ref(nq, nk, stride, summary)),
        (lambda b: sparse.butterfly(nq, nk, block_size=b), butterfly_ref(nq, nk)),
        (lambda b: sparse.longformer(nq, nk, window=left, global_tokens=count, block_size=b),
         longformer_ref(nq, nk, left, left, range(count))),
    ]
    for build, reference in cases:
        element = BlockMask.from_scipy(build(None), level="element", block_size=(bq, bk))
        blocks = build((bq, bk))
        block = BlockMask.from_scipy(blocks, level="block", block_size=(bq, bk), shape=(nq, nk))
        assert element == block
        numpy.testing.assert_array_equal(blocks.toarray(), coarsen(reference, (bq, bk)))


def test_large_key_ranges_deduplicate_by_sorting(monkeypatch):
    # Long sequences take the sorting path instead of the bitmap; force it on small ones.
    monkeypatch.setattr(_intervals, "_BITMAP_LIMIT", 0)
    check(lambda b: sparse.strided(100, 90, stride=7, window=3, block_size=b),
          strided_ref(100, 90, 7, 3, 3))
    check(lambda b: sparse.image_local(9, 11, radius=2, block_size=b), image_ref(9, 11, 2))
    check(lambda b: sparse.butterfly(77, block_size=b), butterfly_ref(77, 77))


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 20), width=st.integers(1, 20), radius=st.integers(0, 4),
       block=st.integers(1, 50))
def test_random_images(height, width, radius, block):
    n = height * width
    element = BlockMask.from_scipy(sparse.image_local(height, width, radius=radius),
                                   level="element", block_size=block)
    blocks = sparse.image_local(height, width, radius=radius, block_size=block)
    assert element == BlockMask.from_scipy(blocks, level="block", block_size=block, shape=(n, n))
    numpy.testing.assert_array_equal(blocks.toarray(),
                                     coarsen(image_ref(height, width, radius), block))


# -- BigBird -----------------------------------------------------------------------------------


@pytest.mark.parametrize("nq, nk, block_size",
                         [(1000, 1000, 64), (300, 700, (32, 64)), (64, 64, 64)])
@pytest.mark.parametrize("num_random", [0, 1, 3, 100])
def test_bigbird_adds_random_blocks_to_longformer(nq, nk, block_size, num_random):
    seed = int(numpy.random.SeedSequence().entropy % 2**32)
    base = sparse.longformer(nq, nk, window=64, global_tokens=[0, nk - 1], block_size=block_size)
    pattern = sparse.bigbird(nq, nk, block_size=block_size, window=64, global_tokens=[0, nk - 1],
                             num_random=num_random, seed=seed)
    assert pattern.shape == base.shape and pattern.dtype == bool and pattern.has_canonical_format
    dense, base_dense = pattern.toarray(), base.toarray()
    assert (dense >= base_dense).all(), "the window and global blocks are kept"
    extra = dense.sum(axis=1) - base_dense.sum(axis=1)
    free = base.shape[1] - base_dense.sum(axis=1)
    numpy.testing.assert_array_equal(extra, numpy.minimum(num_random, free))


def test_bigbird_is_reproducible_and_seeded():
    args = dict(block_size=64, window=64, num_random=2, global_tokens=64)
    first = sparse.bigbird(4096, seed=7, **args)
    assert (first != sparse.bigbird(4096, seed=7, **args)).nnz == 0
    assert (first != sparse.bigbird(4096, seed=8, **args)).nnz > 0


def test_bigbird_random_blocks_are_spread_out():
    pattern = sparse.bigbird(64 * 400, block_size=64, window=0, num_random=3, seed=1)
    dense = pattern.toarray()
    numpy.fill_diagonal(dense, False)
    hits = dense.sum(axis=0)
    # 1200 random draws over 400 columns: every column is hit about 3 times.
    assert hits.max() < 15 and (hits > 0).mean() > 0.8


def test_bigbird_needs_block_size_and_integer_seed():
    with pytest.raises(ValueError, match="block_size is required"):
        sparse.bigbird(100, block_size=None, window=1, num_random=1)
    with pytest.raises(TypeError, match="seed"):
        sparse.bigbird(100, block_size=10, window=1, num_random=1, seed=numpy.random.default_rng())
    with pytest.raises(ValueError, match="num_random"):
        sparse.bigbird(100, block_size=10, window=1, num_random=-1)


def test_per_head_bigbird_mask():
    n, heads = 2048, 4
    patterns = [sparse.bigbird(n, block_size=128, window=128, num_random=2, seed=h)
                for h in range(heads)]
    mask = BlockMask.from_scipy(patterns, level="block", block_size=128, shape=(n, n))
    assert mask.num_heads == heads
    for h in range(heads):
        numpy.testing.assert_array_equal(mask.to_dense()[h], patterns[h].toarray())


# -- long sequences at block level ---------------------------------------------------------------


def test_block_level_builders_handle_long_sequences():
    n, block = 1 << 20, 128
    nb = n // block
    window = sparse.sliding_window(n, window=4096, block_size=block)
    assert window.shape == (nb, nb)
    assert window.nnz == nb * 65 - 2 * sum(range(1, 33))  # 32 blocks each side, clipped at the ends
    assert sparse.causal(n // 8, block_size=block).nnz == (nb // 8) * (nb // 8 + 1) // 2
    assert sparse.butterfly(n, block_size=block).nnz == nb * (1 + (nb - 1).bit_length())
    image = sparse.image_local(1024, 1024, radius=7, block_size=block)
    assert image.shape == (nb, nb) and image.nnz > 0


def test_block_level_butterfly_lists_no_query_row():
    """The block-level butterfly listed every query row's partners, so its cost grew with the
    tokens, not the blocks: 2^62 tokens in 64 blocks asked for 512 PiB (and `cuflash mask show
    butterfly` at 32M tokens took a minute to draw 8 blocks)."""
    nb = 64
    x = numpy.arange(nb)[:, None] ^ numpy.arange(nb)[None, :]
    expected = (x & (x - 1)) == 0  # the XOR rule of power-of-two blocks
    numpy.testing.assert_array_equal(
        sparse.butterfly(1 << 62, block_size=1 << 56).toarray(), expected)
    # Blocks of other sizes, queries and keys of other lengths: grouping blocks keeps exactly
    # the groups that hold a kept block, as the coarsening of the finer pattern says.
    fine = sparse.butterfly(3**13, 5**8, block_size=(81, 125))
    coarse = sparse.butterfly(3**13, 5**8, block_size=(81 * 27, 125 * 25))
    grouped = BlockMask.from_scipy(fine, level="element", block_size=(27, 25))
    numpy.testing.assert_array_equal(grouped.to_dense()[0], coarse.toarray())


def test_index_dtype_is_int32_when_it_fits():
    pattern = sparse.sliding_window(1000, window=5, block_size=8)
    assert pattern.indices.dtype == numpy.int32 and pattern.indptr.dtype == numpy.int32


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, message", [
    (lambda: sparse.causal(0), ValueError, "nq must be a positive integer, got 0"),
    (lambda: sparse.causal(10, -3), ValueError, "nk must be a positive integer, got -3"),
    (lambda: sparse.causal(10.0), TypeError, "nq must be an integer, got 10.0"),
    (lambda: sparse.causal(True), TypeError, "nq must be an integer"),
    (lambda: sparse.causal(10, block_size=0), ValueError, "block_size must be a positive"),
    (lambda: sparse.sliding_window(10, window=-1), ValueError, "window must be a non-negative"),
    (lambda: sparse.sliding_window(10, window=(1, 2, 3)), ValueError, "pair of integers"),
    (lambda: sparse.sliding_window(10, window=(1, -2)), ValueError, r"window\[1\]"),
    (lambda: sparse.strided(10, stride=0), ValueError, "stride must be a positive integer"),
    (lambda: sparse.fixed(10, stride=4, summary=5), ValueError, "summary must be at most stride=4"),
    (lambda: sparse.fixed(10, stride=4, summary=0), ValueError, "summary must be a positive"),
    (lambda: sparse.longformer(10, window=1, global_tokens=11), ValueError, "exceeds"),
    (lambda: sparse.longformer(10, window=1, global_tokens=[3, 10]), ValueError,
     r"key positions in 0..9, got \[10\]"),
    (lambda: sparse.longformer(10, window=1, global_tokens=[[1]]), TypeError, "1-D"),
    (lambda: sparse.longformer(10, window=1, global_tokens=[0.5]), TypeError, "integer"),
    # positions past int64 are reported as given, not wrapped round
    (lambda: sparse.longformer(10, window=1, global_tokens=numpy.array([2**64 - 1], numpy.uint64)),
     ValueError, r"key positions in 0..9, got \[18446744073709551615\]"),
    (lambda: sparse.longformer(10, window=1, global_tokens=[3, 2**63]), ValueError,
     r"key positions in 0..9, got \[9223372036854775808\]"),
    (lambda: sparse.longformer(10, window=1, global_tokens=[2**70]), ValueError,
     r"key positions in 0..9, got \[1180591620717411303424\]"),
    (lambda: sparse.image_local(0, 4, radius=1), ValueError, "height must be a positive"),
    (lambda: sparse.image_local(4, 4, radius=-1), ValueError, "radius must be a non-negative"),
])
def test_builder_argument_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_window_is_keyword_only_and_required():
    with pytest.raises(TypeError):
        sparse.sliding_window(10, 10, 3)
    with pytest.raises(TypeError, match="window"):
        sparse.sliding_window(10)


def test_element_patterns_combine_elementwise_before_coarsening():
    n = 300
    local_causal = sparse.sliding_window(n, window=40).multiply(sparse.causal(n))
    mask = BlockMask.from_scipy(local_causal, level="element", block_size=64)
    expected = coarsen(window_ref(n, n, 40, 40) & causal_ref(n, n), 64)
    numpy.testing.assert_array_equal(mask.to_dense()[0], expected)
