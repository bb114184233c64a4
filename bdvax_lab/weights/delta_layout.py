"""Which projections a weight delta covers and whether it fits a model: kinds, blocks, shapes, layouts.

Shared by :class:`~bdvax_lab.weights.deltas.WeightDelta`, its builders (:mod:`.delta_build`) and its file
format (:mod:`.delta_io`); torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..core.registry import ALL_KINDS, ATTN_KINDS, MLP_KINDS, ArchSpec, Layout, get_spec

#: Group names accepted wherever ``kinds`` is accepted.
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ATTN_KINDS,
    "attn": ATTN_KINDS,
    "mlp": MLP_KINDS,
    "all": ALL_KINDS,
}


class LayoutMismatchError(ValueError):
    """Two models / deltas do not share the same architecture layout."""


def resolve_kinds(kinds: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise ``kinds`` to registry kinds in canonical order.

    Accepts None (all kinds), a group name ("attention"/"attn", "mlp", "all"),
    a single kind, or any iterable mixing both.
    """
    if kinds is None:
        return ALL_KINDS
    items = [kinds] if isinstance(kinds, str) else list(kinds)
    chosen: set[str] = set()
    for item in items:
        if item in KIND_GROUPS:
            chosen.update(KIND_GROUPS[item])
        elif item in ALL_KINDS:
            chosen.add(item)
        else:
            raise ValueError(
                f"unknown kind {item!r}; use one of {list(ALL_KINDS)} or a group {list(KIND_GROUPS)}"
            )
    return tuple(k for k in ALL_KINDS if k in chosen)


def resolve_blocks(blocks: int | Iterable[int] | None, layout: Layout) -> tuple[int, ...]:
    """Normalise ``blocks`` to a sorted tuple of in-range block indices (None = all)."""
    if blocks is None:
        return tuple(range(layout.n_blocks))
    items = [blocks] if isinstance(blocks, (int, np.integer)) else list(blocks)
    out = []
    for b in items:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise TypeError(f"block indices must be ints, got {b!r}")
        if not 0 <= int(b) < layout.n_blocks:
            raise ValueError(f"block {int(b)} out of range 0..{layout.n_blocks - 1}")
        out.append(int(b))
    return tuple(sorted(set(out)))


def group_of(kind: str) -> str:
    """ "attention" or "mlp" for a registry kind."""
    return "mlp" if kind in MLP_KINDS else "attention"


def module_shape(layout: Layout, kind: str) -> tuple[int, int]:
    """Weight shape ``[out, in]`` of projection ``kind`` under ``layout``."""
    q_out = layout.n_heads * layout.head_dim
    kv_out = layout.n_kv_heads * layout.head_dim
    shapes = {
        "q": (q_out, layout.hidden),
        "k": (kv_out, layout.hidden),
        "v": (kv_out, layout.hidden),
        "o": (layout.hidden, q_out),
        "gate": (layout.d_ff, layout.hidden),
        "up": (layout.d_ff, layout.hidden),
        "down": (layout.hidden, layout.d_ff),
    }
    if kind not in shapes:
        raise KeyError(f"unknown module kind {kind!r}; kinds: {list(ALL_KINDS)}")
    return shapes[kind]


def layout_summary(layout: Layout) -> dict[str, Any]:
    """The parts of a layout that decide whether a delta fits a model (JSON-ready)."""
    return {
        "family": layout.family,
        "n_blocks": layout.n_blocks,
        "hidden": layout.hidden,
        "d_ff": layout.d_ff,
        "n_heads": layout.n_heads,
        "n_kv_heads": layout.n_kv_heads,
        "head_dim": layout.head_dim,
        "blocks_path": layout.spec.blocks,
        "modules": dict(layout.spec.modules),
    }


def layout_from_summary(s: Mapping[str, Any]) -> Layout:
    """Rebuild a Layout from :func:`layout_summary`; uses the registered spec when it matches."""
    spec: ArchSpec
    try:
        spec = get_spec(s["family"])
        if spec.blocks != s["blocks_path"] or dict(spec.modules) != dict(s["modules"]):
            raise LookupError
    except (LookupError, ValueError):
        spec = ArchSpec(family=s["family"], blocks=s["blocks_path"], modules=dict(s["modules"]))
    return Layout(
        spec=spec,
        n_blocks=int(s["n_blocks"]),
        hidden=int(s["hidden"]),
        d_ff=int(s["d_ff"]),
        n_heads=int(s["n_heads"]),
        n_kv_heads=int(s["n_kv_heads"]),
        head_dim=int(s["head_dim"]),
    )


def check_same_layout(
    a: Layout, b: Layout, what: str = "layouts", names: tuple[str, str] = ("first", "second")
) -> None:
    """Raise :class:`LayoutMismatchError` naming every differing field and which side has which value."""
    sa, sb = layout_summary(a), layout_summary(b)
    diff = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
    if diff:
        detail = ", ".join(f"{k}: {names[0]} {x!r} vs {names[1]} {y!r}" for k, (x, y) in diff.items())
        raise LayoutMismatchError(f"{what} differ ({detail})")
