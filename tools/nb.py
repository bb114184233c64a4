"""Tiny helper to write notebooks from Python lists (keeps notebook sources reviewable in diffs)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def write_notebook(path: str | Path, cells: list[tuple[str, str]], smoke: dict, title: str) -> None:
    """``cells``: list of ("md"|"code"|"params"|"solution", source). The "params" cell gets the ``parameters`` tag.

    Solution cells are collapsed and start with ``%%solution`` (:mod:`bdvax_lab.notebook_magics`): they run only
    with ``run_solutions = True``, a parameter added to the parameters cell (the smoke run sets it, so CI runs
    every solution); the first code cell after the parameters loads the extension.
    """
    nb = new_notebook()
    has_solutions = any(kind == "solution" for kind, _ in cells)
    if has_solutions:
        smoke = {**smoke, "run_solutions": True}
    loaded = not has_solutions
    for kind, src in cells:
        src = src.strip("\n")
        if kind == "md":
            if has_solutions and src.startswith("## Exercises"):
                src += (
                    "\n\n*Solutions:* the collapsed cell below (click its margin to expand). It runs only with "
                    "`run_solutions = True` in the parameters cell, so *Run All* leaves the exercises to you."
                )
            nb.cells.append(new_markdown_cell(src))
        elif kind == "params":
            if has_solutions:
                src += "\nrun_solutions = False      # True: also run the exercises' solutions (collapsed cells at the end)"
            nb.cells.append(new_code_cell(src, metadata={"tags": ["parameters"]}))
        elif kind == "solution":
            nb.cells.append(
                new_code_cell(
                    "%%solution\n" + src, metadata={"tags": ["solution"], "jupyter": {"source_hidden": True}}
                )
            )
        else:
            if not loaded:
                src, loaded = "%load_ext bdvax_lab\n" + src, True
            nb.cells.append(new_code_cell(src))
    stem = Path(path).stem[:2]
    for i, cell in enumerate(nb.cells):  # deterministic ids keep regenerated notebooks diff-free
        cell["id"] = f"c{stem}-{i:03d}"
    nb.metadata["kernelspec"] = {"name": "bdvax", "display_name": "bdvax_lab (.venv)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["bdvax"] = {"smoke_parameters": smoke, "title": title}
    nbformat.validate(nb)
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
