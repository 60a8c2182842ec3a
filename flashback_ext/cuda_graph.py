"""CUDA-graph decode: the whole one-token step (every layer's projections, RoPE, ``kv_append``,
``append_attention`` and the LM head) recorded once per cache and replayed per token.

At batch 1 a 7B decode step launches hundreds of small kernels; eager Python dispatch costs more
than the weights take to read (the issue measured 23 ms/token against a 3.2 ms floor). A replay
launches them all at once. What changes between steps lives in static device buffers filled by
one host-to-device copy before each replay: token ids, positions, and per-sequence counts (1 for a
live sequence, 0 for a finished one, as the eager engine's ragged step). The cache's device lengths
advance inside the graph; the host mirror is advanced after the replay.

Without CUDA (or ``capture=False``) the same static step runs eagerly: that is how the CPU tests
check the step's semantics, and the GPU test then checks replay against it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .hf import FlashBackCache

__all__ = ["DecodeGraph"]


class DecodeGraph:
    """A replayable q_len = 1 decode step bound to one :class:`FlashBackCache`.

    Args:
        body: the decoder stack (``LlamaModel``; patched attention) returning ``last_hidden_state``.
        head: the LM head (``get_output_embeddings()``).
        cache: the cache the graph reads and writes (its buffers must outlive the graph).
        cache_kw: the keyword the body takes the cache under (``"cache"`` or ``"past_key_values"``).
        pad_id: token fed to finished sequences (their output is ignored, their length unchanged).
        capture: record a CUDA graph on the first :meth:`step` (only on CUDA devices).
        warmup: eager static steps before capture (cuBLAS workspaces, lazy inits), on a side stream.
    """

    def __init__(self, body, head, cache: FlashBackCache, cache_kw: str, pad_id: int = 0, *,
                 capture: bool = True, warmup: int = 2) -> None:
        self.body, self.head, self.cache, self.cache_kw = body, head, cache, cache_kw
        self.pad_id = int(pad_id)
        ring = cache.ring
        self.batch, self.device = ring.batch_size, ring.device
        self.capture = capture and self.device.type == "cuda"
        self.warmup = warmup
        # rows: token ids, positions, counts (int64 so that one copy fills all three)
        self._inputs = torch.zeros(3, self.batch, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        self._staging = torch.zeros(3, self.batch, dtype=torch.long, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None  # staging is free to rewrite
        self._graph: Optional["torch.cuda.CUDAGraph"] = None
        self._logits: Optional[torch.Tensor] = None
        self.replays = 0

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def fits(self, counts: Sequence[int]) -> bool:
        """Whether every sequence has room for its count (else the caller steps eagerly, which
        may evict)."""
        ring = self.cache.ring
        return all(n + c <= ring.capacity for n, c in zip(ring.lengths(0), counts))

    def _static_step(self) -> torch.Tensor:
        ids = self._inputs[0].view(self.batch, 1)
        positions = self._inputs[1].view(self.batch, 1)
        self.cache.step_counts = self._inputs[2].to(torch.int32)
        try:
            hidden = self.body(input_ids=ids, position_ids=positions,
                               attention_mask=self.cache.dummy_mask(), use_cache=True,
                               **{self.cache_kw: self.cache}).last_hidden_state
        finally:
            self.cache.step_counts = None
        return self.head(hidden[:, -1]).float()

    def _record(self) -> None:
        """Warm up on a side stream, then capture; device lengths are restored from the host
        afterwards (warm-up steps only wrote slots past every sequence's end)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._static_step()
                self.cache.ring.sync_device()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._static_step()
        self.cache.ring.sync_device()
        self._graph = graph

    @torch.no_grad()
    def step(self, tokens: Sequence[Optional[int]]) -> torch.Tensor:
        """Forward one token per sequence (``None`` = finished: fed ``pad_id``, not appended).

        Returns next-token logits ``[B, vocab]`` (float32). On a captured graph this is the graph's
        static output buffer: the next step overwrites it, so copy what must outlive it.
        """
        if len(tokens) != self.batch:
            raise ValueError(f"step needs {self.batch} tokens, got {len(tokens)}")
        counts = [0 if t is None else 1 for t in tokens]
        if not self.fits(counts):
            raise ValueError(f"no room for a decode step: lengths {self.cache.lengths()}, capacity "
                             f"{self.cache.ring.capacity}")
        ring = self.cache.ring
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's async copy has read the staging rows
        self._staging[0] = torch.tensor([self.pad_id if t is None else int(t) for t in tokens])
        self._staging[1] = torch.tensor([ring.next_position(b) for b in range(self.batch)])
        self._staging[2] = torch.tensor(counts)
        self._inputs.copy_(self._staging, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if self.capture and self._graph is None:
            self._record()
        if self._graph is not None:
            self._graph.replay()
            self.replays += 1
            logits = self._logits
        else:
            logits = self._static_step()
        ring.advance_host(counts)
        return logits
