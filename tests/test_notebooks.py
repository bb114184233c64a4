"""The notebooks: their sources, their teaching structure, and every one of them running under papermill.

Each notebook is ``notebooks/NN_name.py`` (jupytext percent format, the source of truth, linted like a
module) paired with ``notebooks/NN_name.ipynb`` (generated: ``jupytext --sync notebooks/[0-9][0-9]_*.py``)
and smoke parameters in ``notebooks/smoke/NN_name.yaml`` (the tiny random model; ``papermill -f`` reads
them, and so does ``make notebooks-smoke``). Adding a notebook needs no change here.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
SMOKE_DIR = NB_DIR / "smoke"
SOURCES = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))
IDS = [p.stem for p in SOURCES]
CELL_TIMEOUT = 600
MAX_PARAMETER_LINES = 10


def _read(path: Path):
    import jupytext

    return jupytext.read(path)


def _smoke(src: Path) -> dict:
    import yaml

    return yaml.safe_load((SMOKE_DIR / f"{src.stem}.yaml").read_text())


def _params_cell(nb) -> str:
    cells = [c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged 'parameters'"
    return cells[0]


def _assigned(source: str) -> set[str]:
    """The names a cell assigns at its top level."""
    targets = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets += node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets.append(node.target)
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def test_every_notebook_has_its_pair_and_smoke_parameters():
    assert SOURCES, "no notebook sources found"
    stems = {p.stem for p in SOURCES}
    assert {p.stem for p in NB_DIR.glob("[0-9][0-9]_*.ipynb")} == stems, "every .py has its .ipynb, and back"
    assert {p.stem for p in SMOKE_DIR.glob("*.yaml")} == stems, "one smoke YAML per notebook"


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_parameters_cell_is_short_and_smoke_parameters_exist(src):
    """≤ 10 lines of parameters; the smoke YAML only sets names the parameters cell declares."""
    from papermill.translators import PythonTranslator

    nb = _read(src)
    params = _params_cell(nb)
    lines = params.strip().splitlines()
    assert len(lines) <= MAX_PARAMETER_LINES, f"{src.name}: {len(lines)} lines of parameters"
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    listed = {p.name for p in PythonTranslator.inspect(cell)}  # what `papermill --help-notebook` shows
    assert listed == _assigned(params), f"{src.name}: papermill cannot parse {_assigned(params) - listed}"
    smoke = _smoke(src)
    unknown = set(smoke) - _assigned(params)
    assert not unknown, f"{src.name}: smoke parameters not in the parameters cell: {sorted(unknown)}"
    assert smoke.get("run_solutions") is True, f"{src.name}: the smoke run must run every solution"


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_ipynb_in_sync_with_its_source(src):
    """The .ipynb is generated from the .py: an edit made to one only would be lost (or never tested)."""
    import nbformat

    want, have = _read(src), nbformat.read(src.with_suffix(".ipynb"), as_version=4)
    fix = f"regenerate it: .venv/bin/jupytext --sync notebooks/{src.name}"
    assert have.metadata.get("kernelspec") == want.metadata.get("kernelspec"), (
        f"{src.stem}.ipynb: kernel; {fix}"
    )
    assert len(have.cells) == len(want.cells), f"{src.stem}.ipynb: number of cells; {fix}"
    for i, (h, w) in enumerate(zip(have.cells, want.cells)):
        where = f"{src.stem}.ipynb cell {i}"
        assert (h.cell_type, h.source) == (w.cell_type, w.source), f"{where} differs from {src.name}; {fix}"
        for key in ("tags", "jupyter"):
            assert h.metadata.get(key) == w.metadata.get(key), f"{where}: metadata {key!r}; {fix}"


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_teaching_path(src):
    """Learning goals and the paper section first; two or three exercises last, collapsed opt-in solutions."""
    cells = _read(src).cells
    first = cells[0].source
    assert cells[0].cell_type == "markdown" and "**Learning goals**" in first, src.name
    assert re.search(r"paper (context|sections? reproduced)|§\d", first, re.I), (
        f"{src.name}: no paper section"
    )
    ex = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(ex) == 1, f"{src.name}: one Exercises section expected"
    items = re.findall(r"^\d\. ", cells[ex[0]].source, re.M)
    assert 2 <= len(items) <= 3, f"{src.name}: {len(items)} exercises"
    sols = cells[ex[0] + 1 :]
    assert sols and all("solution" in c.metadata.get("tags", []) for c in sols), src.name
    for c in sols:
        assert c.metadata["jupyter"]["source_hidden"] and c.source.startswith("%%solution"), src.name
    assert re.search(r"^run_solutions = False", _params_cell(_read(src)), re.M), src.name
    code = [
        c.source for c in cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])
    ]
    assert code[0].startswith("%load_ext bdvax_lab"), src.name


@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_teaching_cells_carry_no_test_plumbing(src):
    """The smoke switch is the ``model`` parameter read by ``notebook_model``; nothing else knows about it.
    Prose cites files of this repository only, and no notebook reaches outside the library by sys.path."""
    cells = [c for c in _read(src).cells if "parameters" not in c.metadata.get("tags", [])]
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    for needle in ('model == "tiny"', "model == 'tiny'", "make_tiny_model", "sys.path", "experiments."):
        assert needle not in code, f"{src.name}: {needle!r} in a teaching cell"
    text = "\n".join(c.source for c in cells)
    for needle in ("/work/", "METHOD.md", "ENVIRONMENT-NOTES.md"):
        assert needle not in text, f"{src.name}: refers to {needle}, outside the repository"


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_point_into_the_repository():
    """Every relative link of the notebooks' prose names an existing file, and a ``#section`` of a markdown
    file one of its headings (docs/method.md and RESULTS.md are cited by section)."""
    texts = {
        src.name: "\n".join(c.source for c in _read(src).cells if c.cell_type == "markdown")
        for src in SOURCES
    }
    texts["README.md"] = (NB_DIR / "README.md").read_text()
    bad = []
    for name, text in texts.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (NB_DIR / path).resolve()
            if not file.is_relative_to(ROOT) or not file.exists():
                bad.append(f"{name}: {target} (no such file in the repository)")
            elif anchor and anchor not in {
                _slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            }:
                bad.append(f"{name}: {target} (no such section)")
    assert not bad, "\n".join(bad)


def test_notebook_model_switch():
    from bdvax_lab.viz.notebook_magics import notebook_model

    model, tok = notebook_model("tiny")
    assert model.config.num_hidden_layers == 4 and tok is not None
    with pytest.raises(ValueError, match="'default'"):
        notebook_model("tinyy")


def test_solution_magic_runs_only_when_asked():
    from IPython.core.interactiveshell import InteractiveShell

    from bdvax_lab.viz.notebook_magics import SKIP_MESSAGE

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
@pytest.mark.parametrize("src", SOURCES, ids=IDS)
def test_notebook_runs(src, kernel_name, tmp_path):
    """The .ipynb with its smoke YAML, as ``papermill -f notebooks/smoke/NN_name.yaml`` runs it."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb_path = src.with_suffix(".ipynb")
    out_dir = Path(os.environ.get("BDVAX_NB_OUT", tmp_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / nb_path.name
    try:
        pm.execute_notebook(
            str(nb_path),
            str(out),
            parameters=_smoke(src),
            kernel_name=kernel_name,
            cwd=str(NB_DIR),
            execution_timeout=CELL_TIMEOUT,
            progress_bar=False,
        )
    except PapermillExecutionError as exc:
        pytest.fail(
            f"{nb_path.name}: cell {exc.exec_count} failed: {exc.ename}: {exc.evalue}\n"
            f"executed notebook: {out}",
            pytrace=False,
        )
