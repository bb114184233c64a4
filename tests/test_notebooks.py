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
