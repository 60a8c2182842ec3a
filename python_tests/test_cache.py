"""RingKVCache against a plain Python model of the token sequence of every layer."""
import pytest
import torch

from flashback_ext import CacheOverflowError, RingKVCache, reference


class Model:
    """What the cache must hold: the list of (k, v) rows in logical order, per sequence."""

    def __init__(self, batch):
        self.k = [[] for _ in range(batch)]
        self.v = [[] for _ in range(batch)]
        self.evicted = [0] * batch

    def append(self, k_new, v_new, capacity, sink, evict):
        for b in range(len(self.k)):
            self.k[b] += list(k_new[b].unbind(1))
            self.v[b] += list(v_new[b].unbind(1))
            excess = len(self.k[b]) - capacity
            if excess > 0:
                assert evict
                del self.k[b][sink:sink + excess], self.v[b][sink:sink + excess]
                self.evicted[b] += excess


def assert_matches(cache: RingKVCache, model: Model, layer: int = 0):
    assert cache.lengths(layer) == [len(x) for x in model.k]
    k, v, kv_lens, offs = cache.layer_state(layer)
    assert kv_lens.tolist() == cache.lengths(layer)
    for b, rows in enumerate(model.k):
        if not rows:
            continue
        got_k = reference.gather_logical(k, b, len(rows), int(offs[b]), cache.sink)
        got_v = reference.gather_logical(v, b, len(rows), int(offs[b]), cache.sink)
        assert torch.equal(got_k, torch.stack(rows, 1))
        assert torch.equal(got_v, torch.stack(model.v[b], 1))
        assert cache.next_position(b, layer) == len(rows) + model.evicted[b]


def _block(n, batch=2, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, hkv, n, d, generator=g), torch.randn(batch, hkv, n, d, generator=g)


@pytest.mark.parametrize("sink", [0, 3])
def test_append_rollback_evict_sequence(sink):
    cache = RingKVCache(2, 2, 2, 8, 40, sink=sink, overflow="evict")
    model = Model(2)
    # the FlashBack cycle: append a block, roll back the passage + stride, append again, decode
    for step, n in enumerate([20, 9, 15, 1, 1, 30, 12]):
        k, v = _block(n, seed=step)
        for layer in range(2):
            cache.append(layer, k, v)
        model.append(k, v, 40, sink, evict=True)
        assert_matches(cache, model, 0)
        assert_matches(cache, model, 1)
        if step in (2, 5):
            cache.rollback(5)
            for b in range(2):
                del model.k[b][-5:], model.v[b][-5:]
            assert_matches(cache, model)


def test_ragged_rollback_and_truncate():
    cache = RingKVCache(1, 2, 2, 8, 32)
    model = Model(2)
    k, v = _block(10)
    cache.append(0, k, v)
    model.append(k, v, 32, 0, evict=False)
    cache.rollback([3, 0])
    del model.k[0][-3:], model.v[0][-3:]
    assert_matches(cache, model)
    cache.truncate([2, 6])
    model.k = [model.k[0][:2], model.k[1][:6]]
    model.v = [model.v[0][:2], model.v[1][:6]]
    assert_matches(cache, model)
    assert cache.next_position(0) == 2  # rollback/truncate rewind positions


def test_overflow_error_writes_nothing():
    cache = RingKVCache(1, 2, 2, 8, 16)
    k, v = _block(12)
    cache.append(0, k, v)
    before = (cache.k[0].clone(), cache.v[0].clone(), cache.lengths(), cache.kv_lens.clone())
    k2, v2 = _block(5, seed=1)
    with pytest.raises(CacheOverflowError, match="exceeds the capacity 16"):
        cache.append(0, k2, v2)
    assert torch.equal(cache.k[0], before[0]) and torch.equal(cache.v[0], before[1])
    assert cache.lengths() == before[2] and torch.equal(cache.kv_lens, before[3])


def test_block_larger_than_ring_is_rejected_even_with_evict():
    cache = RingKVCache(1, 1, 1, 8, 10, sink=4, overflow="evict")
    k, v = _block(5, batch=1, hkv=1)
    cache.append(0, k, v)
    k, v = _block(7, batch=1, hkv=1)  # the ring has 6 slots: 7 tokens can never be held
    with pytest.raises(CacheOverflowError, match="cannot fit"):
        cache.append(0, k, v)
    assert cache.lengths() == [5] and cache.next_position(0) == 5


@pytest.mark.parametrize("sink", [1, 3])  # without a sink, "more than it holds" covers it
def test_rollback_cannot_reach_evicted_tokens(sink):
    cache = RingKVCache(1, 1, 1, 8, 10, sink=sink, overflow="evict")
    for n in (6, 6):  # the second block evicts 2 of the oldest non-sink tokens
        cache.append(0, *_block(n, batch=1, hkv=1))
    assert cache.evicted(0) == 2 and cache.lengths() == [10]
    state = (cache.lengths(), cache.next_position(0), cache.ring_offset.tolist())
    with pytest.raises(ValueError, match="evicted tokens cannot come back"):
        cache.rollback(10 - sink + 1)
    assert (cache.lengths(), cache.next_position(0), cache.ring_offset.tolist()) == state
    cache.rollback(10 - sink)  # every non-sink token is still allowed
    assert cache.lengths() == [sink] and cache.next_position(0) == sink + 2


def test_bad_block_leaves_eviction_uncommitted():
    cache = RingKVCache(1, 1, 2, 8, 10, overflow="evict")
    k, v = _block(8, batch=1)
    cache.append(0, k, v)
    bad_k, bad_v = _block(4, batch=1, d=4)  # wrong head dim, and would also need eviction
    with pytest.raises(ValueError, match="does not match the cache"):
        cache.append(0, bad_k, bad_v)
    assert cache.lengths() == [8] and cache.ring_offset.tolist() == [[0]]
    assert cache.next_position(0) == 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(capacity=0), "capacity must be a positive int"),
    (dict(sink=8), "sink must be an int"),
    (dict(overflow="wrap"), "overflow must be"),
])
def test_constructor_validation(kwargs, match):
    args = dict(num_layers=1, batch_size=1, num_kv_heads=1, head_dim=8, capacity=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RingKVCache(**args)


def test_rollback_too_far_and_bad_layer():
    cache = RingKVCache(2, 1, 1, 8, 8)
    k, v = _block(3, batch=1, hkv=1)
    cache.append(0, k, v)
    cache.append(1, k, v)
    with pytest.raises(ValueError, match="cannot roll back 4"):
        cache.rollback(4)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(5)
    with pytest.raises(IndexError, match="layer must be in"):
        cache.append(2, k, v)
    assert cache.lengths(0) == [3] and cache.lengths(1) == [3]


def test_memory_bytes_and_attend():
    cache = RingKVCache(3, 2, 2, 16, 24, dtype=torch.float32)
    assert cache.memory_bytes() == 3 * 2 * (2 * 2 * 24 * 16) * 4
    k, v = _block(6, d=16)
    cache.append(0, k, v)
    q = torch.randn(2, 4, 6, 16)
    out, lse = cache.attend(0, q)
    ref_out, _ = reference.append_attention(q, *cache.layer_state(0)[:3], cache.layer_state(0)[3])
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="append the block before attending"):
        cache.attend(0, torch.randn(2, 4, 7, 16))
