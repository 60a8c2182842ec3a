"""The RALM generation engine: FlashBack append mode, the In-Context RALM prepend baseline, and
plain decoding, on a patched Hugging Face Llama-family model with a :class:`FlashBackCache`.

Every ``stride`` generated tokens the engine retrieves with the last ``query_tokens`` tokens as
the query and forwards what the mode's block builder (:mod:`.blocks`) makes of the passages;
between retrievals it decodes one token at a time on the cache. Batches of prompts of different
lengths run together (right-padded ragged blocks, :mod:`.sequence` keeps each one's state);
every sequence retrieves after the same number of generated tokens. docs/DESIGN.md has the data
flow of one retrieval cycle.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence, Union

import torch

from ..layout import MARK_L, MARK_R, Layout
from .blocks import AppendBlocks, Step, block_builder
from .cuda_graph import DecodeGraph
from .hf import FlashBackCache, cache_kwarg_name, patch_model
from .passages import PassageFetcher, check_loop_settings, markers_to_use
from .results import GenerationResult, RetrievalRecord, Timing
from .sampling import Sampler, eos_token_ids
from .sequence import SequenceState

__all__ = ["RALMGenerator", "GenerationResult", "RetrievalRecord", "Timing", "MARK_L", "MARK_R"]

logger = logging.getLogger(__name__)

MODES = ("append", "prepend", "none")


class RALMGenerator:
    """Retrieval-augmented generation with KV-cache reuse.

    Args:
        model, tokenizer: a Hugging Face Llama/Mistral/Qwen2 causal LM (patched here) and its
            tokenizer.
        retriever: anything with ``search_batch(queries, k) -> list[list[Hit]]`` (see
            :mod:`flashback_ext.retrieval`); not needed for ``mode="none"``.
        mode: ``"append"`` (FlashBack), ``"prepend"`` (In-Context RALM) or ``"none"``.
        stride: generated tokens between retrievals (16 in the paper).
        query_tokens: tokens of the retrieval query (the last ``query_tokens`` of the text).
        passage_tokens: tokens kept of each retrieved passage.
        k: passages per retrieval (concatenated inside one marker pair).
        echo_tokens: append mode only: repeat the last ``echo_tokens`` tokens after each passage
            (the layout an adapter trained with ``--echo-tokens`` expects; 0 = the paper's).
        passage_positions: append mode with markers only: ``"before"`` gives ``<MARK_L> passage``
            the rotary positions just before the context's first token and ``<MARK_R>`` the one
            after its last; the new tokens follow ``<MARK_R>`` (the layout an adapter trained
            with ``--passage-positions before`` expects, :func:`flashback_ext.layout.layout_positions`; not in
            the paper). With ``echo_tokens`` as well, all of ``E`` sits before the context and
            the echo at its tokens' own positions. ``"after"``: the paper's contiguous positions.
        use_markers: wrap passages in ``<MARK_L> … <MARK_R>``; default: when the tokenizer has them.
        capacity: cache slots per sequence; default: enough for the prompt, the new tokens and
            one retrieval block.
        overflow, sink: the cache's overflow policy (``"error"`` or ``"evict"``) and pinned tokens.
        cuda_graphs: replay each one-token decode step as a CUDA graph (:mod:`.cuda_graph`);
            default: on when the model is on a CUDA device. The graph and its cache are kept
            between calls of the same batch size (capacity rounded up to 256 slots when not
            given) until :meth:`release_graphs`. ``True`` on the CPU runs the same static step
            eagerly (what the CPU tests check).
        compile: CPU only: run that static decode step, and in append mode the retrieval
            block, compiled by torch.compile (:mod:`.compiled_step`). The first decode step and
            the first block of a new cache compile them (tens of seconds each, reported as
            ``Timing.compile_s`` and left out of ``decode_s`` / ``block_s``); later calls that
            fit the kept cache reuse them without recompiling. The weights are frozen into
            the compiled step: do not change them in place while the engine is in use.
    """

    def __init__(self, model, tokenizer, retriever=None, *, mode: str = "append", stride: int = 16,
                 query_tokens: int = 32, passage_tokens: int = 128, k: int = 1,
                 use_markers: Optional[bool] = None, capacity: Optional[int] = None,
                 overflow: str = "error", sink: int = 0,
                 cuda_graphs: Optional[bool] = None, echo_tokens: int = 0,
                 passage_positions: str = "after", compile: bool = False) -> None:
        check_loop_settings(mode, MODES, retriever, stride=stride, query_tokens=query_tokens,
                            passage_tokens=passage_tokens, k=k)
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.model = patch_model(model)
        self.tokenizer, self.retriever, self.mode = tokenizer, retriever, mode
        self.stride, self.query_tokens, self.passage_tokens, self.k = stride, query_tokens, passage_tokens, k
        self.capacity, self.overflow, self.sink = capacity, overflow, sink
        self.markers = markers_to_use(tokenizer, use_markers, "add them with flashback_ext.marking")
        self.use_markers = self.markers is not None
        self.layout = Layout(mode, self.markers, echo_tokens, passage_positions)  # validates
        self.echo_tokens, self.passage_positions = echo_tokens, passage_positions
        self.blocks = block_builder(self.layout, stride)
        self.passages = PassageFetcher(tokenizer, retriever, self.layout, k=k,
                                       query_tokens=query_tokens, passage_tokens=passage_tokens)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._body, self._head = base.model, base.get_output_embeddings()
        self._cache_kw = cache_kwarg_name(self._body)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.eos_ids = eos_token_ids(tokenizer.eos_token_id, getattr(
            getattr(model, "generation_config", None), "eos_token_id", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if compile and self.device.type != "cpu":
            raise ValueError("compile=True builds a compiled CPU decode step; on CUDA the "
                             "decode step is replayed as a CUDA graph (cuda_graphs)")
        if compile and cuda_graphs is False:
            raise ValueError("compile=True runs the static decode step: it needs cuda_graphs "
                             "left at None or True")
        self.compile = bool(compile)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.cuda_graphs = self.cuda_graphs or self.compile
        self._decoder: Optional[DecodeGraph] = None

    def release_graphs(self) -> None:
        """Drop the kept decode graph and its cache (frees their GPU memory)."""
        self._decoder = None

    def _cache_for(self, batch: int, capacity: int) -> tuple[FlashBackCache, Optional[DecodeGraph]]:
        """A fresh cache, or with CUDA graphs the kept one (reset) when it fits this run."""
        if not self.cuda_graphs:
            return FlashBackCache.for_model(self.model, batch, capacity, overflow=self.overflow,
                                            sink=self.sink), None
        dec = self._decoder
        if dec is None or dec.batch != batch or dec.cache.ring.capacity < capacity or \
                (self.capacity is not None and dec.cache.ring.capacity != capacity):
            self._decoder = None  # free the old graph and cache before allocating the new ones
            slots = capacity if self.capacity is not None else -(-capacity // 256) * 256
            cache = FlashBackCache.for_model(self.model, batch, slots, overflow=self.overflow,
                                             sink=self.sink)
            dec = self._decoder = DecodeGraph(self._body, self._head, cache, self._cache_kw,
                                              self.pad_id, compiled=self.compile,
                                              block_tokens=self._block_tokens())
        dec.cache.reset()
        return dec.cache, dec

    def _block_tokens(self) -> Optional[int]:
        """The longest append-mode retrieval block ``[last stride | E | echo]`` (E: k passages
        and the two markers, if any), which the compiled block is padded to; None in the other
        modes."""
        if self.mode != "append":
            return None
        markers = 2 if self.markers else 0
        return self.stride + self.k * self.passage_tokens + markers + self.echo_tokens

    # ------------------------------------------------------------------------------ helpers
    def passage_block(self, hits) -> list[int]:
        """Token ids of ``E``: the hits' passages (each cut to ``passage_tokens``), with markers."""
        return self.passages.block(hits)

    def _step(self, step: Step, seqs: list[SequenceState], cache: FlashBackCache,
              decoder: Optional[DecodeGraph], timing: Timing,
              trace: bool) -> list[Optional[torch.Tensor]]:
        """Run one :class:`Step` on the cache, keep every sequence's view of it in step and time
        it; next-token logits per sequence (None where its block was empty)."""
        if step.rollback is not None:
            cache.rollback(step.rollback)
            for s, n in zip(seqs, step.rollback):
                s.rolled_back(n)
        t0 = time.perf_counter()
        if step.reset:
            cache.reset()
        shifts = [s.shift for s in seqs]
        rope = step.rope
        explicit = rope is not None or any(shifts)
        if rope is None and (explicit or trace):  # else the cache's slots, nothing to build
            rope = [[slot - s.shift + i for i in range(len(block))]
                    for slot, s, block in zip(cache.next_positions(), seqs, step.blocks)]
        for b, (s, block) in enumerate(zip(seqs, step.blocks)):
            s.wrote(block, rope[b] if trace else None, step.reset)
        counts = [len(block) for block in step.blocks]
        if step.kind == "block":
            timing.block_tokens += sum(counts)
        block_step = decoder.block_step if decoder is not None else None
        out = None
        if step.kind == "decode" and decoder is not None and decoder.fits(counts):
            out = decoder.step([block[0] if block else None for block in step.blocks],
                               shifts if any(shifts) else None)
            timing.graph_steps += 1
        elif step.kind == "block" and block_step is not None and block_step.fits(counts):
            out = block_step.run(step.blocks, rope if explicit else None)  # None: it failed
        if out is not None:
            logits = [out[b] if counts[b] else None for b in range(len(seqs))]
        else:
            logits = self._forward(cache, step.blocks, rope if explicit else None)
        if self.device.type == "cuda":  # the sampler waits for the logits anyway: time them
            torch.cuda.synchronize(self.device)
        setattr(timing, f"{step.kind}_s", getattr(timing, f"{step.kind}_s") + time.perf_counter() - t0)
        if step.kind == "decode":
            timing.decode_steps += 1
        return logits

    @torch.no_grad()
    def _forward(self, cache: FlashBackCache, blocks: list[list[int]],
                 rope: Optional[list[list[int]]] = None) -> list[Optional[torch.Tensor]]:
        """Forward a right-padded ragged block; next-token logits per sequence (None if empty).
        ``rope``: the rotary position of every block token (default: the cache's next slots)."""
        counts = [len(b) for b in blocks]
        n = max(counts)
        if n == 0:
            return [None] * len(blocks)
        ids = torch.full((len(blocks), n), self.pad_id, dtype=torch.long)
        for b, block in enumerate(blocks):
            ids[b, : len(block)] = torch.tensor(block, dtype=torch.long)
        ids = ids.to(self.device)
        cache.new_tokens = None if all(c == n for c in counts) else counts
        positions = cache.position_ids(n)
        if rope is not None:
            positions = positions.clone()
            for b, pos in enumerate(rope):
                if pos:
                    positions[b, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        try:
            hidden = self._body(input_ids=ids, position_ids=positions,
                                attention_mask=cache.dummy_mask(), use_cache=True,
                                **{self._cache_kw: cache}).last_hidden_state
        finally:
            cache.new_tokens = None
        rows = torch.tensor([max(c - 1, 0) for c in counts], device=self.device)
        last = hidden[torch.arange(len(blocks), device=self.device), rows]
        logits = self._head_logits(last).float()
        return [logits[b] if counts[b] > 0 else None for b in range(len(blocks))]

    def _head_logits(self, last: torch.Tensor) -> torch.Tensor:
        """The LM head on ``[rows, hidden]``. On the CPU in fp32, a plain bias-free head is applied
        as ``weight @ last.T``: MKL's product for a few rows in ``last @ weight.T`` order read
        SmolLM2's 113 MB head at ~3 GB/s on the dev machine (AMD EPYC; 39 ms for 3 rows), the
        weight-major order 5x faster (research/lm_head_cpu.py); same products, summed in another
        order."""
        head = self._head
        # a plain module only: no peft wrapper, no bias, and no accelerate hook that would move
        # an offloaded weight in on forward (its weight here may be on "meta")
        if (last.device.type == "cpu" and last.dtype == torch.float32 and last.shape[0] > 1
                and type(head) is torch.nn.Linear and head.bias is None
                and head.weight.device == last.device and not hasattr(head, "_hf_hook")):
            return (head.weight @ last.T).T
        return head(last)

    @torch.no_grad()
    def score(self, src: Sequence[int], passage: Sequence[int], tgt: Sequence[int],
              exclude_ids: Sequence[int] = ()) -> list[float]:
        """Log-probabilities of ``tgt`` after ``src | E`` computed the append-mode way: prefill,
        one ``[last stride of src | E | echo]`` block, then teacher-forced one-token steps on the
        cache. ``exclude_ids`` (the markers) are left out of the softmax."""
        if not src or not tgt:
            raise ValueError("score needs a non-empty src and tgt")
        # the append layout whatever the engine's mode (an evaluator may score with any engine)
        layout = Layout("append", self.markers, self.echo_tokens, self.passage_positions)
        e = layout.marked(passage)
        cache = FlashBackCache.for_model(self.model, 1, len(src) + len(e) + self.echo_tokens
                                         + len(tgt) + 1)
        seq, timing = SequenceState(list(src), len(src)), Timing()
        for step in AppendBlocks(layout, self.stride).prompt([seq], [e]):
            logits = self._step(step, [seq], cache, None, timing, False)[0]
        logps = []
        for i, tok in enumerate(tgt):
            if exclude_ids:
                logits = logits.clone()
                logits[list(exclude_ids)] = float("-inf")
            logps.append(float(torch.log_softmax(logits.float(), -1)[tok]))
            if i + 1 < len(tgt):
                logits = self._step(Step("decode", [[int(tok)]]), [seq], cache, None, timing,
                                    False)[0]
        return logps

    # ----------------------------------------------------------------------------- generate
    def generate(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 64, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop_on_eos: bool = True,
                 stream: Optional[Callable[[int, int, str], None]] = None,
                 exclude_doc_ids: Optional[Sequence[str]] = None,
                 trace: bool = False) -> Union[GenerationResult, list[GenerationResult]]:
        """Generate ``max_new_tokens`` after each prompt (a string or a list of strings).

        ``stream(index, token_id, text)`` is called for every new token. ``trace=True`` records,
        for every generated token, the exact token sequence the model attended over and its
        next-token logits (for tests: they must equal a from-scratch forward of that sequence;
        under ``overflow="evict"`` only for a one-layer model, see :class:`GenerationResult`).
        Returns one :class:`GenerationResult` per prompt (a single one for a string prompt).
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
            raise ValueError("prompts must be a non-empty string or list of strings")
        results = self.generate_ids([self.tokenizer.encode(p) for p in prompt_list],
                                    max_new_tokens, do_sample=do_sample, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seed=seed, stop_on_eos=stop_on_eos,
                                    stream=stream, exclude_doc_ids=exclude_doc_ids, trace=trace)
        return results[0] if single else results

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                     do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, seed: Optional[int] = None, stop_on_eos: bool = True,
                     stream: Optional[Callable[[int, int, str], None]] = None,
                     exclude_doc_ids: Optional[Sequence[str]] = None,
                     trace: bool = False) -> list[GenerationResult]:
        """:meth:`generate` for already tokenized prompts (one list of ids per sequence)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        tokens = [list(map(int, t)) for t in prompt_ids]
        if not tokens or any(len(t) == 0 for t in tokens):
            raise ValueError("every prompt must have at least one token")
        return self._run(tokens, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
                         stop_on_eos, stream, exclude_doc_ids, trace)

    def _capacity(self, tokens: list[list[int]], max_new: int) -> int:
        block = self.k * self.passage_tokens + 2 + self.echo_tokens if self.mode != "none" else 0
        need = max(len(t) for t in tokens) + max_new + block + self.stride + 1
        if self.capacity is None:
            return need
        if self.overflow == "evict" and self.mode == "append" and \
                self.capacity - self.sink < self.stride + block:
            # the passage and the tokens decoded after it are rolled back at the next retrieval:
            # eviction must never reach them (nor the sink), so a whole retrieval block must fit
            raise ValueError(f"overflow='evict' needs capacity - sink >= stride + passage block "
                             f"= {self.stride + block} slots, got {self.capacity} - {self.sink}")
        if self.capacity < need and self.overflow == "error":
            raise ValueError(f"the prompt ({max(len(t) for t in tokens)} tokens) plus "
                             f"{max_new} new tokens and a retrieval block need {need} cache slots, "
                             f"capacity is {self.capacity}; raise capacity or use overflow='evict'")
        return self.capacity

    def _run(self, tokens, max_new, do_sample, temperature, top_k, top_p, seed, stop_on_eos,
             stream, exclude_doc_ids, trace) -> list[GenerationResult]:
        start = time.perf_counter()
        cache, decoder = self._cache_for(len(tokens), self._capacity(tokens, max_new))
        compiled_before = decoder is not None and decoder.compile_s > 0
        block_step = decoder.block_step if decoder is not None else None
        block_compiled_before = block_step is not None and block_step.compile_s > 0
        seqs = [SequenceState(list(t), len(t)) for t in tokens]
        timing = Timing()
        sampler = Sampler(do_sample, temperature, top_k, top_p, seed, banned=self.markers or ())

        def forward(step: Step) -> list[Optional[torch.Tensor]]:
            return self._step(step, seqs, cache, decoder, timing, trace)

        passages = self.passages.fetch(seqs, 0, timing, exclude_doc_ids) if self.blocks.retrieves else None
        for step in self.blocks.prompt(seqs, passages):
            logits = forward(step)
        for generated in range(1, max_new + 1):
            for b, s in enumerate(seqs):
                if not s.active:
                    continue
                tok = sampler(logits[b])
                if trace:
                    s.record(logits[b], cache.ring.sink, cache.ring.evicted(b))
                s.tokens.append(tok)
                if stream is not None:
                    stream(b, tok, self.tokenizer.decode([tok]))
                if stop_on_eos and tok in self.eos_ids:
                    s.active, s.finish_reason = False, "eos"
            if not any(s.active for s in seqs) or generated == max_new:
                break
            if self.blocks.retrieves and generated % self.stride == 0:
                passages = self.passages.fetch(seqs, generated, timing, exclude_doc_ids)
                logits = forward(self.blocks.retrieval(seqs, passages, cache.next_positions()))
            else:
                logits = forward(Step("decode", [[s.tokens[-1]] if s.active else [] for s in seqs]))
        if decoder is not None and decoder.compile_s and not compiled_before:
            timing.compile_s = decoder.compile_s  # it ran in the first decode step
            timing.decode_s -= decoder.compile_s
        if block_step is not None and block_step.compile_s and not block_compiled_before:
            timing.compile_s += block_step.compile_s  # it ran in the first retrieval block
            timing.block_s -= block_step.compile_s
        timing.total_s = time.perf_counter() - start
        return [s.result(self.tokenizer, timing) for s in seqs]
