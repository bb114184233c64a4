"""Text tables of the package's DataFrames: a markdown table for reports, a fixed-width one for terminals."""

from __future__ import annotations

from typing import Any

import pandas as pd


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A GitHub-flavoured markdown table (no optional dependency)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else floatfmt.format(v)
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def frame_text(df: pd.DataFrame) -> str:
    """A terminal table: every column, floats to three decimals, no index."""
    with pd.option_context(
        "display.max_columns", 50, "display.width", 200, "display.float_format", "{:.3f}".format
    ):
        return df.to_string(index=False)
