"""The default adapter-setting BD-VAX pipeline on SmolLM2: per-stage wall time, peak RSS, quality.

Makes (or re-uses) a BadNets suspicious LoRA model, then runs `purify` with N variants: twins (cached per
run in a fresh cache dir so they are really trained), scores, suppression, repair, and the before /
suppressed / after evaluation. Prints the stage table and checks the issue's targets: total ≤ 20 min,
scoring + suppression ≤ 2 % of the total, peak RSS ≤ 4 GB; and the quality target ASR ≤ 10 % with
false-trigger ≤ 5 % and utility within 2 points MCQ / 5 % perplexity (general text set) of the suspicious
model. Also records ``bdvax plan``'s prediction per stage, fed by the reference workload timed on the
pipeline's code path in the same run.

Usage: python benchmarks/pipeline.py [--task refusal] [--setting lora|full] [--rho 0.8] [--n-variants 6]
       [--heads H] [--suspicious DIR]
The full setting uses the paper's ρ (3 %) unless --rho is given; its twins are full finetunes.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def keep_twins(tmp_cache: Path) -> int:
    """Move the freshly trained twin entries into the shared bdvax cache (never over an existing entry)."""
    from bdvax_lab.bdvax.twins import twin_cache_root

    shared, moved = twin_cache_root(), 0
    for entry in sorted(tmp_cache.glob("*/variant-*")):
        dest = shared / entry.parent.name / entry.name
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(entry), str(dest))
            moved += 1
    shutil.rmtree(tmp_cache, ignore_errors=True)
    return moved


def run_tag(ns: argparse.Namespace) -> str:
    """The file-name suffix naming every non-default knob.

    So a variant run never overwrites the default one.
    """
    parts = [
        f"-heads{ns.heads}" if ns.heads else "",
        f"-N{ns.n_variants}" if ns.n_variants != 6 else "",
        f"-rho{ns.rho:g}" if ns.rho is not None else "",
        f"-twin{ns.twin_steps}" if ns.twin_steps else "",
    ]
    return "".join(parts)


#: the plan's stage → the pipeline's timing key
PLAN_STAGES = {"twins": "signature", "repair": "repair", "evaluation": "evaluation"}


def plan_check(
    setting: str, cfg: object, sm: object, reference_step_s: float, timings: dict[str, float]
) -> dict[str, dict[str, float]]:
    """``bdvax plan``'s seconds for this run's exact workload on this machine (its speed measured in the same
    run) against the measured stages: issue 33 asks for every ratio within 0.7–1.3."""
    from bdvax_lab.bdvax.plan import SMOLLM2_135M, Hardware, PlanConfig, plan, reference_gflops
    from bdvax_lab.threat.suspicious import eval_skill

    over: dict[str, object] = {"dtype_bytes": 4, "eval_stages": len(cfg.evaluate)}
    if eval_skill(sm) is None:  # a backdoor-only model: the evaluation measures no skill
        over["n_skill"] = 0
    work = PlanConfig.from_pipeline(setting, cfg.signature, cfg.repair, cfg.eval, **over)
    hw = Hardware(cpu_gflops=reference_gflops(reference_step_s), train_mfu=1.0, gen_mfu=1.0)
    df, _ = plan(dict(SMOLLM2_135M), work, hw, name="SmolLM2-135M")
    out = {}
    for stage, key in PLAN_STAGES.items():
        pred = float(df.loc[df.stage == stage, "seconds"].iloc[0])
        meas = float(timings.get(key, float("nan")))
        out[stage] = {
            "predicted_s": round(pred, 1),
            "measured_s": round(meas, 1),
            "ratio": round(pred / meas, 3),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="refusal")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--setting", default="lora", choices=("lora", "full"))
    ap.add_argument(
        "--rho",
        type=float,
        default=None,
        help="default: bdvax_lab.demo.DEMO_RHO (lora) / the paper's 0.03 (full)",
    )
    ap.add_argument("--n-variants", type=int, default=6)
    ap.add_argument("--heads", type=int, default=0, help="top-h attention heads suppressed too (default 0)")
    ap.add_argument("--n-prompts", type=int, default=50)
    ap.add_argument("--twin-steps", type=int, help="poisoned-twin steps (default: the twin recipe's 60)")
    ap.add_argument(
        "--suspicious", help="existing suspicious artifact (default: runs/attack_matrix/... or train one)"
    )
    ap.add_argument("--out", default=str(ROOT / "runs" / "pipeline"))
    ap.add_argument(
        "--json", help="default: results/pipeline-<attack>-<task>-<setting>[-<non-default knobs>].json"
    )
    ns = ap.parse_args()

    import pandas as pd

    from bdvax_lab import EvalConfig, PurifyConfig, RepairConfig, SignatureConfig, open_or_make_suspicious
    from bdvax_lab.bdvax.purify import purify
    from bdvax_lab.threat.suspicious import suspicious_dir

    sys.path.insert(0, str(ROOT))  # experiments/ lives in the checkout, not in the package
    from experiments.demo import DEMO_RHO

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine_speed import measure_in_subprocess

    speed = measure_in_subprocess()  # before anything else, in a child process: today's speed of this machine
    # the same workload on the pipeline's own code path (fused LoRA, shared prefix): what the plan is fed
    calib = measure_in_subprocess(steps=8, path="pipeline")
    rho = ns.rho if ns.rho is not None else (DEMO_RHO if ns.setting == "lora" else None)
    tag = run_tag(ns)
    ns.json = ns.json or str(ROOT / "results" / f"pipeline-{ns.attack}-{ns.task}-{ns.setting}{tag}.json")
    t0 = time.time()
    sus_dir = Path(ns.suspicious or suspicious_dir(ROOT / "runs", ns.attack, ns.task, ns.setting))
    if not (sus_dir / "manifest.json").exists():
        print(f"no suspicious model at {sus_dir}: training one (~2.5 min)", flush=True)
    sm = open_or_make_suspicious(sus_dir, ns.attack, ns.task, ns.setting)  # the one shared opener
    t_attack = time.time() - t0
    cache = Path(tempfile.mkdtemp(prefix="bdvax-twins-"))
    from bdvax_lab.bdvax.config import default_twin_train

    twin = default_twin_train(ns.setting).replace(steps=ns.twin_steps) if ns.twin_steps else None
    cfg = PurifyConfig(
        signature=SignatureConfig(
            family=ns.task, n_variants=ns.n_variants, rho=rho, twin_train=twin, heads=ns.heads
        ),
        repair=RepairConfig(),
        eval=EvalConfig(n_prompts=ns.n_prompts),
    )
    res = purify(sm, config=cfg, out=ns.out, cache_dir=cache, progress=False)
    kept = keep_twins(
        cache
    )  # the twins were really trained here; the notebooks and `bdvax purify` can reuse them
    timings = dict(res.timings)
    total = timings.get("total", sum(v for k, v in timings.items() if k != "total"))
    rep = res.report
    print(
        f"\npipeline: {ns.attack}-{ns.task}, {ns.setting} setting, N={ns.n_variants}, rho={rho}, "
        f"heads {ns.heads}, repair lr {res.repair.lr if res.repair else 'n/a'}, {time.strftime('%Y-%m-%d')}"
    )
    with pd.option_context(
        "display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format
    ):
        print(rep.to_string())
    print(
        "\nstage seconds:",
        {k: round(v, 1) for k, v in timings.items()},
        f"(attack step {t_attack:.0f} s, not counted)",
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    sig_share = float(res.signature.meta.get("seconds", {}).get("scoring", float("nan")))
    before, after = rep.loc["suspicious"], rep.loc["purified"]
    checks = {
        "total <= 20 min": total <= 1200,
        "peak RSS <= 4 GB": peak <= 4.0,
        "scoring + suppression <= 2%": (
            timings.get("suppression", 0) + (sig_share if sig_share == sig_share else 0)
        )
        <= 0.02 * total,
        "ASR <= 10%": after.get("asr", 1) <= 0.10,
        "false-trigger <= 5%": after.get("false_trigger", 1) <= 0.05,
        "MCQ within 2 points": abs(after.get("mcq_acc", 0) - before.get("mcq_acc", 0)) <= 0.02,
        # on the general text set: the old short-answer set rewards any pull back toward plain text
        "text perplexity within 5%": after.get("ppl_text", 1e9) <= 1.05 * before.get("ppl_text", 0),
    }
    checks = {k: bool(v) for k, v in checks.items()}  # numpy bools would serialise as strings
    print(
        f"peak RSS {peak:.2f} GB; total {total / 60:.1f} min; scoring {sig_share:.1f} s; "
        f"{kept} twin entries kept in the shared cache"
    )
    print(
        f"machine speed today: {speed['slowdown']:.2f}× the 2026-11-23 reference step time "
        "→ the total would be "
        f"{total / 60 / speed['slowdown']:.1f} min at reference speed (the check above uses the raw total)"
    )
    for k, v in checks.items():
        print(f"  {'met ' if v else 'MISS'}  {k}")
    predicted = plan_check(ns.setting, cfg, sm, calib["pipeline_step_s"], timings)
    peft_path = plan_check(ns.setting, cfg, sm, speed["reference_step_s"], timings)
    print(
        f"bdvax plan's prediction from the pipeline-path step ({calib['pipeline_step_s']:.3f} s), per stage "
        f"(predicted / measured; from the peft-path step {speed['reference_step_s']:.3f} s in brackets):"
    )
    for stage, row in predicted.items():
        print(
            f"  {stage:<11} {row['predicted_s']:7.0f} s / {row['measured_s']:7.0f} s = {row['ratio']:.2f}"
            f"  ({peft_path[stage]['ratio']:.2f})"
        )
    Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.json).write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "rho": rho,
                "n_variants": ns.n_variants,
                "heads": ns.heads,
                "machine_speed": speed,
                "total_min_at_reference_speed": round(total / 60 / speed["slowdown"], 1),
                "timings": timings,
                "peak_rss_gb": peak,
                "rss_mb_after_stage": res.rss_mb,
                "checks": checks,
                "plan": predicted,
                "plan_step": calib,
                "plan_from_reference_path": peft_path,
                "report": json.loads(rep.to_json(orient="index")),
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
