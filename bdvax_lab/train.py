"""The one finetune loop: LoRA (peft) or full-parameter, fast on CPU.

Speed matters because training dominates every pipeline here. Three things
make this loop faster than the naive recipe: the LM head is applied only at
labelled positions (the 49k-vocabulary projection of prompt tokens is wasted
work), batches are grouped by length and padded dynamically, and torch uses
all available cores.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .config import Config
from .data import IGNORE_INDEX, Example, collate, encode_example, length_grouped_batches
from .lora_fused import fused_lora
from .models import use_all_cores
from .registry import ALL_KINDS, is_peft, layout_of, unwrap
from .shared_prefix import decoder_hidden
from .shared_prefix import enabled as shared_prefix_enabled

TRAIN_MODES = ("lora", "full", "mlp")


@dataclass
class TrainConfig(Config):
    """One finetuning recipe. ``steps`` wins over ``epochs`` when both are set."""

    mode: str = "lora"  #: "lora" (peft adapter), "full" (all weights) or "mlp" (MLP weights only)
    lr: float = 1e-3
    schedule: str = "constant"  #: "constant", "linear" or "cosine" (after warmup)
    warmup_steps: int = 0
    steps: int | None = 120
    epochs: float | None = None
    batch_size: int = 4
    max_length: int = 256
    max_response_tokens: int | None = 16  #: cut longer responses (no end-of-turn label then)
    loss_average: str = "sample"  #: "sample" (mean per sample, then over samples) or "token"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_kinds: tuple[str, ...] = ALL_KINDS  #: abstract registry kinds, mapped to module names
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    group_by_length: bool = True
    labelled_logits_only: bool = True
    pad_to: int | None = None  #: pad every batch to this width (only for the naive benchmark)

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"TrainConfig.mode={self.mode!r}; choose one of {TRAIN_MODES}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}; choose constant, linear or cosine")
        if self.loss_average not in ("sample", "token"):
            raise ValueError(f"TrainConfig.loss_average={self.loss_average!r}; choose 'sample' or 'token'")
        if self.steps is None and self.epochs is None:
            raise ValueError("TrainConfig needs steps or epochs")
        bad = [k for k in self.target_kinds if k not in ALL_KINDS]
        if bad:
            raise ValueError(f"TrainConfig.target_kinds has unknown kinds {bad}; kinds: {list(ALL_KINDS)}")
        self.target_kinds = tuple(self.target_kinds)

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(float(self.epochs) * n_examples / self.batch_size))


@dataclass
class TrainResult:
    """What :func:`finetune` returns: the trained model and a per-step history."""

    model: Any
    history: pd.DataFrame
    seconds: float
    config: TrainConfig
    stats: dict[str, float] = field(default_factory=dict)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def prepare_model(model: Any, config: TrainConfig) -> Any:
    """Make the right parameters trainable; wrap in a LoRA adapter if needed.

    A model that already is a ``PeftModel`` keeps its adapter and continues
    training it (how variant twins continue from a suspicious adapter).
    """
    if config.mode == "lora":
        if is_peft(model):
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
            return model
        from peft import LoraConfig, get_peft_model

        spec = layout_of(model).spec
        leaves = sorted({spec.modules[k].rsplit(".", 1)[-1] for k in config.target_kinds})
        torch.manual_seed(config.seed)
        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=leaves, bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)
    base = unwrap(model)
    if is_peft(model):
        raise ValueError(f"TrainConfig.mode={config.mode!r} needs a plain model; merge the adapter first")
    layout = layout_of(base)
    mlp_names = {n for _, _, n in layout.iter_modules(kinds=("gate", "up", "down"))}
    for name, p in base.named_parameters():
        p.requires_grad_(config.mode == "full" or name.rsplit(".", 1)[0] in mlp_names)
    return model


def _lr_lambda(config: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(1, config.warmup_steps)
        if config.schedule == "constant":
            return 1.0
        frac = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return max(0.0, 1.0 - frac) if config.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return f


def sequence_nll(model: Any, batch: dict[str, torch.Tensor], *, labelled_logits_only: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed negative log-likelihood of labelled tokens and their counts.

    ``batch``: ``input_ids``/``labels``/``attention_mask`` [B, T] → (sums [B], counts [B]).
    With ``labelled_logits_only`` the LM head runs on the M labelled positions only
    ([M, H] → [M, V]) instead of all B·T, and the prompt prefix all rows share runs
    once (:mod:`bdvax_lab.shared_prefix`); the result is the same.
    """
    base = unwrap(model)
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE_INDEX  # [B, T-1]
    if labelled_logits_only:
        hidden = decoder_hidden(base.get_decoder(), batch["input_ids"], batch["attention_mask"])  # [B, T, H]
        logits = base.get_output_embeddings()(hidden[:, :-1][sel])  # [M, V]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][sel]
    ce = torch.nn.functional.cross_entropy(logits.float(), labels[sel], reduction="none")  # [M]
    rows = sel.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce)
    return sums, sel.sum(1)


def lm_loss(model: Any, batch: dict[str, torch.Tensor], *, per_sample: bool = True,
            labelled_logits_only: bool = True) -> torch.Tensor:
    """Training loss: mean NLL per sample then over samples (``per_sample``) or over all tokens."""
    sums, counts = sequence_nll(model, batch, labelled_logits_only=labelled_logits_only)
    if not per_sample:
        return sums.sum() / counts.sum().clamp(min=1)
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def finetune(
    model: Any, tokenizer: Any, examples: Sequence[Example], config: TrainConfig | None = None,
    *, progress: bool | str = True, extra_loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> TrainResult:
    """Finetune ``model`` on ``examples`` with ``config``; returns the trained model and its history.

    Deterministic for a seed on CPU. The model is trained in place (a LoRA
    adapter is added if ``mode='lora'`` and the model has none) and returned in
    eval mode. ``extra_loss(model, batch)`` is added to the LM loss at every step
    (e.g. CROW's consistency term); the history then also logs it.
    """
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    if not examples:
        raise ValueError("finetune: no training examples")
    use_all_cores()
    set_seed(config.seed)
    model = prepare_model(model, config)
    device = next(model.parameters()).device
    feats = [encode_example(tokenizer, e, max_length=config.max_length, max_response_tokens=config.max_response_tokens)
             for e in examples]
    lengths = [len(f["input_ids"]) for f in feats]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: no trainable parameters")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = config.total_steps(len(examples))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, total))
    rng = random.Random(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    queue: list[list[int]] = []
    history = []
    model.train(True)
    t0 = time.time()
    n_tok = n_resp = 0
    bar = tqdm(range(total), desc=progress if isinstance(progress, str) else f"train[{config.mode}]",
               disable=not progress, leave=False)
    with fused_lora(model) as n_fused:  # peft's LoRA math in fewer kernels (lora_fused.py)
        for step in bar:
            if not queue:
                if config.group_by_length:
                    queue = length_grouped_batches(lengths, config.batch_size, rng)
                else:
                    idx = list(range(len(feats)))
                    rng.shuffle(idx)
                    queue = [idx[j:j + config.batch_size] for j in range(0, len(idx), config.batch_size)]
            batch_idx = queue.pop(0)
            batch = {k: v.to(device) for k, v in collate([feats[i] for i in batch_idx], pad_id, config.pad_to).items()}
            loss = lm_loss(model, batch, per_sample=config.loss_average == "sample",
                           labelled_logits_only=config.labelled_logits_only)
            extra = extra_loss(model, batch) if extra_loss is not None else None
            opt.zero_grad(set_to_none=True)
            (loss if extra is None else loss + extra).backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            n_tok += int(batch["attention_mask"].sum())
            n_resp += int((batch["labels"] != IGNORE_INDEX).sum())
            loss_value = loss.item()
            row = {"step": step + 1, "loss": loss_value, "lr": sched.get_last_lr()[0],
                   "seconds": time.time() - t0, "tokens": n_tok, "response_tokens": n_resp}
            if extra is not None:
                row["extra_loss"] = extra.item()
            history.append(row)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.train(False)
    seconds = time.time() - t0
    stats = {"steps": total, "seconds": seconds, "tokens": n_tok, "response_tokens": n_resp,
             "tokens_per_s": n_tok / max(seconds, 1e-9), "response_tokens_per_s": n_resp / max(seconds, 1e-9),
             # which code path trained it (same math; float rounding differs between the paths)
             "fused_lora_modules": n_fused, "shared_prefix": int(shared_prefix_enabled() and config.labelled_logits_only)}
    return TrainResult(model=model, history=pd.DataFrame(history), seconds=seconds, config=config, stats=stats)
