"""Attention peers beyond torch SDPA for bench/kernels.py: compiled FlexAttention (torch-native,
CUDA), FlashAttention's ``flash_attn_with_kvcache`` and FlashInfer's single-request kernels, each
only where it imports. A peer that cannot run says why (JSON ``peers_skipped``) instead of
failing the suite.

Every peer gets the same problem as ours: ``q [B, Hq, Sq, D]`` against the last ``Sq`` rows of a
``length``-token cache, bottom-right causal (row i sees keys ``j <= length - Sq + i``).
"""
from __future__ import annotations

from typing import Callable

import torch

PEER_NAMES = ("flex_compiled", "flash_attn", "flashinfer")


def _flex(qs, ks, vs, sq: int, length: int) -> Callable[[int], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = length - sq

    def bottom_right(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    mask = None if sq == 1 else create_block_mask(bottom_right, B=None, H=None, Q_LEN=sq,
                                                  KV_LEN=length, device=qs[0].device)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = qs[0].shape[1] != ks[0].shape[1]
    return lambda i: compiled(qs[i], ks[i], vs[i], block_mask=mask, enable_gqa=gqa)


def _flash_attn(qs, ks_nhd, vs_nhd, sq: int, length: int) -> Callable[[int], torch.Tensor]:
    from flash_attn import flash_attn_with_kvcache

    q_nhd = [q.transpose(1, 2).contiguous() for q in qs]
    seqlens = torch.full((qs[0].shape[0],), length, dtype=torch.int32, device=qs[0].device)
    # causal with seqlen_q < seqlen_k is bottom-right aligned in FlashAttention >= 2.1
    return lambda i: flash_attn_with_kvcache(q_nhd[i], ks_nhd[i], vs_nhd[i],
                                             cache_seqlens=seqlens, causal=True)


def _flashinfer(qs, ks_nhd, vs_nhd, sq: int, length: int) -> Callable[[int], torch.Tensor]:
    import flashinfer

    if qs[0].shape[0] != 1:
        raise RuntimeError("batch > 1 needs FlashInfer's paged-KV wrappers (not wired here)")
    q_nhd = [q[0].transpose(0, 1).contiguous() for q in qs]  # [Sq, Hq, D]
    k1, v1 = [k[0] for k in ks_nhd], [v[0] for v in vs_nhd]  # [L, Hkv, D]
    if sq == 1:
        return lambda i: flashinfer.single_decode_with_kv_cache(q_nhd[i][0], k1[i], v1[i])
    # FlashInfer aligns the causal mask to the bottom right when qo_len < kv_len
    return lambda i: flashinfer.single_prefill_with_kv_cache(q_nhd[i], k1[i], v1[i], causal=True)


def attention_peers(device: str, qs, ks, vs, sq: int, length: int
                    ) -> tuple[dict[str, Callable[[int], torch.Tensor]], dict[str, str]]:
    """``(callables by name, skip reasons by name)`` for the peers in :data:`PEER_NAMES`."""
    runnable: dict[str, Callable[[int], torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    if device != "cuda":
        return runnable, {name: "CUDA only" for name in PEER_NAMES}
    nhd: dict[str, list] = {}

    def nhd_copies():  # [B, L, Hkv, D], made once and only when a peer needs them
        if not nhd:
            nhd["k"] = [k.transpose(1, 2).contiguous() for k in ks]
            nhd["v"] = [v.transpose(1, 2).contiguous() for v in vs]
        return nhd["k"], nhd["v"]

    builders = {
        "flex_compiled": lambda: _flex(qs, ks, vs, sq, length),
        "flash_attn": lambda: _flash_attn(qs, *nhd_copies(), sq, length),
        "flashinfer": lambda: _flashinfer(qs, *nhd_copies(), sq, length),
    }
    for name, build in builders.items():
        try:
            call = build()
            call(0)  # compile / reject now, not inside the timed loop
            runnable[name] = call
        except ImportError as exc:
            skipped[name] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # noqa: BLE001 - a peer refusing a shape must not stop the suite
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return runnable, skipped
