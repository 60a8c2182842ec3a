"""kv_append against the reference: placement in the ring, untouched slots, strided inputs."""
import pytest
import torch

from flashback_ext import has_cpu_ops, ops, reference

pytestmark = pytest.mark.skipif(not has_cpu_ops(), reason="extension built without CPU ops")


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sink,offs,pos,n", [
    (0, [0, 0], [0, 5], 7),            # plain contiguous
    (0, [9, 3], [4, 8], 8),             # wraps past the end of the ring
    (3, [10, 0], [1, 3], 9),            # crosses the sink boundary, then wraps
    (2, [5, 7], [12, 0], 1),            # single-token decode append
    (0, [0, 0], [3, 0], 0),             # empty block is a no-op
])
def test_matches_reference(dtype, sink, offs, pos, n):
    gen = torch.Generator().manual_seed(1)
    shape = (2, 3, 16, 64)
    k_new = torch.randn(2, 3, n, 64, generator=gen).to(dtype)
    v_new = torch.randn(2, 3, n, 64, generator=gen).to(dtype)
    caches = [_poisoned(shape, dtype) for _ in range(4)]
    wp, ro = torch.tensor(pos, dtype=torch.int32), torch.tensor(offs, dtype=torch.int32)
    ops.kv_append(k_new, v_new, caches[0], caches[1], wp, ro, sink)
    reference.kv_append(k_new, v_new, caches[2], caches[3], wp, ro, sink)
    # equal_nan: untouched slots must still hold the poison in both
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, atol=0, rtol=0)
    # every written token is readable back in logical order
    for b in range(2):
        got = reference.gather_logical(caches[0], b, pos[b] + n, offs[b], sink)[:, pos[b]:]
        assert torch.equal(got, k_new[b])


def test_strided_views_are_accepted():
    # HF hands [B, n, Hkv, D] projections; the transpose is a strided view
    src = torch.randn(2, 5, 4, 32)
    k_view = src.transpose(1, 2)
    v_view = (src * 2).transpose(1, 2)
    assert not k_view.is_contiguous()
    kc, vc = torch.zeros(2, 4, 12, 32), torch.zeros(2, 4, 12, 32)
    ops.kv_append(k_view, v_view, kc, vc, torch.tensor([2, 7], dtype=torch.int32))
    assert torch.equal(kc[0, :, 2:7], k_view[0]) and torch.equal(vc[1, :, 7:12], v_view[1])
    assert (kc[0, :, :2] == 0).all() and (kc[0, :, 7:] == 0).all()


def test_non_unit_last_stride():
    src = torch.randn(1, 2, 3, 16).transpose(2, 3).contiguous().transpose(2, 3)  # D stride != 1
    assert src.stride(-1) != 1
    kc, vc = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    ops.kv_append(src, src, kc, vc, torch.tensor([4], dtype=torch.int32))
    assert torch.equal(kc[0, :, 4:7], src[0])
