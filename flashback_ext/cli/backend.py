"""``--backend vllm`` of ``flashback demo`` and ``generate``: the adapter exported (once, cached),
and the RALM loop driven on vLLM: a server's URL (``--server``), vLLM in this process when this
python imports it, else a local ``vllm serve`` from the vLLM environment for the run."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import sys
from pathlib import Path

from .common import CliError, adapter_path

__all__ = ["add_backend_args", "check_backend_args", "exported_checkpoint", "settle_export_settings", "vllm_generators",
           "print_vllm_timing"]


def add_backend_args(p) -> None:
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: our engine on the patched Hugging Face model; vllm: the same loop "
                        "on vLLM, whose prefix cache reuses the append context (it serves one "
                        "checkpoint, the merged export, for every mode)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="vllm backend: an OpenAI-compatible server of the export (`python -m "
                        "vllm.entrypoints.openai.api_server --model EXPORT "
                        "--enable-prefix-caching --enable-prompt-tokens-details`); default: vLLM "
                        "in this process, or a local server from the vLLM environment "
                        "(make vllm-env)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="vllm backend: a `flashback export` folder (default: --adapter exported "
                        "once into the cache dir)")


def check_backend_args(args) -> None:
    """Options of one backend given to the other are mistakes, not silently ignored."""
    if args.backend != "vllm":
        given = [f"--{n}" for n in ("server", "export") if getattr(args, n, None)]
        if given:
            raise CliError(f"{' and '.join(given)} need --backend vllm")
        return
    hf_only = [flag for flag, on in (("--compile", args.compile), ("--capacity", args.capacity),
                                     ("--overflow evict", args.overflow == "evict"),
                                     ("--stream", getattr(args, "stream", False))) if on]
    if hf_only:
        raise CliError(f"{', '.join(hf_only)}: options of --backend hf (vLLM manages its own "
                       f"cache and compilation)")


def exported_checkpoint(args) -> Path:
    """``--export``, else ``--adapter`` merged into ``--model`` (fp32) under the cache dir, once
    per adapter version."""
    import torch

    from ..engine.models import cache_dir, load_model
    from ..pipeline.adapter_io import AdapterError
    from ..pipeline.export import export_merged, read_export

    if args.export:
        return Path(args.export).expanduser()
    adapter = adapter_path(args, use="export")
    if adapter is None:
        raise CliError("--backend vllm serves a merged FlashBack export: give --export DIR, or "
                       "an --adapter to export (the default model's 'auto' is the shipped one)")
    files = sorted(p for p in Path(adapter).rglob("*") if p.is_file())
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha1(f"{Path(adapter).resolve()}|{args.model}|{stamp}".encode()).hexdigest()[:16]
    folder = cache_dir() / "exports" / key
    try:
        read_export(folder)
        return folder
    except AdapterError:
        pass
    print(f"exporting {adapter} for vLLM into {folder} (once)", file=sys.stderr)
    try:
        model, tokenizer = load_model(args.model, device="cpu", dtype=torch.float32)
        return export_merged(model, tokenizer, adapter, folder, overwrite=True)
    except (AdapterError, FileExistsError, FileNotFoundError, OSError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None


def settle_export_settings(args, folder: Path) -> None:
    """``--passage-tokens`` defaults to the export's (what its adapter was trained on)."""
    from ..pipeline.adapter_io import AdapterError
    from ..pipeline.export import read_export
    from .common import DEFAULT_PASSAGE_TOKENS

    try:
        settings = read_export(folder)
    except AdapterError as exc:
        raise CliError(str(exc)) from None
    if args.passage_tokens is None:
        args.passage_tokens = settings.get("passage_tokens") or DEFAULT_PASSAGE_TOKENS


def _vllm_dtype(args) -> str:
    from ..engine.models import resolve_dtype

    return str(resolve_dtype(args.model_dtype, "cpu")).removeprefix("torch.")


@contextlib.contextmanager
def vllm_generators(args, folder: Path, retriever_for):
    """Yields ``make(mode) -> VLLMGenerator`` on one engine for ``folder``;
    ``retriever_for(tokenizer)`` builds the retriever. A server started here stops on exit."""
    from ..pipeline.adapter_io import AdapterError
    from ..serving.launch import VLLMServer, vllm_python
    from ..serving.transports import EngineError, InProcessTransport, ServerTransport
    from ..serving.vllm_driver import VLLMGenerator

    with contextlib.ExitStack() as stack:
        try:
            if args.server:
                transport = ServerTransport(args.server)
            elif importlib.util.find_spec("vllm") is not None:
                transport = InProcessTransport(folder, dtype=_vllm_dtype(args), block_size=32)
            elif vllm_python() is not None:
                print(f"starting a local vLLM server of {folder} (about 40 s)", file=sys.stderr)
                server = stack.enter_context(VLLMServer(folder, dtype=_vllm_dtype(args)))
                transport = ServerTransport(server.url)
            else:
                raise CliError("--backend vllm: no vLLM here; run `make vllm-env`, or give "
                               "--server URL of a running `vllm serve`")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
            retriever = None

            def make(mode: str) -> VLLMGenerator:
                nonlocal retriever
                if mode != "none" and retriever is None:
                    retriever = retriever_for(tokenizer)
                return VLLMGenerator.from_export(
                    folder, retriever if mode != "none" else None, transport=transport,
                    mode=mode, tokenizer=tokenizer, stride=args.stride, query_tokens=args.query_tokens,
                    passage_tokens=args.passage_tokens, k=args.k,
                    echo_tokens=args.echo_tokens if mode == "append" else None,
                    use_markers=False if args.no_markers else None)

            yield make
        except (EngineError, AdapterError, ValueError) as exc:
            raise CliError(str(exc).splitlines()[0]) from None


def cached_note(t) -> str:
    """The prefix cache's share of the prompt tokens, or why it is unknown."""
    if not t.cached_reported:
        return "prefix-cache hits not reported (start the server with --enable-prompt-tokens-details)"
    return f"{t.cached_tokens} of {t.prompt_tokens_sent} prompt tokens from the prefix cache"


def print_vllm_timing(mode: str, results) -> None:
    t = results[0].timing
    print(f"  {mode:<8} total {t.total_s:6.2f} s | engine {t.engine_s:6.2f} s over "
          f"{t.retrievals or 1} cycles | {cached_note(t)} | search {t.retrieval_s * 1e3:5.1f} ms")


def cmd_generate_vllm(args, prompts: list[str]) -> int:
    """``flashback generate --backend vllm``."""
    from .common import make_retriever, print_retrievals

    folder = exported_checkpoint(args)
    settle_export_settings(args, folder)
    with vllm_generators(args, folder, lambda tok: make_retriever(args, tok)) as make:
        gen = make(args.mode)
        if args.chat:
            from .common import as_prompt

            prompts = [as_prompt(gen.tokenizer, p) for p in prompts]
        results = gen.generate(prompts, max_new_tokens=args.max_new_tokens,
                               do_sample=args.sample, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, r in zip(prompts, results):
        print(f"{prompt}{r.text}")
        print_retrievals(r)
    t = results[0].timing
    print(f"[{args.mode}, vllm] {t.total_s:.2f} s total, {t.retrievals} retrievals, "
          f"{cached_note(t)}", file=sys.stderr)
    return 0


def cmd_demo_vllm(args, questions: list[str]) -> int:
    """``flashback demo --backend vllm``: the demo's questions, append vs prepend, on vLLM."""
    from .common import as_prompt, make_retriever, print_answers

    folder = exported_checkpoint(args)
    settle_export_settings(args, folder)
    results = {}
    with vllm_generators(args, folder, lambda tok: make_retriever(args, tok)) as make:
        gens = {mode: make(mode) for mode in ("append", "prepend")}
        tok = gens["append"].tokenizer
        print(f"vLLM backend: {folder} ({_vllm_dtype(args)}); corpus: "
              f"{len(gens['append'].retriever.corpus)} passages (<= {args.passage_tokens} tokens)")
        prompts = [as_prompt(tok, q) for q in questions]
        for mode, gen in gens.items():
            gen.generate(prompts[:1], max_new_tokens=2)  # warm-up
            results[mode] = gen.generate(prompts, max_new_tokens=args.max_new_tokens)
        long = None
        if args.long_context > 0:
            from pydoc_data.topics import topics

            text = tok.decode(tok.encode(topics["compound"])[: args.long_context])
            long = {mode: gen.generate(text, max_new_tokens=args.stride * 3, stop_on_eos=False)
                    for mode, gen in gens.items()}
    print_answers(questions, results)
    print(f"timing on vLLM, {len(questions)} prompts as concurrent requests, "
          f"{args.max_new_tokens} new tokens, retrieval every {args.stride} tokens:")
    for mode in ("append", "prepend"):
        print_vllm_timing(mode, results[mode])
    if long is not None:
        print(f"\nlong context: {args.long_context} prompt tokens, {args.stride * 3} new tokens "
              f"(3 retrievals)")
        for mode in ("append", "prepend"):
            print_vllm_timing(mode, [long[mode]])
        ta, tp = long["append"].timing, long["prepend"].timing
        print(f"  append is {tp.total_s / ta.total_s:.2f}x faster end to end")
    return 0
