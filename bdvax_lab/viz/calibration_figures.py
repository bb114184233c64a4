"""The ρ calibration curve (:mod:`bdvax_lab.bdvax.calibration`) as a plotly figure."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


def calibration_figure(
    result: Any,
    *,
    current_rho: float | None = None,
    height: int = 420,
) -> Any:
    """Held-out ASR (top) and what suppression costs (bottom) against the candidate ρ.

    ``result``: a :class:`~bdvax_lab.bdvax.calibration.CalibrationResult`, or its ``frame`` (columns rho,
    held_out_variant, held_out_asr, clean_drift, ppl_ratio). Top: one thin line per held-out variant,
    their mean in bold, the threshold dashed and the chosen ρ as a vertical line. Bottom: the perplexity
    of the self-distilled replies (``exp(clean_drift)``) and of ground-truth answers, each relative to the
    unsuppressed twin (1 = unchanged). ``current_rho``: a dotted marker (e.g. the explorer's slider).
    With several head budgets (``CalibrationConfig.heads``) the thin lines and the cost are the chosen
    budget's, and each budget gets its own mean line.
    """
    from plotly.subplots import make_subplots

    frame = result if isinstance(result, pd.DataFrame) else result.frame
    chosen = None if isinstance(result, pd.DataFrame) else result.rho
    threshold = None if isinstance(result, pd.DataFrame) else result.config.max_asr
    keep = None if isinstance(result, pd.DataFrame) else set(result.informative)
    frame = frame.assign(heads=frame["heads"].fillna(0).astype(int) if "heads" in frame else 0)
    budgets = sorted(frame.loc[frame.rho > 0, "heads"].unique()) or [0]
    shown = int(result.heads) if not isinstance(result, pd.DataFrame) else int(budgets[0])
    several = len(budgets) > 1
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.62, 0.38],
        vertical_spacing=0.08,
        subplot_titles=("held-out ASR (own key, own behaviour)", "cost, relative to the unsuppressed twin"),
    )
    d = frame.sort_values("rho")
    at = d[(d.rho == 0) | (d.heads == shown)]  # the chosen head budget's curve, from the unsuppressed twin
    for v, g in at.groupby("held_out_variant"):
        faded = keep is not None and int(v) not in keep
        fig.add_scatter(
            x=g.rho,
            y=g.held_out_asr,
            mode="lines+markers",
            line={"width": 1, "dash": "dot" if faded else "solid"},
            marker={"size": 4},
            opacity=0.35 if faded else 0.6,
            name=f"variant {v} ({g.key.iloc[0]})" + (" · not counted" if faded else ""),
            legendgroup="variants",
            row=1,
            col=1,
        )
    counted = d if keep is None else d[d.held_out_variant.isin(keep)]
    for h in budgets:
        one = counted[(counted.rho == 0) | (counted.heads == h)]
        mean = one.groupby("rho", as_index=False).held_out_asr.mean()
        fig.add_scatter(
            x=mean.rho,
            y=mean.held_out_asr,
            mode="lines+markers",
            line={"width": 3 if h == shown else 2, "dash": "solid" if h == shown else "dash"},
            name=f"mean, {h} heads" if several else "mean",
            row=1,
            col=1,
        )
    counted = counted[(counted.rho == 0) | (counted.heads == shown)]
    cost = counted.groupby("rho", as_index=False)[["clean_drift", "ppl_ratio"]].mean()
    fig.add_scatter(
        x=cost.rho,
        y=[math.exp(v) if pd.notna(v) else None for v in cost.clean_drift],
        mode="lines+markers",
        name="self-distilled replies: ppl ratio",
        row=2,
        col=1,
    )
    fig.add_scatter(
        x=cost.rho,
        y=cost.ppl_ratio,
        mode="lines+markers",
        name="ground-truth answers: ppl ratio",
        row=2,
        col=1,
    )
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", line_color="grey", row=1, col=1)
    if chosen is not None:
        label = f"chosen ρ={chosen:g}" + (f", {shown} heads" if several or shown else "")
        fig.add_vline(x=chosen, line_color="green", annotation_text=label)
    if current_rho is not None:
        fig.add_vline(x=current_rho, line_dash="dot", line_color="black", annotation_text="slider")
    fig.update_yaxes(title_text="ASR", range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="ratio", row=2, col=1)
    fig.update_xaxes(title_text="ρ (fraction of MLP channels suppressed)", row=2, col=1)
    fig.update_layout(template="plotly_white", height=height, margin={"t": 40, "b": 40})
    return fig
