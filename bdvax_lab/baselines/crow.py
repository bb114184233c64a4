"""``crow`` / ``crow_published``: clean finetuning with CROW's layer-consistency term under one FGSM step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F

from ..core.data import Example
from ..core.registry import setting_of, unwrap
from .common import _prepare, _repair_with_extra, _training
from .config import CrowConfig
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


# =========================================================================== CROW
def crow_consistency_loss(
    hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
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


def fgsm_perturb(
    embeds: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], epsilon: float
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


def crow_extra_loss(
    alpha: float, epsilon: float, mask_padding: bool = True, records: list | None = None
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


def crow(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: CrowConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """CROW consistency finetuning at the repair's budget (same data, steps); lr standard or published."""
    cfg = config or CrowConfig()
    setting = setting_of(suspicious_model)
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
    intervention = {
        "kind": "crow",
        "alpha": cfg.alpha,
        "epsilon": cfg.epsilon,
        "layers": "hidden_states[1:-1]",
        "mask_padding": cfg.mask_padding,
        "lr_policy": cfg.lr if isinstance(cfg.lr, str) else "explicit",
        "consistency_adv_first": float(hist.consistency_adv.iloc[0]) if len(hist) else None,
        "consistency_adv_last": float(hist.consistency_adv.iloc[-1]) if len(hist) else None,
        "forward_passes_per_step": 3,
    }
    report = {
        "method": "crow",
        "setting": setting,
        "setting_out": setting,
        **training,
        "intervention": intervention,
        "seconds": {
            "intervention": 0.0,
            "repair": round(rep.seconds, 2),
            "total": round(time.time() - t0, 2),
        },
    }
    return rep.model, report


def crow_published(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: CrowConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """:func:`crow` at CROW's published lr (adapter setting; paper Appendix C.2's comparison)."""
    cfg = (config or CrowConfig()).replace(lr="published")
    model, report = crow(suspicious_model, tokenizer, clean_data, cfg, progress=progress, on_stage=on_stage)
    report["method"] = "crow_published"
    return model, report


register_defence(
    "crow",
    crow,
    CrowConfig,
    paper_settings=("full",),
    description="clean finetuning with a layer-consistency term under one FGSM step",
)
register_defence(
    "crow_published",
    crow_published,
    CrowConfig,
    paper_settings=("lora",),
    description="CROW at its published adapter lr (1e-3)",
)
