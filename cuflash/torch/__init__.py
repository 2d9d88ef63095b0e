"""cuflash for PyTorch: autograd-aware attention on torch tensors, and drop-in replacements.

- ``attention``: cuflash's own layout ``(..., H, N, D)``.
- ``flash_attn_func``, ``flash_attn_qkvpacked_func``, ``flash_attn_kvpacked_func``: the
  flash-attn 2 functions, layout ``(B, S, H, D)``; ``flash_attn_varlen_func``, packed sequences
  ``(total, H, D)``, with ``flash_attn_varlen_qkvpacked_func`` and
  ``flash_attn_varlen_kvpacked_func``; ``flash_attn_with_kvcache`` (forward only, through
  ``cuflash.attention_with_kvcache``, not the operators below).
- ``scaled_dot_product_attention``: ``torch.nn.functional.scaled_dot_product_attention``'s
  signature, layout ``(B, H, N, D)``.

CUDA tensors run the CuPy kernels on torch's current stream, with torch's allocator, without
copies; CPU tensors run the NumPy implementation. Everything is built on
``torch.library.custom_op`` operators (``torch.ops.cuflash.attention_forward`` and
``attention_backward``; ``attention_varlen_forward`` and ``attention_varlen_backward`` for packed
sequences), so ``torch.compile(fullgraph=True)`` traces through it.
Needs torch ≥ 2.4 (``pip install "cuflash[torch]"``); ``import cuflash`` never imports torch.
See docs/torch.md.
"""

try:
    import torch  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "cuflash.torch needs PyTorch (pip install 'cuflash[torch]'); "
        f"importing torch failed: {error}") from error

from ._api import (attention, block_mask_handle, flash_attn_func, flash_attn_kvpacked_func,
                   flash_attn_qkvpacked_func, flash_attn_varlen_func,
                   flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func,
                   flash_attn_with_kvcache, scaled_dot_product_attention)

__all__ = ["attention", "block_mask_handle", "flash_attn_func", "flash_attn_kvpacked_func",
           "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache", "scaled_dot_product_attention"]
