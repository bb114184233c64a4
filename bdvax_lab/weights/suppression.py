"""Suppression of a selection (``docs/method.md``, "Purification"): zero it in the LoRA adapter, or
re-initialise it in a full model, for MLP channels and attention heads (GQA-aware)."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.registry import CHANNEL_DIM, MLP_KINDS, SETTINGS, Layout, is_peft, layout_of, setting_of, unwrap
from .config import INITS, KV_HEAD_RULES, SuppressConfig

if TYPE_CHECKING:
    from ..core.types import Model

Selected = Mapping[Any, Any]  # (block, kind) -> channel indices


def _as_index(idx: Any, size: int, where: str) -> torch.Tensor:
    """Sorted unique LongTensor of indices in ``[0, size)``."""
    t = torch.as_tensor(
        idx if not isinstance(idx, torch.Tensor) else idx.detach().cpu(), dtype=torch.long
    ).flatten()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise IndexError(f"{where}: index out of range 0..{size - 1} (got {int(t.min())}..{int(t.max())})")
    return torch.unique(t)


def _norm_selected(selected: Selected | None, layout: Layout) -> dict[tuple[int, str], torch.Tensor]:
    """Validate ``{(block, kind): indices}`` (MLP kinds only) into sorted unique LongTensors."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for key, idx in (selected or {}).items():
        if isinstance(key, str):  # tolerate "block.3.gate"-style keys
            parts = key.split(".")
            key = (int(parts[-2]), parts[-1])
        block, kind = int(key[0]), str(key[1])
        if kind not in MLP_KINDS:
            raise ValueError(
                f"selected channel key {key!r}: kind must be one of {list(MLP_KINDS)} "
                "(attention heads go in selected_heads)"
            )
        if not 0 <= block < layout.n_blocks:
            raise IndexError(f"selected channel key {key!r}: block out of range 0..{layout.n_blocks - 1}")
        t = _as_index(idx, layout.d_ff, f"selected[{key!r}]")
        if t.numel():
            out[(block, kind)] = t
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], MLP_KINDS.index(kv[0][1]))))


def head_slices(layout: Layout, heads: Any, kv_heads: str = "group") -> dict[str, torch.Tensor]:
    """Weight indices of query heads ``heads`` in one block: ``{"q": rows, "k": rows, "v": rows, "o": cols}``.

    ``q``/``o``: the ``head_dim`` rows/columns of each selected query head.
    ``k``/``v``: rows of the shared k/v heads chosen by ``kv_heads`` (module docstring).
    """
    if kv_heads not in KV_HEAD_RULES:
        raise ValueError(f"kv_heads={kv_heads!r}; choose one of {KV_HEAD_RULES}")
    h = _as_index(heads, layout.n_heads, "selected_heads")
    hd = layout.head_dim
    group = max(1, layout.n_heads // layout.n_kv_heads)

    def rows(hs: list[int]) -> torch.Tensor:
        if not hs:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(x * hd, (x + 1) * hd) for x in sorted(hs)])

    chosen = set(h.tolist())
    kv: list[int] = []
    if kv_heads != "none":
        for g in sorted({x // group for x in chosen}):
            members = set(range(g * group, (g + 1) * group))
            if kv_heads == "any" or members <= chosen:
                kv.append(g)
    qo = rows(sorted(chosen))
    kvr = rows(kv)
    return {"q": qo, "k": kvr, "v": kvr, "o": qo.clone()}


def _norm_heads(selected_heads: Mapping[Any, Any] | None, layout: Layout) -> dict[int, torch.Tensor]:
    out = {}
    for b, hs in (selected_heads or {}).items():
        b = int(b)
        if not 0 <= b < layout.n_blocks:
            raise IndexError(f"selected_heads: block {b} out of range 0..{layout.n_blocks - 1}")
        t = _as_index(hs, layout.n_heads, f"selected_heads[{b}]")
        if t.numel():
            out[b] = t
    return dict(sorted(out.items()))


def _module_seed(seed: int, block: int, kind: str) -> int:
    """A per-module seed independent of the order modules are visited in."""
    return int(hashlib.sha256(f"bdvax.reinit/{seed}/{block}/{kind}".encode()).hexdigest()[:15], 16)


def _axis_name(axis: int) -> str:
    return "rows" if axis == 0 else "columns"


def initializer_std(model: Model) -> float:
    """``config.initializer_range`` of the (text) config, 0.02 when absent (the transformers fallback)."""
    cfg = unwrap(model).config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return float(getattr(cfg, "initializer_range", None) or 0.02)


# =========================================================================== suppression
@dataclass
class SuppressionReport:
    """What a suppression touched: one record per (block, kind[, adapter]) with the number of rows/columns."""

    method: str
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        cols = ["block", "kind", "target", "axis", "n", "adapter", "param"]
        return pd.DataFrame(self.records, columns=cols)

    @property
    def counts(self) -> dict[str, int]:
        """Rows/columns touched per module kind (summed over blocks; one adapter counted once)."""
        seen: dict[tuple[int, str], int] = {}
        for r in self.records:
            seen[(r["block"], r["kind"])] = max(seen.get((r["block"], r["kind"]), 0), int(r["n"]))
        out: dict[str, int] = {}
        for (_, kind), n in seen.items():
            out[kind] = out.get(kind, 0) + n
        return out

    @property
    def n_heads(self) -> int:
        """Query heads selected (over all blocks)."""
        return int(self.meta.get("n_heads", 0))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "counts": self.counts, "meta": self.meta, "records": self.records}

    def __repr__(self) -> str:
        return f"SuppressionReport({self.method}, counts={self.counts}, heads={self.n_heads})"


def _draw(
    shape: tuple[int, ...], init: str, std: float, fan_in: int, fan_out: int, gen: torch.Generator
) -> torch.Tensor:
    if init == "zero":
        return torch.zeros(shape)
    if init == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return torch.randn(shape, generator=gen) * std  # "model" and "matched"


def _reinit_slice(
    w: torch.Tensor,
    bias: torch.Tensor | None,
    axis: int,
    idx: torch.Tensor,
    *,
    init: str,
    std: float,
    gen: torch.Generator,
) -> None:
    """Re-draw rows (axis 0) or columns (axis 1) ``idx`` of the weight ``w`` (a projection's own rows of a
    fused module: :meth:`~bdvax_lab.core.registry.Layout.weight`); zero the matching ``bias`` rows."""
    fan_out, fan_in = w.shape
    if init == "matched":
        std = float(w.detach().float().std())
    shape = list(w.shape)
    shape[axis] = int(idx.numel())
    new = _draw(tuple(shape), init, std, fan_in, fan_out, gen).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        w.index_copy_(axis, idx.to(w.device), new)
        if axis == 0 and bias is not None:
            bias.index_fill_(0, idx.to(w.device), 0.0)


def reinit_channels(
    model: Model,
    selected: Selected,
    selected_heads: Mapping[Any, Any] | None = None,
    seed: int = 0,
    init: str = "model",
    *,
    kv_heads: str = "group",
) -> SuppressionReport:
    """Full-model suppression: re-initialize the selected MLP channels (and heads) in place.

    ``selected[(block, kind)]``: channel indices j (rows of gate/up, columns of
    down). ``selected_heads[block]``: query-head indices (q rows, o columns, k/v
    rows by ``kv_heads``). ``init``: "model" (default, normal(0, initializer_range)),
    "xavier", "matched" or "zero" — see the module docstring. Seeded per module,
    so the result does not depend on dict order. Nothing else is changed.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}; choose one of {INITS}")
    if is_peft(model):
        raise TypeError(
            "reinit_channels works on a plain model (full setting); for an adapter use "
            "zero_lora_channels, or merge_and_unload() first"
        )
    layout = layout_of(model)
    hf = unwrap(model)
    std = initializer_std(model)
    report = SuppressionReport(
        method=f"reinit:{init}", meta={"init": init, "seed": seed, "std": std, "kv_heads": kv_heads}
    )

    def reinit(block: int, kind: str, axis: int, idx: torch.Tensor, target: str, seed_key: str) -> None:
        gen = torch.Generator().manual_seed(_module_seed(seed, block, seed_key))
        w, b = layout.weight(hf, block, kind), layout.bias(hf, block, kind)
        _reinit_slice(w, b, axis, idx, init=init, std=std, gen=gen)
        report.records.append(
            {
                "block": block,
                "kind": kind,
                "target": target,
                "axis": _axis_name(axis),
                "n": int(idx.numel()),
                "adapter": None,
                "param": f"{layout.module_name(block, kind)}.weight",
            }
        )

    for (block, kind), idx in _norm_selected(selected, layout).items():
        reinit(block, kind, CHANNEL_DIM[kind], idx, "channel", kind)
    heads = _norm_heads(selected_heads, layout)
    for block, hs in heads.items():
        for kind, idx in head_slices(layout, hs, kv_heads).items():
            if idx.numel():
                reinit(block, kind, 1 if kind == "o" else 0, idx, "head", f"head.{kind}")
    report.meta["n_heads"] = sum(int(h.numel()) for h in heads.values())
    return report


def _lora_adapters(module: Any, name: str, adapters: Sequence[str] | None) -> list[str]:
    if getattr(module, "merged", False):
        raise ValueError(
            f"{name}: the adapter is merged into the base weights; unmerge it before suppression"
        )
    names = [a for a in (adapters if adapters is not None else module.active_adapters) if a in module.lora_A]
    for a in names:
        if getattr(module, "use_dora", {}).get(a) or a in getattr(module, "lora_variant", {}):
            raise NotImplementedError(
                f"{name}: adapter {a!r} is a LoRA variant (e.g. DoRA); "
                "zeroing B rows / A columns would not zero ΔW"
            )
    return names


def _zero_lora_slice(module: Any, a: str, part: str, idx: torch.Tensor, offset: int = 0) -> str:
    """Zero rows of lora_B (``part="B"``) or columns of lora_A (``part="A"``) of adapter ``a``.

    ``offset``: where the projection's rows start in a fused module's B.
    """
    with torch.no_grad():
        if part == "B":
            lin = module.lora_B[a]
            rows = (idx + offset).to(lin.weight.device)
            lin.weight.index_fill_(0, rows, 0.0)
            if getattr(lin, "bias", None) is not None:
                lin.bias.index_fill_(0, rows, 0.0)
        else:
            lin = module.lora_A[a]
            lin.weight.index_fill_(1, idx.to(lin.weight.device), 0.0)
    return f"lora_{part}.{a}.weight"


def zero_lora_channels(
    peft_model: Model,
    selected: Selected,
    selected_heads: Mapping[Any, Any] | None = None,
    *,
    kv_heads: str = "group",
    adapters: Sequence[str] | None = None,
) -> SuppressionReport:
    """Adapter-only suppression, in place on the live peft modules.

    gate/up: row j of ``lora_B`` (the channel's output row of ΔW); down: column j
    of ``lora_A`` (its input column). Heads: rows of ``lora_B`` of q (and k/v per
    ``kv_heads``), columns of ``lora_A`` of o. Every active adapter of each
    module (or ``adapters``). Modules without LoRA are recorded with ``n=0``.
    """
    if not is_peft(peft_model):
        raise TypeError(
            "zero_lora_channels needs a PeftModel (adapter setting); use reinit_channels for a plain model"
        )
    layout = layout_of(peft_model)
    hf = unwrap(peft_model)
    report = SuppressionReport(method="zero_lora", meta={"kv_heads": kv_heads})
    missing: list[str] = []

    def touch(block: int, kind: str, idx: torch.Tensor, target: str) -> None:
        name = layout.module_name(block, kind)
        module = hf.get_submodule(name)
        part = "A" if (kind == "down" or kind == "o") else "B"
        axis = "columns" if part == "A" else "rows"
        if not hasattr(module, "lora_A"):
            missing.append(name)
            report.records.append(
                {
                    "block": block,
                    "kind": kind,
                    "target": target,
                    "axis": axis,
                    "n": 0,
                    "adapter": None,
                    "param": None,
                }
            )
            return
        rows = layout.rows(kind)
        for a in _lora_adapters(module, name, adapters):
            param = _zero_lora_slice(module, a, part, idx, 0 if rows is None else rows.start)
            report.records.append(
                {
                    "block": block,
                    "kind": kind,
                    "target": target,
                    "axis": axis,
                    "n": int(idx.numel()),
                    "adapter": a,
                    "param": f"{name}.{param}",
                }
            )

    for (block, kind), idx in _norm_selected(selected, layout).items():
        touch(block, kind, idx, "channel")
    heads = _norm_heads(selected_heads, layout)
    for block, hs in heads.items():
        for kind, idx in head_slices(layout, hs, kv_heads).items():
            if idx.numel():
                touch(block, kind, idx, "head")
    report.meta["n_heads"] = sum(int(h.numel()) for h in heads.values())
    if missing:
        report.meta["modules_without_lora"] = missing
        warnings.warn(
            f"zero_lora_channels: {len(missing)} selected module(s) carry no LoRA adapter "
            f"(e.g. {missing[0]}); nothing to zero there",
            stacklevel=2,
        )
    return report


def suppress(
    model: Model, signature: Any, config: SuppressConfig | None = None, *, setting: str | None = None
) -> SuppressionReport:
    """Suppress ``signature`` (anything with ``selected`` and optionally ``selected_heads``) in place.

    Setting auto-detected from the model: PeftModel → :func:`zero_lora_channels`,
    plain model → :func:`reinit_channels`.
    """
    cfg = config or SuppressConfig()
    setting = setting or setting_of(model)
    heads = getattr(signature, "selected_heads", None) if cfg.heads else None
    if setting == "lora":
        return zero_lora_channels(model, signature.selected, heads, kv_heads=cfg.kv_heads)
    if setting == "full":
        return reinit_channels(
            model, signature.selected, heads, seed=cfg.seed, init=cfg.init, kv_heads=cfg.kv_heads
        )
    raise ValueError(f"setting={setting!r}; choose one of {SETTINGS}")
