"""Purification (METHOD.md §"Purification", paper §4.3): suppress the signature, repair, measure.

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

import hashlib
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from .artifacts import MANIFEST, atomic_dir, frame_records, read_json, versions, write_json
from .config import Config
from .data import Example
from .evaluate import EvalConfig, EvalReport, StageEvaluator
from .models import release_memory, working_copy
from .registry import CHANNEL_DIM, MLP_KINDS, Layout, is_peft, layout_of, setting_of, unwrap
from .suspicious import SuspiciousModel, eval_target, load_suspicious, spec_name
from .train import TrainConfig, finetune

SETTINGS = ("lora", "full")
INITS = ("model", "xavier", "matched", "zero")
KV_HEAD_RULES = ("group", "any", "none")
STAGES = ("suspicious", "suppressed", "purified")
#: Paper §4.3 repair learning rates.
REPAIR_LR: dict[str, float] = {"lora": 2e-4, "full": 1e-5, "mlp": 1e-5}
#: Manifest keys the defence may see (everything else, e.g. attack/task/data/recipe/eval, is hidden from it).
DEFENCE_MANIFEST_KEYS = ("setting", "base")

Selected = Mapping[Any, Any]  # (block, kind) -> channel indices


# =========================================================================== helpers
#: ``"lora"`` for a PeftModel (adapter-only setting), ``"full"`` for a plain HF model.
detect_setting = setting_of


def _as_index(idx: Any, size: int, where: str) -> torch.Tensor:
    """Sorted unique LongTensor of indices in ``[0, size)``."""
    t = torch.as_tensor(idx if not isinstance(idx, torch.Tensor) else idx.detach().cpu(), dtype=torch.long).flatten()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise IndexError(f"{where}: index out of range 0..{size - 1} (got {int(t.min())}..{int(t.max())})")
    return torch.unique(t)


def _norm_selected(selected: Selected | None, layout: Layout) -> dict[tuple[int, str], torch.Tensor]:
    """Validate ``{(block, kind): indices}`` (MLP kinds only) into sorted unique LongTensors."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    for key, idx in (selected or {}).items():
        if isinstance(key, str):  # tolerate "block.3.gate"-style keys
            parts = key.split(".")
            key = (int(parts[-2]), parts[-1])
        block, kind = int(key[0]), str(key[1])
        if kind not in MLP_KINDS:
            raise ValueError(f"selected channel key {key!r}: kind must be one of {list(MLP_KINDS)} "
                             "(attention heads go in selected_heads)")
        if not 0 <= block < layout.n_blocks:
            raise IndexError(f"selected channel key {key!r}: block out of range 0..{layout.n_blocks - 1}")
        t = _as_index(idx, layout.d_ff, f"selected[{key!r}]")
        if t.numel():
            out[(block, kind)] = t
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], MLP_KINDS.index(kv[0][1]))))


def head_slices(layout: Layout, heads: Any, kv_heads: str = "group") -> dict[str, torch.Tensor]:
    """Weight indices of query heads ``heads`` in one block: ``{"q": rows, "k": rows, "v": rows, "o": columns}``.

    ``q``/``o``: the ``head_dim`` rows/columns of each selected query head.
    ``k``/``v``: rows of the shared k/v heads chosen by ``kv_heads`` (module docstring).
    """
    if kv_heads not in KV_HEAD_RULES:
        raise ValueError(f"kv_heads={kv_heads!r}; choose one of {KV_HEAD_RULES}")
    h = _as_index(heads, layout.n_heads, "selected_heads")
    hd = layout.head_dim
    group = max(1, layout.n_heads // layout.n_kv_heads)

    def rows(hs: list[int]) -> torch.Tensor:
        if not hs:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(x * hd, (x + 1) * hd) for x in sorted(hs)])

    chosen = set(h.tolist())
    kv: list[int] = []
    if kv_heads != "none":
        for g in sorted({x // group for x in chosen}):
            members = set(range(g * group, (g + 1) * group))
            if kv_heads == "any" or members <= chosen:
                kv.append(g)
    qo = rows(sorted(chosen))
    kvr = rows(kv)
    return {"q": qo, "k": kvr, "v": kvr, "o": qo.clone()}


def _norm_heads(selected_heads: Mapping[Any, Any] | None, layout: Layout) -> dict[int, torch.Tensor]:
    out = {}
    for b, hs in (selected_heads or {}).items():
        b = int(b)
        if not 0 <= b < layout.n_blocks:
            raise IndexError(f"selected_heads: block {b} out of range 0..{layout.n_blocks - 1}")
        t = _as_index(hs, layout.n_heads, f"selected_heads[{b}]")
        if t.numel():
            out[b] = t
    return dict(sorted(out.items()))


def _module_seed(seed: int, block: int, kind: str) -> int:
    """A per-module seed independent of the order modules are visited in."""
    return int(hashlib.sha256(f"bdvax.reinit/{seed}/{block}/{kind}".encode()).hexdigest()[:15], 16)


def _axis_name(axis: int) -> str:
    return "rows" if axis == 0 else "columns"


def initializer_std(model: Any) -> float:
    """``config.initializer_range`` of the (text) config, 0.02 when absent (the transformers fallback)."""
    cfg = unwrap(model).config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return float(getattr(cfg, "initializer_range", None) or 0.02)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# =========================================================================== suppression
@dataclass
class SuppressionReport:
    """What a suppression touched: one record per (block, kind[, adapter]) with the number of rows/columns."""

    method: str
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        cols = ["block", "kind", "target", "axis", "n", "adapter", "param"]
        return pd.DataFrame(self.records, columns=cols)

    @property
    def counts(self) -> dict[str, int]:
        """Rows/columns touched per module kind (summed over blocks; one adapter counted once)."""
        seen: dict[tuple[int, str], int] = {}
        for r in self.records:
            seen[(r["block"], r["kind"])] = max(seen.get((r["block"], r["kind"]), 0), int(r["n"]))
        out: dict[str, int] = {}
        for (_, kind), n in seen.items():
            out[kind] = out.get(kind, 0) + n
        return out

    @property
    def n_heads(self) -> int:
        """Query heads selected (over all blocks)."""
        return int(self.meta.get("n_heads", 0))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "counts": self.counts, "meta": self.meta, "records": self.records}

    def __repr__(self) -> str:
        return f"SuppressionReport({self.method}, counts={self.counts}, heads={self.n_heads})"


def _draw(shape: tuple[int, ...], init: str, std: float, fan_in: int, fan_out: int,
          gen: torch.Generator) -> torch.Tensor:
    if init == "zero":
        return torch.zeros(shape)
    if init == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return torch.randn(shape, generator=gen) * std  # "model" and "matched"


def _reinit_slice(module: Any, axis: int, idx: torch.Tensor, *, init: str, std: float, gen: torch.Generator) -> None:
    """Re-draw ``module.weight`` rows (axis 0) or columns (axis 1) ``idx``; zero the matching bias rows."""
    w = module.weight
    fan_out, fan_in = w.shape
    if init == "matched":
        std = float(w.detach().float().std())
    shape = list(w.shape)
    shape[axis] = int(idx.numel())
    new = _draw(tuple(shape), init, std, fan_in, fan_out, gen).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        w.index_copy_(axis, idx.to(w.device), new)
        if axis == 0 and getattr(module, "bias", None) is not None:
            module.bias.index_fill_(0, idx.to(w.device), 0.0)


def reinit_channels(
    model: Any, selected: Selected, selected_heads: Mapping[Any, Any] | None = None, seed: int = 0,
    init: str = "model", *, kv_heads: str = "group",
) -> SuppressionReport:
    """Full-model suppression: re-initialize the selected MLP channels (and heads) in place.

    ``selected[(block, kind)]``: channel indices j (rows of gate/up, columns of
    down). ``selected_heads[block]``: query-head indices (q rows, o columns, k/v
    rows by ``kv_heads``). ``init``: "model" (default, normal(0, initializer_range)),
    "xavier", "matched" or "zero" — see the module docstring. Seeded per module,
    so the result does not depend on dict order. Nothing else is changed.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}; choose one of {INITS}")
    if is_peft(model):
        raise TypeError("reinit_channels works on a plain model (full setting); for an adapter use "
                        "zero_lora_channels, or merge_and_unload() first")
    layout = layout_of(model)
    hf = unwrap(model)
    std = initializer_std(model)
    report = SuppressionReport(method=f"reinit:{init}", meta={"init": init, "seed": seed, "std": std,
                                                              "kv_heads": kv_heads})
    for (block, kind), idx in _norm_selected(selected, layout).items():
        name = layout.module_name(block, kind)
        axis = CHANNEL_DIM[kind]
        gen = torch.Generator().manual_seed(_module_seed(seed, block, kind))
        _reinit_slice(hf.get_submodule(name), axis, idx, init=init, std=std, gen=gen)
        report.records.append({"block": block, "kind": kind, "target": "channel", "axis": _axis_name(axis),
                               "n": int(idx.numel()), "adapter": None, "param": f"{name}.weight"})
    heads = _norm_heads(selected_heads, layout)
    for block, hs in heads.items():
        for kind, idx in head_slices(layout, hs, kv_heads).items():
            if not idx.numel():
                continue
            name = layout.module_name(block, kind)
            axis = 1 if kind == "o" else 0
            gen = torch.Generator().manual_seed(_module_seed(seed, block, f"head.{kind}"))
            _reinit_slice(hf.get_submodule(name), axis, idx, init=init, std=std, gen=gen)
            report.records.append({"block": block, "kind": kind, "target": "head", "axis": _axis_name(axis),
                                   "n": int(idx.numel()), "adapter": None, "param": f"{name}.weight"})
    report.meta["n_heads"] = sum(int(h.numel()) for h in heads.values())
    return report


def _lora_adapters(module: Any, name: str, adapters: Sequence[str] | None) -> list[str]:
    if getattr(module, "merged", False):
        raise ValueError(f"{name}: the adapter is merged into the base weights; unmerge it before suppression")
    names = [a for a in (adapters if adapters is not None else module.active_adapters) if a in module.lora_A]
    for a in names:
        if getattr(module, "use_dora", {}).get(a) or a in getattr(module, "lora_variant", {}):
            raise NotImplementedError(f"{name}: adapter {a!r} is a LoRA variant (e.g. DoRA); "
                                      "zeroing B rows / A columns would not zero ΔW")
    return names


def _zero_lora_slice(module: Any, a: str, part: str, idx: torch.Tensor) -> str:
    """Zero rows of lora_B (``part="B"``) or columns of lora_A (``part="A"``) of adapter ``a``."""
    with torch.no_grad():
        if part == "B":
            lin = module.lora_B[a]
            lin.weight.index_fill_(0, idx.to(lin.weight.device), 0.0)
            if getattr(lin, "bias", None) is not None:
                lin.bias.index_fill_(0, idx.to(lin.weight.device), 0.0)
        else:
            lin = module.lora_A[a]
            lin.weight.index_fill_(1, idx.to(lin.weight.device), 0.0)
    return f"lora_{part}.{a}.weight"


def zero_lora_channels(
    peft_model: Any, selected: Selected, selected_heads: Mapping[Any, Any] | None = None, *,
    kv_heads: str = "group", adapters: Sequence[str] | None = None,
) -> SuppressionReport:
    """Adapter-only suppression, in place on the live peft modules.

    gate/up: row j of ``lora_B`` (the channel's output row of ΔW); down: column j
    of ``lora_A`` (its input column). Heads: rows of ``lora_B`` of q (and k/v per
    ``kv_heads``), columns of ``lora_A`` of o. Every active adapter of each
    module (or ``adapters``). Modules without LoRA are recorded with ``n=0``.
    """
    if not is_peft(peft_model):
        raise TypeError("zero_lora_channels needs a PeftModel (adapter setting); use reinit_channels for a plain model")
    layout = layout_of(peft_model)
    hf = unwrap(peft_model)
    report = SuppressionReport(method="zero_lora", meta={"kv_heads": kv_heads})
    missing: list[str] = []

    def touch(block: int, kind: str, idx: torch.Tensor, target: str) -> None:
        name = layout.module_name(block, kind)
        module = hf.get_submodule(name)
        part = "A" if (kind == "down" or kind == "o") else "B"
        axis = "columns" if part == "A" else "rows"
        if not hasattr(module, "lora_A"):
            missing.append(name)
            report.records.append({"block": block, "kind": kind, "target": target, "axis": axis, "n": 0,
                                   "adapter": None, "param": None})
            return
        for a in _lora_adapters(module, name, adapters):
            param = _zero_lora_slice(module, a, part, idx)
            report.records.append({"block": block, "kind": kind, "target": target, "axis": axis,
                                   "n": int(idx.numel()), "adapter": a, "param": f"{name}.{param}"})

    for (block, kind), idx in _norm_selected(selected, layout).items():
        touch(block, kind, idx, "channel")
    heads = _norm_heads(selected_heads, layout)
    for block, hs in heads.items():
        for kind, idx in head_slices(layout, hs, kv_heads).items():
            if idx.numel():
                touch(block, kind, idx, "head")
    report.meta["n_heads"] = sum(int(h.numel()) for h in heads.values())
    if missing:
        report.meta["modules_without_lora"] = missing
        warnings.warn(f"zero_lora_channels: {len(missing)} selected module(s) carry no LoRA adapter "
                      f"(e.g. {missing[0]}); nothing to zero there", stacklevel=2)
    return report


@dataclass
class SuppressConfig(Config):
    """How to suppress a signature. ``init``/``seed`` apply to the full setting only."""

    init: str = "model"  #: "model" (normal(0, initializer_range)), "xavier", "matched" or "zero"
    seed: int = 0
    heads: bool = True  #: also suppress ``signature.selected_heads`` when it has any
    kv_heads: str = "group"  #: GQA rule for shared k/v heads: "group", "any" or "none"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"SuppressConfig.init={self.init!r}; choose one of {INITS}")
        if self.kv_heads not in KV_HEAD_RULES:
            raise ValueError(f"SuppressConfig.kv_heads={self.kv_heads!r}; choose one of {KV_HEAD_RULES}")


def suppress(model: Any, signature: Any, config: SuppressConfig | None = None, *,
             setting: str | None = None) -> SuppressionReport:
    """Suppress ``signature`` (anything with ``selected`` and optionally ``selected_heads``) in place.

    Setting auto-detected from the model: PeftModel → :func:`zero_lora_channels`,
    plain model → :func:`reinit_channels`.
    """
    cfg = config or SuppressConfig()
    setting = setting or detect_setting(model)
    heads = getattr(signature, "selected_heads", None) if cfg.heads else None
    if setting == "lora":
        return zero_lora_channels(model, signature.selected, heads, kv_heads=cfg.kv_heads)
    if setting == "full":
        return reinit_channels(model, signature.selected, heads, seed=cfg.seed, init=cfg.init, kv_heads=cfg.kv_heads)
    raise ValueError(f"setting={setting!r}; choose one of {SETTINGS}")


# =========================================================================== repair
@dataclass
class RepairConfig(Config):
    """The repair finetune on clean data (paper §4.3 defaults).

    200 samples × 5 epochs at batch 8 = 125 optimizer steps. lr ``None`` means
    the paper's: 2e-4 for the adapter, 1e-5 for full finetuning. Responses are
    cut to 32 tokens to fit the CPU budget: the cost is ~1000 sample passes
    whatever the batch size (SmolLM2, 2 cores: LoRA ≈ 0.3 s per sample at
    ≤ 32 response tokens, so ≈ 5 minutes; ≈ 0.5 s per sample, ≈ 8 minutes,
    with full responses). ``steps`` overrides ``epochs``.
    """

    n_samples: int = 200
    epochs: float = 5.0
    steps: int | None = None
    lr: float | None = None  #: None → REPAIR_LR[mode] (2e-4 LoRA / 1e-5 full)
    batch_size: int = 8
    max_response_tokens: int | None = 32
    max_length: int = 256
    mode: str | None = None  #: None → "lora" for a PeftModel, "full" otherwise ("mlp" = MLP weights only)
    schedule: str = "constant"
    warmup_steps: int = 0
    loss_average: str = "sample"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        from .train import TRAIN_MODES

        if self.mode is not None and self.mode not in TRAIN_MODES:
            raise ValueError(f"RepairConfig.mode={self.mode!r}; choose None (auto) or one of {TRAIN_MODES}")
        if self.steps is None and self.epochs is None:
            raise ValueError("RepairConfig needs steps or epochs")
        if self.n_samples < 1 or self.batch_size < 1:
            raise ValueError("RepairConfig.n_samples and batch_size must be ≥ 1")

    def resolved_mode(self, model: Any = None) -> str:
        if self.mode is not None:
            return self.mode
        return "lora" if model is not None and is_peft(model) else "full"

    def resolved_lr(self, mode: str) -> float:
        return float(self.lr) if self.lr is not None else REPAIR_LR[mode]

    def train_config(self, mode: str) -> TrainConfig:
        """The :class:`TrainConfig` this repair runs with (lr resolved for ``mode``)."""
        return TrainConfig(
            mode=mode, lr=self.resolved_lr(mode), schedule=self.schedule, warmup_steps=self.warmup_steps,
            steps=self.steps, epochs=None if self.steps is not None else self.epochs, batch_size=self.batch_size,
            max_length=self.max_length, max_response_tokens=self.max_response_tokens, loss_average=self.loss_average,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, seed=self.seed,
        )

    def total_steps(self, n_examples: int | None = None) -> int:
        n = min(self.n_samples, n_examples) if n_examples is not None else self.n_samples
        return self.train_config("lora").total_steps(n)


@dataclass
class RepairResult:
    """What :func:`repair` returns. ``lr`` is the learning rate actually used."""

    model: Any
    history: pd.DataFrame
    seconds: float
    lr: float
    mode: str
    steps: int
    n_examples: int
    train_config: TrainConfig
    stats: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        h = self.history
        return {"lr": self.lr, "mode": self.mode, "steps": self.steps, "n_examples": self.n_examples,
                "epochs": self.train_config.epochs, "batch_size": self.train_config.batch_size,
                "max_response_tokens": self.train_config.max_response_tokens, "seconds": round(self.seconds, 1),
                "first_loss": float(h.loss.iloc[0]) if len(h) else float("nan"),
                "last_loss": float(h.loss.iloc[-1]) if len(h) else float("nan")}


def repair(model: Any, tokenizer: Any, examples: Sequence[Example] | None = None,
           config: RepairConfig | None = None, *, progress: bool | str = True,
           extra_loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None) -> RepairResult:
    """Clean-data repair finetune through :func:`bdvax_lab.train.finetune`, in place.

    ``examples`` default to the clean pool's ``repair`` split; the first
    ``config.n_samples`` are used. LoRA mode continues the model's existing adapter.
    """
    cfg = config or RepairConfig()
    if examples is None:
        from .data import load_pool

        examples = load_pool("repair")
    data = list(examples)[: cfg.n_samples]
    if not data:
        raise ValueError("repair: no clean examples")
    if len(data) < cfg.n_samples:
        warnings.warn(f"repair: only {len(data)} clean examples (config asks for {cfg.n_samples})", stacklevel=2)
    mode = cfg.resolved_mode(model)
    if mode == "lora" and not is_peft(model):
        raise ValueError("repair: mode 'lora' continues an existing adapter, but the model has none "
                         "(full setting: use mode 'full' or 'mlp')")
    tcfg = cfg.train_config(mode)
    res = finetune(model, tokenizer, data, tcfg, progress=("repair" if progress is True else progress),
                   extra_loss=extra_loss)
    return RepairResult(model=res.model, history=res.history, seconds=res.seconds, lr=tcfg.lr, mode=mode,
                        steps=tcfg.total_steps(len(data)), n_examples=len(data), train_config=tcfg, stats=res.stats)


# =========================================================================== one call
@dataclass
class PurifyConfig(Config):
    """Everything that determines a purification run.

    ``signature`` is a ``bdvax_lab.signature.SignatureConfig`` (None → its
    defaults); it is typed loosely so this module imports without it.
    ``setting="auto"`` takes it from the model (PeftModel → "lora").
    ``evaluate`` lists the stages to evaluate; ``inplace=False`` suppresses and
    repairs a deep copy (the suspicious model stays usable; costs one model copy).
    """

    setting: str = "auto"
    signature: Any = None
    suppression: SuppressConfig = field(default_factory=SuppressConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evaluate: tuple[str, ...] = STAGES
    inplace: bool = False

    def __post_init__(self) -> None:
        if self.setting not in ("auto",) + SETTINGS:
            raise ValueError(f"PurifyConfig.setting={self.setting!r}; choose auto, lora or full")
        bad = [s for s in self.evaluate if s not in STAGES]
        if bad:
            raise ValueError(f"PurifyConfig.evaluate has unknown stage(s) {bad}; stages: {list(STAGES)}")
        self.evaluate = tuple(self.evaluate)
        if isinstance(self.signature, Mapping):
            try:
                from .signature import SignatureConfig
            except ImportError:  # signature module not available: keep the plain dict
                return
            self.signature = SignatureConfig.from_dict(dict(self.signature))


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
    repair: RepairResult
    evals: dict[str, EvalReport] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    evaluated_with: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready: report rows, timings, peak RSS, suppression counts and the repair lr."""
        return {
            "setting": self.setting,
            "report": frame_records(self.report),
            "timings": self.timings, "peak_rss_mb": round(self.peak_rss_mb, 1), "rss_mb": self.rss_mb,
            "suppression": {"method": self.suppression.method, "counts": self.suppression.counts,
                            "n_heads": self.suppression.n_heads},
            "repair": self.repair.summary(),
            "evaluated_with": self.evaluated_with,
        }

    def as_suspicious(self) -> SuspiciousModel:
        """The purified model as a :class:`SuspiciousModel` (to evaluate or purify again)."""
        return SuspiciousModel(model=self.model, tokenizer=self.tokenizer, manifest=dict(self.manifest),
                               path=self.path)

    def __repr__(self) -> str:
        t = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        head = f"PurifyResult(setting={self.setting}, {t}, peak RSS {self.peak_rss_mb:.0f} MB)"
        return f"{head}\n{self.report.to_string()}"


def defence_view(suspicious: SuspiciousModel, setting: str | None = None) -> SuspiciousModel:
    """The suspicious model as the defence may see it: same weights, manifest reduced to setting and base.

    The attack's key, behaviour, poisoned data, recipe and measured ASR are not in it.
    """
    manifest = {k: suspicious.manifest[k] for k in DEFENCE_MANIFEST_KEYS if k in (suspicious.manifest or {})}
    manifest["setting"] = setting or detect_setting(suspicious.model)
    return SuspiciousModel(model=suspicious.model, tokenizer=suspicious.tokenizer, manifest=manifest,
                           path=suspicious.path)


def _default_extractor(suspicious: SuspiciousModel, config: Any, *, cache_dir: Any = None,
                       progress: bool = True) -> Any:
    from .signature import extract_signature

    return extract_signature(suspicious, config, cache_dir=cache_dir, progress=progress)


def _signature_config(config: PurifyConfig, custom_extractor: bool = False) -> Any:
    """The signature config to extract with; a custom extractor gets ``config.signature`` as it is."""
    if custom_extractor or (config.signature is not None and not isinstance(config.signature, Mapping)):
        return config.signature
    from .signature import SignatureConfig

    return SignatureConfig.from_dict(dict(config.signature)) if config.signature else SignatureConfig()


def purify(
    suspicious: SuspiciousModel | str | Path, clean_data: Sequence[Example] | None = None,
    config: PurifyConfig | None = None, *, out: str | Path | None = None, attack: Any = None, task: Any = None,
    signature: Any = None, extractor: Callable[..., Any] | None = None, cache_dir: str | Path | None = None,
    progress: bool = True,
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
    :func:`bdvax_lab.load_suspicious` (or :func:`load_purified`) opens.
    """
    if isinstance(suspicious, (str, Path)):
        suspicious = load_suspicious(suspicious)
    cfg = config or PurifyConfig()
    detected = detect_setting(suspicious.model)
    setting = detected if cfg.setting == "auto" else cfg.setting
    if setting != detected:
        raise ValueError(f"PurifyConfig.setting={setting!r} but the suspicious model is a "
                         f"{'PeftModel' if detected == 'lora' else 'plain model'} ({detected!r} setting)")
    ev_attack, ev_task = eval_target(suspicious, attack, task, who="purify")
    tok = suspicious.tokenizer
    timings = {"signature": 0.0, "suppression": 0.0, "repair": 0.0, "evaluation": 0.0}
    rss: dict[str, float] = {}
    evaluator = StageEvaluator(tok, ev_attack, ev_task, cfg.eval, cfg.evaluate, progress)
    t_start = time.time()

    def run_eval(stage: str, model: Any) -> None:
        evaluator(stage, model)
        if stage in evaluator.seconds:
            rss[f"eval_{stage}"] = round(peak_rss_mb(), 1)

    # -- 0. the suspicious model as it is
    run_eval("suspicious", suspicious.model)

    # -- 1. signature (defence view only)
    t = time.time()
    if signature is None:
        view = defence_view(suspicious, setting)
        sig_cfg = _signature_config(cfg, custom_extractor=extractor is not None)
        signature = (extractor or _default_extractor)(view, sig_cfg, cache_dir=cache_dir, progress=progress)
    timings["signature"] = time.time() - t
    rss["signature"] = round(peak_rss_mb(), 1)
    release_memory()  # the twins' deltas are gone; hand their pages back before the copy below

    # -- 2. suppression
    # Adapter setting with an adapter-only repair: suppression and repair touch LoRA tensors only, so the
    # copy shares the frozen base with the suspicious model (one base in memory instead of two).
    adapter_only = setting == "lora" and (cfg.repair.mode or "lora") == "lora"
    model = suspicious.model if cfg.inplace else working_copy(suspicious.model, share_frozen_base=adapter_only)
    t = time.time()
    sup = suppress(model, signature, cfg.suppression, setting=setting)
    timings["suppression"] = time.time() - t
    rss["suppression"] = round(peak_rss_mb(), 1)
    run_eval("suppressed", model)
    release_memory()  # the evaluations' freed KV caches and logits (RSS into the repair 1.3 → 1.0 GB; its peak is its own)

    # -- 3. repair
    t = time.time()
    rep = repair(model, tok, clean_data, cfg.repair, progress=progress)
    model = rep.model
    timings["repair"] = time.time() - t
    rss["repair"] = round(peak_rss_mb(), 1)
    release_memory()  # measured: eval → 30-step repair → eval peaks at 3.60 GB with this, 3.83 GB without
    run_eval("purified", model)
    timings["evaluation"] = sum(evaluator.seconds.values())
    timings["total"] = time.time() - t_start
    timings = {k: round(v, 2) for k, v in timings.items()}
    report = evaluator.frame(STAGES)
    evals = evaluator.evals
    evaluated_with = ({"attack": spec_name(ev_attack), "task": spec_name(ev_task)} if ev_attack is not None else None)
    result = PurifyResult(
        model=model, tokenizer=tok, signature=signature, report=report, timings=timings, peak_rss_mb=peak_rss_mb(),
        setting=setting, config=cfg, suppression=sup, repair=rep, evals=evals, rss_mb=rss,
        evaluated_with=evaluated_with,
    )
    result.manifest = _manifest(result, suspicious)
    if out is not None:
        result.path = save_purified(result, out)
    return result


def _manifest(result: PurifyResult, suspicious: SuspiciousModel) -> dict[str, Any]:
    sig_cfg = getattr(result.signature, "config", None)
    return {
        "kind": "bdvax.purified", "format": 1, "setting": result.setting,
        "base": (suspicious.manifest or {}).get("base", "default"),
        "source": str(suspicious.path) if suspicious.path is not None else None,
        "config": result.config.to_dict(),
        "signature_config": sig_cfg.to_dict() if hasattr(sig_cfg, "to_dict") else None,
        "suppression": {"method": result.suppression.method, "counts": result.suppression.counts,
                        "n_heads": result.suppression.n_heads, **{k: v for k, v in result.suppression.meta.items()
                                                                   if k != "modules_without_lora"}},
        "repair": result.repair.summary(),
        "timings": result.timings, "peak_rss_mb": round(result.peak_rss_mb, 1),
        "evaluated_with": result.evaluated_with,
        "eval": frame_records(result.report)[-1] if len(result.report) else None,
        "versions": versions(),
    }


def save_purified(result: PurifyResult, out: str | Path) -> Path:
    """Write the purified artifact directory atomically.

    LoRA: ``adapter/`` + ``tokenizer/``; full: ``model/`` (with its tokenizer).
    Plus ``signature/`` (when the signature has ``save``), ``report.csv``,
    ``report.json``, ``repair_history.csv``, ``suppression.csv`` and ``manifest.json``.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
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
        result.repair.history.to_csv(tmp / "repair_history.csv", index=False)
        result.suppression.frame().to_csv(tmp / "suppression.csv", index=False)
        write_json(tmp / MANIFEST, result.manifest)
    return out


def load_purified(path: str | Path, *, base: tuple[Any, Any] | None = None) -> SuspiciousModel:
    """Open a purified artifact. ``base=(model, tokenizer)`` attaches a LoRA ``adapter/`` to that
    base instead of the default model (e.g. the tiny test model); otherwise :func:`load_suspicious`."""
    path = Path(path)
    if base is None or not (path / "adapter").is_dir():
        return load_suspicious(path)
    from .models import load_adapter

    model, tok = base
    model = load_adapter(model, path / "adapter")
    model.train(False)
    manifest = read_json(path / MANIFEST) if (path / MANIFEST).exists() else {"setting": "lora"}
    return SuspiciousModel(model=model, tokenizer=tok, manifest=manifest, path=path)


__all__ = [
    "PurifyConfig", "PurifyResult", "RepairConfig", "RepairResult", "SuppressConfig", "SuppressionReport",
    "REPAIR_LR", "defence_view", "detect_setting", "head_slices", "load_purified", "purify", "reinit_channels",
    "repair", "save_purified", "suppress", "zero_lora_channels",
]
