"""Hypothesis: random shapes, lengths, ring offsets and sinks, kernel == reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashback_ext import has_cpu_ops, ops, reference

from cases import ATOL, assert_fa_close, make_case, reference_pair

pytestmark = pytest.mark.skipif(not has_cpu_ops(), reason="extension built without CPU ops")


@st.composite
def attention_problems(draw):
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    d = draw(st.sampled_from([8, 16, 40, 64, 80, 128]))
    sq = draw(st.integers(1, 70))
    capacity = draw(st.integers(sq + 1, sq + 300))
    sink = draw(st.integers(0, min(8, capacity - 1)))
    ring = capacity - sink
    lens = [draw(st.integers(sq, capacity)) for _ in range(batch)]
    offs = [draw(st.integers(0, ring - 1)) for _ in range(batch)]
    q_lens = None
    if draw(st.booleans()):
        q_lens = [draw(st.integers(0, sq)) for _ in range(batch)]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    return dict(batch=batch, hq=hkv * group, hkv=hkv, sq=sq, d=d, capacity=capacity, lens=lens,
                offs=offs, sink=sink, q_lens=q_lens, dtype=dtype, seed=seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_problems())
def test_attention_property(p):
    case = make_case(p["batch"], p["hq"], p["hkv"], p["sq"], p["d"], p["capacity"], p["lens"],
                     p["offs"], p["sink"], p["q_lens"], p["dtype"], seed=p["seed"])
    out, lse = ops.append_attention(*case.args(), None, case.q_lens)
    truth, lowp = reference_pair(case, p["dtype"])
    assert_fa_close(out, lse, truth, lowp, ATOL[p["dtype"]], q_lens=p["q_lens"])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_kv_append_property(data):
    batch, hkv = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    d = data.draw(st.sampled_from([8, 24, 64]))
    capacity = data.draw(st.integers(2, 40))
    sink = data.draw(st.integers(0, capacity - 1))
    n = data.draw(st.integers(0, capacity))
    pos = [data.draw(st.integers(0, capacity - n)) for _ in range(batch)]
    offs = [data.draw(st.integers(0, capacity - sink - 1)) for _ in range(batch)]
    k_new, v_new = torch.randn(batch, hkv, n, d), torch.randn(batch, hkv, n, d)
    caches = [torch.full((batch, hkv, capacity, d), float("nan")) for _ in range(4)]
    wp, ro = torch.tensor(pos, dtype=torch.int32), torch.tensor(offs, dtype=torch.int32)
    ops.kv_append(k_new, v_new, caches[0], caches[1], wp, ro, sink)
    reference.kv_append(k_new, v_new, caches[2], caches[3], wp, ro, sink)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
