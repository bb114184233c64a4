"""Wall time of each notebook at its DEFAULT parameters on the real model (the README's notebook table).

Runs the notebooks with papermill, one after another (never two at once on a 2-core CPU), into
runs/notebook_times/, and appends one row per run to results/notebook_times.csv: notebook, seconds, status
(ok / failed at cell N), date and whether its inputs were cached (a second run of 03 re-uses its twins).

Usage: python benchmarks/notebook_times.py [00 01 05 ...]   (default: every notebook)
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
OUT = ROOT / "results" / "notebook_times.csv"


def main() -> None:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    wanted = sys.argv[1:]
    notebooks = [p for p in sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb")) if not wanted or p.name[:2] in wanted]
    run_dir = ROOT / "runs" / "notebook_times"
    run_dir.mkdir(parents=True, exist_ok=True)
    env_threads = os.environ.get("BDVAX_NUM_THREADS", "all cores")
    new = not OUT.exists()
    with OUT.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["notebook", "seconds", "status", "date", "threads"])
        for nb in notebooks:
            t0 = time.time()
            status = "ok"
            try:
                pm.execute_notebook(
                    str(nb), str(run_dir / nb.name), kernel_name="bdvax", cwd=str(NB_DIR), progress_bar=False
                )
            except PapermillExecutionError as exc:
                status = f"failed at cell {exc.exec_count}: {exc.ename}"
            seconds = round(time.time() - t0, 1)
            w.writerow([nb.stem, seconds, status, time.strftime("%Y-%m-%d %H:%M"), env_threads])
            fh.flush()
            print(f"{nb.stem:28s} {seconds:7.1f} s  {status}", flush=True)


if __name__ == "__main__":
    main()
