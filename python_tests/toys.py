"""Tiny stand-ins for engine tests: a byte-level tokenizer and an in-memory retriever."""
from __future__ import annotations

from flashback_ext.engine.retrieval import Corpus, Hit, Passage


class ByteTokenizer:
    """Bytes 0-255 are tokens 0-255; 256 = EOS; optional marker tokens after that."""

    eos_token_id = 256
    pad_token_id = 0

    def __init__(self, markers: bool = False) -> None:
        self._vocab = {f"<{i}>": i for i in range(257)}
        if markers:
            self._vocab.update({"<MARK_L>": 257, "<MARK_R>": 258})

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(self, text):
        return {"input_ids": self.encode(text)}


class ListRetriever:
    """Returns passages in a fixed rotation, so consecutive retrievals differ."""

    def __init__(self, texts: list[str], tokenizer) -> None:
        self.corpus = Corpus.from_documents(((str(i), f"doc{i}", t) for i, t in enumerate(texts)),
                                            tokenizer, max_tokens=128, progress=False)
        self.calls = 0

    def search_batch(self, queries, k=1, exclude_doc_ids=None, exclude_titles=None):
        out = []
        for qi, _ in enumerate(queries):
            hits = []
            for j in range(k):
                p: Passage = self.corpus.passages[(self.calls + qi + j) % len(self.corpus)]
                hits.append(Hit(p, 1.0 / (1 + j)))
            out.append(hits)
        self.calls += 1
        return out


WORDS = ("the a python list tuple loop for while yield lambda function returns value generator "
         "mutable sequence else clause break statement class method object module import file "
         "open read write string number integer float dict set key error exception raise try").split()


def tiny_hf_tokenizer():
    """A real (fast) Hugging Face tokenizer over a small word vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>"] + WORDS + list("?.,:"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")


def word_docs(n_docs: int = 12, words_per_doc: int = 400, seed: int = 0):
    """Random word documents: (doc_id, title, text)."""
    import random

    rng = random.Random(seed)
    return [(f"doc{i}", f"title{i}", " ".join(rng.choice(WORDS) for _ in range(words_per_doc)))
            for i in range(n_docs)]


def train_tiny(model, tok, setup, tmp_path, layout="append", markers=True, steps=3, **extra):
    """A few LoRA steps on tiny examples: ``(examples, adapter folder tmp_path / "adapter")``."""
    from flashback_ext.pipeline.examples import build_examples
    from flashback_ext.pipeline.train import TrainSettings, train_adapter

    docs, retriever = setup
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=16, progress=False)
    settings = TrainSettings(precision="fp32", layout=layout, markers=markers, steps=steps, batch_size=4,
                             **{"lr": 1e-2, "save_steps": 100, "logging_steps": 1, **extra})
    return exs, train_adapter(model, tok, exs, tmp_path / "adapter", settings=settings)
