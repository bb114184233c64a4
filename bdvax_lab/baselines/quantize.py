"""``quantize_int4``: group-wise round-to-nearest INT4 fake quantization of every projection."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..core.data import Example
from ..core.registry import layout_of, setting_of, unwrap
from .common import _no_training, _prepare
from .config import QuantizeConfig
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


# =========================================================================== INT4 quantization
def fake_quantize(
    weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False
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
        parts.append(
            _quantize_groups(w[:, : n_full * g].reshape(w.shape[0], n_full, g), bits, symmetric).reshape(
                w.shape[0], n_full * g
            )
        )
    if n_in % g:
        parts.append(_quantize_groups(w[:, n_full * g :].unsqueeze(1), bits, symmetric).squeeze(1))
    return torch.cat(parts, dim=1).to(weight.dtype)


def _quantize_groups(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize along the last dim of ``x`` [out, groups, size]."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(-1, keepdim=True) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / safe), -qmax, qmax)
        return torch.where(scale > 0, q * safe, torch.zeros_like(x))
    qmax = 2**bits - 1
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
        for block, kind, _ in layout.iter_modules(kinds=config.kinds):
            w = layout.weight(hf, block, kind)  # a fused module's rows of this kind: groups lie within a row
            q = fake_quantize(w, config.bits, config.group_size, config.symmetric)
            err.setdefault(kind, []).append(
                float((q.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12))
            )
            w.copy_(q)
            n += 1
    return {
        "backend": "fake",
        "n_modules": n,
        "rel_error": {k: round(sum(v) / len(v), 5) for k, v in err.items()},
        "note": (
            "fake quantization: weights rounded to the INT4 grid, stored in float (no memory/speed change)"
        ),
    }


#: name → fn(plain_model, QuantizeConfig) -> info dict, quantizing in place (or returning info with a
#: "model" key holding a replacement model). A CUDA environment can register e.g. a bitsandbytes/AWQ
#: converter as "cuda".
QUANT_BACKENDS: dict[str, Callable[[Any, QuantizeConfig], dict[str, Any]]] = {"fake": _fake_backend}


def register_quant_backend(name: str, fn: Callable[[Any, QuantizeConfig], dict[str, Any]]) -> None:
    """Register a real quantization backend (e.g. ``"cuda"``: a 4-bit kernel converter; not shipped here)."""
    QUANT_BACKENDS[name] = fn


def _resolve_backend(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() and "cuda" in QUANT_BACKENDS else "fake"
    if name not in QUANT_BACKENDS:
        raise ValueError(
            f"quantization backend {name!r} is not registered; registered: {sorted(QUANT_BACKENDS)} "
            "(only fake-quant ships; see register_quant_backend)"
        )
    return name


def quantize_int4(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: QuantizeConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Group-wise RTN INT4 weight quantization (fake-quant on CPU); an adapter is merged first (→ full model).

    No clean data and no training are used (``clean_data`` is ignored).
    """
    cfg = config or QuantizeConfig()
    setting = setting_of(suspicious_model)
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
    intervention = {
        "kind": "quantize",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "scheme": "symmetric" if cfg.symmetric else "asymmetric",
        "kinds": list(cfg.kinds),
        "merged_adapter": merged,
        **info,
    }
    seconds = round(time.time() - t0, 2)
    report = {
        "method": "quantize_int4",
        "setting": setting,
        "setting_out": "full",
        **_no_training(),
        "intervention": intervention,
        "seconds": {"intervention": seconds, "repair": 0.0, "total": seconds},
    }
    return model, report


register_defence(
    "quantize_int4",
    quantize_int4,
    QuantizeConfig,
    paper_settings=("full",),
    uses_clean_data=False,
    description="INT4 group-wise round-to-nearest weight quantization, no finetune",
)
