"""flashback export: the merged checkpoint equals base model + adapter, loads with plain
transformers, carries its FlashBack settings, and bad exports are refused with nothing written."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flashback_ext.cli import main
from flashback_ext.engine.models import tiny_llama
from flashback_ext.marking import marker_ids
from flashback_ext.pipeline.adapter_io import AdapterError, load_adapter
from flashback_ext.pipeline.batches import Collator
from flashback_ext.pipeline.export import export_merged, read_export

from toys import tiny_hf_tokenizer, train_tiny


def _fresh():
    return tiny_llama(vocab_size=len(tiny_hf_tokenizer()), layers=2, hidden=32, heads=4,
                      kv_heads=2)


@pytest.mark.parametrize("echo", [0, 2])
def test_export_equals_base_plus_adapter(model, tok, setup, tmp_path, echo):
    exs, folder = train_tiny(model, tok, setup, tmp_path, echo_tokens=echo)
    out = export_merged(_fresh(), tiny_hf_tokenizer(), folder, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exported_tok = AutoTokenizer.from_pretrained(out)
    unmerged, adapter_tok = load_adapter(_fresh(), folder)
    ids = marker_ids(adapter_tok)
    assert marker_ids(exported_tok) == ids
    # the markers are special tokens: one id each, never split, skipped when decoding text
    assert all(exported_tok.added_tokens_decoder[i].special for i in ids)
    assert exported_tok.encode("<MARK_L>", add_special_tokens=False) == [ids[0]]
    batch = Collator("append", ids, 0, echo=echo)(exs[:4])
    with torch.no_grad():
        want = unmerged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    settings = read_export(out)
    assert settings["marker_ids"] == list(ids) and settings["echo_tokens"] == echo
    assert (settings["layout"], settings["passage_positions"]) == ("append", "after")
    assert (settings["stride"], settings["passage_tokens"]) == (None, None)  # no spec recorded
    assert exported.config.vocab_size == exported.get_input_embeddings().weight.shape[0]


def test_export_refusals_write_nothing(model, tok, setup, tmp_path):
    _, before = train_tiny(model, tok, setup, tmp_path, passage_positions="before")
    with pytest.raises(AdapterError, match="cannot reproduce"):
        export_merged(_fresh(), tiny_hf_tokenizer(), before, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(AdapterError, match="no FlashBack adapter"):
        export_merged(_fresh(), tiny_hf_tokenizer(), tmp_path / "missing", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(AdapterError, match="unmerged adapter: export it"):
        read_export(before)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _, plain = train_tiny(_fresh(), tiny_hf_tokenizer(), setup, tmp_path / "plain")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_merged(_fresh(), tiny_hf_tokenizer(), plain, busy)
    # overwrite replaces only an earlier export, never someone's other files
    with pytest.raises(FileExistsError, match="not a FlashBack export"):
        export_merged(_fresh(), tiny_hf_tokenizer(), plain, busy, overwrite=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_export_overwrite_replaces_the_earlier_export_whole(model, tok, setup, tmp_path,
                                                            monkeypatch):
    _, plain = train_tiny(_fresh(), tiny_hf_tokenizer(), setup, tmp_path / "plain")
    out = export_merged(_fresh(), tiny_hf_tokenizer(), plain, tmp_path / "export")
    first = read_export(out)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older export")
    export_merged(_fresh(), tiny_hf_tokenizer(), plain, out, overwrite=True, dtype=torch.bfloat16)
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert read_export(out)["dtype"] == "bfloat16" and first["dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert not list(tmp_path.glob(".export.partial-*"))
    # an export that fails while writing (here: the disk, at the tokenizer) leaves the earlier
    # one whole and no staging folder behind
    from transformers import PreTrainedTokenizerBase

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_merged(_fresh(), tiny_hf_tokenizer(), plain, out, overwrite=True)
    assert read_export(out)["dtype"] == "bfloat16" and not list(tmp_path.glob(".export.partial-*"))


@pytest.mark.slow
def test_cli_export_of_the_shipped_adapter_scores_like_the_engine(tmp_path, capsys):
    from flashback_ext import RALMGenerator, load_model
    from flashback_ext.engine.models import default_adapter_path

    out = tmp_path / "merged"
    assert main(["export", "--out", str(out)]) == 0
    settings = json.loads((out / "flashback.json").read_text())
    assert settings["passage_tokens"] == 64 and settings["stride"] == 16
    assert settings["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert main(["export", "--out", str(out)]) == 2  # not empty now
    assert "not an empty folder" in capsys.readouterr().err
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base, tokenizer = load_model("default", device="cpu")
    tuned, tuned_tok = load_adapter(base, default_adapter_path("export"), tokenizer)  # unmerged
    engine = RALMGenerator(tuned, tuned_tok, None, mode="none", stride=16)
    src = tuned_tok.encode("The try statement specifies exception handlers and cleanup code "
                           "for a group of statements, and the with statement")
    passage = tuned_tok.encode(" The raise statement raises an exception.",
                               add_special_tokens=False)
    tgt = tuned_tok.encode(" allows the execution of initialization", add_special_tokens=False)
    want = torch.tensor(engine.score(src, passage, tgt))  # cache reuse, the append block
    seq = src + [settings["marker_ids"][0], *passage, settings["marker_ids"][1]] + tgt
    with torch.no_grad():
        logits = exported(input_ids=torch.tensor([seq])).logits[0].float()
    start = len(seq) - len(tgt)
    got = torch.log_softmax(logits[start - 1:-1], -1)[torch.arange(len(tgt)), torch.tensor(tgt)]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
