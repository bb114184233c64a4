"""Controls that tell localisation from deletion (``docs/method.md``, "Evaluating a defence honestly").

Every claim that a signature localises the backdoor stands next to these, at the same budget:

``discard``
    Throw the finetune away. Adapter setting: the base model under the adapter (the defender has it).
    Full setting: the defender has no base, so this row loads the default base model and is a
    *reference* row (``reference=True`` in its report), not a defence.
``retrain``
    A fresh adapter (full setting: a full finetune of the base, a reference row) trained only on the
    defender's repair data, with the repair's budget.
``random``
    The signature's exact per-module channel counts (and per-block head counts) drawn at random, seeded,
    suppressed the way BD-VAX suppresses (LoRA zeroing / re-initialisation), then the same repair.
``top_delta``
    The channels the suspicious update itself moved most, ‖ΔW‖ per channel (no twins), in the same
    counts, suppressed and repaired the same way. Adapter: ΔW = scaling·B@A. Full setting: ΔW needs the
    base, so this is a reference row.
``drop_attention``
    The crudest split of an adapter: every attention head's slice zeroed (the q/k/v/o part of the
    update), the MLP part kept, then the same repair. No twins, no signature, no ranking. A signature
    whose head budget approaches all heads must beat it to claim it localises anything. Adapter setting
    only: a full finetune has no update to split without the base.

``random`` and ``top_delta`` take their counts from :class:`ControlConfig` (``counts`` from
:func:`bdvax_lab.weights.selection.counts_like` of a BD-VAX signature, ``head_counts`` likewise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..core.data import Example
from ..core.registry import CHANNEL_DIM, MLP_KINDS, Key, layout_of, setting_of, unwrap
from ..training.repair import repair
from ..weights.config import SuppressConfig
from ..weights.selection import Selection, counts_like, random_selection, select_by_counts
from ..weights.suppression import suppress
from .common import _emit, _no_training, _prepare, _training
from .config import BaselineConfig, PruneConfig
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class ControlConfig(PruneConfig):
    """A control selection in a signature's counts: ``counts`` ``{"block.kind": n}``, ``head_counts``
    ``{"block": n}``, ``seed`` (random), suppressed with ``suppression`` (BD-VAX's default), then repaired."""

    seed: int = 0
    head_counts: dict[str, int] | None = None
    suppression: SuppressConfig = field(default_factory=SuppressConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_counts is not None:
            self.head_counts = {str(k): int(v) for k, v in dict(self.head_counts).items()}


def _plain_base(model: Any) -> Any:
    """A copy of a PeftModel's base with the LoRA layers removed (no merge)."""
    import copy

    return copy.deepcopy(model).unload()


def discard(
    suspicious_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: BaselineConfig | None = None,
    *,
    progress: bool | str = True,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The base model: the adapter dropped (adapter setting) or the default base loaded (full, reference)."""
    t0 = time.time()
    if setting_of(suspicious_model) == "lora":
        model, reference = _plain_base(suspicious_model), False
    else:
        from ..core.models import load_default_model

        model, reference = load_default_model()[0], True
    info = {
        "method": "discard",
        "setting": setting_of(suspicious_model),
        "setting_out": "full",
        "reference": reference,
        **_no_training(),
        "seconds": {"total": round(time.time() - t0, 2)},
    }
    return model, info


def retrain(
    suspicious_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: BaselineConfig | None = None,
    *,
    progress: bool | str = True,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A fresh adapter on the base (adapter setting; the suspicious adapter's rank and targets), or a full
    finetune of the default base (full setting, reference), trained on the defender's data only."""
    cfg = config or BaselineConfig()
    t0 = time.time()
    setting = setting_of(suspicious_model)
    if setting == "lora":
        from ..training.loop import finetune

        lcfg = next(iter(suspicious_model.peft_config.values()))
        base = _plain_base(suspicious_model)
        tcfg = cfg.repair.train_config("lora").replace(lora_r=int(lcfg.r), lora_alpha=int(lcfg.lora_alpha))
        data = list(clean_data or [])[: cfg.repair.n_samples]
        res = finetune(base, tokenizer, data, tcfg, progress="retrain" if progress else False)
        model, reference = res.model, False
        training = {
            "lr": tcfg.lr,
            "lr_source": "repair lr",
            "steps": tcfg.total_steps(len(data)),
            "n_examples": len(data),
            "repair": None,
            "history": res.history,
        }
    else:
        from ..core.models import load_default_model

        base, _ = load_default_model()
        rep = repair(base, tokenizer, clean_data, cfg.repair.replace(mode="full"), progress=progress)
        model, reference, training = rep.model, True, _training(rep)
    info = {
        "method": "retrain",
        "setting": setting,
        "setting_out": setting,
        "reference": reference,
        **training,
        "seconds": {"total": round(time.time() - t0, 2)},
    }
    return model, info


def delta_channel_scores(model: Any, base: Any | None = None) -> dict[Key, torch.Tensor]:
    """‖ΔW‖ of every MLP channel of the suspicious update: the adapter's ΔW, or θ_s − θ_base."""
    if setting_of(model) == "lora":
        from .magnitude import magnitude_channel_scores

        return magnitude_channel_scores(model)  # on a PeftModel: the norms of ΔW = scaling·B@A
    layout, hs, hb = layout_of(model), unwrap(model), unwrap(base)
    out: dict[Key, torch.Tensor] = {}
    for b, kind, _ in layout.iter_modules(kinds=MLP_KINDS):
        d = layout.weight(hs, b, kind).detach().double() - layout.weight(hb, b, kind).detach().double()
        out[(b, kind)] = d.norm(dim=1 - CHANNEL_DIM[kind])
    return out


def delta_head_scores(model: Any, base: Any | None = None) -> dict[int, torch.Tensor]:
    """‖ΔW‖² of every query head: its q rows and o columns plus its share of the k/v head it reads."""
    from ..weights.deltas import WeightDelta

    layout = layout_of(model)
    if setting_of(model) == "lora":
        delta = WeightDelta.from_lora(model, kinds=("q", "k", "v", "o"))
    else:
        delta = WeightDelta.from_models(model, base, kinds=("q", "k", "v", "o"))
    hd, group = layout.head_dim, max(1, layout.n_heads // layout.n_kv_heads)
    out = {}
    for b in range(layout.n_blocks):
        s = torch.zeros(layout.n_heads, dtype=torch.float64)
        for kind in ("q", "k", "v", "o"):
            t = delta.tensors.get((b, kind))
            if t is None:
                continue
            t = t.double()
            per = t.t() if kind == "o" else t  # rows per head
            sq = per.reshape(-1, hd, per.shape[1]).pow(2).sum((1, 2))  # [heads of this kind]
            s += sq if kind in ("q", "o") else sq.repeat_interleave(group) / group
        out[b] = s
    return out


def _suppress_and_repair(
    method: str,
    suspicious_model: Any,
    tokenizer: Any,
    clean_data: Any,
    cfg: ControlConfig,
    selection: Selection,
    reference: bool,
    t0: float,
    progress: bool | str,
    on_stage: Callable[[str, Any], None] | None,
) -> tuple[Any, dict[str, Any]]:
    model = _prepare(suspicious_model, cfg)
    t = time.time()
    sup = suppress(model, selection, cfg.suppression)
    t_int = time.time() - t
    training, t_rep = _no_training(), 0.0
    if cfg.finetune:
        _emit(on_stage, "intervened", model)
        rep = repair(model, tokenizer, clean_data, cfg.repair, progress=progress)
        model, training, t_rep = rep.model, _training(rep), rep.seconds
    info = {
        "method": method,
        "setting": setting_of(suspicious_model),
        "setting_out": setting_of(model),
        "reference": reference,
        **training,
        "intervention": {
            "method": sup.method,
            "n_channels": selection.n_channels,
            "n_heads": selection.n_heads,
            "selected": counts_like(selection),
            **selection.meta,
        },
        "seconds": {
            "intervention": round(t_int, 2),
            "repair": round(t_rep, 2),
            "total": round(time.time() - t0, 2),
        },
    }
    return model, info


def _counts(cfg: ControlConfig, method: str) -> tuple[dict[str, int], dict[str, int]]:
    if not cfg.counts:
        raise ValueError(
            f"{method} needs the signature's per-module counts: ControlConfig(counts=counts_like(sig))"
        )
    return cfg.counts, cfg.head_counts or {}


def random_control(
    suspicious_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: ControlConfig | None = None,
    *,
    progress: bool | str = True,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Random channels (and heads) in the signature's counts, suppressed like BD-VAX, then repaired."""
    cfg = config or ControlConfig()
    counts, heads = _counts(cfg, "random")
    t0 = time.time()
    sel = random_selection(layout_of(suspicious_model), seed=cfg.seed, counts=counts, head_counts=heads)
    return _suppress_and_repair(
        "random", suspicious_model, tokenizer, clean_data, cfg, sel, False, t0, progress, on_stage
    )


def top_delta(
    suspicious_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: ControlConfig | None = None,
    *,
    progress: bool | str = True,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The channels (and heads) with the largest ‖ΔW‖ in the suspicious update, in the signature's counts."""
    cfg = config or ControlConfig()
    counts, heads = _counts(cfg, "top_delta")
    t0 = time.time()
    base, reference = None, False
    if setting_of(suspicious_model) == "full":  # ΔW = θ_s − θ_base needs the base: a reference row
        from ..core.models import load_default_model

        base, reference = load_default_model()[0], True
    chosen = select_by_counts(delta_channel_scores(suspicious_model, base), counts)
    hsel: dict[int, torch.Tensor] = {}
    if heads:
        from ..weights.selection import top_indices

        hs = delta_head_scores(suspicious_model, base)
        hsel = {int(b): top_indices(hs[int(b)], int(n)) for b, n in heads.items() if int(n) > 0}
    del base
    sel = Selection(chosen, hsel, {"kind": "top_delta"})
    return _suppress_and_repair(
        "top_delta", suspicious_model, tokenizer, clean_data, cfg, sel, reference, t0, progress, on_stage
    )


def drop_attention(
    suspicious_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: ControlConfig | None = None,
    *,
    progress: bool | str = True,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Every attention head of the adapter zeroed (its q/k/v/o slices), the MLP part kept, then repaired.

    ``config.counts``/``head_counts`` are ignored: the selection is all heads of every block."""
    if setting_of(suspicious_model) != "lora":
        raise ValueError(
            "drop_attention zeroes the attention part of an adapter; a full finetune has no adapter to split"
        )
    cfg = config or ControlConfig()
    t0 = time.time()
    layout = layout_of(suspicious_model)
    heads = {b: torch.arange(layout.n_heads) for b in range(layout.n_blocks)}
    sel = Selection({}, heads, {"kind": "drop_attention"})
    return _suppress_and_repair(
        "drop_attention", suspicious_model, tokenizer, clean_data, cfg, sel, False, t0, progress, on_stage
    )


register_defence(
    "discard",
    discard,
    BaselineConfig,
    uses_clean_data=False,
    kind="control",
    description="the base model (adapter dropped; full setting: a reference row)",
)
register_defence(
    "retrain",
    retrain,
    BaselineConfig,
    kind="control",
    description="a fresh adapter (full setting: a finetune of the base) on the defender's data",
)
register_defence(
    "random",
    random_control,
    ControlConfig,
    kind="control",
    description="random channels and heads in the signature's counts, suppressed and repaired",
)
register_defence(
    "top_delta",
    top_delta,
    ControlConfig,
    kind="control",
    description="the channels the suspicious update moved most, in the signature's counts",
)
register_defence(
    "drop_attention",
    drop_attention,
    ControlConfig,
    paper_settings=("lora",),
    kind="control",
    description="the adapter's attention part zeroed (all heads, no ranking), the MLP part kept, repaired",
)
