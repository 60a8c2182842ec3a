"""Held-out perplexity in the append layout with a context echo of K tokens (``src | E |
src[-K:] | tgt``, not in the paper), for the base model and for adapters trained WITHOUT an echo:
does re-reading the context's end after the passage help by itself, before any training?

    python research/echo_diagnostic.py --examples DIR [--adapter DIR] [--echo 0,1,4,16]

``DIR`` is an examples folder (``flashback examples --out``); the base model is scored without
markers (the paper's "A." row), an adapter with the markers it was trained with. Writes JSON
(``--out``, default ``research/results/echo_diagnostic.json``): perplexity and mean NLL by target
place per (model, echo).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    from flashback_ext.engine.models import load_model
    from flashback_ext.pipeline.adapter_io import load_adapter, run_info
    from flashback_ext.pipeline.evaluate import perplexity
    from flashback_ext.pipeline.experiment import load_exported_examples

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", required=True, help="examples folder (flashback examples --out)")
    p.add_argument("--model", default="default", help="base model folder or 'default'")
    p.add_argument("--adapter", action="append", default=[],
                   help="an append-layout adapter folder (repeatable); the base model is always scored")
    p.add_argument("--echo", default="0,1,4,16", help="comma-separated echo lengths")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "echo_diagnostic.json"))
    args = p.parse_args(argv)
    echoes = [int(x) for x in args.echo.split(",")]
    torch.manual_seed(0)
    rows = []
    # the examples were cut with the base tokenizer (an adapter's only adds the two markers)
    _, _, evals = load_exported_examples(args.examples, load_model(args.model, device="cpu")[1])
    evals = evals[: args.max_examples]
    for which in [None, *args.adapter]:
        model, tok = load_model(args.model, device="cpu")
        markers, trained_echo = False, 0
        if which is not None:
            info = run_info(which)
            if info["settings"]["layout"] != "append":
                raise SystemExit(f"{which} is not an append-layout adapter")
            if info["settings"].get("passage_positions", "after") != "after":
                raise SystemExit(f"{which} puts the passage at other positions: an echo does not "
                                 "combine with them")
            markers = bool(info["settings"]["markers"])
            trained_echo = int(info["settings"].get("echo_tokens", 0))
            model, tok = load_adapter(model, which, merge=True)
        for echo in echoes:
            start = time.perf_counter()
            r = perplexity(model, tok, evals, "append", markers, echo=echo, progress=False)
            by_place = r["nll_by_position"]
            rows.append({"model": which or "base", "markers": markers, "echo": echo,
                         "trained_echo": trained_echo,
                         "ppl": r["ppl"], "tokens": r["tokens"],
                         "nll_by_place": by_place, "seconds": time.perf_counter() - start})
            print(f"{which or 'base'}: echo {echo:>2}  ppl {r['ppl']:8.3f}  NLL @0-3 "
                  + " ".join(f"{x:.3f}" for x in by_place[:4]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"examples": args.examples, "held_out": len(evals),
                               "device": f"cpu, {torch.get_num_threads()} threads, fp32",
                               "rows": rows}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
