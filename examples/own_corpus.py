"""Index a folder of your own text files (BM25 or faiss) and generate over it.

    python examples/own_corpus.py --corpus my_notes/ --kind dense --prompt "..."

Without --corpus it writes a small sample folder (a few topics of the Python reference) to a
temporary directory, so it runs offline as is. The index is saved to --index-dir and reloaded.
"""
import argparse
import tempfile
from pathlib import Path

from flashback_ext import RALMGenerator, load_model
from flashback_ext.engine.retrieval import Corpus, build_index, load_index


def sample_folder() -> Path:
    from pydoc_data.topics import topics

    folder = Path(tempfile.mkdtemp(prefix="flashback_corpus_"))
    for name in ("for", "while", "try", "with", "function", "class", "lambda", "yield"):
        (folder / f"{name}.txt").write_text(topics[name])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=None, help="folder of .txt/.md files")
    parser.add_argument("--kind", choices=["bm25", "dense"], default="bm25")
    parser.add_argument("--index-dir", type=Path, default=None)
    parser.add_argument("--prompt", default="The with statement is used to")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load_model("default")
    folder = args.corpus or sample_folder()
    corpus = Corpus.from_path(folder, tokenizer, max_tokens=128)
    print(f"{len(corpus)} passages from {folder}")
    index_dir = args.index_dir or Path(tempfile.mkdtemp(prefix="flashback_index_"))
    build_index(corpus, args.kind).save(index_dir)
    retriever = load_index(index_dir)  # what a later run would do
    print(f"{args.kind} index saved to {index_dir}")

    for hit in retriever.search(args.prompt, k=3):
        print(f"  {hit.score:7.3f} [{hit.passage.title}] {hit.passage.text[:70]!r}")
    engine = RALMGenerator(model, tokenizer, retriever, mode="append")
    result = engine.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"\n{args.prompt}{result.text}")
    print(f"passages used: {[rec.titles for rec in result.retrievals]}")


if __name__ == "__main__":
    main()
