"""How much does zeroing 3 % of the MLP channels hurt a model, by how the channels are chosen?

The full-setting pruning baselines of Table 2 (RESULTS.md §4) zero a fraction ρ of each MLP projection's
channels (gate/up rows, down columns) before their repair. This script measures, with no repair, the
perplexity of held-out clean replies after zeroing ρ of the channels of every module, chosen

* by lowest weight L2 norm (``magnitude_prune``'s score), in gate, up or down alone and in all three;
* by lowest Wanda score per module (``fine_prune(score="module")``), likewise;
* by lowest channel Wanda score ``‖a_j‖₂·Σ_i|W_down[i, j]|`` shared by the block's three modules
  (``fine_prune``'s default, ``score="channel"``);
* at random, with the same counts (seeded);

and, as a check that the scores rank something, by *highest* magnitude and highest per-module Wanda score.
It prints one line per selection and writes a CSV. Wanda statistics come from the repair split of the clean
pool (the examples fine-pruning calibrates on). About 1.5 min on SmolLM2 at reference speed.

Usage: python benchmarks/prune_damage.py [--model DIR] [--rho 0.03] [--n-eval 32]
                                         [--out results/prune_damage.csv]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def measure(model_dir: str | None, rho: float, n_eval: int, n_calib: int, seed: int) -> pd.DataFrame:
    """One row per selection.

    Columns ``selection``, ``modules``, ``n_channels``, ``ppl`` (no repair) and ``base_ppl``.
    """
    import pandas as pd

    from bdvax_lab.baselines.fine_prune import wanda_scores
    from bdvax_lab.baselines.magnitude import magnitude_channel_scores
    from bdvax_lab.core.data import load_pool
    from bdvax_lab.core.models import load_default_model, load_model
    from bdvax_lab.core.registry import layout_of
    from bdvax_lab.threat.evaluate import perplexity
    from bdvax_lab.weights.selection import random_selection, select_lowest
    from bdvax_lab.weights.suppression import reinit_channels

    model, tok = load_default_model() if model_dir is None else load_model(model_dir)
    held_out = load_pool("eval")[:n_eval]
    calib = load_pool("repair")[:n_calib]
    base = perplexity(model, tok, held_out)
    scores = {
        "magnitude": magnitude_channel_scores(model),
        "wanda per module": wanda_scores(model, tok, calib, score="module"),
        "wanda per channel": wanda_scores(model, tok, calib, score="channel"),
    }
    random_sel = random_selection(layout_of(model), rho, "module", seed=seed).selected
    plans: list[tuple[str, str, dict]] = []
    for name in ("magnitude", "wanda per module"):
        for kinds in (("gate",), ("up",), ("down",), ("gate", "up", "down")):
            plans.append(
                (
                    f"lowest {name}",
                    "+".join(kinds),
                    select_lowest({k: v for k, v in scores[name].items() if k[1] in kinds}, rho=rho),
                )
            )
        plans.append(
            (
                f"highest {name}",
                "gate+up+down",
                select_lowest({k: -v for k, v in scores[name].items()}, rho=rho),
            )
        )
    plans.append(
        ("lowest wanda per channel", "gate+up+down", select_lowest(scores["wanda per channel"], rho=rho))
    )
    plans.append((f"random (seed {seed})", "gate+up+down", random_sel))
    rows = []
    for selection, modules, sel in plans:
        m = copy.deepcopy(model)
        reinit_channels(m, sel, init="zero")  # what the pruning baselines do in the full setting
        rows.append(
            {
                "selection": selection,
                "modules": modules,
                "rho": rho,
                "n_channels": sum(int(v.numel()) for v in sel.values()),
                "ppl": perplexity(m, tok, held_out),
                "base_ppl": base,
            }
        )
        print(f"{selection:28s} {modules:13s} ppl {rows[-1]['ppl']:10.2f}  (base {base:.2f})", flush=True)
        del m
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a plain safetensors model directory (default: SmolLM2)")
    ap.add_argument(
        "--rho", type=float, default=0.03, help="fraction of each module's channels (default 0.03)"
    )
    ap.add_argument("--n-eval", type=int, default=32, help="held-out clean replies for the perplexity")
    ap.add_argument("--n-calib", type=int, default=200, help="repair-split examples for the Wanda statistics")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/prune_damage.csv")
    a = ap.parse_args(argv)
    if not 0.0 < a.rho < 1.0:
        ap.error(f"--rho {a.rho}: must be in (0, 1)")
    from bdvax_lab.core.artifacts import atomic_write_text

    t0 = time.time()
    df = measure(a.model, a.rho, a.n_eval, a.n_calib, a.seed)
    df["date"] = dt.date.today().isoformat()
    out = Path(a.out)
    atomic_write_text(out, df.to_csv(index=False))
    print(f"wrote {out} ({len(df)} rows) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
