"""Why BD-VAX at ρ = 0.8 leaves the BadNets-refusal backdoor on SmolLM2: MLP channels vs attention heads.

Uses the suspicious model of the attack matrix and the N = 6 twins of the default pipeline (cached by
`benchmarks/pipeline.py` or notebook 03; trained here if missing, ~10 min). For each selection: suppress in a
copy of the model, no repair, ASR / false-trigger / perplexity on held-out prompts; the signature against a
random control with the same counts. Writes results/refusal_heads.csv.

With ``--repair`` each selection is also repaired with the pipeline's default repair (RepairConfig(): 200
clean samples × 5 epochs at lr 2e-4) and measured with the pipeline's evaluation (50 prompts, perplexity and
MCQ), so the signature and its random control are compared after repair too (~15 min per selection at
reference speed);
that run writes results/refusal_heads_repaired.csv. ``--grid 0.8:90,0.8:0`` picks the (ρ, heads) points.

``--task sentiment`` / ``--setting full`` run the same comparison on another BadNets model of the attack
matrix (the defence then fears that task's family), writing
results/random_control-<task>-<setting>[_repaired].csv;
in the full setting suppression re-initialises the channels, as `bdvax purify` does.

Usage: python benchmarks/refusal_heads.py [--n-prompts N] [--repair] [--grid RHO:HEADS,...]
       [--task refusal|sentiment] [--setting lora|full]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_grid(text: str) -> list[tuple[float, int]]:
    """``"0.8:90,0.8:0"`` → [(0.8, 90), (0.8, 0)]; argparse turns a ValueError into a one-line error."""
    points = []
    for item in text.split(","):
        rho, _, heads = item.strip().partition(":")
        try:
            points.append((float(rho), int(heads or 0)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad grid point {item!r}: expected RHO:HEADS, e.g. 0.8:90"
            ) from None
        if not 0.0 <= points[-1][0] <= 1.0 or points[-1][1] < 0:
            raise argparse.ArgumentTypeError(f"bad grid point {item!r}: RHO in [0, 1], HEADS >= 0")
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n-prompts", type=int, help="held-out prompts (default 32; 50 with --repair, as the pipeline)"
    )
    ap.add_argument(
        "--task", default="refusal", help="BadNets model of this task; also the family the defence fears"
    )
    ap.add_argument("--setting", default="lora", choices=("lora", "full"))
    ap.add_argument(
        "--suspicious",
        help="an existing suspicious artifact (default: the attack matrix's BadNets "
        "model of --task and --setting, trained there if missing)",
    )
    ap.add_argument(
        "--repair", action="store_true", help="also repair each selection (the pipeline's RepairConfig())"
    )
    ap.add_argument(
        "--grid", type=parse_grid, help="comma-separated RHO:HEADS points (default: the built-in grid)"
    )
    ns = ap.parse_args()

    import pandas as pd

    from bdvax_lab import (
        EvalConfig,
        RepairConfig,
        SignatureConfig,
        extract_signature,
        load_suspicious,
        open_or_make_suspicious,
    )
    from bdvax_lab.bdvax.budget import try_selection
    from bdvax_lab.bdvax.purify import defence_view
    from bdvax_lab.core.artifacts import atomic_write_text
    from bdvax_lab.core.models import use_all_cores
    from bdvax_lab.threat.suspicious import suspicious_dir

    use_all_cores()
    if ns.suspicious:  # the user's artifact: opened, never trained into
        sm = load_suspicious(ns.suspicious)
    else:
        sm = open_or_make_suspicious(
            suspicious_dir(ROOT / "runs", "badnets", ns.task, ns.setting), "badnets", ns.task, ns.setting
        )
    view = defence_view(sm)  # the setting read off the model, so a --suspicious of either setting works
    sig = extract_signature(
        (view.model, view.tokenizer), SignatureConfig(family=ns.task, n_variants=6, rho=0.8), progress=False
    )
    n_heads = sum(int(t.numel()) for t in sig.head_norm.values())
    if ns.repair:  # the pipeline's own evaluation and repair, so rows compare with benchmarks/pipeline.py
        ecfg, rcfg = EvalConfig(n_prompts=ns.n_prompts or 50), RepairConfig()
        repair_steps = rcfg.total_steps()
    else:
        ecfg = EvalConfig(n_prompts=ns.n_prompts or 32, max_new_tokens=24, utility=("ppl",), n_ppl=32)
        rcfg, repair_steps = None, 0
    grid = ns.grid or [
        (0.8, 0),
        (1.0, 0),
        (0.0, 30),
        (0.0, 90),
        (0.0, n_heads),
        (0.8, 30),
        (0.8, 90),
        (1.0, n_heads),
    ]
    rows, base = [], None
    for rho, heads in grid:
        sel = sig.select(rho=max(rho, 0.0), heads=heads)
        for kind, selection in (("signature", sel), ("random", sel.random_control(seed=0))):
            if kind == "random" and (rho >= 1.0 or rho == 0.0) and heads in (0, n_heads):
                continue  # nothing random about all-or-nothing
            t0 = time.time()
            df = try_selection(
                sm,
                selection,
                n_prompts=ecfg.n_prompts,
                repair_steps=repair_steps,
                eval_config=ecfg,
                repair_config=rcfg,
                baseline=base,
            )
            seconds = round(
                time.time() - t0, 1
            )  # the whole try (suppress, repair, evaluate): on both stage rows
            base = df.loc["suspicious"].to_dict()
            for stage in [s for s in ("suppressed", "purified") if s in df.index]:
                r = df.loc[stage]
                rows.append(
                    {
                        "rho": rho,
                        "heads": heads,
                        "selection": kind,
                        "stage": stage,
                        "asr": r.asr,
                        "asr_hi": r.asr_hi,
                        "false_trigger": r.false_trigger,
                        "degenerate_triggered": r.get("degenerate_triggered"),
                        "ppl": r.ppl,
                        "mcq_acc": r.get("mcq_acc"),
                        "n_channels": r.n_channels,
                        "n_heads": r.n_heads,
                        "repair_steps": r.get("repair_steps"),
                        "seconds": seconds,
                    }
                )
                print(rows[-1], flush=True)
    out = pd.DataFrame(rows)
    s = df.loc["suspicious"]
    print(f"suspicious: ASR {s.asr:.2f} FTR {s.false_trigger:.2f} ppl {s.ppl:.3f} MCQ {s.get('mcq_acc')}")
    default = (ns.task, ns.setting) == ("refusal", "lora")
    stem = "refusal_heads" if default else f"random_control-{ns.task}-{ns.setting}"
    name = f"{stem}_repaired.csv" if ns.repair else f"{stem}.csv"
    atomic_write_text(ROOT / "results" / name, out.to_csv(index=False))
    print(out.to_string())


if __name__ == "__main__":
    main()
