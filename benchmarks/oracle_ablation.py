"""Does zeroing a ranking's top adapter units remove the real backdoor? The oracles' own causal check.

Evaluation only (uses the true trigger). On one bench model (``--target``, implant ``--seed``), four
rankings are compared at the same counts, with no repair:

- ``activation_oracle``: attribution patching of activations (:func:`~bdvax_lab.analysis.probes.
  attribution.oracle_attribution`, the oracle of ``benchmarks/twin_recipe.py``);
- ``weight_oracle``: the first-order effect of zeroing each adapter slice (:func:`~bdvax_lab.analysis.
  probes.lora_oracle.lora_oracle`); ``--ig-steps K`` adds ``weight_oracle_ig``, the same slices scored by
  integrated gradients over ``K`` points from the adapter switched off to the suspicious model (for a
  saturated behaviour, where the first-order scores sum to far less than switching the adapter off does);
- ``signature``: BD-VAX's scores with the bench's recipe (cached twins); ``--recipes default,attn_only``
  adds ``signature_<recipe>`` for each other twin recipe of ``experiments/twin_recipes.py``;
- ``top_delta``: ‖ΔW‖ per channel / head of the suspicious update;
- ``random`` (``--random-seeds``): the chance level.

The oracles read ``--pairs`` held-out prompts; ASR is measured on the next ``--prompts`` ones (disjoint).
Writes results/oracle_ablation-<target>-seed<k>.csv (:data:`~bdvax_lab.analysis.unit_ablation.
ABLATION_COLUMNS`); a rerun with other budgets adds its rows and replaces those of the same budgets.

    python benchmarks/oracle_ablation.py [--target badnets:sentiment:lora:format] [--seed 0]
       [--channel-shares 0.01,0.05] [--head-shares 0.1] [--prompts 100] [--random-seeds 0,1,2]
       [--recipes default] [--ig-steps 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from bdvax_lab.cli import nonneg_int, number_list, rate
    from experiments.twin_recipes import recipe_config, recipe_list, recipe_start

    shares = number_list(rate, "0.01,0.05", empty=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="badnets:sentiment:lora:format")
    ap.add_argument("--seed", type=int, default=0, help="implant seed of the bench target")
    ap.add_argument("--channel-shares", type=shares, default=[0.01, 0.05], help="shares of MLP channels")
    ap.add_argument("--head-shares", type=shares, default=[0.1], help="shares of attention heads")
    ap.add_argument("--pairs", type=int, default=32, help="held-out prompt pairs the oracles read")
    ap.add_argument("--prompts", type=int, default=100, help="held-out prompts for ASR (after the pairs)")
    ap.add_argument("--random-seeds", type=number_list(nonneg_int, "0,1,2"), default=[0, 1, 2])
    ap.add_argument(
        "--recipes",
        type=recipe_list,
        default=["default"],
        help="twin recipes whose signatures are ranked (experiments/twin_recipes.py)",
    )
    ap.add_argument(
        "--ig-steps",
        type=nonneg_int,
        default=0,
        help="also rank by the integrated-gradients weight oracle over this many points (0: not)",
    )
    args = ap.parse_args(argv)

    import pandas as pd

    from bdvax_lab.analysis.probes.attribution import oracle_attribution
    from bdvax_lab.analysis.probes.lora_oracle import lora_oracle
    from bdvax_lab.analysis.ranking import head_matrix
    from bdvax_lab.analysis.unit_ablation import ablate_rankings
    from bdvax_lab.baselines.controls import delta_channel_scores, delta_head_scores
    from bdvax_lab.bdvax.signature import extract_signature
    from experiments.bench import Bench, BenchConfig
    from experiments.study import oracle_inputs, result_path, study_target, write_result

    attack, task, _, _ = study_target(ap, args.target, "the ablation zeroes adapter slices")
    try:  # before the model, which may have to be implanted
        pairs, trig, target, asr_prompts = oracle_inputs(attack, task, args.pairs, args.prompts)
    except ValueError as e:
        ap.error(f"--pairs {args.pairs} + --prompts {args.prompts}: {e}")
    sm, cfg = Bench(BenchConfig(targets=(args.target,))).target_model(args.target, args.seed)

    t0 = time.time()
    act = oracle_attribution(sm.model, sm.tokenizer, pairs, trig, target)
    wgt = lora_oracle(sm.model, sm.tokenizer, trig, target)
    oracles = {"weight_oracle": wgt}
    if args.ig_steps:
        oracles["weight_oracle_ig"] = lora_oracle(sm.model, sm.tokenizer, trig, target, steps=args.ig_steps)
    for name, o in oracles.items():
        m = o.meta
        print(
            f"{name}: scores sum to {m['total']:.3f} nats; switching the adapter off changes the "
            f"behaviour's log-probability by {m['m_off'] - m['m_on']:+.3f} (from {m['m_on']:.3f})"
        )
    shape = tuple(act.meta["heads"].shape)
    rankings = {
        "activation_oracle": {"channel": act.tensor, "head": act.meta["heads"]},
        **{name: {"channel": o.tensor, "head": o.meta["heads"]} for name, o in oracles.items()},
    }
    for recipe in args.recipes:  # twins cached with the bench's recipe (or trained now for another one)
        start, pool = recipe_start(sm, recipe, cfg.family)
        sig = extract_signature(start, recipe_config(cfg, recipe), pool=pool)
        name = "signature" if recipe == "default" else f"signature_{recipe}"
        rankings[name] = {"channel": sig.scores, "head": head_matrix(sig.head_scores, shape)}
    rankings |= {
        "top_delta": {
            "channel": delta_channel_scores(sm.model),
            "head": head_matrix(delta_head_scores(sm.model), shape),
        },
    }
    print(f"rankings: {time.time() - t0:.0f} s")
    n_ch, n_hd = act.tensor.numel(), act.meta["heads"].numel()
    frames = []
    budgets = [("channel", round(s * n_ch)) for s in args.channel_shares] + [
        ("head", round(s * n_hd)) for s in args.head_shares
    ]
    for i, (unit, n) in enumerate(budgets):
        df = ablate_rankings(
            sm.model,
            sm.tokenizer,
            rankings,
            {unit: n},
            attack=attack,
            task=task,
            prompts=asr_prompts,
            random_seeds=args.random_seeds,
            baseline=i == 0,
        )
        frames.append(df)
        print(
            df[["ranking", "seed", "unit", "n_units", "asr", "asr_lo", "asr_hi", "false_trigger"]].to_string()
        )
    out_df = pd.concat(frames, ignore_index=True).assign(target=args.target, implant_seed=args.seed)
    out = result_path("oracle_ablation", args.target, args.seed)
    if out.is_file():  # keep an earlier run's other budgets (same model and rankings: cached, seeded)
        old = pd.read_csv(out)
        done = set(zip(out_df.unit, out_df.n_units))
        keep = [(u, n) not in done for u, n in zip(old.unit, old.n_units)]
        out_df = pd.concat([old[keep], out_df], ignore_index=True)
    write_result(out_df, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
