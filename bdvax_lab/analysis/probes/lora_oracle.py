"""The weight-space oracle: what zeroing each adapter channel or head would do to the real backdoor.

**For evaluation only**, like :mod:`.attribution`: it uses the true trigger and behaviour. The activation
oracle there asks which *activations* carry the trigger's effect; a neuron can carry it because
something upstream (attention, an earlier block) changed its input, while its own adapter slice is
innocent. The defence never edits activations: it zeroes adapter slices (:func:`bdvax_lab.weights.
suppression.zero_lora_channels`). This oracle scores exactly those slices, so a ranking can be judged
against the operation it feeds.

Metric ``m`` as in :mod:`.attribution`: the summed log-probability of the behaviour's first
``n_target_tokens`` tokens, teacher-forced after each *triggered* prompt. Zeroing an adapter slice ``θ_S``
changes ``m`` by about ``−Σ_S ∂m/∂θ · θ`` (first order), so a unit's score is ``Σ_S ∂m/∂θ · θ``
averaged over prompts: positive means the slice raises the behaviour and zeroing it would lower it.
Slices (the suppression's own): MLP channel ``j`` of block ``b`` is row ``j`` of ``lora_B`` of gate and
up plus column ``j`` of ``lora_A`` of down, summed; query head ``h`` is its ``head_dim`` rows of q's
``lora_B`` and columns of o's ``lora_A``, plus ``1/group`` of its k/v head's rows (GQA: ``group`` query
heads share one k/v head). Adapter setting only (in the full setting the slice is the whole weight,
and ``θ`` would have to be the update, which needs the base).

First order fails where the behaviour is saturated: under the trigger a refusal's log-probability is near
0, so its gradient is small and the scores sum to far less than what removing the adapter does. With
``steps = K`` the gradient is instead averaged over ``K`` points of the straight line from the adapter
switched off (every scored factor scaled by α = 0) to the suspicious model (α = 1): integrated
gradients. Each scored LoRA module has one scored factor, so its update is linear in α, and the scores
then add up to ``m(α=1) − m(α=0)`` (completeness, up to the ``K``-point midpoint rule). ``meta`` carries
both ends (``m_on``, ``m_off``) and the scores' total, so the gap can be read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...core.batching import pad_token
from ...core.data import Example
from ...core.registry import MLP_KINDS, is_peft, layout_of, unwrap
from .attribution import _target_ids, oracle_frame, target_logprob
from .common import ProbeResult, _as_prompts, _chunks, _left_pad, encode_prompts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...core.types import Model

#: the attention projections whose adapter slices belong to a head, and the LoRA factor that holds them
HEAD_PARTS: dict[str, str] = {"q": "B", "k": "B", "v": "B", "o": "A"}

#: the MLP projections' LoRA factor holding a channel (gate/up: output rows of B; down: input columns of A)
MLP_PARTS: dict[str, str] = {"gate": "B", "up": "B", "down": "A"}


def _factors(hf: Any, layout: Any, block: int, kind: str) -> list[tuple[torch.Tensor, int]]:
    """``(weight, offset)`` of the LoRA factor that holds ``kind``'s channels, per active adapter."""
    module = hf.get_submodule(layout.module_name(block, kind))
    if not hasattr(module, "lora_A"):
        return []
    part = MLP_PARTS.get(kind) or HEAD_PARTS[kind]
    rows = layout.rows(kind)
    offset = 0 if rows is None or part == "A" else rows.start
    out = []
    for a in module.active_adapters:
        if a in module.lora_A:
            out.append(((module.lora_B if part == "B" else module.lora_A)[a].weight, offset))
    return out


def _slice_scores(w: torch.Tensor, offset: int, part: str, n: int) -> torch.Tensor:
    """``Σ grad·θ`` per channel of one factor: rows ``offset..offset+n`` of B, or the columns of A."""
    gw = (w.grad * w).detach().double()
    return gw[offset : offset + n].sum(1) if part == "B" else gw.sum(0)


def lora_oracle(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    triggered_prompts: Sequence[Example | str],
    target: str,
    *,
    n_target_tokens: int = 4,
    batch_size: int = 8,
    steps: int = 0,
    label: str = "model",
) -> ProbeResult:
    """Effect of zeroing each adapter MLP channel and head on the behaviour (module doc).

    ``triggered_prompts``: instructions carrying the true key; ``target``: the behaviour's reply;
    ``steps``: 0 for the first-order score at the suspicious model, ``K ≥ 1`` for integrated gradients
    over ``K`` midpoints (``K`` times the backward passes). Returns a :class:`ProbeResult` shaped like
    :func:`.attribution.oracle_attribution`'s: ``tensor`` ``[L, d_ff]`` (MLP channels), ``meta["heads"]``
    ``[L, n_heads]``, ``frame`` one row per unit; ``meta`` also has ``m_on``, ``m_off`` (the metric with
    the scored adapter on and off, means over prompts) and ``total`` (the scores' sum). Parameters keep
    their values and ``requires_grad`` flags and are left without ``.grad``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"lora_oracle: steps must be an int ≥ 0 (0 = first order), got {steps!r}")
    if not is_peft(model):
        raise TypeError("lora_oracle needs a PeftModel (adapter setting): it scores the adapter's slices")
    trig = _as_prompts(triggered_prompts, "triggered_prompts")
    hf = unwrap(model)
    layout = layout_of(model)
    L, hd, nh = layout.n_blocks, layout.head_dim, layout.n_heads
    group = max(1, nh // max(1, layout.n_kv_heads))
    tgt = _target_ids(tokenizer, target, n_target_tokens)
    seqs = [s + tgt for s in encode_prompts(tokenizer, trig)]
    kinds = [kd for kd in (*MLP_KINDS, *HEAD_PARTS) if kd in layout.spec.modules]
    factors = {(b, kd): _factors(hf, layout, b, kd) for b in range(L) for kd in kinds}
    watched = [w for fs in factors.values() for w, _ in fs]
    if not watched:
        raise ValueError("lora_oracle: the model has no active LoRA adapter on its MLP or attention modules")
    params = list(hf.parameters())
    flags = [p.requires_grad for p in params]
    was = hf.training
    hf.train(False)
    tgt_t = torch.tensor(tgt)
    batches = [
        _left_pad([seqs[i] for i in idx], int(pad_token(tokenizer))) for idx in _chunks(len(seqs), batch_size)
    ]
    alphas = [1.0] if steps == 0 else [(k + 0.5) / steps for k in range(steps)]
    full = [w.detach().clone() for w in watched]

    def scale(alpha: float) -> None:
        with torch.no_grad():
            for w, f in zip(watched, full):
                w.copy_(f * alpha)

    def metric() -> float:
        with torch.no_grad():
            return sum(
                float(
                    target_logprob(
                        hf(input_ids=b.ids, attention_mask=b.mask, position_ids=b.pos).logits, tgt_t
                    )
                )
                for b in batches
            )

    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        scale(0.0)
        m_off = metric()
        m_on = 0.0  # first order: the backward passes run at α = 1 and give it for free
        for alpha in alphas:
            scale(alpha)
            for w in watched:
                w.requires_grad_(True)
            for b in batches:
                with torch.enable_grad():
                    logits = hf(input_ids=b.ids, attention_mask=b.mask, position_ids=b.pos).logits
                    m = target_logprob(logits, tgt_t)
                    m.backward()
                m_on += float(m.detach())
            for w in watched:
                w.requires_grad_(False)
        scale(1.0)
        if steps:
            m_on = metric()
        mlp = torch.zeros(L, layout.d_ff, dtype=torch.float64)
        heads = torch.zeros(L, nh, dtype=torch.float64)
        for (blk, kd), fs in factors.items():
            part = MLP_PARTS.get(kd) or HEAD_PARTS[kd]
            for w, offset in fs:
                n = layout.out_features(kd) if part == "B" else w.shape[1]
                s = _slice_scores(w, offset, part, n)
                if kd in MLP_PARTS:
                    mlp[blk] += s
                else:
                    per_head = s.reshape(-1, hd).sum(1)  # q/o: one per query head; k/v: one per k/v head
                    heads[blk] += per_head if kd in ("q", "o") else per_head.repeat_interleave(group) / group
    finally:
        scale(1.0)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
        hf.train(was)
    n = len(seqs)
    mlp, heads = (mlp / (n * len(alphas))).float(), (heads / (n * len(alphas))).float()
    meta = {"probe": "lora_oracle", "heads": heads, "label": label, "target_ids": tgt, "n_prompts": n}
    meta |= {"steps": steps, "m_on": m_on / n, "m_off": m_off / n, "total": float(mlp.sum() + heads.sum())}
    return ProbeResult(oracle_frame(mlp, heads, group), None, tensor=mlp, meta=meta)
