"""plotly figures of a :class:`~bdvax_lab.bdvax.signature.Signature` (paper §4.2), built from its tensors.

Every figure function takes a Signature (selected or not: an unselected one is
selected with its own config first) and returns a ``plotly.graph_objects.Figure``.
Nothing trains or touches a model; even for SmolLM2 (30 blocks × 3 kinds × 1536
channels = 138 240 scores) a figure is cheap enough to redraw on every slider
move (:mod:`bdvax_lab.viz.widgets`). The dense arrays and per-module / per-bin
tables the figures are drawn from are :mod:`bdvax_lab.viz.signature_grid`.

* :func:`score_heatmap` — block × module kind: mean score (or norm / align term,
  max, top-ρ mass, mass share, selected share), each cell annotated with the
  share of its channels that is selected.
* :func:`channel_heatmap` — per kind, block × channel bin: mean (or max) score
  per bin, with the selected channels marked (dots sized by the selected share
  of the bin) or the selected share itself as the colour.
* :func:`score_histogram` — the score distribution, selected vs not, with the
  selection threshold(s) marked (one for a global percentile; the range and
  median of the per-module thresholds for per-module top-ρ).
* :func:`layer_counts_figure` — selected channels per block and kind (stacked),
  and selected attention heads per block when there are any; the table behind it
  is :func:`layer_counts`.
* :func:`rho_curve_figure` — ASR / false-trigger / utility against ρ for the
  signature and a random control (the table :func:`bdvax_lab.bdvax.budget.rho_curve`
  measures).
* :func:`stage_metrics_figure` — ASR / false-trigger / utility per purification
  stage (``PurifyResult.report``), one colour per model or setting.
* :func:`compare_selections` — pairwise Jaccard overlap of several selections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..core.registry import MLP_KINDS
from .signature_grid import (
    channel_bins,
    channel_grid,
    ensure_selected,
    module_table,
    selection_thresholds,
    sig_dff,
)

#: Per-(block, kind) values :func:`score_heatmap` can colour by.
HEATMAP_VALUES: dict[str, str] = {
    "score": "mean score S",
    "norm": "mean norm term",
    "align": "mean alignment term",
    "max": "max score S",
    "selected_mass": "top-ρ mass (Σ S over selected)",
    "mass_share": "share of all selected mass",
    "frac_selected": "share of channels selected",
}


SELECTION_COLORS = {"signature": "#1f77b4", "random": "#7f7f7f", "none": "#2ca02c"}


METRIC_LABELS = {
    "asr": "ASR",
    "false_trigger": "false-trigger rate",
    "utility": "utility",
    "ppl": "perplexity",
    "mcq_acc": "MCQ accuracy",
    "mcq_acc_norm": "MCQ accuracy (norm)",
    "agreement": "agreement (F1)",
    "degenerate_triggered": "degenerate (triggered)",
    "degenerate_clean": "degenerate (clean)",
}


def _title_suffix(selection: Mapping[str, Any]) -> str:
    if not selection:
        return ""
    parts = [
        f"ρ={selection.get('rho', float('nan')):.2f}",
        f"{selection.get('scope', '?')} scope",
        f"{selection.get('score', '?')}",
    ]
    if selection.get("score") == "combined":
        parts.append(f"λ={selection.get('lam', float('nan')):g}")
    if selection.get("heads"):
        parts.append(f"{selection['heads']} heads")
    return " (" + ", ".join(parts) + ")"


def layer_counts(sig: Any) -> pd.DataFrame:
    """Selected counts per block: one column per MLP kind, ``heads``, ``channels`` (sum over kinds) and
    ``frac`` (channels / all MLP channels of the block)."""
    sig = ensure_selected(sig)
    t = module_table(sig)
    wide = t.pivot(index="block", columns="kind", values="n_selected").reindex(columns=list(MLP_KINDS))
    wide = wide.fillna(0).astype(np.int64)
    wide.columns = [str(c) for c in wide.columns]
    heads = {int(b): int(v.numel()) for b, v in (sig.selected_heads or {}).items()}
    wide["heads"] = [heads.get(int(b), 0) for b in wide.index]
    wide["channels"] = wide[[k for k in MLP_KINDS if k in wide.columns]].sum(1)
    n_all = t.groupby("block")["n_channels"].sum().reindex(wide.index)
    wide["frac"] = wide["channels"] / n_all
    wide.index.name = "block"
    return wide.reset_index()


# =========================================================================== figures
def score_heatmap(
    sig: Any,
    value: str = "score",
    *,
    annotate: bool = True,
    title: str | None = None,
    colorscale: str = "Viridis",
) -> Any:
    """Heatmap of a per-module quantity: blocks on x, module kind (gate/up/down) on y.

    ``value``: one of :data:`HEATMAP_VALUES` — ``"score"`` (mean S), ``"norm"``,
    ``"align"``, ``"max"``, ``"selected_mass"`` (the top-ρ mass Σ S over the
    selected channels), ``"mass_share"`` or ``"frac_selected"``. With
    ``annotate`` each cell shows the share of its channels that is selected
    (uniform under per-module top-ρ; informative under a global percentile).
    """
    import plotly.graph_objects as go

    if value not in HEATMAP_VALUES:
        raise ValueError(f"value={value!r}; choose one of {list(HEATMAP_VALUES)}")
    sig = ensure_selected(sig)
    t = module_table(sig)
    blocks = sorted(t.block.unique().tolist())
    kinds = [k for k in MLP_KINDS if k in set(t.kind)]
    z = t.pivot(index="kind", columns="block", values=value).reindex(index=kinds, columns=blocks)
    frac = t.pivot(index="kind", columns="block", values="frac_selected").reindex(index=kinds, columns=blocks)
    nsel = t.pivot(index="kind", columns="block", values="n_selected").reindex(index=kinds, columns=blocks)
    text = np.vectorize(lambda f: "" if not np.isfinite(f) else f"{100 * f:.0f}")(frac.to_numpy(dtype=float))
    custom = np.dstack([frac.to_numpy(dtype=float), nsel.to_numpy(dtype=float)])
    trace = go.Heatmap(
        z=z.to_numpy(dtype=float),
        x=blocks,
        y=kinds,
        colorscale=colorscale,
        customdata=custom,
        text=text if annotate else None,
        texttemplate="%{text}" if annotate else None,
        textfont={"size": 9},
        colorbar={"title": {"text": value}},
        hovertemplate=(
            "block %{x} · %{y}<br>" + HEATMAP_VALUES[value] + " %{z:.4g}<br>"
            "selected %{customdata[1]:.0f} (%{customdata[0]:.1%})<extra></extra>"
        ),
    )
    fig = go.Figure(trace)
    sub = " — cell text: % of channels selected" if annotate else ""
    fig.update_layout(
        title=title or f"{HEATMAP_VALUES[value]} per block × module{_title_suffix(sig.selection or {})}{sub}",
        xaxis={"title": "block", "dtick": 1 if len(blocks) <= 32 else None},
        yaxis={"title": "module", "autorange": "reversed"},
        height=150 + 45 * len(kinds),
        margin={"l": 60, "r": 20, "t": 60, "b": 40},
    )
    return fig


def channel_heatmap(
    sig: Any,
    bins: int = 64,
    *,
    value: str = "score",
    agg: str = "mean",
    mark: str = "overlay",
    title: str | None = None,
    colorscale: str = "Viridis",
) -> Any:
    """Block × channel-bin heatmaps, one panel per MLP kind, with the selected channels marked.

    Channel ``j`` is row ``j`` of gate/up and column ``j`` of down; the ``d_ff``
    channels are cut into ``bins`` contiguous bins. Colour: ``value``
    ("score", "norm" or "align") aggregated by ``agg`` ("mean"/"max").
    ``mark="overlay"`` (default) draws a red dot on every bin holding selected
    channels, its size ∝ the selected share of the bin; ``mark="fraction"``
    colours by the selected share instead; ``mark="none"`` shows scores only.
    Channel indices carry no order, so look for *which blocks* hold the mass,
    not for shapes along the channel axis.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if mark not in ("overlay", "fraction", "none"):
        raise ValueError(f"mark={mark!r}; choose overlay, fraction or none")
    sig = ensure_selected(sig)
    df = channel_bins(sig, bins, value, agg)
    kinds = [k for k in MLP_KINDS if k in set(df.kind)]
    blocks = sorted(df.block.unique().tolist())
    nb = int(df.bin.max()) + 1
    color_col = "frac_selected" if mark == "fraction" else value
    fig = make_subplots(
        rows=len(kinds),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[f"{k}_proj" for k in kinds],
    )
    zmin, zmax = (0.0, 1.0) if mark == "fraction" else (float(df[value].min()), float(df[value].max()))
    for r, kind in enumerate(kinds, start=1):
        d = df[df.kind == kind]
        z = d.pivot(index="block", columns="bin", values=color_col).reindex(index=blocks, columns=range(nb))
        lo = d.pivot(index="block", columns="bin", values="lo").reindex(index=blocks, columns=range(nb))
        hi = d.pivot(index="block", columns="bin", values="hi").reindex(index=blocks, columns=range(nb))
        fr = d.pivot(index="block", columns="bin", values="frac_selected").reindex(
            index=blocks, columns=range(nb)
        )
        custom = np.dstack([lo.to_numpy(dtype=float), hi.to_numpy(dtype=float) - 1, fr.to_numpy(dtype=float)])
        fig.add_trace(
            go.Heatmap(
                z=z.to_numpy(dtype=float),
                x=list(range(nb)),
                y=blocks,
                customdata=custom,
                colorscale=colorscale,
                zmin=zmin,
                zmax=zmax,
                showscale=r == 1,
                name=kind,
                colorbar={"title": {"text": "selected share" if mark == "fraction" else f"{agg} {value}"}},
                hovertemplate=(
                    f"{kind} · block %{{y}}<br>channels %{{customdata[0]:.0f}}–%{{customdata[1]:.0f}}<br>"
                    f"{'selected share' if mark == 'fraction' else agg + ' ' + value} %{{z:.4g}}<br>"
                    "selected %{customdata[2]:.1%}<extra></extra>"
                ),
            ),
            row=r,
            col=1,
        )
        if mark == "overlay":
            s = d[d.n_selected > 0]
            fig.add_trace(
                go.Scatter(
                    x=s["bin"],
                    y=s["block"],
                    mode="markers",
                    name="selected",
                    legendgroup="selected",
                    showlegend=r == 1,
                    hoverinfo="skip",
                    marker={
                        "size": 2 + 6 * np.sqrt(s["frac_selected"].to_numpy()),
                        "color": "#d62728",
                        "line": {"width": 0},
                    },
                ),
                row=r,
                col=1,
            )
        fig.update_yaxes(title_text="block", row=r, col=1)
    fig.update_xaxes(
        title_text=f"channel bin ({nb} bins of ~{math.ceil(sig_dff(sig) / max(1, nb))} channels)",
        row=len(kinds),
        col=1,
    )
    what = "selected share" if mark == "fraction" else f"{agg} {value}"
    fig.update_layout(
        title=title or f"{what} per block × channel bin{_title_suffix(sig.selection or {})}",
        height=180 + 170 * len(kinds),
        margin={"l": 60, "r": 20, "t": 70, "b": 40},
        legend={"orientation": "h", "y": 1.06, "x": 1, "xanchor": "right"},
    )
    return fig


def score_histogram(
    sig: Any,
    *,
    value: str = "score",
    bins: int = 80,
    log_y: bool = True,
    kinds: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """Distribution of channel ``value`` (selected vs not, stacked), with the selection threshold(s) marked.

    Global scope: one dashed line at the smallest selected score. Per-module
    scope: every module has its own cut, so the band spans the smallest to the
    largest module threshold and the dashed line is their median. Binned with
    numpy (the browser gets ``bins`` bars, not 138k raw values).
    """
    import plotly.graph_objects as go

    sig = ensure_selected(sig)
    g = channel_grid(sig, value)
    rows = [i for i, (_, k) in enumerate(g.keys) if kinds is None or k in kinds]
    vals, sel = g.values[rows].reshape(-1), g.selected[rows].reshape(-1)
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        hi = lo + 1e-12
    edges = np.linspace(lo, hi, int(bins) + 1)
    h_sel, _ = np.histogram(vals[sel], edges)
    h_rest, _ = np.histogram(vals[~sel], edges)
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig = go.Figure(
        [
            go.Bar(
                x=centers,
                y=h_rest,
                width=width,
                name="not selected",
                marker_color="#9aa5b1",
                hovertemplate="%{x:.4g}: %{y} channels<extra>not selected</extra>",
            ),
            go.Bar(
                x=centers,
                y=h_sel,
                width=width,
                name="selected",
                marker_color="#d62728",
                hovertemplate="%{x:.4g}: %{y} channels<extra>selected</extra>",
            ),
        ]
    )
    scope = (sig.selection or {}).get("scope", "module")
    thr = selection_thresholds(sig, value)
    thr = thr.iloc[rows].threshold.dropna() if len(thr) else thr.threshold
    n_sel, n_all = int(sel.sum()), int(sel.size)
    if len(thr) and n_sel > 0:
        if scope == "global" or thr.nunique() == 1:
            fig.add_vline(
                x=float(thr.min()),
                line_dash="dash",
                line_color="black",
                annotation_text=f"threshold {float(thr.min()):.4g}",
                annotation_position="top right",
            )
        else:
            fig.add_vrect(
                x0=float(thr.min()),
                x1=float(thr.max()),
                fillcolor="orange",
                opacity=0.15,
                line_width=0,
                annotation_text="per-module thresholds",
                annotation_position="top left",
            )
            fig.add_vline(
                x=float(thr.median()),
                line_dash="dash",
                line_color="black",
                annotation_text=f"median {float(thr.median()):.4g}",
                annotation_position="top right",
            )
    fig.update_layout(
        barmode="stack",
        bargap=0,
        height=340,
        title=title
        or f"{value} distribution: {n_sel} of {n_all} channels selected{_title_suffix(sig.selection or {})}",
        xaxis_title=value,
        yaxis_title="channels",
        yaxis_type="log" if log_y else "linear",
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"},
        margin={"l": 60, "r": 20, "t": 70, "b": 40},
    )
    return fig


def layer_counts_figure(sig: Any, *, title: str | None = None) -> Any:
    """Selected channels per block stacked by kind (left axis) and, if any, selected heads (right axis)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sig = ensure_selected(sig)
    c = layer_counts(sig)
    colors = {"gate": "#1f77b4", "up": "#ff7f0e", "down": "#2ca02c"}
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for kind in MLP_KINDS:
        if kind in c.columns:
            fig.add_trace(
                go.Bar(
                    x=c.block,
                    y=c[kind],
                    name=f"{kind} channels",
                    marker_color=colors[kind],
                    hovertemplate=f"block %{{x}}: %{{y}} {kind} channels<extra></extra>",
                ),
                secondary_y=False,
            )
    has_heads = bool(c["heads"].sum())
    if has_heads:
        fig.add_trace(
            go.Scatter(
                x=c.block,
                y=c.heads,
                name="heads",
                mode="markers+lines",
                marker={"symbol": "diamond", "size": 8, "color": "black"},
                hovertemplate="block %{x}: %{y} heads<extra></extra>",
            ),
            secondary_y=True,
        )
    total = int(c.channels.sum())
    fig.update_layout(
        barmode="stack",
        height=320,
        title=title
        or f"selected per block: {total} channels, {int(c.heads.sum())} heads"
        f"{_title_suffix(sig.selection or {})}",
        xaxis={"title": "block", "dtick": 1 if len(c) <= 32 else None},
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"},
        margin={"l": 60, "r": 20, "t": 70, "b": 40},
    )
    fig.update_yaxes(title_text="selected channels", secondary_y=False)
    fig.update_yaxes(title_text="selected heads", secondary_y=True, showgrid=False, visible=has_heads)
    return fig


def _utility_column(df: pd.DataFrame) -> str | None:
    for c in ("utility", "ppl", "mcq_acc", "agreement"):
        if c in df.columns and df[c].notna().any():
            return c
    return None


def rho_curve_figure(
    df: pd.DataFrame, metrics: Sequence[str] | None = None, *, x: str = "rho", title: str | None = None
) -> Any:
    """ASR / false-trigger / utility against ρ, one line per ``selection`` ("signature", "random", ...).

    ``df``: one row per (rho, selection[, seed]) with metric columns (e.g. from
    :func:`bdvax_lab.bdvax.budget.rho_curve`). ``metrics`` default: asr,
    false_trigger and the first utility column present (utility, ppl,
    mcq_acc, agreement); one panel each, shared ρ axis. Several rows per point
    (random seeds) are averaged, with min–max error bars.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = df.copy()
    if "selection" not in df.columns:
        df["selection"] = "signature"
    if metrics is None:
        metrics = [m for m in ("asr", "false_trigger") if m in df.columns]
        u = _utility_column(df)
        if u:
            metrics.append(u)
    metrics = [m for m in metrics if m in df.columns]
    if not metrics:
        raise ValueError(f"rho_curve_figure: none of the metric columns found in {list(df.columns)}")
    fig = make_subplots(
        rows=len(metrics),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics],
    )
    palette = ["#1f77b4", "#7f7f7f", "#2ca02c", "#9467bd", "#8c564b"]
    sels = list(dict.fromkeys(df["selection"].astype(str)))
    for r, m in enumerate(metrics, start=1):
        for i, s in enumerate(sels):
            d = (
                df[df["selection"].astype(str) == s]
                .groupby(x)[m]
                .agg(["mean", "min", "max", "size"])
                .reset_index()
            )
            color = SELECTION_COLORS.get(s, palette[i % len(palette)])
            err = None
            if (d["size"] > 1).any():
                err = {
                    "type": "data",
                    "symmetric": False,
                    "array": d["max"] - d["mean"],
                    "arrayminus": d["mean"] - d["min"],
                    "thickness": 1,
                }
            fig.add_trace(
                go.Scatter(
                    x=d[x],
                    y=d["mean"],
                    mode="lines+markers",
                    name=s,
                    legendgroup=s,
                    showlegend=r == 1,
                    error_y=err,
                    line={"color": color, "dash": "dash" if s == "random" else "solid"},
                    hovertemplate=f"{s}: ρ=%{{x:.2f}} {m}=%{{y:.3g}}<extra></extra>",
                ),
                row=r,
                col=1,
            )
        if m in ("asr", "false_trigger", "mcq_acc", "mcq_acc_norm", "agreement"):
            fig.update_yaxes(range=[-0.03, 1.03], row=r, col=1)
    fig.update_xaxes(
        title_text="ρ (fraction of MLP channels suppressed)" if x == "rho" else x, row=len(metrics), col=1
    )
    fig.update_layout(
        title=title or "Suppression curve: signature vs random channels",
        height=170 + 200 * len(metrics),
        legend={"orientation": "h", "y": 1.04, "x": 1, "xanchor": "right", "yanchor": "bottom"},
        margin={"l": 60, "r": 20, "t": 80, "b": 40},
    )
    return fig


def stage_metrics_figure(
    reports: pd.DataFrame | Mapping[str, pd.DataFrame],
    metrics: Sequence[str] = ("asr", "false_trigger", "mcq_acc", "ppl"),
    *,
    title: str | None = None,
) -> Any:
    """Grouped bars of ``metrics`` per purification stage; one colour per report (e.g. per setting).

    ``reports``: a ``PurifyResult.report`` (index = stage) or ``{name: report}``.
    Rates share a 0–1 axis; perplexity gets its own panel. Missing metrics are skipped.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if isinstance(reports, pd.DataFrame):
        reports = {"model": reports}
    frames = []
    for name, rep in reports.items():
        r = rep.reset_index() if "stage" not in rep.columns else rep.copy()
        if "stage" not in r.columns:
            r = r.rename(columns={r.columns[0]: "stage"})
        frames.append(r.assign(model=name))
    df = pd.concat(frames, ignore_index=True)
    metrics = [m for m in metrics if m in df.columns and df[m].notna().any()]
    if not metrics:
        raise ValueError("stage_metrics_figure: none of the metrics is in the reports")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics])
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f"]
    stages = list(dict.fromkeys(df["stage"].astype(str)))
    for c, m in enumerate(metrics, start=1):
        for i, (name, d) in enumerate(df.groupby("model", sort=False)):
            d = d.set_index(d["stage"].astype(str)).reindex(stages)
            fig.add_trace(
                go.Bar(
                    x=stages,
                    y=d[m],
                    name=str(name),
                    legendgroup=str(name),
                    showlegend=c == 1,
                    marker_color=palette[i % len(palette)],
                    text=[("" if pd.isna(v) else f"{v:.2f}") for v in d[m]],
                    textposition="outside",
                    hovertemplate=f"{name} · %{{x}}: {m} %{{y:.3g}}<extra></extra>",
                ),
                row=1,
                col=c,
            )
        if m in ("asr", "false_trigger", "mcq_acc", "mcq_acc_norm", "agreement"):
            fig.update_yaxes(range=[0, 1.12], row=1, col=c)
    fig.update_layout(
        barmode="group",
        height=380,
        title=title or "Before / suppressed / after, per model",
        legend={"orientation": "h", "y": 1.08, "x": 1, "xanchor": "right", "yanchor": "bottom"},
        margin={"l": 50, "r": 20, "t": 90, "b": 40},
    )
    return fig


def compare_selections(sigs: Mapping[str, Any]) -> pd.DataFrame:
    """Pairwise Jaccard overlap (|A ∩ B| / |A ∪ B|) of the selected MLP channels of several selections.

    ``sigs``: Signatures or :class:`~bdvax_lab.weights.selection.Selection`\\ s by name. The diagonal
    holds each one's channel count.
    """
    sets: dict[str, set[tuple[int, str, int]]] = {}
    for name, s in sigs.items():
        sel = s.selected if getattr(s, "selected", None) is not None else ensure_selected(s).selected
        sets[name] = {(b, k, int(j)) for (b, k), v in sel.items() for j in v.tolist()}
    names = list(sets)
    out = pd.DataFrame(index=names, columns=names, dtype=float)
    for a in names:
        for b in names:
            if a == b:
                out.loc[a, b] = float(len(sets[a]))
            else:
                union = len(sets[a] | sets[b])
                out.loc[a, b] = len(sets[a] & sets[b]) / union if union else float("nan")
    return out
