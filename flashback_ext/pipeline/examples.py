"""Training/evaluation examples in the FlashBack recipe.

One example = one retrieval: ``src`` (context), ``e`` (one retrieved passage, <= passage_tokens),
``tgt`` (the next ``stride`` tokens). Targets step by ``stride`` through each document; the query
is the ``query_tokens`` tokens before the target; ``len(src) + len(e)`` is a random ``center`` in
``[budget // 2, budget - stride - 1]`` so every example fits the token budget (the paper: 512;
the markers and a context echo come on top). How an example is laid out for the model is
:mod:`flashback_ext.layout`; batches of them are :mod:`.batches`.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

__all__ = ["Example", "DataError", "python_docs", "split_by_document", "build_examples",
           "load_or_build_examples", "passage_leaks", "LEAK_NGRAM", "HITS_PER_TARGET"]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Examples cannot be built (corpus too short, no usable retrieval hits...)."""


@dataclass
class Example:
    src: list[int]
    e: list[int]
    tgt: list[int]
    doc_id: str
    passage_id: int


def python_docs(max_docs: Optional[int] = None, docstrings: bool = True) -> list[tuple[str, str, str]]:
    """An offline English corpus from CPython itself: the language reference topics
    (``pydoc_data.topics``) and the standard library's module docstrings (parsed, not imported)."""
    from pydoc_data.topics import topics

    docs = [(f"topic:{name}", name, text) for name, text in sorted(topics.items())]
    if docstrings:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/__init__.py")):
            try:
                tree = ast.parse(path.read_text(errors="replace"))
            except (SyntaxError, ValueError):
                continue
            parts = [ast.get_docstring(tree) or ""]
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 80:
                        parts.append(doc)
            text = "\n\n".join(p for p in parts if p)
            if len(text) > 2000:
                name = path.stem if path.name != "__init__.py" else path.parent.name
                docs.append((f"module:{name}", name, text))
    return docs[:max_docs] if max_docs else docs


def split_by_document(docs: Sequence[tuple[str, str, str]], eval_fraction: float = 0.1,
                      seed: int = 0) -> tuple[list, list]:
    """Disjoint (train, eval) document lists: no document contributes to both."""
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    order = list(docs)
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * eval_fraction))
    if len(order) - n_eval < 1:
        raise DataError(f"need at least 2 documents to split, got {len(order)}")
    return order[n_eval:], order[:n_eval]


def _ngrams(ids: Sequence[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


LEAK_NGRAM = 8  # a passage sharing a span this long with the target is never used
HITS_PER_TARGET = 4  # hits fetched per target; the first usable one is kept


def passage_leaks(passage: Sequence[int], target: Sequence[int],
                  leak_ngram: int = LEAK_NGRAM) -> bool:
    """Whether ``passage`` shares a ``leak_ngram``-token span with ``target`` (the whole target if
    it is shorter), or is empty: the example builder never uses such a passage."""
    n = min(leak_ngram, len(target))
    return not passage or bool(_ngrams(target, n) & _ngrams(passage, n))


def build_examples(docs: Sequence[tuple[str, str, str]], tokenizer, retriever, *, stride: int = 16,
                   query_tokens: int = 32, passage_tokens: int = 128, budget: int = 512,
                   seed: int = 0, max_examples: Optional[int] = None,
                   exclude_same_doc: bool = True, leak_ngram: int = LEAK_NGRAM,
                   target_phases: int = 1, min_passage_tokens: int = 0,
                   progress: bool = True) -> list[Example]:
    """Examples from ``docs`` (``(doc_id, title, text)``) with passages from ``retriever``.

    Targets start every ``stride`` tokens after the first ``query_tokens`` (the official recipe).
    ``target_phases`` > 1 also starts them ``stride / target_phases``, ``2 * stride /
    target_phases``, ... tokens later: more distinct examples from the same documents, for
    training; with 1 the examples are exactly the recipe's.

    ``min_passage_tokens`` > 0 cuts each passage to a random length in ``[min_passage_tokens,
    passage_tokens]`` (its first tokens), for training an adapter that resumes the context after
    passages of any length up to ``passage_tokens``; with 0 every passage keeps up to
    ``passage_tokens`` tokens (the recipe), and the examples are exactly those of earlier releases.

    Leakage control: a passage sharing any ``leak_ngram``-token span with the target (or the whole
    target, if shorter) is never used, nor one from the same document when ``exclude_same_doc``.
    """
    if budget // 2 <= passage_tokens + 2 or budget // 2 > budget - stride - 1:
        raise DataError(f"budget {budget} is too small for stride {stride} and passages of "
                        f"{passage_tokens} tokens (need budget // 2 > passage_tokens + 2)")
    if not 1 <= target_phases <= stride:
        raise DataError(f"target_phases must be in [1, stride={stride}], got {target_phases}")
    if not 0 <= min_passage_tokens <= passage_tokens:
        raise DataError(f"min_passage_tokens must be in [0, passage_tokens={passage_tokens}], got "
                        f"{min_passage_tokens}")
    rng = random.Random(seed)
    candidates = []
    for doc_id, _title, text in docs:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for phase in range(target_phases):
            first = query_tokens + phase * stride // target_phases
            for t in range(first, len(ids) - stride + 1, stride):
                candidates.append((doc_id, ids, t))
    if not candidates:
        raise DataError(f"the corpus is too short: no document has {query_tokens + stride} tokens")
    rng.shuffle(candidates)
    want = max_examples or len(candidates)
    examples: list[Example] = []
    chunk = 64
    bar = tqdm(total=want, desc="building examples", disable=not progress)
    for start in range(0, len(candidates), chunk):
        if len(examples) >= want:
            break
        part = candidates[start:start + chunk]
        queries = [tokenizer.decode(ids[t - query_tokens:t]) for _, ids, t in part]
        excl = [[doc] if exclude_same_doc else [] for doc, _, _ in part]
        hits = retriever.search_batch(queries, k=HITS_PER_TARGET, exclude_doc_ids=excl)
        for (doc_id, ids, t), doc_hits in zip(part, hits):
            tgt = ids[t:t + stride]
            for hit in doc_hits:
                # the draw only when asked: the recipe's examples stay those of earlier releases
                keep = rng.randint(min_passage_tokens, passage_tokens) if min_passage_tokens \
                    else passage_tokens
                e = list(hit.passage.token_ids[:keep])
                if passage_leaks(e, tgt, leak_ngram):
                    continue
                center = rng.randint(budget // 2, budget - stride - 1)
                src = ids[max(0, t - max(1, center - len(e))):t]
                examples.append(Example(src, e, tgt, doc_id, hit.passage.id))
                bar.update(1)
                break
            if len(examples) >= want:
                break
    bar.close()
    if not examples:
        raise DataError("no example could be built: the retriever returned no usable passage "
                        "(all hits were excluded or overlapped the targets)")
    return examples


def load_or_build_examples(cache_file: Path, build_settings: dict, build) -> list[Example]:
    """Examples cached as JSON keyed by a hash of ``build_settings`` (rebuilt when they change)."""
    key = hashlib.sha1(json.dumps(build_settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_file.with_name(f"{cache_file.stem}-{key}.json")
    if path.exists():
        try:
            return [Example(**row) for row in json.loads(path.read_text())]
        except (json.JSONDecodeError, TypeError):
            logger.warning("rebuilding unreadable example cache %s", path)
    examples = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(x) for x in examples]))
    tmp.rename(path)
    return examples
