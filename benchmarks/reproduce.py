"""The paper's evaluation on SmolLM2 (Tables 2, 3, 4, 10, 11, Fig. 2): CSVs + markdown in results/reproduce/.

Presets: ``smoke`` (two suspicious models implanted in 60 steps, N = 2 short twins, 6-step repairs, 12
prompts: 24.9 min from a fresh clone with empty caches on 2026-12-02, when the machine ran at 2.50x the
reference step time, so about 10 min at reference speed) and ``full`` (every attack of the matrix, N = 6,
the paper's repair budget, 50 prompts: about 15 hours at reference speed; run it in slices with --targets).
Finished rows are cached under runs/reproduce/<preset>-<config hash>/rows, so an interrupted run resumes.
The same as ``bdvax reproduce``.

Usage: python benchmarks/reproduce.py [--preset smoke|full] [--tables table2_asr,...]
                                     [--targets a:t:s,...] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--tables", help="comma list (default: all)")
    ap.add_argument("--fresh", action="store_true", help="recompute cached rows")
    ap.add_argument(
        "--targets",
        help="comma list of attack:task:setting to run now (a slice of the preset, for Table 2 and "
        "Table 11's transfer targets; rows are "
        "cached per target, and the tables written are the whole preset's, rows not run "
        "yet left blank)",
    )
    ns = ap.parse_args()
    os.chdir(ROOT)  # the presets' runs/ and results/ paths are relative to the repository

    from bdvax_lab.core.models import use_all_cores

    sys.path.insert(0, str(ROOT))  # experiments/ lives in the checkout, not in the package
    from experiments.reproduce import PRESETS, TABLES, parse_targets, reproduce, splice_markdown

    if ns.preset not in PRESETS:
        ap.error(f"unknown preset {ns.preset!r}; presets: {list(PRESETS)}")
    try:
        over = {"targets": parse_targets(ns.targets)} if ns.targets else {}
    except ValueError as e:
        ap.error(str(e))
    use_all_cores()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine_speed import measure_in_subprocess

    speed = measure_in_subprocess()  # today's speed of this machine, printed beside the wall time
    t0 = time.time()
    frames = reproduce(
        ns.preset,
        tables=ns.tables.split(",") if ns.tables else TABLES,
        fresh=ns.fresh,
        command="python benchmarks/reproduce.py",
        **over,
    )
    tables_md = Path(PRESETS[ns.preset].out_dir) / "tables.md"
    if splice_markdown(ROOT / "RESULTS.md", f"reproduce:{ns.preset}", tables_md.read_text()):
        print(f"RESULTS.md: replaced the {ns.preset} tables")
    print(
        f"\n{ns.preset}: {len(frames)} tables in {(time.time() - t0) / 60:.1f} min "
        f"({' '.join(sys.argv)}; {time.strftime('%Y-%m-%d %H:%M')}; machine at {speed['slowdown']:.2f}× the "
        f"reference step time)"
    )


if __name__ == "__main__":
    main()
