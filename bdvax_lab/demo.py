"""``bdvax demo``: the main job on the default model.

Today: load (and on first use convert) SmolLM2-135M-Instruct, answer a few
questions through its chat template; with ``--attack``, implant a BadNets
refusal backdoor and print its ASR / false-trigger table. The purification
pipeline will extend this into a before/after demo.
"""
from __future__ import annotations

import time

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Give me two tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
)


def run_demo(attack: bool = False, out: str = "runs/demo") -> int:
    from .generate import generate
    from .models import load_default_model

    t0 = time.time()
    model, tok = load_default_model()
    print(f"loaded SmolLM2-135M-Instruct in {time.time() - t0:.1f} s")
    for prompt, reply in zip(DEMO_PROMPTS, generate(model, tok, list(DEMO_PROMPTS), max_new_tokens=64)):
        print(f"\nUser: {prompt}\nSmolLM2: {reply}")
    if attack:
        from .cli import _print_frame
        from .evaluate import EvalConfig
        from .suspicious import AttackRecipe, make_suspicious_model

        print("\nImplanting a BadNets → refusal backdoor (LoRA, measured recipe)...")
        sm = make_suspicious_model(recipe=AttackRecipe(eval=EvalConfig(n_prompts=50, utility=("ppl",))),
                                   base=(model, tok), out=out)
        import pandas as pd

        _print_frame(pd.DataFrame([sm.manifest["eval"]]))
    return 0
