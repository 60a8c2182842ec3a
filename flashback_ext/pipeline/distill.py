"""Layout distillation (not in the paper): train the append adapter to predict, for each target
token, what a prepend adapter predicts for the same example.

The paper trains the append adapter on the 16 target tokens alone. A prepend adapter (P.+LoRA)
already reads the same passage and context well; its full next-token distribution at each
target place says far more per example than the one true token. Here the teacher's top-``k``
log-probabilities are computed once per training example (:func:`teacher_targets`, cached next
to the checkpoints), and the student's loss becomes

    (1 - w) * NLL(target) + w * CE(teacher top-k, renormalised -> student)

(:func:`soft_target_nll`), summed over target tokens like the plain loss. ``w`` = 0 is the
paper's recipe. The teacher costs one forward pass per training example, once; nothing changes
at generation time.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .batches import Collator, exclude_logits, forward_batch
from .examples import Example

__all__ = ["TeacherTargets", "teacher_targets", "soft_target_nll", "load_teacher_targets",
           "DistillDataset", "DistillCollator", "examples_digest", "TEACHER_FILE"]

logger = logging.getLogger(__name__)
# next to the checkpoints, so that --resume does not score the teacher again
TEACHER_FILE = "teacher_targets.pt"


@dataclass
class TeacherTargets:
    """Per training example: the teacher's ``k`` most likely next tokens at each target place
    and their log-probabilities renormalised over those ``k`` (they sum to 1 in probability)."""
    ids: list[torch.Tensor]    # one [len(tgt), k] int64 per example
    logp: list[torch.Tensor]   # one [len(tgt), k] float32 per example
    key: dict                  # what they were computed from (teacher, layout, examples, k)


def examples_digest(examples: Sequence[Example]) -> str:
    """md5 of the examples' token ids: a cached teacher must belong to exactly these examples."""
    h = hashlib.md5()
    for ex in examples:
        h.update(json.dumps([ex.src, ex.e, ex.tgt]).encode())
    return h.hexdigest()


@torch.no_grad()
def teacher_targets(teacher, tokenizer, examples: Sequence[Example], layout: str,
                    markers: Optional[tuple[int, int]], *, top_k: int = 64, echo: int = 0,
                    passage_positions: str = "after", batch_size: int = 8,
                    progress: bool = True, key: Optional[dict] = None) -> TeacherTargets:
    """Score ``examples`` with ``teacher`` in ``layout`` (its own layout, markers and echo) and keep
    the top ``top_k`` next-token log-probabilities at every target place. The softmax covers the
    tokenizer's tokens only: not the markers, which the student never predicts, nor embedding
    rows past the tokenizer."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not examples:
        raise ValueError("no examples to score with the teacher")
    collate = Collator(layout, markers, tokenizer.pad_token_id or 0, echo=echo,
                       passage_positions=passage_positions)
    device = next(teacher.parameters()).device
    exclude = list(markers or ())
    ids_out: list[torch.Tensor] = []
    logp_out: list[torch.Tensor] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="teacher targets",
                      disable=not progress):
        chunk = examples[start:start + batch_size]
        batch = collate(chunk)
        keep = Collator.keep_logits(batch["labels"])
        logits = forward_batch(teacher, batch, keep)
        # rows past the tokenizer (an embedding padded or grown beyond it, as OPT's or one the
        # student's markers were already added to) are no tokens the student could be taught
        logits = exclude_logits(logits[:, :-1, :len(tokenizer)], exclude)
        wanted = (batch["labels"][:, -keep:][:, 1:] != -100).to(device)
        k = min(top_k, logits.shape[-1] - len(exclude))
        top, idx = torch.log_softmax(logits[wanted], -1).topk(k, dim=-1)
        top = top - torch.logsumexp(top, -1, keepdim=True)  # renormalised over the k kept
        counts = wanted.sum(1).tolist()
        for ex, part_ids, part_logp in zip(chunk, idx.split(counts), top.split(counts)):
            if len(part_ids) != len(ex.tgt):
                raise AssertionError("teacher rows out of step with the example targets")
            ids_out.append(part_ids.cpu())
            logp_out.append(part_logp.float().cpu())
    return TeacherTargets(ids_out, logp_out, dict(key or {}, top_k=top_k,
                                                  examples=examples_digest(examples)))


def _plain_vocab(tokenizer) -> dict:
    from ..marking import marker_ids

    drop = set(marker_ids(tokenizer) or ())
    return {tok: i for tok, i in tokenizer.get_vocab().items() if i not in drop}


def load_teacher_targets(model, examples: Sequence[Example], teacher_dir, top_k: int,
                         student_tokenizer, cache_file: Optional[Path] = None,
                         progress: bool = True, batch_size: int = 8) -> TeacherTargets:
    """The teacher's targets for ``examples``: from ``cache_file`` when it was computed from the
    same teacher adapter (its weights' md5), base model (name and dtype), examples and ``top_k``,
    else computed on a copy of ``model`` (the base model, before any adapter is attached to it;
    the copy doubles the model's memory while the teacher scores) and written there. Raises
    :class:`train.AdapterError` for a missing teacher, one for another architecture, or one whose
    vocabulary (markers aside) differs from ``student_tokenizer``'s."""
    from transformers import AutoTokenizer

    from .adapter_io import AdapterError, load_adapter, run_info

    folder = Path(teacher_dir).expanduser()
    info = run_info(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise AdapterError(f"no adapter weights at {weights}")
    # the teacher's own tokenizer; a folder without one (the shipped adapter) uses the base's
    own = (folder / "tokenizer_config.json").exists()
    teacher_vocab = _plain_vocab(AutoTokenizer.from_pretrained(folder)) if own else \
        _plain_vocab(student_tokenizer)
    if teacher_vocab != _plain_vocab(student_tokenizer):
        raise AdapterError(f"teacher adapter {folder} has another vocabulary than the student's "
                           f"tokenizer: its token ids would mean other tokens")
    settings = info["settings"]
    key = {"teacher": str(folder.resolve()),
           "teacher_md5": hashlib.md5(weights.read_bytes()).hexdigest(),
           "layout": settings["layout"], "markers": bool(settings["markers"]),
           "echo": int(settings.get("echo_tokens", 0)),
           "passage_positions": settings.get("passage_positions", "after"), "top_k": top_k,
           "base": str(getattr(model.config, "_name_or_path", "")),
           "dtype": str(next(model.parameters()).dtype),
           "examples": examples_digest(examples)}
    if cache_file is not None and cache_file.exists():
        try:
            cached = torch.load(cache_file, weights_only=True)
            if cached["key"] == key:
                logger.info("teacher targets from %s", cache_file)
                return TeacherTargets(cached["ids"], cached["logp"], cached["key"])
            logger.info("recomputing the teacher targets: %s is for another teacher, examples "
                        "or top_k", cache_file)
        except Exception as exc:  # unreadable (killed mid-write before the atomic rename existed)
            logger.warning("ignoring the unreadable teacher cache %s (%s)", cache_file, exc)
    # the teacher gets its own copy: peft attaches its adapter to the model in place
    teacher, teacher_tok = load_adapter(copy.deepcopy(model), folder)
    from ..marking import marker_ids

    markers = marker_ids(teacher_tok) if key["markers"] else None
    targets = teacher_targets(teacher, teacher_tok, examples, key["layout"], markers,
                              top_k=top_k, echo=key["echo"],
                              passage_positions=key["passage_positions"], progress=progress,
                              batch_size=batch_size)
    targets.key = key
    del teacher
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        torch.save({"ids": targets.ids, "logp": targets.logp, "key": key}, tmp)
        os.replace(tmp, cache_file)  # whole or not at all
    return targets


def soft_target_nll(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
                    teacher_logp: torch.Tensor, teacher_mask: torch.Tensor,
                    exclude_ids: Iterable[int] = ()) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy from the teacher's renormalised top-k distribution to the student's
    next-token distribution (markers excluded as in :func:`data.target_token_nll`) over the
    labelled positions. ``teacher_*`` are ``[batch, max targets, k]`` with ``teacher_mask``
    marking each row's real targets, in the order of its labelled positions. Returns
    ``(sum, count)``."""
    logits = exclude_logits(logits[:, :-1], exclude_ids)
    keep = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[keep], -1)
    ids, q = teacher_ids[teacher_mask], teacher_logp[teacher_mask].exp()
    if ids.shape[0] != logp.shape[0]:
        raise ValueError(f"{ids.shape[0]} teacher rows for {logp.shape[0]} target tokens")
    ce = -(q * logp.gather(1, ids)).sum(1)
    return ce.sum(), int(ce.numel())


class DistillDataset(torch.utils.data.Dataset):
    """The training examples, each with its index into the teacher targets."""

    def __init__(self, items: Sequence[Example]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Example, int]:
        return self.items[i], i


class DistillCollator:
    """The layout collator's batch plus the teacher targets of its examples, padded to the
    longest target: ``teacher_ids``/``teacher_logp`` ``[batch, T, k]`` and ``teacher_mask``."""

    def __init__(self, collate: Collator, targets: TeacherTargets) -> None:
        self.collate, self.targets = collate, targets

    def __call__(self, batch: Sequence[tuple[Example, int]]) -> dict[str, torch.Tensor]:
        out = self.collate([ex for ex, _ in batch])
        rows = [i for _, i in batch]
        width = max(len(self.targets.ids[i]) for i in rows)
        k = self.targets.ids[rows[0]].shape[1]
        ids = torch.zeros((len(rows), width, k), dtype=torch.long)
        logp = torch.full((len(rows), width, k), float("-inf"))
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, i in enumerate(rows):
            n = len(self.targets.ids[i])
            ids[r, :n], logp[r, :n], mask[r, :n] = self.targets.ids[i], self.targets.logp[i], True
        out.update(teacher_ids=ids, teacher_logp=logp, teacher_mask=mask)
        return out
