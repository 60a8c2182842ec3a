"""The research scripts (research/): learning-curve table, LM-head order benchmark, echo and
passage-leak diagnostics, each on tiny inputs (the numbers they produced are in
docs/RESULTS.md and research/HISTORY.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESEARCH = ROOT / "research"


def test_curves_table_and_ratio(tmp_path):
    # one curve in a finished run's file, one as a device log's curve file; step 6 only in one
    run = tmp_path / "append_markers"
    run.mkdir()
    (run / "flashback_run.json").write_text(json.dumps({"held_out_curve": [
        {"step": 2, "perplexity": 22.0}, {"step": 4, "perplexity": 11.0}]}))
    log = tmp_path / "held_out_curve_prepend.json"
    log.write_text(json.dumps([{"step": 2, "perplexity": 20.0}, {"step": 4, "perplexity": 10.0},
                               {"step": 6, "perplexity": 9.0}]))
    out = tmp_path / "curves.json"
    cmd = [sys.executable, str(RESEARCH / "curves.py"), f"append_markers={run}",
           f"prepend={log}", "--ratio", "append_markers/prepend", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "| step | append_markers | prepend | append_markers / prepend |"
    assert lines[2:] == ["| 2 | 22.000 | 20.000 | 1.100 |", "| 4 | 11.000 | 10.000 | 1.100 |",
                         "| 6 | — | 9.000 | — |"]
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["ratio"] == pytest.approx(1.1) and rows[2]["ratio"] is None
    for bad, says in ((["x"], "expected NAME=PATH"), ([f"a={tmp_path / 'none'}"], "does not exist"),
                      ([f"a={log}", "--ratio", "a/b"], "--ratio needs two of a"),
                      ([f"step={log}"], "is taken"), ([f"a={run / 'flashback_run.json'}"], "unreadable")):
        res = subprocess.run([sys.executable, str(RESEARCH / "curves.py"), *bad],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and says in res.stderr


def test_lm_head_cpu_bench_compares_both_orders(tmp_path):
    out = tmp_path / "head.json"
    res = subprocess.run([sys.executable, str(RESEARCH / "lm_head_cpu.py"), "--vocab", "512",
                          "--hidden", "32", "--rows", "1,3", "--reps", "3", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["shape"] == [512, 32] and [r["rows"] for r in data["rows"]] == [1, 3]
    for row in data["rows"]:
        assert row["linear_ms"] > 0 and row["weight_major_ms"] > 0 and row["max_abs_diff"] < 1e-4


@pytest.fixture
def tiny_exported(tmp_path, monkeypatch):
    """A tiny random Llama (saved), its tokenizer and held-out examples exported from a small
    word corpus: ``(model, tokenizer, model_dir, examples_dir)``."""
    from flashback_ext.cli import main
    from flashback_ext.engine.models import tiny_llama

    from toys import tiny_hf_tokenizer, word_docs

    monkeypatch.setenv("FLASHBACK_CACHE", str(tmp_path / "cache"))
    tok = tiny_hf_tokenizer()
    model_dir = tmp_path / "model"
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    docs = tmp_path / "docs"
    docs.mkdir()
    for doc_id, _, text in word_docs(n_docs=6, words_per_doc=200):
        (docs / f"{doc_id}.txt").write_text(text)
    examples = tmp_path / "examples"
    assert main(["examples", "--model", str(model_dir), "--corpus", str(docs), "--budget", "64",
                 "--passage-tokens", "16", "--stride", "8", "--query-tokens", "6",
                 "--max-eval-examples", "6", "--eval-fraction", "0.34", "--out", str(examples)]) == 0
    return model.eval(), tok, model_dir, examples


def test_echo_diagnostic_scores_like_the_evaluator(tmp_path, tiny_exported):
    """research/echo_diagnostic.py on a tiny model: echo 0 is the library's A. row, an echo
    changes it."""
    from flashback_ext.pipeline.evaluate import perplexity
    from flashback_ext.pipeline.experiment import load_exported_examples

    model, tok, model_dir, examples = tiny_exported
    out = tmp_path / "diag.json"
    res = subprocess.run([sys.executable, str(RESEARCH / "echo_diagnostic.py"), "--model",
                          str(model_dir), "--examples", str(examples), "--echo", "0,3",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["echo"]) for r in rows] == [("base", 0), ("base", 3)]
    _, _, evals = load_exported_examples(examples, tok)
    want = perplexity(model, tok, evals, "append", False, progress=False)["ppl"]
    assert rows[0]["ppl"] == pytest.approx(want, rel=1e-5)
    assert abs(rows[1]["ppl"] - want) > 1e-3 * want


def test_passage_leak_diagnostic_swaps_only_the_passage(tmp_path, tiny_exported, monkeypatch):
    """research/passage_leak_diagnostic.py on a tiny model: it re-finds every exported passage
    (same corpus and retriever), its unfiltered passages mostly come from the target's own
    document, the rows equal the evaluator's on each set of examples, and a wrong adapter is
    refused."""
    import dataclasses

    monkeypatch.syspath_prepend(str(RESEARCH))
    from flashback_ext.pipeline.evaluate import perplexity
    from flashback_ext.pipeline.experiment import load_exported_examples

    import passage_leak_diagnostic as diag

    model, tok, model_dir, examples = tiny_exported
    out = tmp_path / "leak.json"
    script = str(RESEARCH / "passage_leak_diagnostic.py")
    res = subprocess.run([sys.executable, script, "--model", str(model_dir), "--examples",
                          str(examples), "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    spec, _, evals = load_exported_examples(examples, tok)
    stats = data["passages"]
    assert stats["examples"] == len(evals) == 6
    assert stats["clean_passages_reproduced"] == len(evals)
    # the query's own window matches all its words: the unfiltered top hit is from its document
    assert stats["unfiltered_same_document"] >= 0.5
    unfiltered, again = diag.swap_passages(evals, spec, tok, progress=False)
    assert again == stats
    for old, new in zip(evals, unfiltered):  # only the passage changes
        assert (new.src, new.tgt, new.doc_id) == (old.src, old.tgt, old.doc_id)
        assert len(new.e) <= spec.passage_tokens
    assert any(new.e != old.e for old, new in zip(evals, unfiltered))
    for name, exs in (("clean", evals), ("unfiltered", unfiltered)):
        for row, layout in (("N.", "none"), ("P.", "prepend"), ("A.", "append")):
            want = perplexity(model, tok, exs, layout, False, progress=False)["ppl"]
            assert data["rows"][name][row]["ppl"] == pytest.approx(want, rel=1e-5)
    # an adapter folder of the wrong kind for its row is refused before any scoring
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "adapter_config.json").write_text("{}")
    (fake / "flashback_run.json").write_text(json.dumps(
        {"settings": {"layout": "append", "markers": True}, "base": "x"}))
    res = subprocess.run([sys.executable, script, "--model", str(model_dir), "--examples",
                          str(examples), "--prepend", str(fake), "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "not a P.+LoRA adapter" in res.stderr
    # examples this corpus and retriever did not build are refused
    moved = [dataclasses.replace(evals[0], passage_id=evals[0].passage_id + 1)] + evals[1:]
    with pytest.raises(SystemExit, match=f"only {len(evals) - 1} of {len(evals)} leak-controlled"):
        diag.swap_passages(moved, spec, tok, progress=False)
    # contexts shorter than the query cannot have been built by the recipe
    with pytest.raises(SystemExit, match="shorter than the query"):
        diag.swap_passages([dataclasses.replace(evals[0], src=evals[0].src[:2])], spec, tok,
                           progress=False)


def _eval_row(name, nll_sums, counts, positions="after", echo=0):
    import math as _m
    return {"name": name, "passage_positions": positions, "echo_tokens": echo,
            "nll_sum_by_example": nll_sums, "tokens_by_example": counts,
            "ppl": _m.exp(sum(nll_sums) / sum(counts))}


def test_goal_table_pairs_rows_across_runs(tmp_path):
    import math

    counts = [4, 4, 4]
    n, p, pl = [8.0, 8.4, 7.6], [7.6, 8.0, 7.2], [6.0, 6.4, 5.6]
    before, paper = [6.1, 6.5, 5.7], [9.0, 9.5, 8.5]
    sweep = {"runs": [{"passage_tokens": 64, "rows": [
        _eval_row("N.", n, counts), _eval_row("P.", p, counts), _eval_row("P.+LoRA", pl, counts),
        _eval_row("A.+LoRA+M.T.", before, counts, "before")]}]}
    single = {"passage_tokens": 64, "rows": [_eval_row("P.+LoRA", pl, counts),
                                             _eval_row("A.+LoRA+M.T.", paper, counts)]}
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "goal.json"
    a.write_text(json.dumps(sweep))
    b.write_text(json.dumps(single))
    script = str(RESEARCH / "goal_table.py")
    res = subprocess.run([sys.executable, script, f"in={a}", f"in={b}", "--json", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    # "before": exp((22.3 - 18.0) / 12) against P.+LoRA, below N. -> met; the paper row is above
    assert rows["before"]["ratios"]["P.+LoRA"]["ratio"] == pytest.approx(math.exp(0.3 / 12))
    assert rows["before"]["met"] is True and rows["paper"]["met"] is False
    assert rows["paper"]["ratios"]["N."]["ratio"] == pytest.approx(math.exp(3.0 / 12))
    assert "| in | 64 | before |" in res.stdout and "| missed |" in res.stdout
    # the same base row scored differently in two runs: not comparable
    single["rows"][0] = _eval_row("P.+LoRA", [6.0, 6.4, 5.9], counts)
    b.write_text(json.dumps(single))
    res = subprocess.run([sys.executable, script, f"in={a}", f"in={b}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "not the same examples" in res.stderr
    # an echo adapter is its own layout; two adapters of one layout cannot be told apart
    single["rows"] = [_eval_row("A.+LoRA+M.T.", before, counts, "before", echo=1)]
    b.write_text(json.dumps(single))
    res = subprocess.run([sys.executable, script, f"in={a}", f"in={b}", "--json", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert {r["layout"] for r in json.loads(out.read_text())["rows"]} == {"before", "before + echo 1"}
    single["rows"] = [_eval_row("A.+LoRA+M.T.", paper, counts, "before")]
    b.write_text(json.dumps(single))
    res = subprocess.run([sys.executable, script, f"in={a}", f"in={b}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "a second 'before'" in res.stderr
    for bad, says in (([f"x={a}"], "expected in=JSON"), ([f"in={tmp_path / 'no.json'}"], "unreadable")):
        res = subprocess.run([sys.executable, script, *bad], capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and says in res.stderr
