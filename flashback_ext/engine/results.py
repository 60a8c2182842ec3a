"""What :class:`~flashback_ext.engine.generator.RALMGenerator` returns: the text and ids of each
sequence, its retrievals and the batch's timing breakdown."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["RetrievalRecord", "Timing", "GenerationResult"]


@dataclass
class RetrievalRecord:
    generated: int  # tokens generated before this retrieval
    query: str
    passage_ids: list[int]
    titles: list[str]
    scores: list[float]
    # the vLLM driver: prompt tokens of this cycle's request that the engine's prefix cache
    # served (None: the engine did not say, or the HF engine, which keeps its own cache)
    cached_tokens: Optional[int] = None


@dataclass
class Timing:
    retrieval_s: float = 0.0  # retriever searches
    prefill_s: float = 0.0  # the prompt before the first retrieval block (append, none)
    block_s: float = 0.0  # retrieval blocks: append blocks / prepend re-encodes
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_steps: int = 0
    graph_steps: int = 0  # decode steps run by the DecodeGraph (CUDA replays; its static step elsewhere)
    retrievals: int = 0
    block_tokens: int = 0  # tokens forwarded in retrieval blocks, the whole batch
    compile_s: float = 0.0  # compiling the decode step and block (compile=True), not in decode_s/block_s
    # the vLLM driver: time waiting for the engine's requests (prefill and decode, which it does
    # not split), prompt tokens sent and those its prefix cache served (when it reports them)
    engine_s: float = 0.0
    engine_cycle_s: list[float] = field(default_factory=list)  # per retrieval cycle
    prompt_tokens_sent: int = 0
    cached_tokens: int = 0
    cached_reported: bool = False  # whether the engine reported its prefix-cache hits at all

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(1, self.decode_steps)

    @property
    def ms_per_block(self) -> float:
        return 1e3 * self.block_s / max(1, self.retrievals)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    retrievals: list[RetrievalRecord]
    timing: Timing  # shared by the whole batch
    finish_reason: str = "length"
    # with trace=True: per generated token, the tokens the cache held (in order) and the logits.
    # Under overflow="evict" the held tokens' deeper-layer keys were computed while evicted
    # tokens were still held, so a forward of the sequence alone matches only a one-layer model.
    trace: list[tuple[list[int], torch.Tensor]] = field(default_factory=list, repr=False)
    # with trace=True: the rotary position of every token of each trace step's sequence
    trace_positions: list[list[int]] = field(default_factory=list, repr=False)
