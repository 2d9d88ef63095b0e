"""cuflash: exact FlashAttention for CuPy, with a NumPy implementation of the same algorithm.

``attention``, ``attention_backward`` and ``attention_vjp`` take NumPy or CuPy arrays;
``attention_varlen`` (and its backward and vjp) takes packed sequences of different lengths;
``attention_with_kvcache`` attends new queries to a (paged) KV cache, appending to it in place,
and ``kvcache_plan`` says which route such a call takes;
``kernel_plan`` says which kernels a call would run and why the faster ones were passed over;
``cuflash.reference`` is the naive float64 oracle; ``cuflash.sparse`` builds block-sparse and
exact masks.
"""

__version__ = "0.1.0"

from . import reference
from ._api import (attention, attention_backward, attention_varlen, attention_varlen_backward,
                   attention_varlen_vjp, attention_vjp)
from ._checks import IndexDtypeError
from ._kvcache import KVCachePlan, attention_with_kvcache, kvcache_plan
from ._plan import KernelPlan, kernel_plan
from ._warnings import CuflashNumericalWarning

__all__ = ["attention", "attention_backward", "attention_vjp", "attention_varlen",
           "attention_varlen_backward", "attention_varlen_vjp", "attention_with_kvcache",
           "kernel_plan", "KernelPlan", "kvcache_plan", "KVCachePlan",
           "CuflashNumericalWarning", "IndexDtypeError",
           "reference", "sparse", "__version__"]


def __getattr__(name):
    # cuflash.sparse needs SciPy; it is imported on first use so that `import cuflash` stays light.
    if name == "sparse":
        import importlib
        return importlib.import_module(".sparse", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
