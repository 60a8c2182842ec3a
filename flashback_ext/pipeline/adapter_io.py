"""A FlashBack adapter folder: saved, found, checked and loaded.

A folder holds peft's LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``; the
two marker rows of the embedding as trainable-token deltas), the tokenizer with the markers (or
none: then the base model's tokenizer plus the markers, as for the shipped adapter), and
``flashback_run.json``: the training settings (layout, markers, echo, passage positions, passage
length), the base model's signature and the run's numbers. Training, distillation, evaluation
and the CLI read adapters only through this module.
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Optional

from ..marking import add_marking_tokens

__all__ = ["AdapterError", "RUN_FILE", "base_signature", "run_info", "adapter_layout",
           "check_adapter_layout", "load_adapter", "quiet_peft"]

RUN_FILE = "flashback_run.json"


class AdapterError(ValueError):
    """A missing adapter, or one trained for another base model."""


def base_signature(model) -> dict:
    cfg = model.config
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "name_or_path": str(getattr(cfg, "_name_or_path", ""))}


@contextlib.contextmanager
def quiet_peft():
    """Two warnings peft raises on every load that tell users nothing they can act on: that
    ``ensure_weight_tying`` found no tied module among the LoRA targets (it does tie the marker
    rows it trains: test_warm_start_with_tied_embeddings_trains_one_shared_marker_row), and
    transformers' deprecation of ``is_gradient_checkpointing``, which peft still calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*requested `ensure_weight_tying`, but no tied modules are added")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")
        yield


def run_info(folder) -> dict:
    """The adapter folder's ``flashback_run.json`` (settings, base model, example spec, curve),
    checked for the fields loading relies on."""
    folder = Path(folder).expanduser()
    run_file = folder / RUN_FILE
    if not run_file.exists() or not (folder / "adapter_config.json").exists():
        raise AdapterError(f"no FlashBack adapter at {folder} ({RUN_FILE} or adapter_config.json "
                           f"missing)")
    try:
        info = json.loads(run_file.read_text())
        info["settings"]["layout"], info["settings"]["markers"], info["base"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AdapterError(f"corrupt adapter folder {folder}: {RUN_FILE} unreadable ({exc})") from None
    return info


def adapter_layout(folder) -> dict:
    """The :class:`~flashback_ext.RALMGenerator` keywords an adapter was trained for, to read it
    as it learned: ``passage_tokens`` (the longest training passage; shorter ones are fine, longer
    ones it has not seen; absent where no example spec was recorded), ``echo_tokens`` and
    ``passage_positions``. ``RALMGenerator(model, tok, retriever, **adapter_layout(folder))``."""
    info = run_info(folder)
    layout = {"echo_tokens": int(info["settings"].get("echo_tokens", 0)),
              "passage_positions": info["settings"].get("passage_positions", "after")}
    longest = (info.get("examples_spec") or {}).get("passage_tokens")
    if longest:
        layout["passage_tokens"] = int(longest)
    return layout


def check_adapter_layout(adapter_dir, layout: str, markers: bool, user: str) -> dict:
    """Raise :class:`AdapterError` unless the adapter was trained with ``layout`` and ``markers``
    (``user`` names who needs them in the message); returns its run info."""
    info = run_info(adapter_dir)
    trained = (info["settings"]["layout"], bool(info["settings"]["markers"]))
    if trained != (layout, markers):
        raise AdapterError(f"adapter {adapter_dir} was trained with layout {trained[0]!r}, "
                           f"markers {trained[1]}; {user} needs {layout!r}, markers {markers}")
    return info


def load_adapter(model, adapter_dir, tokenizer=None, merge: bool = False, trainable: bool = False):
    """Load a FlashBack adapter onto ``model``; returns ``(peft_model, tokenizer)``.

    The adapter folder's tokenizer (which has the markers) replaces ``tokenizer``; a folder
    without one (the shipped adapter: its tokenizer is the base model's plus the markers) takes
    a copy of ``tokenizer``, or else the base model folder's, with the markers added, and the
    markers must land on the embedding rows the adapter trained. The model's embeddings grow
    to match. ``merge=True`` folds the LoRA weights and marker rows into the
    base weights (a plain model again: faster inference, no peft wrapper); ``trainable=True``
    returns it in train mode with the LoRA weights and marker rows trainable. Raises
    :class:`AdapterError` for a missing folder or an adapter trained on a different base model.
    """
    from peft import PeftModel

    if merge and trainable:
        raise ValueError("merge=True folds the adapter away; it cannot also stay trainable")
    folder = Path(adapter_dir).expanduser()
    info = run_info(folder)
    mine = base_signature(model)
    theirs = info.get("base", {})
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if theirs.get(key) != mine[key]:
            raise AdapterError(f"adapter {folder} was trained for another model: {key} "
                               f"{theirs.get(key)} != {mine[key]}")
    markers = bool(info["settings"].get("markers"))
    tokenizer = _adapter_tokenizer(folder, model, tokenizer)
    if markers:
        ids = add_marking_tokens(model, tokenizer)
        trained = _trained_rows(folder)
        if trained is not None and sorted(trained) != sorted(ids):
            raise AdapterError(f"adapter {folder} trained the marker rows {sorted(trained)}, but "
                               f"this tokenizer puts the markers at {sorted(ids)}: it is not the "
                               f"tokenizer the adapter was trained with")
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    if trainable:
        return peft_model.train(), tokenizer
    if merge:
        return peft_model.merge_and_unload().eval(), tokenizer
    return peft_model.eval(), tokenizer


def _adapter_tokenizer(folder: Path, model, tokenizer):
    """The adapter folder's own tokenizer, else a copy of ``tokenizer`` (the caller's is never
    changed), else the base model folder's."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    if tokenizer is not None:
        return copy.deepcopy(tokenizer)
    from ..engine.models import model_folder

    name = str(getattr(model.config, "_name_or_path", "") or "")
    try:
        base = model_folder(name) if name else None
    except FileNotFoundError:
        base = Path(name)
    if base is None or not (base / "tokenizer_config.json").exists():
        raise AdapterError(f"adapter {folder} has no tokenizer of its own and the base model "
                           f"({name!r}) none either: pass the base model's tokenizer")
    return AutoTokenizer.from_pretrained(base)


def _trained_rows(folder: Path) -> Optional[list[int]]:
    """The embedding rows peft trained as marker rows (``trainable_token_indices``), if recorded."""
    try:
        rows = json.loads((folder / "adapter_config.json").read_text()).get("trainable_token_indices")
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(rows, dict):
        rows = rows.get("embed_tokens")
    return [int(i) for i in rows] if isinstance(rows, list) else None
