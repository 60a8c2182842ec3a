"""What the ``flashback`` commands share: model, retriever and engine options, loading them,
and the one-line error every user mistake becomes."""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Optional

__all__ = ["CliError", "DEFAULT_PASSAGE_TOKENS", "as_prompt", "add_model_args",
           "add_retrieval_args", "add_engine_args", "add_adapter_arg", "add_dtype_arg", "load_base",
           "process_device", "is_main_process", "adapter_path", "settle_passage_tokens",
           "append_model", "make_retriever", "make_generator", "guarded", "print_answers",
           "print_retrievals",
           "describe_device"]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


DEFAULT_PASSAGE_TOKENS = 128


def as_prompt(tokenizer, question: str) -> str:
    """The tokenizer's chat template when it has one (instruct models), else Q/A text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="a local Hugging Face Llama-family folder, or 'default' (SmolLM2-135M)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="default",
                   help="a .txt file, a folder of .txt/.md files, a .jsonl with title/text, or "
                        "'default' (the Python language reference shipped with CPython)")
    p.add_argument("--index", default=None, help="a saved index folder (overrides --corpus)")
    p.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stride", type=int, default=16, help="generated tokens between retrievals")
    p.add_argument("--query-tokens", type=int, default=32)
    p.add_argument("--passage-tokens", type=int, default=None,
                   help="tokens kept of each passage (default: the length the append adapter was "
                        f"trained on, else {DEFAULT_PASSAGE_TOKENS})")
    p.add_argument("--k", type=int, default=1, help="passages per retrieval")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-markers", action="store_true", help="never wrap passages in markers")
    p.add_argument("--echo-tokens", type=int, default=None, metavar="K",
                   help="append mode: repeat the context's last K tokens after each passage "
                        "(default: what the append adapter was trained with, else 0)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: run the decode step compiled by torch.compile (compiling takes "
                        "tens of seconds per engine and batch size; decoding is faster after)")
    p.add_argument("--capacity", type=int, default=None, help="cache slots per sequence")
    p.add_argument("--overflow", choices=["error", "evict"], default="error")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", dest="model_dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (default auto: bf16 on CUDA and on CPUs with AMX or "
                        "AVX512-BF16, fp32 elsewhere)")


def load_base(args):
    import torch

    from ..engine.models import load_model, resolve_dtype

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda but no CUDA device is visible")
    device = process_device(device, torch.cuda.is_available())
    # commands without --dtype (train, eval, export) load as load_model does: fp32 on the CPU
    choice = getattr(args, "model_dtype", None)
    dtype = None if choice is None else resolve_dtype(
        choice, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return load_model(args.model, device=device, dtype=dtype)
    except (FileNotFoundError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def process_device(device: Optional[str], cuda: bool) -> Optional[str]:
    """Under ``torchrun``/``accelerate launch`` each process loads onto its own GPU (LOCAL_RANK);
    plain ``cuda`` would put every process's copy of the model on GPU 0 first."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and cuda and device in (None, "cuda"):
        return f"cuda:{int(local_rank)}"
    return device


def is_main_process() -> bool:
    """Rank 0, or not launched by ``torchrun``/``accelerate launch``: the process that reports."""
    return int(os.environ.get("RANK", "0")) == 0


def add_adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default="auto",
                   help="FlashBack adapter for append mode: a folder, 'none', or 'auto' (the "
                        "adapter shipped for the default model, when there is one)")


def adapter_path(args, use: str = "engine") -> Optional[Path]:
    """The append-mode adapter: ``--adapter``, or for 'auto' the one shipped for the default
    model for that ``use`` (``"export"``: the paper-layout one a merged checkpoint needs)."""
    from ..engine.models import DEFAULT_MODEL, default_adapter_path

    path = args.adapter
    if path == "auto":
        path = default_adapter_path(use) if str(args.model) == DEFAULT_MODEL else None
    return None if path in (None, "none") else Path(path)


def settle_passage_tokens(args, adapter: Optional[Path]) -> None:
    """``--passage-tokens`` defaults to the longest passage the adapter was trained on: it learned
    to resume the context after passages up to that long, and any shorter one is fine; a longer
    one gets a warning (an adapter trained on 64-token passages scores about 2x the no-retrieval
    perplexity after 128-token ones: docs/RESULTS.md). ``--echo-tokens`` defaults to the adapter's
    context echo: its layout, not a tuning knob; so are its passage positions
    (``--passage-positions`` of ``flashback train``), which are taken as they are."""
    from ..pipeline.adapter_io import AdapterError, adapter_layout

    trained: dict = {}
    if adapter is not None:
        try:
            trained = adapter_layout(adapter)
        except AdapterError:
            pass  # loading the adapter reports it
    echo = trained.get("echo_tokens", 0)
    args.passage_positions = trained.get("passage_positions", "after")
    if getattr(args, "echo_tokens", None) is None:
        args.echo_tokens = echo
    elif adapter is not None and args.echo_tokens != echo:
        print(f"note: the adapter was trained with a {echo}-token context echo; --echo-tokens "
              f"{args.echo_tokens} is a layout it has not seen", file=sys.stderr)
    longest = trained.get("passage_tokens")
    if args.passage_tokens is None:
        args.passage_tokens = longest or DEFAULT_PASSAGE_TOKENS
    elif longest and args.passage_tokens > longest:
        print(f"warning: the adapter was trained on passages of at most {longest} tokens; with "
              f"--passage-tokens {args.passage_tokens} it must resume the context after longer "
              "ones than it has seen, and quality can drop far (docs/RESULTS.md)",
              file=sys.stderr)


def append_model(args, model, tokenizer):
    """``(model, tokenizer, description)`` for append mode: the adapter merged in, if any."""
    from ..pipeline.adapter_io import AdapterError, load_adapter

    path = adapter_path(args)
    if path is None:
        return model, tokenizer, "no adapter"
    fresh, fresh_tok = load_base(args)
    try:
        tuned, tuned_tok = load_adapter(fresh, path, fresh_tok, merge=True)
    except AdapterError as exc:
        raise CliError(str(exc)) from None
    return tuned, tuned_tok, f"FlashBack adapter {path}"


def corpus_key(corpus: str, tokenizer, kind: str, passage_tokens: int) -> str:
    ident = f"{corpus}|{kind}|{passage_tokens}|{tokenizer.name_or_path}|{len(tokenizer)}"
    if corpus != "default":
        p = Path(corpus).expanduser()
        if p.exists():
            stamp = max((f.stat().st_mtime for f in ([p] if p.is_file() else p.rglob("*"))),
                        default=0)
            ident += f"|{p.resolve()}|{stamp}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def make_retriever(args, tokenizer):
    """Load --index, or build (and cache) an index of --corpus for this tokenizer."""
    from ..engine.models import cache_dir
    from ..engine.retrieval import Corpus, RetrievalError, build_index, load_index

    try:
        if args.index:
            return load_index(args.index)
        folder = cache_dir() / "indexes" / corpus_key(args.corpus, tokenizer, args.retriever,
                                                       args.passage_tokens)
        if (folder / "meta.json").exists():
            try:
                return load_index(folder)
            except RetrievalError:
                logging.getLogger(__name__).warning("rebuilding the corrupt cached index %s", folder)
        if args.corpus == "default":
            corpus = Corpus.default(tokenizer, args.passage_tokens)
        else:
            corpus = Corpus.from_path(args.corpus, tokenizer, args.passage_tokens)
        retriever = build_index(corpus, args.retriever)
        retriever.save(folder)
        return retriever
    except (RetrievalError, ValueError) as exc:
        raise CliError(str(exc)) from None


def make_generator(args, model, tokenizer, retriever, mode: str):
    from ..engine.generator import RALMGenerator

    try:
        return RALMGenerator(model, tokenizer, retriever, mode=mode, stride=args.stride,
                             query_tokens=args.query_tokens, passage_tokens=args.passage_tokens,
                             k=args.k, use_markers=False if args.no_markers else None,
                             capacity=args.capacity, overflow=args.overflow,
                             compile=getattr(args, "compile", False),
                             echo_tokens=(args.echo_tokens or 0) if mode == "append" else 0,
                             passage_positions=(getattr(args, "passage_positions", "after")
                                                if mode == "append" else "after"))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def guarded(run):
    """Run a generation; user-caused failures become one-line errors."""
    from ..ops.ring_cache import CacheOverflowError

    try:
        return run()
    except (ValueError, CacheOverflowError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def print_retrievals(result) -> None:
    """One stderr line per retrieval of a result (with the prefix-cache hits where known)."""
    for rec in result.retrievals:
        print(f"  [retrieval after {rec.generated} tokens] query={rec.query[-60:]!r} -> "
              + ", ".join(f"#{pid} {t} ({s:.2f})" for pid, t, s in
                          zip(rec.passage_ids, rec.titles, rec.scores))
              + ("" if rec.cached_tokens is None else
                 f" | prefix cache served {rec.cached_tokens} tokens"), file=sys.stderr)


def print_answers(questions, results) -> None:
    """The demo's answers: each question, then each mode's text and its passages' titles."""
    for i, q in enumerate(questions):
        print("\n" + "=" * 78)
        print(q)
        for mode in ("append", "prepend"):
            r = results[mode][i]
            titles = ", ".join(dict.fromkeys(t for rec in r.retrievals for t in rec.titles))
            print(f"--- {mode} (passages from: {titles})")
            print(r.text.strip())
    print("\n" + "=" * 78)


def describe_device(model) -> str:
    import torch

    param = next(model.parameters())
    where = torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    return f"{param.dtype} on {where}"
