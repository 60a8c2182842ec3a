"""Held-out perplexity when the passage may contain the target, against the library's
leak-controlled passages, for the same contexts and targets.

The library's examples never take a passage from the target's own document or one sharing an
8-token span with the target. The released FlashBack scripts check neither a passage's overlap
with the target nor, with the index their README builds (chunks of WikiText-103's validation and
test splits), its document: their title filter compares a chunk's first line with article titles,
which matches the Wikipedia-DPR index of their ``data_prepare.sh`` but not those chunks. This
rescores exported held-out examples with the passage swapped for the top BM25 hit of the same
query with no exclusion at all ("unfiltered"; everything else unchanged), and reports how often
that passage comes from the same document or contains the target, and what it does to the rows:

    python research/passage_leak_diagnostic.py --examples DIR [--prepend DIR] [--append-markers DIR]

``DIR`` is an examples folder (``flashback examples --out``). The leak-controlled passages are
first re-retrieved the way the examples were built; unless all of them come back, the corpus or
retriever here is not the one that built them and the script stops. Writes JSON (``--out``,
default ``research/results/passage_leak_diagnostic.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def swap_passages(evals, spec, tokenizer, progress=True):
    """``(unfiltered, stats)``: the examples with the top unfiltered hit as their passage."""
    from flashback_ext.pipeline.examples import HITS_PER_TARGET, LEAK_NGRAM, passage_leaks
    from flashback_ext.pipeline.experiment import example_retriever, load_documents

    short = [i for i, ex in enumerate(evals) if len(ex.src) < spec.query_tokens]
    if short:
        raise SystemExit(f"examples {short[:5]} have contexts shorter than the query "
                         f"({spec.query_tokens} tokens): not built by the library's recipe")
    retriever = example_retriever(load_documents(spec.corpus), tokenizer, spec, progress)
    queries = [tokenizer.decode(ex.src[-spec.query_tokens:]) for ex in evals]
    # the builder's own choice again: other documents only, the first hit not sharing a span
    clean_hits = retriever.search_batch(queries, k=HITS_PER_TARGET,
                                        exclude_doc_ids=[[ex.doc_id] for ex in evals])
    reproduced = 0
    for ex, hits in zip(evals, clean_hits):
        first = next((h for h in hits if not passage_leaks(
            h.passage.token_ids[:spec.passage_tokens], ex.tgt)), None)
        reproduced += first is not None and first.passage.id == ex.passage_id
    if reproduced != len(evals):
        raise SystemExit(f"only {reproduced} of {len(evals)} leak-controlled passages came back: "
                         f"the corpus or retriever here did not build these examples")
    unfiltered, same_doc, shares_span, has_target = [], 0, 0, 0
    for ex, hits in zip(evals, retriever.search_batch(queries, k=1)):
        e = list(hits[0].passage.token_ids[:spec.passage_tokens])
        same_doc += hits[0].passage.doc_id == ex.doc_id
        shares_span += passage_leaks(e, ex.tgt)
        has_target += passage_leaks(e, ex.tgt, len(ex.tgt))
        unfiltered.append(dataclasses.replace(ex, e=e, passage_id=hits[0].passage.id))
    total = len(evals)
    return unfiltered, {"examples": total, "clean_passages_reproduced": reproduced,
                        "unfiltered_same_document": same_doc / total,
                        f"unfiltered_shares_{LEAK_NGRAM}_token_span_with_target": shares_span / total,
                        "unfiltered_contains_whole_target": has_target / total}


def main(argv=None) -> int:
    from flashback_ext.engine.models import load_model
    from flashback_ext.pipeline.adapter_io import load_adapter, run_info
    from flashback_ext.pipeline.evaluate import perplexity, ratio_interval
    from flashback_ext.pipeline.experiment import load_exported_examples

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", required=True, help="examples folder (flashback examples --out)")
    p.add_argument("--model", default="default", help="base model folder or 'default'")
    p.add_argument("--prepend", help="a prepend-layout adapter (the P.+LoRA row)")
    p.add_argument("--append-markers", help="an append+markers adapter (the A.+LoRA+M.T. row)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "passage_leak_diagnostic.json"))
    args = p.parse_args(argv)
    # adapters first: a wrong folder fails before the index is built
    settings = [("N.", None, "none", False), ("P.", None, "prepend", False),
                ("A.", None, "append", False)]  # (row, adapter folder or None, layout, markers)
    for row, folder, layout, markers in (("P.+LoRA", args.prepend, "prepend", False),
                                         ("A.+LoRA+M.T.", args.append_markers, "append", True)):
        if folder is None:
            continue
        got = run_info(folder)["settings"]
        if got["layout"] != layout or bool(got["markers"]) != markers:
            raise SystemExit(f"{folder} was trained with layout {got['layout']}, markers "
                             f"{got['markers']}: not a {row} adapter")
        settings.append((row, folder, layout, markers))
    torch.manual_seed(0)
    base, tok = load_model(args.model, device="cpu")
    spec, _, evals = load_exported_examples(args.examples, tok)
    evals = evals[: args.max_examples]
    unfiltered, stats = swap_passages(evals, spec, tok)
    print(json.dumps(stats), flush=True)
    sets = {"clean": evals, "unfiltered": unfiltered}

    results: dict[str, dict[str, dict]] = {name: {} for name in sets}
    for row, folder, layout, markers in settings:
        model, mtok = base, tok
        if folder is not None:
            model, mtok = load_adapter(load_model(args.model, device="cpu")[0], folder, merge=True)
        for name, examples in sets.items():
            if layout == "none" and name == "unfiltered":
                results[name][row] = results["clean"][row]  # no passage: the same inputs
                continue
            start = time.perf_counter()
            r = perplexity(model, mtok, examples, layout, markers, progress=False)
            r["seconds"] = time.perf_counter() - start
            results[name][row] = r
            print(f"{name:>10} {row:<13} ppl {r['ppl']:8.3f}  NLL @0-3 "
                  + " ".join(f"{x:.3f}" for x in r["nll_by_position"][:4]), flush=True)

    summary = {}
    for name, rows in results.items():
        summary[name] = {row: {"ppl": r["ppl"], "over_N": r["ppl"] / rows["N."]["ppl"],
                               "nll_by_place": r["nll_by_position"]} for row, r in rows.items()}
        if "P.+LoRA" in rows and "A.+LoRA+M.T." in rows:
            ratio, low, high = ratio_interval(rows["A.+LoRA+M.T."], rows["P.+LoRA"])
            summary[name]["A.+LoRA+M.T. / P.+LoRA"] = {"ratio": ratio, "interval_95": [low, high]}
            print(f"{name:>10} A.+LoRA+M.T. / P.+LoRA = {ratio:.3f} (95% paired bootstrap "
                  f"{low:.3f}-{high:.3f})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": "held-out perplexity with the library's leak-controlled passages (clean) and "
                "with the top unfiltered BM25 hit (unfiltered), same contexts and targets",
        "examples": args.examples, "examples_spec": dataclasses.asdict(spec),
        "eval_json_md5": hashlib.md5((Path(args.examples) / "eval.json").read_bytes()).hexdigest(),
        "prepend": args.prepend, "append_markers": args.append_markers,
        "device": f"cpu, {torch.get_num_threads()} threads, fp32", "passages": stats,
        "rows": summary}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
