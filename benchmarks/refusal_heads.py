"""Why BD-VAX at ρ = 0.8 leaves the BadNets-refusal backdoor on SmolLM2: MLP channels vs attention heads.

Uses the suspicious model of the attack matrix and the N = 6 twins of the default pipeline (cached by
`benchmarks/pipeline.py` or notebook 03; trained here if missing, ~10 min). For each selection: suppress in a
copy of the model, no repair, ASR / false-trigger / perplexity on held-out prompts; the signature against a
random control with the same counts. Writes results/refusal_heads.csv.

Usage: python benchmarks/refusal_heads.py [--n-prompts 32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--suspicious", default=str(ROOT / "runs" / "attack_matrix" / "badnets-refusal-lora"))
    ns = ap.parse_args()

    import pandas as pd

    from bdvax_lab import EvalConfig, SignatureConfig, extract_signature, load_suspicious
    from bdvax_lab.artifacts import atomic_write_text
    from bdvax_lab.models import use_all_cores
    from bdvax_lab.purify import defence_view
    from bdvax_lab.widgets import try_selection

    use_all_cores()
    sm = load_suspicious(ns.suspicious)
    view = defence_view(sm, "lora")
    sig = extract_signature((view.model, view.tokenizer), SignatureConfig(family="refusal", n_variants=6, rho=0.8),
                            progress=False)
    n_heads = sum(int(t.numel()) for t in sig.head_norm.values())
    ecfg = EvalConfig(n_prompts=ns.n_prompts, max_new_tokens=24, utility=("ppl",), n_ppl=32)
    grid = [(0.8, 0), (1.0, 0), (0.0, 30), (0.0, 90), (0.0, n_heads), (0.8, 30), (0.8, 90), (1.0, n_heads)]
    rows, base = [], None
    for rho, heads in grid:
        sel = sig.select(rho=max(rho, 0.0), heads=heads)
        for kind, selection in (("signature", sel), ("random", sel.random_control(seed=0))):
            if kind == "random" and (rho >= 1.0 or rho == 0.0) and heads in (0, n_heads):
                continue  # nothing random about all-or-nothing
            t0 = time.time()
            df = try_selection(sm, selection, n_prompts=ns.n_prompts, repair_steps=0, eval_config=ecfg,
                               baseline=base)
            base = df.loc["suspicious"].to_dict()
            r = df.loc["suppressed"]
            rows.append({"rho": rho, "heads": heads, "selection": kind, "asr": r.asr, "asr_hi": r.asr_hi,
                         "false_trigger": r.false_trigger, "ppl": r.ppl, "n_channels": r.n_channels,
                         "n_heads": r.n_heads, "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)
    out = pd.DataFrame(rows)
    s = df.loc["suspicious"]
    print(f"suspicious: ASR {s.asr:.2f} FTR {s.false_trigger:.2f} ppl {s.ppl:.3f}")
    atomic_write_text(ROOT / "results" / "refusal_heads.csv", out.to_csv(index=False))
    print(out.to_string())


if __name__ == "__main__":
    main()
