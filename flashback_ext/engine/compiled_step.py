"""The one-token decode step compiled with ``torch.compile`` (inductor), for the CPU.

In eager mode a SmolLM2 decode step on two CPU cores spends most of its time in per-call
overhead: hundreds of small projections, norms and RoPE calls (docs/PERFORMANCE.md). Compiled,
the glue between the projections is fused into a few C++ kernels and, with inductor's freezing,
the bf16 projections run oneDNN's prepacked weights.

The step is an explicit loop over the decoder layers (embedding, rotary embedding, every layer,
final norm, LM head) rather than a call of the Hugging Face model's ``forward``, whose
output-capturing wrapper ends a compiled graph. For the Llama, Mistral and Qwen2 decoder layers
the loop also spells out the layer (norm, attention, residual, norm, MLP, residual) so that the
MLP's gate/up projections run as one fused product (:mod:`.projections`); other layers are
called whole. Shapes are static: one token per sequence of a
fixed batch on a fixed cache, so the step compiles once per :class:`~.cuda_graph.DecodeGraph` and
never again while the cache lives (the tests check it). The flashback ops are traced through their
fake kernels and run the compiled C++ kernels.
"""
from __future__ import annotations

from typing import Callable

import torch

from .projections import mlp_forward

__all__ = ["layer_loop_step", "compile_step"]

# decoder layers that are exactly norm -> attention -> residual -> norm -> gated MLP -> residual
_PLAIN_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def _plain_layer(layer, hidden, **attention_kw):
    """``layer(hidden, **attention_kw)`` for a :data:`_PLAIN_LAYERS` layer, MLP fused."""
    residual = hidden
    hidden, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **attention_kw)
    hidden = residual + hidden
    return hidden + mlp_forward(layer.mlp, layer.post_attention_layernorm(hidden))


def layer_loop_step(body, head, cache_kw: str) -> Callable:
    """``step(ids [B, 1], positions [B, 1], cache, counts int32 [B]) -> logits [B, vocab]``:
    the decoder stack of a Llama-family ``body`` (``embed_tokens``, ``rotary_emb``, ``layers``,
    ``norm``) and its LM ``head`` on a :class:`~.hf.FlashBackCache` in its device-only step mode."""

    def step(ids: torch.Tensor, positions: torch.Tensor, cache, counts: torch.Tensor):
        cache.step_counts = counts
        hidden = body.embed_tokens(ids)
        rotary = body.rotary_emb(hidden, positions)
        mask = cache.dummy_mask()  # the patched attention never reads it
        for layer in body.layers:
            kw = dict(attention_mask=mask, position_ids=positions, use_cache=True,
                      position_embeddings=rotary, **{cache_kw: cache})
            plain = type(layer).__name__ in _PLAIN_LAYERS and hasattr(layer.mlp, "gate_proj")
            hidden = _plain_layer(layer, hidden, **kw) if plain else layer(hidden, **kw)
        cache.step_counts = None
        return head(body.norm(hidden)[:, -1]).float()

    return step


def compile_step(step: Callable, freeze: bool = True) -> Callable:
    """``torch.compile`` the step as one static graph (``fullgraph``: a graph break is an error,
    which :class:`~.cuda_graph.DecodeGraph` turns into a warning and eager steps, not a silent
    slowdown). ``freeze``: inductor treats the weights as constants (prepacked
    oneDNN projections); the model's weights must then not change while the step is in use."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(step, dynamic=False, fullgraph=True)

    def run(*args):
        # freezing is read at compile time, which happens on the first call
        with inductor_config.patch(freezing=freeze):
            return compiled(*args)

    return run
