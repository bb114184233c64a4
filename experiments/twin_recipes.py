"""The twin recipes the benchmarks compare: each changes one thing against the bench's signature recipe
(twin lr, twin steps, equal poisoned/clean steps, clean-sample count, N). Used by
benchmarks/twin_recipe.py (overlap with the oracles) and benchmarks/lovo_heads.py (where the twins' own
backdoors sit)."""

from __future__ import annotations

from typing import Any

#: recipe name → what it changes against the bench's signature recipe (see :func:`recipe_config`)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "equal_steps": {"equal_steps": True},
    "lr_half": {"lr_scale": 0.5},
    "lr_double": {"lr_scale": 2.0},
    "steps_half": {"steps_scale": 0.5},
    "steps_double": {"steps_scale": 2.0},
    "n_clean_20": {"n_clean": 20},
    "n_variants_3": {"n_variants": 3},
}


def recipe_config(base: Any, name: str) -> Any:
    """The bench's :class:`SignatureConfig` ``base`` with recipe ``name``'s one change."""
    from bdvax_lab.bdvax.config import default_twin_train

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    change = RECIPES[name]
    twin = base.twin_train or default_twin_train("lora")
    cfg = base
    if "lr_scale" in change:
        cfg = cfg.replace(twin_train=twin.replace(lr=twin.lr * change["lr_scale"]))
    if "steps_scale" in change:
        steps = max(1, round(twin.steps * change["steps_scale"]))
        cfg = cfg.replace(twin_train=twin.replace(steps=steps))
    if change.get("equal_steps"):
        cfg = cfg.replace(clean_steps=twin.steps)
    if "n_clean" in change:
        cfg = cfg.replace(n_clean=change["n_clean"])
    if "n_variants" in change:
        cfg = cfg.replace(n_variants=change["n_variants"])
    return cfg
