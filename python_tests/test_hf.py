"""The Hugging Face patch: exact, reversible, invisible to every call without a FlashBackCache."""
import pytest
import torch

from flashback_ext.engine import hf
from flashback_ext.engine.hf import (
    FlashBackCache,
    cache_kwarg_name,
    is_patched,
    patch_model,
    unpatch_model,
)
from flashback_ext.engine.models import tiny_llama


def _chunks_forward(model, ids, cache, cuts):
    kw = cache_kwarg_name(model)
    outs, start = [], 0
    for end in cuts + [ids.shape[1]]:
        outs.append(model(ids[:, start:end], position_ids=cache.position_ids(end - start),
                          attention_mask=cache.dummy_mask(), **{kw: cache}).logits)
        start = end
    return torch.cat(outs, 1)


@torch.no_grad()
def test_cached_chunks_equal_full_forward():
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 512, (2, 57))
    full = model(ids).logits
    patch_model(model)
    cache = FlashBackCache.for_model(model, 2, 80)
    got = _chunks_forward(model, ids, cache, [1, 20, 21, 40])
    assert (got - full).abs().max().item() <= 1e-4
    assert cache.lengths() == [57, 57]


@torch.no_grad()
def test_patch_unpatch_round_trip_and_idempotence():
    model = tiny_llama()
    ids = torch.randint(0, 512, (1, 30))
    before = model(ids).logits
    patch_model(model)
    patch_model(model)  # idempotent
    assert is_patched(model)
    assert torch.equal(model(ids).logits, before)  # no FlashBackCache: original code path
    unpatch_model(model)
    assert not is_patched(model)
    assert not any("_flashback_original_forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(ids).logits, before)


@torch.no_grad()
def test_hf_generate_with_dynamic_cache_is_unaffected():
    model = tiny_llama()
    ids = torch.randint(0, 512, (1, 12))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    patch_model(model)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)


def test_training_backward_uses_original_path():
    model = tiny_llama()
    patch_model(model)
    model.train()
    ids = torch.randint(0, 512, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


@torch.no_grad()
def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    wrapped = peft.get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # non-zero adapters, so they must be applied
    ids = torch.randint(0, 512, (1, 25))
    full = wrapped(ids).logits
    patch_model(wrapped)
    cache = FlashBackCache.for_model(wrapped, 1, 40)
    kw = cache_kwarg_name(wrapped)
    got = torch.cat([
        wrapped(input_ids=ids[:, :10], position_ids=cache.position_ids(10),
                attention_mask=cache.dummy_mask(), **{kw: cache}).logits,
        wrapped(input_ids=ids[:, 10:], position_ids=cache.position_ids(15),
                attention_mask=cache.dummy_mask(), **{kw: cache}).logits,
    ], 1)
    assert (got - full).abs().max().item() <= 1e-4


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        patch_model(model)


@torch.no_grad()
def test_cache_on_unpatched_model_is_a_clear_error():
    model = tiny_llama()
    cache = FlashBackCache.for_model(model, 1, 16)
    kw = cache_kwarg_name(model)
    with pytest.raises(RuntimeError, match="call flashback_ext.patch_model"):
        model(torch.randint(0, 512, (1, 4)), **{kw: cache})


@torch.no_grad()
@pytest.mark.parametrize("sink", [0, 3])
def test_evicted_tokens_vanish_for_later_queries_only(sink):
    # overflow="evict" (StreamingLLM's eviction, but kept tokens keep their positions): a query
    # attends to what the cache holds when it is written, while the kept tokens' deeper-layer
    # keys still carry what they saw of evicted ones.
    # Reference: one full forward whose mask hides from each query the tokens evicted by then.
    model = tiny_llama(layers=3)
    n_tokens, capacity, cuts = 70, 30, [20, 27, 28, 45, 46]
    ids = torch.randint(0, 512, (1, n_tokens))
    visible = torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()
    held = gone = start = 0
    for end in cuts + [n_tokens]:
        excess = max(0, held + end - start - capacity)
        gone, held = gone + excess, held + end - start - excess
        visible[start:end, sink:sink + gone] = False
        start = end
    mask = torch.zeros(1, 1, n_tokens, n_tokens).masked_fill(~visible, torch.finfo(torch.float32).min)
    full = model(ids, attention_mask=mask).logits
    patch_model(model)
    cache = FlashBackCache.for_model(model, 1, capacity, sink=sink, overflow="evict")
    got = _chunks_forward(model, ids, cache, cuts)
    assert cache.ring.evicted(0) == gone == n_tokens - capacity
    assert (got - full).abs().max().item() <= 1e-4
    # and the mask mattered: hiding nothing gives other logits
    assert (got - model(ids).logits).abs().max().item() > 1e-3


@torch.no_grad()
def test_positions_default_to_cache_length():
    # without explicit position_ids, Llama derives them from get_seq_length()
    model = patch_model(tiny_llama())
    ids = torch.randint(0, 512, (1, 20))
    full = model(ids).logits
    cache = FlashBackCache.for_model(model, 1, 32)
    kw = cache_kwarg_name(model)
    a = model(ids[:, :12], **{kw: cache}).logits
    b = model(ids[:, 12:], **{kw: cache}).logits
    assert (torch.cat([a, b], 1) - full).abs().max().item() <= 1e-4


def test_supported_attention_names_match_transformers():
    import transformers.models.llama.modeling_llama as llama
    assert "LlamaAttention" in hf.SUPPORTED_ATTENTION and hasattr(llama, "LlamaAttention")


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@torch.no_grad()
def test_other_llama_family_architectures(arch):
    import transformers

    cfg_cls, model_cls = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    config = cfg_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     sliding_window=None)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    ids = torch.randint(0, 300, (2, 33))
    full = model(ids).logits
    patch_model(model)
    cache = FlashBackCache.for_model(model, 2, 40)
    assert (_chunks_forward(model, ids, cache, [13]) - full).abs().max().item() <= 1e-4
