"""How fast is this machine today? One fixed LoRA training workload on SmolLM2, in seconds per step.

The same 2-core machine kind ran identical work up to 2.2× slower on some days than on others (RESULTS.md §3),
so every timed benchmark here records this figure beside its own: a wall time is comparable across days only
together with the speed of the day. The workload is the reference one, measured at 1.1 s per step on
2026-11-23: a LoRA step (r = 8 on every projection), batch 4, clean-pool examples with responses cut to 16
tokens, loss averaged per sample. One warm-up step, then ``steps`` timed ones. It runs with peft's own LoRA
forward and one decoder pass per row (``BDVAX_FUSED_LORA=0``, ``BDVAX_SHARED_PREFIX=0``), as the
reference did, so the figure measures the machine, not the loop.

``--path pipeline`` times the same workload on the code path the toolkit runs by default (fused LoRA, shared
prompt prefix), the median of ``steps`` steps. That is the figure to plan from (``bdvax plan
--reference-step-s``): the plan's stages run that path, and on 2026-12-06 the peft path read 1.30 s and
1.41 s within 15 minutes while the pipeline's stages kept their pace (results/readings/plan-check.md).

Usage: python benchmarks/machine_speed.py [--steps 4] [--path reference|pipeline]
"""

from __future__ import annotations

import argparse
import json
import time

#: seconds per step of this workload in the 2026-11-23 reference measurement
#: ("LoRA step, batch 4, responses ≤ 16 tokens")
REFERENCE_STEP_S = 1.1


#: environment of each code path: the reference one is peft's forward, one decoder pass per row
PATHS = {
    "reference": {"BDVAX_FUSED_LORA": "0", "BDVAX_SHARED_PREFIX": "0"},
    "pipeline": {"BDVAX_FUSED_LORA": "1", "BDVAX_SHARED_PREFIX": "1"},
}


def reference_step_seconds(steps: int = 4, stat: str = "mean") -> float:
    """Wall seconds per LoRA step of the fixed workload, the ``stat`` (mean or median) of ``steps`` steps
    after one warm-up step, on whichever code path the environment selects (see :data:`PATHS`)."""
    if stat not in ("mean", "median"):
        raise ValueError(f"stat must be 'mean' or 'median', got {stat!r}")
    from bdvax_lab.core.data import load_pool
    from bdvax_lab.core.models import load_default_model
    from bdvax_lab.training.config import TrainConfig
    from bdvax_lab.training.loop import finetune

    model, tok = load_default_model()
    examples = load_pool("variant")[: 4 * (steps + 1)]
    cfg = TrainConfig(
        mode="lora",
        lr=1e-4,
        steps=steps + 1,
        batch_size=4,
        max_response_tokens=16,
        loss_average="sample",
        group_by_length=False,
        seed=0,
    )
    hist = finetune(model, tok, examples, cfg, progress=False).history
    if stat == "median":
        return float(hist.seconds.diff().iloc[1:].median())
    return float((hist.seconds.iloc[-1] - hist.seconds.iloc[0]) / steps)


def speed_record(steps: int = 4, path: str = "reference") -> dict[str, float]:
    """``{"reference_step_s", "slowdown"}`` (reference path) or ``{"pipeline_step_s"}`` (pipeline path).

    Today's seconds per step; on the reference path also its ratio to :data:`REFERENCE_STEP_S`.
    """
    t = time.time()
    if path == "pipeline":
        s = reference_step_seconds(steps, stat="median")
        rec = {"pipeline_step_s": round(s, 3), "steps": steps, "measured_in_s": round(time.time() - t, 1)}
        print(f"machine speed: the reference workload on the pipeline's path, {s:.3f} s a step", flush=True)
        return rec
    s = reference_step_seconds(steps)
    rec = {
        "reference_step_s": round(s, 3),
        "slowdown": round(s / REFERENCE_STEP_S, 2),
        "measured_in_s": round(time.time() - t, 1),
    }
    print(
        f"machine speed: reference LoRA step {s:.2f} s (ENVIRONMENT-NOTES 2026-11-23: {REFERENCE_STEP_S} s) "
        f"→ {rec['slowdown']:.2f}× the reference time",
        flush=True,
    )
    return rec


def measure_in_subprocess(steps: int = 4, path: str = "reference") -> dict[str, float]:
    """:func:`speed_record` in a child process, so its memory never counts in the caller's peak RSS."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, **PATHS[path])
    run = subprocess.run(
        [sys.executable, __file__, "--steps", str(steps), "--path", path, "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    if run.returncode != 0:
        raise RuntimeError(
            f"benchmarks/machine_speed.py failed (exit {run.returncode}): {run.stderr.strip()[-500:]}"
        )
    out = run.stdout.strip().splitlines()
    print(out[-2] if len(out) > 1 else "", flush=True)
    return json.loads(out[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--path", default="reference", choices=sorted(PATHS), help="code path to time")
    ap.add_argument("--json", action="store_true", help="also print the record as one JSON line (last line)")
    ns = ap.parse_args()
    import os

    os.environ.update(PATHS[ns.path])  # the path's environment, also when run by hand
    record = speed_record(ns.steps, ns.path)
    if ns.json:
        print(json.dumps(record))
