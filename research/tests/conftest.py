"""The research tests share python_tests' helpers (``toys``: tiny tokenizer, word corpus)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python_tests"))
