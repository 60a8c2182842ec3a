"""The RALM generation engine: FlashBack append mode, the In-Context RALM prepend baseline, and
plain decoding, on a patched Hugging Face Llama-family model with a :class:`FlashBackCache`.

Every ``stride`` generated tokens the engine retrieves with the last ``query_tokens`` tokens as
the query. What the model then sees, per mode:

* ``append`` (FlashBack): ``context | E | new tokens`` with ``E = <MARK_L> passage <MARK_R>``
  (markers when the tokenizer has them). At a retrieval the cache is rolled back (O(1)) to the end
  of the previous context and ``[tokens since then | E_new]`` is forwarded as ONE block; the
  context's KV cache is never recomputed. With ``echo_tokens=k`` (not in the paper) the block is
  ``[tokens since then | E_new | last k tokens]``: the new tokens follow a copy of the context's
  end that has read the passage (an adapter trained with ``flashback train --echo-tokens k``).
* ``prepend`` (In-Context RALM): ``E | context``, re-encoded from scratch at every retrieval.
* ``none``: the context alone.

Batches of prompts of different lengths run together (right-padded ragged blocks); every
sequence retrieves after the same number of generated tokens.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .cuda_graph import DecodeGraph
from .hf import FlashBackCache, cache_kwarg_name, patch_model

__all__ = ["RALMGenerator", "GenerationResult", "RetrievalRecord", "Timing", "MARK_L", "MARK_R"]

logger = logging.getLogger(__name__)

MARK_L, MARK_R = "<MARK_L>", "<MARK_R>"
MODES = ("append", "prepend", "none")


@dataclass
class RetrievalRecord:
    generated: int  # tokens generated before this retrieval
    query: str
    passage_ids: list[int]
    titles: list[str]
    scores: list[float]


@dataclass
class Timing:
    retrieval_s: float = 0.0  # retriever searches
    prefill_s: float = 0.0  # the prompt before the first retrieval block (append, none)
    block_s: float = 0.0  # retrieval blocks: append blocks / prepend re-encodes
    decode_s: float = 0.0
    total_s: float = 0.0
    decode_steps: int = 0
    graph_steps: int = 0  # decode steps run by the DecodeGraph (CUDA replays; its static step elsewhere)
    retrievals: int = 0
    block_tokens: int = 0  # tokens forwarded in retrieval blocks, the whole batch

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(1, self.decode_steps)

    @property
    def ms_per_block(self) -> float:
        return 1e3 * self.block_s / max(1, self.retrievals)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    retrievals: list[RetrievalRecord]
    timing: Timing  # shared by the whole batch
    finish_reason: str = "length"
    # with trace=True: per generated token, the tokens the cache held (in order) and the logits.
    # Under overflow="evict" the held tokens' deeper-layer keys were computed while evicted
    # tokens were still held, so a forward of the sequence alone matches only a one-layer model.
    trace: list[tuple[list[int], torch.Tensor]] = field(default_factory=list, repr=False)
    # with trace=True: the rotary position of every token of each trace step's sequence
    trace_positions: list[list[int]] = field(default_factory=list, repr=False)


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
            with ``--passage-positions before`` expects, :func:`data.layout_positions`; not in
            the paper). ``"after"``: the paper's contiguous positions.
        use_markers: wrap passages in ``<MARK_L> … <MARK_R>``; default: when the tokenizer has them.
        capacity: cache slots per sequence; default: enough for the prompt, the new tokens and
            one retrieval block.
        overflow, sink: the cache's overflow policy (``"error"`` or ``"evict"``) and pinned tokens.
        cuda_graphs: replay each one-token decode step as a CUDA graph (:mod:`.cuda_graph`);
            default: on when the model is on a CUDA device. The graph and its cache are kept
            between calls of the same batch size (capacity rounded up to 256 slots when not
            given) until :meth:`release_graphs`. ``True`` on the CPU runs the same static step
            eagerly (what the CPU tests check).
    """

    def __init__(self, model, tokenizer, retriever=None, *, mode: str = "append", stride: int = 16,
                 query_tokens: int = 32, passage_tokens: int = 128, k: int = 1,
                 use_markers: Optional[bool] = None, capacity: Optional[int] = None,
                 overflow: str = "error", sink: int = 0,
                 cuda_graphs: Optional[bool] = None, echo_tokens: int = 0,
                 passage_positions: str = "after") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("stride", stride), ("query_tokens", query_tokens),
                            ("passage_tokens", passage_tokens), ("k", k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(echo_tokens, int) or isinstance(echo_tokens, bool) or echo_tokens < 0:
            raise ValueError(f"echo_tokens must be an int >= 0, got {echo_tokens!r}")
        if echo_tokens and mode != "append":
            raise ValueError(f"echo_tokens needs mode='append', got {mode!r}")
        if passage_positions not in ("after", "before"):
            raise ValueError(f"passage_positions must be 'after' or 'before', got {passage_positions!r}")
        if passage_positions == "before" and (mode != "append" or echo_tokens):
            raise ValueError("passage_positions='before' needs mode='append' without echo_tokens")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if mode != "none" and retriever is None:
            raise ValueError(f"mode={mode!r} needs a retriever (or use mode='none')")
        self.model = patch_model(model)
        self.tokenizer, self.retriever, self.mode = tokenizer, retriever, mode
        self.stride, self.query_tokens, self.passage_tokens, self.k = stride, query_tokens, passage_tokens, k
        self.capacity, self.overflow, self.sink = capacity, overflow, sink
        self.echo_tokens = echo_tokens
        vocab = tokenizer.get_vocab()
        has_markers = MARK_L in vocab and MARK_R in vocab
        if use_markers and not has_markers:
            raise ValueError(f"use_markers=True but the tokenizer has no {MARK_L}/{MARK_R} tokens "
                             f"(add them with flashback_ext.marking)")
        self.use_markers = has_markers if use_markers is None else use_markers
        self.markers = (vocab[MARK_L], vocab[MARK_R]) if self.use_markers else None
        if passage_positions == "before" and not self.markers:
            raise ValueError("passage_positions='before' needs the marking tokens (<MARK_R> is "
                             "where the context resumes)")
        self.passage_positions = passage_positions
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._body, self._head = base.model, base.get_output_embeddings()
        self._cache_kw = cache_kwarg_name(self._body)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.eos_ids = self._eos_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
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
                                              self.pad_id)
        dec.cache.reset()
        return dec.cache, dec

    # ------------------------------------------------------------------------------ helpers
    def _eos_ids(self) -> set[int]:
        ids = self.tokenizer.eos_token_id
        ids = ids if isinstance(ids, (list, tuple, set)) else [ids]
        cfg = getattr(self.model, "generation_config", None)
        extra = getattr(cfg, "eos_token_id", None)
        extra = extra if isinstance(extra, (list, tuple, set)) else [extra]
        return {int(i) for i in list(ids) + list(extra) if i is not None}

    def passage_block(self, hits) -> list[int]:
        """Token ids of ``E``: the hits' passages (each cut to ``passage_tokens``), with markers."""
        ids: list[int] = []
        for hit in hits:
            p = hit.passage
            tokens = p.token_ids
            # an index built with another tokenizer: its ids would be garbage for this model
            if not tokens or self.tokenizer.decode(tokens).strip() != p.text:
                tokens = self.tokenizer.encode(p.text, add_special_tokens=False)
            ids += list(tokens[: self.passage_tokens])
        return [self.markers[0], *ids, self.markers[1]] if self.markers else ids

    def _retrieve(self, tokens: list[list[int]], active: list[bool], generated: int,
                  logs: list[list[RetrievalRecord]], exclude_doc_ids) -> list[list[int]]:
        queries = [self.tokenizer.decode(t[-self.query_tokens:], skip_special_tokens=True)
                   for t in tokens]
        excl = None if exclude_doc_ids is None else [list(exclude_doc_ids)] * len(tokens)
        hits = self.retriever.search_batch(queries, self.k, exclude_doc_ids=excl)
        blocks = []
        for b, h in enumerate(hits):
            blocks.append(self.passage_block(h))
            if active[b]:
                logs[b].append(RetrievalRecord(generated, queries[b], [x.passage.id for x in h],
                                               [x.passage.title for x in h], [x.score for x in h]))
        return blocks

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
        weight-major order 5x faster (bench/lm_head_cpu.py); same products, summed in another
        order."""
        head = self._head
        # a plain module only: no peft wrapper, no bias, and no accelerate hook that would move
        # an offloaded weight in on forward (its weight here may be on "meta")
        if (last.device.type == "cpu" and last.dtype == torch.float32 and last.shape[0] > 1
                and type(head) is torch.nn.Linear and head.bias is None
                and head.weight.device == last.device and not hasattr(head, "_hf_hook")):
            return (head.weight @ last.T).T
        return head(last)

    @staticmethod
    def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
                top_p: float, gen: Optional[torch.Generator]) -> int:
        if not do_sample:
            return int(torch.argmax(logits))
        logits = logits / max(temperature, 1e-5)
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
            keep[0] = True  # the most likely token always survives (also for top_p <= 0)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))

    def _before_positions(self, start: int, n_context: int, n_e: int) -> tuple[list[int], int]:
        """``passage_positions="before"``: rotary positions of a ``[n_context context tokens | E]``
        block whose first token takes cache slot ``start`` (``E`` = ``<MARK_L> e <MARK_R>``, ``n_e``
        tokens), and the shift (slot - rotary position) of every token after it. ``<MARK_L> e``
        sit just before the context's first token (position 0), ``<MARK_R>`` right after its
        last, as in :func:`data.layout_positions`."""
        end = start + n_context  # the context's length: <MARK_R>'s rotary position
        return list(range(start, end)) + list(range(-(n_e - 1), 0)) + [end], n_e - 1

    @staticmethod
    def _held(cache: FlashBackCache, b: int, items: list) -> list:
        """The entries of a per-token list (the tokens written since the reset and not rolled
        back, in cache order) that sequence ``b``'s cache still holds: eviction drops the oldest
        non-sink ones."""
        sink = cache.ring.sink
        return items[:sink] + items[sink + cache.ring.evicted(b):]

    def _echo(self, context: Sequence[int]) -> list[int]:
        """The context's last ``echo_tokens`` tokens, repeated after the passage."""
        return list(context[-self.echo_tokens:]) if self.echo_tokens else []

    @torch.no_grad()
    def score(self, src: Sequence[int], passage: Sequence[int], tgt: Sequence[int],
              exclude_ids: Sequence[int] = ()) -> list[float]:
        """Log-probabilities of ``tgt`` after ``src | E`` computed the append-mode way: prefill,
        one ``[last stride of src | E | echo]`` block, then teacher-forced one-token steps on the
        cache.
        ``exclude_ids`` (the markers) are left out of the softmax."""
        if not src or not tgt:
            raise ValueError("score needs a non-empty src and tgt")
        e = [self.markers[0], *passage, self.markers[1]] if self.markers else list(passage)
        e += self._echo(src)
        cache = FlashBackCache.for_model(self.model, 1, len(src) + len(e) + len(tgt) + 1)
        split = len(src) - min(self.stride, len(src))
        if split > 0:
            self._forward(cache, [list(src[:split])])
        rope, shift = None, 0
        if self.passage_positions == "before":
            pos, shift = self._before_positions(max(split, 0), len(src) - max(split, 0), len(e))
            rope = [pos]
        logits = self._forward(cache, [list(src[split:]) + e], rope)[0]
        logps = []
        for i, tok in enumerate(tgt):
            if exclude_ids:
                logits = logits.clone()
                logits[list(exclude_ids)] = float("-inf")
            logps.append(float(torch.log_softmax(logits.float(), -1)[tok]))
            if i + 1 < len(tgt):
                rope = [[cache.next_positions()[0] - shift]] if shift else None
                logits = self._forward(cache, [[int(tok)]], rope)[0]
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
        start_all = time.perf_counter()
        batch = len(tokens)
        prompt_lens = [len(t) for t in tokens]
        cache, decoder = self._cache_for(batch, self._capacity(tokens, max_new))
        timing = Timing()
        logs: list[list[RetrievalRecord]] = [[] for _ in range(batch)]
        traces: list[list] = [[] for _ in range(batch)]
        trace_positions: list[list[list[int]]] = [[] for _ in range(batch)]
        views: list[list[int]] = [[] for _ in range(batch)]  # what each cache holds, in order
        rope_views: list[list[int]] = [[] for _ in range(batch)]  # and at which positions (trace)
        # slot - rotary position of the tokens after <MARK_R> (passage_positions "before"; else 0)
        shift = [0] * batch
        active = [True] * batch
        finish = ["length"] * batch
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ctx = [0] * batch  # end (absolute position) of the committed context, append mode

        def run_block(blocks: list[list[int]], reset: bool, kind: str = "block",
                      rope: Optional[list[list[int]]] = None) -> list:
            """Forward ragged blocks, keep ``views`` in step, time it as prefill/block/decode.
            ``rope``: rotary positions of the block tokens (default: slot - ``shift``)."""
            t0 = time.perf_counter()
            if reset:
                cache.reset()
            explicit = rope is not None or any(shift)
            if rope is None and (explicit or trace):  # else the cache's slots, nothing to build
                rope = [[s - shift[b] + i for i in range(len(block))]
                        for b, (s, block) in enumerate(zip(cache.next_positions(), blocks))]
            for b, block in enumerate(blocks):
                views[b] = ([] if reset else views[b]) + block
                if trace:  # the positions are kept for the trace only
                    rope_views[b] = ([] if reset else rope_views[b]) + rope[b]
            counts = [len(block) for block in blocks]
            if kind == "block":
                timing.block_tokens += sum(counts)
            if kind == "decode" and decoder is not None and decoder.fits(counts):
                out = decoder.step([block[0] if block else None for block in blocks],
                                   shift if any(shift) else None)
                logits = [out[b] if counts[b] else None for b in range(batch)]
                timing.graph_steps += 1
            else:
                logits = self._forward(cache, blocks, rope if explicit else None)
            if self.device.type == "cuda":  # the sampler waits for the logits anyway: time them
                torch.cuda.synchronize(self.device)
            setattr(timing, f"{kind}_s", getattr(timing, f"{kind}_s") + time.perf_counter() - t0)
            return logits

        def append_block(passages: list[list[int]]) -> list:
            """``[tokens since ctx | E | echo]`` for every active sequence, whose cache ends at
            ``ctx``; with passage_positions "before", at the rotary positions it needs."""
            blocks = [tokens[b][ctx[b]:] + passages[b] + self._echo(tokens[b]) if active[b] else []
                      for b in range(batch)]
            rope = None
            if self.passage_positions == "before":
                rope = []
                for b in range(batch):
                    pos: list[int] = []
                    if active[b]:
                        pos, shift[b] = self._before_positions(ctx[b], len(tokens[b]) - ctx[b],
                                                               len(passages[b]))
                    rope.append(pos)
            return run_block(blocks, reset=False, rope=rope)

        def retrieval_blocks(generated: int) -> list[list[int]]:
            t0 = time.perf_counter()
            blocks = self._retrieve(tokens, active, generated, logs, exclude_doc_ids)
            timing.retrieval_s += time.perf_counter() - t0
            timing.retrievals += 1
            return blocks

        # first forward: the prompt (with the first retrieval unless mode == "none")
        if self.mode == "none":
            logits = run_block([list(t) for t in tokens], reset=True, kind="prefill")
        elif self.mode == "prepend":
            passages = retrieval_blocks(0)
            logits = run_block([p + t for p, t in zip(passages, tokens)], reset=True)
        else:  # append: prefill all but the last stride, then [last stride | E] as one block
            ctx = [max(0, n - self.stride) for n in prompt_lens]
            run_block([t[:c] for t, c in zip(tokens, ctx)], reset=True, kind="prefill")
            logits = append_block(retrieval_blocks(0))
            ctx = prompt_lens[:]
        pending: list[Optional[int]] = [None] * batch  # sampled, not yet forwarded

        for step in range(max_new):
            for b in range(batch):
                if not active[b]:
                    continue
                row = logits[b]
                if self.markers:  # markers are layout, never text: never generate one
                    row = row.clone()
                    row[list(self.markers)] = float("-inf")
                tok = self._sample(row, do_sample, temperature, top_k, top_p, gen)
                if trace:  # what the cache holds: evicted tokens left the view
                    traces[b].append((self._held(cache, b, views[b]), logits[b].detach().cpu()))
                    trace_positions[b].append(self._held(cache, b, rope_views[b]))
                tokens[b].append(tok)
                pending[b] = tok
                if stream is not None:
                    stream(b, tok, self.tokenizer.decode([tok]))
                if stop_on_eos and tok in self.eos_ids:
                    active[b], finish[b], pending[b] = False, "eos", None
            if not any(active) or step == max_new - 1:
                break
            generated = step + 1
            if self.mode != "none" and generated % self.stride == 0:
                passages = retrieval_blocks(generated)
                if self.mode == "prepend":
                    blocks = [p + t if active[b] else [] for b, (p, t) in enumerate(zip(passages, tokens))]
                    logits = run_block(blocks, reset=True)
                else:
                    # roll back to the end of the previous context, then [new tokens | E_new | echo]
                    back = [pos - c for pos, c in zip(cache.next_positions(), ctx)]
                    cache.rollback(back)
                    for b in range(batch):
                        views[b] = views[b][: len(views[b]) - back[b]]
                        rope_views[b] = rope_views[b][: len(rope_views[b]) - back[b]]
                    logits = append_block(passages)
                    ctx = [len(t) if active[b] else ctx[b] for b, t in enumerate(tokens)]
            else:
                blocks = [[pending[b]] if active[b] else [] for b in range(batch)]
                logits = run_block(blocks, reset=False, kind="decode")
                timing.decode_steps += 1
            pending = [None] * batch
        timing.total_s = time.perf_counter() - start_all
        results = []
        for b in range(batch):
            new = tokens[b][prompt_lens[b]:]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            results.append(GenerationResult(text, new, prompt_lens[b], logs[b], timing, finish[b],
                                            traces[b], trace_positions[b]))
        return results
