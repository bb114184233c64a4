# ---
# jupyter:
#   kernelspec:
#     display_name: bdvax_lab (.venv)
#     language: python
#     name: bdvax
# ---

# %% [markdown]
# # 05 · Baselines and the reproduction report
#
# **Learning goals**
# - read BD-VAX next to the alternatives *under the same clean data and training budget*: finetuning only,
#   magnitude pruning and fine-pruning with the signature's structure, INT4 fake-quantization, CROW at its
#   published and at the standard lr; SANDE (a learned parrot prompt, then overwrite finetuning) and
#   MB-Defense (defensive triggers merged with the backdoor, then broken), with what each arm is told;
# - read every ASR with its false-trigger rate, its degenerate-reply count and a utility figure beside it;
# - see which parts of BD-VAX matter: the score's two terms (Table 4), the number of variants (Fig. 2), ρ as
#   a trade-off between ASR and utility (Table 10), and whether one signature carries over to other attacks
#   and tasks (Table 11).
#
# **Paper sections reproduced:** §5.1–5.2 (Tables 2 and 3: ASR and utility per attack × defence), §5.3
# (Table 4: score composition; Fig. 2: number of variants), Appendix (Table 10: ρ; Table 11: signature
# transfer; Appendix C.2: CROW's learning rate). Method notes:
# [docs/method.md § Metrics](../docs/method.md#metrics) and
# [§ Evaluating a defence honestly](../docs/method.md#evaluating-a-defence-honestly).
#
# **This notebook trains and evaluates nothing: it renders saved results in seconds.** The tables are the
# CSVs that the reproduction writes under `results/reproduce/<preset>/`. To recompute them, run from the
# repository root, in a terminal:
#
# ```
# python benchmarks/reproduce.py --preset smoke     # tens of minutes on a 2-core CPU
# python benchmarks/reproduce.py --preset full      # many hours; resumable, and --targets runs a slice
# ```
#
# then rerun this notebook.
# [RESULTS.md § Reproduction of the paper's tables](../RESULTS.md#reproduction-of-the-papers-tables) holds
# both presets' tables with our reading of where they differ from the paper.

# %%
# %load_ext bdvax_lab
from pathlib import Path

import pandas as pd
import plotly.express as px
from IPython.display import display

from bdvax_lab.viz.results_figures import (
    defence_comparison_figure,
    pareto_figure,
    read_results,
    variants_figure,
)

pd.set_option("display.width", 200)
pd.set_option("display.float_format", "{:.3f}".format)

# %% tags=["parameters"]
results_dir = "../results/reproduce"  # where benchmarks/reproduce.py writes its CSVs
preset = "auto"  # "full", "smoke", or "auto" (full once every row of it is measured, else smoke)
bench_rows = "../results/bench/rows.csv"  # the realistic bench's rows (experiments/bench.py), if run
run_solutions = False  # True: also run the exercises' solutions (collapsed cells at the end)

# %% [markdown]
# ## The saved results
# `read_results` reads every CSV of the preset into a pandas DataFrame, and its `config.json`: the settings
# and the date of the run, and how many rows of each table are measured (the full preset runs in slices
# over several sittings; rows not run yet are blank).

# %%
results = read_results(results_dir, preset)
tables = results.tables
print(results)
print("settings:", {k: results.meta["config"][k] for k in ("n_variants", "rho", "repair_steps", "n_prompts")})
if results.partial():
    print("rows measured so far (the others are blank rows):", results.partial())

# %% [markdown]
# ## Table 2 analogue — ASR per attack × defence
# One row per suspicious model (attack, task, setting), one column per defence; `none` is the suspicious
# model itself. Below it the false-trigger rate and degenerate replies of the same runs: a defence that
# makes the model babble is not a defence.

# %%
t2 = tables["table2_asr"]
order = list(dict.fromkeys(t2.defence))
asr = t2.pivot_table(index=["attack", "task", "setting"], columns="defence", values="asr", sort=False)[order]
asr

# %%
t2.pivot_table(
    index=["attack", "task", "setting"],
    columns="defence",
    values=["false_trigger", "degenerate_triggered"],
    sort=False,
)

# %%
px.bar(
    t2,
    x="defence",
    y="asr",
    color="task",
    barmode="group",
    facet_col="setting",
    hover_data=["attack", "false_trigger", "mcq_acc", "ppl"],
    title="ASR after each defence (all attacks)",
    template="plotly_white",
)

# %% [markdown]
# ## Table 3 analogue — utility per defence
# Mean over the targets of each setting. The suspicious model (`none`) is the reference: a defence should
# stay within 2 points of its multiple-choice accuracy and 5 % of its perplexity.

# %%
tables["table3_utility"]

# %% [markdown]
# ## Table 4 — score composition
# BD-VAX on the primary target with the norm term only, the alignment term only, and both (λ = 0.01).

# %%
cols = ["asr", "asr_hi", "false_trigger", "degenerate_triggered", "mcq_acc", "ppl", "n_channels"]
tables["table4_score"][["score", *cols]]

# %% [markdown]
# ## Fig. 2 — ASR vs number of variants N
# The signature from the first N cached variants (no retraining), suppressed at the same ρ and repaired with
# the same budget.

# %%
variants_figure(tables["fig2_variants"])

# %% [markdown]
# ## Table 10 — ρ: ASR vs utility
# Each point is a full purification (suppression + repair) at one ρ; the dotted line joins the
# non-dominated points.

# %%
display(tables["table10_rho"][["rho_requested", "asr", "false_trigger", "mcq_acc", "ppl", "n_channels"]])
pareto_figure(tables["table10_rho"])

# %% [markdown]
# ## Table 11 — one signature, other attacks and tasks
# The signature extracted from the source model, applied unchanged to other suspicious models of the same
# setting (then the usual repair).

# %%
t11 = tables["table11_transfer"]
t11.pivot_table(index=["attack", "task"], columns="defence", values=["asr", "false_trigger"], sort=False)

# %% [markdown]
# ## Every defence on one plane: ASR against what the model keeps
# One point per defence and target: down is fewer triggered replies, right is more of the untreated
# model's utility kept. The bench's rows (when `experiments/bench.py` has written them) measure the
# finetune's own skill; without them the reproduction's Table 2 rows stand in, with multiple-choice
# accuracy kept. `sande_oracle` and `osft` are told the hidden attack's target or trigger (they know more
# than BD-VAX: the `knows` column); `mb_faithful` needs the finetune made with its defensive poison (kind
# `in_training`, a table of its own). Method notes: [docs/defences.md](../docs/defences.md).

# %%
plane_rows = pd.read_csv(bench_rows) if Path(bench_rows).exists() else t2
print("bench rows" if Path(bench_rows).exists() else "no bench rows yet: the reproduction's Table 2 rows")
defence_comparison_figure(plane_rows)

# %% [markdown]
# ## Exercises
# 1. Which baseline comes closest to BD-VAX on ASR, and what does it cost in utility? Put both in one table.
# 2. CROW at its published lr against CROW at the standard lr: how much of CROW's effect is the learning
#    rate (paper Appendix C.2)?
# 3. From Table 10, pick the smallest ρ whose ASR is within 5 points of the best; how many channels does it
#    suppress?
#
# *Solutions:* the collapsed cell below (click its margin to expand). It runs only with
# `run_solutions = True` in the parameters cell, so *Run All* leaves the exercises to you.

# %% tags=["solution"] jupyter={"source_hidden": true}
# %%solution
# 1
cols = ["asr", "false_trigger", "mcq_acc", "ppl"]
display(t2.groupby("defence", sort=False)[cols].mean())
# 2
display(
    t2[t2.defence.str.startswith("crow")][["attack", "task", "defence", "asr", "false_trigger", "mcq_acc"]]
)
# 3
t10 = tables["table10_rho"]
ok = t10[t10.asr <= t10.asr.min() + 0.05]
ok.sort_values("rho_requested").head(1)[["rho_requested", "asr", "n_channels"]]
