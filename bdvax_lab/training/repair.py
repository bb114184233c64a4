"""Repair: a clean-data finetune through the one training loop (paper §4.3 defaults in RepairConfig)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.data import Example
from ..core.registry import is_peft
from .config import RepairConfig, TrainConfig
from .loop import Inputs, finetune

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


@dataclass
class RepairResult:
    """What :func:`repair` returns. ``lr`` is the learning rate actually used."""

    model: Any
    history: pd.DataFrame
    seconds: float
    lr: float
    mode: str
    steps: int
    n_examples: int
    train_config: TrainConfig
    stats: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        h = self.history
        return {
            "lr": self.lr,
            "mode": self.mode,
            "steps": self.steps,
            "n_examples": self.n_examples,
            "epochs": self.train_config.epochs,
            "batch_size": self.train_config.batch_size,
            "max_response_tokens": self.train_config.max_response_tokens,
            "seconds": round(self.seconds, 1),
            "first_loss": float(h.loss.iloc[0]) if len(h) else float("nan"),
            "last_loss": float(h.loss.iloc[-1]) if len(h) else float("nan"),
        }


def repair(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example] | None = None,
    config: RepairConfig | None = None,
    *,
    progress: bool | str = True,
    extra_loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    inputs: Inputs | None = None,
) -> RepairResult:
    """Clean-data repair finetune through :func:`bdvax_lab.train.finetune`, in place.

    ``examples``: the defender's clean examples (:func:`bdvax_lab.core.selfdistill.defender_data`: its
    instructions answered by the suspicious model itself); the first ``config.n_samples`` are used. LoRA
    mode continues the model's existing adapter. ``extra_loss`` and ``inputs`` go to the loop
    (:func:`~bdvax_lab.training.loop.finetune`).
    """
    cfg = config or RepairConfig()
    if examples is None:
        raise ValueError("repair needs the defender's clean examples (defender_data(suspicious, tokenizer))")
    data = list(examples)[: cfg.n_samples]
    if not data:
        raise ValueError("repair: no clean examples")
    if len(data) < cfg.n_samples:
        warnings.warn(
            f"repair: only {len(data)} clean examples (config asks for {cfg.n_samples})", stacklevel=2
        )
    mode = cfg.resolved_mode(model)
    if mode == "lora" and not is_peft(model):
        raise ValueError(
            "repair: mode 'lora' continues an existing adapter, but the model has none "
            "(full setting: use mode 'full' or 'mlp')"
        )
    tcfg = cfg.train_config(mode)
    res = finetune(
        model,
        tokenizer,
        data,
        tcfg,
        progress=("repair" if progress is True else progress),
        extra_loss=extra_loss,
        inputs=inputs,
    )
    return RepairResult(
        model=res.model,
        history=res.history,
        seconds=res.seconds,
        lr=tcfg.lr,
        mode=mode,
        steps=tcfg.total_steps(len(data)),
        n_examples=len(data),
        train_config=tcfg,
        stats=res.stats,
    )
