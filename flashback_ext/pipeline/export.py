"""A FlashBack adapter exported as one merged, self-contained checkpoint for serving engines.

The folder is a plain Hugging Face causal-LM checkpoint: the LoRA weights and the two marker rows
folded into the base weights (the embedding and the head hold the marker rows), the tokenizer
with ``<MARK_L>``/``<MARK_R>`` as special tokens, the config and generation config, and
``flashback.json``: the settings a retrieval driver needs to lay the prompts out as the adapter
was trained (stride, query and passage lengths, layout, marker ids, echo). Plain
``AutoModelForCausalLM.from_pretrained`` loads it, and so does vLLM, which cannot load the
unmerged adapter (it refuses peft's trainable-token deltas).

Only layouts a serving engine reproduces from token ids alone are exported: passage positions
"before" need custom rotary positions, which an engine that numbers positions by slot (vLLM,
SGLang) cannot give.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..layout import MARK_L, MARK_R
from ..marking import marker_ids
from .adapter_io import AdapterError, load_adapter, run_info

__all__ = ["SETTINGS_FILE", "export_merged", "read_export"]

SETTINGS_FILE = "flashback.json"
EXPORT_FORMAT = 1


def export_merged(model, tokenizer, adapter_dir, out_dir, *, dtype: Optional[torch.dtype] = None,
                  overwrite: bool = False) -> Path:
    """Merge the adapter at ``adapter_dir`` into ``model`` (the base model it was trained on) and
    save the result with its tokenizer and ``flashback.json`` to ``out_dir``; returns the folder.

    ``dtype`` casts the saved weights (default: the model's). Refuses, before anything is
    written: a folder that is not a FlashBack adapter, one trained for another model, passage
    positions "before", and a non-empty ``out_dir`` unless ``overwrite``, which replaces an
    earlier export only (a folder with ``flashback.json``; any other files are not ours to
    delete). The checkpoint is written beside ``out_dir`` and moved into place when complete:
    a failed export leaves the earlier one as it was, and a replaced one keeps no stale files."""
    from .. import __version__

    info = run_info(adapter_dir)
    settings = info["settings"]
    positions = settings.get("passage_positions", "after")
    if positions != "after":
        raise AdapterError(f"adapter {adapter_dir} was trained with passage positions "
                           f"{positions!r}: custom rotary positions that a serving engine, which "
                           f"numbers positions by cache slot, cannot reproduce; only the paper's "
                           f"contiguous positions export")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite or not out.is_dir():
            raise FileExistsError(f"{out} exists and is not an empty folder (overwrite=True, or "
                                  f"--force, replaces an earlier export)")
        if not (out / SETTINGS_FILE).is_file():
            raise FileExistsError(f"{out} holds files that are not a FlashBack export: overwrite "
                                  f"(--force) replaces only an earlier export; choose another "
                                  f"folder")
    merged, tok = load_adapter(model, adapter_dir, tokenizer, merge=True)
    if dtype is not None:
        merged = merged.to(dtype)
    spec = info.get("examples_spec") or {}
    markers = marker_ids(tok) if settings.get("markers") else None
    flashback = {
        "format": EXPORT_FORMAT,
        "flashback_ext_version": __version__,
        "layout": settings["layout"],
        "markers": [MARK_L, MARK_R] if markers else None,
        "marker_ids": list(markers) if markers else None,
        "echo_tokens": int(settings.get("echo_tokens", 0)),
        "passage_positions": positions,
        "stride": spec.get("stride"),
        "query_tokens": spec.get("query_tokens"),
        "passage_tokens": spec.get("passage_tokens"),
        "base_model": info["base"].get("name_or_path"),
        "adapter": str(Path(adapter_dir).expanduser().resolve()),
        "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        merged.config.vocab_size = merged.get_input_embeddings().weight.shape[0]
        merged.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / SETTINGS_FILE).write_text(json.dumps(flashback, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)  # empty, or an earlier export (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_export(folder) -> dict:
    """The ``flashback.json`` of an exported checkpoint (raises :class:`AdapterError` for a
    folder that is not one, e.g. an unmerged adapter)."""
    folder = Path(folder).expanduser()
    path = folder / SETTINGS_FILE
    if not path.is_file() or not (folder / "config.json").is_file():
        hint = (" (this is an unmerged adapter: export it with `flashback export`)"
                if (folder / "adapter_config.json").is_file() else "")
        raise AdapterError(f"{folder} is not a FlashBack export ({SETTINGS_FILE} or config.json "
                           f"missing){hint}")
    try:
        settings = json.loads(path.read_text())
        settings["layout"], settings["marker_ids"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AdapterError(f"corrupt {path}: {exc}") from None
    return settings
