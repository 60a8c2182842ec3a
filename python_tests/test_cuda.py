"""CUDA kernels against the float64 reference (skip cleanly without a GPU or CUDA build).

Covers both CUDA paths: the split-KV decode kernel (Sq == 1) and the tensor-core block kernel
(Sq > 1), for fp16/bf16, D 64/128, MHA/GQA/MQA, ring wrap-around with and without sinks, ragged
lengths and q_lens, plus kv_append and the RingKVCache on the device.
"""
import pytest
import torch

from flashback_ext import RingKVCache, has_cuda_ops, ops, reference

from cases import ATOL, assert_fa_close, make_case, reference_pair

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_ops()),
    reason="needs a CUDA GPU and an extension built with CUDA",
)

HEADS = [(4, 4), (6, 2), (8, 2), (32, 8), (8, 1)]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "wrap", "wrap_sink"])
@pytest.mark.parametrize("sq", [1, 7, 144, 300])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_attention_matches_reference(heads, d, sq, layout, dtype):
    hq, hkv = heads
    sink = 4 if layout == "wrap_sink" else 0
    capacity = sq + 1500
    lens = [capacity - 5, sq + 33]
    offs = [0, 0] if layout == "contiguous" else [(capacity - sink) // 3, 17]
    case = make_case(2, hq, hkv, sq, d, capacity, lens, offs, sink, dtype=dtype, device="cuda")
    out, lse = ops.append_attention(*case.args())
    torch.cuda.synchronize()
    truth, lowp = reference_pair(case, dtype)
    assert_fa_close(out, lse, truth, lowp, ATOL[dtype])


@pytest.mark.parametrize("sq", [1, 16, 144])
def test_ragged_q_lens(sq):
    q_lens = [sq, sq // 2, 0]
    case = make_case(3, 8, 2, sq, 128, 600, [500, 300, 40], [7, 0, 100], 2, q_lens=q_lens,
                     dtype=torch.bfloat16, device="cuda")
    out, lse = ops.append_attention(*case.args(), None, case.q_lens)
    truth, lowp = reference_pair(case, torch.bfloat16)
    assert_fa_close(out, lse, truth, lowp, ATOL[torch.bfloat16], q_lens=q_lens)


@pytest.mark.parametrize("length", [1, 255, 256, 257, 4096, 70000])
def test_decode_split_boundaries(length):
    case = make_case(1, 32, 8, 1, 128, 70001, [length], dtype=torch.bfloat16, device="cuda")
    out, lse = ops.append_attention(*case.args())
    truth, lowp = reference_pair(case, torch.bfloat16)
    assert_fa_close(out, lse, truth, lowp, ATOL[torch.bfloat16])


def test_result_independent_of_capacity():
    small = make_case(2, 32, 8, 1, 128, 3000, [2900, 1200], dtype=torch.bfloat16, device="cuda")
    big_k = torch.full((2, 8, 9000, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    big_v = big_k.clone()
    big_k[:, :, :3000] = small.k_cache
    big_v[:, :, :3000] = small.v_cache
    a, la = ops.append_attention(*small.args())
    b, lb = ops.append_attention(small.q, big_k, big_v, small.kv_lens, small.ring_offset, 0)
    assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("strided", [False, True])
def test_kv_append_matches_reference(dtype, strided):
    shape = (2, 4, 64, 128)
    caches = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for _ in range(4)]
    src = torch.randn(2, 9, 4, 128, dtype=dtype, device="cuda")
    k_new = src.transpose(1, 2) if strided else src.transpose(1, 2).contiguous()
    v_new = (k_new * 3).contiguous() if not strided else (src * 3).transpose(1, 2)
    wp = torch.tensor([3, 55], dtype=torch.int32, device="cuda")
    ro = torch.tensor([60, 5], dtype=torch.int32, device="cuda")
    ops.kv_append(k_new, v_new, caches[0], caches[1], wp, ro, 2)
    reference.kv_append(k_new, v_new, caches[2], caches[3], wp, ro, 2)
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, atol=0, rtol=0)


def test_cache_cycle_on_device():
    cache = RingKVCache(1, 2, 2, 64, 256, dtype=torch.bfloat16, device="cuda", sink=4,
                        overflow="evict")
    cpu = RingKVCache(1, 2, 2, 64, 256, dtype=torch.float32, device="cpu", sink=4,
                      overflow="evict")
    for step, n in enumerate([200, 40, 1, 1, 100]):
        k = torch.randn(2, 2, n, 64).bfloat16()
        v = torch.randn(2, 2, n, 64).bfloat16()
        cache.append(0, k.cuda(), v.cuda())
        cpu.append(0, k.float(), v.float())
        if step == 1:
            cache.rollback(20)
            cpu.rollback(20)
        q = torch.randn(2, 8, min(n, 16), 64).bfloat16()
        out, _ = cache.attend(0, q.cuda())
        want, _ = cpu.attend(0, q.float())
        torch.testing.assert_close(out.float().cpu(), want, atol=2e-2, rtol=2e-2)
    assert cache.lengths() == cpu.lengths()
