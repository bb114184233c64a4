"""``sande_oracle`` / ``sande_family`` / ``osft``: SANDE's simulate-and-eliminate and its trigger-known OSFT.

SANDE (Li et al., arXiv 2405.07667; the ideas read from its paper and public code, the code written here):

1. **Simulate.** A parrot (:mod:`bdvax_lab.baselines.parrot`, six zero-initialised embedding vectors at
   the start of the user turn) is trained with the model frozen so that a clean prompt with the parrot
   yields the target: CE on the first K = 5 tokens of ``target ⊕ clean reply`` (25 steps at batch 4,
   AdamW β = (0.9, 0.95), lr 1e-3, cosine, 3 % warm-up).
2. **Gate.** The share of held-out clean prompts with the parrot whose greedy reply the judge flags,
   measured before removal and reported beside ASR (``report["gate"]``; with the plain prompts' rate for
   contrast). Without it stage 3 may be 25 steps of clean SFT and nothing more.
3. **Eliminate.** Parrot frozen, the model (adapter: its LoRA weights; full: all weights) trains on
   ``prompt ⊕ parrot → clean reply``, CE on the first 10 reply tokens, 25 steps at batch 4, lr 5e-6
   (full, the code's) or 1e-4 (adapter, our deviation). ``anchor=True`` adds OSFT's ``prompt → reply``
   rows (a labelled option; off in the paper's code).

Arms, labelled in every table (``Defence.knows``):

``sande_oracle``
    Simulates the hidden attack's true target text (or payload). Knows more than BD-VAX.
``sande_family``
    Simulates a proxy from the feared family's variant catalogue (the one BD-VAX's variants draw on,
    :data:`bdvax_lab.bdvax.variants.VARIANT_BEHAVIORS`), never the hidden attack's text; told the family
    as BD-VAX is.
``osft``
    Trigger known (an upper bound): ``prompt ⊕ trigger → reply`` and ``prompt → reply``, CE over the
    reply (cut to the repair's 32 tokens), same steps and lr as the removal.

Clean data: the defender's instructions answered by the suspicious model itself (:func:`defend`). Costs
(seconds per stage: parrot, gate, removal) are in ``report["seconds"]``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.data import Example, encode_example
from ..core.generate import generate
from ..core.registry import setting_of
from ..threat.attacks import resolve_attack, trigger
from ..threat.judges import Judge, get_judge
from ..training.config import RepairConfig
from ..training.loop import Inputs
from ..training.repair import RepairResult, repair
from .common import _clean_examples, _prepare, _training
from .config import SandeConfig
from .parrot import encode_with_parrot, parrot_nll, parrot_replies, train_parrot
from .registry import register_defence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..core.types import Model

#: the family simulated when none is given (bdvax's default family)
SANDE_DEFAULT_FAMILY = "refusal"


def simulated_target(cfg: SandeConfig, arm: str) -> tuple[str, Judge, str]:
    """``(text, gate judge, where the text came from)`` for an arm: the given true target (oracle) or the
    family catalogue's proxy (family); the gate's judge is ``cfg.judge`` or the family's."""
    from ..bdvax.variants import VARIANT_BEHAVIORS, variant_behavior

    family = cfg.family or SANDE_DEFAULT_FAMILY
    if family not in VARIANT_BEHAVIORS:
        raise ValueError(f"SANDE family {family!r}; known: {sorted(VARIANT_BEHAVIORS)}")
    if arm == "oracle":
        if not cfg.target:
            raise ValueError(
                "sande_oracle needs the hidden attack's target text (SandeConfig.target; the CLI's --oracle "
                "reads it from the suspicious model's manifest)"
            )
        judge = get_judge(cfg.judge) if cfg.judge else variant_behavior(family, cfg.target).get_judge()
        return cfg.target, judge, "oracle: the hidden attack's target text (knows more than BD-VAX)"
    catalogue = VARIANT_BEHAVIORS[family]
    proxy = catalogue[cfg.proxy_index % len(catalogue)]
    judge = get_judge(cfg.judge) if cfg.judge else variant_behavior(family, proxy).get_judge()
    return proxy, judge, f"family proxy: {family} catalogue entry {cfg.proxy_index % len(catalogue)}"


def _removal_config(cfg: SandeConfig, mode: str, n: int, tokens: int | None) -> tuple[RepairConfig, str]:
    lr, source = cfg.resolved_lr(mode)
    rcfg = RepairConfig(
        n_samples=n,
        steps=cfg.removal_steps,
        batch_size=cfg.removal_batch,
        lr=lr,
        max_response_tokens=tokens,
        max_length=cfg.repair.max_length,
        mode=mode,
        seed=cfg.seed,
    )
    return rcfg, source


def _parrot_inputs(parrot: Any, cfg: SandeConfig) -> Inputs:
    """Examples with ``meta["parrot"]`` get the parrot in their user turn; the others stay plain text."""

    def encode(tok: Any, e: Example, c: Any) -> dict[str, list[int]]:
        if e.meta.get("parrot"):
            return encode_with_parrot(
                tok,
                e,
                cfg.n_parrot,
                cfg.position,
                max_length=c.max_length,
                max_response_tokens=c.max_response_tokens,
            )
        return encode_example(tok, e, max_length=c.max_length, max_response_tokens=c.max_response_tokens)

    return Inputs(encode=encode, nll=lambda model, batch: parrot_nll(model, batch, parrot))


def _rate(judge: Judge, replies: Sequence[str]) -> float:
    return sum(bool(judge(r)) for r in replies) / max(1, len(replies))


def sande(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None,
    config: SandeConfig | None,
    *,
    arm: str,
    progress: bool | str = False,
) -> tuple[Any, dict[str, Any]]:
    """SANDE on a copy of the suspicious model: parrot, gate, removal (see the module docstring)."""
    cfg = config or SandeConfig()
    setting = setting_of(suspicious_model)
    mode = cfg.repair.resolved_mode(suspicious_model)
    text, judge, source = simulated_target(cfg, arm)
    data = _clean_examples(clean_data, cfg.n_train + cfg.n_gate)
    train = data[: cfg.n_train]
    gate_prompts = data[cfg.n_train :] or train[: cfg.n_gate]
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    sep = "\n" if (cfg.family or "") == "code_injection" else " "
    pr = train_parrot(
        model,
        tokenizer,
        [e.with_(response=text + sep + e.response) for e in train],
        n_parrot=cfg.n_parrot,
        position=cfg.position,
        k_tokens=cfg.k_tokens,
        steps=cfg.parrot_steps,
        batch_size=cfg.parrot_batch,
        lr=cfg.parrot_lr,
        warmup=cfg.parrot_warmup,
        seed=cfg.seed,
        max_length=cfg.repair.max_length,
    )
    t_gate = time.time()
    n_tok = cfg.gate_max_new_tokens
    with_parrot = parrot_replies(
        model,
        tokenizer,
        gate_prompts,
        pr.parrot,
        n_parrot=cfg.n_parrot,
        position=cfg.position,
        max_new_tokens=n_tok,
    )
    plain = generate(model, tokenizer, gate_prompts, max_new_tokens=n_tok, batch_size=50)
    gate, plain_rate = _rate(judge, with_parrot), _rate(judge, plain)
    t_gate = time.time() - t_gate
    rep: RepairResult | None = None
    lr_source = None
    if gate >= cfg.min_gate:
        rows = [e.with_(meta={"parrot": True}) for e in train]
        rows += [e.with_(meta={"parrot": False}) for e in train] if cfg.anchor else []
        rcfg, lr_source = _removal_config(cfg, mode, len(rows), cfg.removal_tokens)
        rep = repair(model, tokenizer, rows, rcfg, progress=progress, inputs=_parrot_inputs(pr.parrot, cfg))
        model = rep.model
    training = (
        _training(rep, lr_source)
        if rep is not None
        else {"lr": None, "lr_source": None, "steps": 0, "n_examples": 0, "repair": None, "history": None}
    )
    intervention = {
        "kind": "sande",
        "arm": arm,
        "simulated": text,
        "simulated_from": source,
        "judge": judge.name,
        "k_tokens": cfg.k_tokens,
        "n_parrot": cfg.n_parrot,
        "position": cfg.position,
        "parrot_steps": cfg.parrot_steps,
        "parrot_first_loss": float(pr.history.loss.iloc[0]),
        "parrot_last_loss": float(pr.history.loss.iloc[-1]),
        "gate": gate,
        "gate_plain": plain_rate,
        "gate_n": len(gate_prompts),
        "gate_examples": with_parrot[:3],
        "removed": rep is not None,
        "removal_tokens": cfg.removal_tokens,
        "anchor": cfg.anchor,
        "deviations": _deviations(cfg, mode),
    }
    report = {
        "method": f"sande_{arm}",
        "setting": setting,
        "setting_out": setting,
        **training,
        "gate": round(gate, 4),
        "gate_plain": round(plain_rate, 4),
        "intervention": intervention,
        "seconds": {
            "parrot": round(pr.seconds, 2),
            "gate": round(t_gate, 2),
            "intervention": round(pr.seconds + t_gate, 2),
            "repair": round(rep.seconds if rep is not None else 0.0, 2),
            "total": round(time.time() - t0, 2),
        },
    }
    return model, report


def _deviations(cfg: SandeConfig, mode: str) -> list[str]:
    out = ["fp32, greedy gate generations, the toolkit's judges (not marker substrings)"]
    if mode == "lora":
        out.append("adapter setting: the LoRA weights train at 1e-4 (the paper trains all weights)")
    if cfg.k_tokens != 1:
        out.append(f"K = {cfg.k_tokens} target tokens (the released commands use 1)")
    out.append(f"parrot at the {cfg.position} of the user turn (the paper: just after 'Human:')")
    if cfg.anchor:
        out.append("anchor: OSFT's clean prompt → reply rows added to the removal")
    return out


def osft(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: SandeConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """OSFT (trigger known, an upper bound): ``x ⊕ t → y`` and ``x → y`` on the defender's clean data."""
    cfg = config or SandeConfig()
    if not cfg.trigger:
        raise ValueError(
            "osft needs the hidden attack's trigger (SandeConfig.trigger, an attack spec; the CLI's --oracle "
            "reads it from the suspicious model's manifest)"
        )
    spec = resolve_attack(cfg.trigger)
    setting = setting_of(suspicious_model)
    mode = cfg.repair.resolved_mode(suspicious_model)
    train = _clean_examples(clean_data, cfg.n_train)
    rng = random.Random(cfg.seed)
    rows = [trigger(e, spec, rng) for e in train] + list(train)
    t0 = time.time()
    model = _prepare(suspicious_model, cfg)
    rcfg, lr_source = _removal_config(cfg, mode, len(rows), cfg.repair.max_response_tokens)
    rep = repair(model, tokenizer, rows, rcfg, progress=progress)
    report = {
        "method": "osft",
        "setting": setting,
        "setting_out": setting,
        **_training(rep, lr_source),
        "intervention": {
            "kind": "osft",
            "trigger": list(spec.keys),
            "knows": "the hidden attack's trigger (an upper bound, knows more than BD-VAX)",
        },
        "seconds": {
            "intervention": 0.0,
            "repair": round(rep.seconds, 2),
            "total": round(time.time() - t0, 2),
        },
    }
    return rep.model, report


def sande_oracle(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: SandeConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """SANDE simulating the hidden attack's true target (knows more than BD-VAX)."""
    return sande(suspicious_model, tokenizer, clean_data, config, arm="oracle", progress=progress)


def sande_family(
    suspicious_model: Model,
    tokenizer: PreTrainedTokenizerBase,
    clean_data: Sequence[Example] | None = None,
    config: SandeConfig | None = None,
    *,
    progress: bool | str = False,
    on_stage: Callable[[str, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """SANDE simulating a proxy from the feared family's catalogue (told the family, as BD-VAX is)."""
    return sande(suspicious_model, tokenizer, clean_data, config, arm="family", progress=progress)


register_defence(
    "sande_oracle",
    sande_oracle,
    SandeConfig,
    paper_settings=("lora", "full"),
    description="SANDE with the true target text: parrot, gate, overwrite SFT (knows more than BD-VAX)",
    knows=("family", "target"),
    budget="own",
)
register_defence(
    "sande_family",
    sande_family,
    SandeConfig,
    paper_settings=("lora", "full"),
    description="SANDE with a family proxy target: parrot prompt, gate, overwrite SFT",
    knows=("family",),
    budget="own",
)
register_defence(
    "osft",
    osft,
    SandeConfig,
    paper_settings=("lora", "full"),
    description="overwrite SFT with the trigger known: x+t->y and x->y (an upper bound)",
    knows=("trigger",),
    budget="own",
)
