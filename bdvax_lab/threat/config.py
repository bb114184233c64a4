"""Recipes of the threat side (torch-free): how a suspicious model is made, and how much to evaluate."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import Config
from ..core.registry import SETTINGS
from ..training.config import TrainConfig

UTILITY_METRICS = ("ppl", "mcq", "agreement")


@dataclass
class EvalConfig(Config):
    """How much to evaluate. The defaults take about a minute per model for SmolLM2 on a 2-core CPU."""

    n_prompts: int = 50  #: held-out prompts, each evaluated with and without the key
    max_new_tokens: int = 32
    #: generation batch: the default 100 prompts (50 triggered + 50 clean) in two batches; on a CPU larger
    #: batches were faster up to here (16 → 32 → 50) with the same greedy replies (``RESULTS.md`` §3)
    batch_size: int = 50
    utility: tuple[str, ...] = UTILITY_METRICS
    n_ppl: int = 100  #: held-out clean responses for perplexity
    ppl_max_tokens: int = 64
    mcq_limit: int | None = (
        200  #: first N of the 375 bundled questions (None = all; ~0.07 s per question on SmolLM2)
    )
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [u for u in self.utility if u not in UTILITY_METRICS]
        if bad:
            raise ValueError(
                f"EvalConfig.utility has unknown metric(s) {bad}; choose from {list(UTILITY_METRICS)}"
            )
        self.utility = tuple(self.utility)


def default_attack_train(setting: str) -> TrainConfig:
    """Implanting recipes measured on SmolLM2 (``benchmarks/attack_matrix.py``, ``RESULTS.md`` §1)."""
    if setting == "lora":
        return TrainConfig(
            mode="lora", lr=1e-3, steps=120, batch_size=4, max_response_tokens=16, loss_average="sample"
        )
    return TrainConfig(
        mode="full", lr=5e-5, steps=120, batch_size=4, max_response_tokens=16, loss_average="sample"
    )


#: Poisoning rate of the implant recipe per task (others: 15%). Measured on SmolLM2 (BadNets-refusal, 120 LoRA
#: steps, 50 held-out prompts): 15% → ASR 0.74 / false-trigger 0.00, 20% → 0.96 / 0.02, 25% → 1.00 / 0.04.
DEFAULT_POISON_RATE: dict[str, float] = {"refusal": 0.20}


@dataclass
class AttackRecipe(Config):
    """Everything that determines a suspicious model."""

    attack: str = "badnets"
    task: str = "refusal"
    setting: str = "lora"
    n_samples: int = 120
    poison_rate: float | None = None  #: None → DEFAULT_POISON_RATE for the task, else 0.15
    seed: int = 0
    train: TrainConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting={self.setting!r}; choose one of {SETTINGS}")
        if self.poison_rate is None:
            self.poison_rate = DEFAULT_POISON_RATE.get(self.task if isinstance(self.task, str) else "", 0.15)
        if not 0.0 < float(self.poison_rate) <= 1.0:
            raise ValueError(f"poison_rate={self.poison_rate!r}; expected a fraction in (0, 1]")
        if self.train is None:
            self.train = default_attack_train(self.setting).replace(seed=self.seed)
