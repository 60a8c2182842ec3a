"""Marking tokens, the example builder, the collator, LoRA training and perplexity evaluation,
on a tiny random Llama with a real (tiny) Hugging Face tokenizer."""
import json
import math
from pathlib import Path

import pytest
import torch

from flashback_ext.engine.generator import RALMGenerator
from flashback_ext.engine.models import tiny_llama
from flashback_ext.layout import layout_positions, layout_tokens
from flashback_ext.marking import add_marking_tokens, marker_ids
from flashback_ext.pipeline.adapter_io import AdapterError, load_adapter
from flashback_ext.pipeline.batches import Collator, target_nll, target_token_nll
from flashback_ext.pipeline.evaluate import engine_perplexity, perplexity, position_table
from flashback_ext.pipeline.examples import (
    DataError,
    Example,
    build_examples,
    passage_leaks,
    split_by_document,
)
from flashback_ext.pipeline.train import TrainSettings, train_adapter

from toys import tiny_hf_tokenizer, train_tiny, word_docs


def test_marking_tokens_are_added_once(model, tok):
    n_vocab, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    ids = add_marking_tokens(model, tok)
    assert ids == (n_vocab, n_vocab + 1) and marker_ids(tok) == ids
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == rows + 2
    torch.testing.assert_close(emb[ids[0]], emb[:rows].mean(0))
    assert add_marking_tokens(model, tok) == ids and model.get_input_embeddings().weight.shape[0] == rows + 2
    assert tok.encode("<MARK_L> the <MARK_R>", add_special_tokens=False) == [ids[0], tok.get_vocab()["the"], ids[1]]


def test_example_builder_invariants(tok, setup):
    docs, retriever = setup
    train_docs, eval_docs = split_by_document(docs, 0.25, seed=1)
    assert not {d[0] for d in train_docs} & {d[0] for d in eval_docs}
    exs = build_examples(train_docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, seed=3, max_examples=40, progress=False)
    assert len(exs) == 40
    texts = {d[0]: tok.encode(d[2], add_special_tokens=False) for d in docs}
    for ex in exs:
        assert len(ex.tgt) == 8 and 1 <= len(ex.e) <= 16
        assert 64 // 2 <= len(ex.src) + len(ex.e) <= 64 - 8 - 1 or len(ex.src) < 64 // 2
        ids = texts[ex.doc_id]
        # src ends exactly where tgt starts, in the document
        joined = ex.src + ex.tgt
        assert any(ids[i:i + len(joined)] == joined for i in range(len(ids) - len(joined) + 1))
        passage = retriever.corpus.passages[ex.passage_id]
        assert passage.doc_id != ex.doc_id  # never the same document
        grams = {tuple(ex.tgt[i:i + 8]) for i in range(len(ex.tgt) - 7)}
        assert not grams & {tuple(ex.e[i:i + 8]) for i in range(len(ex.e) - 7)}
    again = build_examples(train_docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                           budget=64, seed=3, max_examples=40, progress=False)
    assert again == exs  # seeded


def test_passage_leaks_is_the_builder_span_rule():
    target = list(range(100, 116))
    assert passage_leaks([], target)  # nothing to read: unusable
    assert passage_leaks([1, 2] + target[3:11] + [3], target)  # an 8-token span of the target
    assert not passage_leaks([1, 2] + target[3:10] + [3], target)  # 7 tokens only
    assert not passage_leaks(target[3:11], target, leak_ngram=9)
    assert passage_leaks([5, 100, 101, 102, 6], [100, 101, 102])  # short target: all of it
    assert not passage_leaks([5, 100, 101, 6], [100, 101, 102])


def _target_starts(exs, docs, tok):
    """Where each example's target starts in its document (src + tgt located in the text)."""
    texts = {d[0]: tok.encode(d[2], add_special_tokens=False) for d in docs}
    starts = []
    for ex in exs:
        ids, joined = texts[ex.doc_id], ex.src + ex.tgt
        hits = [i + len(ex.src) for i in range(len(ids) - len(joined) + 1)
                if ids[i:i + len(joined)] == joined]
        assert len(hits) == 1
        starts.append(hits[0])
    return starts


@pytest.mark.parametrize("phases", [2, 3])
def test_target_phases_add_shifted_targets(tok, setup, phases):
    docs, retriever = setup
    kw = dict(stride=8, query_tokens=6, passage_tokens=16, budget=64, seed=3, progress=False)
    one = build_examples(docs, tok, retriever, **kw)
    assert build_examples(docs, tok, retriever, target_phases=1, **kw) == one  # the recipe
    assert {(t - 6) % 8 for t in _target_starts(one, docs, tok)} == {0}
    more = build_examples(docs, tok, retriever, target_phases=phases, **kw)
    offsets = {(t - 6) % 8 for t in _target_starts(more, docs, tok)}
    assert offsets == {p * 8 // phases for p in range(phases)}
    assert len(more) > 1.5 * len(one)


def test_builder_bad_inputs(tok, setup):
    docs, retriever = setup
    with pytest.raises(DataError, match="too short"):
        build_examples([("x", "x", "the a")], tok, retriever, progress=False)
    with pytest.raises(DataError, match="too small"):
        build_examples(docs, tok, retriever, budget=100, passage_tokens=64, progress=False)

    class NoHits:
        def search_batch(self, queries, k=1, exclude_doc_ids=None, exclude_titles=None):
            return [[] for _ in queries]

    with pytest.raises(DataError, match="no usable passage"):
        build_examples(docs, tok, NoHits(), stride=8, query_tokens=6, passage_tokens=16,
                       budget=64, progress=False)
    for phases in (0, 9):
        with pytest.raises(DataError, match="target_phases"):
            build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                           budget=64, target_phases=phases, progress=False)
    with pytest.raises(DataError, match="at least 2 documents"):
        split_by_document(docs[:1], 0.5)


@pytest.mark.parametrize("layout", ["none", "prepend", "append"])
@pytest.mark.parametrize("markers", [None, (90, 91)])
def test_collator_layouts_and_labels(layout, markers):
    ex = Example(src=[1, 2, 3], e=[7, 8], tgt=[4, 5], doc_id="d", passage_id=0)
    e = [90, 7, 8, 91] if markers else [7, 8]
    want = {"none": [1, 2, 3, 4, 5], "prepend": e + [1, 2, 3, 4, 5], "append": [1, 2, 3] + e + [4, 5]}[layout]
    ids, start = layout_tokens(ex, layout, markers)
    assert ids == want and ids[start:] == [4, 5]
    short = Example(src=[1], e=[7], tgt=[4, 5], doc_id="d", passage_id=0)
    batch = Collator(layout, markers, pad_id=0)([ex, short])
    assert batch["input_ids"][0].tolist() == want
    labels = batch["labels"][0].tolist()
    assert labels == [-100] * (len(want) - 2) + [4, 5]
    short_ids = layout_tokens(short, layout, markers)[0]
    assert batch["attention_mask"][1].sum() == len(short_ids)
    assert batch["input_ids"][1, -len(short_ids):].tolist() == short_ids  # left-padded
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == -100).all()
    assert batch["labels"][1, -2:].tolist() == [4, 5]
    assert Collator.keep_logits(batch["labels"]) == 3


def test_context_echo_repeats_the_last_context_tokens_after_the_passage():
    ex = Example(src=[1, 2, 3], e=[7, 8], tgt=[4, 5], doc_id="d", passage_id=0)
    ids, start = layout_tokens(ex, "append", (90, 91), echo=2)
    assert ids == [1, 2, 3, 90, 7, 8, 91, 2, 3, 4, 5] and ids[start:] == [4, 5]
    assert layout_tokens(ex, "append", None, echo=9)[0] == [1, 2, 3, 7, 8, 1, 2, 3, 4, 5]
    assert layout_tokens(ex, "append", None, echo=0)[0] == [1, 2, 3, 7, 8, 4, 5]
    short = Example(src=[1], e=[7], tgt=[4, 5], doc_id="d", passage_id=0)
    batch = Collator("append", (90, 91), pad_id=0, echo=2)([ex, short])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == [-100] * 9 + [4, 5]
    assert batch["input_ids"][1, -7:].tolist() == [1, 90, 7, 91, 1, 4, 5]
    for layout in ("none", "prepend"):
        with pytest.raises(ValueError, match="needs the append layout"):
            layout_tokens(ex, layout, None, echo=1)
        with pytest.raises(ValueError, match="needs the append layout"):
            Collator(layout, None, echo=1)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="echo_tokens must be an int >= 0"):
            layout_tokens(ex, "append", None, echo=bad)


def test_target_nll_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    logits[0, 1] = torch.tensor([1.0, 1.0, 1.0, 5.0])
    labels = torch.tensor([[-100, 2, 0]])
    nll, n = target_nll(logits, labels)
    want = -(math.log(math.exp(2) / sum(math.exp(x) for x in (0, 1, 2, 3)))
             + math.log(math.exp(1) / (3 * math.exp(1) + math.exp(5))))
    assert n == 2 and abs(float(nll) - want) < 1e-5
    nll_x, _ = target_nll(logits, labels, exclude_ids=[3])  # marker column left out
    want_x = -(math.log(math.exp(2) / sum(math.exp(x) for x in (0, 1, 2)))
               + math.log(math.exp(1) / (3 * math.exp(1))))
    assert abs(float(nll_x) - want_x) < 1e-5
    # per token: the same two terms, numbered by their place among the row's targets
    per_token, index = target_token_nll(logits, labels, exclude_ids=[3])
    assert index.tolist() == [0, 1] and abs(float(per_token.sum()) - want_x) < 1e-5
    ragged = torch.tensor([[-100, 2, 0], [-100, -100, 1]])
    _, index = target_token_nll(logits.expand(2, -1, -1), ragged)
    assert index.tolist() == [0, 1, 0]


def test_perplexity_matches_hand_computation(model, tok):
    ex = Example(src=[5, 6, 7], e=[8, 9], tgt=[10, 11, 12], doc_id="d", passage_id=0)
    got = perplexity(model, tok, [ex], "append", markers=False, progress=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    nll = -sum(float(logp[i - 1, ids[0, i]]) for i in (5, 6, 7)) / 3
    assert got["tokens"] == 3 and abs(got["ppl"] - math.exp(nll)) < 1e-4 * math.exp(nll)
    by_place = [-float(logp[i - 1, ids[0, i]]) for i in (5, 6, 7)]
    assert got["nll_by_position"] == pytest.approx(by_place, rel=1e-5)
    # two examples with targets of different lengths: place 2 is averaged over one example
    short = Example(src=[5, 6], e=[8], tgt=[10, 11], doc_id="d", passage_id=0)
    both = perplexity(model, tok, [ex, short], "append", markers=False, progress=False)
    ids2 = torch.tensor([[5, 6, 8, 10, 11]])
    with torch.no_grad():
        logp2 = torch.log_softmax(model(ids2).logits[0].double(), -1)
    short_places = [-float(logp2[i - 1, ids2[0, i]]) for i in (3, 4)]
    want = [(by_place[0] + short_places[0]) / 2, (by_place[1] + short_places[1]) / 2, by_place[2]]
    assert both["tokens"] == 5 and both["nll_by_position"] == pytest.approx(want, rel=1e-4)
    assert both["nll"] == pytest.approx((sum(by_place) + sum(short_places)) / 5, rel=1e-5)
    # per example, in input order, for paired comparisons
    assert both["tokens_by_example"] == [3, 2]
    assert both["nll_sum_by_example"] == pytest.approx([sum(by_place), sum(short_places)], rel=1e-5)
    table = position_table([{"name": "A.", **both}], head=2)
    assert table.splitlines()[0] == "| setting | NLL @0 | NLL @1 | NLL @2-2 |"
    assert table.splitlines()[2].startswith(f"| A. | {want[0]:.3f} | {want[1]:.3f} | {want[2]:.3f} |")


def test_only_marker_rows_and_lora_change(model, tok, setup, tmp_path):
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_rows = model.get_input_embeddings().weight.shape[0]
    train_tiny(model, tok, setup, tmp_path)
    ids = marker_ids(tok)
    for name, param in model.named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            continue
        base = name.replace("base_model.model.", "").replace(".base_layer", "")
        if base not in before:
            continue
        if "embed_tokens" in base or "lm_head" in base:  # grew by the two marker rows
            assert torch.equal(param.detach()[:n_rows], before[base][:n_rows]), \
                f"pre-existing rows of {base} must stay bit-identical"
            continue
        assert torch.equal(param.detach(), before[base]), f"{base} changed"
    # the effective marker embeddings moved away from their initial mean
    emb = model.get_input_embeddings()
    out = emb(torch.tensor(list(ids)))
    init = before["model.embed_tokens.weight"][:n_rows].mean(0)
    assert not torch.allclose(out[0], init)


def test_marker_rows_get_their_own_learning_rate(model, tok, setup, tmp_path):
    # one Adam step moves every parameter by about its learning rate: with a negligible LoRA rate
    # the LoRA B matrices (zero at init) stay ~0 while the marker rows move by ~marker_lr
    train_tiny(model, tok, setup, tmp_path, steps=1, lr=1e-9, marker_lr=0.1, warmup_ratio=0.0)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert lora_b and len(rows) == 1
    assert max(float(p.detach().abs().max()) for p in lora_b) < 1e-7
    moved = rows[0].detach().abs()
    assert float(moved.mean()) > 0.02 and float(moved.max()) < 0.2


def test_adapter_round_trip_gives_identical_logits(model, tok, setup, tmp_path):
    exs, folder = train_tiny(model, tok, setup, tmp_path)
    info = json.loads((folder / "flashback_run.json").read_text())
    assert info["settings"]["layout"] == "append" and info["base"]["hidden_size"] == 32
    batch = Collator("append", marker_ids(tok), 0)(exs[:3])
    model.eval()  # the Trainer leaves it in train mode (LoRA dropout on)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    fresh = tiny_llama(vocab_size=len(tiny_hf_tokenizer()), layers=2, hidden=32, heads=4, kv_heads=2)
    loaded, tok2 = load_adapter(fresh, folder)
    assert marker_ids(tok2) == marker_ids(tok)
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fresh = tiny_llama(vocab_size=len(tiny_hf_tokenizer()), layers=2, hidden=32, heads=4, kv_heads=2)
    merged, _ = load_adapter(fresh, folder, merge=True)  # LoRA + marker rows folded in
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, want, atol=1e-4, rtol=1e-4)


def test_adapter_without_its_tokenizer_takes_the_base_one_with_markers(model, tok, setup, tmp_path):
    # the shipped adapter stores no tokenizer: the base tokenizer + the markers must rebuild it,
    # on exactly the embedding rows the adapter trained
    exs, folder = train_tiny(model, tok, setup, tmp_path)
    with_own = load_adapter(tiny_llama(vocab_size=len(tiny_hf_tokenizer()), layers=2, hidden=32,
                                       heads=4, kv_heads=2), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    base_tok = tiny_hf_tokenizer()
    fresh = tiny_llama(vocab_size=len(base_tok), layers=2, hidden=32, heads=4, kv_heads=2)
    loaded, tok2 = load_adapter(fresh, folder, base_tok)
    assert marker_ids(tok2) == marker_ids(with_own[1]) and marker_ids(base_tok) is None  # a copy
    batch = Collator("append", marker_ids(tok2), 0)(exs[:3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits,
                                   with_own[0](input_ids=batch["input_ids"]).logits)
    shifted = tiny_hf_tokenizer()
    shifted.add_tokens(["<EXTRA>"])  # the markers would land one row later
    with pytest.raises(AdapterError, match="not the tokenizer the adapter was trained with"):
        load_adapter(tiny_llama(vocab_size=len(shifted), layers=2, hidden=32, heads=4,
                                kv_heads=2), folder, shifted)
    with pytest.raises(AdapterError, match="no tokenizer of its own"):  # tiny_llama has no folder
        load_adapter(tiny_llama(vocab_size=len(base_tok), layers=2, hidden=32, heads=4,
                                kv_heads=2), folder)


@pytest.mark.parametrize("echo,positions", [(0, "after"), (3, "after"), (0, "before")])
def test_engine_scores_like_the_evaluator(model, tok, setup, tmp_path, echo, positions):
    exs, folder = train_tiny(model, tok, setup, tmp_path, passage_positions=positions)
    fresh = tiny_llama(vocab_size=len(tiny_hf_tokenizer()), layers=2, hidden=32, heads=4, kv_heads=2)
    with torch.no_grad():  # sharper attention: a random tiny model barely sees positions
        for layer in fresh.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
    loaded, tok2 = load_adapter(fresh, folder)
    teacher = perplexity(loaded, tok2, exs[:6], "append", markers=True, progress=False, echo=echo,
                         passage_positions=positions)
    engine = RALMGenerator(loaded, tok2, retriever=None, mode="none", stride=8)
    engine.markers = marker_ids(tok2)  # score in the append layout with markers
    engine.echo_tokens, engine.passage_positions = echo, positions
    through_engine = engine_perplexity(engine, exs[:6])
    assert through_engine["tokens"] == teacher["tokens"]
    assert abs(through_engine["ppl"] - teacher["ppl"]) <= 1e-5 * teacher["ppl"]
    if echo or positions != "after":  # the variant is really in both: without it the number differs
        plain = perplexity(loaded, tok2, exs[:6], "append", markers=True, progress=False)
        assert abs(plain["ppl"] - teacher["ppl"]) > 2e-4 * teacher["ppl"]


def test_adapter_layout_gives_the_engine_keywords_it_was_trained_for(model, tok, setup, tmp_path):
    from flashback_ext.pipeline.adapter_io import RUN_FILE, adapter_layout

    _, folder = train_tiny(model, tok, setup, tmp_path, steps=1, passage_positions="before")
    assert adapter_layout(folder) == {"echo_tokens": 0, "passage_positions": "before"}
    info = json.loads((folder / RUN_FILE).read_text())
    info["settings"].update(echo_tokens=3, passage_positions="after")
    info["examples_spec"] = {"passage_tokens": 48, "train_min_passage_tokens": 16}
    (folder / RUN_FILE).write_text(json.dumps(info))
    layout = adapter_layout(folder)  # the longest training passage, whatever the shortest
    assert layout == {"echo_tokens": 3, "passage_positions": "after", "passage_tokens": 48}
    engine = RALMGenerator(model, tok, setup[1], mode="append", **layout)
    assert (engine.passage_tokens, engine.echo_tokens, engine.passage_positions) == (48, 3, "after")
    with pytest.raises(AdapterError, match="no FlashBack adapter"):
        adapter_layout(tmp_path / "missing")


def test_adapter_errors(model, tok, setup, tmp_path):
    with pytest.raises(AdapterError, match="no FlashBack adapter"):
        load_adapter(model, tmp_path / "missing")
    _, folder = train_tiny(model, tok, setup, tmp_path, steps=1)
    other = tiny_llama(vocab_size=len(tiny_hf_tokenizer()), layers=3, hidden=32, heads=4, kv_heads=2)
    with pytest.raises(AdapterError, match="trained for another model: num_hidden_layers 2 != 3"):
        load_adapter(other, folder)


def test_warm_start_continues_from_a_saved_adapter(model, tok, setup, tmp_path):
    exs, first = train_tiny(model, tok, setup, tmp_path, steps=2, lora_r=4, lora_alpha=8)
    fresh_tok = tiny_hf_tokenizer()
    fresh = tiny_llama(vocab_size=len(fresh_tok), layers=2, hidden=32, heads=4, kv_heads=2)
    loaded, _ = load_adapter(fresh, first)
    start = {n: p.detach().clone() for n, p in loaded.named_parameters()
             if "lora_" in n or "trainable_tokens_delta" in n}
    assert start and any(float(v.abs().max()) > 0 for n, v in start.items() if "lora_B" in n)
    # the second run starts exactly where the first ended: a zero learning rate keeps it there
    fresh = tiny_llama(vocab_size=len(fresh_tok), layers=2, hidden=32, heads=4, kv_heads=2)
    zero = TrainSettings(precision="fp32", layout="append", markers=True, steps=1, batch_size=4, lr=0.0,
                         marker_lr=0.0, save_steps=100)
    out = train_adapter(fresh, fresh_tok, exs, tmp_path / "second", settings=zero, init_adapter=first)
    info = json.loads((out / "flashback_run.json").read_text())
    assert info["init_adapter"] == str(first)
    assert info["settings"]["lora_r"] == 4 and info["settings"]["lora_alpha"] == 8
    fresh = tiny_llama(vocab_size=len(fresh_tok), layers=2, hidden=32, heads=4, kv_heads=2)
    again, _ = load_adapter(fresh, out)
    for name, param in again.named_parameters():
        if name in start:
            assert torch.equal(param.detach(), start[name]), name
    # and with a real rate every LoRA matrix and the marker rows are trainable and move
    fresh = tiny_llama(vocab_size=len(fresh_tok), layers=2, hidden=32, heads=4, kv_heads=2)
    moving = TrainSettings(precision="fp32", layout="append", markers=True, steps=2, batch_size=4, lr=1e-2,
                           save_steps=100)
    out = train_adapter(fresh, fresh_tok, exs, tmp_path / "third", settings=moving, init_adapter=first)
    fresh = tiny_llama(vocab_size=len(fresh_tok), layers=2, hidden=32, heads=4, kv_heads=2)
    moved, _ = load_adapter(fresh, out)
    params = dict(moved.named_parameters())
    assert all(not torch.equal(params[n].detach(), v) for n, v in start.items())


def test_warm_start_refuses_another_layout_or_split_before_touching_the_model(model, tok, setup,
                                                                               tmp_path):
    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=8, progress=False)
    spec = {"corpus": "docs", "seed": 0, "eval_fraction": 0.25, "budget": 64}
    first = train_adapter(model, tok, exs, tmp_path / "first", extra_info={"examples_spec": spec},
                          settings=TrainSettings(precision="fp32", steps=1, batch_size=4, save_steps=100))
    fresh_tok = tiny_hf_tokenizer()
    fresh = tiny_llama(vocab_size=len(fresh_tok), layers=2, hidden=32, heads=4, kv_heads=2)
    rows = fresh.get_input_embeddings().weight.shape[0]
    with pytest.raises(AdapterError, match="trained with layout 'append', markers True"):
        train_adapter(fresh, fresh_tok, exs, tmp_path / "p",
                      settings=TrainSettings(precision="fp32", layout="prepend", markers=False, steps=1),
                      init_adapter=first)
    with pytest.raises(AdapterError, match="another document split \\(seed 0 != 1\\)"):
        train_adapter(fresh, fresh_tok, exs, tmp_path / "s", settings=TrainSettings(precision="fp32", steps=1),
                      init_adapter=first, extra_info={"examples_spec": dict(spec, seed=1)})
    with pytest.raises(ValueError, match="cannot also stay trainable"):
        load_adapter(fresh, first, merge=True, trainable=True)
    # refused before anything changed: no adapter layers, no marker rows
    assert fresh.get_input_embeddings().weight.shape[0] == rows
    assert not any("lora_" in n for n, _ in fresh.named_parameters())
    assert marker_ids(fresh_tok) is None
    # a budget change keeps the split: allowed
    train_adapter(fresh, fresh_tok, exs, tmp_path / "b",
                  settings=TrainSettings(precision="fp32", steps=1, batch_size=4),
                  init_adapter=first, extra_info={"examples_spec": dict(spec, budget=128)})


def test_warm_start_with_tied_embeddings_trains_one_shared_marker_row(tok, setup, tmp_path):
    # SmolLM2 ties the LM head to the embedding: a warm start must keep the marker rows tied
    def tied():
        return tiny_llama(vocab_size=len(tiny_hf_tokenizer()), layers=2, hidden=32, heads=4,
                          kv_heads=2, tie_embeddings=True)

    exs, first = train_tiny(tied(), tok, setup, tmp_path, steps=2)
    fresh_tok = tiny_hf_tokenizer()
    out = train_adapter(tied(), fresh_tok, exs, tmp_path / "warm", init_adapter=first,
                        settings=TrainSettings(precision="fp32", steps=2, batch_size=4, lr=1e-2, marker_lr=0.1,
                                               save_steps=100))
    before, _ = load_adapter(tied(), first, merge=True)
    after, after_tok = load_adapter(tied(), out, merge=True)
    ids = list(marker_ids(after_tok))
    for merged in (before, after):
        assert merged.get_input_embeddings().weight.data_ptr() == \
            merged.get_output_embeddings().weight.data_ptr()
    moved = after.get_input_embeddings().weight[ids] - before.get_input_embeddings().weight[ids]
    assert float(moved.abs().mean()) > 0.01


def test_more_training_phases_keep_the_held_out_examples(tok, tmp_path, monkeypatch):
    from flashback_ext.pipeline.experiment import ExampleSpec, prepare_examples

    monkeypatch.setenv("FLASHBACK_CACHE", str(tmp_path))
    docs = tmp_path / "docs"
    docs.mkdir()
    for doc_id, _, text in word_docs(n_docs=8, words_per_doc=300):
        (docs / f"{doc_id}.txt").write_text(text)
    spec = ExampleSpec(corpus=str(docs), stride=8, query_tokens=6, passage_tokens=16, budget=64,
                       eval_fraction=0.25, max_train=10_000, max_eval=50)
    train1, eval1 = prepare_examples(tok, spec, progress=False)
    spec.train_target_phases = 2
    train2, eval2 = prepare_examples(tok, spec, progress=False)
    assert eval2 == eval1 and len(train2) > 1.5 * len(train1)
    assert {e.doc_id for e in train2} == {e.doc_id for e in train1}  # same training documents
    assert len(list((tmp_path / "examples").glob("train-*.json"))) == 2  # cached apart
    assert len(list((tmp_path / "examples").glob("eval-*.json"))) == 1
    spec.train_target_phases = 1
    spec.train_min_passage_tokens = 4
    train3, eval3 = prepare_examples(tok, spec, progress=False)
    assert eval3 == eval1 and len(list((tmp_path / "examples").glob("train-*.json"))) == 3
    assert max(len(e.e) for e in eval3) == 16  # held-out passages stay full
    assert len({len(e.e) for e in train3}) > 5 and min(len(e.e) for e in train3) >= 1


def test_random_passage_lengths(tok, setup):
    docs, retriever = setup
    kwargs = dict(stride=8, query_tokens=6, passage_tokens=16, budget=64, seed=3, max_examples=60,
                  progress=False)
    full = build_examples(docs, tok, retriever, **kwargs)
    assert build_examples(docs, tok, retriever, min_passage_tokens=0, **kwargs) == full  # the recipe
    cut = build_examples(docs, tok, retriever, min_passage_tokens=5, **kwargs)
    lengths = [len(ex.e) for ex in cut]
    assert len(set(lengths)) >= 8 and 5 <= min(lengths) and max(lengths) <= 16
    for ex in cut:
        # a prefix of the retrieved passage, budget kept, no target leak in what is shown
        assert retriever.corpus.passages[ex.passage_id].token_ids[:len(ex.e)] == ex.e
        assert len(ex.src) + len(ex.e) + len(ex.tgt) <= 64
        grams = {tuple(ex.tgt[i:i + 8]) for i in range(len(ex.tgt) - 7)}
        assert not grams & {tuple(ex.e[i:i + 8]) for i in range(len(ex.e) - 7)}
    for bad in (-1, 17):
        with pytest.raises(DataError, match="min_passage_tokens must be in \\[0, passage_tokens=16\\]"):
            build_examples(docs, tok, retriever, min_passage_tokens=bad, **kwargs)


@pytest.mark.parametrize("batch_size,grad_accum", [(4, 1), (2, 2), (1, 4)])
def test_logged_loss_is_the_target_mean_nll_whatever_the_accumulation(model, tok, setup, tmp_path,
                                                                      batch_size, grad_accum):
    # lr 0 and no dropout: the one step's loss is the evaluator's token-mean NLL of the 4 examples,
    # so accumulation neither double-divides nor over-weights short micro-batches
    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=4, progress=False)
    add_marking_tokens(model, tok)
    want = perplexity(model, tok, exs, "append", markers=True, progress=False)["nll"]
    settings = TrainSettings(precision="fp32", steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=0.0,
                             lora_dropout=0.0, warmup_ratio=0.0, save_steps=100)
    folder = train_adapter(model, tok, exs, tmp_path / "adapter", settings=settings)
    info = json.loads((folder / "flashback_run.json").read_text())
    assert info["train_loss"] == pytest.approx(want, rel=1e-5)


def test_loss_is_scaled_back_up_when_counts_are_summed_over_processes(model, tok, setup):
    from types import SimpleNamespace

    from flashback_ext.pipeline.train import _trainer_class

    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=2, progress=False)
    batch = Collator("append", None, tok.pad_token_id or 0)(exs)
    trainer = object.__new__(_trainer_class())  # only compute_loss's own attributes are needed
    trainer.exclude_ids = ()
    losses = {}
    for world in (1, 2):
        trainer.args = SimpleNamespace(average_tokens_across_devices=True, world_size=world)
        trainer.accelerator = SimpleNamespace(num_processes=world)
        # with 2 processes the count covers both, here pretended equal: 2x this process's targets
        with torch.no_grad():
            losses[world] = float(trainer.compute_loss(model, dict(batch),
                                                       num_items_in_batch=torch.tensor(16 * world)))
    assert losses[2] == pytest.approx(losses[1], rel=1e-6)


def test_ratio_interval_is_paired_over_examples():
    from flashback_ext.pipeline.evaluate import ratio_interval

    rng = __import__("random").Random(1)
    tokens = [16] * 50 + [9] * 10
    ref = {"nll_sum_by_example": [rng.uniform(20, 60) for _ in tokens], "tokens_by_example": tokens}
    same = ratio_interval(ref, ref)
    assert same == pytest.approx((1.0, 1.0, 1.0))
    # every token 0.1 nats worse: the ratio is exp(0.1) whichever examples are drawn
    shifted = {"nll_sum_by_example": [x + 0.1 * n for x, n in zip(ref["nll_sum_by_example"], tokens)],
               "tokens_by_example": tokens}
    assert ratio_interval(shifted, ref) == pytest.approx((math.exp(0.1),) * 3)
    # noisy differences: the point estimate is the token-weighted one, inside a real interval
    noisy = {"nll_sum_by_example": [x + rng.gauss(0.1 * n, 3) for x, n in
                                    zip(ref["nll_sum_by_example"], tokens)],
             "tokens_by_example": tokens}
    ratio, low, high = ratio_interval(noisy, ref)
    diff = sum(noisy["nll_sum_by_example"]) - sum(ref["nll_sum_by_example"])
    assert ratio == pytest.approx(math.exp(diff / sum(tokens)))
    assert low < ratio < high and high - low > 0.01
    assert ratio_interval(noisy, ref, level=0.5)[1] > low  # a narrower level, a narrower interval
    with pytest.raises(ValueError, match="same examples"):
        ratio_interval(noisy, {"nll_sum_by_example": [1.0], "tokens_by_example": [16]})


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_two_processes_train_the_same_adapter_as_one(tmp_path, tied):
    # the multi-GPU path for real, on CPU (gloo): torchrun with 2 processes x batch 2 must give the
    # adapter and loss of one process x batch 4 (same examples per step, loss over their targets)
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    worker = str(Path(__file__).parent / "ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["tied"] if tied else []
    runs = {"one": [sys.executable, worker, str(tmp_path / "one"), "4", "3", *extra],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", worker, str(tmp_path / "two"), "2", "3", *extra]}
    for name, cmd in runs.items():
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name}: {done.stderr[-3000:]}"
    info = {n: json.loads((tmp_path / n / "flashback_run.json").read_text()) for n in runs}
    assert (info["one"]["processes"], info["two"]["processes"]) == (1, 2)
    assert info["two"]["train_loss"] == pytest.approx(info["one"]["train_loss"], rel=1e-5)
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two) and any("trainable_tokens" in k for k in one)
    for key in one:
        assert float(one[key].abs().max()) > 0, f"{key} never trained"
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


def test_held_out_curve_is_the_evaluators_number_and_survives_a_resume(model, tok, setup, tmp_path):
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # a base model loaded from a folder, as users do: peft's own save default would then store the
    # whole resized embedding in every checkpoint
    model.save_pretrained(tmp_path / "base")

    def base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()

    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=20, progress=False)
    train, held = exs[:16], exs[16:]
    settings = TrainSettings(precision="fp32", steps=4, batch_size=4, lr=1e-2, save_steps=2, eval_every=2)
    full = train_adapter(base(), tok, train, tmp_path / "full", settings=settings, eval_examples=held)
    curve = json.loads((full / "flashback_run.json").read_text())["held_out_curve"]
    assert [p["step"] for p in curve] == [2, 4] and curve[0]["perplexity"] != curve[1]["perplexity"]
    # checkpoints hold only what trains, not the whole (resized) embedding
    saved = load_file(full / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert any("trainable_tokens" in k for k in saved)
    assert not [k for k in saved if "embed_tokens.weight" in k or "lm_head" in k]
    loaded, tok2 = load_adapter(base(), full)
    want = perplexity(loaded, tok2, held, "append", markers=True, progress=False)["ppl"]
    assert curve[-1]["perplexity"] == pytest.approx(want, rel=1e-6)

    # stopped after the step-4 evaluation but before its checkpoint: --resume goes on from step 2,
    # drops the later point and ends with the same adapter and curve as the run never stopped
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints", cut / "checkpoints")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    stale = json.loads((cut / "checkpoints" / "held_out_curve.json").read_text())
    stale[-1]["perplexity"] = -1.0  # the point after the checkpoint must be scored again
    (cut / "checkpoints" / "held_out_curve.json").write_text(json.dumps(stale))
    train_adapter(base(), tiny_hf_tokenizer(), train, cut, settings=settings, eval_examples=held,
                  resume=True)
    info = json.loads((cut / "flashback_run.json").read_text())
    assert info["resumed_from"] == "checkpoint-2"
    again = info["held_out_curve"]
    assert [p["step"] for p in again] == [2, 4] and again[-1]["perplexity"] > 0
    for a, b in zip(again, curve):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    one = load_file(full / "adapter_model.safetensors")
    two = load_file(cut / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_an_unreadable_curve_file_is_ignored(tmp_path, caplog):
    from flashback_ext.pipeline.train import CURVE_FILE, _read_curve

    (tmp_path / CURVE_FILE).write_text('[{"step": 2, "perplex')  # cut off mid-write
    assert _read_curve(tmp_path) == []
    assert "unreadable held-out curve" in caplog.text


def test_held_out_curve_bad_settings(model, tok, setup, tmp_path):
    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=4, progress=False)
    with pytest.raises(ValueError, match="eval_every needs held-out examples"):
        train_adapter(model, tok, exs, tmp_path / "a", settings=TrainSettings(precision="fp32", steps=1, eval_every=1))
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        train_adapter(model, tok, exs, tmp_path / "b", settings=TrainSettings(precision="fp32", steps=1, eval_every=-1),
                      eval_examples=exs)


def test_passage_positions_before_are_the_prepend_geometry(model, tok, setup):
    # "before": the append layout's tokens, with <MARK_L> e at the positions a prepended passage
    # has and <MARK_R> right after the context; batched (left-padded) = one example at a time
    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=6, progress=False)
    ids = add_marking_tokens(model, tok)
    ex = exs[0]
    pos = layout_positions(ex, "append", ids, passage_positions="before")
    tokens, start = layout_tokens(ex, "append", ids)
    n_e, n_src = len(ex.e) + 1, len(ex.src)
    assert pos[:n_src] == list(range(n_e, n_e + n_src))               # context after the passage
    assert pos[n_src:n_src + n_e] == list(range(n_e))                 # <MARK_L> e from 0
    assert pos[start - 1] == n_e + n_src and tokens[start - 1] == ids[1]  # <MARK_R> next
    assert pos[start:] == list(range(n_e + n_src + 1, n_e + n_src + 1 + len(ex.tgt)))
    assert layout_positions(ex, "append", ids) == list(range(len(tokens)))
    batch = Collator("append", ids, 0, passage_positions="before")(exs)
    assert "position_ids" not in Collator("append", ids, 0)(exs)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        for i, ex in enumerate(exs):
            toks, _ = layout_tokens(ex, "append", ids)
            # an explicit mask: without one (and no cache) transformers reads non-consecutive
            # positions as packed sequences
            one = model(input_ids=torch.tensor([toks]),
                        attention_mask=torch.ones(1, len(toks), dtype=torch.long),
                        position_ids=torch.tensor([layout_positions(ex, "append", ids,
                                                                    passage_positions="before")])).logits
            torch.testing.assert_close(logits[i, -len(toks):], one[0], atol=2e-5, rtol=0)
        # and the positions matter, by far more than that tolerance (a random tiny model is
        # nearly position-blind): the paper's contiguous ones give other logits
        ones = torch.ones(1, len(tokens), dtype=torch.long)
        plain = model(input_ids=torch.tensor([tokens]), attention_mask=ones).logits
        shifted = model(input_ids=torch.tensor([tokens]), attention_mask=ones,
                        position_ids=torch.tensor([pos])).logits
        assert float((plain[0, start:] - shifted[0, start:]).abs().max()) > 1e-4
    for layout, markers, echo, match in [("prepend", None, 0, "needs the append layout"),
                                         ("append", None, 0, "needs the marking tokens"),
                                         ("append", None, 2, "needs the marking tokens")]:
        with pytest.raises(ValueError, match=match):
            Collator(layout, markers, 0, echo=echo, passage_positions="before")
    with pytest.raises(ValueError, match="passage_positions must be one of"):
        Collator("append", ids, 0, passage_positions="middle")
    model.config._attn_implementation = "flash_attention_2"  # refused before any forward
    with pytest.raises(ValueError, match="needs sdpa or eager attention"):
        perplexity(model, tok, exs, "append", markers=True, passage_positions="before",
                   progress=False)


@pytest.mark.parametrize("echo", [1, 3])
def test_passages_before_with_an_echo_take_a_prepended_layouts_positions(model, tok, setup, echo):
    # "before" + echo k: src | <MARK_L> e <MARK_R> | src[-k:] | tgt, where E takes a prepended
    # passage's positions, the context the next ones, the echo its own tokens' positions again
    # and the targets follow the context: the first target is predicted from a copy of the
    # context's last token at that token's position
    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=6, progress=False)
    ids = add_marking_tokens(model, tok)
    ex = exs[0]
    tokens, start = layout_tokens(ex, "append", ids, echo=echo)
    pos = layout_positions(ex, "append", ids, echo=echo, passage_positions="before")
    n_e, n_src = len(ex.e) + 2, len(ex.src)
    assert len(pos) == len(tokens) and start == n_src + n_e + echo
    assert pos[:n_src] == list(range(n_e, n_e + n_src))                 # the context after E
    assert pos[n_src:n_src + n_e] == list(range(n_e))                   # all of E from 0
    assert tokens[n_src + n_e - 1] == ids[1]
    assert tokens[n_src + n_e:start] == list(ex.src[-echo:])            # the echo...
    assert pos[n_src + n_e:start] == pos[n_src - echo:n_src]            # ...at its own positions
    assert pos[start:] == list(range(n_e + n_src, n_e + n_src + len(ex.tgt)))
    # batched (left-padded) = one example at a time
    batch = Collator("append", ids, 0, echo=echo, passage_positions="before")(exs)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        for i, one_ex in enumerate(exs):
            toks, _ = layout_tokens(one_ex, "append", ids, echo=echo)
            one_pos = layout_positions(one_ex, "append", ids, echo=echo,
                                       passage_positions="before")
            one = model(input_ids=torch.tensor([toks]), position_ids=torch.tensor([one_pos]),
                        attention_mask=torch.ones(1, len(toks), dtype=torch.long)).logits
            torch.testing.assert_close(logits[i, -len(toks):], one[0], atol=2e-5, rtol=0)
    # the evaluator scores the targets at these positions (not the contiguous ones)
    got = perplexity(model, tok, exs, "append", markers=True, echo=echo,
                     passage_positions="before", progress=False)["nll"]
    contiguous = perplexity(model, tok, exs, "append", markers=True, echo=echo,
                            progress=False)["nll"]
    assert got != contiguous


def test_training_with_passages_before_sees_those_positions(tok, setup, tmp_path):
    # lr 0, no dropout: the logged loss is the evaluator's NLL at the "before" positions, which
    # differs from the contiguous positions' on a position-sensitive model
    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=4, progress=False)
    model = tiny_llama(vocab_size=len(tok), layers=2, hidden=32, heads=4, kv_heads=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
    add_marking_tokens(model, tok)
    want = perplexity(model, tok, exs, "append", markers=True, progress=False,
                      passage_positions="before")["nll"]
    other = perplexity(model, tok, exs, "append", markers=True, progress=False)["nll"]
    assert abs(want - other) > 2e-4  # 5x the tolerance below
    settings = TrainSettings(precision="fp32", steps=1, batch_size=4, lr=0.0, lora_dropout=0.0, warmup_ratio=0.0,
                             save_steps=100, passage_positions="before")
    folder = train_adapter(model, tok, exs, tmp_path / "adapter", settings=settings)
    info = json.loads((folder / "flashback_run.json").read_text())
    assert info["train_loss"] == pytest.approx(want, rel=1e-5)
    assert info["settings"]["passage_positions"] == "before"
