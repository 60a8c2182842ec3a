"""Layout distillation: the teacher's top-k targets, the soft loss, and training with them."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from flashback_ext.engine.models import tiny_llama
from flashback_ext.engine.retrieval import BM25Retriever, Corpus
from flashback_ext.layout import layout_positions, layout_tokens
from flashback_ext.marking import add_marking_tokens, marker_ids
from flashback_ext.pipeline.adapter_io import AdapterError, load_adapter
from flashback_ext.pipeline.batches import Collator, target_nll
from flashback_ext.pipeline.distill import (
    TEACHER_FILE,
    DistillCollator,
    load_teacher_targets,
    soft_target_nll,
    teacher_targets,
)
from flashback_ext.pipeline.examples import build_examples
from flashback_ext.pipeline.train import TrainSettings, train_adapter

from toys import tiny_hf_tokenizer, word_docs


@pytest.fixture()
def tok():
    return tiny_hf_tokenizer()


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return tiny_llama(vocab_size=len(tok), layers=2, hidden=32, heads=4, kv_heads=2)


@pytest.fixture()
def examples(tok):
    docs = word_docs()
    retriever = BM25Retriever(Corpus.from_documents(docs, tok, max_tokens=24, progress=False))
    return build_examples(docs, tok, retriever, stride=8, query_tokens=6, passage_tokens=16,
                          budget=64, max_examples=12, progress=False)


@pytest.fixture()
def teacher_dir(tok, examples, tmp_path):
    """A prepend adapter trained a few steps at a high rate, so it differs from the base."""
    settings = TrainSettings(precision="fp32", layout="prepend", markers=False, steps=3, batch_size=4, lr=3e-2,
                             save_steps=100, warmup_ratio=0.0)
    return train_adapter(_model(tok, seed=1), tiny_hf_tokenizer(), examples,
                         tmp_path / "teacher", settings=settings)


def _one_by_one_logp(model, ex, layout, markers, exclude=(), positions="after"):
    """Next-token log-probs at each target place, one unpadded example at a time."""
    ids, start = layout_tokens(ex, layout, markers)
    pos = layout_positions(ex, layout, markers, passage_positions=positions)
    logits = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]),
                   attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0].float()
    logits[:, list(exclude)] = float("-inf")
    return torch.log_softmax(logits[start - 1:len(ids) - 1], -1)


def test_soft_loss_with_a_one_hot_teacher_is_the_target_nll(tok, examples):
    model = _model(tok)
    add_marking_tokens(model, tok)
    markers = marker_ids(tok)
    batch = Collator("append", markers, tok.pad_token_id or 0)(examples[:5])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = len(examples[0].tgt)
    # the teacher puts all its mass on the true token (slot 0); the other 3 slots have none
    ids = torch.randint(0, markers[0], (5, t, 4))
    ids[:, :, 0] = torch.stack([torch.tensor(ex.tgt) for ex in examples[:5]])
    logp = torch.full((5, t, 4), float("-inf"))
    logp[:, :, 0] = 0.0
    mask = torch.ones(5, t, dtype=torch.bool)
    soft, n = soft_target_nll(logits, batch["labels"], ids, logp, mask, markers)
    hard, m = target_nll(logits, batch["labels"], markers)
    assert n == m == 5 * t
    assert float(soft) == pytest.approx(float(hard), rel=1e-5)


def test_soft_loss_by_hand():
    # one row, 2 target tokens, vocab 4, marker id 3 excluded; teacher k = 2
    logits = torch.tensor([[[0.0, 0.0, 0.0, 9.0], [1.0, 2.0, 0.5, 9.0], [0.3, -1.0, 2.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    ids = torch.tensor([[[1, 2], [2, 0]]])
    q = torch.tensor([[[0.75, 0.25], [0.6, 0.4]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    got, n = soft_target_nll(logits, labels, ids, q.log(), mask, exclude_ids=[3])
    p0 = torch.log_softmax(torch.tensor([0.0, 0.0, 0.0]), 0)
    p1 = torch.log_softmax(torch.tensor([1.0, 2.0, 0.5]), 0)
    want = -(0.75 * p0[1] + 0.25 * p0[2]) - (0.6 * p1[2] + 0.4 * p1[0])
    assert n == 2 and float(got) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="teacher rows"):
        soft_target_nll(logits, labels, ids[:, :1], q[:, :1].log(), mask[:, :1], [3])


@pytest.mark.parametrize("top_k", [1, 7, 10_000])
def test_teacher_targets_are_the_teachers_own_top_k(tok, examples, teacher_dir, top_k):
    teacher, teacher_tok = load_adapter(_model(tok), teacher_dir)
    got = teacher_targets(teacher, teacher_tok, examples, "prepend", None, top_k=top_k,
                          batch_size=5, progress=False)  # 5: batches of mixed lengths
    k = min(top_k, len(teacher_tok))
    assert len(got.ids) == len(examples) and got.key["top_k"] == top_k
    for ex, ids, logp in zip(examples, got.ids, got.logp):
        full = _one_by_one_logp(teacher, ex, "prepend", None)
        want, want_ids = full.topk(k, dim=-1)
        assert ids.shape == (len(ex.tgt), k)
        torch.testing.assert_close(logp, want - torch.logsumexp(want, -1, keepdim=True),
                                   atol=1e-5, rtol=1e-5)
        # the same tokens (ties aside: compare the log-probs they are given)
        torch.testing.assert_close(full.gather(1, ids), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(len(ex.tgt)))


def test_teacher_with_markers_never_proposes_a_marker_and_keeps_its_positions(tok, examples,
                                                                            tmp_path):
    # a teacher trained with the passage "before" is scored at those positions
    settings = TrainSettings(precision="fp32", layout="append", markers=True, steps=1, batch_size=4, lr=1e-2,
                             save_steps=100, passage_positions="before")
    folder = train_adapter(_model(tok), tiny_hf_tokenizer(), examples, tmp_path / "t",
                           settings=settings)
    student_tok = tiny_hf_tokenizer()
    got = load_teacher_targets(_model(tok), examples, folder, 10_000, student_tok, progress=False)
    markers = marker_ids(AutoTokenizer.from_pretrained(folder))
    assert all(not torch.isin(ids, torch.tensor(markers)).any() for ids in got.ids)
    assert got.ids[0].shape[1] == len(student_tok)  # every token but the two markers
    assert got.key["passage_positions"] == "before"
    teacher, _ = load_adapter(_model(tok), folder)
    for ex, ids, logp in zip(examples[:3], got.ids, got.logp):
        full = _one_by_one_logp(teacher, ex, "append", markers, exclude=markers,
                                positions="before")
        torch.testing.assert_close(full.gather(1, ids), logp, atol=1e-5, rtol=1e-5)


def test_distill_collator_pads_teacher_rows_in_target_order(tok, examples, teacher_dir):
    targets = load_teacher_targets(_model(tok), examples, teacher_dir, 3, tiny_hf_tokenizer(),
                                   progress=False)
    shorter = examples[1].__class__(**{**examples[1].__dict__, "tgt": examples[1].tgt[:5]})
    targets.ids[1], targets.logp[1] = targets.ids[1][:5], targets.logp[1][:5]
    collate = DistillCollator(Collator("append", None, 0), targets)
    batch = collate([(examples[0], 0), (shorter, 1)])
    assert batch["teacher_mask"].sum(1).tolist() == [len(examples[0].tgt), 5]
    assert torch.equal(batch["teacher_ids"][1, :5], targets.ids[1])
    assert torch.isinf(batch["teacher_logp"][1, 5:]).all()
    assert int((batch["labels"] != -100).sum()) == int(batch["teacher_mask"].sum())


@pytest.mark.parametrize("top_k", [10_000, 3])
def test_training_loss_mixes_target_nll_and_teacher_cross_entropy(tok, examples, teacher_dir,
                                                                  tmp_path, top_k):
    # lr 0, no dropout: the one logged loss is the mix computed by hand, one example at a time
    # (top_k 3: the teacher's 3 most likely tokens, renormalised)
    exs, w = examples[:4], 0.3
    teacher, _ = load_adapter(_model(tok), teacher_dir)
    student = _model(tok)
    student_tok = tiny_hf_tokenizer()
    add_marking_tokens(student, student_tok)
    markers = marker_ids(student_tok)
    with torch.no_grad():
        total, count = 0.0, 0
        for ex in exs:
            t = _one_by_one_logp(teacher, ex, "prepend", None)
            p = _one_by_one_logp(student, ex, "append", markers, exclude=markers)
            top, idx = t.topk(min(top_k, t.shape[1]), dim=-1)
            q = torch.softmax(top, -1)  # renormalised over the kept tokens
            hard = -p.gather(1, torch.tensor(ex.tgt)[:, None]).sum()
            soft = -(q * p.gather(1, idx)).sum()
            total += float((1 - w) * hard + w * soft)
            count += len(ex.tgt)
    settings = TrainSettings(precision="fp32", steps=1, batch_size=4, lr=0.0, lora_dropout=0.0, warmup_ratio=0.0,
                             save_steps=100, distill_from=str(teacher_dir), distill_weight=w,
                             distill_top_k=top_k)
    folder = train_adapter(student, student_tok, exs, tmp_path / "student", settings=settings)
    info = json.loads((folder / "flashback_run.json").read_text())
    assert info["train_loss"] == pytest.approx(total / count, rel=1e-4)
    assert info["settings"]["distill_from"] == str(teacher_dir)
    assert (folder / "checkpoints" / TEACHER_FILE).exists()


def test_teacher_cache_is_reused_only_for_the_same_teacher_examples_and_k(tok, examples,
                                                                         teacher_dir, tmp_path,
                                                                         monkeypatch):
    import flashback_ext.pipeline.distill as distill

    cache = tmp_path / "cache" / TEACHER_FILE
    calls = []
    real = distill.teacher_targets
    monkeypatch.setattr(distill, "teacher_targets",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_teacher_targets(_model(tok), examples, teacher_dir, 5, tok, cache, False)
    again = load_teacher_targets(_model(tok), examples, teacher_dir, 5, tok, cache, False)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first.logp, again.logp))
    load_teacher_targets(_model(tok), examples, teacher_dir, 6, tok, cache, False)
    load_teacher_targets(_model(tok), examples[:-1], teacher_dir, 6, tok, cache, False)
    assert len(calls) == 3
    cache.write_bytes(b"truncated")
    load_teacher_targets(_model(tok), examples[:-1], teacher_dir, 6, tok, cache, False)
    assert len(calls) == 4


def test_distillation_bad_inputs(tok, examples, teacher_dir, tmp_path):
    def run(**extra):
        settings = TrainSettings(precision="fp32", steps=1, batch_size=4, save_steps=100, **extra)
        return train_adapter(_model(tok), tiny_hf_tokenizer(), examples, tmp_path / "s",
                             settings=settings)

    with pytest.raises(ValueError, match="needs a teacher"):
        run(distill_weight=0.5)
    for w in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            run(distill_from=str(teacher_dir), distill_weight=w)
    with pytest.raises(ValueError, match="top_k"):
        run(distill_from=str(teacher_dir), distill_weight=0.5, distill_top_k=0)
    with pytest.raises(AdapterError, match="no FlashBack adapter"):
        run(distill_from=str(tmp_path / "missing"), distill_weight=0.5)
    other = tiny_llama(vocab_size=len(tok), layers=3, hidden=32, heads=4, kv_heads=2)
    with pytest.raises(AdapterError, match="another model"):
        load_teacher_targets(other, examples, teacher_dir, 4, tok, progress=False)
    longer = tiny_hf_tokenizer()
    longer.add_tokens(["zzextra"])
    with pytest.raises(AdapterError, match="another vocabulary"):
        load_teacher_targets(_model(tok), examples, teacher_dir, 4, longer, progress=False)
    assert not (tmp_path / "s" / "flashback_run.json").exists()
