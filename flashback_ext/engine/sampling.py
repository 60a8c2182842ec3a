"""Next-token choice: greedy, or sampling with temperature, top-k and top-p; the marking tokens
(layout, never text) are never chosen."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["Sampler", "eos_token_ids"]


def eos_token_ids(tokenizer_eos, config_eos) -> set[int]:
    """The tokens that end a sequence: the tokenizer's EOS and the generation config's (either
    an id, a list of ids or None), as Hugging Face's generate stops on both."""
    found: list = []
    for ids in (tokenizer_eos, config_eos):
        found += list(ids) if isinstance(ids, (list, tuple, set)) else [ids]
    return {int(i) for i in found if i is not None}


class Sampler:
    """Picks one token id from a ``[vocab]`` row of logits.

    ``banned`` ids get probability 0 (the markers); ``seed`` makes sampling repeatable.
    """

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 banned: Sequence[int] = ()) -> None:
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.banned = list(banned)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, logits: torch.Tensor) -> int:
        if self.banned:
            logits = logits.clone()
            logits[self.banned] = float("-inf")
        if not self.do_sample:
            return int(torch.argmax(logits))
        logits = logits / max(self.temperature, 1e-5)
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < self.top_p
            keep[0] = True  # the most likely token always survives (also for top_p <= 0)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
