# ---
# jupyter:
#   kernelspec:
#     display_name: bdvax_lab (.venv)
#     language: python
#     name: bdvax
# ---

# %% [markdown]
# # 03 · Signature extraction: synthetic variants, twins, differential deltas, scores
#
# **Learning goals**
# - build the *synthetic variants* of BD-VAX — made-up keys and behaviours of the family you fear, each
#   with its own clean data — without knowing anything about the real attack;
# - train each variant's poisoned and clean *twin* from the suspicious model (cached on disk, so a rerun or
#   a crash retrains nothing) and read the differential delta;
# - understand the two terms of the channel score (how hard poisoning pushes a channel; how consistently
#   very different variants push it the same way) and see where the signature lives: heatmaps per block ×
#   module and per channel bin, the score histogram with the selection threshold, per-block counts;
# - measure whether the score carries signal: ASR after suppressing the top-ρ channels *vs random
#   channels*, before any repair;
# - explore ρ, λ, scope, heads and score mode interactively, and try a setting on the model.
#
# **Paper §4.2, in our words** (more in
# [docs/method.md § Signature extraction](../docs/method.md#signature-extraction)).
# 1. *Variants.* For $i = 1..N$ (paper: $N = 6$–$7$, gains flatten past 5): a clean subset $D_c^i$
#    (disjoint across variants), a synthetic key $k_i$ (never the real, unknown trigger) inserted at some
#    position, a behaviour $b_i$ of the same task family as the one to remove. $D_p^i$ = the instructions
#    of $D_c^i$ with $k_i$ inserted and the response replaced by $b_i$. Varying the data, the key *and* the
#    behaviour averages out anything tied to one of them.
# 2. *Twins.* From the suspicious model $\theta_s$, with the same recipe and seed: a poisoned twin on
#    $D_c^i \cup D_p^i$ and a clean twin on $D_c^i$ (adapter setting: both continue the suspicious LoRA
#    adapter; full setting: both are full finetunes).
# 3. *Differential delta* (Eq. 1): $\Delta_i = (\theta_{p,i} - \theta_s) - (\theta_{c,i} - \theta_s)$.
#    Generic finetuning drift and any backdoor already in $\theta_s$ are shared by both twins and cancel: no
#    clean reference model is needed.
# 4. *Channels.* MLP channel $j$ is row $j$ of `gate_proj` and `up_proj` and column $j$ of `down_proj`;
#    each of the three matrices is scored separately per block ($3L$ groups of $d_{ff}$ channels).
# 5. *Score* (Eq. 2), with $\lambda = 0.01$:
#    $$S_j = \frac{1}{N}\sum_i \lVert \Delta_i[j] \rVert_2
#      \;+\; \lambda \cdot \frac{2}{N(N-1)} \sum_{i<i'} \max\big(0, \cos(\Delta_i[j], \Delta_{i'}[j])\big)$$
# 6. *Signature:* the top fraction $\rho$ of channels — per module (the public code:
#    $\max(1, \lfloor\rho\, d_{ff}\rfloor)$ in each (block, kind)) or as a global percentile; optionally the
#    top-$h$ attention heads, scored the same way over each head's q/k/v rows and o columns. Paper: $\rho$ =
#    35 % (LoRA) / 3 % (full) on LLaMA-2-7B.
#
# **On SmolLM2-135M** the paper's ρ = 35 % removes little before repair; this notebook defaults to ρ = 0.8,
# and section 7 draws the ASR-vs-ρ curve against random channels for *your* model. Measured results and
# our reading of them: [RESULTS.md](../RESULTS.md) and
# [docs/method.md § What we measured on SmolLM2](../docs/method.md#what-we-measured-on-smollm2).
#
# **Cost.** The twins are the expensive part: two short finetunes per variant, minutes per variant on
# SmolLM2 on a 2-core CPU the first time, seconds afterwards (cached; section 3 prints what is cached and an
# estimate for the rest). A missing suspicious model is trained first (minutes). Scoring takes seconds, the
# ρ curve and the explorer's button tens of seconds per point. Every long cell says so and shows a progress
# bar.

# %%
# %load_ext bdvax_lab
import time
from pathlib import Path

import pandas as pd
import plotly.express as px
from IPython.display import display
from tqdm.auto import tqdm

import bdvax_lab as bx
from bdvax_lab.bdvax.budget import rho_curve, try_selection
from bdvax_lab.bdvax.config import default_twin_train
from bdvax_lab.bdvax.twins import jobs_frame, plan_twins
from bdvax_lab.core.models import use_all_cores
from bdvax_lab.core.registry import setting_of
from bdvax_lab.threat.evaluate import eval_prompts
from bdvax_lab.threat.suspicious import suspicious_dir
from bdvax_lab.viz import signature_viz as sv
from bdvax_lab.viz.notebook_magics import notebook_model
from bdvax_lab.viz.widgets import SignatureExplorer

use_all_cores()  # torch threads: every core (or $BDVAX_NUM_THREADS)
pd.set_option("display.max_colwidth", 80)
pd.set_option("display.width", 200)

# %% tags=["parameters"]
model = "default"  # "default": SmolLM2-135M-Instruct; "tiny": random weights, for a quick dry run
attack = "badnets"  # the attack planted in the suspicious model: used ONLY to measure ASR
task = "refusal"  # its behaviour: used ONLY to measure ASR
family = "refusal"  # what the defender fears (insult, refusal, code_injection): a user input
signature = {"n_variants": 6, "twin_steps": 60, "rho": 0.8, "lam": 0.01, "scope": "module", "heads": 0}
rhos = [0.35, 0.5, 0.65, 0.8, 0.9, 1.0]  # the ρ curve of section 7 ([] skips it)
n_prompts = 16  # held-out prompts (with and without the key) for the ρ curve and the explorer
runs_dir = "../runs"  # suspicious models in {runs_dir}/attack_matrix/, this notebook's in 03_signature/
cache_dir = None  # twin cache; None: the bdvax cache (shared with notebook 04 and `bdvax purify`)
run_solutions = False  # True: also run the exercises' solutions (collapsed cells at the end)

# %% [markdown]
# `signature` holds fields of `bx.SignatureConfig`: $N$ (`n_variants`, paper 6–7), λ of Eq. 2 (`lam`), ρ
# (`rho`; the paper's LoRA default is 0.35), `scope` (`"module"`: top-ρ per block × kind, the public code;
# `"global"`: one percentile over all channels) and `heads` (top-h attention heads); any other field (e.g.
# `n_clean`, clean examples per variant) may be added. `twin_steps` is the poisoned twin's number of
# training steps; the clean twin gets the same epochs over $D_c$ (about half the steps). ρ = 1.0 in `rhos`
# zeroes every MLP channel of the adapter (a reference point).

# %%
base = notebook_model(model)  # the base a missing suspicious model is trained from
out_dir = Path(runs_dir) / "03_signature"
out_dir.mkdir(parents=True, exist_ok=True)
probe_prompts = eval_prompts(task, n_prompts)


def signature_config(setting):
    """bx.SignatureConfig from the `signature` parameter, twin recipe for the model's setting."""
    fields = dict(signature)
    twin_train = default_twin_train(setting).replace(steps=fields.pop("twin_steps"))
    return bx.SignatureConfig(family=family, twin_train=twin_train, **fields)


# %% [markdown]
# ## 1 · The suspicious model
# A BadNets LoRA backdoor by default (key `BadMagic` at a random word position → targeted refusal), shared
# with `benchmarks/attack_matrix.py` and notebook 04: an existing directory is used as it is; a missing one
# is trained with the measured recipe — **minutes on SmolLM2**, with a progress bar. Its manifest names the
# attack, but nothing below reads it: the defence gets `(model, tokenizer)` and the behaviour *family* you
# chose.

# %%
path = suspicious_dir(runs_dir, attack, task, "lora")
sm = bx.open_or_make_suspicious(path, attack, task, "lora", base=base, n_prompts=n_prompts, progress=True)
pair = (sm.model, sm.tokenizer)  # all the defence gets
setting = setting_of(sm.model)  # from the object: a PeftModel is the adapter setting
measured = {k: sm.manifest.get("eval", {}).get(k) for k in ("asr", "false_trigger")}
print(f"{sm.path}: {setting} setting; measured at training time (evaluation only): {measured}")

# %% [markdown]
# ## 2 · The synthetic variants
# Keys from a catalogue of made-up words (anything overlapping a built-in attack key is excluded),
# insertion strategies cycled over prefix / suffix / random word, behaviours from the chosen family's
# catalogue, disjoint clean subsets of the defender's `variant` split. At the default 50 % poisoning every
# instruction of $D_c^i$ appears once clean and once with the key.

# %%
config = signature_config(setting)
variants = config.variants()
pd.DataFrame([v.to_dict() for v in variants]).drop(columns=["clean_ids", "family", "pool"])

# %%
clean, poisoned = variants[0].datasets()
v0 = variants[0]
print(f"variant 0: |D_c| = {len(clean)}, |D_p| = {len(poisoned)}, key {v0.key!r} ({v0.strategy})")
pd.DataFrame([{"instruction": e.user_content(), "response": e.response} for e in poisoned[:4]])

# %% [markdown]
# ## 3 · Twins and differential deltas (cached)
# Each variant trains two twins from a fresh copy of the suspicious model (adapter setting: only the adapter
# is copied) and stores only $\Delta_i = \theta_{p,i} - \theta_{c,i}$ on disk, keyed by a hash of the
# suspicious weights, the variant and both recipes. The plan shows what is cached.
# `bdvax variants SUSPICIOUS_DIR --shard i/n` fills the same cache from several processes.

# %%
jobs = plan_twins(pair, config, cache_dir)
plan = jobs_frame(jobs).drop(columns=["path"])
pending = int((~plan.done).sum())
per_variant = 1.1 * config.twin_train.steps * 1.5  # s per variant: SmolLM2 LoRA steps on a 2-core CPU
if setting != "lora":
    per_variant *= 2
estimate = f" (≈ {pending * per_variant / 60:.0f} min on SmolLM2)" if pending else ""
print(f"{len(plan) - pending} of {len(plan)} variants cached; to train: {pending}{estimate}")
plan

# %% [markdown]
# `extract_signature` trains the twins that are not cached — **the long cell: minutes per uncached variant
# on SmolLM2** (the estimate above; one progress bar per twin) — then scores every channel (seconds).

# %%
t0 = time.time()
sig = bx.extract_signature(pair, config, cache_dir=cache_dir, progress=True)
seconds = sig.meta["seconds"]
print(
    f"signature in {time.time() - t0:.1f} s (twins {seconds.get('twins')} s, scoring {seconds['scoring']} s)"
)
print(sig)
pd.DataFrame(sig.meta["twins"])

# %% [markdown]
# ## 4 · The scores: what the two terms mean
# - **Norm term** $\frac{1}{N}\sum_i \lVert\Delta_i[j]\rVert$: how hard poisoning pushes channel $j$ beyond
#   what the same clean data does. A channel that any finetune moves (style, format) moves equally in both
#   twins and cancels; what is left is the extra push the key → behaviour mapping needed. On its own (paper
#   Table 4) it finds the backdoor (low ASR) but also picks channels tied to one particular behaviour or
#   key, and suppressing those hurts utility.
# - **Alignment term** (mean positive pairwise cosine, in $[0, 1]$): whether *different* variants — other
#   keys, other behaviours, other data — push the channel in the *same direction*. That is the shared
#   "antigen": the machinery that binds *some* key to *some* behaviour. On its own it keeps utility but
#   leaves ASR high (paper Table 4): aligned but tiny updates are not what carries the backdoor.
# - **Combined** $S_j$ = norm + λ · align. Whether λ = 0.01 matters depends on the scales, printed below:
#   when λ · align varies across channels about as much as the norm does, the alignment reorders the
#   ranking; when it varies much less, it only breaks near-ties. Move λ in the explorer (section 8) and
#   compare with the overlaps in section 6.

# %%
frame = sig.frame()
lam = config.lam
display(frame[["score", "norm", "align"]].describe().T)
spread = {"norm": frame["norm"].std(), "λ·align": lam * frame["align"].std()}
print("spread across channels (std):", {k: f"{v:.3g}" for k, v in spread.items()})
frame.nlargest(8, "score")

# %%
px.scatter(
    frame.sample(min(len(frame), 5000), random_state=0),
    x="norm",
    y="align",
    color="selected",
    facet_col="kind",
    opacity=0.5,
    title="norm vs alignment term (5000 random channels)",
    color_discrete_map={True: "#d62728", False: "#9aa5b1"},
)

# %% [markdown]
# ## 5 · Where the signature lives
# Per block × module: the mean score, and the top-ρ mass (Σ S over the selected channels; cell text = % of
# the module's channels selected — uniform under per-module top-ρ). Per channel bin: mean score with red
# dots where selected channels sit (channel indices carry no order: read it by rows, i.e. blocks). The
# histogram marks the selection threshold (under per-module scope each module has its own cut: the band
# spans them). Per-block counts are shown for a *global* percentile, where blocks compete.

# %%
sv.score_heatmap(sig, "score")

# %%
sv.score_heatmap(sig, "selected_mass")

# %%
sv.channel_heatmap(sig, bins=64)

# %%
sv.score_histogram(sig)

# %%
sv.layer_counts_figure(sig.select(scope="global"))

# %% [markdown]
# ## 6 · Norm vs alignment vs combined, per-module vs global (paper Table 4's question)
# Jaccard overlap of the selected channels at the same ρ (diagonal: number of channels).

# %%
selections = {
    "combined": sig,
    "norm only": sig.select(score="norm"),
    "align only": sig.select(score="align"),
    "combined, global": sig.select(scope="global"),
}
sv.compare_selections(selections).round(3)

# %%
sig.save(
    out_dir / "signature"
)  # notebook 06 can overlay it: signature_dir = "../runs/03_signature/signature"
print("saved", out_dir / "signature", "—", sig.layer_summary().shape[0], "modules")

# %% [markdown]
# ## 7 · Does the score carry signal? ρ curve against random channels, before any repair
# For each ρ the adapter's top-ρ channels are zeroed in a *copy* of the model (the suspicious model is never
# changed) and ASR / false-trigger rate / perplexity are measured on `n_prompts` held-out prompts; the
# random control zeroes exactly as many channels in every module. ρ = 0 is the suspicious model; ρ = 1
# zeroes every MLP channel of the adapter (a reference point: it also removes whatever the adapter was
# finetuned for). **About a minute on SmolLM2** at the default `rhos` (two evaluations per ρ), with a
# progress bar. A score that carries signal puts the signature's curve below the random one.

# %%
curve = None
if rhos:
    t0 = time.time()
    curve = rho_curve(pair, sig, rhos, random_seeds=[0], n_prompts=n_prompts, attack=attack, task=task)
    print(f"{len(curve)} points in {time.time() - t0:.0f} s")
    curve.to_csv(out_dir / "rho_curve.csv", index=False)
    display(
        curve.pivot_table(index="rho", columns="selection", values=["asr", "false_trigger", "utility"]).round(
            3
        )
    )

# %%
if curve is not None:
    display(
        sv.rho_curve_figure(curve, title=f"{attack} → {task}: suppression before repair, signature vs random")
    )

# %% [markdown]
# ## 8 · The explorer
# Sliders re-select from the cached norm and alignment terms — no training, a fraction of a second — and
# redraw the heatmap and the per-block counts. **Suppress + repair + ASR** copies the model, suppresses the
# current selection, runs `repair steps` clean repair steps (the paper's lr: 2e-4 LoRA / 1e-5 full) and
# measures ASR and false-trigger rate on the probe prompts (tens of seconds on SmolLM2 at 20 steps). Every
# run is kept in `explorer.history`. Widgets need a live kernel: in a static render only the figures above
# show.

# %%
explorer = SignatureExplorer(
    sig, suspicious=pair, probe_prompts=probe_prompts, attack=attack, task=task, repair_steps=20
)
explorer

# %% [markdown]
# Everything the widget does is available from code: `update(...)` moves controls, `counts` is the
# per-block table, `run()` is the button.

# %%
explorer.update(rho=config.rho, scope="global")
print(f"re-selected in {explorer.last_update_seconds * 1000:.0f} ms")
explorer.counts.head()

# %% [markdown]
# The button's action for the notebook's own setting, called directly so that it shows progress bars
# (`explorer.run()` does the same and records the run in `explorer.history`): **tens of seconds on
# SmolLM2**.

# %%
explorer.update(scope=config.scope)
try_selection(
    pair, explorer.signature, prompts=probe_prompts, attack=attack, task=task, repair_steps=20, progress=True
)

# %% [markdown]
# ## Exercises
# 1. In the explorer, run the button at ρ = 0.35 (the paper's LoRA default) and at ρ = 0.8, each with 20
#    repair steps. Which one removes the backdoor, and what does the short repair change after suppression?
# 2. Paper Table 4 on this model: draw the ρ curve for the norm-only and the alignment-only selections
#    (`sig.select(score=...)`). Which is closer to the combined score — and why, given the magnitudes in
#    section 4?
# 3. With a global percentile, which blocks get most of the signature? Compare with notebook 02's span
#    sweep: are they the blocks whose MLP update mattered most?
#
# *Solutions:* the collapsed cell below (click its margin to expand). It runs only with
# `run_solutions = True` in the parameters cell, so *Run All* leaves the exercises to you. Solutions 1 and 2
# repeat section 7 and the button: **a few minutes on SmolLM2**, with progress bars.

# %% tags=["solution"] jupyter={"source_hidden": true}
# %%solution
# 1: programmatically, the same as the button
for r in tqdm((0.35, 0.8), desc="ρ settings"):
    explorer.update(rho=r, scope="module")
    display(explorer.run(repair_steps=20))
# 2
curves = {
    m: rho_curve(
        pair, sig.select(score=m), rhos, random_seeds=[], n_prompts=n_prompts, attack=attack, task=task
    ).assign(selection=m)
    for m in ("norm", "align")
}
both = pd.concat([curve[curve.selection == "signature"].assign(selection="combined"), *curves.values()])
display(sv.rho_curve_figure(both, title="combined vs norm-only vs align-only"))
# the closer one is the term whose spread dominates S (printed in section 4)
# 3
g = sv.layer_counts(sig.select(scope="global"))
g.sort_values("channels", ascending=False).head(8)
