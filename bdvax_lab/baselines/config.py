"""Baseline defence configs (torch-free), one dataclass per family of defences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


# =========================================================================== SANDE and MB-Defense
#: SANDE's overwrite-SFT learning rate by training mode: the released code's 5e-6 for all weights; for
#: the adapter 1e-4, our deviation (the paper trains no adapter; an adapter needs a larger step).
SANDE_LR: dict[str, float] = {"full": 5e-6, "mlp": 5e-6, "lora": 1e-4}

#: Where SANDE's parrot goes in the user turn: its start (default, for every attack), its end, or both
#: (two parrots; an extension for mid/end-of-prompt triggers).
PARROT_POSITIONS = ("start", "end", "both")


@dataclass
class SandeConfig(BaselineConfig):
    """SANDE (arXiv 2405.07667): parrot simulation, a gate, then overwrite SFT; and OSFT (trigger known).

    What the arm is told (:func:`bdvax_lab.baselines.registry.knowledge` fills these): ``family`` (the
    feared family, as BD-VAX; None → ``refusal``), ``target`` (``sande_oracle``: the hidden attack's
    target text or payload), ``judge`` (the gate's judge; None → the family's), ``trigger`` (``osft``:
    the attack spec as a dict). ``proxy_index``: which entry of the family's variant catalogue
    ``sande_family`` simulates.

    Parrot: ``n_parrot`` zero-initialised vectors at ``position``; AdamW β = (0.9, 0.95), ``parrot_lr``,
    cosine with ``parrot_warmup`` of the steps as warm-up, ``parrot_steps`` at ``parrot_batch``; CE on the
    first ``k_tokens`` tokens of proxy ⊕ clean reply. Gate: the share of ``n_gate`` clean prompts with the
    parrot whose greedy reply the judge flags (``min_gate`` > 0 skips the removal below it). Removal:
    parrot frozen, ``removal_steps`` at ``removal_batch`` on prompt ⊕ parrot → clean reply, CE on the
    first ``removal_tokens`` tokens, lr ``removal_lr`` (None → :data:`SANDE_LR`); ``anchor`` adds the
    clean prompt → reply rows too (OSFT's x→y term; off in the paper's code). ``n_train`` clean examples
    serve both stages. ``repair``: only its ``n_samples`` (how much clean data :func:`defend` prepares)
    and ``mode`` are read; SANDE runs its own, smaller budget, reported as steps and seconds.
    """

    family: str | None = None
    target: str | None = None
    judge: str | None = None
    trigger: dict[str, Any] | None = None
    proxy_index: int = 0
    n_parrot: int = 6
    position: str = "start"
    k_tokens: int = 5
    parrot_steps: int = 25
    parrot_batch: int = 4
    parrot_lr: float = 1e-3
    parrot_warmup: float = 0.03
    n_train: int = 100
    n_gate: int = 50
    gate_max_new_tokens: int = 32
    min_gate: float = 0.0
    removal_steps: int = 25
    removal_batch: int = 4
    removal_lr: float | None = None
    removal_tokens: int | None = 10
    anchor: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position not in PARROT_POSITIONS:
            raise ValueError(f"SandeConfig.position={self.position!r}; choose one of {PARROT_POSITIONS}")
        for name in ("n_parrot", "k_tokens", "parrot_steps", "parrot_batch", "n_train", "removal_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SandeConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_gate <= 1.0:
            raise ValueError(f"SandeConfig.min_gate={self.min_gate}; a rate in [0, 1]")

    def resolved_lr(self, mode: str) -> tuple[float, str]:
        """``(lr, source)`` of the removal (or OSFT) finetune for a training mode."""
        if self.removal_lr is not None:
            return float(self.removal_lr), "explicit"
        src = "SANDE code (5e-6, all weights)" if mode != "lora" else "our deviation for the adapter (1e-4)"
        return SANDE_LR[mode], src


#: MB-Defense's recovery term: "logsigmoid" = log σ(ℓ(y|x_d) − ℓ(y_d|x_d)) with mean per-token
#: log-likelihoods ℓ (numerically sound, the default); "literal" = log σ(π(y|x_d) / π(y_d|x_d)) with
#: sequence probabilities π, as printed (saturates; kept for the comparison in the tests and docs).
MB_FORMS = ("logsigmoid", "literal")

#: MB-Defense stage 2 pairs each clean sample with one defensive trigger in turn ("cycle": the repair's
#: step count) or with every trigger ("cross": the paper's tuples, 4× the steps).
MB_PAIRINGS = ("cycle", "cross")

#: Stage-1 (post-hoc merging) learning rate by mode: the backdoor-only attack recipe's
#: (``bdvax_lab.threat.config.default_attack_train``): what it takes to implant a pair in a finetune.
MB_STAGE1_LR: dict[str, float] = {"lora": 1e-3, "full": 5e-5, "mlp": 5e-5}


@dataclass
class MBConfig(BaselineConfig):
    """MB-Defense (arXiv 2601.04448): defensive poison merged with the unknown backdoor, then broken.

    ``triggers``/``replies``: the defensive pairs (:mod:`bdvax_lab.threat.defensive`). Stage 1
    (``mb_posthoc`` only): the defender's clean data plus ``stage1_rate`` poisoned copies per trigger,
    trained in chunks of ``stage1_chunk`` steps (batch ``stage1_batch``, lr ``stage1_lr`` or
    :data:`MB_STAGE1_LR`) until every trigger fires on ≥ ``stage1_fire`` of ``n_probe`` prompts or
    ``stage1_max_steps`` are spent. Stage 2 (both arms): the repair (``repair``: same clean data, steps
    and lr as BD-VAX's) with ``L = CE(x, y) − lam · R`` over (clean sample, trigger) tuples paired by
    ``pairing``, ``R`` in the ``form`` of :data:`MB_FORMS`. Sweep ``lam`` over {0.1, 0.5, 1} with
    :func:`bdvax_lab.baselines.mb_defense.mb_sweep` (one stage 1, one stage 2 per λ).
    """

    triggers: tuple[str, ...] = ("mn", "bb", "qw", "jh")
    replies: tuple[str, ...] = ()  #: () → bdvax_lab.threat.defensive.DEFENSIVE_REPLIES
    stage1_rate: float = 0.05
    stage1_fire: float = 0.8
    stage1_chunk: int = 50
    stage1_max_steps: int = 400
    stage1_lr: float | None = None
    stage1_batch: int = 4
    n_probe: int = 25
    probe_max_new_tokens: int = 24
    lam: float = 0.5
    pairing: str = "cycle"
    form: str = "logsigmoid"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.triggers, self.replies = tuple(self.triggers), tuple(self.replies)
        if self.form not in MB_FORMS:
            raise ValueError(f"MBConfig.form={self.form!r}; choose one of {MB_FORMS}")
        if self.pairing not in MB_PAIRINGS:
            raise ValueError(f"MBConfig.pairing={self.pairing!r}; choose one of {MB_PAIRINGS}")
        if self.lam < 0 or not 0 < self.stage1_fire <= 1 or self.stage1_chunk < 1 or self.n_probe < 1:
            raise ValueError("MBConfig: lam ≥ 0, stage1_fire in (0, 1], stage1_chunk ≥ 1 and n_probe ≥ 1")
