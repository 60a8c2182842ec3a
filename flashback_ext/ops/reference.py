"""Pure-PyTorch reference implementations of the flashback ops.

These are the ground truth every kernel is tested against. They favour clarity over speed:
the cache is gathered into logical order with an explicit slot map, and attention is the
textbook softmax(QK^T)V with a bottom-right causal mask. Math runs in the dtype of the
inputs, so calling them with float64 tensors gives a high-precision answer and calling them
with bf16 tensors gives "what plain PyTorch would do in bf16" (the FlashAttention 2x rule).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["logical_slots", "gather_logical", "kv_append", "append_attention"]


def logical_slots(length: int, capacity: int, sink: int, ring_offset: int, start: int = 0) -> torch.Tensor:
    """Physical cache slots of logical tokens ``start .. start+length-1`` of one sequence.

    Logical token ``j`` lives at slot ``j`` if ``j < sink``, else at
    ``sink + (j - sink + ring_offset) % (capacity - sink)``.
    """
    j = torch.arange(start, start + length, dtype=torch.int64)
    ring = capacity - sink
    if ring <= 0:
        return j
    ringed = sink + torch.remainder(j - sink + ring_offset, ring)
    return torch.where(j < sink, j, ringed)


def gather_logical(cache: torch.Tensor, b: int, length: int, ring_offset: int, sink: int) -> torch.Tensor:
    """Return ``cache[b]``'s first ``length`` logical tokens in order: ``[Hkv, length, D]``."""
    slots = logical_slots(length, cache.shape[2], sink, ring_offset).to(cache.device)
    return cache[b].index_select(1, slots)


def _host_list(t: Optional[torch.Tensor], batch: int, default: int) -> list[int]:
    if t is None:
        return [default] * batch
    return [int(x) for x in t.detach().cpu().tolist()]


def kv_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_pos: torch.Tensor,
    ring_offset: Optional[torch.Tensor] = None,
    sink: int = 0,
) -> None:
    """Write ``k_new/v_new [B, Hkv, n, D]`` into the caches at logical ``write_pos[b] + i``.

    Tokens whose logical index falls at or past the capacity are dropped (never wrapped onto
    live data); the validating wrappers reject such requests before they get here.
    """
    batch, _, n, _ = k_new.shape
    capacity = k_cache.shape[2]
    pos = _host_list(write_pos, batch, 0)
    offs = _host_list(ring_offset, batch, 0)
    for b in range(batch):
        keep = max(0, min(n, capacity - pos[b]))
        if keep == 0:
            continue
        slots = logical_slots(keep, capacity, sink, offs[b], start=pos[b]).to(k_cache.device)
        k_cache[b].index_copy_(1, slots, k_new[b, :, :keep].to(k_cache.dtype))
        v_cache[b].index_copy_(1, slots, v_new[b, :, :keep].to(v_cache.dtype))


def append_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    ring_offset: Optional[torch.Tensor] = None,
    sink: int = 0,
    scale: Optional[float] = None,
    q_lens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-right causal attention of ``q [B, Hq, Sq, D]`` over a (ring) KV cache.

    Query row ``i`` of sequence ``b`` sees logical keys ``j <= kv_lens[b] - q_lens[b] + i``.
    Returns ``out [B, Sq, Hq, D]`` (q's dtype, rows past ``q_lens[b]`` zero) and
    ``lse [B, Hq, Sq]`` float32 natural-log sum-exp (``-inf`` on rows past ``q_lens[b]``;
    float64 when q is float64, so the reference stays exact as ground truth).
    """
    batch, hq, sq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lens = _host_list(kv_lens, batch, 0)
    qls = _host_list(q_lens, batch, sq)
    offs = _host_list(ring_offset, batch, 0)
    out = torch.zeros(batch, sq, hq, d, dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # keep truth exact
    lse = torch.full((batch, hq, sq), float("-inf"), dtype=lse_dtype, device=q.device)
    for b in range(batch):
        length, ql = lens[b], qls[b]
        if ql == 0:
            continue
        keys = gather_logical(k_cache, b, length, offs[b], sink).to(q.dtype)
        vals = gather_logical(v_cache, b, length, offs[b], sink).to(q.dtype)
        keys = keys.repeat_interleave(group, dim=0)  # [Hq, L, D]
        vals = vals.repeat_interleave(group, dim=0)
        scores = torch.matmul(q[b, :, :ql], keys.transpose(-1, -2)) * scale  # [Hq, ql, L]
        row = torch.arange(ql, device=q.device).unsqueeze(1)
        col = torch.arange(length, device=q.device).unsqueeze(0)
        visible = col <= (length - ql + row)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [Hq, ql]
        probs = torch.softmax(scores, dim=-1)
        out[b, :ql] = torch.matmul(probs, vals).transpose(0, 1).to(q.dtype)
        lse[b, :, :ql] = row_lse.to(lse_dtype)
    return out, lse
