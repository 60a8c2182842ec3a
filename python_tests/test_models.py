"""Default-model conversion details that do not need the 98 MB GGUF: special tokens come from the
file's own metadata, whatever the installed transformers version reads."""
import pytest

from flashback_ext.models import align_special_tokens, tiny_llama

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
