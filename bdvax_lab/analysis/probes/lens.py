"""Logit lens: the behaviour token's probability read off every layer's residual stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch

from ...core.data import Example
from ...core.scoring import softcap_logits
from .common import (
    LENS_COLUMNS,
    ProbeResult,
    _as_prompts,
    _chunks,
    _left_pad,
    _Runner,
    _token_ids,
    encode_prompts,
)
from .figures import figure_logit_lens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...core.types import Model


# --------------------------------------------------------------------------- 4. logit lens
def logit_lens(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Example | str] | Mapping[str, Sequence[Example | str]],
    token_id: int | Sequence[int],
    *,
    label: str = "model",
    batch_size: int = 32,
    figure: bool = True,
) -> ProbeResult:
    """p(``token_id``) read out of the residual stream after every block at the last prompt
    position, through the model's final norm and lm_head.

    ``prompts``: a list, or a mapping of named lists (e.g. ``{"triggered":
    [...], "clean": [...]}``). Frame columns :data:`LENS_COLUMNS`: mean
    probability (summed over several ids), mean log-probability and the
    median rank of the best id (0 = top token). The last layer's read-out is
    the model's own output distribution.
    """
    groups = dict(prompts) if isinstance(prompts, Mapping) else {"prompts": prompts}
    ids = _token_ids(token_id)
    rows = []
    with _Runner(model, tokenizer, batch_size) as run:
        norm = run.hf.get_submodule(run.layout.spec.final_norm)
        head = run.hf.get_submodule(run.layout.spec.lm_head)
        dev = run._device()
        dtype = next(head.parameters()).dtype
        for name, ps in groups.items():
            seqs = encode_prompts(tokenizer, _as_prompts(ps, f"prompts[{name!r}]"))
            probs, logps, ranks = [], [], []
            for idx in _chunks(len(seqs), run.batch_size):
                got = run.collect_last(_left_pad([seqs[i] for i in idx], run.pad_id), ["block"])
                resid = got["block"]  # [B, L, H]
                p_l, lp_l, r_l = [], [], []
                for b in range(run.L):
                    logits = softcap_logits(run.hf, head(norm(resid[:, b].to(dev, dtype)))).float().cpu()
                    logp = torch.log_softmax(logits, -1)
                    sel = logp[:, ids]
                    p_l.append(sel.exp().sum(-1))
                    lp_l.append(torch.logsumexp(sel, -1))
                    best = logits[:, ids].max(-1).values
                    r_l.append((logits > best[:, None]).sum(-1).float())
                probs.append(torch.stack(p_l, 1))
                logps.append(torch.stack(lp_l, 1))
                ranks.append(torch.stack(r_l, 1))
            P, LP, R = torch.cat(probs), torch.cat(logps), torch.cat(ranks)  # [N, L]
            for b in range(run.L):
                rows.append(
                    {
                        "model": label,
                        "prompts": name,
                        "layer": b,
                        "prob": float(P[:, b].mean()),
                        "log_prob": float(LP[:, b].mean()),
                        "rank": float(R[:, b].median()),
                        "n_prompts": int(P.shape[0]),
                    }
                )
    df = pd.DataFrame(rows, columns=LENS_COLUMNS)
    return ProbeResult(
        df, figure_logit_lens(df) if figure else None, meta={"probe": "logit_lens", "token_ids": ids}
    )
