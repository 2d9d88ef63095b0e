"""BlockMask: construction from scipy.sparse and dense layouts, storage, tiles, algebra, errors."""

import copy
import pickle
import sys
import types

import numpy
import pytest
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from cuflash.sparse import BlockMask, TileCSR
from cuflash.sparse import _csr

SPARSE_FORMATS = ["csr", "csc", "coo", "bsr", "dok", "lil", "dia"]


@pytest.fixture
def rng():
    seed = numpy.random.SeedSequence().entropy
    print(f"random seed: {seed}")  # shown by pytest when a test fails
    return numpy.random.default_rng(seed)


def coarsen(dense, block_size):
    """Reference coarsening of elements (..., Nq, Nk): a block is kept if any element is."""
    bq, bk = block_size
    *lead, nq, nk = dense.shape
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    padded = numpy.zeros((*lead, nqb * bq, nkb * bk), dtype=bool)
    padded[..., :nq, :nk] = dense != 0
    return padded.reshape(*lead, nqb, bq, nkb, bk).any(axis=(-3, -1))


def expand(blocks, block_size, shape):
    """Reference expansion of blocks (H, Nqb, Nkb) to elements (H, Nq, Nk)."""
    bq, bk = block_size
    return blocks.repeat(bq, axis=1).repeat(bk, axis=2)[:, :shape[0], :shape[1]]


def random_elements(rng, shape, density):
    return rng.random(shape) < density


def as_format(dense, fmt, *, array):
    kind = "array" if array else "matrix"
    return getattr(scipy.sparse, f"{fmt}_{kind}")(dense)


def csr_reference(dense):
    """(row_ptr (H, M+1) flat offsets, col_idx) of a dense (H, M, N) bool pattern, by loops."""
    row_ptr = numpy.zeros((dense.shape[0], dense.shape[1] + 1), dtype=numpy.int64)
    col_idx, offset = [], 0
    for h in range(dense.shape[0]):
        row_ptr[h, 0] = offset
        for i in range(dense.shape[1]):
            cols = numpy.flatnonzero(dense[h, i])
            col_idx.extend(cols.tolist())
            offset += cols.size
            row_ptr[h, i + 1] = offset
    return row_ptr, numpy.asarray(col_idx, dtype=numpy.int64)


def assert_csr_matches(row_ptr, col_idx, dense):
    expected_ptr, expected_idx = csr_reference(dense)
    numpy.testing.assert_array_equal(row_ptr, expected_ptr)
    numpy.testing.assert_array_equal(col_idx, expected_idx)


# -- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, block_size", [((1000, 1000), 64), ((257, 130), (128, 64)),
                                               ((17, 45), (5, 7)), ((1, 1), 128)])
def test_from_scipy_element_level_coarsens_exactly(rng, shape, block_size):
    dense = random_elements(rng, shape, 0.002)
    mask = BlockMask.from_scipy(scipy.sparse.csr_array(dense), level="element",
                                block_size=block_size)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    assert mask.shape == shape
    assert mask.block_size == (bq, bk)
    assert mask.nblocks == (-(-shape[0] // bq), -(-shape[1] // bk))
    assert mask.num_heads is None
    numpy.testing.assert_array_equal(mask.to_dense()[0], coarsen(dense, (bq, bk)))


@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")  # dia of random data
@pytest.mark.parametrize("array", [False, True], ids=["matrix", "array"])
def test_every_scipy_format_gives_the_same_mask(rng, array):
    dense = random_elements(rng, (150, 97), 0.01) * rng.integers(1, 5, size=(150, 97))
    expected = BlockMask.from_scipy(scipy.sparse.csr_array(dense), level="element",
                                    block_size=(32, 16))
    for fmt in SPARSE_FORMATS:
        pattern = as_format(dense, fmt, array=array)
        mask = BlockMask.from_scipy(pattern, level="element", block_size=(32, 16))
        assert mask == expected, fmt


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
def test_every_scipy_format_at_block_level(rng, fmt):
    blocks = random_elements(rng, (8, 5), 0.4)
    mask = BlockMask.from_scipy(as_format(blocks, fmt, array=True), level="block",
                                block_size=64, shape=(500, 300))
    numpy.testing.assert_array_equal(mask.to_dense()[0], blocks)
    assert mask.shape == (500, 300)


def test_explicit_zeros_are_not_set(rng):
    dense = random_elements(rng, (64, 64), 0.01)
    rows, cols = numpy.nonzero(dense)
    zero_rows, zero_cols = rng.integers(0, 64, size=(2, 50))
    data = numpy.concatenate([numpy.ones(rows.size), numpy.zeros(zero_rows.size)])
    coo = scipy.sparse.coo_array((data, (numpy.concatenate([rows, zero_rows]),
                                         numpy.concatenate([cols, zero_cols]))), shape=(64, 64))
    csr = coo.tocsr()  # keeps the explicit zeros stored
    assert csr.nnz > dense.sum()
    for pattern in (coo, csr, coo.tocsc()):
        mask = BlockMask.from_scipy(pattern, level="element", block_size=8)
        numpy.testing.assert_array_equal(mask.to_dense()[0], coarsen(dense, (8, 8)))


def test_duplicates_are_summed_before_deciding(rng):
    # (0, 0) stored twice as +1 and -1: the matrix value is 0, so the entry is not set.
    coo = scipy.sparse.coo_array(([1.0, -1.0, 2.0], ([0, 0, 9], [0, 0, 9])), shape=(10, 10))
    mask = BlockMask.from_scipy(coo, level="element", block_size=5)
    numpy.testing.assert_array_equal(mask.to_dense()[0], [[False, False], [False, True]])
    assert coo.nnz == 3, "the caller's matrix must not be rewritten"


def test_bsr_and_dia_with_stored_zeros(rng):
    dense = numpy.zeros((48, 48))
    dense[3, 5] = 1.0
    dense[40, 40] = 2.0
    bsr = scipy.sparse.bsr_array(dense, blocksize=(16, 16))  # stores whole 16x16 blocks
    dia = scipy.sparse.dia_array((numpy.zeros((1, 48)), [0]), shape=(48, 48))  # a diagonal of 0
    expected = coarsen(dense, (8, 8))
    numpy.testing.assert_array_equal(
        BlockMask.from_scipy(bsr, level="element", block_size=8).to_dense()[0], expected)
    assert BlockMask.from_scipy(dia, level="element", block_size=8).nnz_blocks == 0


def test_per_head_from_sequence_and_3d(rng):
    heads = [random_elements(rng, (70, 90), 0.01) for _ in range(3)]
    from_list = BlockMask.from_scipy([scipy.sparse.csr_array(h) for h in heads], level="element",
                                     block_size=32)
    stacked = scipy.sparse.coo_array(numpy.stack(heads))
    from_3d = BlockMask.from_scipy(stacked, level="element", block_size=32)
    assert from_list.num_heads == 3
    assert from_list == from_3d
    numpy.testing.assert_array_equal(from_list.to_dense(), coarsen(numpy.stack(heads), (32, 32)))


def test_a_single_head_sequence_is_per_head():
    mask = BlockMask.from_scipy([scipy.sparse.eye_array(10)], level="element", block_size=5)
    assert mask.num_heads == 1
    with pytest.raises(ValueError, match="Hq=2"):
        mask.check_compatible(10, 10, 2)


def test_from_dense_shared_and_per_head(rng):
    layout = rng.integers(0, 2, size=(4, 6, 9))
    mask = BlockMask.from_dense(layout, block_size=64)
    assert mask.num_heads == 4
    assert mask.shape == (6 * 64, 9 * 64)
    numpy.testing.assert_array_equal(mask.to_dense(), layout.astype(bool))
    shared = BlockMask.from_dense(layout[0].astype(bool), block_size=(64, 128), shape=(380, 1100))
    assert shared.num_heads is None and shared.shape == (380, 1100)
    numpy.testing.assert_array_equal(shared.to_dense()[0], layout[0].astype(bool))


def test_from_dense_takes_device_arrays_through_get(rng):
    layout = rng.random((3, 4)) < 0.5
    DeviceArray = type("ndarray", (), {"__module__": "cupy._core.core", "get": lambda self: layout})
    assert BlockMask.from_dense(DeviceArray(), block_size=64) == BlockMask.from_dense(
        layout, block_size=64)


def test_from_dense_and_from_scipy_agree(rng):
    layout = rng.random((3, 7, 5)) < 0.5
    dense_mask = BlockMask.from_dense(layout, block_size=16, shape=(100, 70))
    sparse_mask = BlockMask.from_scipy([scipy.sparse.csr_array(h) for h in layout], level="block",
                                       block_size=16, shape=(100, 70))
    assert dense_mask == sparse_mask
    assert hash(dense_mask) == hash(sparse_mask)


# -- storage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [None, 1, 3])
def test_csr_and_transposed_csr(rng, heads):
    layout = rng.random((heads or 1, 11, 7)) < 0.3
    mask = BlockMask.from_dense(layout if heads else layout[0], block_size=8, shape=(81, 50))
    assert mask.row_ptr.shape == (heads or 1, 12)
    assert mask.col_ptr.shape == (heads or 1, 8)
    assert_csr_matches(mask.row_ptr, mask.col_idx, layout)
    assert_csr_matches(mask.col_ptr, mask.row_idx, layout.transpose(0, 2, 1))
    assert mask.row_ptr.dtype == mask.col_idx.dtype == numpy.int32


def test_index_dtype_follows_size():
    assert _csr.index_dtype(2**31 - 1) == numpy.int32
    assert _csr.index_dtype(2**31) == numpy.int64


def test_storage_is_read_only_and_the_mask_immutable():
    mask = BlockMask.from_dense(numpy.eye(4, dtype=bool), block_size=64)
    for array in (mask.row_ptr, mask.col_idx, mask.col_ptr, mask.row_idx):
        with pytest.raises(ValueError):
            array[0] = 1
    with pytest.raises(AttributeError, match="immutable"):
        mask._shape = (1, 1)
    with pytest.raises(AttributeError):
        mask.shape = (1, 1)
    with pytest.raises(TypeError, match="from_scipy"):
        BlockMask()


def test_to_scipy_round_trips(rng):
    layout = rng.random((2, 9, 4)) < 0.4
    mask = BlockMask.from_dense(layout, block_size=32)
    heads = mask.to_scipy()
    assert isinstance(heads, list) and len(heads) == 2
    for h, pattern in enumerate(heads):
        assert isinstance(pattern, scipy.sparse.csr_array) and pattern.dtype == bool
        numpy.testing.assert_array_equal(pattern.toarray(), layout[h])
    assert BlockMask.from_scipy(heads, level="block", block_size=32, shape=mask.shape) == mask
    shared = BlockMask.from_dense(layout[0], block_size=32)
    assert isinstance(shared.to_scipy(), scipy.sparse.csr_array)


def test_ragged_last_blocks_to_element_dense(rng):
    layout = rng.random((2, 5, 3)) < 0.6
    mask = BlockMask.from_dense(layout, block_size=(16, 32), shape=(70, 65))
    elements = mask.to_element_dense()
    assert elements.shape == (2, 70, 65)
    numpy.testing.assert_array_equal(elements, expand(layout, (16, 32), (70, 65)))


def test_density_counts_blocks_and_element_density_counts_pairs():
    layout = numpy.array([[1, 0], [0, 1]], dtype=bool)
    # Blocks of 64 over 100 x 100: block (1, 1) covers only 36 x 36 elements.
    mask = BlockMask.from_dense(layout, block_size=64, shape=(100, 100))
    assert mask.nnz_blocks == 2
    assert mask.density == 0.5
    assert mask.element_density == pytest.approx((64 * 64 + 36 * 36) / (100 * 100))
    per_head = BlockMask.from_dense(numpy.stack([layout, ~layout]), block_size=64, shape=(100, 100))
    assert per_head.nnz_blocks == 4 and per_head.density == 0.5
    assert per_head.element_density == pytest.approx(0.5)


def test_element_density_of_a_mask_past_int64_pairs():
    """3 · 2**62 pairs covered overflow an int64 count: the density stays a fraction in [0, 1]."""
    layout = numpy.array([[1, 0], [1, 1]], dtype=bool)
    mask = BlockMask.from_dense(layout, block_size=2**31)
    assert mask.element_density == 0.75


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_element_density_matches_element_dense(data):
    nq, nk = data.draw(st.integers(1, 60)), data.draw(st.integers(1, 60))
    bq, bk = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20))
    heads = data.draw(st.sampled_from([None, 1, 2]))
    nqb, nkb = -(-nq // bq), -(-nk // bk)
    bits = data.draw(st.lists(st.booleans(), min_size=(heads or 1) * nqb * nkb,
                              max_size=(heads or 1) * nqb * nkb))
    layout = numpy.array(bits, dtype=bool).reshape(heads or 1, nqb, nkb)
    mask = BlockMask.from_dense(layout if heads else layout[0], block_size=(bq, bk), shape=(nq, nk))
    assert mask.element_density == pytest.approx(mask.to_element_dense().mean())
    assert mask.density == pytest.approx(layout.mean())


# -- tiles -------------------------------------------------------------------------------------


def tile_reference(layout, block_size, tile, shape):
    """Dense tile pattern (H, Mt, Nt): each tile takes its block's bit; tiles past N dropped."""
    ratio = (block_size[0] // tile[0], block_size[1] // tile[1])
    tiles_m, tiles_n = -(-shape[0] // tile[0]), -(-shape[1] // tile[1])
    return layout.repeat(ratio[0], axis=1).repeat(ratio[1], axis=2)[:, :tiles_m, :tiles_n]


@pytest.mark.parametrize("shape, block_size, tile", [
    ((1000, 1000), (128, 128), (64, 64)),
    ((1000, 777), (128, 128), (128, 64)),
    ((4097, 129), (128, 64), (64, 64)),
    ((64, 64), (64, 64), (64, 64)),
    ((130, 70), (64, 128), (16, 32)),
])
@pytest.mark.parametrize("heads", [None, 4])
def test_tile_csr_refines_and_drops_tiles_past_the_end(rng, shape, block_size, tile, heads):
    nblocks = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
    layout = rng.random((heads or 1, *nblocks)) < 0.35
    mask = BlockMask.from_dense(layout if heads else layout[0], block_size=block_size, shape=shape)
    tiles = mask.tile_csr(*tile)
    assert isinstance(tiles, TileCSR)
    expected = tile_reference(layout, block_size, tile, shape)
    tiles_m, tiles_n = -(-shape[0] // tile[0]), -(-shape[1] // tile[1])
    assert tiles.row_ptr.shape == (heads or 1, tiles_m + 1)
    assert tiles.col_ptr.shape == (heads or 1, tiles_n + 1)
    for array in tiles:
        assert array.dtype == numpy.int32 and not array.flags.writeable
    assert_csr_matches(tiles.row_ptr, tiles.col_idx, expected)
    assert_csr_matches(tiles.col_ptr, tiles.row_idx, expected.transpose(0, 2, 1))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_refine_matches_dense_expansion(data):
    heads = data.draw(st.integers(1, 3))
    tile = (data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
    ratio = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    block_size = (tile[0] * ratio[0], tile[1] * ratio[1])
    shape = (data.draw(st.integers(1, 80)), data.draw(st.integers(1, 80)))
    nblocks = (-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]))
    seed = data.draw(st.integers(0, 2**32 - 1))
    layout = numpy.random.default_rng(seed).random((heads, *nblocks)) < data.draw(
        st.sampled_from([0.0, 0.3, 1.0]))
    mask = BlockMask.from_dense(layout, block_size=block_size, shape=shape)
    tiles = mask.tile_csr(*tile)
    expected = tile_reference(layout, block_size, tile, shape)
    assert_csr_matches(tiles.row_ptr, tiles.col_idx, expected)
    assert_csr_matches(tiles.col_ptr, tiles.row_idx, expected.transpose(0, 2, 1))


def test_tile_csr_is_cached_per_tile():
    mask = BlockMask.from_dense(numpy.ones((3, 3), dtype=bool), block_size=128)
    assert mask.tile_csr(64, 64) is mask.tile_csr(64, 64)
    assert mask.tile_csr(64, 128) is not mask.tile_csr(64, 64)


def test_tile_must_divide_block_size():
    mask = BlockMask.from_dense(numpy.ones((3, 3), dtype=bool), block_size=(128, 96))
    with pytest.raises(ValueError, match=r"\(bq, bk\)=\(128, 96\).*\(tile_m, tile_n\)=\(64, 64\)"):
        mask.tile_csr(64, 64)
    with pytest.raises(ValueError, match="tile_m"):
        mask.tile_csr(0, 32)


def test_refine_refuses_more_tiles_than_int32_offsets(monkeypatch):
    monkeypatch.setattr(_csr, "INT32_MAX", 10)
    mask = BlockMask.from_dense(numpy.ones((2, 2), dtype=bool), block_size=4)
    with pytest.raises(ValueError, match="int32"):
        mask.tile_csr(1, 1)


class FakeCupy(types.ModuleType):
    """Enough of CuPy to check device_csr's copying and caching on a machine without a GPU."""

    def __init__(self):
        super().__init__("cupy")
        self.device = 0
        self.copies = 0
        self.synchronized = 0
        fake = self
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDevice=lambda: fake.device),
            get_current_stream=lambda: types.SimpleNamespace(synchronize=fake._synchronize))

    def _synchronize(self):
        self.synchronized += 1

    def asarray(self, array):
        self.copies += 1
        return ("on device", self.device, numpy.array(array))


def test_device_csr_copies_once_per_device_and_tile(monkeypatch, rng):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    layout = rng.random((2, 5, 4)) < 0.5
    mask = BlockMask.from_dense(layout, block_size=128, shape=(600, 500))
    first = mask.device_csr(64, 64)
    assert isinstance(first, TileCSR)
    assert mask.device_csr(64, 64) is first
    assert fake.copies == 4 and fake.synchronized == 1
    host = mask.tile_csr(64, 64)
    for (_, device, array), expected in zip(first, host):
        assert device == 0 and array.dtype == numpy.int32
        numpy.testing.assert_array_equal(array, expected)
    fake.device = 1
    second = mask.device_csr(64, 64)
    assert second is not first and second.row_ptr[1] == 1
    mask.device_csr(128, 64)
    assert fake.copies == 12
    with pytest.raises(ValueError, match="multiple of the tile size"):
        mask.device_csr(96, 64)


# -- algebra -----------------------------------------------------------------------------------


def test_or_and_with_broadcasting(rng):
    a = rng.random((3, 6, 5)) < 0.4
    b = rng.random((3, 6, 5)) < 0.4
    shared = rng.random((6, 5)) < 0.4
    mask_a = BlockMask.from_dense(a, block_size=16, shape=(90, 70))
    mask_b = BlockMask.from_dense(b, block_size=16, shape=(90, 70))
    mask_shared = BlockMask.from_dense(shared, block_size=16, shape=(90, 70))
    numpy.testing.assert_array_equal((mask_a | mask_b).to_dense(), a | b)
    numpy.testing.assert_array_equal((mask_a & mask_b).to_dense(), a & b)
    numpy.testing.assert_array_equal((mask_a | mask_shared).to_dense(), a | shared)
    numpy.testing.assert_array_equal((mask_shared & mask_a).to_dense(), a & shared)
    both_shared = mask_shared | mask_shared
    assert both_shared.num_heads is None and both_shared == mask_shared
    assert (mask_a | mask_shared).shape == (90, 70)


def test_combining_mismatched_masks_fails():
    base = BlockMask.from_dense(numpy.ones((2, 2), dtype=bool), block_size=64)
    other_size = BlockMask.from_dense(numpy.ones((4, 4), dtype=bool), block_size=32)
    other_shape = BlockMask.from_dense(numpy.ones((2, 2), dtype=bool), block_size=64,
                                       shape=(100, 128))
    two = BlockMask.from_dense(numpy.ones((2, 2, 2), dtype=bool), block_size=64)
    three = BlockMask.from_dense(numpy.ones((3, 2, 2), dtype=bool), block_size=64)
    with pytest.raises(ValueError, match="block size"):
        base | other_size
    with pytest.raises(ValueError, match=r"shape \(128, 128\)"):
        base & other_shape
    with pytest.raises(ValueError, match="2 and 3 heads"):
        two | three
    with pytest.raises(TypeError):
        base | numpy.ones((2, 2), dtype=bool)


def test_transpose(rng):
    layout = rng.random((2, 7, 3)) < 0.5
    mask = BlockMask.from_dense(layout, block_size=(16, 48), shape=(100, 130))
    transposed = mask.T
    assert transposed.shape == (130, 100)
    assert transposed.block_size == (48, 16)
    assert transposed.num_heads == 2
    numpy.testing.assert_array_equal(transposed.to_dense(), layout.transpose(0, 2, 1))
    assert transposed.T == mask
    assert_csr_matches(transposed.row_ptr, transposed.col_idx, layout.transpose(0, 2, 1))
    numpy.testing.assert_array_equal(transposed.to_element_dense(),
                                     mask.to_element_dense().transpose(0, 2, 1))


def test_equality_and_hash():
    eye = numpy.eye(3, dtype=bool)
    a = BlockMask.from_dense(eye, block_size=64)
    assert a == BlockMask.from_dense(eye.astype(numpy.int8), block_size=64)
    assert a != BlockMask.from_dense(eye, block_size=64, shape=(190, 192))
    assert a != BlockMask.from_dense(eye[None], block_size=64)
    assert a != BlockMask.from_dense(~eye, block_size=64)
    assert a != "mask"
    assert len({a, BlockMask.from_dense(eye, block_size=64)}) == 1


def test_pickle_and_copy_keep_the_mask(rng):
    mask = BlockMask.from_dense(rng.random((2, 4, 4)) < 0.5, block_size=32, shape=(100, 128))
    assert pickle.loads(pickle.dumps(mask)) == mask
    assert copy.copy(mask) is mask and copy.deepcopy(mask) is mask


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_random_masks_behave_like_their_dense_layout(data):
    heads = data.draw(st.sampled_from([None, 1, 2, 3]))
    nqb, nkb = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    bq, bk = data.draw(st.sampled_from([1, 3, 64, 128])), data.draw(st.sampled_from([2, 64, 128]))
    nq = data.draw(st.integers((nqb - 1) * bq + 1, nqb * bq))
    nk = data.draw(st.integers((nkb - 1) * bk + 1, nkb * bk))
    size = (heads or 1) * nqb * nkb
    left = numpy.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    right = numpy.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    left, right = left.reshape(heads or 1, nqb, nkb), right.reshape(heads or 1, nqb, nkb)

    def build(layout):
        return BlockMask.from_dense(layout if heads else layout[0], block_size=(bq, bk),
                                    shape=(nq, nk))

    a, b = build(left), build(right)
    numpy.testing.assert_array_equal(a.to_dense(), left)
    numpy.testing.assert_array_equal((a | b).to_dense(), left | right)
    numpy.testing.assert_array_equal((a & b).to_dense(), left & right)
    numpy.testing.assert_array_equal(a.T.to_dense(), left.transpose(0, 2, 1))
    assert_csr_matches(a.col_ptr, a.row_idx, left.transpose(0, 2, 1))
    assert (a == b) == bool((left == right).all())
    element = a.to_element_dense()
    again = BlockMask.from_scipy([scipy.sparse.coo_array(h) for h in element] if heads
                                 else scipy.sparse.coo_array(element[0]),
                                 level="element", block_size=(bq, bk))
    assert again == a


# -- text --------------------------------------------------------------------------------------


def test_repr_names_the_essentials():
    mask = BlockMask.from_dense(numpy.eye(4, dtype=bool), block_size=(64, 128), shape=(250, 500))
    assert repr(mask) == ("BlockMask(shape=(250, 500), block_size=(64, 128), num_heads=None, "
                          "nblocks=(4, 4), nnz_blocks=4, density=0.25)")
    per_head = BlockMask.from_dense(numpy.ones((8, 2, 2), dtype=bool), block_size=64)
    assert "num_heads=8" in repr(per_head) and "density=1" in repr(per_head)


def test_render_small_and_downsampled():
    mask = BlockMask.from_dense(numpy.tril(numpy.ones((3, 4), dtype=bool)), block_size=64)
    assert mask.render().splitlines() == ["█···", "██··", "███·"]
    big = BlockMask.from_dense(numpy.eye(200, dtype=bool), block_size=64)
    lines = big.render(max_rows=10, max_cols=20).splitlines()
    assert len(lines) == 10 and {len(line) for line in lines} == {20}
    assert sum(line.count("█") for line in lines) >= 10  # the diagonal survives shrinking
    assert lines[0][0] == "█" and lines[-1][-1] == "█" and lines[0][-1] == "·"


def test_render_picks_a_head():
    layout = numpy.zeros((2, 2, 2), dtype=bool)
    layout[1, 0, 1] = True
    mask = BlockMask.from_dense(layout, block_size=64)
    assert mask.render(head=0) == "··\n··"
    assert mask.render(head=1) == "·█\n··"
    with pytest.raises(ValueError, match="0 to 1"):
        mask.render(head=2)
    shared = BlockMask.from_dense(layout[1], block_size=64)
    with pytest.raises(ValueError, match="shared"):
        shared.render(head=1)


# -- validation --------------------------------------------------------------------------------


def test_check_compatible():
    shared = BlockMask.from_dense(numpy.ones((2, 3), dtype=bool), block_size=64, shape=(100, 150))
    shared.check_compatible(100, 150, 7)
    with pytest.raises(ValueError, match=r"built for Nq=100, Nk=150.*Nq=128, Nk=150"):
        shared.check_compatible(128, 150, 7)
    per_head = BlockMask.from_dense(numpy.ones((4, 2, 3), dtype=bool), block_size=64)
    per_head.check_compatible(128, 192, 4)
    with pytest.raises(ValueError, match=r"4 heads.*Hq=8"):
        per_head.check_compatible(128, 192, 8)


def test_from_scipy_level_is_required_and_checked():
    pattern = scipy.sparse.eye_array(8)
    with pytest.raises(TypeError, match="level"):
        BlockMask.from_scipy(pattern, block_size=4)
    with pytest.raises(ValueError, match=r"'element'.*'block'.*got 'elements'"):
        BlockMask.from_scipy(pattern, level="elements", block_size=4)


def test_from_scipy_shape_rules():
    blocks = scipy.sparse.eye_array(4)
    with pytest.raises(ValueError, match=r"shape=\(Nq, Nk\) is required with level='block'"):
        BlockMask.from_scipy(blocks, level="block", block_size=64)
    with pytest.raises(ValueError, match=r"has \(4, 4\) blocks.*needs .* = \(5, 5\)"):
        BlockMask.from_scipy(blocks, level="block", block_size=64, shape=(300, 300))
    with pytest.raises(ValueError, match="disagrees"):
        BlockMask.from_scipy(blocks, level="element", block_size=2, shape=(4, 5))
    same = BlockMask.from_scipy(blocks, level="element", block_size=2, shape=(4, 4))
    assert same.shape == (4, 4)


def test_from_scipy_rejects_non_sparse_input():
    with pytest.raises(TypeError, match="from_dense"):
        BlockMask.from_scipy(numpy.eye(4), level="element", block_size=2)
    with pytest.raises(ValueError, match="empty sequence"):
        BlockMask.from_scipy([], level="element", block_size=2)
    with pytest.raises(TypeError, match=r"pattern\[1\]"):
        BlockMask.from_scipy([scipy.sparse.eye_array(4), numpy.eye(4)], level="element",
                             block_size=2)
    with pytest.raises(ValueError, match=r"3-D \(H, M, N\) with H >= 1.*shape \(0, 3, 3\)"):
        BlockMask.from_scipy(scipy.sparse.coo_array((0, 3, 3)), level="element", block_size=2)
    with pytest.raises(ValueError, match="4-D"):
        BlockMask.from_scipy(scipy.sparse.coo_array(numpy.ones((2, 2, 2, 2))), level="element",
                             block_size=2)
    with pytest.raises(ValueError, match=r"pattern.shape\[0\] must be a positive integer, got 0"):
        BlockMask.from_scipy(scipy.sparse.csr_array((0, 4)), level="element", block_size=2)
    with pytest.raises(ValueError, match="share one shape"):
        BlockMask.from_scipy([scipy.sparse.eye_array(4), scipy.sparse.eye_array(5)],
                             level="element", block_size=2)


@pytest.mark.parametrize("block_size, message", [
    (0, "block_size must be a positive integer, got 0"),
    ((64, -1), r"block_size\[1\] must be a positive integer, got -1"),
    ((64, 64, 64), "pair of integers"),
])
def test_block_size_validation(block_size, message):
    with pytest.raises(ValueError, match=message):
        BlockMask.from_dense(numpy.ones((2, 2), dtype=bool), block_size=block_size)


def test_block_size_must_be_integer():
    with pytest.raises(TypeError, match="block_size must be an integer, got 64.0"):
        BlockMask.from_scipy(scipy.sparse.eye_array(4), level="element", block_size=64.0)


def test_sizes_given_as_numpy_arrays_are_pairs():
    """shape=numpy.array([Nq, Nk]) was refused as 'must be a pair (Nq, Nk) of positive
    integers, got array([...])', and a block size or window pair as 'must be an integer'."""
    from cuflash.sparse import ExactMask, sliding_window

    layout = numpy.eye(3, dtype=bool)
    as_arrays = BlockMask.from_dense(layout, block_size=numpy.array([4, 8]),
                                     shape=numpy.array([10, 20]))
    assert as_arrays == BlockMask.from_dense(layout, block_size=(4, 8), shape=(10, 20))
    pattern = sliding_window(50, window=(3, 1))
    assert (sliding_window(50, window=numpy.array([3, 1])) != pattern).nnz == 0
    exact = ExactMask.from_scipy(pattern, shape=numpy.array([50, 50]))
    assert exact == ExactMask.from_scipy(pattern)
    with pytest.raises(ValueError, match=r"shape must be a pair \(Nq, Nk\) of positive"):
        ExactMask.from_scipy(pattern, shape=numpy.array([50, 50, 1]))
    with pytest.raises(TypeError, match=r"block_size\[0\] must be an integer, got .*4\.0"):
        BlockMask.from_dense(layout, block_size=numpy.array([4.0, 8.0]))


def test_from_dense_validation():
    with pytest.raises(ValueError, match=r"only 0 and 1.*\[2\]"):
        BlockMask.from_dense(numpy.array([[0, 2]]), block_size=64)
    with pytest.raises(TypeError, match="float64"):
        BlockMask.from_dense(numpy.ones((2, 2)), block_size=64)
    with pytest.raises(ValueError, match=r"\(Nqb, Nkb\) or \(H, Nqb, Nkb\)"):
        BlockMask.from_dense(numpy.ones(4, dtype=bool), block_size=64)
    with pytest.raises(ValueError, match="empty"):
        BlockMask.from_dense(numpy.ones((0, 2, 2), dtype=bool), block_size=64)
    with pytest.raises(ValueError, match="needs"):
        BlockMask.from_dense(numpy.ones((2, 2), dtype=bool), block_size=64, shape=(200, 128))
    with pytest.raises(TypeError, match="from_scipy"):
        BlockMask.from_dense(scipy.sparse.eye_array(2), block_size=64)
