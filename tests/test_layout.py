"""The package layout keeps its promises: layers import only downwards, no cycles, a light top level."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bdvax_lab"

#: Pipeline order: a subpackage may import from its own rank and below, never from above.
RANK = {
    "core": 0,
    "training": 1,
    "weights": 1,
    "threat": 2,
    "bdvax": 3,
    "viz": 4,
    "baselines": 5,
    "analysis": 5,
    "cli": 9,
    "__init__": 9,
}
#: Modules allowed past ~600 lines, with the reason.
LONG_MODULES = {
    "bdvax_lab/analysis/sanity.py": (
        "the sanity-check context and evaluation, with the method's long explanation"
    ),
    "bdvax_lab/cli.py": "one short function per subcommand",
    "bdvax_lab/bdvax/twins.py": "twin training with its cache locks, reaping and executor dispatch; to split",
}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported bdvax_lab module, at top level?) for every import in ``path``."""
    mod, tree = _module(path), ast.parse(path.read_text())
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if not target.startswith("bdvax_lab"):
            continue
        top = node in tree.body
        if node.module is None or target == "bdvax_lab":  # `from . import x`: x is a module or a name
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if importlib.util.find_spec(sub) else target, top))
        else:
            out.append((target, top))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


FILES = sorted(PKG.rglob("*.py"))


def test_every_internal_import_resolves():
    missing = [(_module(p), t) for p in FILES for t, _ in _imports(p) if importlib.util.find_spec(t) is None]
    assert not missing, missing


def _imported_names(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from bdvax_lab... import name`` in ``path``, lazy imports included."""
    mod, tree = _module(path), ast.parse(path.read_text())
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.level or node.module.startswith("bdvax_lab"))
        ):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + [node.module]) if node.level else node.module
            out += [(target, a.name) for a in node.names]
    return out


def test_every_imported_name_exists():
    """Lazy imports inside functions are checked too: a moved name must not break a rarely used path."""
    import importlib

    files = (
        FILES
        + sorted((PKG.parent / "tests").glob("*.py"))
        + sorted((PKG.parent / "experiments").glob("*.py"))
    )
    missing = []
    for p in files:
        for target, name in _imported_names(p) if p.is_relative_to(PKG) else _imported_names_abs(p):
            mod = importlib.import_module(target)
            is_module = hasattr(mod, "__path__") and importlib.util.find_spec(f"{target}.{name}") is not None
            if not hasattr(mod, name) and not is_module:
                missing.append(f"{p.name}: {target}.{name}")
    assert not missing, "\n".join(missing)


def _imported_names_abs(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    return [
        (n.module, a.name)
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").startswith("bdvax_lab")
        for a in n.names
    ]


def test_no_upward_imports():
    bad = [
        f"{_module(p)} -> {t}"
        for p in FILES
        for t, _ in _imports(p)
        if RANK[_layer(t)] > RANK[_layer(_module(p))]
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = {_module(p): {t for t, top in _imports(p) if top} for p in FILES}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        for nxt in edges.get(node, ()):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif len(stack) < 30:
                visit(nxt, stack + [nxt])

    for m in edges:
        visit(m, [m])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_modules_are_small_or_say_why():
    long = {str(p.relative_to(PKG.parent)): n for p in FILES if (n := len(p.read_text().splitlines())) > 650}
    assert set(long) <= set(LONG_MODULES), long


@pytest.mark.parametrize(
    "code",
    [
        "import bdvax_lab",
        "from bdvax_lab.cli import build_parser; build_parser()",
        "import bdvax_lab.bdvax.config, bdvax_lab.baselines.config, bdvax_lab.analysis.config",
    ],
)
def test_light_imports_do_not_load_torch(code):
    """``import bdvax_lab``, ``bdvax --help`` and the config modules stay torch-free.

    A fast CLI and cheap configs.
    """
    heavy = "('torch', 'transformers', 'pandas')"
    probe = f"{code}; import sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_public_api_is_short_sorted_and_lazy():
    import bdvax_lab

    names = [n for n in bdvax_lab.__all__ if n != "__version__"]
    assert names == sorted(names) and len(names) <= 40
    for name in names:  # every advertised name resolves
        assert getattr(bdvax_lab, name) is not None


def test_cli_help_runs_without_torch():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bdvax_lab.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage: bdvax" in out.stdout
    assert " torch\n" not in out.stderr and "| torch" not in out.stderr
