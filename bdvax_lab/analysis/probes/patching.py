"""Activation patching between clean and triggered prompts, per layer and site (nnsight)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ...core.data import Example
from .common import (
    DIRECTIONS,
    PATCHING_COLUMNS,
    POSITIONS,
    ProbeResult,
    _as_prompts,
    _Batch,
    _check_sites,
    _chunks,
    _left_pad,
    _logit_metric,
    _ordered,
    _read,
    _Runner,
    _token_ids,
    encode_prompts,
)
from .figures import figure_patching

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...core.types import Model


# --------------------------------------------------------------------------- 3. activation patching
def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def _crop_to(cache: Any, length: int) -> None:
    """Drop the tokens a cached forward appended (negative ``crop`` = tokens to remove, on
    transformers 4.4x and 5.x alike)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def activation_patching(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_prompts: Sequence[Example | str],
    triggered_prompts: Sequence[Example | str],
    behavior_token_id: int | Sequence[int],
    clean_token_ids: int | Sequence[int] | None = None,
    sites: Sequence[str] = ("mlp_output", "attn_output"),
    direction: str = "clean->triggered",
    *,
    positions: str = "last",
    label: str = "model",
    batch_size: int = 32,
    max_rows: int = 256,
    figure: bool = True,
    check_cache: bool = True,
) -> ProbeResult:
    """Per-layer effect on the logit difference of patching one site from the other run.

    The metric per prompt is ``LD = logit(behaviour) − logit(clean reply's
    first token)`` at the last prompt position (``behavior_token_id`` may be
    several ids: their log-sum-exp). ``clean_token_ids``: one id for all
    pairs, one per pair, or None = the model's own greedy first token on
    each clean prompt. ``direction="clean->triggered"`` runs the triggered
    prompts with block ``l``'s ``site`` taken from the clean run (does removing
    the trigger's effect there kill the behaviour?); ``"triggered->clean"`` the
    reverse (is that site enough to cause it?). ``positions``: ``"last"`` or
    ``"suffix"`` (see the module docstring).

    Returns a :class:`ProbeResult`: ``tensor[l, j]`` = mean ``LD_patched −
    LD_target`` (logits) for layer ``l`` and ``sites[j]``; ``frame`` (columns
    :data:`PATCHING_COLUMNS`) also has ``normalized = effect / (LD_source −
    LD_target)`` (1 = the patch moves the run all the way to the source run's
    metric) and the three mean LDs.
    """
    clean, trig = (
        _as_prompts(clean_prompts, "clean_prompts"),
        _as_prompts(triggered_prompts, "triggered_prompts"),
    )
    if len(clean) != len(trig):
        raise ValueError(f"{len(clean)} clean but {len(trig)} triggered prompts: they must be pairs")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose one of {DIRECTIONS}")
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}; choose one of {POSITIONS}")
    sites = _check_sites(sites)
    b_ids = _token_ids(behavior_token_id)
    n = len(clean)
    if clean_token_ids is None:
        fixed_clean = None
    elif isinstance(clean_token_ids, numbers.Integral) or (
        torch.is_tensor(clean_token_ids) and clean_token_ids.ndim == 0
    ):
        fixed_clean = torch.full((n,), int(clean_token_ids), dtype=torch.long)
    else:
        fixed_clean = torch.tensor([int(t) for t in clean_token_ids], dtype=torch.long)
        if len(fixed_clean) != n:
            raise ValueError(f"clean_token_ids has {len(fixed_clean)} ids for {n} pairs")
    src_is_clean = direction == "clean->triggered"
    with _Runner(model, tokenizer, batch_size, max_rows) as run:
        cs, ts = encode_prompts(tokenizer, clean), encode_prompts(tokenizer, trig)
        L, S = run.L, len(sites)
        ld_patched = torch.zeros(L, S, n)
        ld_target = torch.zeros(n)
        ld_source = torch.zeros(n)
        clean_tok = torch.zeros(n, dtype=torch.long)

        def ld(logits: torch.Tensor, ctok: torch.Tensor) -> torch.Tensor:
            """Logit difference: the behaviour tokens against each pair's clean next token ``ctok``."""
            return _logit_metric(logits, b_ids) - logits.float().gather(1, ctok[:, None])[:, 0]

        for idx in _chunks(n, run.batch_size):
            cb = _left_pad([cs[i] for i in idx], run.pad_id)
            tb = _left_pad([ts[i] for i in idx], run.pad_id)
            src_b, tgt_b = (cb, tb) if src_is_clean else (tb, cb)
            use_cache = positions == "last"
            got_c = run.collect_last(cb, sites, cache=use_cache and not src_is_clean)
            got_t = run.collect_last(tb, sites, cache=use_cache and src_is_clean)
            ctok = (
                fixed_clean[idx.start : idx.stop] if fixed_clean is not None else got_c["logits"].argmax(-1)
            )
            clean_tok[idx.start : idx.stop] = ctok

            src, tgt = (got_c, got_t) if src_is_clean else (got_t, got_c)
            ld_source[idx.start : idx.stop] = ld(src["logits"], ctok)
            if positions == "last":
                out, base = _patch_last(run, tgt_b, tgt.pop("cache"), src, sites, check_cache, tgt["logits"])
                ld_target[idx.start : idx.stop] = ld(base, ctok)
                for (layer, j), logits in out.items():
                    ld_patched[layer, j, idx.start : idx.stop] = ld(logits, ctok)
            else:
                ld_target[idx.start : idx.stop] = ld(tgt["logits"], ctok)
                suffix = [_common_suffix(cs[i], ts[i]) for i in idx]
                out = _patch_suffix(run, tgt_b, src_b, suffix, sites)
                for (layer, j), logits in out.items():
                    ld_patched[layer, j, idx.start : idx.stop] = ld(logits, ctok)
            del got_c, got_t, src, tgt, out
    effect = ld_patched.mean(-1) - ld_target.mean()
    gap = float(ld_source.mean() - ld_target.mean())
    rows = []
    for layer in range(L):
        for j, s in enumerate(sites):
            e = float(effect[layer, j])
            rows.append(
                {
                    "model": label,
                    "direction": direction,
                    "positions": positions,
                    "layer": layer,
                    "site": s,
                    "effect": e,
                    "normalized": e / gap if abs(gap) > 1e-6 else float("nan"),
                    "ld_patched": float(ld_patched[layer, j].mean()),
                    "ld_target": float(ld_target.mean()),
                    "ld_source": float(ld_source.mean()),
                    "n_pairs": n,
                }
            )
    df = pd.DataFrame(rows, columns=PATCHING_COLUMNS)
    per = pd.DataFrame(
        {
            "pair": range(n),
            "clean_token_id": clean_tok.tolist(),
            "ld_target": ld_target.tolist(),
            "ld_source": ld_source.tolist(),
        }
    )
    return ProbeResult(
        df,
        figure_patching(df) if figure else None,
        tensor=effect,
        per_prompt=per,
        meta={
            "probe": "activation_patching",
            "sites": list(sites),
            "direction": direction,
            "positions": positions,
            "behavior_token_ids": b_ids,
        },
    )


def _patch_last(
    run: _Runner,
    tgt_b: _Batch,
    cache: Any,
    src: dict[str, Any],
    sites: Sequence[str],
    check_cache: bool,
    full_logits: torch.Tensor,
) -> tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor]:
    """Patched last-position logits for every (layer, site), recomputing only the last token
    over the KV cache of the target's prefix; also the unpatched logits on the same path."""
    prefix = tgt_b.ids.shape[1] - 1
    _crop_to(cache, prefix)
    kwargs = {
        "input_ids": tgt_b.ids[:, -1:],
        "attention_mask": tgt_b.mask,
        "position_ids": tgt_b.pos[:, -1:],
        "past_key_values": cache,
        "use_cache": True,
        "logits_to_keep": 1,
    }
    store: dict[Any, Any] = {}
    with run.w.trace(**kwargs):
        store["base"] = run.w.output.logits[:, -1].detach().float().cpu().clone().save()
    _crop_to(cache, prefix)
    base = store["base"]
    if check_cache:
        err = float((base - full_logits).abs().max())
        scale = float(full_logits.abs().max()) + 1e-6
        if err > 1e-3 * scale + 1e-4:
            raise RuntimeError(
                f"KV-cached last-token forward differs from the full forward by {err:.3g}; "
                "use positions='suffix' or check the transformers cache API"
            )
    out: dict[tuple[int, int], torch.Tensor] = {}
    for layer in range(run.L):
        for j, s in enumerate(sites):
            env = run.envoy(layer, s)
            value = src[s][:, layer]
            with run.w.trace(**kwargs):
                live = _read(env, s)
                live[:, -1] = value.to(live.device, live.dtype)
                store["patched"] = run.w.output.logits[:, -1].detach().float().cpu().clone().save()
            _crop_to(cache, prefix)
            out[(layer, j)] = store.pop("patched")
    return out, base


def _patch_suffix(
    run: _Runner, tgt_b: _Batch, src_b: _Batch, suffix: Sequence[int], sites: Sequence[str]
) -> dict[tuple[int, int], torch.Tensor]:
    """Patched logits with each pair's common token suffix (right-aligned) patched from the source."""
    smax = max(suffix)
    keep = torch.zeros(len(suffix), smax, 1, dtype=torch.bool)
    for r, k in enumerate(suffix):
        keep[r, smax - k :] = True
    # source values over the last smax positions, every (layer, site)
    order = _ordered((b, s) for b in range(run.L) for s in sites)
    envs = [(b, s, run.envoy(b, s)) for b, s in order]
    src: dict[Any, Any] = {}
    with run.w.trace(**src_b.kwargs()):
        for b, s, env in envs:
            src[(b, s)] = _read(env, s)[:, -smax:].detach().clone().save()
    dev = run._device()
    keep = keep.to(dev)

    def patch(value: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def fn(t: torch.Tensor) -> None:
            tail = t[:, -smax:]
            tail.copy_(torch.where(keep, value.to(t.dtype), tail))

        return fn

    keys = [(layer, j) for layer in range(run.L) for j in range(len(sites))]
    plans = [[(layer, sites[j], patch(src[(layer, sites[j])]))] for layer, j in keys]
    logits = run.run_conditions(tgt_b, plans)
    return dict(zip(keys, logits))
