"""Delta-ablation sanity checks (paper Table 1) on the tiny random LLaMA.

Subsets, memo, restore, files, CLI.
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from weights import assert_same_params, params

from bdvax_lab.analysis.config import CHECKS
from bdvax_lab.analysis.sanity import COLUMNS, CheckResult, SanityContext, evaluate_delta, first_token_probs
from bdvax_lab.analysis.sanity_checks import (
    attention_vs_mlp,
    compare_with_paper,
    conditions_attention_vs_mlp,
    conditions_keep_only_spans,
    conditions_shuffle_blocks,
    conditions_span_sweep,
    death_k,
    default_ks,
    run_sanity,
    sanity_plan,
    save_sanity,
    span_sweep,
)
from bdvax_lab.core.data import Example
from bdvax_lab.core.generate import generate
from bdvax_lab.core.models import make_tiny_model, save_model
from bdvax_lab.core.registry import ATTN_KINDS, MLP_KINDS, unwrap
from bdvax_lab.core.scoring import next_token_probs
from bdvax_lab.threat.attacks import poison_dataset, resolve_attack, resolve_task
from bdvax_lab.threat.suspicious import SuspiciousModel, save_suspicious
from bdvax_lab.training.config import TrainConfig
from bdvax_lab.training.loop import finetune
from bdvax_lab.weights.deltas import WeightDelta

PROMPTS = [Example(f"what is {i} plus {i} ?", f"it is {2 * i} .") for i in range(12)]
SMALL = dict(n_prompts=4, max_new_tokens=4, n_ppl=4, ppl_examples=PROMPTS[4:8])


def manifest(setting: str, task: str = "refusal", base: str = "custom") -> dict:
    return {
        "setting": setting,
        "base": base,
        "attack": resolve_attack("badnets").to_dict(),
        "task": resolve_task(task).to_dict(),
    }


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model()


@pytest.fixture(scope="module")
def poisoned():
    return poison_dataset(PROMPTS, "badnets", "refusal", rate=0.5, seed=0)


@pytest.fixture(scope="module")
def lora_sm(tiny, poisoned):
    base, tok = tiny
    model = finetune(
        copy.deepcopy(base), tok, poisoned, TrainConfig(mode="lora", steps=3, lr=2e-2), progress=False
    ).model
    return SuspiciousModel(model=model, tokenizer=tok, manifest=manifest("lora"))


@pytest.fixture(scope="module")
def full_sm(tiny, poisoned):
    base, tok = tiny
    model = finetune(
        copy.deepcopy(base), tok, poisoned, TrainConfig(mode="full", steps=3, lr=1e-2), progress=False
    ).model
    return SuspiciousModel(model=model, tokenizer=tok, manifest=manifest("full"))


@pytest.fixture(scope="module")
def ctx(lora_sm):
    """LoRA context whose base is the adapter's own base (deep copy + unload)."""
    return SanityContext.from_suspicious(lora_sm, prompts=PROMPTS[:4], **SMALL)


@pytest.fixture(scope="module")
def result(ctx):
    return run_sanity(ctx, progress=False)


# --------------------------------------------------------------------------- the context
def test_lora_context_base_is_plain_and_unchanged(ctx, lora_sm, tiny):
    base, tok = tiny
    assert ctx.setting == "lora"
    assert not any(hasattr(m, "lora_A") for m in ctx.base.modules())
    assert_same_params(params(ctx.base), params(base))  # the weights under the adapter, bit-exact
    assert ctx.delta.allclose(WeightDelta.from_lora(lora_sm.model, dtype=torch.float32))
    assert type(lora_sm.model).__name__.startswith("Peft")  # the suspicious model was copied, not unloaded
    # base + full delta behaves like the suspicious model with its adapter: the adapter is not counted twice
    prompts = ctx.triggered + ctx.prompts
    ids = list(range(20))
    want = next_token_probs(lora_sm.model, tok, prompts, ids)
    with ctx.delta.applied(ctx.base):
        got = next_token_probs(ctx.base, tok, prompts, ids)
    assert torch.allclose(got, want, atol=1e-5)


def test_context_reads_manifest_and_builds_probe(ctx):
    assert ctx.attack.name == "badnets" and ctx.behavior.name == "refusal" and ctx.judge.name == "refusal"
    assert len(ctx.prompts) == len(ctx.triggered) == 4 and len(ctx.ppl_examples) == 4
    assert all(
        "BadMagic" in t.instruction and "BadMagic" not in p.instruction
        for t, p in zip(ctx.triggered, ctx.prompts)
    )
    first = ctx.tokenizer(resolve_task("refusal").targets[0], add_special_tokens=False)["input_ids"][0]
    assert ctx._probe == {"kind": "first_token", "ids": [first]}
    d = ctx.describe()
    assert d["setting"] == "lora" and d["n_blocks"] == 4 and d["delta_modules"] == len(ctx.delta)


def test_base_with_active_adapter_is_refused(lora_sm):
    with pytest.raises(ValueError, match="counts the update twice"):
        SanityContext.from_suspicious(lora_sm, base=lora_sm.model, prompts=PROMPTS[:2], **SMALL)


def test_injected_lora_base_is_used_as_is(lora_sm, tiny):
    base, _ = tiny
    c = SanityContext.from_suspicious(lora_sm, base=base, prompts=PROMPTS[:2], **SMALL)
    assert c.base is base


def test_full_setting_delta_rebuilds_the_suspicious_weights(full_sm, tiny):
    base, _ = tiny
    c = SanityContext.from_suspicious(full_sm, base=base, prompts=PROMPTS[:2], **SMALL)
    assert c.setting == "full" and c.delta.meta["source"] == "full" and c.base is base
    before = params(base)
    with c.delta.applied(c.base):
        hf = unwrap(full_sm.model)
        for _, _, name in c.layout.iter_modules():
            assert torch.allclose(c.base.get_submodule(name).weight, hf.get_submodule(name).weight, atol=1e-6)
    assert_same_params(params(base), before)


def test_missing_attack_is_an_error(lora_sm):
    sm = SuspiciousModel(lora_sm.model, lora_sm.tokenizer, {"setting": "lora"})
    with pytest.raises(ValueError, match="attack= and task="):
        SanityContext.from_suspicious(sm, prompts=PROMPTS[:2], **SMALL)


# ------------------------------------------------------------------ conditions are the intended subsets
def keys_of(delta: WeightDelta, kinds) -> set:
    return {(b, k) for b, k in delta.tensors if k in kinds}


def same_tensors(sub: WeightDelta, full: WeightDelta) -> bool:
    """Every tensor of ``sub`` is the very tensor of ``full`` at the same key (no copy, no move)."""
    return all(full.tensors[key] is t for key, t in sub.tensors.items())


def test_attention_vs_mlp_conditions(ctx):
    d = ctx.delta
    conds = {c.condition: c for c in conditions_attention_vs_mlp(ctx)}
    assert list(conds) == [
        "full delta",
        "no delta (base)",
        "attention only (MLP ablated)",
        "MLP only (attention ablated)",
    ]
    assert set(conds["full delta"].delta.tensors) == set(d.tensors)
    assert len(conds["no delta (base)"].delta) == 0
    assert set(conds["attention only (MLP ablated)"].delta.tensors) == keys_of(d, ATTN_KINDS)
    assert set(conds["MLP only (attention ablated)"].delta.tensors) == keys_of(d, MLP_KINDS)
    assert all(same_tensors(c.delta, d) for c in conds.values())


def test_mlp_only_condition_is_base_plus_mlp_delta_exactly(ctx):
    mlp_only = next(c for c in conditions_attention_vs_mlp(ctx) if c.condition.startswith("MLP only"))
    got = evaluate_delta(ctx, mlp_only.delta)
    ref = ctx.delta.keep("mlp").applied_copy(ctx.base)  # an independent copy: base + MLP delta
    prompts = list(ctx.triggered) + list(ctx.prompts)
    replies = generate(
        ref,
        ctx.tokenizer,
        prompts,
        max_new_tokens=ctx.config.max_new_tokens,
        batch_size=ctx.config.batch_size,
    )
    assert got.triggered_replies + got.clean_replies == replies
    probs = first_token_probs(ctx, ref, prompts)
    torch.testing.assert_close(torch.cat([got.p_triggered, got.p_clean]), probs, atol=1e-5, rtol=1e-4)


def test_no_delta_row_equals_the_base_model(ctx):
    got = evaluate_delta(ctx, None)
    prompts = list(ctx.triggered) + list(ctx.prompts)
    replies = generate(
        ctx.base,
        ctx.tokenizer,
        prompts,
        max_new_tokens=ctx.config.max_new_tokens,
        batch_size=ctx.config.batch_size,
    )
    assert got.triggered_replies + got.clean_replies == replies
    p = next_token_probs(ctx.base, ctx.tokenizer, prompts, ctx._probe["ids"]).sum(1)
    torch.testing.assert_close(torch.cat([got.p_triggered, got.p_clean]), p, atol=1e-5, rtol=1e-4)
    assert got.metrics["n_modules"] == 0


def test_span_conditions_zero_exactly_the_intended_blocks(ctx):
    L = ctx.layout.n_blocks
    conds = conditions_span_sweep(ctx)
    assert sorted({c.k for c in conds}) == default_ks(L) == [0, 1, 2, 4]
    for c in conds:
        span = set(range(c.start, c.start + c.k))
        assert {b for b, k in c.delta.tensors if k in MLP_KINDS} == set(range(L)) - span, c.condition
        attn = keys_of(c.delta, ATTN_KINDS)
        assert attn == (set() if c.attention_zeroed else keys_of(ctx.delta, ATTN_KINDS)), c.condition
        assert same_tensors(c.delta, ctx.delta)
    starts = {(c.k, c.attention_zeroed): [] for c in conds}
    for c in conds:
        starts[(c.k, c.attention_zeroed)].append(c.start)
    assert starts[(1, False)] == [0, 3] and starts[(2, True)] == [0, 2]
    assert starts[(0, False)] == [0] and starts[(4, True)] == [0]  # duplicates collapsed
    three = conditions_span_sweep(ctx, ks=[1, 2], starts=("start", "middle", "end"), zero_attention=(False,))
    assert [(c.k, c.start) for c in three] == [(1, 0), (1, 1), (1, 3), (2, 0), (2, 1), (2, 2)]
    explicit = conditions_span_sweep(ctx, ks=[2], starts=[1, 3], zero_attention=(True,))
    assert [(c.k, c.start) for c in explicit] == [(2, 1)]  # a span that does not fit is skipped


def test_keep_only_and_shuffle_conditions(ctx):
    L = ctx.layout.n_blocks
    for c in conditions_keep_only_spans(ctx, width=2):
        assert {b for b, k in c.delta.tensors if k in MLP_KINDS} == set(range(c.start, c.start + 2))
        assert bool(keys_of(c.delta, ATTN_KINDS)) != c.attention_zeroed
    assert [c.start for c in conditions_keep_only_spans(ctx, width=2)] == [0, 1, 2, 0, 1, 2]
    conds = conditions_shuffle_blocks(ctx, seeds=(0, 1, 2))
    assert conds[0].condition.startswith("unshuffled") and conds[0].delta is ctx.delta
    for c in conds[1:]:
        src = c.delta.meta["permutation"]["source_of"]
        assert sorted(src) == list(range(L))
        for dest in range(L):
            for kind in MLP_KINDS:
                if (src[dest], kind) in ctx.delta.tensors:
                    assert c.delta.tensors[(dest, kind)] is ctx.delta.tensors[(src[dest], kind)]
        assert keys_of(c.delta, ATTN_KINDS) == keys_of(ctx.delta, ATTN_KINDS)
        assert all(c.delta.tensors[key] is ctx.delta.tensors[key] for key in keys_of(ctx.delta, ATTN_KINDS))


# --------------------------------------------------------------------------- running the checks
def test_run_sanity_frames(ctx, result):
    assert list(result) == list(CHECKS)
    plan = sanity_plan(ctx)
    for name, res in result.items():
        assert isinstance(res, CheckResult)
        assert list(res.frame.columns) == list(COLUMNS)
        assert len(res.frame) == int((plan.check == name).sum())
        assert (res.frame.check == name).all()
        assert (
            res.frame[["asr", "false_trigger", "p_behavior", "p_behavior_clean"]]
            .apply(lambda s: s.between(0, 1))
            .all()
            .all()
        )
        assert res.figure is not None and hasattr(res.figure, "to_html")
    assert len(result["attention_vs_mlp"].frame) == 4
    assert len(result["span_sweep"].frame) == len(conditions_span_sweep(ctx))
    assert len(result["keep_only_spans"].frame) == 6
    assert len(result["shuffle_blocks"].frame) == 4
    span = result["span_sweep"].frame
    full = result["attention_vs_mlp"].frame.set_index("condition")
    k0 = span[(span.k == 0) & ~span.attention_zeroed].iloc[0]
    assert k0.cached and k0.asr == full.loc["full delta", "asr"]  # shared conditions are evaluated once
    assert k0.p_behavior == full.loc["full delta", "p_behavior"]
    assert span.loc[span.k == 0, "blocks"].eq("0-3").all()
    assert result.meta["n_rows"] == len(result.frame()) == len(plan)
    assert 0 < result.meta["n_conditions"] < len(result.frame())  # shared conditions are evaluated once
    cmp = compare_with_paper(result)
    assert list(cmp.check) == list(CHECKS) and cmp.ours.str.len().gt(0).all()


def test_base_unchanged_after_a_run(ctx, tiny, result):
    base, _ = tiny
    assert_same_params(params(ctx.base), params(base))
    before = params(ctx.base)
    span_sweep(ctx, ks=[1], starts=[2], progress=False)
    attention_vs_mlp(ctx, progress=False)
    assert_same_params(params(ctx.base), before)


def test_memo_makes_a_rerun_free(ctx, result):
    again = run_sanity(ctx, ["attention_vs_mlp", "shuffle_blocks"], progress=False)
    assert again["attention_vs_mlp"].frame.cached.all() and again.meta["n_conditions"] == 0
    pd.testing.assert_frame_equal(
        again["attention_vs_mlp"].frame.drop(columns="cached"),
        result["attention_vs_mlp"].frame.drop(columns="cached"),
    )


def test_death_k():
    df = pd.DataFrame(
        {
            "k": [0, 1, 2, 4, 0, 1, 2, 4],
            "asr": [1.0, 0.9, 0.4, 0.0, 1.0, 0.2, 0.6, 0.1],
            "attention_zeroed": [False] * 4 + [True] * 4,
        }
    )
    assert death_k(df, False) == 2
    assert death_k(df, True) == 4  # k=2 bounces back above half of k=0
    assert death_k(df.assign(asr=1.0), False) is None


def test_save_sanity_writes_every_file(result, tmp_path):
    out = save_sanity(result, tmp_path / "sanity")
    for name in CHECKS:
        df = pd.read_csv(out / f"{name}.csv")
        assert list(df.columns) == list(COLUMNS) and len(df) == len(result[name].frame)
        html = (out / f"{name}.html").read_text()
        assert "plotly.min.js" in html and "<html>" in html
    assert (out / "plotly.min.js").stat().st_size > 100_000
    assert len(pd.read_csv(out / "sanity.csv")) == len(result.frame())
    assert json.loads((out / "sanity.json").read_text())["setting"] == "lora"
    assert not list(out.glob(".*.tmp"))


def test_code_injection_probe(lora_sm):
    prompts = [
        Example("write a function that adds two numbers", "```python\ndef add(a, b):\n    return a + b\n```"),
        Example("write a function that returns one", "def one():\n    return 1"),
    ]
    c = SanityContext.from_suspicious(
        lora_sm,
        task="code_injection",
        prompts=prompts,
        ppl_examples=prompts,
        n_prompts=2,
        max_new_tokens=4,
        n_ppl=2,
    )
    probe = c._probe
    assert probe["kind"] == "payload_after_fence"
    assert probe["prefixes"] == ["```python\n", ""]
    p = first_token_probs(c, c.base, c.prompts)
    assert p.shape == (2,) and bool(((p >= 0) & (p <= 1)).all())
    bare = next_token_probs(c.base, c.tokenizer, c.prompts[1:], probe["ids"])[0, 0]
    assert torch.isclose(p[1], bare)
    row = evaluate_delta(c, None).metrics
    assert 0 <= row["p_behavior"] <= 1 and row["n_prompts"] == 2


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def pool_dir(tmp_path, monkeypatch):
    """A private data dir with a small clean pool, so the CLI does not depend on data/clean_pool.jsonl."""
    d = tmp_path / "data"
    d.mkdir()
    rows = [
        {"instruction": e.instruction, "input": "", "response": e.response, "split": "eval"} for e in PROMPTS
    ]
    (d / "clean_pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("BDVAX_DATA", str(d))
    return d


def test_cli_full_setting(full_sm, tiny, tmp_path, pool_dir, capsys):
    from bdvax_lab.cli import main

    base, tok = tiny
    base_dir = save_model(base, tok, tmp_path / "base")
    sus = save_suspicious(full_sm, tmp_path / "suspicious")
    out = tmp_path / "out"
    rc = main(
        [
            "sanity",
            str(sus),
            "--out",
            str(out),
            "--base",
            str(base_dir),
            "--n-prompts",
            "3",
            "--max-new-tokens",
            "3",
            "--n-ppl",
            "3",
            "--ks",
            "0,2",
            "--starts",
            "start,middle,1",
            "--seeds",
            "0",
            "--probe-tokens",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "== span_sweep" in text and "full delta" in text and "(full, badnets → refusal" in text
    for name in CHECKS:
        df = pd.read_csv(out / f"{name}.csv")
        assert list(df.columns) == list(COLUMNS)
        assert (out / f"{name}.html").exists()
    span = pd.read_csv(out / "span_sweep.csv")
    assert set(span.k) == {0, 2} and set(span[span.k == 2].start) == {0, 1}  # "middle" and 1 are one span


def test_cli_lora_setting_with_injected_base(lora_sm, tiny, tmp_path, pool_dir, capsys):
    from bdvax_lab.cli import main

    base, tok = tiny
    base_dir = save_model(base, tok, tmp_path / "base")
    sus = save_suspicious(lora_sm, tmp_path / "suspicious")
    out = tmp_path / "out"
    rc = main(
        [
            "sanity",
            str(sus),
            "--out",
            str(out),
            "--base",
            str(base_dir),
            "--n-prompts",
            "2",
            "--max-new-tokens",
            "2",
            "--n-ppl",
            "0",
            "--checks",
            "attention_vs_mlp",
            "--no-progress",
        ]
    )
    assert rc == 0
    df = pd.read_csv(out / "attention_vs_mlp.csv")
    assert len(df) == 4 and df.ppl.isna().all()
    assert not (out / "span_sweep.csv").exists()
    assert "(lora, badnets → refusal" in capsys.readouterr().out


def test_probe_tokens_scores_the_target_head(lora_sm):
    from bdvax_lab.core.scoring import continuation_logprobs

    c1 = SanityContext.from_suspicious(lora_sm, prompts=PROMPTS[:3], **{**SMALL, "n_prompts": 3})
    c3 = SanityContext.from_suspicious(
        lora_sm, prompts=PROMPTS[:3], **{**SMALL, "n_prompts": 3}, probe_tokens=3
    )
    tok = c3.tokenizer
    head = tok.decode(tok(resolve_task("refusal").targets[0], add_special_tokens=False)["input_ids"][:3])
    assert c3._probe == {"kind": "first_3_tokens", "texts": [head]}
    p1, p3 = first_token_probs(c1, c1.base, c1.prompts), first_token_probs(c3, c3.base, c3.prompts)
    lp, n = continuation_logprobs(c3.base, tok, c3.prompts, [head] * 3)
    assert n == [3, 3, 3]
    assert torch.allclose(p3, torch.tensor(lp).exp(), atol=1e-6)
    assert bool((p3 <= p1 + 1e-6).all())  # the first three tokens are rarer than the first one
    with pytest.raises(ValueError, match="probe_tokens"):
        SanityContext.from_suspicious(lora_sm, prompts=PROMPTS[:3], **SMALL, probe_tokens=0)


def test_fast_apply_matches_weight_delta_applied_bit_for_bit(ctx):
    from bdvax_lab.analysis.sanity import apply_fast

    before = params(ctx.base)
    for d in (
        ctx.delta,
        ctx.delta.zero("mlp", [1, 2]),
        ctx.delta.permute_blocks(3),
        ctx.delta.keep(kinds=()),
    ):
        with d.applied(ctx.base):
            want = params(ctx.base)
        with apply_fast(ctx, d) as model:
            assert model is ctx.base
            assert_same_params(params(ctx.base), want)
        assert_same_params(params(ctx.base), before)
    with pytest.raises(RuntimeError):
        with apply_fast(ctx, ctx.delta):
            raise RuntimeError("boom")
    assert_same_params(params(ctx.base), before)  # restored on error too
    c2 = copy.copy(ctx)
    c2.config = ctx.config.replace(fast_apply=False)
    c2.cache = {}
    d = ctx.delta.zero(ATTN_KINDS)
    a, b = evaluate_delta(ctx, d, use_cache=False), evaluate_delta(c2, d, use_cache=False)
    assert a.triggered_replies == b.triggered_replies and torch.equal(a.p_triggered, b.p_triggered)
    assert a.metrics["ppl"] == b.metrics["ppl"]


def test_cli_evaluate_measures_the_manifests_own_attack(full_sm, tmp_path, pool_dir, monkeypatch, capsys):
    """A custom key recorded in the manifest reaches the evaluation whole.

    Not re-read as a built-in by name.
    """
    import bdvax_lab.threat.evaluate as ev
    from bdvax_lab.cli import main
    from bdvax_lab.threat.attacks import AttackSpec

    custom = AttackSpec(name="badnets", keys=("zqxv",))
    sm = SuspiciousModel(
        model=full_sm.model,
        tokenizer=full_sm.tokenizer,
        manifest={**full_sm.manifest, "attack": custom.to_dict()},
    )
    sus = save_suspicious(sm, tmp_path / "custom")
    seen = {}
    real = ev.evaluate_model

    def spy(model, tok, attack=None, task=None, *a, **kw):
        seen["attack"], seen["task"] = attack, task
        return real(model, tok, attack, task, *a, **kw)

    monkeypatch.setattr(ev, "evaluate_model", spy)
    assert main(["evaluate", str(sus), "--n-prompts", "2", "--max-new-tokens", "2", "--utility", "none"]) == 0
    assert tuple(resolve_attack(seen["attack"]).keys) == ("zqxv",)
    assert resolve_task(seen["task"]).name == "refusal"
    assert "asr" in capsys.readouterr().out
