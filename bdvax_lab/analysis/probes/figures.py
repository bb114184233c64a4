"""Plotly figures of the probes, and overlaying a signature's per-layer mass on them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

SITE_LABELS: dict[str, str] = {
    "attn_output": "attention output",
    "mlp_hidden": "MLP hidden (down_proj input)",
    "mlp_output": "MLP output",
    "block": "residual stream (block output)",
}

SITE_COLORS: dict[str, str] = {
    "attn_output": "#1f77b4",
    "mlp_hidden": "#ff7f0e",
    "mlp_output": "#d62728",
    "block": "#2ca02c",
}

_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


# --------------------------------------------------------------------------- figures
def _dash_map(labels: Iterable[str]) -> dict[str, str]:
    return {m: _DASHES[i % len(_DASHES)] for i, m in enumerate(dict.fromkeys(labels))}


def figure_activation_diff(
    df: pd.DataFrame,
    value: str = "norm_diff",
    title: str = "Trigger-induced activation change at the last prompt position",
) -> Any:
    """Two panels: ``value`` (default ‖mean difference‖) and cosine(triggered, clean) per layer;
    colour = site, line style = model."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(value.replace("_", " "), "cosine(triggered, clean)"))
    dashes = _dash_map(df["model"])
    for (m, s), sub in df.groupby(["model", "site"], sort=False):
        sub = sub.sort_values("layer")
        for col, y in ((1, value), (2, "cosine")):
            fig.add_trace(
                go.Scatter(
                    x=sub["layer"],
                    y=sub[y],
                    mode="lines+markers",
                    name=f"{m} · {SITE_LABELS.get(s, s)}",
                    legendgroup=f"{m}{s}",
                    showlegend=col == 1,
                    line=dict(color=SITE_COLORS.get(s), dash=dashes[m]),
                    marker=dict(size=4),
                    hovertemplate=f"{m}, {s}<br>layer %{{x}}<br>{y}=%{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="layer (block)")
    fig.update_layout(title=title, legend_title="model · site")
    return fig


def figure_ablation(
    df: pd.DataFrame, title: str = "Inference-time ablation: p(behaviour's first token)"
) -> Any:
    """Bars of p(behaviour) per span, colour = ablated site; dashed line = unablated baseline."""
    import plotly.graph_objects as go

    fig = go.Figure()
    base = df[df["site"] == "none"]
    rest = df[df["site"] != "none"]
    for s, sub in rest.groupby("site", sort=False):
        color = SITE_COLORS.get(s) if s in SITE_COLORS else None
        fig.add_trace(
            go.Bar(
                x=sub["span"],
                y=sub["p_behavior"],
                name=s.replace("+", " + "),
                marker_color=color,
                error_y=dict(type="data", array=sub["p_std"], visible=True, thickness=1),
                hovertemplate=f"{s}<br>blocks %{{x}}<br>p=%{{y:.3f}}<extra></extra>",
            )
        )
    for _, r in base.iterrows():
        fig.add_hline(
            y=r["p_behavior"],
            line_dash="dash",
            line_color="black",
            annotation_text=f"no ablation ({r['model']}): {r['p_behavior']:.3f}",
        )
    mode = ", ".join(sorted(set(rest["mode"]))) if len(rest) else ""
    fig.update_layout(
        title=f"{title} ({mode}-ablated)" if mode else title,
        barmode="group",
        xaxis_title="ablated blocks",
        yaxis_title="p(behaviour's first token)",
        legend_title="site",
    )
    return fig


def figure_patching(df: pd.DataFrame, value: str = "effect", title: str | None = None) -> Any:
    """Patching effect per layer: colour = site, line style = direction (and model)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    keys = (df["model"] + " · " + df["direction"]) if df["model"].nunique() > 1 else df["direction"]
    dashes = _dash_map(keys)
    for (k, s), sub in df.assign(_key=keys).groupby(["_key", "site"], sort=False):
        sub = sub.sort_values("layer")
        fig.add_trace(
            go.Scatter(
                x=sub["layer"],
                y=sub[value],
                mode="lines+markers",
                name=f"{k} · {s}",
                line=dict(color=SITE_COLORS.get(s), dash=dashes[k]),
                marker=dict(size=5),
                hovertemplate=f"{k}, {s}<br>layer %{{x}}<br>{value}=%{{y:.4g}}<extra></extra>",
            )
        )
    fig.add_hline(y=0, line_color="gray", line_width=1)
    ylab = {
        "effect": "Δ logit difference (patched − unpatched)",
        "normalized": "normalized effect (1 = source run's metric)",
    }.get(value, value)
    fig.update_layout(
        title=title or "Activation patching: effect of one layer's site on the logit difference",
        xaxis_title="layer (block)",
        yaxis_title=ylab,
        legend_title="direction · site",
    )
    return fig


def figure_logit_lens(
    df: pd.DataFrame, value: str = "prob", title: str = "Logit lens of the behaviour token"
) -> Any:
    """p(behaviour token) read out after each block: colour = prompt set, line style = model."""
    import plotly.graph_objects as go

    fig = go.Figure()
    dashes = _dash_map(df["model"])
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    colors = {p: palette[i % len(palette)] for i, p in enumerate(dict.fromkeys(df["prompts"]))}
    for (m, p), sub in df.groupby(["model", "prompts"], sort=False):
        sub = sub.sort_values("layer")
        fig.add_trace(
            go.Scatter(
                x=sub["layer"],
                y=sub[value],
                mode="lines+markers",
                name=f"{m} · {p}",
                line=dict(color=colors[p], dash=dashes[m]),
                hovertemplate=f"{m}, {p}<br>layer %{{x}}<br>{value}=%{{y:.4g}}<extra></extra>",
            )
        )
    ylab = {
        "prob": "p(behaviour token)",
        "log_prob": "log p(behaviour token)",
        "rank": "rank of behaviour token",
    }.get(value, value)
    fig.update_layout(
        title=title,
        xaxis_title="layer (block output read through final norm + lm_head)",
        yaxis_title=ylab,
        legend_title="model · prompts",
    )
    if value == "rank":
        fig.update_yaxes(type="log")
    return fig


# --------------------------------------------------------------------------- signature overlay
def layer_mass(layer_mass_df: pd.DataFrame, value_col: str, agg: str = "sum") -> pd.Series:
    """Per-block total of ``value_col``.

    E.g. of a Signature's ``layer_summary()``, which has one row per block × kind.
    """
    if "block" not in layer_mass_df.columns:
        raise ValueError(f"layer_mass_df needs a 'block' column; it has {list(layer_mass_df.columns)}")
    if value_col not in layer_mass_df.columns:
        raise ValueError(f"layer_mass_df has no column {value_col!r}; columns: {list(layer_mass_df.columns)}")
    vals = pd.to_numeric(layer_mass_df[value_col], errors="coerce")
    if vals.isna().all():
        raise ValueError(f"column {value_col!r} is not numeric")
    return vals.groupby(layer_mass_df["block"].astype(int)).agg(agg).sort_index()


def overlay_signature(
    fig_or_df: Any,
    layer_mass_df: pd.DataFrame,
    value_col: str,
    *,
    name: str | None = None,
    agg: str = "sum",
    value: str = "effect",
) -> Any:
    """The patching curve (a figure, or a patching frame drawn with ``value``) with a signature's
    per-block mass as grey bars on a second y axis. ``layer_mass_df``: any frame with ``block``
    and the numeric ``value_col`` (rows of one block are aggregated with ``agg``)."""
    import plotly.graph_objects as go

    base = figure_patching(fig_or_df, value=value) if isinstance(fig_or_df, pd.DataFrame) else fig_or_df
    mass = layer_mass(layer_mass_df, value_col, agg)
    bar = go.Bar(
        x=mass.index.tolist(),
        y=mass.values.tolist(),
        name=name or f"signature {value_col} ({agg})",
        yaxis="y2",
        marker_color="rgba(120,120,120,0.35)",
        hovertemplate=f"block %{{x}}<br>{value_col}=%{{y:.4g}}<extra></extra>",
    )
    fig = go.Figure(data=[bar, *base.data], layout=base.layout)
    fig.update_layout(
        yaxis2=dict(title=value_col, overlaying="y", side="right", showgrid=False, rangemode="tozero"),
        legend=dict(x=1.08),
    )
    return fig


def signature_correlation(
    patch_df: pd.DataFrame,
    layer_mass_df: pd.DataFrame,
    value_col: str,
    *,
    value: str = "effect",
    agg: str = "sum",
) -> pd.DataFrame:
    """Spearman and Pearson correlation between |patching ``value``| per layer and the signature's
    per-block mass, one row per (model, direction, site)."""
    mass = layer_mass(layer_mass_df, value_col, agg)
    rows = []
    for (m, d, s), sub in patch_df.groupby(["model", "direction", "site"], sort=False):
        x = sub.set_index("layer")[value].abs()
        both = pd.concat([x, mass], axis=1, join="inner").dropna()
        a, b = both.iloc[:, 0], both.iloc[:, 1]
        ok = len(both) > 2 and a.std() > 0 and b.std() > 0
        rows.append(
            {
                "model": m,
                "direction": d,
                "site": s,
                "n_layers": len(both),
                "spearman": float(a.rank().corr(b.rank())) if ok else float("nan"),
                "pearson": float(a.corr(b)) if ok else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["model", "direction", "site", "n_layers", "spearman", "pearson"])
