"""``cuflash.check.verify`` without the command line: the counts behind a check's record."""

import pytest
import scipy.sparse

from cuflash.check import verify
from cuflash.sparse import BlockMask


def _one_block_mask(n, row, col, block_size):
    """A mask of an ``(n, n)`` problem keeping the single block ``(row, col)``."""
    bq, bk = block_size
    blocks = (-(-n // bq), -(-n // bk))
    pattern = scipy.sparse.csr_array(([True], ([row], [col])), shape=blocks)
    return BlockMask.from_scipy(pattern, level="block", block_size=block_size, shape=(n, n))


@pytest.mark.parametrize("n", [4 * 10**9, 2**33])
def test_attended_fraction_of_one_block_holding_a_long_problem_is_exact(n):
    # every pair with key <= query lies in the one block: all of them are attended
    mask = _one_block_mask(n, 0, 0, (n, n))
    assert verify.attended_fraction(mask, causal=True) == 1.0


def test_attended_fraction_of_a_corner_block_far_below_the_diagonal_is_exact():
    n, block_size = 2**40, (2**20, 2**24)
    mask = _one_block_mask(n, n // block_size[0] - 1, 0, block_size)
    # the block lies wholly below the diagonal: all of its pairs count
    expected = block_size[0] * block_size[1] / (n * (n + 1) / 2)
    assert verify.attended_fraction(mask, causal=True) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("count, shown", [(2.5, "2.5"), (3.0, "3.0"), (True, "True")])
def test_sample_rows_refuses_a_count_that_is_no_integer_naming_it(count, shown):
    # a float failed inside NumPy's sampling naming another number; True sampled one row
    with pytest.raises(TypeError, match=rf"^count must be a positive number of rows or None, "
                                        rf"got {shown}"):
        verify.sample_rows(10, count, seed=0)
