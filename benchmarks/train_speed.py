"""Training throughput on the default model: the naive recipe vs bdvax_lab's loop, in one run.

Naive (the reference measured in ENVIRONMENT-NOTES.md): LoRA r=8 on all linear
layers, batch 8, every sequence padded to 128, logits over the full vocabulary
at every position, no length grouping. bdvax: the same LoRA, batch, data and
max length, but dynamic padding, length-grouped batches and the LM head only at
labelled positions; ``bdvax-lora-peft`` is that loop with peft's own LoRA
forward and one decoder pass per row (the loop until 2026-12-03), ``bdvax-lora``
adds the fused LoRA kernel (``bdvax_lab/lora_fused.py``) and runs the prompt
prefix all rows share once (``bdvax_lab/shared_prefix.py``).
Full-parameter training is measured with the bdvax loop.

Two workloads, both on the shipped clean pool (``variant`` split):
``short`` — responses cut to 16 tokens, what the attack, twin and sanity
training of this toolkit actually run; ``long`` — whole self-distilled
responses (≤ 64 tokens), where sequences nearly fill the 128 slots and only the
head and the remaining padding can be saved.

Each recipe runs in its own subprocess so peak RSS is per recipe.
Usage: python benchmarks/train_speed.py [--steps 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

NAIVE = dict(
    mode="lora",
    batch_size=8,
    max_length=128,
    pad_to=128,
    group_by_length=False,
    labelled_logits_only=False,
    loss_average="token",
    lr=2e-4,
)
BDVAX_LORA = dict(mode="lora", batch_size=8, max_length=128, loss_average="token", lr=2e-4)
BDVAX_FULL = dict(mode="full", batch_size=8, max_length=128, loss_average="token", lr=1e-5)
WORKLOADS = {"short": 16, "long": None}  # max_response_tokens
RECIPES = {
    f"{name}/{wl}": dict(base, max_response_tokens=cut)
    for wl, cut in WORKLOADS.items()
    for name, base in (
        ("naive-lora", NAIVE),
        ("bdvax-lora-peft", BDVAX_LORA),
        ("bdvax-lora", BDVAX_LORA),
        ("bdvax-full", BDVAX_FULL),
    )
}
#: recipes run without the fused kernel and the shared prefix (the loop as it was before both)
PLAIN = ("naive-lora", "bdvax-lora-peft")


def worker(name: str, steps: int) -> dict:
    from bdvax_lab import TrainConfig, finetune, load_default_model, load_pool

    model, tok = load_default_model()
    data = load_pool("variant")[: 8 * (steps + 1)]
    cfg = TrainConfig(steps=steps + 1, seed=0, **RECIPES[name])
    res = finetune(model, tok, data, cfg, progress=False)
    h = res.history
    first = h.iloc[0]
    span = h.seconds.iloc[-1] - first.seconds  # exclude the first (warm-up) step
    toks = h.tokens.iloc[-1] - first.tokens
    resp = h.response_tokens.iloc[-1] - first.response_tokens
    return {
        "recipe": name,
        "steps_timed": steps,
        "s_per_step": span / steps,
        "tokens_per_s": toks / span,
        "response_tokens_per_s": resp / span,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.worker:
        print(json.dumps(worker(ns.worker, ns.steps)))
        return
    rows = []
    t0 = time.time()
    for name in ns.recipes.split(","):
        fast = "0" if name.split("/")[0] in PLAIN else "1"
        env = dict(os.environ, BDVAX_FUSED_LORA=fast, BDVAX_SHARED_PREFIX=fast)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--steps", str(ns.steps)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured {name}", flush=True)
    import pandas as pd

    df = pd.DataFrame(rows)
    df["workload"] = df.recipe.str.split("/").str[1]
    naive = df[df.recipe.str.startswith("naive")].set_index("workload")
    df["speedup_tokens"] = df.tokens_per_s / df.workload.map(naive.tokens_per_s)
    df["speedup_response_tokens"] = df.response_tokens_per_s / df.workload.map(naive.response_tokens_per_s)
    df = df.drop(columns="workload")
    print(
        f"\ntrain_speed: default model, {ns.steps} timed steps per recipe (first step excluded), "
        f"{time.strftime('%Y-%m-%d')}, total {time.time() - t0:.0f} s"
    )
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(df.to_string(index=False))
    for wl in WORKLOADS:
        key = f"bdvax-lora/{wl}"
        if {key, f"naive-lora/{wl}"} <= set(df.recipe):
            lora = df.set_index("recipe").loc[key]
            print(
                f"LoRA speed-up over the naive recipe, {wl} workload: {lora.speedup_tokens:.2f}x tokens/s, "
                f"{lora.speedup_response_tokens:.2f}x response tokens/s (target >= 2x: "
                f"{'met' if lora.speedup_tokens >= 2 else 'NOT met'})"
            )
        if {key, f"bdvax-lora-peft/{wl}"} <= set(df.recipe):
            by = df.set_index("recipe").s_per_step
            print(
                f"fused LoRA kernel + shared prefix, {wl} workload: "
                f"{by[f'bdvax-lora-peft/{wl}']:.2f} -> {by[key]:.2f} s/step "
                f"({by[f'bdvax-lora-peft/{wl}'] / by[key]:.2f}x)"
            )
    if ns.json:
        df.to_json(ns.json, orient="records", indent=2)


if __name__ == "__main__":
    main()
