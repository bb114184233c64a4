"""A plan for big models, by arithmetic (torch-free): FLOPs, memory, twin-cache size and wall time per stage.

Nothing here loads a model. From a Hugging Face ``config.json`` (sizes only) and the pipeline's configs
(:class:`SignatureConfig`, :class:`RepairConfig`, :class:`EvalConfig`, read by
:meth:`PlanConfig.from_pipeline`) :func:`plan` returns one row per stage of ``docs/method.md``: the
twins (2N finetunes), the scores, the repair and the evaluation of the three stages (suspicious,
suppressed, purified). ``bdvax plan`` prints it; ``docs/scaling.md`` has the table for 7-13B models.

Approximations (each stated where it is used):

- **Parameters.** Per block: q, k, v, o (grouped-query k and v are ``n_kv_heads·head_dim`` high), the gated
  MLP's gate, up and down, two norm vectors; then the embedding, the final norm and an LM head unless tied.
  Biases only when the config says ``attention_bias`` / ``mlp_bias``.
- **Training FLOPs** for ``T`` tokens, with ``P`` the matmul weights a token passes (blocks; the LM head on
  the labelled tokens only, as the loop computes logits there only; the embedding is a lookup):
  full finetune ≈ ``6·P·T`` (forward ``2PT``, backward ``4PT``: input and weight gradients); LoRA ≈
  ``4·P·T`` (forward ``2PT``, backward through the frozen weights' activations ``2PT``, no weight
  gradients) plus ``6·P_lora·T`` for the adapters. Attention scores add ``2·L·s·d_attn`` per token forward
  (``QKᵀ`` and ``AV``, halved by the causal mask), three times that with the backward. Gradient
  checkpointing adds one more forward.
- **Generation FLOPs**: prefill ``2·P·prompt`` (logits of the last position only); each new token
  ``2·P + 2·V·h`` plus ``4·L·ctx·d_attn`` of attention over the KV cache. Perplexity and MCQ items are
  forward passes; skill items are generated like the ASR prompts.
- **Memory** per replica: weights at the dtype; LoRA parameters, gradients and Adam's two moments in fp32
  (16 bytes a parameter); the full setting adds gradients at the dtype, Adam's moments and (below fp32) an
  fp32 master copy (the ZeRO paper's 16 bytes a parameter in bf16). Activations per token and block
  ``≈ 6h + 2·kv_dim + 4·d_ff`` values (norm inputs and outputs, q/k/v, attention output, residual, gate, up,
  act(gate), the product; fused attention, no ``s²`` score matrix), plus fp32 logits and their gradient on
  the labelled tokens; with checkpointing, one ``h`` per token and block plus one block's full set. KV
  cache: ``2·L·kv_dim`` values per token of the generation batch.
- **Wall time** on ``K`` GPUs: FLOPs / (GPUs used × peak × MFU). A replica that does not fit in ``gpu_mem``
  is sharded over the fewest GPUs that hold it (weights, gradients and optimizer state split, activations
  not; ideal scaling). The twins are 2N independent jobs and data-parallel up to one GPU a sample; the
  repair is one job, data-parallel up to its batch; the evaluation splits its prompts over replicas; the
  scores run on one device. With ``cpu_gflops`` the plan is for one CPU with that throughput (RAM unbounded).
  Optionally decoding is floored by reading the weights once per step (``gpu_bandwidth_gbs``).
- **Twin cache** per variant: dense ``Σ d_out·d_in·4`` bytes over the targeted modules of every block (fp32
  deltas); factored (adapter setting) ``Σ 2r·(d_out + d_in)·4`` bytes (the rank-2r factors).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.registry import ALL_KINDS, MLP_KINDS, SETTINGS
from .config import (
    AUTO_RHO,
    DEFAULT_HEAD_SHARES,
    DEFAULT_PURIFY_RHO,
    CalibrationConfig,
    SignatureConfig,
    default_twin_train,
)

if TYPE_CHECKING:
    import pandas as pd

    from ..threat.config import EvalConfig
    from ..training.config import RepairConfig

GB = 1e9

#: configs shipped in ``bdvax_lab/data/configs/`` (written from the published sizes)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "data" / "configs"

#: tokens per step of ``benchmarks/machine_speed.py``'s reference workload (SmolLM2, LoRA r = 8, batch 4,
#: responses ≤ 16 tokens): ``tokens_per_s × s_per_step`` of the short LoRA recipes in results/train_speed.json
REFERENCE_STEP_TOKENS = 467
#: of which labelled (response) tokens, about 16 a sample
REFERENCE_STEP_LABELLED = 64

#: SmolLM2-135M(-Instruct), the default model, from its published sizes
SMOLLM2_135M: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def shipped_configs() -> list[str]:
    """Names accepted by ``--config`` besides a path (the files of :data:`CONFIG_DIR`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


# =========================================================================== model sizes
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that the arithmetic needs."""

    hidden: int
    d_ff: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    attn_bias: bool = False
    mlp_bias: bool = False
    name: str = "model"

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config") -> ModelShape:
        """From a config.json dict; a bad or missing field is a ``ValueError`` naming ``source`` and it."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: not a JSON object")
        if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]  # a multimodal wrapper: the decoder's sizes

        def integer(key: str, default: Any = None) -> int:
            value = config.get(key)
            value = default if value is None else value  # an explicit null (head_dim: null) is the default
            if value is None:
                raise ValueError(f"{source}: field {key!r} is missing")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
            return value

        def flag(key: str, default: bool) -> bool:
            value = config.get(key, default)
            if not isinstance(value, bool):
                raise ValueError(f"{source}: field {key!r} must be true or false, got {value!r}")
            return value

        hidden, heads = integer("hidden_size"), integer("num_attention_heads")
        kv = integer("num_key_value_heads", heads)
        if heads % kv:
            raise ValueError(
                f"{source}: field 'num_key_value_heads' ({kv}) must divide num_attention_heads ({heads})"
            )
        if config.get("head_dim") is None and hidden % heads:
            raise ValueError(
                f"{source}: field 'num_attention_heads' ({heads}) must divide hidden_size ({hidden}) "
                "when there is no head_dim"
            )
        return cls(
            hidden=hidden,
            d_ff=integer("intermediate_size"),
            n_layers=integer("num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=integer("head_dim", hidden // heads),
            vocab=integer("vocab_size"),
            tied=flag("tie_word_embeddings", False),
            attn_bias=flag("attention_bias", False),
            mlp_bias=flag("mlp_bias", False),
            name=str(config.get("_name_or_path") or source),
        )

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``kind → (d_out, d_in)`` of one block's projections."""
        h, a, kv, f = self.hidden, self.attn_dim, self.kv_dim, self.d_ff
        return {
            "q": (a, h),
            "k": (kv, h),
            "v": (kv, h),
            "o": (h, a),
            "gate": (f, h),
            "up": (f, h),
            "down": (h, f),
        }

    def block_matmul_params(self, kinds: tuple[str, ...] = ALL_KINDS) -> int:
        return sum(o * i for k, (o, i) in self.module_shapes().items() if k in kinds)

    @property
    def block_params(self) -> int:
        bias = (self.attn_dim + 2 * self.kv_dim) * self.attn_bias + (
            2 * self.d_ff + self.hidden
        ) * self.mlp_bias
        return self.block_matmul_params() + bias + 2 * self.hidden  # + the two norms

    @property
    def params(self) -> int:
        """Every parameter: blocks, embedding, final norm, and an untied LM head."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.n_layers * self.block_params + self.vocab * self.hidden + self.hidden + head

    @property
    def body_params(self) -> int:
        """Matmul weights a token passes in the blocks (the LM head is counted where logits are taken)."""
        return self.n_layers * self.block_matmul_params()

    def lora_params(self, r: int, kinds: tuple[str, ...]) -> int:
        return self.n_layers * sum(r * (o + i) for k, (o, i) in self.module_shapes().items() if k in kinds)

    def cache_bytes(self, kinds: tuple[str, ...], r: int | None = None) -> int:
        """Twin-cache bytes of one variant: dense fp32 deltas, or (``r``) the rank-2r fp32 factors."""
        shapes = [s for k, s in self.module_shapes().items() if k in kinds]
        per_block = sum(o * i if r is None else 2 * r * (o + i) for o, i in shapes)
        return 4 * self.n_layers * per_block


def read_config(config: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``(config dict, its name)`` from a dict, a config.json path or a shipped name (``llama-2-7b``)."""
    if isinstance(config, Mapping):
        return dict(config), "config"
    path = Path(config)
    if not path.exists() and str(config) in shipped_configs():
        path = CONFIG_DIR / f"{config}.json"
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{config}: no such config.json, and not a shipped config ({', '.join(shipped_configs())})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data, str(path)


# =========================================================================== workload
@dataclass(frozen=True)
class PlanConfig:
    """The pipeline's workload in numbers (defaults: :meth:`from_pipeline` of the default configs)."""

    setting: str = "lora"
    n_variants: int = 6
    twin_steps: int = 60  #: poisoned twin
    clean_steps: int = 30  #: clean twin (same epochs over the smaller D_c)
    twin_batch: int = 4
    twin_response_tokens: int = 16
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ALL_KINDS
    prompt_tokens: int = (
        100  #: instruction + template tokens a sample (results/train_speed.json: ~117 in all)
    )
    max_length: int = 256
    repair_samples: int = 200
    repair_epochs: float = 5.0
    repair_batch: int = 8
    repair_response_tokens: int = 32
    eval_stages: int = 3
    eval_prompts: int = 50  #: each with and without the key
    eval_new_tokens: int = 32
    eval_batch: int = 50
    n_ppl: int = 100
    ppl_tokens: int = 64
    n_text: int = 100  #: held-out paragraphs of ``ppl_text`` (measured with ``ppl``)
    text_tokens: int = 128
    n_mcq: int = 200
    n_skill: int = 200
    #: leave-one-variant-out points per held-out variant (``rho="auto"``): 1 + |ρ grid| × |head budgets|;
    #: 0 = a fixed ρ, no calibration
    calibration_curve: int = 0
    calibration_prompts: int = 16  #: triggered replies a point generates
    calibration_new_tokens: int = 12
    calibration_forwards: int = 32  #: teacher-forced sequences a point scores (reference replies + answers)
    calibration_tokens: int = 48
    dtype_bytes: int = 2
    gradient_checkpointing: bool = False
    labelled_logits_only: bool = True

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"setting={self.setting!r}; choose one of {SETTINGS}")
        if self.dtype_bytes not in (2, 4):
            raise ValueError(f"dtype_bytes must be 2 or 4, got {self.dtype_bytes}")

    @classmethod
    def from_pipeline(
        cls,
        setting: str = "lora",
        signature: SignatureConfig | None = None,
        repair: RepairConfig | None = None,
        eval: EvalConfig | None = None,
        calibration: CalibrationConfig | None = None,
        **overrides: Any,
    ) -> PlanConfig:
        """The numbers of the real configs (their defaults when None, as ``bdvax purify`` has them: a
        calibrated budget), then ``overrides``."""
        from ..threat.config import N_GENERAL_TEXT, TEXT_PPL_TOKENS, EvalConfig
        from ..training.config import RepairConfig

        sig = signature or SignatureConfig(rho=DEFAULT_PURIFY_RHO)
        cal = calibration or CalibrationConfig()
        budgets = len(cal.heads) if cal.heads is not None else len(DEFAULT_HEAD_SHARES)
        curve = 1 + len(cal.grid(setting)) * budgets if sig.rho == AUTO_RHO else 0
        rep, ev = repair or RepairConfig(), eval or EvalConfig()
        twin = sig.twin_train or default_twin_train(setting)
        steps = twin.steps or 60
        clean = sig.clean_steps or max(1, math.floor(steps * (1 - sig.poison_ratio) + 0.5))
        utility = set(ev.utility)
        values = dict(
            setting=setting,
            n_variants=sig.n_variants,
            twin_steps=steps,
            clean_steps=clean,
            twin_batch=twin.batch_size,
            twin_response_tokens=twin.max_response_tokens or 64,
            lora_r=twin.lora_r,
            lora_targets=tuple(twin.target_kinds),
            max_length=twin.max_length,
            repair_samples=rep.n_samples,
            repair_epochs=float(
                rep.epochs if rep.steps is None else rep.steps * rep.batch_size / rep.n_samples
            ),
            repair_batch=rep.batch_size,
            repair_response_tokens=rep.max_response_tokens or 64,
            eval_prompts=ev.n_prompts,
            eval_new_tokens=ev.max_new_tokens,
            eval_batch=ev.batch_size,
            n_ppl=ev.n_ppl if "ppl" in utility else 0,
            ppl_tokens=ev.ppl_max_tokens,
            n_text=(N_GENERAL_TEXT if ev.n_text is None else ev.n_text) if "ppl" in utility else 0,
            text_tokens=TEXT_PPL_TOKENS,
            n_mcq=(ev.mcq_limit or 375) if "mcq" in utility else 0,
            n_skill=(ev.n_skill or 200) if "skill" in utility else 0,
            calibration_curve=curve,
            calibration_prompts=cal.n_prompts,
            calibration_new_tokens=cal.max_new_tokens,
            calibration_forwards=cal.n_reference + cal.n_ppl,
            calibration_tokens=cal.ppl_max_tokens,
        )
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Hardware:
    """Where the plan runs: ``gpus`` GPUs of ``gpu_mem_gb`` and ``gpu_tflops`` peak, or one CPU."""

    gpus: int = 1
    gpu_mem_gb: float = 80.0
    gpu_tflops: float = 312.0  #: A100 bf16 dense peak
    train_mfu: float = 0.35
    gen_mfu: float = 0.15
    cpu_gflops: float | None = None  #: a CPU plan: its throughput (replaces the GPUs)
    gpu_bandwidth_gbs: float | None = None  #: memory bandwidth: floor decoding at one weight read a step

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus must be ≥ 1, got {self.gpus}")
        for name in ("gpu_mem_gb", "gpu_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("train_mfu", "gen_mfu"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    @property
    def cpu(self) -> bool:
        return self.cpu_gflops is not None

    @property
    def peak_flops(self) -> float:
        return self.cpu_gflops * 1e9 if self.cpu else self.gpu_tflops * 1e12

    @property
    def devices(self) -> int:
        return 1 if self.cpu else self.gpus


# =========================================================================== arithmetic
def train_flops(m: ModelShape, w: PlanConfig, samples: float, response_tokens: int) -> float:
    """FLOPs of finetuning on ``samples`` samples of ``prompt_tokens + response_tokens`` tokens.

    Full: ``6·P·T``; LoRA: ``4·P·T + 6·P_lora·T``; attention and checkpointing as the module docstring says.
    """
    s = min(w.max_length, w.prompt_tokens + response_tokens)
    tokens, labelled = samples * s, samples * min(s, response_tokens)
    logit_tokens = labelled if w.labelled_logits_only else tokens
    matmul = 2 * m.body_params * tokens + 2 * m.vocab * m.hidden * logit_tokens
    attn = 2 * m.n_layers * s * m.attn_dim * tokens
    adapter = 2 * m.lora_params(w.lora_r, w.lora_targets) * tokens if w.setting == "lora" else 0.0
    recompute = matmul + attn + adapter if w.gradient_checkpointing else 0.0
    if w.setting == "full":
        return 3 * (matmul + attn) + recompute
    return 2 * matmul + 3 * attn + 3 * adapter + recompute


def _forward_flops(m: ModelShape, w: PlanConfig, tokens: int, logit_tokens: int) -> float:
    adapter = m.lora_params(w.lora_r, w.lora_targets) if w.setting == "lora" else 0
    return (
        2 * (m.body_params + adapter) * tokens
        + 2 * m.vocab * m.hidden * logit_tokens
        + (2 * m.n_layers * tokens * m.attn_dim * tokens)
    )


def generate_flops(m: ModelShape, w: PlanConfig, prompt: int, new: int) -> float:
    """FLOPs of one greedy reply: prefill, then ``new`` decoding steps over the KV cache."""
    adapter = m.lora_params(w.lora_r, w.lora_targets) if w.setting == "lora" else 0
    per_token = 2 * (m.body_params + adapter) + 2 * m.vocab * m.hidden
    ctx = new * prompt + new * (new - 1) / 2  # Σ context lengths over the decoding steps
    return _forward_flops(m, w, prompt, 1) + new * per_token + 4 * m.n_layers * m.attn_dim * ctx


def eval_flops(m: ModelShape, w: PlanConfig) -> tuple[float, int, int]:
    """``(FLOPs, replies, decoding steps)`` of evaluating one stage."""
    replies = 2 * w.eval_prompts + w.n_skill
    flops = replies * generate_flops(m, w, w.prompt_tokens, w.eval_new_tokens)
    flops += w.n_ppl * _forward_flops(m, w, w.prompt_tokens + w.ppl_tokens, w.ppl_tokens)
    flops += w.n_text * _forward_flops(m, w, w.prompt_tokens + w.text_tokens, w.text_tokens)
    flops += w.n_mcq * _forward_flops(m, w, w.prompt_tokens, 1)
    steps = math.ceil(replies / w.eval_batch) * w.eval_new_tokens
    return flops, replies, steps


def _activation_bytes(m: ModelShape, w: PlanConfig, batch: int, response_tokens: int) -> float:
    s = min(w.max_length, w.prompt_tokens + response_tokens)
    per_block = 6 * m.hidden + 2 * m.kv_dim + 4 * m.d_ff
    if w.gradient_checkpointing:
        values = batch * s * (m.n_layers * m.hidden + per_block)
    else:
        values = batch * s * m.n_layers * per_block
    logit_tokens = batch * (min(s, response_tokens) if w.labelled_logits_only else s)
    return values * w.dtype_bytes + logit_tokens * m.vocab * 4 * 2


def _state_parts(m: ModelShape, w: PlanConfig, train: bool) -> dict[str, float]:
    lora = m.lora_params(w.lora_r, w.lora_targets) if w.setting == "lora" else 0
    parts = {
        "weights_gb": m.params * w.dtype_bytes / GB,
        "lora_gb": 0.0,
        "grads_gb": 0.0,
        "optimizer_gb": 0.0,
    }
    if w.setting == "lora":
        parts["lora_gb"] = lora * (16 if train else w.dtype_bytes) / GB  # params, grads, Adam m and v (fp32)
    elif train:
        parts["grads_gb"] = m.params * w.dtype_bytes / GB
        parts["optimizer_gb"] = m.params * (8 + (4 if w.dtype_bytes < 4 else 0)) / GB
    return parts


def _place(states_gb: float, other_gb: float, hw: Hardware, jobs_cap: int, mfu: float, flops: float) -> dict:
    """Shard a replica over the fewest GPUs that hold it, use as many replicas as the work allows."""
    if hw.cpu:
        shard, fits = 1, True
    else:
        shard = next((g for g in range(1, hw.gpus + 1) if states_gb / g + other_gb <= hw.gpu_mem_gb), None)
        fits = shard is not None
        shard = shard or hw.gpus
    used = min((hw.devices // shard) * shard, max(1, jobs_cap) * shard)
    per_device = states_gb / shard + other_gb
    return {
        "shard": shard,
        "devices_used": used,
        "per_device_gb": per_device,
        "cluster_gb": per_device * used,
        "fits": fits,
        "seconds": flops / (used * hw.peak_flops * mfu),
    }


def plan(
    config: str | Path | Mapping[str, Any],
    work: PlanConfig | None = None,
    hardware: Hardware | None = None,
    *,
    name: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``(table, summary)``: one row per stage (FLOPs, memory parts in GB, placement, seconds) and totals.

    ``config`` is a config.json dict, path or shipped name; ``work`` defaults to
    :meth:`PlanConfig.from_pipeline`, ``hardware`` to one A100-80GB; ``name`` names a dict ``config`` in
    errors and in the summary (its file, say).
    """
    import pandas as pd

    data, source = read_config(config)
    source = name or source
    m = ModelShape.from_hf(data, source)
    w = work or PlanConfig.from_pipeline()
    hw = hardware or Hardware()
    rows: list[dict[str, Any]] = []

    def add(stage: str, jobs: int, flops: float, parts: dict[str, float], mfu: float, cap: int) -> dict:
        states = parts["weights_gb"] + parts["lora_gb"] + parts["grads_gb"] + parts["optimizer_gb"]
        other = parts["activations_gb"] + parts["kv_cache_gb"]
        row = {
            "stage": stage,
            "jobs": jobs,
            "flops": flops,
            **parts,
            **_place(states, other, hw, cap, mfu, flops),
        }
        rows.append(row)
        return row

    zero = {"activations_gb": 0.0, "kv_cache_gb": 0.0}
    # twins: N poisoned + N clean finetunes, independent jobs
    samples = w.n_variants * (w.twin_steps + w.clean_steps) * w.twin_batch
    act = _activation_bytes(m, w, w.twin_batch, w.twin_response_tokens) / GB
    add(
        "twins",
        2 * w.n_variants,
        train_flops(m, w, samples, w.twin_response_tokens),
        {**_state_parts(m, w, True), **zero, "activations_gb": act},
        hw.train_mfu,
        2 * w.n_variants * w.twin_batch,
    )
    # scores: per-channel Gram matrices over the N variants (MLP modules), from the cache
    n, kinds = w.n_variants, MLP_KINDS
    shapes = [s for k, s in m.module_shapes().items() if k in kinds]
    if w.setting == "lora":
        q = 2 * w.lora_r
        score_flops = m.n_layers * sum(
            n * n * 2 * q * q * (o + i) + n * 2 * q * (o + i) * q for o, i in shapes
        )
    else:
        score_flops = m.n_layers * sum(2 * n * n * o * i for o, i in shapes)
    biggest = max(o * i for o, i in shapes) * 4 / GB  # one module of one variant, fp32
    gram = max(m.d_ff, m.hidden) * n * n * 8 / GB
    nothing = {"weights_gb": 0.0, "lora_gb": 0.0, "grads_gb": 0.0, "optimizer_gb": 0.0, **zero}
    add("scores", 1, score_flops, {**nothing, "activations_gb": biggest + gram}, hw.train_mfu, 1)
    # calibration (rho="auto"): per point, the held-out twin's triggered replies and teacher-forced passes
    points = w.n_variants * w.calibration_curve
    if points:
        per_point = w.calibration_prompts * generate_flops(
            m, w, w.prompt_tokens, w.calibration_new_tokens
        ) + w.calibration_forwards * _forward_flops(
            m, w, w.prompt_tokens + w.calibration_tokens, w.calibration_tokens
        )
        kv = (
            2 * m.n_layers * m.kv_dim * w.calibration_prompts
            * (w.prompt_tokens + w.calibration_new_tokens) * w.dtype_bytes / GB
        )  # fmt: skip
        add(
            "calibration",
            points,
            points * per_point,
            {**_state_parts(m, w, False), "activations_gb": w.calibration_prompts * m.vocab * 4 / GB,
             "kv_cache_gb": kv},
            hw.gen_mfu,
            points,
        )  # fmt: skip
    # repair: one finetune of n_samples × epochs sample passes
    rsamples = math.ceil(w.repair_samples * w.repair_epochs / w.repair_batch) * w.repair_batch
    act = _activation_bytes(m, w, w.repair_batch, w.repair_response_tokens) / GB
    add(
        "repair",
        1,
        train_flops(m, w, rsamples, w.repair_response_tokens),
        {**_state_parts(m, w, True), **zero, "activations_gb": act},
        hw.train_mfu,
        w.repair_batch,
    )
    # evaluation of the stages: generation (ASR prompts with and without the key, skill items) + forwards
    flops, replies, decode_steps = eval_flops(m, w)
    kv = 2 * m.n_layers * m.kv_dim * w.eval_batch * (w.prompt_tokens + w.eval_new_tokens) * w.dtype_bytes / GB
    logits = w.eval_batch * m.vocab * 4 / GB
    row = add(
        "evaluation",
        w.eval_stages,
        w.eval_stages * flops,
        {**_state_parts(m, w, False), "activations_gb": logits, "kv_cache_gb": kv},
        hw.gen_mfu,
        w.eval_stages * math.ceil(replies / w.eval_batch),
    )
    if hw.gpu_bandwidth_gbs and not hw.cpu:
        replicas = max(1, row["devices_used"] // row["shard"])
        floor = w.eval_stages * decode_steps * row["weights_gb"] / row["shard"] / hw.gpu_bandwidth_gbs
        row["seconds"] = max(row["seconds"], floor / replicas)

    df = pd.DataFrame(rows)
    df["memory_gb"] = df.per_device_gb
    total_s = float(df.seconds.sum())
    dense = m.cache_bytes(w.lora_targets if w.setting == "lora" else ALL_KINDS)
    factored = m.cache_bytes(w.lora_targets, r=w.lora_r) if w.setting == "lora" else None
    summary = {
        "model": source,
        "params": m.params,
        "lora_params": m.lora_params(w.lora_r, w.lora_targets) if w.setting == "lora" else 0,
        "setting": w.setting,
        "device": f"CPU at {hw.cpu_gflops:g} GFLOP/s"
        if hw.cpu
        else f"{hw.gpus} GPU(s) × {hw.gpu_mem_gb:g} GB, {hw.gpu_tflops:g} TFLOP/s",
        "total_flops": float(df.flops.sum()),
        "total_seconds": total_s,
        "fits": bool(df.fits.all()),
        "cache_dense_bytes_per_variant": dense,
        "cache_factored_bytes_per_variant": factored,
        "cache_bytes_total": w.n_variants * (factored if factored is not None else dense),
    }
    return df, summary


def summary_text(summary: Mapping[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    cache = f"{summary['cache_dense_bytes_per_variant'] / GB:.2f} GB dense"
    if summary["cache_factored_bytes_per_variant"] is not None:
        cache += f", {summary['cache_factored_bytes_per_variant'] / GB:.3f} GB factored (stored)"
    lines = [
        f"{summary['model']}: {summary['params'] / 1e9:.2f} B parameters"
        + (f", {summary['lora_params'] / 1e6:.1f} M LoRA" if summary["lora_params"] else "")
        + f"; {summary['setting']} setting on {summary['device']}",
        f"total {summary['total_flops']:.3g} FLOPs, {summary['total_seconds'] / 3600:.2f} h"
        + ("" if summary["fits"] else "; DOES NOT FIT: a stage needs more memory than the GPUs have"),
        f"twin cache per variant: {cache}; all variants {summary['cache_bytes_total'] / GB:.2f} GB",
    ]
    return "\n".join(lines)


def reference_gflops(step_s: float) -> float:
    """Achieved GFLOP/s of ``benchmarks/machine_speed.py``'s reference LoRA step taking ``step_s`` seconds.

    The workload: SmolLM2-135M, LoRA r = 8 on every projection, batch 4, :data:`REFERENCE_STEP_TOKENS`
    tokens a step (:data:`REFERENCE_STEP_LABELLED` labelled), FLOPs by :func:`train_flops`. Being an achieved
    training rate, it is used with a training MFU of 1.
    """
    if not step_s > 0:
        raise ValueError(f"reference step seconds must be > 0, got {step_s}")
    m = ModelShape.from_hf(SMOLLM2_135M, "SmolLM2-135M")
    per_sample = REFERENCE_STEP_TOKENS / 4
    resp = REFERENCE_STEP_LABELLED // 4
    w = PlanConfig(setting="lora", prompt_tokens=round(per_sample) - resp, dtype_bytes=4)
    w = replace(w, max_length=max(w.max_length, round(per_sample)))
    return train_flops(m, w, 4, resp) / step_s / 1e9


__all__ = [
    "CONFIG_DIR",
    "Hardware",
    "ModelShape",
    "PlanConfig",
    "SMOLLM2_135M",
    "plan",
    "read_config",
    "reference_gflops",
    "shipped_configs",
    "summary_text",
]
