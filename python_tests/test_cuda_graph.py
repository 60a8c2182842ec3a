"""The static decode step behind CUDA graphs (flashback_ext.engine.cuda_graph): on the CPU it runs
eagerly and must reproduce the eager engine token for token and logit for logit; on a GPU the
captured graph's replays must do the same."""
import pytest
import torch

from flashback_ext.engine.cuda_graph import DecodeGraph
from flashback_ext.engine.generator import RALMGenerator
from flashback_ext.engine.hf import FlashBackCache
from flashback_ext.engine.models import tiny_llama
from flashback_ext.ops.ring_cache import RingKVCache

from toys import ByteTokenizer, ListRetriever

TEXTS = ["alpha beta gamma delta " * 4, "the quick brown fox jumps over the lazy dog",
         "python lists are mutable sequences", "a b c d e f g h i j k l m n o p"]
PROMPTS = ["hello world, this is a longer prompt", "hi", "medium prompt"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=260, layers=2)


def _run(model, graphs, mode="append", device="cpu", eos=None, **kwargs):
    tok = ByteTokenizer(markers=True)
    gen = RALMGenerator(model, tok, ListRetriever(TEXTS, tok), mode=mode, stride=5,
                        query_tokens=8, passage_tokens=24, cuda_graphs=graphs, **kwargs)
    if eos is not None:
        gen.eos_ids = eos
    return gen, gen.generate(PROMPTS, max_new_tokens=17, trace=True, stop_on_eos=eos is not None)


def _assert_same(eager, static, tol):
    for a, b in zip(eager, static):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert len(a.trace) == len(b.trace)
        for (seq_a, log_a), (seq_b, log_b) in zip(a.trace, b.trace):
            assert seq_a == seq_b
            assert (log_a - log_b).abs().max().item() <= tol


@pytest.mark.parametrize("mode", ["append", "prepend", "none"])
def test_static_step_matches_eager_engine(tiny, mode):
    _, eager = _run(tiny, False, mode)
    gen, static = _run(tiny, True, mode)
    _assert_same(eager, static, 1e-6)
    timing = static[0].timing
    assert timing.decode_steps > 0 and timing.graph_steps == timing.decode_steps


@pytest.mark.parametrize("echo", [0, 3])
def test_static_step_follows_passages_before_the_context(tiny, echo):
    # passage_positions="before": decode steps run at slot - shift; the static step must agree
    _, eager = _run(tiny, False, passage_positions="before", echo_tokens=echo)
    gen, static = _run(tiny, True, passage_positions="before", echo_tokens=echo)
    _assert_same(eager, static, 1e-6)
    assert static[0].trace_positions == eager[0].trace_positions
    assert static[0].trace_positions[-1][-1] < len(static[0].trace[-1][0]) - 1  # shifted
    timing = static[0].timing
    assert timing.decode_steps > 0 and timing.graph_steps == timing.decode_steps


@pytest.mark.parametrize("positions", ["after", "before"])
def test_finished_sequences_stay_put(tiny, positions):
    _, free = _run(tiny, False, passage_positions=positions)
    eos = {free[1].token_ids[2]}  # sequence 1 stops early; the others keep decoding
    _, eager = _run(tiny, False, eos=eos, passage_positions=positions)
    gen, static = _run(tiny, True, eos=eos, passage_positions=positions)
    assert static[1].finish_reason == "eos"
    _assert_same(eager, static, 1e-6)


def test_evicting_cache_falls_back_to_eager_steps(tiny):
    kwargs = dict(capacity=75, overflow="evict", sink=4)
    _, eager = _run(tiny, False, **kwargs)
    gen, static = _run(tiny, True, **kwargs)
    _assert_same(eager, static, 1e-6)
    timing = static[0].timing
    assert 0 < timing.graph_steps < timing.decode_steps  # full cache: eager steps evict


def test_kept_cache_is_reused_and_regrown(tiny):
    gen, _ = _run(tiny, True)
    first = gen._decoder
    assert first.cache.ring.capacity % 256 == 0
    gen.generate(["x", "y", "z"], max_new_tokens=3)
    assert gen._decoder is first  # same batch, fits: same cache and graph
    gen.generate(["q" * 400] * 3, max_new_tokens=3)
    assert gen._decoder is not first and gen._decoder.cache.ring.capacity >= 400
    gen.generate(["q"], max_new_tokens=3)
    assert gen._decoder.batch == 1
    gen.release_graphs()
    assert gen._decoder is None


def test_decode_graph_bad_steps(tiny):
    cache = FlashBackCache.for_model(tiny, 2, 4)
    dec = DecodeGraph(tiny.model, tiny.lm_head, cache, "cache")
    with pytest.raises(ValueError, match="needs 2 tokens"):
        dec.step([1])
    cache.ring.truncate(0)
    for _ in range(4):
        dec.step([1, None])
    assert cache.lengths() == [4, 0]
    with pytest.raises(ValueError, match="no room"):
        dec.step([1, 2])
    assert cache.lengths() == [4, 0]  # nothing moved


def test_capture_blockers_are_named(tiny):
    from flashback_ext.engine.cuda_graph import capture_blocker
    cache = FlashBackCache.for_model(tiny, 1, 8)
    assert capture_blocker(tiny.model, cache) == "not a CUDA device"
    dec = DecodeGraph(tiny.model, tiny.lm_head, cache, "cache")
    assert not dec.capture and dec.blocker == "not a CUDA device"
    dynamic = tiny_llama(vocab_size=260, layers=1)
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    assert "checks lengths on the host" in capture_blocker(dynamic.model, cache)


def test_finished_sequence_needs_a_free_slot(tiny):
    cache = FlashBackCache.for_model(tiny, 2, 3)
    dec = DecodeGraph(tiny.model, tiny.lm_head, cache, "cache")
    for _ in range(3):
        dec.step([1, 2])
    cache.ring.truncate([2, 3])
    assert not dec.fits([1, 0])  # the finished row still writes a slot: none is free
    cache.ring.truncate([2, 2])
    assert dec.fits([1, 0])


def test_append_on_device_equals_append():
    torch.manual_seed(0)
    a = RingKVCache(2, 3, 2, 8, 12, sink=2)
    b = RingKVCache(2, 3, 2, 8, 12, sink=2)
    for layer in range(2):
        k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
        a.append(layer, k, v)
        b.append(layer, k, v)
    torch.manual_seed(1)
    counts = [1, 0, 1]
    for layer in range(2):
        k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
        a.append(layer, k, v, counts)
        b.append_on_device(layer, k, v, torch.tensor(counts, dtype=torch.int32))
    assert b.lengths(0) == [5, 5, 5]  # host untouched until advance_host
    b.advance_host(counts)
    assert a.lengths(1) == b.lengths(1) == [6, 5, 6]
    assert torch.equal(a.kv_lens, b.kv_lens)
    for layer in range(2):
        for x, y in zip(a.layer_state(layer)[:2], b.layer_state(layer)[:2]):
            live = [x[i, :, :n] for i, n in enumerate(a.lengths(layer))]
            assert all(torch.equal(p, y[i, :, :p.shape[1]]) for i, p in enumerate(live))
    with pytest.raises(Exception, match="exceed the capacity"):
        b.advance_host([7, 0, 0])
    assert b.lengths(0) == [6, 5, 6]


@pytest.fixture(scope="module")
def gpu_model():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from flashback_ext import has_cuda_ops
    if not has_cuda_ops():
        pytest.skip("CUDA ops not built")
    # bf16 and head dim 64: what the compiled kernels take (the reference cannot be captured)
    return tiny_llama(vocab_size=260, hidden=256, heads=4, kv_heads=2, layers=2).to(
        "cuda", torch.bfloat16)


@pytest.mark.parametrize("case", ["append", "prepend", "eos", "evict"])
def test_cuda_graph_replay_matches_eager(gpu_model, case):
    mode = "prepend" if case == "prepend" else "append"
    kwargs = {"capacity": 75, "overflow": "evict", "sink": 4} if case == "evict" else {}
    eos = None
    if case == "eos":
        _, free = _run(gpu_model, False, mode)
        eos = {free[1].token_ids[2]}
    eager_gen, eager = _run(gpu_model, False, mode, eos=eos, **kwargs)
    gen, graph = _run(gpu_model, True, mode, eos=eos, **kwargs)
    dec = gen._decoder
    assert dec.blocker is None and dec.captured, dec.blocker
    assert dec.replays == graph[0].timing.graph_steps > 0
    # same kernels on the same inputs: replay should be bit-identical to the eager engine
    _assert_same(eager, graph, 1e-3)
    # a second call replays the same graph on the reset cache (the retriever rotates on, alike)
    again = [g.generate(PROMPTS, max_new_tokens=17, trace=True, stop_on_eos=eos is not None)
             for g in (eager_gen, gen)]
    assert gen._decoder is dec
    _assert_same(*again, 1e-3)
