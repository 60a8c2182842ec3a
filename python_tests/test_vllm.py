"""The vLLM backend against a real vLLM: a `vllm serve` of the exported shipped adapter on
localhost (started and killed here) and vLLM's in-process LLM (in the vLLM environment's own
python). Greedy fp32 tokens must equal our HF engine's on the same export, cycle after cycle;
the append layout must hit the prefix cache and prepend must not; bad input must fail clearly
and leave the server healthy.

Needs the vLLM environment (`make vllm-env`); skipped without it unless FLASHBACK_REQUIRE_VLLM=1
(`make test` sets it, so CI never skips these silently)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashback_ext.engine.retrieval import Hit
from flashback_ext.serving.launch import VLLMServer, free_port, vllm_python

from toys import ListRetriever

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
BLOCK = 32  # the servers' prefix-cache block (tokens)

if vllm_python() is None:
    if os.environ.get("FLASHBACK_REQUIRE_VLLM") == "1":
        raise RuntimeError("FLASHBACK_REQUIRE_VLLM=1 but there is no vLLM environment "
                           "(make vllm-env)")
    pytest.skip("no vLLM environment (make vllm-env)", allow_module_level=True)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """The shipped adapter merged into the embedded model, fp32."""
    from flashback_ext.engine.models import default_adapter_path, load_model
    from flashback_ext.pipeline.export import export_merged

    model, tok = load_model("default", device="cpu", dtype=torch.float32)
    return export_merged(model, tok, default_adapter_path("export"), tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def tok(export_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export_dir)


@pytest.fixture(scope="module")
def hf_model(export_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    with VLLMServer(export_dir, block_size=BLOCK, log_path=log, startup_timeout=400) as s:
        yield s
    assert not s.healthy(), "the server outlived its fixture"


@pytest.fixture(scope="module")
def passages(tok):
    from flashback_ext.engine.retrieval import Corpus

    return [p.text for p in Corpus.default(tok, 64).passages[100:106]]


@pytest.fixture(scope="module")
def prompts(tok):
    from pydoc_data.topics import topics

    long = tok.decode(tok.encode(topics["compound"])[:300])
    return ["What does the yield statement do in a Python function?", long]


def _hf_tokens(hf_model, tok, passages, prompts, mode, max_new=48):
    from flashback_ext.engine.generator import RALMGenerator

    gen = RALMGenerator(hf_model, tok, ListRetriever(passages, tok), mode=mode, stride=16,
                        query_tokens=32, passage_tokens=64)
    return [r.token_ids for r in gen.generate(prompts, max_new_tokens=max_new, stop_on_eos=False)]


def _driver(export_dir, server, tok, passages, mode):
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    return VLLMGenerator.from_export(export_dir, ListRetriever(passages, tok), server=server.url,
                                     mode=mode)


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_server_tokens_equal_hf_engine(export_dir, server, tok, hf_model, passages, prompts, mode):
    results = _driver(export_dir, server, tok, passages, mode).generate(
        prompts, max_new_tokens=48, stop_on_eos=False)
    expected = _hf_tokens(hf_model, tok, passages, prompts, mode)
    for r, want in zip(results, expected):
        assert len(r.token_ids) == 48 and r.token_ids == want
        assert len(r.retrievals) == 3 and r.finish_reason == "length"
        assert r.text == tok.decode(want, skip_special_tokens=True)


class EachHitNew(ListRetriever):
    """Every hit another passage (none twice across cycles or the batch)."""

    def search_batch(self, queries, k=1, exclude_doc_ids=None, exclude_titles=None):
        out = []
        for _ in queries:
            out.append([Hit(self.corpus.passages[self.calls % len(self.corpus)], 1.0)])
            self.calls += 1
        return out


def test_prefix_cache_reuses_the_append_context_and_never_prepend(export_dir, server, tok, prompts):
    """On prompts and passages the server has not seen (its cache outlives a request), each
    append cycle reuses the previous cycle's context, whole blocks of it; prepend nothing."""
    from flashback_ext.engine.retrieval import Corpus
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    passages = Corpus.default(tok, 64).passages
    for mode, tag, first in (("append", "A", 200), ("prepend", "P", 300)):
        fresh = EachHitNew([p.text for p in passages[first:first + 6]], tok)
        unseen = [f"[cache test {tag}{i}] {p}" for i, p in enumerate(prompts)]
        lengths = [len(tok.encode(p)) for p in unseen]
        results = VLLMGenerator.from_export(export_dir, fresh, server=server.url, mode=mode
                                            ).generate(unseen, max_new_tokens=48, stop_on_eos=False)
        for r, n in zip(results, lengths):
            cached = [rec.cached_tokens for rec in r.retrievals]
            if mode == "append":
                # cycle c shares the previous cycle's context: n + 16 (c - 1) tokens
                assert cached == [0] + [(n + 16 * (c - 1)) // BLOCK * BLOCK for c in (1, 2)]
            else:  # every cycle another passage first (the rotating retriever)
                assert cached == [0, 0, 0]
        if mode == "append":
            assert results[1].retrievals[1].cached_tokens >= 256  # the 300-token prompt
        assert results[0].timing.cached_reported


def test_stop_tokens_end_sequences_as_in_the_hf_engine(export_dir, server, tok, hf_model, passages,
                                                      prompts):
    """A token the model generates in its second cycle made the EOS: both engines stop right
    after it (finish reason "eos"); the other sequence runs to the end; tokens agree."""
    from flashback_ext.engine.generator import RALMGenerator

    full = _hf_tokens(hf_model, tok, passages, prompts, "append")
    stop = full[0][20]
    ends = [t.index(stop) + 1 if stop in t else len(t) for t in full]
    assert ends[0] < 48, "the premise: the first sequence stops early"
    hf = RALMGenerator(hf_model, tok, ListRetriever(passages, tok), mode="append", stride=16,
                       query_tokens=32, passage_tokens=64)
    hf.eos_ids = {stop}
    want = hf.generate(prompts, max_new_tokens=48)
    gen = _driver(export_dir, server, tok, passages, "append")
    gen.eos_ids = {stop}
    got = gen.generate(prompts, max_new_tokens=48)
    for g, w, end in zip(got, want, ends):
        assert g.token_ids == w.token_ids == full[got.index(g)][:end]
        assert g.finish_reason == w.finish_reason == ("eos" if end < 48 else "length")


def test_markers_never_sampled(export_dir, server, tok, hf_model):
    """A prompt of `` x<MARK_L><MARK_R>`` repeats: the model's top two next tokens are the
    markers; the ban holds on both engines and the tokens still agree."""
    from flashback_ext.engine.generator import RALMGenerator
    from flashback_ext.layout import MARK_L, MARK_R
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    ml, mr = tok.convert_tokens_to_ids(MARK_L), tok.convert_tokens_to_ids(MARK_R)
    prompt = (tok.encode(" x") + [ml, mr]) * 20
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0, -1]
    assert logits.topk(2).indices.tolist() == [ml, mr], "the premise: the model wants a marker"
    gen = VLLMGenerator.from_export(export_dir, None, server=server.url, mode="none")
    got = gen.generate_ids([prompt], max_new_tokens=8, stop_on_eos=False)[0].token_ids
    want = RALMGenerator(hf_model, tok, None, mode="none").generate_ids(
        [prompt], max_new_tokens=8, stop_on_eos=False)[0].token_ids
    assert got == want and ml not in got and mr not in got


def test_in_process_llm_tokens_equal_hf_engine(export_dir, tok, hf_model, passages, prompts,
                                               tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"prompts": prompts, "passages": passages,
                                   "modes": ["append", "prepend"], "max_new_tokens": 48}))
    out = tmp_path / "out.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([str(vllm_python()), str(HERE / "vllm_inprocess_run.py"),
                           str(export_dir), str(request), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = json.loads(out.read_text())
    lengths = [len(tok.encode(p)) for p in prompts]
    for mode in ("append", "prepend"):
        for r, want in zip(got[mode], _hf_tokens(hf_model, tok, passages, prompts, mode)):
            assert r["token_ids"] == want
    for r, n in zip(got["append"], lengths):
        assert r["cached"][1:] == [(n + 16 * (c - 1)) // BLOCK * BLOCK for c in (1, 2)]
    # (prepend's reuse is tested on the server, with passages that never repeat)


# ---------------------------------------------------------------------------------- bad input
def test_unreachable_server_is_a_clear_error():
    from flashback_ext.serving.transports import EngineError, ServerTransport

    with pytest.raises(EngineError, match="unreachable"):
        ServerTransport(f"http://127.0.0.1:{free_port()}", timeout=5)


def test_server_errors_are_clear_and_leave_it_healthy(export_dir, server, tok, passages, prompts):
    from flashback_ext.serving.transports import EngineError, Sampling, ServerTransport

    transport = ServerTransport(server.url)
    with pytest.raises(EngineError, match="HTTP 400"):
        transport.complete([[10 ** 9]], Sampling(4))  # a token id beyond the vocabulary
    with pytest.raises(EngineError, match="HTTP 400"):
        transport.complete([tok.encode("x") * 5000], Sampling(4))  # longer than max_model_len
    with pytest.raises(EngineError, match="not 'no-such-model'"):
        ServerTransport(server.url, model="no-such-model")
    assert server.healthy()
    r = _driver(export_dir, server, tok, passages, "append").generate(prompts[0], max_new_tokens=4)
    assert len(r.token_ids) == 4


def test_another_models_tokenizer_is_refused(export_dir, server, tok):
    """A driver whose tokenizer numbers the markers differently: not the served model."""
    from transformers import AutoTokenizer

    from flashback_ext.layout import MARK_L, MARK_R
    from flashback_ext.serving.transports import EngineError, ServerTransport
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    other = AutoTokenizer.from_pretrained(export_dir)
    swapped = {MARK_L: tok.convert_tokens_to_ids(MARK_R), MARK_R: tok.convert_tokens_to_ids(MARK_L)}
    other.get_vocab = lambda: {**tok.get_vocab(), **swapped}  # markers at each other's ids
    with pytest.raises(EngineError, match="serves another model"):
        VLLMGenerator(ServerTransport(server.url), other, None, mode="none")


def test_export_checks(export_dir, tmp_path):
    """A non-exported adapter and an export whose markers disagree with its flashback.json."""
    import shutil

    from flashback_ext.engine.models import default_adapter_path
    from flashback_ext.pipeline.adapter_io import AdapterError
    from flashback_ext.serving.transports import EngineError
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    with pytest.raises(AdapterError, match="unmerged adapter"):
        VLLMGenerator.from_export(default_adapter_path("export"), None, server="http://127.0.0.1:9")
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    settings = json.loads((bad / "flashback.json").read_text())
    settings["marker_ids"] = [1, 2]
    (bad / "flashback.json").write_text(json.dumps(settings))
    with pytest.raises(EngineError, match="marker ids differ"):
        VLLMGenerator.from_export(bad, None, server="http://127.0.0.1:9")


def test_empty_retrieval_is_a_clear_error(export_dir, server, tok, prompts):
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    class Nothing:
        def search_batch(self, queries, k=1, exclude_doc_ids=None):
            return [[] for _ in queries]

    gen = VLLMGenerator.from_export(export_dir, Nothing(), server=server.url)
    with pytest.raises(ValueError, match="no passage for prompt 0"):
        gen.generate(prompts[:1], max_new_tokens=4)
    assert server.healthy()


def test_in_process_transport_without_vllm_says_what_to_do(export_dir):
    from flashback_ext.serving.transports import EngineError, InProcessTransport

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable in this python (the test is for one without it)")
    with pytest.raises(EngineError, match="make vllm-env"):
        InProcessTransport(export_dir)


# ---------------------------------------------------------------------------------------- CLI
def test_cli_generate_on_the_server(export_dir, server, tok, capsys):
    from flashback_ext.cli import main

    prompt = "What does the yield statement do in a Python function?"
    assert main(["generate", "--backend", "vllm", "--server", server.url, "--export",
                 str(export_dir), "--prompt", prompt, "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt) and len(out) > len(prompt) + 10
    assert err.count("[retrieval after") == 2 and "prefix cache served" in err
    assert "[append, vllm]" in err


@pytest.mark.parametrize("flags, message", [
    (["--server", "http://127.0.0.1:9"], "need --backend vllm"),
    (["--backend", "vllm", "--compile"], "options of --backend hf"),
    (["--backend", "vllm", "--server", "http://127.0.0.1:9"], "unreachable"),
    (["--backend", "vllm", "--export", "/nonexistent/export"], "not a FlashBack export"),
])
def test_cli_backend_errors_are_one_line(export_dir, flags, message, capsys):
    from flashback_ext.cli import main

    if "--export" not in flags:
        flags = flags + ["--export", str(export_dir)]
    assert main(["generate", "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bench_times_vllm_beside_the_engine(tmp_path):
    """bench/ralm_e2e.py --vllm: the server's modes in the same JSON as the engine's, the
    append cycles served the context by the prefix cache, prepend's never."""
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(HERE.parent / "bench" / "ralm_e2e.py"),
                           "--contexts", "96", "--cycles", "1", "--passage", "32",
                           "--modes", "engine-append", "--vllm", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert row["engine-append"] > 0 and row["vllm-append"] > 0 and row["vllm-prepend"] > 0
    assert row["detail"]["vllm-append"]["cached_tokens"] == [0, 96]
    assert row["detail"]["vllm-prepend"]["cached_tokens"] == [0, 0]
    assert re.fullmatch(r"vllm \d+\.\d+\.\d+.*", data["vllm"]["server"])  # the version vLLM reports
