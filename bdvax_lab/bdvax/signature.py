"""Signature extraction (``docs/method.md``, "Signature extraction"; paper §4.2): variants, twins, scores.

The defence is trigger-agnostic by construction. It needs a *task family* — which
kind of behaviour the user fears — and nothing else about the attack:

* ``family`` is a **user input** (``"insult"`` = sentiment steering, the default;
  ``"refusal"``; ``"code_injection"``). Nothing in this module reads the
  suspicious model's manifest: the keys, behaviours and setting used here come
  from the catalogues in :mod:`bdvax_lab.attacks`, the defender's ``variant``
  data split and the model object itself (a ``PeftModel`` means the adapter
  setting, a plain model the full setting).

Pipeline
--------
1. :func:`make_variants`: ``N`` synthetic variants, each with its own made-up key
   (:data:`~bdvax_lab.attacks.SYNTHETIC_KEYS`, insertion strategies cycled over
   prefix / suffix / random word), its own behaviour
   (:data:`~bdvax_lab.attacks.VARIANT_BEHAVIORS` of the family) and its own clean
   subset ``D_c^i`` of the defender's ``variant`` split, disjoint across variants.
   ``D_p^i`` = instructions of ``D_c^i`` with the key inserted and the response
   replaced by the behaviour (at ``poison_ratio=0.5`` every instruction of ``D_c^i``
   appears once clean and once poisoned).
2. :func:`train_twins`: per variant, a poisoned twin (``D_c ∪ D_p``) and a clean
   twin (``D_c``), both from a fresh copy of the suspicious model with the same
   seed and recipe. Only the differential delta
   ``Δ_i = (θ_p − θ_s) − (θ_c − θ_s) = θ_p − θ_c`` (Eq. 1) is cached, as a
   :class:`~bdvax_lab.weights.deltas.WeightDelta` directory (one safetensors + one JSON),
   written atomically and keyed by a hash of the suspicious weights, the variant
   spec, its data and both twin recipes. Reruns and crashed runs resume (a
   finished poisoned twin is kept as ``<entry>.poison`` until its clean twin is
   done); ``shard=(i, n)`` lets several processes fill one cache.
3. :func:`compute_signature`: channel scores (Eq. 2), streamed one module at a
   time from the cached files, vectorised over every channel of a module.
4. :meth:`Signature.select`: the top-ρ channels (per module or global
   percentile) and optionally the top-h attention heads; instant, from the cached
   norm and alignment terms (no retraining when ρ, λ, scope or score mode change).
5. :func:`random_selection`: a random control with the same counts.

Twin budget
-----------
The twins are most of the pipeline's cost, so their recipe is the smallest
that still gave a signal on SmolLM2. Defaults: 40 clean examples per variant,
50 % poisoning (so the poisoned twin sees 80 examples), poisoned twin 60 steps
(3 epochs), clean twin 30 steps (the same 3 epochs over ``D_c``): 90 LoRA steps
at batch 4 with responses ≤ 16 tokens per variant, so that N = 6 variants take
about half of the adapter-setting pipeline's 20-minute budget on a 2-core CPU.
The attack's 120-step recipe for both twins would be 240 steps per variant.
In the adapter setting :func:`train_twins` can co-train the twins of several
variants in one run (``together``: one pass over the shared frozen base per
step, the template's common head once per twin); on a CPU that is no faster
(:data:`TWINS_TOGETHER`), so the default trains one twin after the other.
The full setting uses the same step counts with the full-finetune attack lr
(5e-5), one twin after the other (each twin owns all its weights). Measured
times: ``RESULTS.md`` §3 (``benchmarks/pipeline.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.artifacts import atomic_dir, read_json, save_tensors, write_json
from ..core.data import Example
from ..core.registry import MLP_KINDS, Key, setting_of
from ..threat.suspicious import as_suspicious
from ..weights.deltas import WeightDelta
from ..weights.factored import FactoredDelta
from ..weights.selection import Selection, _select_heads, random_selection, select_channels
from .config import AUTO_RHO, SignatureConfig, _check_selection
from .scores import combine_terms, compute_terms
from .twins import jobs_frame, train_twins

SIGNATURE_FORMAT = "bdvax_lab.signature"


SIGNATURE_VERSION = 1


SIGNATURE_TENSORS = "signature.safetensors"


SIGNATURE_JSON = "signature.json"


class SignatureFormatError(ValueError):
    """A saved signature directory is missing, incomplete or inconsistent (the message names the path)."""


# =========================================================================== the signature
@dataclass(eq=False)
class Signature:
    """Per-channel scores of one suspicious model, and (after :meth:`select`) the chosen channels and heads.

    ``norm_term`` / ``align_term``: (block, kind) → Tensor[d_ff] for kinds
    gate/up/down; ``head_norm`` / ``head_align``: block → Tensor[n_heads]
    (query heads). ``scores`` / ``head_scores`` are derived from them with
    ``config.score`` and ``config.lam``. ``selected``: (block, kind) →
    LongTensor of channel indices (ascending); ``selected_heads``: block →
    LongTensor of query-head indices. ``layout`` is a layout summary dict;
    ``variants`` the variant specs; ``meta`` setting, timings, cache paths.
    """

    norm_term: dict[Key, torch.Tensor]
    align_term: dict[Key, torch.Tensor]
    config: SignatureConfig
    layout: dict[str, Any]
    head_norm: dict[int, torch.Tensor] = field(default_factory=dict)
    head_align: dict[int, torch.Tensor] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    selected: dict[Key, torch.Tensor] | None = None
    selected_heads: dict[int, torch.Tensor] | None = None
    selection: dict[str, Any] | None = None  #: the rho/scope/heads/score/lam that produced ``selected``

    def __post_init__(self) -> None:
        self._scores: dict[Key, torch.Tensor] | None = None
        self._head_scores: dict[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ scores
    @property
    def setting(self) -> str | None:
        return self.meta.get("setting")

    @property
    def scores(self) -> dict[Key, torch.Tensor]:
        """S per (block, kind) under ``config.score`` and ``config.lam`` (computed once, cached)."""
        if self._scores is None:
            self._scores = {
                k: combine_terms(self.norm_term[k], self.align_term[k], self.config.score, self.config.lam)
                for k in self.norm_term
            }
        return self._scores

    @property
    def head_scores(self) -> dict[int, torch.Tensor]:
        if self._head_scores is None:
            self._head_scores = {
                b: combine_terms(self.head_norm[b], self.head_align[b], self.config.score, self.config.lam)
                for b in self.head_norm
            }
        return self._head_scores

    def select(
        self,
        rho: float | None = None,
        scope: str | None = None,
        heads: int | None = None,
        score: str | None = None,
        lam: float | None = None,
    ) -> Signature:
        """A NEW signature with ``selected`` / ``selected_heads`` set (arguments left None keep ``config``'s).

        Recomputes S from the cached terms when ``score`` or ``lam`` change; no
        training, milliseconds (slider-friendly). ρ = None in the config means
        the paper default for the setting (0.35 LoRA / 0.03 full).
        """
        changes = {
            k: v
            for k, v in {"rho": rho, "scope": scope, "heads": heads, "score": score, "lam": lam}.items()
            if v is not None
        }
        cfg = self.config.replace(**changes) if changes else self.config
        _check_selection(cfg.rho, cfg.scope, cfg.heads, cfg.score, cfg.lam)
        new = Signature(
            self.norm_term,
            self.align_term,
            cfg,
            self.layout,
            self.head_norm,
            self.head_align,
            self.variants,
            self.meta,
        )
        if cfg.score == self.config.score and cfg.lam == self.config.lam:
            new._scores, new._head_scores = self._scores, self._head_scores
        r = cfg.resolved_rho(self.setting)
        new.selected = select_channels(new.scores, r, cfg.scope)
        new.selected_heads = _select_heads(new.head_scores, int(cfg.heads))
        new.selection = {
            "rho": r,
            "scope": cfg.scope,
            "heads": int(cfg.heads),
            "score": cfg.score,
            "lam": float(cfg.lam),
        }
        return new

    def to_selection(self) -> Selection:
        if self.selected is None:
            raise ValueError("this signature has no selection yet; call .select()")
        return Selection(
            self.selected, self.selected_heads or {}, {"kind": "signature", **(self.selection or {})}
        )

    def random_control(self, seed: int = 0) -> Selection:
        """Random channels/heads with exactly this selection's per-module and per-block counts."""
        return random_selection(self.layout, seed=seed, like=self)

    @property
    def n_selected(self) -> int:
        return sum(int(v.numel()) for v in (self.selected or {}).values())

    # ------------------------------------------------------------------ views
    def frame(self) -> pd.DataFrame:
        """Tidy: one row per MLP channel — block, kind, channel, score, norm, align, selected."""
        parts = []
        for b, k in sorted(self.norm_term, key=lambda x: (x[0], MLP_KINDS.index(x[1]))):
            n = self.norm_term[(b, k)].numel()
            sel = np.zeros(n, dtype=bool)
            if self.selected is not None and (b, k) in self.selected:
                sel[self.selected[(b, k)].numpy()] = True
            parts.append(
                pd.DataFrame(
                    {
                        "block": np.full(n, b, dtype=np.int64),
                        "kind": k,
                        "channel": np.arange(n, dtype=np.int64),
                        "score": self.scores[(b, k)].double().numpy(),
                        "norm": self.norm_term[(b, k)].double().numpy(),
                        "align": self.align_term[(b, k)].double().numpy(),
                        "selected": sel,
                    }
                )
            )
        cols = ["block", "kind", "channel", "score", "norm", "align", "selected"]
        return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)

    def head_frame(self) -> pd.DataFrame:
        """One row per query head — block, head, kv_head, score, norm, align, selected."""
        cols = ["block", "head", "kv_head", "score", "norm", "align", "selected"]
        rows = []
        nh, nkv = self.layout["n_heads"], self.layout["n_kv_heads"]
        for b in sorted(self.head_norm):
            chosen = (
                set(self.selected_heads[b].tolist())
                if self.selected_heads and b in self.selected_heads
                else set()
            )
            for h in range(nh):
                rows.append(
                    {
                        "block": b,
                        "head": h,
                        "kv_head": h // max(1, nh // nkv),
                        "score": float(self.head_scores[b][h]),
                        "norm": float(self.head_norm[b][h]),
                        "align": float(self.head_align[b][h]),
                        "selected": h in chosen,
                    }
                )
        return pd.DataFrame(rows, columns=cols)

    def layer_summary(self) -> pd.DataFrame:
        """Per block × kind: n_channels, n_selected, frac_selected, score_sum, selected_mass (Σ S over the
        selected channels), mass_share (its share of all selected mass), mean norm and align."""
        df = self.frame()
        cols = [
            "block",
            "kind",
            "n_channels",
            "n_selected",
            "frac_selected",
            "score_sum",
            "selected_mass",
            "mass_share",
            "norm_mean",
            "align_mean",
        ]
        if df.empty:
            return pd.DataFrame(columns=cols)
        df = df.assign(sel_score=df["score"].where(df["selected"], 0.0))
        out = df.groupby(["block", "kind"], sort=False, as_index=False).agg(
            n_channels=("channel", "size"),
            n_selected=("selected", "sum"),
            score_sum=("score", "sum"),
            selected_mass=("sel_score", "sum"),
            norm_mean=("norm", "mean"),
            align_mean=("align", "mean"),
        )
        out["frac_selected"] = out["n_selected"] / out["n_channels"]
        total = out["selected_mass"].sum()
        out["mass_share"] = out["selected_mass"] / total if total else 0.0
        out["kind"] = pd.Categorical(out["kind"], categories=list(MLP_KINDS), ordered=True)
        return out.sort_values(["block", "kind"]).reset_index(drop=True)[cols]

    def __repr__(self) -> str:
        if self.selected is not None:
            n_heads = sum(int(v.numel()) for v in self.selected_heads.values())
            sel = f"selected={self.n_selected} channels, {n_heads} heads ({self.selection})"
        else:
            sel = "not selected"
        return (
            f"Signature(N={len(self.variants)}, setting={self.setting!r}, family={self.config.family!r}, "
            f"modules={len(self.norm_term)}, head_blocks={len(self.head_norm)}, {sel})"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write ``path/signature.safetensors`` + ``path/signature.json`` atomically.

        An existing non-empty ``path`` is replaced only when it holds a signature, and only with ``overwrite``
        (the library's default; the CLI asks for ``--overwrite``); any other directory is refused.
        """
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for (b, k), t in self.norm_term.items():
            tensors[f"norm.{b}.{k}"] = t
            tensors[f"align.{b}.{k}"] = self.align_term[(b, k)]
        for b, t in self.head_norm.items():
            tensors[f"head_norm.{b}"] = t
            tensors[f"head_align.{b}"] = self.head_align[b]
        for (b, k), t in (self.selected or {}).items():
            tensors[f"selected.{b}.{k}"] = t
        for b, t in (self.selected_heads or {}).items():
            tensors[f"selected_heads.{b}"] = t
        manifest = {
            "format": SIGNATURE_FORMAT,
            "version": SIGNATURE_VERSION,
            "config": self.config.to_dict(),
            "layout": self.layout,
            "variants": self.variants,
            "meta": self.meta,
            "selection": self.selection,
            "has_selection": self.selected is not None,
            "tensors": sorted(tensors),
        }
        with atomic_dir(path, kind=SIGNATURE_FORMAT, overwrite=overwrite) as tmp:
            save_tensors(
                tmp / SIGNATURE_TENSORS,
                tensors,
                metadata={"format": SIGNATURE_FORMAT, "version": str(SIGNATURE_VERSION)},
            )
            write_json(tmp / SIGNATURE_JSON, manifest)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Signature:
        """Read a directory written by :meth:`save`.

        :class:`SignatureFormatError` names the path on bad input.
        """
        from ..core.artifacts import load_tensors

        path = Path(path)
        if not path.is_dir():
            raise SignatureFormatError(f"{path}: not a saved signature directory (no such directory)")
        for fname in (SIGNATURE_JSON, SIGNATURE_TENSORS):
            if not (path / fname).is_file():
                raise SignatureFormatError(f"{path / fname}: missing (not a complete signature directory)")
        try:
            manifest = read_json(path / SIGNATURE_JSON)
        except ValueError as exc:
            raise SignatureFormatError(str(exc)) from None
        if not isinstance(manifest, dict) or manifest.get("format") != SIGNATURE_FORMAT:
            raise SignatureFormatError(f"{path / SIGNATURE_JSON}: not a {SIGNATURE_FORMAT} manifest")
        if manifest.get("version") != SIGNATURE_VERSION:
            raise SignatureFormatError(
                f"{path / SIGNATURE_JSON}: unsupported version {manifest.get('version')!r}"
            )
        try:
            raw = load_tensors(path / SIGNATURE_TENSORS)
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise SignatureFormatError(
                f"{path / SIGNATURE_TENSORS}: unreadable safetensors ({exc})"
            ) from None
        try:
            config = SignatureConfig.from_dict(manifest["config"])
            norm, align, hn, ha, sel, hsel = {}, {}, {}, {}, {}, {}
            for name, t in raw.items():
                parts = name.split(".")
                if parts[0] in ("norm", "align", "selected") and len(parts) == 3 and parts[2] in MLP_KINDS:
                    {"norm": norm, "align": align, "selected": sel}[parts[0]][(int(parts[1]), parts[2])] = t
                elif parts[0] in ("head_norm", "head_align", "selected_heads") and len(parts) == 2:
                    {"head_norm": hn, "head_align": ha, "selected_heads": hsel}[parts[0]][int(parts[1])] = t
                else:
                    raise ValueError(f"unexpected tensor {name!r}")
            if set(norm) != set(align) or set(hn) != set(ha):
                raise ValueError("norm/align tensors do not pair up")
            d_ff, nh = manifest["layout"]["d_ff"], manifest["layout"]["n_heads"]
            bad = [k for k, t in norm.items() if t.numel() != d_ff] + [
                b for b, t in hn.items() if t.numel() != nh
            ]
            if bad:
                raise ValueError(f"score tensors with the wrong size for the layout: {bad[:3]}")
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureFormatError(f"{path}: inconsistent signature ({exc})") from None
        key = lambda kv: (kv[0][0], MLP_KINDS.index(kv[0][1]))
        sig = cls(
            dict(sorted(norm.items(), key=key)),
            dict(sorted(align.items(), key=key)),
            config,
            manifest["layout"],
            dict(sorted(hn.items())),
            dict(sorted(ha.items())),
            manifest.get("variants") or [],
            manifest.get("meta") or {},
        )
        if manifest.get("has_selection"):
            sig.selected = {k: sel.get(k, torch.zeros(0, dtype=torch.long)) for k in sig.norm_term}
            sig.selected_heads = {b: hsel.get(b, torch.zeros(0, dtype=torch.long)) for b in sig.head_norm}
            sig.selection = manifest.get("selection")
        return sig


def compute_signature(
    sources: Sequence[WeightDelta | FactoredDelta | str | Path],
    config: SignatureConfig | None = None,
    *,
    meta: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    select: bool = True,
) -> Signature:
    """Score N differential deltas (cached twin dirs, WeightDeltas, FactoredDeltas); select with ``config``.

    One module at a time (:func:`~bdvax_lab.bdvax.scores.compute_terms`): factored twin deltas (the
    adapter setting) are scored from their factors, dense ones (the full setting, N = 6 × 425 MB fp32
    files for SmolLM2) streamed in chunks of at most one module of one variant; scoring takes seconds and
    re-selecting (new ρ / λ / scope / heads) a fraction of a second. The work is memory-bound, so on a
    CPU shared with other jobs fewer torch threads can be faster. Each run's time is in
    ``meta["seconds"]["scoring"]``.
    """
    config = config or SignatureConfig()
    t0 = time.time()
    terms = compute_terms(sources, head_kinds=config.head_kinds, device=device, progress=progress)
    seconds = time.time() - t0
    metas = terms["metas"]
    variants = [m["variant"] for m in metas if isinstance(m, dict) and "variant" in m]
    settings = {m.get("setting") for m in metas if isinstance(m, dict) and m.get("setting")}
    info = {
        "setting": settings.pop() if len(settings) == 1 else None,
        "n_variants": len(metas),
        "sources": terms["names"],
    }
    info.update(meta or {})
    info["seconds"] = {**info.get("seconds", {}), "scoring": round(seconds, 3)}
    sig = Signature(
        terms["norm"],
        terms["align"],
        config,
        terms["layout"],
        terms["head_norm"],
        terms["head_align"],
        variants,
        info,
    )
    # rho="auto": the calibration (bdvax_lab.bdvax.calibration) selects once it has chosen ρ
    return sig.select() if select and config.rho != AUTO_RHO else sig


def extract_signature(
    suspicious: Any,
    config: SignatureConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    *,
    pool: Sequence[Example] | None = None,
    executor: Any = None,
    source: Any = None,
) -> Signature:
    """train_twins (all variants; cached ones are skipped) + scores + select, in one call.

    ``config.family`` is the behaviour family the user fears; the suspicious
    model's manifest is never read. ``executor`` / ``source``: where the twins train
    (:func:`~bdvax_lab.bdvax.twins.train_twins`; the signature does not depend on it).
    """
    config = config or SignatureConfig()
    sm = as_suspicious(suspicious)
    model, tok = sm.model, sm.tokenizer
    if source is None and executor is not None and getattr(sm, "path", None) is not None:
        from ..threat.source import ModelSource

        source = ModelSource.of(sm)
    t0 = time.time()
    jobs = train_twins(
        (model, tok), config, cache_dir, (0, 1), progress, pool=pool, executor=executor, source=source
    )
    twins_s = time.time() - t0
    missing = [j.index for j in jobs if not j.done]
    if missing:
        raise RuntimeError(f"twin deltas missing for variants {missing} after training")
    meta = {
        "setting": setting_of(model),
        "fingerprint": jobs[0].path.parent.name if jobs else None,
        "twins": jobs_frame(jobs).drop(columns=["path"]).to_dict("records"),
        "cache": [str(j.path) for j in jobs],
        "seconds": {"twins": round(twins_s, 2)},
    }
    return compute_signature([j.path for j in jobs], config, meta=meta, progress=progress)
