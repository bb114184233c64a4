"""Evaluation speed: the bench's ASR generation with and without the shared template head, as ratios.

Generates greedy replies for the held-out prompts with and without a BadNets key (the bench's ASR and
false-trigger workload) on the default model (optionally with a suspicious artifact's adapter), in
interleaved repeats (A, B, A, B, ...) so that a machine whose speed drifts affects both alike, and
prints the seconds of each and their ratio. The replies are compared too: the fast path must not change them.

Usage: python benchmarks/eval_speed.py [--suspicious DIR] [--n-prompts 200] [--max-new-tokens 32]
       [--repeats 2] [--out results/eval_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suspicious", help="a suspicious artifact directory (its adapter is attached)")
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="results/eval_speed.json")
    ns = ap.parse_args()

    from bdvax_lab.core.artifacts import write_json
    from bdvax_lab.core.generate import generate
    from bdvax_lab.core.models import load_default_model, use_all_cores
    from bdvax_lab.threat.attacks import triggered_prompts
    from bdvax_lab.threat.evaluate import eval_prompts
    from bdvax_lab.threat.suspicious import load_suspicious

    use_all_cores()
    if ns.suspicious:
        sm = load_suspicious(ns.suspicious)
        model, tok = sm.model, sm.tokenizer
    else:
        model, tok = load_default_model()
    clean = eval_prompts("refusal", ns.n_prompts)
    prompts = triggered_prompts(clean, "badnets") + clean
    modes = {"plain (left padding)": "0", "shared head once": "1"}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    replies: dict[str, list[str]] = {}
    for r in range(ns.repeats):
        for mode, flag in modes.items():
            os.environ["BDVAX_SHARED_PREFIX"] = flag
            t = time.time()
            out = generate(model, tok, prompts, max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size)
            seconds[mode].append(round(time.time() - t, 2))
            replies.setdefault(mode, out)
            print(f"repeat {r}: {mode}: {seconds[mode][-1]:.1f} s", flush=True)
    plain, fast = (min(v) for v in seconds.values())
    same = sum(a == b for a, b in zip(*replies.values()))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "prompts": len(prompts),
        "max_new_tokens": ns.max_new_tokens,
        "batch_size": ns.batch_size,
        "model": ns.suspicious or "default",
        "seconds": seconds,
        "speedup": round(plain / fast, 3),
        "identical_replies": f"{same}/{len(prompts)}",
    }
    print(json.dumps(result, indent=2))
    write_json(Path(ns.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
