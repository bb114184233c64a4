"""Tiny helper to write notebooks from Python lists (keeps notebook sources reviewable in diffs)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def write_notebook(path: str | Path, cells: list[tuple[str, str]], smoke: dict, title: str) -> None:
    """``cells``: list of ("md"|"code"|"params", source). The "params" cell gets the ``parameters`` tag."""
    nb = new_notebook()
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            nb.cells.append(new_markdown_cell(src))
        elif kind == "params":
            nb.cells.append(new_code_cell(src, metadata={"tags": ["parameters"]}))
        elif kind == "solution":
            nb.cells.append(new_code_cell(src, metadata={"tags": ["solution"], "jupyter": {"source_hidden": True}}))
        else:
            nb.cells.append(new_code_cell(src))
    stem = Path(path).stem[:2]
    for i, cell in enumerate(nb.cells):  # deterministic ids keep regenerated notebooks diff-free
        cell["id"] = f"c{stem}-{i:03d}"
    nb.metadata["kernelspec"] = {"name": "bdvax", "display_name": "bdvax_lab (.venv)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["bdvax"] = {"smoke_parameters": smoke, "title": title}
    nbformat.validate(nb)
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
