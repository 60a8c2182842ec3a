"""flashback_ext: FlashBack retrieval-augmented generation with KV-cache reuse.

The package in layers, each importing only those above it in this list:

* :mod:`flashback_ext.ops`: the compiled C++/CUDA ops (``append_attention``, ``kv_append``),
  their pure-PyTorch ground truth (:mod:`flashback_ext.ops.reference`) and the ring-buffer
  cache (:class:`RingKVCache`); needs torch only;
* :mod:`flashback_ext.layout` and :mod:`flashback_ext.marking`: the FlashBack layouts and the
  two marking tokens;
* :mod:`flashback_ext.engine`: :func:`patch_model`, :class:`FlashBackCache`,
  :class:`RALMGenerator`, retrieval, :func:`load_model` (the embedded SmolLM2 default);
* :mod:`flashback_ext.pipeline`: the paper's LoRA training and perplexity evaluation, and the
  merged export for serving engines;
* :mod:`flashback_ext.serving`: the RALM loop on vLLM (in process or a server's URL), whose
  prefix cache reuses the append layout's context;
* :mod:`flashback_ext.cli`: the ``flashback`` command.

docs/DESIGN.md describes the data flow and the op contracts.
"""
from . import ops
from .ops import has_cpu_ops, has_cuda_ops, reference
from .ops.ring_cache import CacheOverflowError, RingKVCache

__version__ = "0.1.0"

__all__ = ["ops", "reference", "RingKVCache", "CacheOverflowError", "has_cpu_ops", "has_cuda_ops",
           "FlashBackCache", "patch_model", "unpatch_model", "RALMGenerator", "load_model",
           "__version__"]


def __getattr__(name):
    # the engine imports transformers: load it only when asked for
    if name in ("FlashBackCache", "patch_model", "unpatch_model"):
        from .engine import hf
        return getattr(hf, name)
    if name == "RALMGenerator":
        from .engine.generator import RALMGenerator
        return RALMGenerator
    if name == "load_model":
        from .engine.models import load_model
        return load_model
    raise AttributeError(f"module 'flashback_ext' has no attribute {name!r}")
