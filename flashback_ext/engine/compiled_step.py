"""The one-token decode step compiled with ``torch.compile`` (inductor), for the CPU.

In eager mode a SmolLM2 decode step on two CPU cores spends most of its time in per-call
overhead: hundreds of small projections, norms and RoPE calls (docs/PERFORMANCE.md). Compiled,
the glue between the projections is fused into a few C++ kernels; the decode-sized bf16
projections run as fused weight-streaming products (:mod:`.projections`) and, with inductor's
freezing, the others on oneDNN's prepacked weights.

The step is an explicit loop over the decoder layers (embedding, rotary embedding, every layer,
final norm, LM head) rather than a call of the Hugging Face model's ``forward``, whose
output-capturing wrapper ends a compiled graph. For the Llama, Mistral and Qwen2 decoder layers
the loop also spells out the layer (norm, attention, residual, norm, MLP, residual) so that the
MLP's gate/up projections run as one fused product (:mod:`.projections`); other layers are
called whole. Shapes are static: one token per sequence of a
fixed batch on a fixed cache, so the step compiles once per :class:`~.cuda_graph.DecodeGraph` and
never again while the cache lives (the tests check it). The flashback ops are traced through their
fake kernels and run the compiled C++ kernels.

The same loop runs the append mode's retrieval block (:class:`CompiledBlock`): the block is
right-padded to a fixed number of tokens, so it too compiles once per cache, and its real length
per sequence travels as the step's counts (the cache's device-only mode appends and attends over
that many rows).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch

from .projections import mlp_forward

__all__ = ["layer_loop_step", "compile_step", "CompiledBlock"]

logger = logging.getLogger(__name__)

# decoder layers that are exactly norm -> attention -> residual -> norm -> gated MLP -> residual
_PLAIN_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def _plain_layer(layer, hidden, **attention_kw):
    """``layer(hidden, **attention_kw)`` for a :data:`_PLAIN_LAYERS` layer, MLP fused."""
    residual = hidden
    hidden, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **attention_kw)
    hidden = residual + hidden
    return hidden + mlp_forward(layer.mlp, layer.post_attention_layernorm(hidden))


def layer_loop_step(body, head, cache_kw: str) -> Callable:
    """``step(ids [B, n], positions [B, n], cache, counts int32 [B]) -> logits [B, vocab]``:
    the decoder stack of a Llama-family ``body`` (``embed_tokens``, ``rotary_emb``, ``layers``,
    ``norm``) and its LM ``head`` on a :class:`~.hf.FlashBackCache` in its device-only step mode;
    ``counts[b]`` of the ``n`` rows are real, the logits are those of the last real row."""

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
        last = (counts.long() - 1).clamp(min=0)  # a finished sequence (count 0): row 0, ignored
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return head(body.norm(hidden)).float()

    return step


def compile_step(step: Callable, freeze: bool = True, cpp_wrapper: bool = True) -> Callable:
    """``torch.compile`` the step as one static graph (``fullgraph``: a graph break is an error,
    which :class:`~.cuda_graph.DecodeGraph` turns into a warning and eager steps, not a silent
    slowdown). ``freeze``: inductor treats the weights as constants (prepacked
    oneDNN projections); the model's weights must then not change while the step is in use.
    ``cpp_wrapper``: inductor's wrapper, which calls the step's kernels one after another, is
    generated C++ rather than Python (on the 2-core Xeon: decode steps about 10% faster, a
    longer compile)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(step, dynamic=False, fullgraph=True)

    def run(*args):
        # freezing is read at compile time, which happens on the first call
        with inductor_config.patch(freezing=freeze, cpp_wrapper=cpp_wrapper):
            return compiled(*args)

    return run


class CompiledBlock:
    """The append mode's retrieval block through the compiled layer loop, on one cache.

    Every block is right-padded to ``tokens`` rows (the longest ``[last stride | E | echo]``), so
    the step compiles once, on the first block (:attr:`compile_s`). The padding rows are written
    past each sequence's end and never counted. A block that does not fit (longer, or too little
    room left in the cache) is the caller's to forward eagerly, as is every block after a failed
    compiled run (:attr:`failed`), which changes nothing in the cache.
    """

    def __init__(self, body, head, cache, cache_kw: str, tokens: int, pad_id: int = 0) -> None:
        self.cache, self.tokens, self.pad_id = cache, int(tokens), int(pad_id)
        self._compiled: Optional[Callable] = compile_step(layer_loop_step(body, head, cache_kw))
        self.compile_s = 0.0
        self.runs = 0

    @property
    def failed(self) -> bool:
        return self._compiled is None

    def fits(self, counts: Sequence[int]) -> bool:
        ring = self.cache.ring
        return (not self.failed and max(counts) <= self.tokens
                and all(n + self.tokens <= ring.capacity for n in ring.lengths(0)))

    @torch.no_grad()
    def run(self, blocks: Sequence[Sequence[int]],
            rope: Optional[Sequence[Sequence[int]]] = None) -> Optional[torch.Tensor]:
        """Forward one block per sequence (``rope``: their rotary positions; default the cache's
        next slots). Returns the logits ``[B, vocab]`` at each sequence's last block token, or
        None when the compiled step failed (the cache is then as before)."""
        ring = self.cache.ring
        batch = ring.batch_size
        ids = torch.full((batch, self.tokens), self.pad_id, dtype=torch.long)
        positions = torch.zeros((batch, self.tokens), dtype=torch.long)
        for b, block in enumerate(blocks):
            if block:
                ids[b, :len(block)] = torch.tensor(block, dtype=torch.long)
                start = ring.next_position(b)
                positions[b, :len(block)] = (torch.tensor(rope[b], dtype=torch.long) if rope
                                             else torch.arange(start, start + len(block)))
        counts = [len(block) for block in blocks]
        first = self.compile_s == 0.0
        start_s = time.perf_counter()
        try:
            logits = self._compiled(ids, positions, self.cache,
                                    torch.tensor(counts, dtype=torch.int32))
        except Exception as exc:  # noqa: BLE001 - e.g. a graph break: blocks go eager
            logger.warning("flashback_ext: the compiled retrieval block failed (%s); forwarding "
                           "blocks eagerly from now on", str(exc).splitlines()[0] if str(exc) else exc)
            self._compiled = None
            ring.sync_device()  # undo what the layers that ran advanced
            return None
        finally:
            self.cache.step_counts = None
        if first:
            self.compile_s = time.perf_counter() - start_s
        ring.advance_host(counts)
        self.runs += 1
        return logits
