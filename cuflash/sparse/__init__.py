"""Sparse attention masks and the patterns to build them from.

Two kinds of mask, and the attention call says which one it gets:

- ``ExactMask`` (``cuflash.attention(..., mask=...)``): attends to exactly the pairs of an
  element pattern; empty tiles are skipped, full tiles run unmasked, partial tiles test one bit
  per pair.
- ``BlockMask`` (``cuflash.attention(..., block_mask=...)``): block-sparse, approximate and
  fastest; every pair of a kept block is computed.

The builders return scipy.sparse patterns at element or block level (see ``docs/sparse.md``).
"""

from ._blockmask import BlockMask
from ._csr import TileCSR
from ._exactmask import ExactMask, TileBits, TileCounts
from ._patterns import (bigbird, butterfly, causal, document, expand_blocks, fixed, image_local,
                        longformer, prefix_lm, sliding_window, strided)

__all__ = ["BlockMask", "ExactMask", "TileBits", "TileCounts", "TileCSR", "bigbird", "butterfly",
           "causal", "document", "expand_blocks", "fixed", "image_local", "longformer",
           "prefix_lm", "sliding_window", "strided"]
