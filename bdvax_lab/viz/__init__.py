"""Figures and widgets: plotly figures of the package's tables, the signature explorer, notebook helpers."""
