"""``flashback demo`` (the main job), ``generate`` and ``index build|search``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .backend import add_backend_args, check_backend_args
from .common import (
    DEFAULT_PASSAGE_TOKENS,
    CliError,
    adapter_path,
    add_adapter_arg,
    add_dtype_arg,
    add_engine_args,
    add_model_args,
    add_retrieval_args,
    append_model,
    as_prompt,
    describe_device,
    guarded,
    load_base,
    make_generator,
    make_retriever,
    print_answers,
    print_retrievals,
    settle_passage_tokens,
)

__all__ = ["add_commands", "cmd_demo", "cmd_generate", "cmd_export", "cmd_index"]

DEMO_QUESTIONS = [
    "What does the yield statement do in a Python function?",
    "How do you write a lambda expression in Python?",
    "What happens to the else clause of a for loop in Python?",
]


def add_commands(sub) -> None:
    """The ``demo``, ``generate``, ``export`` and ``index`` subcommands."""
    demo = sub.add_parser("demo", help="the main job: RALM answers, append vs prepend timing")
    add_model_args(demo)
    add_dtype_arg(demo)
    add_retrieval_args(demo)
    add_engine_args(demo)
    add_backend_args(demo)
    demo.add_argument("--question", action="append", help="ask this instead of the built-in questions")
    add_adapter_arg(demo)
    demo.add_argument("--long-context", type=int, default=1024,
                      help="also time both modes after a context of this many tokens (0: skip)")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate with retrieval")
    add_model_args(gen)
    add_dtype_arg(gen)
    add_retrieval_args(gen)
    add_engine_args(gen)
    add_backend_args(gen)
    gen.add_argument("--mode", choices=["append", "prepend", "none"], default="append")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_adapter_arg(gen)
    gen.set_defaults(func=cmd_generate)

    export = sub.add_parser("export", help="merge an adapter into a self-contained checkpoint "
                                           "that transformers and vLLM load")
    add_model_args(export)
    add_adapter_arg(export)
    export.add_argument("--out", required=True, help="folder for the merged checkpoint")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the saved weights (default: the loaded model's)")
    export.add_argument("--force", action="store_true",
                        help="replace an earlier export in --out, whole (other folders are refused)")
    export.set_defaults(func=cmd_export)

    index = sub.add_parser("index", help="build or search a retrieval index")
    isub = index.add_subparsers(dest="action", required=True)
    build = isub.add_parser("build", help="index a corpus")
    build.add_argument("--model", default="default", help="whose tokenizer cuts the passages")
    build.add_argument("--passage-tokens", type=int, default=DEFAULT_PASSAGE_TOKENS)
    build.add_argument("--out", default=None, help="save the index here (else the cache dir)")
    add_retrieval_args(build)
    build.set_defaults(func=cmd_index)
    search = isub.add_parser("search", help="query a saved index")
    search.add_argument("--index", required=True)
    search.add_argument("--k", type=int, default=3)
    search.add_argument("query")
    search.set_defaults(func=cmd_index)


def cmd_demo(args) -> int:
    """Answer a few Python questions with retrieval, append vs prepend, and time both."""
    check_backend_args(args)
    if args.backend == "vllm":
        from .backend import cmd_demo_vllm

        return cmd_demo_vllm(args, args.question or DEMO_QUESTIONS)
    t0 = time.perf_counter()
    model, tokenizer = load_base(args)
    settle_passage_tokens(args, adapter_path(args))
    retriever = make_retriever(args, tokenizer)
    tuned, tuned_tok, adapter_note = append_model(args, model, tokenizer)
    print(f"model {args.model} ({model.config.num_hidden_layers} layers, {describe_device(model)}); "
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
        gen = make_generator(args, *engines[mode], retriever, mode)
        results[mode] = guarded(lambda gen=gen: (
            gen.generate(prompts[:1], max_new_tokens=2),  # warm-up
            gen.generate(prompts, max_new_tokens=args.max_new_tokens))[1])
    print_answers(questions, results)
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
        print("  note: the shipped adapter (docs/RESULTS.md; held-out, 32-128-token passages) is "
              "within 1.014-1.029x the perplexity of a prepend LoRA trained on the same examples, "
              "and 0.83-0.87x no retrieval")
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
        gen = make_generator(args, *engines[mode], retriever, mode)
        r = guarded(lambda gen=gen: gen.generate(prompt, max_new_tokens=args.stride * 3,
                                                 stop_on_eos=False))
        t = r.timing
        times[mode] = t
        print(f"  {mode:<8} total {t.total_s:6.2f} s | {t.ms_per_block:7.1f} ms per retrieval block "
              f"({t.retrievals}) | prefill {t.prefill_s:5.2f} s | decode {t.ms_per_token:6.1f} ms/step")
    ta, tp = times["append"], times["prepend"]
    print(f"  append is {tp.total_s / ta.total_s:.2f}x faster end to end, "
          f"{tp.ms_per_block / max(ta.ms_per_block, 1e-9):.1f}x per retrieval block")


def cmd_generate(args) -> int:
    from ..ops.ring_cache import CacheOverflowError

    if not args.prompt:
        raise CliError("give at least one --prompt")
    if args.echo_tokens and args.mode != "append":
        raise CliError("--echo-tokens needs --mode append (the echo follows an appended passage)")
    check_backend_args(args)
    if args.backend == "vllm":
        from .backend import cmd_generate_vllm

        return cmd_generate_vllm(args, args.prompt)
    model, tokenizer = load_base(args)
    adapted = args.mode == "append" or args.adapter not in ("auto", "none")
    settle_passage_tokens(args, adapter_path(args) if adapted else None)
    retriever = None if args.mode == "none" else make_retriever(args, tokenizer)
    if adapted:
        model, tokenizer, _ = append_model(args, model, tokenizer)
    gen = make_generator(args, model, tokenizer, retriever, args.mode)
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
        print_retrievals(r)
    t = results[0].timing
    print(f"[{args.mode}] {t.total_s:.2f} s total, {t.retrievals} retrievals, "
          f"{t.ms_per_token:.1f} ms/decode step", file=sys.stderr)
    return 0


def cmd_index(args) -> int:
    from ..engine.retrieval import RetrievalError, load_index

    if args.action == "build":
        from transformers import AutoTokenizer

        from ..engine.models import DEFAULT_MODEL, default_model_path

        try:
            path = default_model_path() if args.model == DEFAULT_MODEL else Path(args.model)
        except FileNotFoundError as exc:
            raise CliError(str(exc)) from None
        if not (Path(path) / "tokenizer_config.json").exists() and not (Path(path) / "tokenizer.json").exists():
            raise CliError(f"no tokenizer at {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        args.index = None
        retriever = make_retriever(args, tokenizer)
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


def cmd_export(args) -> int:
    """Merge the append adapter into the base model and save it for serving engines."""
    import torch

    from ..pipeline.adapter_io import AdapterError
    from ..pipeline.export import export_merged

    path = adapter_path(args, use="export")
    if path is None:
        raise CliError("--adapter: give the adapter folder to export (or 'auto' with the default "
                       "model for the shipped one)")
    model, tokenizer = load_base(args)
    try:
        out = export_merged(model, tokenizer, path, args.out, overwrite=args.force,
                            dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (AdapterError, FileExistsError) as exc:
        raise CliError(str(exc)) from None
    print(f"merged checkpoint of {path} written to {out} (serve it with `vllm serve {out} "
          f"--enable-prefix-caching`)")
    return 0
