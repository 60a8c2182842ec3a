"""The FlashBack layouts: which tokens the model sees, in which order, at which rotary positions.

One retrieval = a context ``src``, a retrieved passage ``e`` and what follows (``tgt``: the
targets in training and evaluation, the new tokens in generation). With
``E = <MARK_L> e <MARK_R>`` (or ``e`` alone without markers):

* ``none``: ``src | tgt`` (no retrieval);
* ``prepend`` (In-Context RALM): ``E | src | tgt``, re-encoded at every retrieval;
* ``append`` (FlashBack): ``src | E | tgt``: the context's KV cache survives the retrieval.

Two variants of ``append``, neither in the paper:

* a context echo of ``echo_tokens = k``: ``src | E | src[-k:] | tgt``, so the first targets are
  predicted from a copy of the context's end that has read the passage;
* ``passage_positions = "before"``: the token order stays ``src | E | tgt`` (and so the KV reuse),
  but ``<MARK_L> e`` take the rotary positions just before the context's first token and
  ``<MARK_R>`` the one right after its last, where the first target is predicted. RoPE sees only
  position differences, so this is the geometry of a prepended passage. ``"after"`` is the
  paper's contiguous positions.
* both, ``"before"`` with an echo of ``k``: ``src | E | src[-k:] | tgt`` where all of ``E`` takes
  the positions just before the context (exactly a prepended passage's) and the echo repeats the
  context's last ``k`` tokens AT THEIR OWN positions, so the first target is predicted from the
  context's last token, as in prepend, only this copy has read the passage. Without it
  ``<MARK_R>`` must stand in for the context's last token, and that first target is where the
  "before" adapter loses to prepend (docs/RESULTS.md).

Training (:mod:`.pipeline.batches`), evaluation and the engine (:mod:`.engine.blocks`) all build
their token rows and positions here, and every combination is validated here, once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["MARK_L", "MARK_R", "LAYOUTS", "PASSAGE_POSITIONS", "Layout", "check_echo",
           "check_passage_positions", "check_attention_for_positions", "layout_tokens",
           "layout_positions", "before_positions"]

MARK_L, MARK_R = "<MARK_L>", "<MARK_R>"
LAYOUTS = ("none", "prepend", "append")
# where the appended passage sits in RoPE positions: "after" the context (the paper), or "before"
PASSAGE_POSITIONS = ("after", "before")


def check_echo(layout: str, echo: int) -> None:
    """A context echo is a variant of the append layout only."""
    if not isinstance(echo, int) or isinstance(echo, bool) or echo < 0:
        raise ValueError(f"echo_tokens must be an int >= 0, got {echo!r}")
    if echo and layout != "append":
        raise ValueError(f"a context echo (echo_tokens={echo}) needs the append layout, "
                         f"got {layout!r}")


def check_passage_positions(layout: str, markers, passage_positions: str, echo: int = 0) -> None:
    """``"before"`` is a variant of the append layout with markers only (with or without echo)."""
    if passage_positions not in PASSAGE_POSITIONS:
        raise ValueError(f"passage_positions must be one of {PASSAGE_POSITIONS}, "
                         f"got {passage_positions!r}")
    if passage_positions == "before":
        if layout != "append":
            raise ValueError(f"passage_positions 'before' needs the append layout, got {layout!r}")
        if not markers:
            # without <MARK_R> the first target would be predicted at a passage token
            raise ValueError("passage_positions 'before' needs the marking tokens (<MARK_R> is "
                             "where the context resumes)")


def check_attention_for_positions(model, passage_positions: str) -> None:
    """FlashAttention-2 in transformers reads non-consecutive ``position_ids`` of an unpadded
    batch as packed sequences and cuts attention between them: refuse it for "before"."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if passage_positions == "before" and impl and "flash_attention" in str(impl):
        raise ValueError(f"passage_positions 'before' needs sdpa or eager attention, not {impl!r} "
                         "(it would read the positions as packed sequences)")


def before_positions(start: int, n_context: int, n_e: int,
                     n_echo: int = 0) -> tuple[list[int], int]:
    """``passage_positions="before"``: the rotary positions of a ``[n_context context tokens | E |
    n_echo echoed tokens]`` run whose first token takes position ``start`` (``E`` = ``<MARK_L> e
    <MARK_R>``, ``n_e`` tokens), and the shift (slot - rotary position) of every token after it.
    Without echo ``<MARK_L> e`` sit just before position 0 (the context's first token) and
    ``<MARK_R>`` right after the context; with one, all of ``E`` sits before position 0 and the
    echo repeats the positions of the context's last ``n_echo`` tokens."""
    end = start + n_context  # the context's length (the rotary position after it)
    context = list(range(start, end))
    if not n_echo:
        return context + list(range(-(n_e - 1), 0)) + [end], n_e - 1
    if n_echo > end:
        raise ValueError(f"an echo of {n_echo} tokens needs as many context tokens, got {end}")
    return context + list(range(-n_e, 0)) + list(range(end - n_echo, end)), n_e + n_echo


@dataclass(frozen=True)
class Layout:
    """One validated layout. ``markers`` = the ``(<MARK_L>, <MARK_R>)`` ids, or None."""

    kind: str = "append"
    markers: Optional[tuple[int, int]] = None
    echo: int = 0
    passage_positions: str = "after"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.kind!r}")
        check_echo(self.kind, self.echo)
        check_passage_positions(self.kind, self.markers, self.passage_positions, self.echo)

    @property
    def before(self) -> bool:
        return self.passage_positions == "before"

    def marked(self, passage: Sequence[int]) -> list[int]:
        """``E``: the passage ids between the markers (when the layout has them)."""
        return [self.markers[0], *passage, self.markers[1]] if self.markers else list(passage)

    def echo_of(self, context: Sequence[int]) -> list[int]:
        """The context's last ``echo`` tokens, repeated after the passage (empty without echo)."""
        return list(context[-self.echo:]) if self.echo else []

    def tokens(self, src: Sequence[int], e: Sequence[int],
               tgt: Sequence[int]) -> tuple[list[int], int]:
        """``(token ids, index where tgt starts)`` of one retrieval in this layout."""
        marked = self.marked(e)
        if self.kind == "none":
            head = list(src)
        elif self.kind == "prepend":
            head = marked + list(src)
        else:
            head = list(src) + marked + self.echo_of(src)
        return head + list(tgt), len(head)

    def positions(self, src: Sequence[int], e: Sequence[int], tgt: Sequence[int]) -> list[int]:
        """The rotary position of each token of :meth:`tokens`: ``0, 1, 2...`` for ``"after"``;
        for ``"before"`` :func:`before_positions` shifted to start at 0 (without echo ``<MARK_L>
        e`` take ``0 .. len(e)``, the context the next ``len(src)``, then ``<MARK_R>`` and the
        targets; with one, ``E`` and the context take a prepended layout's positions, the echo
        its context tokens' own, the targets follow the context)."""
        if not self.before:
            return list(range(len(self.tokens(src, e, tgt)[0])))
        pos, shift = before_positions(0, len(src), len(e) + 2, len(self.echo_of(src)))
        first_target = len(pos) - shift  # slot - shift, as every later token's
        offset = -min(pos)
        return [p + offset for p in pos] + list(range(first_target + offset,
                                                      first_target + offset + len(tgt)))


def layout_tokens(ex, layout: str, markers: Optional[tuple[int, int]],
                  echo: int = 0) -> tuple[list[int], int]:
    """:meth:`Layout.tokens` of an example (anything with ``src``, ``e`` and ``tgt``)."""
    return Layout(layout, markers, echo).tokens(ex.src, ex.e, ex.tgt)


def layout_positions(ex, layout: str, markers: Optional[tuple[int, int]], echo: int = 0,
                     passage_positions: str = "after") -> list[int]:
    """:meth:`Layout.positions` of an example (anything with ``src``, ``e`` and ``tgt``)."""
    return Layout(layout, markers, echo, passage_positions).positions(ex.src, ex.e, ex.tgt)
