"""Smoke test of the end-to-end benchmark harness on a tiny model (numbers are not checked)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ralm_e2e_harness_runs(tmp_path):
    out = tmp_path / "e2e.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "ralm_e2e.py"), "--model", "tiny",
                          "--contexts", "48", "--cycles", "1", "--stride", "4", "--passage", "8",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["context"] == 48
    for mode in ("engine-append", "engine-prepend", "hf-append", "hf-prepend", "engine-none"):
        assert rows[0][mode] > 0
