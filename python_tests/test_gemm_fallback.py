"""The CPU kernel's other paths are also correct: the fp32 brgemm fallback (used where torch
exports no BLAS sgemm_), for bf16 on CPUs with AMX or AVX512-BF16 the widen-to-fp32 path used
elsewhere, and on CPUs with AVX-512 the AVX2 softmax loops used elsewhere.

Each path is chosen once per process, so each runs in a subprocess with FLASHBACK_CPU_GEMM set
("brgemm" or "fp32"; unset, bf16 blocks run on AMX and bf16 decode items on AVX512-BF16 dot
products where the CPU has them) or FLASHBACK_CPU_SIMD
("avx2"; unset, the softmax runs in AVX-512 where the CPU has it).
"""
import os
import subprocess
import sys
import textwrap

import pytest

from flashback_ext import has_cpu_ops

pytestmark = pytest.mark.skipif(not has_cpu_ops(), reason="extension built without CPU ops")

SCRIPT = textwrap.dedent("""
    import torch
    from flashback_ext import ops
    from cases import ATOL, assert_fa_close, make_case, reference_pair
    for dtype in (torch.float32, torch.bfloat16):
        for sq, sink, offs in ((1, 0, [0, 0]), (144, 4, [100, 7]), (9, 0, [250, 3])):
            case = make_case(2, 8, 2, sq, 64, sq + 300, [sq + 290, sq + 5], offs, sink,
                             dtype=dtype, seed=sq)
            out, lse = ops.append_attention(*case.args())
            assert_fa_close(out, lse, *reference_pair(case, dtype), ATOL[dtype])
    print("fallback ok")
""")


@pytest.mark.parametrize("variable,path", [("FLASHBACK_CPU_GEMM", "brgemm"),
                                           ("FLASHBACK_CPU_GEMM", "fp32"),
                                           ("FLASHBACK_CPU_SIMD", "avx2")])
def test_gemm_path_matches_reference(variable, path):
    env = dict(os.environ, **{variable: path})
    here = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fallback ok" in res.stdout
