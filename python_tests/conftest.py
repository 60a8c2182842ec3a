import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the shared `cases` helpers

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (converted from GGUF once into the flashback cache dir)."""
    from flashback_ext.engine.models import load_model

    return load_model("default", device="cpu", dtype=__import__("torch").float32)


@pytest.fixture()
def tok():
    """A real (tiny) Hugging Face tokenizer (toys.tiny_hf_tokenizer)."""
    from toys import tiny_hf_tokenizer

    return tiny_hf_tokenizer()


@pytest.fixture()
def model(tok):
    """A tiny random Llama for ``tok``."""
    from flashback_ext.engine.models import tiny_llama

    return tiny_llama(vocab_size=len(tok), layers=2, hidden=32, heads=4, kv_heads=2)


@pytest.fixture()
def setup(tok):
    """Word documents and a BM25 retriever over them, cut by ``tok``."""
    from flashback_ext.engine.retrieval import BM25Retriever, Corpus

    from toys import word_docs

    docs = word_docs()
    return docs, BM25Retriever(Corpus.from_documents(docs, tok, max_tokens=24, progress=False))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the embedded SmolLM2 model (tens of seconds)")
