"""The per-sequence state of one :meth:`RALMGenerator.generate` call."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .results import GenerationResult, RetrievalRecord, Timing

__all__ = ["SequenceState"]


@dataclass
class SequenceState:
    """One sequence of a batch: its tokens, what its cache holds, its retrievals and trace."""

    tokens: list[int]
    prompt_len: int
    active: bool = True
    finish_reason: str = "length"
    # append mode: the end (cache slot) of the committed context, where the next retrieval
    # rolls back to
    context_end: int = 0
    # slot - rotary position of the tokens after <MARK_R> (passage_positions "before"; else 0)
    shift: int = 0
    view: list[int] = field(default_factory=list)  # the tokens written to the cache, in order
    rope_view: list[int] = field(default_factory=list)  # and their rotary positions (trace only)
    retrievals: list[RetrievalRecord] = field(default_factory=list)
    trace: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    trace_positions: list[list[int]] = field(default_factory=list)

    def wrote(self, block: list[int], rope: list[int] | None, reset: bool) -> None:
        """Keep :attr:`view` (and with ``rope`` :attr:`rope_view`) in step with the cache."""
        self.view = ([] if reset else self.view) + block
        if rope is not None:
            self.rope_view = ([] if reset else self.rope_view) + rope

    def rolled_back(self, n: int) -> None:
        self.view = self.view[: len(self.view) - n]
        self.rope_view = self.rope_view[: len(self.rope_view) - n]

    @staticmethod
    def held(items: list, sink: int, evicted: int) -> list:
        """The entries of a per-token list in cache order that the cache still holds: eviction
        drops the oldest non-sink ones."""
        return items[:sink] + items[sink + evicted:]

    def record(self, logits: torch.Tensor, sink: int, evicted: int) -> None:
        """Trace one step: what the cache holds (evicted tokens left it) and the logits."""
        self.trace.append((self.held(self.view, sink, evicted), logits.detach().cpu()))
        self.trace_positions.append(self.held(self.rope_view, sink, evicted))

    def result(self, tokenizer, timing: Timing) -> GenerationResult:
        new = self.tokens[self.prompt_len:]
        return GenerationResult(tokenizer.decode(new, skip_special_tokens=True), new,
                                self.prompt_len, self.retrievals, timing, self.finish_reason,
                                self.trace, self.trace_positions)
