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

import contextlib
import logging
import time
from typing import Optional, Sequence

import torch

from .. import ops
from .hf import FlashBackCache

__all__ = ["DecodeGraph", "capture_blocker"]

logger = logging.getLogger(__name__)


def capture_blocker(body, cache: FlashBackCache) -> Optional[str]:
    """Why the decode step of this model/cache cannot be captured, or None when it can.

    Capture needs every op of the step to stay on the device: the compiled kernels (the
    reference fallback reads lengths on the host), a RoPE without host-side length checks, and
    no unmerged peft trainable-token layer (it copies its index list to the GPU every call).
    """
    config = getattr(body, "config", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if "dynamic" in str(rope_type) or rope_type == "longrope":
        return f"RoPE type {rope_type!r} checks lengths on the host every step"
    if any(type(m).__name__ == "TrainableTokensLayer" for m in body.modules()):
        return "an unmerged peft adapter with trainable tokens (load it with merge=True)"
    ring = cache.ring
    if ring.device.type != "cuda":
        return "not a CUDA device"
    if not ops.compiled_for(ring.device, ring.dtype, ring.head_dim):
        return (f"no compiled CUDA kernels for {ring.dtype} with head dim {ring.head_dim} "
                f"(the reference fallback cannot be captured)")
    return None


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
        compiled: run the step compiled with torch.compile (:mod:`.compiled_step`; CPU only:
            on CUDA the graph replay already removes the per-call cost). The first step
            compiles (tens of seconds); :attr:`compile_s` records how long it took.
        block_tokens: with ``compiled``, also compile the append mode's retrieval block, padded
            to this many tokens, on the same cache (:attr:`block_step`, a
            :class:`~.compiled_step.CompiledBlock`).
    """

    def __init__(self, body, head, cache: FlashBackCache, cache_kw: str, pad_id: int = 0, *,
                 capture: bool = True, warmup: int = 2, compiled: bool = False,
                 block_tokens: Optional[int] = None) -> None:
        self.body, self.head, self.cache, self.cache_kw = body, head, cache, cache_kw
        self.pad_id = int(pad_id)
        ring = cache.ring
        self.batch, self.device = ring.batch_size, ring.device
        self.blocker = capture_blocker(body, cache) if capture else "capture=False"
        self.capture = self.blocker is None
        if capture and self.blocker and self.device.type == "cuda":
            logger.warning("flashback_ext: decode runs without a CUDA graph: %s", self.blocker)
        self.warmup = warmup
        # rows: token ids, positions, counts (int64 so that one copy fills all three)
        self._inputs = torch.zeros(3, self.batch, dtype=torch.long, device=self.device)
        pinned = self.device.type == "cuda"
        self._staging = torch.zeros(3, self.batch, dtype=torch.long, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None  # staging is free to rewrite
        self._graph: Optional["torch.cuda.CUDAGraph"] = None
        self._logits: Optional[torch.Tensor] = None
        self.replays = 0
        self._compiled = None
        self.compile_s = 0.0  # the first compiled step: tracing and code generation
        self.block_step = None
        if compiled:
            if self.device.type != "cpu":
                raise ValueError("compiled decode steps are built for the CPU; on CUDA the "
                                 "graph replay removes the per-call cost")
            from .compiled_step import CompiledBlock, compile_step, layer_loop_step

            self._compiled = compile_step(layer_loop_step(body, head, cache_kw))
            if block_tokens:
                self.block_step = CompiledBlock(body, head, cache, cache_kw, block_tokens, pad_id)

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def fits(self, counts: Sequence[int]) -> bool:
        """Whether every sequence has room for this step (else the caller steps eagerly, which
        may evict). Finished sequences need a free slot too: every row writes one."""
        ring = self.cache.ring
        return all(n + max(c, 1) <= ring.capacity for n, c in zip(ring.lengths(0), counts))

    def _static_step(self) -> torch.Tensor:
        ids = self._inputs[0].view(self.batch, 1)
        positions = self._inputs[1].view(self.batch, 1)
        if self._compiled is not None:
            first = self.compile_s == 0.0
            start = time.perf_counter()
            try:
                logits = self._compiled(ids, positions, self.cache,
                                        self._inputs[2].to(torch.int32))
            except Exception as exc:  # noqa: BLE001 - e.g. dynamo's recompile limit: go eager
                logger.warning("flashback_ext: the compiled decode step failed (%s); decoding "
                               "eagerly from now on", str(exc).splitlines()[0] if str(exc) else exc)
                self._compiled = None
                self.cache.ring.sync_device()  # undo what a partial run advanced
                return self._static_step()
            finally:
                self.cache.step_counts = None
            if first:
                self.compile_s = time.perf_counter() - start
            return logits
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
        afterwards (warm-up steps only wrote slots past every sequence's end). A failed capture
        turns capture off for good (the step then runs eagerly) and re-raises nothing."""
        try:
            self._warm_up_and_capture()
        except Exception as exc:  # noqa: BLE001 - fall back to the eager static step
            self.capture, self.blocker, self._graph = False, f"capture failed: {exc}", None
            logger.warning("flashback_ext: CUDA graph capture failed, decoding eagerly: %s", exc)
        finally:
            self.cache.ring.sync_device()

    def _warm_up_and_capture(self) -> None:
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
        self._graph = graph

    @torch.no_grad()
    def step(self, tokens: Sequence[Optional[int]],
             shift: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Forward one token per sequence (``None`` = finished: fed ``pad_id``, not appended).
        ``shift[b]``: the token's rotary position is its slot minus this (default 0).

        Returns next-token logits ``[B, vocab]`` (float32). On a captured graph this is the graph's
        static output buffer: the next step overwrites it, so copy what must outlive it.
        """
        if len(tokens) != self.batch:
            raise ValueError(f"step needs {self.batch} tokens, got {len(tokens)}")
        counts = [0 if t is None else 1 for t in tokens]
        if not self.fits(counts):
            raise ValueError(f"no room for a decode step: lengths {self.cache.lengths()}, capacity "
                             f"{self.cache.ring.capacity}")
        on_device = torch.cuda.device(self.device) if self._copied is not None else contextlib.nullcontext()
        with on_device:  # events, streams and the graph belong to the cache's GPU
            return self._step(tokens, counts, shift or [0] * self.batch)

    def _step(self, tokens: Sequence[Optional[int]], counts: list[int],
              shift: Sequence[int]) -> torch.Tensor:
        ring = self.cache.ring
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's async copy has read the staging rows
        self._staging.copy_(torch.tensor([[self.pad_id if t is None else int(t) for t in tokens],
                                          [ring.next_position(b) - shift[b] for b in range(self.batch)],
                                          counts]))
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
            try:
                logits = self._static_step()
            except BaseException:
                ring.sync_device()  # layers that ran advanced their device lengths: undo
                raise
        ring.advance_host(counts)
        return logits
