"""Leave-one-variant-out calibration with attention heads in the budget: does any (ρ, heads) point remove
the defender's *own* held-out backdoors on a bench target?

The MLP-only calibration on the refusal target passes at no ρ (results/log/lovo-calibration-2026-12-06.md).
This runs the calibration with a head grid (``CalibrationConfig.heads``: the bench's twins and signature
recipe, no trigger) and prints the curve per (heads, ρ): mean and max held-out ASR of the defender's
variants, the skill proxy (clean drift, nats/token) and the perplexity ratio, then the budget the
calibration chooses. Points are cached by the calibration, so a rerun resumes; a rerun with other budgets
adds its points to the CSV. Writes results/lovo_heads-<target>[-seed<k>][-<recipe>].csv (or --out).

Usage: python benchmarks/lovo_heads.py [--target attack:task:setting:skill] [--heads 0,30,90,270]
       [--rhos 0.35,0.6,0.8,1.0] [--seed 0] [--recipe default] [--out CSV]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: the columns that name one point of the curve
KEY = ["heads", "rho"]


def main(argv: list[str] | None = None) -> int:
    from bdvax_lab.cli import head_budgets, number_list, rate
    from experiments.twin_recipes import RECIPES, recipe_config, recipe_start

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="badnets:refusal:lora:format")
    ap.add_argument("--seed", type=int, default=0, help="implant seed of the bench target")
    ap.add_argument(
        "--heads", type=head_budgets, default=(0, 30, 90, 270), help="head budgets (top-h over the model)"
    )
    ap.add_argument(
        "--rhos",
        type=number_list(rate, "0.01,0.35,0.8"),
        default=None,
        help="candidate ρ (default: the calibration's grid)",
    )
    ap.add_argument(
        "--recipe",
        default="default",
        choices=sorted(RECIPES),
        help="twin recipe of the signature and the held-out twins (experiments/twin_recipes.py)",
    )
    ap.add_argument(
        "--out", type=Path, help="CSV to write (default results/lovo_heads-<target>[-seed<k>][-<recipe>].csv)"
    )
    args = ap.parse_args(argv)

    import pandas as pd

    from bdvax_lab.bdvax.calibration import calibrate_rho
    from bdvax_lab.bdvax.config import CalibrationConfig
    from bdvax_lab.bdvax.signature import extract_signature
    from experiments.bench import Bench, BenchConfig
    from experiments.study import result_path, study_target, write_result

    study_target(ap, args.target)
    suffix = "" if args.recipe == "default" else f"-{args.recipe}"
    path = args.out or result_path("lovo_heads", args.target, args.seed or None, suffix)
    old = None
    if path.exists():  # checked before the calibration runs: only a curve of this script is merged into
        try:
            old = pd.read_csv(path)
        except Exception as e:
            ap.error(f"--out {path}: exists and is not a CSV ({type(e).__name__}); give another path")
        if not {*KEY, "mean_asr"} <= set(old.columns):
            ap.error(f"--out {path}: exists and is not a lovo_heads curve; give another path")
    sm, sig_cfg = Bench(BenchConfig(targets=(args.target,))).target_model(args.target, args.seed)
    sig_cfg = recipe_config(sig_cfg, args.recipe)
    start, pool = recipe_start(sm, args.recipe, sig_cfg.family)
    # the bench's twins (cached by its bdvax row, or twin_recipe.py)
    sig = extract_signature(start, sig_cfg, pool=pool)
    cal_cfg = CalibrationConfig(rhos=tuple(args.rhos) if args.rhos else None, heads=tuple(args.heads))
    t0 = time.time()
    res = calibrate_rho(start, sig, cal_cfg, signature_config=sig_cfg, pool=pool)
    out = res.summary()
    print(out.to_string(index=False), flush=True)
    print(f"chosen: ρ={res.rho:g}, {res.heads} heads, met={res.met} ({res.reason}); {time.time() - t0:.0f} s")
    print(f"points cached in {res.meta['cache']}")
    if old is not None:  # a rerun with other budgets adds its points to the curve; the new ones win
        keep = ~old.set_index(KEY).index.isin(out.set_index(KEY).index)
        out = pd.concat([old[keep], out]).sort_values(KEY).reset_index(drop=True)
    write_result(out, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
