"""Quickstart: the embedded model with its shipped FlashBack adapter, the embedded corpus,
append-mode generation.

    python examples/quickstart.py [--max-new-tokens 48] [--no-adapter]
"""
import argparse

from flashback_ext import RALMGenerator, load_model
from flashback_ext.engine.models import default_adapter_path
from flashback_ext.engine.retrieval import BM25Retriever, Corpus
from flashback_ext.pipeline.adapter_io import adapter_layout, load_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-adapter", action="store_true",
                        help="the base model alone (the paper's 'A.' row: it reads appended "
                             "passages poorly)")
    args = parser.parse_args()

    model, tokenizer = load_model("default")              # SmolLM2-135M-Instruct, offline
    layout = {"passage_tokens": 128}
    if not args.no_adapter:
        adapter = default_adapter_path()                    # LoRA + the two marker rows
        model, tokenizer = load_adapter(model, adapter, merge=True)
        # read passages as the adapter learned to: up to its longest training passage, with
        # its context echo and passage positions (its layout, not tuning knobs)
        layout = adapter_layout(adapter)
    corpus = Corpus.default(tokenizer, layout["passage_tokens"])  # CPython's language reference
    retriever = BM25Retriever(corpus)
    engine = RALMGenerator(model, tokenizer, retriever, mode="append", stride=16,
                           **layout)                        # patches the model's attention

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does the global statement do in Python?"}],
        tokenize=False, add_generation_prompt=True)
    result = engine.generate(prompt, max_new_tokens=args.max_new_tokens)

    print(result.text.strip())
    print("\nretrieval log:")
    for rec in result.retrievals:
        print(f"  after {rec.generated:3d} tokens: {rec.titles} scores={[round(s, 2) for s in rec.scores]}"
              f"  query=...{rec.query[-50:]!r}")
    t = result.timing
    print(f"\n{t.total_s:.2f} s total: {t.retrievals} retrieval blocks at {t.ms_per_block:.0f} ms, "
          f"decode {t.ms_per_token:.0f} ms/step, search {1e3 * t.retrieval_s:.1f} ms")


if __name__ == "__main__":
    main()
