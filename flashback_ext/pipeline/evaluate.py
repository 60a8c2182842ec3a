"""Perplexity of held-out examples in the paper's settings, as a markdown table and JSON.

Perplexity = exp(mean NLL over all target tokens), teacher-forced, marker logits excluded from
the softmax. :func:`engine_perplexity` computes the same quantity through the RALM engine's
append path (cache prefill, one ``[last stride | E]`` block, then token-by-token decoding) and
must agree with :func:`perplexity`; a test proves it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..layout import check_attention_for_positions
from ..marking import marker_ids
from .adapter_io import check_adapter_layout, load_adapter
from .batches import Collator, forward_batch, target_token_nll
from .examples import Example

__all__ = ["perplexity", "engine_perplexity", "Setting", "PAPER_ROWS", "TABLE_ROWS", "markdown_table",
           "position_table", "ratio_interval", "score_table", "append_over_prepend",
           "append_ratios", "sweep_table"]


@dataclass(frozen=True)
class Setting:
    name: str       # the paper's row label
    layout: str     # none / prepend / append
    adapter: Optional[str]  # key of the adapter to load, None = base model
    markers: bool


# the rows of the paper's table (N., P., A., P.+LoRA, A.+LoRA, A.+LoRA+M.T.)
PAPER_ROWS = [
    Setting("N.", "none", None, False),
    Setting("P.", "prepend", None, False),
    Setting("A.", "append", None, False),
    Setting("P.+LoRA", "prepend", "prepend", False),
    Setting("A.+LoRA", "append", "append", False),
    Setting("A.+LoRA+M.T.", "append", "append_markers", True),
]
# not in the paper: LoRA trained with no passage at all. P.+LoRA against it separates what the
# prepend adapter gains from reading passages from what it gains by adapting to the corpus
NO_RETRIEVAL_LORA = Setting("N.+LoRA", "none", "none", False)
TABLE_ROWS = PAPER_ROWS[:3] + [NO_RETRIEVAL_LORA] + PAPER_ROWS[3:]


@torch.no_grad()
def perplexity(model, tokenizer, examples: Sequence[Example], layout: str, markers: bool,
               batch_size: int = 8, progress: bool = True, echo: int = 0,
               passage_positions: str = "after") -> dict:
    """Teacher-forced perplexity of the examples' targets in one layout (``echo``: the context
    echo of :func:`flashback_ext.layout.layout_tokens`, append only; ``passage_positions``: see
    :func:`flashback_ext.layout.layout_positions`)."""
    ids = marker_ids(tokenizer)
    if markers and ids is None:
        raise ValueError("markers=True but the tokenizer has no marking tokens")
    collate = Collator(layout, ids if markers else None, tokenizer.pad_token_id or 0, echo=echo,
                       passage_positions=passage_positions)
    check_attention_for_positions(model, passage_positions)
    device = next(model.parameters()).device
    # float64 sums per target place: where the loss sits (appending hurts the first tokens most)
    sums = torch.zeros(0, dtype=torch.float64)
    counts = torch.zeros(0, dtype=torch.float64)
    # and per example, for paired comparisons of two settings (ratio_interval)
    example_sums: list[float] = []
    example_counts: list[int] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"ppl {layout}",
                      disable=not progress):
        chunk = examples[start:start + batch_size]
        batch = collate(chunk)
        keep = Collator.keep_logits(batch["labels"])
        logits = forward_batch(model, batch, keep)
        labels = batch["labels"][:, -keep:]
        nll, index = target_token_nll(logits, labels.to(device), ids or ())
        rows = (labels[:, 1:] != -100).nonzero()[:, 0]  # the row of each nll entry (row-major)
        example_sums += torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, rows, nll.detach().cpu().double()).tolist()
        example_counts += torch.bincount(rows, minlength=len(chunk)).tolist()
        if nll.numel():
            width = max(len(sums), int(index.max()) + 1)
            sums = torch.nn.functional.pad(sums, (0, width - len(sums)))
            counts = torch.nn.functional.pad(counts, (0, width - len(counts)))
            sums.index_add_(0, index.cpu(), nll.detach().cpu().double())
            counts.index_add_(0, index.cpu(), torch.ones(len(index), dtype=torch.float64))
    count = int(counts.sum())
    if count == 0:
        raise ValueError("no target tokens to score")
    mean = float(sums.sum()) / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count,
            "nll_by_position": (sums / counts).tolist(),
            "nll_sum_by_example": example_sums, "tokens_by_example": example_counts}


def ratio_interval(row: dict, reference: dict, level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, low, high)``: perplexity of ``row`` over that of ``reference`` (two results of
    :func:`perplexity` on the same examples) with a paired bootstrap interval over the examples,
    i.e. how much the ratio depends on which held-out examples were drawn."""
    import random

    a, b = row["nll_sum_by_example"], reference["nll_sum_by_example"]
    n_a, n_b = row["tokens_by_example"], reference["tokens_by_example"]
    if len(a) != len(b) or n_a != n_b or not a:
        raise ValueError("the two results must score the same examples")

    def ratio(idx) -> float:
        tokens = sum(n_a[i] for i in idx)
        return math.exp((sum(a[i] for i in idx) - sum(b[i] for i in idx)) / tokens)

    rng = random.Random(seed)
    draws = sorted(ratio([rng.randrange(len(a)) for _ in a]) for _ in range(resamples))
    tail = int(resamples * (1 - level) / 2)
    return ratio(range(len(a))), draws[tail], draws[resamples - 1 - tail]


@torch.no_grad()
def engine_perplexity(engine, examples: Sequence[Example]) -> dict:
    """Perplexity of the targets computed by the RALM engine's append path (KV cache reuse)."""
    if not examples:
        raise ValueError("no examples to score")
    total, count = 0.0, 0
    exclude = list(marker_ids(engine.tokenizer) or ())
    for ex in examples:
        logps = engine.score(ex.src, ex.e, ex.tgt, exclude_ids=exclude)
        total -= sum(logps)
        count += len(logps)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


def markdown_table(rows: list[dict]) -> str:
    """``| setting | layout | adapter | markers | ppl |`` plus the ratio to N. and to P.+LoRA."""
    by_name = {r["name"]: r["ppl"] for r in rows}
    lines = ["| setting | layout | adapter | markers | perplexity | / N. | / P.+LoRA |",
             "|---|---|---|---|---:|---:|---:|"]
    n, p = by_name.get("N."), by_name.get("P.+LoRA")
    for r in rows:
        ratio_n = f"{r['ppl'] / n:.3f}" if n else "—"
        ratio_p = f"{r['ppl'] / p:.3f}" if p else "—"
        adapter = _adapter_label(r)
        lines.append(f"| {r['name']} | {r['layout']} | {adapter} | "
                     f"{'yes' if r['markers'] else 'no'} | {r['ppl']:.3f} | {ratio_n} | {ratio_p} |")
    return "\n".join(lines)


def position_table(rows: list[dict], head: int = 4) -> str:
    """Mean NLL of the first ``head`` target places one by one, then the mean of the remaining
    places' means: where each setting loses (an untrained append layout loses mostly right after the passage)."""
    rows = [r for r in rows if r.get("nll_by_position")]
    if not rows:
        return ""
    width = max(len(r["nll_by_position"]) for r in rows)
    head = min(head, width)
    cols = [str(i) for i in range(head)] + ([f"{head}-{width - 1}"] if width > head else [])
    lines = ["| setting | " + " | ".join(f"NLL @{c}" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        by_pos = r["nll_by_position"]
        cells = [f"{v:.3f}" for v in by_pos[:head]] + ["—"] * max(0, head - len(by_pos))
        if width > head:
            rest = by_pos[head:]
            cells.append(f"{sum(rest) / len(rest):.3f}" if rest else "—")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_table(model, tokenizer, fresh_model: Callable[[], object], examples: Sequence[Example],
                adapters: dict[str, str], wanted: Sequence[str], batch_size: int = 8,
                report: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Score the ``wanted`` rows of :data:`TABLE_ROWS` that ``adapters`` (adapter key -> folder)
    allow: the base ``model`` for the rows without an adapter, each adapter on a
    ``fresh_model()`` in the layout it was trained with (its echo and passage positions are part
    of it). Raises :class:`~.adapter_io.AdapterError` for an adapter of another row's layout.
    ``report`` gets one line per scored row."""
    rows = []
    for setting in TABLE_ROWS:
        if setting.name not in wanted:
            continue
        if setting.adapter is not None and setting.adapter not in adapters:
            continue
        echo, positions = 0, "after"
        if setting.adapter is None:
            m, tok = model, tokenizer
        else:
            info = check_adapter_layout(adapters[setting.adapter], setting.layout,
                                        setting.markers, f"row {setting.name}")
            m, tok = load_adapter(fresh_model(), adapters[setting.adapter], tokenizer)
            echo = int(info["settings"].get("echo_tokens", 0))
            positions = info["settings"].get("passage_positions", "after")
        t0 = time.perf_counter()
        result = perplexity(m, tok, examples, setting.layout, setting.markers,
                            batch_size=batch_size, echo=echo, passage_positions=positions)
        rows.append({"name": setting.name, "layout": setting.layout, "adapter": setting.adapter,
                     "markers": setting.markers, "echo_tokens": echo,
                     "passage_positions": positions, **result,
                     "seconds": time.perf_counter() - t0})
        if report is not None:
            report(f"{setting.name:<14} ppl {result['ppl']:.3f} ({result['tokens']} target tokens)")
    return rows


def append_over_prepend(rows: Sequence[dict]) -> Optional[dict]:
    """The paper's comparison, A.+LoRA+M.T. / P.+LoRA with its 95% paired interval, when both
    rows were scored (else None)."""
    by_name = {r["name"]: r for r in rows}
    if "A.+LoRA+M.T." not in by_name or "P.+LoRA" not in by_name:
        return None
    ratio, low, high = ratio_interval(by_name["A.+LoRA+M.T."], by_name["P.+LoRA"])
    return {"ratio": ratio, "low": low, "high": high, "level": 0.95,
            "echo_tokens": by_name["A.+LoRA+M.T."]["echo_tokens"],
            "passage_positions": by_name["A.+LoRA+M.T."]["passage_positions"]}


def append_ratios(rows: Sequence[dict]) -> dict:
    """A.+LoRA+M.T. against each of N., P. and P.+LoRA scored in ``rows``: ``{name: {ratio, low,
    high}}`` with 95% paired intervals (the goals: below N., level with P.+LoRA in domain and
    with the untrained P. out of domain). Empty without an A.+LoRA+M.T. row."""
    by_name = {r["name"]: r for r in rows}
    row = by_name.get("A.+LoRA+M.T.")
    if row is None:
        return {}
    out = {}
    for name in ("N.", "P.", "P.+LoRA"):
        if name in by_name:
            ratio, low, high = ratio_interval(row, by_name[name])
            out[name] = {"ratio": ratio, "low": low, "high": high}
    return out


def _adapter_label(row: dict) -> str:
    """The adapter column of the tables: its name and the layout variants it was trained in."""
    echo = row.get("echo_tokens")
    return (row["adapter"] or "base") + (f" + echo {echo}" if echo else "") \
        + (" + passage before" if row.get("passage_positions") == "before" else "")


def sweep_table(runs: Sequence[dict]) -> str:
    """One markdown table for a passage-length sweep: ``runs`` = ``[{"passage_tokens": n, "rows":
    [...], "ratios": append_ratios(rows)}]``; a row per (length, setting) with its perplexity and,
    for A.+LoRA+M.T., its ratios to N., P. and P.+LoRA with their intervals."""
    lines = ["| passage tokens | setting | adapter | perplexity | / N. | / P. | / P.+LoRA |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for run in runs:
        by_name = {r["name"]: r["ppl"] for r in run["rows"]}
        for r in run["rows"]:
            cells = []
            for ref in ("N.", "P.", "P.+LoRA"):
                got = run["ratios"].get(ref) if r["name"] == "A.+LoRA+M.T." else None
                if got is not None:
                    cells.append(f"{got['ratio']:.3f} ({got['low']:.3f}-{got['high']:.3f})")
                elif by_name.get(ref):
                    cells.append(f"{r['ppl'] / by_name[ref]:.3f}")
                else:
                    cells.append("—")
            adapter = _adapter_label(r)
            lines.append(f"| {run['passage_tokens']} | {r['name']} | {adapter} | {r['ppl']:.3f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)
