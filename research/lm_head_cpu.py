"""The LM head on the CPU in fp32: ``rows @ W.T`` (what ``nn.Linear`` does) against ``W @ rows.T``
(what the engine uses for more than one row), for a few row counts, next to a plain read of the
same bytes. Why: on the dev machine's MKL the first order read a 113 MB head at ~3 GB/s for 2-8 rows.

    python research/lm_head_cpu.py                       # SmolLM2's head shape, 49152 x 576
    python research/lm_head_cpu.py --vocab 128256 --hidden 4096 --rows 1,4

Writes ``research/results/lm_head_cpu.json`` (interleaved timing, median of ``--reps``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rows", default="1,2,3,8,16")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=str(RESULTS / "lm_head_cpu.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden)
    mb = weight.numel() * 4 / 1e6
    read_ms = _median_ms(lambda: weight.sum(), args.reps)
    rows_out = []
    for n in (int(r) for r in args.rows.split(",")):
        x = torch.randn(n, args.hidden)
        # interleaved, so drifts of a shared machine hit both orders alike
        pairs = [(_median_ms(lambda x=x: torch.nn.functional.linear(x, weight), 3),
                  _median_ms(lambda x=x: (weight @ x.T).T, 3))
                 for _ in range(max(1, args.reps // 3))]
        linear = statistics.median(a for a, _ in pairs)
        weight_major = statistics.median(b for _, b in pairs)
        err = float(((weight @ x.T).T - torch.nn.functional.linear(x, weight)).abs().max())
        rows_out.append({"rows": n, "linear_ms": linear, "weight_major_ms": weight_major,
                         "linear_GBps": mb / linear, "weight_major_GBps": mb / weight_major,
                         "max_abs_diff": err})
        print(f"{n:3d} rows: rows @ W.T {linear:7.2f} ms ({mb / linear:5.1f} GB/s) | "
              f"W @ rows.T {weight_major:7.2f} ms ({mb / weight_major:5.1f} GB/s) | "
              f"max |diff| {err:.1e}")
    print(f"plain read of the {mb:.0f} MB head: {read_ms:.2f} ms ({mb / read_ms:.1f} GB/s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": "CPU", "cpu": _cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "shape": [args.vocab, args.hidden], "weight_MB": mb,
        "read_ms": read_ms, "read_GBps": mb / read_ms, "rows": rows_out}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
