"""flashback_ext: FlashBack retrieval-augmented generation with KV-cache reuse.

The compiled ops live in :mod:`flashback_ext.ops` (``append_attention``, ``kv_append``), their
pure-PyTorch ground truth in :mod:`flashback_ext.reference`, and the ring-buffer cache in
:class:`flashback_ext.RingKVCache`.
"""
from . import ops, reference
from .cache import CacheOverflowError, RingKVCache
from .ops import has_cpu_ops, has_cuda_ops

__all__ = ["ops", "reference", "RingKVCache", "CacheOverflowError", "has_cpu_ops", "has_cuda_ops"]
__version__ = "0.1.0"
