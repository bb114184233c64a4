"""How much of the oracle's top set a channel ranking recovers: precision@k and AUROC (evaluation only).

A *ranking* is a score per MLP channel, ``[L, d_ff]`` (higher = more suspect), or the per-module dict
``{(block, kind): Tensor[d_ff]}`` a signature or ``top_delta`` gives (:func:`neuron_scores` folds its
gate/up/down entries of channel ``j`` into one number). The oracle's *top set* is its ``n_top`` units of
largest attribution (:func:`bdvax_lab.analysis.probes.attribution.oracle_attribution`). Ties in a ranking
are broken by the lower flat index (block-major), as :func:`bdvax_lab.weights.selection.top_indices` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

OVERLAP_COLUMNS = ["ranking", "seed", "k", "precision_at_k", "auroc", "mass_at_k", "n_top", "n_units"]

AGGREGATES = ("sum", "max")


def neuron_scores(scores: Mapping[Any, torch.Tensor], n_blocks: int, aggregate: str = "sum") -> torch.Tensor:
    """``{(block, kind): [d_ff]}`` → ``[n_blocks, d_ff]``: each channel's scores over its modules summed
    (``"sum"``) or their largest (``"max"``); blocks without scores are zero."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r}; choose one of {AGGREGATES}")
    if not scores:
        raise ValueError("neuron_scores: no scores given")
    d_ff = next(iter(scores.values())).numel()
    out = torch.zeros(n_blocks, d_ff, dtype=torch.float64)
    seen = torch.zeros(n_blocks, dtype=torch.bool)
    for (b, _), t in scores.items():
        t = t.detach().double().reshape(-1)
        out[int(b)] = (
            out[int(b)] + t if aggregate == "sum" or not seen[int(b)] else torch.maximum(out[int(b)], t)
        )
        seen[int(b)] = True
    return out


def head_matrix(head_scores: Mapping[int, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """``{block: [n_heads]}`` (a signature's ``head_scores``) → ``[L, n_heads]``; blocks without scores are
    zero, so a head ranking can be compared with an oracle's head tensor."""
    out = torch.zeros(tuple(shape), dtype=torch.float64)
    for b, t in head_scores.items():
        out[int(b)] = t.detach().double().reshape(-1)
    return out


def top_set(values: torch.Tensor, n_top: int) -> torch.Tensor:
    """Boolean mask (same shape) of the ``n_top`` largest values (ties: lower flat index first)."""
    flat = values.reshape(-1).double()
    if not 0 < n_top <= flat.numel():
        raise ValueError(f"n_top={n_top} must be in 1..{flat.numel()}")
    chosen = torch.sort(flat, descending=True, stable=True).indices[:n_top]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(values.shape)


def precision_at_k(scores: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of the ``k`` highest-scored units that are in ``truth`` (a boolean mask of the same shape)."""
    flat = scores.reshape(-1).double()
    if not 0 < k <= flat.numel():
        raise ValueError(f"k={k} must be in 1..{flat.numel()}")
    top = torch.sort(flat, descending=True, stable=True).indices[:k]
    return float(truth.reshape(-1)[top].double().mean())


def mass_at_k(scores: torch.Tensor, oracle: torch.Tensor, k: int) -> float:
    """The oracle's summed attribution over the ``k`` highest-scored units. For the weight oracle that is
    what zeroing them would change, to first order; compare with the oracle's own top ``k``."""
    return float(oracle.reshape(-1).double()[top_set(scores, k).reshape(-1)].sum())


def auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` separating ``truth`` from the rest (ties count one half)."""
    s = pd.Series(scores.reshape(-1).double().numpy())
    y = truth.reshape(-1).numpy().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = s.rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two scores over the same units (ties get their average rank): how
    closely one ranking follows the other, e.g. a signature and the finetune's own ‖ΔW‖ (``top_delta``)."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(
            f"rank_correlation needs two scores over the same ≥ 2 units, got {a.numel()} and {b.numel()}"
        )
    ra = pd.Series(a.reshape(-1).double().numpy()).rank(method="average")
    rb = pd.Series(b.reshape(-1).double().numpy()).rank(method="average")
    return float(ra.corr(rb))


def selection_share(chosen: Mapping[Any, torch.Tensor], other: Mapping[Any, torch.Tensor]) -> float:
    """Share of the units in ``chosen`` (index tensors per module or block) that ``other`` chose too."""
    total = sum(int(t.numel()) for t in chosen.values())
    if not total:
        return float("nan")
    both = sum(len(set(t.tolist()) & set(other[k].tolist())) for k, t in chosen.items() if k in other)
    return both / total


def random_scores(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Seeded uniform scores: the ranking of a random selection (what ``random`` controls draw)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=g, dtype=torch.float64)


def ranking_overlap(
    oracle: torch.Tensor,
    rankings: Mapping[str, torch.Tensor],
    *,
    n_top: int | None = None,
    ks: Sequence[int] | None = None,
    random_seeds: Sequence[int] = (0, 1, 2, 3, 4),
) -> pd.DataFrame:
    """precision@k, AUROC and mass@k of every ranking against the oracle, one row per (ranking, seed, k).

    ``oracle``: attributions ``[L, d_ff]`` (or any shape the rankings share); ``rankings``: name → scores of
    that shape (a per-module dict is folded with :func:`neuron_scores` first); ``n_top``: size of the
    oracle's top set (default 1% of the units, at least 1); ``ks``: the k's (default ``n_top`` and its
    doubles up to 8×, within the unit count); ``random_seeds``: one ``random`` ranking per seed
    (:func:`random_scores`; none with an empty tuple). Columns :data:`OVERLAP_COLUMNS` (``seed`` is None
    for deterministic rankings).
    """
    n_units = oracle.numel()
    n_top = max(1, n_units // 100) if n_top is None else int(n_top)
    truth = top_set(oracle, n_top)
    ks = list(ks) if ks is not None else [k for k in (n_top, 2 * n_top, 4 * n_top, 8 * n_top) if k <= n_units]
    items: list[tuple[str, int | None, torch.Tensor]] = []
    for name, r in rankings.items():
        r = neuron_scores(r, oracle.shape[0]) if isinstance(r, Mapping) else r
        if tuple(r.shape) != tuple(oracle.shape):
            raise ValueError(f"ranking {name!r} has shape {tuple(r.shape)}, the oracle {tuple(oracle.shape)}")
        items.append((name, None, r))
    items += [("random", int(s), random_scores(oracle.shape, s)) for s in random_seeds]
    rows = []
    for name, seed, r in items:
        area = auroc(r, truth)
        for k in ks:
            rows.append(
                {
                    "ranking": name,
                    "seed": seed,
                    "k": int(k),
                    "precision_at_k": precision_at_k(r, truth, int(k)),
                    "auroc": area,
                    "mass_at_k": mass_at_k(r, oracle, int(k)),
                    "n_top": n_top,
                    "n_units": n_units,
                }
            )
    return pd.DataFrame(rows, columns=OVERLAP_COLUMNS)


def overlap_figure(df: pd.DataFrame) -> Any:
    """precision@k against k per ranking (random: mean over seeds, min–max band); AUROC in the legend."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, g in df.groupby("ranking", sort=False):
        agg = g.groupby("k").precision_at_k.agg(["mean", "min", "max"]).reset_index()
        area = g.auroc.mean()
        if g.seed.notna().any() and g.seed.nunique() > 1:
            fig.add_scatter(
                x=list(agg.k) + list(agg.k[::-1]),
                y=list(agg["max"]) + list(agg["min"][::-1]),
                fill="toself",
                line={"width": 0},
                opacity=0.2,
                name=f"{name} (seeds: min–max)",
                hoverinfo="skip",
            )
        fig.add_scatter(x=agg.k, y=agg["mean"], mode="lines+markers", name=f"{name} · AUROC {area:.2f}")
    n_top = int(df.n_top.iloc[0]) if len(df) else 0
    fig.update_layout(
        title=f"How much of the oracle's top {n_top} channels each ranking recovers",
        xaxis_title="k (top-k channels of the ranking)",
        yaxis_title="precision@k",
        yaxis_range=[-0.02, 1.02],
        template="plotly_white",
    )
    return fig
