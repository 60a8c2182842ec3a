"""What the engine forwards at the prompt and at each retrieval, per mode.

A :class:`Step` is one ragged forward of the batch; a block builder turns the sequences and
their retrieved passages (``E``, already marked) into steps:

* ``none``: the prompt alone, then one-token decode steps;
* ``prepend`` (In-Context RALM): ``E | context`` re-encoded from scratch at every retrieval;
* ``append`` (FlashBack): the prompt but its last ``stride`` tokens is prefilled, then
  ``[tokens since the committed context | E | echo]`` is forwarded as ONE block; at the next
  retrieval the cache rolls back (O(1)) to the committed context and the same kind of block
  follows. The context's KV cache is never recomputed. Token rows and rotary positions come
  from :class:`flashback_ext.layout.Layout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from ..layout import Layout, before_positions
from .sequence import SequenceState

__all__ = ["Step", "NoRetrievalBlocks", "PrependBlocks", "AppendBlocks", "block_builder"]


@dataclass
class Step:
    """One forward of the batch. ``kind`` ("prefill", "block" or "decode") only decides which
    timer it counts in (and lets decode steps replay a CUDA graph)."""

    kind: str
    blocks: list[list[int]]  # per sequence, the tokens to forward (empty: skip it)
    reset: bool = False  # empty the cache first
    rope: Optional[list[list[int]]] = None  # rotary positions (default: slot - sequence shift)
    rollback: Optional[list[int]] = None  # tokens to roll back per sequence, before the forward


class NoRetrievalBlocks:
    retrieves = False

    def prompt(self, seqs: Sequence[SequenceState], passages=None) -> Iterator[Step]:
        yield Step("prefill", [list(s.tokens) for s in seqs], reset=True)

    def retrieval(self, seqs, passages, next_positions) -> Step:
        raise RuntimeError("mode 'none' never retrieves")


class PrependBlocks:
    retrieves = True

    def prompt(self, seqs: Sequence[SequenceState], passages: list[list[int]]) -> Iterator[Step]:
        yield Step("block", [p + s.tokens for p, s in zip(passages, seqs)], reset=True)

    def retrieval(self, seqs: Sequence[SequenceState], passages: list[list[int]],
                  next_positions: Sequence[int]) -> Step:
        return Step("block", [p + s.tokens if s.active else [] for p, s in zip(passages, seqs)],
                    reset=True)


class AppendBlocks:
    retrieves = True

    def __init__(self, layout: Layout, stride: int) -> None:
        self.layout, self.stride = layout, stride

    def prompt(self, seqs: Sequence[SequenceState], passages: list[list[int]]) -> Iterator[Step]:
        for s in seqs:
            s.context_end = max(0, len(s.tokens) - self.stride)
        yield Step("prefill", [s.tokens[:s.context_end] for s in seqs], reset=True)
        # built only once the prefill ran: it sets the shift that later steps' positions use
        yield self.block(seqs, passages)

    def retrieval(self, seqs: Sequence[SequenceState], passages: list[list[int]],
                  next_positions: Sequence[int]) -> Step:
        back = [pos - s.context_end for pos, s in zip(next_positions, seqs)]
        step = self.block(seqs, passages)
        step.rollback = back
        return step

    def block(self, seqs: Sequence[SequenceState], passages: list[list[int]]) -> Step:
        """``[tokens since the committed context | E | echo]`` of every active sequence, whose
        cache ends at its ``context_end``; with passage positions "before", at the rotary
        positions it needs. The block then becomes committed context."""
        blocks: list[list[int]] = []
        rope: list[list[int]] = []
        for s, e in zip(seqs, passages):
            if not s.active:
                blocks.append([])
                rope.append([])
                continue
            new, echo = s.tokens[s.context_end:], self.layout.echo_of(s.tokens)
            blocks.append(new + e + echo)
            if self.layout.before:
                pos, s.shift = before_positions(s.context_end, len(new), len(e), len(echo))
                rope.append(pos)
            s.context_end = len(s.tokens)
        return Step("block", blocks, rope=rope if self.layout.before else None)


def block_builder(layout: Layout, stride: int):
    """The builder of ``layout.kind``."""
    if layout.kind == "append":
        return AppendBlocks(layout, stride)
    return PrependBlocks() if layout.kind == "prepend" else NoRetrievalBlocks()
