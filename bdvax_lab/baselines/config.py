"""Baseline defence configs (torch-free), one dataclass per family of defences."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import Config
from ..core.registry import ALL_KINDS
from ..threat.config import EvalConfig
from ..training.config import RepairConfig
from ..weights.config import SCOPES

#: Stages :func:`defend` can evaluate: the input, after the baseline's one-shot intervention
#: (pruning; only for methods that have one and then finetune), and the final model.
STAGES = ("suspicious", "intervened", "defended")


#: fine-pruning scores in the full setting: one per channel (its down column) or one per projection
FINE_PRUNE_SCORES = ("channel", "module")


#: CROW's published learning rate(s) by setting (adapter only; see the module docstring for the source).
CROW_PUBLISHED_LR: dict[str, float] = {"lora": 1e-3}


CROW_LR_CHOICES = ("standard", "published")


# =========================================================================== configs
@dataclass
class BaselineConfig(Config):
    """What every baseline shares: the repair budget (the same as BD-VAX's), evaluation, copying.

    ``repair``: the clean finetune (same clean data, steps and lr as
    :func:`bdvax_lab.purify.repair`); ``eval``/``evaluate``: what :func:`defend`
    measures and at which stages; ``inplace=False`` works on a deep copy.
    """

    repair: RepairConfig = field(default_factory=RepairConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evaluate: tuple[str, ...] = STAGES
    inplace: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.evaluate if s not in STAGES]
        if bad:
            raise ValueError(
                f"{type(self).__name__}.evaluate has unknown stage(s) {bad}; stages: {list(STAGES)}"
            )
        self.evaluate = tuple(self.evaluate)


@dataclass
class PruneConfig(BaselineConfig):
    """Channel pruning with the signature's structure.

    ``rho`` None → the signature's paper default for the setting (0.03 full /
    0.35 LoRA). ``scope``: "module" (lowest ``max(1, floor(ρ·d_ff))`` per
    (block, kind)) or "global". ``counts``: ``{"block.kind": n}`` (see
    :func:`counts_like`) prunes exactly ``n`` channels per module instead (wins
    over rho/scope). ``finetune``: run the repair after pruning.
    """

    rho: float | None = None
    scope: str = "module"
    counts: dict[str, int] | None = None
    finetune: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ValueError(f"{type(self).__name__}.scope={self.scope!r}; choose one of {SCOPES}")
        if self.rho is not None and not 0.0 <= float(self.rho) <= 1.0:
            raise ValueError(f"{type(self).__name__}.rho={self.rho}; must be in [0, 1]")
        if self.counts is not None:
            self.counts = {str(k): int(v) for k, v in dict(self.counts).items()}


@dataclass
class FinePruneConfig(PruneConfig):
    """Fine-pruning: Wanda-style dormant channels (full) or random channels (adapter), then repair.

    ``n_calib`` clean examples for the activation norms (None = the repair's
    ``n_samples``, i.e. the same examples the repair trains on);
    ``calib_batch_size`` for those forward passes; ``seed`` for the adapter
    setting's random selection. ``score`` (full setting): "channel" (default;
    a channel's down-projection Wanda score, shared by its gate/up/down so a
    dormant channel is pruned whole) or "module" (each projection scored on its
    own input; see the module docstring).
    """

    n_calib: int | None = None
    calib_batch_size: int = 8
    seed: int = 0
    score: str = "channel"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in FINE_PRUNE_SCORES:
            raise ValueError(f"FinePruneConfig.score={self.score!r}; choose one of {FINE_PRUNE_SCORES}")


@dataclass
class QuantizeConfig(BaselineConfig):
    """Group-wise round-to-nearest weight quantization (fake-quant on CPU; see the module docstring).

    ``kinds``: registry projections to quantize (default all seven). ``backend``:
    "fake" (default), "auto" (a registered "cuda" backend if CUDA is available,
    else fake) or any name given to :func:`register_quant_backend`.
    ``repair`` is not used (no finetune).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    kinds: tuple[str, ...] = ALL_KINDS
    backend: str = "fake"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= int(self.bits) <= 8:
            raise ValueError(f"QuantizeConfig.bits={self.bits}; use 2..8")
        if int(self.group_size) < 1:
            raise ValueError(f"QuantizeConfig.group_size={self.group_size}; must be ≥ 1")
        bad = [k for k in self.kinds if k not in ALL_KINDS]
        if bad:
            raise ValueError(f"QuantizeConfig.kinds has unknown kinds {bad}; kinds: {list(ALL_KINDS)}")
        self.kinds = tuple(self.kinds)


@dataclass
class CrowConfig(BaselineConfig):
    """CROW: LM loss + α · consistency loss on FGSM-perturbed embeddings (see the module docstring).

    ``lr``: "standard" (the repair lr: 2e-4 LoRA / 1e-5 full), "published"
    (:data:`CROW_PUBLISHED_LR`, adapter only) or a float. Defaults α = 5.5,
    ε = 0.1 from the public CROW code. ``mask_padding``: average the consistency
    loss over real tokens only.
    """

    alpha: float = 5.5
    epsilon: float = 0.1
    lr: float | str = "standard"
    mask_padding: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lr, str) and self.lr not in CROW_LR_CHOICES:
            try:
                self.lr = float(self.lr)
            except ValueError:
                raise ValueError(
                    f"CrowConfig.lr={self.lr!r}; use 'standard', 'published' or a number"
                ) from None

    def resolved_lr(self, mode: str) -> tuple[float, str]:
        """``(lr, source)`` for a training mode ("lora", "full" or "mlp")."""
        if not isinstance(self.lr, str):
            return float(self.lr), "explicit"
        if self.lr == "standard":
            return self.repair.resolved_lr(mode), "standard (repair lr, paper §4.3 / App. C.2)"
        if mode not in CROW_PUBLISHED_LR:
            raise ValueError(
                f"CROW publishes an lr for the adapter setting only ({CROW_PUBLISHED_LR}); "
                f"for mode {mode!r} pass CrowConfig(lr=<float>)"
            )
        return CROW_PUBLISHED_LR[mode], "published (CROW upstream config)"


def _resolved_rho(config: PruneConfig, setting: str) -> float:
    if config.rho is not None:
        return float(config.rho)
    from ..bdvax.config import DEFAULT_RHO

    return DEFAULT_RHO[setting]
