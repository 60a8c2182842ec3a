"""FlashBack on serving engines: an exported checkpoint (:mod:`flashback_ext.pipeline.export`)
driven by the RALM loop against vLLM in this process or any OpenAI-compatible completions
server (:mod:`.vllm_driver`, :mod:`.transports`), so the engine's automatic prefix caching does
the append layout's KV reuse. Built on the engine's retrieval and results and the pipeline's
export; the ``vllm`` package is imported only by the in-process transport."""
