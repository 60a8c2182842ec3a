import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the shared `cases` helpers

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (converted from GGUF once into the flashback cache dir)."""
    from flashback_ext.engine.models import load_model

    return load_model("default", device="cpu", dtype=__import__("torch").float32)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the embedded SmolLM2 model (tens of seconds)")
