"""The evaluation oracle: attribution patching of every MLP channel and attention head (nnsight).

**For evaluation only.** It uses the *true* trigger and behaviour, which the defence never knows; nothing
under ``bdvax_lab/bdvax`` or ``bdvax_lab/baselines`` imports it. It answers: which units carry the real
backdoor, so how much of that does a defence's ranking (:mod:`bdvax_lab.analysis.ranking`) recover?

Metric: ``m = Σ_t log p(target token t | prompt, earlier target tokens)`` over the first ``n_target_tokens``
tokens of the behaviour's reply, teacher-forced after each prompt (chat template as everywhere).
Attribution patching (first-order Taylor of patching the clean activation into the triggered run):

    attribution(unit) = Σ_positions Σ_dims ∂m/∂a_triggered ⊙ (a_triggered − a_clean)

(positive: the trigger's change at this unit raises the behaviour's log-probability; patching it back to
clean would lower it by about that much). Units: MLP channel ``j`` of block ``b`` is the ``j``-th input
of ``down_proj`` (the intermediate neuron that row ``j`` of gate/up and column ``j`` of down belong to);
attention head ``h`` is the ``h``-th ``head_dim`` slice of ``o_proj``'s input (that query head's output;
under GQA several query heads read one k/v head, ``kv_head = h // (n_heads / n_kv_heads)``, reported
beside). Module paths come from the registry (:meth:`~bdvax_lab.core.registry.Layout.module_name`).

Alignment: triggered and clean sequences share the reply and the instruction's tail, so they are
right-aligned on their common token suffix and compared position by position there; positions before the
key are identical in both runs (causal) and contribute nothing; the key's own positions have no clean
counterpart and are compared with the clean row's mean activation (``key_positions="mean"``) or skipped
(``"skip"``). Cost: per batch one forward of the clean sequences and one forward + backward of the triggered
ones; parameters are frozen for the call (no ``.grad`` is left on the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ...core.batching import pad_token
from ...core.data import Example
from ...core.registry import layout_of
from .common import ProbeResult, _as_prompts, _chunks, _hf_of, _left_pad, encode_prompts, nnsight_model
from .patching import _common_suffix

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ...core.types import Model

#: the two kinds of unit, and the registry kind whose input holds their activations
UNIT_SITES: dict[str, str] = {"mlp": "down", "head": "o"}

ORACLE_COLUMNS = ["block", "kind", "unit", "kv_head", "attribution", "abs_attribution", "rank"]

KEY_POSITIONS = ("mean", "skip")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _envoy(w: Any, path: str) -> Any:
    env = w
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _target_ids(tokenizer: Any, target: str, n: int) -> list[int]:
    ids = tokenizer(target.strip(), add_special_tokens=False)["input_ids"][: max(1, int(n))]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return [int(i) for i in ids]


def target_logprob(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Σ log p(target tokens) over a left-padded batch whose last ``k`` tokens are the target:
    ``logits`` ``[B, T, V]``, ``target_ids`` ``[k]`` → a scalar (the oracles' metric)."""
    k = target_ids.numel()
    lp = torch.log_softmax(logits[:, -k - 1 : -1].float(), -1)
    return lp.gather(-1, target_ids.to(lp.device).expand(lp.shape[0], k)[..., None]).sum()


def _unit_sum(x: torch.Tensor, kind: str, head_dim: int) -> torch.Tensor:
    """[..., C] → [..., units]: heads sum their ``head_dim`` slice, channels stay."""
    if kind == "head":
        return x.reshape(*x.shape[:-1], -1, head_dim).sum(-1)
    return x


def _run(
    w: Any,
    embed: str,
    paths: Sequence[str],
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    metric: Any,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Activations at the inputs of ``paths`` (execution order) and, with ``metric(logits)``, their grads.

    The parameters are frozen by the caller; the embedding output (registry path ``embed``) is made to
    require grad so that the backward reaches every site without touching any parameter's ``.grad``.
    """
    acts: dict[int, Any] = {}
    grads: dict[int, Any] = {}
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    envs = [_envoy(w, p) for p in paths]
    if metric is None:
        with torch.no_grad(), w.trace(**kwargs):
            for i, env in enumerate(envs):
                acts[i] = env.input.detach().float().cpu().save()
        return [acts[i] for i in range(len(envs))], None
    with torch.enable_grad(), w.trace(**kwargs):
        _envoy(w, embed).output.requires_grad_(True)
        live = {}
        for i, env in enumerate(envs):
            live[i] = env.input
            acts[i] = live[i].detach().float().cpu().save()
        m = metric(w.output.logits)
        with m.backward():
            for i in reversed(range(len(envs))):
                grads[i] = live[i].grad.detach().float().cpu().save()
    return [acts[i] for i in range(len(envs))], [grads[i] for i in range(len(envs))]


def oracle_attribution(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_prompts: Sequence[Example | str],
    triggered_prompts: Sequence[Example | str],
    target: str,
    *,
    n_target_tokens: int = 4,
    key_positions: str = "mean",
    batch_size: int = 8,
    label: str = "model",
) -> ProbeResult:
    """Attribution of the behaviour's log-probability to every MLP channel and attention head (module doc).

    ``clean_prompts[i]`` and ``triggered_prompts[i]`` are the same instruction without and with the true
    key; ``target`` is the behaviour's reply (e.g. the attack's target text). Returns a
    :class:`ProbeResult`: ``tensor`` ``[L, d_ff]`` (MLP channels, mean attribution per prompt),
    ``meta["heads"]`` ``[L, n_heads]``, and ``frame`` (:data:`ORACLE_COLUMNS`, one row per unit, ``rank`` 0
    = largest attribution within its kind).
    """
    clean = _as_prompts(clean_prompts, "clean_prompts")
    trig = _as_prompts(triggered_prompts, "triggered_prompts")
    if len(clean) != len(trig):
        raise ValueError(f"{len(clean)} clean but {len(trig)} triggered prompts: they must be pairs")
    if key_positions not in KEY_POSITIONS:
        raise ValueError(f"key_positions={key_positions!r}; choose one of {KEY_POSITIONS}")
    hf = _hf_of(model)
    layout = layout_of(hf)
    L, hd = layout.n_blocks, layout.head_dim
    tgt = _target_ids(tokenizer, target, n_target_tokens)
    cs = [s + tgt for s in encode_prompts(tokenizer, clean)]
    ts = [s + tgt for s in encode_prompts(tokenizer, trig)]
    pad = pad_token(tokenizer)
    kinds = list(UNIT_SITES)
    paths = [layout.module_name(b, UNIT_SITES[kind]) for b in range(L) for kind in ("head", "mlp")]
    order = [(b, kind) for b in range(L) for kind in ("head", "mlp")]  # o_proj runs before down_proj
    sizes = {"mlp": layout.d_ff, "head": layout.n_heads}
    total = {kind: torch.zeros(L, sizes[kind], dtype=torch.float64) for kind in kinds}
    tgt_t = torch.tensor(tgt)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return target_logprob(logits, tgt_t)

    w = nnsight_model(model, tokenizer)
    embed = layout.spec.embed
    params = list(hf.parameters())
    flags = [p.requires_grad for p in params]
    was = hf.training
    hf.train(False)
    try:
        for p in params:
            p.requires_grad_(False)
        for idx in _chunks(len(cs), batch_size):
            cb = _left_pad([cs[i] for i in idx], int(pad))
            tb = _left_pad([ts[i] for i in idx], int(pad))
            a_c, _ = _run(w, embed, paths, cb.ids, cb.mask, cb.pos, None)
            a_t, g_t = _run(w, embed, paths, tb.ids, tb.mask, tb.pos, metric)
            assert g_t is not None
            for r, i in enumerate(idx):
                n_t, n_c = len(ts[i]), len(cs[i])
                s = _common_suffix(ts[i], cs[i])
                p = min(_common_prefix(ts[i], cs[i]), n_t - s, n_c - s)
                wt, wc = tb.ids.shape[1], cb.ids.shape[1]
                for j, (b, kind) in enumerate(order):
                    at, ac, gt = a_t[j][r], a_c[j][r], g_t[j][r]  # [W, C]
                    contrib = (gt[wt - s :] * (at[wt - s :] - ac[wc - s :])).sum(0)
                    if key_positions == "mean" and n_t - s > p:
                        mid = slice(wt - n_t + p, wt - s)
                        mean_c = ac[wc - n_c :].mean(0)
                        contrib = contrib + (gt[mid] * (at[mid] - mean_c)).sum(0)
                    total[kind][b] += _unit_sum(contrib.double(), kind, hd)
    finally:
        for prm, f in zip(params, flags):
            prm.requires_grad_(f)
        hf.train(was)
    n = len(cs)
    mlp, heads = (total["mlp"] / n).float(), (total["head"] / n).float()
    frame = oracle_frame(mlp, heads, layout.n_heads // max(1, layout.n_kv_heads))
    return ProbeResult(
        frame,
        None,
        tensor=mlp,
        meta={
            "probe": "oracle_attribution",
            "heads": heads,
            "label": label,
            "target_ids": tgt,
            "n_pairs": n,
            "key_positions": key_positions,
        },
    )


def oracle_frame(mlp: torch.Tensor, heads: torch.Tensor, group: int) -> pd.DataFrame:
    """Tidy rows of :data:`ORACLE_COLUMNS` from ``mlp`` [L, d_ff] and ``heads`` [L, n_heads] attributions;
    ``group`` = query heads per k/v head (GQA)."""
    parts = []
    for kind, t in (("mlp", mlp), ("head", heads)):
        L, n = t.shape
        vals = t.reshape(-1).double()
        order = torch.argsort(vals, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        units = torch.arange(n).repeat(L)
        parts.append(
            pd.DataFrame(
                {
                    "block": torch.arange(L).repeat_interleave(n).numpy(),
                    "kind": kind,
                    "unit": units.numpy(),
                    "kv_head": (units // max(1, group)).numpy() if kind == "head" else -1,
                    "attribution": vals.numpy(),
                    "abs_attribution": vals.abs().numpy(),
                    "rank": rank.numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)[ORACLE_COLUMNS]
