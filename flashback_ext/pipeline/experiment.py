"""Shared preparation for ``flashback train`` and ``flashback eval``: the corpus, the BM25
retriever over its passages, the split by document and the cached train/eval examples, so that
every run with the same settings scores exactly the same held-out examples."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..engine.models import cache_dir
from ..engine.retrieval import BM25Retriever, Corpus
from .corpora import drop_license_text, gnu_manuals
from .examples import (
    DataError,
    Example,
    build_examples,
    load_or_build_examples,
    python_docs,
    split_by_document,
)

__all__ = ["ExampleSpec", "prepare_examples", "load_documents", "export_examples",
           "load_exported_examples", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)


@dataclass
class ExampleSpec:
    # python-docs | default (language reference only) | gnu-manuals (out of domain) | a path
    corpus: str = "python-docs"
    stride: int = 16
    query_tokens: int = 32
    passage_tokens: int = 128
    budget: int = 512
    eval_fraction: float = 0.1
    max_train: int = 2000
    max_eval: int = 200
    seed: int = 0
    train_target_phases: int = 1  # > 1: more training examples from the same documents
    # > 0: training passages cut to random lengths in [this, passage_tokens] (0: all full length)
    train_min_passage_tokens: int = 0


NAMED_CORPORA = ("python-docs", "default", "gnu-manuals")


def load_documents(spec: str) -> list[tuple[str, str, str]]:
    """``python-docs``: CPython's reference + stdlib docstrings; ``default``: the reference only;
    ``gnu-manuals``: the system's GNU info manuals, the out-of-domain corpus (:mod:`.corpora`);
    otherwise a .txt/.md file or folder. License and copyright paragraphs are removed from every
    corpus (:func:`.corpora.drop_license_text`)."""
    if spec == "python-docs":
        return drop_license_text(python_docs())
    if spec == "default":
        return drop_license_text(python_docs(docstrings=False))
    if spec == "gnu-manuals":
        return gnu_manuals()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist (named corpora: "
                                f"{', '.join(NAMED_CORPORA)})")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                   if p.suffix in (".txt", ".md") and p.is_file())
    return drop_license_text((str(p), p.stem, p.read_text(errors="replace")) for p in files)


def example_retriever(docs, tokenizer, spec: ExampleSpec, progress: bool = True) -> BM25Retriever:
    """The retriever examples are built with: BM25 over every document (held-out ones too), cut
    into ``spec.passage_tokens``-token passages."""
    return BM25Retriever(Corpus.from_documents(docs, tokenizer, spec.passage_tokens,
                                               progress=progress))


def prepare_examples(tokenizer, spec: ExampleSpec, progress: bool = True,
                     model_key: Optional[str] = None) -> tuple[list[Example], list[Example]]:
    """``(train, eval)`` examples, cached under the cache dir by settings and tokenizer."""
    docs = load_documents(spec.corpus)
    train_docs, eval_docs = split_by_document(docs, spec.eval_fraction, spec.seed)
    key = dict(asdict(spec), tokenizer=model_key or tokenizer.name_or_path, vocab=len(tokenizer),
               docs=len(docs))
    # training-only options at their defaults keep the cache keys of earlier releases;
    # held-out examples never depend on them
    phases = key.pop("train_target_phases")
    min_passage = key.pop("train_min_passage_tokens")
    train_key = dict(key, part="train", **({"train_target_phases": phases} if phases != 1 else {}),
                     **({"train_min_passage_tokens": min_passage} if min_passage else {}))
    state: dict = {}

    def retriever():
        if "r" not in state:
            state["r"] = example_retriever(docs, tokenizer, spec, progress)
        return state["r"]

    def build(part_docs, count, seed, n_phases, min_passage_tokens):
        return lambda: build_examples(part_docs, tokenizer, retriever(), stride=spec.stride,
                                      query_tokens=spec.query_tokens,
                                      passage_tokens=spec.passage_tokens, budget=spec.budget,
                                      seed=seed, max_examples=count, target_phases=n_phases,
                                      min_passage_tokens=min_passage_tokens, progress=progress)

    folder = cache_dir() / "examples"
    train = load_or_build_examples(folder / "train.json", train_key,
                                   build(train_docs, spec.max_train, spec.seed, phases,
                                         min_passage))
    # held-out examples always follow the recipe (one phase, full passages), whatever the
    # training side uses
    evals = load_or_build_examples(folder / "eval.json", dict(key, part="eval"),
                                   build(eval_docs, spec.max_eval, spec.seed + 1, 1, 0))
    logger.info("%d train / %d eval examples from %d / %d documents", len(train), len(evals),
                len(train_docs), len(eval_docs))
    return train, evals


_EXPORT_FILES = ("train.json", "eval.json", "spec.json")  # spec.json last: it seals the folder


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id), to refuse examples cut by
    another tokenizer of the same size."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(vocab.encode()).hexdigest()[:16]


def export_examples(folder: str | Path, spec: ExampleSpec, train: list[Example],
                    evals: list[Example], tokenizer) -> Path:
    """Write ``(train, eval)`` examples and their settings to ``folder``, so that a machine
    without the corpus or the retriever (a GPU box, say) trains and scores exactly these.

    ``spec.json`` is written last and records each file's hash, so a folder left half-written
    (or mixed with an older export) is refused on load rather than read.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.json").unlink(missing_ok=True)  # unsealed until the new files are in
        hashes = {}
        for name, rows in zip(_EXPORT_FILES, (train, evals)):
            data = json.dumps([asdict(x) for x in rows]).encode()
            hashes[name] = hashlib.sha1(data).hexdigest()
            (folder / (name + ".tmp")).write_bytes(data)
            os.replace(folder / (name + ".tmp"), folder / name)
        meta = {"spec": asdict(spec), "vocab": len(tokenizer),
                "tokenizer": tokenizer_fingerprint(tokenizer), "train": len(train),
                "eval": len(evals), "sha1": hashes}
        (folder / "spec.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(folder / "spec.json.tmp", folder / "spec.json")
    except OSError as exc:
        raise DataError(f"cannot write examples to {folder}: {exc}") from None
    return folder


def _check_rows(rows: list[Example], vocab: int, where: str) -> None:
    for i, ex in enumerate(rows):
        ids = (*ex.src, *ex.e, *ex.tgt)
        if not ex.tgt or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise DataError(f"{where}: example {i} has no target or a token id outside "
                            f"[0, {vocab})")


def load_exported_examples(folder: str | Path, tokenizer) -> tuple[ExampleSpec, list[Example],
                                                                   list[Example]]:
    """``(spec, train, eval)`` from a folder written by :func:`export_examples`, refused when
    it is incomplete, was altered, or was cut with another tokenizer than ``tokenizer``."""
    folder = Path(folder)
    missing = [n for n in _EXPORT_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is not an examples folder (missing {', '.join(missing)}; "
                        "write one with `flashback examples --out DIR`)")
    try:
        meta = json.loads((folder / "spec.json").read_text())
        spec = ExampleSpec(**meta["spec"])
        data = {n: (folder / n).read_bytes() for n in _EXPORT_FILES[:2]}
        changed = [n for n, b in data.items() if hashlib.sha1(b).hexdigest() != meta["sha1"][n]]
        if changed:
            raise DataError(f"{folder}: {', '.join(changed)} do(es) not match spec.json (a partial "
                            "or mixed export?): write the folder again")
        train, evals = ([Example(**row) for row in json.loads(data[n])] for n in _EXPORT_FILES[:2])
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(f"{folder}: unreadable examples ({exc!r})") from None
    fingerprint = tokenizer_fingerprint(tokenizer)
    if meta.get("vocab") != len(tokenizer) or meta.get("tokenizer") != fingerprint:
        raise DataError(f"{folder}: examples were cut with another tokenizer ({meta.get('vocab')} "
                        f"tokens, fingerprint {meta.get('tokenizer')}); this one has "
                        f"{len(tokenizer)} tokens, fingerprint {fingerprint}")
    if len(train) != meta.get("train") or len(evals) != meta.get("eval") or not evals:
        raise DataError(f"{folder}: example counts do not match spec.json")
    _check_rows(train, len(tokenizer), f"{folder}/train.json")
    _check_rows(evals, len(tokenizer), f"{folder}/eval.json")
    return spec, train, evals
