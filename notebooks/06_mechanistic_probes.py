# ---
# jupyter:
#   kernelspec:
#     display_name: bdvax_lab (.venv)
#     language: python
#     name: bdvax
# ---

# %% [markdown]
# # 06 · Mechanistic probes: watch the trigger travel through the model
#
# **Learning goals**
# - wrap the already-loaded (LoRA-)backdoored model with **nnsight** and read or edit activations at
#   registry sites: attention output, MLP output, MLP hidden (`down_proj` input), the residual stream (block
#   output);
# - measure, per block, how far the trigger moves those activations at the last prompt position — for the
#   suspicious model and a reference (a purified model, or the clean base) side by side;
# - ablate attention vs MLP outputs over block spans *at inference time* and watch the probability of the
#   behaviour's first token: the activation-level twin of the weight-delta checks of notebook 02;
# - run **activation patching** in both directions (clean → triggered: which layer's output is *necessary*
#   for the behaviour; triggered → clean: which is *sufficient*) with the logit difference
#   `logit(behaviour's first token) − logit(clean reply's first token)`, and overlay the signature's
#   per-block mass on the patching curve;
# - read the behaviour token out of every layer with the **logit lens**.
#
# Paper context: §4.1 and Table 1 locate the backdoor in weight space (MLP updates carry it, redundantly
# over many blocks); §4.2 scores MLP channels into a signature. These probes ask the inference-time
# questions: where does the triggered run diverge, which layers' outputs carry the behaviour to the last
# position, and does that line up with where the signature puts its mass? Method notes:
# [docs/method.md § Sanity checks](../docs/method.md#sanity-checks) and
# [§ Signature extraction](../docs/method.md#signature-extraction). Measured probes of the default refusal
# model: [RESULTS.md § Probes](../RESULTS.md#probes).
#
# Alignment choice: clean and triggered prompts differ in length, so patching uses **only the final prompt
# position** by default (aligned by construction, and fast: the prompt prefix runs once with a KV cache).
# `positions = "suffix"` right-aligns each pair and patches their whole common suffix (every position after
# the key) at one full forward per (layer, site).
#
# Cost on SmolLM2 on a 2-core CPU: the probes take seconds to a minute each, activation patching the
# longest; training the suspicious model if its directory is missing takes minutes. Those cells say so and
# show progress bars.

# %%
# %load_ext bdvax_lab
import copy

import pandas as pd
from IPython.display import display
from tqdm.auto import tqdm

import bdvax_lab as bx
from bdvax_lab.analysis import probes
from bdvax_lab.analysis.probes.attribution import oracle_attribution
from bdvax_lab.analysis.probes.lora_oracle import lora_oracle
from bdvax_lab.analysis.ranking import overlap_figure, ranking_overlap
from bdvax_lab.baselines.controls import delta_channel_scores
from bdvax_lab.bdvax.signature import Signature
from bdvax_lab.core.scoring import next_token_probs
from bdvax_lab.threat.attacks import resolve_task, triggered_prompts
from bdvax_lab.threat.evaluate import eval_prompts
from bdvax_lab.threat.suspicious import suspicious_dir
from bdvax_lab.viz.notebook_magics import notebook_model
from bdvax_lab.weights.deltas import WeightDelta

pd.set_option("display.width", 200)

# %% tags=["parameters"]
model = "default"  # "default": SmolLM2-135M-Instruct; "tiny": random weights, for a quick dry run
attack = "badnets"
task = "refusal"  # refusal, sentiment
runs_dir = "../runs"  # the suspicious model: {runs_dir}/attack_matrix/{attack}-{task}-lora (made if missing)
purified_dir = None  # a purified model dir to compare with; None: the clean base model (no adapter)
signature_dir = None  # a saved Signature to overlay (notebook 03 saves one); None: MLP ΔW norm per block
n_pairs = 32  # held-out prompts, each with and without the key
positions = "last"  # activation patching: "last" (fast) or "suffix" (one forward per layer × site)
run_solutions = False  # True: also run the exercises' solutions (collapsed cells at the end)

# %% [markdown]
# ## 1 · The suspicious model and a reference
# A BadNets LoRA backdoor (key `BadMagic` at a random word position), shared with the attack matrix and
# notebooks 02–04. A missing directory is trained with the measured recipe — **minutes on SmolLM2**, with a
# progress bar. The reference is a purified model if you have one (notebook 04 writes them), otherwise the
# clean base model — the adapter removed, the strongest "purification" there is.

# %%
base = notebook_model(model)
path = suspicious_dir(runs_dir, attack, task, "lora")
sm = bx.open_or_make_suspicious(path, attack, task, "lora", base=base, n_prompts=n_pairs, progress=True)
lm, tok = sm.model, sm.tokenizer
if purified_dir:  # a LoRA purified model is attached to a copy of the base
    reference = bx.load_suspicious(purified_dir, base=(copy.deepcopy(base[0]), base[1])).model
else:  # the clean base model (open_or_make_suspicious copied it and left it unchanged)
    reference = base[0]
ref_label = "purified" if purified_dir else "clean base"
print(sm.manifest.get("eval", {}))

# %% [markdown]
# ## 2 · Prompt pairs and the two tokens of the metric
# Held-out prompts from the `eval` split, each with the key inserted at the same kind of position the
# attacker used. Every prompt goes through the chat template. The *behaviour token* is the first token of
# the attack's target reply; the clean reply's first token is, per prompt, the model's own greedy choice on
# the clean prompt.

# %%
clean = eval_prompts(task, n_pairs)
triggered = triggered_prompts(clean, attack, seed=0)
b_tok = probes.behavior_token_id(tok, task)
print(f"behaviour token {b_tok} = {tok.decode([b_tok])!r}  (target: {resolve_task(task).targets[0]!r})")
models = {"suspicious": lm, ref_label: reference}
pd.DataFrame(
    {
        "p(behaviour token | triggered)": {
            name: float(next_token_probs(m, tok, triggered, [b_tok]).mean()) for name, m in models.items()
        },
        "p(behaviour token | clean)": {
            name: float(next_token_probs(m, tok, clean, [b_tok]).mean()) for name, m in models.items()
        },
    }
)

# %% [markdown]
# ## 3 · Where does the trigger change the activations?
# Per block: norm of the mean difference (triggered − clean) at the last prompt position and the mean
# cosine between the two activations, for the attention output, the MLP output and the residual stream.
# Solid lines: suspicious model; dashed: reference. A backdoor shows up as a gap between the two line
# styles, not as a large difference on its own (any inserted word changes activations).

# %%
diff = probes.compare_activation_diff(models, tok, clean, triggered)
diff.figure

# %%
wide = diff.frame.pivot_table(index=["site", "layer"], columns="model", values="rel_norm_diff")
wide["suspicious / reference"] = wide["suspicious"] / wide[ref_label]
wide.sort_values("suspicious / reference", ascending=False).head(8)

# %% [markdown]
# ## 4 · Inference-time ablation over block spans
# Zero (or mean-ablate, over the clean prompts) the attention or MLP outputs of a span of blocks while the
# triggered prompts run, and read p(behaviour's first token). Zeroing whole sublayers is a blunt instrument
# — it damages the model too — so compare with the reference and prefer mean ablation for the finer spans.

# %%
abl_zero = probes.ablation_probe(lm, tok, triggered, b_tok, mode="zero", label="suspicious")
abl_mean = probes.ablation_probe(
    lm,
    tok,
    triggered,
    b_tok,
    mode="mean",
    clean_prompts=clean,
    label="suspicious",
    sites=("attn_output", "mlp_output", "attn_output+mlp_output"),
)
abl_mean.figure

# %%
pd.concat([abl_zero.frame, abl_mean.frame])[["condition", "mode", "p_behavior", "delta_vs_baseline"]]

# %% [markdown]
# ## 5 · Activation patching, both directions
# `clean->triggered`: run the triggered prompts with one block's output taken from the clean run — a large
# negative effect means that output is *needed* for the behaviour. `triggered->clean`: the reverse — a
# large positive effect means it is *enough* to cause it. `normalized` = effect / (metric of the source run
# − metric of the patched run): 1 means the patch moves the run all the way. **The slowest probe: up to a
# minute on SmolLM2 with `positions = "last"`, several with `"suffix"`**; the progress bar counts the two
# directions.

# %%
patch = {
    d: probes.activation_patching(
        lm, tok, clean, triggered, b_tok, direction=d, positions=positions, label="suspicious"
    )
    for d in tqdm(probes.DIRECTIONS, desc="patching directions")
}
patch_frame = pd.concat([p.frame for p in patch.values()], ignore_index=True)
probes.figure_patching(patch_frame, value="normalized")

# %%
shape = tuple(patch["clean->triggered"].tensor.shape)
print("tensor [layers, sites] (clean->triggered, Δ logit difference):", shape)
# the layer with the largest |normalized| effect per direction and site
strongest = patch_frame.dropna(subset=["normalized"]).assign(size=lambda d: d.normalized.abs())
strongest.sort_values("size", ascending=False).groupby(["direction", "site"]).head(1).drop(columns="size")

# %% [markdown]
# ## 6 · Does the signature's mass sit where patching matters?
# Grey bars: per-block mass of the signature (Σ score of the selected channels, from
# `Signature.layer_summary()`); without a saved signature the MLP ΔW norm per block stands in. Lines: the
# patching curve. The table gives rank correlations per direction and site — a weak correlation is a
# finding too (the association is redundant, paper §4.1).

# %%
if signature_dir:
    mass, value_col = Signature.load(signature_dir).layer_summary(), "selected_mass"
else:
    mass = WeightDelta.from_lora(lm).block_norms()
    mass, value_col = mass[mass.group == "mlp"], "fro_norm"
probes.overlay_signature(patch_frame, mass, value_col, value="normalized")

# %%
probes.signature_correlation(patch_frame, mass, value_col, value="normalized")

# %% [markdown]
# ## 7 · Logit lens of the behaviour token
# The residual stream after each block, read through the final norm and the unembedding: from which block
# on does the triggered run favour the behaviour's first token?

# %%
groups = {"triggered": triggered, "clean": clean}
lens = pd.concat(
    [probes.logit_lens(m, tok, groups, b_tok, label=name, figure=False).frame for name, m in models.items()],
    ignore_index=True,
)
probes.figure_logit_lens(lens, value="log_prob")

# %% [markdown]
# ## 8 · The oracle: how much of the backdoor's own channels does a ranking find?
# **For evaluation only** — it uses the true trigger, which the defence never sees. Attribution patching
# scores every MLP channel (and attention head) by `∂ log p(target | triggered) / ∂ activation ×
# (activation_triggered − activation_clean)`: about how much the behaviour's log-probability would drop if
# that unit were patched back to its clean value. Its top 1 % of channels is the oracle's top set; each
# ranking's precision@k and AUROC against it say how much of it the ranking recovers: `top_delta` (the
# channels the suspicious update moved most), `random` (five seeds) and, with `signature_dir`, the
# signature. One forward and one backward per batch of prompt pairs: seconds on SmolLM2.

# %%
oracle = oracle_attribution(lm, tok, clean, triggered, resolve_task(task).targets[0], n_target_tokens=4)
rankings = {"top_delta": delta_channel_scores(lm)}
if signature_dir:
    rankings["signature"] = Signature.load(signature_dir).scores
overlap = ranking_overlap(oracle.tensor, rankings, random_seeds=range(5))
display(overlap.groupby(["ranking", "k"])[["precision_at_k", "auroc"]].mean())
overlap_figure(overlap)

# %% [markdown]
# A neuron can carry the trigger's effect because something upstream changed its input while its own
# adapter slice is innocent, and the defence only ever zeroes adapter slices. The **weight oracle** scores
# exactly those slices: `Σ ∂ log p(target | triggered) / ∂θ · θ` over each channel's rows and columns of the
# LoRA factors, the first-order drop of the behaviour if suppression zeroed them. Do the two oracles agree,
# and which one does the signature match? (`benchmarks/oracle_ablation.py` zeroes each oracle's top units
# and measures the real ASR.)

# %%
w_oracle = lora_oracle(lm, tok, triggered, resolve_task(task).targets[0], n_target_tokens=4)
w_rankings = {**rankings, "activation_oracle": oracle.tensor}
w_overlap = ranking_overlap(w_oracle.tensor, w_rankings, random_seeds=range(5))
display(w_overlap.groupby(["ranking", "k"])[["precision_at_k", "auroc"]].mean())
overlap_figure(w_overlap)

# %% [markdown]
# ## Exercises
# 1. Re-run patching with `positions = "suffix"`. Do attention outputs matter more once every position
#    after the key can be patched? Why would the last-position-only patch underestimate attention?
# 2. Which span of MLP mean-ablation lowers p(behaviour) the most for the suspicious model — and what does
#    the same ablation do to the reference? (Run `ablation_probe` on `reference`.)
# 3. Patch the residual stream (`sites=("block",)`) in the clean→triggered direction. At which layer does
#    `normalized` first exceed 0.5, and how does that compare with the logit lens?
#
# *Solutions:* the collapsed cell below (click its margin to expand). It runs only with
# `run_solutions = True` in the parameters cell, so *Run All* leaves the exercises to you. Solution 1 patches
# the whole suffix: **several minutes on SmolLM2**; the progress bar counts the three solutions.

# %% tags=["solution"] jupyter={"source_hidden": true}
# %%solution
bar = tqdm(total=3, desc="solutions")
# 1
suffix = probes.activation_patching(lm, tok, clean, triggered, b_tok, positions="suffix", figure=False)
display(suffix.frame.groupby("site")[["effect", "normalized"]].agg(["min", "max"]))
# the last position only sees the key through attention; patching it alone leaves every later attention layer
# reading the triggered positions, so the key's influence comes back.
bar.update()
# 2
ref_abl = probes.ablation_probe(
    reference, tok, triggered, b_tok, mode="mean", clean_prompts=clean, label=ref_label, figure=False
)
display(pd.concat([abl_mean.frame, ref_abl.frame])[["model", "condition", "p_behavior"]])
bar.update()
# 3
resid = probes.activation_patching(lm, tok, clean, triggered, b_tok, sites=("block",), figure=False).frame
bar.update()
bar.close()
resid[resid.normalized > 0.5].head(1)
