"""FlashBack on vLLM: the RALM loop of :class:`~flashback_ext.engine.generator.RALMGenerator`
driven against a serving engine with automatic prefix caching.

Every retrieval cycle is one request per sequence, built as token ids by the same layout:

* append (FlashBack): ``context | E | echo``; the next cycle's context is this one's plus the
  ``stride`` tokens generated after ``E``, so its prompt begins with this cycle's context and
  the engine's prefix cache serves those tokens' KV (whole cache blocks of them);
* prepend (In-Context RALM): ``E | context``; ``E`` changes every cycle, so nothing is reused;
* none: the prompt alone, one request.

The engine runs a :func:`~flashback_ext.pipeline.export.export_merged` checkpoint (vLLM cannot
load the unmerged adapter). Batches of prompts go as concurrent requests; the markers are never
sampled; results are the HF engine's :class:`GenerationResult` objects, with the prefix-cache
hits of every cycle in its retrieval records.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..engine.passages import PassageFetcher, check_loop_settings, markers_to_use
from ..engine.results import GenerationResult, Timing
from ..engine.sampling import eos_token_ids
from ..engine.sequence import SequenceState
from ..layout import MARK_L, MARK_R, Layout
from .transports import EngineError, InProcessTransport, Sampling, ServerTransport

__all__ = ["VLLMGenerator", "EngineError"]

MODES = ("append", "prepend", "none")


def _eos_ids(tokenizer, folder: Optional[Path]) -> set[int]:
    """The tokenizer's EOS and the checkpoint's generation_config EOS ids (what HF stops on)."""
    path = None if folder is None else folder / "generation_config.json"
    config = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    return eos_token_ids(tokenizer.eos_token_id, config.get("eos_token_id"))


def _request_seed(seed: int, cycle: int, index: int) -> int:
    """A request's sampling seed: its own stream per (seed, cycle, sequence), in int63."""
    digest = hashlib.sha256(f"{seed}:{cycle}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class VLLMGenerator:
    """Retrieval-augmented generation on a vLLM engine (or any OpenAI-compatible server).

    Args:
        transport: :class:`InProcessTransport` (vLLM's ``LLM`` in this process) or
            :class:`ServerTransport` (a server's URL); see :meth:`from_export`.
        tokenizer: the served checkpoint's tokenizer (it builds the token ids of every prompt).
        retriever, mode, stride, query_tokens, passage_tokens, k, use_markers, echo_tokens: as
            for :class:`RALMGenerator`. Passage positions "before" are not available: the
            engine numbers positions by slot.
        eos_ids: tokens that end a sequence (default: the tokenizer's EOS).
    """

    def __init__(self, transport, tokenizer, retriever=None, *, mode: str = "append",
                 stride: int = 16, query_tokens: int = 32, passage_tokens: int = 128, k: int = 1,
                 use_markers: Optional[bool] = None, echo_tokens: int = 0,
                 eos_ids: Optional[set[int]] = None) -> None:
        check_loop_settings(mode, MODES, retriever, stride=stride, query_tokens=query_tokens,
                            passage_tokens=passage_tokens, k=k)
        self.markers = markers_to_use(tokenizer, use_markers, "serve a `flashback export` checkpoint")
        self.use_markers = self.markers is not None
        self.layout = Layout(mode, self.markers, echo_tokens if mode == "append" else 0)
        self.transport, self.tokenizer, self.retriever, self.mode = transport, tokenizer, retriever, mode
        self.stride, self.query_tokens, self.passage_tokens, self.k = stride, query_tokens, passage_tokens, k
        self.echo_tokens = self.layout.echo
        self.passages = PassageFetcher(tokenizer, retriever, self.layout, k=k,
                                       query_tokens=query_tokens, passage_tokens=passage_tokens)
        self.eos_ids = set(eos_ids) if eos_ids is not None else _eos_ids(tokenizer, None)
        if self.markers and isinstance(transport, ServerTransport):
            self._check_served_markers()

    def _check_served_markers(self) -> None:
        """The server must serve this tokenizer's checkpoint: its markers, the same ids."""
        try:
            served = [self.transport.tokenize(m) for m in (MARK_L, MARK_R)]
        except EngineError as exc:
            if "HTTP 404" in str(exc):  # a server without /tokenize (not vLLM): cannot check
                return
            raise
        if served != [[self.markers[0]], [self.markers[1]]]:
            raise EngineError(f"the server at {self.transport.base} serves {self.transport.model!r}, "
                              f"whose tokenizer maps {MARK_L}/{MARK_R} to {served}, not to this "
                              f"export's ids {list(self.markers)}: it serves another model")

    @classmethod
    def from_export(cls, folder, retriever=None, *, server: Optional[str] = None, transport=None,
                    mode: str = "append", tokenizer=None, **overrides) -> "VLLMGenerator":
        """The driver for an exported checkpoint: its tokenizer, its ``flashback.json`` settings
        (stride, query and passage lengths, echo; ``overrides`` win), and a transport: the given
        one, a :class:`ServerTransport` to ``server``, else vLLM in this process. ``tokenizer``:
        the export's, when already loaded."""
        from transformers import AutoTokenizer

        from ..pipeline.export import read_export

        folder = Path(folder).expanduser()
        settings = read_export(folder)  # raises for an unmerged adapter or a plain folder
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
        ids = settings.get("marker_ids")
        if ids and [tokenizer.convert_tokens_to_ids(m) for m in (MARK_L, MARK_R)] != list(ids):
            raise EngineError(f"{folder}: the tokenizer's marker ids differ from flashback.json's "
                              f"{ids} (a corrupt export)")
        kwargs = {name: settings[name] for name in ("stride", "query_tokens", "passage_tokens")
                  if settings.get(name)}
        if mode == "append":
            kwargs["echo_tokens"] = int(settings.get("echo_tokens") or 0)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        if transport is None:
            transport = ServerTransport(server) if server else InProcessTransport(folder)
        return cls(transport, tokenizer, retriever, mode=mode,
                   eos_ids=_eos_ids(tokenizer, folder), **kwargs)

    # ----------------------------------------------------------------------------- generate
    def generate(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 64, **kwargs
                 ) -> Union[GenerationResult, list[GenerationResult]]:
        """Generate ``max_new_tokens`` after each prompt (a string or a list of strings); the
        keyword arguments are :meth:`generate_ids`'s."""
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
            raise ValueError("prompts must be a non-empty string or list of strings")
        results = self.generate_ids([self.tokenizer.encode(p) for p in prompt_list],
                                    max_new_tokens, **kwargs)
        return results[0] if single else results

    def _request(self, s: SequenceState, e: list[int]) -> list[int]:
        """The prompt of one cycle's request: the layout's tokens for this context and ``E``."""
        if self.mode == "append":
            return s.tokens + e + self.layout.echo_of(s.tokens)
        return e + s.tokens if self.mode == "prepend" else list(s.tokens)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                     do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, seed: Optional[int] = None, stop_on_eos: bool = True,
                     stream: Optional[Callable[[int, int, str], None]] = None,
                     exclude_doc_ids: Optional[Sequence[str]] = None) -> list[GenerationResult]:
        """:meth:`generate` for already tokenized prompts. ``stream(index, token_id, text)`` is
        called for every new token, a cycle's tokens at once."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        tokens = [list(map(int, t)) for t in prompt_ids]
        if not tokens or any(len(t) == 0 for t in tokens):
            raise ValueError("every prompt must have at least one token")
        start = time.perf_counter()
        seqs = [SequenceState(t, len(t)) for t in tokens]
        timing = Timing()
        retrieves = self.mode != "none"
        generated, cycle = 0, 0
        while generated < max_new_tokens and any(s.active for s in seqs):
            n = min(self.stride, max_new_tokens - generated) if retrieves else max_new_tokens
            live = [b for b, s in enumerate(seqs) if s.active]
            passages = (self.passages.fetch(seqs, generated, timing, exclude_doc_ids)
                        if retrieves else [[] for _ in seqs])
            for b in live if retrieves else ():
                if not seqs[b].retrievals[-1].passage_ids:
                    raise ValueError(f"the retriever returned no passage for prompt {b} (query "
                                     f"{seqs[b].retrievals[-1].query[-60:]!r}): an empty index, "
                                     f"or every document excluded")
            requests = [self._request(seqs[b], passages[b]) for b in live]
            sampling = Sampling(n, greedy=not do_sample, temperature=temperature, top_k=top_k,
                                top_p=top_p,
                                seeds=None if seed is None else
                                [_request_seed(seed, cycle, b) for b in live],
                                stop_token_ids=sorted(self.eos_ids) if stop_on_eos else [],
                                banned=list(self.markers or ()))
            t0 = time.perf_counter()
            outs = self.transport.complete(requests, sampling)
            timing.engine_cycle_s.append(time.perf_counter() - t0)
            timing.engine_s += timing.engine_cycle_s[-1]
            timing.prompt_tokens_sent += sum(map(len, requests))
            for b, out in zip(live, outs):
                self._take(seqs[b], b, out, n, stop_on_eos, stream, retrieves, timing)
            generated += n
            cycle += 1
        timing.decode_steps = generated
        timing.total_s = time.perf_counter() - start
        return [s.result(self.tokenizer, timing) for s in seqs]

    def _take(self, s: SequenceState, b: int, out, n: int, stop_on_eos: bool, stream,
              retrieves: bool, timing: Timing) -> None:
        """Append one request's new tokens to its sequence and note its prefix-cache hits."""
        new = [int(t) for t in out.token_ids[:n]]
        if len(new) < n and not (stop_on_eos and new and new[-1] in self.eos_ids):
            raise EngineError(f"the engine returned {len(new)} of {n} tokens for prompt {b} "
                              f"(finish reason {out.finish_reason!r}) without an EOS")
        if self.markers and set(new) & set(self.markers):
            raise EngineError(f"the engine sampled a marking token for prompt {b} although it "
                              f"was banned (logit_bias ignored?)")
        s.tokens += new
        if out.cached_tokens is not None:
            timing.cached_tokens += out.cached_tokens
            timing.cached_reported = True
            if retrieves:
                s.retrievals[-1].cached_tokens = out.cached_tokens
        if stream is not None:
            for tok in new:
                stream(b, tok, self.tokenizer.decode([tok]))
        if stop_on_eos and new and new[-1] in self.eos_ids:
            s.active, s.finish_reason = False, "eos"
