"""``finetune_only``: the repair step alone on the suspicious model (Qi et al., 2024)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.data import Example
from ..core.registry import setting_of
from ..training.repair import repair
from .common import _prepare, _training
from .config import BaselineConfig
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


# =========================================================================== finetune only
def finetune_only(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: BaselineConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The repair step alone: clean finetuning with BD-VAX's repair recipe.

    Adapter setting: trains the adapter; full setting: all weights.
    """
    cfg = config or BaselineConfig()
    setting = setting_of(suspicious_model)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    rep = repair(model, tokenizer, clean_data, cfg.repair, progress=progress)
    report = {
        "method": "finetune_only",
        "setting": setting,
        "setting_out": setting,
        **_training(rep),
        "intervention": None,
        "seconds": {
            "intervention": 0.0,
            "repair": round(rep.seconds, 2),
            "total": round(time.time() - t0, 2),
        },
    }
    return rep.model, report


register_defence(
    "finetune_only",
    finetune_only,
    BaselineConfig,
    paper_settings=("lora", "full"),
    description="the repair step alone: clean finetuning of the suspicious model",
)
