"""LoRA training for FlashBack: peft LoRA on q/k/v/o plus ONLY the two marker rows of the input
embedding (``trainable_token_indices``), loss on the target tokens with marker logits excluded,
HF ``Trainer`` (checkpoints, resume, bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16,
fp32 LoRA and marker rows kept; multi-GPU under
``accelerate launch`` / ``torchrun`` unchanged).

The official code unfroze "the last two embedding rows", which for OPT are not the marker ids
(OPT's embedding is larger than its tokenizer); here the real marker ids are used.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..layout import Layout, check_attention_for_positions
from ..marking import add_marking_tokens, marker_ids
from .adapter_io import (
    RUN_FILE,
    AdapterError,
    base_signature,
    check_adapter_layout,
    load_adapter,
    quiet_peft,
)
from .batches import Collator, target_nll
from .distill import (
    TEACHER_FILE,
    DistillCollator,
    DistillDataset,
    load_teacher_targets,
    soft_target_nll,
)
from .examples import Example

__all__ = ["TrainSettings", "train_adapter", "check_distill"]

logger = logging.getLogger(__name__)
# the held-out learning curve (--eval-every), next to the checkpoints so that --resume finds it
CURVE_FILE = "held_out_curve.json"
# peft names the trainable marker rows of the embedding with this (TrainableTokensLayer)
MARKER_PARAM = "trainable_tokens_delta"


@dataclass
class TrainSettings:
    layout: str = "append"
    markers: bool = True
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    # the two marker rows start as the mean embedding and must move far to act as separators;
    # None trains them at ``lr`` like the LoRA weights
    marker_lr: Optional[float] = None
    warmup_ratio: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    seed: int = 0
    save_steps: int = 100
    logging_steps: int = 10
    # score the held-out examples every this many steps (and after the last), 0 = never: the
    # learning curve of the metric the table reports, not of the training loss
    eval_every: int = 0
    # not in the paper: repeat the last this many context tokens after the passage (append
    # layout; data.layout_tokens). Generation and evaluation read it from the run file
    echo_tokens: int = 0
    # not in the paper: "before" gives the appended passage the rotary positions of a prepended
    # one (data.layout_positions). Evaluation reads it from the run file
    passage_positions: str = "after"
    # not in the paper: layout distillation (distill.py). The loss becomes (1 - w) * target NLL +
    # w * cross-entropy to the teacher adapter's top-k next-token distribution
    distill_from: Optional[str] = None
    distill_weight: float = 0.0
    distill_top_k: int = 64
    # "auto": bf16 autocast on CUDA and on CPUs that compute bf16 natively (engine.models.
    # cpu_has_bf16), fp32 elsewhere; the trainable weights stay fp32 either way
    precision: str = "auto"


PRECISIONS = ("auto", "bf16", "fp32")


def training_bf16(precision: str, cuda: bool) -> bool:
    """Whether a run with ``precision`` trains under bf16 autocast on this machine."""
    from ..engine.models import cpu_has_bf16

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return cuda or cpu_has_bf16()
    return precision == "bf16"


def check_distill(settings: "TrainSettings") -> None:
    """Distillation needs a teacher and a weight in (0, 1], or neither."""
    w = settings.distill_weight
    if settings.distill_from is None:
        if w:
            raise ValueError(f"distill_weight {w} needs a teacher adapter (distill_from)")
        return
    if not 0 < w <= 1:
        raise ValueError(f"distill_weight must be in (0, 1] with a teacher, got {w}")
    if settings.distill_top_k < 1:
        raise ValueError(f"distill_top_k must be >= 1, got {settings.distill_top_k}")


def _lora_model(model, tokenizer, settings: TrainSettings):
    from peft import LoraConfig, get_peft_model

    kwargs = {}
    if settings.markers:
        ids = add_marking_tokens(model, tokenizer)
        kwargs["trainable_token_indices"] = {"embed_tokens": list(ids)}
        if getattr(model.config, "tie_word_embeddings", False):
            kwargs["ensure_weight_tying"] = True  # tied embeddings: train one shared marker row
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout, target_modules=settings.target_modules,
                        task_type="CAUSAL_LM", **kwargs)
    with quiet_peft():
        return get_peft_model(model, config)


def _trainer_class():
    from transformers import Trainer

    class FlashBackTrainer(Trainer):
        """Loss = mean NLL of the target tokens, marker logits excluded from the softmax."""

        exclude_ids: tuple[int, ...] = ()
        marker_lr: Optional[float] = None
        distill_weight: float = 0.0

        def create_optimizer(self, model=None):
            opt_model = self.model if model is None else model
            if self.optimizer is None and self.marker_lr is not None:
                params = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
                rows = [p for n, p in params if MARKER_PARAM in n]
                rest = [p for n, p in params if MARKER_PARAM not in n]
                groups = [{"params": rest, "weight_decay": self.args.weight_decay}]
                if rows:  # no weight decay on embedding rows, as for the Trainer's default
                    groups.append({"params": rows, "weight_decay": 0.0, "lr": self.marker_lr})
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer = cls(groups, **kwargs)
            return super().create_optimizer(model)

        # compute_loss returns the summed target NLL over the target count of the whole
        # accumulated batch (all processes), so the Trainer must not divide by the steps again
        loss_is_scaled_for_ga = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            teacher = [inputs.pop(k, None) for k in ("teacher_ids", "teacher_logp", "teacher_mask")]
            keep = Collator.keep_logits(labels)
            outputs = model(**inputs, logits_to_keep=keep)
            nll, count = target_nll(outputs.logits, labels[:, -keep:], self.exclude_ids)
            if teacher[0] is not None and self.distill_weight:
                soft, _ = soft_target_nll(outputs.logits, labels[:, -keep:], *teacher,
                                          exclude_ids=self.exclude_ids)
                nll = (1 - self.distill_weight) * nll + self.distill_weight * soft
            if num_items_in_batch is None:  # a per-batch mean, scaled for accumulation here
                steps = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
                loss = nll / max(count, 1) / steps
            else:
                loss = nll / max(int(num_items_in_batch), 1)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    # the count was summed over every process while DDP averages their gradients
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return FlashBackTrainer


def _held_out_curve_callback(peft_model, tokenizer, examples: Sequence[Example],
                             settings: TrainSettings, folder: Path):
    """A ``TrainerCallback`` that scores ``examples`` with :func:`evaluate.perplexity` every
    ``settings.eval_every`` steps and after the last one, on the main process only, and keeps the
    points in ``folder/held_out_curve.json`` (a resumed run keeps those up to its checkpoint)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    from .evaluate import perplexity

    class HeldOutCurve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict] = []
            self.seconds = 0.0  # spent scoring, reported apart from the training time

        def on_train_begin(self, args, state, control, **kwargs):
            # a resumed run re-scores every step after its checkpoint
            self.points = [p for p in _read_curve(folder) if p["step"] <= state.global_step]

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % settings.eval_every and step != state.max_steps:
                return
            if not state.is_world_process_zero:
                return
            start = time.perf_counter()
            was_training = peft_model.training
            peft_model.eval()
            result = perplexity(peft_model, tokenizer, examples, settings.layout, settings.markers,
                                progress=False, echo=settings.echo_tokens,
                                passage_positions=settings.passage_positions)
            peft_model.train(was_training)
            self.seconds += time.perf_counter() - start
            self.points.append({"step": step, "perplexity": result["ppl"], "nll": result["nll"],
                                "tokens": result["tokens"]})
            folder.mkdir(parents=True, exist_ok=True)
            # whole or not at all: a run killed mid-write must not break the next --resume
            tmp = folder / (CURVE_FILE + ".tmp")
            tmp.write_text(json.dumps(self.points, indent=1))
            os.replace(tmp, folder / CURVE_FILE)
            tqdm.write(f"step {step}: held-out perplexity {result['ppl']:.3f} "
                       f"({len(examples)} examples, {settings.layout}"
                       f"{' + markers' if settings.markers else ''})")

    return HeldOutCurve()


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Example]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        return self.items[i]


# the example settings that decide which documents are held out
SPLIT_KEYS = ("corpus", "seed", "eval_fraction")


def _warm_start(model, init_adapter, settings: TrainSettings, examples_spec: Optional[dict] = None):
    """``(trainable peft model, tokenizer, settings)`` from a saved adapter: its LoRA shape
    replaces the settings' (the run file must tell the truth). Layout and markers must match, and
    so must the document split when both runs record it (else the new run could train on the
    documents the first one held out). Everything is checked before ``model`` is touched."""
    info = check_adapter_layout(init_adapter, settings.layout, settings.markers, "this run")
    if int(info["settings"].get("echo_tokens", 0)) != settings.echo_tokens:
        # allowed (a new run may teach a new echo), but not silently
        logger.warning("adapter %s was trained with a %d-token context echo; this run uses %d",
                       init_adapter, int(info["settings"].get("echo_tokens", 0)),
                       settings.echo_tokens)
    positions = info["settings"].get("passage_positions", "after")
    if positions != settings.passage_positions:
        logger.warning("adapter %s was trained with passage positions %r; this run uses %r",
                       init_adapter, positions, settings.passage_positions)
    theirs = info.get("examples_spec")
    if examples_spec and theirs:
        differ = [k for k in SPLIT_KEYS if k in theirs and theirs[k] != examples_spec.get(k)]
        if differ:
            raise AdapterError(f"adapter {init_adapter} was trained on another document split "
                               f"({', '.join(f'{k} {theirs[k]!r} != {examples_spec.get(k)!r}' for k in differ)}): "
                               f"warm-starting would train on its held-out documents")
    peft_model, tokenizer = load_adapter(model, init_adapter, trainable=True)
    config = peft_model.peft_config["default"]
    targets = config.target_modules
    settings = replace(settings, lora_r=config.r, lora_alpha=config.lora_alpha,
                       lora_dropout=config.lora_dropout,
                       target_modules=[targets] if isinstance(targets, str) else sorted(targets))
    return peft_model, tokenizer, settings


def train_adapter(model, tokenizer, train_examples: Sequence[Example], output_dir, *,
                  settings: Optional[TrainSettings] = None, resume: bool = False,
                  init_adapter=None, extra_info: Optional[dict] = None,
                  eval_examples: Optional[Sequence[Example]] = None) -> Path:
    """Train a LoRA adapter (plus marker rows) and save it to ``output_dir``.

    Saves the adapter (``save_pretrained``), the tokenizer (with markers), and ``flashback_run.json``
    (settings, base model signature, wall time). ``resume=True`` continues from the newest
    checkpoint in ``output_dir``. ``init_adapter`` warm-starts from a saved adapter's LoRA weights
    and marker rows (a new run with its own schedule and examples; its tokenizer replaces
    ``tokenizer``). With ``settings.eval_every`` the ``eval_examples`` are scored during training;
    the points go to ``held_out_curve`` in the run file. Returns the output folder.
    """
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    settings = settings or TrainSettings()
    if not train_examples:
        raise ValueError("no training examples")
    if settings.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {settings.eval_every}")
    # the markers' ids do not exist yet: any pair stands for "with markers"
    Layout(settings.layout, (0, 1) if settings.markers else None, settings.echo_tokens,
           settings.passage_positions)
    check_attention_for_positions(model, settings.passage_positions)
    check_distill(settings)
    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    bf16 = training_bf16(settings.precision, cuda)
    if settings.eval_every and not eval_examples:
        raise ValueError("eval_every needs held-out examples (eval_examples)")
    out = Path(output_dir)
    signature = base_signature(model)
    teacher, teacher_s = None, 0.0
    if settings.distill_from is not None:  # on the bare base model, before the student's adapter
        teacher_s = time.perf_counter()
        teacher = load_teacher_targets(model, train_examples, settings.distill_from,
                                       settings.distill_top_k, tokenizer,
                                       cache_file=out / "checkpoints" / TEACHER_FILE,
                                       batch_size=settings.batch_size)
        teacher_s = time.perf_counter() - teacher_s
    if init_adapter is not None:
        peft_model, tokenizer, settings = _warm_start(model, init_adapter, settings,
                                                      (extra_info or {}).get("examples_spec"))
    else:
        peft_model = _lora_model(model, tokenizer, settings)
    markers = marker_ids(tokenizer) if settings.markers else None
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.lr,
        lr_scheduler_type="cosine", warmup_steps=int(settings.warmup_ratio * settings.steps),
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        seed=settings.seed, bf16=bf16, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, use_cpu=not cuda,
        # every trainable tensor (LoRA, marker rows) takes part in each step: under DDP this skips
        # the extra search of the autograd graph for unused parameters
        ddp_find_unused_parameters=False)
    # the Trainer's checkpoints call save_pretrained with peft's default, which stores the whole
    # embedding because it grew by two rows (238 MB for SmolLM2); those rows are rebuilt on load
    # (resume included), so checkpoints keep only what trains, like the final save below
    peft_model.save_pretrained = functools.partial(peft_model.save_pretrained,
                                                   save_embedding_layers=False)
    trainer_cls = _trainer_class()
    collate = Collator(settings.layout, markers, tokenizer.pad_token_id or 0,
                       echo=settings.echo_tokens, passage_positions=settings.passage_positions)
    if teacher is not None:
        dataset, collate = DistillDataset(train_examples), DistillCollator(collate, teacher)
    else:
        dataset = _ListDataset(train_examples)
    trainer = trainer_cls(model=peft_model, args=args, train_dataset=dataset,
                          data_collator=collate)
    curve = None
    if settings.eval_every:
        curve = _held_out_curve_callback(peft_model, tokenizer, eval_examples, settings,
                                         out / "checkpoints")
        trainer.add_callback(curve)
    trainer.exclude_ids = tuple(marker_ids(tokenizer) or ())
    trainer.marker_lr = settings.marker_lr if settings.markers else None
    trainer.distill_weight = settings.distill_weight if teacher is not None else 0.0
    last = None
    if resume and (out / "checkpoints").is_dir():
        last = get_last_checkpoint(str(out / "checkpoints"))
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=last)
    finally:
        del peft_model.save_pretrained  # the class's own method again for the caller
    wall = time.perf_counter() - start
    peft_model.eval()
    if trainer.is_world_process_zero():
        # the resized embedding is rebuilt on load (markers = mean row); only the marker rows and
        # LoRA weights are stored, so the adapter stays a few MB
        peft_model.save_pretrained(out, save_embedding_layers=False)
        tokenizer.save_pretrained(out)
        info = {"settings": asdict(settings), "base": signature, "examples": len(train_examples),
                "init_adapter": str(init_adapter) if init_adapter is not None else None,
                "wall_s": wall, "train_loss": result.training_loss,
                # of wall_s, the held-out scoring (--eval-every)
                "eval_s": curve.seconds if curve is not None else 0.0,
                # before wall_s: scoring (or loading the cached) teacher targets (--distill-from)
                "teacher_s": teacher_s,
                "processes": trainer.args.world_size, "bf16": bf16,
                "resumed_from": Path(last).name if last else None,
                "held_out_curve": curve.points if curve is not None else [],
                "vocab_size": len(tokenizer), **(extra_info or {})}
        (out / RUN_FILE).write_text(json.dumps(info, indent=1))
    return out


def _read_curve(folder: Path) -> list:
    path = folder / CURVE_FILE
    if not path.exists():
        return []
    try:
        points = json.loads(path.read_text())
        return [p for p in points if isinstance(p.get("step"), int)]
    except (json.JSONDecodeError, AttributeError, TypeError):
        logger.warning("ignoring the unreadable held-out curve %s", path)
        return []
