"""Inference-time ablation of attention or MLP outputs over block spans: p(behaviour's first token)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ...core.data import Example
from .common import (
    ABLATION_COLUMNS,
    MODES,
    ProbeResult,
    _as_prompts,
    _check_sites,
    _chunks,
    _left_pad,
    _Runner,
    _softmax_prob,
    _span_blocks,
    _span_label,
    _token_ids,
    block_spans,
    encode_prompts,
)
from .figures import figure_ablation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...core.types import Model


# --------------------------------------------------------------------------- 2. inference-time ablation
def ablation_probe(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Example | str],
    target_token_id: int | Sequence[int],
    spans: Sequence[Any] | None = None,
    sites: Sequence[str] = ("attn_output", "mlp_output"),
    mode: str = "zero",
    *,
    clean_prompts: Sequence[Example | str] | None = None,
    label: str = "model",
    batch_size: int = 32,
    max_rows: int = 256,
    figure: bool = True,
) -> ProbeResult:
    """p(first reply token ∈ ``target_token_id``) when a site's output is ablated over block spans.

    ``spans``: each an int, a ``range``, a ``(start, stop)`` tuple (half-open,
    like ``range``), a list of blocks or ``"all"``; default
    :func:`block_spans` (all blocks, then start / middle / end thirds).
    ``sites``: ``attn_output``, ``mlp_output``, ``mlp_hidden``, ``block`` or
    combinations joined by ``+`` (``"attn_output+mlp_output"``).
    ``mode="zero"`` sets the output to 0 at every position;
    ``mode="mean"`` replaces it by its mean over all real tokens of
    ``clean_prompts`` (required; per block and site).
    Frame columns :data:`ABLATION_COLUMNS`, one row for the unablated
    baseline (``site="none"``) and one per (span, site); ``per_prompt`` has
    each prompt's probability. All conditions of a batch run in one trace, as
    nnsight invokes (at most ``max_rows`` rows per forward).
    """
    prompts = _as_prompts(prompts, "prompts")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode == "mean" and not clean_prompts:
        raise ValueError("mode='mean' needs clean_prompts (the reference the means are taken over)")
    ids = _token_ids(target_token_id)
    sites = _check_sites(sites, allow_combo=True)
    with _Runner(model, tokenizer, batch_size, max_rows) as run:
        span_list = [_span_blocks(s, run.L) for s in (spans if spans is not None else block_spans(run.L))]
        conds: list[tuple[str, str, list[int]]] = [("baseline", "none", [])]
        for blocks in span_list:
            for s in sites:
                conds.append((f"{s} {_span_label(blocks)}", s, blocks))
        means: dict[tuple[int, str], torch.Tensor] = {}
        if mode == "mean":
            pairs = [(b, p) for _, s, blocks in conds[1:] for b in blocks for p in s.split("+")]
            means = run.site_means(
                encode_prompts(tokenizer, _as_prompts(clean_prompts, "clean_prompts")), pairs
            )

        def edit(block: int, site: str) -> Callable[[torch.Tensor], None]:
            if mode == "zero":

                def fn(t: torch.Tensor) -> None:
                    t.zero_()
            else:
                value = means[(block, site)]

                def fn(t: torch.Tensor) -> None:
                    t.copy_(value.to(t.device, t.dtype).expand_as(t))

            return fn

        plans = [[(b, p, edit(b, p)) for b in blocks for p in s.split("+")] for _, s, blocks in conds]
        seqs = encode_prompts(tokenizer, prompts)
        probs = torch.zeros(len(conds), len(seqs))
        for idx in _chunks(len(seqs), run.batch_size):
            batch = _left_pad([seqs[i] for i in idx], run.pad_id)
            for c, logits in enumerate(run.run_conditions(batch, plans)):
                probs[c, idx.start : idx.stop] = _softmax_prob(logits, ids)
    base = float(probs[0].mean())
    rows, per = [], []
    for c, (name, s, blocks) in enumerate(conds):
        p = probs[c]
        rows.append(
            {
                "model": label,
                "condition": name,
                "span": _span_label(blocks) if blocks else "none",
                "blocks": list(blocks),
                "site": s,
                "mode": mode if blocks else "none",
                "p_behavior": float(p.mean()),
                "p_std": float(p.std()) if len(p) > 1 else 0.0,
                "delta_vs_baseline": float(p.mean()) - base,
                "n_prompts": len(p),
            }
        )
        per.extend(
            {"model": label, "condition": name, "prompt": i, "p_behavior": float(v)} for i, v in enumerate(p)
        )
    df = pd.DataFrame(rows, columns=ABLATION_COLUMNS)
    return ProbeResult(
        df,
        figure_ablation(df) if figure else None,
        per_prompt=pd.DataFrame(per),
        meta={"probe": "ablation", "token_ids": ids, "mode": mode},
    )
