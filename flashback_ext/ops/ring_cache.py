"""RingKVCache: preallocated per-layer K/V buffers in the ring layout of docs/DESIGN.md.

The cache owns, for every layer, ``k`` and ``v`` buffers ``[B, Hkv, C, D]`` plus the logical
length and ring offset of every sequence, kept twice: as Python ints (so every request is
validated on the host before a kernel launches, without a device sync) and as int32 device
tensors (what the kernels read, so a decode step can later be captured in a CUDA graph).

Keys are stored after RoPE, so their positions are absolute: ``rollback``/``truncate`` rewind
positions (the rolled-back tokens are forgotten), while eviction does not (the evicted tokens
happened; the kept ones keep their rotation). ``next_position(b)`` is where the next token of
sequence ``b`` sits in that absolute numbering.

This class knows nothing about transformers; the Hugging Face adaptor wraps it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import ops

__all__ = ["RingKVCache", "CacheOverflowError"]

IntOrSeq = Union[int, Sequence[int]]


class CacheOverflowError(RuntimeError):
    """Raised when an append does not fit and the overflow policy is ``"error"``."""


class RingKVCache:
    """Per-layer ring-buffer KV cache for ``batch_size`` sequences of up to ``capacity`` tokens.

    Args:
        num_layers: number of attention layers (one K/V buffer pair each).
        batch_size: number of sequences (B).
        num_kv_heads: key/value heads (Hkv).
        head_dim: head dimension (D).
        capacity: slots per sequence (C), including ``sink`` pinned slots.
        dtype, device: buffer dtype and device.
        sink: number of leading tokens never evicted (attention sinks).
        overflow: ``"error"`` (default: raise :class:`CacheOverflowError`, write nothing) or
            ``"evict"`` (drop the oldest non-sink tokens to make room).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        sink: int = 0,
        overflow: str = "error",
    ) -> None:
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("capacity", capacity)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(sink, int) or not 0 <= sink < capacity:
            raise ValueError(f"sink must be an int in [0, capacity={capacity}), got {sink!r}")
        if overflow not in ("error", "evict"):
            raise ValueError(f"overflow must be 'error' or 'evict', got {overflow!r}")
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_kv_heads, self.head_dim, self.capacity = num_kv_heads, head_dim, capacity
        self.sink, self.overflow = sink, overflow
        self.dtype, self.device = dtype, torch.device(device)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        # device mirrors of the host state below: row l = layer l
        self.kv_lens = torch.zeros(num_layers, batch_size, dtype=torch.int32, device=self.device)
        self.ring_offset = torch.zeros_like(self.kv_lens)
        self.reset()  # host state per layer and sequence: lengths, ring offsets, evicted counts

    # ------------------------------------------------------------------------------ queries
    def lengths(self, layer: int = 0) -> list[int]:
        """Logical tokens held per sequence at ``layer`` (host ints)."""
        return list(self._len[self._layer(layer)])

    def next_position(self, b: int, layer: int = 0) -> int:
        """Absolute position of the next token of sequence ``b`` (evicted tokens count)."""
        layer = self._layer(layer)
        return self._len[layer][b] + self._evicted[layer][b]

    def evicted(self, b: int, layer: int = 0) -> int:
        """Tokens of sequence ``b`` dropped by ``overflow="evict"`` since the last reset: always
        the oldest ones after the ``sink`` pinned tokens."""
        return self._evicted[self._layer(layer)][b]

    def memory_bytes(self) -> int:
        """Bytes held by the K and V buffers of all layers (the length tensors are negligible)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def layer_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, v, kv_lens, ring_offset)`` device tensors of one layer, as the ops take them."""
        layer = self._layer(layer)
        return self.k[layer], self.v[layer], self.kv_lens[layer], self.ring_offset[layer]

    def attend(self, layer: int, q: torch.Tensor, scale: Optional[float] = None,
               q_lens: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q [B, Hq, Sq, D]`` (the newest ``Sq`` tokens, already appended) over
        this layer; ``q_lens`` gives per-sequence valid rows for ragged blocks. Returns
        ``(out [B, Sq, Hq, D], lse [B, Hq, Sq])`` as :func:`flashback_ext.ops.append_attention`.
        """
        layer = self._layer(layer)
        sq = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
        rows = list(q_lens) if q_lens is not None else [sq] * self.batch_size
        if len(rows) != self.batch_size:
            raise ValueError(f"q_lens needs {self.batch_size} entries, got {len(rows)}")
        for b, r in enumerate(rows):
            if r is not None and r > self._len[layer][b]:
                raise ValueError(f"sequence {b} has {r} query rows but only {self._len[layer][b]} "
                                 f"cached tokens: append the block before attending")
        ql = None
        if q_lens is not None:
            ql = torch.tensor(rows, dtype=torch.int32).to(self.device, non_blocking=True)
        k, v, kv_lens, ring_offset = self.layer_state(layer)
        return ops.append_attention(q, k, v, kv_lens, ring_offset, self.sink, scale, ql)

    # ---------------------------------------------------------------------------- mutation
    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
               counts: Optional[Sequence[int]] = None) -> None:
        """Append ``k_new, v_new [B, Hkv, n, D]`` after the current tokens of every sequence.

        ``counts[b]`` (default ``n``) is how many of the ``n`` tokens are real for sequence ``b``
        (a right-padded ragged block): all ``n`` are written, the length grows by ``counts[b]``,
        so the padding is invisible and overwritten later.
        On overflow: ``"error"`` raises :class:`CacheOverflowError` before writing; ``"evict"``
        first drops the oldest non-sink tokens (advancing the ring) so the block fits.
        Every check happens before any state changes.
        """
        layer = self._layer(layer)
        if not isinstance(k_new, torch.Tensor) or k_new.dim() != 4:
            raise ValueError(f"k_new must be a [B, Hkv, n, D] tensor, got "
                             f"{getattr(k_new, 'shape', type(k_new).__name__)}")
        n = k_new.shape[2]
        grow = [n] * self.batch_size if counts is None else self._per_seq(list(counts), "counts")
        if any(c > n for c in grow):
            raise ValueError(f"counts {list(grow)} exceed the block length {n}")
        lens, offs, evicted = list(self._len[layer]), list(self._off[layer]), list(self._evicted[layer])
        ring = self.capacity - self.sink
        for b in range(self.batch_size):
            excess = lens[b] + n - self.capacity
            if excess <= 0:
                continue
            if self.overflow == "error":
                raise CacheOverflowError(
                    f"appending {n} tokens to sequence {b} (holding {lens[b]}) exceeds the "
                    f"capacity {self.capacity}; roll back, truncate, or use overflow='evict'")
            if n > ring or lens[b] - excess < self.sink:
                raise CacheOverflowError(
                    f"a block of {n} tokens cannot fit even after evicting every non-sink token "
                    f"(capacity {self.capacity}, sink {self.sink})")
            offs[b] = (offs[b] + excess) % ring
            lens[b] -= excess
            evicted[b] += excess
        # Validate shapes/dtypes through the op wrapper BEFORE committing the eviction.
        write_pos = torch.tensor(lens, dtype=torch.int32)
        ring_off = torch.tensor(offs, dtype=torch.int32)
        if self.device.type != "cpu":
            write_pos = write_pos.to(self.device, non_blocking=True)
            ring_off = ring_off.to(self.device, non_blocking=True)
        ops.kv_append(k_new, v_new, self.k[layer], self.v[layer], write_pos, ring_off, self.sink)
        self._len[layer] = [x + c for x, c in zip(lens, grow)]
        self._off[layer] = offs
        self._evicted[layer] = evicted
        self._sync(layer)

    def append_on_device(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
                         counts: torch.Tensor) -> None:
        """Graph-capturable append for a decode step (CUDA graphs): write ``k_new, v_new
        [B, Hkv, n, D]`` at the DEVICE lengths and advance them by ``counts`` (int32 ``[B]`` on the
        cache's device), reading and writing no host state and never evicting.

        The caller checks beforehand that every sequence has room (``lengths + counts <=
        capacity``) and calls :meth:`advance_host` with the same counts once per step afterwards,
        so the host mirror stays equal to the device lengths.
        """
        k, v, lens, offs = self.layer_state(layer)
        ops.kv_append(k_new, v_new, k, v, lens, offs, self.sink)
        lens.add_(counts)

    def append_and_attend_on_device(self, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                                    v_new: torch.Tensor, counts: torch.Tensor,
                                    scale: Optional[float] = None) -> torch.Tensor:
        """:meth:`append_on_device`, then the attention output ``[B, Sq, Hq, D]`` of ``q`` with
        ``counts`` valid rows per sequence over the device lengths (no host state either)."""
        self.append_on_device(layer, k_new, v_new, counts)
        k, v, lens, offs = self.layer_state(layer)
        return ops.append_attention(q, k, v, lens, offs, self.sink, scale, counts)[0]

    def advance_host(self, counts: Sequence[int]) -> None:
        """Advance the host lengths of every layer by ``counts`` after device-side appends."""
        counts = self._per_seq(list(counts), "counts")
        new = [[x + c for x, c in zip(lens, counts)] for lens in self._len]
        if max(max(row) for row in new) > self.capacity:
            raise CacheOverflowError(f"advance_host: lengths {new[0]} exceed the capacity "
                                     f"{self.capacity} (the device append had no room)")
        self._len = new

    def sync_device(self) -> None:
        """Copy the host lengths/offsets of every layer into the device rows (undoes device-only
        changes such as a CUDA-graph warm-up)."""
        for layer in range(self.num_layers):
            self._sync(layer)

    def rollback(self, n: IntOrSeq) -> None:
        """Forget the newest ``n`` tokens (an int, or one per sequence) of every layer; O(1)."""
        counts = self._per_seq(n, "n")
        for layer in range(self.num_layers):
            for b, c in enumerate(counts):
                if c > self._len[layer][b]:
                    raise ValueError(f"cannot roll back {c} tokens of sequence {b}: layer {layer} "
                                     f"holds {self._len[layer][b]}")
                if self._evicted[layer][b] and c > self._len[layer][b] - self.sink:
                    # the oldest non-sink tokens are gone: rolling back past the newest
                    # ring-full would reach tokens that were evicted, or the sink
                    raise ValueError(f"cannot roll back {c} tokens of sequence {b}: it holds "
                                     f"{self._len[layer][b]} ({self.sink} sink) after evicting "
                                     f"{self._evicted[layer][b]}; evicted tokens cannot come back")
        self._set_lengths([[self._len[layer][b] - c for b, c in enumerate(counts)]
                           for layer in range(self.num_layers)])

    def truncate(self, length: IntOrSeq) -> None:
        """Keep the first ``length`` tokens (an int, or one per sequence) of every layer; O(1)."""
        targets = self._per_seq(length, "length")
        for layer in range(self.num_layers):
            for b, t in enumerate(targets):
                if t > self._len[layer][b]:
                    raise ValueError(f"cannot truncate sequence {b} to {t}: layer {layer} holds "
                                     f"only {self._len[layer][b]} tokens")
        self._set_lengths([list(targets) for _ in range(self.num_layers)])

    def reset(self) -> None:
        """Empty every sequence (buffers are kept, not zeroed)."""
        self._len = [[0] * self.batch_size for _ in range(self.num_layers)]
        self._off = [[0] * self.batch_size for _ in range(self.num_layers)]
        self._evicted = [[0] * self.batch_size for _ in range(self.num_layers)]
        self.kv_lens.zero_()
        self.ring_offset.zero_()

    # ----------------------------------------------------------------------------- helpers
    def _layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _per_seq(self, value: IntOrSeq, name: str) -> list[int]:
        values = [value] * self.batch_size if isinstance(value, int) else list(value)
        if len(values) != self.batch_size:
            raise ValueError(f"{name} needs {self.batch_size} entries, got {len(values)}")
        for v in values:
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} entries must be non-negative ints, got {v!r}")
        return values

    def _set_lengths(self, new_lens: list[list[int]]) -> None:
        self._len = new_lens
        self.sync_device()

    def _sync(self, layer: int) -> None:
        """Mirror one layer's host lengths/offsets into its device rows."""
        self.kv_lens[layer].copy_(torch.tensor(self._len[layer], dtype=torch.int32),
                                  non_blocking=True)
        self.ring_offset[layer].copy_(torch.tensor(self._off[layer], dtype=torch.int32),
                                      non_blocking=True)

    def __repr__(self) -> str:
        return (f"RingKVCache(layers={self.num_layers}, B={self.batch_size}, Hkv={self.num_kv_heads}, "
                f"D={self.head_dim}, C={self.capacity}, sink={self.sink}, overflow={self.overflow!r}, "
                f"lengths={self._len[0]}, {self.dtype}, {self.device})")
