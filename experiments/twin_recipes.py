"""The twin recipes the benchmarks compare: each changes one thing against the bench's signature recipe
(twin lr, twin steps, equal poisoned/clean steps, clean-sample count, N, which adapter modules the twins
train; ``dilute`` changes the poisoning dose, ``fresh`` the adapter the twins start from). Used by
benchmarks/twin_recipe.py (overlap with the oracles), benchmarks/lovo_heads.py (where the twins' own
backdoors sit) and benchmarks/oracle_ablation.py (does a recipe's ranking remove the real backdoor)."""

from __future__ import annotations

from typing import Any

from bdvax_lab.core.registry import ATTN_KINDS

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
    "attn_only": {"target_kinds": ATTN_KINDS},
    # nearer the implant's dose than the twins' 50 %: 15 % poison over three times the steps, with 80 clean
    # samples per variant (6 × 80 is what the bench's defender pool holds) so the 14 poisoned ones are not
    # memorised; the one recipe that changes three fields together
    "dilute": {"n_clean": 80, "poison_ratio": 0.15, "steps_scale": 3.0},
    # twins that learn from scratch as the implant did: both start from the suspicious adapter re-initialised
    # (B = 0, so the base model), on the same clean data answered by the *suspicious* model
    "fresh": {"fresh_adapter": True},
}


def recipe_list(text: str) -> list[str]:
    """argparse type: a comma list of recipe names (``"default,attn_only"``)."""
    import argparse

    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in RECIPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"bad recipes {bad or text!r}: choose from {','.join(RECIPES)}")
    return names


def recipe_config(base: Any, name: str) -> Any:
    """The bench's :class:`SignatureConfig` ``base`` with recipe ``name``'s one change."""
    from bdvax_lab.bdvax.config import default_twin_train

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    change = RECIPES[name]
    twin = base.twin_train or default_twin_train("lora")
    twin_changes: dict[str, Any] = {}  # one replace, so that changes to the twins' recipe add up
    if "lr_scale" in change:
        twin_changes["lr"] = twin.lr * change["lr_scale"]
    if "steps_scale" in change:
        twin_changes["steps"] = max(1, round(twin.steps * change["steps_scale"]))
    if "target_kinds" in change:
        twin_changes["target_kinds"] = change["target_kinds"]
    cfg = base.replace(twin_train=twin.replace(**twin_changes)) if twin_changes else base
    if change.get("equal_steps"):
        cfg = cfg.replace(clean_steps=twin.steps)
    for key in ("n_clean", "poison_ratio", "n_variants"):
        if key in change:
            cfg = cfg.replace(**{key: change[key]})
    return cfg


def recipe_start(sm: Any, name: str, family: str) -> tuple[Any, list[Any] | None]:
    """``(model and tokenizer the twins of recipe name start from, the defender pool they train on)``.

    Every recipe but ``fresh``: the suspicious model and ``None`` (its own self-distilled pool). ``fresh``:
    a copy whose LoRA adapter is re-initialised (A drawn anew with seed 0, B = 0: the base model's function,
    the frozen base shared), and the defender's instructions answered by the suspicious model itself, so
    the clean data stay the suspicious model's replies.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)}")
    if not RECIPES[name].get("fresh_adapter"):
        return sm, None
    import torch

    from bdvax_lab.bdvax.variants import default_pool
    from bdvax_lab.core.models import model_fingerprint, working_copy
    from bdvax_lab.core.selfdistill import defender_data

    pool = defender_data(
        sm.model, sm.tokenizer, default_pool(family), fingerprint=model_fingerprint(sm.model)
    )
    start = working_copy(sm.model, share_frozen_base=True)
    torch.manual_seed(0)
    n = 0
    for module in start.modules():
        if hasattr(module, "lora_A") and hasattr(module, "reset_lora_parameters"):
            for adapter in list(module.lora_A.keys()):
                module.reset_lora_parameters(adapter, True)
                n += 1
    if not n:
        raise ValueError("recipe 'fresh' needs a LoRA suspicious model; this one has no adapter")
    return (start, sm.tokenizer), pool
