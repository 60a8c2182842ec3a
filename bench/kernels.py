"""Kernel benchmark: flashback append_attention / kv_append against torch SDPA, with ceilings.

    python bench/kernels.py --device cpu            # CPU kernels vs SDPA (2-core dev box)
    python bench/kernels.py --device cuda [--quick] # decode, 144-row append, kv_append on a GPU

Every case reports time, achieved GB/s and TFLOP/s, the roofline time
max(bytes / copy bandwidth, FLOPs / matmul rate) with BOTH ceilings measured in the same run on
the same device, the fraction of that roofline reached, and the ratio to the best peer.
Peers get the exact same problem: K/V as the contiguous [B, Hkv, L, D] live prefix and a
bottom-right causal mask (SDPA's own ``is_causal`` is top-left, which is wrong for an appended
block). On CUDA the peers also include compiled FlexAttention and, where they import,
FlashAttention's ``flash_attn_with_kvcache`` and FlashInfer (bench/peers.py); a peer that is not
installed or refuses a shape is listed with its reason under ``peers_skipped``.
Results go to ``bench/results/kernels_<device>.json`` (and a PNG if matplotlib exists).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flashback_ext  # noqa: E402
from flashback_ext import ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEER_NAMES, attention_peers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------- timing
def time_cpu(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 9) -> dict[str, float]:
    """Median wall time in ms of each function, INTERLEAVED (one call of each per round) so a
    noisy shared machine slows every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def time_cuda(fn: Callable[[int], object], warmup: int = 3, repeats: int = 20) -> float:
    """Median CUDA-event time in ms; ``fn(i)`` gets the repeat index to rotate its inputs."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    samples = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


# -------------------------------------------------------------------------------- ceilings
def measure_ceilings(device: str, cpu_dtype: torch.dtype = torch.float32) -> dict:
    """Copy bandwidth (read+write bytes/s) and dense matmul rate on this device (on the CPU the
    matmul in ``cpu_dtype``: bf16 runs on AMX/AVX512-BF16 units where the CPU has them)."""
    if device == "cuda":
        n = 1 << 28  # 512 MiB of bf16 per buffer: far beyond L2
        src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
        dst = torch.empty_like(src)
        copy_ms = time_cuda(lambda i: dst.copy_(src))
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        mm_ms = time_cuda(lambda i: a @ b, repeats=10)
        matmul_dtype = "bf16"
    else:
        n = 1 << 26  # 256 MiB of fp32
        src = torch.randn(n)
        dst = torch.empty_like(src)
        copy_ms = time_cpu({"copy": lambda: dst.copy_(src)})["copy"]
        m = 2048
        a, b = torch.randn(m, m, dtype=cpu_dtype), torch.randn(m, m, dtype=cpu_dtype)
        mm_ms = time_cpu({"mm": lambda: a @ b})["mm"]
        matmul_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(cpu_dtype, str(cpu_dtype))
    return {
        "copy_GBps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
        "matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9,
        "matmul_dtype": matmul_dtype,
        "matmul_size": m,
    }


# ------------------------------------------------------------------------------- problems
def attention_cost(b, hq, hkv, sq, length, d, elem) -> tuple[int, int]:
    """(bytes, FLOPs) floor of one append_attention call with every row seeing ~length keys."""
    kv_bytes = 2 * b * hkv * length * d * elem
    io_bytes = 2 * b * hq * sq * d * elem  # q in, out
    visible = sq * length - sq * (sq - 1) // 2  # bottom-right causal: the last rows see more
    flops = 4 * b * hq * visible * d
    return kv_bytes + io_bytes, flops


def bottom_right_mask(sq: int, length: int, device) -> torch.Tensor:
    rows = torch.arange(sq, device=device).unsqueeze(1)
    cols = torch.arange(length, device=device).unsqueeze(0)
    return cols <= (length - sq + rows)


def sdpa_peers(device: str) -> dict[str, Optional[object]]:
    """Named SDPA backends to try; None = let torch choose (the CPU default)."""
    if device == "cpu":
        return {"sdpa": None}
    from torch.nn.attention import SDPBackend
    return {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def run_sdpa(backend, q, k, v, mask):
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              enable_gqa=k.shape[1] != q.shape[1])


def bench_attention(device, dtype, b, hq, hkv, sq, length, d, ceilings, copies=1) -> dict:
    """One append_attention case: ours vs every SDPA backend that accepts it."""
    gen_dev = device
    elem = torch.tensor([], dtype=dtype).element_size()
    qs = [torch.randn(b, hq, sq, d, dtype=dtype, device=gen_dev) for _ in range(copies)]
    ks = [torch.randn(b, hkv, length, d, dtype=dtype, device=gen_dev) for _ in range(copies)]
    vs = [torch.randn(b, hkv, length, d, dtype=dtype, device=gen_dev) for _ in range(copies)]
    lens = torch.full((b,), length, dtype=torch.int32, device=gen_dev)
    mask = None if sq == 1 else bottom_right_mask(sq, length, gen_dev)
    contenders = {"ours": lambda i: ops.append_attention(qs[i], ks[i], vs[i], lens)}
    for name, backend in sdpa_peers(device).items():
        call = lambda i, backend=backend: run_sdpa(backend, qs[i], ks[i], vs[i], mask)  # noqa: E731
        try:
            call(0)
            contenders[name] = call
        except RuntimeError as exc:  # the backend refuses this problem (mask, GQA, dtype...)
            print(f"  [{name} skipped: {str(exc).splitlines()[0][:90]}]")
    others, skipped = attention_peers(device, qs, ks, vs, sq, length)
    contenders.update(others)
    for name, why in skipped.items():
        if why != "CUDA only":
            print(f"  [{name} skipped: {why}]")
    if device == "cuda":
        times = {name: time_cuda(lambda i, f=f: f(i % copies)) for name, f in contenders.items()}
    else:
        times = time_cpu({name: (lambda f=f: f(0)) for name, f in contenders.items()})
    ours = times.pop("ours")
    peers = {name: times.get(name) for name in [*sdpa_peers(device), *PEER_NAMES]}
    # correctness guard: a benchmark of a wrong kernel is worthless
    got, _ = ops.append_attention(qs[0], ks[0], vs[0], lens)
    ref = run_sdpa(None, qs[0].float(), ks[0].float(), vs[0].float(), mask).transpose(1, 2)
    max_err = (got.float() - ref).abs().max().item()
    nbytes, flops = attention_cost(b, hq, hkv, sq, length, d, elem)
    return finish_case("append_attention", dict(b=b, hq=hq, hkv=hkv, sq=sq, L=length, d=d,
                                                dtype=str(dtype).replace("torch.", "")),
                       ours, peers, nbytes, flops, ceilings, max_err=max_err,
                       peers_skipped=skipped)


def bench_kv_append(device, dtype, b, hkv, n, d, capacity, ceilings) -> dict:
    elem = torch.tensor([], dtype=dtype).element_size()
    k_new = torch.randn(b, hkv, n, d, dtype=dtype, device=device)
    v_new = torch.randn_like(k_new)
    kc = torch.zeros(b, hkv, capacity, d, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    pos = torch.full((b,), capacity // 2, dtype=torch.int32, device=device)
    off = torch.zeros(b, dtype=torch.int32, device=device)
    call = lambda: torch.ops.flashback.kv_append(k_new, v_new, kc, vc, pos, off, 0)  # noqa: E731
    naive = lambda: (kc[:, :, capacity // 2:capacity // 2 + n].copy_(k_new),  # noqa: E731
                     vc[:, :, capacity // 2:capacity // 2 + n].copy_(v_new))
    if device == "cuda":
        ours, peer = time_cuda(lambda i: call()), time_cuda(lambda i: naive())
    else:
        t = time_cpu({"ours": call, "naive": naive})
        ours, peer = t["ours"], t["naive"]
    nbytes = 2 * 2 * b * hkv * n * d * elem  # read new + write cache, K and V
    return finish_case("kv_append", dict(b=b, hkv=hkv, n=n, d=d, C=capacity,
                                         dtype=str(dtype).replace("torch.", "")),
                       ours, {"slice_copy": peer}, nbytes, 0, ceilings)


def finish_case(op, shape, ours, peers, nbytes, flops, ceilings, **extra) -> dict:
    roof_ms = max(nbytes / (ceilings["copy_GBps"] * 1e6), flops / (ceilings["matmul_TFLOPs"] * 1e9))
    valid = [t for t in peers.values() if t is not None]
    best_peer = min(valid) if valid else None
    return dict(op=op, **shape, ours_ms=ours, peers_ms=peers, bytes=nbytes, flops=flops,
                GBps=nbytes / ours / 1e6, TFLOPs=flops / ours / 1e9, roofline_ms=roof_ms,
                roofline_matmul_TFLOPs=ceilings["matmul_TFLOPs"],
                pct_roofline=100 * roof_ms / ours,
                speedup_vs_best_peer=(best_peer / ours) if best_peer else None, **extra)


# ---------------------------------------------------------------------------------- suites
def cpu_suite(ceilings) -> list[dict]:
    """``ceilings`` holds the fp32 matmul rate and ``bf16_matmul_TFLOPs``: each case's roofline
    uses the rate of its own dtype."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        own = ceilings if dtype == torch.float32 else dict(
            ceilings, matmul_TFLOPs=ceilings["bf16_matmul_TFLOPs"], matmul_dtype="bf16")
        for hq, hkv, d in ((32, 8, 128), (9, 3, 64)):
            for sq in (1, 144):
                print(f"cpu {dtype} Hq={hq} Hkv={hkv} D={d} Sq={sq} L=4096")
                cases.append(bench_attention("cpu", dtype, 1, hq, hkv, sq, 4096, d, own))
    cases.append(bench_kv_append("cpu", torch.float32, 1, 8, 144, 128, 8192, ceilings))
    return cases


def cuda_suite(ceilings, quick: bool) -> list[dict]:
    cases = []
    dtype = torch.bfloat16
    heads = [(32, 32, 128), (32, 8, 128), (9, 3, 64)]
    half_gb = 0.5 * 2**30
    for hq, hkv, d in heads:
        for b in (1, 16):
            per_token = 2 * b * hkv * d * 2
            length = int(math.ceil(half_gb / per_token / 256) * 256)  # K+V >= 0.5 GB
            print(f"cuda decode Hq={hq} Hkv={hkv} D={d} B={b} L={length}")
            cases.append(bench_attention("cuda", dtype, b, hq, hkv, 1, length, d, ceilings))
    lengths = (4096, 32768) if quick else (4096, 16384, 65536, 131072)
    for hq, hkv, d in heads:
        for length in lengths:
            copies = max(1, int(2 * 2**30 // (2 * hkv * length * d * 2 * 4)))  # rotate past L2
            copies = min(copies, 4)
            print(f"cuda append Hq={hq} Hkv={hkv} D={d} Sq=144 L={length}")
            cases.append(bench_attention("cuda", dtype, 1, hq, hkv, 144, length, d, ceilings,
                                         copies=copies))
    cases.append(bench_kv_append("cuda", dtype, 1, 8, 144, 128, 131072, ceilings))
    cases.append(bench_kv_append("cuda", dtype, 16, 8, 144, 128, 8192, ceilings))
    return cases


def print_table(cases: list[dict]) -> None:
    head = (f"{'op':<17}{'shape':<38}{'ours ms':>9}{'GB/s':>8}{'TFLOP/s':>9}{'%roof':>7}"
            f"{'best peer ms':>14}{'x peer':>8}")
    print(head)
    print("-" * len(head))
    for c in cases:
        if c["op"] == "kv_append":
            shape = f"B{c['b']} Hkv{c['hkv']} n{c['n']} D{c['d']} {c['dtype']}"
        else:
            shape = f"B{c['b']} {c['hq']}/{c['hkv']} Sq{c['sq']} L{c['L']} D{c['d']} {c['dtype']}"
        peers = [t for t in c["peers_ms"].values() if t is not None]
        best = f"{min(peers):.3f}" if peers else "n/a"
        ratio = f"{c['speedup_vs_best_peer']:.2f}" if c["speedup_vs_best_peer"] else "n/a"
        print(f"{c['op']:<17}{shape:<38}{c['ours_ms']:>9.3f}{c['GBps']:>8.0f}{c['TFLOPs']:>9.2f}"
              f"{c['pct_roofline']:>7.1f}{best:>14}{ratio:>8}")


def save_chart(cases: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    att = [c for c in cases if c["op"] == "append_attention"]
    labels = [f"{c['hq']}/{c['hkv']} Sq{c['sq']}\nL{c['L']} {c['dtype']}" for c in att]
    fig, ax = plt.subplots(figsize=(max(6, len(att) * 0.9), 4))
    xs = range(len(att))
    ax.bar([x - 0.2 for x in xs], [c["pct_roofline"] for c in att], 0.4, label="flashback")
    peer_pct = []
    for c in att:
        peers = [t for t in c["peers_ms"].values() if t is not None]
        peer_pct.append(100 * c["roofline_ms"] / min(peers) if peers else 0)
    ax.bar([x + 0.2 for x in xs], peer_pct, 0.4, label="best SDPA")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("% of roofline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer CUDA lengths (device.sh)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible; run with --device cpu")
    torch.manual_seed(0)
    ceilings = measure_ceilings(args.device)
    bf16 = ""
    if args.device == "cpu":  # bf16 cases take the bf16 matmul rate (AMX / AVX512-BF16)
        ceilings["bf16_matmul_TFLOPs"] = measure_ceilings("cpu", torch.bfloat16)["matmul_TFLOPs"]
        bf16 = f", bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.2f} TFLOP/s"
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, {ceilings['matmul_dtype']} matmul "
          f"{ceilings['matmul_TFLOPs']:.2f} TFLOP/s{bf16}")
    cases = cpu_suite(ceilings) if args.device == "cpu" else cuda_suite(ceilings, args.quick)
    print_table(cases)
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    result = dict(device=args.device, device_name=name, threads=torch.get_num_threads(),
                  torch=torch.__version__, flashback_ext=flashback_ext.__version__,
                  when=time.strftime("%Y-%m-%dT%H:%M:%S"), ceilings=ceilings, cases=cases)
    out = args.out or RESULTS / f"kernels_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    chart = save_chart(cases, out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {chart}" if chart else ""))


if __name__ == "__main__":
    main()
