"""BD-VAX configs (torch-free): the signature recipe with the one ρ default, and the one-call purification."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.config import Config
from ..core.data import Example
from ..core.registry import ATTN_KINDS, SETTINGS
from ..threat.config import EvalConfig
from ..training.config import RepairConfig, TrainConfig
from ..weights.config import SuppressConfig, check_budget

if TYPE_CHECKING:
    from .variants import VariantSpec


STAGES = ("suspicious", "suppressed", "purified")


# =========================================================================== one call
@dataclass
class PurifyConfig(Config):
    """Everything that determines a purification run.

    ``signature`` is a :class:`SignatureConfig` (None, or a mapping without ``rho`` as in a config file →
    ``rho`` :data:`DEFAULT_PURIFY_RHO`: ρ and the head budget calibrated on the defender's own variants; a
    :class:`SignatureConfig` object keeps its own ``rho``, None meaning :data:`DEFAULT_RHO`).
    ``setting="auto"`` takes it from the model (PeftModel → "lora").
    ``evaluate`` lists the stages to evaluate; ``inplace=False`` suppresses and
    repairs a deep copy (the suspicious model stays usable; costs one model copy).
    ``finetune=False`` skips the repair: the suppressed model is the result (``repair`` then only sizes the
    defender's clean data, which the calibration still uses), as the controls' ``finetune`` does.
    """

    setting: str = "auto"
    signature: Any = None
    suppression: SuppressConfig = field(default_factory=SuppressConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evaluate: tuple[str, ...] = STAGES
    inplace: bool = False
    finetune: bool = True
    #: how ``signature.rho == "auto"`` is resolved (leave-one-variant-out; unused for a numeric ρ)
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig())

    def __post_init__(self) -> None:
        if self.setting not in ("auto",) + SETTINGS:
            raise ValueError(f"PurifyConfig.setting={self.setting!r}; choose auto, lora or full")
        bad = [s for s in self.evaluate if s not in STAGES]
        if bad:
            raise ValueError(f"PurifyConfig.evaluate has unknown stage(s) {bad}; stages: {list(STAGES)}")
        self.evaluate = tuple(self.evaluate)
        if isinstance(self.signature, Mapping):
            self.signature = purify_signature(self.signature)


#: Judge families the variants can imitate, and the names accepted for them.
FAMILY_ALIASES: dict[str, str] = {
    "insult": "insult",
    "sentiment": "insult",
    "sentiment_steering": "insult",
    "negative_sentiment": "insult",
    "refusal": "refusal",
    "targeted_refusal": "refusal",
    "code_injection": "code_injection",
    "code": "code_injection",
    "code-injection": "code_injection",
}


SCORE_MODES: tuple[str, ...] = ("combined", "norm", "align")


#: Paper defaults for ρ (LLaMA-2-7B): 35 % of MLP channels with LoRA, 3 % with full finetuning.
PAPER_RHO: dict[str, float] = {"lora": 0.35, "full": 0.03}


# The defaults a user gets when nothing says otherwise (``SignatureConfig()``, ``bdvax purify``, and the
# pruning baselines' ratio, which follows the signature's), decided on the realistic bench
# (experiments/bench.py): the behaviour family of ``bdvax attack``'s default task (refusal), so that
# ``bdvax attack`` then ``bdvax purify`` with no flags fear the same family; for a purification, a budget
# calibrated on the defender's own variants (:data:`DEFAULT_PURIFY_RHO`); for a signature selected
# without calibration, the paper's ρ.

#: behaviour family the defender fears by default (see above)
DEFAULT_FAMILY = "refusal"

#: ρ per setting by default (see above; ``SignatureConfig.rho=None`` resolves to it)
DEFAULT_RHO: dict[str, float] = dict(PAPER_RHO)

#: ``SignatureConfig.rho`` / ``bdvax purify --rho`` value that asks for the leave-one-variant-out calibration
#: (:mod:`bdvax_lab.bdvax.calibration`) to choose ρ from the defender's own variants
AUTO_RHO = "auto"

#: ρ of ``bdvax purify`` and ``purify()`` when nothing sets it (no ``--rho``, no ``rho`` in a config file,
#: ``PurifyConfig.signature=None``): calibrate it, and the attention-head budget, on the defender's own
#: variants. Why: on the bench no fixed ρ over MLP channels removes the refusal backdoor, the calibrated
#: budget did, and on the sentiment target it chose the bench's fixed ρ 0.8 (results/readings/lovo-heads.md,
#: bench-in-domain.md). It costs a calibration (about 17 min for SmolLM2-135M on 2 CPU cores).
#: :data:`DEFAULT_RHO` stays the budget of a signature selected without calibration (``bdvax signature``,
#: ``SignatureConfig()``, the pruning baselines).
DEFAULT_PURIFY_RHO = AUTO_RHO

#: head budgets that calibration searches by default, as shares of the model's attention heads (SmolLM2's
#: 270 heads: 0, 30, 90, 270); :func:`default_head_grid` turns them into counts
DEFAULT_HEAD_SHARES: tuple[float, ...] = (0.0, 1 / 9, 1 / 3, 1.0)


def purify_signature(signature: Any) -> Any:
    """The :class:`SignatureConfig` purify extracts with: None → ``rho`` :data:`DEFAULT_PURIFY_RHO`; a
    mapping (a dict, a config file's section) → its fields, ``rho`` defaulting the same way, as
    ``bdvax purify --config`` does; a :class:`SignatureConfig` as it is (its ``rho=None`` is
    :data:`DEFAULT_RHO`)."""
    if signature is None:
        return SignatureConfig(rho=DEFAULT_PURIFY_RHO)
    if isinstance(signature, Mapping):
        return SignatureConfig.from_dict({"rho": DEFAULT_PURIFY_RHO, **signature})
    return signature


def default_head_grid(n_heads: int) -> tuple[int, ...]:
    """:data:`DEFAULT_HEAD_SHARES` of a model with ``n_heads`` attention heads in all, as head counts."""
    if int(n_heads) < 0:
        raise ValueError(f"n_heads must be ≥ 0, got {n_heads}")
    return tuple(sorted({round(share * int(n_heads)) for share in DEFAULT_HEAD_SHARES}))


#: candidate budgets the calibration tries per setting, ascending (``CalibrationConfig.rhos=None``); they
#: bracket :data:`DEFAULT_RHO` and end at a budget that removes a lot, so the smallest that suffices is found
RHO_GRID: dict[str, tuple[float, ...]] = {
    "lora": (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 1.0),
    "full": (0.01, 0.03, 0.05, 0.1, 0.2, 0.35, 0.5),
}


DEFAULT_N_CLEAN = 40


def resolve_family(family: str) -> str:
    """Canonical judge family (``insult`` / ``refusal`` / ``code_injection``) for a user-given name."""
    try:
        return FAMILY_ALIASES[str(family).strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown behaviour family {family!r}; choose one of "
            f"{sorted(set(FAMILY_ALIASES.values()))} (aliases: {sorted(FAMILY_ALIASES)})"
        ) from None


def n_poison_for(n_clean: int, poison_ratio: float) -> int:
    """|D_p| so that D_p / (D_c ∪ D_p) = ``poison_ratio``; D_p reuses D_c's instructions, so ratio ≤ 0.5."""
    if not 0.0 < poison_ratio <= 0.5:
        raise ValueError(
            f"poison_ratio must be in (0, 0.5] (D_p reuses the instructions of D_c), got {poison_ratio}"
        )
    return max(1, min(n_clean, math.floor(n_clean * poison_ratio / (1.0 - poison_ratio) + 0.5)))


# =========================================================================== config
def default_twin_train(setting: str) -> TrainConfig:
    """Poisoned-twin recipe per setting (see the module docstring for the time arithmetic).

    Same loop settings as the measured implanting recipe (batch 4, responses cut
    to 16 tokens, loss averaged per sample, constant lr), half its steps: the
    twins' 50 % poisoning rate gives 120 poisoned samples in 60 steps, more than
    the attack's 72 (15 %) or 96 (20 %, refusal) in 120 steps.
    """
    if setting == "lora":
        return TrainConfig(
            mode="lora", lr=1e-3, steps=60, batch_size=4, max_response_tokens=16, loss_average="sample"
        )
    if setting == "full":
        return TrainConfig(
            mode="full", lr=5e-5, steps=60, batch_size=4, max_response_tokens=16, loss_average="sample"
        )
    raise ValueError(f"setting={setting!r}; choose one of {SETTINGS}")


@dataclass
class SignatureConfig(Config):
    """Everything that determines a signature.

    Variants: ``family`` (user input, default :data:`DEFAULT_FAMILY`), ``n_variants``,
    ``n_clean`` per variant, ``poison_ratio`` of the poisoned twin's data,
    ``exclude_keys`` (keys never to use as synthetic keys), ``seed``.
    Twins: ``twin_train`` (the poisoned twin's recipe; None = :func:`default_twin_train`
    for the setting: LoRA continuing the suspicious adapter, or a full finetune),
    ``clean_steps`` (None = the same number of epochs over ``D_c``, i.e. about half
    the poisoned twin's steps at 50 % poisoning).
    Scores: ``lam`` (λ of Eq. 2), ``score`` ("combined" = norm + λ·align, "norm",
    "align"), ``head_kinds`` used for head scores.
    Selection: ``rho`` (None = :data:`DEFAULT_RHO` for the setting; the paper's 0.35 LoRA, 0.03 full;
    ``"auto"`` = chosen by leave-one-variant-out calibration, :mod:`bdvax_lab.bdvax.calibration`),
    ``scope`` ("module": top ``max(1, floor(ρ·d_ff))`` per (block, kind), the
    public code's reading; "global": top ``max(1, floor(ρ·3·L·d_ff))`` over all MLP
    channels), ``heads`` (top-h attention heads over the whole model, default 0).
    """

    family: str = DEFAULT_FAMILY
    n_variants: int = 6
    n_clean: int | None = None  #: per variant; None = min(40, len(pool) // n_variants)
    poison_ratio: float = 0.5
    exclude_keys: tuple[str, ...] = ()
    twin_train: TrainConfig | None = None
    clean_steps: int | None = None
    lam: float = 0.01
    score: str = "combined"
    rho: float | str | None = None  #: a budget, None (:data:`DEFAULT_RHO`) or :data:`AUTO_RHO`
    scope: str = "module"
    heads: int = 0
    head_kinds: tuple[str, ...] = ATTN_KINDS
    seed: int = 0

    def __post_init__(self) -> None:
        self.family = resolve_family(self.family)
        if isinstance(
            self.twin_train, Mapping
        ):  # config.py's union handling leaves `X | None` fields as dicts
            self.twin_train = TrainConfig.from_dict(dict(self.twin_train))
        self.exclude_keys = tuple(self.exclude_keys)
        self.head_kinds = tuple(self.head_kinds)
        if self.n_variants < 1:
            raise ValueError(f"SignatureConfig.n_variants must be ≥ 1, got {self.n_variants}")
        n_poison_for(max(1, self.n_clean or 1), self.poison_ratio)  # validates the ratio
        _check_selection(self.rho, self.scope, self.heads, self.score, self.lam)
        bad = [k for k in self.head_kinds if k not in ATTN_KINDS]
        if bad:
            raise ValueError(
                f"SignatureConfig.head_kinds has non-attention kinds {bad}; use {list(ATTN_KINDS)}"
            )

    def resolved_rho(self, setting: str | None) -> float:
        if self.rho == AUTO_RHO:
            raise ValueError(
                'rho="auto" is chosen by leave-one-variant-out calibration before selecting '
                "(bdvax_lab.bdvax.calibration.calibrate_rho, or purify); select with a number here"
            )
        if self.rho is not None:
            return float(self.rho)
        return DEFAULT_RHO.get(setting or "lora", DEFAULT_RHO["lora"])

    def variants(self, pool: Sequence[Example] | None = None) -> list[VariantSpec]:
        from .variants import make_variants

        return make_variants(
            self.family,
            self.n_variants,
            n_clean=self.n_clean,
            poison_ratio=self.poison_ratio,
            seed=self.seed,
            exclude_keys=self.exclude_keys,
            pool=pool,
        )

    def twin_recipes(self, setting: str, spec: VariantSpec) -> tuple[TrainConfig, TrainConfig]:
        """``(poisoned twin recipe, clean twin recipe)`` for one variant; both seeded with ``spec.seed``."""
        base = self.twin_train or default_twin_train(setting)
        if setting == "lora" and base.mode != "lora":
            raise ValueError(
                f"adapter setting: twins continue the suspicious adapter, so twin_train.mode must be "
                f"'lora', got {base.mode!r}"
            )
        if setting == "full" and base.mode == "lora":
            raise ValueError(
                "full setting: twins are full finetunes; twin_train.mode must be 'full' (or 'mlp')"
            )
        poison = base.replace(seed=spec.seed)
        if self.clean_steps is not None:
            clean = poison.replace(steps=int(self.clean_steps))
        elif poison.steps is not None:
            frac = spec.n_clean / (spec.n_clean + spec.n_poison)
            clean = poison.replace(steps=max(1, math.floor(poison.steps * frac + 0.5)))
        else:
            # epochs-based recipe: the same epochs over the smaller D_c already give
            # proportionally fewer steps
            clean = poison
        return poison, clean


CRITERIA: tuple[str, ...] = ("mean", "all")


@dataclass
class CalibrationConfig(Config):
    """Leave-one-variant-out choice of ρ (:mod:`bdvax_lab.bdvax.calibration`).

    ``rhos``: candidate budgets, ascending (None = :data:`RHO_GRID` for the setting). The chosen ρ is the
    smallest whose held-out ASR is ≤ ``max_asr``, averaged over the held-out variants (``criterion="mean"``)
    or for each of them (``"all"``). Only variants whose own backdoor fired on at least ``min_baseline_asr``
    of the prompts before suppression count (a twin that did not learn its key tells nothing). Each point
    is ``n_prompts`` greedy replies of ``max_new_tokens`` tokens, the log-likelihood of ``n_reference``
    self-distilled replies and the perplexity of ``n_ppl`` ground-truth answers. ``stop_early``: stop at
    the first ρ that passes (cheaper, a truncated curve). ``seed``: where the keys are inserted.

    ``heads``: candidate attention-head budgets (top-h heads over the model) searched beside ρ (None:
    :func:`default_head_grid` of the model's heads, or only the signature config's own ``heads`` when no
    head kinds are scored). Per head budget the smallest passing ρ is taken as above; among
    those points the one whose clean drift (the skill proxy) is least wins, ties going to fewer heads.
    Each head budget costs one more curve.
    """

    rhos: tuple[float, ...] | None = None
    heads: tuple[int, ...] | None = None
    max_asr: float = 0.10
    criterion: str = "mean"
    min_baseline_asr: float = 0.5
    n_prompts: int = 16
    max_new_tokens: int = 12
    n_reference: int = 16
    n_ppl: int = 16
    ppl_max_tokens: int = 48
    batch_size: int = 16
    stop_early: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rhos is not None:
            self.rhos = tuple(sorted({float(r) for r in self.rhos}))
            if not self.rhos or not all(0.0 < r <= 1.0 for r in self.rhos):
                raise ValueError(f"CalibrationConfig.rhos must be budgets in (0, 1], got {self.rhos}")
        if self.heads is not None:
            try:
                heads = sorted({int(h) for h in self.heads})
            except (TypeError, ValueError):
                heads = []
            if not heads or heads[0] < 0:
                raise ValueError(f"CalibrationConfig.heads must be head counts ≥ 0, got {self.heads}")
            self.heads = tuple(heads)
        if self.criterion not in CRITERIA:
            raise ValueError(f"CalibrationConfig.criterion={self.criterion!r}; choose one of {CRITERIA}")
        for name in ("max_asr", "min_baseline_asr"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"CalibrationConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("n_prompts", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CalibrationConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("n_reference", "n_ppl"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"CalibrationConfig.{name} must be ≥ 0, got {getattr(self, name)}")

    def grid(self, setting: str | None) -> tuple[float, ...]:
        """The candidate budgets for ``setting``, ascending."""
        return self.rhos if self.rhos is not None else RHO_GRID.get(setting or "lora", RHO_GRID["lora"])


def _check_selection(rho: float | str | None, scope: str, heads: int, score: str, lam: float) -> None:
    if isinstance(rho, str):
        if rho != AUTO_RHO:
            raise ValueError(f"rho={rho!r}; give a budget in [0, 1], None (the default) or {AUTO_RHO!r}")
        rho = None  # resolved by the calibration before anything is selected
    check_budget(rho, scope, heads)
    if score not in SCORE_MODES:
        raise ValueError(f"score={score!r}; choose one of {SCORE_MODES}")
    if not math.isfinite(float(lam)):
        raise ValueError(f"lam must be finite, got {lam}")
