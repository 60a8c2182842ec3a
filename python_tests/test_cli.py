"""CLI smoke tests on a tiny model folder and corpus, and every bad input: one line, exit 2."""
import pytest

from flashback_ext.cli import main
from flashback_ext.engine.models import tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from toys import tiny_hf_tokenizer

    tokenizer = tiny_hf_tokenizer()
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "loops.txt").write_text("the for loop else clause break statement " * 20)
    (folder / "gen.txt").write_text("yield function returns generator value " * 20)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHBACK_CACHE", str(tmp_path / "cache"))


def test_demo_runs_on_tiny_model(tiny_model_dir, corpus_dir, capsys):
    rc = main(["demo", "--model", str(tiny_model_dir), "--corpus", str(corpus_dir), "--device", "cpu",
               "--max-new-tokens", "6", "--stride", "3", "--long-context", "24",
               "--question", "what does yield do ?"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "append is" in out and "per retrieval block" in out and "passages from:" in out
    assert "<= 128 tokens each); append mode: no adapter" in out  # no adapter: the default length


def test_generate_and_index_commands(tiny_model_dir, corpus_dir, tmp_path, capsys):
    for mode in ("append", "prepend", "none"):
        rc = main(["generate", "--model", str(tiny_model_dir), "--corpus", str(corpus_dir),
                   "--device", "cpu", "--mode", mode, "--prompt", "the for loop", "--prompt",
                   "yield", "--max-new-tokens", "5", "--stride", "2"])
        assert rc == 0
    idx = tmp_path / "idx"
    assert main(["index", "build", "--model", str(tiny_model_dir), "--corpus", str(corpus_dir),
                 "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["index", "search", "--index", str(idx), "--k", "1", "generator yield"]) == 0
    assert "[gen]" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "no Hugging Face model folder"),
    (["generate", "--corpus", "/no/such/corpus", "--prompt", "x"], "corpus path /no/such/corpus does not exist"),
    (["generate", "--index", "/no/such/index", "--prompt", "x"], "no index at"),
    (["generate", "--prompt", "x", "--stride", "0"], "--stride must be >= 1"),
    (["generate", "--prompt", "the for loop", "--capacity", "8"], "cache slots, capacity is 8"),
    (["generate"], "give at least one --prompt"),
    (["generate", "--prompt", "x", "--passage-tokens", "3"], "max_tokens must be >= 8"),
    (["train", "--out", "x", "--lora-r", "0"], "--lora-r must be >= 1"),
    (["train", "--out", "x", "--marker-lr", "0"], "--marker-lr must be > 0"),
    (["train", "--out", "x", "--lr=-1e-4"], "--lr must be > 0"),
    (["train", "--out", "x", "--lora-targets", ","], "--lora-targets names no module"),
    (["index", "search", "--index", "/no/such/index", "q"], "no index at"),
    (["train", "--out", "x", "--echo-tokens", "-1"], "echo_tokens must be an int >= 0"),
    (["train", "--out", "x", "--layout", "prepend", "--echo-tokens", "2"], "needs the append layout"),
    (["generate", "--prompt", "x", "--mode", "prepend", "--echo-tokens", "2"],
     "--echo-tokens needs --mode append"),
    (["generate", "--prompt", "x", "--echo-tokens", "-2"], "echo_tokens must be an int >= 0"),
    (["train", "--out", "x", "--distill-weight", "0.5"], "needs a teacher adapter"),
    (["train", "--out", "x", "--distill-from", "/no/such/adapter"], "no FlashBack adapter at"),
    (["train", "--out", "x", "--distill-from", "/no/such/adapter", "--distill-weight", "2"],
     r"in \(0, 1\]"),
    (["train", "--out", "x", "--distill-from", "/no/such", "--distill-top-k", "0"], "top_k must be"),
])
def test_bad_input_one_line_exit_2(argv, match, tiny_model_dir, corpus_dir, capsys):
    if "--model" not in argv and argv[0] == "generate":
        argv += ["--model", str(tiny_model_dir), "--device", "cpu"]
    if "--corpus" not in argv and "--index" not in argv and argv[0] == "generate":
        argv += ["--corpus", str(corpus_dir)]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert any(line.startswith("flashback: error:") and __import__("re").search(match, line)
               for line in err), err


def test_empty_corpus_and_unsupported_architecture(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert main(["generate", "--model", str(tiny_model_dir), "--corpus", str(empty),
                 "--prompt", "x", "--device", "cpu"]) == 2
    assert "flashback: error: the corpus has no passages" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(gpt2)
    assert main(["generate", "--model", str(gpt2), "--prompt", "x", "--mode", "none",
                 "--device", "cpu"]) == 2
    assert "flashback: error: unsupported architecture 'gpt2'" in capsys.readouterr().err


def test_train_and_eval_commands(tiny_model_dir, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    from toys import word_docs

    for doc_id, _, text in word_docs(n_docs=8, words_per_doc=300):
        (docs / f"{doc_id}.txt").write_text(text)
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--corpus", str(docs),
              "--budget", "64", "--passage-tokens", "16", "--stride", "8", "--query-tokens", "6",
              "--max-train-examples", "16", "--max-eval-examples", "8", "--eval-fraction", "0.25"]
    out = tmp_path / "adapter"
    assert main(["train", *common, "--steps", "2", "--batch-size", "4", "--out", str(out),
                 "--eval-every", "1"]) == 0
    assert (out / "flashback_run.json").exists() and (out / "adapter_config.json").exists()
    curve = __import__("json").loads((out / "flashback_run.json").read_text())["held_out_curve"]
    assert [p["step"] for p in curve] == [1, 2] and all(p["tokens"] > 0 for p in curve)
    assert "step 2: held-out perplexity" in capsys.readouterr().out
    # warm start from it; a prepend run cannot start from an append+markers adapter
    warm = tmp_path / "warm"
    assert main(["train", *common, "--steps", "1", "--batch-size", "4", "--out", str(warm),
                 "--init-adapter", str(out)]) == 0
    info = __import__("json").loads((warm / "flashback_run.json").read_text())
    assert info["init_adapter"] == str(out) and info["settings"]["markers"]
    capsys.readouterr()
    assert main(["train", *common, "--steps", "1", "--layout", "prepend", "--no-markers",
                 "--out", str(tmp_path / "p"), "--init-adapter", str(out)]) == 2
    assert "trained with layout 'append', markers True" in capsys.readouterr().err
    table = tmp_path / "table.json"
    capsys.readouterr()
    assert main(["eval", *common, "--adapter", f"append_markers={out}", "--json", str(table)]) == 0
    text = capsys.readouterr().out
    assert "| A.+LoRA+M.T. | append | append_markers | yes |" in text
    rows = __import__("json").loads(table.read_text())["rows"]
    assert [r["name"] for r in rows] == ["N.", "P.", "A.", "A.+LoRA+M.T."]
    capsys.readouterr()
    assert main(["eval", *common, "--adapter", f"append_markers={out}", "--rows", "A.+LoRA+M.T.,N.",
                 "--json", str(table)]) == 0
    rows = __import__("json").loads(table.read_text())["rows"]
    assert [r["name"] for r in rows] == ["N.", "A.+LoRA+M.T."]
    assert main(["eval", *common, "--rows", "Q."]) == 2
    assert "--rows takes names from" in capsys.readouterr().err
    assert main(["eval", *common, "--rows", "P.+LoRA"]) == 2
    assert "need --adapter prepend=DIR" in capsys.readouterr().err
    assert main(["eval", *common, "--adapter", "bogus"]) == 2
    assert main(["eval", *common, "--adapter", f"append={tmp_path / 'none'}"]) == 2
    capsys.readouterr()
    # an append+markers adapter cannot fill the A.+LoRA (no markers) row
    assert main(["eval", *common, "--adapter", f"append={out}"]) == 2
    assert "needs 'append', markers False" in capsys.readouterr().err
    # N.+LoRA (not in the paper): a LoRA trained without passages fills its own row
    plain = tmp_path / "plain"
    assert main(["train", *common, "--steps", "1", "--batch-size", "4", "--layout", "none",
                 "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "--adapter", f"none={plain}", "--rows", "N.,N.+LoRA",
                 "--json", str(table)]) == 0
    assert "| N.+LoRA | none | none | no |" in capsys.readouterr().out
    assert [r["name"] for r in __import__("json").loads(table.read_text())["rows"]] == ["N.", "N.+LoRA"]
    assert main(["eval", *common, "--adapter", f"none={out}", "--rows", "N.+LoRA"]) == 2
    assert "needs 'none', markers False" in capsys.readouterr().err
    # a context echo (not in the paper) is part of the adapter's layout: eval and demo read it
    echoed = tmp_path / "echoed"
    assert main(["train", *common, "--steps", "1", "--batch-size", "4", "--echo-tokens", "2",
                 "--out", str(echoed)]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "--adapter", f"append_markers={echoed}", "--rows", "A.+LoRA+M.T.",
                 "--json", str(table)]) == 0
    assert "| A.+LoRA+M.T. | append | append_markers + echo 2 | yes |" in capsys.readouterr().out
    assert __import__("json").loads(table.read_text())["rows"][0]["echo_tokens"] == 2
    # passages at rotary positions before the context (not in the paper): eval and demo read it
    before = tmp_path / "before"
    assert main(["train", *common, "--steps", "1", "--batch-size", "4", "--passage-positions",
                 "before", "--out", str(before)]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "--adapter", f"append_markers={before}", "--rows", "A.+LoRA+M.T.",
                 "--json", str(table)]) == 0
    assert __import__("json").loads(table.read_text())["rows"][0]["passage_positions"] == "before"
    assert main(["train", *common, "--steps", "1", "--no-markers", "--passage-positions", "before",
                 "--out", str(tmp_path / "bn")]) == 2
    assert "needs the marking tokens" in capsys.readouterr().err
    # layout distillation (not in the paper): an append adapter taught by a prepend one
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert main(["train", *common, "--steps", "1", "--batch-size", "4", "--layout", "prepend",
                 "--no-markers", "--out", str(teacher)]) == 0
    assert main(["train", *common, "--steps", "1", "--batch-size", "4", "--distill-from",
                 str(teacher), "--distill-top-k", "5", "--out", str(student)]) == 0
    info = __import__("json").loads((student / "flashback_run.json").read_text())
    got = info["settings"]
    assert (got["distill_from"], got["distill_weight"], got["distill_top_k"]) == (str(teacher), 0.5, 5)
    assert info["teacher_s"] > 0 and (student / "checkpoints" / "teacher_targets.pt").exists()
    assert main(["train", *common, "--steps", "1", "--layout", "prepend", "--no-markers",
                 "--echo-tokens", "2", "--out", str(tmp_path / "pe")]) == 2
    assert "needs the append layout" in capsys.readouterr().err
    def demo_with(adapter):
        return ["demo", "--model", str(tiny_model_dir), "--corpus", str(docs), "--device", "cpu",
                "--adapter", str(adapter), "--max-new-tokens", "4", "--stride", "2",
                "--long-context", "0", "--question", "what does yield do ?"]

    assert main(demo_with(before)) == 0
    assert ", passages at rotary positions before the context;" in capsys.readouterr().out
    echo_demo = demo_with(echoed)
    assert main(echo_demo) == 0
    assert "FlashBack adapter " + str(echoed) + ", context echo 2;" in capsys.readouterr().out
    assert main([*echo_demo, "--echo-tokens", "0"]) == 0
    got = capsys.readouterr()
    assert ", context echo" not in got.out and "trained with a 2-token context echo" in got.err
    # generation reads passages as long as the adapter was trained on (16 here), unless told
    demo = demo_with(out)
    assert main(demo) == 0
    assert "<= 16 tokens each); append mode: FlashBack adapter" in capsys.readouterr().out
    assert main([*demo, "--passage-tokens", "20"]) == 0
    got = capsys.readouterr()
    assert "<= 20 tokens each)" in got.out
    assert "warning: the adapter was trained on passages of at most 16 tokens; with --passage-tokens 20" in got.err
    # a shorter passage than trained is within what the adapter learned: no warning
    assert main([*demo, "--passage-tokens", "12"]) == 0
    got = capsys.readouterr()
    assert "<= 12 tokens each)" in got.out and "warning" not in got.err


def test_eval_sweeps_passage_lengths_into_one_table(tiny_model_dir, tmp_path, capsys):
    import json

    from toys import word_docs

    docs = tmp_path / "docs"
    docs.mkdir()
    for doc_id, _, text in word_docs(n_docs=8, words_per_doc=300):
        (docs / f"{doc_id}.txt").write_text(text)
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--corpus", str(docs),
              "--budget", "64", "--stride", "8", "--query-tokens", "6",
              "--max-train-examples", "16", "--max-eval-examples", "8", "--eval-fraction", "0.25"]
    out = tmp_path / "adapter"
    assert main(["train", *common, "--passage-tokens", "16", "--train-min-passage-tokens", "4",
                 "--steps", "1", "--batch-size", "4", "--out", str(out)]) == 0
    table = tmp_path / "sweep.json"
    capsys.readouterr()
    assert main(["eval", *common, "--passage-tokens", "9,16", "--rows", "N.,P.,A.+LoRA+M.T.",
                 "--adapter", f"append_markers={out}", "--json", str(table)]) == 0
    text = capsys.readouterr().out
    data = json.loads(table.read_text())
    assert data["passage_tokens"] == [9, 16] and [r["passage_tokens"] for r in data["runs"]] == [9, 16]
    assert data["table"] in text and "| 9 | A.+LoRA+M.T. |" in data["table"]
    for run in data["runs"]:
        rows = {r["name"]: r for r in run["rows"]}
        assert list(rows) == ["N.", "P.", "A.+LoRA+M.T."] and run["spec"]["passage_tokens"] == \
            run["passage_tokens"]
        for ref in ("N.", "P."):  # the ratio is the rows' perplexities', its interval around it
            got = run["ratios"][ref]
            assert got["ratio"] == pytest.approx(rows["A.+LoRA+M.T."]["ppl"] / rows[ref]["ppl"])
            assert got["low"] <= got["ratio"] <= got["high"]
        assert "P.+LoRA" not in run["ratios"]
    # the two lengths score different held-out examples: retrieval cuts passages per length
    assert data["runs"][0]["rows"][1]["ppl"] != data["runs"][1]["rows"][1]["ppl"]
    for bad in ("7,7", "0", "x", ""):
        with pytest.raises(SystemExit):
            main(["eval", *common, "--passage-tokens", bad])
    folder = tmp_path / "ex"
    assert main(["examples", *common, "--passage-tokens", "16", "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--examples", str(folder),
                 "--passage-tokens", "8,16"]) == 2
    assert "a --passage-tokens sweep builds its own examples" in capsys.readouterr().err


@pytest.mark.parametrize("precision,want", [("bf16", True), ("fp32", False)])
def test_train_precision_is_chosen_and_recorded(tiny_model_dir, tmp_path, precision, want):
    import json

    from toys import word_docs

    docs = tmp_path / "docs"
    docs.mkdir()
    for doc_id, _, text in word_docs(n_docs=6, words_per_doc=200):
        (docs / f"{doc_id}.txt").write_text(text)
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(tiny_model_dir), "--device", "cpu", "--corpus", str(docs),
                 "--budget", "64", "--passage-tokens", "16", "--stride", "8", "--query-tokens",
                 "6", "--max-train-examples", "8", "--max-eval-examples", "4", "--steps", "1",
                 "--precision", precision, "--out", str(out)]) == 0
    info = json.loads((out / "flashback_run.json").read_text())
    assert info["bf16"] is want and info["settings"]["precision"] == precision


def test_training_precision_auto_follows_the_hardware():
    from flashback_ext.engine.models import cpu_has_bf16
    from flashback_ext.pipeline.train import training_bf16

    assert training_bf16("auto", cuda=True) is True
    assert training_bf16("auto", cuda=False) is cpu_has_bf16()
    assert training_bf16("fp32", cuda=True) is False and training_bf16("bf16", cuda=False) is True
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        training_bf16("fp16", cuda=False)


def test_exported_examples_train_and_score_without_the_corpus(tiny_model_dir, tmp_path, capsys):
    """`flashback examples --out DIR` then `--examples DIR`: the same examples and the same
    perplexities as building them from the corpus, with the corpus gone."""
    import json
    import shutil

    from toys import word_docs

    docs = tmp_path / "docs"
    docs.mkdir()
    for doc_id, _, text in word_docs(n_docs=8, words_per_doc=300):
        (docs / f"{doc_id}.txt").write_text(text)
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    settings = ["--corpus", str(docs), "--budget", "64", "--passage-tokens", "16", "--stride", "8",
                "--query-tokens", "6", "--max-train-examples", "16", "--max-eval-examples", "8",
                "--eval-fraction", "0.25", "--seed", "3"]
    folder = tmp_path / "examples"
    assert main(["examples", *model, *settings, "--out", str(folder)]) == 0
    meta = json.loads((folder / "spec.json").read_text())
    assert meta["spec"]["seed"] == 3 and meta["spec"]["budget"] == 64
    assert meta["train"] == len(json.loads((folder / "train.json").read_text())) > 0
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["examples", *model, *settings, "--out", str(tmp_path / "afile")]) == 2
    assert "cannot write examples to" in capsys.readouterr().err
    built = tmp_path / "built.json"
    assert main(["eval", *model, *settings, "--rows", "N.,A.", "--json", str(built)]) == 0
    shutil.rmtree(docs)  # the exported folder must be all that is needed
    read = tmp_path / "read.json"
    assert main(["eval", *model, "--examples", str(folder), "--rows", "N.,A.",
                 "--json", str(read)]) == 0
    ppl = [[r["ppl"] for r in json.loads(p.read_text())["rows"]] for p in (built, read)]
    assert ppl[0] == ppl[1]
    out = tmp_path / "adapter"
    assert main(["train", *model, "--examples", str(folder), "--steps", "1", "--batch-size", "4",
                 "--out", str(out)]) == 0
    info = json.loads((out / "flashback_run.json").read_text())
    assert info["examples"] == meta["train"] and info["examples_dir"] == str(folder)
    assert info["examples_spec"]["seed"] == 3
    capsys.readouterr()
    # a setting given beside --examples must agree with the folder's; --seed is the training seed
    assert main(["eval", *model, "--examples", str(folder), "--budget", "64", "--rows", "N."]) == 0
    capsys.readouterr()
    assert main(["eval", *model, "--examples", str(folder), "--budget", "300"]) == 2
    assert "drop --budget 300 (the folder has 64)" in capsys.readouterr().err
    # not an examples folder; a file as --out
    assert main(["eval", *model, "--examples", str(tmp_path / "nothing")]) == 2
    assert "is not an examples folder (missing train.json" in capsys.readouterr().err
    assert main(["examples", *model, "--examples", str(folder), "--out", str(tmp_path / "y")]) == 2
    assert "--examples reads them" in capsys.readouterr().err

    def spec_edit(**changes):
        meta = json.loads((folder / "spec.json").read_text())
        (folder / "spec.json").write_text(json.dumps({**meta, **changes}))
        return meta

    # another tokenizer (same size, other vocabulary), or another size
    meta = spec_edit(tokenizer="0" * 16)
    assert main(["train", *model, "--examples", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "examples were cut with another tokenizer" in capsys.readouterr().err
    spec_edit(tokenizer=meta["tokenizer"], vocab=meta["vocab"] + 1)
    assert main(["eval", *model, "--examples", str(folder)]) == 2
    assert "examples were cut with another tokenizer" in capsys.readouterr().err
    spec_edit(vocab=meta["vocab"], train=meta["train"] + 1)
    assert main(["eval", *model, "--examples", str(folder)]) == 2
    assert "example counts do not match" in capsys.readouterr().err
    spec_edit(train=meta["train"])
    assert main(["eval", *model, "--examples", str(folder), "--rows", "N."]) == 0  # restored
    capsys.readouterr()
    # a token id outside the vocabulary, with the hash updated to match
    import hashlib

    rows = json.loads((folder / "train.json").read_text())
    rows[0]["tgt"][0] = meta["vocab"]
    data = json.dumps(rows).encode()
    (folder / "train.json").write_bytes(data)
    spec_edit(sha1={**meta["sha1"], "train.json": hashlib.sha1(data).hexdigest()})
    assert main(["eval", *model, "--examples", str(folder)]) == 2
    assert "example 0 has no target or a token id outside" in capsys.readouterr().err
    # a train.json from another export (or half written) no longer matches the sealed spec
    spec_edit(sha1=meta["sha1"])
    assert main(["eval", *model, "--examples", str(folder)]) == 2
    assert "train.json do(es) not match spec.json" in capsys.readouterr().err
    (folder / "spec.json").write_text("{")
    assert main(["eval", *model, "--examples", str(folder)]) == 2
    assert "unreadable examples" in capsys.readouterr().err


def test_each_launched_process_loads_onto_its_own_gpu(monkeypatch):
    from flashback_ext.cli.common import process_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_device(None, cuda=True) is None  # one process: the loader's own default
    assert process_device("cuda", cuda=True) == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")  # set by torchrun / accelerate launch
    assert process_device(None, cuda=True) == "cuda:3"
    assert process_device("cuda", cuda=True) == "cuda:3"
    assert process_device("cpu", cuda=True) == "cpu"
    assert process_device("cuda:1", cuda=True) == "cuda:1"  # the user's explicit choice stands
    assert process_device(None, cuda=False) is None


@pytest.mark.parametrize("given,want,warned", [(None, 16, False), (10, 10, False), (4, 4, False),
                                                (3, 3, False), (16, 16, False), (17, 17, True),
                                                (200, 200, True)])
def test_passage_length_up_to_the_adapters_longest_is_fine(tmp_path, capsys, given, want, warned):
    import json
    from types import SimpleNamespace

    from flashback_ext.cli.common import settle_passage_tokens

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "flashback_run.json").write_text(json.dumps({
        "settings": {"layout": "append", "markers": True}, "base": {},
        "examples_spec": {"passage_tokens": 16, "train_min_passage_tokens": 4}}))
    args = SimpleNamespace(passage_tokens=given)
    settle_passage_tokens(args, folder)
    assert args.passage_tokens == want
    err = capsys.readouterr().err
    # any length up to the longest trained one is fine; longer ones are used, with a warning
    assert ("warning: the adapter was trained on passages of at most 16 tokens" in err) \
        if warned else err == ""
    args = SimpleNamespace(passage_tokens=None)
    settle_passage_tokens(args, None)  # no adapter: the engine's default
    assert args.passage_tokens == 128


def test_compile_flag_reaches_the_engine():
    from flashback_ext.cli import build_parser
    from flashback_ext.cli.common import make_generator

    from toys import ByteTokenizer, ListRetriever

    tok = ByteTokenizer()
    model = tiny_llama(vocab_size=260, layers=1)
    for argv, want in ((["generate", "--prompt", "x", "--compile"], True),
                       (["generate", "--prompt", "x"], False)):
        args = build_parser().parse_args(argv)
        args.passage_tokens, args.echo_tokens = 8, 0  # what settle_passage_tokens fills in
        gen = make_generator(args, model, tok, ListRetriever(["a passage"], tok), "append")
        assert gen.compile is want and gen.cuda_graphs is want  # the static step, compiled
    args = build_parser().parse_args(["demo", "--dtype", "bfloat16", "--compile"])
    assert (args.model_dtype, args.compile) == ("bfloat16", True)
