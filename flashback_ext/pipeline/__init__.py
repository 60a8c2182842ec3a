"""The paper's training and evaluation pipeline: examples (:mod:`.examples`), batches and losses
(:mod:`.batches`), example specs and export (:mod:`.experiment`), adapter folders
(:mod:`.adapter_io`), LoRA training (:mod:`.train`), layout distillation (:mod:`.distill`) and
the perplexity table (:mod:`.evaluate`). Built on the engine, the layouts and the markers."""
