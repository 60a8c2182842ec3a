"""Patch any local Hugging Face Llama-family checkpoint and compare append with prepend.

    python examples/patch_any_llama.py --model /path/to/llama [--context 512]

Default: the embedded SmolLM2-135M. It checks that the patched cached forward reproduces the
unpatched model's logits, then times FlashBack (append) against In-Context RALM (prepend) on the
same prompt, retriever and settings.
"""
import argparse

import torch

from flashback_ext import FlashBackCache, RALMGenerator, load_model, patch_model, unpatch_model
from flashback_ext.engine.hf import cache_kwarg_name
from flashback_ext.engine.retrieval import BM25Retriever, Corpus


@torch.no_grad()
def check_exact(model, tokenizer) -> float:
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x * 2  # a tiny function")])
    ids = ids.to(next(model.parameters()).device)
    unpatch_model(model)
    want = model(ids).logits.float()
    patch_model(model)
    cache = FlashBackCache.for_model(model, 1, ids.shape[1] + 8)
    kw = cache_kwarg_name(model)
    half = ids.shape[1] // 2
    parts = [model(ids[:, a:b], position_ids=cache.position_ids(b - a),
                   attention_mask=cache.dummy_mask(), **{kw: cache}).logits
             for a, b in ((0, half), (half, ids.shape[1]))]
    return (torch.cat(parts, 1).float() - want).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--context", type=int, default=512, help="prompt tokens")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, "
          f"max |patched - original| logits = {check_exact(model, tokenizer):.2e}")
    from pydoc_data.topics import topics

    retriever = BM25Retriever(Corpus.default(tokenizer))
    prompt = tokenizer.decode(tokenizer.encode(topics["class"])[: args.context])
    times = {}
    for mode in ("append", "prepend"):
        engine = RALMGenerator(model, tokenizer, retriever, mode=mode)
        r = engine.generate(prompt, max_new_tokens=args.max_new_tokens, stop_on_eos=False)
        times[mode] = r.timing
        print(f"{mode:>8}: {r.timing.total_s:.2f} s, {r.timing.ms_per_block:.0f} ms per retrieval "
              f"block | {r.text.strip()[:80]!r}")
    print(f"append speed-up: {times['prepend'].total_s / times['append'].total_s:.2f}x end to end, "
          f"{times['prepend'].ms_per_block / times['append'].ms_per_block:.1f}x per retrieval block")


if __name__ == "__main__":
    main()
