"""Plotly figures of the sanity checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .sanity import SanityContext


def _attn_label(zero_attention: bool) -> str:
    return "attention zeroed" if zero_attention else "attention kept"


# --------------------------------------------------------------------------- figures
def _title(ctx: SanityContext, what: str) -> str:
    return f"{what} — {ctx.attack.name} → {ctx.behavior.name} ({ctx.setting}, {ctx.layout.n_blocks} blocks)"


def figure_attention_vs_mlp(df: pd.DataFrame, title: str = "Attention vs MLP deltas") -> Any:
    from ..viz.figures import rates_bar

    fig = rates_bar(
        df, x="condition", rates=("asr", "false_trigger", "p_behavior", "p_behavior_clean"), title=title
    )
    fig.update_layout(yaxis_title="rate / probability")
    return fig


#: trace colour by "attention zeroed?" in the sanity figures
ATTN_COLORS = {False: "#1f77b4", True: "#d62728"}


def figure_span_sweep(
    df: pd.DataFrame, n_blocks: int | None = None, title: str = "Block-span ablation"
) -> Any:
    """ASR (solid) and first-token behaviour probability (dotted) vs k, mean over starts; one colour per
    attention setting; each start as a faint marker."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for za in (False, True):
        sub = df[df.attention_zeroed == za]
        if sub.empty:
            continue
        agg = sub.groupby("k", as_index=False).agg(
            asr=("asr", "mean"),
            asr_min=("asr", "min"),
            asr_max=("asr", "max"),
            p=("p_behavior", "mean"),
            n=("asr", "size"),
        )
        lab = _attn_label(za)
        fig.add_trace(
            go.Scatter(
                x=agg.k.astype(float),
                y=agg.asr,
                mode="lines+markers",
                name=f"ASR, {lab}",
                line=dict(color=ATTN_COLORS[za]),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=agg.asr_max - agg.asr,
                    arrayminus=agg.asr - agg.asr_min,
                    thickness=1,
                    width=3,
                ),
                hovertemplate="k=%{x}<br>mean ASR=%{y:.2f}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=agg.k.astype(float),
                y=agg.p,
                mode="lines",
                name=f"p(behaviour token), {lab}",
                line=dict(color=ATTN_COLORS[za], dash="dot"),
                hovertemplate="k=%{x}<br>p=%{y:.3f}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=sub.k.astype(float),
                y=sub.asr,
                mode="markers",
                name=f"each start, {lab}",
                showlegend=True,
                marker=dict(color=ATTN_COLORS[za], size=6, opacity=0.35, symbol="circle-open"),
                customdata=np.stack([sub.start.astype(float), sub.blocks], axis=1) if len(sub) else None,
                hovertemplate=(
                    "k=%{x}, start=%{customdata[0]}<br>ASR=%{y:.2f}<br>"
                    "MLP kept: %{customdata[1]}<extra></extra>"
                ),
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="k (consecutive blocks whose MLP ΔW is zeroed)",
        yaxis_title="ASR / probability",
        yaxis_range=[-0.03, 1.05],
        legend_title="",
    )
    if n_blocks:
        fig.update_xaxes(range=[-0.5, n_blocks + 0.5])
    return fig


def _bars_with_probe(df: pd.DataFrame, x: str, title: str, xaxis_title: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for za in (False, True):
        sub = df[df.attention_zeroed == za]
        if sub.empty:
            continue
        fig.add_trace(
            go.Bar(
                x=sub[x],
                y=sub.asr,
                name=f"ASR, {_attn_label(za)}",
                marker_color=ATTN_COLORS[za],
                opacity=0.8,
                hovertemplate="%{x}<br>ASR=%{y:.2f}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=sub[x],
                y=sub.p_behavior,
                mode="markers",
                name=f"p(behaviour token), {_attn_label(za)}",
                marker=dict(
                    color=ATTN_COLORS[za], symbol="diamond", size=10, line=dict(width=1, color="black")
                ),
                hovertemplate="%{x}<br>p=%{y:.3f}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis_title=xaxis_title,
        yaxis_title="ASR / probability",
        yaxis_range=[0, 1.05],
        legend_title="",
    )
    return fig


def figure_keep_only_spans(df: pd.DataFrame, title: str = "Keep only one span of MLP deltas") -> Any:
    df = df.assign(span=[f"MLP {b} kept" for b in df.blocks])
    return _bars_with_probe(df, "span", title, "span of blocks whose MLP ΔW is kept")


def figure_shuffle_blocks(df: pd.DataFrame, title: str = "MLP deltas shuffled across blocks") -> Any:
    df = df.assign(which=["unshuffled" if pd.isna(s) else f"seed {s}" for s in df.seed])
    return _bars_with_probe(df, "which", title, "MLP ΔW permutation")
