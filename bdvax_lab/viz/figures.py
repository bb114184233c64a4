"""plotly figures built from the package's tidy DataFrames (no training, no model internals)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from ..core.types import Model


def weight_norms(model: Model) -> pd.DataFrame:
    """Frobenius norm of every registry projection: one row per (block, kind)."""
    from ..core.registry import MLP_KINDS, layout_of

    lay = layout_of(model)
    rows = []
    for block, kind, _ in lay.iter_modules():
        w = lay.weight(model, block, kind)
        rows.append(
            {
                "block": block,
                "kind": kind,
                "group": "mlp" if kind in MLP_KINDS else "attention",
                "norm": float(w.detach().float().norm()),
            }
        )
    return pd.DataFrame(rows)


def norms_figure(df: pd.DataFrame, value: str = "norm", title: str = "Per-block weight norms") -> Any:
    """Lines of ``value`` per block, one per projection kind."""
    import plotly.express as px

    fig = px.line(df, x="block", y=value, color="kind", line_dash="group", markers=True, title=title)
    fig.update_layout(xaxis_title="block", yaxis_title=value, legend_title="projection")
    return fig


def rates_bar(
    df: pd.DataFrame,
    x: str = "model",
    rates: tuple[str, ...] = ("asr", "false_trigger"),
    title: str = "Attack success and false-trigger rates",
) -> Any:
    """Grouped bars of rate columns (0..1) per row of ``df``."""
    import plotly.express as px

    long = df.melt(
        id_vars=[x], value_vars=[r for r in rates if r in df.columns], var_name="rate", value_name="value"
    )
    fig = px.bar(long, x=x, y="value", color="rate", barmode="group", title=title, range_y=[0, 1.05])
    fig.update_layout(yaxis_title="rate", xaxis_title="")
    return fig
