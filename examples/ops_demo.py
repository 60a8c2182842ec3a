"""FlashBack at the op level: one retrieval cycle, append vs prepend, on the CPU kernels.

For an attention stack shaped like the embedded SmolLM2-135M (30 layers, 9 query heads,
3 kv heads, head dim 64) this runs the per-retrieval attention work of both layouts:

* prepend (In-Context RALM): the passage goes in front, so the whole
  ``[passage | context]`` is re-encoded: causal attention of every row over every earlier row;
* append (FlashBack): the context's KV stays cached; roll back the last stride, append
  ``[last 16 tokens | <MARK_L> passage <MARK_R>]`` (144 rows) and attend over cache + block.

It checks the appended block's output against the pure-PyTorch reference and prints the
measured times. Attention only (no projections/MLP), so it isolates what the ops change.
"""
from __future__ import annotations

import argparse
import time

import torch

import flashback_ext
from flashback_ext import RingKVCache, ops, reference


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048, help="context tokens already cached")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--passage", type=int, default=128, help="passage tokens incl. markers")
    args = parser.parse_args()
    torch.manual_seed(0)
    hq, hkv, d = 9, 3, 64
    block = args.stride + args.passage
    print(f"flashback_ext {flashback_ext.__version__}: CPU ops built = {flashback_ext.has_cpu_ops()}, "
          f"CUDA ops built = {flashback_ext.has_cuda_ops()}, threads = {torch.get_num_threads()}")
    print(f"stack: {args.layers} layers x (Hq={hq}, Hkv={hkv}, D={d}); context {args.context}, "
          f"stride {args.stride}, passage {args.passage}")

    cache = RingKVCache(args.layers, 1, hkv, d, args.context + block + 64, dtype=torch.float32)
    ctx_k = torch.randn(1, hkv, args.context, d)
    ctx_v = torch.randn(1, hkv, args.context, d)
    for layer in range(args.layers):
        cache.append(layer, ctx_k, ctx_v)
    blk_k, blk_v = torch.randn(1, hkv, block, d), torch.randn(1, hkv, block, d)
    blk_q = torch.randn(1, hq, block, d)

    def append_cycle() -> None:
        # O(1) rollback to before the last stride (also drops the previous cycle's block)
        cache.truncate(args.context - args.stride)
        for layer in range(args.layers):
            cache.append(layer, blk_k, blk_v)
            cache.attend(layer, blk_q)

    full = args.passage + args.context
    full_q = torch.randn(1, hq, full, d)
    full_k, full_v = torch.randn(1, hkv, full, d), torch.randn(1, hkv, full, d)
    full_lens = torch.tensor([full], dtype=torch.int32)

    def prepend_cycle() -> None:
        for _ in range(args.layers):
            ops.append_attention(full_q, full_k, full_v, full_lens)

    t_append = best_of(append_cycle)
    t_prepend = best_of(prepend_cycle)

    # correctness: the appended block attends exactly like a from-scratch pass over the tokens
    got, _ = cache.attend(0, blk_q)  # the cache holds the last cycle's block
    k, v, lens, offs = cache.layer_state(0)
    want, _ = reference.append_attention(blk_q.double(), k.double(), v.double(), lens, offs)
    err = (got.double() - want).abs().max().item()

    print(f"append  (144-row block over {args.context - args.stride + block} keys): "
          f"{t_append * 1e3:8.1f} ms per retrieval")
    print(f"prepend (re-encode {full} rows causally):            {t_prepend * 1e3:8.1f} ms per retrieval")
    print(f"speed-up of appending: {t_prepend / t_append:.1f}x   "
          f"(max |append - float64 reference| = {err:.1e})")


if __name__ == "__main__":
    main()
