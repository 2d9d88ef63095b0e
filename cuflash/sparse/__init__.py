"""Block-sparse attention masks and the patterns to build them from.

``BlockMask`` is what ``cuflash.attention(..., block_mask=...)`` takes; the builders return
scipy.sparse patterns at element or block level (see ``docs/sparse.md``).
"""

from ._blockmask import BlockMask
from ._csr import TileCSR
from ._patterns import (bigbird, butterfly, causal, fixed, image_local, longformer,
                        sliding_window, strided)

__all__ = ["BlockMask", "TileCSR", "bigbird", "butterfly", "causal", "fixed", "image_local",
           "longformer", "sliding_window", "strided"]
