"""The two FlashBack marking tokens: ``<MARK_L> passage <MARK_R>``.

``add_marking_tokens`` registers them as special tokens, grows the model's embeddings (the output
embedding too when it is separate; tied embeddings stay tied), initialises the new rows to the
mean of the existing rows, and returns their ids. Calling it again changes nothing.
"""
from __future__ import annotations

import torch

from .layout import MARK_L, MARK_R

__all__ = ["MARK_L", "MARK_R", "add_marking_tokens", "marker_ids"]


def marker_ids(tokenizer) -> tuple[int, int] | None:
    """``(id of <MARK_L>, id of <MARK_R>)``, or None when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    if MARK_L in vocab and MARK_R in vocab:
        return vocab[MARK_L], vocab[MARK_R]
    return None


@torch.no_grad()
def add_marking_tokens(model, tokenizer) -> tuple[int, int]:
    """Add the markers to ``tokenizer`` and ``model`` (idempotent); returns their ids."""
    from transformers import AddedToken

    ids = marker_ids(tokenizer)
    fresh = ids is None
    if fresh:
        tokenizer.add_tokens([AddedToken(MARK_L, special=True, normalized=False),
                              AddedToken(MARK_R, special=True, normalized=False)],
                             special_tokens=True)
        ids = marker_ids(tokenizer)
    old = model.get_input_embeddings().weight.shape[0]
    if old < max(ids) + 1:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        fresh = True
    if fresh:  # new rows (or unused ones, when the embedding was larger than the vocab)
        others = [i for i in range(min(old, min(ids)))]
        for module in {id(m): m for m in (model.get_input_embeddings(),
                                          model.get_output_embeddings()) if m is not None}.values():
            mean = module.weight[others].mean(0)
            for i in ids:
                module.weight[i] = mean
    return ids
