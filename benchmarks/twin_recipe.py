"""How well does the signature find the backdoor's own channels, and how much does the twin recipe matter?

For one bench target this computes, once, two oracles with the *true* trigger (evaluation only, the
defence never sees them): attribution patching of activations
(:func:`bdvax_lab.analysis.probes.attribution.oracle_attribution`) and, in the adapter setting, the
first-order effect of zeroing each adapter slice
(:func:`bdvax_lab.analysis.probes.lora_oracle.lora_oracle`; column ``oracle``). Then, per twin recipe, the
signature's precision@k and AUROC against each oracle's top set, beside
``top_delta`` (the suspicious update's largest channels, no twins) and ``random`` (five seeds). MLP channels
(top set: 1 % of them) and attention heads (top set: 10 %) are scored apart.

The recipes vary one thing each against the bench's own (:meth:`experiments.bench.Bench._signature_config`):
``equal_steps`` (the clean twin trains as many steps as the poisoned one, not the same epochs), the twins'
``lr`` and ``steps`` halved or doubled, ``n_clean`` 20 per variant, and ``N`` 3 variants. Twins are cached
per recipe, so a rerun resumes and the bench's own twins are reused by ``default``. This is a proxy: it
says which recipe ranks the oracle's channels best, not which purifies best after repair.

Writes results/twin_recipe-<target>-seed<k>.csv (one row per oracle × recipe × ranking × seed × k × unit).

Usage: python benchmarks/twin_recipe.py [--target attack:task:setting:skill] [--seed 0]
       [--recipes default,equal_steps,...] [--pairs 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: share of the units in the oracle's top set, per kind of unit
TOP_SHARE = {"channel": 0.01, "head": 0.10}


def overlap(oracle: Any, rankings: dict[str, Any], unit: str, seeds: range) -> Any:
    """:func:`ranking_overlap` with this script's top-set share for ``unit``; a ``unit`` column added."""
    from bdvax_lab.analysis.ranking import ranking_overlap

    n_top = max(1, round(oracle.numel() * TOP_SHARE[unit]))
    df = ranking_overlap(oracle, rankings, n_top=n_top, random_seeds=seeds)
    return df.assign(unit=unit)


def main(argv: list[str] | None = None) -> int:
    from experiments.twin_recipes import RECIPES, recipe_config, recipe_list, recipe_start

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="badnets:sentiment:lora:format")
    ap.add_argument("--seed", type=int, default=0, help="implant seed of the bench target")
    ap.add_argument("--recipes", type=recipe_list, default=list(RECIPES), help="comma list (default: all)")
    ap.add_argument("--pairs", type=int, default=32, help="held-out prompt pairs for the oracle")
    args = ap.parse_args(argv)

    import pandas as pd

    from bdvax_lab.analysis.probes.attribution import oracle_attribution
    from bdvax_lab.analysis.probes.lora_oracle import lora_oracle
    from bdvax_lab.analysis.ranking import head_matrix
    from bdvax_lab.baselines.controls import delta_channel_scores, delta_head_scores
    from bdvax_lab.bdvax.signature import extract_signature
    from experiments.bench import Bench, BenchConfig
    from experiments.study import oracle_inputs, result_path, study_target, write_result

    attack, task, _, _ = study_target(ap, args.target)
    sm, base_cfg = Bench(BenchConfig(targets=(args.target,))).target_model(args.target, args.seed)

    t0 = time.time()
    clean, trig, target, _ = oracle_inputs(attack, task, args.pairs)
    act = oracle_attribution(sm.model, sm.tokenizer, clean, trig, target)
    oracles = {"activation": (act.tensor, act.meta["heads"])}
    if sm.setting == "lora":
        wgt = lora_oracle(sm.model, sm.tokenizer, trig, target)
        oracles["weight"] = (wgt.tensor, wgt.meta["heads"])
    print(f"oracles: {time.time() - t0:.0f} s ({args.pairs} pairs, the true trigger; evaluation only)")
    shape = tuple(act.meta["heads"].shape)
    controls = {
        "channel": {"top_delta": delta_channel_scores(sm.model)},
        "head": {"top_delta": head_matrix(delta_head_scores(sm.model), shape)},
    }
    frames = []
    for oname, (mlp, heads) in oracles.items():
        got = [overlap(mlp, controls["channel"], "channel", range(5))]
        got.append(overlap(heads, controls["head"], "head", range(5)))
        frames += [f.assign(recipe="(control)", seconds=None, oracle=oname) for f in got]

    for name in args.recipes:
        cfg = recipe_config(base_cfg, name)
        t = time.time()
        start, pool = recipe_start(sm, name, cfg.family)
        sig = extract_signature(start, cfg, pool=pool)  # twins cached per recipe
        secs = round(time.time() - t, 1)
        sig_heads = head_matrix(sig.head_scores, shape)
        for oname, (mlp, heads) in oracles.items():
            got = [
                overlap(mlp, {"signature": sig.scores}, "channel", range(0)),
                overlap(heads, {"signature": sig_heads}, "head", range(0)),
            ]
            frames += [f.assign(recipe=name, seconds=secs, oracle=oname) for f in got]
            auc = {f.unit.iloc[0]: f.auroc.iloc[0] for f in got}
            print(
                f"{name:>13} vs {oname} oracle: AUROC channels {auc['channel']:.3f}, heads {auc['head']:.3f}"
                f" ({secs:.0f} s)"
            )

    df = pd.concat(frames, ignore_index=True)
    first = df[df.k == df.n_top]
    table = first.groupby(["oracle", "unit", "recipe", "ranking"])[["precision_at_k", "auroc"]].agg(
        ["mean", "std"]
    )
    print(table.round(3).to_string())
    write_result(df, result_path("twin_recipe", args.target, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
