"""Every notebook in notebooks/ runs under papermill with its smoke parameters.

Each notebook declares its smoke parameters in its metadata
(``metadata.bdvax.smoke_parameters``), so adding a notebook needs no change here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 600


def test_every_notebook_has_parameters_cell():
    assert NOTEBOOKS, "no notebooks found"
    for nb_path in NOTEBOOKS:
        nb = json.loads(nb_path.read_text())
        tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
        assert any("parameters" in t for t in tags), f"{nb_path.name}: no cell tagged 'parameters'"
        assert "smoke_parameters" in nb["metadata"].get("bdvax", {}), f"{nb_path.name}: no smoke_parameters"


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_teaching_path(nb_path):
    """Learning goals and the paper section first; two or three exercises last, with collapsed, opt-in solutions."""
    import re

    nb = json.loads(nb_path.read_text())
    cells = nb["cells"]
    first = _source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and "**Learning goals**" in first, nb_path.name
    assert re.search(r"paper (context|sections? reproduced)|§\d", first, re.I), f"{nb_path.name}: no paper section"
    ex = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and _source(c).startswith("## Exercises")]
    assert len(ex) == 1, f"{nb_path.name}: one Exercises section expected"
    items = re.findall(r"^\d\. ", _source(cells[ex[0]]), re.M)
    assert 2 <= len(items) <= 3, f"{nb_path.name}: {len(items)} exercises"
    sols = cells[ex[0] + 1:]
    assert sols and all("solution" in c["metadata"].get("tags", []) for c in sols), nb_path.name
    for c in sols:
        assert c["metadata"]["jupyter"]["source_hidden"] and _source(c).startswith("%%solution"), nb_path.name
    params = next(_source(c) for c in cells if "parameters" in c["metadata"].get("tags", []))
    assert re.search(r"^run_solutions = False", params, re.M), nb_path.name
    assert nb["metadata"]["bdvax"]["smoke_parameters"]["run_solutions"] is True  # CI still runs every solution
    code = [_source(c) for c in cells if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", [])]
    assert code[0].startswith("%load_ext bdvax_lab"), nb_path.name


def test_solution_magic_runs_only_when_asked():
    from IPython.core.interactiveshell import InteractiveShell

    from bdvax_lab.notebook_magics import SKIP_MESSAGE

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "bdvax_lab")
    ip.user_ns["run_solutions"] = False
    with_capture = ip.run_cell("%%capture out\n%%solution\nsolved = 1")
    assert with_capture.success and "solved" not in ip.user_ns
    ip.user_ns["run_solutions"] = True
    assert ip.run_cell("%%solution\nsolved = 41 + 1").success and ip.user_ns["solved"] == 42
    failed = ip.run_cell("%%solution\n1 / 0")
    assert not failed.success and isinstance(failed.error_in_exec, ZeroDivisionError)
    assert not ip.run_cell("%%solution not-a-name\nx = 1").success
    assert "run_solutions = True" in SKIP_MESSAGE


@pytest.mark.notebook
@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb_path, kernel_name, tmp_path):
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    params = json.loads(nb_path.read_text())["metadata"]["bdvax"]["smoke_parameters"]
    out_dir = Path(os.environ.get("BDVAX_NB_OUT", tmp_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / nb_path.name
    try:
        pm.execute_notebook(str(nb_path), str(out), parameters=params, kernel_name=kernel_name,
                            cwd=str(NB_DIR), execution_timeout=CELL_TIMEOUT, progress_bar=False)
    except PapermillExecutionError as exc:
        pytest.fail(f"{nb_path.name}: cell {exc.exec_count} failed: {exc.ename}: {exc.evalue}\n"
                    f"executed notebook: {out}", pytrace=False)
