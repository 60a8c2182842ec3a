"""Every bad input gets a clear error naming the problem, and nothing is written."""
import pytest
import torch

from flashback_ext import ops

I32 = torch.int32


def _state(batch=2, hq=4, hkv=2, sq=3, d=16, cap=12):
    g = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(batch, hq, sq, d, generator=g),
        k_cache=torch.randn(batch, hkv, cap, d, generator=g),
        v_cache=torch.randn(batch, hkv, cap, d, generator=g),
        kv_lens=torch.tensor([5, 9], dtype=I32),
        ring_offset=torch.zeros(batch, dtype=I32),
        sink=0,
    )


def _call_attention(s):
    return ops.append_attention(s["q"], s["k_cache"], s["v_cache"], s["kv_lens"],
                                s["ring_offset"], s["sink"], s.get("scale"), s.get("q_lens"))


ATTENTION_CASES = {
    "q_wrong_dtype": (lambda s: s.update(q=s["q"].double()), "q dtype"),
    "q_wrong_rank": (lambda s: s.update(q=s["q"][0]), r"q must be \[B, Hq, Sq, D\]"),
    "q_batch": (lambda s: s.update(q=s["q"][:1]), "q batch 1 != cache batch 2"),
    "head_dim_mismatch": (lambda s: s.update(q=s["q"][..., :8]), r"head dim of q \(8\)"),
    "hq_not_multiple": (lambda s: s.update(q=s["q"][:, :3]), r"Hq \(3\) must be a multiple of Hkv"),
    "cache_rank": (lambda s: s.update(k_cache=s["k_cache"][0]), r"k_cache must be \[B, Hkv, C, D\]"),
    "v_shape": (lambda s: s.update(v_cache=s["v_cache"][:, :, :6]), "v_cache shape"),
    "cache_dtype_mix": (lambda s: s.update(v_cache=s["v_cache"].bfloat16()), "share dtype"),
    "lens_dtype": (lambda s: s.update(kv_lens=s["kv_lens"].long()), "kv_lens must be int32"),
    "lens_shape": (lambda s: s.update(kv_lens=s["kv_lens"][:1]), r"kv_lens must have shape \[2\]"),
    "lens_strided": (lambda s: s.update(kv_lens=torch.tensor([[5, 0], [9, 0]], dtype=I32)[:, 0]),
                     "kv_lens must be contiguous"),
    "negative_len": (lambda s: s.update(kv_lens=torch.tensor([-1, 9], dtype=I32)), r"kv_lens\[0\]=-1"),
    "len_over_capacity": (lambda s: s.update(kv_lens=torch.tensor([5, 13], dtype=I32)), "capacity=12"),
    "q_longer_than_kv": (lambda s: s.update(kv_lens=torch.tensor([2, 9], dtype=I32)), "q is longer than kv"),
    "bad_q_lens": (lambda s: s.update(q_lens=torch.tensor([4, 1], dtype=I32)), r"q_lens\[0\]=4"),
    "negative_offset": (lambda s: s.update(ring_offset=torch.tensor([-2, 0], dtype=I32)), r"ring_offset\[0\]=-2"),
    "offset_past_ring": (lambda s: s.update(ring_offset=torch.tensor([0, 12], dtype=I32)), r"ring_offset\[1\]=12"),
    "sink_too_big": (lambda s: s.update(sink=12), "sink must be in"),
    "not_a_tensor": (lambda s: s.update(q=[[1.0]]), "q must be a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_append_attention_rejects(name):
    mutate, match = ATTENTION_CASES[name]
    s = _state()
    mutate(s)
    with pytest.raises((ValueError, TypeError), match=match):
        _call_attention(s)


def test_append_attention_rejects_device_mismatch():
    s = _state()
    s["q"] = s["q"].to("meta")  # any device other than the cache's; no GPU needed
    with pytest.raises(ValueError, match="q is on meta but the cache is on cpu"):
        _call_attention(s)


def test_lengths_on_wrong_device():
    s = _state()
    s["kv_lens"] = s["kv_lens"].to("meta")
    with pytest.raises(ValueError, match="kv_lens must be on the cache's device"):
        _call_attention(s)


def _append_state():
    g = torch.Generator().manual_seed(1)
    return dict(
        k_new=torch.randn(2, 2, 4, 16, generator=g),
        v_new=torch.randn(2, 2, 4, 16, generator=g),
        k_cache=torch.randn(2, 2, 12, 16, generator=g),
        v_cache=torch.randn(2, 2, 12, 16, generator=g),
        write_pos=torch.tensor([0, 6], dtype=I32),
        ring_offset=torch.zeros(2, dtype=I32),
        sink=0,
    )


APPEND_CASES = {
    "overflow": (lambda s: s.update(write_pos=torch.tensor([0, 9], dtype=I32)), "overflows the cache"),
    "negative_pos": (lambda s: s.update(write_pos=torch.tensor([-1, 0], dtype=I32)), r"write_pos\[0\]=-1"),
    "new_dtype": (lambda s: s.update(k_new=s["k_new"].bfloat16()), "k_new dtype"),
    "new_heads": (lambda s: s.update(k_new=s["k_new"][:, :1]), "does not match the cache"),
    "new_head_dim": (lambda s: s.update(v_new=s["v_new"][..., :8]), "does not match the cache"),
    "kv_shape_mismatch": (lambda s: s.update(v_new=s["v_new"][:, :, :3]), "v_new shape"),
    "pos_dtype": (lambda s: s.update(write_pos=s["write_pos"].long()), "write_pos must be int32"),
    "cache_not_contiguous": (lambda s: s.update(k_cache=s["k_cache"].transpose(2, 3).contiguous().transpose(2, 3),
                                                v_cache=s["v_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
                             "must be contiguous"),
    "offset_range": (lambda s: s.update(ring_offset=torch.tensor([0, 20], dtype=I32)), r"ring_offset\[1\]=20"),
}


@pytest.mark.parametrize("name", list(APPEND_CASES))
def test_kv_append_rejects_and_writes_nothing(name):
    mutate, match = APPEND_CASES[name]
    s = _append_state()
    mutate(s)
    k_before, v_before = s["k_cache"].clone(), s["v_cache"].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        ops.kv_append(s["k_new"], s["v_new"], s["k_cache"], s["v_cache"], s["write_pos"],
                      s["ring_offset"], s["sink"])
    assert torch.equal(s["k_cache"], k_before) and torch.equal(s["v_cache"], v_before)


def test_compiled_op_checks_without_the_wrapper():
    # torch.ops.flashback.* is public too: its C++ checks must also refuse bad input cleanly.
    s = _state()
    with pytest.raises(RuntimeError, match="q is longer than kv"):
        torch.ops.flashback.append_attention(s["q"], s["k_cache"], s["v_cache"],
                                             torch.tensor([2, 9], dtype=I32), s["ring_offset"],
                                             0, 0.25, None)
    with pytest.raises(RuntimeError, match=r"Hq \(3\) must be a multiple of Hkv \(2\)"):
        torch.ops.flashback.append_attention(s["q"][:, :3], s["k_cache"], s["v_cache"],
                                             s["kv_lens"], s["ring_offset"], 0, 0.25, None)
    a = _append_state()
    before = a["k_cache"].clone()
    with pytest.raises(RuntimeError, match="write_pos must be int32"):
        torch.ops.flashback.kv_append(a["k_new"], a["v_new"], a["k_cache"], a["v_cache"],
                                      a["write_pos"].long(), a["ring_offset"], 0)
    assert torch.equal(a["k_cache"], before)
