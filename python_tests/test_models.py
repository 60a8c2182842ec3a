"""Default-model conversion details that do not need the 98 MB GGUF: special tokens come from the
file's own metadata, whatever the installed transformers version reads."""
from pathlib import Path

import pytest
import torch

from flashback_ext.engine.models import align_special_tokens, tiny_llama

gguf = pytest.importorskip("gguf")


def write_gguf(path, **ids):
    writer = gguf.GGUFWriter(str(path), "llama")
    for role, token_id in ids.items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_special_tokens_follow_the_gguf(tmp_path):
    from toys import tiny_hf_tokenizer

    tokenizer = tiny_hf_tokenizer()  # <unk> 0, <pad> 1, </s> 2
    model = tiny_llama(vocab_size=len(tokenizer))
    # what transformers 5.17 read from SmolLM2's file: eos = bos, and no pad token
    tokenizer.eos_token, tokenizer.pad_token = tokenizer.convert_ids_to_tokens(1), None
    tokenizer.bos_token = "<unk>"
    model.config.eos_token_id = model.generation_config.eos_token_id = 1
    found = align_special_tokens(tokenizer, model, write_gguf(tmp_path / "m.gguf", bos=1, eos=2, pad=2))
    assert found == {"bos": 1, "eos": 2, "pad": 2}
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<pad>", "</s>", "</s>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_missing_or_out_of_range_ids_are_left_alone(tmp_path):
    from toys import tiny_hf_tokenizer

    tokenizer = tiny_hf_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    before = (tokenizer.eos_token, tokenizer.pad_token, model.config.eos_token_id)
    found = align_special_tokens(tokenizer, model,
                                 write_gguf(tmp_path / "m.gguf", eos=len(tokenizer) + 5))
    assert found == {}
    assert (tokenizer.eos_token, tokenizer.pad_token, model.config.eos_token_id) == before


def test_default_conversion_applies_the_gguf_tokens_and_upgrades_old_caches(tmp_path, monkeypatch):
    """`default_model_path` on a stand-in GGUF (tiny model, the 5.17 misreading of eos): the
    saved folder has the file's eos/pad, a stamp, is reused, and an unstamped (older) cached
    folder is converted again."""
    import json

    import transformers

    from flashback_ext.engine import models

    from toys import tiny_hf_tokenizer

    gguf_dir = tmp_path / "pkg"
    gguf_dir.mkdir()
    write_gguf(gguf_dir / models._GGUF_NAME, bos=1, eos=2, pad=2)
    monkeypatch.setattr(models, "_gguf_folder", lambda: gguf_dir)
    monkeypatch.setenv("FLASHBACK_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_tokenizer(folder, gguf_file=None, **kw):
        tokenizer = tiny_hf_tokenizer()
        tokenizer.eos_token, tokenizer.pad_token = "<pad>", None  # what 5.17 reads
        return tokenizer

    def fake_model(folder, gguf_file=None, **kw):
        conversions.append(gguf_file)
        return tiny_llama(vocab_size=len(tiny_hf_tokenizer()))

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    path = models.default_model_path()
    saved = json.loads((path / "tokenizer_config.json").read_text())
    assert (saved["eos_token"], saved["pad_token"]) == ("</s>", "</s>")
    assert json.loads((path / "config.json").read_text())["eos_token_id"] == 2
    assert json.loads((path / models._STAMP).read_text())["version"] == models._CONVERSION_VERSION
    assert models.default_model_path() == path and len(conversions) == 1  # reused
    (path / models._STAMP).unlink()  # a folder converted before the stamp existed
    (path / "marker.txt").write_text("old")
    assert models.default_model_path() == path and len(conversions) == 2
    assert not (path / "marker.txt").exists() and (path / models._STAMP).exists()
    assert not path.with_name(path.name + ".old").exists()


def test_dtype_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from flashback_ext.engine import models

    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "cpu_has_bf16", lambda native=native: native)
        assert models.resolve_dtype("auto", "cpu") == want
        assert models.default_dtype("cpu") == torch.float32  # the library default stays fp32
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be auto"):
        models.resolve_dtype("int8", "cpu")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    monkeypatch.undo()
    assert models.cpu_has_bf16() == (" amx_bf16" in flags or " avx512_bf16" in flags)
