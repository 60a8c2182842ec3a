"""The paper's pipeline on the command line: ``flashback examples``, ``train`` and ``eval``."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError, is_main_process, load_base

__all__ = ["add_commands", "cmd_examples", "cmd_train", "cmd_eval"]


def add_commands(sub) -> None:
    """The ``train``, ``examples`` and ``eval`` subcommands."""
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
    train.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                       help="compute precision (default auto: bf16 autocast on CUDA and on CPUs "
                            "with AMX or AVX512-BF16, fp32 elsewhere; LoRA and marker rows are "
                            "kept in fp32 either way)")
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
                            "context; with --echo-tokens K all of <MARK_L> passage <MARK_R> sits "
                            "before the context and the echo at its own tokens' positions "
                            "(--layout append with markers; eval and the engine read it from the "
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
    _add_example_args(ev, sweep=True)
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



# example options -> ExampleSpec fields (fixed by an --examples folder), and their defaults
_SPEC_OPTIONS = {"corpus": "corpus", "stride": "stride", "query_tokens": "query_tokens",
                 "passage_tokens": "passage_tokens", "budget": "budget",
                 "eval_fraction": "eval_fraction", "max_train_examples": "max_train",
                 "max_eval_examples": "max_eval", "train_target_phases": "train_target_phases",
                 "train_min_passage_tokens": "train_min_passage_tokens"}
_SPEC_DEFAULTS = {"corpus": "python-docs", "stride": 16, "query_tokens": 32, "passage_tokens": 128,
                  "budget": 512, "eval_fraction": 0.1, "max_train_examples": 2000,
                  "max_eval_examples": 200, "train_target_phases": 1, "train_min_passage_tokens": 0}


def _passage_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,... (e.g. 32,64,128), got {text!r}") \
            from None
    if not lengths or min(lengths) < 1 or len(set(lengths)) != len(lengths):
        raise argparse.ArgumentTypeError(f"expected distinct positive lengths, got {text!r}")
    return lengths


def _add_example_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    p.add_argument("--model", default="default", help="base model folder or 'default'")
    p.add_argument("--device", default=None)
    p.add_argument("--corpus", default=_SPEC_DEFAULTS["corpus"],
                   help="python-docs (CPython reference + stdlib docstrings), gnu-manuals (the "
                        "system's GNU info manuals: out of domain), default (reference "
                        "only) or a .txt file / folder")
    p.add_argument("--stride", type=int, default=_SPEC_DEFAULTS["stride"])
    p.add_argument("--query-tokens", type=int, default=_SPEC_DEFAULTS["query_tokens"])
    if sweep:
        p.add_argument("--passage-tokens", type=_passage_lengths,
                       default=[_SPEC_DEFAULTS["passage_tokens"]], metavar="N[,N...]",
                       help="held-out passage length; several (32,64,128) score every row at "
                            "each, with examples built per length, into one table and one JSON")
    else:
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
    from ..engine.retrieval import RetrievalError
    from ..pipeline.examples import DataError
    from ..pipeline.experiment import ExampleSpec, load_exported_examples, prepare_examples

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
    from ..pipeline.examples import DataError
    from ..pipeline.experiment import export_examples

    if args.examples:
        raise CliError("flashback examples builds examples: --examples reads them (drop it)")
    tokenizer = load_base(args)[1]
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

    from ..layout import check_echo, check_passage_positions
    from ..pipeline.adapter_io import AdapterError, run_info
    from ..pipeline.train import TrainSettings, check_distill, train_adapter

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
    model, tokenizer = load_base(args)
    spec, train, evals = _examples(args, tokenizer)
    settings = TrainSettings(layout=args.layout, markers=markers,
                             passage_positions=args.passage_positions,
                             steps=args.steps, batch_size=args.batch_size,
                             grad_accum=args.grad_accum, lr=args.lr, marker_lr=args.marker_lr,
                             target_modules=[m for m in args.lora_targets.split(",") if m],
                             lora_r=args.lora_r,
                             lora_alpha=args.lora_alpha, seed=args.seed,
                             save_steps=args.save_steps, eval_every=args.eval_every or 0,
                             echo_tokens=args.echo_tokens, precision=args.precision,
                             **distill)
    try:
        out = train_adapter(model, tokenizer, train, args.out, settings=settings,
                            resume=args.resume, init_adapter=args.init_adapter,
                            eval_examples=evals,
                            extra_info={"examples_spec": asdict(spec), "model": str(args.model),
                                        "examples_dir": args.examples})
    except (AdapterError, ValueError) as exc:
        raise CliError(str(exc).splitlines()[0]) from None
    if is_main_process():  # only rank 0 wrote the adapter
        print(f"adapter saved to {out}")
    return 0


def cmd_eval(args) -> int:
    """Perplexity table in the paper's settings for the base model and the given adapters."""
    import json

    from ..pipeline.adapter_io import AdapterError
    from ..pipeline.evaluate import TABLE_ROWS, score_table, sweep_table

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
    lengths = args.passage_tokens
    if args.examples and len(lengths) > 1:
        raise CliError("--examples fixes the passage length: a --passage-tokens sweep builds its "
                       "own examples (drop one of them)")
    model, tokenizer = load_base(args)
    runs = []
    for length in lengths:
        args.passage_tokens = length  # _examples reads one length
        spec, _, evals = _examples(args, tokenizer)
        if len(lengths) > 1:
            print(f"\n## held-out passages of {spec.passage_tokens} tokens", flush=True)
        try:
            rows = score_table(model, tokenizer, lambda: load_base(args)[0], evals, adapters,
                               wanted, batch_size=args.batch_size,
                               report=lambda line: print(line, flush=True))
        except AdapterError as exc:
            raise CliError(str(exc)) from None
        runs.append(_report_run(rows, spec, evals, adapters))
    args.passage_tokens = lengths
    if len(runs) > 1:
        table = sweep_table(runs)
        print("\n" + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        # one length: the single table's JSON as before; a sweep: one entry per length
        data = runs[0] if len(runs) == 1 else {"passage_tokens": lengths, "runs": runs,
                                                "table": table, "adapters": adapters}
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


def _report_run(rows: list, spec, evals: list, adapters: dict) -> dict:
    """Print one length's table, place table and ratios; return its JSON record."""
    from ..pipeline.evaluate import (
        append_over_prepend,
        append_ratios,
        markdown_table,
        position_table,
    )

    table, places = markdown_table(rows), position_table(rows)
    print("\n" + table + "\n\nmean NLL by target place (0 = first token after the passage "
          "in the append rows):\n\n" + places)
    goal = append_over_prepend(rows)
    if goal is not None:
        echo, positions = goal["echo_tokens"], goal["passage_positions"]
        print(f"\nA.+LoRA+M.T. / P.+LoRA = {goal['ratio']:.3f} (95% paired bootstrap interval "
              f"over the {len(evals)} held-out examples: {goal['low']:.3f}-{goal['high']:.3f})"
              + (f"; with a {echo}-token context echo, not the paper's layout" if echo else "")
              + ("; with the passage at rotary positions before the context, not the paper's "
                 "positions" if positions == "before" else ""))
    ratios = append_ratios(rows)
    return {"passage_tokens": spec.passage_tokens, "rows": rows, "examples": len(evals),
            "adapters": adapters, "spec": spec.__dict__, "table": table,
            "position_table": places, "append_markers_over_prepend_lora": goal,
            "ratios": ratios}
