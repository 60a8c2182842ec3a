"""Decode-sized projections: a layer's q/k/v (and gate/up) as one weight-streaming product.

At one token per sequence every projection of a decoder layer is a matrix-vector product whose
cost is reading the weight. On CPUs with AVX512-BF16, :func:`flashback_ext.ops.decode_linear`
reads several weights in one call, as ``nn.Linear`` stores them; elsewhere, for more rows, for
other dtypes, for adapters (peft layers) and whenever autograd needs the graph, the modules run
as they are. The two give the same product up to fp32 summation order.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ops

__all__ = ["DECODE_ROWS", "project", "mlp_forward"]

DECODE_ROWS = 4  # at most this many rows (tokens x sequences) take the fused product


def _fused(x: torch.Tensor, linears: Sequence[torch.nn.Module]) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.numel() > DECODE_ROWS * x.shape[-1]:
        return False
    if not ops.decode_linear_is_fast():
        return False
    for lin in linears:
        # exactly nn.Linear: a peft LoRA layer or a quantised linear computes something else
        if type(lin) is not torch.nn.Linear or lin.bias is not None:
            return False
        if lin.weight.dtype != torch.bfloat16 or lin.weight.device.type != "cpu":
            return False
    if torch.is_grad_enabled() and (x.requires_grad or any(lin.weight.requires_grad
                                                           for lin in linears)):
        return False  # the op has no backward
    return True


def project(x: torch.Tensor, linears: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """``[lin(x) for lin in linears]``, as one fused product when ``x`` is decode-sized."""
    if not _fused(x, linears):
        return [lin(x) for lin in linears]
    out = ops.decode_linear(x, [lin.weight for lin in linears])
    return list(out.split([lin.out_features for lin in linears], dim=-1))


def mlp_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-family gated MLP (``down(act(gate(x)) * up(x))``) with gate/up fused."""
    gate, up = project(x, (mlp.gate_proj, mlp.up_proj))
    return project(mlp.act_fn(gate) * up, (mlp.down_proj,))[0]
