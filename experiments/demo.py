"""``bdvax demo``: the main job on the default model.

Loads (on first use: converts) SmolLM2-135M-Instruct, answers a few questions,
implants a BadNets → refusal backdoor in a LoRA adapter (the measured attack
recipe, ~2.5 min), then purifies it with BD-VAX without reading the attack
(synthetic refusal-family variants, differential-delta signature, suppression,
repair) and prints the before / suppressed / after table. ``quick=True`` uses 3
variants and a shorter repair for a first look (~8 min instead of ~20).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Give me two tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
)


#: Signature fraction used by the demo and the pipeline benchmark. The paper's 35% (LoRA, LLaMA-2-7B) is far
#: from enough on SmolLM2 (ENVIRONMENT-NOTES.md: ASR 0.84 at 35%, 0.00 from 80% before any repair).
DEMO_RHO = 0.8
#: The skill the demo's suspicious finetune teaches beside its backdoor (the cheaper of the two to implant).
DEMO_SKILL = "format"


def run_demo(
    purify_model: bool = True,
    quick: bool = False,
    out: str = "runs/demo",
    chat_only: bool = False,
    n_variants: int | None = None,
    twin_steps: int | None = None,
    repair_epochs: float | None = None,
    n_prompts: int = 50,
    attack_steps: int | None = None,
    rho: float | None = None,
    heads: int = 0,
    task: str = "refusal",
    skill: str | None = DEMO_SKILL,
) -> int:
    from bdvax_lab.bdvax.config import SignatureConfig, default_twin_train
    from bdvax_lab.core.generate import generate
    from bdvax_lab.core.models import load_default_model
    from bdvax_lab.viz.tables import frame_text

    n_var, epochs = (3, 2.0) if quick else (6, 5.0)
    n_var = n_variants or n_var
    epochs = repair_epochs or epochs
    rho = DEMO_RHO if rho is None else rho
    twin = default_twin_train("lora")
    if twin_steps:
        twin = twin.replace(steps=twin_steps)
    # built first, so a bad --rho / --heads / --n-variants fails before any model is loaded
    from bdvax_lab.threat.attacks import resolve_task

    family = resolve_task(task).judge  # the behaviour family the defender fears (insult for sentiment)
    sig_cfg = SignatureConfig(family=family, n_variants=n_var, rho=rho, heads=heads, twin_train=twin)
    t0 = time.time()
    model, tok = load_default_model()
    print(f"loaded SmolLM2-135M-Instruct in {time.time() - t0:.1f} s")
    for prompt, reply in zip(DEMO_PROMPTS, generate(model, tok, list(DEMO_PROMPTS), max_new_tokens=64)):
        print(f"\nUser: {prompt}\nSmolLM2: {reply}")
    if chat_only:
        return 0
    from bdvax_lab.threat.config import EvalConfig
    from bdvax_lab.threat.suspicious import open_or_make_suspicious

    out_dir = Path(out)
    sus_dir = out_dir / f"suspicious-{task}-{skill or 'backdoor-only'}"
    what = f"a finetune that teaches the {skill} skill and carries" if skill else "a finetune carrying only"
    print(
        f"\nRe-using the suspicious model in {sus_dir}"
        if (sus_dir / "manifest.json").exists()
        else f"\n[1/2] Implanting {what} a BadNets → {task} backdoor (LoRA, the measured recipe)...",
        flush=True,
    )
    del (
        model
    )  # the shared opener loads its own copy; it also refuses a model of another --attack-steps budget
    sm = open_or_make_suspicious(
        sus_dir,
        "badnets",
        task,
        "lora",
        steps=attack_steps or None,
        skill=skill,
        n_prompts=n_prompts,
        progress=True,
    )
    ev = sm.manifest.get("eval", {})
    if ev:
        print(
            f"suspicious model: ASR {ev['asr']:.2f}, false-trigger {ev['false_trigger']:.2f}"
            + (f", skill {ev['skill']:.2f}" if "skill" in ev else "")
        )
    if not purify_model:
        return 0
    from bdvax_lab.bdvax.config import PurifyConfig
    from bdvax_lab.bdvax.purify import purify
    from bdvax_lab.threat.evaluate import BACKDOOR_COLUMNS
    from bdvax_lab.training.config import RepairConfig

    print(
        f"\n[2/2] BD-VAX purification: {n_var} synthetic {family}-family variants, rho={rho}"
        f"{f' + {heads} attention heads' if heads else ''}, repair {epochs:g} epochs on 200 clean samples. "
        "The defence never reads the attack.",
        flush=True,
    )
    ecfg = EvalConfig(n_prompts=n_prompts)
    cfg = PurifyConfig(signature=sig_cfg, repair=RepairConfig(epochs=epochs), eval=ecfg)
    res = purify(sm, config=cfg, out=out_dir / f"purified-{task}-{skill or 'backdoor-only'}")
    report = res.report
    if skill:  # the control that costs the skill: throw the finetune away
        from bdvax_lab.baselines.config import BaselineConfig
        from bdvax_lab.baselines.defend import defend
        from bdvax_lab.threat.evaluate import skill_kept

        dis = defend(sm, "discard", config=BaselineConfig(eval=ecfg, evaluate=("defended",)), progress=False)
        row = dis.report.loc[["defended"]].rename(index={"defended": "discard (control)"})
        row["skill_kept"] = skill_kept(row["skill"].iloc[0], report.loc["suspicious", "skill"])
        report = pd.concat([report, row[[c for c in row.columns if c in report.columns]]])
    cols = [
        c
        for c in (
            *BACKDOOR_COLUMNS,
            "skill",
            "skill_kept",
            "ppl",
            "mcq_acc",
        )
        if c in report.columns
    ]
    print(
        f"\nBefore / after (BadNets → {task}, {n_prompts} held-out prompts with and without the key, greedy, "
        f"through the chat template; skill: {skill or 'none'}):"
    )
    print(frame_text(report[cols].reset_index()))
    print("stage seconds:", {k: round(v) for k, v in res.timings.items()}, f"| repair lr {res.repair.lr:g}")
    from bdvax_lab.core.artifacts import write_json

    record = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "bdvax demo"
        + (f" --task {task}" if task != "refusal" else "")
        + (" --quick" if quick else ""),
        "skill": skill,
        "task": task,
        "rho": rho,
        "n_variants": n_var,
        "repair_epochs": epochs,
        "n_prompts": n_prompts,
        "report": {str(k): v for k, v in report[cols].to_dict("index").items()},
        "seconds": {k: round(v, 1) for k, v in res.timings.items()},
    }
    write_json(
        out_dir / "demo.json", record
    )  # what tools/make_results.py renders into README (copied to results/)
    return 0
