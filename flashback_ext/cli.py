"""The ``flashback`` command line: ``demo`` (the main job), ``generate`` and ``index build|search``.

Everything runs offline on the embedded defaults: the SmolLM2-135M-Instruct model and the
Python language reference shipped with CPython as the retrieval corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]

DEMO_QUESTIONS = [
    "What does the yield statement do in a Python function?",
    "How do you write a lambda expression in Python?",
    "What happens to the else clause of a for loop in Python?",
]


def as_prompt(tokenizer, question: str) -> str:
    """The tokenizer's chat template when it has one (instruct models), else Q/A text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


DEFAULT_PASSAGE_TOKENS = 128


# ------------------------------------------------------------------------------------ shared
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="a local Hugging Face Llama-family folder, or 'default' (SmolLM2-135M)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def _add_retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="default",
                   help="a .txt file, a folder of .txt/.md files, a .jsonl with title/text, or "
                        "'default' (the Python language reference shipped with CPython)")
    p.add_argument("--index", default=None, help="a saved index folder (overrides --corpus)")
    p.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--capacity", type=int, default=None, help="cache slots per sequence")
    p.add_argument("--overflow", choices=["error", "evict"], default="error")


def _load(args):
    import torch

    from .models import load_model

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda but no CUDA device is visible")
    device = _process_device(device, torch.cuda.is_available())
    try:
        return load_model(args.model, device=device)
    except (FileNotFoundError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def _process_device(device: Optional[str], cuda: bool) -> Optional[str]:
    """Under ``torchrun``/``accelerate launch`` each process loads onto its own GPU (LOCAL_RANK);
    plain ``cuda`` would put every process's copy of the model on GPU 0 first."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and cuda and device in (None, "cuda"):
        return f"cuda:{int(local_rank)}"
    return device


def _is_main_process() -> bool:
    """Rank 0, or not launched by ``torchrun``/``accelerate launch``: the process that reports."""
    return int(os.environ.get("RANK", "0")) == 0


def _adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default="auto",
                   help="FlashBack adapter for append mode: a folder, 'none', or 'auto' (the "
                        "adapter shipped for the default model, when there is one)")


def _adapter_path(args) -> Optional[Path]:
    """The append-mode adapter: ``--adapter``, or for 'auto' the one shipped for the default
    model."""
    from .models import DEFAULT_MODEL, default_adapter_path

    path = args.adapter
    if path == "auto":
        path = default_adapter_path() if str(args.model) == DEFAULT_MODEL else None
    return None if path in (None, "none") else Path(path)


def _settle_passage_tokens(args, adapter: Optional[Path]) -> None:
    """``--passage-tokens`` defaults to the passage length the adapter was trained on: it learned
    to resume the context after passages that long (the shipped adapter, trained on 64, scores
    2.1x the no-retrieval perplexity after 128-token passages: docs/RESULTS.md). ``--echo-tokens``
    defaults to the adapter's context echo: its layout, not a tuning knob; so are its passage
    positions (``--passage-positions`` of ``flashback train``), which are taken as they are."""
    from .train import AdapterError, run_info

    spec: dict = {}
    echo = 0
    args.passage_positions = "after"
    if adapter is not None:
        try:
            info = run_info(adapter)
            spec = info.get("examples_spec") or {}
            echo = int(info["settings"].get("echo_tokens", 0))
            args.passage_positions = info["settings"].get("passage_positions", "after")
        except AdapterError:
            pass  # loading the adapter reports it
    if getattr(args, "echo_tokens", None) is None:
        args.echo_tokens = echo
    elif adapter is not None and args.echo_tokens != echo:
        print(f"note: the adapter was trained with a {echo}-token context echo; --echo-tokens "
              f"{args.echo_tokens} is a layout it has not seen", file=sys.stderr)
    longest = spec.get("passage_tokens")
    # full-length passages, unless it trained on random lengths (--train-min-passage-tokens)
    shortest = spec.get("train_min_passage_tokens") or longest
    if args.passage_tokens is None:
        args.passage_tokens = longest or DEFAULT_PASSAGE_TOKENS
    elif longest and not shortest <= args.passage_tokens <= longest:
        learned = f"{longest}" if shortest == longest else f"{shortest}-{longest}"
        print(f"note: the adapter was trained on {learned}-token passages; --passage-tokens "
              f"{args.passage_tokens} is outside what it learned", file=sys.stderr)


def _append_model(args, model, tokenizer):
    """``(model, tokenizer, description)`` for append mode: the adapter merged in, if any."""
    from .train import AdapterError, load_adapter

    path = _adapter_path(args)
    if path is None:
        return model, tokenizer, "no adapter"
    fresh, _ = _load(args)
    try:
        tuned, tuned_tok = load_adapter(fresh, path, merge=True)
    except AdapterError as exc:
        raise CliError(str(exc)) from None
    return tuned, tuned_tok, f"FlashBack adapter {path}"


def _corpus_key(corpus: str, tokenizer, kind: str, passage_tokens: int) -> str:
    ident = f"{corpus}|{kind}|{passage_tokens}|{tokenizer.name_or_path}|{len(tokenizer)}"
    if corpus != "default":
        p = Path(corpus).expanduser()
        if p.exists():
            stamp = max((f.stat().st_mtime for f in ([p] if p.is_file() else p.rglob("*"))),
                        default=0)
            ident += f"|{p.resolve()}|{stamp}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def _retriever(args, tokenizer):
    """Load --index, or build (and cache) an index of --corpus for this tokenizer."""
    from .models import cache_dir
    from .retrieval import Corpus, RetrievalError, build_index, load_index

    try:
        if args.index:
            return load_index(args.index)
        folder = cache_dir() / "indexes" / _corpus_key(args.corpus, tokenizer, args.retriever,
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


def _generator(args, model, tokenizer, retriever, mode: str):
    from .ralm import RALMGenerator

    try:
        return RALMGenerator(model, tokenizer, retriever, mode=mode, stride=args.stride,
                             query_tokens=args.query_tokens, passage_tokens=args.passage_tokens,
                             k=args.k, use_markers=False if args.no_markers else None,
                             capacity=args.capacity, overflow=args.overflow,
                             echo_tokens=(args.echo_tokens or 0) if mode == "append" else 0,
                             passage_positions=(getattr(args, "passage_positions", "after")
                                                if mode == "append" else "after"))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _guarded(run):
    """Run a generation; user-caused failures become one-line errors."""
    from .cache import CacheOverflowError

    try:
        return run()
    except (ValueError, CacheOverflowError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def _describe_device(model) -> str:
    import torch

    param = next(model.parameters())
    where = torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    return f"{param.dtype} on {where}"


# ---------------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    """Answer a few Python questions with retrieval, append vs prepend, and time both."""
    t0 = time.perf_counter()
    model, tokenizer = _load(args)
    _settle_passage_tokens(args, _adapter_path(args))
    retriever = _retriever(args, tokenizer)
    tuned, tuned_tok, adapter_note = _append_model(args, model, tokenizer)
    print(f"model {args.model} ({model.config.num_hidden_layers} layers, {_describe_device(model)}); "
          f"corpus: {len(retriever.corpus)} passages ({args.retriever}, <= {args.passage_tokens} "
          f"tokens each); append mode: "
          f"{adapter_note}{f', context echo {args.echo_tokens}' if args.echo_tokens else ''}"
          f"{', passages at rotary positions before the context' if args.passage_positions == 'before' else ''}; "
          f"setup {time.perf_counter() - t0:.1f} s")
    questions = args.question or DEMO_QUESTIONS
    prompts = [as_prompt(tokenizer, q) for q in questions]
    results = {}
    engines = {"append": (tuned, tuned_tok), "prepend": (model, tokenizer)}
    for mode in ("append", "prepend"):
        gen = _generator(args, *engines[mode], retriever, mode)
        results[mode] = _guarded(lambda: (gen.generate(prompts[:1], max_new_tokens=2),  # warm-up
                                          gen.generate(prompts, max_new_tokens=args.max_new_tokens))[1])
    for i, q in enumerate(questions):
        print("\n" + "=" * 78)
        print(q)
        for mode in ("append", "prepend"):
            r = results[mode][i]
            titles = ", ".join(dict.fromkeys(t for rec in r.retrievals for t in rec.titles))
            print(f"--- {mode} (passages from: {titles})")
            print(r.text.strip())
    print("\n" + "=" * 78)
    print(f"timing, {len(questions)} prompts batched, {args.max_new_tokens} new tokens, "
          f"retrieval every {args.stride} tokens:")
    for mode in ("append", "prepend"):
        t = results[mode][0].timing
        print(f"  {mode:<8} total {t.total_s:6.2f} s | {t.ms_per_block:7.1f} ms per retrieval block "
              f"({t.retrievals}) | prefill {t.prefill_s:5.2f} s | decode {t.ms_per_token:6.1f} ms/step "
              f"| search {t.retrieval_s * 1e3:5.1f} ms")
    ta, tp = results["append"][0].timing, results["prepend"][0].timing
    print(f"  append is {tp.total_s / ta.total_s:.2f}x faster end to end, "
          f"{tp.ms_per_block / max(ta.ms_per_block, 1e-9):.1f}x per retrieval block")
    if tuned is model:
        print("  note: without the FlashBack LoRA adapter and marking tokens the base model reads "
              "appended passages poorly (the paper's 'A.' row); prepend is the quality reference")
    elif args.adapter == "auto":
        print("  note: the shipped adapter is a short H200 run (docs/RESULTS.md: held-out append "
              "perplexity 11.5 vs 64.8 untrained, no retrieval 13.9, prepend+LoRA 10.35); prepend "
              "is still the quality reference")
    if args.long_context > 0:
        _demo_long_context(args, engines, retriever)
    return 0


def _demo_long_context(args, engines, retriever) -> None:
    """The same comparison after a long context, where prepending re-encodes much more."""
    from pydoc_data.topics import topics

    tokenizer = engines["prepend"][1]
    text = topics["compound"] if args.corpus == "default" else retriever.corpus.passages[0].text * 64
    ids = tokenizer.encode(text)[: args.long_context]
    prompt = tokenizer.decode(ids)
    print(f"\nlong context: {len(ids)} prompt tokens, {args.stride * 3} new tokens (3 retrievals)")
    times = {}
    for mode in ("append", "prepend"):
        gen = _generator(args, *engines[mode], retriever, mode)
        r = _guarded(lambda: gen.generate(prompt, max_new_tokens=args.stride * 3, stop_on_eos=False))
        t = r.timing
        times[mode] = t
        print(f"  {mode:<8} total {t.total_s:6.2f} s | {t.ms_per_block:7.1f} ms per retrieval block "
              f"({t.retrievals}) | prefill {t.prefill_s:5.2f} s | decode {t.ms_per_token:6.1f} ms/step")
    ta, tp = times["append"], times["prepend"]
    print(f"  append is {tp.total_s / ta.total_s:.2f}x faster end to end, "
          f"{tp.ms_per_block / max(ta.ms_per_block, 1e-9):.1f}x per retrieval block")


def cmd_generate(args) -> int:
    from .cache import CacheOverflowError

    if not args.prompt:
        raise CliError("give at least one --prompt")
    if args.echo_tokens and args.mode != "append":
        raise CliError("--echo-tokens needs --mode append (the echo follows an appended passage)")
    model, tokenizer = _load(args)
    adapted = args.mode == "append" or args.adapter not in ("auto", "none")
    _settle_passage_tokens(args, _adapter_path(args) if adapted else None)
    retriever = None if args.mode == "none" else _retriever(args, tokenizer)
    if adapted:
        model, tokenizer, _ = _append_model(args, model, tokenizer)
    gen = _generator(args, model, tokenizer, retriever, args.mode)
    prompts = [as_prompt(tokenizer, p) for p in args.prompt] if args.chat else args.prompt
    stream = None
    if args.stream and len(args.prompt) == 1:
        stream = lambda b, tok, text: print(text, end="", flush=True)  # noqa: E731
    try:
        results = gen.generate(prompts, max_new_tokens=args.max_new_tokens,
                               do_sample=args.sample, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=stream)
    except (ValueError, CacheOverflowError, RuntimeError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    if stream is not None:
        print()
    for prompt, r in zip(prompts, results):
        if stream is None:
            print(f"{prompt}{r.text}")
        for rec in r.retrievals:
            print(f"  [retrieval after {rec.generated} tokens] query={rec.query[-60:]!r} -> "
                  + ", ".join(f"#{pid} {t} ({s:.2f})" for pid, t, s in zip(rec.passage_ids, rec.titles, rec.scores)),
                  file=sys.stderr)
    t = results[0].timing
    print(f"[{args.mode}] {t.total_s:.2f} s total, {t.retrievals} retrievals, "
          f"{t.ms_per_token:.1f} ms/decode step", file=sys.stderr)
    return 0


def cmd_index(args) -> int:
    from .retrieval import RetrievalError, load_index

    if args.action == "build":
        from transformers import AutoTokenizer

        from .models import DEFAULT_MODEL, default_model_path

        try:
            path = default_model_path() if args.model == DEFAULT_MODEL else Path(args.model)
        except FileNotFoundError as exc:
            raise CliError(str(exc)) from None
        if not (Path(path) / "tokenizer_config.json").exists() and not (Path(path) / "tokenizer.json").exists():
            raise CliError(f"no tokenizer at {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        args.index = None
        retriever = _retriever(args, tokenizer)
        if args.out:
            retriever.save(args.out)
        print(f"indexed {len(retriever.corpus)} passages ({args.retriever})"
              + (f" into {args.out}" if args.out else ""))
        return 0
    try:
        retriever = load_index(args.index)
        hits = retriever.search(args.query, k=args.k)
    except (RetrievalError, ValueError) as exc:
        raise CliError(str(exc)) from None
    for h in hits:
        snippet = h.passage.text[:100].replace("\n", " ")
        print(f"#{h.passage.id} {h.score:8.3f} [{h.passage.title}] {snippet}")
    return 0


# example options -> ExampleSpec fields (fixed by an --examples folder), and their defaults
_SPEC_OPTIONS = {"corpus": "corpus", "stride": "stride", "query_tokens": "query_tokens",
                 "passage_tokens": "passage_tokens", "budget": "budget",
                 "eval_fraction": "eval_fraction", "max_train_examples": "max_train",
                 "max_eval_examples": "max_eval", "train_target_phases": "train_target_phases",
                 "train_min_passage_tokens": "train_min_passage_tokens"}
_SPEC_DEFAULTS = {"corpus": "python-docs", "stride": 16, "query_tokens": 32, "passage_tokens": 128,
                  "budget": 512, "eval_fraction": 0.1, "max_train_examples": 2000,
                  "max_eval_examples": 200, "train_target_phases": 1, "train_min_passage_tokens": 0}


def _add_example_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="base model folder or 'default'")
    p.add_argument("--device", default=None)
    p.add_argument("--corpus", default=_SPEC_DEFAULTS["corpus"],
                   help="python-docs (CPython reference + stdlib docstrings), default (reference "
                        "only) or a .txt file / folder")
    p.add_argument("--stride", type=int, default=_SPEC_DEFAULTS["stride"])
    p.add_argument("--query-tokens", type=int, default=_SPEC_DEFAULTS["query_tokens"])
    p.add_argument("--passage-tokens", type=int, default=_SPEC_DEFAULTS["passage_tokens"])
    p.add_argument("--budget", type=int, default=_SPEC_DEFAULTS["budget"],
                   help="tokens per example (src + E + tgt)")
    p.add_argument("--eval-fraction", type=float, default=_SPEC_DEFAULTS["eval_fraction"],
                   help="documents held out")
    p.add_argument("--max-train-examples", type=int, default=_SPEC_DEFAULTS["max_train_examples"])
    p.add_argument("--max-eval-examples", type=int, default=_SPEC_DEFAULTS["max_eval_examples"])
    p.add_argument("--train-target-phases", type=int, default=_SPEC_DEFAULTS["train_target_phases"],
                   help="start training targets this many times per stride (2: also half a "
                        "stride later) for more distinct examples from the same documents; "
                        "held-out examples always use 1")
    p.add_argument("--train-min-passage-tokens", type=int,
                   default=_SPEC_DEFAULTS["train_min_passage_tokens"], metavar="N",
                   help="cut each training passage to a random length in [N, --passage-tokens] "
                        "so the adapter works with any passage length up to --passage-tokens "
                        "(default 0: full passages, the recipe); held-out passages stay full")
    p.add_argument("--seed", type=int, default=0,
                   help="example split and draw seed; also the training seed")
    p.add_argument("--examples", default=None, metavar="DIR",
                   help="use the examples in DIR (written by `flashback examples --out DIR`, "
                        "e.g. on another machine) instead of building them: DIR fixes the corpus "
                        "and example settings above (a different value given here is an error); "
                        "--seed then only seeds training")


def _examples(args, tokenizer):
    from .data import DataError
    from .experiment import ExampleSpec, load_exported_examples, prepare_examples
    from .retrieval import RetrievalError

    if getattr(args, "examples", None):
        try:
            spec, train, evals = load_exported_examples(args.examples, tokenizer)
        except DataError as exc:
            raise CliError(str(exc)) from None
        # an example option given on the command line must agree with the folder's
        clash = [f"--{opt.replace('_', '-')} {getattr(args, opt)} (the folder has {getattr(spec, field)})"
                 for opt, field in _SPEC_OPTIONS.items()
                 if getattr(args, opt) != _SPEC_DEFAULTS[opt]
                 and getattr(args, opt) != getattr(spec, field)]
        if clash:
            raise CliError(f"{args.examples} fixes the example settings; drop {', '.join(clash)}")
        return spec, train, evals

    spec = ExampleSpec(corpus=args.corpus, stride=args.stride, query_tokens=args.query_tokens,
                       passage_tokens=args.passage_tokens, budget=args.budget,
                       eval_fraction=args.eval_fraction, max_train=args.max_train_examples,
                       max_eval=args.max_eval_examples, seed=args.seed,
                       train_target_phases=args.train_target_phases,
                       train_min_passage_tokens=args.train_min_passage_tokens)
    try:
        return spec, *prepare_examples(tokenizer, spec, model_key=str(args.model))
    except (DataError, FileNotFoundError, ValueError, RetrievalError) as exc:
        raise CliError(str(exc)) from None


def cmd_examples(args) -> int:
    """Build (or load from the cache) the train/held-out examples and write them to a folder."""
    from .data import DataError
    from .experiment import export_examples

    if args.examples:
        raise CliError("flashback examples builds examples: --examples reads them (drop it)")
    tokenizer = _load(args)[1]
    spec, train, evals = _examples(args, tokenizer)
    try:
        out = export_examples(args.out, spec, train, evals, tokenizer)
    except DataError as exc:
        raise CliError(str(exc)) from None
    print(f"{len(train)} train / {len(evals)} held-out examples written to {out}")
    return 0


def cmd_train(args) -> int:
    """Train a FlashBack LoRA adapter (plus marker rows) on examples from the corpus."""
    from dataclasses import asdict

    from .data import check_echo, check_passage_positions
    from .train import AdapterError, TrainSettings, check_distill, run_info, train_adapter

    markers = args.markers if args.markers is not None else args.layout == "append"
    try:  # before the model and examples load
        check_echo(args.layout, args.echo_tokens)
    except ValueError as exc:
        raise CliError(f"--echo-tokens: {exc}") from None
    try:
        check_passage_positions(args.layout, markers, args.passage_positions, args.echo_tokens)
    except ValueError as exc:
        raise CliError(f"--passage-positions: {exc}") from None
    weight = args.distill_weight
    if weight is None:
        weight = 0.5 if args.distill_from else 0.0
    distill = dict(distill_from=args.distill_from, distill_weight=weight,
                   distill_top_k=args.distill_top_k)
    try:
        check_distill(TrainSettings(**distill))
        if args.distill_from:
            run_info(args.distill_from)
    except (AdapterError, ValueError) as exc:
        raise CliError(f"--distill-*: {exc}") from None
    model, tokenizer = _load(args)
    spec, train, evals = _examples(args, tokenizer)
    settings = TrainSettings(layout=args.layout, markers=markers,
                             passage_positions=args.passage_positions,
                             steps=args.steps, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, lr=args.lr, marker_lr=args.marker_lr,
                             target_modules=[m for m in args.lora_targets.split(",") if m],
                             lora_r=args.lora_r,
                             lora_alpha=args.lora_alpha, seed=args.seed,
                             save_steps=args.save_steps, eval_every=args.eval_every or 0,
                             echo_tokens=args.echo_tokens, **distill)
    try:
        out = train_adapter(model, tokenizer, train, args.out, settings=settings,
                            resume=args.resume, init_adapter=args.init_adapter,
                            eval_examples=evals,
                            extra_info={"examples_spec": asdict(spec), "model": str(args.model),
                                        "examples_dir": args.examples})
    except (AdapterError, ValueError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    if _is_main_process():  # only rank 0 wrote the adapter
        print(f"adapter saved to {out}")
    return 0


def cmd_eval(args) -> int:
    """Perplexity table in the paper's settings for the base model and the given adapters."""
    import json

    from .evaluate import TABLE_ROWS, markdown_table, perplexity, position_table, ratio_interval
    from .train import AdapterError, check_adapter_layout, load_adapter

    names = [s.adapter for s in TABLE_ROWS if s.adapter is not None]  # the row each one fills
    adapters = {}
    for item in args.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or name not in names:
            raise CliError(f"--adapter takes NAME=DIR with NAME in {', '.join(names)}; "
                           f"got {item!r}")
        adapters[name] = path
    known = [s.name for s in TABLE_ROWS]
    wanted = known if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in known]
    if unknown or not wanted:
        raise CliError(f"--rows takes names from {', '.join(known)}; got {args.rows!r}")
    missing = [s.name for s in TABLE_ROWS if s.name in wanted and s.adapter is not None
               and s.adapter not in adapters and args.rows is not None]
    if missing:
        raise CliError(f"row(s) {', '.join(missing)} need --adapter "
                       f"{', '.join(s.adapter + '=DIR' for s in TABLE_ROWS if s.name in missing)}")
    model, tokenizer = _load(args)
    spec, _, evals = _examples(args, tokenizer)
    rows = []
    for setting in TABLE_ROWS:
        if setting.name not in wanted:
            continue
        if setting.adapter is not None and setting.adapter not in adapters:
            continue
        echo, positions = 0, "after"
        if setting.adapter is None:
            m, tok = model, tokenizer
        else:
            try:
                info = check_adapter_layout(adapters[setting.adapter], setting.layout,
                                            setting.markers, f"row {setting.name}")
                m, tok = load_adapter(_load(args)[0], adapters[setting.adapter])
            except AdapterError as exc:
                raise CliError(str(exc)) from None
            echo = int(info["settings"].get("echo_tokens", 0))  # part of the adapter's layout
            positions = info["settings"].get("passage_positions", "after")  # so is this
        t0 = time.perf_counter()
        result = perplexity(m, tok, evals, setting.layout, setting.markers,
                            batch_size=args.batch_size, echo=echo, passage_positions=positions)
        rows.append({"name": setting.name, "layout": setting.layout, "adapter": setting.adapter,
                     "markers": setting.markers, "echo_tokens": echo,
                     "passage_positions": positions, **result,
                     "seconds": time.perf_counter() - t0})
        print(f"{setting.name:<14} ppl {result['ppl']:.3f} ({result['tokens']} target tokens)",
              flush=True)
    table, places = markdown_table(rows), position_table(rows)
    print("\n" + table + "\n\nmean NLL by target place (0 = first token after the passage "
          "in the append rows):\n\n" + places)
    by_name = {r["name"]: r for r in rows}
    goal = None
    if "A.+LoRA+M.T." in by_name and "P.+LoRA" in by_name:  # the paper's comparison
        ratio, low, high = ratio_interval(by_name["A.+LoRA+M.T."], by_name["P.+LoRA"])
        echo = by_name["A.+LoRA+M.T."]["echo_tokens"]
        positions = by_name["A.+LoRA+M.T."]["passage_positions"]
        goal = {"ratio": ratio, "low": low, "high": high, "level": 0.95, "echo_tokens": echo,
                "passage_positions": positions}
        print(f"\nA.+LoRA+M.T. / P.+LoRA = {ratio:.3f} (95% paired bootstrap interval over the "
              f"{len(evals)} held-out examples: {low:.3f}-{high:.3f})"
              + (f"; with a {echo}-token context echo, not the paper's layout" if echo else "")
              + ("; with the passage at rotary positions before the context, not the paper's "
                 "positions" if positions == "before" else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "examples": len(evals),
                                               "adapters": adapters, "spec": spec.__dict__,
                                               "table": table, "position_table": places,
                                               "append_markers_over_prepend_lora": goal},
                                              indent=1))
    return 0


# ------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashback", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: RALM answers, append vs prepend timing")
    _add_model_args(demo)
    _add_retrieval_args(demo)
    _add_engine_args(demo)
    demo.add_argument("--question", action="append", help="ask this instead of the built-in questions")
    _adapter_arg(demo)
    demo.add_argument("--long-context", type=int, default=1024,
                      help="also time both modes after a context of this many tokens (0: skip)")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate with retrieval")
    _add_model_args(gen)
    _add_retrieval_args(gen)
    _add_engine_args(gen)
    gen.add_argument("--mode", choices=["append", "prepend", "none"], default="append")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    _adapter_arg(gen)
    gen.set_defaults(func=cmd_generate)

    train = sub.add_parser("train", help="train a FlashBack LoRA adapter (+ marker rows)")
    _add_example_args(train)
    train.add_argument("--layout", choices=["append", "prepend", "none"], default="append")
    marks = train.add_mutually_exclusive_group()
    marks.add_argument("--markers", dest="markers", action="store_true", default=None,
                       help="wrap passages in <MARK_L>/<MARK_R> (default for --layout append)")
    marks.add_argument("--no-markers", dest="markers", action="store_false")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--marker-lr", type=float, default=None,
                       help="learning rate of the two marker rows (default: --lr)")
    train.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                       help="comma-separated module names that get LoRA matrices")
    train.add_argument("--lora-r", type=int, default=16)
    train.add_argument("--lora-alpha", type=int, default=32)
    train.add_argument("--save-steps", type=int, default=100)
    train.add_argument("--eval-every", type=int, default=None, metavar="N",
                       help="score the held-out examples (the ones `flashback eval` uses, in this "
                            "run's layout) every N steps and after the last: the learning curve "
                            "goes to held_out_curve in flashback_run.json (default: never)")
    train.add_argument("--echo-tokens", type=int, default=0, metavar="K",
                       help="not in the paper: repeat the context's last K tokens after the passage "
                            "(--layout append), so the first new tokens follow a copy of the "
                            "context instead of <MARK_R>; generation and eval read K from the "
                            "adapter (default 0: the paper's layout)")
    train.add_argument("--passage-positions", choices=["after", "before"], default="after",
                       help="not in the paper: 'before' gives the appended passage the rotary "
                            "positions of a prepended one and <MARK_R> the position after the "
                            "context (--layout append with markers; eval reads it from the "
                            "adapter; default 'after': the paper's contiguous positions)")
    train.add_argument("--distill-from", default=None, metavar="ADAPTER",
                       help="not in the paper: also learn the next-token distribution this "
                            "(e.g. prepend) adapter gives at each target, scored once per "
                            "training example in its own layout (docs/RESULTS.md)")
    train.add_argument("--distill-weight", type=float, default=None, metavar="W",
                       help="loss = (1 - W) * target NLL + W * cross-entropy to the teacher "
                            "(default 0.5 with --distill-from)")
    train.add_argument("--distill-top-k", type=int, default=64, metavar="K",
                       help="keep the teacher's K most likely tokens per place, renormalised")
    train.add_argument("--out", required=True, help="adapter output folder")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--init-adapter", default=None,
                       help="warm start: begin from this adapter's LoRA weights and marker rows "
                            "(same layout and markers; its LoRA shape is kept)")
    train.set_defaults(func=cmd_train)

    ex = sub.add_parser("examples", help="build the train/held-out examples and write them to "
                                         "a folder (to train or score elsewhere)")
    _add_example_args(ex)
    ex.add_argument("--out", required=True, help="folder for spec.json, train.json, eval.json")
    ex.set_defaults(func=cmd_examples)

    ev = sub.add_parser("eval", help="perplexity table: N., P., A. and the adapters' rows")
    _add_example_args(ev)
    ev.add_argument("--adapter", action="append",
                    help="NAME=DIR (repeatable): prepend -> P.+LoRA, append -> A.+LoRA, "
                         "append_markers -> A.+LoRA+M.T., none -> N.+LoRA (not in the paper: "
                         "a LoRA trained with no passage, to tell corpus adaptation from "
                         "passage use)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--rows", default=None,
                    help="comma-separated row names to score (default: every row the given "
                         "adapters allow), e.g. 'P.+LoRA,A.+LoRA+M.T.'")
    ev.add_argument("--json", default=None, help="also write the rows here")
    ev.set_defaults(func=cmd_eval)

    index = sub.add_parser("index", help="build or search a retrieval index")
    isub = index.add_subparsers(dest="action", required=True)
    build = isub.add_parser("build", help="index a corpus")
    build.add_argument("--model", default="default", help="whose tokenizer cuts the passages")
    build.add_argument("--passage-tokens", type=int, default=DEFAULT_PASSAGE_TOKENS)
    build.add_argument("--out", default=None, help="save the index here (else the cache dir)")
    _add_retrieval_args(build)
    build.set_defaults(func=cmd_index)
    search = isub.add_parser("search", help="query a saved index")
    search.add_argument("--index", required=True)
    search.add_argument("--k", type=int, default=3)
    search.add_argument("query")
    search.set_defaults(func=cmd_index)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for name in ("stride", "query_tokens", "passage_tokens", "k", "max_new_tokens", "steps",
                 "batch_size", "budget", "max_train_examples", "max_eval_examples", "grad_accum",
                 "save_steps", "lora_r", "lora_alpha", "eval_every"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"flashback: error: --{name.replace('_', '-')} must be >= 1, got {value}",
                  file=sys.stderr)
            return 2
    for name in ("lr", "marker_lr"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            print(f"flashback: error: --{name.replace('_', '-')} must be > 0, got {value}",
                  file=sys.stderr)
            return 2
    if getattr(args, "lora_targets", "x").strip(", ") == "":
        print("flashback: error: --lora-targets names no module", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except CliError as exc:
        print(f"flashback: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
