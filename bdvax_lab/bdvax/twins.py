"""Twins (paper §4.2, steps 2–3): per variant a poisoned and a clean finetune of the suspicious model.

Both twins start from the suspicious model with the same seed and recipe; only their differential
delta Δ_i = (θ_p − θ_s) − (θ_c − θ_s) is kept (``docs/method.md``, "Signature extraction"). Entries are
cached per model fingerprint as WeightDelta directories, written atomically; reruns and crashed runs
resume, and ``shard=(i, n)`` lets several processes fill one cache. Each entry is written under its own
lock file (:func:`bdvax_lab.core.artifacts.entry_lock`): a second process on the same entry waits for the
first and then reads its result. The cache listing and cleaning touch only directories whose manifest says
they are this tool's twin entries, plus its own stale temporary directories.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.artifacts import (
    entry_lock,
    is_stale_tmp,
    lock_path,
    parse_tmp_name,
    read_json,
    reap_stale,
    stable_hash,
)
from ..core.data import Example
from ..core.models import model_fingerprint, release_memory, working_copy
from ..core.registry import Key, setting_of
from ..core.selfdistill import defender_data
from ..threat.suspicious import as_suspicious
from ..training.config import TrainConfig
from ..weights.delta_io import DELTA_JSON, DELTA_TENSORS, FORMAT_NAME
from ..weights.deltas import WeightDelta
from ..weights.factored import FactoredDelta, load_delta
from .config import SignatureConfig
from .variants import VariantSpec, default_pool, example_id

if TYPE_CHECKING:
    pass

TWIN_FORMAT = "bdvax_lab.twin_delta"
#: part of every entry's cache key: bumped only when what an entry means changes, not how it is stored
#: (dense entries of earlier versions and factored ones are read alike, :mod:`bdvax_lab.weights.delta_io`)
TWIN_FORMAT_VERSION = 1


def twin_cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` or ``bdvax_lab.models.cache_dir() / "twins"``."""
    if cache_dir is not None:
        return Path(cache_dir)
    from ..core.models import cache_dir as root

    return root() / "twins"


def _complete(path: Path) -> bool:
    return (path / DELTA_JSON).is_file() and (path / DELTA_TENSORS).is_file()


_ENTRY_RE = re.compile(r"^variant-(?P<index>\d+)-(?P<key>[0-9a-f]{16})(?P<partial>\.poison)?$")


def entry_state(path: Path) -> str | None:
    """``"complete"`` or ``"partial"`` (a crashed run's poisoned twin) when the directory's manifest says it
    is a twin-cache entry made by this tool under this name and model fingerprint; None otherwise."""
    path = Path(path)
    m = _ENTRY_RE.match(path.name)
    if m is None or path.is_symlink() or not path.is_dir() or not _complete(path):
        return None
    try:
        manifest = read_json(path / DELTA_JSON)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        return None
    meta = manifest.get("meta")
    if not isinstance(meta, dict) or meta.get("entry") != m["key"]:
        return None
    if m["partial"]:
        return "partial" if meta.get("role") == "poisoned_twin" else None
    ok = meta.get("format") == TWIN_FORMAT and meta.get("fingerprint") == path.parent.name
    return "complete" if ok else None


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()]


def twin_cache_frame(
    cache_dir: str | Path | None = None, *, older_than_days: float | None = None, model: str | None = None
) -> pd.DataFrame:
    """One row per twin entry of the cache: model fingerprint, variant, state, complete, MB, age in days.

    ``state``: ``complete``, ``partial`` (a crashed run's poisoned twin, resumed by the next run),
    ``stale-tmp`` (a killed writer's temporary directory, removed by ``clean_twin_cache``) or ``writing``
    (a live writer's). Only directories whose manifest says they are this tool's entries are listed; others
    are left alone. Full-setting entries are dense fp32 deltas (≈ 0.4 GB per SmolLM2 variant), so the
    cache is worth watching; adapter-setting entries are factored (≈ 20 MB). ``older_than_days`` /
    ``model`` keep only entries not written for that long / of one model fingerprint.
    """
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"older_than_days {older_than_days}: expected a number of days >= 0")
    root, now, rows = twin_cache_root(cache_dir), time.time(), []
    models = sorted(d for d in root.iterdir() if d.is_dir() and not d.is_symlink()) if root.is_dir() else []
    for mdir in models:
        for entry in sorted(mdir.iterdir()):
            tmp = parse_tmp_name(entry.name)
            if tmp is not None:
                if _ENTRY_RE.match(tmp["name"]) is None:
                    continue
                state = "stale-tmp" if is_stale_tmp(entry, now) else "writing"
            else:
                state = entry_state(entry)
                if state is None:
                    continue
            files = _files(entry)
            try:
                mtime = max((f.stat().st_mtime for f in files), default=entry.stat().st_mtime)
                size = sum(f.stat().st_size for f in files)
            except FileNotFoundError:  # removed meanwhile (a writer renamed it into place)
                continue
            rows.append(
                {
                    "model": mdir.name,
                    "variant": tmp["name"] if tmp is not None else entry.name,
                    "state": state,
                    "complete": state == "complete",
                    "mb": round(size / 1e6, 1),
                    "age_days": round((now - mtime) / 86400, 2),
                    "path": str(entry),
                }
            )
    df = pd.DataFrame(rows, columns=["model", "variant", "state", "complete", "mb", "age_days", "path"])
    if older_than_days is not None:
        df = df[(df.age_days >= older_than_days) | (df.state == "stale-tmp")]
    if model is not None:
        df = df[df.model == model]
    return df.reset_index(drop=True)


def clean_twin_cache(
    cache_dir: str | Path | None = None,
    *,
    older_than_days: float | None = None,
    model: str | None = None,
    dry_run: bool = False,
) -> pd.DataFrame:
    """Delete twin entries (all, or those older than ``older_than_days`` / of one model fingerprint), and
    every stale temporary directory a killed writer left.

    Returns the rows of :func:`twin_cache_frame` that were (or, with ``dry_run``, would be) removed. Only
    directories listed there are touched (this tool's entries, by their manifests); an entry another
    process is writing (its lock held) is skipped, and so is a live writer's temporary directory. A
    fingerprint directory is removed only when this emptied it. A removed twin is simply retrained the
    next time a signature needs it.
    """
    df = twin_cache_frame(cache_dir, older_than_days=older_than_days, model=model)
    df = df[df.state != "writing"].reset_index(drop=True)
    if dry_run:
        return df
    gone = []
    for i, row in df.iterrows():
        path = Path(row.path)
        if row.state == "stale-tmp":
            if is_stale_tmp(path):
                shutil.rmtree(path, ignore_errors=True)
                gone.append(i)
            continue
        name = path.name[: -len(".poison")] if path.name.endswith(".poison") else path.name
        try:
            with entry_lock(path.with_name(name), timeout=0):
                if entry_state(path) is not None:
                    shutil.rmtree(path, ignore_errors=True)
                    gone.append(i)
        except TimeoutError:  # being written by another process
            continue
    for mdir in {Path(p).parent for p in df.path}:
        if mdir.is_dir() and not any(mdir.iterdir()):
            mdir.rmdir()
    return df.loc[gone].reset_index(drop=True)


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
        return {
            "variant": self.index,
            "key": self.spec.key,
            "strategy": self.spec.strategy,
            "behavior": self.spec.behavior,
            "status": self.status,
            "done": self.done,
            "seconds": round(self.seconds, 2),
            "path": str(self.path),
        }


def jobs_frame(jobs: Sequence[TwinJob]) -> pd.DataFrame:
    """One row per twin job (variant, key, strategy, behaviour, status, done, seconds, path)."""
    return pd.DataFrame(
        [j.row() for j in jobs],
        columns=["variant", "key", "strategy", "behavior", "status", "done", "seconds", "path"],
    )


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
    suspicious: Any,
    config: SignatureConfig | None = None,
    cache_dir: str | Path | None = None,
    *,
    pool: Sequence[Example] | None = None,
    fingerprint: str | None = None,
    progress: bool = False,
) -> list[TwinJob]:
    """Every variant's cache entry (path and key), without training anything.

    ``job.done`` says what is cached. The variants' clean examples are the defender's instructions
    (``pool``, default the shipped ``variant`` split) answered by the suspicious model itself wherever
    they come without a response (:func:`bdvax_lab.core.selfdistill.defender_data`; cached per model).
    """
    config = config or SignatureConfig()
    sm = as_suspicious(suspicious)
    model = sm.model
    setting = setting_of(model)
    fp = fingerprint or model_fingerprint(model)
    root = twin_cache_root(cache_dir) / fp
    specs = config.variants(pool)
    data_pool = list(pool) if pool is not None else default_pool(config.family)
    needed = {i for spec in specs for i in spec.clean_ids}
    at = [j for j, e in enumerate(data_pool) if example_id(e) in needed and not e.response.strip()]
    if at:
        answered = defender_data(
            sm.model,
            sm.tokenizer,
            [data_pool[j] for j in at],
            fingerprint=fp,
            cache_dir=None if cache_dir is None else Path(cache_dir) / "_distilled",
            progress=progress,
        )
        for j, e in zip(at, answered):
            data_pool[j] = e
    jobs = []
    for spec in specs:
        clean, poisoned = spec.datasets(data_pool)
        tp, tc = config.twin_recipes(setting, spec)
        key = stable_hash(
            {
                "format": TWIN_FORMAT,
                "version": TWIN_FORMAT_VERSION,
                "model": fp,
                "setting": setting,
                "variant": spec.to_dict(),
                "data": stable_hash([e.to_dict() for e in clean + poisoned]),
                "poison_recipe": tp.to_dict(),
                "clean_recipe": tc.to_dict(),
            }
        )
        path = root / f"variant-{spec.index:02d}-{key}"
        jobs.append(
            TwinJob(
                spec=spec,
                path=path,
                key=key,
                setting=setting,
                status="cached" if _complete(path) else "pending",
                data=(clean, poisoned),
            )
        )
    return jobs


def _train_twin(
    model: Any, tokenizer: Any, examples: Sequence[Example], config: TrainConfig, progress: bool | str = False
) -> Any:
    """Train one twin in place (the one call tests monkeypatch to count or interrupt twins)."""
    from ..training.loop import finetune

    return finetune(model, tokenizer, examples, config, progress=progress)


def _fresh_twin(model: Any, setting: str) -> Any:
    """A copy of the suspicious model to train one twin.

    Adapter setting: only the adapter is copied; the frozen base weights are
    shared with the suspicious model (LoRA training never touches them), which
    saves a full copy of the base (~540 MB and ~1 s for SmolLM2). Full
    setting: a complete deep copy.
    """
    return working_copy(model, share_frozen_base=setting == "lora")


def _twin_delta(twin: Any, suspicious_model: Any, setting: str) -> WeightDelta | FactoredDelta:
    """θ_twin − θ_s on the registry projections.

    LoRA: the twin's whole adapter ΔW (= θ_twin − θ_base), kept as its factors (fp32); the θ_s parts
    cancel in Eq. 1. Full: dense fp32.
    """
    if setting == "lora":
        return FactoredDelta.from_lora(twin)
    return WeightDelta.from_models(twin, suspicious_model, dtype=torch.float32)


def _pop_dense(d: WeightDelta | FactoredDelta, key: Key) -> torch.Tensor | None:
    """Module ``key`` of ``d`` as a dense fp32 CPU tensor, dropped from ``d`` (None if absent)."""
    if isinstance(d, FactoredDelta):
        f = d.factors.pop(key, None)
        return None if f is None else f.dense(torch.float32)
    t = d.tensors.pop(key, None)
    return None if t is None else t.float().cpu()


def _collect() -> None:
    """Return a freed twin's memory now (the caller drops its references first)."""
    release_memory()


def _train_twins_together(
    twins: Sequence[Any],
    tokenizer: Any,
    datasets: Sequence[Sequence[Example]],
    configs: Sequence[TrainConfig],
    progress: bool | str = False,
) -> list[Any]:
    """Train LoRA twins that share the suspicious model's frozen base in one co-training run (the one call
    tests monkeypatch to count or interrupt co-trained twins)."""
    from ..training.loop import finetune_together

    return finetune_together(twins, tokenizer, datasets, configs, progress=progress)


def _save_differential(
    job: TwinJob,
    d_p: WeightDelta | FactoredDelta,
    d_c: WeightDelta | FactoredDelta,
    config: SignatureConfig,
    fingerprint: str,
    seconds: dict[str, Any],
    losses: dict[str, Any],
) -> None:
    """Eq. 1, ``Δ = (θ_p − θ_s) − (θ_c − θ_s)``, saved atomically as the job's cache entry; the half-done
    ``.poison`` entry goes. Two LoRA twins give a factored entry, ``[B_p, −B_c] [A_p; A_c]`` per module
    (rank ≤ 2r, :mod:`bdvax_lab.weights.factored`); otherwise (the full setting, or a dense ``.poison``
    entry left by an earlier version) a dense one, module by module (freeing as it goes; absent = zero)."""
    spec, setting = job.spec, job.setting
    clean, poisoned = job.data if job.data is not None else spec.datasets()
    tp, tc = config.twin_recipes(setting, spec)
    diff: dict[Key, torch.Tensor] = {}
    factored = isinstance(d_p, FactoredDelta) and isinstance(d_c, FactoredDelta)
    if not factored:
        keys = set(d_p.factors if isinstance(d_p, FactoredDelta) else d_p.tensors)
        for k in sorted(keys | set(d_c.factors if isinstance(d_c, FactoredDelta) else d_c.tensors)):
            p, c = _pop_dense(d_p, k), _pop_dense(d_c, k)
            diff[k] = -c if p is None else (p.sub_(c) if c is not None else p)  # type: ignore[operator]
    meta = {
        "source": "bdvax.twin_differential",
        "format": TWIN_FORMAT,
        "version": TWIN_FORMAT_VERSION,
        "entry": job.key,
        "fingerprint": fingerprint,
        "setting": setting,
        "variant": spec.to_dict(),
        "poison_recipe": tp.to_dict(),
        "clean_recipe": tc.to_dict(),
        "n_train": {"poisoned": len(clean) + len(poisoned), "clean": len(clean)},
        "seconds": seconds,
        "final_loss": losses,
        "ops": [],
    }
    if factored:
        FactoredDelta((d_p - d_c).factors, d_p.layout, meta).save(job.path)  # type: ignore[operator]
    else:
        WeightDelta(diff, d_p.layout, meta).save(job.path)
    shutil.rmtree(job.partial, ignore_errors=True)


def _run_job(
    job: TwinJob, model: Any, tok: Any, config: SignatureConfig, fingerprint: str, progress: bool
) -> None:
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
        res = _train_twin(
            twin, tok, clean + poisoned, tp, f"twin {spec.index} poisoned" if progress else False
        )
        twin = getattr(res, "model", res)
        seconds["poisoned"] = time.time() - t1
        losses["poisoned"] = _last_loss(res)
        d_p = _twin_delta(twin, model, setting)
        d_p.meta.update(
            {
                "role": "poisoned_twin",
                "entry": job.key,
                "fingerprint": fingerprint,
                "seconds": seconds["poisoned"],
                "final_loss": losses["poisoned"],
            }
        )
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
    d_p = load_delta(job.partial)
    seconds.setdefault("poisoned", float(d_p.meta.get("seconds", 0.0)))
    losses.setdefault("poisoned", d_p.meta.get("final_loss"))
    _save_differential(job, d_p, d_c, config, fingerprint, seconds, losses)
    del d_p, d_c
    job.seconds = time.time() - t0
    if job.status != "resumed":
        job.status = "trained"


def _run_jobs_together(
    jobs: Sequence[TwinJob], model: Any, tok: Any, config: SignatureConfig, fingerprint: str, progress: bool
) -> None:
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
    results = _train_twins_together(
        [_fresh_twin(model, "lora") for _ in parts], tok, [p[2] for p in parts], [p[3] for p in parts], label
    )
    trained = time.time() - t0
    by_role = {(id(job), role): res for (job, role, _, _), res in zip(parts, results)}
    together = [j.index for j in jobs]
    for job in jobs:  # one job's two twin deltas in memory at a time
        t1 = time.time()
        res_p = by_role.pop((id(job), "poisoned"), None)
        res_c = by_role.pop((id(job), "clean"))
        if res_p is not None:
            d_p = _twin_delta(res_p.model, model, "lora")
            loss_p: Any = _last_loss(res_p)
        else:
            d_p = load_delta(job.partial)
            loss_p = d_p.meta.get("final_loss")
        d_c = _twin_delta(res_c.model, model, "lora")
        seconds = {"co_trained": round(trained, 2), "co_trained_variants": together}
        _save_differential(
            job, d_p, d_c, config, fingerprint, seconds, {"poisoned": loss_p, "clean": _last_loss(res_c)}
        )
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


#: variants whose LoRA twins are co-trained in one run by default. 1 (one twin after the other): on a CPU
#: co-training does not pay, because a step's cost grows with its token positions and not with its passes
#: over the base, while the peak memory grows with every twin held at once (on SmolLM2 the same time within
#: noise and a much higher peak RSS: ``RESULTS.md`` §3). Where a batch-4 step leaves the device idle (a
#: GPU), ``together`` > 1 is the lever; not measured here.
TWINS_TOGETHER = 1


def train_twins(
    suspicious: Any,
    config: SignatureConfig | None = None,
    cache_dir: str | Path | None = None,
    shard: str | tuple[int, int] | None = (0, 1),
    progress: bool = True,
    *,
    pool: Sequence[Example] | None = None,
    together: int | None = None,
    executor: Any = None,
    source: Any = None,
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
    ``delta.safetensors`` (Δ_i for every adapted registry projection, fp32:
    in the adapter setting its factors, keys ``block.<b>.<kind>.B`` / ``.A``,
    ≈ 20 MB for SmolLM2 at rank 8; in the full setting dense, keys
    ``block.<b>.<kind>``, 425 MB) and ``delta.json`` (layout, variant spec, both
    recipes, seconds, final losses). Peak memory ≈ suspicious model + the
    training twins + two twin deltas; the full setting adds the twin's
    gradients and AdamW state (~3.5–4.5 GB).

    ``executor`` (:func:`bdvax_lab.core.executor.make_executor`: None or ``"local"``, ``"ray"``, a config
    or an executor) runs the chunks of variants: locally one after the other, or as Ray tasks that open
    the model from ``source`` (a :class:`~bdvax_lab.threat.source.ModelSource`; default: the directory
    ``suspicious`` was opened from) and fill the same cache (:mod:`bdvax_lab.bdvax.twin_tasks`). The
    entries, their keys and their bits do not depend on the executor; ``shard`` still selects the
    variants this call trains.
    """
    from ..core.executor import make_executor

    config = config or SignatureConfig()
    i, n = parse_shard(shard)
    if together is not None and together < 1:
        raise ValueError(f"together must be ≥ 1 (variants co-trained in one run), got {together}")
    sm = as_suspicious(suspicious)
    model, tok = sm.model, sm.tokenizer
    fp = model_fingerprint(model)
    jobs = [
        j
        for j in plan_twins((model, tok), config, cache_dir, pool=pool, fingerprint=fp, progress=progress)
        if j.index % n == i
    ]
    for d in {j.path.parent for j in jobs}:  # a killed run's leftovers: temporary directories, lock files
        reap_stale(d)
    for job in jobs:
        if job.done and lock_path(job.path).exists():
            try:
                with entry_lock(job.path, timeout=0):  # released at once: the lock file goes with it
                    pass
            except TimeoutError:  # another process holds it: it removes the file itself
                pass
    todo = [j for j in jobs if not j.done]
    lora = bool(todo) and todo[0].setting == "lora"
    size = (together or TWINS_TOGETHER) if lora else 1
    chunks = [todo[c : c + size] for c in range(0, len(todo), size)]
    if not chunks:
        return jobs
    ex = make_executor(executor)
    desc = f"twins shard {i}/{n}"
    try:
        if ex.remote:
            from ..threat.source import ModelSource
            from .twin_tasks import run_remote

            src = source if source is not None else ModelSource.of(suspicious)
            run_remote(ex, chunks, src, config, fp, size=size, desc=desc, progress=progress)
            return jobs
        labels = ["variants " + ",".join(str(j.index) for j in chunk) for chunk in chunks]
        work = [(chunk, model, tok, config, fp, progress, size) for chunk in chunks]
        for _ in ex.map(run_chunk, work, desc=desc, progress=progress, labels=labels):
            pass
    finally:
        if ex is not executor:  # made here from a name or a config: release what it started
            ex.close()
    return jobs


def run_chunk(
    chunk: Sequence[TwinJob],
    model: Any,
    tok: Any,
    config: SignatureConfig,
    fp: str,
    progress: bool,
    size: int,
) -> None:
    """Train one chunk of variants (one twin pair, or ``size`` > 1 co-trained) into the cache, under each
    entry's lock; an entry another process wrote meanwhile is marked ``cached`` and not trained again."""
    with ExitStack() as stack:  # one lock per entry, taken in index order: a second process waits
        for job in sorted(chunk, key=lambda j: j.index):
            stack.enter_context(entry_lock(job.path))
            reap_stale(job.path.parent, job.path.name)
            reap_stale(job.path.parent, job.partial.name)
        mine = [j for j in chunk if not j.done]  # another process may have written them meanwhile
        for job in chunk:
            if job.done and job not in mine:
                job.status = "cached"
        if not mine:
            return
        if size > 1:
            _run_jobs_together(mine, model, tok, config, fp, progress)
        else:
            _run_job(mine[0], model, tok, config, fp, progress)
