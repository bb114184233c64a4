"""Selection budgets and suppression recipes (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config

SCOPES = ("module", "global")


INITS = ("model", "xavier", "matched", "zero")


KV_HEAD_RULES = ("group", "any", "none")


@dataclass
class SuppressConfig(Config):
    """How to suppress a signature. ``init``/``seed`` apply to the full setting only."""

    init: str = "model"  #: "model" (normal(0, initializer_range)), "xavier", "matched" or "zero"
    seed: int = 0
    heads: bool = True  #: also suppress ``signature.selected_heads`` when it has any
    kv_heads: str = "group"  #: GQA rule for shared k/v heads: "group", "any" or "none"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"SuppressConfig.init={self.init!r}; choose one of {INITS}")
        if self.kv_heads not in KV_HEAD_RULES:
            raise ValueError(f"SuppressConfig.kv_heads={self.kv_heads!r}; choose one of {KV_HEAD_RULES}")


def check_budget(rho: float | None, scope: str, heads: int) -> None:
    """A selection budget: ρ in [0, 1] (None = the method's default), a known scope, heads ≥ 0."""
    if rho is not None and not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of {SCOPES}")
    if int(heads) < 0:
        raise ValueError(f"heads must be ≥ 0, got {heads}")
