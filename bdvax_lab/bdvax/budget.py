"""Trying a selection on a model: suppress, briefly repair, measure.

And the ρ curve: the same against ρ, for the signature and a random control.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd

from ..threat.evaluate import BACKDOOR_COLUMNS
from ..threat.suspicious import as_suspicious

STAGE_COLUMNS = [
    *BACKDOOR_COLUMNS,
    "ppl",
    "mcq_acc",
    "skill",
    "skill_kept",
    "n_channels",
    "n_heads",
    "repair_steps",
    "repair_lr",
    "seconds",
]


# =========================================================================== compute helpers
def _eval_config(eval_config: Any = None, n_prompts: int = 16) -> Any:
    from ..threat.config import EvalConfig

    return eval_config or EvalConfig(
        n_prompts=n_prompts, max_new_tokens=12, batch_size=16, utility=("ppl",), n_ppl=16, ppl_max_tokens=48
    )


def _selection_size(selection: Any) -> tuple[int, int]:
    ch = sum(int(v.numel()) for v in (getattr(selection, "selected", None) or {}).values())
    hd = sum(int(v.numel()) for v in (getattr(selection, "selected_heads", None) or {}).values())
    return ch, hd


def try_selection(
    suspicious: Any,
    selection: Any,
    *,
    prompts: Sequence[Any] | None = None,
    n_prompts: int = 16,
    attack: Any = None,
    task: Any = None,
    repair_steps: int = 20,
    repair_data: Sequence[Any] | None = None,
    repair_config: Any = None,
    eval_config: Any = None,
    suppress_config: Any = None,
    baseline: dict[str, Any] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Suppress ``selection`` in a copy of the suspicious model, optionally repair briefly, measure.

    ``suspicious``: SuspiciousModel, (model, tokenizer) or artifact path; its
    weights are never changed. ``selection``: a selected Signature or a
    :class:`~bdvax_lab.signature.Selection` (e.g. a random control).
    ``attack``/``task`` (evaluation only; default: the manifest's) give ASR and
    false-trigger rate on ``prompts`` (default: the first ``n_prompts`` held-out
    prompts). ``repair_steps`` > 0 runs that many clean repair steps (batch 4,
    responses ≤ 16 tokens, the paper's lr: 2e-4 LoRA / 1e-5 full) on
    ``repair_data`` (default: the defender's ``repair`` instructions answered by the suspicious model); 0
    skips the repair.
    ``repair_config``: a :class:`~bdvax_lab.purify.RepairConfig` to start from
    instead (lr, batch, ...); its ``steps`` are set to ``repair_steps``.
    ``baseline``: an already measured "suspicious" row to reuse.

    Returns one row per stage ("suspicious", "suppressed"[, "purified"]) with
    the evaluation summary, ``n_channels``, ``n_heads``, ``repair_steps``,
    ``repair_lr`` and ``seconds``. Cost on SmolLM2 (LoRA, 16 prompts, 12 new
    tokens): a few seconds per evaluated stage plus about a second per repair step.
    """
    from ..core.models import working_copy
    from ..core.registry import setting_of
    from ..threat.evaluate import eval_prompts, evaluate_model
    from ..training.config import RepairConfig
    from ..training.repair import repair
    from ..weights.config import SuppressConfig
    from ..weights.suppression import suppress

    sm = as_suspicious(suspicious)
    model, tok, manifest = sm.model, sm.tokenizer, dict(sm.manifest or {})
    attack = attack if attack is not None else manifest.get("attack")
    task = task if task is not None else manifest.get("task")
    if (attack is None) != (task is None):
        attack = task = None
    ecfg = _eval_config(eval_config, n_prompts)
    prompts = list(prompts) if prompts is not None else eval_prompts(task, ecfg.n_prompts)
    setting = setting_of(model)
    if getattr(selection, "selected", None) is None:
        if not hasattr(selection, "select"):
            raise TypeError(
                f"try_selection: expected a selected Signature or a Selection, got {type(selection).__name__}"
            )
        selection = selection.select()  # an unselected Signature: its own config's ρ / scope / heads
    n_ch, n_hd = _selection_size(selection)
    rows: dict[str, dict[str, Any]] = {}

    def measure(stage: str, m: Any, extra: dict[str, Any]) -> None:
        t = time.time()
        s = dict(
            evaluate_model(
                m, tok, attack, task, ecfg, label=stage, prompts=prompts, progress=progress
            ).summary
        )
        s.pop("model", None)
        rows[stage] = {**s, **extra, "seconds": round(extra.get("seconds", 0.0) + time.time() - t, 2)}

    if baseline is not None:
        rows["suspicious"] = dict(baseline)
    else:
        measure("suspicious", model, {"n_channels": 0, "n_heads": 0, "repair_steps": 0, "repair_lr": None})
    t0 = time.time()
    # adapter setting: zeroing touches lora_A/B and the repair trains lora_ tensors only, so the base is
    # shared
    adapter_only = setting == "lora" and (repair_config is None or (repair_config.mode or "lora") == "lora")
    work = working_copy(model, share_frozen_base=adapter_only)
    suppress(work, selection, suppress_config or SuppressConfig(), setting=setting)
    measure(
        "suppressed",
        work,
        {
            "n_channels": n_ch,
            "n_heads": n_hd,
            "repair_steps": 0,
            "repair_lr": None,
            "seconds": time.time() - t0,
        },
    )
    if repair_steps and repair_steps > 0:
        t0 = time.time()
        if (
            repair_data is None
        ):  # the defender's instructions, answered by the suspicious model (not the copy)
            from ..core.selfdistill import defender_data

            n = repair_config.n_samples if repair_config is not None else 200
            repair_data = defender_data(model, tok, n=n, progress=progress)
        if repair_config is not None:
            rcfg = repair_config.replace(steps=int(repair_steps))
        else:
            n = len(repair_data) if repair_data is not None else 200
            rcfg = RepairConfig(
                n_samples=max(1, min(200, n)), steps=int(repair_steps), batch_size=4, max_response_tokens=16
            )
        rep = repair(work, tok, repair_data, rcfg, progress="repair" if progress else False)
        work = rep.model
        measure(
            "purified",
            work,
            {
                "n_channels": n_ch,
                "n_heads": n_hd,
                "repair_steps": rep.steps,
                "repair_lr": rep.lr,
                "seconds": time.time() - t0,
            },
        )
    del work
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "stage"
    first = [c for c in STAGE_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def rho_curve(
    suspicious: Any,
    signature: Any,
    rhos: Sequence[float] = (0.35, 0.5, 0.65, 0.8, 0.9),
    *,
    scope: str | None = None,
    heads: int | None = None,
    random_seeds: Sequence[int] = (0,),
    prompts: Sequence[Any] | None = None,
    n_prompts: int = 16,
    attack: Any = None,
    task: Any = None,
    repair_steps: int = 0,
    repair_data: Sequence[Any] | None = None,
    eval_config: Any = None,
    progress: bool = True,
) -> pd.DataFrame:
    """ASR / false-trigger / utility against ρ: the signature's top-ρ channels vs random channels.

    For each ρ: the signature re-selected at that ρ (``scope``/``heads`` default
    to its current selection's) and, per seed in ``random_seeds``, a random
    control with exactly the same per-module and per-block counts. Each point is
    a suppressed copy of the model (``repair_steps`` = 0: before any repair, the
    cleanest read of the score's signal), evaluated on the same prompts. The
    suspicious model itself is the ρ = 0 point of both curves. Columns: rho,
    selection ("signature" / "random"), seed, n_channels, n_heads, asr,
    false_trigger, degenerate counts, ppl (also as ``utility``), seconds.
    Cost on SmolLM2 (LoRA, 16 prompts): a few seconds per point.
    """
    from tqdm.auto import tqdm

    base = signature if getattr(signature, "selected", None) is not None else signature.select()
    sel = dict(base.selection or {})
    scope = scope or sel.get("scope", "module")
    heads = sel.get("heads", 0) if heads is None else heads
    ecfg = _eval_config(eval_config, n_prompts)
    sm = as_suspicious(suspicious)
    model, tok, manifest = sm.model, sm.tokenizer, dict(sm.manifest or {})
    attack = attack if attack is not None else manifest.get("attack")
    task = task if task is not None else manifest.get("task")
    pair = (model, tok)
    first = try_selection(
        pair,
        base.select(rho=0.0, heads=0),
        prompts=prompts,
        attack=attack,
        task=task,
        repair_steps=0,
        eval_config=ecfg,
    )
    baseline = first.loc["suspicious"].to_dict()
    rows = [{"rho": 0.0, "selection": s, "seed": None, **baseline} for s in ("signature", "random")]
    jobs = [(float(r), "signature", None) for r in rhos] + [
        (float(r), "random", int(s)) for r in rhos for s in random_seeds
    ]
    stage = "purified" if repair_steps else "suppressed"
    for rho, kind, seed in tqdm(jobs, desc="ρ curve", disable=not progress, leave=False):
        s = base.select(rho=rho, scope=scope, heads=heads)
        selection = s if kind == "signature" else s.random_control(seed=seed)
        df = try_selection(
            pair,
            selection,
            prompts=prompts,
            attack=attack,
            task=task,
            repair_steps=repair_steps,
            repair_data=repair_data,
            eval_config=ecfg,
            baseline=baseline,
        )
        rows.append({"rho": rho, "selection": kind, "seed": seed, **df.loc[stage].to_dict()})
    out = pd.DataFrame(rows)
    if "ppl" in out.columns:
        out["utility"] = out["ppl"]
    lead = [
        "rho",
        "selection",
        "seed",
        "n_channels",
        "n_heads",
        "asr",
        "false_trigger",
        "degenerate_triggered",
        "degenerate_clean",
        "utility",
        "ppl",
    ]
    lead = [c for c in lead if c in out.columns]
    return (
        out[lead + [c for c in out.columns if c not in lead]]
        .sort_values(["selection", "rho"], kind="stable")
        .reset_index(drop=True)
    )


# =========================================================================== widget plumbing
@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run small tensor work single-threaded.

    Re-selection takes milliseconds on one thread, but multi-threaded sorts stall for seconds on a CPU
    whose cores a training job is using (oversubscription).
    """
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)
