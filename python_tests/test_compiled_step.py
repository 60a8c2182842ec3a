"""The compiled CPU decode step (RALMGenerator(compile=True)): the same tokens and logits as the
eager engine, compiled once per cache and never again, refused where it does not apply."""
import pytest
import torch
from torch._dynamo.utils import counters

from flashback_ext.engine.generator import RALMGenerator
from flashback_ext.engine.models import tiny_llama

from test_ralm import TEXTS, low_precision_errors, max_trace_error
from toys import ByteTokenizer, ListRetriever

PROMPTS = ["hello world, this is a longer prompt", "hi there"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=260, layers=2)


def _engine(model, **kwargs):
    tok = ByteTokenizer(markers=True)
    return RALMGenerator(model, tok, ListRetriever(TEXTS, tok), mode="append", stride=5,
                         query_tokens=8, passage_tokens=12, capacity=256, **kwargs)


def test_compiled_step_equals_eager_and_compiles_once(tiny):
    eager = _engine(tiny).generate(PROMPTS, max_new_tokens=12, trace=True, stop_on_eos=False)
    gen = _engine(tiny, compile=True)
    got = gen.generate(PROMPTS, max_new_tokens=12, trace=True, stop_on_eos=False)
    assert got[0].timing.graph_steps > 0 and got[0].timing.compile_s > 0
    block = gen._decoder.block_step
    assert block is not None and block.runs >= 3 and block.compile_s > 0  # prompt + 2 retrievals
    for a, b in zip(got, eager):
        assert a.token_ids == b.token_ids
        assert [seq for seq, _ in a.trace] == [seq for seq, _ in b.trace]
        for (_, la), (_, lb) in zip(a.trace, b.trace):
            torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert max_trace_error(tiny, got) <= 1e-3  # and equal to a from-scratch forward
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the step was compiled
    # other prompts, lengths and retrievals on the kept cache: no new graph
    again = gen.generate(["another prompt of another length", "x"], max_new_tokens=17,
                         stop_on_eos=False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert again[0].timing.compile_s == 0 and again[0].timing.graph_steps > 0
    assert block.runs >= 7  # and its blocks (3 + 4) ran compiled


def test_compiled_block_only_in_append_mode(tiny):
    tok = ByteTokenizer(markers=True)
    prepend = RALMGenerator(tiny, tok, ListRetriever(TEXTS, tok), mode="prepend", stride=5,
                            query_tokens=8, passage_tokens=12, capacity=256, compile=True)
    prepend.generate(PROMPTS, max_new_tokens=6, stop_on_eos=False)
    assert prepend._decoder.block_step is None


def test_a_failing_compiled_block_falls_back_to_eager(tiny, caplog):
    # the reference: the eager static step after the same warm-up call on its kept cache
    static = _engine(tiny, cuda_graphs=True)
    static.generate(PROMPTS, max_new_tokens=2, stop_on_eos=False)
    want = static.generate(PROMPTS, max_new_tokens=12, stop_on_eos=False)
    gen = _engine(tiny, compile=True)
    gen.generate(PROMPTS, max_new_tokens=2, stop_on_eos=False)  # builds the kept steps

    def broken(ids, positions, cache, counts):
        cache.step_counts = counts
        cache.ring.append_on_device(0, *[torch.zeros(ids.shape[0], cache.ring.num_kv_heads,
                                                     ids.shape[1], cache.ring.head_dim)] * 2,
                                    counts)  # one layer advanced, then the failure
        raise RuntimeError("graph break")

    gen._decoder.block_step._compiled = broken
    got = gen.generate(PROMPTS, max_new_tokens=12, stop_on_eos=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert "forwarding blocks eagerly" in caplog.text and gen._decoder.block_step.failed


def test_compiled_step_in_bf16_stays_within_bf16_error(tiny):
    import copy

    half = copy.deepcopy(tiny).to(torch.bfloat16)
    got = _engine(half, compile=True).generate(PROMPTS, max_new_tokens=8, trace=True,
                                               stop_on_eos=False)
    worst_engine, worst_plain = low_precision_errors(tiny, half, got)
    assert 0 < worst_engine <= 2 * worst_plain + 1e-3, (worst_engine, worst_plain)


def test_compile_refusals(tiny):
    with pytest.raises(ValueError, match="needs cuda_graphs left at None or True"):
        _engine(tiny, compile=True, cuda_graphs=False)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="compiled CPU decode step"):
            _engine(tiny_llama(vocab_size=260, layers=2).cuda(), compile=True)


def test_a_failing_compiled_step_falls_back_to_eager(tiny, caplog):
    # the reference: the eager static step after the same warm-up call on its kept cache
    static = _engine(tiny, cuda_graphs=True)
    static.generate(PROMPTS, max_new_tokens=2, stop_on_eos=False)
    want = static.generate(PROMPTS, max_new_tokens=8, stop_on_eos=False)
    gen = _engine(tiny, compile=True)
    gen.generate(PROMPTS, max_new_tokens=2, stop_on_eos=False)  # builds the kept decoder

    def broken(ids, positions, cache, counts):
        cache.step_counts = counts  # fails half-way, as a recompile-limit error would not
        raise RuntimeError("recompile limit")

    gen._decoder._compiled = broken
    got = gen.generate(PROMPTS, max_new_tokens=8, stop_on_eos=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert "decoding eagerly" in caplog.text and gen._decoder._compiled is None
    assert gen._decoder.cache.step_counts is None
