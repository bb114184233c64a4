"""The four Table-1 checks as condition lists, and running, saving and comparing them with the paper."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.registry import ATTN_KINDS, MLP_KINDS
from ..weights.deltas import WeightDelta
from .config import CHECKS, DEFAULT_KS, DEFAULT_STARTS, KEEP_POSITIONS, PAPER_TABLE1
from .sanity import CheckResult, Condition, SanityContext, SanityResult, _ranges, evaluate_conditions
from .sanity_figures import (
    _attn_label,
    _title,
    figure_attention_vs_mlp,
    figure_keep_only_spans,
    figure_shuffle_blocks,
    figure_span_sweep,
)


# --------------------------------------------------------------------------- the conditions of each check
def _attn(delta: WeightDelta, zero_attention: bool) -> WeightDelta:
    return delta.zero(ATTN_KINDS) if zero_attention else delta


def conditions_attention_vs_mlp(ctx: SanityContext) -> list[Condition]:
    d = ctx.delta
    return [
        Condition("attention_vs_mlp", "full delta", d, attention_zeroed=False),
        Condition("attention_vs_mlp", "no delta (base)", d.keep(kinds=()), attention_zeroed=True),
        Condition(
            "attention_vs_mlp", "attention only (MLP ablated)", d.zero(MLP_KINDS), attention_zeroed=False
        ),
        Condition(
            "attention_vs_mlp", "MLP only (attention ablated)", d.zero(ATTN_KINDS), attention_zeroed=True
        ),
    ]


def default_ks(n_blocks: int) -> list[int]:
    """``DEFAULT_KS`` below ``n_blocks``, plus ``n_blocks`` (every block zeroed)."""
    return sorted({k for k in DEFAULT_KS if k < n_blocks} | {n_blocks})


def _start_of(start: int | str, k: int, n_blocks: int) -> int:
    if start == "start":
        return 0
    if start == "middle":
        return (n_blocks - k) // 2
    if start == "end":
        return n_blocks - k
    s = int(start)
    if not 0 <= s <= n_blocks - k:
        return -1  # span does not fit: skipped
    return s


def conditions_span_sweep(
    ctx: SanityContext,
    ks: Sequence[int] | None = None,
    starts: Sequence[int | str] | None = None,
    zero_attention: Sequence[bool] = (False, True),
) -> list[Condition]:
    L = ctx.layout.n_blocks
    ks = default_ks(L) if ks is None else sorted({int(k) for k in ks})
    bad = [k for k in ks if not 0 <= k <= L]
    if bad:
        raise ValueError(f"span_sweep: k must be in 0..{L}, got {bad}")
    starts = DEFAULT_STARTS if starts is None else tuple(starts)
    out = []
    for za in zero_attention:
        base = _attn(ctx.delta, za)
        for k in ks:
            seen: set[int] = set()
            for s in starts:
                st = 0 if k in (0, L) else _start_of(s, k, L)
                if st < 0 or st in seen:
                    continue
                seen.add(st)
                span = list(range(st, st + k))
                name = (
                    f"MLP {_ranges(span)} zeroed, {_attn_label(za)}"
                    if k
                    else f"no MLP zeroed, {_attn_label(za)}"
                )
                out.append(
                    Condition(
                        "span_sweep",
                        name,
                        base.zero(MLP_KINDS, span) if k else base,
                        k=k,
                        start=st,
                        attention_zeroed=za,
                    )
                )
    return out


def conditions_keep_only_spans(
    ctx: SanityContext,
    width: int | None = None,
    positions: Sequence[int | str] = KEEP_POSITIONS,
    zero_attention: Sequence[bool] = (False, True),
) -> list[Condition]:
    L = ctx.layout.n_blocks
    width = int(width) if width is not None else max(1, math.ceil(L / 3))
    if not 1 <= width <= L:
        raise ValueError(f"keep_only_spans: width must be in 1..{L}, got {width}")
    out = []
    for za in zero_attention:
        base = _attn(ctx.delta, za)
        seen: set[int] = set()
        for pos in positions:
            st = _start_of(pos, width, L)
            if st < 0 or st in seen:
                continue
            seen.add(st)
            span = list(range(st, st + width))
            where = pos if isinstance(pos, str) else "at"
            out.append(
                Condition(
                    "keep_only_spans",
                    f"keep MLP {_ranges(span)} only ({where}), {_attn_label(za)}",
                    base.zero(MLP_KINDS, [b for b in range(L) if b not in span]),
                    k=width,
                    start=st,
                    attention_zeroed=za,
                )
            )
    return out


def conditions_shuffle_blocks(
    ctx: SanityContext,
    seeds: Sequence[int] = (0, 1, 2),
    zero_attention: Sequence[bool] = (False,),
    reference: bool = True,
) -> list[Condition]:
    out = []
    for za in zero_attention:
        base = _attn(ctx.delta, za)
        if reference:
            out.append(
                Condition("shuffle_blocks", f"unshuffled, {_attn_label(za)}", base, attention_zeroed=za)
            )
        for s in seeds:
            d = base.permute_blocks(int(s), kinds=MLP_KINDS)
            src = d.meta["permutation"]["source_of"]
            fixed = sum(1 for i, b in enumerate(d.meta["permutation"]["blocks"]) if src[i] == b)
            out.append(
                Condition(
                    "shuffle_blocks",
                    f"MLP shuffled (seed {s}), {_attn_label(za)}",
                    d,
                    seed=int(s),
                    attention_zeroed=za,
                    detail=f"block i gets MLP ΔW of {src}; {fixed} block(s) kept their own",
                )
            )
    return out


# --------------------------------------------------------------------------- the four checks
def _check(
    ctx: SanityContext,
    conditions: list[Condition],
    figure: Callable[[pd.DataFrame], Any],
    progress: bool | str,
    bar: Any,
) -> CheckResult:
    df = evaluate_conditions(ctx, conditions, progress=progress, bar=bar)
    return CheckResult(df, figure(df))


def attention_vs_mlp(ctx: SanityContext, *, progress: bool | str = True, bar: Any = None) -> CheckResult:
    """Rows: full delta, no delta (base), attention only (MLP ablated), MLP only (attention ablated)."""
    conds = conditions_attention_vs_mlp(ctx)
    return _check(
        ctx,
        conds,
        lambda df: figure_attention_vs_mlp(df, _title(ctx, "Attention vs MLP deltas")),
        progress,
        bar,
    )


def span_sweep(
    ctx: SanityContext,
    ks: Sequence[int] | None = None,
    starts: Sequence[int | str] | None = None,
    *,
    zero_attention: Sequence[bool] = (False, True),
    progress: bool | str = True,
    bar: Any = None,
) -> CheckResult:
    """Zero the MLP deltas of ``k`` consecutive blocks at each start, attention deltas kept and zeroed.

    ``ks`` default: 0, 1, 2, 4, 6, 8, 10, 12, 15, 20, 25 (those < L) and L.
    ``starts``: block indices or "start" (0), "middle" ((L − k) // 2), "end"
    (L − k); default "start" and "end" (the budget; add "middle" for the paper's "anywhere"). Spans
    that do not fit are skipped, duplicate spans (small L, k = 0 or L) evaluated once.
    """
    conds = conditions_span_sweep(ctx, ks, starts, zero_attention)
    return _check(
        ctx,
        conds,
        lambda df: figure_span_sweep(df, ctx.layout.n_blocks, _title(ctx, "Block-span ablation: ASR vs k")),
        progress,
        bar,
    )


def keep_only_spans(
    ctx: SanityContext,
    width: int | None = None,
    *,
    positions: Sequence[int | str] = KEEP_POSITIONS,
    zero_attention: Sequence[bool] = (False, True),
    progress: bool | str = True,
    bar: Any = None,
) -> CheckResult:
    """Keep only the MLP deltas of ``width`` consecutive blocks (default ``ceil(L/3)``) at the start, middle
    and end of the stack; attention deltas kept and zeroed."""
    conds = conditions_keep_only_spans(ctx, width, positions, zero_attention)
    return _check(
        ctx,
        conds,
        lambda df: figure_keep_only_spans(df, _title(ctx, "Keep only one span of MLP ΔW")),
        progress,
        bar,
    )


def shuffle_blocks(
    ctx: SanityContext,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    zero_attention: Sequence[bool] = (False,),
    reference: bool = True,
    progress: bool | str = True,
    bar: Any = None,
) -> CheckResult:
    """MLP deltas permuted across blocks (each block's gate/up/down move together), one row per seed,
    plus the unshuffled reference row (``reference``)."""
    conds = conditions_shuffle_blocks(ctx, seeds, zero_attention, reference)
    return _check(
        ctx,
        conds,
        lambda df: figure_shuffle_blocks(df, _title(ctx, "MLP ΔW shuffled across blocks")),
        progress,
        bar,
    )


# --------------------------------------------------------------------------- all four
def _all_conditions(
    ctx: SanityContext, checks: Sequence[str], ks: Any, starts: Any, width: Any, seeds: Any
) -> dict[str, list[Condition]]:
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; checks: {list(CHECKS)}")
    build = {
        "attention_vs_mlp": lambda: conditions_attention_vs_mlp(ctx),
        "span_sweep": lambda: conditions_span_sweep(ctx, ks, starts),
        "keep_only_spans": lambda: conditions_keep_only_spans(ctx, width),
        "shuffle_blocks": lambda: conditions_shuffle_blocks(ctx, seeds),
    }
    return {c: build[c]() for c in CHECKS if c in checks}


def sanity_plan(
    ctx: SanityContext,
    checks: Sequence[str] = CHECKS,
    *,
    ks: Sequence[int] | None = None,
    starts: Sequence[int | str] | None = None,
    width: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
) -> pd.DataFrame:
    """The conditions :func:`run_sanity` would evaluate, without evaluating: one row each, with
    ``new`` = needs an evaluation (not memoised, not a duplicate of an earlier row)."""
    seen: set = set(ctx.cache)
    rows = []
    for check, conds in _all_conditions(ctx, checks, ks, starts, width, seeds).items():
        for c in conds:
            sig = ctx.signature(c.delta)
            new = sig is None or sig not in seen
            if sig is not None:
                seen.add(sig)
            rows.append(
                {
                    "check": check,
                    "condition": c.condition,
                    "k": c.k,
                    "start": c.start,
                    "attention_zeroed": c.attention_zeroed,
                    "seed": c.seed,
                    "n_modules": len(c.delta),
                    "new": new,
                }
            )
    return pd.DataFrame(rows)


def run_sanity(
    ctx: SanityContext,
    checks: Sequence[str] = CHECKS,
    *,
    ks: Sequence[int] | None = None,
    starts: Sequence[int | str] | None = None,
    width: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    progress: bool = True,
) -> SanityResult:
    """Run the chosen checks (default all four) with one progress bar over the distinct conditions."""
    from tqdm.auto import tqdm

    plan = sanity_plan(ctx, checks, ks=ks, starts=starts, width=width, seeds=seeds)
    t0 = time.time()
    bar = tqdm(total=int(plan.new.sum()), desc=f"sanity {ctx.label}", unit="cond", disable=not progress)
    out = SanityResult()
    try:
        runners = {
            "attention_vs_mlp": lambda: attention_vs_mlp(ctx, bar=bar, progress=False),
            "span_sweep": lambda: span_sweep(ctx, ks, starts, bar=bar, progress=False),
            "keep_only_spans": lambda: keep_only_spans(ctx, width, bar=bar, progress=False),
            "shuffle_blocks": lambda: shuffle_blocks(ctx, seeds, bar=bar, progress=False),
        }
        for name in CHECKS:
            if name in checks:
                out[name] = runners[name]()
    finally:
        bar.close()
    out.meta = {
        **ctx.describe(),
        "seconds": round(time.time() - t0, 1),
        "n_rows": int(len(plan)),
        "n_conditions": int(plan.new.sum()),
    }
    return out


def save_sanity(result: SanityResult | dict, out_dir: str | Path) -> Path:
    """Write ``<check>.csv`` and ``<check>.html`` per check, ``sanity.csv`` (all rows), ``sanity.json`` (meta)
    and one shared ``plotly.min.js`` (the HTML files load it from beside them, so they work offline).
    Every file is written atomically."""
    from plotly.offline import get_plotlyjs

    from ..core.artifacts import atomic_write_text, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "plotly.min.js"
    if not js.exists():
        atomic_write_text(js, get_plotlyjs())
    frames = []
    for name, res in result.items():
        frame, fig = (res.frame, res.figure) if isinstance(res, CheckResult) else res
        frames.append(frame)
        atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False))
        if fig is not None:
            atomic_write_text(out / f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True))
    if frames:
        atomic_write_text(out / "sanity.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))
    write_json(out / "sanity.json", getattr(result, "meta", {}))
    return out


# --------------------------------------------------------------------------- reading the result
def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _row(df: pd.DataFrame, condition: str) -> pd.Series | None:
    m = df[df.condition == condition]
    return m.iloc[0] if len(m) else None


def death_k(df: pd.DataFrame, attention_zeroed: bool, threshold: float = 0.5) -> int | None:
    """Smallest k from which the span sweep's mean ASR (over starts) stays below ``threshold`` of the
    k = 0 ASR for every larger k; None if the backdoor survives every k."""
    sub = df[df.attention_zeroed == attention_zeroed]
    if sub.empty:
        return None
    agg = sub.groupby("k")["asr"].mean().sort_index()
    ref = float(agg.iloc[0]) if agg.index[0] == 0 else float(agg.max())
    if ref <= 0:
        return None
    dead = agg < threshold * ref
    for k in agg.index:
        if dead.loc[k:].all():
            return int(k)
    return None


def compare_with_paper(result: SanityResult | dict) -> pd.DataFrame:
    """One row per check: the paper's Table-1 observation beside a one-line summary of ours."""
    rows = []
    for name in CHECKS:
        if name not in result:
            continue
        df = result[name].frame
        if name == "attention_vs_mlp":
            parts = []
            for cond in (
                "full delta",
                "MLP only (attention ablated)",
                "attention only (MLP ablated)",
                "no delta (base)",
            ):
                r = _row(df, cond)
                if r is not None:
                    parts.append(f"{cond}: ASR {_fmt(r.asr)} (p {_fmt(r.p_behavior)})")
            ours = "; ".join(parts)
        elif name == "span_sweep":
            parts = []
            for za in (False, True):
                sub = df[df.attention_zeroed == za]
                if sub.empty:
                    continue
                agg = sub.groupby("k")["asr"].mean()
                kd = death_k(df, za)
                curve = ", ".join(f"k={int(k)}: {v:.2f}" for k, v in agg.items())
                parts.append(
                    f"{_attn_label(za)}: ASR falls below half of k=0 from k={kd if kd is not None else '—'} "
                    f"(mean over starts {curve})"
                )
            ours = "; ".join(parts)
        elif name == "keep_only_spans":
            ours = "; ".join(
                f"MLP {r.blocks} kept, {_attn_label(bool(r.attention_zeroed))}: ASR {_fmt(r.asr)}"
                for r in df.itertuples()
            )
        else:
            ours = "; ".join(f"{r.condition}: ASR {_fmt(r.asr)}" for r in df.itertuples())
        rows.append({"check": name, "paper (LLaMA-2-7B, Table 1)": PAPER_TABLE1[name], "ours": ours})
    return pd.DataFrame(rows)
