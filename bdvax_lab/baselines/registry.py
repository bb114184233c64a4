"""The defence registry: one :func:`register_defence` call per defence, in the defence's own module.

A defence is a function ``(suspicious_model, tokenizer, clean_data, config, *, progress, on_stage)
-> (model, info)`` and the config class it takes. :func:`bdvax_lab.baselines.defend` runs any of them
the same way (same clean data, same repair budget, the same evaluation). The built-in defences register
themselves when their module is imported, which :func:`defences` does on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.registry import SETTINGS
from .config import BaselineConfig

DefenceFn = Callable[..., tuple[Any, dict[str, Any]]]

#: Modules of this package that each register one or more defences.
BUILTIN_MODULES: tuple[str, ...] = (
    "controls",
    "finetune_only",
    "magnitude",
    "fine_prune",
    "quantize",
    "crow",
)


#: The names the built-in modules register, known without importing them (the CLI's ``--method`` choices;
#: ``tests/test_cli_conventions.py`` keeps it equal to what :func:`defences` finds).
BUILTIN_DEFENCES: tuple[str, ...] = (
    "discard",
    "retrain",
    "random",
    "top_delta",
    "finetune_only",
    "magnitude_prune",
    "fine_prune",
    "quantize_int4",
    "crow",
    "crow_published",
)


@dataclass(frozen=True)
class Defence:
    """A registered defence: its function, config class and the settings the paper evaluates it in."""

    name: str
    fn: DefenceFn
    config_cls: type[BaselineConfig]
    paper_settings: tuple[str, ...] = SETTINGS
    description: str = ""
    uses_clean_data: bool = True  #: False: needs no clean examples (INT4, discard), none are generated
    kind: str = "baseline"  #: "baseline" (another defence) or "control" (a reference point for claims)


_DEFENCES: dict[str, Defence] = {}


def register_defence(
    name: str,
    fn: DefenceFn,
    config_cls: type[BaselineConfig],
    *,
    paper_settings: tuple[str, ...] = SETTINGS,
    description: str = "",
    uses_clean_data: bool = True,
    kind: str = "baseline",
) -> Defence:
    """Add a defence under ``name`` (what ``defend(method=...)`` and ``bdvax defend --method`` accept)."""
    if name in _DEFENCES and _DEFENCES[name].fn is not fn:
        raise ValueError(f"a defence named {name!r} is already registered")
    if kind not in ("baseline", "control"):
        raise ValueError(f"defence kind {kind!r}: 'baseline' or 'control'")
    _DEFENCES[name] = Defence(name, fn, config_cls, tuple(paper_settings), description, uses_clean_data, kind)
    return _DEFENCES[name]


def defences() -> dict[str, Defence]:
    """Every registered defence by name, the built-in ones included (imported on first use)."""
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")
    return _DEFENCES


def get_defence(name: str) -> Defence:
    """The registered defence ``name``; an unknown name lists the known ones."""
    known = defences()
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown defence method {name!r}; methods: {', '.join(known)}") from None


def baseline_config(method: str, **overrides: Any) -> BaselineConfig:
    """The default config of ``method`` with ``overrides`` (field names of its config class)."""
    return get_defence(method).config_cls(**overrides)
