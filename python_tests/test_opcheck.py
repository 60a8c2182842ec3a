"""torch.library.opcheck: schema (mutation annotations), fake kernels, dispatcher plumbing."""
import pytest
import torch

from flashback_ext import has_cpu_ops, ops  # noqa: F401  (registers the fake kernels)

from cases import make_case

pytestmark = pytest.mark.skipif(not has_cpu_ops(), reason="extension built without CPU ops")


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available() and ops.has_cuda_ops():
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("with_q_lens", [False, True])
def test_append_attention_opcheck(device, with_q_lens):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    case = make_case(2, 4, 2, 5, 64, 32, [20, 9], [3, 0], 2,
                     q_lens=[5, 2] if with_q_lens else None, dtype=dtype, device=device)
    # opcheck compares outputs across runs; poison (NaN) in dead slots is never read
    torch.library.opcheck(torch.ops.flashback.append_attention.default,
                          (*case.args(), 0.125, case.q_lens))


@pytest.mark.parametrize("device", _devices())
def test_kv_append_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    k_new = torch.randn(2, 2, 3, 64, device=device, dtype=dtype)
    v_new = torch.randn(2, 2, 3, 64, device=device, dtype=dtype)
    kc = torch.zeros(2, 2, 16, 64, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    pos = torch.tensor([0, 7], dtype=torch.int32, device=device)
    off = torch.tensor([0, 5], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.flashback.kv_append.default, (k_new, v_new, kc, vc, pos, off, 1))


def test_torch_compile_traces_through_the_ops():
    case = make_case(1, 4, 2, 3, 64, 16, [10], dtype=torch.float32)

    def step(q, k, v, lens, offs):
        out, lse = torch.ops.flashback.append_attention(q, k, v, lens, offs, 0, 0.125, None)
        return out.sum(-1), lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(case.q, case.k_cache, case.v_cache, case.kv_lens, case.ring_offset)
    want = step(case.q, case.k_cache, case.v_cache, case.kv_lens, case.ring_offset)
    torch.testing.assert_close(got, want)
