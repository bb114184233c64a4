"""The one finetune loop: LoRA (peft) or full-parameter, fast on CPU.

Speed matters because training dominates every pipeline here. Three things
make this loop faster than the naive recipe: the LM head is applied only at
labelled positions (the 49k-vocabulary projection of prompt tokens is wasted
work), batches are grouped by length and padded dynamically, and torch uses
all available cores.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.batching import collate, length_grouped_batches, pad_token
from ..core.data import IGNORE_INDEX, Example, encode_example
from ..core.fused_lora import fused_lora
from ..core.models import use_all_cores
from ..core.registry import ALL_KINDS, ArchSpec, is_peft, layout_of, unwrap
from ..core.scoring import reduce_nll, sequence_nll
from ..core.shared_prefix import enabled as shared_prefix_enabled
from .config import TrainConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


@dataclass(frozen=True)
class Inputs:
    """How examples become features, and features a loss, when plain token ids are not enough.

    ``encode(tokenizer, example, config)`` → a feature dict (``input_ids``/``labels`` as
    :func:`~bdvax_lab.core.data.encode_example` makes them, plus optional ``"<group>.input_ids"`` /
    ``"<group>.labels"`` sequences that :func:`~bdvax_lab.core.batching.collate` pads alongside).
    ``nll(model, batch)`` → (sums [B], counts [B]) in place of
    :func:`~bdvax_lab.core.scoring.sequence_nll` (e.g. an embedding splice; None: the plain one).
    Used by the defences that train on something other than plain text (SANDE's parrot, MB-Defense's
    paired sequences); everything else (batching, optimizer, schedule, clipping, history) stays the loop's.
    """

    encode: Callable[[Any, Example, TrainConfig], dict[str, list[int]]]
    nll: Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None


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


def prepare_model(model: Model, config: TrainConfig) -> Model:
    """Make the right parameters trainable; wrap in a LoRA adapter if needed.

    A model that already is a ``PeftModel`` keeps its adapter and continues
    training it (how variant twins continue from a suspicious adapter); then
    ``config.target_kinds`` picks which modules' adapter parts train (the rest
    stay frozen), e.g. only the attention part.
    """
    if config.mode == "lora":
        if is_peft(model):
            layout = layout_of(model)
            every = set(config.target_kinds) == set(ALL_KINDS)
            n = 0
            for name, p in model.named_parameters():
                site = layout.parse(name) if "lora_" in name and not every else None
                on = "lora_" in name and (every or (site is not None and site[1] in config.target_kinds))
                p.requires_grad_(on)
                n += on
            if not n:
                raise ValueError(
                    f"TrainConfig.target_kinds={list(config.target_kinds)}: the model's adapter has no "
                    "module of these kinds to train"
                )
            return model
        from peft import LoraConfig, get_peft_model

        spec = layout_of(model).spec
        targets: Any = sorted({spec.modules[k].rsplit(".", 1)[-1] for k in config.target_kinds})
        if spec.blocks != ArchSpec.blocks:  # e.g. a multimodal wrapper: its vision tower has q_proj too
            import re

            paths = sorted({re.escape(spec.modules[k]) for k in config.target_kinds})
            targets = rf"{re.escape(spec.blocks)}\.\d+\.({'|'.join(paths)})"
        torch.manual_seed(config.seed)
        lcfg = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lcfg)
    base = unwrap(model)
    if is_peft(model):
        raise ValueError(f"TrainConfig.mode={config.mode!r} needs a plain model; merge the adapter first")
    layout = layout_of(base)
    mlp_names = {n for _, _, n in layout.iter_modules(kinds=("gate", "up", "down"))}
    for name, p in base.named_parameters():
        p.requires_grad_(config.mode == "full" or name.rsplit(".", 1)[0] in mlp_names)
    return model


def scheduler(opt: torch.optim.Optimizer, config: TrainConfig, total: int) -> Any:
    """The loop's learning-rate schedule for ``total`` steps (warmup, then constant, linear or cosine)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, total))


def _lr_lambda(config: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(1, config.warmup_steps)
        if config.schedule == "constant":
            return 1.0
        frac = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return (
            max(0.0, 1.0 - frac)
            if config.schedule == "linear"
            else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        )

    return f


@dataclass
class _Run:
    """One model's part of a training run: its data, batch order, optimizer, schedule and history."""

    model: Any
    config: TrainConfig
    feats: list[dict[str, list[int]]]
    params: list[torch.nn.Parameter]
    opt: Any
    sched: Any
    total: int
    rng: random.Random
    queue: list[list[int]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    n_tok: int = 0
    n_resp: int = 0

    @classmethod
    def start(
        cls,
        model: Any,
        tokenizer: Any,
        examples: Sequence[Example],
        config: TrainConfig,
        who: str,
        inputs: Inputs | None = None,
    ) -> _Run:
        if not examples:
            raise ValueError(f"{who}: no training examples")
        model = prepare_model(model, config)
        feats = [
            inputs.encode(tokenizer, e, config)
            if inputs is not None
            else encode_example(
                tokenizer, e, max_length=config.max_length, max_response_tokens=config.max_response_tokens
            )
            for e in examples
        ]
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{who}: no trainable parameters")
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        total = config.total_steps(len(examples))
        sched = scheduler(opt, config, total)
        return cls(model, config, feats, params, opt, sched, total, random.Random(config.seed))

    def next_batch(self) -> list[dict[str, list[int]]]:
        """The next batch's features, drawn exactly as this loop always has for this seed."""
        if not self.queue:
            if self.config.group_by_length:
                self.queue = length_grouped_batches(
                    [len(f["input_ids"]) for f in self.feats], self.config.batch_size, self.rng
                )
            else:
                idx = list(range(len(self.feats)))
                self.rng.shuffle(idx)
                self.queue = [
                    idx[j : j + self.config.batch_size] for j in range(0, len(idx), self.config.batch_size)
                ]
        return [self.feats[i] for i in self.queue.pop(0)]

    def step(
        self,
        loss: torch.Tensor,
        batch: dict[str, torch.Tensor],
        step: int,
        t0: float,
        extra: torch.Tensor | None = None,
    ) -> None:
        """After the backward pass: clip, step, and log this model's row (its part of ``batch``)."""
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.n_tok += int(batch["attention_mask"].sum())
        self.n_resp += int((batch["labels"] != IGNORE_INDEX).sum())
        row = {
            "step": step + 1,
            "loss": loss.item(),
            "lr": self.sched.get_last_lr()[0],
            "seconds": time.time() - t0,
            "tokens": self.n_tok,
            "response_tokens": self.n_resp,
        }
        if extra is not None:
            row["extra_loss"] = extra.item()
        self.history.append(row)

    def result(self, seconds: float, n_fused: int, co_trained: int) -> TrainResult:
        self.model.train(False)
        c = self.config
        stats = {
            "steps": self.total,
            "seconds": seconds,
            "tokens": self.n_tok,
            "response_tokens": self.n_resp,
            "tokens_per_s": self.n_tok / max(seconds, 1e-9),
            "response_tokens_per_s": self.n_resp / max(seconds, 1e-9),
            # which code path trained it (same math; float rounding differs between the paths)
            "fused_lora_modules": n_fused,
            "shared_prefix": int(shared_prefix_enabled() and c.labelled_logits_only),
            "co_trained_with": co_trained,
        }
        return TrainResult(
            model=self.model, history=pd.DataFrame(self.history), seconds=seconds, config=c, stats=stats
        )


def _rows(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[lo:hi] for k, v in batch.items()}


def finetune(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: TrainConfig | None = None,
    *,
    progress: bool | str = True,
    extra_loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    inputs: Inputs | None = None,
) -> TrainResult:
    """Finetune ``model`` on ``examples`` with ``config``; returns the trained model and its history.

    Deterministic for a seed on CPU. The model is trained in place (a LoRA
    adapter is added if ``mode='lora'`` and the model has none) and returned in
    eval mode. ``extra_loss(model, batch)`` is added to the LM loss at every step
    (e.g. CROW's consistency term); the history then also logs it. ``inputs``: how examples are
    encoded and scored when not as plain text (:class:`Inputs`).
    """
    return _train(
        [model], tokenizer, [examples], [config or TrainConfig()], progress, extra_loss, "finetune", inputs
    )[0]


def finetune_together(
    models: Sequence[PeftModel],
    tokenizer: PreTrainedTokenizerBase,
    datasets: Sequence[Sequence[Example]],
    configs: Sequence[TrainConfig],
    *,
    progress: bool | str = True,
) -> list[TrainResult]:
    """Train several LoRA models that share one frozen base, one forward and backward pass per step for all.

    Model ``k`` trains on ``datasets[k]`` with ``configs[k]``: its own batches (drawn exactly as
    :func:`finetune` draws them for that seed), optimizer, schedule, gradient clipping and step count
    (a model whose steps are done drops out of the batch). Its loss is its own rows' loss and its
    gradients land in its own adapter only, so each result matches ``finetune`` of that model alone to
    float rounding (``tests/test_train.py``), while a step of K models costs one pass over the frozen
    weights instead of K (the twins of :func:`bdvax_lab.bdvax.twins.train_twins`). The models must share
    their frozen tensors (:func:`bdvax_lab.core.models.working_copy` with ``share_frozen_base=True``).
    """
    from ..core.fused_lora import check_co_trainable

    if not (len(models) == len(datasets) == len(configs)) or not models:
        raise ValueError(
            f"finetune_together: {len(models)} models, {len(datasets)} datasets, {len(configs)} configs"
        )
    if any(c.mode != "lora" for c in configs) or not all(is_peft(m) for m in models):
        raise ValueError("finetune_together trains LoRA adapters (mode='lora') of peft models only")
    if len({(c.labelled_logits_only, c.pad_to) for c in configs}) > 1:
        raise ValueError("finetune_together: configs must agree on labelled_logits_only and pad_to")
    check_co_trainable(models)
    return _train(list(models), tokenizer, list(datasets), list(configs), progress, None, "finetune_together")


def _train(
    models: list[Any],
    tokenizer: Any,
    datasets: list[Sequence[Example]],
    configs: list[TrainConfig],
    progress: bool | str,
    extra_loss: Callable[..., torch.Tensor] | None,
    who: str,
    inputs: Inputs | None = None,
) -> list[TrainResult]:
    """The one training loop, for one model or several co-trained ones (see :func:`finetune_together`)."""
    from tqdm.auto import tqdm

    from ..core.fused_lora import co_lora

    use_all_cores()
    set_seed(configs[0].seed)
    runs = [_Run.start(m, tokenizer, d, c, who, inputs) for m, d, c in zip(models, datasets, configs)]
    device = next(runs[0].model.parameters()).device
    pad_id = pad_token(tokenizer)
    cfg0 = configs[0]
    for r in runs:
        r.model.train(True)
    t0 = time.time()
    longest = max(r.total for r in runs)
    desc = f"train[{cfg0.mode}]" if len(runs) == 1 else f"train[{len(runs)} x {cfg0.mode}]"
    bar = tqdm(
        range(longest),
        desc=progress if isinstance(progress, str) else desc,
        disable=not progress,
        leave=False,
    )
    with contextlib.ExitStack() as outer:
        n_fused = outer.enter_context(fused_lora(runs[0].model)) if len(runs) == 1 else 0
        for step in bar:
            active = [r for r in runs if step < r.total]
            parts = [r.next_batch() for r in active]
            spans, lo = [], 0
            for p in parts:
                spans.append((lo, lo + len(p)))
                lo += len(p)
            batch = {
                k: v.to(device)
                for k, v in collate([f for p in parts for f in p], pad_id, cfg0.pad_to).items()
            }
            with (
                co_lora([r.model for r in active], spans) if len(runs) > 1 else contextlib.nullcontext()
            ) as co:
                if inputs is not None and inputs.nll is not None:
                    sums, counts = inputs.nll(active[0].model, batch)
                else:
                    sums, counts = sequence_nll(
                        active[0].model, batch, labelled_logits_only=cfg0.labelled_logits_only, co=co
                    )
            losses = [
                reduce_nll(sums[a:b], counts[a:b], per_sample=r.config.loss_average == "sample")
                for r, (a, b) in zip(active, spans)
            ]
            extra = extra_loss(runs[0].model, batch) if extra_loss is not None else None
            for r in active:
                r.opt.zero_grad(set_to_none=True)
            total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
            (total if extra is None else total + extra).backward()
            for r, loss, (a, b) in zip(active, losses, spans):
                r.step(loss, _rows(batch, a, b), step, t0, extra)
            bar.set_postfix(loss=f"{losses[0].item():.3f}")
    seconds = time.time() - t0
    return [r.result(seconds, n_fused, len(runs) - 1) for r in runs]
