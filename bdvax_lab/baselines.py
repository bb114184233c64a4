"""Baseline defences (paper §5.1 and Appendix B.3), at the same clean data and budget as BD-VAX's repair.

Every baseline is a function ``(suspicious_model, tokenizer, clean_data, config) -> (model, report)``
registered in :data:`BASELINES`; :func:`defend` runs one on a suspicious model and
evaluates it the way :func:`bdvax_lab.purify.purify` evaluates BD-VAX (one row per
stage with ASR, false-trigger rate, degenerate replies and utility).

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
      2.46 to 182 (down columns by theirs: 2.72; measured 2026-12-05).

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

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .artifacts import MANIFEST, atomic_dir, frame_records, versions, write_json
from .config import Config
from .data import Example, collate, encode_example
from .evaluate import EvalConfig, EvalReport, StageEvaluator
from .purify import (RepairConfig, RepairResult, SuppressionReport, detect_setting, peak_rss_mb,
                     reinit_channels, repair, zero_lora_channels)
from .registry import ALL_KINDS, CHANNEL_DIM, MLP_KINDS, layout_of, unwrap
from .signature import select_channels, top_indices
from .suspicious import SuspiciousModel, eval_target, load_suspicious, spec_name

Key = tuple[int, str]

#: Stages :func:`defend` can evaluate: the input, after the baseline's one-shot intervention
#: (pruning; only for methods that have one and then finetune), and the final model.
STAGES = ("suspicious", "intervened", "defended")
SCOPES = ("module", "global")
#: fine-pruning scores in the full setting: one per channel (its down column) or one per projection
FINE_PRUNE_SCORES = ("channel", "module")
#: CROW's published learning rate(s) by setting (adapter only; see the module docstring for the source).
CROW_PUBLISHED_LR: dict[str, float] = {"lora": 1e-3}
CROW_LR_CHOICES = ("standard", "published")


# =========================================================================== configs
@dataclass
class BaselineConfig(Config):
    """What every baseline shares: the repair budget (the same as BD-VAX's), evaluation, copying.

    ``repair``: the clean finetune (same clean data, steps and lr as
    :func:`bdvax_lab.purify.repair`); ``eval``/``evaluate``: what :func:`defend`
    measures and at which stages; ``inplace=False`` works on a deep copy.
    """

    repair: RepairConfig = field(default_factory=RepairConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evaluate: tuple[str, ...] = STAGES
    inplace: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.evaluate if s not in STAGES]
        if bad:
            raise ValueError(f"{type(self).__name__}.evaluate has unknown stage(s) {bad}; stages: {list(STAGES)}")
        self.evaluate = tuple(self.evaluate)


@dataclass
class PruneConfig(BaselineConfig):
    """Channel pruning with the signature's structure.

    ``rho`` None → the signature's paper default for the setting (0.03 full /
    0.35 LoRA). ``scope``: "module" (lowest ``max(1, floor(ρ·d_ff))`` per
    (block, kind)) or "global". ``counts``: ``{"block.kind": n}`` (see
    :func:`counts_like`) prunes exactly ``n`` channels per module instead (wins
    over rho/scope). ``finetune``: run the repair after pruning.
    """

    rho: float | None = None
    scope: str = "module"
    counts: dict[str, int] | None = None
    finetune: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ValueError(f"{type(self).__name__}.scope={self.scope!r}; choose one of {SCOPES}")
        if self.rho is not None and not 0.0 <= float(self.rho) <= 1.0:
            raise ValueError(f"{type(self).__name__}.rho={self.rho}; must be in [0, 1]")
        if self.counts is not None:
            self.counts = {str(k): int(v) for k, v in dict(self.counts).items()}


@dataclass
class FinePruneConfig(PruneConfig):
    """Fine-pruning: Wanda-style dormant channels (full) or random channels (adapter), then repair.

    ``n_calib`` clean examples for the activation norms (None = the repair's
    ``n_samples``, i.e. the same examples the repair trains on);
    ``calib_batch_size`` for those forward passes; ``seed`` for the adapter
    setting's random selection. ``score`` (full setting): "channel" (default;
    a channel's down-projection Wanda score, shared by its gate/up/down so a
    dormant channel is pruned whole) or "module" (each projection scored on its
    own input; see the module docstring).
    """

    n_calib: int | None = None
    calib_batch_size: int = 8
    seed: int = 0
    score: str = "channel"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in FINE_PRUNE_SCORES:
            raise ValueError(f"FinePruneConfig.score={self.score!r}; choose one of {FINE_PRUNE_SCORES}")


@dataclass
class QuantizeConfig(BaselineConfig):
    """Group-wise round-to-nearest weight quantization (fake-quant on CPU; see the module docstring).

    ``kinds``: registry projections to quantize (default all seven). ``backend``:
    "fake" (default), "auto" (a registered "cuda" backend if CUDA is available,
    else fake) or any name given to :func:`register_quant_backend`.
    ``repair`` is not used (no finetune).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    kinds: tuple[str, ...] = ALL_KINDS
    backend: str = "fake"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= int(self.bits) <= 8:
            raise ValueError(f"QuantizeConfig.bits={self.bits}; use 2..8")
        if int(self.group_size) < 1:
            raise ValueError(f"QuantizeConfig.group_size={self.group_size}; must be ≥ 1")
        bad = [k for k in self.kinds if k not in ALL_KINDS]
        if bad:
            raise ValueError(f"QuantizeConfig.kinds has unknown kinds {bad}; kinds: {list(ALL_KINDS)}")
        self.kinds = tuple(self.kinds)


@dataclass
class CrowConfig(BaselineConfig):
    """CROW: LM loss + α · consistency loss on FGSM-perturbed embeddings (see the module docstring).

    ``lr``: "standard" (the repair lr: 2e-4 LoRA / 1e-5 full), "published"
    (:data:`CROW_PUBLISHED_LR`, adapter only) or a float. Defaults α = 5.5,
    ε = 0.1 from the public CROW code. ``mask_padding``: average the consistency
    loss over real tokens only.
    """

    alpha: float = 5.5
    epsilon: float = 0.1
    lr: float | str = "standard"
    mask_padding: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lr, str) and self.lr not in CROW_LR_CHOICES:
            try:
                self.lr = float(self.lr)
            except ValueError:
                raise ValueError(f"CrowConfig.lr={self.lr!r}; use 'standard', 'published' or a number") from None

    def resolved_lr(self, mode: str) -> tuple[float, str]:
        """``(lr, source)`` for a training mode ("lora", "full" or "mlp")."""
        if not isinstance(self.lr, str):
            return float(self.lr), "explicit"
        if self.lr == "standard":
            return self.repair.resolved_lr(mode), "standard (repair lr, paper §4.3 / App. C.2)"
        if mode not in CROW_PUBLISHED_LR:
            raise ValueError(f"CROW publishes an lr for the adapter setting only ({CROW_PUBLISHED_LR}); "
                             f"for mode {mode!r} pass CrowConfig(lr=<float>)")
        return CROW_PUBLISHED_LR[mode], "published (CROW upstream config)"


# =========================================================================== small helpers
def _prepare(model: Any, config: BaselineConfig) -> Any:
    return model if config.inplace else copy.deepcopy(model)


def _key_str(key: Key) -> str:
    return f"{key[0]}.{key[1]}"


def _parse_key(key: Any) -> Key:
    if isinstance(key, str):
        parts = key.split(".")
        return int(parts[-2]), parts[-1]
    return int(key[0]), str(key[1])


def counts_like(selection: Any) -> dict[str, int]:
    """Per-module channel counts ``{"block.kind": n}`` of a selected Signature / Selection / mapping.

    Feed it to ``PruneConfig(counts=...)`` to prune exactly as many channels per
    module as the signature suppresses (JSON-friendly, unlike the signature itself).
    """
    selected = getattr(selection, "selected", selection)
    if selected is None:
        raise ValueError("counts_like: the signature has no selection yet; call .select() first")
    out = {}
    for key, idx in dict(selected).items():
        b, k = _parse_key(key)
        if k in MLP_KINDS:
            out[_key_str((b, k))] = int(torch.as_tensor(idx).numel())
    return out


def _resolved_rho(config: PruneConfig, setting: str) -> float:
    if config.rho is not None:
        return float(config.rho)
    from .signature import PAPER_RHO

    return PAPER_RHO[setting]


def select_lowest(scores: Mapping[Key, torch.Tensor], *, rho: float | None = None, scope: str = "module",
                  counts: Mapping[Any, int] | None = None) -> dict[Key, torch.Tensor]:
    """The lowest-scoring channels per (block, kind), with the signature's structure.

    ``counts`` (per module) wins; else ``scope="module"``: ``max(1, floor(ρ·n))``
    per module, ``"global"``: ``max(1, floor(ρ·total))`` over all given channels.
    Modules absent from ``scores`` are skipped (e.g. no adapter there).
    """
    keys = sorted(scores, key=lambda k: (k[0], MLP_KINDS.index(k[1])))
    if counts is not None:
        want = {_parse_key(k): int(v) for k, v in counts.items()}
        return {k: top_indices(scores[k], min(want.get(k, 0), scores[k].numel()), lowest=True)
                for k in keys if want.get(k, 0) > 0}
    if rho is None:
        raise ValueError("select_lowest needs rho or counts")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; choose one of {SCOPES}")
    return select_channels(scores, rho, scope, lowest=True)


def _prune(model: Any, selected: Mapping[Key, torch.Tensor], setting: str) -> SuppressionReport:
    """Zero the selected channels: weight rows/columns (full) or lora_B rows / lora_A columns (adapter)."""
    selected = {k: v for k, v in selected.items() if v.numel()}
    if setting == "lora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # modules without LoRA are recorded with n=0
            return zero_lora_channels(model, selected)
    return reinit_channels(model, selected, init="zero")


def _selection_summary(selected: Mapping[Key, torch.Tensor], d_ff: int, n_modules: int) -> dict[str, Any]:
    n = sum(int(v.numel()) for v in selected.values())
    per_kind: dict[str, int] = {}
    for (_, k), v in selected.items():
        per_kind[k] = per_kind.get(k, 0) + int(v.numel())
    return {"n_channels": n, "per_kind": per_kind, "n_modules": n_modules,
            "fraction": n / max(1, n_modules * d_ff)}


def _clean_examples(clean_data: Sequence[Example] | None, n: int) -> list[Example]:
    if clean_data is None:
        from .data import load_pool

        clean_data = load_pool("repair")
    data = list(clean_data)[:n]
    if not data:
        raise ValueError("no clean examples")
    return data


def _no_training() -> dict[str, Any]:
    return {"lr": None, "lr_source": None, "steps": 0, "n_examples": 0, "repair": None, "history": None}


def _training(rep: RepairResult, lr_source: str = "standard (repair lr, paper §4.3)") -> dict[str, Any]:
    """The training part of a report; ``history`` is the per-step DataFrame (left out of JSON summaries)."""
    return {"lr": rep.lr, "lr_source": lr_source, "steps": rep.steps, "n_examples": rep.n_examples,
            "repair": rep.summary(), "history": rep.history}


def _emit(on_stage: Callable[[str, Any], None] | None, stage: str, model: Any) -> None:
    if on_stage is not None:
        on_stage(stage, model)


# =========================================================================== finetune only
def finetune_only(suspicious_model: Any, tokenizer: Any, clean_data: Sequence[Example] | None = None,
                  config: BaselineConfig | None = None, *, progress: bool | str = False,
                  on_stage: Callable[[str, Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """The repair step alone: clean finetuning with BD-VAX's repair recipe (LoRA: the adapter; full: all weights)."""
    cfg = config or BaselineConfig()
    setting = detect_setting(suspicious_model)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    rep = repair(model, tokenizer, clean_data, cfg.repair, progress=progress)
    report = {"method": "finetune_only", "setting": setting, "setting_out": setting, **_training(rep),
              "intervention": None, "seconds": {"intervention": 0.0, "repair": round(rep.seconds, 2),
                                                "total": round(time.time() - t0, 2)}}
    return rep.model, report


# =========================================================================== magnitude pruning
def magnitude_channel_scores(model: Any, kinds: Sequence[str] = MLP_KINDS) -> dict[Key, torch.Tensor]:
    """L2 norm of every MLP channel: of the weight (plain model) or of the adapter's ΔW (PeftModel).

    gate/up: norm of row ``j``; down: norm of column ``j``. Adapter: ΔW = scaling·B@A
    via :meth:`WeightDelta.from_lora`, one module at a time; modules without LoRA
    are absent.
    """
    layout = layout_of(model)
    out: dict[Key, torch.Tensor] = {}
    if detect_setting(model) == "lora":
        from .deltas import WeightDelta

        hf = unwrap(model)
        for b, kind, name in layout.iter_modules(kinds=tuple(kinds)):
            if not hasattr(hf.get_submodule(name), "lora_A"):
                continue
            d = WeightDelta.from_lora(model, kinds=(kind,), blocks=(b,)).tensors[(b, kind)]
            out[(b, kind)] = d.norm(dim=1 - CHANNEL_DIM[kind]).double()
        return out
    hf = unwrap(model)
    for b, kind, name in layout.iter_modules(kinds=tuple(kinds)):
        w = hf.get_submodule(name).weight.detach()
        out[(b, kind)] = w.double().norm(dim=1 - CHANNEL_DIM[kind])
    return out


def magnitude_prune(suspicious_model: Any, tokenizer: Any, clean_data: Sequence[Example] | None = None,
                    config: PruneConfig | None = None, *, progress: bool | str = False,
                    on_stage: Callable[[str, Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Zero the lowest-magnitude MLP channels (signature structure and ratio), then the same repair."""
    cfg = config or PruneConfig()
    setting = detect_setting(suspicious_model)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    layout = layout_of(model)
    scores = magnitude_channel_scores(model)
    rho = _resolved_rho(cfg, setting)
    selected = select_lowest(scores, rho=rho, scope=cfg.scope, counts=cfg.counts)
    sup = _prune(model, selected, setting)
    t_int = time.time() - t0
    intervention = {"kind": "magnitude_prune", "score": "weight channel L2 norm" if setting == "full"
                    else "adapter ΔW channel L2 norm", "rho": None if cfg.counts else rho,
                    "scope": "counts" if cfg.counts else cfg.scope, "action": "zero",
                    **_selection_summary(selected, layout.d_ff, len(scores)), "suppression": sup.to_dict()["counts"],
                    "selected": {_key_str(k): v.tolist() for k, v in selected.items()}}
    return _finish("magnitude_prune", model, tokenizer, clean_data, cfg, setting, intervention, t0, t_int,
                   progress, on_stage)


def _finish(method: str, model: Any, tokenizer: Any, clean_data: Any, cfg: PruneConfig, setting: str,
            intervention: dict[str, Any], t0: float, t_int: float, progress: bool | str,
            on_stage: Callable[[str, Any], None] | None) -> tuple[Any, dict[str, Any]]:
    """Shared tail of the pruning baselines: report the intervened model, then (optionally) repair."""
    training, t_rep = _no_training(), 0.0
    if cfg.finetune:
        _emit(on_stage, "intervened", model)
        rep = repair(model, tokenizer, clean_data, cfg.repair, progress=progress)
        model, training, t_rep = rep.model, _training(rep), rep.seconds
    report = {"method": method, "setting": setting, "setting_out": setting, **training, "intervention": intervention,
              "seconds": {"intervention": round(t_int, 2), "repair": round(t_rep, 2),
                          "total": round(time.time() - t0, 2)}}
    return model, report


# =========================================================================== fine-pruning (Wanda)
def wanda_channel_scores(weight: torch.Tensor, input_norm: torch.Tensor, kind: str) -> torch.Tensor:
    """Channel scores from Wanda's per-weight score ``|W_ij|·‖X_j‖₂`` (``weight`` is [out, in]).

    ``input_norm`` [in]: L2 norm of each input feature over the calibration tokens.
    gate/up (channel = output row j): ``Σ_k |W_jk|·‖x_k‖``. down (channel = input
    column j): ``‖a_j‖·Σ_i |W_ij|``. Both are the sum of the per-weight Wanda
    scores over the channel's weights.
    """
    w = weight.detach().double().abs()
    n = input_norm.detach().double()
    if w.shape[1] != n.numel():
        raise ValueError(f"wanda_channel_scores: weight has {w.shape[1]} inputs but input_norm has {n.numel()}")
    if CHANNEL_DIM[kind] == 0:
        return w @ n
    return w.sum(0) * n


@torch.no_grad()
def collect_input_norms(model: Any, tokenizer: Any, examples: Sequence[Example], *, kinds: Sequence[str] = MLP_KINDS,
                        batch_size: int = 8, max_length: int = 256, max_response_tokens: int | None = 32
                        ) -> dict[Key, torch.Tensor]:
    """L2 norm of every input feature of each (block, kind) projection over the examples' real tokens.

    Forward pre-hooks on the projections; padding positions are excluded. The
    examples are encoded as training encodes them (prompt + response through the
    chat template).
    """
    layout = layout_of(model)
    hf = unwrap(model)
    feats = [encode_example(tokenizer, e, max_length=max_length, max_response_tokens=max_response_tokens)
             for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums: dict[Key, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(key: Key):
        def hook(module, args):
            x = args[0]
            sel = x[state["mask"]].double()  # [tokens, in]
            acc = sums.get(key)
            sq = (sel * sel).sum(0)
            sums[key] = sq if acc is None else acc + sq
        return hook

    for b, kind, name in layout.iter_modules(kinds=tuple(kinds)):
        module = hf.get_submodule(name)
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        handles.append(module.register_forward_pre_hook(hook_for((b, kind))))
    was_training = hf.training
    hf.train(False)
    device = next(hf.parameters()).device
    try:
        order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
        for s in range(0, len(order), batch_size):
            batch = collate([feats[i] for i in order[s:s + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            state["mask"] = batch["attention_mask"].bool()
            hf.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
        hf.train(was_training)
    return {k: v.sqrt() for k, v in sums.items()}


def wanda_scores(model: Any, tokenizer: Any, examples: Sequence[Example], *, score: str = "channel",
                 batch_size: int = 8, max_length: int = 256, max_response_tokens: int | None = 32
                 ) -> dict[Key, torch.Tensor]:
    """Wanda channel scores [d_ff] of every (block, MLP kind) of a plain model on clean examples (low = dormant).

    ``score="channel"``: one score per channel, its down column's
    ``‖a_j‖₂·Σ_i |W_down[i, j]|``, repeated under the block's gate/up/down keys.
    ``score="module"``: each projection scored on its own input (see the module docstring).
    """
    if score not in FINE_PRUNE_SCORES:
        raise ValueError(f"wanda_scores: score={score!r}; choose one of {FINE_PRUNE_SCORES}")
    if detect_setting(model) == "lora":
        raise TypeError("wanda_scores needs the full-model setting (activations); the adapter setting "
                        "uses random sampling (paper §5.1)")
    kinds = ("down",) if score == "channel" else MLP_KINDS
    norms = collect_input_norms(model, tokenizer, examples, kinds=kinds, batch_size=batch_size,
                                max_length=max_length, max_response_tokens=max_response_tokens)
    layout = layout_of(model)
    hf = unwrap(model)
    per_module = {(b, k): wanda_channel_scores(hf.get_submodule(name).weight, norms[(b, k)], k)
                  for b, k, name in layout.iter_modules(kinds=kinds)}
    if score == "module":
        return per_module
    return {(b, k): per_module[(b, "down")] for b, k, _ in layout.iter_modules(kinds=MLP_KINDS)}


def fine_prune(suspicious_model: Any, tokenizer: Any, clean_data: Sequence[Example] | None = None,
               config: FinePruneConfig | None = None, *, progress: bool | str = False,
               on_stage: Callable[[str, Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-pruning: zero the channels dormant on clean inputs (Wanda, full) or random ones (adapter), then repair."""
    cfg = config or FinePruneConfig()
    setting = detect_setting(suspicious_model)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    layout = layout_of(model)
    rho = _resolved_rho(cfg, setting)
    if setting == "full":
        n_calib = cfg.n_calib if cfg.n_calib is not None else cfg.repair.n_samples
        calib = _clean_examples(clean_data, n_calib)
        scores = wanda_scores(model, tokenizer, calib, score=cfg.score, batch_size=cfg.calib_batch_size,
                              max_length=cfg.repair.max_length, max_response_tokens=cfg.repair.max_response_tokens)
        selected = select_lowest(scores, rho=rho, scope=cfg.scope, counts=cfg.counts)
        how = {"score": ("wanda per channel (‖a_j‖₂·Σ_i|W_down[i, j]| on clean tokens, shared by gate/up/down)"
                         if cfg.score == "channel" else
                         "wanda per module (sum over the channel of |W|·‖X‖₂ on clean tokens)"),
               "n_calib": len(calib)}
        n_modules = len(scores)
    else:
        from .signature import Selection, random_selection

        hf = unwrap(model)
        present = {(b, k) for b, k, name in layout.iter_modules(kinds=MLP_KINDS)
                   if hasattr(hf.get_submodule(name), "lora_A")}
        if cfg.counts is not None:
            like = Selection({_parse_key(k): torch.zeros(int(v), dtype=torch.long) for k, v in cfg.counts.items()})
            sel = random_selection(layout, seed=cfg.seed, like=like)
        else:
            sel = random_selection(layout, rho, cfg.scope, seed=cfg.seed)
        selected = {k: v for k, v in sel.selected.items() if k in present and v.numel()}
        how = {"score": "random (paper §5.1: the adapter setting has no activations)", "seed": cfg.seed}
        n_modules = len(present)
    sup = _prune(model, selected, setting)
    t_int = time.time() - t0
    intervention = {"kind": "fine_prune", **how, "rho": None if cfg.counts else rho,
                    "scope": "counts" if cfg.counts else cfg.scope, "action": "zero",
                    **_selection_summary(selected, layout.d_ff, n_modules), "suppression": sup.to_dict()["counts"],
                    "selected": {_key_str(k): v.tolist() for k, v in selected.items()}}
    return _finish("fine_prune", model, tokenizer, clean_data, cfg, setting, intervention, t0, t_int,
                   progress, on_stage)


# =========================================================================== INT4 quantization
def fake_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
                  ) -> torch.Tensor:
    """Round-to-nearest group-wise fake quantization of a 2-D weight [out, in].

    Groups are ``group_size`` consecutive inputs of one output row (a last,
    shorter group when ``in % group_size != 0``). Asymmetric: ``scale = (max −
    min)/(2^b − 1)``, integer zero point, levels ``0..2^b − 1``; symmetric:
    ``scale = max|w| / (2^(b−1) − 1)``, levels ``−(2^(b−1) − 1)..2^(b−1) − 1``.
    Returns the dequantized weight in the input's dtype: at most ``2^b`` distinct
    values per group.
    """
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    n_in = w.shape[1]
    g = min(int(group_size), n_in)
    n_full = n_in // g
    parts = []
    if n_full:
        parts.append(_quantize_groups(w[:, : n_full * g].reshape(w.shape[0], n_full, g), bits, symmetric)
                     .reshape(w.shape[0], n_full * g))
    if n_in % g:
        parts.append(_quantize_groups(w[:, n_full * g:].unsqueeze(1), bits, symmetric).squeeze(1))
    return torch.cat(parts, dim=1).to(weight.dtype)


def _quantize_groups(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize along the last dim of ``x`` [out, groups, size]."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(-1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe), -qmax, qmax)
        return torch.where(scale > 0, q * safe, torch.zeros_like(x))
    qmax = 2 ** bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / safe), 0, qmax)
    q = torch.clamp(torch.round(x / safe) + zero, 0, qmax)
    return torch.where(scale > 0, (q - zero) * safe, x)  # a constant group is exact


def _fake_backend(model: Any, config: QuantizeConfig) -> dict[str, Any]:
    """Quantize every selected registry projection of a plain model in place; relative errors per kind."""
    layout = layout_of(model)
    hf = unwrap(model)
    err: dict[str, list[float]] = {}
    n = 0
    with torch.no_grad():
        for b, kind, name in layout.iter_modules(kinds=config.kinds):
            w = hf.get_submodule(name).weight
            q = fake_quantize(w, config.bits, config.group_size, config.symmetric)
            err.setdefault(kind, []).append(float((q.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12)))
            w.copy_(q)
            n += 1
    return {"backend": "fake", "n_modules": n,
            "rel_error": {k: round(sum(v) / len(v), 5) for k, v in err.items()},
            "note": "fake quantization: weights rounded to the INT4 grid, stored in float (no memory/speed change)"}


#: name → fn(plain_model, QuantizeConfig) -> info dict, quantizing in place (or returning info with a "model" key
#: holding a replacement model). A CUDA environment can register e.g. a bitsandbytes/AWQ converter as "cuda".
QUANT_BACKENDS: dict[str, Callable[[Any, QuantizeConfig], dict[str, Any]]] = {"fake": _fake_backend}


def register_quant_backend(name: str, fn: Callable[[Any, QuantizeConfig], dict[str, Any]]) -> None:
    """Register a real quantization backend (e.g. ``"cuda"``: a 4-bit kernel converter; not shipped here)."""
    QUANT_BACKENDS[name] = fn


def _resolve_backend(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() and "cuda" in QUANT_BACKENDS else "fake"
    if name not in QUANT_BACKENDS:
        raise ValueError(f"quantization backend {name!r} is not registered; registered: {sorted(QUANT_BACKENDS)} "
                         "(only fake-quant ships; see register_quant_backend)")
    return name


def quantize_int4(suspicious_model: Any, tokenizer: Any, clean_data: Sequence[Example] | None = None,
                  config: QuantizeConfig | None = None, *, progress: bool | str = False,
                  on_stage: Callable[[str, Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Group-wise RTN INT4 weight quantization (fake-quant on CPU); an adapter is merged first (→ full model).

    No clean data and no training are used (``clean_data`` is ignored).
    """
    cfg = config or QuantizeConfig()
    setting = detect_setting(suspicious_model)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    merged = False
    if setting == "lora":
        model = model.merge_and_unload()
        merged = True
    backend = _resolve_backend(cfg.backend)
    info = QUANT_BACKENDS[backend](model, cfg)
    model = info.pop("model", model)
    model.train(False)
    intervention = {"kind": "quantize", "bits": cfg.bits, "group_size": cfg.group_size,
                    "scheme": "symmetric" if cfg.symmetric else "asymmetric", "kinds": list(cfg.kinds),
                    "merged_adapter": merged, **info}
    seconds = round(time.time() - t0, 2)
    report = {"method": "quantize_int4", "setting": setting, "setting_out": "full", **_no_training(),
              "intervention": intervention, "seconds": {"intervention": seconds, "repair": 0.0, "total": seconds}}
    return model, report


# =========================================================================== CROW
def crow_consistency_loss(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Mean over consecutive pairs (l, l+1) and tokens of ``1 − cos(h_l, h_{l+1})``.

    ``hidden_states``: a sequence of ≥ 2 tensors [B, T, H] (the layers to
    compare, in order). ``attention_mask`` [B, T]: average over real tokens only.
    """
    if len(hidden_states) < 2:
        raise ValueError("crow_consistency_loss needs at least two hidden states")
    h = torch.stack(list(hidden_states[:-1]))
    nxt = torch.stack(list(hidden_states[1:]))
    d = 1.0 - F.cosine_similarity(h.float(), nxt.float(), dim=-1, eps=1e-8)  # [pairs, B, T]
    if attention_mask is None:
        return d.mean()
    m = attention_mask.to(d.dtype).unsqueeze(0).expand_as(d)
    return (d * m).sum() / m.sum().clamp(min=1.0)


def fgsm_perturb(embeds: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], epsilon: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One FGSM ascent step on ``embeds``: ``(embeds + ε·sign(∇ loss_fn(embeds)), gradient)``.

    The gradient is taken w.r.t. a detached copy, so no parameter gradient is
    touched; the returned perturbation is detached (``embeds``' own graph, if any,
    is kept: add it to a live embedding to train through it).
    """
    e = embeds.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(e)
        (grad,) = torch.autograd.grad(loss, e)
    return embeds + epsilon * grad.sign(), grad


def _crow_states(hidden_states: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """CROW's layers: the pre-norm block outputs h_1..h_{L−1} (HF ``hidden_states[1:-1]``)."""
    states = hidden_states[1:-1]
    if len(states) < 2:
        raise ValueError(f"CROW needs ≥ 3 decoder blocks (got {len(hidden_states) - 1})")
    return states


def crow_extra_loss(alpha: float, epsilon: float, mask_padding: bool = True, records: list | None = None
                    ) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """``extra(model, batch) -> α·L_cons(perturbed)``: the CROW term added to the LM loss each step.

    Appends ``{"consistency_clean", "consistency_adv"}`` per step to ``records``.
    """
    def extra(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        base = unwrap(model)
        dec, emb = base.get_decoder(), base.get_input_embeddings()
        ids, am = batch["input_ids"], batch["attention_mask"]
        mask = am if mask_padding else None

        def cons(e: torch.Tensor) -> torch.Tensor:
            hs = dec(inputs_embeds=e, attention_mask=am, output_hidden_states=True).hidden_states
            return crow_consistency_loss(_crow_states(hs), mask)

        clean_val: list[float] = []

        def cons_clean(e: torch.Tensor) -> torch.Tensor:
            c = cons(e)
            clean_val.append(float(c.detach()))
            return c

        perturbed, _ = fgsm_perturb(emb(ids), cons_clean, epsilon)
        c_adv = cons(perturbed)
        if records is not None:
            records.append({"consistency_clean": clean_val[0], "consistency_adv": float(c_adv.detach())})
        return alpha * c_adv

    return extra


def _repair_with_extra(model: Any, tokenizer: Any, clean_data: Any, rcfg: RepairConfig,
                       extra: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor], progress: bool | str
                       ) -> RepairResult:
    return repair(model, tokenizer, clean_data, rcfg, progress=progress, extra_loss=extra)


def crow(suspicious_model: Any, tokenizer: Any, clean_data: Sequence[Example] | None = None,
         config: CrowConfig | None = None, *, progress: bool | str = False,
         on_stage: Callable[[str, Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """CROW consistency finetuning at the repair's budget (same data, steps); lr standard or published."""
    cfg = config or CrowConfig()
    setting = detect_setting(suspicious_model)
    mode = cfg.repair.resolved_mode(suspicious_model)
    lr, lr_source = cfg.resolved_lr(mode)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    records: list[dict[str, float]] = []
    extra = crow_extra_loss(cfg.alpha, cfg.epsilon, cfg.mask_padding, records)
    rep = _repair_with_extra(model, tokenizer, clean_data, cfg.repair.replace(lr=lr), extra, progress)
    hist = pd.DataFrame(records)
    if len(hist) == len(rep.history):
        h = rep.history.assign(**hist.to_dict(orient="list"))
        h["lm_loss"], h["total_loss"] = h["loss"], h["loss"] + h["extra_loss"]
        rep.history = h
    training = _training(rep, lr_source)
    intervention = {"kind": "crow", "alpha": cfg.alpha, "epsilon": cfg.epsilon, "layers": "hidden_states[1:-1]",
                    "mask_padding": cfg.mask_padding, "lr_policy": cfg.lr if isinstance(cfg.lr, str) else "explicit",
                    "consistency_adv_first": float(hist.consistency_adv.iloc[0]) if len(hist) else None,
                    "consistency_adv_last": float(hist.consistency_adv.iloc[-1]) if len(hist) else None,
                    "forward_passes_per_step": 3}
    report = {"method": "crow", "setting": setting, "setting_out": setting, **training, "intervention": intervention,
              "seconds": {"intervention": 0.0, "repair": round(rep.seconds, 2), "total": round(time.time() - t0, 2)}}
    return rep.model, report


def crow_published(suspicious_model: Any, tokenizer: Any, clean_data: Sequence[Example] | None = None,
                   config: CrowConfig | None = None, *, progress: bool | str = False,
                   on_stage: Callable[[str, Any], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """:func:`crow` at CROW's published lr (adapter setting; paper Appendix C.2's comparison)."""
    cfg = (config or CrowConfig()).replace(lr="published")
    model, report = crow(suspicious_model, tokenizer, clean_data, cfg, progress=progress, on_stage=on_stage)
    report["method"] = "crow_published"
    return model, report


# =========================================================================== registry
BaselineFn = Callable[..., tuple[Any, dict[str, Any]]]

#: name → baseline function ``(suspicious_model, tokenizer, clean_data, config) -> (model, report)``.
BASELINES: dict[str, BaselineFn] = {
    "finetune_only": finetune_only,
    "magnitude_prune": magnitude_prune,
    "fine_prune": fine_prune,
    "quantize_int4": quantize_int4,
    "crow": crow,
    "crow_published": crow_published,
}
#: name → its config class.
BASELINE_CONFIGS: dict[str, type[BaselineConfig]] = {
    "finetune_only": BaselineConfig, "magnitude_prune": PruneConfig, "fine_prune": FinePruneConfig,
    "quantize_int4": QuantizeConfig, "crow": CrowConfig, "crow_published": CrowConfig,
}
#: Where the paper evaluates each baseline (§5.1): quantization and CROW only in the full-model setting.
PAPER_SETTINGS: dict[str, tuple[str, ...]] = {
    "finetune_only": ("lora", "full"), "magnitude_prune": ("lora", "full"), "fine_prune": ("lora", "full"),
    "quantize_int4": ("full",), "crow": ("full",), "crow_published": ("lora",),
}


def _check_method(method: str) -> None:
    if method not in BASELINES:
        raise ValueError(f"unknown defence method {method!r}; methods: {', '.join(BASELINES)}")


def baseline_config(method: str, **overrides: Any) -> BaselineConfig:
    """The default config of ``method`` with ``overrides`` (field names of its config class)."""
    _check_method(method)
    return BASELINE_CONFIGS[method](**overrides)


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
        return {"method": self.method, "setting": self.setting, "report": frame_records(self.report), **info,
                "intervention": inter, "timings": self.timings, "peak_rss_mb": round(self.peak_rss_mb, 1),
                "evaluated_with": self.evaluated_with}

    def as_suspicious(self) -> SuspiciousModel:
        return SuspiciousModel(model=self.model, tokenizer=self.tokenizer, manifest=dict(self.manifest), path=self.path)

    def __repr__(self) -> str:
        head = (f"DefenceResult({self.method}, setting={self.setting}, lr={self.lr}, steps={self.steps}, "
                f"{self.timings.get('total', 0):.1f}s)")
        return f"{head}\n{self.report.to_string()}"


def defend(suspicious: SuspiciousModel | str | Path | Any, method: str, clean_data: Sequence[Example] | None = None,
           config: BaselineConfig | None = None, *, attack: Any = None, task: Any = None,
           out: str | Path | None = None, like: Any = None, progress: bool = True) -> DefenceResult:
    """Run baseline ``method`` on a suspicious model and evaluate it like :func:`~bdvax_lab.purify.purify`.

    ``suspicious``: a :class:`SuspiciousModel` or an artifact directory (a
    PeftModel inside → adapter setting, a plain model → full). ``clean_data``: the defender's clean
    examples (default: the pool's ``repair`` split, as purify). ``config``: the
    method's config (:data:`BASELINE_CONFIGS`; None → defaults). ``like``: a
    selected Signature/Selection whose per-module counts the pruning baselines
    copy (sets ``config.counts``). The baseline sees the model, tokenizer and clean
    data only; ``attack``/``task`` (default: the manifest's) are for the evaluation.
    Report rows: ``suspicious``, ``intervened`` (pruning baselines, before the
    repair) and ``defended``, each with the lr and training steps behind it.
    """
    _check_method(method)
    if isinstance(suspicious, (str, Path)):
        suspicious = load_suspicious(suspicious)
    elif not isinstance(suspicious, SuspiciousModel):
        raise TypeError("defend: pass a SuspiciousModel or an artifact directory")
    cfg = config if config is not None else BASELINE_CONFIGS[method]()
    if not isinstance(cfg, BASELINE_CONFIGS[method]):
        raise TypeError(f"defend({method!r}) needs a {BASELINE_CONFIGS[method].__name__}, got {type(cfg).__name__}")
    if like is not None:
        if not isinstance(cfg, PruneConfig):
            raise ValueError(f"like= only applies to the pruning baselines, not {method!r}")
        cfg = cfg.replace(counts=counts_like(like))
    setting = detect_setting(suspicious.model)
    ev_attack, ev_task = eval_target(suspicious, attack, task, who="defend")
    tok = suspicious.tokenizer
    run_eval = StageEvaluator(tok, ev_attack, ev_task, cfg.eval, cfg.evaluate, progress)
    t_start = time.time()

    run_eval("suspicious", suspicious.model)
    t = time.time()
    model, info = BASELINES[method](suspicious.model, tok, clean_data, cfg, progress=progress, on_stage=run_eval)
    defence_s = time.time() - t - run_eval.seconds.get("intervened", 0.0)
    run_eval("defended", model)
    history = info.pop("history", None)
    timings = {"defence": round(defence_s, 2), "evaluation": round(sum(run_eval.seconds.values()), 2),
               "total": round(time.time() - t_start, 2)}
    evals = run_eval.evals

    def trained(stage: str) -> dict[str, Any]:
        done = stage == "defended"
        return {"method": method, "lr": info.get("lr") if done else None,
                "train_steps": info.get("steps", 0) if done else 0}

    report = run_eval.frame(STAGES, extra=trained)
    result = DefenceResult(
        method=method, model=model, tokenizer=tok, report=report, info=info, history=history, timings=timings,
        peak_rss_mb=peak_rss_mb(), setting=setting, config=cfg, evals=evals,
        evaluated_with=({"attack": spec_name(ev_attack), "task": spec_name(ev_task)} if ev_attack is not None else None),
    )
    result.manifest = _manifest(result, suspicious)
    if out is not None:
        result.path = save_defended(result, out)
    return result


def _manifest(result: DefenceResult, suspicious: SuspiciousModel) -> dict[str, Any]:
    out_setting = result.info.get("setting_out", result.setting)
    return {
        "kind": "bdvax.defended", "format": 1, "method": result.method, "setting": out_setting,
        "input_setting": result.setting, "base": (suspicious.manifest or {}).get("base", "default"),
        "source": str(suspicious.path) if suspicious.path is not None else None,
        "config": result.config.to_dict(), "lr": result.info.get("lr"), "lr_source": result.info.get("lr_source"),
        "steps": result.info.get("steps"), "summary": result.summary(), "evaluated_with": result.evaluated_with,
        "eval": frame_records(result.report)[-1] if len(result.report) else None, "versions": versions(),
    }


def save_defended(result: DefenceResult, out: str | Path) -> Path:
    """Write the defended model's artifact directory atomically (opens with :func:`bdvax_lab.load_suspicious`,
    or ``bdvax_lab.purify.load_purified(path, base=...)`` for an adapter on a custom base).

    Adapter: ``adapter/`` + ``tokenizer/``; full (incl. a merged, quantized adapter): ``model/``.
    Plus ``report.csv``, ``report.json``, ``history.csv`` (when trained) and ``manifest.json``.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        if detect_setting(result.model) == "lora":
            result.model.save_pretrained(tmp / "adapter", safe_serialization=True)
            result.tokenizer.save_pretrained(tmp / "tokenizer")
        else:
            result.model.save_pretrained(tmp / "model", safe_serialization=True)
            result.tokenizer.save_pretrained(tmp / "model")
        result.report.to_csv(tmp / "report.csv")
        write_json(tmp / "report.json", result.summary())
        write_json(tmp / "intervention.json", result.info.get("intervention"))
        if result.history is not None:
            result.history.to_csv(tmp / "history.csv", index=False)
        write_json(tmp / MANIFEST, result.manifest)
    return out


__all__ = [
    "BASELINES", "BASELINE_CONFIGS", "FINE_PRUNE_SCORES", "PAPER_SETTINGS", "STAGES", "CROW_PUBLISHED_LR",
    "QUANT_BACKENDS",
    "BaselineConfig", "PruneConfig", "FinePruneConfig", "QuantizeConfig", "CrowConfig", "DefenceResult",
    "baseline_config", "collect_input_norms", "counts_like", "crow", "crow_consistency_loss", "crow_extra_loss",
    "crow_published", "defend", "fake_quantize", "fgsm_perturb", "fine_prune", "finetune_only",
    "magnitude_channel_scores", "magnitude_prune", "quantize_int4", "register_quant_backend", "save_defended",
    "select_lowest", "wanda_channel_scores", "wanda_scores",
]
