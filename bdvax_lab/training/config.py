"""Training recipes (torch-free, JSON/YAML round trip): the finetune loop's and the repair's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.config import Config
from ..core.registry import ALL_KINDS, is_peft

if TYPE_CHECKING:
    from ..core.types import Model

#: Paper §4.3 repair learning rates.
REPAIR_LR: dict[str, float] = {"lora": 2e-4, "full": 1e-5, "mlp": 1e-5}


# =========================================================================== repair
@dataclass
class RepairConfig(Config):
    """The repair finetune on clean data (paper §4.3 defaults).

    200 samples × 5 epochs at batch 8 = 125 optimizer steps. lr ``None`` means
    the paper's: 2e-4 for the adapter, 1e-5 for full finetuning. Responses are
    cut to 32 tokens to fit the CPU budget: the cost is ~1000 sample passes
    whatever the batch size, and a short response makes each pass cheaper (for
    SmolLM2 with LoRA on 2 cores, about 5 minutes instead of about 8 with full
    responses). ``steps`` overrides ``epochs``.
    """

    n_samples: int = 200
    epochs: float = 5.0
    steps: int | None = None
    lr: float | None = None  #: None → REPAIR_LR[mode] (2e-4 LoRA / 1e-5 full)
    batch_size: int = 8
    max_response_tokens: int | None = 32
    max_length: int = 256
    mode: str | None = None  #: None → "lora" for a PeftModel, "full" otherwise ("mlp" = MLP weights only)
    schedule: str = "constant"
    warmup_steps: int = 0
    loss_average: str = "sample"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        pass  # (import moved into this module)

        if self.mode is not None and self.mode not in TRAIN_MODES:
            raise ValueError(f"RepairConfig.mode={self.mode!r}; choose None (auto) or one of {TRAIN_MODES}")
        if self.steps is None and self.epochs is None:
            raise ValueError("RepairConfig needs steps or epochs")
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError("RepairConfig.n_samples and batch_size must be ≥ 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"RepairConfig.steps must be ≥ 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"RepairConfig.epochs must be > 0, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"RepairConfig.lr must be > 0, got {self.lr}")

    def resolved_mode(self, model: Model | None = None) -> str:
        if self.mode is not None:
            return self.mode
        return "lora" if model is not None and is_peft(model) else "full"

    def resolved_lr(self, mode: str) -> float:
        return float(self.lr) if self.lr is not None else REPAIR_LR[mode]

    def train_config(self, mode: str) -> TrainConfig:
        """The :class:`TrainConfig` this repair runs with (lr resolved for ``mode``)."""
        return TrainConfig(
            mode=mode,
            lr=self.resolved_lr(mode),
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            steps=self.steps,
            epochs=None if self.steps is not None else self.epochs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            max_response_tokens=self.max_response_tokens,
            loss_average=self.loss_average,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
        )

    def total_steps(self, n_examples: int | None = None) -> int:
        n = min(self.n_samples, n_examples) if n_examples is not None else self.n_samples
        return self.train_config("lora").total_steps(n)


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
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be ≥ 1, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"TrainConfig.epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        bad = [k for k in self.target_kinds if k not in ALL_KINDS]
        if bad:
            raise ValueError(f"TrainConfig.target_kinds has unknown kinds {bad}; kinds: {list(ALL_KINDS)}")
        self.target_kinds = tuple(self.target_kinds)

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(float(self.epochs) * n_examples / self.batch_size))
