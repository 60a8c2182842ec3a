"""RALM engine exactness: the logits of every step equal a from-scratch forward of exactly the
token sequence the engine claims the model saw ([context | E | new tokens] for append,
[E | context] for prepend), on a tiny random Llama and on the embedded SmolLM2."""
import json

import pytest
import torch

from flashback_ext.engine.generator import RALMGenerator
from flashback_ext.engine.models import tiny_llama
from flashback_ext.marking import marker_ids

from toys import ByteTokenizer, ListRetriever

TEXTS = ["alpha beta gamma delta " * 4, "the quick brown fox jumps over the lazy dog",
         "python lists are mutable sequences", "a b c d e f g h i j k l m n o p"]


@torch.no_grad()
def max_trace_error(model, results) -> float:
    worst = 0.0
    for r in results:
        assert r.trace, "trace=True must record every step"
        assert len(r.trace_positions) == len(r.trace)
        for (seq, logits), pos in zip(r.trace, r.trace_positions):
            assert len(pos) == len(seq)
            # an explicit mask: without one, transformers reads non-consecutive positions as
            # packed sequences and masks across them
            ref = model(torch.tensor([seq]), position_ids=torch.tensor([pos]),
                        attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits[0, -1].float()
            worst = max(worst, (ref - logits).abs().max().item())
    return worst


@torch.no_grad()
def low_precision_errors(reference, low, results) -> tuple[float, float]:
    """``(engine, plain)``: the largest deviation from the ``reference`` model's logits of the
    engine's traced logits and of a plain forward of the ``low``-precision copy, over every
    traced step."""
    worst_engine = worst_plain = 0.0
    for r in results:
        for (seq, logits), pos in zip(r.trace, r.trace_positions):
            args = dict(position_ids=torch.tensor([pos]),
                        attention_mask=torch.ones(1, len(seq), dtype=torch.long))
            ref = reference(torch.tensor([seq]), **args).logits[0, -1].float()
            plain = low(torch.tensor([seq]), **args).logits[0, -1].float()
            worst_engine = max(worst_engine, (logits - ref).abs().max().item())
            worst_plain = max(worst_plain, (plain - ref).abs().max().item())
    return worst_engine, worst_plain


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=260, layers=2)


@pytest.mark.parametrize("mode", ["append", "prepend", "none"])
@pytest.mark.parametrize("markers", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_engine_matches_from_scratch_forward(tiny, mode, markers, k):
    tok = ByteTokenizer(markers=markers)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), mode=mode, stride=5,
                        query_tokens=8, passage_tokens=24, k=k)
    assert gen.use_markers == markers
    results = gen.generate(["hello world, this is a longer prompt", "hi", "medium prompt"],
                           max_new_tokens=17, trace=True, stop_on_eos=False)
    assert max_trace_error(tiny, results) <= 1e-3
    for r in results:
        assert len(r.token_ids) == 17
        assert len(r.retrievals) == (0 if mode == "none" else 4)  # at 0, 5, 10, 15
        if mode != "none":
            seq = r.trace[-1][0]
            assert (seq.count(257) == 1) == markers  # one E in view at a time


def test_append_layout_is_context_then_passage(tiny):
    tok = ByteTokenizer(markers=True)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4, passage_tokens=10)
    r = gen.generate("abcdefgh", max_new_tokens=6, trace=True, stop_on_eos=False)
    seq0 = r.trace[0][0]  # first step: prompt | E
    assert seq0[:8] == list(b"abcdefgh") and seq0[8] == 257 and seq0[-1] == 258
    seq5 = r.trace[5][0]  # after the 2nd retrieval at 4 new tokens: prompt + 4 new | E | 1 new
    assert seq5[:12] == list(b"abcdefgh") + r.token_ids[:4] and seq5[12] == 257
    assert seq5[-2] == 258 and seq5[-1] == r.token_ids[4]


def test_sampling_is_seeded_and_streams(tiny):
    tok = ByteTokenizer()
    seen = []
    runs = []
    for stream in (lambda b, t, s: seen.append(t), None):
        gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4)  # fresh rotation
        runs.append(gen.generate("seed test", max_new_tokens=12, do_sample=True, temperature=0.8,
                                 top_k=50, top_p=0.9, seed=7, stop_on_eos=False, stream=stream))
    assert runs[0].token_ids == runs[1].token_ids and seen == runs[0].token_ids
    greedy = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4).generate(
        "seed test", max_new_tokens=12, stop_on_eos=False)
    assert greedy.token_ids != runs[0].token_ids  # sampling at T=0.8 is not greedy here


def test_eos_stops_one_sequence_not_the_batch(tiny):
    tok = ByteTokenizer()
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=3)
    free = gen.generate(["xy", "a longer prompt"], max_new_tokens=9, stop_on_eos=False)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=3)
    gen.eos_ids = {free[0].token_ids[1]}  # make sequence 0's second token an EOS
    stopped = gen.generate(["xy", "a longer prompt"], max_new_tokens=9)
    assert stopped[0].finish_reason == "eos" and stopped[0].token_ids == free[0].token_ids[:2]
    if gen.eos_ids.isdisjoint(free[1].token_ids):
        assert stopped[1].token_ids == free[1].token_ids and stopped[1].finish_reason == "length"


def test_evict_policy_keeps_generating(tiny):
    tok = ByteTokenizer()
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4, passage_tokens=8,
                        capacity=40, overflow="evict", sink=4)
    r = gen.generate("a prompt that is fairly long already", max_new_tokens=20, stop_on_eos=False)
    assert len(r.token_ids) == 20


@pytest.mark.parametrize("markers", [True, False])
def test_context_echo_follows_each_passage(tiny, markers):
    tok = ByteTokenizer(markers=markers)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4, passage_tokens=10,
                        echo_tokens=3)
    results = gen.generate(["abcdefgh", "xy"], max_new_tokens=11, trace=True, stop_on_eos=False)
    assert max_trace_error(tiny, results) <= 1e-3
    r = results[0]
    seq0 = r.trace[0][0]  # first step: prompt | E | last 3 prompt tokens
    assert seq0[:8] == list(b"abcdefgh") and seq0[-3:] == list(b"fgh")
    assert (seq0[-4] == 258) == markers
    # after the 2nd retrieval at 4 new tokens: prompt + 4 new | E | last 3 of those | 1 new
    ctx = list(b"abcdefgh") + r.token_ids[:4]
    seq5 = r.trace[5][0]
    assert seq5[:12] == ctx and seq5[-4:] == ctx[-3:] + [r.token_ids[4]]
    assert len(seq5) == 12 + 10 + 2 * markers + 3 + 1  # the old passage and echo are gone
    short = results[1].trace[0][0]  # a prompt shorter than the echo: echoed whole
    assert short[:2] == list(b"xy") and short[-2:] == list(b"xy")
    assert len(short) == 2 + 10 + 2 * markers + 2


def test_passages_before_the_context_in_rotary_positions(tiny):
    # passage_positions="before": the append layout's cache order, the prepend layout's geometry
    tok = ByteTokenizer(markers=True)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4, passage_tokens=10,
                        passage_positions="before")
    results = gen.generate(["abcdefgh", "xy", "a longer prompt than those"], max_new_tokens=11,
                           trace=True, stop_on_eos=False)
    assert max_trace_error(tiny, results) <= 1e-3
    r = results[0]
    seq0, pos0 = r.trace[0][0], r.trace_positions[0]  # prompt | <MARK_L> e <MARK_R>
    n_e = len(seq0) - 8
    assert seq0[8] == 257 and seq0[-1] == 258
    assert pos0 == list(range(8)) + list(range(-(n_e - 1), 0)) + [8]
    # after the 2nd retrieval at 4 new tokens: prompt + 4 new | E_new | 1 new token
    seq5, pos5 = r.trace[5][0], r.trace_positions[5]
    n_e = len(seq5) - 13
    assert pos5 == list(range(12)) + list(range(-(n_e - 1), 0)) + [12, 13]
    # and the positions are what the logits followed: the paper's contiguous ones differ
    plain = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4, passage_tokens=10)
    other = plain.generate("abcdefgh", max_new_tokens=2, trace=True, stop_on_eos=False)
    assert other.trace_positions[0] == list(range(len(seq0)))
    assert (other.trace[0][1] - r.trace[0][1]).abs().max() > 1e-4


def test_passages_before_with_an_echo_in_rotary_positions(tiny):
    # "before" + echo 3: the block is new | E | echo; E sits before the context, the echo at the
    # positions of the tokens it repeats, the new tokens follow the context
    tok = ByteTokenizer(markers=True)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4, passage_tokens=10,
                        passage_positions="before", echo_tokens=3)
    results = gen.generate(["abcdefgh", "xy", "a longer prompt than those"], max_new_tokens=11,
                           trace=True, stop_on_eos=False)
    assert max_trace_error(tiny, results) <= 1e-3
    r = results[0]
    seq0, pos0 = r.trace[0][0], r.trace_positions[0]  # prompt | <MARK_L> e <MARK_R> | fgh
    n_e = len(seq0) - 8 - 3
    assert seq0[8] == 257 and seq0[8 + n_e - 1] == 258 and seq0[-3:] == list(b"fgh")
    assert pos0 == list(range(8)) + list(range(-n_e, 0)) + [5, 6, 7]
    assert r.trace_positions[1][-1] == 8  # the first new token follows the context
    # after the 2nd retrieval at 4 new tokens: prompt + 4 new | E_new | echo 3 | 1 new token
    seq5, pos5 = r.trace[5][0], r.trace_positions[5]
    n_e = len(seq5) - 12 - 3 - 1
    assert pos5 == list(range(12)) + list(range(-n_e, 0)) + [9, 10, 11, 12]
    short = results[1]  # a prompt shorter than the echo is echoed whole, at its positions
    assert short.trace[0][0][-2:] == list(b"xy") and short.trace_positions[0][-2:] == [0, 1]


@pytest.mark.parametrize("echo", [0, 2])
def test_engine_scores_with_passages_before_like_a_forward(tiny, echo):
    tok = ByteTokenizer(markers=True)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=3, passage_tokens=10,
                        passage_positions="before", echo_tokens=echo)
    src, e, tgt = list(b"the context here"), list(b"a passage"), list(b"next")
    got = gen.score(src, e, tgt)
    seq = src + [257, *e, 258] + src[len(src) - echo:] + tgt
    if echo:  # E before the context, the echo at its own positions, then the targets
        n_e = len(e) + 2
        pos = list(range(n_e, n_e + len(src))) + list(range(n_e)) \
            + list(range(n_e + len(src) - echo, n_e + len(src) + len(tgt)))
    else:  # <MARK_L> e before the context, <MARK_R> after it
        n_e = len(e) + 1
        pos = list(range(n_e, n_e + len(src))) + list(range(n_e)) + \
            list(range(n_e + len(src), n_e + len(src) + 1 + len(tgt)))
    with torch.no_grad():
        logits = tiny(torch.tensor([seq]), position_ids=torch.tensor([pos]),
                      attention_mask=torch.ones(1, len(seq), dtype=torch.long)).logits[0].float()
    first = len(seq) - len(tgt) - 1  # the token that predicts the first target
    want = torch.log_softmax(logits[first: -1], -1)[torch.arange(len(tgt)), torch.tensor(tgt)]
    torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_engine_in_bf16_is_as_exact_as_plain_bf16(tiny, mode):
    # what --dtype auto picks on AMX/AVX512-BF16 CPUs: the engine's bf16 logits may differ from
    # the fp32 reference by at most twice what a plain transformers bf16 forward of the same
    # sequence differs (the FlashAttention rule), plus a small slack
    import copy

    half = copy.deepcopy(tiny).to(torch.bfloat16)
    tok = ByteTokenizer(markers=True)
    gen = RALMGenerator(half, tok, ListRetriever(TEXTS, tok), mode=mode, stride=5,
                        query_tokens=8, passage_tokens=24)
    results = gen.generate(["hello world, this is a longer prompt", "hi"], max_new_tokens=12,
                           trace=True, stop_on_eos=False)
    worst_engine, worst_plain = low_precision_errors(tiny, half, results)
    assert worst_plain > 0  # bf16 really is coarser than the reference
    assert worst_engine <= 2 * worst_plain + 1e-3, (worst_engine, worst_plain)


@pytest.mark.parametrize("kwargs,match", [
    (dict(passage_positions="middle"), "passage_positions must be one of"),
    (dict(passage_positions="before", mode="prepend"), "'before' needs the append layout"),
    (dict(passage_positions="before", echo_tokens=2, use_markers=False), "needs the marking"),
    (dict(passage_positions="before"), "needs the marking tokens"),
    (dict(echo_tokens=-1), "echo_tokens must be an int >= 0"),
    (dict(echo_tokens=2, mode="prepend"), r"echo \(echo_tokens=2\) needs the append layout"),
    (dict(mode="sideways"), "mode must be one of"),
    (dict(stride=0), "stride must be a positive int"),
    (dict(query_tokens=-1), "query_tokens must be a positive int"),
    (dict(capacity=10), "need .* cache slots, capacity is 10"),
    # a short prompt's first block fits, but decoding after it would evict the
    # passage that the next retrieval rolls back
    (dict(capacity=24, sink=2, stride=16, passage_tokens=8, overflow="evict"),
     r"capacity - sink >= stride \+ passage block = 26 slots, got 24 - 2"),
    (dict(use_markers=True), "has no <MARK_L>/<MARK_R>"),
])
def test_bad_engine_settings(tiny, kwargs, match):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=match):
        gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), **kwargs)
        gen.generate("prompt longer than ten tokens", max_new_tokens=8)


def test_retriever_required_for_retrieval_modes(tiny):
    with pytest.raises(ValueError, match="needs a retriever"):
        RALMGenerator(tiny, ByteTokenizer(), None, mode="append")
    RALMGenerator(tiny, ByteTokenizer(), None, mode="none").generate("ok", max_new_tokens=2)


def test_bad_prompts(tiny):
    gen = RALMGenerator(tiny, ByteTokenizer(), None, mode="none")
    for bad in ([], [""], [3]):
        with pytest.raises(ValueError):
            gen.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate("x", max_new_tokens=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_engine_exact_on_embedded_smollm2(smollm2, mode):
    from flashback_ext.engine.retrieval import BM25Retriever, Corpus

    model, tokenizer = smollm2
    retriever = BM25Retriever(Corpus.default(tokenizer))
    gen = RALMGenerator(model, tokenizer, retriever, mode=mode, stride=8)
    results = gen.generate(["The for statement in Python", "A lambda expression"],
                           max_new_tokens=18, trace=True, stop_on_eos=False)
    err = max_trace_error(model, results)
    print(f"SmolLM2 {mode}: max |engine - from-scratch| logits = {err:.2e}")
    assert err <= 1e-3


def test_markers_are_never_generated():
    tiny = tiny_llama(vocab_size=260, layers=2)  # own copy: the weights are edited below
    tok = ByteTokenizer(markers=True)
    gen = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), stride=4)
    with torch.no_grad():  # make the markers overwhelmingly likely
        tiny.lm_head.weight[257:259] *= 0
        tiny.lm_head.weight[257:259] += 50 * tiny.model.norm.weight
    r = gen.generate("abc", max_new_tokens=12, stop_on_eos=False)
    assert not {257, 258} & set(r.token_ids)


def test_top_p_zero_keeps_the_best_token(tiny):
    tok = ByteTokenizer()
    greedy = RALMGenerator(tiny, tok, None, mode="none").generate("abc", max_new_tokens=6,
                                                                  stop_on_eos=False)
    nucleus = RALMGenerator(tiny, tok, None, mode="none").generate(
        "abc", max_new_tokens=6, do_sample=True, top_p=0.0, seed=1, stop_on_eos=False)
    assert nucleus.token_ids == greedy.token_ids


def test_passages_from_another_tokenizer_are_reencoded(tiny):
    tok = ByteTokenizer()
    ret = ListRetriever(TEXTS, tok)
    for p in ret.corpus.passages:  # as if an index had been built with another tokenizer
        p.token_ids = [x + 1 for x in p.token_ids]
    gen = RALMGenerator(tiny, tok, ret, stride=4, passage_tokens=200)
    from flashback_ext.engine.retrieval import Hit
    block = gen.passage_block([Hit(ret.corpus.passages[2], 1.0)])
    assert block == list(TEXTS[2].encode())


def test_shipped_adapters_by_use():
    from flashback_ext.engine.models import default_adapter_path
    from flashback_ext.pipeline.adapter_io import run_info

    export = default_adapter_path("export")
    assert export is not None and export.name == "smollm2-135m-flashback"
    # a merged export is served with slot-numbered positions: only the paper's layout merges
    assert run_info(export)["settings"].get("passage_positions", "after") == "after"
    assert default_adapter_path() == default_adapter_path("engine") is not None
    with pytest.raises(ValueError, match="use must be one of"):
        default_adapter_path("serve")


@pytest.mark.slow
@pytest.mark.parametrize("use", ["engine", "export"])
def test_shipped_adapter_drives_append_mode(use):
    from flashback_ext.engine.models import default_adapter_path, load_model
    from flashback_ext.engine.retrieval import BM25Retriever, Corpus
    from flashback_ext.pipeline.adapter_io import load_adapter, run_info

    path = default_adapter_path(use)
    assert path is not None, "the package ships the SmolLM2 FlashBack adapter"
    settings = run_info(path)["settings"]
    config = json.loads((path / "adapter_config.json").read_text())
    # peft's own loaders look the base model up by this name: the public one, not a build folder
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (path / "tokenizer.json").exists()  # the base tokenizer + markers rebuild it
    base, tokenizer = load_model(config["base_model_name_or_path"], device="cpu")  # embedded
    assert base.config._name_or_path == config["base_model_name_or_path"]
    tuned, tuned_tok = load_adapter(base, path, tokenizer, merge=True)
    assert len(tuned_tok) == len(tokenizer) + 2
    assert list(marker_ids(tuned_tok)) == config["trainable_token_indices"]["embed_tokens"]
    engine = RALMGenerator(tuned, tuned_tok, BM25Retriever(Corpus.default(tokenizer)), stride=8,
                           echo_tokens=settings.get("echo_tokens", 0),
                           passage_positions=settings.get("passage_positions", "after"))
    assert engine.use_markers
    r = engine.generate("The try statement", max_new_tokens=12, trace=True, stop_on_eos=False)
    assert len(r.retrievals) == 2 and not set(engine.markers) & set(r.token_ids)
    assert max_trace_error(tuned, [r]) <= 1e-3


def test_cpu_head_in_weight_major_order_gives_the_heads_logits(tiny):
    tok = ByteTokenizer()
    gen = RALMGenerator(tiny, tok, None, mode="none")
    last = torch.randn(3, tiny.config.hidden_size)
    want = tiny.lm_head(last)
    calls = []
    hook = tiny.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.testing.assert_close(gen._head_logits(last), want, rtol=1e-5, atol=1e-5)
        assert not calls  # several rows: the weight-major product, not the module
        torch.testing.assert_close(gen._head_logits(last[:1]), want[:1])
        assert calls  # one row: the module itself
    finally:
        hook.remove()
    # a head with a bias, a peft-wrapped one or one with an accelerate offload hook is always
    # called as it is
    biased = torch.nn.Linear(tiny.config.hidden_size, 260, bias=True)
    gen._head = biased
    torch.testing.assert_close(gen._head_logits(last), biased(last))
    hooked = torch.nn.Linear(tiny.config.hidden_size, 260, bias=False)
    hooked._hf_hook = object()
    hooked.register_forward_hook(lambda *a: calls.append("hooked"))
    gen._head = hooked
    gen._head_logits(last)
    assert calls[-1] == "hooked"


@pytest.mark.parametrize("passage_positions", ["after", "before"])
def test_evicting_engine_matches_a_forward_of_what_the_cache_holds(passage_positions):
    # overflow="evict" drops the oldest non-sink context tokens; the survivors keep their
    # positions, and the trace shows what the cache holds. With one layer, keys depend on their
    # own token only, so every step must equal a forward of the held tokens at those positions
    # (deeper keys remember evicted tokens: test_hf checks that with a mask).
    one_layer = tiny_llama(vocab_size=260, layers=1)
    tok = ByteTokenizer(markers=True)
    sink = 3
    gen = RALMGenerator(one_layer, tok, ListRetriever(TEXTS, tok), stride=4, passage_tokens=8,
                        capacity=36, overflow="evict", sink=sink,
                        passage_positions=passage_positions)
    results = gen.generate(["a prompt that is fairly long already", "short one"],
                           max_new_tokens=21, trace=True, stop_on_eos=False)
    assert max_trace_error(one_layer, results) <= 1e-3
    for r in results:
        assert all(len(seq) <= 36 for seq, _ in r.trace)
        last = r.trace_positions[-1]
        assert last[:sink] == list(range(sink))  # the sink stays
        assert last[sink] > sink  # and the oldest context tokens after it were evicted
