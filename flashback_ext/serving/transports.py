"""How the vLLM driver reaches an engine: vLLM's in-process ``LLM``, or any OpenAI-compatible
completions server (``python -m vllm.entrypoints.openai.api_server --model DIR
--enable-prefix-caching --enable-prompt-tokens-details``).

Both take prompts as token ids (so that the engine's prefix cache sees exactly the tokens the
layout built: no re-tokenization) and return the new token ids, why the request ended and how
many prompt tokens the prefix cache served.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["Sampling", "Completion", "EngineError", "InProcessTransport", "ServerTransport"]


class EngineError(RuntimeError):
    """The serving engine is unreachable, refused a request or answered something unusable."""


@dataclass
class Sampling:
    """One cycle's sampling settings, the same for every request of the batch."""

    max_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seeds: Optional[list[int]] = None  # one per request (sampling only)
    stop_token_ids: list[int] = field(default_factory=list)  # empty: never stop early
    banned: list[int] = field(default_factory=list)  # never sampled (the markers)


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "length" or "stop" (a stop token, which token_ids ends with)
    cached_tokens: Optional[int]  # prompt tokens served by the prefix cache (None: not reported)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# a logit bias of -100 is the most OpenAI's API accepts; far below any real logit gap
_BAN = -100.0


class InProcessTransport:
    """vLLM's offline ``LLM`` in this process (needs ``vllm`` importable: ``make vllm-env``).

    ``model`` is a checkpoint folder (a ``flashback export``); ``llm_kwargs`` go to
    ``vllm.LLM`` (prefix caching is always on: it is what makes the append layout cheap)."""

    name = "vllm"

    def __init__(self, model, *, dtype: str = "float32", max_model_len: int = 4096,
                 enforce_eager: bool = True, **llm_kwargs) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(f"vllm is not importable here ({exc}); run the driver with the vLLM "
                              f"environment's python (`make vllm-env`, then .venv-vllm/bin/python), "
                              f"or serve the model and pass its URL (ServerTransport)") from None
        self._vllm = vllm
        self.model = str(Path(model).expanduser())
        try:
            self.llm = vllm.LLM(model=self.model, tokenizer=self.model, dtype=dtype,
                                max_model_len=max_model_len, enable_prefix_caching=True,
                                enforce_eager=enforce_eager, **llm_kwargs)
        except Exception as exc:  # vLLM's own errors are not ValueErrors: one clear type
            raise EngineError(f"vLLM could not load {self.model}: {_first_line(exc)}") from exc

    def _params(self, sampling: Sampling, index: int):
        return self._vllm.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else 0,
            top_p=sampling.top_p if not sampling.greedy else 1.0,
            seed=None if sampling.seeds is None else sampling.seeds[index],
            # only the driver's stop ids end a request (vLLM would add the model's EOS ids)
            stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True,
            logit_bias={int(t): _BAN for t in sampling.banned} or None,
            detokenize=False)

    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[Completion]:
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        try:
            params = [self._params(sampling, i) for i in range(len(prompts))]
            outs = self.llm.generate(requests, params, use_tqdm=False)
        except Exception as exc:  # e.g. a prompt over max_model_len, temperature out of range
            raise EngineError(f"vLLM refused the request: {_first_line(exc)}") from exc
        return [Completion(list(o.outputs[0].token_ids), o.outputs[0].finish_reason or "length",
                           o.num_cached_tokens) for o in outs]


class ServerTransport:
    """An OpenAI-compatible completions server at ``url`` (``http://host:port``, with or without
    ``/v1``): vLLM's ``vllm serve``, or SGLang's server. The batch's requests go concurrently.

    Prompts are sent as token ids; the new token ids come back from vLLM's ``return_token_ids``.
    ``cached_tokens`` needs the server started with ``--enable-prompt-tokens-details`` (else
    None: not reported)."""

    name = "server"

    def __init__(self, url: str, *, model: Optional[str] = None, timeout: float = 300.0,
                 max_concurrency: int = 64) -> None:
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.timeout, self.max_concurrency = timeout, max_concurrency
        models = self._call("GET", "/v1/models", timeout=min(timeout, 10.0)).get("data") or []
        if not models:
            raise EngineError(f"the server at {self.base} serves no model")
        names = [m.get("id") for m in models]
        if model is not None and model not in names:
            raise EngineError(f"the server at {self.base} serves {names}, not {model!r}")
        self.model = model or names[0]
        self.model_info = next(m for m in models if m.get("id") == self.model)

    def _call(self, method: str, path: str, body: Optional[dict] = None,
              timeout: Optional[float] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            try:
                detail = json.loads(detail).get("error", {}).get("message", detail)
            except (ValueError, AttributeError):
                pass
            raise EngineError(f"{method} {self.base}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EngineError(f"{method} {self.base}{path}: the server is unreachable ({reason})"
                              ) from None
        except ValueError as exc:
            raise EngineError(f"{method} {self.base}{path}: not a JSON answer ({exc})") from None

    def tokenize(self, text: str) -> list[int]:
        """The served tokenizer's ids of ``text`` (vLLM's ``/tokenize``), special tokens off."""
        out = self._call("POST", "/tokenize", {"model": self.model, "prompt": text,
                                               "add_special_tokens": False})
        return list(out["tokens"])

    def health(self) -> bool:
        try:
            req = urllib.request.Request(self.base + "/health")
            with urllib.request.urlopen(req, timeout=5.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _body(self, prompt: Sequence[int], sampling: Sampling, index: int) -> dict:
        body = {"model": self.model, "prompt": [int(t) for t in prompt],
                "max_tokens": sampling.max_tokens, "return_token_ids": True,
                "temperature": 0.0 if sampling.greedy else sampling.temperature,
                # only the driver's stop ids end a request (vLLM would add the model's EOS ids)
                "stop_token_ids": list(sampling.stop_token_ids), "ignore_eos": True,
                "skip_special_tokens": False,
                # explicit, else the server fills them from the model's generation_config.json
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "min_p": 0.0}
        if not sampling.greedy:
            body.update(top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
        if sampling.seeds is not None:
            body["seed"] = sampling.seeds[index]
        if sampling.banned:
            body["logit_bias"] = {str(int(t)): _BAN for t in sampling.banned}
        return body

    def _one(self, args) -> Completion:
        prompt, sampling, index = args
        out = self._call("POST", "/v1/completions", self._body(prompt, sampling, index))
        try:
            choice = out["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise EngineError(f"POST {self.base}/v1/completions: no choices in {str(out)[:200]}"
                              ) from None
        ids = choice.get("token_ids")
        if ids is None:
            raise EngineError(f"the server at {self.base} returned no token ids (vLLM's "
                              f"return_token_ids); the driver needs the exact ids to extend the "
                              f"prompt without re-tokenizing")
        details = (out.get("usage") or {}).get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens")
        return Completion(list(ids), choice.get("finish_reason") or "length", cached)

    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[Completion]:
        jobs = [(p, sampling, i) for i, p in enumerate(prompts)]
        if len(jobs) == 1:
            return [self._one(jobs[0])]
        with ThreadPoolExecutor(min(len(jobs), self.max_concurrency)) as pool:
            return list(pool.map(self._one, jobs))
