"""Smoke tests: every example runs offline on the defaults and prints what it promises."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,expect", [
    ("quickstart.py", ["--max-new-tokens", "18"], "retrieval log:"),
    ("own_corpus.py", ["--max-new-tokens", "6", "--kind", "dense"], "dense index saved to"),
    ("patch_any_llama.py", ["--max-new-tokens", "18", "--context", "128"], "append speed-up"),
    ("ops_demo.py", ["--context", "256", "--layers", "2"], "speed-up of appending"),
    ("train_adapter.py", ["--steps", "1", "--train-examples", "8", "--eval-examples", "4"],
     "append-mode generation with the adapter"),
])
def test_example_runs(script, args, expect):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert expect in res.stdout, res.stdout[-2000:]
