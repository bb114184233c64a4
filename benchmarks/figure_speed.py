"""How long the signature figures and one explorer update take at the default model's size.

A speed target belongs here, not in a timed test: each figure should build in well under a second so
the explorer's sliders feel live (about 0.1 s on an idle 2-core machine). Prints one line per figure, the
median of ``--repeat`` builds after one warm-up; no model or training is involved.

Usage: python benchmarks/figure_speed.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from bdvax_lab.bdvax.config import SignatureConfig
    from bdvax_lab.bdvax.signature import Signature
    from bdvax_lab.viz import signature_viz as sv

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    layout = {
        "family": "llama",
        "n_blocks": 30,
        "hidden": 576,
        "d_ff": 1536,
        "n_heads": 9,
        "n_kv_heads": 3,
        "head_dim": 64,
        "blocks_path": "model.layers",
        "modules": {},
    }
    g = torch.Generator().manual_seed(0)
    from bdvax_lab.core.registry import MLP_KINDS as kinds

    norm = {(b, k): torch.rand(1536, generator=g) for b in range(30) for k in kinds}
    align = {(b, k): torch.rand(1536, generator=g) for b in range(30) for k in kinds}
    heads = {b: torch.rand(9, generator=g) for b in range(30)}
    meta = {"setting": "lora"}
    sig = Signature(norm, align, SignatureConfig(rho=0.35), layout, heads, dict(heads), meta=meta)
    sig = sig.select(rho=0.35, heads=8)
    sv.score_heatmap(sig)  # warm plotly's validators
    figures = {
        "score_heatmap(selected_mass)": lambda: sv.score_heatmap(sig, "selected_mass"),
        "channel_heatmap": lambda: sv.channel_heatmap(sig),
        "score_histogram": lambda: sv.score_histogram(sig),
        "layer_counts_figure": lambda: sv.layer_counts_figure(sig),
    }
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"{when}  signature figures at SmolLM2-135M size (median of {args.repeat})")
    for name, make in figures.items():
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            make()
            times.append(time.perf_counter() - t)
        print(f"  {name:32s} {statistics.median(times) * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
