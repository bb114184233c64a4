"""The benchmark scripts start from any working directory: their imports of ``experiments/`` (which lives in
the checkout, not in the installed package) resolve, and a bad argument gets argparse's one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("reproduce.py", ["--preset", "nosuch"], "unknown preset 'nosuch'"),
        ("bench.py", ["--seeds", "one"], "--seeds: 'one': item 'one': expected int"),
        ("bench.py", ["--random-seeds", "0,-1"], "--random-seeds: '0,-1': item '-1': must be ≥ 0"),
        ("bench.py", ["--defences", "bdvax,nosuch"], "has unknown ['nosuch']"),
        (
            "bench.py",
            ["--targets", "badnets:refusal:full:format"],
            "['badnets:refusal:full:format'] not among the bench's targets",
        ),
        ("bench.py", ["--targets", "nonsense"], "--targets: bench target 'nonsense': expected"),
        ("bench.py", ["--no-repair", "--repair-in-domain", "0.1"], "--repair-in-domain needs a repair"),
        ("twin_recipe.py", ["--recipes", "default,nosuch"], "bad recipes ['nosuch']"),
        ("oracle_ablation.py", ["--recipes", "attn_only,x"], "bad recipes ['x']"),
        ("oracle_ablation.py", ["--channel-shares", "0.01,2"], "'0.01,2': item '2': must be in (0, 1]"),
        ("oracle_ablation.py", ["--ig-steps", "-2"], "--ig-steps: "),
        ("lovo_heads.py", ["--rhos", "0.5,x"], "'0.5,x': item 'x': expected float"),
        ("lovo_heads.py", ["--heads", "0,-3"], "item '-3': must be ≥ 0"),
        ("oracle_ablation.py", ["--target", "badnets:refusal:full:format"], "give a lora target"),
        ("signature_vs_delta.py", ["--target", "badnets:refusal:full:format"], "give a lora target"),
        ("signature_vs_delta.py", ["--rhos", "0.1,0"], "'0.1,0': item '0': must be in (0, 1]"),
        ("signature_vs_delta.py", ["--oracle-shares", "0.2,3"], "'0.2,3': item '3': must be in (0, 1]"),
        ("signature_vs_delta.py", ["--oracle-steps", "x"], "--oracle-steps: "),
        ("twin_recipe.py", ["--target", "nonsense"], "bench target 'nonsense'"),
        (
            "oracle_ablation.py",
            ["--prompts", "100000"],
            "--pairs 32 + --prompts 100000: 32 + 100000 prompts asked",
        ),
    ],
)
def test_benchmark_scripts_import_from_anywhere(tmp_path, script, args, expect):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--runs", str(tmp_path)]
        if script == "bench.py"
        else [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "ModuleNotFoundError" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 2 and expect in out.stderr, out.stderr[-2000:]


def test_machine_speed_times_the_pipeline_path():
    """The step ``bdvax plan`` is fed: the reference workload on the fused, shared-prefix path."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "machine_speed.py"), "--steps", "2", "--path", "pipeline"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(rec) == {"pipeline_step_s", "steps", "measured_in_s"} and rec["steps"] == 2
    assert 0 < rec["pipeline_step_s"] < rec["measured_in_s"]


def test_twin_recipes_change_one_thing_each(monkeypatch):
    """experiments/twin_recipes.py: each recipe differs from the bench's signature recipe in its one field."""
    from bdvax_lab.bdvax.config import SignatureConfig, default_twin_train
    from experiments import twin_recipes as mod

    base = SignatureConfig(family="insult", rho=0.8, twin_train=default_twin_train("lora"))
    assert mod.recipe_config(base, "default") == base
    assert mod.recipe_config(base, "equal_steps").clean_steps == base.twin_train.steps == 60
    assert mod.recipe_config(base, "lr_double").twin_train.lr == pytest.approx(2e-3)
    assert mod.recipe_config(base, "steps_half").twin_train.steps == 30
    assert mod.recipe_config(base, "n_clean_20").n_clean == 20
    assert mod.recipe_config(base, "n_variants_3").n_variants == 3
    assert mod.recipe_config(base, "attn_only").twin_train.target_kinds == ("q", "k", "v", "o")
    changed = {
        name: {k for k, v in mod.recipe_config(base, name).to_dict().items() if v != base.to_dict()[k]}
        for name in mod.RECIPES
    }
    assert changed["dilute"] == {"n_clean", "poison_ratio", "twin_train"}
    assert mod.recipe_config(base, "dilute").twin_train.steps == 180
    assert changed["default"] == set()
    assert changed["fresh"] == set()  # it changes the model the twins start from (recipe_start)
    assert all(len(v) == 1 for k, v in changed.items() if k not in ("default", "dilute", "fresh"))
    with pytest.raises(ValueError, match="unknown recipe 'x'"):
        mod.recipe_config(base, "x")
    # changes to the twins' own recipe add up (lr and steps together)
    monkeypatch.setitem(mod.RECIPES, "both", {"lr_scale": 0.5, "steps_scale": 2.0, "target_kinds": ("q",)})
    both = mod.recipe_config(base, "both").twin_train
    assert (both.lr, both.steps, both.target_kinds) == (pytest.approx(5e-4), 120, ("q",))


def test_bench_plan_runs_a_target_at_the_seed_asked_for(tmp_path):
    """``--targets T --seeds 1`` plans T at implant seed 1 even where the config gives T only seed 0."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--targets", "badnets:refusal:lora:format"]
        + [
            "--seeds",
            "1",
            "--defences",
            "top_delta,random",
            "--random-seeds",
            "0",
            "--plan",
            "--runs",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [
        line.split() for line in out.stdout.splitlines() if line.startswith("badnets:refusal:lora:format")
    ]
    assert [(r[1], r[2]) for r in rows] == [
        ("1", "none"),
        ("1", "bdvax"),
        ("1", "top_delta"),
        ("1", "random-seed0"),
    ]
    assert "0 of 4 rows cached" in out.stdout


def test_lovo_heads_refuses_an_existing_out_that_is_not_its_curve(tmp_path):
    """An existing ``--out`` that is not a lovo_heads curve: a one-line error before any work, file kept."""
    notes = tmp_path / "notes.csv"
    notes.write_text("a,b\n1,2\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lovo_heads.py"), "--out", str(notes)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "exists and is not a lovo_heads curve" in out.stderr, out.stderr[-2000:]
    assert notes.read_text() == "a,b\n1,2\n"


def test_fresh_recipe_starts_twins_from_the_base_on_the_suspicious_models_replies(
    tiny, toy_examples, monkeypatch
):
    """``recipe_start(..., "fresh")``: a re-initialised adapter (the base model's logits), the suspicious
    model untouched, and the pool answered by the suspicious model (not by the fresh start)."""
    import copy
    from types import SimpleNamespace

    import torch

    from bdvax_lab.core import selfdistill
    from bdvax_lab.training.config import TrainConfig
    from bdvax_lab.training.loop import finetune
    from experiments import twin_recipes as mod

    base, tok = tiny
    suspicious = finetune(
        copy.deepcopy(base), tok, toy_examples, TrainConfig(mode="lora", steps=3, lr=1e-2), progress=False
    ).model
    seen = []
    monkeypatch.setattr(
        selfdistill, "defender_data", lambda model, *a, **k: seen.append(model) or toy_examples[:3]
    )
    sm = SimpleNamespace(model=suspicious, tokenizer=tok)
    assert mod.recipe_start(sm, "lr_half", "refusal") == (sm, None)
    before = {n: p.detach().clone() for n, p in suspicious.named_parameters()}
    (start, start_tok), pool = mod.recipe_start(sm, "fresh", "refusal")
    assert start_tok is tok and pool == toy_examples[:3] and seen == [suspicious]
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        same = torch.allclose(start(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
        moved = not torch.allclose(suspicious(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    assert same and moved
    assert all(torch.equal(p, before[n]) for n, p in suspicious.named_parameters())
    fresh_a = {n: p for n, p in start.named_parameters() if "lora_A" in n}
    assert fresh_a and all(not torch.equal(p, before[n]) for n, p in fresh_a.items())
    with pytest.raises(ValueError, match="unknown recipe"):
        mod.recipe_start(sm, "nosuch", "refusal")
