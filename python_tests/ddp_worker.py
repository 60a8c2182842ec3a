"""One training run on the tiny model, launched by test_training's multi-process test either as a
plain process or under ``torch.distributed.run`` (gloo on CPU): the test compares the adapters.

Usage: python ddp_worker.py OUT_DIR PER_DEVICE_BATCH STEPS [TIED]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from flashback_ext.engine.models import tiny_llama  # noqa: E402
from flashback_ext.engine.retrieval import BM25Retriever, Corpus  # noqa: E402
from flashback_ext.pipeline.examples import build_examples  # noqa: E402
from flashback_ext.pipeline.train import TrainSettings, train_adapter  # noqa: E402

from toys import tiny_hf_tokenizer, word_docs  # noqa: E402


def main(out: str, batch: int, steps: int, tied: bool) -> None:
    tok = tiny_hf_tokenizer()
    docs = word_docs()
    retriever = BM25Retriever(Corpus.from_documents(docs, tok, max_tokens=24, progress=False))
    exs = build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                         budget=64, max_examples=32, progress=False)
    model = tiny_llama(vocab_size=len(tok), layers=2, hidden=32, heads=4, kv_heads=2,
                       tie_embeddings=tied)
    # no dropout: the processes would draw different masks than the single process does
    settings = TrainSettings(precision="fp32", steps=steps, batch_size=batch, lr=1e-2, marker_lr=3e-2,
                             lora_dropout=0.0, warmup_ratio=0.0, save_steps=100, logging_steps=1)
    folder = train_adapter(model, tok, exs, out, settings=settings)
    print(json.dumps({"saved": str(folder)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == "tied")
