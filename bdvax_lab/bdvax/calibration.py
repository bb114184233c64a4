"""Leave-one-variant-out (LOVO) calibration of the budget ρ: the defender's own variants choose it.

The defender knows every synthetic key it planted, so it can test a budget on backdoors whose key it
knows, without ever seeing the real trigger. For each variant ``i`` and each candidate ρ (ascending):

1. score the other N−1 variants' cached differential deltas (Eq. 2, as :func:`compute_signature` does)
   and select at ρ (the signature config's scope and heads);
2. suppress that selection in variant ``i``'s poisoned twin
   (:func:`~bdvax_lab.bdvax.twin_models.poisoned_twin`: exact in the adapter setting, ``θ_s + Δ_i`` in the
   full one) the way purification suppresses;
3. measure on the defender's own prompts (its ``variant`` pool minus every variant's training data):
   ``held_out_asr`` — greedy replies to the prompts with ``i``'s key that show ``i``'s behaviour (its judge,
   :mod:`bdvax_lab.threat.judges`); ``clean_drift`` — how much the log-likelihood per token of the
   suspicious model's self-distilled replies drops against the unsuppressed twin (nats/token: the skill
   proxy); ``ppl_ratio`` — perplexity of ground-truth answers, suppressed over unsuppressed twin.

ρ* is the smallest candidate whose held-out ASR passes :class:`~bdvax_lab.bdvax.config.CalibrationConfig`'s
threshold (mean over the held-out variants, or each of them), counting only variants whose twin learnt its
key (ASR before suppression ≥ ``min_baseline_asr``). When no candidate passes, the largest is returned with
``met=False``; when no twin learnt its key, the default ρ is (``met=False``; the reason says which).

With ``CalibrationConfig.heads`` the same curve is measured once per attention-head budget (the N−1
signatures are scored once and only re-selected): each head budget yields its smallest passing ρ, and
the point among those that moves the skill proxy least (clean drift) is chosen, ties to fewer heads.
The MLP channels alone can miss a backdoor that lives in attention (refusal on the default model), so a
defender that cannot see the trigger lets its own variants say whether heads are needed.

Cost: per candidate ρ and held-out variant one suppression, ``n_prompts`` greedy generations of
``max_new_tokens`` tokens and two teacher-forced passes (``n_reference`` replies, ``n_ppl`` answers);
plus per variant one rebuilt twin per ρ (an adapter copy, or in the full setting a model copy plus Δ_i)
and one N−1 scoring. Every (variant, ρ) point is cached as one JSON file, written atomically, under a key
of the twin entries, the scoring and suppression recipes and the measured examples: a rerun (or a killed
run) resumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.artifacts import read_json, stable_hash, write_json
from ..core.data import Example
from ..core.registry import layout_of, setting_of
from ..threat.suspicious import as_suspicious
from ..weights.config import SuppressConfig
from .config import DEFAULT_RHO, CalibrationConfig, SignatureConfig, default_head_grid

#: bumped when what a cached calibration point means changes
CALIBRATION_VERSION = 2

#: one row per (head budget, ρ, held-out variant); ρ = 0 is the unsuppressed twin (heads 0)
COLUMNS = [
    "heads",
    "rho",
    "held_out_variant",
    "key",
    "held_out_asr",
    "clean_drift",
    "ppl_ratio",
    "hits",
    "n_prompts",
    "degenerate",
    "nll",
    "ppl",
    "n_channels",
    "n_heads",
    "seconds",
]


@dataclass
class CalibrationResult:
    """The calibration curve and the ρ it chose.

    ``frame``: :data:`COLUMNS`, one row per (head budget, ρ, held-out variant), ρ = 0 rows being the
    unsuppressed twins; ``rho`` and ``heads``: the chosen budget; ``met``: whether it passed the threshold;
    ``reason``: one line saying why this budget; ``informative``: the variants whose twin learnt its key
    (the ones the criterion counts).
    """

    frame: pd.DataFrame
    rho: float
    met: bool
    reason: str
    config: CalibrationConfig
    setting: str | None = None
    informative: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    heads: int = 0

    def summary(self) -> pd.DataFrame:
        """Per (head budget, ρ) over the informative held-out variants: mean and max ASR, mean drift and
        ppl ratio, pass."""
        return curve_summary(self.frame, self.config, self.informative)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (stored in the signature's ``meta["calibration"]`` by :func:`select_auto`)."""
        rows = [
            {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in self.frame.to_dict(orient="records")
        ]
        return {
            "rho": self.rho,
            "heads": self.heads,
            "met": self.met,
            "reason": self.reason,
            "setting": self.setting,
            "informative": list(self.informative),
            "config": self.config.to_dict(),
            "rows": rows,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationResult:
        heads = int(data.get("heads") or 0)
        frame = pd.DataFrame(data.get("rows") or [], columns=COLUMNS).astype({"rho": float})
        frame["heads"] = frame["heads"].fillna(heads).astype(int)  # saved before head budgets were searched
        return cls(
            frame=frame,
            rho=float(data["rho"]),
            heads=heads,
            met=bool(data["met"]),
            reason=str(data.get("reason", "")),
            config=CalibrationConfig.from_dict(data.get("config") or {}),
            setting=data.get("setting"),
            informative=[int(v) for v in data.get("informative") or []],
            meta=dict(data.get("meta") or {}),
        )

    def __repr__(self) -> str:
        verdict = "met" if self.met else "NOT met"
        return (
            f"CalibrationResult(rho={self.rho:g}, heads={self.heads}, {verdict}: {self.reason})\n"
            f"{self.summary().to_string()}"
        )


# =========================================================================== choosing ρ
def _baselines(frame: pd.DataFrame) -> pd.Series:
    return frame[frame.rho == 0].set_index("held_out_variant")["held_out_asr"]


def informative_variants(frame: pd.DataFrame, config: CalibrationConfig) -> list[int]:
    """Held-out variants whose twin fired its key (unsuppressed) on ≥ ``min_baseline_asr`` of the prompts."""
    base = _baselines(frame)
    return sorted(int(v) for v, a in base.items() if a >= config.min_baseline_asr)


def curve_summary(frame: pd.DataFrame, config: CalibrationConfig, informative: Sequence[int]) -> pd.DataFrame:
    """Per (heads, ρ > 0) over ``informative`` variants: mean/max ASR, clean_drift, ppl_ratio, n_variants,
    passes (``heads`` is 0 where the frame has no such column)."""
    d = frame[(frame.rho > 0) & frame.held_out_variant.isin(list(informative))]
    d = d.assign(heads=d["heads"].fillna(0).astype(int) if "heads" in d else 0)
    cols = ["heads", "rho", "mean_asr", "max_asr", "clean_drift", "ppl_ratio", "n_variants", "passes"]
    if d.empty:
        return pd.DataFrame(columns=cols)
    g = d.groupby(["heads", "rho"], sort=True)
    out = pd.DataFrame(
        {
            "mean_asr": g.held_out_asr.mean(),
            "max_asr": g.held_out_asr.max(),
            "clean_drift": g["clean_drift"].mean() if "clean_drift" in d else float("nan"),
            "ppl_ratio": g["ppl_ratio"].mean() if "ppl_ratio" in d else float("nan"),
            "n_variants": g.held_out_variant.nunique(),
        }
    ).reset_index()
    agg = out.mean_asr if config.criterion == "mean" else out.max_asr
    complete = out.n_variants == len(set(informative))
    out["passes"] = complete & (agg <= config.max_asr + 1e-12)
    return out[cols]


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_budget` chose: ρ, head budget, whether it passed, why, the counted variants."""

    rho: float
    heads: int
    met: bool
    reason: str
    informative: list[int]


def choose_budget(frame: pd.DataFrame, config: CalibrationConfig, fallback: float, heads: int = 0) -> Choice:
    """The budget the calibration curve supports (module docstring).

    ``frame`` has at least ``rho``, ``held_out_variant`` and ``held_out_asr`` (ρ = 0 rows: unsuppressed),
    and ``heads`` when several head budgets were measured. Per head budget the smallest passing ρ; among
    those the least clean drift (NaN counts as worst), then fewer heads, then smaller ρ. Nothing passes →
    per head budget its largest ρ, the one with the lowest held-out ASR, ``met=False``; no informative
    variant → ``(fallback, heads)``, ``met=False``.
    """
    informative = informative_variants(frame, config)
    if not informative:
        return Choice(
            float(fallback),
            int(heads),
            False,
            f"no held-out twin fired its own key on ≥ {config.min_baseline_asr:.0%} of the prompts before "
            f"suppression: nothing to calibrate on, the default ρ={fallback:g} is used",
            informative,
        )
    s = curve_summary(frame, config, informative)
    if s.empty:
        return Choice(float(fallback), int(heads), False, "no ρ evaluated yet", informative)
    stat = "mean" if config.criterion == "mean" else "every"
    col = "mean_asr" if config.criterion == "mean" else "max_asr"
    budgets = sorted(int(h) for h in s.heads.unique())
    several = len(budgets) > 1
    passing = s[s.passes].sort_values("rho").groupby("heads", as_index=False).first()
    if len(passing):
        drift = passing.clean_drift.fillna(float("inf"))
        best = passing.assign(_d=drift).sort_values(["_d", "heads", "rho"]).iloc[0]
        reason = (
            f"smallest ρ with {stat} held-out ASR ≤ {config.max_asr:g} over {len(informative)} variant(s)"
        )
        if several and len(passing) == 1:
            reason += (
                f"; {int(best.heads)} heads is the only head budget of {budgets} that passes (clean drift "
                f"{best.clean_drift:+.3f} nats/token)"
            )
        elif several:
            alts = ", ".join(f"{int(r.heads)} heads: ρ {r.rho:g}" for r in passing.itertuples())
            reason += (
                f"; of the head budgets that pass ({alts}), {int(best.heads)} heads moves the self-distilled "
                f"replies least (clean drift {best.clean_drift:+.3f} nats/token)"
            )
        return Choice(float(best.rho), int(best.heads), True, reason, informative)
    last = s.sort_values("rho").groupby("heads", as_index=False).last()
    worst = last.sort_values([col, "heads"]).iloc[0]
    where = f" with {int(worst.heads)} heads" if several else ""
    return Choice(
        float(worst.rho),
        int(worst.heads),
        False,
        f"no ρ{' or head budget' if several else ''} reached {stat} held-out ASR ≤ {config.max_asr:g}; the "
        f"largest ρ tried{where} is used (held-out ASR {float(worst[col]):.2f} there)",
        informative,
    )


def choose_rho(
    frame: pd.DataFrame, config: CalibrationConfig, fallback: float
) -> tuple[float, bool, str, list[int]]:
    """``(ρ, met, reason, informative variants)`` of :func:`choose_budget` (one head budget)."""
    c = choose_budget(frame, config, fallback)
    return c.rho, c.met, c.reason, c.informative


def derive_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``clean_drift`` (nll − the variant's ρ = 0 nll) and ``ppl_ratio`` (ppl / its ρ = 0 ppl) of raw rows."""
    d = frame.copy()
    if "heads" not in d:
        d["heads"] = 0
    base = d[d.rho == 0].drop_duplicates("held_out_variant").set_index("held_out_variant")
    nll0 = d.held_out_variant.map(base["nll"]) if "nll" in base else None
    ppl0 = d.held_out_variant.map(base["ppl"]) if "ppl" in base else None
    d["clean_drift"] = d["nll"] - nll0 if nll0 is not None else float("nan")
    d["ppl_ratio"] = d["ppl"] / ppl0 if ppl0 is not None else float("nan")
    for c in COLUMNS:
        if c not in d:
            d[c] = float("nan")
    return d[COLUMNS].sort_values(["heads", "rho", "held_out_variant"], kind="stable").reset_index(drop=True)


# =========================================================================== measuring
def _measure(
    model: Any,
    tok: Any,
    triggered: Sequence[Example],
    judge: Any,
    reference: Sequence[Example],
    answers: Sequence[Example],
    cfg: CalibrationConfig,
) -> dict[str, Any]:
    """Held-out ASR on ``triggered``, NLL/token of the ``reference`` replies, perplexity of ``answers``."""
    from ..core.generate import generate
    from ..core.scoring import continuation_logprobs
    from ..threat.evaluate import perplexity
    from ..threat.judges import degenerate_reason

    replies = generate(
        model, tok, list(triggered), max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    hits = sum(bool(judge(r)) for r in replies)
    out: dict[str, Any] = {
        "held_out_asr": hits / max(1, len(replies)),
        "hits": hits,
        "n_prompts": len(replies),
        "degenerate": sum(degenerate_reason(r) is not None for r in replies),
        "nll": float("nan"),
        "ppl": float("nan"),
    }
    if reference:
        lp, n = continuation_logprobs(
            model,
            tok,
            list(reference),
            [e.response for e in reference],
            batch_size=cfg.batch_size,
            end_of_turn=True,
            max_tokens=cfg.ppl_max_tokens,
        )
        out["nll"] = -sum(lp) / max(1, sum(n))
    if answers:
        out["ppl"] = perplexity(
            model, tok, list(answers), max_tokens=cfg.ppl_max_tokens, batch_size=cfg.batch_size
        )
    return out


# =========================================================================== the defender's prompts
def _entries(sources: Any) -> list[Path]:
    if hasattr(sources, "meta") and hasattr(sources, "norm_term"):  # a Signature from extract_signature
        paths = (sources.meta or {}).get("cache")
        if not paths:
            raise ValueError(
                "calibrate_rho: this signature records no twin-cache entries (meta['cache']); give the "
                "entry directories, or extract the signature with extract_signature"
            )
        sources = paths
    entries = [Path(p) for p in sources]
    if len(entries) < 2:
        raise ValueError(f"leave-one-variant-out needs at least 2 variants, got {len(entries)}")
    return entries


def _specs(entries: Sequence[Path]) -> list[Any]:
    from ..weights.delta_io import DeltaReader
    from .variants import VariantSpec

    specs = []
    for e in entries:
        meta = DeltaReader(e).meta
        if not isinstance(meta.get("variant"), dict):
            raise ValueError(f"{e}: not a twin-cache entry (no variant spec in its manifest)")
        specs.append(VariantSpec.from_dict(meta["variant"]))
    return specs


def defender_prompts(specs: Sequence[Any], pool: Sequence[Example] | None, n: int) -> list[Example]:
    """``n`` of the defender's examples no variant trained on and holding no variant key (the pool's
    order), as they are; topped up with the variants' own training examples when the pool runs short."""
    from ..threat.attacks import contains_key
    from .variants import default_pool, example_id

    family = specs[0].family
    items = list(pool) if pool is not None else default_pool(family)
    used = {i for s in specs for i in s.clean_ids}
    keys = [s.key for s in specs]
    fresh = [e for e in items if example_id(e) not in used and not contains_key(e, keys)]
    if len(fresh) < n:
        fresh += [e for e in items if example_id(e) in used and not contains_key(e, keys)]
    return fresh[:n]


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir) / "_calibration"
    from ..core.models import cache_dir as root

    return root() / "calibration"


def _examples_hash(examples: Sequence[Example]) -> str:
    return stable_hash([e.to_dict() for e in examples])


def _default_budgets(model: Any, sig_cfg: SignatureConfig) -> list[int]:
    """Head budgets searched when ``CalibrationConfig.heads`` is None: :data:`DEFAULT_HEAD_SHARES` of the
    model's attention heads when heads are scored, else only the signature config's own budget."""
    if not sig_cfg.head_kinds:
        return [int(sig_cfg.heads)]
    layout = layout_of(model)
    return sorted(set(default_head_grid(layout.n_blocks * layout.n_heads)) | {int(sig_cfg.heads)})


def _pick(examples: Sequence[Example], n: int) -> list[Example]:
    """``n`` of ``examples`` chosen by their content's hash, so a file's line order does not change them."""
    return sorted(examples, key=lambda e: stable_hash(e.to_dict()))[:n]


# =========================================================================== the calibration
def calibrate_rho(
    suspicious: Any,
    sources: Any,
    config: CalibrationConfig | None = None,
    *,
    signature_config: SignatureConfig | None = None,
    suppress_config: SuppressConfig | None = None,
    reference: Sequence[Example] | None = None,
    pool: Sequence[Example] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Leave-one-variant-out calibration of ρ (module docstring) for the suspicious model.

    ``suspicious``: a SuspiciousModel, ``(model, tokenizer)`` or path (never changed); ``sources``: its
    twin-cache entry directories, or a signature from :func:`extract_signature` (its ``meta["cache"]``).
    ``signature_config``: score, λ, scope and heads of the N−1 signatures (default: ``SignatureConfig()``);
    ``suppress_config``: purification's suppression. ``reference``: self-distilled examples for the skill
    proxy (default: ``n_reference`` fresh defender prompts answered by the suspicious model, cached; of a
    longer list, ``n_reference`` chosen by content hash, whatever the list's order);
    ``pool``: the defender's instructions the variants came from (default: the shipped ``variant`` split).
    ``cache_dir``: the twin cache (points go to ``<cache_dir>/_calibration``; default the bdvax cache's
    ``calibration/``). Returns a :class:`CalibrationResult`; ``result.frame`` is the tidy curve.
    """
    from tqdm.auto import tqdm

    from ..core.models import release_memory
    from ..threat.attacks import triggered_prompts
    from ..threat.evaluate import general_answers
    from ..threat.judges import get_judge
    from ..weights.suppression import suppress
    from .signature import compute_signature
    from .twin_models import poisoned_twin

    cfg = config or CalibrationConfig()
    sig_cfg = (signature_config or SignatureConfig()).replace(rho=None)
    sup_cfg = suppress_config or SuppressConfig()
    sm = as_suspicious(suspicious)
    model, tok = sm.model, sm.tokenizer
    setting = setting_of(model)
    entries = _entries(sources)
    specs = _specs(entries)
    grid = cfg.grid(setting)
    t0 = time.time()

    prompts = defender_prompts(specs, pool, cfg.n_prompts)
    if reference is None and cfg.n_reference:
        from ..core.selfdistill import defender_data

        fresh = defender_prompts(specs, pool, cfg.n_prompts + cfg.n_reference)[cfg.n_prompts :]
        reference = (
            defender_data(
                model,
                tok,
                fresh,
                cache_dir=None if cache_dir is None else Path(cache_dir) / "_distilled",
                progress=progress,
            )
            if fresh
            else []
        )
    reference = _pick([e for e in (reference or []) if e.response.strip()], cfg.n_reference)
    answers = general_answers(cfg.n_ppl) if cfg.n_ppl else []

    skip = ("rhos", "heads", "stop_early", "criterion", "max_asr")
    what = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    key = stable_hash(
        {
            "version": CALIBRATION_VERSION,
            "entries": [f"{e.parent.name}/{e.name}" for e in entries],
            "signature": {k: sig_cfg.to_dict()[k] for k in ("score", "lam", "scope", "head_kinds")},
            "suppression": sup_cfg.to_dict(),
            "measure": what,
            "prompts": _examples_hash(prompts),
            "reference": _examples_hash(reference),
            "answers": _examples_hash(answers),
        }
    )
    root = _cache_root(cache_dir) / key

    def point_path(i: int, rho: float, heads: int) -> Path:
        if rho == 0:  # the unsuppressed twin: one point whatever the head budget
            return root / f"v{specs[i].index:02d}-rho0.json"
        return root / f"v{specs[i].index:02d}-h{heads:03d}-rho{rho:.4f}.json"

    triggered = [triggered_prompts(prompts, s.attack_spec(), seed=cfg.seed) for s in specs]
    judges = [get_judge(s.behavior_spec().judge) for s in specs]
    signatures: dict[int, Any] = {}  # held-out variant → the N−1 scores, re-selected per (ρ, heads)
    rows: list[dict[str, Any]] = []
    budgets = list(cfg.heads) if cfg.heads is not None else _default_budgets(model, sig_cfg)
    points = [(0, 0.0)] + [(h, r) for h in budgets for r in grid]
    bar = tqdm(total=len(points) * len(specs), desc="ρ calibration (LOVO)", disable=not progress, leave=False)
    fallback = DEFAULT_RHO.get(setting, DEFAULT_RHO["lora"])
    passed: set[int] = set()  # head budgets already passing (stop_early skips their larger ρ)
    for heads, rho in points:
        if cfg.stop_early and heads in passed and rho > 0:
            bar.update(len(specs))
            continue
        for i, spec in enumerate(specs):
            bar.set_postfix(rho=f"{rho:g}", heads=heads, held_out=spec.index)
            path = point_path(i, rho, heads)
            if path.is_file():
                rows.append({**read_json(path), "heads": heads})
                bar.update()
                continue
            t = time.time()
            n_ch = n_hd = 0
            twin = poisoned_twin(model, entries[i], setting)
            if rho > 0:
                if i not in signatures:
                    others = [e for j, e in enumerate(entries) if j != i]
                    signatures[i] = compute_signature(others, sig_cfg, select=False)
                sel = signatures[i].select(rho=rho, heads=heads)
                n_ch, n_hd = sel.n_selected, sum(int(v.numel()) for v in sel.selected_heads.values())
                suppress(twin, sel, sup_cfg, setting=setting)
            row = {
                "heads": heads,
                "rho": float(rho),
                "held_out_variant": int(spec.index),
                "key": spec.key,
                **_measure(twin, tok, triggered[i], judges[i], reference, answers, cfg),
                "n_channels": n_ch,
                "n_heads": n_hd,
                "seconds": round(time.time() - t, 2),
            }
            del twin
            release_memory()
            write_json(path, row)
            rows.append(row)
            bar.update()
        if cfg.stop_early and rho > 0:
            done = pd.DataFrame([r for r in rows if r["rho"] == 0 or r["heads"] == heads])
            if choose_budget(done, cfg, fallback).met:
                passed.add(heads)
    bar.close()
    frame = derive_columns(pd.DataFrame(rows))
    choice = choose_budget(frame, cfg, fallback, heads=budgets[0])
    return CalibrationResult(
        frame=frame,
        rho=choice.rho,
        heads=choice.heads,
        met=choice.met,
        reason=choice.reason,
        config=cfg,
        setting=setting,
        informative=choice.informative,
        meta={
            "cache": str(root),
            "seconds": round(time.time() - t0, 2),
            "n_variants": len(specs),
            "n_reference": len(reference),
            "grid": list(grid),
            "head_budgets": budgets,
        },
    )


def select_auto(
    signature: Any,
    suspicious: Any,
    config: CalibrationConfig | None = None,
    **kwargs: Any,
) -> tuple[Any, CalibrationResult]:
    """Calibrate ρ (and, with ``config.heads``, the head budget) for ``signature`` (its config's score, λ,
    scope and heads) and select at the chosen budget.

    Returns the selected signature, with the result in ``meta["calibration"]`` (saved with it), and the
    :class:`CalibrationResult`. ``kwargs`` go to :func:`calibrate_rho`.
    """
    import warnings

    res = calibrate_rho(suspicious, signature, config, signature_config=signature.config, **kwargs)
    if not res.met:
        warnings.warn(f"ρ calibration: {res.reason}", stacklevel=2)
    # a config saying rho="auto" then records the chosen numbers
    chosen = signature.select(rho=res.rho, heads=res.heads)
    chosen.meta = {**(chosen.meta or {}), "calibration": res.to_dict()}
    return chosen, res


def calibration_of(signature: Any) -> CalibrationResult | None:
    """The calibration stored in a signature's ``meta`` by :func:`select_auto` (None when it has none)."""
    data = (getattr(signature, "meta", None) or {}).get("calibration")
    return CalibrationResult.from_dict(data) if isinstance(data, dict) else None
