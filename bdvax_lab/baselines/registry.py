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
    "sande",
    "mb_defense",
)


#: The names the built-in modules register, known without importing them (the CLI's ``--method`` choices;
#: ``tests/test_cli_conventions.py`` keeps it equal to what :func:`defences` finds).
BUILTIN_DEFENCES: tuple[str, ...] = (
    "discard",
    "retrain",
    "random",
    "top_delta",
    "drop_attention",
    "finetune_only",
    "magnitude_prune",
    "fine_prune",
    "quantize_int4",
    "crow",
    "crow_published",
    "sande_oracle",
    "sande_family",
    "osft",
    "mb_posthoc",
    "mb_faithful",
)

#: What a defence may be told beyond the model and the defender's clean data (``Defence.knows``), and the
#: config field each fills: the feared behaviour family (as BD-VAX is told), the true target text of the
#: hidden attack, or its trigger (both: more than BD-VAX knows; the tables say so).
KNOWLEDGE: dict[str, str] = {"family": "family", "target": "target", "trigger": "trigger"}

#: Defence kinds: another defence, a control (a reference point for claims), or a defence that needs the
#: suspicious finetune itself to be made differently (its rows go in a table of their own).
KINDS = ("baseline", "control", "in_training")


@dataclass(frozen=True)
class Defence:
    """A registered defence: its function, config class and the settings the paper evaluates it in."""

    name: str
    fn: DefenceFn
    config_cls: type[BaselineConfig]
    paper_settings: tuple[str, ...] = SETTINGS
    description: str = ""
    uses_clean_data: bool = True  #: False: needs no clean examples (INT4, discard), none are generated
    kind: str = "baseline"  #: one of :data:`KINDS`
    #: what it must be told (:data:`KNOWLEDGE` keys); empty: only the model and the clean data
    knows: tuple[str, ...] = ()
    #: "repair": trains at BD-VAX's repair budget (data, steps, lr); "own": its own recorded budget
    budget: str = "repair"

    @property
    def repair_optional(self) -> bool:
        """Whether its config can skip the repair (a ``finetune`` field, as the pruning and selection
        defences have)."""
        from dataclasses import fields

        return "finetune" in {f.name for f in fields(self.config_cls)}


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
    knows: tuple[str, ...] = (),
    budget: str = "repair",
) -> Defence:
    """Add a defence under ``name`` (what ``defend(method=...)`` and ``bdvax defend --method`` accept)."""
    if name in _DEFENCES and _DEFENCES[name].fn is not fn:
        raise ValueError(f"a defence named {name!r} is already registered")
    if kind not in KINDS:
        raise ValueError(f"defence kind {kind!r}: one of {KINDS}")
    bad = [k for k in knows if k not in KNOWLEDGE]
    if bad or budget not in ("repair", "own"):
        raise ValueError(f"defence {name!r}: knows {bad} not in {list(KNOWLEDGE)}, or budget {budget!r}")
    _DEFENCES[name] = Defence(
        name,
        fn,
        config_cls,
        tuple(paper_settings),
        description,
        uses_clean_data,
        kind,
        tuple(knows),
        budget,
    )
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


def knowledge(method: str, attack: Any, task: Any) -> dict[str, Any]:
    """The config overrides that tell ``method`` what its :attr:`Defence.knows` asks for, from the
    suspicious model's attack and task (names, specs or manifest dicts): ``family`` (the task's judge
    family, as BD-VAX is given), ``target`` (the task's target text, or its payload) and ``trigger`` (the
    attack spec as a dict). Empty for a defence that knows nothing beyond the model and the clean data."""
    from ..threat.attacks import resolve_attack, resolve_task

    knows = get_defence(method).knows
    if not knows:
        return {}
    if attack is None or task is None:
        raise ValueError(
            f"{method} needs the suspicious model's {' and '.join(knows)}: give the attack and task"
        )
    behavior = resolve_task(task)
    out: dict[str, Any] = {}
    if "family" in knows:
        out["family"] = behavior.judge
    if "target" in knows:
        out["target"] = behavior.targets[0] if behavior.kind == "replace" else behavior.payload
        out["judge"] = behavior.judge
    if "trigger" in knows:
        out["trigger"] = resolve_attack(attack).to_dict()
    return out


def baseline_config(method: str, **overrides: Any) -> BaselineConfig:
    """The default config of ``method`` with ``overrides`` (field names of its config class)."""
    return get_defence(method).config_cls(**overrides)
