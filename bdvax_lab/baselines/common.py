"""Helpers every baseline defence shares: clean examples, pruning with the selection's structure, reports."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..core.data import Example
from ..core.registry import Key
from ..training.config import RepairConfig
from ..training.repair import RepairResult, repair
from ..weights.suppression import SuppressionReport, reinit_channels, zero_lora_channels
from .config import BaselineConfig, PruneConfig


# =========================================================================== small helpers
def _prepare(model: Any, config: BaselineConfig) -> Any:
    return model if config.inplace else copy.deepcopy(model)


def _prune(model: Any, selected: Mapping[Key, torch.Tensor], setting: str) -> SuppressionReport:
    """Zero the selected channels: weight rows/columns (full) or lora_B rows / lora_A columns (adapter)."""
    selected = {k: v for k, v in selected.items() if v.numel()}
    if setting == "lora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modules without LoRA are recorded with n=0
            return zero_lora_channels(model, selected)
    return reinit_channels(model, selected, init="zero")


def _selection_summary(selected: Mapping[Key, torch.Tensor], d_ff: int, n_modules: int) -> dict[str, Any]:
    n = sum(int(v.numel()) for v in selected.values())
    per_kind: dict[str, int] = {}
    for (_, k), v in selected.items():
        per_kind[k] = per_kind.get(k, 0) + int(v.numel())
    return {
        "n_channels": n,
        "per_kind": per_kind,
        "n_modules": n_modules,
        "fraction": n / max(1, n_modules * d_ff),
    }


def _clean_examples(clean_data: Sequence[Example] | None, n: int) -> list[Example]:
    """The first ``n`` of the defender's clean examples (:func:`defend` answers them with the suspicious
    model when the caller gives instructions only)."""
    if clean_data is None:
        raise ValueError(
            "no clean examples: pass the defender's data (bdvax_lab.core.selfdistill.defender_data)"
        )
    data = list(clean_data)[:n]
    if not data:
        raise ValueError("no clean examples")
    return data


def _no_training() -> dict[str, Any]:
    return {"lr": None, "lr_source": None, "steps": 0, "n_examples": 0, "repair": None, "history": None}


def _training(rep: RepairResult, lr_source: str = "standard (repair lr, paper §4.3)") -> dict[str, Any]:
    """The training part of a report; ``history`` is the per-step DataFrame (left out of JSON summaries)."""
    return {
        "lr": rep.lr,
        "lr_source": lr_source,
        "steps": rep.steps,
        "n_examples": rep.n_examples,
        "repair": rep.summary(),
        "history": rep.history,
    }


def _emit(on_stage: Callable[[str, Any], None] | None, stage: str, model: Any) -> None:
    if on_stage is not None:
        on_stage(stage, model)


def _finish(
    method: str,
    model: Any,
    tokenizer: Any,
    clean_data: Any,
    cfg: PruneConfig,
    setting: str,
    intervention: dict[str, Any],
    t0: float,
    t_int: float,
    progress: bool | str,
    on_stage: Callable[[str, Any], None] | None,
) -> tuple[Any, dict[str, Any]]:
    """Shared tail of the pruning baselines: report the intervened model, then (optionally) repair."""
    training, t_rep = _no_training(), 0.0
    if cfg.finetune:
        _emit(on_stage, "intervened", model)
        rep = repair(model, tokenizer, clean_data, cfg.repair, progress=progress)
        model, training, t_rep = rep.model, _training(rep), rep.seconds
    report = {
        "method": method,
        "setting": setting,
        "setting_out": setting,
        **training,
        "intervention": intervention,
        "seconds": {
            "intervention": round(t_int, 2),
            "repair": round(t_rep, 2),
            "total": round(time.time() - t0, 2),
        },
    }
    return model, report


def _repair_with_extra(
    model: Any,
    tokenizer: Any,
    clean_data: Any,
    rcfg: RepairConfig,
    extra: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    progress: bool | str,
) -> RepairResult:
    return repair(model, tokenizer, clean_data, rcfg, progress=progress, extra_loss=extra)
