"""Type names for annotations: what the toolkit calls a model.

Import them under ``if TYPE_CHECKING:`` (with ``from __future__ import annotations``) so that light
modules stay torch-free; this module itself imports nothing heavy at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

#: A causal LM as the toolkit handles it: a plain HF model (full setting) or a PeftModel around one
#: (adapter setting).
Model: TypeAlias = "PreTrainedModel | PeftModel"
