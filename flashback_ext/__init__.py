"""flashback_ext: FlashBack retrieval-augmented generation with KV-cache reuse.

Hugging Face side: :func:`patch_model`, :class:`FlashBackCache`, :class:`RALMGenerator`,
:func:`load_model` (the embedded SmolLM2 default), retrieval in :mod:`flashback_ext.retrieval`
and the ``flashback`` CLI. The compiled ops live in :mod:`flashback_ext.ops` (``append_attention``, ``kv_append``), their
pure-PyTorch ground truth in :mod:`flashback_ext.reference`, and the ring-buffer cache in
:class:`flashback_ext.RingKVCache`.
"""
from . import ops, reference
from .cache import CacheOverflowError, RingKVCache
from .ops import has_cpu_ops, has_cuda_ops

__all__ = ["ops", "reference", "RingKVCache", "CacheOverflowError", "has_cpu_ops", "has_cuda_ops",
           "FlashBackCache", "patch_model", "unpatch_model", "RALMGenerator", "load_model"]


def __getattr__(name):
    # the Hugging Face side imports transformers: load it only when asked for
    if name in ("FlashBackCache", "patch_model", "unpatch_model"):
        from . import hf
        return getattr(hf, name)
    if name == "RALMGenerator":
        from .ralm import RALMGenerator
        return RALMGenerator
    if name == "load_model":
        from .models import load_model
        return load_model
    raise AttributeError(f"module 'flashback_ext' has no attribute {name!r}")
__version__ = "0.1.0"
