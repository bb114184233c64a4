"""A signature's per-channel scores and selection as dense arrays, and the tidy tables built from them.

The data layer under :mod:`bdvax_lab.viz.signature_viz`'s figures (numpy and pandas, no plotly):
:func:`channel_grid` lays the selected signature out as one row per (block, MLP kind) and one column per
channel; :func:`module_table`, :func:`channel_bins` and :func:`selection_thresholds` summarise it per
module, per channel bin and per module cut. Every function takes a Signature, selected or not (an
unselected one is selected with its own config first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..core.registry import MLP_KINDS

#: Per-channel quantities a grid can hold (and the channel heatmap and score histogram can show).
CHANNEL_VALUES: tuple[str, ...] = ("score", "norm", "align")


@dataclass
class ChannelGrid:
    """A signature as dense arrays: one row per (block, kind) present, ``d_ff`` columns."""

    keys: list[tuple[int, str]]
    values: np.ndarray  #: [M, d_ff] float64 of the requested quantity
    selected: np.ndarray  #: [M, d_ff] bool
    blocks: list[int]
    kinds: list[str]
    d_ff: int
    selection: dict[str, Any]


def ensure_selected(sig: Any) -> Any:
    """``sig`` itself if it holds a selection, else ``sig.select()`` with its own config."""
    return sig if getattr(sig, "selected", None) is not None else sig.select()


def channel_grid(sig: Any, value: str = "score") -> ChannelGrid:
    """``value`` (one of :data:`CHANNEL_VALUES`) and the selection of every MLP channel as dense arrays."""
    if value not in CHANNEL_VALUES:
        raise ValueError(f"value={value!r}; choose one of {CHANNEL_VALUES}")
    sig = ensure_selected(sig)
    source = {"score": sig.scores, "norm": sig.norm_term, "align": sig.align_term}[value]
    keys = sorted(source, key=lambda k: (k[0], MLP_KINDS.index(k[1])))
    if not keys:
        raise ValueError("this signature holds no MLP channel scores")
    d_ff = int(source[keys[0]].numel())
    vals = (
        np.stack([source[k].detach().double().cpu().numpy().reshape(-1) for k in keys])
        if keys
        else np.zeros((0, 0))
    )
    sel = np.zeros(vals.shape, dtype=bool)
    for i, k in enumerate(keys):
        idx = sig.selected.get(k)
        if idx is not None and idx.numel():
            sel[i, idx.cpu().numpy()] = True
    blocks = sorted({b for b, _ in keys})
    kinds = [k for k in MLP_KINDS if any(kk == k for _, kk in keys)]
    return ChannelGrid(keys, vals, sel, blocks, kinds, d_ff, dict(sig.selection or {}))


def module_table(sig: Any) -> pd.DataFrame:
    """One row per (block, kind): n_channels, n_selected, frac_selected, score mean/max, norm and align means,
    selected_mass (Σ S over the selected channels) and mass_share (its share of all selected mass)."""
    g = channel_grid(sig, "score")
    sig = ensure_selected(sig)
    norm = np.stack([sig.norm_term[k].double().numpy().reshape(-1) for k in g.keys])
    align = np.stack([sig.align_term[k].double().numpy().reshape(-1) for k in g.keys])
    n_sel = g.selected.sum(1)
    mass = np.where(g.selected, g.values, 0.0).sum(1)
    total = mass.sum()
    return pd.DataFrame(
        {
            "block": [b for b, _ in g.keys],
            "kind": [k for _, k in g.keys],
            "n_channels": g.d_ff,
            "n_selected": n_sel.astype(np.int64),
            "frac_selected": n_sel / g.d_ff,
            "score": g.values.mean(1),
            "max": g.values.max(1),
            "norm": norm.mean(1),
            "align": align.mean(1),
            "selected_mass": mass,
            "mass_share": mass / total if total > 0 else np.zeros_like(mass),
        }
    )


def _bin_edges(d_ff: int, bins: int) -> np.ndarray:
    bins = max(1, min(int(bins), d_ff))
    return np.unique(np.linspace(0, d_ff, bins + 1).round().astype(np.int64))


def channel_bins(sig: Any, bins: int = 64, value: str = "score", agg: str = "mean") -> pd.DataFrame:
    """Tidy per (block, kind, channel bin): ``lo``/``hi`` channel range, ``value`` aggregated by ``agg``
    ("mean" or "max"), ``n_selected`` and ``frac_selected``."""
    if agg not in ("mean", "max"):
        raise ValueError(f"agg={agg!r}; choose mean or max")
    g = channel_grid(sig, value)
    edges = _bin_edges(g.d_ff, bins)
    starts, widths = edges[:-1], np.diff(edges)
    vals = (
        np.add.reduceat(g.values, starts, axis=1) / widths
        if agg == "mean"
        else np.maximum.reduceat(g.values, starts, axis=1)
    )
    nsel = np.add.reduceat(g.selected.astype(np.int64), starts, axis=1)
    m, nb = vals.shape
    return pd.DataFrame(
        {
            "block": np.repeat([b for b, _ in g.keys], nb),
            "kind": np.repeat([k for _, k in g.keys], nb),
            "bin": np.tile(np.arange(nb), m),
            "lo": np.tile(starts, m),
            "hi": np.tile(edges[1:], m),
            value: vals.reshape(-1),
            "n_selected": nsel.reshape(-1),
            "frac_selected": (nsel / widths).reshape(-1),
        }
    )


def sig_dff(sig: Any) -> int:
    """``d_ff`` of a signature (from its layout, else its first score tensor)."""
    lay = getattr(sig, "layout", None) or {}
    if "d_ff" in lay:
        return int(lay["d_ff"])
    return int(next(iter(sig.norm_term.values())).numel())


def selection_thresholds(sig: Any, value: str = "score") -> pd.DataFrame:
    """Per (block, kind): the smallest selected ``value`` (the module's effective cut) and n_selected."""
    g = channel_grid(sig, value)
    thr = np.where(g.selected, g.values, np.inf).min(1)
    return pd.DataFrame(
        {
            "block": [b for b, _ in g.keys],
            "kind": [k for _, k in g.keys],
            "threshold": np.where(np.isfinite(thr), thr, np.nan),
            "n_selected": g.selected.sum(1),
        }
    )
