"""Python face of the flashback C++/CUDA ops.

Each wrapper validates its arguments with a clear message BEFORE anything runs (a rejected call
changes nothing), fills in defaults, and dispatches to the compiled op ``torch.ops.flashback.*``.
Where the build holds no kernel for the tensors' device/dtype/head dim, it falls back to
:mod:`flashback_ext.reference` and warns once per (device type, dtype).

Length tensors (``kv_lens``, ``write_pos``, ``ring_offset``, ``q_lens``) are int32 ``[B]`` on the
cache's device. Their VALUES are only checked here when they live on the CPU (reading a CUDA
tensor would synchronise the device); :class:`flashback_ext.RingKVCache` keeps host copies and
validates values itself before every launch.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from . import reference

__all__ = ["append_attention", "kv_append", "decode_linear", "decode_linear_is_fast", "has_cuda_ops",
           "has_cpu_ops", "compiled_for", "cpu_flags"]

logger = logging.getLogger(__name__)

try:  # the compiled extension registers torch.ops.flashback.*
    from .. import _C  # noqa: F401

    _EXTENSION_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _EXTENSION_ERROR = exc

# (op, device type) -> (dtypes, head dims or None for any) the compiled kernels handle
_SUPPORTED = {
    ("append_attention", "cpu"): ({torch.float32, torch.bfloat16}, None),
    ("append_attention", "cuda"): ({torch.float16, torch.bfloat16}, {64, 128}),
    ("kv_append", "cpu"): ({torch.float64, torch.float32, torch.bfloat16, torch.float16}, None),
    ("kv_append", "cuda"): ({torch.float16, torch.bfloat16}, {8 * i for i in range(1, 65)}),
}
_warned: set[tuple[str, str, torch.dtype]] = set()


def _query_kernel(op: str, dispatch_key: str) -> bool:
    if _EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"flashback::{op}", dispatch_key)


# read once: the extension registers its kernels at import, and a table lookup (unlike the
# dispatcher query) is traceable, so torch.compile keeps the wrappers in its graph
_KERNELS = {(op, key): _query_kernel(op, key)
            for op in ("append_attention", "kv_append", "decode_linear") for key in ("CPU", "CUDA")}


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return _KERNELS.get((op, dispatch_key), False)


def has_cpu_ops() -> bool:
    """True when the compiled extension holds the CPU kernels."""
    return _has_kernel("append_attention", "CPU") and _has_kernel("kv_append", "CPU")


def has_cuda_ops() -> bool:
    """True when the compiled extension holds the CUDA kernels (whether or not a GPU is present)."""
    return _has_kernel("append_attention", "CUDA") and _has_kernel("kv_append", "CUDA")


def _kernel_covers(op: str, kind: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a compiled kernel of ``op`` exists for this device type, dtype and head dim."""
    supported = _SUPPORTED.get((op, kind))
    if not supported or not _has_kernel(op, kind.upper()):
        return False
    dtypes, head_dims = supported
    return dtype in dtypes and (head_dims is None or head_dim in head_dims)


def compiled_for(device: Union[str, torch.device], dtype: torch.dtype, head_dim: int) -> bool:
    """True when BOTH ops run compiled kernels for this device type, dtype and head dim (no
    fallback to the reference, which reads lengths on the host and cannot be graph-captured)."""
    kind = torch.device(device).type
    return all(_kernel_covers(op, kind, dtype, head_dim) for op in ("append_attention", "kv_append"))


def _use_compiled(device: torch.device, dtype: torch.dtype, head_dim: int, op: str) -> bool:
    kind = device.type
    if _kernel_covers(op, kind, dtype, head_dim):
        return True
    key = (op, kind, dtype)
    if key not in _warned:
        _warned.add(key)
        why = "the extension failed to import" if _EXTENSION_ERROR else "no compiled kernel"
        logger.warning("flashback_ext: %s for %s with %s on %s (head dim %d); using the slow "
                       "pure-PyTorch reference", why, op, dtype, kind, head_dim)
    return False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx512_bf16``, ``amx_bf16``, ...) from /proc/cpuinfo; empty
    where it cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def decode_linear_is_fast() -> bool:
    """True when :func:`decode_linear` runs its AVX512-BF16 kernel on this CPU (elsewhere, and
    with ``FLASHBACK_CPU_GEMM=fp32``, it computes the same product with ``F.linear``)."""
    return _DECODE_LINEAR_FAST


# read once, like the C++ side, and a plain constant so that torch.compile traces the callers
_DECODE_LINEAR_FAST = (_has_kernel("decode_linear", "CPU") and "avx512_bf16" in cpu_flags()
                       and os.environ.get("FLASHBACK_CPU_GEMM") != "fp32")


# ----------------------------------------------------------------------------------- checks
def _check_lengths(t: torch.Tensor, name: str, batch: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}], got {list(t.shape)}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the cache's device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (e.g. call .contiguous())")


def _host_values(t: torch.Tensor) -> Optional[list[int]]:
    """Values of a CPU length tensor; None for device tensors and under torch.compile (both
    checked by the cache instead: reading values would end the compiled graph)."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return [int(x) for x in t.tolist()]


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [B, Hkv, C, D], got shape {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {list(v_cache.shape)} must equal k_cache shape "
                         f"{list(k_cache.shape)}")
    if v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError("k_cache and v_cache must share dtype and device")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def _check_sink(sink: int, capacity: int) -> None:
    if not 0 <= sink < capacity:
        raise ValueError(f"sink must be in [0, capacity={capacity}), got {sink}")


def _check_ring_offsets(offs: Optional[list[int]], capacity: int, sink: int) -> None:
    for b, off in enumerate(offs or []):
        if not 0 <= off < capacity - sink:
            raise ValueError(f"ring_offset[{b}]={off} must be in [0, capacity - sink="
                             f"{capacity - sink})")


def _zeros_like_lengths(batch: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.int32, device=device)


# -------------------------------------------------------------------------------------- ops
def kv_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_pos: torch.Tensor,
    ring_offset: Optional[torch.Tensor] = None,
    sink: int = 0,
) -> None:
    """Write ``k_new, v_new [B, Hkv, n, D]`` into ``k_cache, v_cache [B, Hkv, C, D]`` in place.

    Token ``i`` of sequence ``b`` goes to logical index ``write_pos[b] + i`` of the ring layout
    (see docs/DESIGN.md). Strided views are accepted for ``k_new``/``v_new``. Raises ``ValueError`` /
    ``TypeError`` naming the bad argument, before writing anything.
    """
    _check_cache_pair(k_cache, v_cache)
    batch, hkv, capacity, d = k_cache.shape
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, Hkv, n, D], got shape {list(t.shape)}")
        if t.shape[0] != batch or t.shape[1] != hkv or t.shape[3] != d:
            raise ValueError(f"{name} shape {list(t.shape)} does not match the cache "
                             f"[B={batch}, Hkv={hkv}, *, D={d}]")
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal the cache dtype {k_cache.dtype}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {k_cache.device}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new shape {list(v_new.shape)} must equal k_new shape "
                         f"{list(k_new.shape)}")
    _check_sink(sink, capacity)
    if ring_offset is None:
        ring_offset = _zeros_like_lengths(batch, k_cache.device)
    _check_lengths(write_pos, "write_pos", batch, k_cache.device)
    _check_lengths(ring_offset, "ring_offset", batch, k_cache.device)
    n = k_new.shape[2]
    for b, pos in enumerate(_host_values(write_pos) or []):
        if pos < 0:
            raise ValueError(f"write_pos[{b}]={pos} must be >= 0")
        if pos + n > capacity:
            raise ValueError(f"kv_append overflows the cache: write_pos[{b}]={pos} + {n} new "
                             f"tokens > capacity {capacity}")
    _check_ring_offsets(_host_values(ring_offset), capacity, sink)
    if _use_compiled(k_cache.device, k_cache.dtype, d, "kv_append"):
        torch.ops.flashback.kv_append(k_new, v_new, k_cache, v_cache, write_pos, ring_offset, sink)
    else:
        reference.kv_append(k_new, v_new, k_cache, v_cache, write_pos, ring_offset, sink)


def append_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    ring_offset: Optional[torch.Tensor] = None,
    sink: int = 0,
    scale: Optional[float] = None,
    q_lens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-right causal attention of ``q [B, Hq, Sq, D]`` over a (ring) KV cache.

    ``kv_lens[b]`` counts the logical tokens visible to sequence ``b`` INCLUDING the new block;
    query row ``i`` sees keys ``j <= kv_lens[b] - q_lens[b] + i`` (``q_lens`` defaults to Sq).
    GQA/MQA: head ``h`` reads kv head ``h // (Hq // Hkv)``. ``scale`` defaults to ``D**-0.5``.

    Returns ``(out [B, Sq, Hq, D] in q's dtype, lse [B, Hq, Sq] float32, natural log)``; rows
    past ``q_lens[b]`` are zero in ``out`` and ``-inf`` in ``lse``.
    """
    _check_cache_pair(k_cache, v_cache)
    batch, hkv, capacity, d = k_cache.shape
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, Sq, D], got shape {list(q.shape)}")
    qb, hq, sq, qd = q.shape
    if qb != batch:
        raise ValueError(f"q batch {qb} != cache batch {batch}")
    if qd != d:
        raise ValueError(f"head dim of q ({qd}) != head dim of the cache ({d})")
    if hq % hkv != 0:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must equal the cache dtype {k_cache.dtype}")
    if q.device != k_cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {k_cache.device}")
    if q.stride(-1) != 1:
        q = q.contiguous()  # kernels need a contiguous head dim; other strides are fine
    _check_sink(sink, capacity)
    if ring_offset is None:
        ring_offset = _zeros_like_lengths(batch, k_cache.device)
    _check_lengths(kv_lens, "kv_lens", batch, k_cache.device)
    _check_lengths(ring_offset, "ring_offset", batch, k_cache.device)
    if q_lens is not None:
        _check_lengths(q_lens, "q_lens", batch, k_cache.device)
    lens = _host_values(kv_lens)
    qls = _host_values(q_lens) if q_lens is not None else None
    for b, length in enumerate(lens or []):
        ql = qls[b] if qls is not None else sq
        if not 0 <= ql <= sq:
            raise ValueError(f"q_lens[{b}]={ql} must be in [0, Sq={sq}]")
        if not 0 <= length <= capacity:
            raise ValueError(f"kv_lens[{b}]={length} must be in [0, capacity={capacity}]")
        if ql > length:
            raise ValueError(f"q is longer than kv for sequence {b}: {ql} query rows but "
                             f"kv_lens[{b}]={length} (kv_lens must include the new block)")
    _check_ring_offsets(_host_values(ring_offset), capacity, sink)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if _use_compiled(q.device, q.dtype, d, "append_attention"):
        return torch.ops.flashback.append_attention(q, k_cache, v_cache, kv_lens, ring_offset,
                                                    sink, scale, q_lens)
    return reference.append_attention(q, k_cache, v_cache, kv_lens, ring_offset, sink, scale,
                                      q_lens)


def decode_linear(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x [..., K] . concat(weights)^T -> [..., sum N_i]`` for bf16 CPU tensors, each weight
    ``[N_i, K]`` as ``nn.Linear`` stores it (no bias).

    Made for decode, where ``x`` has a few rows and the product reads every weight once: several
    weights (q/k/v, gate/up) go in one call, read where they lie, accumulated in fp32 and rounded
    to bf16 once. Any number of rows is correct; beyond four the weights are read again per four
    rows. Raises ``TypeError`` / ``ValueError`` naming the bad argument.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(weights, torch.Tensor) or not weights:
        raise ValueError("weights must be a non-empty sequence of [N, K] tensors")
    if x.dim() < 1 or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be a bfloat16 CPU tensor [..., K], got {x.dtype} "
                         f"{list(x.shape)} on {x.device}")
    k = x.shape[-1]
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 2 or w.shape[1] != k or w.dtype != torch.bfloat16 or w.device.type != "cpu":
            raise ValueError(f"weights[{i}] must be a bfloat16 CPU tensor [N, K={k}], got "
                             f"{w.dtype} {list(w.shape)} on {w.device}")
    rows = x.reshape(-1, k)
    if _has_kernel("decode_linear", "CPU"):
        out = torch.ops.flashback.decode_linear(rows, list(weights))
    else:
        out = torch.cat([torch.nn.functional.linear(rows, w) for w in weights], dim=-1)
    return out.view(*x.shape[:-1], out.shape[-1])


# ------------------------------------------------------------------- fake (meta) kernels
if _EXTENSION_ERROR is None:

    @torch.library.register_fake("flashback::append_attention")
    def _append_attention_fake(q, k_cache, v_cache, kv_lens, ring_offset, sink, scale, q_lens):
        batch, hq, sq, d = q.shape
        out = q.new_empty((batch, sq, hq, d))
        lse = q.new_empty((batch, hq, sq), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("flashback::decode_linear")
    def _decode_linear_fake(x, weights):
        return x.new_empty((x.shape[0], sum(w.shape[0] for w in weights)))

    @torch.library.register_fake("flashback::kv_append")
    def _kv_append_fake(k_new, v_new, k_cache, v_cache, write_pos, ring_offset, sink):
        return None
