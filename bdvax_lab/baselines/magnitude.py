"""``magnitude_prune``: zero the lowest-norm MLP channels with the signature's structure, then repair."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..core.data import Example
from ..core.registry import CHANNEL_DIM, MLP_KINDS, Key, layout_of, setting_of, unwrap
from ..weights.selection import _key_str, select_lowest
from .common import _finish, _prepare, _prune, _selection_summary
from .config import PruneConfig, _resolved_rho
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


# =========================================================================== magnitude pruning
def magnitude_channel_scores(model: Model, kinds: Sequence[str] = MLP_KINDS) -> dict[Key, torch.Tensor]:
    """L2 norm of every MLP channel: of the weight (plain model) or of the adapter's ΔW (PeftModel).

    gate/up: norm of row ``j``; down: norm of column ``j``. Adapter: ΔW = scaling·B@A
    via :meth:`WeightDelta.from_lora`, one module at a time; modules without LoRA
    are absent.
    """
    layout = layout_of(model)
    out: dict[Key, torch.Tensor] = {}
    if setting_of(model) == "lora":
        from ..weights.deltas import WeightDelta

        hf = unwrap(model)
        for b, kind, name in layout.iter_modules(kinds=tuple(kinds)):
            if not hasattr(hf.get_submodule(name), "lora_A"):
                continue
            d = WeightDelta.from_lora(model, kinds=(kind,), blocks=(b,)).tensors[(b, kind)]
            out[(b, kind)] = d.norm(dim=1 - CHANNEL_DIM[kind]).double()
        return out
    hf = unwrap(model)
    for b, kind, _ in layout.iter_modules(kinds=tuple(kinds)):
        w = layout.weight(hf, b, kind).detach()
        out[(b, kind)] = w.double().norm(dim=1 - CHANNEL_DIM[kind])
    return out


def magnitude_prune(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: PruneConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Zero the lowest-magnitude MLP channels (signature structure and ratio), then the same repair."""
    cfg = config or PruneConfig()
    setting = setting_of(suspicious_model)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    layout = layout_of(model)
    scores = magnitude_channel_scores(model)
    rho = _resolved_rho(cfg, setting)
    selected = select_lowest(scores, rho=rho, scope=cfg.scope, counts=cfg.counts)
    sup = _prune(model, selected, setting)
    t_int = time.time() - t0
    intervention = {
        "kind": "magnitude_prune",
        "score": "weight channel L2 norm" if setting == "full" else "adapter ΔW channel L2 norm",
        "rho": None if cfg.counts else rho,
        "scope": "counts" if cfg.counts else cfg.scope,
        "action": "zero",
        **_selection_summary(selected, layout.d_ff, len(scores)),
        "suppression": sup.to_dict()["counts"],
        "selected": {_key_str(k): v.tolist() for k, v in selected.items()},
    }
    return _finish(
        "magnitude_prune",
        model,
        tokenizer,
        clean_data,
        cfg,
        setting,
        intervention,
        t0,
        t_int,
        progress,
        on_stage,
    )


register_defence(
    "magnitude_prune",
    magnitude_prune,
    PruneConfig,
    paper_settings=("lora", "full"),
    description="zero the lowest-norm MLP channels with the signature's structure, then repair",
)
