"""Does the signature find something the finetune's own update does not already show?

``top_delta`` ranks channels and heads by the suspicious update's own ‖ΔW‖ (no twins, no variants). If the
signature mostly re-ranks those same units, zeroing it deletes the most-changed part of the finetune (and
the skill with it) rather than localising the backdoor. For one bench target (adapter setting) this reads
the bench's signature (its twins are cached by the bench, or trained now) and prints, for MLP channels and
attention heads:

- Spearman's rank correlation between the signature's scores and ``top_delta``'s, over all units, and per
  MLP module (median, min, max);
- at each budget, the share of the signature's selection that ``top_delta``'s selection of the same size
  also holds (channels: the per-module top ρ; heads: the top k of the model), beside the share a random
  selection of that size would have (``chance``).

No trigger is used: both rankings are the defender's own. Writes
results/signature_vs_delta-<target>-seed<k>.csv (columns: unit, measure, budget, value, chance).

Usage: python benchmarks/signature_vs_delta.py [--target attack:task:lora:skill] [--seed 0]
       [--rhos 0.1,0.3,0.5,0.8] [--heads 27,90]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from bdvax_lab.cli import number_list, positive_int, rate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="badnets:sentiment:lora:format")
    ap.add_argument("--seed", type=int, default=0, help="implant seed of the bench target")
    ap.add_argument("--rhos", type=number_list(rate, "0.1,0.8"), default=[0.1, 0.3, 0.5, 0.8])
    ap.add_argument(
        "--heads", type=number_list(positive_int, "27,90"), default=[27, 90], help="head budgets (top k)"
    )
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from bdvax_lab.analysis.ranking import head_matrix, rank_correlation, selection_share, top_set
    from bdvax_lab.baselines.controls import delta_channel_scores, delta_head_scores
    from bdvax_lab.bdvax.signature import extract_signature
    from bdvax_lab.weights.selection import select_channels
    from experiments.bench import Bench, BenchConfig, parse_target

    try:
        _, _, setting, _ = parse_target(args.target)
    except ValueError as e:
        ap.error(str(e))
    if setting != "lora":
        ap.error(
            f"--target {args.target}: top_delta needs the base model in the full setting; give a lora target"
        )
    sm, cfg = Bench(BenchConfig(targets=(args.target,))).target_model(args.target, args.seed)
    sig = extract_signature(sm, cfg, progress=False)
    delta = delta_channel_scores(sm.model)
    rows = []

    def add(unit: str, measure: str, value: float, budget: float | None = None, chance: float | None = None):
        rows.append({"unit": unit, "measure": measure, "budget": budget, "value": value, "chance": chance})

    keys = sorted(sig.scores)

    def flat(scores: dict) -> torch.Tensor:
        return torch.cat([scores[k].double() for k in keys])

    add("channel", "rank_correlation", rank_correlation(flat(sig.scores), flat(delta)))
    per = pd.Series([rank_correlation(sig.scores[k], delta[k]) for k in keys])
    for stat in ("median", "min", "max"):
        add("channel", f"rank_correlation_module_{stat}", float(getattr(per, stat)()))
    for rho in args.rhos:
        mine, theirs = select_channels(sig.scores, rho, "module"), select_channels(delta, rho, "module")
        n = {k: mine[k].numel() for k in keys}
        chance = sum(n[k] * n[k] / sig.scores[k].numel() for k in keys) / max(1, sum(n.values()))
        add("channel", "shared_share", selection_share(mine, theirs), rho, chance)

    shape = (sig.layout["n_blocks"], sig.layout["n_heads"])
    hs, hd = head_matrix(sig.head_scores, shape), head_matrix(delta_head_scores(sm.model), shape)
    add("head", "rank_correlation", rank_correlation(hs, hd))
    for k in args.heads:
        if k > hs.numel():
            ap.error(f"--heads {k}: the model has {hs.numel()} heads")
        shared = (top_set(hs, k) & top_set(hd, k)).sum().item() / k
        add("head", "shared_share", shared, k, k / hs.numel())

    df = pd.DataFrame(rows).assign(target=args.target, implant_seed=args.seed)
    print(df.drop(columns=["target", "implant_seed"]).round(3).to_string(index=False))
    out = ROOT / "results" / f"signature_vs_delta-{args.target.replace(':', '-')}-seed{args.seed}.csv"
    df.to_csv(out, index=False)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
