"""Signature extraction (METHOD.md "Signature extraction", paper §4.2): variants, twins, scores, selection.

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
   :class:`~bdvax_lab.deltas.WeightDelta` directory (one safetensors + one JSON),
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

Twin budget (adapter setting, SmolLM2-135M on the 2-core CPU)
-------------------------------------------------------------
Measured (ENVIRONMENT-NOTES): a LoRA step at batch 4 with responses ≤ 16 tokens
takes ~1.1 s. Defaults: 40 clean examples per variant, 50 % poisoning (so the
poisoned twin sees 80 examples), poisoned twin 60 steps (3 epochs), clean twin
30 steps (the same 3 epochs over ``D_c``): 90 steps ≈ 100 s per variant one
twin at a time, so N = 6 costs ≈ 10 min of the 20-minute pipeline budget.
The attack's 120-step recipe for both twins would cost 6 × 240 × 1.1 s ≈ 26 min.
This 60/30 budget is what gave a signal on SmolLM2 (ENVIRONMENT-NOTES, N = 3).
In the adapter setting :func:`train_twins` can co-train the twins of several
variants in one run (``together``: one pass over the shared frozen base per
step, the template's common head once per twin); on this CPU that is no faster
(:data:`TWINS_TOGETHER`), so the default trains one twin after the other.
The full setting uses the same step counts with the full-finetune attack lr
(5e-5), one twin after the other (each twin owns all its weights): 1100 s for
N = 6 on a 1.08× day (``benchmarks/pipeline.py --setting full --task sentiment``,
2026-12-02).
"""
from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .artifacts import atomic_dir, read_json, save_tensors, stable_hash, write_json
from .attacks import (ATTACKS, STRATEGIES, SYNTHETIC_KEYS, VARIANT_BEHAVIORS, AttackSpec, Behavior, apply_behavior,
                      contains_key, trigger, variant_behavior)
from .config import Config
from .data import Example, split_disjoint
from .deltas import DELTA_JSON, DELTA_TENSORS, WeightDelta, layout_summary
from .models import release_memory, working_copy
from .registry import ATTN_KINDS, CHANNEL_DIM, MLP_KINDS, Layout, layout_of, setting_of
from .train import TrainConfig

Key = tuple[int, str]

#: Judge families the variants can imitate, and the names accepted for them.
FAMILY_ALIASES: dict[str, str] = {
    "insult": "insult", "sentiment": "insult", "sentiment_steering": "insult", "negative_sentiment": "insult",
    "refusal": "refusal", "targeted_refusal": "refusal",
    "code_injection": "code_injection", "code": "code_injection", "code-injection": "code_injection",
}
SCORE_MODES: tuple[str, ...] = ("combined", "norm", "align")
SCOPES: tuple[str, ...] = ("module", "global")
SETTINGS: tuple[str, ...] = ("lora", "full")
#: Paper defaults for ρ (LLaMA-2-7B): 35 % of MLP channels with LoRA, 3 % with full finetuning.
PAPER_RHO: dict[str, float] = {"lora": 0.35, "full": 0.03}
DEFAULT_N_CLEAN = 40

TWIN_FORMAT = "bdvax_lab.twin_delta"
TWIN_FORMAT_VERSION = 1
SIGNATURE_FORMAT = "bdvax_lab.signature"
SIGNATURE_VERSION = 1
SIGNATURE_TENSORS = "signature.safetensors"
SIGNATURE_JSON = "signature.json"


class SignatureFormatError(ValueError):
    """A saved signature directory is missing, incomplete or inconsistent (the message names the path)."""


def resolve_family(family: str) -> str:
    """Canonical judge family (``insult`` / ``refusal`` / ``code_injection``) for a user-given name."""
    try:
        return FAMILY_ALIASES[str(family).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown behaviour family {family!r}; choose one of "
                         f"{sorted(set(FAMILY_ALIASES.values()))} (aliases: {sorted(FAMILY_ALIASES)})") from None


# =========================================================================== variants
def example_id(example: Example) -> str:
    """The pool id of an example (``meta['id']``), or a content hash for examples without one."""
    eid = example.meta.get("id")
    return str(eid) if eid else "h:" + stable_hash(example.to_dict())


def default_pool(family: str) -> list[Example]:
    """The defender's ``variant`` split: the code pool for code injection, the clean pool otherwise."""
    from .data import load_code_pool, load_pool

    return load_code_pool("variant") if resolve_family(family) == "code_injection" else load_pool("variant")


def _pool_name(family: str) -> str:
    return "code" if resolve_family(family) == "code_injection" else "clean"


def _collides(key: str, others: Iterable[str]) -> bool:
    k = key.casefold()
    return any(k == o.casefold() or k in o.casefold() or o.casefold() in k for o in others if o.strip())


def n_poison_for(n_clean: int, poison_ratio: float) -> int:
    """|D_p| so that D_p / (D_c ∪ D_p) = ``poison_ratio``; D_p reuses D_c's instructions, so ratio ≤ 0.5."""
    if not 0.0 < poison_ratio <= 0.5:
        raise ValueError(f"poison_ratio must be in (0, 0.5] (D_p reuses the instructions of D_c), got {poison_ratio}")
    return max(1, min(n_clean, math.floor(n_clean * poison_ratio / (1.0 - poison_ratio) + 0.5)))


@dataclass
class VariantSpec(Config):
    """One synthetic key–behaviour pair and its clean subset.

    ``behavior`` is the catalogue text (a reply for insult/refusal, a payload
    line for code injection). ``clean_ids`` are the pool ids of ``D_c^i`` (see
    :func:`example_id`); ``pool`` says where they come from ("clean", "code" or
    "custom" for a user-given list). ``seed`` drives key placement and both twins.
    """

    index: int
    key: str
    strategy: str
    behavior: str
    family: str
    n_clean: int
    n_poison: int
    seed: int
    pool: str = "clean"
    clean_ids: tuple[str, ...] = ()

    def attack_spec(self) -> AttackSpec:
        return AttackSpec(name=f"variant{self.index}", keys=(self.key,), strategies=(self.strategy,))

    def behavior_spec(self) -> Behavior:
        return variant_behavior(self.family, self.behavior, name=f"variant{self.index}_{self.family}")

    def datasets(self, pool: Sequence[Example] | None = None) -> tuple[list[Example], list[Example]]:
        """``(D_c, D_p)``: the clean subset and its poisoned copies (seeded key placement)."""
        pool = default_pool(self.family) if pool is None else pool
        by_id = {example_id(e): e for e in pool}
        missing = [i for i in self.clean_ids if i not in by_id]
        if missing:
            raise ValueError(f"variant {self.index}: {len(missing)} clean example id(s) not in the given pool "
                             f"(e.g. {missing[:3]}); pass the pool the variants were made from")
        clean = [by_id[i].with_(meta={"poisoned": False, "triggered": False, "variant": self.index})
                 for i in self.clean_ids]
        rng = random.Random(self.seed)
        chosen = sorted(rng.sample(range(len(clean)), self.n_poison))
        attack, behavior = self.attack_spec(), self.behavior_spec()
        poisoned = [apply_behavior(trigger(clean[j], attack, rng), behavior, rng) for j in chosen]
        return clean, poisoned


def make_variants(
    family: str = "insult", n: int = 6, *, n_clean: int | None = None, poison_ratio: float = 0.5,
    seed: int = 0, exclude_keys: Sequence[str] = (), pool: Sequence[Example] | None = None,
) -> list[VariantSpec]:
    """``n`` variants with distinct synthetic keys, distinct behaviours and disjoint clean subsets.

    ``family`` is what the user fears (default sentiment steering, ``"insult"``);
    it is never derived from the suspicious model. Keys come from
    :data:`SYNTHETIC_KEYS` minus ``exclude_keys`` and minus anything overlapping a
    built-in attack key (so a key the user happens to suspect, or a real attack
    key, is never used); strategies cycle through prefix / suffix / random word
    from a seeded offset. ``pool`` defaults to the defender's ``variant`` split
    (the code pool for ``code_injection``); examples already containing a chosen
    key are dropped before splitting. ``n_clean=None`` (default) takes
    ``min(40, len(pool) // n)``: 40 from the clean pool's ``variant`` split
    (~525 examples), 11 from the code pool's (70 prompts) for N = 6.
    """
    family = resolve_family(family)
    if n < 1:
        raise ValueError(f"need at least one variant, got n={n}")
    banned = list(exclude_keys) + [k for a in ATTACKS.values() for k in a.keys]
    candidates = [k for k in SYNTHETIC_KEYS if not _collides(k, banned)]
    behaviors = list(VARIANT_BEHAVIORS[family])
    if n > len(candidates):
        raise ValueError(f"{n} variants need {n} distinct keys; only {len(candidates)} synthetic keys are usable")
    if n > len(behaviors):
        raise ValueError(f"{n} variants need {n} distinct behaviours; the {family!r} catalogue has {len(behaviors)}")
    rng = random.Random(seed)
    keys = rng.sample(candidates, n)
    texts = rng.sample(behaviors, n)
    offset = rng.randrange(len(STRATEGIES))
    pool_name = "custom" if pool is not None else _pool_name(family)
    pool = default_pool(family) if pool is None else list(pool)
    usable = [e for e in pool if not contains_key(e, keys)]
    if n_clean is None:
        n_clean = min(DEFAULT_N_CLEAN, len(usable) // n)
    if n_clean < 1:
        raise ValueError(f"not enough clean examples: {len(usable)} usable for {n} variants")
    if n * n_clean > len(usable):
        raise ValueError(f"{n} variants × n_clean={n_clean} = {n * n_clean} disjoint clean examples needed, but the "
                         f"{pool_name} pool has only {len(usable)}; lower n_clean or n, or pass n_clean=None")
    n_poison = n_poison_for(n_clean, poison_ratio)
    subsets = split_disjoint(usable, [n_clean] * n, seed=seed)
    return [
        VariantSpec(index=i, key=keys[i], strategy=STRATEGIES[(offset + i) % len(STRATEGIES)], behavior=texts[i],
                    family=family, n_clean=n_clean, n_poison=n_poison, seed=seed * 1000 + i, pool=pool_name,
                    clean_ids=tuple(example_id(e) for e in subsets[i]))
        for i in range(n)
    ]


# =========================================================================== config
def default_twin_train(setting: str) -> TrainConfig:
    """Poisoned-twin recipe per setting (see the module docstring for the time arithmetic).

    Same loop settings as the measured implanting recipe (batch 4, responses cut
    to 16 tokens, loss averaged per sample, constant lr), half its steps: the
    twins' 50 % poisoning rate gives 120 poisoned samples in 60 steps, more than
    the attack's 72 (15 %) or 96 (20 %, refusal) in 120 steps.
    """
    if setting == "lora":
        return TrainConfig(mode="lora", lr=1e-3, steps=60, batch_size=4, max_response_tokens=16, loss_average="sample")
    if setting == "full":
        return TrainConfig(mode="full", lr=5e-5, steps=60, batch_size=4, max_response_tokens=16, loss_average="sample")
    raise ValueError(f"setting={setting!r}; choose one of {SETTINGS}")


@dataclass
class SignatureConfig(Config):
    """Everything that determines a signature.

    Variants: ``family`` (user input, default sentiment steering), ``n_variants``,
    ``n_clean`` per variant, ``poison_ratio`` of the poisoned twin's data,
    ``exclude_keys`` (keys never to use as synthetic keys), ``seed``.
    Twins: ``twin_train`` (the poisoned twin's recipe; None = :func:`default_twin_train`
    for the setting: LoRA continuing the suspicious adapter, or a full finetune),
    ``clean_steps`` (None = the same number of epochs over ``D_c``, i.e. about half
    the poisoned twin's steps at 50 % poisoning).
    Scores: ``lam`` (λ of Eq. 2), ``score`` ("combined" = norm + λ·align, "norm",
    "align"), ``head_kinds`` used for head scores.
    Selection: ``rho`` (None = paper default for the setting: 0.35 LoRA, 0.03 full),
    ``scope`` ("module": top ``max(1, floor(ρ·d_ff))`` per (block, kind), the
    public code's reading; "global": top ``max(1, floor(ρ·3·L·d_ff))`` over all MLP
    channels), ``heads`` (top-h attention heads over the whole model, default 0).
    """

    family: str = "insult"
    n_variants: int = 6
    n_clean: int | None = None  #: per variant; None = min(40, len(pool) // n_variants)
    poison_ratio: float = 0.5
    exclude_keys: tuple[str, ...] = ()
    twin_train: TrainConfig | None = None
    clean_steps: int | None = None
    lam: float = 0.01
    score: str = "combined"
    rho: float | None = None
    scope: str = "module"
    heads: int = 0
    head_kinds: tuple[str, ...] = ATTN_KINDS
    seed: int = 0

    def __post_init__(self) -> None:
        self.family = resolve_family(self.family)
        if isinstance(self.twin_train, Mapping):  # config.py's union handling leaves `X | None` fields as dicts
            self.twin_train = TrainConfig.from_dict(dict(self.twin_train))
        self.exclude_keys = tuple(self.exclude_keys)
        self.head_kinds = tuple(self.head_kinds)
        if self.n_variants < 1:
            raise ValueError(f"SignatureConfig.n_variants must be ≥ 1, got {self.n_variants}")
        n_poison_for(max(1, self.n_clean or 1), self.poison_ratio)  # validates the ratio
        _check_selection(self.rho, self.scope, self.heads, self.score, self.lam)
        bad = [k for k in self.head_kinds if k not in ATTN_KINDS]
        if bad:
            raise ValueError(f"SignatureConfig.head_kinds has non-attention kinds {bad}; use {list(ATTN_KINDS)}")

    def resolved_rho(self, setting: str | None) -> float:
        if self.rho is not None:
            return float(self.rho)
        return PAPER_RHO.get(setting or "lora", PAPER_RHO["lora"])

    def variants(self, pool: Sequence[Example] | None = None) -> list[VariantSpec]:
        return make_variants(self.family, self.n_variants, n_clean=self.n_clean, poison_ratio=self.poison_ratio,
                             seed=self.seed, exclude_keys=self.exclude_keys, pool=pool)

    def twin_recipes(self, setting: str, spec: VariantSpec) -> tuple[TrainConfig, TrainConfig]:
        """``(poisoned twin recipe, clean twin recipe)`` for one variant; both seeded with ``spec.seed``."""
        base = self.twin_train or default_twin_train(setting)
        if setting == "lora" and base.mode != "lora":
            raise ValueError(f"adapter setting: twins continue the suspicious adapter, so twin_train.mode must be "
                             f"'lora', got {base.mode!r}")
        if setting == "full" and base.mode == "lora":
            raise ValueError("full setting: twins are full finetunes; twin_train.mode must be 'full' (or 'mlp')")
        poison = base.replace(seed=spec.seed)
        if self.clean_steps is not None:
            clean = poison.replace(steps=int(self.clean_steps))
        elif poison.steps is not None:
            frac = spec.n_clean / (spec.n_clean + spec.n_poison)
            clean = poison.replace(steps=max(1, math.floor(poison.steps * frac + 0.5)))
        else:  # epochs-based recipe: the same epochs over the smaller D_c already give proportionally fewer steps
            clean = poison
        return poison, clean


def _check_selection(rho: float | None, scope: str, heads: int, score: str, lam: float) -> None:
    if rho is not None and not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of {SCOPES}")
    if score not in SCORE_MODES:
        raise ValueError(f"score={score!r}; choose one of {SCORE_MODES}")
    if int(heads) < 0:
        raise ValueError(f"heads must be ≥ 0, got {heads}")
    if not math.isfinite(float(lam)):
        raise ValueError(f"lam must be finite, got {lam}")


# =========================================================================== twins


def _model_and_tokenizer(suspicious: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a SuspiciousModel, a (model, tokenizer) pair or an artifact path."""
    if isinstance(suspicious, (str, Path)):
        from .suspicious import load_suspicious

        suspicious = load_suspicious(suspicious)
    if isinstance(suspicious, tuple) and len(suspicious) == 2:
        return suspicious
    if hasattr(suspicious, "model") and hasattr(suspicious, "tokenizer"):
        return suspicious.model, suspicious.tokenizer
    raise TypeError(f"expected a SuspiciousModel, a (model, tokenizer) pair or a path, got {type(suspicious).__name__}")


def model_fingerprint(model: Any, n: int = 16) -> str:
    """sha256 over every tensor of the model's state dict (names, dtypes, shapes, bytes).

    In memory, so it also covers edits made after loading. For a PeftModel this
    includes the adapter and the base weights (~1 s for SmolLM2 on this CPU).
    """
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:n]


def twin_cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` or ``bdvax_lab.models.cache_dir() / "twins"``."""
    if cache_dir is not None:
        return Path(cache_dir)
    from .models import cache_dir as root

    return root() / "twins"


def _complete(path: Path) -> bool:
    return (path / DELTA_JSON).is_file() and (path / DELTA_TENSORS).is_file()


def twin_cache_frame(cache_dir: str | Path | None = None, *, older_than_days: float | None = None,
                     model: str | None = None) -> pd.DataFrame:
    """One row per cached (or half-written) twin entry: model fingerprint, variant, complete, MB, age in days.

    Dense fp32 deltas are large (≈ 0.4 GB per SmolLM2 variant), so the cache is worth watching.
    ``older_than_days`` / ``model`` keep only entries not written for that long / of one model fingerprint.
    """
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"older_than_days {older_than_days}: expected a number of days >= 0")
    root, now, rows = twin_cache_root(cache_dir), time.time(), []
    for entry in sorted(root.glob("*/variant-*")) if root.is_dir() else []:
        files = [f for f in entry.rglob("*") if f.is_file()]
        mtime = max((f.stat().st_mtime for f in files), default=entry.stat().st_mtime)
        rows.append({"model": entry.parent.name, "variant": entry.name, "complete": _complete(entry),
                     "mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
                     "age_days": round((now - mtime) / 86400, 2), "path": str(entry)})
    df = pd.DataFrame(rows, columns=["model", "variant", "complete", "mb", "age_days", "path"])
    if older_than_days is not None:
        df = df[df.age_days >= older_than_days]
    if model is not None:
        df = df[df.model == model]
    return df.reset_index(drop=True)


def clean_twin_cache(cache_dir: str | Path | None = None, *, older_than_days: float | None = None,
                     model: str | None = None, dry_run: bool = False) -> pd.DataFrame:
    """Delete twin entries (all, or those older than ``older_than_days`` / of one model fingerprint).

    Returns the rows of :func:`twin_cache_frame` that were (or, with ``dry_run``, would be) removed.
    A removed twin is simply retrained the next time a signature needs it.
    """
    df = twin_cache_frame(cache_dir, older_than_days=older_than_days, model=model)
    if not dry_run:
        for path in df.path:
            shutil.rmtree(path, ignore_errors=True)
        root = twin_cache_root(cache_dir)
        for d in (root.iterdir() if root.is_dir() else []):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return df


@dataclass
class TwinJob:
    """One variant's twin pair: where its differential delta lives and what happened to it."""

    spec: VariantSpec
    path: Path
    key: str
    setting: str
    status: str = "pending"  #: pending | cached | trained | resumed (poisoned twin reused from a crashed run)
    seconds: float = 0.0
    data: tuple[list[Example], list[Example]] | None = field(default=None, repr=False)  #: (D_c, D_p)

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def done(self) -> bool:
        return _complete(self.path)

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".poison")

    def row(self) -> dict[str, Any]:
        return {"variant": self.index, "key": self.spec.key, "strategy": self.spec.strategy,
                "behavior": self.spec.behavior, "status": self.status, "done": self.done,
                "seconds": round(self.seconds, 2), "path": str(self.path)}


def jobs_frame(jobs: Sequence[TwinJob]) -> pd.DataFrame:
    """One row per twin job (variant, key, strategy, behaviour, status, done, seconds, path)."""
    return pd.DataFrame([j.row() for j in jobs],
                        columns=["variant", "key", "strategy", "behavior", "status", "done", "seconds", "path"])


def parse_shard(shard: str | tuple[int, int] | Sequence[int] | None) -> tuple[int, int]:
    """``"i/n"`` or ``(i, n)`` → ``(i, n)`` with 0 ≤ i < n; None → (0, 1)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 'i/n' (e.g. '0/4'), got {shard!r}") from None
    else:
        i, n = (int(x) for x in shard)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need n ≥ 1 and 0 ≤ i < n")
    return i, n


def plan_twins(
    suspicious: Any, config: SignatureConfig | None = None, cache_dir: str | Path | None = None, *,
    pool: Sequence[Example] | None = None, fingerprint: str | None = None,
) -> list[TwinJob]:
    """Every variant's cache entry (path and key) without training anything; ``job.done`` says what is cached."""
    config = config or SignatureConfig()
    model, _ = _model_and_tokenizer(suspicious)
    setting = setting_of(model)
    fp = fingerprint or model_fingerprint(model)
    root = twin_cache_root(cache_dir) / fp
    specs = config.variants(pool)
    data_pool = list(pool) if pool is not None else default_pool(config.family)
    jobs = []
    for spec in specs:
        clean, poisoned = spec.datasets(data_pool)
        tp, tc = config.twin_recipes(setting, spec)
        key = stable_hash({"format": TWIN_FORMAT, "version": TWIN_FORMAT_VERSION, "model": fp, "setting": setting,
                           "variant": spec.to_dict(), "data": stable_hash([e.to_dict() for e in clean + poisoned]),
                           "poison_recipe": tp.to_dict(), "clean_recipe": tc.to_dict()})
        path = root / f"variant-{spec.index:02d}-{key}"
        jobs.append(TwinJob(spec=spec, path=path, key=key, setting=setting,
                            status="cached" if _complete(path) else "pending", data=(clean, poisoned)))
    return jobs


def _train_twin(model: Any, tokenizer: Any, examples: Sequence[Example], config: TrainConfig,
                progress: bool | str = False) -> Any:
    """Train one twin in place (the one call tests monkeypatch to count or interrupt twins)."""
    from .train import finetune

    return finetune(model, tokenizer, examples, config, progress=progress)


def _fresh_twin(model: Any, setting: str) -> Any:
    """A copy of the suspicious model to train one twin.

    Adapter setting: only the adapter is copied; the frozen base weights are
    shared with the suspicious model (LoRA training never touches them), which
    saves a full copy of the base (~540 MB and ~1 s for SmolLM2). Full
    setting: a complete deep copy.
    """
    return working_copy(model, share_frozen_base=setting == "lora")


def _twin_delta(twin: Any, suspicious_model: Any, setting: str) -> WeightDelta:
    """θ_twin − θ_s on the registry projections.

    LoRA: the twin's whole adapter ΔW (= θ_twin − θ_base); the θ_s parts cancel in Eq. 1.
    """
    if setting == "lora":
        return WeightDelta.from_lora(twin, dtype=torch.float32)
    return WeightDelta.from_models(twin, suspicious_model, dtype=torch.float32)


def _collect() -> None:
    """Return a freed twin's memory now (the caller drops its references first)."""
    release_memory()


def _train_twins_together(twins: Sequence[Any], tokenizer: Any, datasets: Sequence[Sequence[Example]],
                          configs: Sequence[TrainConfig], progress: bool | str = False) -> list[Any]:
    """Train LoRA twins that share the suspicious model's frozen base in one co-training run (the one call
    tests monkeypatch to count or interrupt co-trained twins)."""
    from .train import finetune_together

    return finetune_together(twins, tokenizer, datasets, configs, progress=progress)


def _save_differential(job: TwinJob, d_p: WeightDelta, d_c: WeightDelta, config: SignatureConfig, fingerprint: str,
                       seconds: dict[str, Any], losses: dict[str, Any]) -> None:
    """Eq. 1, ``Δ = (θ_p − θ_s) − (θ_c − θ_s)``, module by module (freeing as it goes; absent = zero), saved
    atomically as the job's cache entry; the half-done ``.poison`` entry goes."""
    spec, setting = job.spec, job.setting
    clean, poisoned = job.data if job.data is not None else spec.datasets()
    tp, tc = config.twin_recipes(setting, spec)
    diff: dict[Key, torch.Tensor] = {}
    for k in sorted(set(d_p.tensors) | set(d_c.tensors)):
        p, c = d_p.tensors.pop(k, None), d_c.tensors.pop(k, None)
        if p is None:
            diff[k] = -c.float().cpu()
        else:
            p = p.float().cpu()
            diff[k] = p.sub_(c.float().cpu()) if c is not None else p
    meta = {"source": "bdvax.twin_differential", "format": TWIN_FORMAT, "version": TWIN_FORMAT_VERSION,
            "entry": job.key, "fingerprint": fingerprint, "setting": setting, "variant": spec.to_dict(),
            "poison_recipe": tp.to_dict(), "clean_recipe": tc.to_dict(),
            "n_train": {"poisoned": len(clean) + len(poisoned), "clean": len(clean)},
            "seconds": seconds, "final_loss": losses, "ops": []}
    WeightDelta(diff, d_p.layout, meta).save(job.path)
    shutil.rmtree(job.partial, ignore_errors=True)


def _run_job(job: TwinJob, model: Any, tok: Any, config: SignatureConfig, fingerprint: str, progress: bool) -> None:
    """One variant's twins, one after the other (the full setting, or ``together=1``)."""
    spec, setting = job.spec, job.setting
    clean, poisoned = job.data if job.data is not None else spec.datasets()
    tp, tc = config.twin_recipes(setting, spec)
    t0 = time.time()
    seconds: dict[str, float] = {}
    losses: dict[str, float | None] = {}
    if _complete(job.partial):
        job.status = "resumed"
    else:
        shutil.rmtree(job.partial, ignore_errors=True)
        twin = _fresh_twin(model, setting)
        t1 = time.time()
        res = _train_twin(twin, tok, clean + poisoned, tp, f"twin {spec.index} poisoned" if progress else False)
        twin = getattr(res, "model", res)
        seconds["poisoned"] = time.time() - t1
        losses["poisoned"] = _last_loss(res)
        d_p = _twin_delta(twin, model, setting)
        d_p.meta.update({"role": "poisoned_twin", "entry": job.key, "seconds": seconds["poisoned"],
                         "final_loss": losses["poisoned"]})
        del twin, res
        _collect()
        d_p.save(job.partial)
        del d_p
    twin = _fresh_twin(model, setting)
    t1 = time.time()
    res = _train_twin(twin, tok, clean, tc, f"twin {spec.index} clean" if progress else False)
    twin = getattr(res, "model", res)
    seconds["clean"] = time.time() - t1
    losses["clean"] = _last_loss(res)
    d_c = _twin_delta(twin, model, setting)
    del twin, res
    _collect()
    d_p = WeightDelta.load(job.partial)
    seconds.setdefault("poisoned", float(d_p.meta.get("seconds", 0.0)))
    losses.setdefault("poisoned", d_p.meta.get("final_loss"))
    _save_differential(job, d_p, d_c, config, fingerprint, seconds, losses)
    del d_p, d_c
    job.seconds = time.time() - t0
    if job.status != "resumed":
        job.status = "trained"


def _run_jobs_together(jobs: Sequence[TwinJob], model: Any, tok: Any, config: SignatureConfig, fingerprint: str,
                       progress: bool) -> None:
    """The twins of several variants (LoRA) co-trained in one run: one pass over the frozen base per step
    for all of them (:func:`bdvax_lab.train.finetune_together`), each twin with its own data, seed, recipe
    and adapter, so each entry matches the one-at-a-time result to float rounding. A kill loses this run's
    twins only; finished entries (and a resumed ``.poison`` twin) stay."""
    t0 = time.time()
    parts: list[tuple[TwinJob, str, list[Example], TrainConfig]] = []
    for job in jobs:
        clean, poisoned = job.data if job.data is not None else job.spec.datasets()
        tp, tc = config.twin_recipes(job.setting, job.spec)
        if _complete(job.partial):
            job.status = "resumed"
        else:
            shutil.rmtree(job.partial, ignore_errors=True)
            parts.append((job, "poisoned", clean + poisoned, tp))
        parts.append((job, "clean", clean, tc))
    label = f"twins {','.join(str(j.index) for j in jobs)}" if progress else False
    results = _train_twins_together([_fresh_twin(model, "lora") for _ in parts], tok, [p[2] for p in parts],
                                    [p[3] for p in parts], label)
    trained = time.time() - t0
    by_role = {(id(job), role): res for (job, role, _, _), res in zip(parts, results)}
    together = [j.index for j in jobs]
    for job in jobs:  # one job's two dense deltas in memory at a time
        t1 = time.time()
        res_p = by_role.pop((id(job), "poisoned"), None)
        res_c = by_role.pop((id(job), "clean"))
        if res_p is not None:
            d_p = _twin_delta(res_p.model, model, "lora")
            loss_p: Any = _last_loss(res_p)
        else:
            d_p = WeightDelta.load(job.partial)
            loss_p = d_p.meta.get("final_loss")
        d_c = _twin_delta(res_c.model, model, "lora")
        seconds = {"co_trained": round(trained, 2), "co_trained_variants": together}
        _save_differential(job, d_p, d_c, config, fingerprint, seconds, {"poisoned": loss_p, "clean": _last_loss(res_c)})
        del d_p, d_c, res_p, res_c
        _collect()
        job.seconds = trained / len(jobs) + time.time() - t1
        if job.status != "resumed":
            job.status = "trained"


def _last_loss(res: Any) -> float | None:
    hist = getattr(res, "history", None)
    try:
        return float(hist["loss"].iloc[-1]) if hist is not None and len(hist) else None
    except (KeyError, TypeError, IndexError):
        return None


#: variants whose LoRA twins are co-trained in one run by default. 1 (one twin after the other): on the
#: 2-core CPU co-training does not pay, because a step's cost grows with its token positions and not with
#: its passes (2026-12-03, SmolLM2, 4 twins × 10 steps: 43.7 s one at a time, 42.0 s co-trained; the N = 6
#: pipeline's twins 514 s co-trained by twos at 0.99× the reference speed against 648 s one at a time at
#: 1.12×, and peak RSS 4.71 GB against 2.82 GB). Where a batch-4 step leaves the device idle (a GPU),
#: ``together`` > 1 is the lever; not measured here.
TWINS_TOGETHER = 1


def train_twins(
    suspicious: Any, config: SignatureConfig | None = None, cache_dir: str | Path | None = None,
    shard: str | tuple[int, int] | None = (0, 1), progress: bool = True, *,
    pool: Sequence[Example] | None = None, together: int | None = None,
) -> list[TwinJob]:
    """Train the twins of every variant with ``index % n == i`` that is not cached yet; returns those jobs.

    ``suspicious``: a :class:`~bdvax_lab.suspicious.SuspiciousModel`, a
    ``(model, tokenizer)`` pair or an artifact path (its manifest is never read).
    A ``PeftModel`` is the adapter setting (twins continue its adapter with
    LoRA), a plain model the full setting (full finetunes). Each twin starts from
    a fresh copy of the suspicious model on its device (CUDA and bf16 if that
    is where it lives; with LoRA only the adapter is copied and the frozen base
    is shared). In the adapter setting ``together`` > 1 variants have their twins
    co-trained in one run, one pass over the shared frozen base per step for all
    of them (:func:`_run_jobs_together`); ``together=1`` (the default,
    :data:`TWINS_TOGETHER`, see why there) and the full setting train one twin
    after the other. Per variant the
    cache gets ``<root>/<model fingerprint>/variant-XX-<key>/`` with
    ``delta.safetensors`` (Δ_i for every adapted registry projection, fp32,
    keys ``block.<b>.<kind>``) and ``delta.json`` (layout, variant spec, both
    recipes, seconds, final losses). Peak memory ≈ suspicious model + the
    training twins + two dense fp32 deltas (425 MB each for SmolLM2); the full
    setting adds the twin's gradients and AdamW state (~3.5–4.5 GB).
    """
    from tqdm.auto import tqdm

    config = config or SignatureConfig()
    i, n = parse_shard(shard)
    if together is not None and together < 1:
        raise ValueError(f"together must be ≥ 1 (variants co-trained in one run), got {together}")
    model, tok = _model_and_tokenizer(suspicious)
    fp = model_fingerprint(model)
    jobs = [j for j in plan_twins((model, tok), config, cache_dir, pool=pool, fingerprint=fp) if j.index % n == i]
    todo = [j for j in jobs if not j.done]
    lora = bool(todo) and todo[0].setting == "lora"
    size = (together or TWINS_TOGETHER) if lora else 1
    chunks = [todo[c:c + size] for c in range(0, len(todo), size)]
    bar = tqdm(chunks, desc=f"twins shard {i}/{n}", disable=not progress or not todo, leave=False)
    for chunk in bar:
        bar.set_postfix(variants=",".join(str(j.index) for j in chunk))
        if size > 1:
            _run_jobs_together(chunk, model, tok, config, fp, progress)
        else:
            _run_job(chunk[0], model, tok, config, fp, progress)
    return jobs


# =========================================================================== scores
def terms_from_gram(gram: torch.Tensor, norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2's terms from per-channel Gram matrices ``gram`` [C, N, N] of the raw vectors (``gram[c, i, i'] =
    Δ_i[c]·Δ_i'[c]``); ``norms`` [C, N] defaults to the square root of the diagonal."""
    n = gram.shape[-1]
    if norms is None:
        norms = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(0).sqrt()
    norm_term = norms.mean(1)
    if n < 2:
        return norm_term, torch.zeros_like(norm_term)
    iu = torch.triu_indices(n, n, 1, device=gram.device)
    denom = norms[:, iu[0]] * norms[:, iu[1]]  # [C, P]
    dots = gram[:, iu[0], iu[1]]
    cos = torch.where(denom > 0, dots / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(dots))
    return norm_term, cos.clamp(0.0, 1.0).mean(1)


def channel_terms(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2's two terms for ``vectors`` [N, C, D] (N variants, C channels, D entries per channel).

    Returns ``norm`` [C] = (1/N) Σ_i ‖v_i‖₂ and ``align`` [C] =
    (2 / (N(N−1))) Σ_{i<i'} max(0, cos(v_i, v_i')) (zero when N = 1). A zero
    vector has cosine 0 with everything. The per-pair clamp needs the explicit
    pairs: each channel's [N, N] Gram matrix is one batched matmul.
    """
    if vectors.dim() != 3:
        raise ValueError(f"channel_terms expects [N, C, D], got shape {tuple(vectors.shape)}")
    v = vectors if vectors.dtype in (torch.float32, torch.float64) else vectors.float()
    v = v.transpose(0, 1)  # [C, N, D]
    return terms_from_gram(torch.bmm(v, v.transpose(1, 2)), torch.linalg.vector_norm(v, dim=2))


def combine_terms(norm: torch.Tensor, align: torch.Tensor, score: str = "combined", lam: float = 0.01) -> torch.Tensor:
    """S = norm + λ·align ("combined"), or one of the terms alone ("norm" / "align") for the ablations."""
    if score == "combined":
        return norm + lam * align
    if score == "norm":
        return norm.clone()
    if score == "align":
        return align.clone()
    raise ValueError(f"score={score!r}; choose one of {SCORE_MODES}")


class _Sources:
    """Single module tensors (or channel slices) of N cached deltas or in-memory WeightDeltas.

    Every read opens and closes its file: a safetensors handle kept open maps
    the whole file, and the touched pages of six 425 MB files then count as
    resident memory (3.5 GB measured for SmolLM2).
    """

    def __init__(self, sources: Sequence[WeightDelta | str | Path]) -> None:
        self.items: list[WeightDelta | Path] = []
        self.keys: list[set[Key]] = []
        self.layouts: list[dict[str, Any]] = []
        self.metas: list[dict[str, Any]] = []
        self.names: list[str] = []
        for src in sources:
            if isinstance(src, WeightDelta):
                self.items.append(src)
                self.keys.append(set(src.tensors))
                self.layouts.append(layout_summary(src.layout))
                self.metas.append(src.meta)
                self.names.append("<memory>")
                continue
            path = Path(src)
            if not _complete(path):
                raise FileNotFoundError(
                    f"{path}: not a complete cached twin delta (needs {DELTA_JSON} and {DELTA_TENSORS})")
            try:
                manifest = read_json(path / DELTA_JSON)
                self.keys.append({(int(e["block"]), e["kind"]) for e in manifest["entries"]})
                self.layouts.append(dict(manifest["layout"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path / DELTA_JSON}: not a WeightDelta manifest ({exc})") from None
            self.items.append(path / DELTA_TENSORS)
            self.metas.append(manifest.get("meta") or {})
            self.names.append(str(path))
        if not self.items:
            raise ValueError("no twin deltas to score")
        for name, lay in zip(self.names[1:], self.layouts[1:]):
            if lay != self.layouts[0]:
                raise ValueError(f"{name}: layout differs from {self.names[0]} ({lay} vs {self.layouts[0]})")
        self.layout = self.layouts[0]

    def __len__(self) -> int:
        return len(self.items)

    def present(self, key: Key) -> bool:
        return any(key in k for k in self.keys)

    def read(self, i: int, key: Key, axis: int | None = None, lo: int = 0, hi: int | None = None
             ) -> torch.Tensor | None:
        """Module ``key`` of source ``i`` (None if absent), optionally sliced to ``lo:hi`` along ``axis``."""
        if key not in self.keys[i]:
            return None
        item = self.items[i]
        if isinstance(item, WeightDelta):
            t = item.tensors[key].detach().cpu()
            if axis is not None:
                t = t.narrow(axis, lo, (hi if hi is not None else t.shape[axis]) - lo)
            return t
        from safetensors import safe_open

        with safe_open(str(item), framework="pt", device="cpu") as f:
            name = f"block.{key[0]}.{key[1]}"
            if axis is None:
                return f.get_tensor(name)
            sl = f.get_slice(name)
            return sl[lo:hi] if axis == 0 else sl[:, lo:hi]


def _mlp_module_terms(src: _Sources, key: Key, chunk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm/align terms [d_ff] of one MLP module, ``chunk`` channels at a time, one buffer [C, N, D]."""
    lay, n = src.layout, len(src)
    d_ff, hidden = lay["d_ff"], lay["hidden"]
    axis = CHANNEL_DIM[key[1]]
    norms, aligns = [], []
    for lo in range(0, d_ff, chunk):
        hi = min(d_ff, lo + chunk)
        buf = torch.empty((hi - lo, n, hidden), dtype=torch.float32)
        for i in range(n):
            t = src.read(i, key, axis, lo, hi) if hi - lo < d_ff else src.read(i, key)
            if t is None:
                buf[:, i].zero_()
            else:
                buf[:, i].copy_(t if axis == 0 else t.t())  # down: column j is channel j
        buf = buf.to(device)
        a, b = terms_from_gram(torch.bmm(buf, buf.transpose(1, 2)), torch.linalg.vector_norm(buf, dim=2))
        norms.append(a.cpu())
        aligns.append(b.cpu())
        del buf
    return torch.cat(norms), torch.cat(aligns)


def _head_gram(src: _Sources, block: int, kinds: Sequence[str], device: torch.device) -> torch.Tensor | None:
    """Per-query-head Gram [n_heads, N, N] summed over the parts of each head (no concatenation needed).

    q rows ``h·hd:(h+1)·hd`` and o columns ``h·hd:(h+1)·hd`` belong to query
    head h; k/v rows of KV head g belong to every query head that reads it,
    ``g = h // (n_heads / n_kv_heads)`` (HF ``repeat_kv``).
    """
    lay, n = src.layout, len(src)
    nh, nkv, hd, hidden = lay["n_heads"], lay["n_kv_heads"], lay["head_dim"], lay["hidden"]
    group = torch.arange(nh) // max(1, nh // nkv)
    total = None
    for kind in kinds:
        if not src.present((block, kind)):
            continue
        heads = nh if kind in ("q", "o") else nkv
        buf = torch.empty((heads, n, hd * hidden), dtype=torch.float32)
        for i in range(n):
            t = src.read(i, (block, kind))
            if t is None:
                buf[:, i].zero_()
                continue
            t = t.float()
            if kind == "o":  # [hidden, nh·hd] → per head [hidden, hd]
                buf[:, i].copy_(t.reshape(hidden, nh, hd).permute(1, 0, 2).reshape(nh, hidden * hd))
            else:  # [heads·hd, hidden] → per head [hd, hidden]
                buf[:, i].copy_(t.reshape(heads, hd * hidden))
        buf = buf.to(device)
        g = torch.bmm(buf, buf.transpose(1, 2))  # [heads, N, N]
        if kind in ("k", "v"):
            g = g[group.to(device)]
        total = g if total is None else total + g
    return total


def compute_terms(
    sources: Sequence[WeightDelta | str | Path], *, head_kinds: Sequence[str] = ATTN_KINDS,
    chunk_bytes: int = 256 << 20, device: str | torch.device = "cpu", progress: bool = False,
) -> dict[str, Any]:
    """Norm and alignment terms of every MLP channel (and attention head) from N differential deltas.

    ``sources``: cached twin directories (streamed: one module — or a channel
    slice of at most ``chunk_bytes`` across the N files — in memory at a time)
    or in-memory :class:`WeightDelta` objects. Channels: output rows of
    gate/up, input columns of down (``registry.CHANNEL_DIM``). Heads: query
    head ``h`` is scored on the concatenation of its q rows, its o columns and
    the k/v rows of the KV head it reads under GQA
    (``h // (n_heads / n_kv_heads)``, HF's ``repeat_kv`` mapping); heads of one
    KV group therefore share their k/v part (``head_kinds=("q", "o")`` scores
    query heads on their own rows/columns only). Modules absent in a variant
    count as zero; modules absent in every variant get no scores.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    src = _Sources(sources)
    lay = src.layout
    n = len(src)
    chunk = max(1, min(lay["d_ff"], chunk_bytes // max(1, n * lay["hidden"] * 4)))
    norm: dict[Key, torch.Tensor] = {}
    align: dict[Key, torch.Tensor] = {}
    mlp_keys = [(b, k) for b in range(lay["n_blocks"]) for k in MLP_KINDS if src.present((b, k))]
    for key in tqdm(mlp_keys, desc="channel scores", disable=not progress, leave=False):
        norm[key], align[key] = _mlp_module_terms(src, key, chunk, device)
    if not norm:
        raise ValueError("the twin deltas hold no MLP (gate/up/down) module: nothing to score")
    head_norm: dict[int, torch.Tensor] = {}
    head_align: dict[int, torch.Tensor] = {}
    kinds = [k for k in ATTN_KINDS if k in tuple(head_kinds)]
    for b in range(lay["n_blocks"]):
        gram = _head_gram(src, b, kinds, device) if kinds else None
        if gram is not None:
            head_norm[b], head_align[b] = (t.cpu() for t in terms_from_gram(gram))
    return {"norm": norm, "align": align, "head_norm": head_norm, "head_align": head_align, "layout": lay,
            "metas": src.metas, "names": src.names}


# =========================================================================== selection
def n_top(rho: float, n: int) -> int:
    """``max(1, floor(ρ·n))`` for ρ > 0 (the public code's count), 0 for ρ = 0; float-safe floor."""
    if rho <= 0:
        return 0
    return min(n, max(1, math.floor(rho * n + 1e-9)))


def top_indices(scores: torch.Tensor, k: int, lowest: bool = False) -> torch.Tensor:
    """Indices of the k largest (``lowest``: smallest) scores (ties: lower index first), sorted ascending."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores.double(), descending=not lowest, stable=True).indices[:k]
    return torch.sort(order).values.long()


def _split_flat(chosen: torch.Tensor, keys: Sequence[Any], sizes: Sequence[int]) -> dict[Any, torch.Tensor]:
    """Map indices into a concatenation of per-key vectors back to per-key indices."""
    out, start = {}, 0
    for k, size in zip(keys, sizes):
        m = (chosen >= start) & (chosen < start + size)
        out[k] = chosen[m] - start
        start += size
    return out


def select_channels(scores: Mapping[Key, torch.Tensor], rho: float, scope: str, *,
                    lowest: bool = False) -> dict[Key, torch.Tensor]:
    """Top (``lowest``: bottom) channels per (block, kind): ``n_top(ρ, d_ff)`` per module, or over all modules
    for ``scope="global"``. Shared by signatures (highest scores) and pruning baselines (lowest)."""
    keys = sorted(scores, key=lambda k: (k[0], MLP_KINDS.index(k[1])))
    if scope == "module":
        return {k: top_indices(scores[k], n_top(rho, scores[k].numel()), lowest) for k in keys}
    flat = torch.cat([scores[k].double() for k in keys]) if keys else torch.zeros(0)
    return _split_flat(top_indices(flat, n_top(rho, flat.numel()), lowest), keys, [scores[k].numel() for k in keys])


def _select_heads(head_scores: Mapping[int, torch.Tensor], heads: int) -> dict[int, torch.Tensor]:
    if heads <= 0:
        return {b: torch.zeros(0, dtype=torch.long) for b in sorted(head_scores)}
    if not head_scores:
        raise ValueError(f"heads={heads} but this signature has no head scores (no attention deltas were scored)")
    blocks = sorted(head_scores)
    flat = torch.cat([head_scores[b].float() for b in blocks])
    if heads > flat.numel():
        raise ValueError(f"heads={heads} but the model has only {flat.numel()} attention heads")
    return _split_flat(top_indices(flat, heads), blocks, [head_scores[b].numel() for b in blocks])


@dataclass
class Selection:
    """Selected MLP channels per (block, kind) and attention heads per block (a signature's or a random control)."""

    selected: dict[Key, torch.Tensor]
    selected_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> pd.DataFrame:
        """One row per (block, kind): n_selected (kind "head" for attention heads)."""
        rows = [{"block": b, "kind": k, "n_selected": int(v.numel())} for (b, k), v in self.selected.items()]
        rows += [{"block": b, "kind": "head", "n_selected": int(v.numel())} for b, v in self.selected_heads.items()]
        return pd.DataFrame(rows, columns=["block", "kind", "n_selected"])

    @property
    def n_channels(self) -> int:
        return sum(int(v.numel()) for v in self.selected.values())

    @property
    def n_heads(self) -> int:
        return sum(int(v.numel()) for v in self.selected_heads.values())


def _layout_dict(layout: Any) -> dict[str, Any]:
    if isinstance(layout, Signature):
        return dict(layout.layout)
    if isinstance(layout, Mapping):
        return dict(layout)
    if isinstance(layout, Layout):
        return layout_summary(layout)
    return layout_summary(layout_of(layout))


def random_selection(
    layout: Any, rho: float | None = None, scope: str = "module", seed: int = 0, *, heads: int = 0,
    like: "Signature | Selection | None" = None,
) -> Selection:
    """A random control for a ρ curve: channels (and heads) drawn uniformly, seeded.

    ``layout``: a Layout, a layout summary dict, a model or a Signature. With
    ``like`` (a selected Signature or a Selection) every (block, kind) gets
    exactly as many random channels as ``like`` selected there, and every block
    as many heads. Without it: ``scope="module"`` draws ``max(1, floor(ρ·d_ff))``
    channels per MLP module (the same counts as :meth:`Signature.select`);
    ``scope="global"`` draws the global count ``max(1, floor(ρ·3·L·d_ff))``
    uniformly over all MLP channels; ``heads`` random heads over the model.
    """
    lay = _layout_dict(layout)
    g = torch.Generator().manual_seed(int(seed))
    d_ff, n_blocks, n_heads = lay["d_ff"], lay["n_blocks"], lay["n_heads"]
    keys = [(b, k) for b in range(n_blocks) for k in MLP_KINDS]
    if like is not None:
        if like.selected is None:
            raise ValueError("random_selection(like=...): the signature has no selection; call .select() first")
        counts = {k: int(v.numel()) for k, v in like.selected.items()}
        head_counts = {b: int(v.numel()) for b, v in (like.selected_heads or {}).items()}
        sel = {k: torch.sort(torch.randperm(d_ff, generator=g)[:counts.get(k, 0)]).values for k in keys if k in counts}
        hsel = {b: torch.sort(torch.randperm(n_heads, generator=g)[:c]).values for b, c in head_counts.items()}
        meta = {"kind": "random", "seed": int(seed), "like": True}
        return Selection(sel, hsel, meta)
    if rho is None:
        raise ValueError("random_selection needs rho (or like=a selected signature)")
    _check_selection(rho, scope, heads, "combined", 0.0)
    if scope == "module":
        k = n_top(rho, d_ff)
        sel = {key: torch.sort(torch.randperm(d_ff, generator=g)[:k]).values for key in keys}
    else:
        total = len(keys) * d_ff
        chosen = torch.sort(torch.randperm(total, generator=g)[:n_top(rho, total)]).values
        sel = {key: chosen[(chosen >= j * d_ff) & (chosen < (j + 1) * d_ff)] - j * d_ff for j, key in enumerate(keys)}
    hsel: dict[int, torch.Tensor] = {}
    if heads:
        if heads > n_blocks * n_heads:
            raise ValueError(f"heads={heads} but the model has only {n_blocks * n_heads} attention heads")
        flat = torch.sort(torch.randperm(n_blocks * n_heads, generator=g)[:heads]).values
        hsel = {b: flat[(flat >= b * n_heads) & (flat < (b + 1) * n_heads)] - b * n_heads for b in range(n_blocks)}
    return Selection(sel, hsel, {"kind": "random", "seed": int(seed), "rho": float(rho), "scope": scope,
                                 "heads": int(heads)})


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
            self._scores = {k: combine_terms(self.norm_term[k], self.align_term[k], self.config.score, self.config.lam)
                            for k in self.norm_term}
        return self._scores

    @property
    def head_scores(self) -> dict[int, torch.Tensor]:
        if self._head_scores is None:
            self._head_scores = {b: combine_terms(self.head_norm[b], self.head_align[b], self.config.score,
                                                  self.config.lam) for b in self.head_norm}
        return self._head_scores

    def select(self, rho: float | None = None, scope: str | None = None, heads: int | None = None,
               score: str | None = None, lam: float | None = None) -> "Signature":
        """A NEW signature with ``selected`` / ``selected_heads`` set (arguments left None keep ``config``'s).

        Recomputes S from the cached terms when ``score`` or ``lam`` change; no
        training, milliseconds (slider-friendly). ρ = None in the config means
        the paper default for the setting (0.35 LoRA / 0.03 full).
        """
        changes = {k: v for k, v in {"rho": rho, "scope": scope, "heads": heads, "score": score, "lam": lam}.items()
                   if v is not None}
        cfg = self.config.replace(**changes) if changes else self.config
        _check_selection(cfg.rho, cfg.scope, cfg.heads, cfg.score, cfg.lam)
        new = Signature(self.norm_term, self.align_term, cfg, self.layout, self.head_norm, self.head_align,
                        self.variants, self.meta)
        if cfg.score == self.config.score and cfg.lam == self.config.lam:
            new._scores, new._head_scores = self._scores, self._head_scores
        r = cfg.resolved_rho(self.setting)
        new.selected = select_channels(new.scores, r, cfg.scope)
        new.selected_heads = _select_heads(new.head_scores, int(cfg.heads))
        new.selection = {"rho": r, "scope": cfg.scope, "heads": int(cfg.heads), "score": cfg.score,
                         "lam": float(cfg.lam)}
        return new

    def to_selection(self) -> Selection:
        if self.selected is None:
            raise ValueError("this signature has no selection yet; call .select()")
        return Selection(self.selected, self.selected_heads or {}, {"kind": "signature", **(self.selection or {})})

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
        for (b, k) in sorted(self.norm_term, key=lambda x: (x[0], MLP_KINDS.index(x[1]))):
            n = self.norm_term[(b, k)].numel()
            sel = np.zeros(n, dtype=bool)
            if self.selected is not None and (b, k) in self.selected:
                sel[self.selected[(b, k)].numpy()] = True
            parts.append(pd.DataFrame({
                "block": np.full(n, b, dtype=np.int64), "kind": k, "channel": np.arange(n, dtype=np.int64),
                "score": self.scores[(b, k)].double().numpy(), "norm": self.norm_term[(b, k)].double().numpy(),
                "align": self.align_term[(b, k)].double().numpy(), "selected": sel,
            }))
        cols = ["block", "kind", "channel", "score", "norm", "align", "selected"]
        return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)

    def head_frame(self) -> pd.DataFrame:
        """One row per query head — block, head, kv_head, score, norm, align, selected."""
        cols = ["block", "head", "kv_head", "score", "norm", "align", "selected"]
        rows = []
        nh, nkv = self.layout["n_heads"], self.layout["n_kv_heads"]
        for b in sorted(self.head_norm):
            chosen = set(self.selected_heads[b].tolist()) if self.selected_heads and b in self.selected_heads else set()
            for h in range(nh):
                rows.append({"block": b, "head": h, "kv_head": h // max(1, nh // nkv),
                             "score": float(self.head_scores[b][h]), "norm": float(self.head_norm[b][h]),
                             "align": float(self.head_align[b][h]), "selected": h in chosen})
        return pd.DataFrame(rows, columns=cols)

    def layer_summary(self) -> pd.DataFrame:
        """Per block × kind: n_channels, n_selected, frac_selected, score_sum, selected_mass (Σ S over the
        selected channels), mass_share (its share of all selected mass), mean norm and align."""
        df = self.frame()
        cols = ["block", "kind", "n_channels", "n_selected", "frac_selected", "score_sum", "selected_mass",
                "mass_share", "norm_mean", "align_mean"]
        if df.empty:
            return pd.DataFrame(columns=cols)
        df = df.assign(sel_score=df["score"].where(df["selected"], 0.0))
        out = df.groupby(["block", "kind"], sort=False, as_index=False).agg(
            n_channels=("channel", "size"), n_selected=("selected", "sum"), score_sum=("score", "sum"),
            selected_mass=("sel_score", "sum"), norm_mean=("norm", "mean"), align_mean=("align", "mean"))
        out["frac_selected"] = out["n_selected"] / out["n_channels"]
        total = out["selected_mass"].sum()
        out["mass_share"] = out["selected_mass"] / total if total else 0.0
        out["kind"] = pd.Categorical(out["kind"], categories=list(MLP_KINDS), ordered=True)
        return out.sort_values(["block", "kind"]).reset_index(drop=True)[cols]

    def __repr__(self) -> str:
        sel = (f"selected={self.n_selected} channels, {sum(int(v.numel()) for v in self.selected_heads.values())} heads"
               f" ({self.selection})" if self.selected is not None else "not selected")
        return (f"Signature(N={len(self.variants)}, setting={self.setting!r}, family={self.config.family!r}, "
                f"modules={len(self.norm_term)}, head_blocks={len(self.head_norm)}, {sel})")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/signature.safetensors`` + ``path/signature.json`` atomically."""
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
        manifest = {"format": SIGNATURE_FORMAT, "version": SIGNATURE_VERSION, "config": self.config.to_dict(),
                    "layout": self.layout, "variants": self.variants, "meta": self.meta,
                    "selection": self.selection, "has_selection": self.selected is not None,
                    "tensors": sorted(tensors)}
        with atomic_dir(path) as tmp:
            save_tensors(tmp / SIGNATURE_TENSORS, tensors, metadata={"format": SIGNATURE_FORMAT,
                                                                     "version": str(SIGNATURE_VERSION)})
            write_json(tmp / SIGNATURE_JSON, manifest)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Signature":
        """Read a directory written by :meth:`save`; :class:`SignatureFormatError` names the path on bad input."""
        from .artifacts import load_tensors

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
            raise SignatureFormatError(f"{path / SIGNATURE_JSON}: unsupported version {manifest.get('version')!r}")
        try:
            raw = load_tensors(path / SIGNATURE_TENSORS)
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise SignatureFormatError(f"{path / SIGNATURE_TENSORS}: unreadable safetensors ({exc})") from None
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
            bad = [k for k, t in norm.items() if t.numel() != d_ff] + [b for b, t in hn.items() if t.numel() != nh]
            if bad:
                raise ValueError(f"score tensors with the wrong size for the layout: {bad[:3]}")
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureFormatError(f"{path}: inconsistent signature ({exc})") from None
        key = lambda kv: (kv[0][0], MLP_KINDS.index(kv[0][1]))  # noqa: E731
        sig = cls(dict(sorted(norm.items(), key=key)), dict(sorted(align.items(), key=key)), config,
                  manifest["layout"], dict(sorted(hn.items())), dict(sorted(ha.items())),
                  manifest.get("variants") or [], manifest.get("meta") or {})
        if manifest.get("has_selection"):
            sig.selected = {k: sel.get(k, torch.zeros(0, dtype=torch.long)) for k in sig.norm_term}
            sig.selected_heads = {b: hsel.get(b, torch.zeros(0, dtype=torch.long)) for b in sig.head_norm}
            sig.selection = manifest.get("selection")
        return sig


def compute_signature(
    sources: Sequence[WeightDelta | str | Path], config: SignatureConfig | None = None, *,
    meta: dict[str, Any] | None = None, device: str | torch.device = "cpu", progress: bool = False,
    select: bool = True,
) -> Signature:
    """Score N differential deltas (cached twin dirs or WeightDeltas) and select with ``config``.

    Measured on SmolLM2-shaped deltas (N = 6 × 425 MB fp32 files, 90 MLP
    modules × 1536 channels + 270 heads) on the 2-core CPU: 1.5–2.3 s idle, peak
    RSS 0.3–0.5 GB; re-selecting (new ρ / λ / scope / heads) 0.04–0.14 s. On a
    CPU shared with other jobs the same scoring took 10–50 s with 2 torch
    threads (memory-bound work suffers most from oversubscription; 1 thread was
    7× faster there). Each run's figure is in ``meta["seconds"]["scoring"]``.
    """
    config = config or SignatureConfig()
    t0 = time.time()
    terms = compute_terms(sources, head_kinds=config.head_kinds, device=device, progress=progress)
    seconds = time.time() - t0
    metas = terms["metas"]
    variants = [m["variant"] for m in metas if isinstance(m, dict) and "variant" in m]
    settings = {m.get("setting") for m in metas if isinstance(m, dict) and m.get("setting")}
    info = {"setting": settings.pop() if len(settings) == 1 else None, "n_variants": len(metas),
            "sources": terms["names"]}
    info.update(meta or {})
    info["seconds"] = {**info.get("seconds", {}), "scoring": round(seconds, 3)}
    sig = Signature(terms["norm"], terms["align"], config, terms["layout"], terms["head_norm"], terms["head_align"],
                    variants, info)
    return sig.select() if select else sig


def extract_signature(
    suspicious: Any, config: SignatureConfig | None = None, cache_dir: str | Path | None = None,
    progress: bool = True, *, pool: Sequence[Example] | None = None,
) -> Signature:
    """train_twins (all variants; cached ones are skipped) + scores + select, in one call.

    ``config.family`` is the behaviour family the user fears; the suspicious
    model's manifest is never read.
    """
    config = config or SignatureConfig()
    model, tok = _model_and_tokenizer(suspicious)
    t0 = time.time()
    jobs = train_twins((model, tok), config, cache_dir, (0, 1), progress, pool=pool)
    twins_s = time.time() - t0
    missing = [j.index for j in jobs if not j.done]
    if missing:
        raise RuntimeError(f"twin deltas missing for variants {missing} after training")
    meta = {"setting": setting_of(model), "fingerprint": jobs[0].path.parent.name if jobs else None,
            "twins": jobs_frame(jobs).drop(columns=["path"]).to_dict("records"),
            "cache": [str(j.path) for j in jobs], "seconds": {"twins": round(twins_s, 2)}}
    return compute_signature([j.path for j in jobs], config, meta=meta, progress=progress)


__all__ = [
    "VariantSpec", "make_variants", "SignatureConfig", "default_twin_train", "TwinJob", "plan_twins", "train_twins",
    "jobs_frame", "parse_shard", "model_fingerprint", "twin_cache_root", "twin_cache_frame",
    "clean_twin_cache", "setting_of", "channel_terms",
    "combine_terms", "terms_from_gram", "compute_terms", "compute_signature", "Signature", "SignatureFormatError",
    "Selection",
    "random_selection", "extract_signature", "n_top", "resolve_family", "FAMILY_ALIASES", "PAPER_RHO",
    "SCORE_MODES", "SCOPES",
]
