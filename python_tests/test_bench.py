"""Benchmark harnesses: the end-to-end run on a tiny model (numbers not checked) and one kernel
case (its cost model, peers and correctness guard). The research scripts' tests are in
research/tests/test_research.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashback_ext.engine.models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ralm_e2e_harness_runs(tmp_path, dtype):
    from flashback_ext.engine.models import cpu_has_bf16

    out = tmp_path / "e2e.json"
    modes = ["engine-append", "engine-prepend", "hf-append", "hf-prepend", "engine-none",
             "compiled-append"]
    # bf16 is the path of CPUs with AMX/AVX512-BF16 (fp32 is the default elsewhere); on a 2-core
    # AMD EPYC without them this harness ran past 300 s compiled and past 9 min eager (unexplained,
    # noted in the issue), so it is checked where those instructions exist
    if dtype == "bfloat16" and not cpu_has_bf16():
        pytest.skip("bf16 harness needs a CPU with bf16 instructions (AMX or AVX512-BF16)")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "ralm_e2e.py"), "--model", "tiny",
                          "--contexts", "48", "--cycles", "1", "--stride", "4", "--passage", "8",
                          "--dtype", dtype, "--modes", ",".join(modes), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dtype"] == dtype
    tiny = tiny_llama(vocab_size=512)  # what the harness builds, in fp32
    per_step = sum(p.numel() for p in tiny.parameters()) - tiny.get_input_embeddings().weight.numel()
    # the weights a decode step reads: the model really is in that dtype
    assert result["weights_GB"] * 2**30 == per_step * (4 if dtype == "float32" else 2)
    rows = result["rows"]
    assert rows[0]["context"] == 48
    for mode in modes:
        assert rows[0][mode] > 0
    step = rows[0]["detail"]["compiled-append"]
    assert step["compile_s"] > 0 and not step["recompiled_in_timed_run"]
    assert step["graph_steps"] == step["decode_steps"] > 0


def test_ralm_e2e_batch_case_without_prepend(tmp_path):
    out = tmp_path / "batch.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "ralm_e2e.py"), "--model", "tiny",
                          "--contexts", "40", "--cycles", "1", "--stride", "4", "--passage", "8",
                          "--modes", "engine-append", "--batch", "3", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.rstrip().splitlines()[-2].endswith("n/a")  # no prepend/append ratio to show
    batch = json.loads(out.read_text())["rows"][0]["batch"]
    assert batch["size"] == 3 and batch["lengths"] == [40, 34, 27]  # spread over [L/2, L]
    for key in ("tokens_per_s", "batch1_tokens_per_s", "cycle_tokens_per_s", "batch1_cycle_tokens_per_s"):
        assert batch[key] > 0
    # the prompt prefill only adds time
    assert batch["cycle_tokens_per_s"] > batch["tokens_per_s"]


def test_ralm_e2e_times_the_echo_mode_beside_append(tmp_path):
    out = tmp_path / "echo.json"
    cmd = [sys.executable, str(ROOT / "bench" / "ralm_e2e.py"), "--model", "tiny", "--contexts",
           "40", "--cycles", "1", "--stride", "4", "--passage", "8"]
    res = subprocess.run(cmd + ["--modes", "engine-append,engine-echo", "--echo-tokens", "3",
                                "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["echo_tokens"] == 3
    row = data["rows"][0]
    for mode in ("engine-append", "engine-echo"):  # the same cycles, one with a longer block
        assert row[mode] > 0 and row["detail"][mode]["block_ms"] > 0
        assert row["detail"][mode]["decode_steps"] == row["detail"]["engine-append"]["decode_steps"]
    # [last stride | passage] (no markers: the id tokenizer has none), then 3 echo tokens more
    assert row["detail"]["engine-append"]["block_tokens"] == 4 + 8
    assert row["detail"]["engine-echo"]["block_tokens"] == 4 + 8 + 3
    for bad, says in ((["--modes", "engine-echo"], "need --echo-tokens"),
                      (["--modes", "engine-append", "--echo-tokens", "2"], "an echo mode"),
                      (["--echo-tokens", "-1"], "must be >= 0"),
                      (["--modes", "hf-echo", "--echo-tokens", "2"], "unknown modes ['hf-echo']")):
        res = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=300)
        assert res.returncode != 0 and says in res.stderr


def test_kernel_case_reports_peers_and_checks_itself():
    sys.path.insert(0, str(ROOT / "bench"))
    import kernels

    ceilings = {"copy_GBps": 10.0, "matmul_TFLOPs": 0.1}
    case = kernels.bench_attention("cpu", torch.float32, 2, 6, 2, 5, 77, 64, ceilings)
    assert case["max_err"] < 1e-4  # the guard compares ours with fp32 SDPA on the same problem
    assert case["ours_ms"] > 0 and case["peers_ms"]["sdpa"] > 0
    assert set(case["peers_skipped"]) == {"flex_compiled", "flash_attn", "flashinfer"}
    assert case["speedup_vs_best_peer"] == pytest.approx(case["peers_ms"]["sdpa"] / case["ours_ms"])
    nbytes, flops = kernels.attention_cost(2, 6, 2, 5, 77, 64, 4)
    assert (case["bytes"], case["flops"]) == (nbytes, flops)
    # bottom-right causal: 5 rows over 77 keys see 73..77 keys
    assert flops == 4 * 2 * 6 * (73 + 74 + 75 + 76 + 77) * 64
