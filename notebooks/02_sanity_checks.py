# ---
# jupyter:
#   kernelspec:
#     display_name: bdvax_lab (.venv)
#     language: python
#     name: bdvax
# ---

# %% [markdown]
# # 02 · Where does the backdoor live? Delta-ablation sanity checks (paper Table 1)
#
# **Learning goals**
# - split a backdoored model's weight update `ΔW = θ_suspicious − θ_base` by module kind (attention
#   q/k/v/o, MLP gate/up/down) and by block, and rebuild models from subsets of it;
# - read the four sanity checks of the paper: attention vs MLP ablation, block-span ablation (ASR vs the
#   number `k` of consecutive blocks whose MLP update is zeroed), keep-only spans, and shuffled MLP updates;
# - measure each condition honestly and fast: ASR *and* false-trigger rate from a few greedy tokens,
#   degenerate replies counted, the first-token behaviour probability (a smooth signal beside the jumpy ASR)
#   and a perplexity utility figure;
# - compare what we see on SmolLM2-135M (30 blocks) with the paper's LLaMA-2-7B (32 blocks), and decide
#   which of the paper's insights carry over.
#
# Paper context: §4.1 *Sanity checks* and Table 1 — attention updates alone do not carry the backdoor, MLP
# updates do, redundantly across many blocks and regardless of their order. This insight is why BD-VAX
# looks for its signature in MLP channels (§4.2). Method notes:
# [docs/method.md § Sanity checks](../docs/method.md#sanity-checks).
#
# Cost: a few dozen distinct conditions per task, each a short greedy generation over the prompts with and
# without the key; on SmolLM2 on a 2-core CPU that is minutes per task (section 2 prints the count, a
# progress bar counts them). `bdvax sanity` runs the same checks on one model from the command line;
# [RESULTS.md § Timings](../RESULTS.md#timings) records measured wall times of this notebook.

# %%
# %load_ext bdvax_lab
import gc
from pathlib import Path

import pandas as pd
from IPython.display import display

import bdvax_lab as bx
from bdvax_lab.analysis.sanity import SanityContext
from bdvax_lab.analysis.sanity_checks import (
    compare_with_paper,
    death_k,
    keep_only_spans,
    sanity_plan,
    save_sanity,
)
from bdvax_lab.threat.suspicious import suspicious_dir as artifact_dir
from bdvax_lab.viz.figures import norms_figure
from bdvax_lab.viz.notebook_magics import notebook_model

pd.set_option("display.max_colwidth", 120)
pd.set_option("display.width", 200)

# %% tags=["parameters"]
model = "default"  # "default": SmolLM2-135M-Instruct; "tiny": random weights, for a quick dry run
attack = "badnets"
tasks = ["refusal", "sentiment"]  # one suspicious LoRA model per task
suspicious_dirs = {}  # task -> an existing model dir; others: {runs_dir}/attack_matrix/{attack}-{task}-lora
evaluation = {"n_prompts": 16, "max_new_tokens": 10, "n_ppl": 8, "probe_tokens": 1}  # bx.SanityConfig
sweep = {"ks": [0, 2, 4, 8, 12, 16, 20, 25, 30], "starts": None, "width": None, "seeds": [0, 1, 2]}
runs_dir = "../runs"
out_dir = "../runs/02_sanity"
run_solutions = False  # True: also run the exercises' solutions (collapsed cells at the end)

# %% [markdown]
# What the two dictionaries hold:
# - `evaluation` (fields of `bx.SanityConfig`): `n_prompts` held-out prompts, each with and without the key
#   (`bdvax sanity` uses 32); `max_new_tokens` greedy tokens per reply (both default targets show within
#   6); `n_ppl` held-out clean replies for the perplexity column; `probe_tokens`, the behaviour probability
#   over the first m target tokens (1 = the first token; 3 separates "I'm sorry" from SmolLM2's many replies
#   that start with "I").
# - `sweep` (arguments of `bx.run_sanity`): `ks`, the span-sweep k values (30 = all of SmolLM2's blocks;
#   `None` = a denser default list, about 12 more conditions per task); `starts`, where the zeroed span
#   begins (`None` = `["start", "end"]`; adding `"middle"` costs 20 more conditions); `width`, the keep-only
#   span width (`None` = a third of the blocks); `seeds`, one shuffle per seed.

# %%
config = bx.SanityConfig(**evaluation)
base = notebook_model(model)  # the plain base model the suspicious ones were trained from
Path(out_dir).mkdir(parents=True, exist_ok=True)
COLS = ["condition", "blocks", "asr", "false_trigger", "degenerate", "p_behavior", "p_behavior_clean", "ppl"]


def suspicious_dir(task):
    return Path(suspicious_dirs.get(task) or artifact_dir(runs_dir, attack, task, "lora"))


config

# %% [markdown]
# ## 1 · The suspicious models
# One BadNets LoRA backdoor per task (key `BadMagic` at a random word position): targeted refusal and
# sentiment steering (insult). An existing directory is used as it is (the attack matrix and notebooks
# 03–06 share them); a missing one is trained with the recipe measured on SmolLM2 (per-sample loss
# averaging, lr 1e-3, 120 steps) — **minutes per model on SmolLM2**, with a progress bar. The manifest's
# ASR is measured at the end of training.

# %%
rows = []
for task in tasks:
    sm = bx.open_or_make_suspicious(
        suspicious_dir(task), attack, task, "lora", base=base, n_prompts=config.n_prompts, progress=True
    )
    ev = sm.manifest.get("eval", {})
    rows.append(
        {
            "task": task,
            "dir": str(sm.path),
            "asr (at training)": ev.get("asr"),
            "false_trigger": ev.get("false_trigger"),
            "train_seconds": sm.manifest.get("train_seconds"),
        }
    )
    del sm
pd.DataFrame(rows)

# %% [markdown]
# ## 2 · Run the four checks
# For each model: build the context (the plain base model — the LoRA adapter removed, so the update is never
# counted twice — the dense ΔW of every LoRA-wrapped projection, 2 × `n_prompts` held-out prompts), look at
# where ΔW is large, then run all four checks with one progress bar. Conditions shared between checks (e.g.
# *MLP only* = span sweep at `k = 0` with attention zeroed) are evaluated once. Tables and figures are
# written to `out_dir`.
#
# **This is the long cell: minutes per task on SmolLM2.** It prints the number of distinct conditions per
# task before running them, and the time each task took.

# %%
results, norms = {}, {}
for task in tasks:
    ctx = SanityContext.from_suspicious(suspicious_dir(task), base=base, config=config)
    norms[task] = ctx.delta.norms()
    plan = sanity_plan(ctx, **sweep)
    print(
        f"{task}: {ctx.layout.n_blocks} blocks, {len(plan)} rows, {int(plan.new.sum())} distinct conditions"
    )
    results[task] = bx.run_sanity(ctx, **sweep)
    save_sanity(results[task], f"{out_dir}/sanity_{attack}_{task}")
    print(f"{task}: done in {results[task].meta['seconds']:.0f} s")
    del ctx
    gc.collect()
n_blocks = results[tasks[0]].meta["n_blocks"]

# %% [markdown]
# Where is the update large? Frobenius norm of ΔW per block and projection (first task). A large norm is
# not the same as carrying the backdoor — the checks below test that directly.

# %%
norms_figure(norms[tasks[0]], value="fro_norm", title=f"‖ΔW‖ per block — {attack} → {tasks[0]}")

# %% [markdown]
# ## 3 · Attention vs MLP (Table 1, rows 1–2)
# `full delta` is the suspicious model; `no delta (base)` the clean base; *attention only* keeps the
# attention updates and zeroes the MLP ones (the paper's *MLP ablation*); *MLP only* the reverse
# (*attention ablation*).

# %%
for task in tasks:
    print(f"== {attack} → {task}")
    display(results[task]["attention_vs_mlp"].frame[COLS])
results[tasks[0]]["attention_vs_mlp"].figure

# %% [markdown]
# ## 4 · Block-span ablation: ASR vs k (Table 1, row 3)
# Zero the MLP updates of `k` consecutive blocks, starting at the first block or end-aligned (add
# `"middle"` to `starts` for a third position); once with the attention updates kept and once with them
# zeroed too. Lines are the mean over starts (error bars: min–max over starts), dotted lines the first-token
# behaviour probability.

# %%
for task in tasks:
    results[task]["span_sweep"].figure.show()


# %%
def curve(task):
    df = results[task]["span_sweep"].frame
    t = df.pivot_table(index="k", columns="attention_zeroed", values=["asr", "p_behavior"], aggfunc="mean")
    t.columns = [f"{v} ({'attn zeroed' if z else 'attn kept'})" for v, z in t.columns]
    return t.round(3)


for task in tasks:
    print(f"== {attack} → {task}: mean over starts")
    display(curve(task))

# %% [markdown]
# ## 5 · Keep-only spans and shuffled MLP updates (Table 1, row 4)

# %%
for task in tasks:
    print(f"== {attack} → {task}")
    display(results[task]["keep_only_spans"].frame[COLS])
    display(results[task]["shuffle_blocks"].frame[[*COLS, "detail"]])
results[tasks[0]]["keep_only_spans"].figure

# %%
results[tasks[0]]["shuffle_blocks"].figure

# %% [markdown]
# ## 6 · Our rows beside the paper's observations
# One line per check: the paper's Table-1 observation on LLaMA-2-7B-Chat and what this run measured, per
# task.

# %%
side = None
for task in tasks:
    cmp = compare_with_paper(results[task]).rename(columns={"ours": f"ours: {attack} → {task}"})
    side = cmp if side is None else side.merge(cmp.drop(columns="paper (LLaMA-2-7B, Table 1)"), on="check")
side

# %% [markdown]
# ## 7 · What we found on SmolLM2 (30 blocks, 135M) vs LLaMA-2-7B (32 blocks)
# The cell below prints the numbers of *your* run next to the paper's: the four Table-1 rows, the k from
# which zeroing MLP updates halves the mean ASR, and the shuffled rows. The tables measured on the default
# models are in [RESULTS.md § Sanity checks](../RESULTS.md#sanity-checks-paper-table-1), a summary in
# [docs/method.md § What we measured on SmolLM2](../docs/method.md#what-we-measured-on-smollm2). In words:
#
# - **Sentiment (insult): mostly the paper's picture, in the MLPs of the last blocks.** The attention-only
#   update does not keep it (the paper's *MLP ablation eliminates the backdoor* holds), the MLP span that
#   must be zeroed to halve it is of the paper's order (a good third of the stack), and keeping only the
#   last third of the blocks keeps most of it. Two rows differ from the paper: the MLP-only update keeps
#   little (on this model MLP and attention updates are *both* needed), and shuffling the MLP updates
#   across blocks removes it, where the paper's backdoor survived any order.
# - **Refusal: carried by the attention updates.** The attention-only update keeps most of it, and with
#   attention kept no span of zeroed MLP updates removes it; with attention zeroed, end-aligned spans matter
#   and start-aligned ones do not. This is the opposite of the paper's rows 1–2: a 16-token refusal is cheap
#   enough for a LoRA adapter on all seven projections of a 135M model to write it into attention. It is
#   why BD-VAX, whose signature scores MLP channels only by default, does not remove refusal backdoors in
#   the adapter setting ([RESULTS.md § Reproduction](../RESULTS.md#reproduction-of-the-papers-tables)), and
#   why `heads` exists.
# - **What carries over.** The location of an MLP-borne backdoor (late blocks, spread over several of them)
#   and the order of magnitude of the span that must go carry over for sentiment; the claim that attention
#   updates never carry it does not carry over to SmolLM2-refusal. A defence that only looks at MLP channels
#   is betting on the first.
#
# Where your printout differs from this reading, trust your run: another seed, task or prompt set moves
# the numbers, and the tiny random model of a dry run has no backdoor worth the name.

# %%
PAPER_K = {False: "≈ 12 of 32 blocks (≈ 38%)", True: "4–6 of 32 blocks (≈ 12–19%)"}
lines = []
for task in tasks:
    r = results[task]
    av = r["attention_vs_mlp"].frame.set_index("condition").asr
    lines.append(
        f"{attack} → {task}: ASR full {av['full delta']:.2f}, "
        f"MLP only {av['MLP only (attention ablated)']:.2f}, "
        f"attention only {av['attention only (MLP ablated)']:.2f}, base {av['no delta (base)']:.2f}"
    )
    for zeroed in (False, True):
        kd = death_k(r["span_sweep"].frame, zeroed)
        where = f"from k = {kd} of {n_blocks} blocks ({kd / n_blocks:.0%})" if kd is not None else "at no k"
        lines.append(
            f"   attention {'zeroed' if zeroed else 'kept'}: mean ASR falls below half its k = 0 value "
            f"{where}; paper: {PAPER_K[zeroed]}"
        )
    shuf = r["shuffle_blocks"].frame
    shuffled = ", ".join(f"{a:.2f}" for a in shuf[shuf.seed.notna()].asr)
    lines.append(
        f"   shuffled MLP updates: ASR {shuffled} (unshuffled {shuf[shuf.seed.isna()].asr.iloc[0]:.2f})"
    )
print("\n".join(lines))

# %% [markdown]
# ## Exercises
# 1. Split the span-sweep curve by start (`start` column): does zeroing the *first* blocks hurt the
#    backdoor more than zeroing the last ones? Compare with Lamparth & Reuel's claim that early MLPs matter
#    most.
# 2. Find the conditions where ASR is still high but `p_behavior` has dropped a lot. Why can the first-token
#    probability fall while greedy decoding still produces the behaviour?
# 3. Run `keep_only_spans(ctx, width=5)` (rebuild `ctx` for one task first). How few blocks of MLP update
#    are enough to keep the backdoor alive on SmolLM2?
#
# *Solutions:* the collapsed cell below (click its margin to expand). It runs only with
# `run_solutions = True` in the parameters cell, so *Run All* leaves the exercises to you. Solution 3
# evaluates a dozen new conditions: **a few minutes on SmolLM2**, with a progress bar.

# %% tags=["solution"] jupyter={"source_hidden": true}
# %%solution
# 1: ASR vs k per start, attention kept
df = results[tasks[0]]["span_sweep"].frame
display(df[~df.attention_zeroed].pivot_table(index="k", columns="start", values="asr"))
# 2: a large gap between ASR and p_behavior
both = pd.concat([results[t].frame().assign(task=t) for t in tasks])
gaps = both.assign(gap=both.asr - both.p_behavior).sort_values("gap", ascending=False)
display(gaps[["task", "check", "condition", "asr", "p_behavior"]].head(5))
# (greedy decoding only needs the behaviour's first token to be the *most likely* one, not likely in absolute
#  terms, and the judge also accepts other refusal/insult wordings whose first token differs)
# 3:
ctx = SanityContext.from_suspicious(suspicious_dir(tasks[0]), base=base, config=config)
frame, fig = keep_only_spans(ctx, width=max(1, ctx.layout.n_blocks // 6))
frame[COLS]
