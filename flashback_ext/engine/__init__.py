"""The inference engine: the Hugging Face patch and its cache adaptor (:mod:`.hf`), CUDA-graph
decode (:mod:`.cuda_graph`), the RALM generation loop (:mod:`.generator`, with its per-sequence
state, block builders and sampler), retrieval (:mod:`.retrieval`) and model loading
(:mod:`.models`). Built on :mod:`flashback_ext.ops` and :mod:`flashback_ext.layout`; nothing
here imports the training pipeline."""
