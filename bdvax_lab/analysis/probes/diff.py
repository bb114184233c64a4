"""Activation differences between triggered and clean runs, per layer and site."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ...core.data import Example
from .common import (
    DIFF_COLUMNS,
    ProbeResult,
    _as_prompts,
    _check_sites,
    _chunks,
    _left_pad,
    _Runner,
    encode_prompts,
)
from .figures import figure_activation_diff

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...core.types import Model


# --------------------------------------------------------------------------- 1. activation difference
def activation_diff(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_prompts: Sequence[Example | str],
    triggered_prompts: Sequence[Example | str],
    *,
    sites: Sequence[str] = ("attn_output", "mlp_output", "block"),
    label: str = "model",
    batch_size: int = 32,
    figure: bool = True,
) -> ProbeResult:
    """Per block and site, how the trigger changes the activation at the last prompt position.

    ``clean_prompts[i]`` and ``triggered_prompts[i]`` are a pair (same
    instruction without / with the key). With ``δ_i = a_trig,i − a_clean,i``
    and ``δ̄`` its mean over pairs, the frame has (columns
    :data:`DIFF_COLUMNS`): ``norm_diff = ‖δ̄‖`` (norm of the mean difference),
    ``cosine`` = mean over pairs of ``cos(a_trig,i, a_clean,i)``,
    ``rel_norm_diff = ‖δ̄‖ / mean ‖a_clean,i‖`` (comparable across depth),
    ``consistency`` = mean ``cos(δ_i, δ̄)`` (1: every prompt moved the same
    way), the mean activation norms and ``n_pairs``. One trace per batch
    (clean and triggered rows padded together).
    """
    clean, trig = (
        _as_prompts(clean_prompts, "clean_prompts"),
        _as_prompts(triggered_prompts, "triggered_prompts"),
    )
    if len(clean) != len(trig):
        raise ValueError(f"{len(clean)} clean but {len(trig)} triggered prompts: they must be pairs")
    sites = _check_sites(sites)
    with _Runner(model, tokenizer, batch_size) as run:
        cs, ts = encode_prompts(tokenizer, clean), encode_prompts(tokenizer, trig)
        acc: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        for idx in _chunks(len(cs), run.batch_size):
            batch = _left_pad([cs[i] for i in idx] + [ts[i] for i in idx], run.pad_id)
            got = run.collect_last(batch, sites)
            for s in sites:
                acc[s].append(got[s])  # [2B, L, H]
            del got
        n = len(cs)
        rows = []
        for s in sites:
            parts = acc[s]
            a_clean = torch.cat([p[: p.shape[0] // 2] for p in parts]).double()  # [P, L, H]
            a_trig = torch.cat([p[p.shape[0] // 2 :] for p in parts]).double()
            delta = a_trig - a_clean
            mean_delta = delta.mean(0)  # [L, H]
            norm_diff = mean_delta.norm(dim=-1)
            cos = torch.nn.functional.cosine_similarity(a_trig, a_clean, dim=-1).mean(0)
            consistency = torch.nn.functional.cosine_similarity(
                delta, mean_delta[None].expand_as(delta), dim=-1, eps=1e-12
            ).mean(0)
            n_clean, n_trig = a_clean.norm(dim=-1).mean(0), a_trig.norm(dim=-1).mean(0)
            for b in range(run.L):
                rows.append(
                    {
                        "model": label,
                        "layer": b,
                        "site": s,
                        "norm_diff": float(norm_diff[b]),
                        "cosine": float(cos[b]),
                        "rel_norm_diff": float(norm_diff[b] / n_clean[b]) if n_clean[b] > 0 else float("nan"),
                        "consistency": float(consistency[b]),
                        "norm_clean": float(n_clean[b]),
                        "norm_triggered": float(n_trig[b]),
                        "n_pairs": n,
                    }
                )
    df = pd.DataFrame(rows, columns=DIFF_COLUMNS)
    return ProbeResult(df, figure_activation_diff(df) if figure else None, meta={"probe": "activation_diff"})


def compare_activation_diff(
    models: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    clean_prompts: Sequence[Example | str],
    triggered_prompts: Sequence[Example | str],
    **kwargs: Any,
) -> ProbeResult:
    """:func:`activation_diff` for several models (e.g. ``{"suspicious": m1, "purified": m2}``),
    one frame with a ``model`` column per label and one figure (line style per model).
    A value may also be a ``(model, tokenizer)`` pair."""
    frames = []
    for name, m in models.items():
        mdl, tok = m if isinstance(m, tuple) else (m, tokenizer)
        frames.append(
            activation_diff(
                mdl, tok, clean_prompts, triggered_prompts, label=name, figure=False, **kwargs
            ).frame
        )
    df = pd.concat(frames, ignore_index=True)
    return ProbeResult(
        df, figure_activation_diff(df), meta={"probe": "activation_diff", "models": list(models)}
    )
