"""Run by test_vllm.py with the vLLM environment's python: the driver on vLLM's in-process
``LLM`` for one export, written as JSON (token ids, cached tokens per cycle, finish reasons).

    vllm_inprocess_run.py EXPORT_DIR REQUEST_JSON OUT_JSON

REQUEST_JSON: {"prompts": [...], "passages": [...] (ListRetriever texts), "modes": [...],
"max_new_tokens": N}.
"""
import json
import sys

if __name__ == "__main__":  # vLLM starts its engine in a spawned process: keep this guarded
    from transformers import AutoTokenizer

    from flashback_ext.serving.transports import InProcessTransport
    from flashback_ext.serving.vllm_driver import VLLMGenerator

    from toys import ListRetriever

    folder, request, out_path = sys.argv[1:4]
    req = json.load(open(request))
    tok = AutoTokenizer.from_pretrained(folder)
    transport = InProcessTransport(folder, block_size=32)
    out = {}
    for mode in req["modes"]:
        gen = VLLMGenerator.from_export(folder, ListRetriever(req["passages"], tok),
                                        transport=transport, mode=mode)
        results = gen.generate(req["prompts"], max_new_tokens=req["max_new_tokens"],
                               stop_on_eos=False)
        out[mode] = [{"token_ids": r.token_ids, "finish_reason": r.finish_reason,
                      "cached": [rec.cached_tokens for rec in r.retrievals]} for r in results]
    json.dump(out, open(out_path, "w"))
