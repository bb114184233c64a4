"""Baseline defences (paper §5.1 and Appendix B.3), at the same clean data and budget as BD-VAX's repair.

Every baseline is a function ``(suspicious_model, tokenizer, clean_data, config) -> (model, report)``
registered with :func:`~bdvax_lab.baselines.registry.register_defence`; :func:`defend` runs one on a
suspicious model and evaluates it the way :func:`bdvax_lab.bdvax.purify.purify` evaluates BD-VAX (one
row per stage with ASR, false-trigger rate, degenerate replies and utility).

Fairness rule (paper §5.1, "All baselines that require finetuning are trained
under the same configuration"): every finetune here goes through
:func:`bdvax_lab.purify.repair` with the same :class:`~bdvax_lab.purify.RepairConfig`
(default: 200 clean samples, 5 epochs, batch 8, lr 2e-4 LoRA / 1e-5 full), i.e.
the same clean examples, the same number of optimizer steps and the same lr as
BD-VAX's repair step. Every report states the lr and the number of steps.

The baselines
-------------
``finetune_only``
    The repair step alone (Qi et al., 2024): clean finetuning of the suspicious
    model (LoRA: continue the adapter; full: all weights).

``magnitude_prune``
    Magnitude pruning (Han et al., 2015; Wu & Wang, 2021) of MLP channels with
    the *same structure and ratio as the signature* (paper §5.1 "Implementation
    details"): the channel ``j`` of every gate/up/down module (row ``j`` of
    gate/up, column ``j`` of down) is scored by its L2 norm — of the weight in
    the full setting, of the adapter's ``ΔW = scaling·B@A`` in the adapter
    setting — and the *lowest* ``max(1, floor(ρ·d_ff))`` per module are pruned
    (``scope="module"``, the public code's signature structure; ``"global"``:
    the lowest ``floor(ρ·3·L·d_ff)`` over all MLP channels), or exactly as many
    per module as a given signature selected (``counts=counts_like(signature)``).
    ρ defaults to the signature's paper default for the setting (3 % full,
    35 % LoRA). Pruning zeroes the channel (full: the weight rows/columns;
    adapter: rows of ``lora_B`` / columns of ``lora_A``, so ``ΔW``'s channel is 0).
    Then the same repair (``finetune=False`` skips it: the paper's "Pruning"
    column has no finetune — :func:`defend` reports both, the pruned model as
    stage ``intervened``).
    Note: paper Appendix B.3 states a "sparsity ratio of 0.35 for LLaMA and 0.65
    for Mistral" for Pruning, while §5.1 says "the same structure and ratio as our
    backdoor signature" (3 % full / 35 % LoRA for LLaMA-2-7B); we follow §5.1 and
    ρ is a parameter.

``fine_prune``
    Fine-Pruning (Liu et al., 2018): prune the channels *dormant on clean
    inputs*, then finetune. Full setting, as the paper does (§5.1), a Wanda score
    (Sun et al., 2023): Wanda scores weight ``W_ij`` by ``|W_ij|·‖X_j‖₂``, with
    ``‖X_j‖₂`` the L2 norm of input feature ``j`` over every (non-padding) token
    of the calibration data. A channel's score is the *sum of the Wanda scores of
    its weights*, in one of two ways (``FinePruneConfig.score``):

    * ``"channel"`` (default): every MLP channel ``j`` of a block gets the score
      of its down-projection column, ``S_j = ‖a_j‖₂·Σ_i |W_down[i, j]|`` — the
      norm of the channel's activation ``a_j = SiLU(g_j)·u_j`` on clean tokens
      times the L1 mass it writes to the residual stream, i.e. how much the
      channel contributes on clean data. gate, up and down then select the same
      lowest channels, so a dormant channel is pruned whole.
    * ``"module"``: each projection scored on its own input, gate/up row ``j``
      ``S_j = Σ_k |W_jk|·‖x_k‖₂`` (``x`` = the block's post-attention hidden),
      down column ``j`` as above. Kept for comparison: a gate/up row's input-side
      score does not say whether the channel is dormant, and on SmolLM2 zeroing
      the lowest 3 % of gate rows by it raises the base model's perplexity from
      2.46 to 182 (down columns by theirs: 2.72; ``benchmarks/prune_damage.py``,
      ``results/prune_damage.csv``).

    Activation norms are collected with forward pre-hooks on the suspicious model
    over the repair's clean examples (the same ones, encoded the same way). The
    lowest-scoring channels are pruned with the same structure and counts as
    ``magnitude_prune`` (per module; with ``"channel"`` the block's three modules
    pick the same channels, which then stay zero through the repair). Adapter
    setting: activations are out of reach under that threat model, and the
    paper uses *random sampling* (§5.1): a seeded
    :func:`~bdvax_lab.signature.random_selection` with the same counts, zeroed in
    the adapter. Then the same repair. (A public BD-VAX codebase,
    github.com/Dannyxiuzq/Backdoor-Vaccine, instead prunes 35 % of the weights
    unstructured with Wanda on the merged adapter model and finetunes a fresh
    LoRA; we follow the paper's text.)

    Repair and pruned channels: no mask is enforced during the repair (there is
    one training loop). A channel zeroed in all three of gate, up and down stays
    exactly zero (its gradients vanish, SiLU(0) = 0); a channel pruned in only
    some of its modules can regrow.

``quantize_int4``
    Post-training INT4 weight quantization (Khalid et al., 2019; Li et al., 2024b):
    group-wise round-to-nearest, ``group_size=128`` consecutive input weights per
    output row, asymmetric (min/max with a zero point, 16 levels 0..15) by default,
    symmetric (``|w|max/7``, levels −7..7) optional. **This is fake quantization on
    CPU**: weights are rounded to the INT4 grid and stored back in their float
    dtype, so the model computes exactly what an INT4 weight-only kernel would
    (up to the activations' float arithmetic) but uses the same memory and time.
    All registry projections (q/k/v/o/gate/up/down of every block) are quantized;
    embeddings, norms and the LM head stay in float (usual weight-only practice).
    Adapter setting: the adapter is merged into a copy of the base
    (``merge_and_unload``) and the merged weights are quantized, so **the result
    is a full model** (report ``setting_out="full"``): a 4-bit adapter-only
    deployment does not exist. No finetune (the paper's Quantization column has
    none; finetuning would leave the grid). A real 4-bit backend (e.g.
    bitsandbytes/AWQ kernels on CUDA) plugs in through
    :func:`register_quant_backend`; ``backend="auto"`` uses a registered ``"cuda"``
    backend when CUDA is available and falls back to fake-quant otherwise. None
    is registered here (no extra dependency).

``crow`` / ``crow_published``
    CROW (Min et al., ICML 2025): finetuning on clean data with
    ``L = L_LM + α·L_cons(e + ε·sign(∇_e L_cons(e)))`` where ``e`` are the input
    embeddings and ``L_cons = mean over layers l and tokens t of
    (1 − cos(h_l[t], h_{l+1}[t]))`` between consecutive decoder layers' hidden
    states. One FGSM step: the gradient of the consistency loss with respect to
    the clean embeddings, ``ε·sign`` of it added to the embeddings (ascent: the
    perturbation *increases* inconsistency), and the consistency loss of the
    perturbed forward pass is what is minimised; the LM loss is on the clean
    input. Layers: the pre-norm block outputs ``h_1..h_{L−1}`` (HF
    ``hidden_states[1:-1]``), leaving out the embedding output and the final
    (RMS-normed) state, as the public CROW code does; the mean runs over real
    tokens only (the public code also averages padding positions).
    Defaults (source: the public CROW code, github.com/NayMyatMin/CROW, trainer
    defaults): ``α = 5.5``, ``ε = 0.1``. The CROW paper tunes α per task (a higher
    α, reportedly 11, for targeted refusal — not verified here; pass ``alpha``).
    lr: ``"standard"`` (default) = the repair lr (paper §4.3 / Appendix C.2: the
    paper standardises all finetuning baselines at 2e-4 LoRA / 1e-5 full) and
    ``"published"`` = CROW's own adapter lr, :data:`CROW_PUBLISHED_LR` (1e-3).
    Source, secondary: the README of a public BD-VAX codebase
    (github.com/Dannyxiuzq/Backdoor-Vaccine, "the upstream CROW release uses
    ``learning_rate: 1e-3``", citing CROW's
    ``configs/consistency/llama2_7b_chat/*.yaml``; the copies of those configs in
    that repo read 2e-4, apparently already standardised). Our extracted paper
    text lost the number; Appendix C.2 calls it "unusually large" next to
    standard LoRA rates. Check it against the CROW release before quoting it.
    CROW publishes no full-finetune lr, so ``"published"`` in the full setting is
    an error (pass a float). Scale: ε is absolute, per coordinate; on SmolLM2
    (mean |embedding entry| ≈ 0.10, row norm ≈ 3.2) one step moves a token
    embedding by 0.1·√576 ≈ 2.4, i.e. ~75 % of its norm. Cost: three forward and
    two backward passes per step instead of one each (≈ 2.5–3× a repair step's
    time) at the same number of steps.

CROW's extra loss term and the one training loop
------------------------------------------------
:func:`crow` passes its term as ``extra_loss`` to :func:`~bdvax_lab.purify.repair`,
which hands it to the one training loop (``bdvax_lab.train.finetune``).
Everything else — data encoding, batching, seeds, optimizer, schedule,
clipping, step count — is the repair's own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.artifacts import MANIFEST, atomic_dir, check_output, frame_records, versions, write_json
from ..core.data import Example
from ..core.models import model_fingerprint, peak_rss_mb
from ..core.registry import setting_of
from ..core.selfdistill import DistillConfig, defender_data
from ..threat.evaluate import EvalReport, StageEvaluator
from ..threat.suspicious import (
    SuspiciousModel,
    as_suspicious,
    eval_skill,
    eval_target,
    spec_name,
    stage_replies,
)
from ..weights.selection import counts_like
from .config import STAGES, BaselineConfig, PruneConfig
from .registry import get_defence

#: the manifest ``kind`` of a defended artifact directory
DEFENDED_KIND = "bdvax.defended"


# =========================================================================== one call
@dataclass
class DefenceResult:
    """What :func:`defend` returns: the defended model, per-stage evaluation and the baseline's own report."""

    method: str
    model: Any
    tokenizer: Any
    report: pd.DataFrame
    info: dict[str, Any]
    history: pd.DataFrame | None
    timings: dict[str, float]
    peak_rss_mb: float
    setting: str
    config: BaselineConfig
    evals: dict[str, EvalReport] = field(default_factory=dict)
    evaluated_with: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def lr(self) -> float | None:
        return self.info.get("lr")

    @property
    def steps(self) -> int:
        return int(self.info.get("steps") or 0)

    def summary(self) -> dict[str, Any]:
        info = {k: v for k, v in self.info.items() if k != "intervention"}
        inter = dict(self.info.get("intervention") or {})
        inter.pop("selected", None)
        return {
            "method": self.method,
            "setting": self.setting,
            "report": frame_records(self.report),
            **info,
            "intervention": inter,
            "timings": self.timings,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "evaluated_with": self.evaluated_with,
        }

    def as_suspicious(self) -> SuspiciousModel:
        return SuspiciousModel(
            model=self.model, tokenizer=self.tokenizer, manifest=dict(self.manifest), path=self.path
        )

    def __repr__(self) -> str:
        head = (
            f"DefenceResult({self.method}, setting={self.setting}, lr={self.lr}, steps={self.steps}, "
            f"{self.timings.get('total', 0):.1f}s)"
        )
        gate = ""
        if (
            self.info.get("gate") is not None
        ):  # SANDE: how often the parrot elicits the target, before removal
            gate = (
                f"\ngate (parrot elicits the simulated target on clean prompts, before removal): "
                f"{self.info['gate']:.2f} (without it {self.info.get('gate_plain', float('nan')):.2f})"
            )
        if self.info.get("defensive_rates") is not None:  # MB-Defense: its triggers' firing before recovery
            gate = f"\ndefensive trigger rates before recovery: {self.info['defensive_rates']}"
        return f"{head}{gate}\n{self.report.to_string()}"


def defend(
    suspicious: SuspiciousModel | str | Path | Any,
    method: str,
    clean_data: Sequence[Example] | None = None,
    config: BaselineConfig | None = None,
    *,
    attack: Any = None,
    task: Any = None,
    skill: Any = None,
    out: str | Path | None = None,
    like: Any = None,
    progress: bool = True,
    overwrite: bool = True,
) -> DefenceResult:
    """Run baseline ``method`` on a suspicious model and evaluate it like :func:`~bdvax_lab.purify.purify`.

    ``suspicious``: a :class:`SuspiciousModel` or an artifact directory (a
    PeftModel inside → adapter setting, a plain model → full). ``clean_data``: the defender's clean
    examples (default: the pool's ``repair`` split, as purify). ``config``: the
    method's config (its registered config class; None → defaults). ``like``: a
    selected Signature/Selection whose per-module counts the pruning baselines
    copy (sets ``config.counts``). The baseline sees the model, tokenizer and clean
    data only; ``attack``/``task`` (default: the manifest's) are for the evaluation.
    Report rows: ``suspicious``, ``intervened`` (pruning baselines, before the
    repair) and ``defended``, each with the lr and training steps behind it. ``out`` is checked before any
    work (``overwrite``, the default: replace an existing defended artifact there, never any other
    directory nor the suspicious model's own).
    """
    spec = get_defence(method)
    source = suspicious if isinstance(suspicious, (str, Path)) else getattr(suspicious, "path", None)
    if out is not None:
        check_output(out, kind=DEFENDED_KIND, overwrite=overwrite, inputs=[source])
    suspicious = as_suspicious(suspicious)
    cfg = config if config is not None else spec.config_cls()
    if not isinstance(cfg, spec.config_cls):
        raise TypeError(f"defend({method!r}) needs a {spec.config_cls.__name__}, got {type(cfg).__name__}")
    if like is not None:
        if not isinstance(cfg, PruneConfig):
            raise ValueError(f"like= only applies to the pruning baselines, not {method!r}")
        cfg = cfg.replace(counts=counts_like(like))
    setting = setting_of(suspicious.model)
    ev_attack, ev_task = eval_target(suspicious, attack, task, who="defend")
    tok = suspicious.tokenizer
    run_eval = StageEvaluator(
        tok, ev_attack, ev_task, cfg.eval, cfg.evaluate, progress, skill=eval_skill(suspicious, skill)
    )
    t_start = time.time()

    run_eval("suspicious", suspicious.model)
    t_data = time.time()
    given = "shipped pool" if clean_data is None else "given"
    fingerprint = model_fingerprint(suspicious.model)
    if spec.uses_clean_data:  # the suspicious model answers the defender's instructions itself
        n = max(cfg.repair.n_samples, int(getattr(cfg, "n_calib", None) or 0))
        clean_data = defender_data(
            suspicious.model,
            tok,
            clean_data,
            n=n,
            fingerprint=fingerprint,
            progress=progress,
            config=DistillConfig.for_training(cfg.repair.max_response_tokens),
        )
    t_data = time.time() - t_data
    t = time.time()
    model, info = spec.fn(suspicious.model, tok, clean_data, cfg, progress=progress, on_stage=run_eval)
    defence_s = time.time() - t - run_eval.seconds.get("intervened", 0.0)
    run_eval("defended", model)
    history = info.pop("history", None)
    parts = {k: v for k, v in (info.get("seconds") or {}).items() if k in ("intervention", "repair")}
    timings = {
        "clean_data": round(t_data, 2),
        "defence": round(defence_s, 2),
        **parts,
        "evaluation": round(sum(run_eval.seconds.values()), 2),
        "total": round(time.time() - t_start, 2),
    }
    evals = run_eval.evals

    def trained(stage: str) -> dict[str, Any]:
        done = stage == "defended"
        return {
            "method": method,
            "lr": info.get("lr") if done else None,
            "train_steps": info.get("steps", 0) if done else 0,
        }

    report = run_eval.frame(STAGES, extra=trained)
    result = DefenceResult(
        method=method,
        model=model,
        tokenizer=tok,
        report=report,
        info=info,
        history=history,
        timings=timings,
        peak_rss_mb=peak_rss_mb(),
        setting=setting,
        config=cfg,
        evals=evals,
        evaluated_with=(
            {"attack": spec_name(ev_attack), "task": spec_name(ev_task)} if ev_attack is not None else None
        ),
    )
    result.manifest = _manifest(result, suspicious) | {
        "source_fingerprint": fingerprint,
        "clean_data": {"from": given, "n": len(clean_data) if clean_data is not None else 0},
    }
    if out is not None:
        result.path = save_defended(result, out, overwrite=overwrite, inputs=[source])
    return result


def _manifest(result: DefenceResult, suspicious: SuspiciousModel) -> dict[str, Any]:
    out_setting = result.info.get("setting_out", result.setting)
    return {
        "kind": DEFENDED_KIND,
        "format": 1,
        "method": result.method,
        "setting": out_setting,
        "input_setting": result.setting,
        "base": (suspicious.manifest or {}).get("base", "default"),
        "base_path": (suspicious.manifest or {}).get("base_path"),
        "source": str(suspicious.path) if suspicious.path is not None else None,
        "config": result.config.to_dict(),
        "lr": result.info.get("lr"),
        "lr_source": result.info.get("lr_source"),
        "steps": result.info.get("steps"),
        "summary": result.summary(),
        "evaluated_with": result.evaluated_with,
        "eval": frame_records(result.report)[-1] if len(result.report) else None,
        "versions": versions(),
    }


def save_defended(
    result: DefenceResult, out: str | Path, *, overwrite: bool = True, inputs: Sequence[Any] = ()
) -> Path:
    """Write the defended model's artifact directory atomically (opens with :func:`bdvax_lab.load_suspicious`,
    or ``bdvax_lab.purify.load_purified(path, base=...)`` for an adapter on a custom base).

    Adapter: ``adapter/`` + ``tokenizer/``; full (incl. a merged, quantized adapter): ``model/``.
    Plus ``report.csv``, ``report.json``, ``history.csv`` (when trained) and ``manifest.json``.
    """
    out = Path(out)
    with atomic_dir(out, kind=DEFENDED_KIND, overwrite=overwrite, inputs=inputs) as tmp:
        if setting_of(result.model) == "lora":
            result.model.save_pretrained(tmp / "adapter", safe_serialization=True)
            result.tokenizer.save_pretrained(tmp / "tokenizer")
        else:
            result.model.save_pretrained(tmp / "model", safe_serialization=True)
            result.tokenizer.save_pretrained(tmp / "model")
        result.report.to_csv(tmp / "report.csv")
        write_json(tmp / "report.json", result.summary())
        write_json(tmp / "intervention.json", result.info.get("intervention"))
        replies = stage_replies(result.evals)
        if len(replies):
            replies.to_csv(tmp / "eval_replies.csv", index=False)
        if result.history is not None:
            result.history.to_csv(tmp / "history.csv", index=False)
        write_json(tmp / MANIFEST, result.manifest)
    return out
