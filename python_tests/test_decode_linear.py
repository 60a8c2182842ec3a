"""flashback::decode_linear (a few bf16 rows times several weights) and the engine's fused
projections built on it: against an fp64 product, within twice the error of bf16 F.linear."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from flashback_ext import has_cpu_ops, ops
from flashback_ext.engine import projections

pytestmark = pytest.mark.skipif(not has_cpu_ops(), reason="extension built without CPU ops")


def _errors(x, weights):
    """(max error of decode_linear, of bf16 F.linear), both against the fp64 product."""
    truth = torch.cat([x.double() @ w.double().T for w in weights], -1)
    got = ops.decode_linear(x, weights)
    plain = torch.cat([F.linear(x, w) for w in weights], -1)
    assert got.shape == truth.shape and got.dtype == torch.bfloat16
    return (got.double() - truth).abs().max().item(), (plain.double() - truth).abs().max().item()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("k", [1, 31, 32, 33, 64, 577])
def test_matches_fp64_within_twice_bf16_linear(rows, k):
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    # widths off the kernel's 4- and 16-row steps, and a weight boundary inside a work block
    widths = [5, 17, 16, 1] if k < 100 else [576, 13, 192]
    x = torch.randn(rows, k, generator=gen).bfloat16()
    weights = [torch.randn(n, k, generator=gen).bfloat16() for n in widths]
    err, plain = _errors(x, weights)
    assert err <= 2 * plain + 1e-6, (err, plain)


def test_leading_dims_strided_inputs_and_poison_outside_them():
    gen = torch.Generator().manual_seed(7)
    k = 70
    # weights are column slices of wider NaN-poisoned buffers: reading past K shows up as NaN
    buf = torch.full((40, k + 9), float("nan")).bfloat16()
    buf[:, :k] = torch.randn(40, k, generator=gen).bfloat16()
    weights = [buf[:24, :k], buf[24:, :k]]
    x = torch.randn(2, 3, 2 * k, generator=gen).bfloat16()[..., ::2]  # [2, 3, K], stride 2
    got = ops.decode_linear(x, weights)
    assert got.shape == (2, 3, 40)
    want = torch.cat([x.double() @ w.double().T for w in weights], -1)
    plain = torch.cat([F.linear(x, w) for w in weights], -1).double()
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() <= 2 * (plain - want).abs().max() + 1e-6


def test_empty_rows_and_opcheck():
    w = torch.randn(8, 32).bfloat16()
    assert ops.decode_linear(torch.empty(0, 32, dtype=torch.bfloat16), [w]).shape == (0, 8)
    x = torch.randn(3, 32).bfloat16()
    torch.library.opcheck(torch.ops.flashback.decode_linear.default, (x, [w, w[:5]]))


@pytest.mark.parametrize("case", ["fp32 x", "fp32 weight", "k mismatch", "3-d weight", "no weights",
                                  "tensor as list", "not a tensor"])
def test_bad_inputs_raise(case):
    x = torch.randn(1, 16).bfloat16()
    w = torch.randn(4, 16).bfloat16()
    args = {"fp32 x": (x.float(), [w]), "fp32 weight": (x, [w.float()]),
            "k mismatch": (x, [torch.randn(4, 15).bfloat16()]),
            "3-d weight": (x, [w.view(2, 2, 16)]), "no weights": (x, []),
            "tensor as list": (x, w), "not a tensor": (x, [w, "w"])}[case]
    with pytest.raises((TypeError, ValueError)):
        ops.decode_linear(*args)


@pytest.mark.parametrize("case", ["fp32 x", "k mismatch", "1-d x", "no weights"])
def test_the_raw_op_checks_too(case):
    x = torch.randn(1, 16).bfloat16()
    w = torch.randn(4, 16).bfloat16()
    args = {"fp32 x": (x.float(), [w]), "k mismatch": (x, [torch.randn(4, 15).bfloat16()]),
            "1-d x": (x[0], [w]), "no weights": (x, [])}[case]
    with pytest.raises(RuntimeError, match="decode_linear"):
        torch.ops.flashback.decode_linear(*args)


def test_fallback_without_avx512_bf16_is_the_same_product():
    # FLASHBACK_CPU_GEMM=fp32 is read once per process: the kernel then runs F.linear per weight
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from flashback_ext import ops
        assert not ops.decode_linear_is_fast()
        x = torch.randn(3, 40).bfloat16()
        ws = [torch.randn(7, 40).bfloat16(), torch.randn(9, 40).bfloat16()]
        got = torch.ops.flashback.decode_linear(x, ws)
        assert torch.equal(got, torch.cat([F.linear(x, w) for w in ws], -1))
        print("fallback ok")
    """)
    env = dict(os.environ, FLASHBACK_CPU_GEMM="fp32")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fallback ok" in res.stdout


# ------------------------------------------------------------------------ the fused projections
def _linears(k=48, widths=(48, 16, 16), dtype=torch.bfloat16):
    torch.manual_seed(0)
    return [torch.nn.Linear(k, n, bias=False).to(dtype) for n in widths]


def _spy(monkeypatch):
    calls = []
    real = ops.decode_linear
    monkeypatch.setattr(ops, "decode_linear", lambda x, ws: calls.append(len(ws)) or real(x, ws))
    return calls


@pytest.mark.skipif(not ops.decode_linear_is_fast(), reason="needs AVX512-BF16")
def test_project_fuses_decode_rows_and_equals_the_modules(monkeypatch):
    calls = _spy(monkeypatch)
    lins = _linears()
    x = torch.randn(2, 1, 48).bfloat16()
    with torch.no_grad():
        got = projections.project(x, lins)
        want = [lin(x) for lin in lins]
    assert calls == [3]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("why", ["too many rows", "fp32", "bias", "grad", "peft-like subclass"])
def test_project_leaves_other_calls_to_the_modules(monkeypatch, why):
    calls = _spy(monkeypatch)
    lins = _linears(dtype=torch.float32 if why == "fp32" else torch.bfloat16)
    x = torch.randn(projections.DECODE_ROWS + 1 if why == "too many rows" else 1, 48,
                    dtype=lins[0].weight.dtype)
    if why == "bias":
        lins[1] = torch.nn.Linear(48, 16).bfloat16()
    if why == "peft-like subclass":
        class Wrapped(torch.nn.Linear):
            pass
        lins[0] = Wrapped(48, 48, bias=False).bfloat16()
    context = torch.enable_grad() if why == "grad" else torch.no_grad()
    with context:
        got = projections.project(x, lins)
    assert calls == []
    for g, lin in zip(got, lins):
        torch.testing.assert_close(g, lin(x))
    if why == "grad":
        got[0].sum().backward()  # the modules' graph is intact
        assert lins[0].weight.grad is not None


def test_mlp_forward_equals_the_module():
    from flashback_ext.engine.models import tiny_llama

    mlp = tiny_llama(vocab_size=64, layers=1).to(torch.bfloat16).model.layers[0].mlp
    x = torch.randn(1, 1, mlp.gate_proj.in_features).bfloat16()
    with torch.no_grad():
        got, want = projections.mlp_forward(mlp, x), mlp(x)
    truth = mlp.float()(x.float())
    assert (got.float() - truth).abs().max() <= 2 * (want.float() - truth).abs().max() + 1e-3
