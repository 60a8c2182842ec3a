"""The ``flashback`` command line: ``demo`` (the main job), ``generate``, ``index build|search``,
and the paper's pipeline: ``examples``, ``train``, ``eval``.

Everything runs offline on the embedded defaults: the SmolLM2-135M-Instruct model and the
Python language reference shipped with CPython as the retrieval corpus.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from . import experiments, serve
from .common import CliError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashback", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    serve.add_commands(sub)
    experiments.add_commands(sub)
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
        if isinstance(value, list):  # eval's --passage-tokens sweep checks its own values
            continue
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
