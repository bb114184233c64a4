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
  selection of that size would have (``chance``);
- the same rank correlation for the two parts of the twin differences
  (:mod:`bdvax_lab.analysis.factor_split`): ``own_part`` (each channel's own slice of the LoRA factor)
  and ``shared_part`` (the shared factor's change read through the channel's existing weight, which
  follows ‖ΔW‖ by construction), and between the signature and its own part.

No trigger is used: the rankings are the defender's own. Writes
results/signature_vs_delta-<target>-seed<k>.csv (columns: unit, measure, budget, value, chance).

``--oracle`` (evaluation only: it reads the true trigger) also scores each ranking against the weight
oracle (:func:`~bdvax_lab.analysis.probes.lora_oracle.lora_oracle`, ``--pairs`` held-out triggered
prompts): precision@k, AUROC and mass@k (the oracle's first-order effect of zeroing the ranking's top k)
at each ``--oracle-shares`` top set, beside random rankings. Writes
results/signature_vs_delta_oracle-<target>-seed<k>.csv (:data:`~bdvax_lab.analysis.ranking.
OVERLAP_COLUMNS` plus unit and share). With ``--oracle-steps K`` the oracle is the integrated-gradients
one (``K`` points from the adapter switched off; for a saturated behaviour, where first order sees little),
written to ...-seed<k>-ig<K>.csv.

Usage: python benchmarks/signature_vs_delta.py [--target attack:task:lora:skill] [--seed 0]
       [--rhos 0.1,0.3,0.5,0.8] [--heads 27,90]
       [--oracle [--oracle-shares 0.01,0.05,0.2] [--pairs 32] [--oracle-steps 8]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from bdvax_lab.cli import nonneg_int, number_list, positive_int, rate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="badnets:sentiment:lora:format")
    ap.add_argument("--seed", type=int, default=0, help="implant seed of the bench target")
    ap.add_argument("--rhos", type=number_list(rate, "0.1,0.8"), default=[0.1, 0.3, 0.5, 0.8])
    ap.add_argument(
        "--heads", type=number_list(positive_int, "27,90"), default=[27, 90], help="head budgets (top k)"
    )
    ap.add_argument(
        "--oracle", action="store_true", help="also score against the weight oracle (true trigger)"
    )
    ap.add_argument(
        "--oracle-shares",
        type=number_list(rate, "0.01,0.05,0.2"),
        default=[0.01, 0.05, 0.2],
        help="sizes of the oracle's top set, as shares of the units",
    )
    ap.add_argument(
        "--pairs", type=positive_int, default=32, help="held-out triggered prompts for the oracle"
    )
    ap.add_argument(
        "--oracle-steps",
        type=nonneg_int,
        default=0,
        help="0: the first-order weight oracle; K: integrated gradients over K points",
    )
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from bdvax_lab.analysis.factor_split import split_scores
    from bdvax_lab.analysis.ranking import head_matrix, rank_correlation, selection_share, top_set
    from bdvax_lab.baselines.controls import delta_channel_scores, delta_head_scores
    from bdvax_lab.bdvax.signature import extract_signature
    from bdvax_lab.core.registry import layout_of
    from bdvax_lab.weights.factored import load_delta
    from bdvax_lab.weights.selection import select_channels
    from experiments.bench import Bench, BenchConfig
    from experiments.study import result_path, study_target, write_result

    attack, task, _, _ = study_target(ap, args.target, "top_delta needs the base model in the full setting")
    sm, cfg = Bench(BenchConfig(targets=(args.target,))).target_model(args.target, args.seed)
    layout = layout_of(sm.model)
    shape = (layout.n_blocks, layout.n_heads)
    for k in args.heads:  # before the twins, which may have to be trained
        if k > layout.n_blocks * layout.n_heads:
            ap.error(f"--heads {k}: the model has {layout.n_blocks * layout.n_heads} heads")
    sig = extract_signature(sm, cfg, progress=False)
    delta = delta_channel_scores(sm.model)
    own, shared = split_scores(load_delta(p) for p in sig.meta["cache"])
    rows = []

    def add(unit: str, measure: str, value: float, budget: float | None = None, chance: float | None = None):
        rows.append({"unit": unit, "measure": measure, "budget": budget, "value": value, "chance": chance})

    keys = sorted(sig.scores)

    def flat(scores: dict) -> torch.Tensor:
        return torch.cat([scores[k].double() for k in keys])

    add("channel", "rank_correlation", rank_correlation(flat(sig.scores), flat(delta)))
    add("channel", "rank_correlation_own_part", rank_correlation(flat(own), flat(delta)))
    add("channel", "rank_correlation_shared_part", rank_correlation(flat(shared), flat(delta)))
    add("channel", "signature_vs_own_part", rank_correlation(flat(sig.scores), flat(own)))
    per = pd.Series([rank_correlation(sig.scores[k], delta[k]) for k in keys])
    for stat in ("median", "min", "max"):
        add("channel", f"rank_correlation_module_{stat}", float(getattr(per, stat)()))
    for rho in args.rhos:
        mine, theirs = select_channels(sig.scores, rho, "module"), select_channels(delta, rho, "module")
        n = {k: mine[k].numel() for k in keys}
        chance = sum(n[k] * n[k] / sig.scores[k].numel() for k in keys) / max(1, sum(n.values()))
        add("channel", "shared_share", selection_share(mine, theirs), rho, chance)

    hs, hd = head_matrix(sig.head_scores, shape), head_matrix(delta_head_scores(sm.model), shape)
    add("head", "rank_correlation", rank_correlation(hs, hd))
    for k in args.heads:
        both = (top_set(hs, k) & top_set(hd, k)).sum().item() / k
        add("head", "shared_share", both, k, k / hs.numel())

    df = pd.DataFrame(rows).assign(target=args.target, implant_seed=args.seed)
    print(df.drop(columns=["target", "implant_seed"]).round(3).to_string(index=False))
    write_result(df, result_path("signature_vs_delta", args.target, args.seed))
    if args.oracle:
        rankings = {
            "channel": {"signature": sig.scores, "top_delta": delta, "own_part": own, "shared_part": shared},
            "head": {"signature": hs, "top_delta": hd},
        }
        odf = oracle_overlap(sm, attack, task, rankings, args.oracle_shares, args.pairs, args.oracle_steps)
        show = odf.groupby(["unit", "share", "ranking"], sort=False)[["precision_at_k", "auroc", "mass_at_k"]]
        print(show.mean().round(3).to_string())
        write_result(
            odf.assign(target=args.target, implant_seed=args.seed),
            result_path(
                "signature_vs_delta_oracle",
                args.target,
                args.seed,
                f"-ig{args.oracle_steps}" if args.oracle_steps else "",
            ),
        )
    return 0


def oracle_overlap(
    sm: Any, attack: str, task: str, rankings: dict, shares: list, n_pairs: int, steps: int = 0
) -> Any:
    """Every ranking against the weight oracle's top set at each share of the units (evaluation only: the
    oracle reads ``n_pairs`` held-out prompts carrying the true trigger; ``steps`` as
    :func:`~bdvax_lab.analysis.probes.lora_oracle.lora_oracle`'s); three random rankings beside."""
    import pandas as pd

    from bdvax_lab.analysis.probes.lora_oracle import lora_oracle
    from bdvax_lab.analysis.ranking import ranking_overlap
    from experiments.study import oracle_inputs

    _, trig, target, _ = oracle_inputs(attack, task, n_pairs)
    wgt = lora_oracle(sm.model, sm.tokenizer, trig, target, steps=steps)
    m = wgt.meta
    print(f"switching the adapter off: {m['m_off'] - m['m_on']:+.3f} nats (from {m['m_on']:.3f})")
    oracles = {"channel": wgt.tensor, "head": wgt.meta["heads"]}
    frames = []
    for unit, oracle in oracles.items():
        print(f"weight oracle, {unit}s: total {float(oracle.sum()):.3f} nats over {oracle.numel()} units")
        for share in shares:
            n_top = max(1, round(share * oracle.numel()))
            df = ranking_overlap(
                oracle, {"oracle": oracle, **rankings[unit]}, n_top=n_top, ks=[n_top], random_seeds=(0, 1, 2)
            )
            frames.append(df.assign(unit=unit, share=share))
    return pd.concat(frames, ignore_index=True)


if __name__ == "__main__":
    sys.exit(main())
