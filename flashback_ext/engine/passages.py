"""One retrieval of a batch: the query of every sequence, the search, and each one's passage
block ``E`` as token ids (cut, concatenated, marked); shared by the HF engine and the vLLM
driver, so both lay out the same tokens."""
from __future__ import annotations

import time
from typing import Optional, Sequence

from ..layout import MARK_L, MARK_R, Layout
from .results import RetrievalRecord, Timing
from .sequence import SequenceState

__all__ = ["PassageFetcher", "check_loop_settings", "markers_to_use"]


def check_loop_settings(mode: str, modes, retriever, **positive: int) -> None:
    """The settings both RALM loops share: a known mode, positive lengths, a retriever for the
    modes that retrieve."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}")
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if mode != "none" and retriever is None:
        raise ValueError(f"mode={mode!r} needs a retriever (or use mode='none')")


def markers_to_use(tokenizer, use_markers: Optional[bool], hint: str):
    """The marker ids ``(MARK_L, MARK_R)`` to wrap passages in, or None: by default when the
    tokenizer has them; ``use_markers=True`` without them raises (``hint`` says how to get them)."""
    vocab = tokenizer.get_vocab()
    has_markers = MARK_L in vocab and MARK_R in vocab
    if use_markers and not has_markers:
        raise ValueError(f"use_markers=True but the tokenizer has no {MARK_L}/{MARK_R} tokens "
                         f"({hint})")
    use = has_markers if use_markers is None else use_markers
    return (vocab[MARK_L], vocab[MARK_R]) if use else None


class PassageFetcher:
    """Searches with the last ``query_tokens`` tokens of each sequence and builds its ``E``:
    ``k`` passages, each cut to ``passage_tokens``, inside the layout's markers."""

    def __init__(self, tokenizer, retriever, layout: Layout, *, k: int, query_tokens: int,
                 passage_tokens: int) -> None:
        self.tokenizer, self.retriever, self.layout = tokenizer, retriever, layout
        self.k, self.query_tokens, self.passage_tokens = k, query_tokens, passage_tokens

    def block(self, hits) -> list[int]:
        """Token ids of ``E``: the hits' passages (each cut to ``passage_tokens``), with markers."""
        ids: list[int] = []
        for hit in hits:
            p = hit.passage
            tokens = p.token_ids
            # an index built with another tokenizer: its ids would be garbage for this model
            if not tokens or self.tokenizer.decode(tokens).strip() != p.text:
                tokens = self.tokenizer.encode(p.text, add_special_tokens=False)
            ids += list(tokens[: self.passage_tokens])
        return self.layout.marked(ids)

    def fetch(self, seqs: Sequence[SequenceState], generated: int, timing: Timing,
              exclude_doc_ids: Optional[Sequence[str]] = None) -> list[list[int]]:
        """One search per sequence; returns each one's ``E`` and records the retrieval of the
        active ones (``generated``: tokens generated so far)."""
        t0 = time.perf_counter()
        queries = [self.tokenizer.decode(s.tokens[-self.query_tokens:], skip_special_tokens=True)
                   for s in seqs]
        excl = None if exclude_doc_ids is None else [list(exclude_doc_ids)] * len(seqs)
        hits = self.retriever.search_batch(queries, self.k, exclude_doc_ids=excl)
        passages = []
        for s, query, h in zip(seqs, queries, hits):
            passages.append(self.block(h))
            if s.active:
                s.retrievals.append(RetrievalRecord(generated, query, [x.passage.id for x in h],
                                                    [x.passage.title for x in h],
                                                    [x.score for x in h]))
        timing.retrieval_s += time.perf_counter() - t0
        timing.retrievals += 1
        return passages
