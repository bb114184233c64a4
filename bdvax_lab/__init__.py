"""bdvax_lab: find and remove backdoors in instruction-tuned LLMs (BD-VAX, its controls and baselines).

Jupyter-first.

The names below are the main verbs and configs a notebook needs; everything else lives in the subpackage
whose name is its place in the pipeline (``docs/concepts.md``):

``core`` (models, data, generation, scoring) → ``training`` (the one finetune loop, repair) →
``threat`` (attacks, skills, suspicious models, evaluation) → ``weights`` (deltas, selection, suppression) →
``bdvax`` (variants, twins, scores, signature, purify) → ``baselines`` (other defences and controls) →
``analysis`` (sanity checks, probes) → ``viz`` (figures, widgets).

Imports are lazy: ``import bdvax_lab`` loads no torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

#: public name → the module that defines it
_API: dict[str, str] = {
    "AttackRecipe": "threat.config",
    "EvalConfig": "threat.config",
    "Example": "core.data",
    "PurifyConfig": "bdvax.config",
    "RepairConfig": "training.config",
    "SanityConfig": "analysis.config",
    "Signature": "bdvax.signature",
    "SignatureConfig": "bdvax.config",
    "SignatureExplorer": "viz.widgets",
    "SuppressConfig": "weights.config",
    "TrainConfig": "training.config",
    "as_suspicious": "threat.suspicious",
    "chat": "core.generate",
    "defend": "baselines.defend",
    "evaluate_model": "threat.evaluate",
    "extract_signature": "bdvax.signature",
    "finetune": "training.loop",
    "generate": "core.generate",
    "load_default_model": "core.models",
    "load_ipython_extension": "viz.notebook_magics",
    "load_model": "core.models",
    "load_pool": "core.data",
    "load_suspicious": "threat.suspicious",
    "make_suspicious_model": "threat.suspicious",
    "make_tiny_model": "core.models",
    "open_or_make_suspicious": "threat.suspicious",
    "purify": "bdvax.purify",
    "random_selection": "weights.selection",
    "run_sanity": "analysis.sanity_checks",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'bdvax_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
