"""Building weight deltas: from a LoRA adapter's live modules, from two models, from two state dicts.

Each builder returns ``(tensors, layout, meta)`` for a :class:`~bdvax_lab.weights.deltas.WeightDelta`;
call them through ``WeightDelta.from_lora`` / ``from_models`` / ``from_state_dicts``, which document the
conventions (precision, refused LoRA variants).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..core.registry import Key, Layout, layout_of, unwrap
from .delta_io import Factors, concat_factors
from .delta_layout import LayoutMismatchError, check_same_layout, resolve_blocks, resolve_kinds

if TYPE_CHECKING:
    from ..core.types import Model

#: what a builder returns: the tensors, their layout and the delta's ``meta``
DeltaParts = tuple[dict[Key, torch.Tensor], Layout, dict[str, Any]]


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """One step wider than ``dtype``: what makes ``a − b`` exact for weights in ``dtype``."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _plain_weight(model: Model, layout: Layout, block: int, kind: str, role: str) -> torch.Tensor:
    """A projection weight (its rows of a fused module) of a model that must not carry an unmerged adapter."""
    name = layout.module_name(block, kind)
    module = unwrap(model).get_submodule(name)
    if hasattr(module, "lora_A") or hasattr(module, "base_layer"):
        raise TypeError(
            f"{role} model has an adapter on {name}; merge it first (merge_and_unload) "
            "or use WeightDelta.from_lora for the adapter's own delta"
        )
    return layout.weight(model, block, kind, base_layer=False)


def _lora_pieces(
    peft_model: Model,
    adapter_name: str | None,
    kinds: str | Iterable[str] | None,
    blocks: int | Iterable[int] | None,
) -> tuple[Layout, list[tuple[Key, list[tuple[torch.Tensor, torch.Tensor, float]]]], dict[str, Any]]:
    """``(layout, [(key, [(B, A, scaling) per adapter]) per LoRA-wrapped projection], meta)``.

    ``B`` is this kind's rows of ``lora_B`` (a fused module's rows split as its weight's). LoRA variants,
    ``lora_bias`` and ``fan_in_fan_out`` are refused; ``meta`` records the adapters' r, alpha and scaling.
    """
    layout = layout_of(peft_model)
    hf = unwrap(peft_model)
    out: list[tuple[Key, list[tuple[torch.Tensor, torch.Tensor, float]]]] = []
    info: dict[str, dict[str, set]] = {}
    merged = False
    for block, kind, name in layout.iter_modules(resolve_kinds(kinds), resolve_blocks(blocks, layout)):
        module = hf.get_submodule(name)
        if not hasattr(module, "lora_A"):
            continue
        names = [adapter_name] if adapter_name is not None else list(module.active_adapters)
        pieces = []
        for a in names:
            if a not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(a) or a in getattr(module, "lora_variant", {}):
                raise NotImplementedError(
                    f"{name}: adapter {a!r} is a LoRA variant (e.g. DoRA); ΔW is not scaling·B@A"
                )
            if getattr(module, "lora_bias", {}).get(a):
                raise NotImplementedError(
                    f"{name}: adapter {a!r} has lora_bias=True; a weight delta would miss the bias"
                )
            if getattr(module, "fan_in_fan_out", False):
                raise NotImplementedError(f"{name}: fan_in_fan_out (Conv1D) layers are not supported")
            A = module.lora_A[a].weight  # [r, in]
            B = module.lora_B[a].weight  # [out, r]
            rows = layout.rows(kind)
            if rows is not None:  # a fused module: this kind's rows of ΔW are its rows of B
                B = B[rows]
            pieces.append((B.detach(), A.detach(), module.scaling[a]))
            rec = info.setdefault(a, {"r": set(), "alpha": set(), "scaling": set()})
            rec["r"].add(int(module.r[a]))
            rec["alpha"].add(float(module.lora_alpha[a]))
            rec["scaling"].add(float(module.scaling[a]))
            merged = merged or bool(getattr(module, "merged", False))
        if pieces:
            out.append(((block, kind), pieces))
    if not out:
        which = f"adapter {adapter_name!r}" if adapter_name is not None else "an active LoRA adapter"
        raise ValueError(
            f"from_lora: no registry projection carries {which} (is this a PeftModel with LoRA?)"
        )
    meta = {
        "source": "lora",
        "adapters": sorted(info),
        "merged": merged,
        "lora": {a: {k: sorted(v) for k, v in rec.items()} for a, rec in info.items()},
        "ops": [],
    }
    return layout, out, meta


def _warn_merged(meta: dict[str, Any]) -> None:
    if meta["merged"]:
        warnings.warn(
            "from_lora: some adapters are merged into the base weights; applying this delta "
            "to the same model would count them twice",
            stacklevel=4,  # the caller of WeightDelta.from_lora / FactoredDelta.from_lora
        )


def lora_delta_parts(
    peft_model: Model,
    adapter_name: str | None = None,
    *,
    kinds: str | Iterable[str] | None = None,
    blocks: int | Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
) -> DeltaParts:
    """ΔW = scaling · B @ A for every LoRA-wrapped registry projection (see ``WeightDelta.from_lora``)."""
    layout, modules, meta = _lora_pieces(peft_model, adapter_name, kinds, blocks)
    tensors: dict[Key, torch.Tensor] = {}
    for key, pieces in modules:
        total: torch.Tensor | None = None
        for B, A, scaling in pieces:
            dt = dtype or torch.promote_types(B.dtype, torch.float32)
            d = (B.to(dt) @ A.to(dt)) * scaling  # [out, in]
            total = d if total is None else total + d
        tensors[key] = total  # type: ignore[assignment]
    _warn_merged(meta)
    return tensors, layout, meta


def lora_factor_parts(
    peft_model: Model,
    adapter_name: str | None = None,
    *,
    kinds: str | Iterable[str] | None = None,
    blocks: int | Iterable[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[Key, Factors], Layout, dict[str, Any]]:
    """The same ΔW as :func:`lora_delta_parts`, kept factored: per projection the adapters' ``B`` (its
    rows of a fused module) and ``A`` copied to the CPU in ``dtype`` (at least fp32) with their scalings
    (see ``FactoredDelta.from_lora``)."""
    layout, modules, meta = _lora_pieces(peft_model, adapter_name, kinds, blocks)
    factors: dict[Key, Factors] = {}
    for key, pieces in modules:
        parts = []
        for B, A, scaling in pieces:
            dt = torch.promote_types(torch.promote_types(B.dtype, torch.float32), dtype)
            parts.append(
                Factors(
                    B.to(device="cpu", dtype=dt, copy=True),
                    A.to(device="cpu", dtype=dt, copy=True),
                    ((A.shape[0], float(scaling), 1),),
                )
            )
        factors[key] = parts[0] if len(parts) == 1 else concat_factors(parts)
    _warn_merged(meta)
    return factors, layout, meta


def model_delta_parts(
    finetuned: Model,
    base: Model,
    *,
    kinds: str | Iterable[str] | None = None,
    blocks: int | Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
) -> DeltaParts:
    """ΔW = W_finetuned − W_base for two plain models (see ``WeightDelta.from_models``)."""
    lf, lb = layout_of(finetuned), layout_of(base)
    check_same_layout(lf, lb, "from_models: layouts", ("finetuned", "base"))
    tensors: dict[Key, torch.Tensor] = {}
    for block, kind, name in lf.iter_modules(resolve_kinds(kinds), resolve_blocks(blocks, lf)):
        wf = _plain_weight(finetuned, lf, block, kind, "finetuned").detach()
        wb = _plain_weight(base, lb, block, kind, "base").detach()
        if wf.shape != wb.shape:
            raise LayoutMismatchError(f"from_models: {name} has shape {tuple(wf.shape)} vs {tuple(wb.shape)}")
        dt = dtype or _wide_dtype(torch.promote_types(wf.dtype, wb.dtype))
        tensors[(block, kind)] = wf.to(dt) - wb.to(device=wf.device, dtype=dt)
    return tensors, lf, {"source": "full", "ops": []}


def state_dict_delta_parts(
    finetuned: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    layout: Layout,
    *,
    kinds: str | Iterable[str] | None = None,
    blocks: int | Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
) -> DeltaParts:
    """ΔW from two HF state dicts (keys ``<module_name>.weight``; see ``WeightDelta.from_state_dicts``)."""
    tensors: dict[Key, torch.Tensor] = {}
    for block, kind, name in layout.iter_modules(resolve_kinds(kinds), resolve_blocks(blocks, layout)):
        key = f"{name}.weight"
        for role, sd in (("finetuned", finetuned), ("base", base)):
            if key not in sd:
                raise KeyError(f"from_state_dicts: {role} state dict has no {key!r}")
        wf, wb = finetuned[key].detach(), base[key].detach()
        rows = layout.rows(kind)
        if rows is not None:  # a fused module's rows of this kind
            wf, wb = wf[rows], wb[rows]
        if wf.shape != wb.shape:
            raise LayoutMismatchError(
                f"from_state_dicts: {key} has shape {tuple(wf.shape)} vs {tuple(wb.shape)}"
            )
        dt = dtype or _wide_dtype(torch.promote_types(wf.dtype, wb.dtype))
        tensors[(block, kind)] = wf.to(dt) - wb.to(device=wf.device, dtype=dt)
    return tensors, layout, {"source": "full", "from": "state_dicts", "ops": []}
