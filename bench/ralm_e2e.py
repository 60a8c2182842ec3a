"""End-to-end RALM speed: one retrieval cycle (a retrieval block + ``stride`` decoded tokens) in
append mode vs prepend mode, in our engine and in the official-style Hugging Face eager loop.

    python bench/ralm_e2e.py --device cpu                 # embedded SmolLM2-135M, fp32
    python bench/ralm_e2e.py --device cuda --model llama2-7b-shape   # random bf16 weights

As in the paper's runtime test, contexts, queries and passages are random token ids (no retriever
in the timed loop). Modes:
* ``engine-append`` / ``engine-prepend`` / ``engine-none``: :class:`flashback_ext.RALMGenerator`
  (patched attention, RingKVCache, O(1) rollback; CUDA-graph decode on the GPU);
* ``eager-append`` / ``eager-prepend``: the same engine without CUDA graphs (what graphs buy);
* ``engine-echo`` / ``eager-echo``: append with a context echo of ``--echo-tokens K`` tokens
  after each passage (not in the paper; the block grows by K tokens); engine-echo joins the
  default modes when K > 0;
* ``hf-append``: HF eager + ``DynamicCache``: crop to ``t - stride``, forward
  ``[last stride | passage]``, decode ``stride`` tokens (the official FlashBack loop);
* ``hf-prepend``: HF eager, re-encode ``[passage | context]`` from scratch every cycle;
* ``vllm-append`` / ``vllm-prepend``: the same cycles on vLLM (``--vllm``: a local ``vllm serve``
  of the same weights and dtype, prefix caching on, its threads bound to the cores this process
  uses) through :class:`flashback_ext.serving.VLLMGenerator`; one request per cycle, so in
  append the prefix cache serves the context. The server is up for the whole run (idle, it
  used about 1% of a core here), so with ``--repeats N`` every mode is timed in N interleaved
  rounds per context and the median kept.
Every engine mode is warmed up once (graph capture, cuBLAS init) before it is timed. Also per
context: decode ms/token against its floor (weight + live KV bytes / copy bandwidth), the prepend
re-encode's TFLOP/s against the matmul rate (both ceilings measured in the same run), peak GPU
memory per mode, and with ``--batch N`` the tokens/s of N prompts of different lengths in one
engine vs one prompt.
Prints a table and writes JSON (and a PNG when matplotlib is installed) under bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from flashback_ext.engine.generator import RALMGenerator  # noqa: E402
from flashback_ext.engine.hf import unpatch_model  # noqa: E402
from flashback_ext.engine.retrieval import Hit, Passage  # noqa: E402

from kernels import measure_ceilings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class RandomPassages:
    """A stand-in retriever returning random token passages (the paper's runtime test)."""

    def __init__(self, vocab: int, length: int, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab, self.length, self.count = vocab, length, 0

    def search_batch(self, queries, k=1, exclude_doc_ids=None, exclude_titles=None):
        out = []
        for _ in queries:
            ids = torch.randint(100, self.vocab, (self.length,), generator=self.gen).tolist()
            self.count += 1
            # the text must be what the tokenizer decodes the ids to: the engine re-encodes the
            # text of a passage whose ids do not decode to it (an index built with another tokenizer)
            text = IdTokenizer().decode(ids)
            out.append([Hit(Passage(self.count, "random", "random", text, ids), 0.0)])
        return out


class IdTokenizer:
    """Token ids in, token ids out: the benchmark never needs text."""

    eos_token_id = None
    pad_token_id = 0

    def get_vocab(self):
        return {}

    def encode(self, ids, add_special_tokens=True):
        return list(ids)

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def cpu_name() -> str:
    """The CPU's model name and whether it computes bf16 natively (which decides --dtype auto)."""
    from flashback_ext.engine.models import cpu_has_bf16

    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
    except OSError:
        names = []
    cores = f", {len(names)} logical CPUs" if names else ""
    return f"{names[0] if names else 'CPU'}{cores}, native bf16: {cpu_has_bf16()}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    if name == "default":
        from flashback_ext.engine.models import load_model
        model, _ = load_model("default", device=device, dtype=dtype)
        return model
    if name == "tiny":  # smoke tests
        from flashback_ext.engine.models import tiny_llama
        return tiny_llama(vocab_size=512, max_positions=8192).to(device, dtype)
    if name == "llama2-7b-shape":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          max_position_embeddings=65536)
        with torch.device(device):
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        return model.eval()
    raise SystemExit(f"unknown --model {name!r}")


@torch.no_grad()
def engine_cycle(model, mode, contexts, stride, passage, cycles, graphs, echo=0,
                 compile=False) -> dict:
    """Warm up, then time ``cycles + 1`` retrieval cycles for a batch of contexts."""
    vocab = model.config.vocab_size
    engine = RALMGenerator(model, IdTokenizer(), RandomPassages(vocab, passage), mode=mode,
                           stride=stride, passage_tokens=passage, cuda_graphs=graphs,
                           echo_tokens=echo, compile=compile)
    new = stride * (cycles + 1)
    # warm-up: graph capture, workspaces, and with compile=True the compilation (reported apart)
    warm = engine.generate_ids(contexts, new, stop_on_eos=False)[0].timing
    t = engine.generate_ids(contexts, new, stop_on_eos=False)[0].timing
    cycles_run = max(1, t.retrievals if mode != "none" else cycles + 1)
    busy = t.block_s + t.decode_s
    engine.release_graphs()
    return {"cycle_ms": 1e3 * busy / cycles_run, "decode_ms_per_token": t.ms_per_token,
            "block_ms": 1e3 * t.block_s / max(1, t.retrievals),
            "block_tokens": t.block_tokens / max(1, t.retrievals),
            "tokens_per_s": len(contexts) * new / max(busy + t.prefill_s, 1e-9),
            # without the one-off prompt prefill: the rate once generation is under way
            "cycle_tokens_per_s": len(contexts) * new / max(busy, 1e-9),
            "graph_steps": t.graph_steps, "decode_steps": t.decode_steps,
            "compile_s": warm.compile_s, "recompiled_in_timed_run": t.compile_s > 0}


def model_bytes(model) -> tuple[int, int]:
    """(bytes a decode step reads: every weight except the input embedding table unless tied,
    non-embedding parameter count for prefill FLOPs)."""
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    read = total - (0 if tied else emb.numel() * emb.element_size())
    params = sum(p.numel() for p in model.parameters()) - emb.numel()
    return read, params


def floors(model, length, passage, ceilings) -> dict:
    """Decode floor at ``length`` live tokens, and prepend's re-encode FLOPs."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    read, params = model_bytes(model)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * length * elem
    n = length + passage  # prepend re-encodes [passage | context] causally
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * n * n / 2
    return {"decode_floor_ms": (read + kv) / (ceilings["copy_GBps"] * 1e6),
            "prepend_block_TFLOP": (2 * params * n + attn) / 1e12}


@torch.no_grad()
def hf_cycle_ms(model, mode, context, stride, passage, cycles, device) -> float:
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([context], device=device)
    times = []
    cache = DynamicCache(config=model.config)
    if mode == "append":  # prefill all but the last stride once
        model(ids[:, :-stride], past_key_values=cache, use_cache=True)
    for c in range(cycles + 1):
        p = torch.randint(100, vocab, (1, passage), generator=gen).to(device)
        sync(device)
        t0 = time.perf_counter()
        if mode == "append":
            drop = cache.get_seq_length() - (ids.shape[1] - stride)
            if drop > 0:  # a negative crop removes tokens on every transformers 5.x
                cache.crop(-drop)
            out = model(torch.cat([ids[:, -stride:], p], 1), past_key_values=cache, use_cache=True)
        else:
            cache = DynamicCache(config=model.config)
            out = model(torch.cat([p, ids], 1), past_key_values=cache, use_cache=True)
        new = []
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(stride - 1):
            new.append(tok)
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        new.append(tok)
        sync(device)
        if c > 0 or cycles == 0:  # the first cycle is a warm-up
            times.append(1e3 * (time.perf_counter() - t0))
        ids = torch.cat([ids] + new, 1)  # the passage and new tokens leave at the next crop
    return statistics.median(times)


def vllm_cycle(transport, context, layout, stride, passage, cycles, vocab, seed) -> dict:
    """Per-cycle engine ms of one context on a vLLM server, the first cycle (the prompt's
    prefill) a warm-up, as in :func:`hf_cycle_ms`. ``seed`` gives passages no earlier request
    saw (the server's prefix cache outlives requests)."""
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    gen = VLLMGenerator(transport, IdTokenizer(), RandomPassages(vocab, passage, seed=seed),
                        mode=layout, stride=stride, passage_tokens=passage, eos_ids=set())
    r = gen.generate_ids([context], stride * (cycles + 1), stop_on_eos=False)[0]
    times = [1e3 * t for t in r.timing.engine_cycle_s[1:]]
    return {"cycle_ms": statistics.median(times), "cycle_ms_all": times,
            "cached_tokens": [rec.cached_tokens for rec in r.retrievals],
            "prompt_tokens_sent": r.timing.prompt_tokens_sent}


def _vllm_version() -> str:
    import subprocess

    from flashback_ext.serving.launch import vllm_python

    return subprocess.run([str(vllm_python()), "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, timeout=120).stdout.strip()


def vllm_checkpoint(model, folder: Path) -> Path:
    """The benchmarked weights as a checkpoint vLLM loads (with the default model's tokenizer,
    which vLLM needs to start; the benchmark sends token ids only)."""
    from flashback_ext.engine.models import load_model

    model.save_pretrained(folder)
    load_model("default", device="cpu")[1].save_pretrained(folder)
    return folder


def time_one(args, model, mode, context, device, weights, transport, seed) -> tuple[float, dict]:
    """One measurement of one mode: (ms per retrieval cycle, detail)."""
    kind, layout = mode.split("-")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if kind == "vllm":
        detail = vllm_cycle(transport, context, layout, args.stride, args.passage, args.cycles,
                            model.config.vocab_size, seed)
        return detail["cycle_ms"], detail
    if kind in ("engine", "eager", "compiled"):
        echo = args.echo_tokens if layout == "echo" else 0
        detail = engine_cycle(model, "append" if echo else layout, [context], args.stride,
                              args.passage, args.cycles, False if kind == "eager" else None, echo,
                              compile=kind == "compiled")
        ms = detail["cycle_ms"]
    else:
        unpatch_model(model)
        ms, detail = hf_cycle_ms(model, layout, context, args.stride, args.passage, args.cycles, device), {}
    if device.type == "cuda":
        detail["peak_mem_GB_beyond_weights"] = (torch.cuda.max_memory_allocated() - weights) / 2**30
    return ms, detail


def describe(row, mode, detail, ceilings) -> str:
    if "cached_tokens" in detail:
        return f"  (prefix cache served {detail['cached_tokens']} tokens per cycle)"
    if "decode_ms_per_token" not in detail:
        return ""
    extra = (f"  decode {detail['decode_ms_per_token']:.2f} ms/token "
             f"({row['decode_floor_ms'] / detail['decode_ms_per_token']:.0%} of floor)"
             f"  block {detail['block_ms']:.1f} ms")
    if detail.get("compile_s"):
        extra += f"  (compiled once in warm-up: {detail['compile_s']:.1f} s)"
    if mode.endswith("-prepend"):
        rate = row["prepend_block_TFLOP"] / detail["block_ms"] * 1e3
        extra += f" = {rate:.1f} TFLOP/s ({rate / ceilings['matmul_TFLOPs']:.0%} of matmul)"
    return extra


def time_context(args, model, modes, length, device, ceilings, weights, transport) -> dict:
    """Every mode at one context length, ``--repeats`` interleaved rounds; the median is kept."""
    context = torch.randint(100, model.config.vocab_size, (length,),
                            generator=torch.Generator().manual_seed(length)).tolist()
    row = {"context": length, **floors(model, length, args.passage, ceilings), "detail": {}}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for i, mode in enumerate(modes):
            ms, detail = time_one(args, model, mode, context, device, weights, transport,
                                  seed=1000 + 97 * length + 7 * rep + i)
            times[mode].append(ms)
            row["detail"][mode] = detail
            print(f"L={length:6d} {mode:<15} {ms:9.1f} ms per cycle"
                  f"{describe(row, mode, detail, ceilings)}", flush=True)
    for mode in modes:
        row[mode] = statistics.median(times[mode])
        row["detail"][mode]["repeats_ms"] = times[mode]
    if args.batch > 1:  # lengths spread over [L/2, L]
        lens = [max(args.stride + 1, length - i * length // (2 * args.batch)) for i in range(args.batch)]
        ctxs = [context[:n] for n in lens]
        one = engine_cycle(model, "append", [context], args.stride, args.passage, args.cycles, None)
        many = engine_cycle(model, "append", ctxs, args.stride, args.passage, args.cycles, None)
        rates = {"tokens_per_s": "with prefill", "cycle_tokens_per_s": "retrieval cycles only"}
        row["batch"] = {"size": args.batch, "lengths": lens, **{k: many[k] for k in rates},
                        **{f"batch1_{k}": one[k] for k in rates}}
        for key, what in rates.items():
            print(f"L={length:6d} batch {args.batch}: {many[key]:.1f} tokens/s vs {one[key]:.1f} at "
                  f"batch 1 ({many[key] / one[key]:.2f}x, {what})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default=None, help="default (SmolLM2) or llama2-7b-shape")
    parser.add_argument("--contexts", default=None, help="comma-separated context lengths")
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--passage", type=int, default=128)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--modes", default=None,
                        help="default: engine-append,engine-prepend,hf-append,hf-prepend,engine-none"
                             " (plus compiled-append on cpu: the torch.compile'd decode step and block;"
                             " eager-append,eager-prepend on cuda)")
    parser.add_argument("--batch", type=int, default=0,
                        help="also time engine-append on this many prompts of different lengths")
    parser.add_argument("--echo-tokens", type=int, default=0,
                        help="K > 0 also times engine-echo: append with a K-token context echo")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--vllm", action="store_true",
                        help="also time vllm-append and vllm-prepend (needs make vllm-env)")
    parser.add_argument("--vllm-compile", action="store_true",
                        help="serve vLLM with its torch.compile'd model (default: --enforce-eager)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all modes per context, interleaved; the median is kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.echo_tokens < 0:
        parser.error(f"--echo-tokens must be >= 0, got {args.echo_tokens}")
    device = torch.device(args.device)
    modes = (args.modes or "engine-append,engine-prepend,hf-append,hf-prepend,engine-none"
             + (",eager-append,eager-prepend" if args.device == "cuda" else ",compiled-append")
             + (",engine-echo" if args.echo_tokens else "")).split(",")
    known = {f"{k}-{m}" for k in ("engine", "eager", "compiled")
             for m in ("append", "prepend", "none", "echo")}
    known |= {"hf-append", "hf-prepend"}
    if args.vllm:
        modes += ["vllm-append", "vllm-prepend"]
    known |= {"vllm-append", "vllm-prepend"}
    if set(modes) - known:
        parser.error(f"unknown modes {sorted(set(modes) - known)}; known: {sorted(known)}")
    if any(m.endswith("-echo") for m in modes) != bool(args.echo_tokens):
        parser.error("the echo modes need --echo-tokens K > 0, and --echo-tokens an echo mode")
    name = args.model or ("default" if args.device == "cpu" else "llama2-7b-shape")
    contexts = [int(x) for x in (args.contexts or ("512,1024,2048" if args.device == "cpu"
                                                   else "1024,4096,8192,16384,32768")).split(",")]
    default_dtype = "float32" if args.device == "cpu" else "bfloat16"
    dtype_name = args.dtype or default_dtype
    model = build_model(name, device, getattr(torch, dtype_name))
    ceilings = measure_ceilings(args.device, getattr(torch, dtype_name))
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, matmul "
          f"{ceilings['matmul_TFLOPs']:.1f} TFLOP/s ({ceilings['matmul_dtype']})", flush=True)
    weights = model_bytes(model)[0]
    rows = []
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    suffix = "" if dtype_name == default_dtype else f"_{dtype_name}"
    out = args.out or RESULTS / f"ralm_e2e_{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    vllm_info = None

    def save():
        out.write_text(json.dumps({"device": dev_name, "threads": torch.get_num_threads(),
                                   "model": name, "dtype": dtype_name, "ceilings": ceilings,
                                   "weights_GB": weights / 2**30, "stride": args.stride,
                                   "passage": args.passage, "cycles": args.cycles,
                                   "echo_tokens": args.echo_tokens, "repeats": args.repeats,
                                   "torch": torch.__version__, "vllm": vllm_info,
                                   "rows": rows}, indent=1))

    with contextlib.ExitStack() as stack:  # entered first: a failure below stops the server
        transport = None
        if any(m.startswith("vllm-") for m in modes):
            # up for the whole run, so its modes interleave with the others: idle, its processes
            # used about 1% of a core here (top, 5 s)
            from importlib.metadata import version

            from flashback_ext.serving.launch import VLLMServer
            from flashback_ext.serving.transports import ServerTransport

            threads = torch.get_num_threads()
            folder = vllm_checkpoint(unpatch_model(model),
                                     Path(stack.enter_context(tempfile.TemporaryDirectory())) / "model")
            server = stack.enter_context(VLLMServer(
                folder, dtype=dtype_name, threads=threads, kv_cache_gb=2,
                enforce_eager=not args.vllm_compile, startup_timeout=600,
                max_model_len=max(contexts) + args.passage + args.stride * (args.cycles + 2) + 64,
                log_path=out.with_suffix(".vllm.log")))
            transport = ServerTransport(server.url)
            vllm_info = {"server": "vllm " + _vllm_version(), "block_size": 32,
                         "compiled": args.vllm_compile,
                         "threads": f"OMP_NUM_THREADS={threads}, VLLM_CPU_OMP_THREADS_BIND=0-{threads - 1}",
                         "transport": "OpenAI completions over localhost HTTP, prompts as token ids",
                         "client": f"transformers {version('transformers')}"}
        for length in contexts:
            rows.append(time_context(args, model, modes, length, device, ceilings, weights,
                                     transport))
            save()  # after every context, so a run cut short still leaves its rows
    print(f"\n{'context':>8} " + " ".join(f"{m:>15}" for m in modes) + "   prepend/append (engine)")
    for row in rows:
        both = "engine-prepend" in row and "engine-append" in row
        ratio = f"{row['engine-prepend'] / row['engine-append']:.2f}x" if both else "n/a"
        print(f"{row['context']:>8} " + " ".join(f"{row[m]:>13.1f}ms" for m in modes) + f"   {ratio}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in modes:
            ax.plot(contexts, [r[mode] for r in rows], marker="o", label=mode)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("ms per retrieval cycle")
        ax.set_xscale("log", base=2)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
