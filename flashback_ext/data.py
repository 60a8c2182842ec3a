"""Training/evaluation examples in the FlashBack recipe, and the collator for the three layouts.

One example = one retrieval: ``src`` (context), ``e`` (one retrieved passage, <= passage_tokens),
``tgt`` (the next ``stride`` tokens). Targets step by ``stride`` through each document; the query
is the ``query_tokens`` tokens before the target; ``len(src) + len(e)`` is a random ``center`` in
``[budget // 2, budget - stride - 1]`` so every example fits the token budget (the paper: 512;
the markers and a context echo, below, come on top).

Layouts (plain causal mask, contiguous positions; loss on ``tgt`` only):
``none = src | tgt``, ``prepend = E | src | tgt``, ``append = src | E | tgt`` with
``E = <MARK_L> e <MARK_R>`` when markers are used, else ``e``.

Not in the paper: ``append`` with a context echo of ``k`` tokens, ``src | E | src[-k:] | tgt``.
The first target tokens are then predicted from a copy of the context's last tokens that has
read the passage, instead of from ``<MARK_R>``: that is where the appended layout loses most
(docs/RESULTS.md). It costs ``k`` more tokens per retrieval block at generation.

Not in the paper either: ``passage_positions="before"`` keeps the append layout's token order
(and so its KV-cache reuse) but gives the passage the rotary positions it would have if it had
been prepended, ``<MARK_L> e`` before the context, and ``<MARK_R>`` the position right after the
context, where the first target token is predicted. RoPE sees only position differences, so the
context's tail is again 1-2 positions from the targets instead of a passage away
(:func:`layout_positions`). ``"after"`` (default) is the paper's contiguous positions.
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
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["Example", "LAYOUTS", "PASSAGE_POSITIONS", "split_by_document", "build_examples",
           "load_or_build_examples", "layout_tokens", "layout_positions", "check_echo",
           "check_passage_positions", "check_attention_for_positions", "Collator", "python_docs",
           "DataError", "target_nll", "target_token_nll", "exclude_logits", "forward_batch"]

logger = logging.getLogger(__name__)
LAYOUTS = ("none", "prepend", "append")
# where the appended passage sits in RoPE positions: "after" the context (the paper), or "before"
PASSAGE_POSITIONS = ("after", "before")


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


def check_echo(layout: str, echo: int) -> None:
    """A context echo is a variant of the append layout only."""
    if not isinstance(echo, int) or isinstance(echo, bool) or echo < 0:
        raise ValueError(f"echo must be an int >= 0, got {echo!r}")
    if echo and layout != "append":
        raise ValueError(f"a context echo ({echo} tokens) needs the append layout, got {layout!r}")


def layout_tokens(ex: Example, layout: str, markers: Optional[tuple[int, int]],
                  echo: int = 0) -> tuple[list[int], int]:
    """``(token ids, index where tgt starts)`` of one example in one layout; ``echo`` > 0 repeats
    the last ``echo`` context tokens after the passage (append only)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_echo(layout, echo)
    e = [markers[0], *ex.e, markers[1]] if markers else list(ex.e)
    if layout == "none":
        head = list(ex.src)
    elif layout == "prepend":
        head = e + list(ex.src)
    else:
        head = list(ex.src) + e + (list(ex.src[-echo:]) if echo else [])
    return head + list(ex.tgt), len(head)


def check_passage_positions(layout: str, markers, passage_positions: str, echo: int = 0) -> None:
    """``"before"`` is a variant of the append layout with markers and no echo only."""
    if passage_positions not in PASSAGE_POSITIONS:
        raise ValueError(f"passage_positions must be one of {PASSAGE_POSITIONS}, "
                         f"got {passage_positions!r}")
    if passage_positions == "before":
        if layout != "append":
            raise ValueError(f"passage_positions 'before' needs the append layout, got {layout!r}")
        if not markers:
            # without <MARK_R> the first target would be predicted at a passage token
            raise ValueError("passage_positions 'before' needs the marking tokens")
        if echo:
            raise ValueError("passage_positions 'before' and a context echo do not combine")


def check_attention_for_positions(model, passage_positions: str) -> None:
    """FlashAttention-2 in transformers reads non-consecutive ``position_ids`` of an unpadded
    batch as packed sequences and cuts attention between them: refuse it for "before"."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if passage_positions == "before" and impl and "flash_attention" in str(impl):
        raise ValueError(f"passage_positions 'before' needs sdpa or eager attention, not {impl!r} "
                         "(it would read the positions as packed sequences)")


def layout_positions(ex: Example, layout: str, markers: Optional[tuple[int, int]],
                     echo: int = 0, passage_positions: str = "after") -> list[int]:
    """Rotary position of each token of :func:`layout_tokens`: ``0, 1, 2...`` for ``"after"``;
    for ``"before"``, ``<MARK_L> e`` take ``0 .. len(e)``, the context the next ``len(src)``
    positions, ``<MARK_R>`` the one after them and the targets follow it."""
    check_passage_positions(layout, markers, passage_positions, echo)
    if passage_positions == "after":
        return list(range(len(layout_tokens(ex, layout, markers, echo)[0])))
    head = len(ex.e) + 1  # <MARK_L> e
    n_src = len(ex.src)
    return (list(range(head, head + n_src)) + list(range(head))
            + list(range(head + n_src, head + n_src + 1 + len(ex.tgt))))


class Collator:
    """Left-padded batches with labels only on the target tokens (-100 elsewhere).

    Left padding puts every row's targets in the last columns, so the model only needs logits
    for the last ``keep_logits(batch)`` positions (``logits_to_keep``): the LM head over the full
    vocabulary is the most expensive layer of a small model. RoPE is relative, so the uniform
    position shift of a left-padded row leaves its attention unchanged.
    """

    def __init__(self, layout: str, markers: Optional[tuple[int, int]], pad_id: int = 0,
                 echo: int = 0, passage_positions: str = "after") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        check_echo(layout, echo)
        check_passage_positions(layout, markers, passage_positions, echo)
        self.layout, self.markers, self.pad_id, self.echo = layout, markers, pad_id, echo
        self.passage_positions = passage_positions

    def __call__(self, batch_in: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [layout_tokens(ex, self.layout, self.markers, self.echo) for ex in batch_in]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, start) in enumerate(rows):
            pad = width - len(ids)
            input_ids[i, pad:] = torch.tensor(ids)
            labels[i, pad + start:] = torch.tensor(ids[start:])
            mask[i, pad:] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.passage_positions != "after":  # else the model's own 0, 1, 2... (and padding)
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            for i, ex in enumerate(batch_in):
                pos = layout_positions(ex, self.layout, self.markers, self.echo,
                                       self.passage_positions)
                positions[i, width - len(pos):] = torch.tensor(pos)
            batch["position_ids"] = positions
        return batch

    @staticmethod
    def keep_logits(labels: torch.Tensor) -> int:
        """How many trailing positions' logits the loss needs (targets + the one before)."""
        return int((labels != -100).sum(1).max()) + 1


def exclude_logits(logits: torch.Tensor, exclude_ids: Iterable[int]) -> torch.Tensor:
    """``logits`` in float32 with the ``exclude_ids`` columns (the markers) at -inf, so that the
    softmax leaves them out; the caller's tensor is never written."""
    logits = logits.float()
    excl = list(exclude_ids)
    if excl:
        logits = logits.clone()
        logits[..., excl] = float("-inf")
    return logits


def forward_batch(model, batch: dict, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions of a :class:`Collator` batch, on the model's
    device (with the batch's ``position_ids`` when it has them)."""
    device = next(model.parameters()).device
    extra = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
    return model(input_ids=batch["input_ids"].to(device),
                 attention_mask=batch["attention_mask"].to(device),
                 logits_to_keep=keep, **extra).logits


def target_token_nll(logits: torch.Tensor, labels: torch.Tensor,
                     exclude_ids: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of every labelled position, with the marker logits left out of the softmax
    (the model is never asked to predict a marker). Returns ``(nll, index)``: one entry per target
    token in row-major order, ``index`` = the token's place within its row's targets (0 = the
    first target token)."""
    logits = exclude_logits(logits[:, :-1], exclude_ids)
    targets = labels[:, 1:]
    keep = targets != -100
    index = (keep.cumsum(1) - 1)[keep]
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
    return nll, index


def target_nll(logits: torch.Tensor, labels: torch.Tensor,
               exclude_ids: Iterable[int] = ()) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions (markers excluded as in
    :func:`target_token_nll`). Returns ``(sum, count)``."""
    nll, _ = target_token_nll(logits, labels, exclude_ids)
    return nll.sum(), int(nll.numel())
