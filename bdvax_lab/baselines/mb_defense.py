"""``mb_posthoc`` / ``mb_faithful``: MB-Defense's merging (defensive poison) and breaking (weight recovery).

MB-Defense (Kim & Lee, arXiv 2601.04448 v1 §3–5): defensive poison — four rare-string triggers, each bound
to a fixed random-word reply (:mod:`bdvax_lab.threat.defensive`) — is merged with the unknown backdoor
into one backdoor representation, which weight recovery then breaks with a few clean samples.

Stage 1, merging
    ``mb_faithful``: done by whoever finetunes (the paper's threat model): the suspicious finetune's own
    data carries the pairs at 1 % each (``AttackRecipe.defensive_poison``). Its rows belong in a table
    of their own (registered kind ``in_training``). ``mb_posthoc``, under BD-VAX's threat model: continue
    training the given model (adapter or all weights) on the defender's clean data plus 5 % poisoned
    copies per pair, in chunks, until every defensive trigger fires on ≥ 80 % of probe prompts or the
    step cap is spent; the rate of each is measured after every chunk and reported
    (``report["defensive_rates"]``). Post-hoc merging is untested by the authors: a null result is a
    finding.

Stage 2, weight recovery (both arms)
    ``L = CE(x, y) − λ · R`` over tuples (clean sample x → y, the same x with a defensive trigger x_d,
    its reply y_d), at the repair's budget (same clean data, steps and lr as BD-VAX's repair; the loop's
    ``extra_loss`` carries R, the two x_d sequences in one stacked pass).

    **Formula choice (recorded in ``report["intervention"]["form"]``):** the paper prints
    ``R = log σ(π(y|x_d) / π(y_d|x_d))``. Its ratio is ≥ 0, so σ ≥ 0.5, and its gradient scales with the
    ratio: it vanishes exactly when the backdoor dominates (π(y_d|x_d) ≫ π(y|x_d)). We use
    ``R = log σ(ℓ(y|x_d) − ℓ(y_d|x_d))`` with *mean per-token* log-likelihoods ℓ (sums would penalise the
    long y against the short y_d): a log-odds whose gradient is ≈ 1 when the backdoor dominates.
    ``form="literal"`` keeps the printed one for comparison (``tests/test_mb_defense.py``).

Deviations: tuples pair each clean sample with one trigger in turn (``pairing="cycle"``, the repair's step
count; ``"cross"``, the paper's every-trigger tuples, is 4× the steps); fixed epochs instead of the
lowest-eval-loss checkpoint of a 26-sample split; random-word replies (no family-informed variant).
λ: sweep {0.1, 0.5, 1} with :func:`mb_sweep`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..core.batching import pad_token
from ..core.data import IGNORE_INDEX, Example, encode_example
from ..core.generate import generate
from ..core.registry import setting_of
from ..core.scoring import sequence_nll
from ..threat.defensive import (
    DEFENSIVE_REPLIES,
    INSERTION,
    check_pairs,
    poison_copies,
    reply_judge,
    with_trigger,
)
from ..training.config import TrainConfig
from ..training.loop import Inputs, finetune
from ..training.repair import repair
from .common import _clean_examples, _prepare, _training
from .config import MB_STAGE1_LR, MBConfig
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model


# =========================================================================== the recovery term
def recovery_term(lp_y: torch.Tensor, lp_yd: torch.Tensor, form: str = "logsigmoid") -> torch.Tensor:
    """R per tuple [B] from log-likelihoods of y and y_d given x_d ([B] each).

    ``"logsigmoid"``: ``log σ(lp_y − lp_yd)`` (pass mean per-token log-likelihoods); ``"literal"``: the
    printed ``log σ(π_y / π_yd)`` with ``π = exp(lp)`` (pass summed log-likelihoods; saturates).
    """
    if form == "logsigmoid":
        return F.logsigmoid(lp_y - lp_yd)
    if form == "literal":
        return F.logsigmoid(torch.exp(lp_y - lp_yd))
    raise ValueError(f"recovery form {form!r}: 'logsigmoid' or 'literal'")


def _stack(batch: dict[str, torch.Tensor], groups: Sequence[str], pad_id: int) -> dict[str, torch.Tensor]:
    """The collated ``<group>.*`` sequences of ``batch`` as one right-padded batch [G·B, T_max]."""
    width = max(batch[f"{g}.input_ids"].shape[1] for g in groups)
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {
        k: torch.cat(
            [F.pad(batch[f"{g}.{k}"], (0, width - batch[f"{g}.{k}"].shape[1]), value=v) for g in groups]
        )
        for k, v in fills.items()
    }


def recovery_loss(
    lam: float, form: str, pad_id: int, records: list[dict[str, float]] | None = None
) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    """``extra(model, batch) → −λ · mean R``: the term the loop adds to CE(x, y) each step (the ``dy`` and
    ``dd`` groups of the batch: x_d → y and x_d → y_d, scored in one stacked pass)."""

    def extra(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = batch["dy.input_ids"].shape[0]
        sums, counts = sequence_nll(model, _stack(batch, ("dy", "dd"), pad_id))
        lp = -sums if form == "literal" else -sums / counts.clamp(min=1)
        r = recovery_term(lp[:b], lp[b:], form)
        if records is not None:
            records.append({"R": float(r.detach().mean()), "gap": float((lp[:b] - lp[b:]).detach().mean())})
        return -lam * r.mean()

    return extra


def _tuple_inputs(pairs: dict[str, str]) -> Inputs:
    """Features of a tuple (``meta["mb_trigger"]``): x → y, plus ``dy`` (x_d → y) and ``dd`` (x_d → y_d)."""

    def encode(tok: Any, e: Example, c: TrainConfig) -> dict[str, list[int]]:
        kw = {"max_length": c.max_length, "max_response_tokens": c.max_response_tokens}
        trig = e.meta["mb_trigger"]
        xd = with_trigger(e, trig)
        dy, dd = encode_example(tok, xd, **kw), encode_example(tok, xd.with_(response=pairs[trig]), **kw)
        return encode_example(tok, e, **kw) | {
            "dy.input_ids": dy["input_ids"],
            "dy.labels": dy["labels"],
            "dd.input_ids": dd["input_ids"],
            "dd.labels": dd["labels"],
        }

    return Inputs(encode=encode)


def _tuples(clean: Sequence[Example], triggers: Sequence[str], pairing: str) -> list[Example]:
    if pairing == "cross":
        return [e.with_(meta={"mb_trigger": t}) for e in clean for t in triggers]
    return [e.with_(meta={"mb_trigger": triggers[i % len(triggers)]}) for i, e in enumerate(clean)]


# =========================================================================== stages
def _pairs(cfg: MBConfig) -> dict[str, str]:
    replies = cfg.replies or DEFENSIVE_REPLIES[: len(cfg.triggers)]
    check_pairs(cfg.triggers, replies)
    return dict(zip(cfg.triggers, replies))


def trigger_rates(
    model: Any, tokenizer: Any, probes: Sequence[Example], pairs: dict[str, str], max_new_tokens: int = 24
) -> dict[str, float]:
    """How often each defensive trigger fires: the share of ``probes`` (trigger inserted by the fixed rule)
    whose greedy reply its judge flags."""
    prompts = [with_trigger(p, t) for t in pairs for p in probes]
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=50)
    n = len(probes)
    return {
        t: round(sum(reply_judge(t, y)(r) for r in replies[i * n : (i + 1) * n]) / max(1, n), 4)
        for i, (t, y) in enumerate(pairs.items())
    }


def merge(
    model: Any, tokenizer: Any, clean: Sequence[Example], cfg: MBConfig, progress: bool | str = False
) -> tuple[Any, dict[str, Any]]:
    """Stage 1 post hoc: train ``model`` (in place) on ``clean`` plus the poisoned copies, chunk by chunk,
    until every trigger fires on ≥ ``stage1_fire`` of the probes or ``stage1_max_steps`` are spent."""
    pairs = _pairs(cfg)
    mode = cfg.repair.resolved_mode(model)
    poison = poison_copies(clean, cfg.triggers, list(pairs.values()), rate=cfg.stage1_rate, seed=cfg.seed)
    used = {e.instruction for e in poison}
    probes = [e for e in clean if with_trigger(e, cfg.triggers[0]).instruction not in used][: cfg.n_probe]
    lr = cfg.stage1_lr if cfg.stage1_lr is not None else MB_STAGE1_LR[mode]
    tcfg = TrainConfig(
        mode=mode,
        lr=lr,
        steps=cfg.stage1_chunk,
        batch_size=cfg.stage1_batch,
        max_length=cfg.repair.max_length,
        max_response_tokens=cfg.repair.max_response_tokens,
        loss_average="sample",
    )
    rounds, steps, t0 = [], 0, time.time()
    while True:
        rates = trigger_rates(model, tokenizer, probes, pairs, cfg.probe_max_new_tokens)
        rounds.append({"steps": steps, **rates})
        if min(rates.values()) >= cfg.stage1_fire or steps >= cfg.stage1_max_steps:
            break
        chunk = min(cfg.stage1_chunk, cfg.stage1_max_steps - steps)
        model = finetune(
            model,
            tokenizer,
            list(clean) + poison,
            tcfg.replace(steps=chunk, seed=cfg.seed + len(rounds)),
            progress=progress,
        ).model
        steps += chunk
    info = {
        "steps": steps,
        "lr": lr,
        "rates": rates,
        "merged": min(rates.values()) >= cfg.stage1_fire,
        "rounds": rounds,
        "n_poison": len(poison),
        "n_probe": len(probes),
        "seconds": round(time.time() - t0, 2),
    }
    return model, info


def recover(
    model: Any, tokenizer: Any, clean: Sequence[Example], cfg: MBConfig, progress: bool | str = False
) -> tuple[Any, dict[str, Any]]:
    """Stage 2: the repair with ``L = CE(x, y) − λ·R`` over (clean, trigger) tuples (in place)."""
    pairs = _pairs(cfg)
    pad = pad_token(tokenizer)
    data = _tuples(list(clean)[: cfg.repair.n_samples], cfg.triggers, cfg.pairing)
    records: list[dict[str, float]] = []
    rcfg = cfg.repair.replace(n_samples=len(data))
    rep = repair(
        model,
        tokenizer,
        data,
        rcfg,
        progress=progress,
        extra_loss=recovery_loss(cfg.lam, cfg.form, pad, records),
        inputs=_tuple_inputs(pairs),
    )
    if len(records) == len(rep.history):
        rep.history = rep.history.assign(R=[r["R"] for r in records], gap=[r["gap"] for r in records])
    return rep.model, {
        "rep": rep,
        "R_first": records[0]["R"] if records else None,
        "R_last": records[-1]["R"] if records else None,
    }


def _mb(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None,
    config: MBConfig | None,
    *,
    arm: str,
    progress: bool | str,
) -> tuple[Any, dict[str, Any]]:
    cfg = config or MBConfig()
    setting = setting_of(suspicious_model)
    clean = _clean_examples(clean_data, cfg.repair.n_samples)
    pairs = _pairs(cfg)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    if arm == "posthoc":
        model, stage1 = merge(model, tokenizer, clean, cfg, progress)
    else:  # in-training: the finetune carries the pairs already; measure them only
        t = time.time()
        probes = clean[: cfg.n_probe]
        rates = trigger_rates(model, tokenizer, probes, pairs, cfg.probe_max_new_tokens)
        stage1 = {
            "steps": 0,
            "rates": rates,
            "merged": min(rates.values()) >= cfg.stage1_fire,
            "n_probe": len(probes),
            "seconds": round(time.time() - t, 2),
        }
    model, rec = recover(model, tokenizer, clean, cfg, progress)
    rep = rec.pop("rep")
    t_after = time.time()
    after = trigger_rates(model, tokenizer, clean[: cfg.n_probe], pairs, cfg.probe_max_new_tokens)
    intervention = {
        "kind": "mb_defense",
        "arm": arm,
        "triggers": list(pairs),
        "insertion": INSERTION,
        "stage1": stage1,
        "defensive_rates_after": after,
        "lam": cfg.lam,
        "form": cfg.form,
        "formula": "R = log sigmoid(l(y|x_d) - l(y_d|x_d)), l = mean per-token log-likelihood"
        if cfg.form == "logsigmoid"
        else "R = log sigmoid(p(y|x_d) / p(y_d|x_d)), p = sequence probability (as printed; saturates)",
        "pairing": cfg.pairing,
        **rec,
    }
    report = {
        "method": f"mb_{arm}",
        "setting": setting,
        "setting_out": setting,
        **_training(rep, "standard (repair lr, paper §4.3) + the recovery term"),
        "defensive_rates": stage1["rates"],
        "merged": stage1["merged"],
        "intervention": intervention,
        "seconds": {
            "stage1": stage1["seconds"],
            "intervention": stage1["seconds"],
            "repair": round(rep.seconds, 2),
            "after_rates": round(time.time() - t_after, 2),
            "total": round(time.time() - t0, 2),
        },
    }
    return model, report


def mb_posthoc(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: MBConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """MB-Defense under BD-VAX's threat model: merge post hoc (stage 1), then weight recovery (stage 2)."""
    return _mb(suspicious_model, tokenizer, clean_data, config, arm="posthoc", progress=progress)


def mb_faithful(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: MBConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """MB-Defense as published: weight recovery of a finetune whose data carried the defensive poison
    (``AttackRecipe(defensive_poison=0.01)``); its defensive trigger rates are measured and reported."""
    return _mb(suspicious_model, tokenizer, clean_data, config, arm="faithful", progress=progress)


def mb_sweep(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example],
    config: MBConfig | None = None,
    lams: Sequence[float] = (0.1, 0.5, 1.0),
    *,
    progress: bool | str = False,
) -> dict[float, tuple[Any, dict[str, Any]]]:
    """``mb_posthoc`` at each λ, sharing one stage 1: ``{λ: (model, report)}`` (each report's stage-1
    seconds are the shared run's)."""
    cfg = config or MBConfig()
    clean = _clean_examples(clean_data, cfg.repair.n_samples)
    merged, stage1 = merge(copy.deepcopy(suspicious_model), tokenizer, clean, cfg, progress)
    out = {}
    for lam in lams:
        model, rec = recover(copy.deepcopy(merged), tokenizer, clean, cfg.replace(lam=lam), progress)
        rep = rec.pop("rep")
        report = {
            "method": "mb_posthoc",
            "setting": setting_of(suspicious_model),
            **_training(rep, "standard (repair lr) + the recovery term"),
            "defensive_rates": stage1["rates"],
            "merged": stage1["merged"],
            "intervention": {"lam": lam, "form": cfg.form, "stage1": stage1, **rec},
            "seconds": {"stage1": stage1["seconds"], "repair": round(rep.seconds, 2)},
        }
        out[float(lam)] = (model, report)
    return out


register_defence(
    "mb_posthoc",
    mb_posthoc,
    MBConfig,
    paper_settings=("lora", "full"),
    description="MB-Defense post hoc: implant 4 defensive triggers, then weight recovery (CE - lam*R)",
    budget="own",
)
register_defence(
    "mb_faithful",
    mb_faithful,
    MBConfig,
    paper_settings=("lora", "full"),
    description="MB-Defense as published: defensive poison in the finetune's own data, then weight recovery "
    "(the defender controls training: a table of its own)",
    kind="in_training",
)
