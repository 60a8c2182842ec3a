"""A small run of every CUDA kernel for compute-sanitizer (memcheck / racecheck) in device.sh.

Shapes are chosen to touch every edge: ring wrap-around with a sink, ragged lengths and q_lens
(including an empty sequence), a partial last row tile, both head dims, decode and block paths.
"""
import torch

from flashback_ext import ops


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    for d in (64, 128):
        for dtype in (torch.float16, torch.bfloat16):
            b, hq, hkv, cap, sink = 3, 6, 2, 300, 3
            kc = torch.randn(b, hkv, cap, d, dtype=dtype, device=dev)
            vc = torch.randn_like(kc)
            i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
            offs = i32([0, 250, 17])
            new = torch.randn(b, 20, hkv, d, dtype=dtype, device=dev).transpose(1, 2)
            ops.kv_append(new, new, kc, vc, i32([0, 270, 100]), offs, sink)
            for sq in (1, 37, 144):
                q = torch.randn(b, hq, sq, d, dtype=dtype, device=dev)
                lens = i32([cap, 200, sq])
                ops.append_attention(q, kc, vc, lens, offs, sink, None, i32([sq, sq // 2, 0]))
                ops.append_attention(q, kc, vc, lens, offs, sink)
    torch.cuda.synchronize()
    print("sanitize case ok")


if __name__ == "__main__":
    main()
