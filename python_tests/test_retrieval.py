"""Retrieval: planted passages are found, save/load round-trips, exclusion, bad corpora/indexes."""
import json

import pytest

from flashback_ext.engine.retrieval import (
    BM25Retriever,
    Corpus,
    DenseRetriever,
    RetrievalError,
    build_index,
    load_index,
)

from toys import ByteTokenizer

FILLER = [f"document number {i} talks about weather, cooking, gardens and trains" for i in range(30)]
PLANTED = "the zorblax protocol synchronises quantum marmalade across seven moons"


@pytest.fixture(scope="module")
def corpus():
    docs = [(f"d{i}", f"title {i}", t) for i, t in enumerate(FILLER)]
    docs.insert(17, ("planted", "Zorblax", PLANTED))
    return Corpus.from_documents(docs, ByteTokenizer(), max_tokens=96, progress=False)


def test_chunking_respects_token_budget():
    tok = ByteTokenizer()
    c = Corpus.from_documents([("a", "A", "x" * 1000)], tok, max_tokens=128, progress=False)
    assert [len(p.token_ids) for p in c.passages] == [128] * 7 + [1000 - 7 * 128]
    assert all(p.doc_id == "a" and p.title == "A" for p in c.passages)


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_planted_passage_is_found(corpus, kind):
    retriever = build_index(corpus, kind)
    hits = retriever.search("how does zorblax synchronise marmalade", k=3)
    assert hits[0].passage.doc_id == "planted"
    assert hits[0].score >= hits[1].score >= hits[2].score
    batch = retriever.search_batch(["zorblax marmalade moons", "cooking gardens"], k=2)
    assert batch[0][0].passage.doc_id == "planted" and len(batch[1]) == 2


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_save_load_round_trip(corpus, kind, tmp_path):
    retriever = build_index(corpus, kind)
    retriever.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert type(loaded) is type(retriever) and len(loaded.corpus) == len(corpus)
    q = "quantum marmalade zorblax"
    assert [h.passage.id for h in loaded.search(q, 4)] == [h.passage.id for h in retriever.search(q, 4)]
    assert loaded.corpus.passages[5].token_ids == corpus.passages[5].token_ids


def test_exclusion_by_document_and_title(corpus):
    retriever = BM25Retriever(corpus)
    q = "zorblax protocol marmalade"
    assert all(h.passage.doc_id != "planted" for h in retriever.search(q, 5, exclude_doc_ids=["planted"]))
    assert all(h.passage.title != "Zorblax" for h in retriever.search(q, 5, exclude_titles=["Zorblax"]))
    # excluding nearly everything still returns what is left
    others = [p.doc_id for p in corpus.passages if p.doc_id != "d3"]
    hits = retriever.search(q, 3, exclude_doc_ids=others)
    assert [h.passage.doc_id for h in hits] == ["d3"]


def test_corpus_from_paths(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first document text")
    (tmp_path / "docs" / "b.md").write_text("second document")
    c = Corpus.from_path(tmp_path / "docs", tok)
    assert sorted(p.title for p in c.passages) == ["a", "b"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"id": "x", "title": "T", "text": "hello"}) + "\n")
    assert Corpus.from_path(jl, tok).passages[0].title == "T"


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no .txt or .md files"),
    (lambda p: (p.mkdir(), (p / "e.txt").write_text("")), "no passages"),
])
def test_bad_corpus(tmp_path, setup, match):
    target = tmp_path / "corpus"
    setup(target)
    with pytest.raises(RetrievalError, match=match):
        Corpus.from_path(target, ByteTokenizer())


def test_bad_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(RetrievalError, match="needs a 'text' field"):
        Corpus.from_path(bad, ByteTokenizer())
    bad.write_text("not json\n")
    with pytest.raises(RetrievalError, match="not JSON"):
        Corpus.from_path(bad, ByteTokenizer())


def test_corrupt_index_folders(corpus, tmp_path):
    with pytest.raises(RetrievalError, match="meta.json missing"):
        load_index(tmp_path / "nothing")
    good = BM25Retriever(corpus).save(tmp_path / "idx")
    (good / "meta.json").write_text("{broken")
    with pytest.raises(RetrievalError, match="meta.json is not JSON"):
        load_index(good)
    (good / "meta.json").write_text(json.dumps({"kind": "bm25"}))
    (good / "passages.jsonl").write_text("garbage\n")
    with pytest.raises(RetrievalError, match="passages.jsonl unreadable"):
        load_index(good)
    dense = DenseRetriever(corpus).save(tmp_path / "dense")
    (dense / "dense.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(RetrievalError, match="corrupt index folder"):
        load_index(dense)


def test_bad_search_arguments(corpus):
    with pytest.raises(ValueError, match="k must be >= 1"):
        BM25Retriever(corpus).search("x", k=0)
    with pytest.raises(ValueError, match="unknown retriever kind"):
        build_index(corpus, "tfidf")


def test_bm25_index_building_is_quiet_under_an_application_logger(corpus):
    # an application's root handler at the default WARNING level (as `flashback` sets up) must not
    # print bm25s's DEBUG notes: bm25s pins its own logger to DEBUG on import
    import logging

    seen = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = seen.append
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        BM25Retriever(corpus).search_batch(["python list"], k=1)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert not [r.getMessage() for r in seen if r.name.startswith("bm25s")]
