"""Channel and head selections: top-k per module or global, random controls with the same counts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..core.registry import MLP_KINDS, Key, Layout, layout_of
from .config import SCOPES, check_budget
from .delta_layout import layout_summary


def _key_str(key: Key) -> str:
    return f"{key[0]}.{key[1]}"


def _parse_key(key: Any) -> Key:
    if isinstance(key, str):
        parts = key.split(".")
        return int(parts[-2]), parts[-1]
    return int(key[0]), str(key[1])


def counts_like(selection: Any) -> dict[str, int]:
    """Per-module channel counts ``{"block.kind": n}`` of a selected Signature / Selection / mapping.

    Feed it to ``PruneConfig(counts=...)`` to prune exactly as many channels per
    module as the signature suppresses (JSON-friendly, unlike the signature itself).
    """
    selected = getattr(selection, "selected", selection)
    if selected is None:
        raise ValueError("counts_like: the signature has no selection yet; call .select() first")
    out = {}
    for key, idx in dict(selected).items():
        b, k = _parse_key(key)
        if k in MLP_KINDS:
            out[_key_str((b, k))] = int(torch.as_tensor(idx).numel())
    return out


def select_by_counts(
    scores: Mapping[Key, torch.Tensor], counts: Mapping[Any, int], *, lowest: bool = False
) -> dict[Key, torch.Tensor]:
    """Exactly ``counts[block.kind]`` channels per module: the highest scores (``lowest``: the lowest)."""
    keys = sorted(scores, key=lambda k: (k[0], MLP_KINDS.index(k[1])))
    want = {_parse_key(k): int(v) for k, v in counts.items()}
    return {
        k: top_indices(scores[k], min(want.get(k, 0), scores[k].numel()), lowest=lowest)
        for k in keys
        if want.get(k, 0) > 0
    }


def select_lowest(
    scores: Mapping[Key, torch.Tensor],
    *,
    rho: float | None = None,
    scope: str = "module",
    counts: Mapping[Any, int] | None = None,
) -> dict[Key, torch.Tensor]:
    """The lowest-scoring channels per (block, kind), with the signature's structure.

    ``counts`` (per module) wins; else ``scope="module"``: ``max(1, floor(ρ·n))``
    per module, ``"global"``: ``max(1, floor(ρ·total))`` over all given channels.
    Modules absent from ``scores`` are skipped (e.g. no adapter there).
    """
    if counts is not None:
        return select_by_counts(scores, counts, lowest=True)
    if rho is None:
        raise ValueError("select_lowest needs rho or counts")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of {SCOPES}")
    return select_channels(scores, rho, scope, lowest=True)


# =========================================================================== selection
def n_top(rho: float, n: int) -> int:
    """``max(1, floor(ρ·n))`` for ρ > 0 (the public code's count), 0 for ρ = 0; float-safe floor."""
    if rho <= 0:
        return 0
    return min(n, max(1, math.floor(rho * n + 1e-9)))


def top_indices(scores: torch.Tensor, k: int, lowest: bool = False) -> torch.Tensor:
    """Indices of the k largest (``lowest``: smallest) scores (ties: lower index first), sorted ascending."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores.double(), descending=not lowest, stable=True).indices[:k]
    return torch.sort(order).values.long()


def _split_flat(chosen: torch.Tensor, keys: Sequence[Any], sizes: Sequence[int]) -> dict[Any, torch.Tensor]:
    """Map indices into a concatenation of per-key vectors back to per-key indices."""
    out, start = {}, 0
    for k, size in zip(keys, sizes):
        m = (chosen >= start) & (chosen < start + size)
        out[k] = chosen[m] - start
        start += size
    return out


def select_channels(
    scores: Mapping[Key, torch.Tensor], rho: float, scope: str, *, lowest: bool = False
) -> dict[Key, torch.Tensor]:
    """Top (``lowest``: bottom) channels per (block, kind): ``n_top(ρ, d_ff)`` per module, or over all modules
    for ``scope="global"``. Shared by signatures (highest scores) and pruning baselines (lowest)."""
    keys = sorted(scores, key=lambda k: (k[0], MLP_KINDS.index(k[1])))
    if scope == "module":
        return {k: top_indices(scores[k], n_top(rho, scores[k].numel()), lowest) for k in keys}
    flat = torch.cat([scores[k].double() for k in keys]) if keys else torch.zeros(0)
    return _split_flat(
        top_indices(flat, n_top(rho, flat.numel()), lowest), keys, [scores[k].numel() for k in keys]
    )


def _select_heads(head_scores: Mapping[int, torch.Tensor], heads: int) -> dict[int, torch.Tensor]:
    if heads <= 0:
        return {b: torch.zeros(0, dtype=torch.long) for b in sorted(head_scores)}
    if not head_scores:
        raise ValueError(
            f"heads={heads} but this signature has no head scores (no attention deltas were scored)"
        )
    blocks = sorted(head_scores)
    flat = torch.cat([head_scores[b].float() for b in blocks])
    if heads > flat.numel():
        raise ValueError(f"heads={heads} but the model has only {flat.numel()} attention heads")
    return _split_flat(top_indices(flat, heads), blocks, [head_scores[b].numel() for b in blocks])


@dataclass
class Selection:
    """Selected MLP channels per (block, kind) and attention heads per block.

    A signature's selection or a random control with the same counts.
    """

    selected: dict[Key, torch.Tensor]
    selected_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> pd.DataFrame:
        """One row per (block, kind): n_selected (kind "head" for attention heads)."""
        rows = [{"block": b, "kind": k, "n_selected": int(v.numel())} for (b, k), v in self.selected.items()]
        rows += [
            {"block": b, "kind": "head", "n_selected": int(v.numel())} for b, v in self.selected_heads.items()
        ]
        return pd.DataFrame(rows, columns=["block", "kind", "n_selected"])

    @property
    def n_channels(self) -> int:
        return sum(int(v.numel()) for v in self.selected.values())

    @property
    def n_heads(self) -> int:
        return sum(int(v.numel()) for v in self.selected_heads.values())


def _layout_dict(layout: Any) -> dict[str, Any]:
    if isinstance(getattr(layout, "layout", None), Mapping):  # a Signature
        return dict(layout.layout)
    if isinstance(layout, Mapping):
        return dict(layout)
    if isinstance(layout, Layout):
        return layout_summary(layout)
    return layout_summary(layout_of(layout))


def random_selection(
    layout: Any,
    rho: float | None = None,
    scope: str = "module",
    seed: int = 0,
    *,
    heads: int = 0,
    like: Any = None,
    counts: Mapping[Any, int] | None = None,
    head_counts: Mapping[Any, int] | None = None,
) -> Selection:
    """A random control for a ρ curve: channels (and heads) drawn uniformly, seeded.

    ``layout``: a Layout, a layout summary dict, a model or a Signature. With
    ``like`` (a selected Signature or a Selection) every (block, kind) gets
    exactly as many random channels as ``like`` selected there, and every block
    as many heads; ``counts`` (``{"block.kind": n}``, :func:`counts_like`) and ``head_counts``
    (``{block: n}``) give those numbers directly. Without either: ``scope="module"`` draws
    ``max(1, floor(ρ·d_ff))``
    channels per MLP module (the same counts as :meth:`Signature.select`);
    ``scope="global"`` draws the global count ``max(1, floor(ρ·3·L·d_ff))``
    uniformly over all MLP channels; ``heads`` random heads over the model.
    """
    lay = _layout_dict(layout)
    g = torch.Generator().manual_seed(int(seed))
    d_ff, n_blocks, n_heads = lay["d_ff"], lay["n_blocks"], lay["n_heads"]
    keys = [(b, k) for b in range(n_blocks) for k in MLP_KINDS]
    if like is not None or counts is not None:
        if like is not None:
            if like.selected is None:
                raise ValueError(
                    "random_selection(like=...): the signature has no selection; call .select() first"
                )
            counts = {k: int(v.numel()) for k, v in like.selected.items()}
            head_counts = {b: int(v.numel()) for b, v in (like.selected_heads or {}).items()}
        else:
            counts = {_parse_key(k): int(v) for k, v in counts.items()}
            head_counts = {int(b): int(v) for b, v in (head_counts or {}).items()}
        sel = {
            k: torch.sort(torch.randperm(d_ff, generator=g)[: counts.get(k, 0)]).values
            for k in keys
            if k in counts
        }
        hsel = {
            b: torch.sort(torch.randperm(n_heads, generator=g)[:c]).values for b, c in head_counts.items()
        }
        meta = {"kind": "random", "seed": int(seed), "like": True}
        return Selection(sel, hsel, meta)
    if rho is None:
        raise ValueError("random_selection needs rho (or like=a selected signature)")
    check_budget(rho, scope, heads)
    if scope == "module":
        k = n_top(rho, d_ff)
        sel = {key: torch.sort(torch.randperm(d_ff, generator=g)[:k]).values for key in keys}
    else:
        total = len(keys) * d_ff
        chosen = torch.sort(torch.randperm(total, generator=g)[: n_top(rho, total)]).values
        sel = {
            key: chosen[(chosen >= j * d_ff) & (chosen < (j + 1) * d_ff)] - j * d_ff
            for j, key in enumerate(keys)
        }
    hsel: dict[int, torch.Tensor] = {}
    if heads:
        if heads > n_blocks * n_heads:
            raise ValueError(f"heads={heads} but the model has only {n_blocks * n_heads} attention heads")
        flat = torch.sort(torch.randperm(n_blocks * n_heads, generator=g)[:heads]).values
        hsel = {
            b: flat[(flat >= b * n_heads) & (flat < (b + 1) * n_heads)] - b * n_heads for b in range(n_blocks)
        }
    return Selection(
        sel,
        hsel,
        {"kind": "random", "seed": int(seed), "rho": float(rho), "scope": scope, "heads": int(heads)},
    )
