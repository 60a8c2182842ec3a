"""Shared preparation for ``flashback train`` and ``flashback eval``: the corpus, the BM25
retriever over its passages, the split by document and the cached train/eval examples, so that
every run with the same settings scores exactly the same held-out examples."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .data import DataError, Example, build_examples, load_or_build_examples, python_docs, split_by_document
from .models import cache_dir
from .retrieval import BM25Retriever, Corpus

__all__ = ["ExampleSpec", "prepare_examples", "load_documents", "export_examples",
           "load_exported_examples"]

logger = logging.getLogger(__name__)


@dataclass
class ExampleSpec:
    corpus: str = "python-docs"  # python-docs | default (language reference only) | a path
    stride: int = 16
    query_tokens: int = 32
    passage_tokens: int = 128
    budget: int = 512
    eval_fraction: float = 0.1
    max_train: int = 2000
    max_eval: int = 200
    seed: int = 0
    train_target_phases: int = 1  # > 1: more training examples from the same documents


def load_documents(spec: str) -> list[tuple[str, str, str]]:
    """``python-docs``: CPython's reference + stdlib docstrings; ``default``: the reference only;
    otherwise a file/folder/JSONL path as for retrieval corpora."""
    if spec == "python-docs":
        return python_docs()
    if spec == "default":
        return python_docs(docstrings=False)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                   if p.suffix in (".txt", ".md") and p.is_file())
    return [(str(p), p.stem, p.read_text(errors="replace")) for p in files]


def prepare_examples(tokenizer, spec: ExampleSpec, progress: bool = True,
                     model_key: Optional[str] = None) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` examples, cached under the cache dir by settings and tokenizer."""
    docs = load_documents(spec.corpus)
    train_docs, eval_docs = split_by_document(docs, spec.eval_fraction, spec.seed)
    key = dict(asdict(spec), tokenizer=model_key or tokenizer.name_or_path, vocab=len(tokenizer),
               docs=len(docs))
    # one phase keeps the cache keys of earlier releases; held-out examples never depend on it
    phases = key.pop("train_target_phases")
    train_key = dict(key, part="train", **({"train_target_phases": phases} if phases != 1 else {}))
    state: dict = {}

    def retriever():
        if "r" not in state:
            corpus = Corpus.from_documents(docs, tokenizer, spec.passage_tokens, progress=progress)
            state["r"] = BM25Retriever(corpus)
        return state["r"]

    def build(part_docs, count, seed, n_phases):
        return lambda: build_examples(part_docs, tokenizer, retriever(), stride=spec.stride,
                                      query_tokens=spec.query_tokens,
                                      passage_tokens=spec.passage_tokens, budget=spec.budget,
                                      seed=seed, max_examples=count, target_phases=n_phases,
                                      progress=progress)

    folder = cache_dir() / "examples"
    train = load_or_build_examples(folder / "train.json", train_key,
                                   build(train_docs, spec.max_train, spec.seed, phases))
    # held-out examples always follow the recipe (one phase), whatever the training side uses
    evals = load_or_build_examples(folder / "eval.json", dict(key, part="eval"),
                                   build(eval_docs, spec.max_eval, spec.seed + 1, 1))
    logger.info("%d train / %d eval examples from %d / %d documents", len(train), len(evals),
                len(train_docs), len(eval_docs))
    return train, evals


_EXPORT_FILES = ("spec.json", "train.json", "eval.json")


def export_examples(folder: str | Path, spec: ExampleSpec, train: list[Example],
                    evals: list[Example], vocab: int) -> Path:
    """Write ``(train, eval)`` examples and their settings to ``folder``, so that a machine
    without the corpus or the retriever (a GPU box, say) trains and scores exactly these."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"spec": asdict(spec), "vocab": vocab, "train": len(train), "eval": len(evals)}
    for name, payload in zip(_EXPORT_FILES, (meta, [asdict(x) for x in train],
                                             [asdict(x) for x in evals])):
        tmp = folder / (name + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.rename(folder / name)
    return folder


def load_exported_examples(folder: str | Path, vocab: int) -> tuple[ExampleSpec, list[Example],
                                                                    list[Example]]:
    """``(spec, train, eval)`` from a folder written by :func:`export_examples`; ``vocab`` is
    the base tokenizer's size, which must match the one the examples were cut with."""
    folder = Path(folder)
    missing = [n for n in _EXPORT_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is not an examples folder (missing {', '.join(missing)}; "
                        "write one with `flashback examples --out DIR`)")
    try:
        meta = json.loads((folder / "spec.json").read_text())
        spec = ExampleSpec(**meta["spec"])
        train, evals = ([Example(**row) for row in json.loads((folder / n).read_text())]
                        for n in _EXPORT_FILES[1:])
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise DataError(f"{folder}: unreadable examples ({exc})") from None
    if meta.get("vocab") != vocab:
        raise DataError(f"{folder}: examples were cut with a {meta.get('vocab')}-token vocabulary, "
                        f"this tokenizer has {vocab}")
    if len(train) != meta.get("train") or len(evals) != meta.get("eval") or not evals:
        raise DataError(f"{folder}: example counts do not match spec.json")
    return spec, train, evals
