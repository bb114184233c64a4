"""Zero a ranking's top adapter units, measure the real backdoor: does a ranking point at what matters?

An oracle's overlap with a defence's ranking (:mod:`.ranking`) only means something if the oracle's own
top units carry the backdoor. This checks it causally, with the defence's own operation: for each ranking,
zero the adapter slices of its ``n`` highest units (:func:`bdvax_lab.weights.suppression.
zero_lora_channels`, no repair), measure ASR and false-trigger on held-out prompts with the true key, then
restore the adapter. Channels and heads are ablated separately. ``random`` rankings (seeded) give the
chance level at the same count. Evaluation only: it uses the true trigger.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.registry import MLP_KINDS, is_peft, layout_of
from ..threat.evaluate import BACKDOOR_COLUMNS
from ..weights.selection import top_indices
from ..weights.suppression import zero_lora_channels
from .ranking import neuron_scores, random_scores

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.data import Example
    from ..core.types import Model

UNITS = ("channel", "head")

ABLATION_COLUMNS = [
    "ranking",
    "seed",
    "unit",
    "n_units",
    "n_total",
    *BACKDOOR_COLUMNS,
    "n_prompts",
    "seconds",
]


def top_units(scores: torch.Tensor, n: int) -> dict[int, torch.Tensor]:
    """The ``n`` highest of ``scores`` ``[L, units]`` as ``{block: unit indices}`` (empty blocks left out)."""
    flat = top_indices(scores.reshape(-1), int(n))
    blocks, units = flat // scores.shape[1], flat % scores.shape[1]
    return {int(b): units[blocks == b] for b in torch.unique(blocks)}


def _zero(model: Model, unit: str, chosen: Mapping[int, torch.Tensor]) -> None:
    if unit == "channel":
        zero_lora_channels(model, {(b, k): idx for b, idx in chosen.items() for k in MLP_KINDS})
    else:
        zero_lora_channels(model, {}, chosen)


def ablate_rankings(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    rankings: Mapping[str, Mapping[str, Any]],
    budgets: Mapping[str, int],
    *,
    attack: Any,
    task: Any,
    prompts: Sequence[Example],
    random_seeds: Sequence[int] = (0, 1, 2),
    baseline: bool = True,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """ASR after zeroing each ranking's top units, one row per (ranking, seed, unit); columns
    :data:`ABLATION_COLUMNS`, plus a ``none`` row (nothing zeroed) unless ``baseline=False``.

    ``rankings``: name → ``{"channel": [L, d_ff] scores or a per-module dict, "head": [L, n_heads]}``
    (either may be missing); ``budgets``: unit → how many to zero (``{"channel": 461, "head": 27}``);
    ``random_seeds``: one seeded random ranking per seed and unit. The adapter is restored after every row.
    """
    from ..threat.evaluate import backdoor_metrics

    if not is_peft(model):
        raise TypeError("ablate_rankings zeroes adapter slices: it needs a PeftModel (adapter setting)")
    bad = [u for u in budgets if u not in UNITS]
    if bad:
        raise ValueError(f"budgets has unknown unit(s) {bad}; units: {list(UNITS)}")
    lay = layout_of(model)
    shapes = {"channel": (lay.n_blocks, lay.d_ff), "head": (lay.n_blocks, lay.n_heads)}
    jobs: list[tuple[str, int | None, str, torch.Tensor | None]] = (
        [("none", None, "-", None)] if baseline else []
    )
    for unit in budgets:
        for name, per_unit in rankings.items():
            s = per_unit.get(unit)
            if s is None:
                continue
            s = neuron_scores(s, lay.n_blocks) if isinstance(s, Mapping) else s
            if tuple(s.shape) != shapes[unit]:
                raise ValueError(
                    f"ranking {name!r} {unit} scores have shape {tuple(s.shape)}, not {shapes[unit]}"
                )
            jobs.append((name, None, unit, s))
        jobs += [("random", int(k), unit, random_scores(shapes[unit], k)) for k in random_seeds]
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    rows = []
    for name, seed, unit, scores in tqdm(jobs, desc="ablations", disable=not progress):
        t0 = time.time()
        n = int(budgets.get(unit, 0))
        try:
            if scores is not None:
                _zero(model, unit, top_units(scores, n))
            summary, _ = backdoor_metrics(
                model, tokenizer, attack, task, prompts, max_new_tokens=max_new_tokens
            )
        finally:
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if pname in state:
                        p.copy_(state[pname])
        rows.append(
            {
                "ranking": name,
                "seed": seed,
                "unit": unit,
                "n_units": n if scores is not None else 0,
                "n_total": int(torch.Size(shapes[unit]).numel()) if unit in shapes else 0,
                **{c: summary[c] for c in ABLATION_COLUMNS if c in summary},
                "seconds": round(time.time() - t0, 1),
            }
        )
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)
