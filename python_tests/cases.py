"""Shared builders and the tolerance rule for the op tests.

Caches are POISONED: every slot starts as NaN and only the slots that hold live logical tokens
get random values, so a kernel that reads a dead slot (wrong ring mapping, reading past
kv_lens, ignoring the sink) produces NaN and fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from flashback_ext import reference


@dataclass
class AttentionCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kv_lens: torch.Tensor
    ring_offset: torch.Tensor
    sink: int
    q_lens: Optional[torch.Tensor]

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.kv_lens, self.ring_offset, self.sink)

    def to(self, dtype: torch.dtype, device=None) -> "AttentionCase":
        device = device or self.q.device
        conv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        lens = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AttentionCase(conv(self.q), conv(self.k_cache), conv(self.v_cache),
                             lens(self.kv_lens), lens(self.ring_offset), self.sink,
                             lens(self.q_lens))


def poisoned_cache(batch, hkv, capacity, d, lens, offs, sink, dtype, device, gen) -> torch.Tensor:
    cache = torch.full((batch, hkv, capacity, d), float("nan"), dtype=dtype, device=device)
    for b in range(batch):
        slots = reference.logical_slots(lens[b], capacity, sink, offs[b]).to(device)
        values = torch.randn(hkv, lens[b], d, generator=gen).to(device=device, dtype=dtype)
        cache[b].index_copy_(1, slots, values)
    return cache


def make_case(batch, hq, hkv, sq, d, capacity, lens, offs=None, sink=0, q_lens=None,
              dtype=torch.float32, device="cpu", seed=0) -> AttentionCase:
    gen = torch.Generator().manual_seed(seed)
    offs = offs or [0] * batch
    q = torch.randn(batch, hq, sq, d, generator=gen).to(device=device, dtype=dtype)
    k = poisoned_cache(batch, hkv, capacity, d, lens, offs, sink, dtype, device, gen)
    v = poisoned_cache(batch, hkv, capacity, d, lens, offs, sink, dtype, device, gen)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return AttentionCase(q, k, v, i32(lens), i32(offs), sink,
                         None if q_lens is None else i32(q_lens))


def reference_pair(case: AttentionCase, low_dtype: torch.dtype):
    """(float64 truth, plain-PyTorch result in the kernel's dtype), both on the CPU."""
    def run(dtype):
        c = case.to(dtype, device="cpu")
        # NaN poison must not leak through the reference either: it only gathers live slots.
        return reference.append_attention(*c.args(), None, c.q_lens)
    return run(torch.float64), run(low_dtype)


def assert_fa_close(out, lse, truth, lowp, atol: float, q_lens=None, sq=None) -> None:
    """FlashAttention rule: kernel error vs float64 <= 2x plain-PyTorch error + atol."""
    out, lse = out.detach().cpu().double(), lse.detach().cpu().double()
    ref_out, ref_lse = truth
    low_out, low_lse = lowp
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (read a poisoned slot?)"
    err = (out - ref_out).abs().max().item()
    base = (low_out.double() - ref_out).abs().max().item()
    assert err <= 2 * base + atol, f"out error {err:.3e} > 2 x torch error {base:.3e} + {atol:g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse finiteness differs from the reference"
    lerr = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    lbase = (low_lse.double()[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    assert lerr <= 2 * lbase + atol, f"lse error {lerr:.3e} > 2 x torch error {lbase:.3e} + {atol:g}"
    if q_lens is not None:  # rows past q_lens are exactly zero
        for b, ql in enumerate(q_lens):
            assert (out[b, ql:] == 0).all()
            assert (lse[b, :, ql:] == float("-inf")).all()


ATOL = {torch.float32: 2e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}
