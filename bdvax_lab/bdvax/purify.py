"""Purification (``docs/method.md``, "Purification"; paper §4.3): suppress the signature, repair, measure.

Three stages, each usable on its own from a notebook:

1. **Suppression** of the signature channels (and optional attention heads).

   * full-model setting, :func:`reinit_channels`: the selected MLP channels
     (row ``j`` of ``gate_proj``/``up_proj``, column ``j`` of ``down_proj``) are
     re-drawn from an initializer. Default ``init="model"``: the model's own
     initializer, i.e. what ``transformers`` uses for every ``nn.Linear`` of a
     LLaMA-family model, ``normal(0, config.initializer_range)`` with zero bias.
     It is the default because it is what "re-initialize from the model's own
     initializer" means for these models and it needs no further choice.
     ``init="xavier"`` draws Xavier-uniform with the *module's* fan-in/fan-out
     (``U(±sqrt(6 / (fan_in + fan_out)))``); ``"matched"`` draws
     ``normal(0, std of the module's current weight)``; ``"zero"`` zeroes.
     Measured on SmolLM2-135M: trained MLP weights have std ≈ 0.19 while
     ``initializer_range`` is 0.02 (Xavier: ≈ 0.031), so "model" and "xavier"
     leave the re-drawn channels ~6–10× quieter than live ones (close to
     zeroing them, the repair has to regrow them); "matched" keeps their scale.
   * adapter setting, :func:`zero_lora_channels`: row ``j`` of ``lora_B`` for
     gate/up and column ``j`` of ``lora_A`` for down, in every active adapter,
     which makes exactly those rows/columns of ``ΔW = scaling · B @ A`` zero.

   Attention heads (``selected_heads[block]`` = query-head indices): the head's
   rows of ``q_proj`` and its input columns of ``o_proj``. With grouped-query
   attention one k/v head is shared by ``n_heads / n_kv_heads`` query heads, so
   its rows of ``k_proj``/``v_proj`` are touched only when *every* query head
   of its group is selected (``kv_heads="group"``, default: never damage an
   unselected head); ``"any"`` touches the shared k/v head when any of its query
   heads is selected, ``"none"`` never touches k/v. Without GQA the three rules
   coincide with "the head's own q/k/v rows".

2. **Repair**, :func:`repair`: the one training loop (:func:`bdvax_lab.train.finetune`)
   on clean data only. Paper defaults (:class:`RepairConfig`): 200 samples,
   5 epochs, lr 2e-4 (LoRA) / 1e-5 (full); the lr actually used is reported.

3. **One call**, :func:`purify`: signature → suppression → repair, with an
   evaluation of the suspicious, suppressed and purified models, per-stage wall
   time and peak RSS, optionally saved as an artifact directory.

Trigger-agnostic by construction: the defence (signature extraction,
suppression, repair) sees a *view* of the suspicious model whose manifest holds
only ``setting`` and ``base``. The attack's key and behaviour are read only by
the final evaluation, from the ``attack``/``task`` arguments or else the
manifest, and ASR is skipped when neither is known.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.artifacts import (
    MANIFEST,
    atomic_dir,
    check_output,
    frame_records,
    versions,
    write_json,
)
from ..core.data import Example
from ..core.models import model_fingerprint, peak_rss_mb, release_memory, working_copy
from ..core.registry import setting_of
from ..core.selfdistill import DistillConfig, defender_data
from ..threat.evaluate import EvalReport, StageEvaluator
from ..threat.suspicious import (
    SuspiciousModel,
    as_suspicious,
    eval_skill,
    eval_target,
    load_suspicious,
    spec_name,
    stage_replies,
)
from ..training.repair import RepairResult, repair
from ..weights.suppression import SuppressionReport, suppress
from .config import AUTO_RHO, STAGES, PurifyConfig, purify_signature

#: the manifest ``kind`` of a purified artifact directory
PURIFIED_KIND = "bdvax.purified"

#: Manifest keys the defence may see (everything else, e.g. attack/task/data/recipe/eval, is hidden from it).
DEFENCE_MANIFEST_KEYS = ("setting", "base")


@dataclass
class PurifyResult:
    """The purified model and everything measured on the way.

    ``report``: one row per evaluated stage ("suspicious", "suppressed",
    "purified"); ``timings``: wall seconds per stage (signature, suppression,
    repair, evaluation, total); ``rss_mb``: peak RSS after each stage.
    """

    model: Any
    tokenizer: Any
    signature: Any
    report: pd.DataFrame
    timings: dict[str, float]
    peak_rss_mb: float
    setting: str
    config: PurifyConfig
    suppression: SuppressionReport
    repair: RepairResult | None  #: None: ``PurifyConfig.finetune`` was False
    evals: dict[str, EvalReport] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    calibration: Any = None  #: the :class:`~bdvax_lab.bdvax.calibration.CalibrationResult` of ``rho="auto"``
    evaluated_with: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready: report rows, timings, peak RSS, suppression counts and the repair lr."""
        return {
            "setting": self.setting,
            "report": frame_records(self.report),
            "timings": self.timings,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_mb": self.rss_mb,
            "suppression": {
                "method": self.suppression.method,
                "counts": self.suppression.counts,
                "n_heads": self.suppression.n_heads,
            },
            "repair": self.repair.summary() if self.repair is not None else None,
            "evaluated_with": self.evaluated_with,
        }

    def as_suspicious(self) -> SuspiciousModel:
        """The purified model as a :class:`SuspiciousModel` (to evaluate or purify again)."""
        return SuspiciousModel(
            model=self.model, tokenizer=self.tokenizer, manifest=dict(self.manifest), path=self.path
        )

    def __repr__(self) -> str:
        t = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        head = f"PurifyResult(setting={self.setting}, {t}, peak RSS {self.peak_rss_mb:.0f} MB)"
        if self.calibration is not None:
            c = self.calibration
            head += (
                f"\nbudget chosen by leave-one-variant-out calibration: ρ={c.rho:g}, {c.heads} heads, "
                f"{'met' if c.met else 'NOT met'} ({c.reason})"
            )
        return f"{head}\n{self.report.to_string()}"


def defence_view(suspicious: SuspiciousModel, setting: str | None = None) -> SuspiciousModel:
    """The suspicious model as the defence may see it: same weights, manifest reduced to setting and base.

    The attack's key, behaviour, poisoned data, recipe and measured ASR are not in it.
    """
    manifest = {k: suspicious.manifest[k] for k in DEFENCE_MANIFEST_KEYS if k in (suspicious.manifest or {})}
    manifest["setting"] = setting or setting_of(suspicious.model)
    return SuspiciousModel(
        model=suspicious.model, tokenizer=suspicious.tokenizer, manifest=manifest, path=suspicious.path
    )


def _default_extractor(
    suspicious: SuspiciousModel,
    config: Any,
    *,
    cache_dir: Any = None,
    progress: bool = True,
    pool: Sequence[Example] | None = None,
    executor: Any = None,
    source: Any = None,
) -> Any:
    from .signature import extract_signature

    return extract_signature(
        suspicious,
        config,
        cache_dir=cache_dir,
        progress=progress,
        pool=pool,
        executor=executor,
        source=source,
    )


def _signature_config(config: PurifyConfig, custom_extractor: bool = False) -> Any:
    """The signature config to extract with; a custom extractor gets ``config.signature`` as it is."""
    if custom_extractor:
        return config.signature
    return purify_signature(config.signature)  # nothing set: calibrate the budget (config.py says why)


def purify(
    suspicious: SuspiciousModel | str | Path,
    clean_data: Sequence[Example] | None = None,
    config: PurifyConfig | None = None,
    *,
    out: str | Path | None = None,
    attack: Any = None,
    task: Any = None,
    skill: Any = None,
    signature: Any = None,
    extractor: Callable[..., Any] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = True,
    pool: Sequence[Example] | None = None,
    executor: Any = None,
    source: Any = None,
) -> PurifyResult:
    """BD-VAX purification of a suspicious model: signature → suppression → repair → evaluation.

    ``suspicious``: a :class:`SuspiciousModel` or an artifact directory.
    ``clean_data``: the defender's clean examples for repair (default: the
    pool's ``repair`` split). ``signature``: a precomputed signature (skips
    extraction); otherwise ``extractor(view, signature_config, cache_dir=..., progress=...)``
    is called (default ``bdvax_lab.signature.extract_signature``) with the
    defence view (:func:`defence_view`: no attack information).
    ``attack``/``task`` are for measuring ASR only (default: the manifest's;
    neither known → no ASR columns). With ``out`` the purified model, signature,
    report and manifest are written atomically as an artifact directory that
    :func:`bdvax_lab.load_suspicious` (or :func:`load_purified`) opens; ``pool``: the instructions the
    synthetic variants draw their clean data from (default: the shipped ``variant`` split; a user's own
    clean data, :func:`bdvax_lab.core.selfdistill.load_clean_data`, goes here and into ``clean_data``).
    ``out`` is checked before any
    work (:func:`bdvax_lab.core.artifacts.check_output`: an existing non-empty directory is replaced only
    when it is a purified artifact and ``overwrite`` (default; the CLI asks for ``--overwrite``), never
    the suspicious model's own). ``executor`` / ``source``: where the twins train (local by default, or
    Ray tasks opening the model from ``source``; :func:`~bdvax_lab.bdvax.twins.train_twins`); passed to
    a custom ``extractor`` only when given.
    """
    model_source = source
    source = suspicious if isinstance(suspicious, (str, Path)) else getattr(suspicious, "path", None)
    if out is not None:
        check_output(out, kind=PURIFIED_KIND, overwrite=overwrite, inputs=[source])
    suspicious = as_suspicious(suspicious)
    cfg = config or PurifyConfig()
    detected = setting_of(suspicious.model)
    setting = detected if cfg.setting == "auto" else cfg.setting
    if setting != detected:
        raise ValueError(
            f"PurifyConfig.setting={setting!r} but the suspicious model is a "
            f"{'PeftModel' if detected == 'lora' else 'plain model'} ({detected!r} setting)"
        )
    ev_attack, ev_task = eval_target(suspicious, attack, task, who="purify")
    tok = suspicious.tokenizer
    timings = {"clean_data": 0.0, "signature": 0.0, "suppression": 0.0, "repair": 0.0, "evaluation": 0.0}
    rss: dict[str, float] = {}
    evaluator = StageEvaluator(
        tok, ev_attack, ev_task, cfg.eval, cfg.evaluate, progress, skill=eval_skill(suspicious, skill)
    )
    t_start = time.time()

    def run_eval(stage: str, model: Any) -> None:
        evaluator(stage, model)
        if stage in evaluator.seconds:
            rss[f"eval_{stage}"] = round(peak_rss_mb(), 1)

    # -- 0. the suspicious model as it is, and the defender's repair data answered by it
    run_eval("suspicious", suspicious.model)
    t = time.time()
    given = {
        "from": "shipped pool" if clean_data is None else "given",
        "pool": "given" if pool else "shipped",
    }
    fingerprint = model_fingerprint(suspicious.model)
    clean_data = defender_data(
        suspicious.model,
        tok,
        clean_data,
        n=cfg.repair.n_samples,
        fingerprint=fingerprint,
        progress=progress,
        config=DistillConfig.for_training(cfg.repair.max_response_tokens),
    )
    timings["clean_data"] = time.time() - t

    # -- 1. signature (defence view only)
    t = time.time()
    if signature is None:
        view = defence_view(suspicious, setting)
        sig_cfg = _signature_config(cfg, custom_extractor=extractor is not None)
        extra: dict[str, Any] = {"pool": pool} if pool is not None else {}
        if executor is not None:
            extra |= {"executor": executor, "source": model_source}
        signature = (extractor or _default_extractor)(
            view, sig_cfg, cache_dir=cache_dir, progress=progress, **extra
        )
    timings["signature"] = time.time() - t
    rss["signature"] = round(peak_rss_mb(), 1)
    release_memory()  # the twins' deltas are gone; hand their pages back before the copy below

    # -- 1b. rho="auto": leave-one-variant-out calibration on the defender's own variants (defence view)
    calibration = None
    if getattr(signature, "selected", True) is None and getattr(signature.config, "rho", None) == AUTO_RHO:
        from .calibration import select_auto

        t = time.time()
        signature, calibration = select_auto(
            signature,
            defence_view(suspicious, setting),
            cfg.calibration,
            suppress_config=cfg.suppression,
            reference=clean_data,
            pool=pool,
            cache_dir=cache_dir,
            progress=progress,
        )
        timings["calibration"] = time.time() - t

    # -- 2. suppression
    # Adapter setting with an adapter-only repair: suppression and repair touch LoRA tensors only, so the
    # copy shares the frozen base with the suspicious model (one base in memory instead of two).
    adapter_only = setting == "lora" and (cfg.repair.mode or "lora") == "lora"
    model = (
        suspicious.model if cfg.inplace else working_copy(suspicious.model, share_frozen_base=adapter_only)
    )
    t = time.time()
    sup = suppress(model, signature, cfg.suppression, setting=setting)
    timings["suppression"] = time.time() - t
    rss["suppression"] = round(peak_rss_mb(), 1)
    run_eval("suppressed", model)
    # the evaluations' freed KV caches and logits: a lower RSS going into the repair (its peak is its own)
    release_memory()

    # -- 3. repair (unless finetune=False: then the suppressed model is the result)
    rep = None
    if cfg.finetune:
        t = time.time()
        rep = repair(model, tok, clean_data, cfg.repair, progress=progress)
        model = rep.model
        timings["repair"] = time.time() - t
        rss["repair"] = round(peak_rss_mb(), 1)
        release_memory()  # measured: eval → 30-step repair → eval peaks at 3.60 GB with this, 3.83 without
    if rep is None and "suppressed" in evaluator.evals:
        evaluator.same_as("purified", "suppressed")  # no repair: the suppressed model is the result
    else:
        run_eval("purified", model)
    timings["evaluation"] = sum(evaluator.seconds.values())
    timings["total"] = time.time() - t_start
    timings = {k: round(v, 2) for k, v in timings.items()}
    report = evaluator.frame(STAGES)
    evals = evaluator.evals
    evaluated_with = (
        {"attack": spec_name(ev_attack), "task": spec_name(ev_task)} if ev_attack is not None else None
    )
    result = PurifyResult(
        model=model,
        tokenizer=tok,
        signature=signature,
        report=report,
        timings=timings,
        peak_rss_mb=peak_rss_mb(),
        setting=setting,
        config=cfg,
        suppression=sup,
        repair=rep,
        evals=evals,
        rss_mb=rss,
        evaluated_with=evaluated_with,
        calibration=calibration,
    )
    result.manifest = _manifest(result, suspicious) | {
        "source_fingerprint": fingerprint,
        "clean_data": {**given, "n_repair": len(clean_data)},
    }
    if out is not None:
        result.path = save_purified(result, out, overwrite=overwrite, inputs=[source])
    return result


def _manifest(result: PurifyResult, suspicious: SuspiciousModel) -> dict[str, Any]:
    sig_cfg = getattr(result.signature, "config", None)
    return {
        "kind": PURIFIED_KIND,
        "format": 1,
        "setting": result.setting,
        "base": (suspicious.manifest or {}).get("base", "default"),
        "base_path": (suspicious.manifest or {}).get("base_path"),
        "source": str(suspicious.path) if suspicious.path is not None else None,
        "config": result.config.to_dict(),
        "signature_config": sig_cfg.to_dict() if hasattr(sig_cfg, "to_dict") else None,
        "suppression": {
            "method": result.suppression.method,
            "counts": result.suppression.counts,
            "n_heads": result.suppression.n_heads,
            **{k: v for k, v in result.suppression.meta.items() if k != "modules_without_lora"},
        },
        "repair": result.repair.summary() if result.repair is not None else None,
        "timings": result.timings,
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "evaluated_with": result.evaluated_with,
        "calibration": None
        if result.calibration is None
        else {k: result.calibration.to_dict()[k] for k in ("rho", "heads", "met", "reason", "informative")},
        "eval": frame_records(result.report)[-1] if len(result.report) else None,
        "versions": versions(),
    }


def save_purified(
    result: PurifyResult, out: str | Path, *, overwrite: bool = True, inputs: Sequence[Any] = ()
) -> Path:
    """Write the purified artifact directory atomically.

    LoRA: ``adapter/`` + ``tokenizer/``; full: ``model/`` (with its tokenizer).
    Plus ``signature/`` (when the signature has ``save``), ``report.csv``,
    ``report.json``, ``eval_replies.csv`` (every evaluated stage's replies, column ``stage``),
    ``repair_history.csv`` (when it repaired), ``suppression.csv`` and ``manifest.json``.
    ``overwrite``/``inputs``: :func:`bdvax_lab.core.artifacts.atomic_dir`'s output policy.
    """
    out = Path(out)
    with atomic_dir(out, kind=PURIFIED_KIND, overwrite=overwrite, inputs=inputs) as tmp:
        if result.setting == "lora":
            result.model.save_pretrained(tmp / "adapter", safe_serialization=True)
            result.tokenizer.save_pretrained(tmp / "tokenizer")
        else:
            result.model.save_pretrained(tmp / "model", safe_serialization=True)
            result.tokenizer.save_pretrained(tmp / "model")
        if hasattr(result.signature, "save"):
            result.signature.save(tmp / "signature")
        result.report.to_csv(tmp / "report.csv")
        write_json(tmp / "report.json", result.summary())
        replies = stage_replies(result.evals)
        if len(replies):
            replies.to_csv(tmp / "eval_replies.csv", index=False)
        if result.repair is not None:
            result.repair.history.to_csv(tmp / "repair_history.csv", index=False)
        result.suppression.frame().to_csv(tmp / "suppression.csv", index=False)
        write_json(tmp / MANIFEST, result.manifest)
    return out


def load_purified(path: str | Path, *, base: Any = None) -> SuspiciousModel:
    """Open a purified artifact (:func:`load_suspicious`): ``base`` (a ``(model, tokenizer)`` pair, e.g. the
    tiny test model, or a base directory) takes a LoRA ``adapter/``; without it the recorded base does."""
    return load_suspicious(path, base=base)
