"""IPython extension for the notebooks: ``%load_ext bdvax_lab`` registers the ``%%solution`` cell magic.

Exercise solutions sit in collapsed cells that start with ``%%solution``. They run only when the
notebook variable ``run_solutions`` is true (its parameters cell sets it: ``False`` by default, so
"Run All" in a workshop neither spoils the exercises nor spends minutes on them; the papermill smoke
tests set it to ``True``, so every solution is still executed in CI). Otherwise the cell says how to
run it. The cell body is ordinary notebook code: the last expression is displayed as usual, and an
error fails the cell (so papermill notices).
"""

from __future__ import annotations

from typing import Any

SKIP_MESSAGE = "solution not run: set run_solutions = True in the parameters cell (or run the lines yourself)"


def solution_magic(line: str, cell: str, shell: Any = None) -> None:
    """Run ``cell`` in the user namespace iff ``run_solutions`` (or the variable named on the magic line) is true."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    flag = line.strip() or "run_solutions"
    if not flag.isidentifier():
        raise ValueError(
            f"%%solution {line!r}: expected the name of a notebook variable, e.g. %%solution run_solutions"
        )
    if not shell.user_ns.get(flag, False):
        print(SKIP_MESSAGE if flag == "run_solutions" else SKIP_MESSAGE.replace("run_solutions", flag))
        return
    result = shell.run_cell(cell, store_history=False, silent=False)
    result.raise_error()  # re-raise, so the outer cell (and papermill) fails too


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext bdvax_lab``."""
    ipython.register_magic_function(
        lambda line, cell: solution_magic(line, cell, ipython), magic_kind="cell", magic_name="solution"
    )
