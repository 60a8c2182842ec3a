"""Batches of examples for training and evaluation, and the target-token loss.

A batch is left-padded, in one :class:`flashback_ext.layout.Layout`, with labels only on the
target tokens; the loss leaves the marker logits out of the softmax (the model is never asked to
predict a marker).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ..layout import Layout
from .examples import Example

__all__ = ["Collator", "exclude_logits", "forward_batch", "target_token_nll", "target_nll"]


class Collator:
    """Left-padded batches with labels only on the target tokens (-100 elsewhere).

    Left padding puts every row's targets in the last columns, so the model only needs logits
    for the last ``keep_logits(batch)`` positions (``logits_to_keep``): the LM head over the full
    vocabulary is the most expensive layer of a small model. RoPE is relative, so the uniform
    position shift of a left-padded row leaves its attention unchanged.
    """

    def __init__(self, layout: str, markers: Optional[tuple[int, int]], pad_id: int = 0,
                 echo: int = 0, passage_positions: str = "after") -> None:
        self.spec = Layout(layout, markers, echo, passage_positions)  # validates
        self.pad_id = pad_id

    def __call__(self, batch_in: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [self.spec.tokens(ex.src, ex.e, ex.tgt) for ex in batch_in]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, start) in enumerate(rows):
            pad = width - len(ids)
            input_ids[i, pad:] = torch.tensor(ids)
            labels[i, pad + start:] = torch.tensor(ids[start:])
            mask[i, pad:] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.spec.before:  # else the model's own 0, 1, 2... (and padding)
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            for i, ex in enumerate(batch_in):
                pos = self.spec.positions(ex.src, ex.e, ex.tgt)
                positions[i, width - len(pos):] = torch.tensor(pos)
            batch["position_ids"] = positions
        return batch

    @staticmethod
    def keep_logits(labels: torch.Tensor) -> int:
        """How many trailing positions' logits the loss needs (targets + the one before)."""
        return int((labels != -100).sum(1).max()) + 1


def exclude_logits(logits: torch.Tensor, exclude_ids: Iterable[int]) -> torch.Tensor:
    """``logits`` in float32 with the ``exclude_ids`` columns (the markers) at -inf, so that the
    softmax leaves them out; the caller's tensor is never written."""
    logits = logits.float()
    excl = list(exclude_ids)
    if excl:
        logits = logits.clone()
        logits[..., excl] = float("-inf")
    return logits


def forward_batch(model, batch: dict, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions of a :class:`Collator` batch, on the model's
    device (with the batch's ``position_ids`` when it has them)."""
    device = next(model.parameters()).device
    extra = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
    return model(input_ids=batch["input_ids"].to(device),
                 attention_mask=batch["attention_mask"].to(device),
                 logits_to_keep=keep, **extra).logits


def target_token_nll(logits: torch.Tensor, labels: torch.Tensor,
                     exclude_ids: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of every labelled position, with the marker logits left out of the softmax
    (the model is never asked to predict a marker). Returns ``(nll, index)``: one entry per target
    token in row-major order, ``index`` = the token's place within its row's targets (0 = the
    first target token)."""
    logits = exclude_logits(logits[:, :-1], exclude_ids)
    targets = labels[:, 1:]
    keep = targets != -100
    index = (keep.cumsum(1) - 1)[keep]
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
    return nll, index


def target_nll(logits: torch.Tensor, labels: torch.Tensor,
               exclude_ids: Iterable[int] = ()) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions (markers excluded as in
    :func:`target_token_nll`). Returns ``(sum, count)``."""
    nll, _ = target_token_nll(logits, labels, exclude_ids)
    return nll.sum(), int(nll.numel())
