"""Hugging Face integration: patch Llama-family attention to use the flashback ops, and a
transformers-compatible cache (:class:`FlashBackCache`) over :class:`RingKVCache`.

After ``patch_model(model)``, an attention module whose call carries a :class:`FlashBackCache`
runs q/k/v projection -> RoPE -> ``kv_append`` -> ``append_attention`` -> o_proj; every other call
(training, ``DynamicCache``, no cache) runs the original transformers code unchanged.

Positions: keys are cached after RoPE, so positions are absolute. Pass explicit
``position_ids`` (the engine does) whenever they differ from ``cache.get_seq_length()``, e.g. for
ragged batches. The attention ignores ``attention_mask``: the cache's lengths define what each
query sees (bottom-right causal); give the model :meth:`FlashBackCache.dummy_mask` to skip
transformers' mask construction.
"""
from __future__ import annotations

import inspect
import logging
import sys
import types
from typing import Optional, Union

import torch

from ..ops.ring_cache import RingKVCache
from .projections import project

__all__ = ["FlashBackCache", "patch_model", "unpatch_model", "is_patched", "SUPPORTED_ATTENTION",
           "cache_kwarg_name"]

logger = logging.getLogger(__name__)

# attention classes with the Llama layout (q/k/v/o projections, RoPE via apply_rotary_pos_emb)
SUPPORTED_ATTENTION = {"LlamaAttention": "llama", "MistralAttention": "mistral",
                       "Qwen2Attention": "qwen2"}
_ORIGINAL = "_flashback_original_forward"


class FlashBackCache:
    """A transformers cache whose storage is a :class:`RingKVCache` (one per model).

    ``model(input_ids, position_ids=..., past_key_values=cache)`` on a patched model appends the
    new keys/values of every layer and attends over cache + block. ``new_tokens`` (per sequence)
    marks how many tokens of a right-padded ragged block are real; ``None`` means all.
    """

    is_compileable = False

    def __init__(self, config, batch_size: int, capacity: int, *, sink: int = 0,
                 overflow: str = "error", dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu") -> None:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.num_layers = config.num_hidden_layers
        self.ring = RingKVCache(self.num_layers, batch_size, config.num_key_value_heads, head_dim,
                                capacity, dtype=dtype, device=device, sink=sink, overflow=overflow)
        self.new_tokens: Optional[list[int]] = None
        # set by flashback_ext.cuda_graph during a static decode step: device int32 [B] tokens per
        # sequence (1 live, 0 finished); the step then touches device state only (capturable)
        self.step_counts: Optional[torch.Tensor] = None

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int, **kwargs) -> "FlashBackCache":
        param = next(model.parameters())
        kwargs.setdefault("dtype", param.dtype)
        kwargs.setdefault("device", param.device)
        return cls(model.config, batch_size, capacity, **kwargs)

    # --------------------------------------------------------------- used by the patched attention
    def append_and_attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> torch.Tensor:
        """Append this layer's new K/V and return attention output ``[B, Sq, Hq, D]``."""
        if self.step_counts is not None:
            return self.ring.append_and_attend_on_device(layer_idx, q, k, v, self.step_counts, scale)
        self.ring.append(layer_idx, k, v, self.new_tokens)
        out, _ = self.ring.attend(layer_idx, q, scale, q_lens=self.new_tokens)
        return out

    # ------------------------------------------------------------------- engine-facing helpers
    def lengths(self) -> list[int]:
        return self.ring.lengths(0)

    def next_positions(self) -> list[int]:
        return [self.ring.next_position(b) for b in range(self.ring.batch_size)]

    def position_ids(self, n: int) -> torch.Tensor:
        """``[B, n]`` absolute positions of the next ``n`` tokens of every sequence."""
        start = torch.tensor(self.next_positions(), dtype=torch.long, device=self.ring.device)
        return start.unsqueeze(1) + torch.arange(n, device=self.ring.device).unsqueeze(0)

    def dummy_mask(self) -> torch.Tensor:
        """A 4D placeholder mask: transformers passes 4D masks through without building one."""
        return torch.zeros(self.ring.batch_size, 1, 1, 1, dtype=torch.bool, device=self.ring.device)

    def rollback(self, n) -> None:
        self.ring.rollback(n)

    def truncate(self, length) -> None:
        self.ring.truncate(length)

    def reset(self) -> None:
        self.ring.reset()

    def memory_bytes(self) -> int:
        return self.ring.memory_bytes()

    # ------------------------------------------------------------- transformers Cache interface
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Absolute position of the next token of sequence 0 (what Llama derives positions from)."""
        return self.ring.next_position(0, layer_idx if layer_idx < self.num_layers else 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.ring.lengths(0)[0] + q, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.ring.capacity

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    def __len__(self) -> int:
        return self.num_layers

    def update(self, *args, **kwargs):
        raise RuntimeError("FlashBackCache was handed to an unpatched attention module: call "
                           "flashback_ext.patch_model(model) first")

    def __repr__(self) -> str:
        return f"FlashBackCache({self.ring!r})"


def _flashback_attention_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Replacement forward of a Llama-family attention module (bound per instance)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, FlashBackCache):
        return getattr(self, _ORIGINAL)(hidden_states, *args, **kwargs)
    position_embeddings = kwargs.get("position_embeddings", args[0] if args else None)
    if position_embeddings is None:
        raise RuntimeError("patched attention needs position_embeddings from the decoder layer")
    batch, n, _ = hidden_states.shape
    shape = (batch, n, -1, self.head_dim)
    # one fused product at decode sizes on CPUs with AVX512-BF16 (projections.py)
    q, k, v = (t.view(shape).transpose(1, 2)
               for t in project(hidden_states, (self.q_proj, self.k_proj, self.v_proj)))
    cos, sin = position_embeddings
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos, sin)
    out = cache.append_and_attend(self.layer_idx, q, k, v, self.scaling)  # [B, n, Hq, D]
    return project(out.reshape(batch, n, -1), (self.o_proj,))[0], None


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in SUPPORTED_ATTENTION]


def patch_model(model):
    """Route Llama-family attention through the flashback ops when given a FlashBackCache.

    Works on plain and peft-wrapped models; idempotent; returns the model. Raises ValueError
    for architectures without a supported attention module.
    """
    modules = _attention_modules(model)
    if not modules:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"unsupported architecture {kind!r}: flashback_ext patches "
                         f"{', '.join(sorted(set(SUPPORTED_ATTENTION.values())))} models "
                         f"({', '.join(sorted(SUPPORTED_ATTENTION))})")
    config = getattr(model, "config", None)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        logger.warning("flashback_ext: the model's sliding window (%s) is ignored by the patched "
                       "attention: every cached token is attended", config.sliding_window)
    for module in modules:
        if _ORIGINAL not in module.__dict__:
            module.__dict__[_ORIGINAL] = module.forward
            module.forward = types.MethodType(_flashback_attention_forward, module)
    return model


def unpatch_model(model):
    """Restore the original transformers attention; returns the model."""
    for module in _attention_modules(model):
        if _ORIGINAL in module.__dict__:
            del module.__dict__["forward"]
            del module.__dict__[_ORIGINAL]
    return model


def is_patched(model) -> bool:
    modules = _attention_modules(model)
    return bool(modules) and all(_ORIGINAL in m.__dict__ for m in modules)


def cache_kwarg_name(model) -> str:
    """``"cache"`` on transformers versions that renamed ``past_key_values``, else the old name."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
